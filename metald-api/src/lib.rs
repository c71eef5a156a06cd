//! metald-api: the `vmprovisioner.v1` ConnectRPC contract.
//!
//! It owns the code generated from `proto/vmprovisioner/v1/` ([`proto`]).
//! It depends on `metald-core` only.

pub mod proto;
