//! How a change to a VM is made known: applied to its entry and summary,
//! written to the store (on a blocking thread), logged for the audit trail
//! and published as a [`VmEvent`], in that order.

use std::time::SystemTime;

use super::Inner;
use super::slot::{VmEntry, VmSlot};
use crate::events::{EndedVmm, KEPT_ENDS, RunningVmm, VmEvent, VmEventKind};
use crate::ids::VmId;
use crate::state::VmState;
use crate::store::{StoreError, VmRecord, VmStore};
use metald_types::time::unix_millis;

pub(super) fn apply_transition(slot: &VmSlot, entry: &mut VmEntry, to: VmState) {
    if let Err(error) = entry.state.transition(to) {
        // Every caller checked first; a refusal here is a bug worth a loud log.
        tracing::error!(vm_id = %slot.vm_id, %error, "unchecked state transition");
    }
    entry.state = to;
    entry.modified_at = SystemTime::now();
    if to != VmState::Failed {
        entry.failure = None;
    }
    slot.refresh_summary(entry);
}

/// Tells subscribers, after writing the VM's record: every change is
/// published, so every change is stored.
pub(super) async fn publish(inner: &Inner, slot: &VmSlot, entry: &mut VmEntry, kind: VmEventKind) {
    inner.published.count(&kind);
    log_change(&slot.vm_id, &kind);
    let at = SystemTime::now();
    if let Some(ended) = ended_vmm(&kind, entry, at) {
        if entry.recent_ends.len() >= KEPT_ENDS {
            entry.recent_ends.remove(0);
        }
        entry.recent_ends.push(ended);
    }
    let forget = matches!(kind, VmEventKind::Deleted) && !inner.hold_deleted.load(std::sync::atomic::Ordering::SeqCst);
    if forget {
        let vm_id = slot.vm_id.clone();
        if let Err(error) = in_store(inner, move |store| store.remove(&vm_id)).await {
            tracing::error!(vm_id = %slot.vm_id, error = %crate::error_chain(&error), "cannot forget the VM's record");
        }
    } else {
        save_record(inner, slot, entry).await;
    }
    let event = VmEvent { vm_id: slot.vm_id.clone(), tenant: slot.tenant.clone(), at, state: entry.state, kind };
    // No subscriber is fine.
    let _ = inner.events.send(event);
}

/// Every change a caller asked for is a line at info, an audit trail
/// with the call's tenant and client from its span. Deaths, takeovers and
/// a guest's own stop are logged where they are found, with their reasons.
fn log_change(vm_id: &VmId, kind: &VmEventKind) {
    match kind {
        VmEventKind::Created
        | VmEventKind::Booted(_)
        | VmEventKind::Paused { .. }
        | VmEventKind::Resumed { .. }
        | VmEventKind::Rebooted { .. }
        | VmEventKind::Deleted => tracing::info!(%vm_id, "VM {}", kind.name()),
        VmEventKind::Stopped { by_guest: false, forced, .. } => tracing::info!(%vm_id, forced, "VM stopped"),
        VmEventKind::Stopped { by_guest: true, .. }
        | VmEventKind::Failed { .. }
        | VmEventKind::TakenOver { .. }
        | VmEventKind::FoundStopped { .. } => {}
    }
}

pub(super) async fn save_record(inner: &Inner, slot: &VmSlot, entry: &VmEntry) {
    let record = record_of(slot, entry);
    if let Err(error) = in_store(inner, move |store| store.save(&record)).await {
        tracing::error!(vm_id = %slot.vm_id, error = %crate::error_chain(&error), "cannot store the VM's record; a restart may not find it as it is");
    }
}

/// Runs `write` against the store, if there is one, on a blocking thread:
/// a SQLite write waits for the disk, and it runs under a VM's lock, so
/// no async worker must wait with it. The caller still waits, which keeps
/// every change stored before its event goes out.
async fn in_store(inner: &Inner, write: impl FnOnce(&dyn VmStore) -> Result<(), StoreError> + Send + 'static) -> Result<(), StoreError> {
    let Some(store) = inner.store.clone() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || write(store.as_ref())).await.map_err(StoreError::Interrupted)?
}

/// How a VMM's life ended, for an event that ends one that had booted.
fn ended_vmm(kind: &VmEventKind, entry: &VmEntry, at: SystemTime) -> Option<EndedVmm> {
    let (booted_at, usage, by_reboot) = match kind {
        VmEventKind::Stopped { booted_at, usage, .. } | VmEventKind::Failed { booted_at, usage, .. } => ((*booted_at)?, usage, false),
        VmEventKind::Rebooted { previous_booted_at, ended, .. } => ((*previous_booted_at)?, ended, true),
        _ => return None,
    };
    Some(EndedVmm {
        booted_at_ms: unix_millis(booted_at),
        ended_at_ms: unix_millis(at),
        cpu_ns: usage.as_ref().map(|usage| usage.cpu_ns),
        vcpus: entry.config.cpu.vcpu_count,
        memory_bytes: entry.config.memory.size_bytes,
        by_reboot,
    })
}

fn record_of(slot: &VmSlot, entry: &VmEntry) -> VmRecord {
    VmRecord {
        vm_id: slot.vm_id.clone(),
        tenant: slot.tenant.clone(),
        config: entry.config.clone(),
        state: entry.state,
        created_at_ms: unix_millis(entry.created_at),
        modified_at_ms: unix_millis(entry.modified_at),
        failure: entry.failure.clone(),
        last_exit: entry.last_exit,
        booted_at_ms: entry.booted_at.map(unix_millis),
        network: entry.network.clone(),
        identity: entry.identity.as_ref().map(|lease| (lease.uid(), lease.gid())),
        vmm: entry.instance.ticket(),
        recent_ends: entry.recent_ends.clone(),
        deleted: entry.state == VmState::Deleted,
    }
}

/// The VMM a VM runs on now, as events describe it.
pub(super) fn running_vmm(entry: &VmEntry) -> RunningVmm {
    let taps = match &entry.network {
        Some(network) => network.interfaces.iter().map(|interface| interface.tap_device.clone()).collect(),
        None => entry.config.network.iter().map(|interface| interface.tap_device.clone()).collect(),
    };
    RunningVmm {
        pid: entry.instance.pid(),
        cgroup: entry.instance.cgroup(),
        taps,
        vcpus: entry.config.cpu.vcpu_count,
        memory_bytes: entry.config.memory.size_bytes,
    }
}
