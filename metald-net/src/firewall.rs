//! The one nftables table metald owns (`bridge metald` by default), and the
//! only one it touches. Its rules are fixed; a VM adds only set and map
//! elements (and a tenant one chain), so applying a change costs the same
//! with 1 VM or 1000.
//!
//! - `prerouting` checks every frame from a VM port: the VM's MAC
//!   (`port_macs`), no router advertisement, redirect, router renumbering or
//!   DHCP(v6) server message, ICMPv6 rate-limited per port (`icmp6_rate`),
//!   and a source address of the port (`port_ipv6`, `port_ipv4`,
//!   `port_arp`), link-local or unspecified;
//! - `forward` drops frames from one VM port to another unless the tenant
//!   lets its VMs reach each other (`open_ports`);
//! - `output` sends each frame the host routes to a VM port to its tenant's
//!   chain (`tenant_<slot>`, through the `to_vm` map), which drops it when it
//!   comes from another tenant's prefix, or from the tenant's own VMs when
//!   the tenant keeps them apart.
//!
//! The JSON is written here with serde_json: nft's JSON API is the protocol,
//! and the `nftables` crate cannot express the verdict maps this relies on.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

use crate::netns::run_in;

/// ICMPv6 packets a VM may send per second (after a burst), to keep one VM
/// from flooding its neighbours' and the host's neighbour caches.
pub const ICMPV6_RATE_PER_SECOND: u32 = 200;
const ICMPV6_BURST: u32 = 100;
const FAMILY: &str = "bridge";
/// nft's `filter` priority in the bridge family. A forward chain at
/// priority 0 was seen not to run on this host's kernel; -200 does.
const FILTER_PRIORITY: i32 = -200;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the change ({status}): {stderr}")]
    Refused { status: String, stderr: String },
    #[error("the thread running nft did not finish")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// One VM port's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRules {
    /// The host end of the VM's link.
    pub port: String,
    pub mac: String,
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub tenant_slot: u64,
}

/// What a tenant's chain checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRules {
    pub slot: u64,
    pub prefix6: Ipv6Net,
    pub gateway6: Ipv6Addr,
    pub ipv4: Option<(Ipv4Net, Ipv4Addr)>,
    /// Whether the tenant's VMs may reach one another.
    pub open: bool,
}

/// Applies changes to metald's table with `nft`, in the host's namespace.
#[derive(Debug, Clone)]
pub struct Firewall {
    program: PathBuf,
    table: String,
    namespace: Option<Arc<OwnedFd>>,
    host_prefix6: Ipv6Net,
    ipv4_pool: Option<Ipv4Net>,
}

