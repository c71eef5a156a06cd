//! What a VM is asked to be: [`VmConfig`] mirrors the `vmprovisioner.v1`
//! contract field for field, and [`VmConfig::validate`] refuses anything no
//! backend should ever see, naming the offending field by its path in that
//! contract (`storage[1].id`, `cpu.vcpu_count`). Paths to images are only
//! checked for shape here; confinement to the image root is `images`' job.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1 << 20;
/// The fewest vCPUs a VM may have. The most is its VMM's (`Capabilities::max_vcpus`).
pub const MIN_VCPUS: u32 = 1;
/// Bounds each factor of a CPU topology, so their product cannot overflow;
/// the product itself must be the VM's vCPUs, which its VMM bounds.
const MAX_TOPOLOGY_FACTOR: u32 = u16::MAX as u32;
/// The least memory a VM may have.
pub const MIN_MEMORY_BYTES: u64 = 16 * MIB;
/// The most memory a VM may have (1 TiB); quotas usually bite long before.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// The longest kernel command line a caller may give; the VMM appends to it.
pub const MAX_KERNEL_ARGS_BYTES: usize = 2048;
/// Kernel command-line tokens the host adds start with this; a VM's own may not.
pub const HOST_TOKEN_PREFIX: &str = "metald.";
/// The most drives or network interfaces one VM may have.
pub const MAX_DEVICES: usize = 16;
/// Device ids are shared with the VMM's API, which takes `[A-Za-z0-9_]`.
pub const MAX_DEVICE_ID_LEN: usize = 64;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
/// Linux interface names hold at most 15 bytes.
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// The whole description of a VM, as a caller asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    pub cpu: CpuConfig,
    pub memory: MemoryConfig,
    pub boot: BootConfig,
    pub storage: Vec<StorageDevice>,
    pub network: Vec<NetworkInterface>,
    pub console: ConsoleConfig,
    pub metadata: BTreeMap<String, String>,
    /// What to do when the VM's VMM dies.
    pub restart: RestartPolicy,
    /// The VMM that runs the VM, as the host names it (`firecracker`);
    /// empty for the host's default. A created VM's configuration always
    /// names the one it runs on.
    pub vmm: String,
}

