//! Pause and resume: a running guest's vCPUs stop and start again; its memory stays.

use super::cgroup_usage;
use crate::backend::BackendError;
use crate::events::VmEventKind;
use crate::manager::operation::{LockedVm, Sealed, VmOperation};
use crate::manager::{BackendOperation, ManagerError};
use crate::state::VmState;

/// Stops the guest's vCPUs; its memory stays.
#[derive(Debug, Clone, Copy)]
pub struct Pause;

impl Sealed for Pause {}

impl VmOperation for Pause {
    type Output = ();
    const NAME: &'static str = "pause";

    async fn act(self, vm: &mut LockedVm) -> Result<(), ManagerError> {
        vm.check("pause", VmState::Paused)?;
        let backend = vm.backend()?;
        if !backend.capabilities().pause {
            let source = BackendError::Unsupported { vmm: backend.name(), operation: "pause a guest" };
            return Err(vm.backend_failed(BackendOperation::PAUSE, source));
        }
        vm.entry.instance.pause().await.map_err(|source| vm.backend_failed(BackendOperation::PAUSE, source))?;
        let usage = cgroup_usage(&vm.entry);
        vm.transition(VmState::Paused, VmEventKind::Paused { usage }).await;
        Ok(())
    }
}

/// Lets a paused guest run again.
#[derive(Debug, Clone, Copy)]
pub struct Resume;

impl Sealed for Resume {}

impl VmOperation for Resume {
    type Output = ();
    const NAME: &'static str = "resume";

    async fn act(self, vm: &mut LockedVm) -> Result<(), ManagerError> {
        // The table lets Created and Shutdown become Running too, but that is a boot.
        vm.require("resume", &[VmState::Paused], "Paused")?;
        resume(vm, BackendOperation::RESUME).await
    }
}

/// Resumes the paused VM; `operation` names the backend call in an error.
pub(super) async fn resume(vm: &mut LockedVm, operation: BackendOperation) -> Result<(), ManagerError> {
    let usage = cgroup_usage(&vm.entry);
    vm.entry.instance.resume().await.map_err(|source| vm.backend_failed(operation, source))?;
    vm.transition(VmState::Running, VmEventKind::Resumed { usage }).await;
    Ok(())
}
