//! The HTTP application around a ConnectRPC service: `/health` (the
//! process serves HTTP), `/ready` (it takes calls), `/metrics`
//! (Prometheus text), and the service for every other path, with a 415
//! that says which content types there are.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

/// What `/ready` and `/metrics` answer from.
pub trait Probes: Send + Sync + 'static {
    fn is_ready(&self) -> bool;
    fn render_metrics(&self) -> Result<String, std::fmt::Error>;
}

/// The application: the probes' routes, then `service` for every other path.
pub fn application<S>(service: S, probes: Arc<dyn Probes>) -> axum::Router
where
    S: tower::Service<axum::extract::Request, Error = std::convert::Infallible> + Clone + Send + Sync + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(probes)
        .fallback_service(service)
        .layer(axum::middleware::map_response(crate::connect::explain_unsupported_media_type))
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(probes): State<Arc<dyn Probes>>) -> (StatusCode, &'static str) {
    if probes.is_ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

async fn render_metrics(State(probes): State<Arc<dyn Probes>>) -> axum::response::Response {
    match probes.render_metrics() {
        Ok(text) => ([(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be rendered\n").into_response(),
    }
}
