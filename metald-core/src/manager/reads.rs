//! What can be read of the VMs without waiting for an operation in
//! progress: lists, pages, one VM's state and summary, its console, and
//! the host's figures (uids, events).

use std::sync::Arc;

use super::slot::{VmSlot, read_lock};
use super::{Holdings, ManagerError, VmManager, VmPage, VmSummary};
use crate::console::ConsoleLog;
use crate::ids::{TenantId, VmId};
use crate::state::VmState;
use crate::target::VmTarget;

impl VmManager {
    /// The state of one VM, without waiting for an operation in progress.
    pub fn state(&self, vm: impl Into<VmTarget>) -> Result<VmState, ManagerError> {
        self.owned_slot(&vm.into()).map(|slot| slot.summary().state)
    }

    /// One VM's summary (its tenant, state, size), without waiting for an
    /// operation in progress.
    pub fn summary(&self, vm: impl Into<VmTarget>) -> Result<VmSummary, ManagerError> {
        self.live_slot(&vm.into()).map(|slot| slot.summary().clone())
    }

    /// Whether the target's VM exists (and is the caller's), without
    /// copying anything of it: a `NotFound` otherwise.
    pub fn find(&self, vm: impl Into<VmTarget>) -> Result<(), ManagerError> {
        self.live_slot(&vm.into()).map(drop)
    }

    fn live_slot(&self, target: &VmTarget) -> Result<Arc<VmSlot>, ManagerError> {
        let slot = self.owned_slot(target)?;
        if slot.summary().state == VmState::Deleted { Err(ManagerError::NotFound(target.vm_id().clone())) } else { Ok(slot) }
    }

    /// The uid pool's size and use, when VMs get uids of their own.
    /// The backends of one host share one launcher, so the default's is the host's.
    pub fn identity_capacity(&self) -> Option<crate::jailer::IdentityCapacity> {
        self.inner.default_backend.identity_capacity()
    }

    /// How full the default backend's jail pool is; `None` when it keeps none.
    pub fn jail_pool_fill(&self) -> Option<crate::jail_pool::PoolFill> {
        self.inner.default_backend.launcher().and_then(|launcher| launcher.pool_fill())
    }

    /// How many events of each kind this manager published (`failed`,
    /// `booted`, …), every kind listed.
    pub fn event_counts(&self) -> Vec<(&'static str, u64)> {
        self.inner.published.snapshot()
    }

    /// Every VM, optionally of one tenant, in id order; never waits for an
    /// operation in progress.
    pub fn list(&self, tenant: Option<&TenantId>) -> Vec<VmSummary> {
        let registry = read_lock(&self.inner.registry);
        registry
            .vms
            .values()
            .filter(|slot| tenant.is_none_or(|tenant| &slot.tenant == tenant))
            .map(|slot| slot.summary().clone())
            .filter(|summary| summary.state != VmState::Deleted)
            .collect()
    }

    /// What the VMs of a tenant (every tenant's with `None`) hold, in every
    /// state but deleted, summed without copying them; never waits for an
    /// operation in progress.
    pub fn holdings(&self, tenant: Option<&TenantId>) -> Holdings {
        let registry = read_lock(&self.inner.registry);
        let mut held = Holdings::default();
        for slot in registry.vms.values().filter(|slot| tenant.is_none_or(|tenant| &slot.tenant == tenant)) {
            let summary = slot.summary();
            if summary.state != VmState::Deleted {
                held.vms += 1;
                held.vcpus += u64::from(summary.vcpus);
                held.memory_bytes += summary.memory_bytes;
            }
        }
        held
    }

    /// One page of a tenant's VMs (every tenant's with `None`) in id order:
    /// those after `after`, in one of `states` (any state when empty), at
    /// most `limit` of them. Only the page is copied; the rest is counted.
    /// Never waits for an operation in progress.
    pub fn list_page(&self, tenant: Option<&TenantId>, states: &[VmState], after: Option<&VmId>, limit: usize) -> VmPage {
        let registry = read_lock(&self.inner.registry);
        let mut page = VmPage::default();
        for (vm_id, slot) in registry.vms.iter().filter(|(_, slot)| tenant.is_none_or(|tenant| &slot.tenant == tenant)) {
            let summary = slot.summary();
            if summary.state == VmState::Deleted || !(states.is_empty() || states.contains(&summary.state)) {
                continue;
            }
            page.total += 1;
            if after.is_some_and(|after| vm_id <= after) {
                continue;
            }
            if page.vms.len() < limit {
                page.vms.push(summary.clone());
            } else {
                page.more = true;
            }
        }
        page
    }

    /// The VM's console: its tail, its lines as they come, a wait for a line.
    /// It stays readable after the guest stops, until the VM is deleted.
    pub fn console(&self, vm: impl Into<VmTarget>) -> Result<ConsoleLog, ManagerError> {
        self.owned_slot(&vm.into()).map(|slot| slot.console.clone())
    }

    /// The last `max_bytes` the guest printed.
    pub fn console_tail(&self, vm: impl Into<VmTarget>, max_bytes: usize) -> Result<Vec<u8>, ManagerError> {
        let target = vm.into();
        self.console(&target)?.tail(max_bytes).map_err(|source| ManagerError::Console { vm_id: target.vm_id().clone(), source })
    }

    pub(super) fn slot(&self, vm_id: &VmId) -> Result<Arc<VmSlot>, ManagerError> {
        read_lock(&self.inner.registry).vms.get(vm_id).cloned().ok_or_else(|| ManagerError::NotFound(vm_id.clone()))
    }

    /// The target's slot; another tenant's VM is not found, as a missing one.
    pub(super) fn owned_slot(&self, target: &VmTarget) -> Result<Arc<VmSlot>, ManagerError> {
        let slot = self.slot(target.vm_id())?;
        if target.admits(&slot.tenant) { Ok(slot) } else { Err(ManagerError::NotFound(target.vm_id().clone())) }
    }
}
