//! Holding the store against the hosts. For each host that answers, its
//! VMs (all tenants', `HostService.ListVms`) against the placements the
//! store gives it:
//! - a placed VM the host does not have is marked lost (its calls say so,
//!   lists show it failed, a delete forgets it);
//! - a pending placement older than `settle` (its create's answer never
//!   came) is placed if the host has the VM, forgotten if not;
//! - a VM the host has and the store does not place there is a stray:
//!   reported in the admin list and a metric, never adopted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use metald_api::proto::vmprovisioner::v1 as wire;

use crate::hosts::{Health, Host, Hosts};
use crate::store::{FleetStore, PlacementStatus, StoreError};

const LIST_PROCEDURE: &str = "/vmprovisioner.v1.HostService/ListVms";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    pub host: String,
    pub vm_id: String,
    pub tenant: String,
    pub state: Option<wire::VmState>,
}

/// The strays the last reconciliation of each host found.
#[derive(Debug, Default)]
pub struct Strays(Mutex<BTreeMap<String, Vec<Stray>>>);

impl Strays {
    /// Whether `host` was found to hold `vm_id` without the store placing it there.
    pub fn contains(&self, host: &str, vm_id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host)
            .is_some_and(|strays| strays.iter().any(|stray| stray.vm_id == vm_id))
    }

    /// The strays of `tenant` on `host` in one of `states` (any when empty).
    pub fn count(&self, host: &str, tenant: &str, states: &[wire::VmState]) -> usize {
        let strays = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        strays.get(host).map_or(0, |strays| {
            strays
                .iter()
                .filter(|stray| stray.tenant == tenant && (states.is_empty() || stray.state.is_some_and(|state| states.contains(&state))))
                .count()
        })
    }

    pub fn all(&self) -> Vec<Stray> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).values().flatten().cloned().collect()
    }

    fn set(&self, host: &str, strays: Vec<Stray>) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(host.to_owned(), strays);
    }
}

/// Every VM on `host`, by id, with its tenant and state; `None` if the host did not answer.
async fn vms_on(host: &Host) -> Option<BTreeMap<String, (String, Option<wire::VmState>)>> {
    let mut vms = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let request = wire::ListVmsRequest { page_token, page_size: 1000, ..Default::default() };
        let options = host.link().call_options("", LIST_PROCEDURE, &request, None);
        let answer = host.link().list_all_vms(request, options).await.ok()?.into_owned();
        vms.extend(answer.vms.into_iter().map(|vm| (vm.vm_id, (vm.customer_id, vm.state.as_known()))));
        if answer.next_page_token.is_empty() {
            return Some(vms);
        }
        page_token = answer.next_page_token;
    }
}

/// Reconciles every ready host once.
pub async fn reconcile(store: &dyn FleetStore, hosts: &Hosts, strays: &Strays, settle: Duration) -> Result<(), StoreError> {
    for host in hosts.all() {
        if host.health() != Health::Ready {
            continue;
        }
        let placements = store.placements(Some(&host.name)).await?;
        let Some(on_host) = vms_on(&host).await else { continue };
        let now_ms = metald_types::time::unix_millis_now();
        let settled = |created_at_ms: u64| now_ms.saturating_sub(created_at_ms) > u64::try_from(settle.as_millis()).unwrap_or(u64::MAX);
        let mut placed_here = BTreeSet::new();
        for placement in placements {
            placed_here.insert(placement.vm_id.clone());
            let there = on_host.contains_key(&placement.vm_id);
            match (&placement.status, there) {
                (PlacementStatus::Placed, false) => {
                    let reason = crate::gateway::lost_reason(&host.name);
                    tracing::warn!(vm_id = %placement.vm_id, host = %host.name, "VM lost");
                    store.update_placement(&placement.vm_id, &host.name, PlacementStatus::Lost { reason }).await?;
                }
                (PlacementStatus::Pending, true) if settled(placement.created_at_ms) => {
                    store.update_placement(&placement.vm_id, &host.name, PlacementStatus::Placed).await?;
                }
                (PlacementStatus::Pending, false) if settled(placement.created_at_ms) => {
                    tracing::info!(vm_id = %placement.vm_id, host = %host.name, "a create that never reached its host is forgotten");
                    store.remove_placement(&placement.vm_id).await?;
                }
                (PlacementStatus::Lost { .. }, true) => {
                    store.update_placement(&placement.vm_id, &host.name, PlacementStatus::Placed).await?;
                }
                _ => {}
            }
        }
        let found: Vec<Stray> = on_host
            .into_iter()
            .filter(|(vm_id, _)| !placed_here.contains(vm_id))
            .map(|(vm_id, (tenant, state))| Stray { host: host.name.clone(), vm_id, tenant, state })
            .collect();
        if !found.is_empty() {
            tracing::warn!(host = %host.name, count = found.len(), "the host has VMs the gateway's store does not place there");
        }
        strays.set(&host.name, found);
    }
    Ok(())
}
