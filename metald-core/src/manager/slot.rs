//! What the manager holds of each VM: its slot in the registry (id, tenant,
//! console, a summary readable without waiting), and behind the VM's lock
//! its entry (state, configuration, VMM instance, lease, network).

use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;

use super::VmSummary;
use crate::backend::VmmInstance;
use crate::config::VmConfig;
use crate::console::ConsoleLog;
use crate::events::EndedVmm;
use crate::ids::{TenantId, VmId};
use crate::jailer::IdentityLease;
use crate::network::NetworkAttachment;
use crate::process::ProcessExit;
use crate::restart::{NextRestart, RestartCount};
use crate::state::VmState;
use crate::vm_dir::VmDir;

pub(super) struct VmEntry {
    pub(super) state: VmState,
    pub(super) config: VmConfig,
    pub(super) instance: Box<dyn VmmInstance>,
    /// The user the VM's VMMs run as, for the VM's whole life.
    pub(super) identity: Option<Arc<IdentityLease>>,
    /// What the network provider made for the VM.
    pub(super) network: Option<NetworkAttachment>,
    pub(super) vm_dir: VmDir,
    pub(super) failure: Option<String>,
    pub(super) last_exit: Option<ProcessExit>,
    pub(super) booted_at: Option<SystemTime>,
    /// How the last VMMs ended, oldest first, kept in the store for the meter of a later metald.
    pub(super) recent_ends: Vec<EndedVmm>,
    pub(super) created_at: SystemTime,
    pub(super) modified_at: SystemTime,
    /// Bumped whenever a new VMM process is watched; a watcher of an older
    /// process has nothing to say.
    pub(super) watch_generation: u64,
    pub(super) watched_pid: Option<u32>,
    /// Restarts in a row its restart policy made.
    pub(super) restarts: RestartCount,
}

impl VmEntry {
    /// Counts a death of its VMM (or a restart that failed) against its
    /// restart policy: when to boot it again, if the policy allows.
    pub(super) fn next_restart(&mut self, vm_id: &VmId, ran_for: Option<Duration>) -> Option<NextRestart> {
        let policy = self.config.restart;
        let next = self.restarts.next(&policy, ran_for);
        if next.is_none() && policy.on_failure {
            tracing::warn!(%vm_id, "the VM stays failed: its restart policy allows no more restarts");
        }
        next
    }
}

pub(super) struct VmSlot {
    pub(super) vm_id: VmId,
    pub(super) tenant: TenantId,
    /// The VMM that runs it, as its configuration names it.
    pub(super) vmm: String,
    pub(super) console: ConsoleLog,
    pub(super) entry: Arc<Mutex<VmEntry>>,
    summary: StdMutex<VmSummary>,
}

impl VmSlot {
    pub(super) fn new(vm_id: VmId, tenant: TenantId, console: ConsoleLog, entry: VmEntry) -> Arc<Self> {
        let summary = StdMutex::new(summary_of(&vm_id, &tenant, &entry));
        let vmm = entry.config.vmm.clone();
        Arc::new(Self { vm_id, tenant, vmm, console, summary, entry: Arc::new(Mutex::new(entry)) })
    }

    /// The summary as the entry was last changed; never waits for the VM's lock.
    pub(super) fn summary(&self) -> std::sync::MutexGuard<'_, VmSummary> {
        // No code panics while holding it, so a poisoned lock still holds a consistent summary.
        self.summary.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the summary say what `entry` says now.
    pub(super) fn refresh_summary(&self, entry: &VmEntry) {
        *self.summary() = summary_of(&self.vm_id, &self.tenant, entry);
    }
}

impl std::fmt::Debug for VmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSlot").field("vm_id", &self.vm_id).field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

/// The VMs by id, and the ids being created (not yet visible).
#[derive(Default)]
pub(super) struct Registry {
    /// In id order, so a list is read in order and a page starts where the last ended.
    pub(super) vms: std::collections::BTreeMap<VmId, Arc<VmSlot>>,
    pub(super) reserved: std::collections::HashSet<VmId>,
}

fn summary_of(vm_id: &VmId, tenant: &TenantId, entry: &VmEntry) -> VmSummary {
    VmSummary {
        vm_id: vm_id.clone(),
        tenant: tenant.clone(),
        state: entry.state,
        vcpus: entry.config.cpu.vcpu_count,
        memory_bytes: entry.config.memory.size_bytes,
        metadata: entry.config.metadata.clone(),
        created_at: entry.created_at,
        modified_at: entry.modified_at,
        failure: entry.failure.clone(),
    }
}

// The registry guards a plain map; no code panics while holding it, so a
// poisoned lock still holds consistent data.
pub(super) fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
