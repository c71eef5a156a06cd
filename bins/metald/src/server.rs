//! One port for everything: the API (Connect with JSON or binary
//! protobuf, gRPC and gRPC-Web, over HTTP/1.1 and h2c), `/health`,
//! `/ready` and `/metrics`. Every API call passes one interceptor that
//! authenticates it, opens its span and times it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use connectrpc::interceptor::{StreamRequest, StreamResponse, UnaryRequest, UnaryResponse};
use connectrpc::{ConnectError, ConnectRpcService, Interceptor, Limits, Next, NextStream, PayloadStream, Router};
use metald_api::proto::vmprovisioner::v1::{HostServiceExt, OperatorServiceExt, VmServiceExt};
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::metrics::Metrics;
use crate::operator::{OperatorApi, UsageReadBack};
use crate::service::VmApi;

/// Whether the daemon takes calls: not while it takes over the VMs of
/// its previous run, and not once it stops.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

impl Readiness {
    /// Starting becomes ready; a daemon already stopping stays so. True if now ready.
    pub fn mark_ready(&self) -> bool {
        let _ = self.0.compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst);
        self.is_ready()
    }

    pub fn mark_stopping(&self) {
        self.0.store(STOPPING, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst) == READY
    }

    fn refusal(&self) -> Option<ConnectError> {
        match self.0.load(Ordering::SeqCst) {
            STARTING => {
                Some(ConnectError::unavailable("metald is starting: it is taking over the VMs of its previous run; try again shortly"))
            }
            STOPPING => Some(ConnectError::unavailable("metald is stopping; try again when it is back")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Authentication, a span and a latency figure for every call.
#[derive(Debug)]
struct CallGate {
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Calls under this path are the operator's, and take only its token.
const OPERATOR_SERVICE_PATH: &str = "/vmprovisioner.v1.OperatorService/";
/// Calls under this path are a gateway's own, and take only its signature for no tenant.
const HOST_SERVICE_PATH: &str = "/vmprovisioner.v1.HostService/";

/// The method's name from `/vmprovisioner.v1.VmService/CreateVm`; an
/// operator's or a gateway's method keeps its service
/// (`OperatorService/ListVms`), so it is not counted as the tenants'
/// method of the same name.
fn method_of(path: &str) -> &str {
    if let Some(own_method) =
        path.strip_prefix("/vmprovisioner.v1.").filter(|rest| rest.starts_with("OperatorService/") || rest.starts_with("HostService/"))
    {
        return own_method;
    }
    path.rsplit('/').next().unwrap_or(path)
}

fn code_of<T>(result: &Result<T, ConnectError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code.as_str(),
    }
}

impl CallGate {
    fn span(&self, path: &str, ctx: &connectrpc::RequestContext) -> tracing::Span {
        let client = ctx.extensions().get::<metald_serve::listener::ClientAddress>().map(|address| address.0.to_string());
        tracing::info_span!(
            "rpc",
            otel.name = path,
            otel.kind = "server",
            rpc.system = "connect_rpc",
            rpc.method = method_of(path),
            client = %client.as_deref().unwrap_or("unknown"),
            tenant = tracing::field::Empty,
            role = tracing::field::Empty,
            vm_id = tracing::field::Empty,
            code = tracing::field::Empty,
        )
    }

    fn admit(&self, ctx: &mut connectrpc::RequestContext, path: &str, span: &tracing::Span) -> Result<(), ConnectError> {
        if let Some(refusal) = self.readiness.refusal() {
            return Err(refusal);
        }
        let refused = |error: crate::auth::AuthError| {
            tracing::info!(parent: span, %error, "call refused");
            error.to_connect()
        };
        if path.starts_with(OPERATOR_SERVICE_PATH) {
            let operator = self.auth.authenticate_operator(ctx.headers()).map_err(refused)?;
            span.record("role", "operator");
            ctx.extensions_mut().insert(operator);
            return Ok(());
        }
        if path.starts_with(HOST_SERVICE_PATH) {
            self.auth.authenticate_gateway(ctx.headers(), path, SystemTime::now()).map_err(refused)?;
            span.record("role", "gateway");
            ctx.extensions_mut().insert(crate::host_service::GatewayItself);
            return Ok(());
        }
        let caller = self.auth.authenticate(ctx.headers(), path, SystemTime::now()).map_err(refused)?;
        span.record("tenant", tracing::field::display(caller.tenant.as_str()));
        ctx.extensions_mut().insert(caller);
        Ok(())
    }

    fn finish<T>(&self, path: &str, span: &tracing::Span, started: Instant, result: &Result<T, ConnectError>) {
        let code = code_of(result);
        span.record("code", code);
        if let Err(error) = result {
            tracing::info!(parent: span, code = error.code.as_str(), message = error.message.as_deref().unwrap_or(""), "call failed");
        }
        self.metrics.observe_rpc(method_of(path), code, started.elapsed());
    }
}

#[connectrpc::async_trait]
impl Interceptor for CallGate {
    async fn intercept_unary(&self, mut request: UnaryRequest, next: Next<'_>) -> Result<UnaryResponse, ConnectError> {
        let started = Instant::now();
        let path = request.ctx.path().unwrap_or("unknown").to_owned();
        let span = self.span(&path, &request.ctx);
        let result = match self.admit(&mut request.ctx, &path, &span) {
            Ok(()) => next.run(request).instrument(span.clone()).await.map_err(metald_serve::connect::clarify_decode_error),
            Err(error) => Err(error),
        };
        self.finish(&path, &span, started, &result);
        result
    }

    async fn intercept_streaming(
        &self,
        mut request: StreamRequest,
        inbound: PayloadStream,
        next: NextStream<'_>,
    ) -> Result<StreamResponse, ConnectError> {
        let started = Instant::now();
        let path = request.ctx.path().unwrap_or("unknown").to_owned();
        let span = self.span(&path, &request.ctx);
        // For a stream the figure is the time to open it; how long it then
        // stays open is the caller's choice, not a latency.
        let result = match self.admit(&mut request.ctx, &path, &span) {
            Ok(()) => next.run(request, inbound).instrument(span.clone()).await.map_err(metald_serve::connect::clarify_decode_error),
            Err(error) => Err(error),
        };
        self.finish(&path, &span, started, &result);
        result
    }
}

/// The whole HTTP application.
pub fn app(
    api: VmApi,
    usage: UsageReadBack,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    max_body_bytes: usize,
) -> axum::Router {
    let api = Arc::new(api);
    let router = Arc::clone(&api).register(Router::new());
    let router = Arc::new(OperatorApi::new(Arc::clone(&api), usage)).register(router);
    let router = Arc::new(crate::host_service::HostApi::new(api)).register(router);
    let limits = Limits::default().with_max_request_body_size(max_body_bytes).with_max_message_size(max_body_bytes);
    let connect = ConnectRpcService::new(router).with_limits(limits).with_interceptor(CallGate {
        auth,
        metrics: Arc::clone(&metrics),
        readiness: Arc::clone(&readiness),
    });
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(HttpState { metrics, readiness })
        .fallback_service(connect)
        .layer(axum::middleware::map_response(metald_serve::connect::explain_unsupported_media_type))
}

/// The process is up and serving HTTP.
async fn health() -> &'static str {
    "ok\n"
}

/// VMs are taken over and calls are taken.
async fn ready(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

async fn render_metrics(State(state): State<HttpState>) -> axum::response::Response {
    match state.metrics.render() {
        Ok(text) => ([(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be rendered\n").into_response(),
    }
}
