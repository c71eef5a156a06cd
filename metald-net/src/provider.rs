//! The network provider: for each VM, a namespace of its own holding, per
//! interface, a TAP device (owned by the VMM's user) bridged to the inner
//! end of a veth pair; the outer end joins its tenant's bridge on the host,
//! where the tenant's gateway lives. It implements the core's port.
//!
//! ```text
//!  guest ── tap0 ─┐ br0 ┌─ eth0 ═══ veth ═══ mdv<n> ─┐ mdt<slot> (gateway ::1, fe80::1) ── host routing
//!                 └─────┘                            │
//!          VM's network namespace                    └── other VMs of the tenant
//! ```
//!
//! Attach undoes itself on failure; detach keeps going when a step fails
//! and reports every failure.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use async_trait::async_trait;
use ipnet::{Ipv4Net, Ipv6Net};
use metald_core::config::{NetworkInterface, NetworkMode, parse_mac};
use metald_core::network::{Assignment, AttachRequest, AttachedInterface, NetworkAttachment, NetworkError, NetworkProvider};
use metald_core::{TenantId, VmId};
use tokio::sync::Mutex;

use crate::addresses::{AddressBook, AddressError, AddressPlan, Allocation, GENERATED_MAC_PREFIX, default_host_prefix};
use crate::firewall::{Firewall, FirewallError, PortRules, TenantRules};
use crate::netlink::{Netlink, NetlinkError};
use crate::netns::{DEFAULT_NETNS_DIR, NetnsDir, NetnsError, write_sysctl};
use crate::netns_pool::NamespacePool;
use crate::netns_release::RetiredNamespaces;
use crate::tap::{self, TapError};