fn matches(left: Value, op: &str, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn prefix(address: impl ToString, len: u8) -> Value {
    json!({"prefix": {"addr": address.to_string(), "len": len}})
}

fn drop() -> Value {
    json!({"drop": null})
}

fn accept() -> Value {
    json!({"accept": null})
}

pub fn tenant_chain(slot: u64) -> String {
    format!("tenant_{slot}")
}

impl Firewall {
    pub fn new(
        program: impl Into<PathBuf>,
        table: impl Into<String>,
        namespace: Option<Arc<OwnedFd>>,
        host_prefix6: Ipv6Net,
        ipv4_pool: Option<Ipv4Net>,
    ) -> Self {
        Self { program: program.into(), table: table.into(), namespace, host_prefix6, ipv4_pool }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn object(&self, kind: &str, mut body: Value) -> Value {
        if let Some(fields) = body.as_object_mut() {
            fields.insert("family".into(), json!(FAMILY));
            fields.insert("table".into(), json!(self.table));
        }
        json!({ kind: body })
    }

    fn rule(&self, chain: &str, expr: Vec<Value>) -> Value {
        json!({"add": self.object("rule", json!({"chain": chain, "expr": expr}))})
    }

    fn chain(&self, name: &str) -> Value {
        json!({"add": self.object("chain", json!({"name": name}))})
    }

    fn flush_chain(&self, name: &str) -> Value {
        json!({"flush": self.object("chain", json!({"name": name}))})
    }

    fn element(&self, verb: &str, set: &str, elements: Vec<Value>) -> Value {
        json!({ verb: self.object("element", json!({"name": set, "elem": elements})) })
    }

    /// Makes the table, its sets, maps and base chains, and (re)writes the
    /// base chains' rules. Elements and tenant chains are left alone, so
    /// this is safe while VMs run (after a daemon restart, say).
    pub fn ensure(&self) -> Result<(), FirewallError> {
        // Sets already there (after a restart) are kept as they are, elements included.
        let existing = self.set_names();
        let table = json!({"add": {"table": {"family": FAMILY, "name": self.table}}});
        let mut batch = vec![table];
        if !existing.iter().any(|name| name == "to_vm") {
            batch.push(json!({"add": self.object("map", json!({"name": "to_vm", "type": "ifname", "map": "verdict"}))}));
        }
        let sets: [(&str, Value); 6] = [
            ("vm_ports", json!("ifname")),
            ("open_ports", json!("ifname")),
            ("port_macs", json!(["ifname", "ether_addr"])),
            ("port_ipv6", json!(["ifname", "ipv6_addr"])),
            ("port_ipv4", json!(["ifname", "ipv4_addr"])),
            ("port_arp", json!(["ifname", "ether_addr", "ipv4_addr"])),
        ];
        for (name, kind) in sets.into_iter().filter(|(name, _)| !existing.iter().any(|existing| existing == name)) {
            batch.push(json!({"add": self.object("set", json!({"name": name, "type": kind}))}));
        }
        if !existing.iter().any(|name| name == "icmp6_rate") {
            batch.push(json!({"add": self.object("set", json!({"name": "icmp6_rate", "type": "ifname", "flags": ["timeout"], "timeout": 60, "size": 65536}))}));
        }
        for (name, hook) in [("prerouting", "prerouting"), ("forward", "forward"), ("output", "output")] {
            batch.push(json!({"add": self.object("chain", json!({"name": name, "type": "filter", "hook": hook, "prio": FILTER_PRIORITY, "policy": "accept"}))}));
            batch.push(self.flush_chain(name));
        }
        let iifname = || meta("iifname");
        let concat = |fields: Vec<Value>| json!({"concat": fields});
        let from_vm = [
            vec![matches(iifname(), "!=", json!("@vm_ports")), accept()],
            vec![matches(concat(vec![iifname(), payload("ether", "saddr")]), "!=", json!("@port_macs")), drop()],
            vec![matches(payload("ether", "type"), "!=", json!({"set": ["ip6", "ip", "arp"]})), drop()],
            vec![
                matches(payload("icmpv6", "type"), "==", json!({"set": ["nd-router-advert", "nd-redirect", "router-renumbering"]})),
                drop(),
            ],
            vec![matches(payload("udp", "sport"), "==", json!({"set": [547, 67]})), drop()],
            vec![
                matches(meta("l4proto"), "==", json!("ipv6-icmp")),
                json!({"set": {"op": "update", "elem": iifname(), "set": "@icmp6_rate", "stmt": [{"limit": {"rate": ICMPV6_RATE_PER_SECOND, "burst": ICMPV6_BURST, "per": "second", "inv": true}}]}}),
                drop(),
            ],
            vec![matches(payload("ip6", "saddr"), "==", json!({"set": ["::", prefix("fe80::", 10)]})), accept()],
            vec![matches(concat(vec![iifname(), payload("ip6", "saddr")]), "==", json!("@port_ipv6")), accept()],
            vec![matches(concat(vec![iifname(), payload("ip", "saddr")]), "==", json!("@port_ipv4")), accept()],
            vec![
                matches(concat(vec![iifname(), payload("arp", "saddr ether"), payload("arp", "saddr ip")]), "==", json!("@port_arp")),
                accept(),
            ],
            vec![drop()],
        ];
        for expr in from_vm {
            batch.push(self.rule("prerouting", expr));
        }
        batch.push(self.rule(
            "forward",
            vec![
                matches(meta("iifname"), "==", json!("@vm_ports")),
                matches(meta("oifname"), "==", json!("@vm_ports")),
                matches(meta("iifname"), "!=", json!("@open_ports")),
                drop(),
            ],
        ));
        batch.push(self.rule("output", vec![json!({"vmap": {"key": meta("oifname"), "data": "@to_vm"}})]));
        self.apply(batch)
    }

    /// The chain every frame the host sends to one of the tenant's ports goes through.
    fn tenant_chain_rules(&self, tenant: &TenantRules) -> Vec<Value> {
        let chain = tenant_chain(tenant.slot);
        let saddr6 = || payload("ip6", "saddr");
        let host = prefix(self.host_prefix6.trunc().addr(), self.host_prefix6.prefix_len());
        let own = prefix(tenant.prefix6.addr(), 64);
        let mut rules = vec![
            self.chain(&chain),
            self.flush_chain(&chain),
            // Another tenant's VM, routed through the host.
            self.rule(&chain, vec![matches(saddr6(), "==", host), matches(saddr6(), "!=", own.clone()), drop()]),
        ];
        if !tenant.open {
            // One of the tenant's own VMs, hairpinned through the gateway.
            rules.push(
                self.rule(&chain, vec![matches(saddr6(), "==", own), matches(saddr6(), "!=", json!(tenant.gateway6.to_string())), drop()]),
            );
        }
        if let (Some(pool), Some((subnet, gateway4))) = (self.ipv4_pool, tenant.ipv4) {
            let saddr4 = || payload("ip", "saddr");
            let own4 = prefix(subnet.addr(), subnet.prefix_len());
            rules.push(self.rule(
                &chain,
                vec![
                    matches(saddr4(), "==", prefix(pool.trunc().addr(), pool.prefix_len())),
                    matches(saddr4(), "!=", own4.clone()),
                    drop(),
                ],
            ));
            if !tenant.open {
                rules.push(
                    self.rule(&chain, vec![matches(saddr4(), "==", own4), matches(saddr4(), "!=", json!(gateway4.to_string())), drop()]),
                );
            }
        }
        rules
    }

    /// The elements that describe one VM port, set by set.
    fn port_elements(&self, port: &PortRules, open: bool) -> Vec<(&'static str, Value)> {
        let name = json!(port.port);
        let mut elements = vec![
            ("vm_ports", name.clone()),
            ("port_macs", json!({"concat": [name, port.mac]})),
            ("port_ipv6", json!({"concat": [name, port.ipv6.to_string()]})),
            ("to_vm", json!([name, {"jump": {"target": tenant_chain(port.tenant_slot)}}])),
        ];
        if let Some(ipv4) = port.ipv4 {
            elements.push(("port_ipv4", json!({"concat": [name, ipv4.to_string()]})));
            elements.push(("port_arp", json!({"concat": [name, port.mac, ipv4.to_string()]})));
        }
        if open {
            elements.push(("open_ports", name));
        }
        elements
    }

    /// Adds a VM port's elements; writes its tenant's chain too with the
    /// tenant's first port (rewriting a chain waits for an RCU grace period,
    /// so it is not done for every VM), or when the chain is missing.
    pub fn add_port(&self, port: &PortRules, tenant: &TenantRules, first_of_tenant: bool) -> Result<(), FirewallError> {
        let elements: Vec<Value> =
            self.port_elements(port, tenant.open).into_iter().map(|(set, element)| self.element("add", set, vec![element])).collect();
        if !first_of_tenant {
            match self.apply(elements.clone()) {
                Err(FirewallError::Refused { stderr, .. }) if stderr.contains("No such file or directory") => {}
                other => return other,
            }
        }
        let mut batch = self.tenant_chain_rules(tenant);
        batch.extend(elements);
        self.apply(batch)
    }

    /// Removes a VM port's elements; its tenant's chain too when `last_of_tenant`.
    /// When the transaction is refused (a piece already gone), each piece is
    /// removed on its own, so one missing piece does not keep the others;
    /// every other failure is reported.
    pub fn remove_port(&self, port: &PortRules, open: bool, last_of_tenant: bool) -> Vec<String> {
        let mut steps: Vec<Value> =
            self.port_elements(port, open).into_iter().map(|(set, element)| self.element("delete", set, vec![element])).collect();
        if last_of_tenant {
            steps.push(json!({"delete": self.object("chain", json!({"name": tenant_chain(port.tenant_slot)}))}));
        }
        if self.apply(steps.clone()).is_ok() {
            return Vec::new();
        }
        steps
            .into_iter()
            .filter_map(|step| match self.apply(vec![step]) {
                Ok(()) => None,
                Err(FirewallError::Refused { stderr, .. }) if stderr.contains("No such file or directory") => None,
                Err(error) => Some(error.to_string()),
            })
            .collect()
    }

    /// Lets a tenant's VMs reach one another, or keeps them apart.
    pub fn set_tenant_open(&self, tenant: &TenantRules, ports: &[String]) -> Result<(), FirewallError> {
        let mut batch = self.tenant_chain_rules(tenant);
        if !ports.is_empty() {
            let elements: Vec<Value> = ports.iter().map(|port| json!(port)).collect();
            // Adding first makes the delete safe for ports that were not in the set.
            batch.push(self.element("add", "open_ports", elements.clone()));
            if !tenant.open {
                batch.push(self.element("delete", "open_ports", elements));
            }
        }
        self.apply(batch)
    }

    /// The chains of the table now (for checks and operators).
    pub fn chains(&self) -> Result<Vec<String>, FirewallError> {
        self.names_of(&["chain"])
    }

    /// The sets and maps of the table, none when it does not exist yet.
    fn set_names(&self) -> Vec<String> {
        self.names_of(&["set", "map"]).unwrap_or_default()
    }

    fn names_of(&self, kinds: &[&str]) -> Result<Vec<String>, FirewallError> {
        let listing = self.run(&["-j", "list", "table", FAMILY, &self.table], None)?;
        let parsed: Value = serde_json::from_str(&listing).unwrap_or(Value::Null);
        let objects = parsed.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(objects
            .iter()
            .filter_map(|object| kinds.iter().find_map(|kind| object.get(*kind)?.get("name")?.as_str().map(str::to_owned)))
            .collect())
    }

    /// Removes the whole table (tests; an operator retiring metald).
    pub fn delete_table(&self) -> Result<(), FirewallError> {
        self.apply(vec![json!({"delete": {"table": {"family": FAMILY, "name": self.table}}})])
    }

    fn apply(&self, commands: Vec<Value>) -> Result<(), FirewallError> {
        let document = json!({"nftables": commands}).to_string();
        self.run(&["-j", "-f", "-"], Some(&document)).map(|_| ())
    }

    /// Runs nft in the host's namespace; returns its output.
    fn run(&self, args: &[&str], input: Option<&str>) -> Result<String, FirewallError> {
        let mut command = Command::new(&self.program);
        command
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_error = |source| FirewallError::Spawn { program: self.program.clone(), source };
        // A child starts in its parent thread's namespace; spawning from a
        // thread that joined the host's keeps the fast posix_spawn path.
        let mut child = match &self.namespace {
            Some(namespace) => run_in(namespace, || command.spawn())
                .map_err(|error| spawn_error(std::io::Error::other(error)))?
                .map_err(|errno| spawn_error(errno.into()))?
                .map_err(spawn_error)?,
            None => command.spawn().map_err(spawn_error)?,
        };
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        if !output.status.success() {
            return Err(FirewallError::Refused {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
