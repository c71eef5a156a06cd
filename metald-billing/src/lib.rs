//! metald-billing: what VMs use, measured and delivered exactly once.
//!
//! It owns the meter (every 100 ms, per running VM: cgroup CPU and memory,
//! TAP counters, block I/O) that subscribes to the core's VM events, the
//! interval [`UsageRecord`] with its per-VM sequence number, the durable
//! [`Spool`] every record passes through, the delivery loop, the
//! [`BillingSink`] trait with its JSON Lines, ClickHouse and billing-service
//! implementations, the ClickHouse schema and its migrations, reading delivered usage back
//! as per tenant totals ([`UsageHistory`]), and the billing service's logic. It depends on `metald-core` only.

mod block_reads;
pub mod clickhouse;
pub mod delivery;
pub mod meter;
pub mod pipeline;
pub mod proto;
pub mod record;
pub mod released;
pub mod service;
pub mod sink;
pub mod source;
pub mod spool;
pub mod summary;

pub use pipeline::{Billing, BillingConfig};
pub use record::{Counters, HostHeartbeat, UsageGap, UsageRecord, saturating_u64, unix_millis};
pub use sink::{Batch, BillingSink, Delivered, JsonLinesSink, SinkError};
pub use spool::{MeterPosition, Pending, Spool, SpoolDepth, SpoolError};
pub use summary::{SummaryError, TenantUsage, UsageHistory, UsageWindow};