/// Every tenant's gateway also answers here, as routers on a link usually do.
pub const GATEWAY_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// How the host's VM network is laid out.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The prefix cut into one /64 per tenant (a /48 to a /63). Default: a
    /// ULA /48 derived from `/etc/machine-id`.
    pub host_prefix: Option<Ipv6Net>,
    /// Dual stack: a pool cut into one subnet of `ipv4_tenant_prefix_len` per tenant.
    pub ipv4_pool: Option<Ipv4Net>,
    pub ipv4_tenant_prefix_len: u8,
    /// Where the address book (SQLite) is kept.
    pub state_dir: PathBuf,
    /// The namespace that plays "host" (bridges, routes, firewall); ours when `None`.
    pub host_netns: Option<PathBuf>,
    /// Where named namespaces live.
    pub netns_dir: PathBuf,
    /// VM namespaces are named `<netns_prefix><vm id>`.
    pub netns_prefix: String,
    /// Host links are `<link_prefix>v<n>`, tenant bridges `<link_prefix>t<slot>`.
    pub link_prefix: String,
    pub mtu: u32,
    /// Resolvers the guests are told about.
    pub dns_servers: Vec<IpAddr>,
    /// The `nft` program.
    pub nft: PathBuf,
    /// Network namespaces made ahead of the VMs that get them; `0` makes
    /// each with its VM's attach.
    pub namespace_pool: usize,
    /// Deleted VMs' namespaces are let go this many at a time, so the
    /// kernel tears them down in one pass; `1` lets each go with its VM.
    pub namespace_release_batch: usize,
    /// The nftables table metald owns (family bridge).
    pub table: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            host_prefix: None,
            ipv4_pool: None,
            ipv4_tenant_prefix_len: 24,
            state_dir: PathBuf::from("/var/lib/metald/network"),
            host_netns: None,
            netns_dir: PathBuf::from(DEFAULT_NETNS_DIR),
            netns_prefix: "metald-".into(),
            link_prefix: "md".into(),
            mtu: 1500,
            dns_servers: Vec::new(),
            nft: PathBuf::from("nft"),
            namespace_pool: 2,
            namespace_release_batch: 8,
            table: "metald".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot read the machine id for the default host prefix")]
    MachineId(#[source] std::io::Error),
    #[error("cannot prepare the state folder {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Addresses(#[from] AddressError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Namespace(#[from] NetnsError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error("the task making a VM's links and firewall elements did not finish")]
    Settling(#[source] tokio::task::JoinError),
}

/// IPv6-first networking for VMs; see the module docs for the layout.
#[derive(Debug)]
pub struct Ipv6Network {
    config: NetworkConfig,
    book: Arc<AddressBook>,
    host_namespace: Option<Arc<OwnedFd>>,
    host: Netlink,
    namespaces: NetnsDir,
    namespace_pool: Arc<NamespacePool>,
    retired_namespaces: RetiredNamespaces,
    firewall: Firewall,
    /// What an attach left in the making, by VM (the links beyond the TAP
    /// devices, the firewall elements): awaited by `settle`, and by
    /// `detach` before it removes anything.
    settling: std::sync::Mutex<HashMap<VmId, tokio::task::JoinHandle<Result<(), ProviderError>>>>,
    /// Tenant bridges are made and removed one at a time.
    tenants: Mutex<()>,
    /// The firewall table was removed with the last VM ([`NetworkProvider::release_host`]).
    released: std::sync::atomic::AtomicBool,
}

/// The names of one interface's pieces.
struct Links {
    host: String,
    inner: String,
    bridge: String,
    tap: String,
}

impl Ipv6Network {
    /// Opens the address book, prepares the host side (forwarding, the
    /// firewall table) and returns the provider.
    pub async fn new(config: NetworkConfig) -> Result<Self, ProviderError> {
        let host_prefix = match config.host_prefix {
            Some(prefix) => prefix,
            None => default_host_prefix(&std::fs::read_to_string("/etc/machine-id").map_err(ProviderError::MachineId)?),
        };
        metald_core::private_files::private_dir(&config.state_dir)
            .map_err(|source| ProviderError::StateDir { path: config.state_dir.clone(), source })?;
        let ipv4 = config.ipv4_pool.map(|pool| (pool, config.ipv4_tenant_prefix_len));
        let book = AddressBook::open(config.state_dir.join("addresses.db"), AddressPlan { host_prefix, ipv4 })?;
        let host_namespace = match &config.host_netns {
            Some(path) => Some(Arc::new(OwnedFd::from(std::fs::File::open(path).map_err(|source| NetnsError::Io {
                action: "open",
                path: path.clone(),
                source,
            })?))),
            None => None,
        };
        let host = Netlink::connect(host_namespace.as_ref().map(|fd| fd.as_fd()))?;
        let firewall = Firewall::new(&config.nft, &config.table, host_namespace.clone(), host_prefix, config.ipv4_pool);
        let provider = Self {
            namespaces: NetnsDir::new(&config.netns_dir),
            namespace_pool: NamespacePool::new(config.namespace_pool),
            retired_namespaces: RetiredNamespaces::new(config.namespace_release_batch),
            config,
            book: Arc::new(book),
            host_namespace,
            host,
            firewall,
            settling: std::sync::Mutex::new(HashMap::new()),
            tenants: Mutex::new(()),
            released: std::sync::atomic::AtomicBool::new(false),
        };
        provider.host_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        if provider.config.ipv4_pool.is_some() {
            provider.host_sysctl("net.ipv4.ip_forward", "1")?;
        }
        provider.firewall_change(|firewall| firewall.ensure()).await?;
        provider.namespace_pool.refill();
        Ok(provider)
    }

    pub fn addresses(&self) -> &AddressBook {
        &self.book
    }

    pub fn firewall(&self) -> &Firewall {
        &self.firewall
    }

    pub fn namespace_pool(&self) -> &NamespacePool {
        &self.namespace_pool
    }

    pub fn retired_namespaces(&self) -> &RetiredNamespaces {
        &self.retired_namespaces
    }

    /// The name of a VM's namespace.
    pub fn namespace_name(&self, vm_id: &VmId) -> String {
        format!("{}{}", self.config.netns_prefix, vm_id)
    }

    /// A VM's namespace, open (tests use it to play the guest on a TAP).
    pub fn open_namespace(&self, vm_id: &VmId) -> Result<OwnedFd, ProviderError> {
        Ok(self.namespaces.open(&self.namespace_name(vm_id))?)
    }

    pub fn tenant_bridge(&self, slot: u64) -> String {
        format!("{}t{slot:x}", self.config.link_prefix)
    }

    /// The host end of an interface's link, named by its host-wide number.
    fn host_link(&self, allocation: &Allocation) -> String {
        format!("{}v{:x}", self.config.link_prefix, allocation.link_number)
    }

    fn links(&self, allocation: &Allocation, position: usize) -> Links {
        Links {
            host: self.host_link(allocation),
            inner: format!("eth{position}"),
            bridge: format!("br{position}"),
            tap: format!("tap{position}"),
        }
    }

    /// Runs `write` against the address book on a blocking thread: a
    /// SQLite write waits for the disk, and a delete runs under the VM's lock.
    async fn in_book<T: Send + 'static>(
        &self,
        write: impl FnOnce(&AddressBook) -> Result<T, AddressError> + Send + 'static,
    ) -> Result<T, AddressError> {
        let book = Arc::clone(&self.book);
        tokio::task::spawn_blocking(move || write(&book)).await.map_err(AddressError::Interrupted)?
    }

    /// Runs `change` on a blocking thread: each change is an `nft`
    /// process of its own, which no async worker should wait for.
    async fn firewall_change<T: Send + 'static>(
        &self,
        change: impl FnOnce(&Firewall) -> Result<T, FirewallError> + Send + 'static,
    ) -> Result<T, FirewallError> {
        let firewall = self.firewall.clone();
        tokio::task::spawn_blocking(move || change(&firewall)).await.map_err(FirewallError::Interrupted)?
    }

    fn host_sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        host_sysctl(self.host_namespace.as_deref(), key, value)
    }

    fn port_rules(&self, allocation: &Allocation) -> PortRules {
        PortRules {
            port: self.host_link(allocation),
            mac: allocation.mac_string(),
            ipv6: allocation.ipv6,
            ipv4: allocation.ipv4.map(|(address, _, _)| address),
            tenant_slot: allocation.tenant_slot,
        }
    }

    fn tenant_rules(&self, allocation: &Allocation, open: bool) -> TenantRules {
        TenantRules {
            slot: allocation.tenant_slot,
            prefix6: allocation.tenant_prefix,
            gateway6: allocation.gateway6,
            ipv4: allocation.ipv4.map(|(_, subnet, gateway)| (subnet, gateway)),
            open,
        }
    }

    /// Lets a tenant's VMs reach one another (`true`) or keeps them apart (the default).
    pub async fn set_intra_tenant(&self, tenant: &TenantId, allowed: bool) -> Result<(), ProviderError> {
        let _tenants = self.tenants.lock().await;
        let owner = tenant.clone();
        self.in_book(move |book| book.set_intra_tenant(&owner, allowed)).await?;
        let allocations = self.book.allocations_of_tenant(tenant)?;
        if let Some(first) = allocations.first() {
            let ports: Vec<String> = allocations.iter().map(|allocation| self.host_link(allocation)).collect();
            let rules = self.tenant_rules(first, allowed);
            self.firewall_change(move |firewall| firewall.set_tenant_open(&rules, &ports)).await?;
        }
        Ok(())
    }

    /// The tenant's bridge with its gateway addresses, made with its first
    /// VM; says whether it was made now.
    async fn ensure_tenant_bridge(&self, allocation: &Allocation) -> Result<(String, bool), ProviderError> {
        let bridge = self.tenant_bridge(allocation.tenant_slot);
        if self.host.index(&bridge).await?.is_some() {
            return Ok((bridge, false));
        }
        self.host.add_bridge(&bridge, self.config.mtu).await?;
        self.host_sysctl(&format!("net.ipv6.conf.{bridge}.accept_ra"), "0")?;
        self.host.add_address6(&bridge, allocation.gateway6, 64).await?;
        self.host.add_address6(&bridge, GATEWAY_LINK_LOCAL, 64).await?;
        if let Some((_, subnet, gateway)) = allocation.ipv4 {
            self.host.add_address4(&bridge, gateway, subnet.prefix_len()).await?;
        }
        self.host.up(&bridge, self.config.mtu).await?;
        Ok((bridge, true))
    }

    /// Starts what the VM's guest needs only once it runs, beside the
    /// VMM's start: the links around each TAP device (see [`PortLinks`])
    /// and, on a blocking thread, the firewall elements (and a new tenant's
    /// chain) in interface order, which match ports by name and so need no
    /// link. [`NetworkProvider::settle`] waits for both.
    fn start_settling(&self, vm_id: &VmId, links: PortLinks, ports: Vec<(PortRules, TenantRules, bool)>) {
        let firewall = self.firewall.clone();
        let load = tokio::task::spawn_blocking(move || {
            ports.iter().try_for_each(|(port, tenant, first_of_tenant)| firewall.add_port(port, tenant, *first_of_tenant))
        });
        let settling = tokio::spawn(async move {
            let (linked, loaded) = tokio::join!(links.make(), load);
            linked?;
            Ok(loaded.map_err(FirewallError::Interrupted)??)
        });
        self.settling.lock().unwrap_or_else(PoisonError::into_inner).insert(vm_id.clone(), settling);
    }

    /// Waits for what the VM's attach left in the making, if anything.
    async fn settled(&self, vm_id: &VmId) -> Result<(), ProviderError> {
        let settling = self.settling.lock().unwrap_or_else(PoisonError::into_inner).remove(vm_id);
        match settling {
            Some(settling) => settling.await.map_err(ProviderError::Settling)?,
            None => Ok(()),
        }
    }

    /// Each interface's addresses and link number, from the address book.
    async fn allocate(&self, request: &AttachRequest<'_>) -> Result<Vec<Allocation>, NetworkError> {
        let mut allocations = Vec::with_capacity(request.interfaces.len());
        for (index, interface) in request.interfaces.iter().enumerate() {
            let mac = if interface.mac_address.is_empty() { None } else { parse_mac(&interface.mac_address) };
            let (vm_id, interface_id, tenant) = (request.vm_id.clone(), interface.id.clone(), request.tenant.clone());
            let allocated = self.in_book(move |book| book.allocate(&vm_id, &interface_id, &tenant, mac)).await;
            let allocation = allocated.map_err(|error| match error {
                // The tenant's own MAC, on another of its interfaces: its request to change.
                AddressError::MacInUse { .. } => {
                    NetworkError::Refused { field: format!("network[{index}].mac_address"), reason: error.to_string() }
                }
                error => NetworkError::Attach { vm_id: request.vm_id.clone(), source: Box::new(ProviderError::from(error)) },
            })?;
            allocations.push(allocation);
        }
        Ok(allocations)
    }

    /// The VM's namespace: a pooled one (made on a blocking thread when
    /// none is ready), given the VM's name.
    async fn make_namespace(&self, name: &str) -> Result<OwnedFd, NetnsError> {
        let namespace = self.namespace_pool.take().await?;
        self.namespaces.name(name, &namespace)?;
        Ok(namespace)
    }

    async fn attach_all(&self, request: &AttachRequest<'_>) -> Result<NetworkAttachment, NetworkError> {
        let failed = |source: ProviderError| NetworkError::Attach { vm_id: request.vm_id.clone(), source: Box::new(source) };
        if self.released.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.firewall_change(|firewall| firewall.ensure()).await.map_err(|error| failed(error.into()))?;
        }
        for (index, interface) in request.interfaces.iter().enumerate() {
            check_interface(index, interface, self.config.ipv4_pool.is_some())?;
        }
        // The namespace does not depend on the addresses: it is made while
        // the address book writes them. Both are awaited before a failure
        // is undone.
        let name = self.namespace_name(request.vm_id);
        let (allocations, namespace) = tokio::join!(self.allocate(request), self.make_namespace(&name));
        let allocations = allocations?;
        let namespace = namespace.map_err(|error| failed(error.into()))?;
        let open = self.book.intra_tenant(request.tenant).map_err(|error| failed(error.into()))?;
        let namespace = Arc::new(namespace);
        // Each tenant's bridge first, then the TAP devices the VMM opens; the
        // other links and the firewall elements are made while it starts.
        let mut bridges = Vec::with_capacity(allocations.len());
        let mut ports = Vec::with_capacity(allocations.len());
        for allocation in &allocations {
            let (bridge, new_tenant) = {
                let _tenants = self.tenants.lock().await;
                self.ensure_tenant_bridge(allocation).await.map_err(failed)?
            };
            bridges.push(bridge);
            ports.push((self.port_rules(allocation), self.tenant_rules(allocation, open), new_tenant));
        }
        let mut interfaces = Vec::with_capacity(allocations.len());
        let mut port_links = PortLinks {
            host: self.host.clone(),
            host_namespace: self.host_namespace.clone(),
            namespace: Arc::clone(&namespace),
            mtu: self.config.mtu,
            ports: Vec::with_capacity(allocations.len()),
        };
        for (position, (allocation, bridge)) in allocations.iter().zip(bridges).enumerate() {
            let links = self.links(allocation, position);
            // The VMM opens its TAP devices, so they exist before the attach returns.
            tap::create(&*namespace, &links.tap, request.owner).map_err(|error| failed(error.into()))?;
            let tap_device = links.tap.clone();
            let host_link = links.host.clone();
            port_links.ports.push((links, bridge));
            interfaces.push(AttachedInterface {
                id: allocation.interface.clone(),
                tap_device,
                mac_address: allocation.mac_string(),
                ipv6: Some(Assignment { address: allocation.ipv6, prefix_len: 64, gateway: allocation.gateway6 }),
                ipv4: allocation.ipv4.map(|(address, subnet, gateway)| Assignment { address, prefix_len: subnet.prefix_len(), gateway }),
                dns_servers: self.config.dns_servers.clone(),
                host_link,
            });
        }
        self.start_settling(request.vm_id, port_links, ports);
        let kernel_args = guest_kernel_args(&interfaces, &self.config.dns_servers, self.config.mtu);
        Ok(NetworkAttachment { netns: Some(namespace), netns_name: Some(name), interfaces, kernel_args })
    }
}

