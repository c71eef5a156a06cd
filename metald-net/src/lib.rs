//! metald-net: IPv6-first host networking for VMs.
//!
//! It owns address management (a host prefix, a /64 per tenant, an address
//! and a locally administered MAC per VM interface, persisted in SQLite),
//! the path of a packet (a network namespace per VM with its TAP inside,
//! bridged to a veth whose host end joins its tenant's bridge, with the
//! tenant's gateway on that bridge), and the one nftables table that
//! enforces anti-spoofing, tenant isolation and hygiene. It implements
//! `metald-core`'s `NetworkProvider` and depends on `metald-core` only.

pub mod addresses;
pub mod firewall;
pub mod netlink;
pub mod netns;
pub mod netns_pool;
pub mod netns_release;
pub mod provider;
pub mod tap;

pub use provider::{Ipv6Network, NetworkConfig, ProviderError};
