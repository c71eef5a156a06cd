//! metald-fleet: the gateway's logic, as a library a service can embed.
//!
//! It owns:
//! - [`keys`]: API keys, their shape and how they are checked;
//! - [`store`]: what a gateway keeps (tenants, quotas, key digests, hosts,
//!   which host holds each VM, idempotency records) behind the
//!   [`store::FleetStore`] port, with the embedded SQLite store.
//!
//! It speaks the hosts' contract (`metald-api`) and knows nothing of VMMs,
//! jails or networks: the hosts stay the source of truth for their VMs.

pub mod keys;
pub mod store;