/// The links an attach makes around each TAP device once the TAP exists:
/// the veth pair, the namespace's bridge holding the TAP and the veth's
/// inner end, and the outer end as a port of the tenant's bridge. Nothing
/// but the guest's traffic needs them, so they are made while the VMM starts.
struct PortLinks {
    host: Netlink,
    host_namespace: Option<Arc<OwnedFd>>,
    namespace: Arc<OwnedFd>,
    mtu: u32,
    /// Each interface's link names, and its tenant's bridge.
    ports: Vec<(Links, String)>,
}

impl PortLinks {
    async fn make(self) -> Result<(), ProviderError> {
        fail::fail_point!("network-port-links", |_| Err(ProviderError::Netlink(NetlinkError::NoSuchLink("injected failure".into()))));
        let inside = Netlink::connect(Some(self.namespace.as_fd()))?;
        for (links, bridge) in &self.ports {
            // A leftover of a crashed attempt would make the creation fail.
            self.host.delete(&links.host).await?;
            self.host.add_veth(&links.host, &links.inner, &self.namespace).await?;
            inside.add_bridge(&links.bridge, self.mtu).await?;
            for link in [&links.inner, &links.tap] {
                inside.set_master(link, &links.bridge).await?;
            }
            for link in [&links.bridge, &links.inner, &links.tap] {
                inside.up(link, self.mtu).await?;
            }
            // A bridge port needs no address of its own.
            host_sysctl(self.host_namespace.as_deref(), &format!("net.ipv6.conf.{}.disable_ipv6", links.host), "1")?;
            self.host.set_master(&links.host, bridge).await?;
            self.host.up(&links.host, self.mtu).await?;
        }
        Ok(())
    }
}

