//! W3C trace context across a hop: a call that comes with `traceparent`
//! (and `tracestate`) continues that trace in its span, and a call made
//! onwards carries the current span's, so a gateway's span and the host's
//! span under it are one trace.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` continue the trace the request's headers carry, if any.
pub fn continue_from(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Without an OpenTelemetry layer (no traces exported) there is nothing to continue.
    let _ = span.set_parent(parent);
}

/// The current span's trace context as headers, for a call made onwards;
/// none when no trace is being recorded.
pub fn current_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut opentelemetry_http::HeaderInjector(&mut headers));
    headers
}
