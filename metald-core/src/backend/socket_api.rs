//! HTTP over a VMM's unix API socket, for any VMM: one request at a time
//! with a deadline, JSON in and out, a refusal turned into
//! [`BackendError::Api`] with the VMM's own words (each VMM says how its
//! error bodies read).

use std::os::fd::OwnedFd;
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

    /// What a request that did not get through becomes.
    fn transport<'a>(&self, method: &'static str, path: &'a str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> BackendError + 'a {
        let vmm = self.vmm;
        move |source| BackendError::Transport { vmm, method, path: path.to_owned(), source }
    }

    /// Sends one request; returns the body of a 2xx answer.
    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, BackendError> {
        let method_name = method_name(&method);
        let transport = self.transport(method_name, path);
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

impl SocketApi {
    /// Sends `body` as JSON with `fds` passed along (`SCM_RIGHTS`), as a VMM
    /// takes a descriptor it cannot open itself (a TAP). Hyper cannot pass
    /// descriptors, so this one request is written by hand on a connection
    /// of its own, on a blocking thread; the answer's body is not read.
    pub async fn send_with_fds<T: Serialize>(&self, method: Method, path: &str, body: &T, fds: Vec<OwnedFd>) -> Result<(), BackendError> {
        let method_name = method_name(&method);
        let transport = self.transport(method_name, path);
        let json = serde_json::to_vec(body).map_err(|error| transport(error.into()))?;
        let mut request = format!(
            "{method_name} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            json.len()
        )
        .into_bytes();
        request.extend_from_slice(&json);
        let (socket, timeout) = (self.socket.clone(), self.timeout);
        let exchange = tokio::task::spawn_blocking(move || exchange_with_fds(&socket, &request, &fds, timeout));
        let (status, answer) = match exchange.await {
            Ok(Ok(answered)) => answered,
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::WouldBlock || error.kind() == std::io::ErrorKind::TimedOut => {
                return Err(BackendError::Timeout { vmm: self.vmm, method: method_name, path: path.to_owned(), timeout: self.timeout });
            }
            Ok(Err(error)) => return Err(transport(error.into())),
            Err(error) => return Err(transport(error.into())),
        };
        if status.is_success() {
            return Ok(());
        }
        Err(BackendError::Api {
            vmm: self.vmm,
            method: method_name,
            path: path.to_owned(),
            status: status.as_u16(),
            fault_message: (self.fault)(status, &answer),
        })
    }
}

/// Writes `request` with `fds` in one `sendmsg` (a VMM takes the
/// descriptors from the message that starts the request), then reads the
/// answer's status and as much of its body as it says it has.
fn exchange_with_fds(socket: &Path, request: &[u8], fds: &[OwnedFd], timeout: Duration) -> std::io::Result<(StatusCode, Vec<u8>)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let control = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
    let sent = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[std::io::IoSlice::new(request)],
        &control,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent < request.len() {
        use std::io::Write;
        (&stream).write_all(&request[sent..])?;
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = (&stream).read(&mut chunk)?;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..read]);
        if let Some((status, body)) = parse_answer(&answer) {
            return Ok((status, body));
        }
    }
    parse_answer(&answer).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the VMM closed the connection mid-answer"))
}

/// The status and body of a complete HTTP/1.1 answer; `None` while incomplete.
fn parse_answer(answer: &[u8]) -> Option<(StatusCode, Vec<u8>)> {
    let head_end = answer.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse::<u16>().ok()?;
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let body = answer.get(head_end + 4..head_end + 4 + length)?.to_vec();
    Some((StatusCode::from_u16(status).ok()?, body))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_read_once_its_body_is_all_there() {
        assert_eq!(parse_answer(b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"), Some((StatusCode::NO_CONTENT, Vec::new())));
        let refusal = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\n[\"x\"]";
        assert_eq!(parse_answer(refusal), Some((StatusCode::INTERNAL_SERVER_ERROR, b"[\"x\"]".to_vec())));
        assert_eq!(parse_answer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\n[\""), None, "incomplete");
    }
}
