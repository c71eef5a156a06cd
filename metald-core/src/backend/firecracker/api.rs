//! A typed client for one Firecracker's API socket: one method per call
//! metald makes, each refusal turned into [`BackendError::Api`] carrying
//! Firecracker's own `fault_message`.

use std::path::Path;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::VMM;
use super::models::{ActionType, Fault, InstanceAction, InstanceInfo, VmStateChange, VmStateName};
use crate::backend::BackendError;
use crate::backend::socket_api::{SocketApi, plain_fault};

#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    api: SocketApi,
}

impl FirecrackerApi {
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self { api: SocketApi::new(VMM, socket, timeout, fault_message) }
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, BackendError> {
        self.api.fetch(Method::GET, "/").await
    }

    pub async fn put_machine_config(&self, body: &super::models::MachineConfiguration) -> Result<(), BackendError> {
        self.api.send(Method::PUT, "/machine-config", body).await
    }

    pub async fn put_boot_source(&self, body: &super::models::BootSource<'_>) -> Result<(), BackendError> {
        self.api.send(Method::PUT, "/boot-source", body).await
    }

    pub async fn put_drive(&self, body: &super::models::Drive<'_>) -> Result<(), BackendError> {
        self.api.send(Method::PUT, &format!("/drives/{}", body.drive_id), body).await
    }

    pub async fn put_network_interface(&self, body: &super::models::NetworkInterface<'_>) -> Result<(), BackendError> {
        self.api.send(Method::PUT, &format!("/network-interfaces/{}", body.iface_id), body).await
    }

    pub async fn action(&self, action_type: ActionType) -> Result<(), BackendError> {
        self.api.send(Method::PUT, "/actions", &InstanceAction { action_type }).await
    }

    pub async fn set_vm_state(&self, state: VmStateName) -> Result<(), BackendError> {
        self.api.send(Method::PATCH, "/vm", &VmStateChange { state }).await
    }
}

/// Firecracker's `{"fault_message": "…"}`.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<Fault>(body) {
        Ok(fault) => fault.fault_message,
        Err(_) => plain_fault(status, body),
    }
}