/// What metald does when a VM's VMM dies (not when its guest shuts down or
/// it is stopped): by default nothing, and the VM stays Failed until it is
/// booted again. See [`crate::restart`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    /// Boot it again, in a fresh VMM on its configuration and disks.
    pub on_failure: bool,
    /// Restarts in a row at most; 0 for [`crate::restart::DEFAULT_MAX_RESTARTS`].
    pub max_restarts: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpuConfig {
    pub vcpu_count: u32,
    /// Upper bound for CPU hotplug; 0 means "the same as `vcpu_count`".
    pub max_vcpu_count: u32,
    pub topology: Option<CpuTopology>,
    /// Known keys: `smt` (`true`/`false`).
    pub features: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpuTopology {
    pub sockets: u32,
    pub cores_per_socket: u32,
    pub threads_per_core: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    pub size_bytes: u64,
    pub hotplug_enabled: bool,
    /// Upper bound for memory hotplug; 0 means "the same as `size_bytes`".
    pub max_size_bytes: u64,
    /// Known keys: `huge_pages` (`none`/`2M`).
    pub backing: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootConfig {
    /// Relative to the image root, or absolute inside it.
    pub kernel_path: String,
    /// Empty for none.
    pub initrd_path: String,
    pub kernel_args: String,
    /// No keys are known yet; any key is refused rather than ignored.
    pub boot_options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageDevice {
    pub id: String,
    /// Relative to the image root, or absolute inside it.
    pub path: String,
    pub read_only: bool,
    pub is_root_device: bool,
    /// Empty or `virtio-blk`.
    pub interface_type: String,
    /// Known keys: `io_engine` (`Sync`/`Async`), `cache_type` (`Unsafe`/`Writeback`).
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkInterface {
    pub id: String,
    /// Empty to have one assigned.
    pub mac_address: String,
    /// An existing TAP device to use; empty to have the network provider make one.
    pub tap_device: String,
    /// Empty or `virtio-net`.
    pub interface_type: String,
    /// No keys are known yet; any key is refused rather than ignored.
    pub options: BTreeMap<String, String>,
    pub ipv4_config: Option<Ipv4Config>,
    pub ipv6_config: Option<Ipv6Config>,
    pub mode: NetworkMode,
    pub rx_rate_limit: Option<RateLimit>,
    pub tx_rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    #[default]
    Unspecified,
    DualStack,
    Ipv4Only,
    Ipv6Only,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ipv4Config {
    pub address: String,
    pub netmask: String,
    pub gateway: String,
    pub dns_servers: Vec<String>,
    pub dhcp: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ipv6Config {
    pub address: String,
    pub prefix_length: u32,
    pub gateway: String,
    pub dns_servers: Vec<String>,
    pub slaac: bool,
    pub privacy_extensions: bool,
    pub link_local: String,
}

/// A token bucket: `bandwidth` bytes per second on average, refilled over
/// `refill_time_ms`, with `burst` extra bytes allowed once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub bandwidth: u64,
    pub refill_time_ms: u64,
    pub burst: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    pub enabled: bool,
    /// Must be empty: the serial console is always captured to the VM's own
    /// capped file and read through metald.
    pub output: String,
    /// Must be empty: console input is not offered.
    pub input: String,
    /// Empty or `serial`.
    pub console_type: String,
}

/// A field of [`VmConfig`] that is not acceptable, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    /// The field's path in the API contract, e.g. `storage[1].id`.
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Required,
    OutOfRange {
        value: u64,
        min: u64,
        max: u64,
    },
    /// Below the least allowed, where the most is not the configuration's
    /// to say (a VM's vCPUs: its VMM's).
    BelowMinimum {
        value: u64,
        min: u64,
    },
    NotMultipleOf {
        value: u64,
        unit: u64,
    },
    TooLong {
        len: usize,
        max: usize,
    },
    TooMany {
        count: usize,
        max: usize,
    },
    Duplicate {
        value: String,
    },
    /// More than one drive claims to be the root device.
    SecondRootDevice {
        first: String,
    },
    NotAllowed {
        value: String,
        allowed: Vec<&'static str>,
    },
    Malformed {
        value: String,
        expected: &'static str,
    },
    UnknownKey {
        key: String,
        known: Vec<&'static str>,
    },
    LessThan {
        value: u64,
        other_field: &'static str,
        other: u64,
    },
    Inconsistent {
        reason: String,
    },
    /// A kernel command-line token in the namespace the host writes.
    ReservedToken {
        token: String,
    },
    /// More than the VM's VMM can give (its vCPUs), naming the VMM.
    BeyondVmm {
        value: u64,
        max: u64,
        vmm: &'static str,
    },
    /// A name of something the host does not offer (a VMM), with what it does.
    NotOffered {
        value: String,
        offered: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Required => write!(f, "is required"),
            Problem::OutOfRange { value, min, max } => write!(f, "{value} is outside {min}..={max}"),
            Problem::BelowMinimum { value, min } => write!(f, "{value} is below the minimum of {min}"),
            Problem::NotMultipleOf { value, unit } => write!(f, "{value} is not a multiple of {unit}"),
            Problem::TooLong { len, max } => write!(f, "is {len} bytes long; at most {max} are allowed"),
            Problem::TooMany { count, max } => write!(f, "has {count} entries; at most {max} are allowed"),
            Problem::Duplicate { value } => write!(f, "{value:?} is used twice"),
            Problem::SecondRootDevice { first } => write!(f, "a second root device; {first:?} is already the root device"),
            Problem::NotAllowed { value, allowed } => write!(f, "{value:?} is not one of {allowed:?}"),
            Problem::Malformed { value, expected } => write!(f, "{value:?} is not {expected}"),
            Problem::UnknownKey { key, known } => write!(f, "unknown key {key:?}; known keys are {known:?}"),
            Problem::LessThan { value, other_field, other } => {
                write!(f, "{value} is less than {other_field} ({other})")
            }
            Problem::Inconsistent { reason } => f.write_str(reason),
            Problem::ReservedToken { token } => {
                write!(f, "{token:?} is in the `{HOST_TOKEN_PREFIX}` namespace, which only the host writes (the VM's addresses, MTU, DNS)")
            }
            Problem::BeyondVmm { value, max, vmm } => write!(f, "{value} is more than the {vmm} backend allows ({max})"),
            Problem::NotOffered { value, offered } => write!(f, "{value:?} is not offered by this host; it offers {offered}"),
        }
    }
}

type Checked = Result<(), ConfigError>;

fn fail(field: impl Into<String>, problem: Problem) -> Checked {
    Err(ConfigError { field: field.into(), problem })
}

fn in_range(field: &str, value: u64, min: u64, max: u64) -> Checked {
    if (min..=max).contains(&value) { Ok(()) } else { fail(field, Problem::OutOfRange { value, min, max }) }
}

fn at_least(field: &str, value: u64, min: u64) -> Checked {
    if value >= min { Ok(()) } else { fail(field, Problem::BelowMinimum { value, min }) }
}

fn one_of(field: &str, value: &str, allowed: &'static [&'static str]) -> Checked {
    if allowed.contains(&value) { Ok(()) } else { fail(field, Problem::NotAllowed { value: value.to_owned(), allowed: allowed.to_vec() }) }
}

fn max_len(field: &str, value: &str, max: usize) -> Checked {
    if value.len() > max {
        return fail(field, Problem::TooLong { len: value.len(), max });
    }
    Ok(())
}

fn max_count(field: &str, count: usize, max: usize) -> Checked {
    if count > max {
        return fail(field, Problem::TooMany { count, max });
    }
    Ok(())
}

/// Checks a map against the values each known key takes.
fn known_options(field: &str, options: &BTreeMap<String, String>, known: &[(&'static str, &'static [&'static str])]) -> Checked {
    for (key, value) in options {
        match known.iter().find(|(name, _)| name == key) {
            Some((_, [])) => {}
            Some((_, allowed)) => one_of(&format!("{field}[{key:?}]"), value, allowed)?,
            None => {
                let known = known.iter().map(|(name, _)| *name).collect();
                return fail(field, Problem::UnknownKey { key: key.clone(), known });
            }
        }
    }
    Ok(())
}

const CPU_FEATURES: &[(&str, &[&str])] = &[("smt", &["true", "false"])];
const MEMORY_BACKING: &[(&str, &[&str])] = &[("huge_pages", &["none", "2M"])];
/// The storage options there are; which values each takes is the VMM's (see
/// `Capabilities::io_engines` and `cache_modes`), checked at create.
const STORAGE_OPTIONS: &[(&str, &[&str])] = &[("io_engine", ANY_VALUE), ("cache_type", ANY_VALUE)];
/// A known key whose values are judged elsewhere.
const ANY_VALUE: &[&str] = &[];

/// A device id the VMM APIs accept: `[A-Za-z0-9_]`, 1 to 64 characters.
fn device_id(field: &str, id: &str) -> Checked {
    if id.is_empty() {
        return fail(field, Problem::Required);
    }
    max_len(field, id, MAX_DEVICE_ID_LEN)?;
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return fail(field, Problem::Malformed { value: id.to_owned(), expected: "made of ASCII letters, digits and '_'" });
    }
    Ok(())
}

fn image_path(field: &str, path: &str) -> Checked {
    if path.is_empty() {
        return fail(field, Problem::Required);
    }
    max_len(field, path, 4096)?;
    if path.contains('\0') {
        return fail(field, Problem::Malformed { value: path.replace('\0', "\\0"), expected: "a path without NUL bytes" });
    }
    Ok(())
}

/// A unicast MAC address written as six colon-separated hex pairs.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl VmConfig {
    /// Checks everything that does not depend on the host; the first
    /// problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cpu.validate()?;
        self.memory.validate()?;
        self.boot.validate()?;
        validate_storage(&self.storage)?;
        validate_network(&self.network)?;
        self.console.validate()?;
        validate_metadata(&self.metadata)?;
        in_range("restart_policy.max_restarts", u64::from(self.restart.max_restarts), 0, u64::from(crate::restart::MAX_RESTARTS_LIMIT))
    }

    /// How many vCPUs the guest boots with.
    pub fn vcpus(&self) -> u32 {
        self.cpu.vcpu_count
    }

    /// Guest memory in whole MiB (valid configurations are whole MiB).
    pub fn memory_mib(&self) -> u64 {
        self.memory.size_bytes / MIB
    }

    /// The root drive, if one is marked.
    pub fn root_device(&self) -> Option<&StorageDevice> {
        self.storage.iter().find(|drive| drive.is_root_device)
    }
}

impl CpuConfig {
    fn validate(&self) -> Checked {
        at_least("cpu.vcpu_count", u64::from(self.vcpu_count), u64::from(MIN_VCPUS))?;
        // 0 means "the same as vcpu_count".
        if self.max_vcpu_count != 0 && self.max_vcpu_count < self.vcpu_count {
            return fail(
                "cpu.max_vcpu_count",
                Problem::LessThan { value: self.max_vcpu_count.into(), other_field: "cpu.vcpu_count", other: self.vcpu_count.into() },
            );
        }
        if let Some(topology) = &self.topology {
            let parts = [
                ("cpu.topology.sockets", topology.sockets),
                ("cpu.topology.cores_per_socket", topology.cores_per_socket),
                ("cpu.topology.threads_per_core", topology.threads_per_core),
            ];
            for (field, value) in parts {
                in_range(field, value.into(), 1, MAX_TOPOLOGY_FACTOR.into())?;
            }
            let total = u64::from(topology.sockets) * u64::from(topology.cores_per_socket) * u64::from(topology.threads_per_core);
            let expected = u64::from(self.max_vcpu_count.max(self.vcpu_count));
            if total != expected {
                return fail(
                    "cpu.topology",
                    Problem::Inconsistent {
                        reason: format!("sockets × cores × threads is {total}, but the VM has {expected} vCPUs at most"),
                    },
                );
            }
        }
        known_options("cpu.features", &self.features, CPU_FEATURES)
    }
}

impl MemoryConfig {
    fn validate(&self) -> Checked {
        in_range("memory.size_bytes", self.size_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES)?;
        if !self.size_bytes.is_multiple_of(MIB) {
            return fail("memory.size_bytes", Problem::NotMultipleOf { value: self.size_bytes, unit: MIB });
        }
        if self.max_size_bytes != 0 {
            in_range("memory.max_size_bytes", self.max_size_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES)?;
            if !self.max_size_bytes.is_multiple_of(MIB) {
                return fail("memory.max_size_bytes", Problem::NotMultipleOf { value: self.max_size_bytes, unit: MIB });
            }
            if self.max_size_bytes < self.size_bytes {
                return fail(
                    "memory.max_size_bytes",
                    Problem::LessThan { value: self.max_size_bytes, other_field: "memory.size_bytes", other: self.size_bytes },
                );
            }
            if self.max_size_bytes > self.size_bytes && !self.hotplug_enabled {
                return fail(
                    "memory.max_size_bytes",
                    Problem::Inconsistent { reason: "is above memory.size_bytes, which needs memory.hotplug_enabled".into() },
                );
            }
        }
        known_options("memory.backing", &self.backing, MEMORY_BACKING)
    }
}

impl BootConfig {
    fn validate(&self) -> Checked {
        image_path("boot.kernel_path", &self.kernel_path)?;
        if !self.initrd_path.is_empty() {
            image_path("boot.initrd_path", &self.initrd_path)?;
        }
        max_len("boot.kernel_args", &self.kernel_args, MAX_KERNEL_ARGS_BYTES)?;
        if self.kernel_args.contains('\0') || self.kernel_args.contains('\n') {
            return fail(
                "boot.kernel_args",
                Problem::Malformed { value: self.kernel_args.escape_debug().to_string(), expected: "one line without NUL bytes" },
            );
        }
        // The guest must never be told two identities, one of them the tenant's.
        if let Some(token) = self.kernel_args.split_ascii_whitespace().find(|token| token.starts_with(HOST_TOKEN_PREFIX)) {
            return fail("boot.kernel_args", Problem::ReservedToken { token: token.to_owned() });
        }
        known_options("boot.boot_options", &self.boot_options, &[])
    }
}

fn validate_storage(drives: &[StorageDevice]) -> Checked {
    max_count("storage", drives.len(), MAX_DEVICES)?;
    let mut ids = HashSet::new();
    let mut root: Option<&str> = None;
    for (index, drive) in drives.iter().enumerate() {
        let field = |name: &str| format!("storage[{index}].{name}");
        device_id(&field("id"), &drive.id)?;
        if !ids.insert(drive.id.as_str()) {
            return fail(field("id"), Problem::Duplicate { value: drive.id.clone() });
        }
        image_path(&field("path"), &drive.path)?;
        one_of(&field("interface_type"), &drive.interface_type, &["", "virtio-blk"])?;
        known_options(&field("options"), &drive.options, STORAGE_OPTIONS)?;
        if drive.is_root_device {
            if let Some(first) = root {
                return fail(field("is_root_device"), Problem::SecondRootDevice { first: first.to_owned() });
            }
            root = Some(&drive.id);
        }
    }
    Ok(())
}

fn validate_network(interfaces: &[NetworkInterface]) -> Checked {
    max_count("network", interfaces.len(), MAX_DEVICES)?;
    let mut ids = HashSet::new();
    let mut macs = HashSet::new();
    for (index, interface) in interfaces.iter().enumerate() {
        let field = |name: &str| format!("network[{index}].{name}");
        device_id(&field("id"), &interface.id)?;
        if !ids.insert(interface.id.as_str()) {
            return fail(field("id"), Problem::Duplicate { value: interface.id.clone() });
        }
        if !interface.mac_address.is_empty() {
            let mac = parse_mac(&interface.mac_address).ok_or_else(|| ConfigError {
                field: field("mac_address"),
                problem: Problem::Malformed { value: interface.mac_address.clone(), expected: "a MAC address like 02:00:00:00:00:01" },
            })?;
            if mac[0] & 1 == 1 {
                return fail(
                    field("mac_address"),
                    Problem::Malformed { value: interface.mac_address.clone(), expected: "a unicast MAC address" },
                );
            }
            if !macs.insert(mac) {
                return fail(field("mac_address"), Problem::Duplicate { value: interface.mac_address.clone() });
            }
        }
        if !interface.tap_device.is_empty() {
            max_len(&field("tap_device"), &interface.tap_device, MAX_INTERFACE_NAME_LEN)?;
            if !interface.tap_device.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return fail(
                    field("tap_device"),
                    Problem::Malformed {
                        value: interface.tap_device.clone(),
                        expected: "an interface name of ASCII letters, digits, '-', '_' and '.'",
                    },
                );
            }
        }
        one_of(&field("interface_type"), &interface.interface_type, &["", "virtio-net"])?;
        known_options(&field("options"), &interface.options, &[])?;
        if let Some(ipv4) = &interface.ipv4_config {
            validate_ipv4(&field("ipv4_config"), ipv4)?;
        }
        if let Some(ipv6) = &interface.ipv6_config {
            validate_ipv6(&field("ipv6_config"), ipv6)?;
        }
        for (name, limit) in [("rx_rate_limit", &interface.rx_rate_limit), ("tx_rate_limit", &interface.tx_rate_limit)] {
            if let Some(limit) = limit {
                validate_rate_limit(&field(name), limit)?;
            }
        }
    }
    Ok(())
}

fn optional_address<T: std::str::FromStr>(field: String, text: &str, expected: &'static str) -> Checked {
    if text.is_empty() || text.parse::<T>().is_ok() {
        return Ok(());
    }
    fail(field, Problem::Malformed { value: text.to_owned(), expected })
}

fn validate_ipv4(field: &str, config: &Ipv4Config) -> Checked {
    const IPV4: &str = "an IPv4 address";
    optional_address::<Ipv4Addr>(format!("{field}.address"), &config.address, IPV4)?;
    optional_address::<Ipv4Addr>(format!("{field}.netmask"), &config.netmask, IPV4)?;
    if let Ok(mask) = config.netmask.parse::<Ipv4Addr>() {
        let bits = u32::from(mask);
        if bits.leading_ones() + bits.trailing_zeros() != 32 {
            return fail(
                format!("{field}.netmask"),
                Problem::Malformed { value: config.netmask.clone(), expected: "a contiguous netmask" },
            );
        }
    }
    optional_address::<Ipv4Addr>(format!("{field}.gateway"), &config.gateway, IPV4)?;
    for (index, server) in config.dns_servers.iter().enumerate() {
        optional_address::<Ipv4Addr>(format!("{field}.dns_servers[{index}]"), server, IPV4)?;
    }
    Ok(())
}

fn validate_ipv6(field: &str, config: &Ipv6Config) -> Checked {
    const IPV6: &str = "an IPv6 address";
    optional_address::<Ipv6Addr>(format!("{field}.address"), &config.address, IPV6)?;
    if !config.address.is_empty() || config.prefix_length != 0 {
        in_range(&format!("{field}.prefix_length"), config.prefix_length.into(), 1, 128)?;
    }
    optional_address::<Ipv6Addr>(format!("{field}.gateway"), &config.gateway, IPV6)?;
    optional_address::<Ipv6Addr>(format!("{field}.link_local"), &config.link_local, IPV6)?;
    for (index, server) in config.dns_servers.iter().enumerate() {
        optional_address::<Ipv6Addr>(format!("{field}.dns_servers[{index}]"), server, IPV6)?;
    }
    Ok(())
}

fn validate_rate_limit(field: &str, limit: &RateLimit) -> Checked {
    if limit.bandwidth == 0 && (limit.burst != 0 || limit.refill_time_ms != 0) {
        return fail(format!("{field}.bandwidth"), Problem::Inconsistent { reason: "is 0 while a burst or refill time is set".into() });
    }
    if limit.bandwidth != 0 && limit.refill_time_ms == 0 {
        return fail(format!("{field}.refill_time"), Problem::Required);
    }
    in_range(&format!("{field}.refill_time"), limit.refill_time_ms, 0, 3_600_000)
}

impl ConsoleConfig {
    fn validate(&self) -> Checked {
        if !self.output.is_empty() {
            return fail(
                "console.output",
                Problem::Inconsistent { reason: "must be empty: the console is captured by metald and read through its API".into() },
            );
        }
        if !self.input.is_empty() {
            return fail("console.input", Problem::Inconsistent { reason: "must be empty: console input is not offered".into() });
        }
        one_of("console.console_type", &self.console_type, &["", "serial"])
    }
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Checked {
    max_count("metadata", metadata.len(), MAX_METADATA_ENTRIES)?;
    for (key, value) in metadata {
        if key.is_empty() {
            return fail("metadata", Problem::Malformed { value: key.clone(), expected: "a non-empty key" });
        }
        max_len(&format!("metadata[{key:?}]"), key, MAX_METADATA_KEY_LEN)?;
        max_len(&format!("metadata[{key:?}]"), value, MAX_METADATA_VALUE_LEN)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> VmConfig {
        let mut config = VmConfig::default();
        config.cpu.vcpu_count = 2;
        config.memory.size_bytes = 128 * MIB;
        config.boot.kernel_path = "vmlinux".into();
        config.storage = vec![
            StorageDevice { id: "root".into(), path: "root.img".into(), is_root_device: true, ..Default::default() },
            StorageDevice { id: "data".into(), path: "data.img".into(), read_only: true, ..Default::default() },
        ];
        config.network = vec![NetworkInterface {
            id: "eth0".into(),
            mac_address: "02:00:00:00:00:01".into(),
            tap_device: "tap0".into(),
            ipv6_config: Some(Ipv6Config { address: "fd00::2".into(), prefix_length: 64, gateway: "fd00::1".into(), ..Default::default() }),
            rx_rate_limit: Some(RateLimit { bandwidth: 1_000_000, refill_time_ms: 100, burst: 0 }),
            ..Default::default()
        }];
        config
    }

    /// Applies `change` to a valid config and returns the field and problem refused.
    fn refused(change: impl FnOnce(&mut VmConfig)) -> (String, Problem) {
        let mut config = valid();
        change(&mut config);
        let error = config.validate().expect_err("the change must be refused");
        assert!(error.to_string().starts_with(&error.field), "the message names the field first: {error}");
        (error.field, error.problem)
    }

    #[test]
    fn a_complete_config_is_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn a_vm_has_at_least_one_vcpu_and_its_vmm_says_how_many_at_most() {
        assert_eq!(refused(|c| c.cpu.vcpu_count = 0), ("cpu.vcpu_count".into(), Problem::BelowMinimum { value: 0, min: 1 }));
        // The ceiling is the backend's, checked by the manager against its capabilities.
        let mut config = valid();
        config.cpu.vcpu_count = 33;
        config.cpu.max_vcpu_count = 0;
        config.cpu.topology = None;
        config.validate().unwrap();
    }

    #[test]
    fn max_vcpus_may_not_be_below_vcpus() {
        assert_eq!(refused(|c| c.cpu.max_vcpu_count = 1).0, "cpu.max_vcpu_count");
        assert!(matches!(refused(|c| c.cpu.max_vcpu_count = 1).1, Problem::LessThan { other_field: "cpu.vcpu_count", .. }));
    }

    #[test]
    fn a_topology_must_multiply_to_the_vcpu_count() {
        let topology = |sockets, cores_per_socket, threads_per_core| Some(CpuTopology { sockets, cores_per_socket, threads_per_core });
        assert_eq!(refused(|c| c.cpu.topology = topology(0, 2, 1)).0, "cpu.topology.sockets");
        assert_eq!(refused(|c| c.cpu.topology = topology(1, 0, 1)).0, "cpu.topology.cores_per_socket");
        assert_eq!(refused(|c| c.cpu.topology = topology(1, 1, 0)).0, "cpu.topology.threads_per_core");
        assert_eq!(refused(|c| c.cpu.topology = topology(2, 2, 1)).0, "cpu.topology");
        let mut config = valid();
        config.cpu.topology = topology(1, 1, 2);
        config.validate().unwrap();
    }

    #[test]
    fn cpu_features_take_only_known_keys_and_values() {
        let (field, problem) = refused(|c| {
            c.cpu.features.insert("avx512".into(), "on".into());
        });
        assert_eq!((field.as_str(), problem), ("cpu.features", Problem::UnknownKey { key: "avx512".into(), known: vec!["smt"] }));
        assert_eq!(
            refused(|c| {
                c.cpu.features.insert("smt".into(), "yes".into());
            })
            .0,
            "cpu.features[\"smt\"]"
        );
    }

    #[test]
    fn memory_must_be_at_least_16_mib_in_whole_mib() {
        assert_eq!(refused(|c| c.memory.size_bytes = 0).1, Problem::OutOfRange { value: 0, min: 16 * MIB, max: MAX_MEMORY_BYTES });
        assert_eq!(refused(|c| c.memory.size_bytes = 15 * MIB).0, "memory.size_bytes");
        assert_eq!(refused(|c| c.memory.size_bytes = 16 * MIB + 1).1, Problem::NotMultipleOf { value: 16 * MIB + 1, unit: MIB });
        assert!(matches!(refused(|c| c.memory.size_bytes = 2 * MAX_MEMORY_BYTES).1, Problem::OutOfRange { .. }));
        let mut config = valid();
        config.memory.size_bytes = 16 * MIB;
        config.validate().unwrap();
    }

    #[test]
    fn max_memory_needs_hotplug_and_whole_mib_above_the_size() {
        assert_eq!(refused(|c| c.memory.max_size_bytes = 64 * MIB).0, "memory.max_size_bytes");
        assert!(matches!(refused(|c| c.memory.max_size_bytes = 256 * MIB).1, Problem::Inconsistent { .. }));
        assert!(matches!(
            refused(|c| {
                c.memory.hotplug_enabled = true;
                c.memory.max_size_bytes = 256 * MIB + 7;
            })
            .1,
            Problem::NotMultipleOf { .. }
        ));
        let mut config = valid();
        config.memory.hotplug_enabled = true;
        config.memory.max_size_bytes = 256 * MIB;
        config.validate().unwrap();
    }

    #[test]
    fn memory_backing_takes_only_huge_pages() {
        assert_eq!(
            refused(|c| {
                c.memory.backing.insert("huge_pages".into(), "1G".into());
            })
            .0,
            "memory.backing[\"huge_pages\"]"
        );
        assert!(matches!(
            refused(|c| {
                c.memory.backing.insert("numa".into(), "0".into());
            })
            .1,
            Problem::UnknownKey { .. }
        ));
    }

    #[test]
    fn the_kernel_is_required_and_paths_are_sane() {
        assert_eq!(refused(|c| c.boot.kernel_path.clear()), ("boot.kernel_path".into(), Problem::Required));
        assert_eq!(refused(|c| c.boot.kernel_path = "a\0b".into()).0, "boot.kernel_path");
        assert_eq!(refused(|c| c.boot.kernel_path = "k".repeat(5000)).1, Problem::TooLong { len: 5000, max: 4096 });
        assert_eq!(refused(|c| c.boot.initrd_path = "x\0".into()).0, "boot.initrd_path");
    }

    #[test]
    fn kernel_args_are_one_bounded_line() {
        assert_eq!(refused(|c| c.boot.kernel_args = "a".repeat(2049)).1, Problem::TooLong { len: 2049, max: 2048 });
        assert_eq!(refused(|c| c.boot.kernel_args = "quiet\ninit=/bin/sh".into()).0, "boot.kernel_args");
        let (field, problem) = refused(|c| c.boot.kernel_args = "quiet metald.eth0.ipv6=fd00::1/64".into());
        assert_eq!((field.as_str(), problem), ("boot.kernel_args", Problem::ReservedToken { token: "metald.eth0.ipv6=fd00::1/64".into() }));
        assert!(matches!(
            refused(|c| {
                c.boot.boot_options.insert("firmware".into(), "x".into());
            })
            .1,
            Problem::UnknownKey { .. }
        ));
    }

    #[test]
    fn drive_ids_are_required_unique_and_plain() {
        assert_eq!(refused(|c| c.storage[1].id.clear()), ("storage[1].id".into(), Problem::Required));
        assert_eq!(refused(|c| c.storage[1].id = "root".into()), ("storage[1].id".into(), Problem::Duplicate { value: "root".into() }));
        assert_eq!(refused(|c| c.storage[0].id = "disk-1".into()).0, "storage[0].id");
        assert!(matches!(refused(|c| c.storage[0].id = "d".repeat(65)).1, Problem::TooLong { .. }));
    }

    #[test]
    fn only_one_drive_may_be_the_root_device() {
        assert_eq!(
            refused(|c| c.storage[1].is_root_device = true),
            ("storage[1].is_root_device".into(), Problem::SecondRootDevice { first: "root".into() })
        );
    }

    #[test]
    fn drives_need_a_path_a_known_interface_and_known_options() {
        assert_eq!(refused(|c| c.storage[0].path.clear()), ("storage[0].path".into(), Problem::Required));
        assert_eq!(refused(|c| c.storage[0].interface_type = "nvme".into()).0, "storage[0].interface_type");
        // Which engines and cache modes there are is the VMM's, checked at create.
        let (field, problem) = refused(|c| {
            c.storage[0].options.insert("queue_depth".into(), "4".into());
        });
        assert_eq!(field, "storage[0].options");
        assert!(matches!(problem, Problem::UnknownKey { .. }), "{problem:?}");
        assert_eq!(
            refused(
                |c| c.storage = (0..17).map(|i| StorageDevice { id: format!("d{i}"), path: "x".into(), ..Default::default() }).collect()
            )
            .1,
            Problem::TooMany { count: 17, max: 16 }
        );
    }

    #[test]
    fn interfaces_need_plain_unique_ids_and_unicast_macs() {
        assert_eq!(refused(|c| c.network[0].id.clear()), ("network[0].id".into(), Problem::Required));
        assert_eq!(
            refused(|c| c.network.push(NetworkInterface { id: "eth0".into(), tap_device: "tap1".into(), ..Default::default() })).0,
            "network[1].id"
        );
        assert_eq!(refused(|c| c.network[0].mac_address = "02:00:00:00:00".into()).0, "network[0].mac_address");
        assert_eq!(refused(|c| c.network[0].mac_address = "zz:00:00:00:00:01".into()).0, "network[0].mac_address");
        assert!(matches!(
            refused(|c| c.network[0].mac_address = "03:00:00:00:00:01".into()).1,
            Problem::Malformed { expected: "a unicast MAC address", .. }
        ));
        assert_eq!(
            refused(|c| c.network.push(NetworkInterface {
                id: "eth1".into(),
                mac_address: "02:00:00:00:00:01".into(),
                ..Default::default()
            }))
            .1,
            Problem::Duplicate { value: "02:00:00:00:00:01".into() }
        );
    }

    #[test]
    fn tap_names_fit_a_linux_interface_name() {
        assert_eq!(refused(|c| c.network[0].tap_device = "t".repeat(16)).1, Problem::TooLong { len: 16, max: 15 });
        assert_eq!(refused(|c| c.network[0].tap_device = "tap/0".into()).0, "network[0].tap_device");
        assert_eq!(refused(|c| c.network[0].interface_type = "e1000".into()).0, "network[0].interface_type");
        assert!(matches!(
            refused(|c| {
                c.network[0].options.insert("mtu".into(), "9000".into());
            })
            .1,
            Problem::UnknownKey { .. }
        ));
    }

    #[test]
    fn addresses_must_parse_in_their_family() {
        assert_eq!(refused(|c| c.network[0].ipv6_config.as_mut().unwrap().address = "10.0.0.1".into()).0, "network[0].ipv6_config.address");
        assert_eq!(refused(|c| c.network[0].ipv6_config.as_mut().unwrap().prefix_length = 129).0, "network[0].ipv6_config.prefix_length");
        assert_eq!(refused(|c| c.network[0].ipv6_config.as_mut().unwrap().gateway = "nope".into()).0, "network[0].ipv6_config.gateway");
        assert_eq!(
            refused(|c| c.network[0].ipv6_config.as_mut().unwrap().dns_servers = vec!["::1".into(), "x".into()]).0,
            "network[0].ipv6_config.dns_servers[1]"
        );
        assert_eq!(
            refused(|c| c.network[0].ipv6_config.as_mut().unwrap().link_local = "1.2.3.4".into()).0,
            "network[0].ipv6_config.link_local"
        );
        let ipv4 =
            |address: &str, netmask: &str| Some(Ipv4Config { address: address.into(), netmask: netmask.into(), ..Default::default() });
        assert_eq!(refused(|c| c.network[0].ipv4_config = ipv4("fd00::1", "")).0, "network[0].ipv4_config.address");
        assert_eq!(refused(|c| c.network[0].ipv4_config = ipv4("10.0.0.2", "255.0.255.0")).0, "network[0].ipv4_config.netmask");
        assert_eq!(refused(|c| c.network[0].ipv4_config = ipv4("10.0.0.2", "255.255.255.256")).0, "network[0].ipv4_config.netmask");
        assert_eq!(
            refused(|c| c.network[0].ipv4_config = Some(Ipv4Config { gateway: "::".into(), ..Default::default() })).0,
            "network[0].ipv4_config.gateway"
        );
        assert_eq!(
            refused(|c| c.network[0].ipv4_config = Some(Ipv4Config { dns_servers: vec!["a".into()], ..Default::default() })).0,
            "network[0].ipv4_config.dns_servers[0]"
        );
    }

    #[test]
    fn rate_limits_need_a_refill_time_with_a_bandwidth() {
        let limit = |bandwidth, refill_time_ms, burst| Some(RateLimit { bandwidth, refill_time_ms, burst });
        assert_eq!(
            refused(|c| c.network[0].tx_rate_limit = limit(1000, 0, 0)),
            ("network[0].tx_rate_limit.refill_time".into(), Problem::Required)
        );
        assert_eq!(refused(|c| c.network[0].rx_rate_limit = limit(0, 100, 0)).0, "network[0].rx_rate_limit.bandwidth");
        assert!(matches!(refused(|c| c.network[0].rx_rate_limit = limit(1, 3_600_001, 0)).1, Problem::OutOfRange { .. }));
    }

    #[test]
    fn the_console_is_captured_by_metald_only() {
        assert_eq!(refused(|c| c.console.output = "/tmp/console.log".into()).0, "console.output");
        assert_eq!(refused(|c| c.console.input = "/dev/tty".into()).0, "console.input");
        assert_eq!(refused(|c| c.console.console_type = "virtio".into()).0, "console.console_type");
    }

    #[test]
    fn metadata_is_bounded() {
        assert_eq!(
            refused(|c| c.metadata = (0..65).map(|i| (format!("k{i}"), String::new())).collect()).1,
            Problem::TooMany { count: 65, max: 64 }
        );
        assert_eq!(
            refused(|c| {
                c.metadata.insert(String::new(), "v".into());
            })
            .0,
            "metadata"
        );
        assert!(matches!(
            refused(|c| {
                c.metadata.insert("k".repeat(129), "v".into());
            })
            .1,
            Problem::TooLong { .. }
        ));
        assert!(matches!(
            refused(|c| {
                c.metadata.insert("k".into(), "v".repeat(1025));
            })
            .1,
            Problem::TooLong { .. }
        ));
    }

    #[test]
    fn unknown_json_fields_are_refused() {
        let error = serde_json::from_str::<VmConfig>(r#"{"cpu":{"vcpu_count":1,"vcpus":2}}"#).unwrap_err();
        assert!(error.to_string().contains("unknown field `vcpus`"), "{error}");
    }
}
