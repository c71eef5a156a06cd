//! The API port: accepts connections with the bounds a port that strangers
//! reach needs, and serves the HTTP application on each, as HTTP/1.1 or h2c
//! (told apart by the HTTP/2 preface), or, with [`crate::tls`], over TLS
//! (HTTP/2 or HTTP/1.1 by ALPN; a connection that does not open with a TLS
//! handshake, plain HTTP say, is closed and logged).
//!
//! - At most `max_connections` connections, and `max_connections_per_client`
//!   from one IP address. A connection over either is closed at once, so
//!   nothing queues and one client cannot take every descriptor.
//! - A connection must send its first request head within
//!   `header_read_timeout` (HTTP/1.1: every request head, the wait between
//!   keep-alive requests included; h2c: the connection preface).
//! - A request body that stops arriving for `body_read_timeout` ends the
//!   call (`request body timed out`).
//! - A connection with no call in flight for `idle_timeout` is closed
//!   (HTTP/2: GOAWAY first; a peer that does not answer the ping that
//!   follows, or any keep-alive ping, within `header_read_timeout` is dropped). A call in flight is one whose answer is not yet
//!   sent to its end: an open `WatchVms` stream keeps its connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::tls::{TlsTerminator, VerifiedClientCertificate};

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The bounds on the API port's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Open connections, in all and per client address.
#[derive(Debug)]
struct Admission {
    limits: ConnectionLimits,
    open: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

/// One admitted connection; dropping it frees its place.
struct Place {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Place> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let from_client = open.entry(client).or_default();
        if *from_client >= self.limits.max_connections_per_client || self.total.load(Ordering::Relaxed) >= self.limits.max_connections {
            if *from_client == 0 {
                open.remove(&client);
            }
            return None;
        }
        *from_client += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Place { admission: Arc::clone(self), client })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(from_client) = open.get_mut(&self.client) {
            *from_client = from_client.saturating_sub(1);
            if *from_client == 0 {
                open.remove(&self.client);
            }
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Calls in flight on one connection, and a signal at each change.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    changed: Notify,
}

/// A call in flight until its answer's body is dropped (sent, or the connection gone).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        activity.changed.notify_one();
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

impl Activity {
    /// Resolves once no call has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                self.changed.notified().await;
                continue;
            }
            if tokio::time::timeout(idle, self.changed.notified()).await.is_err() && self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }
}

/// A served connection of either protocol, which can be asked to end.
trait Served: Future<Output = hyper::Result<()>> {
    fn end_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> Served for hyper::server::conn::http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn end_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Served for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn end_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves `app` on `listener` within `limits` (over `tls`, when given)
/// until `shutdown` resolves, then lets the open connections finish their calls.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    tls: Option<Arc<TlsTerminator>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let admission = Arc::new(Admission { limits, open: Mutex::default(), total: AtomicUsize::new(0) });
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_read_timeout));
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, or a connection reset before it was taken:
                // the listener itself is fine, and the next accept may succeed.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(place) = admission.admit(client.ip()) else {
            tracing::debug!(%client, "connection refused: too many open connections");
            continue;
        };
        let (app, mut stopped, tls) = (app.clone(), stopped.clone(), tls.clone());
        connections.spawn(async move {
            let _place = place;
            serve_connection(stream, client, app, limits, tls.as_deref(), &mut stopped).await;
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The address a call came from, in its request's extensions, for the log.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub SocketAddr);

async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    app: axum::Router,
    limits: ConnectionLimits,
    tls: Option<&TlsTerminator>,
    stopped: &mut tokio::sync::watch::Receiver<bool>,
) {
    // Without TCP_NODELAY an h2c answer written in two pieces waits for
    // the client's delayed ACK: about 40 ms on every gRPC call.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::warn!(%error, "cannot set TCP_NODELAY on a connection");
    }
    let Some(tls) = tls else {
        let Some(http2) = speaks_http2(&stream, limits.header_read_timeout).await else {
            tracing::debug!(%client, "connection closed: no request head in time");
            return;
        };
        return serve_http(TokioIo::new(stream), http2, client, None, app, limits, stopped).await;
    };
    let Some(stream) = handshake(stream, client, tls, limits.header_read_timeout).await else { return };
    let (_, session) = stream.get_ref();
    let http2 = session.alpn_protocol() == Some(b"h2");
    let verified = session.peer_certificates().is_some_and(|chain| !chain.is_empty()).then_some(VerifiedClientCertificate);
    serve_http(TokioIo::new(stream), http2, client, verified, app, limits, stopped).await;
}

