//! metald-net: host networking for VMs.
//!
//! It will own address management (a host prefix, a /64 per tenant, an
//! address and MAC per VM, persisted and crash-safe), a network namespace
//! per VM with its TAP inside, veth links, routes and proxy NDP over
//! netlink, and the nftables table that enforces anti-spoofing and tenant
//! isolation. It implements the core's `NetworkProvider` port and depends
//! on `metald-core` only. Nothing is implemented yet.
