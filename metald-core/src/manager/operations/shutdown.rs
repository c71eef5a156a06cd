//! Shutdown: stops the guest, gracefully first unless forced, killing its
//! VMM when the timeout runs out. Delete stops a live VM the same way.

use crate::backend::{StopMode, StopOutcome};
use crate::events::VmEventKind;
use crate::manager::operation::{LockedVm, Sealed, VmOperation};
use crate::manager::{BackendOperation, ManagerError, StopOptions};
use crate::state::VmState;

/// Stops the guest; how it went (whether it was killed, how it ended).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shutdown(pub StopOptions);

impl Sealed for Shutdown {}

impl VmOperation for Shutdown {
    type Output = StopOutcome;
    const NAME: &'static str = "shutdown";

    async fn act(self, vm: &mut LockedVm) -> Result<StopOutcome, ManagerError> {
        vm.check("shut down", VmState::Shutdown)?;
        stop(vm, self.0).await
    }
}

/// Stops the VM's VMM and makes the VM Shutdown.
pub(super) async fn stop(vm: &mut LockedVm, options: StopOptions) -> Result<StopOutcome, ManagerError> {
    let mode = vm.stop_mode(options)?;
    // A paused guest that cannot hear the request is let run to hear it. It
    // runs, and uses CPU, until it stops: say so, as a resume would.
    let needs_running_guest = vm.backend()?.capabilities().graceful_stop_needs_running_guest;
    if vm.entry.state == VmState::Paused && needs_running_guest && matches!(mode, StopMode::Graceful { .. }) {
        super::pause::resume(vm, BackendOperation::RESUME_BEFORE_SHUTDOWN).await?;
    }
    let outcome = vm.entry.instance.stop(mode).await.map_err(|source| vm.backend_failed(BackendOperation::SHUTDOWN, source))?;
    vm.entry.last_exit = Some(outcome.exit);
    let booted_at = vm.entry.booted_at.take();
    let usage = vm.entry.instance.take_ended_usage();
    let kind = VmEventKind::Stopped { exit: Some(outcome.exit), forced: outcome.forced, by_guest: false, usage, booted_at };
    vm.transition(VmState::Shutdown, kind).await;
    Ok(outcome)
}
