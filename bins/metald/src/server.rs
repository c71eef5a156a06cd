//! One port for everything: the API (Connect with JSON or binary
//! protobuf, gRPC and gRPC-Web, over HTTP/1.1 and h2c), `/health`,
//! `/ready` and `/metrics`. Every API call passes one interceptor that
//! authenticates it, opens its span and times it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::SystemTime;

use connectrpc::{ConnectError, ConnectRpcService, Limits, Router};
use metald_api::proto::vmprovisioner::v1::{HostServiceExt, OperatorServiceExt, VmServiceExt};

use crate::auth::{Authenticator, Presented};
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

#[derive(Debug)]
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

#[connectrpc::async_trait]
impl metald_serve::gate::Admit for CallGate {
    async fn admit(
        &self,
        ctx: &mut connectrpc::RequestContext,
        path: &str,
        body: Option<&[u8]>,
        span: &tracing::Span,
    ) -> Result<(), ConnectError> {
        if let Some(refusal) = self.readiness.refusal() {
            return Err(refusal);
        }
        let refused = |error: crate::auth::AuthError| {
            match error {
                crate::auth::AuthError::GatewayWithoutCertificate => tracing::warn!(parent: span, %error, "call refused"),
                _ => tracing::info!(parent: span, %error, "call refused"),
            }
            error.to_connect()
        };
        if path.starts_with(OPERATOR_SERVICE_PATH) {
            let operator = self.auth.authenticate_operator(ctx.headers()).map_err(refused)?;
            span.record("role", "operator");
            ctx.extensions_mut().insert(operator);
            return Ok(());
        }
        let client_certificate = ctx.extensions().get::<metald_serve::tls::VerifiedClientCertificate>().is_some();
        if path.starts_with(HOST_SERVICE_PATH) {
            let call = Presented { headers: ctx.headers(), procedure: path, body, now: SystemTime::now(), client_certificate };
            self.auth.authenticate_gateway(call).map_err(refused)?;
            span.record("role", "gateway");
            ctx.extensions_mut().insert(crate::host_service::GatewayItself);
            return Ok(());
        }
        let call = Presented { headers: ctx.headers(), procedure: path, body, now: SystemTime::now(), client_certificate };
        let caller = self.auth.authenticate(call).map_err(refused)?;
        span.record("tenant", tracing::field::display(caller.tenant.as_str()));
        ctx.extensions_mut().insert(caller);
        Ok(())
    }

    fn observe(&self, method: &str, code: &'static str, elapsed: std::time::Duration) {
        self.metrics.observe_rpc(method, code, elapsed);
    }

    fn method_of<'p>(&self, path: &'p str) -> &'p str {
        method_of(path)
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
    let connect = ConnectRpcService::new(router).with_limits(limits).with_interceptor(metald_serve::gate::Gate(CallGate {
        auth,
        metrics: Arc::clone(&metrics),
        readiness: Arc::clone(&readiness),
    }));
    metald_serve::http::application(connect, Arc::new(HttpState { metrics, readiness }))
}

impl metald_serve::http::Probes for HttpState {
    fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    fn render_metrics(&self) -> Result<String, std::fmt::Error> {
        self.metrics.render()
    }
}