/// Writes a sysctl of the host side: in its namespace when it has one, ours otherwise.
fn host_sysctl(host_namespace: Option<&OwnedFd>, key: &str, value: &str) -> Result<(), NetnsError> {
    match host_namespace {
        Some(namespace) => write_sysctl(namespace.as_fd(), key, value),
        None => {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).map_err(|source| NetnsError::Io { action: "write sysctl in", path, source })
        }
    }
}

/// What the provider refuses in an interface request: addresses are its to
/// give, and MACs of the range it generates from.
fn check_interface(index: usize, interface: &NetworkInterface, dual_stack: bool) -> Result<(), NetworkError> {
    let refuse =
        |field: &str, reason: &str| Err(NetworkError::Refused { field: format!("network[{index}].{field}"), reason: reason.to_owned() });
    if parse_mac(&interface.mac_address).is_some_and(|mac| mac[..2] == GENERATED_MAC_PREFIX) {
        return refuse("mac_address", "starts 02:6d, the range the host assigns MACs from; choose another or leave it empty");
    }
    if interface.ipv6_config.as_ref().is_some_and(|config| !config.address.is_empty()) {
        return refuse("ipv6_config.address", "must be empty: the network provider assigns addresses");
    }
    if interface.ipv4_config.as_ref().is_some_and(|config| !config.address.is_empty()) {
        return refuse("ipv4_config.address", "must be empty: the network provider assigns addresses");
    }
    if interface.mode == NetworkMode::Ipv4Only {
        return refuse("mode", "IPv4-only interfaces are not offered: every interface has IPv6");
    }
    if interface.mode == NetworkMode::DualStack && !dual_stack {
        return refuse("mode", "dual stack needs an IPv4 pool in the network configuration");
    }
    Ok(())
}

