//! The `vmprovisioner.v1` contract, generated from
//! `proto/vmprovisioner/v1/vmprovisioner.proto`.

#![allow(missing_debug_implementations, unused_qualifications, clippy::all)]

connectrpc::include_generated!();
