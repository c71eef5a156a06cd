//! The host beyond its VMs: what a process that ends leaves of the
//! host-wide setup (firewall table, cgroup parents) when no VM remains,
//! and what it made ahead of creates (the jail pool), which it never leaves.

use super::VmManager;
use super::slot::read_lock;
use crate::state::VmState;

impl VmManager {
    /// For a process that is ending: ends what the backends made ahead of
    /// creates (the jail pool's waiting children) and removes their
    /// cgroups, whether VMs remain or not; what could not be removed.
    pub async fn release_spares(&self) -> Vec<String> {
        let backends = self.inner.backends.clone();
        tokio::task::spawn_blocking(move || backends.iter().flat_map(|backend| backend.release_spares()).collect::<Vec<_>>())
            .await
            .unwrap_or_default()
    }

    /// For a process that is ending: when it holds no VM and no create is
    /// under way, removes what was set up on the host for all VMs (the
    /// network's firewall table, the cgroup parent folders), so a host left
    /// without VMs is left as it was found. `None` when VMs remain (they
    /// run on, and the next start takes them over); else what could not be
    /// removed.
    pub async fn release_host_when_empty(&self) -> Option<Vec<String>> {
        {
            let registry = read_lock(&self.inner.registry);
            let holds_a_vm = registry.vms.values().any(|slot| slot.summary().state != VmState::Deleted);
            if holds_a_vm || !registry.reserved.is_empty() {
                return None;
            }
        }
        let mut problems = match &self.inner.network {
            Some(network) => network.release_host().await,
            None => Vec::new(),
        };
        let backends = self.inner.backends.clone();
        problems.extend(
            tokio::task::spawn_blocking(move || backends.iter().flat_map(|backend| backend.release_host()).collect::<Vec<_>>())
                .await
                .unwrap_or_default(),
        );
        Some(problems)
    }
}
