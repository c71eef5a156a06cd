//! A typed client for one Cloud Hypervisor's API socket (`/api/v1/…`):
//! one method per call metald makes, each refusal turned into
//! [`BackendError::Api`] carrying Cloud Hypervisor's error chain.

use std::path::Path;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::VMM;
use super::models::{NetConfig, VmConfig, VmCounters, VmInfo, VmmPing};
use crate::backend::BackendError;
use crate::backend::socket_api::{SocketApi, plain_fault};

#[derive(Debug, Clone)]
pub struct CloudHypervisorApi {
    api: SocketApi,
}

impl CloudHypervisorApi {
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self { api: SocketApi::new(VMM, socket, timeout, fault_message) }
    }

    pub async fn ping(&self) -> Result<VmmPing, BackendError> {
        self.api.fetch(Method::GET, "/api/v1/vmm.ping").await
    }

    pub async fn create(&self, config: &VmConfig<'_>) -> Result<(), BackendError> {
        self.api.send(Method::PUT, "/api/v1/vm.create", config).await
    }

    /// Adds an interface to the created VM, its TAP passed open.
    pub async fn add_net(&self, config: &NetConfig<'_>, tap: std::os::fd::OwnedFd) -> Result<(), BackendError> {
        self.api.send_with_fds(Method::PUT, "/api/v1/vm.add-net", config, vec![tap]).await
    }

    pub async fn info(&self) -> Result<VmInfo, BackendError> {
        self.api.fetch(Method::GET, "/api/v1/vm.info").await
    }

    pub async fn counters(&self) -> Result<VmCounters, BackendError> {
        self.api.fetch(Method::GET, "/api/v1/vm.counters").await
    }

    /// `vm.boot`, `vm.pause`, `vm.resume`, `vm.reboot`, `vm.power-button`, `vmm.shutdown`: no body.
    pub async fn act(&self, action: Action) -> Result<(), BackendError> {
        self.api.call(Method::PUT, action.path(), None).await.map(drop)
    }
}

/// A call without a body that moves the VM or the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Boot,
    Pause,
    Resume,
    Reboot,
    PowerButton,
    ShutdownVmm,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Boot => "/api/v1/vm.boot",
            Action::Pause => "/api/v1/vm.pause",
            Action::Resume => "/api/v1/vm.resume",
            Action::Reboot => "/api/v1/vm.reboot",
            Action::PowerButton => "/api/v1/vm.power-button",
            Action::ShutdownVmm => "/api/v1/vmm.shutdown",
        }
    }
}

/// Cloud Hypervisor answers a refusal with its error chain as a JSON array of strings.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<Vec<String>>(body) {
        Ok(chain) if !chain.is_empty() => chain.join(": "),
        _ => plain_fault(status, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_as_its_error_chain() {
        let body = br#"["Error from API","The VM could not boot","Cannot find kernel"]"#;
        assert_eq!(fault_message(StatusCode::INTERNAL_SERVER_ERROR, body), "Error from API: The VM could not boot: Cannot find kernel");
        assert_eq!(fault_message(StatusCode::NOT_FOUND, b""), "Not Found");
    }
}
