//! Reboot: restarts a running guest, natively where the backend can,
//! otherwise by stopping its VMM and booting a fresh one. The VM stays Running.

use std::time::SystemTime;

use crate::events::VmEventKind;
use crate::manager::operation::{LockedVm, Sealed, VmOperation};
use crate::manager::{BackendOperation, ManagerError, StopOptions};
use crate::state::VmState;

/// Restarts a running guest; `force` kills its VMM instead of asking the guest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reboot(pub StopOptions);

impl Sealed for Reboot {}

impl VmOperation for Reboot {
    type Output = ();
    const NAME: &'static str = "reboot";

    async fn act(self, vm: &mut LockedVm) -> Result<(), ManagerError> {
        vm.require("reboot", &[VmState::Running], "Running")?;
        let result = if vm.backend()?.capabilities().reboot && !self.0.force {
            vm.entry.instance.reboot().await
        } else {
            let mode = vm.stop_mode(self.0)?;
            match vm.entry.instance.stop(mode).await {
                Ok(outcome) => {
                    vm.entry.last_exit = Some(outcome.exit);
                    vm.entry.instance.boot().await
                }
                Err(error) => Err(error),
            }
        };
        match result {
            Ok(()) => {
                let previous_booted_at = vm.entry.booted_at.replace(SystemTime::now());
                vm.watch_vmm();
                let ended = vm.entry.instance.take_ended_usage();
                let running = vm.running_vmm();
                vm.entry.modified_at = SystemTime::now();
                vm.publish(VmEventKind::Rebooted { running, ended, previous_booted_at }).await;
                Ok(())
            }
            Err(source) => Err(vm.fail(BackendOperation::REBOOT, source).await),
        }
    }
}
