//! metald-serve: what every ConnectRPC server of metald's shares, so the
//! host daemon and the gateway answer alike.
//!
//! It owns:
//! - [`listener`]: the API port, bounded (connections in all and per
//!   client, header, body and idle timeouts), HTTP/1.1 and h2c on one port;
//!   [`tls`], TLS on it, client certificates and reloads;
//! - [`telemetry`]: logs to stderr and traces over OTLP/HTTP;
//!   [`trace_context`], a trace continued across a hop;
//! - [`settings`]: defaults, a TOML file, environment variables and flags,
//!   layered, with errors that name the key; [`shutdown`], stopping on a
//!   signal after the calls in flight;
//! - [`http`]: the application around a service, with `/health`,
//!   `/ready` and `/metrics`;
//! - [`gate`]: the frame of every call (span, admission, latency figure);
//! - [`connect`]: the RPC library's rough edges smoothed (a 415 that says
//!   which content types there are, an unknown enum value named as such).
//!
//! It knows nothing of VMs, tenants or keys: each server brings its own
//! services and authentication.

pub mod connect;
pub mod gate;
pub mod http;
pub mod listener;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