/// The kernel command-line tokens that tell the guest its network (see
/// docs/architecture/networking/ipv6.md for each key).
pub fn guest_kernel_args(interfaces: &[AttachedInterface], dns: &[IpAddr], mtu: u32) -> Vec<String> {
    let mut args = Vec::new();
    for interface in interfaces {
        let id = &interface.id;
        args.push(format!("metald.{id}.mac={}", interface.mac_address));
        if let Some(ipv6) = interface.ipv6 {
            args.push(format!("metald.{id}.ipv6={}/{}", ipv6.address, ipv6.prefix_len));
            args.push(format!("metald.{id}.gateway6={}", ipv6.gateway));
        }
        if let Some(ipv4) = interface.ipv4 {
            args.push(format!("metald.{id}.ipv4={}/{}", ipv4.address, ipv4.prefix_len));
            args.push(format!("metald.{id}.gateway4={}", ipv4.gateway));
        }
    }
    if !interfaces.is_empty() {
        args.push(format!("metald.mtu={mtu}"));
        if !dns.is_empty() {
            args.push(format!("metald.dns={}", dns.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(",")));
        }
    }
    args
}

#[async_trait]
impl NetworkProvider for Ipv6Network {
    async fn release_host(&self) -> Vec<String> {
        match self.book.vm_ids() {
            Ok(held) if held.is_empty() => {}
            Ok(held) => return vec![format!("the firewall table stays: the address book still holds {} VMs", held.len())],
            Err(error) => return vec![metald_core::error_chain(&error)],
        }
        self.released.store(true, std::sync::atomic::Ordering::SeqCst);
        match self.firewall_change(|firewall| firewall.delete_table()).await {
            Ok(()) => Vec::new(),
            Err(error) => vec![format!("firewall table {}: {}", self.firewall.table(), metald_core::error_chain(&error))],
        }
    }

