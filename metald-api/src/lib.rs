//! metald-api: the `vmprovisioner.v1` ConnectRPC contract.
//!
//! It will own the code generated from `proto/vmprovisioner/v1/` and the
//! conversions between those messages and `metald-core`'s types (with
//! field paths for every invalid argument). It depends on `metald-core`
//! only. Nothing is implemented yet.
