//! metald-api: the `vmprovisioner.v1` ConnectRPC contract and its meaning
//! in `metald-core`'s terms.
//!
//! It owns:
//! - the code generated from `proto/vmprovisioner/v1/vmprovisioner.proto`
//!   ([`proto`]): messages, the `VmService` trait a server implements and
//!   its client;
//! - the conversions between those messages and core types ([`convert`]),
//!   which refuse what core cannot hold with a [`WireError`] naming the
//!   field by its path in the contract (`network[0].rx_rate_limit.bandwidth`);
//! - how manager and request errors become ConnectRPC errors ([`errors`]),
//!   telling the caller what it got wrong and keeping the host's internals
//!   in the log;
//! - how a gateway signs the calls it brings a host ([`gateway_auth`]), so
//!   the side that signs and the side that checks share one definition.
//!
//! It does not own the server: authentication, tenancy, pagination,
//! metrics sampling and the event stream's plumbing are the daemon's. It
//! depends on `metald-core` only.

pub mod convert;
pub mod errors;
pub mod gateway_auth;
pub mod proto;

pub use convert::WireError;
pub use errors::{manager_error_to_connect, wire_error_to_connect};

#[cfg(test)]
mod wire_compatibility;