    async fn forget_all_but(&self, keep: &std::collections::HashSet<VmId>) -> Vec<String> {
        let held = match self.book.vm_ids() {
            Ok(held) => held,
            Err(error) => return vec![metald_core::error_chain(&error)],
        };
        let mut problems = Vec::new();
        for vm_id in held.into_iter().filter(|vm_id| !keep.contains(vm_id)) {
            tracing::warn!(%vm_id, "removing the network of a VM a crash left half made");
            if let Err(error) = self.detach(&vm_id).await {
                problems.push(metald_core::error_chain(&error));
            }
        }
        problems
    }

    fn kernel_args_bound(&self, interfaces: &[NetworkInterface]) -> usize {
        // The longest text each assignment can have: the same tokens, made
        // for the widest address, MAC and prefix length.
        let widest: Vec<AttachedInterface> = interfaces
            .iter()
            .map(|interface| AttachedInterface {
                id: interface.id.clone(),
                tap_device: String::new(),
                mac_address: "ff:ff:ff:ff:ff:ff".into(),
                ipv6: Some(Assignment { address: Ipv6Addr::from(u128::MAX), prefix_len: 128, gateway: Ipv6Addr::from(u128::MAX) }),
                ipv4: (interface.mode == NetworkMode::DualStack).then_some(Assignment {
                    address: Ipv4Addr::BROADCAST,
                    prefix_len: 32,
                    gateway: Ipv4Addr::BROADCAST,
                }),
                dns_servers: Vec::new(),
                host_link: String::new(),
            })
            .collect();
        guest_kernel_args(&widest, &self.config.dns_servers, self.config.mtu).iter().map(|token| token.len() + 1).sum()
    }

