//! metald-types: the small shared vocabulary of metald's crates and
//! services: VM and tenant ids ([`ids`]), what a VMM counts of a VM's
//! devices ([`counters`]), usage records ([`usage`]), Unix milliseconds
//! ([`time`]), the one-line error chain ([`errors`]) and owner-only files
//! ([`private_files`]). It links no VMM, jailer or network code, so a
//! service such as billaged that only handles ids and usage stays small.

pub mod counters;
pub mod errors;
pub mod ids;
pub mod private_files;
pub mod time;
pub mod usage;

pub use counters::DeviceCounters;
pub use errors::error_chain;
pub use ids::{IdError, TenantId, VmId};
pub use usage::{Counters, HostHeartbeat, UsageGap, UsageRecord};