/// The TLS handshake on a new connection, or `None` (logged) when it is not
/// TLS, fails, or does not finish within `within`.
async fn handshake(
    stream: TcpStream,
    client: SocketAddr,
    tls: &TlsTerminator,
    within: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    // A TLS connection opens with a handshake record (content type 22).
    let mut first = [0u8; 1];
    match tokio::time::timeout(within, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) => {
            tracing::warn!(%client, "connection closed: it is not TLS (plain HTTP?) on a TLS port (api.tls)");
            return None;
        }
        _ => {
            tracing::debug!(%client, "connection closed: no TLS handshake in time");
            return None;
        }
    }
    match tokio::time::timeout(within, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::warn!(%client, %error, "connection closed: the TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%client, "connection closed: the TLS handshake did not finish in time");
            None
        }
    }
}

async fn serve_http<I>(
    io: TokioIo<I>,
    http2: bool,
    client: SocketAddr,
    verified: Option<VerifiedClientCertificate>,
    app: axum::Router,
    limits: ConnectionLimits,
    stopped: &mut tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let in_flight = InFlight::begin(&activity);
            let app = app.clone();
            request.extensions_mut().insert(ClientAddress(client));
            if let Some(verified) = verified {
                request.extensions_mut().insert(verified);
            }
            async move {
                let response = app.oneshot(request.map(axum::body::Body::new)).await?;
                // The call is in flight until its whole answer is sent.
                Ok::<_, Infallible>(response.map(|body| {
                    body.map_frame(move |frame| {
                        let _in_flight = &in_flight;
                        frame
                    })
                }))
            }
        })
    };
    let result = if http2 {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(limits.idle_timeout))
            // A GOAWAY waits for the answer to a ping: a peer that answers
            // nothing is dropped after as long as a request head may take.
            .keep_alive_timeout(limits.header_read_timeout)
            .serve_connection(io, service);
        run_until_idle(connection, &activity, limits.idle_timeout, stopped).await
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(io, service);
        run_until_idle(connection, &activity, limits.idle_timeout, stopped).await
    };
    if let Err(error) = result {
        tracing::debug!(%client, %error, "connection ended on an error");
    }
}

/// Runs a connection to its end, asking it to end when it has been idle for
/// `idle` or when the daemon stops.
async fn run_until_idle<C: Served>(
    connection: C,
    activity: &Activity,
    idle: Duration,
    stopped: &mut tokio::sync::watch::Receiver<bool>,
) -> hyper::Result<()> {
    tokio::pin!(connection);
    let ending = async {
        tokio::select! {
            () = activity.idle_for(idle) => {}
            _ = stopped.wait_for(|stopped| *stopped) => {}
        }
    };
    tokio::select! {
        result = connection.as_mut() => return result,
        () = ending => connection.as_mut().end_gracefully(),
    }
    connection.await
}

/// Whether the client opens with the HTTP/2 preface (h2c), or `None` when it
/// sends nothing within `within` (or closes).
async fn speaks_http2(stream: &TcpStream, within: Duration) -> Option<bool> {
    let sniff = async {
        let mut start = [0u8; HTTP2_PREFACE.len()];
        loop {
            let seen = stream.peek(&mut start).await.ok()?;
            if seen == 0 {
                return None;
            }
            if !HTTP2_PREFACE.starts_with(&start[..seen]) {
                return Some(false);
            }
            if seen == HTTP2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface: peek would return it again at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(within, sniff).await.ok().flatten()
}
