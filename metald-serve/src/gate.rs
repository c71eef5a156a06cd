//! The frame every API call of a server of ours passes: a span of its own
//! (method, client, then what the server learns: tenant, role, key, VM,
//! result code), the server's admission (readiness, credentials, rates),
//! the call, and its latency figure. A server brings [`Admit`]; [`Gate`]
//! is the ConnectRPC interceptor around it.

use std::time::{Duration, Instant};

use connectrpc::interceptor::{StreamRequest, StreamResponse, UnaryRequest, UnaryResponse};
use connectrpc::{ConnectError, Interceptor, Next, NextStream, PayloadStream, RequestContext};
use tracing::Instrument;

/// What a server decides about each call.
#[connectrpc::async_trait]
pub trait Admit: Send + Sync + 'static {
    /// Lets the call to `path` in (putting who called into its
    /// extensions, and into `span`), or says why not. `body` is a unary
    /// call's request as received; a stream's is not in hand yet (`None`).
    async fn admit(&self, ctx: &mut RequestContext, path: &str, body: Option<&[u8]>, span: &tracing::Span) -> Result<(), ConnectError>;

    /// Counts a finished call: its method (as [`Admit::method_of`] names it), code and latency.
    fn observe(&self, method: &str, code: &'static str, elapsed: Duration);

    /// The method's name in spans and figures: the last part of the path.
    fn method_of<'p>(&self, path: &'p str) -> &'p str {
        path.rsplit('/').next().unwrap_or(path)
    }
}

/// The result code of a call as figures name it: `ok`, or its Connect code.
pub fn code_of<T>(result: &Result<T, ConnectError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code.as_str(),
    }
}

/// The interceptor: admission, a span and a figure for every call.
#[derive(Debug)]
pub struct Gate<A>(pub A);

impl<A: Admit> Gate<A> {
    fn span(&self, path: &str, ctx: &RequestContext) -> tracing::Span {
        let client = ctx.extensions().get::<crate::listener::ClientAddress>().map(|address| address.0.to_string());
        let span = tracing::info_span!(
            "rpc",
            otel.name = path,
            otel.kind = "server",
            rpc.system = "connect_rpc",
            rpc.method = self.0.method_of(path),
            client = %client.as_deref().unwrap_or("unknown"),
            tenant = tracing::field::Empty,
            role = tracing::field::Empty,
            key = tracing::field::Empty,
            vm_id = tracing::field::Empty,
            code = tracing::field::Empty,
        );
        crate::trace_context::continue_from(&span, ctx.headers());
        span
    }

    fn finish<T>(&self, path: &str, span: &tracing::Span, started: Instant, result: &Result<T, ConnectError>) {
        let code = code_of(result);
        span.record("code", code);
        if let Err(error) = result {
            tracing::info!(parent: span, code = error.code.as_str(), message = error.message.as_deref().unwrap_or(""), "call failed");
        }
        self.0.observe(self.0.method_of(path), code, started.elapsed());
    }
}

#[connectrpc::async_trait]
impl<A: Admit> Interceptor for Gate<A> {
    async fn intercept_unary(&self, mut request: UnaryRequest, next: Next<'_>) -> Result<UnaryResponse, ConnectError> {
        let started = Instant::now();
        let path = request.ctx.path().unwrap_or("unknown").to_owned();
        let span = self.span(&path, &request.ctx);
        let body = request.payload.bytes().clone();
        let result = match self.0.admit(&mut request.ctx, &path, Some(&body), &span).await {
            Ok(()) => next.run(request).instrument(span.clone()).await.map_err(crate::connect::clarify_decode_error),
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
        let result = match self.0.admit(&mut request.ctx, &path, None, &span).await {
            Ok(()) => next.run(request, inbound).instrument(span.clone()).await.map_err(crate::connect::clarify_decode_error),
            Err(error) => Err(error),
        };
        self.finish(&path, &span, started, &result);
        result
    }
}
