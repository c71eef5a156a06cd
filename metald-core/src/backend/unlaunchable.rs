//! The instance of a VM found in the store that no VMM can be launched
//! for on this host any more (its stored configuration no longer makes a
//! VMM spec here, or its uid cannot be leased again). The VM stays listed,
//! Failed with its reason, and can be deleted; nothing else.

use async_trait::async_trait;
use tokio::sync::watch;

use super::{BackendError, StopMode, StopOutcome, VmmExit, VmmInfo, VmmInstance, VmmMetrics};
use crate::cgroups::{Cgroup, CgroupUsage};

#[derive(Debug)]
pub struct Unlaunchable {
    vmm: &'static str,
    reason: String,
}

impl Unlaunchable {
    pub fn new(vmm: &'static str, reason: String) -> Self {
        Self { vmm, reason }
    }

    fn refused(&self) -> BackendError {
        BackendError::Unlaunchable { reason: self.reason.clone() }
    }
}

#[async_trait]
impl VmmInstance for Unlaunchable {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn cgroup(&self) -> Option<Cgroup> {
        None
    }

    fn ticket(&self) -> Option<crate::launch::TakeoverTicket> {
        None
    }

    fn take_ended_usage(&mut self) -> Option<CgroupUsage> {
        None
    }

    fn exits(&self) -> Option<watch::Receiver<Option<VmmExit>>> {
        None
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        Err(self.refused())
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        Err(BackendError::NotRunning)
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        Err(BackendError::NotRunning)
    }

    async fn stop(&mut self, _mode: StopMode) -> Result<StopOutcome, BackendError> {
        Err(BackendError::NotRunning)
    }

    async fn reboot(&mut self) -> Result<(), BackendError> {
        Err(self.refused())
    }

    async fn info(&self) -> Result<VmmInfo, BackendError> {
        Ok(VmmInfo { vmm: self.vmm.into(), vmm_state: "Exited".into(), ..VmmInfo::default() })
    }

    async fn metrics(&mut self) -> Result<VmmMetrics, BackendError> {
        Ok(VmmMetrics::default())
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}
