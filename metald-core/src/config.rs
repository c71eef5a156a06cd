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
/// The fewest vCPUs a VM may have.
pub const MIN_VCPUS: u32 = 1;
/// The most vCPUs a VM may have: Firecracker's ceiling, and ours.
pub const MAX_VCPUS: u32 = 32;
/// The least memory a VM may have.
pub const MIN_MEMORY_BYTES: u64 = 16 * MIB;
/// The most memory a VM may have (1 TiB); quotas usually bite long before.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// The longest kernel command line a caller may give; the VMM appends to it.
pub const MAX_KERNEL_ARGS_BYTES: usize = 2048;
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
        allowed: &'static [&'static str],
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
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Required => write!(f, "is required"),
            Problem::OutOfRange { value, min, max } => write!(f, "{value} is outside {min}..={max}"),
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

fn one_of(field: &str, value: &str, allowed: &'static [&'static str]) -> Checked {
    if allowed.contains(&value) { Ok(()) } else { fail(field, Problem::NotAllowed { value: value.to_owned(), allowed }) }
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
const STORAGE_OPTIONS: &[(&str, &[&str])] = &[("io_engine", &["Sync", "Async"]), ("cache_type", &["Unsafe", "Writeback"])];

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
        validate_metadata(&self.metadata)
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
        let (min, max) = (u64::from(MIN_VCPUS), u64::from(MAX_VCPUS));
        in_range("cpu.vcpu_count", u64::from(self.vcpu_count), min, max)?;
        if self.max_vcpu_count != 0 {
            in_range("cpu.max_vcpu_count", u64::from(self.max_vcpu_count), min, max)?;
            if self.max_vcpu_count < self.vcpu_count {
                return fail(
                    "cpu.max_vcpu_count",
                    Problem::LessThan { value: self.max_vcpu_count.into(), other_field: "cpu.vcpu_count", other: self.vcpu_count.into() },
                );
            }
        }
        if let Some(topology) = &self.topology {
            let parts = [
                ("cpu.topology.sockets", topology.sockets),
                ("cpu.topology.cores_per_socket", topology.cores_per_socket),
                ("cpu.topology.threads_per_core", topology.threads_per_core),
            ];
            for (field, value) in parts {
                in_range(field, value.into(), 1, max)?;
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
