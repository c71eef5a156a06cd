//! Boot: starts the guest of a Created, Shutdown or Failed VM.

use crate::backend::StopMode;
use crate::manager::operation::{LockedVm, Sealed, VmOperation};
use crate::manager::spec::SpecOf;
use crate::manager::{BackendOperation, ManagerError};
use crate::network::AttachRequest;
use crate::state::VmState;

/// Starts the guest (again, after a shutdown; a Failed VM in a fresh VMM
/// on its configuration and disks).
#[derive(Debug, Clone, Copy)]
pub struct Boot;

impl Sealed for Boot {}

impl VmOperation for Boot {
    type Output = ();
    const NAME: &'static str = "boot";

    async fn act(self, vm: &mut LockedVm) -> Result<(), ManagerError> {
        // The table lets Paused become Running too, but that is a resume.
        vm.require("boot", &[VmState::Created, VmState::Shutdown, VmState::Failed], "Created, Shutdown or Failed")?;
        prepare_fresh_vmm(vm).await?;
        match vm.entry.instance.boot().await {
            Ok(()) => {
                vm.booted().await;
                Ok(())
            }
            Err(source) => Err(vm.fail(BackendOperation::BOOT, source).await),
        }
    }
}

/// Before a boot that needs a fresh VMM: a Failed VM is given a new VMM
/// instance on its configuration and disks (its images resolved again,
/// so one put back in the image root is found), and a VM whose network
/// namespace is gone (a host reboot) its network again, with the same
/// addresses. No VMM runs for the VM here, so nothing of a running one
/// is touched.
async fn prepare_fresh_vmm(vm: &mut LockedVm) -> Result<(), ManagerError> {
    let namespace_gone = vm.entry.network.as_ref().is_some_and(|network| network.netns.is_none());
    if vm.entry.state != VmState::Failed && !namespace_gone {
        return Ok(());
    }
    let (vm_id, tenant) = (vm.slot.vm_id.clone(), vm.slot.tenant.clone());
    if namespace_gone && let Some(provider) = &vm.manager.inner.network {
        let owner = vm.entry.identity.as_ref().map(|lease| (lease.uid(), lease.gid()));
        let request = AttachRequest { vm_id: &vm_id, tenant: &tenant, interfaces: &vm.entry.config.network, owner };
        let attachment = provider.attach(request).await.map_err(ManagerError::Network)?;
        if let Err(error) = provider.settle(&vm_id).await {
            if let Err(detach_error) = provider.detach(&vm_id).await {
                tracing::error!(%vm_id, error = %crate::error_chain(&detach_error), "cannot undo a network whose rules failed");
            }
            return Err(ManagerError::Network(error));
        }
        vm.entry.network = Some(attachment);
        tracing::info!(%vm_id, "the VM's network was set up again: its namespace was gone");
    }
    let backend = vm.backend()?;
    let manager = vm.manager.clone();
    let entry = &mut *vm.entry;
    // An image gone from the image root stands in as such, and the launch names it.
    let images = manager.resolve_found_images(&vm_id, &entry.config)?;
    let of = SpecOf {
        vm_id: &vm_id,
        tenant: &tenant,
        config: &entry.config,
        vm_dir: &entry.vm_dir,
        identity: entry.identity.clone(),
        network: entry.network.as_ref(),
    };
    let spec = manager.build_spec(of, images)?;
    // What the ended VMM left (its jail, its cgroup) goes before the new instance takes its place.
    match entry.instance.stop(StopMode::Forced).await {
        Ok(outcome) => entry.last_exit = Some(outcome.exit),
        Err(error) => tracing::debug!(%vm_id, error = %crate::error_chain(&error), "nothing of an earlier VMM to clear"),
    }
    entry.instance = backend.unlaunched(spec, vm.slot.console.clone());
    Ok(())
}
