//! The `billing.v1` contract, generated from `proto/billing/v1/billing.proto`.

#![allow(missing_debug_implementations, unused_qualifications, clippy::all)]

connectrpc::include_generated!();
