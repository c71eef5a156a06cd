//! HTTP over a VMM's unix API socket, for any VMM: one request at a time
//! with a deadline, JSON in and out, a refusal turned into
//! [`BackendError::Api`] with the VMM's own words (each VMM says how its
//! error bodies read).

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

use crate::backend::BackendError;

/// Reads a VMM's error body as one message.
pub type FaultReader = fn(StatusCode, &[u8]) -> String;

#[derive(Debug, Clone)]
pub struct SocketApi {
    vmm: &'static str,
    socket: PathBuf,
    client: Client<UnixConnector, Full<Bytes>>,
    timeout: Duration,
    fault: FaultReader,
}

impl SocketApi {
    pub fn new(vmm: &'static str, socket: &Path, timeout: Duration, fault: FaultReader) -> Self {
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(UnixConnector);
        Self { vmm, socket: socket.to_path_buf(), client, timeout, fault }
    }

    /// Sends one request; returns the body of a 2xx answer.
    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, BackendError> {
        let method_name = method_name(&method);
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| BackendError::Transport {
            vmm: self.vmm,
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
            vmm: self.vmm,
            method: method_name,
            path: path.to_owned(),
            timeout: self.timeout,
        })??;
        if status.is_success() {
            return Ok(body);
        }
        Err(BackendError::Api {
            vmm: self.vmm,
            method: method_name,
            path: path.to_owned(),
            status: status.as_u16(),
            fault_message: (self.fault)(status, &body),
        })
    }

    /// Sends `body` as JSON; the answer's body is not read.
    pub async fn send<T: Serialize>(&self, method: Method, path: &str, body: &T) -> Result<(), BackendError> {
        let json = serde_json::to_vec(body).map_err(|error| BackendError::Transport {
            vmm: self.vmm,
            method: method_name(&method),
            path: path.to_owned(),
            source: error.into(),
        })?;
        self.call(method, path, Some(json)).await.map(drop)
    }

    /// A request without a body whose answer is `T` as JSON.
    pub async fn fetch<T: DeserializeOwned>(&self, method: Method, path: &str) -> Result<T, BackendError> {
        let method_name = method_name(&method);
        let body = self.call(method, path, None).await?;
        serde_json::from_slice(&body).map_err(|error| BackendError::Transport {
            vmm: self.vmm,
            method: method_name,
            path: path.to_owned(),
            source: error.into(),
        })
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

/// An error body that is no JSON the VMM documents: its text, or the status's reason.
pub fn plain_fault(status: StatusCode, body: &[u8]) -> String {
    if body.is_empty() {
        status.canonical_reason().unwrap_or("no reason given").to_owned()
    } else {
        String::from_utf8_lossy(body).into_owned()
    }
}
