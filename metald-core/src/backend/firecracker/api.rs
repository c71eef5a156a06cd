//! A typed client for one Firecracker's API socket: one method per call
//! metald makes, each answer checked, each refusal turned into
//! [`BackendError::Api`] carrying Firecracker's own `fault_message`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::models::{ActionType, Fault, InstanceAction, InstanceInfo, VmStateChange, VmStateName};
use crate::backend::BackendError;

const VMM: &str = "firecracker";

#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
    client: Client<UnixConnector, Full<Bytes>>,
    timeout: Duration,
}

impl FirecrackerApi {
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(UnixConnector);
        Self { socket: socket.to_path_buf(), client, timeout }
    }

    /// Sends one request; returns the body of a 2xx answer.
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, BackendError> {
        let method_name = method_name(&method);
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| BackendError::Transport {
            vmm: VMM,
            method: method_name,
            path: path.to_owned(),
            source,
        };
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path).into();
        let mut request = Request::builder().method(method).uri(uri).header("Accept", "application/json");
        if body.is_some() {
            request = request.header("Content-Type", "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|error| transport(error.into()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|error| transport(error.into()))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|error| transport(error.into()))?.to_bytes();
            Ok::<_, BackendError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange).await.map_err(|_| BackendError::Timeout {
            vmm: VMM,
            method: method_name,
            path: path.to_owned(),
            timeout: self.timeout,
        })??;
        if status.is_success() {
            return Ok(body);
        }
        Err(BackendError::Api {
            vmm: VMM,
            method: method_name,
            path: path.to_owned(),
            status: status.as_u16(),
            fault_message: fault_message(status, &body),
        })
    }

    async fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), BackendError> {
        self.send(Method::PUT, path, body).await
    }

    async fn send<T: Serialize>(&self, method: Method, path: &str, body: &T) -> Result<(), BackendError> {
        let json = serde_json::to_vec(body).map_err(|error| BackendError::Transport {
            vmm: VMM,
            method: method_name(&method),
            path: path.to_owned(),
            source: error.into(),
        })?;
        self.call(method, path, Some(json)).await.map(drop)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, BackendError> {
        let body = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|error| BackendError::Transport {
            vmm: VMM,
            method: "GET",
            path: path.to_owned(),
            source: error.into(),
        })
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, BackendError> {
        self.get("/").await
    }

    pub async fn put_machine_config(&self, body: &super::models::MachineConfiguration) -> Result<(), BackendError> {
        self.put("/machine-config", body).await
    }

    pub async fn put_boot_source(&self, body: &super::models::BootSource<'_>) -> Result<(), BackendError> {
        self.put("/boot-source", body).await
    }

    pub async fn put_drive(&self, body: &super::models::Drive<'_>) -> Result<(), BackendError> {
        self.put(&format!("/drives/{}", body.drive_id), body).await
    }

    pub async fn put_network_interface(&self, body: &super::models::NetworkInterface<'_>) -> Result<(), BackendError> {
        self.put(&format!("/network-interfaces/{}", body.iface_id), body).await
    }

    pub async fn action(&self, action_type: ActionType) -> Result<(), BackendError> {
        self.put("/actions", &InstanceAction { action_type }).await
    }

    pub async fn set_vm_state(&self, state: VmStateName) -> Result<(), BackendError> {
        self.send(Method::PATCH, "/vm", &VmStateChange { state }).await
    }
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "request",
    }
}

fn fault_message(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<Fault>(body) {
        Ok(fault) => fault.fault_message,
        Err(_) if body.is_empty() => status.canonical_reason().unwrap_or("no reason given").to_owned(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}
