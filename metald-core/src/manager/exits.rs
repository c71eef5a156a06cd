//! Watching VMM processes: a watcher task per VMM process notices the
//! moment it ends (the VM then stops, for a clean exit, or fails, and its
//! restart policy may boot it again later) and each guest reboot its
//! backend reports inside the same process (a `Rebooted` event).

use std::sync::{Arc, Weak};

use super::operations::Boot;
use super::records::{apply_transition, publish, running_vmm};
use super::slot::{VmEntry, VmSlot};
use super::{Inner, VmManager};
use crate::backend::StopMode;
use crate::events::VmEventKind;
use crate::ids::VmId;
use crate::launch::VmmExit;
use crate::restart::NextRestart;
use crate::state::VmState;

impl VmManager {
    /// Starts a watcher for the VMM process, if it is one not yet watched.
    pub(super) fn watch_vmm(&self, slot: &Arc<VmSlot>, entry: &mut VmEntry) {
        let pid = entry.instance.pid();
        if pid.is_none() || pid == entry.watched_pid {
            return;
        }
        let Some(mut exits) = entry.instance.exits() else { return };
        let mut reboots = entry.instance.guest_reboots();
        entry.watch_generation += 1;
        entry.watched_pid = pid;
        let generation = entry.watch_generation;
        let inner = Arc::downgrade(&self.inner);
        let slot = Arc::clone(slot);
        tokio::spawn(async move {
            loop {
                let rebooted = async {
                    match reboots.as_mut() {
                        Some(reboots) => reboots.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let exit = async { exits.wait_for(Option::is_some).await.ok().and_then(|exit| exit.clone()) };
                let seen = tokio::select! {
                    exit = exit => Seen::Exit(exit),
                    still_told = rebooted => Seen::Reboot { still_told },
                };
                match seen {
                    // The first exit published; none if the publisher is gone first.
                    Seen::Exit(Some(exit)) => return on_vmm_exit(inner, slot, generation, exit).await,
                    Seen::Exit(None) => return,
                    Seen::Reboot { still_told: false } => reboots = None,
                    Seen::Reboot { still_told: true } => on_guest_reboot(&inner, &slot, generation).await,
                }
            }
        });
    }
}

/// What a VMM's watcher saw first.
enum Seen {
    Exit(Option<VmmExit>),
    Reboot { still_told: bool },
}

/// A guest that rebooted inside its VMM runs on: its boot time is now, and
/// a `Rebooted` event says so (ending the earlier boot for billing).
async fn on_guest_reboot(inner: &Weak<Inner>, slot: &Arc<VmSlot>, generation: u64) {
    let Some(inner) = inner.upgrade() else { return };
    let mut entry = slot.entry.lock().await;
    if entry.watch_generation != generation || entry.state != VmState::Running {
        return;
    }
    tracing::info!(vm_id = %slot.vm_id, "the guest rebooted inside its VMM");
    let now = std::time::SystemTime::now();
    let previous_booted_at = entry.booted_at.replace(now);
    let ended = entry.instance.take_ended_usage();
    let running = running_vmm(&entry);
    entry.modified_at = now;
    publish(&inner, slot, &mut entry, VmEventKind::Rebooted { running, ended, previous_booted_at }).await;
}

/// What a watcher does when a VMM process ends: nothing, if an operation
/// expected it (the VM is no longer in a state with a live VMM) or a newer
/// process is watched; otherwise the VM stops (a clean guest reset) or fails.
async fn on_vmm_exit(inner: Weak<Inner>, slot: Arc<VmSlot>, generation: u64, vmm_exit: VmmExit) {
    let Some(inner) = inner.upgrade() else { return };
    let mut entry = slot.entry.lock().await;
    if entry.watch_generation != generation || !entry.state.has_live_vmm() {
        return;
    }
    let vm_id = &slot.vm_id;
    let backend = slot.vmm.as_str();
    let exit = vmm_exit.status;
    entry.last_exit = Some(exit);
    let booted_at = entry.booted_at.take();
    entry.watched_pid = None;
    // Lets the backend forget the process; it has already been reaped.
    let _ = entry.instance.stop(StopMode::Forced).await;
    if exit.is_clean() && entry.state == VmState::Running {
        tracing::info!(%vm_id, %exit, "guest stopped itself");
        apply_transition(&slot, &mut entry, VmState::Shutdown);
        let usage = entry.instance.take_ended_usage();
        publish(&inner, &slot, &mut entry, VmEventKind::Stopped { exit: Some(exit), forced: false, by_guest: true, usage, booted_at })
            .await;
    } else {
        let reason = format!("{backend} {vmm_exit} while the VM was {}", entry.state);
        tracing::warn!(%vm_id, %reason, "VMM died");
        entry.failure = Some(reason.clone());
        apply_transition(&slot, &mut entry, VmState::Failed);
        let usage = entry.instance.take_ended_usage();
        let failed = VmEventKind::Failed { reason, exit: Some(exit), usage, booted_at, earlier_ends: Vec::new() };
        publish(&inner, &slot, &mut entry, failed).await;
        let ran_for = booted_at.and_then(|booted_at| booted_at.elapsed().ok());
        if let Some(next) = entry.next_restart(vm_id, ran_for) {
            restart_later(VmManager { inner: Arc::clone(&inner) }, vm_id.clone(), next);
        }
    }
}

/// Boots a VM its restart policy restarts once `next.after` has passed,
/// unless something else booted or deleted it meanwhile; a boot that fails
/// counts as a death and is tried again while the policy allows.
pub(super) fn restart_later(manager: VmManager, vm_id: VmId, mut next: NextRestart) {
    tokio::spawn(async move {
        loop {
            tracing::info!(%vm_id, restart = next.number, of = next.of, after_s = next.after.as_secs(), "restarting the VM: its VMM died");
            tokio::time::sleep(next.after).await;
            if !matches!(manager.state(&vm_id), Ok(VmState::Failed)) {
                return;
            }
            let error = match manager.run(&vm_id, Boot).await {
                Ok(()) => return tracing::info!(%vm_id, restart = next.number, "VM restarted"),
                Err(error) => error,
            };
            tracing::warn!(%vm_id, error = %crate::error_chain(&error), "a restart of the VM failed");
            let Ok(slot) = manager.slot(&vm_id) else { return };
            let mut entry = slot.entry.lock().await;
            match entry.next_restart(&vm_id, None) {
                Some(following) => next = following,
                None => return,
            }
        }
    });
}