    async fn settle(&self, vm_id: &VmId) -> Result<(), NetworkError> {
        self.settled(vm_id).await.map_err(|error| NetworkError::Attach { vm_id: vm_id.clone(), source: Box::new(error) })
    }

    async fn attach(&self, request: AttachRequest<'_>) -> Result<NetworkAttachment, NetworkError> {
        match self.attach_all(&request).await {
            Ok(attachment) => Ok(attachment),
            Err(error) => {
                if let Err(undo) = self.detach(request.vm_id).await {
                    tracing::error!(vm_id = %request.vm_id, error = %metald_core::error_chain(&undo), "cannot undo a failed network attach");
                }
                Err(error)
            }
        }
    }

    async fn take_over(&self, vm_id: &VmId, mut attachment: NetworkAttachment) -> Result<NetworkAttachment, NetworkError> {
        let name = attachment.netns_name.clone().unwrap_or_else(|| self.namespace_name(vm_id));
        let namespace =
            self.namespaces.open(&name).map_err(|error| NetworkError::Attach { vm_id: vm_id.clone(), source: Box::new(error) })?;
        attachment.netns = Some(Arc::new(namespace));
        Ok(attachment)
    }

    async fn detach(&self, vm_id: &VmId) -> Result<(), NetworkError> {
        let mut problems = Vec::new();
        // What is still in the making is removed below with the rest, so its own failure does not matter.
        let _ = self.settled(vm_id).await;
        let allocations = match self.book.allocations_of(vm_id) {
            Ok(allocations) => allocations,
            Err(error) => {
                problems.push(metald_core::error_chain(&error));
                Vec::new()
            }
        };
        let _tenants = self.tenants.lock().await;
        for (position, allocation) in allocations.iter().enumerate() {
            let links = self.links(allocation, position);
            let others = self
                .book
                .allocations_of_tenant(&allocation.tenant)
                .map(|all| all.iter().filter(|other| other.vm_id != *vm_id).count())
                .unwrap_or(1);
            // The tenant's chain and bridge go with its last port: this VM's
            // other interfaces still jump to the chain and sit on the bridge.
            let last_of_tenant = others == 0 && position + 1 == allocations.len();
            let open = self.book.intra_tenant(&allocation.tenant).unwrap_or(false);
            let port = self.port_rules(allocation);
            match self.firewall_change(move |firewall| Ok(firewall.remove_port(&port, open, last_of_tenant))).await {
                Ok(left) => problems.extend(left),
                Err(error) => problems.push(metald_core::error_chain(&error)),
            }
            if let Err(error) = self.host.delete(&links.host).await {
                problems.push(metald_core::error_chain(&error));
            }
            if last_of_tenant && let Err(error) = self.host.delete(&self.tenant_bridge(allocation.tenant_slot)).await {
                problems.push(metald_core::error_chain(&error));
            }
        }
        // Deleting the namespace takes its TAP devices and bridges with it,
        // once its batch is released.
        let name = self.namespace_name(vm_id);
        let held = self.namespaces.open(&name).ok();
        match self.namespaces.delete(&name) {
            Ok(()) => held.into_iter().for_each(|namespace| self.retired_namespaces.retire(namespace)),
            Err(error) => problems.push(metald_core::error_chain(&error)),
        }
        let released = vm_id.clone();
        if let Err(error) = self.in_book(move |book| book.release(&released)).await {
            problems.push(metald_core::error_chain(&error));
        }
        if problems.is_empty() { Ok(()) } else { Err(NetworkError::Detach { vm_id: vm_id.clone(), problems }) }
    }
}
