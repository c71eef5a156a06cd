//! Delete: stops the VM when needed (gracefully unless forced), then
//! removes its VMM, its folder, its network and every copy made for it.
//! What cannot be removed leaves the VM Failed, saying what is left.

use std::io;

use crate::events::VmEventKind;
use crate::manager::operation::{LockedVm, Sealed, VmOperation};
use crate::manager::slot::write_lock;
use crate::manager::{ManagerError, StopOptions};
use crate::state::VmState;

/// Stops the VM when needed, then removes everything of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delete(pub StopOptions);

impl Sealed for Delete {}

impl VmOperation for Delete {
    type Output = ();
    const NAME: &'static str = "delete";

    async fn act(self, vm: &mut LockedVm) -> Result<(), ManagerError> {
        let vm_id = vm.vm_id().clone();
        if vm.entry.state.has_live_vmm()
            && let Err(error) = super::shutdown::stop(vm, self.0).await
        {
            tracing::warn!(%vm_id, error = %crate::error_chain(&error), "stop before delete failed; killing the VMM");
        }
        let mut problems = Vec::new();
        if let Err(error) = vm.entry.instance.destroy().await {
            problems.push(crate::error_chain(&error));
        }
        match vm.entry.vm_dir.remove() {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                problems.push(format!("removing {}: {error}", vm.entry.vm_dir.path().display()))
            }
            _ => {}
        }
        if vm.entry.network.is_some()
            && let Some(provider) = vm.manager.inner.network.clone()
        {
            match provider.detach(&vm_id).await {
                Ok(()) => vm.entry.network = None,
                Err(error) => problems.push(crate::error_chain(&error)),
            }
        }
        if !problems.is_empty() {
            let reason = format!("delete incomplete: {}", problems.join("; "));
            if vm.entry.state.can_transition_to(VmState::Failed) {
                let booted_at = vm.entry.booted_at;
                let failed = VmEventKind::Failed { reason: reason.clone(), exit: None, usage: None, booted_at, earlier_ends: Vec::new() };
                vm.transition(VmState::Failed, failed).await;
            }
            vm.entry.failure = Some(reason);
            return Err(ManagerError::DeleteIncomplete { vm_id, problems });
        }
        vm.entry.identity = None;
        vm.transition(VmState::Deleted, VmEventKind::Deleted).await;
        write_lock(&vm.manager.inner.registry).vms.remove(&vm_id);
        Ok(())
    }
}
