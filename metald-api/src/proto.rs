//! The contracts, generated: `vmprovisioner.v1` (the hosts', from
//! `proto/vmprovisioner/v1/vmprovisioner.proto`) and `gateway.v1` (the
//! gateway's admin service, from `proto/gateway/v1/gateway.proto`).

#![allow(missing_debug_implementations, unused_qualifications, clippy::all)]

connectrpc::include_generated!();
