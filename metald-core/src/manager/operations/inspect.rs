//! Info and Metrics: what is known about a VM and what its VMM counts,
//! apart or under one lock. They change nothing, so they run in the
//! caller's task.

use crate::backend::VmmMetrics;
use crate::manager::operation::{LockedVm, Sealed, VmOperation};
use crate::manager::{BackendOperation, ManagerError, VmInfo};

/// Everything known about a VM, including what its VMM reports.
#[derive(Debug, Clone, Copy)]
pub struct Info;

impl Sealed for Info {}

impl VmOperation for Info {
    type Output = VmInfo;
    const NAME: &'static str = "info";
    const CHANGES: bool = false;

    async fn act(self, vm: &mut LockedVm) -> Result<VmInfo, ManagerError> {
        let entry = &vm.entry;
        let vmm = if entry.state.has_live_vmm() {
            match entry.instance.info().await {
                Ok(info) => Some(info),
                Err(error) => {
                    tracing::warn!(vm_id = %vm.slot.vm_id, error = %crate::error_chain(&error), "VMM info unavailable");
                    None
                }
            }
        } else {
            None
        };
        Ok(VmInfo {
            vm_id: vm.slot.vm_id.clone(),
            tenant: vm.slot.tenant.clone(),
            state: entry.state,
            config: entry.config.clone(),
            created_at: entry.created_at,
            modified_at: entry.modified_at,
            failure: entry.failure.clone(),
            last_exit: entry.last_exit,
            booted_at: entry.booted_at,
            vm_dir: entry.vm_dir.path().to_path_buf(),
            console_path: vm.slot.console.path().to_path_buf(),
            vmm,
            network: entry.network.clone(),
            capabilities: vm.manager.backend_of(&entry.config)?.capabilities(),
        })
    }
}

/// Usage counters of a VM whose VMM runs.
#[derive(Debug, Clone, Copy)]
pub struct Metrics;

impl Sealed for Metrics {}

impl VmOperation for Metrics {
    type Output = VmmMetrics;
    const NAME: &'static str = "metrics";
    const CHANGES: bool = false;

    async fn act(self, vm: &mut LockedVm) -> Result<VmmMetrics, ManagerError> {
        vm.require(
            "read its metrics",
            &[crate::state::VmState::Created, crate::state::VmState::Running, crate::state::VmState::Paused],
            "Created, Running or Paused",
        )?;
        vm.entry.instance.metrics().await.map_err(|source| vm.backend_failed(BackendOperation::READ_METRICS, source))
    }
}

/// [`Info`] and, when its VMM runs, [`Metrics`], under one lock: the
/// figures are of the very state the info reports. A VMM that cannot give
/// its figures leaves the info still worth answering.
#[derive(Debug, Clone, Copy)]
pub struct InfoWithMetrics;

impl Sealed for InfoWithMetrics {}

impl VmOperation for InfoWithMetrics {
    type Output = (VmInfo, Option<Result<VmmMetrics, ManagerError>>);
    const NAME: &'static str = "info";
    const CHANGES: bool = false;

    async fn act(self, vm: &mut LockedVm) -> Result<Self::Output, ManagerError> {
        let info = Info.act(vm).await?;
        let metrics = if info.state.has_live_vmm() { Some(Metrics.act(vm).await) } else { None };
        Ok((info, metrics))
    }
}
