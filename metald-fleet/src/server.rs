//! The gateway's HTTP application: `VmService` (for API keys),
//! `gateway.v1.AdminService` (for the admin token) and
//! `gateway.v1.RegistrationService` (for hosts, signed) on one port, over
//! Connect, gRPC and gRPC-Web, with `/health`, `/ready` and `/metrics`.
//! Every call passes one gate: readiness, authentication, the key's
//! request rate, a span and a latency figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use connectrpc::{ConnectError, ConnectRpcService, Limits, Router};
use metald_api::gateway_auth::Verifier;
use metald_api::proto::gateway::v1::{AdminServiceExt, RegistrationServiceExt};
use metald_api::proto::vmprovisioner::v1::VmServiceExt;

use crate::admin::AdminApi;
use crate::auth::Authenticator;
use crate::gateway::Gateway;
use crate::limits::{MethodClass, RateLimits};
use crate::metrics::GatewayMetrics;
use crate::registration::Registration;

const ADMIN_SERVICE_PATH: &str = "/gateway.v1.AdminService/";
const REGISTRATION_SERVICE_PATH: &str = "/gateway.v1.RegistrationService/";

/// Whether the gateway takes calls: once its store is open and its hosts were probed once.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn mark_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Gate {
    auth: Arc<Authenticator>,
    limits: Arc<RateLimits>,
    metrics: Arc<GatewayMetrics>,
    readiness: Arc<Readiness>,
    /// Checks hosts' signed announcements.
    announcements: Arc<Verifier>,
}

/// `AdminService/AddHost` keeps its service; `VmService/CreateVm` is `CreateVm`.
fn method_of(path: &str) -> &str {
    if let Some(admin_method) = path.strip_prefix("/gateway.v1.") {
        return admin_method;
    }
    path.rsplit('/').next().unwrap_or(path)
}

#[connectrpc::async_trait]
impl metald_serve::gate::Admit for Gate {
    async fn admit(
        &self,
        ctx: &mut connectrpc::RequestContext,
        path: &str,
        body: Option<&[u8]>,
        span: &tracing::Span,
    ) -> Result<(), ConnectError> {
        if !self.readiness.is_ready() {
            return Err(ConnectError::unavailable("the gateway is starting; try again shortly"));
        }
        let refused = |error: crate::auth::AuthError| {
            tracing::info!(parent: span, %error, "call refused");
            error.to_connect()
        };
        if path.starts_with(ADMIN_SERVICE_PATH) {
            let admin = self.auth.admin(ctx.headers()).map_err(refused)?;
            ctx.extensions_mut().insert(admin);
            return Ok(());
        }
        if path.starts_with(REGISTRATION_SERVICE_PATH) {
            let refusal = match self.announcements.check(ctx.headers(), path, body, std::time::SystemTime::now()) {
                Ok("") => None,
                Ok(tenant) => Some(format!("an announcement is signed for no tenant; this one is for {tenant:?}")),
                Err(refusal) => Some(refusal.to_string()),
            };
            if let Some(refusal) = refusal {
                tracing::warn!(parent: span, error = %refusal, "announcement refused");
                return Err(ConnectError::unauthenticated(refusal));
            }
            ctx.extensions_mut().insert(crate::registration::SignedByHost);
            return Ok(());
        }
        let caller = self.auth.tenant(ctx.headers(), metald_types::time::unix_millis_now()).await.map_err(refused)?;
        span.record("tenant", tracing::field::display(&caller.tenant));
        span.record("key", tracing::field::display(&caller.key_id));
        let method = method_of(path);
        if let Err(refusal) = self.limits.admit(&caller.key_id, method) {
            self.metrics.rate_limited(MethodClass::of(method).name());
            return Err(refusal);
        }
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

#[derive(Debug)]
struct HttpState {
    metrics: Arc<GatewayMetrics>,
    readiness: Arc<Readiness>,
}

/// What the application is made of.
#[derive(Debug)]
pub struct Parts {
    pub gateway: Arc<Gateway>,
    pub admin: AdminApi,
    pub registration: Registration,
    /// Checks hosts' announcements: the secret shared with the hosts and its skew window.
    pub announcements: Arc<Verifier>,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<RateLimits>,
    pub metrics: Arc<GatewayMetrics>,
    pub readiness: Arc<Readiness>,
    pub max_body_bytes: usize,
}

/// The whole HTTP application.
pub fn app(parts: Parts) -> axum::Router {
    let router = parts.gateway.register(Router::new());
    let router = Arc::new(parts.admin).register(router);
    let router = Arc::new(parts.registration).register(router);
    let limits = Limits::default().with_max_request_body_size(parts.max_body_bytes).with_max_message_size(parts.max_body_bytes);
    let connect = ConnectRpcService::new(router).with_limits(limits).with_interceptor(metald_serve::gate::Gate(Gate {
        auth: parts.auth,
        limits: parts.limits,
        metrics: Arc::clone(&parts.metrics),
        readiness: Arc::clone(&parts.readiness),
        announcements: parts.announcements,
    }));
    metald_serve::http::application(connect, Arc::new(HttpState { metrics: parts.metrics, readiness: parts.readiness }))
}

impl metald_serve::http::Probes for HttpState {
    fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    fn render_metrics(&self) -> Result<String, std::fmt::Error> {
        self.metrics.render()
    }
}
