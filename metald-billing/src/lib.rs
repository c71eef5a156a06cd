//! metald-billing: what VMs use, measured and delivered exactly once.
//!
//! It owns the meter (every 100 ms, per running VM: cgroup CPU and memory,
//! TAP counters, block I/O) that subscribes to the core's VM events, the
//! interval [`UsageRecord`] with its per-VM sequence number, the durable
//! [`Spool`] every record passes through, the delivery loop, the
//! [`BillingSink`] trait with its JSON Lines, ClickHouse and billing-service
//! implementations, the ClickHouse schema and its migrations, reading delivered usage back
//! as per tenant totals ([`UsageHistory`]), and the billing service's logic.
//!
//! The record types are `metald-types`'. The meter and the pipeline that
//! run on a metald host need `metald-core` and come with the `host`
//! feature (on by default); without it, as billaged builds it, the crate
//! links no VMM, jailer or network code.

#[cfg(feature = "host")]
mod block_reads;
pub mod clickhouse;
pub mod delivery;
#[cfg(feature = "host")]
pub mod meter;
#[cfg(feature = "host")]
pub mod pipeline;
pub mod proto;
#[cfg(feature = "host")]
pub mod released;
pub mod service;
pub mod sink;
#[cfg(feature = "host")]
pub mod source;
pub mod spool;
pub mod summary;

pub use metald_types::usage as record;
pub use metald_types::{Counters, HostHeartbeat, UsageGap, UsageRecord};
#[cfg(feature = "host")]
pub use pipeline::{Billing, BillingConfig};
pub use sink::{Batch, BillingSink, Delivered, JsonLinesSink, SinkError};
pub use spool::{MeterPosition, Pending, Spool, SpoolDepth, SpoolError};
pub use summary::{SummaryError, TenantUsage, UsageHistory, UsageWindow};
