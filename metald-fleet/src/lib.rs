//! metald-fleet: the gateway's logic, as a library a service can embed.
//!
//! It owns:
//! - [`keys`]: API keys, their shape and how they are checked;
//! - [`store`]: what a gateway keeps (tenants, quotas, key digests, hosts,
//!   which host holds each VM, idempotency records) behind the
//!   [`store::FleetStore`] port, with the embedded SQLite store and the
//!   PostgreSQL store several gateways share;
//! - [`hosts`]: the signed link to each host's metald, its health and
//!   capacity as probes find them, creates in flight; [`host_tls`], mutual
//!   TLS on that link;
//! - [`placement`]: which host a new VM goes to, and why none when none;
//! - [`auth`]: API keys and the admin token, checked; [`limits`], request
//!   rates per key and method class; [`cache`], recent reads of the store;
//! - [`gateway`]: `VmService` across hosts (placement, routing, lists),
//!   and [`watch`], its merged event stream;
//! - [`reconcile`]: the store held against what hosts have (lost VMs, strays);
//! - [`metrics`]: what the gateway tells Prometheus; [`server`], the HTTP
//!   application with its gate (readiness, keys, rates, spans);
//! - [`admin`]: `gateway.v1.AdminService`, the operator's hosts, tenants and keys;
//!   [`registration`], `gateway.v1.RegistrationService`, hosts announcing themselves.
//!
//! It speaks the hosts' contract (`metald-api`) and knows nothing of VMMs,
//! jails or networks: the hosts stay the source of truth for their VMs.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod gateway;
pub mod host_tls;
pub mod hosts;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod placement;
pub mod reconcile;
pub mod registration;
pub mod server;
pub mod store;
pub mod watch;
