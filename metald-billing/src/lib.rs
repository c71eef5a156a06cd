//! metald-billing: what VMs cost, measured and delivered exactly once.
//!
//! It will own the 100 ms meter (cgroup CPU and memory, TAP counters, block
//! I/O) that subscribes to the core's VM events, interval usage records
//! with per-VM sequence numbers, the durable spool, the `BillingSink` trait
//! with ClickHouse, JSON Lines and billing-service sinks, and the
//! ClickHouse schema. It depends on `metald-core` only. Nothing is
//! implemented yet.
