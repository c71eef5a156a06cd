//! The operations on one VM, one small struct each; run any of them with
//! [`VmManager::run`](super::VmManager::run):
//!
//! ```no_run
//! # async fn demo(manager: metald_core::VmManager, vm_id: metald_core::VmId) -> Result<(), metald_core::ManagerError> {
//! use metald_core::operations::{Boot, Delete, Info};
//! use metald_core::StopOptions;
//!
//! manager.run(&vm_id, Boot).await?;
//! let info = manager.run(&vm_id, Info).await?;
//! manager.run(&vm_id, Delete(StopOptions::default())).await?;
//! # Ok(()) }
//! ```

mod boot;
mod delete;
mod inspect;
mod pause;
mod reboot;
mod shutdown;

pub use boot::Boot;
pub use delete::Delete;
pub use inspect::{Info, InfoWithMetrics, Metrics};
pub use pause::{Pause, Resume};
pub use reboot::Reboot;
pub use shutdown::Shutdown;

use super::slot::VmEntry;
use crate::cgroups::CgroupUsage;

/// What the VM's cgroup has counted so far, where it has one, for the
/// events that split its time into running and paused.
fn cgroup_usage(entry: &VmEntry) -> Option<CgroupUsage> {
    let cgroup = entry.instance.cgroup()?;
    // CPU only: reading the memory peak would reset it under the meter.
    cgroup
        .cpu_usage_ns()
        .map(|cpu_ns| CgroupUsage { cpu_ns, memory_peak_bytes: None })
        .map_err(|error| tracing::warn!(error = %crate::error_chain(&error), "cannot read a VM's cgroup CPU at a pause or resume"))
        .ok()
}
