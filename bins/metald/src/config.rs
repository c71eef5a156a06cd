//! The daemon's settings: defaults, then a TOML file, then `METALD_*`
//! environment variables (nested keys joined by `__`, for example
//! `METALD_BILLING__SINK=clickhouse`), then command-line flags. Every key
//! is documented in `docs/api/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use metald_billing::delivery::DeliveryPolicy;
use metald_billing::meter::MeterConfig;
use metald_core::FirecrackerConfig;
use metald_core::jailer::JailerConfig;
use metald_net::NetworkConfig;
pub use metald_serve::settings::ApiSettings;
pub use metald_serve::telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

/// Everything the daemon can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the API (and `/health`, `/ready`, `/metrics`) listens.
    pub listen: SocketAddr,
    /// The daemon's own state: the VM store, the VMs' folders, the spool,
    /// the address book, the usage file.
    pub data_dir: PathBuf,
    /// Every kernel, initrd and drive must come from here.
    pub image_root: PathBuf,
    /// The `firecracker` executable.
    pub firecracker: PathBuf,
    /// The `cloud-hypervisor` executable (v54 or newer); when set, the host
    /// offers Cloud Hypervisor beside Firecracker.
    pub cloud_hypervisor: Option<PathBuf>,
    /// The VMM of a VM whose configuration names none: `firecracker`, or
    /// `cloud-hypervisor` when `cloud_hypervisor` is set.
    pub default_vmm: String,
    /// How long a graceful shutdown of a guest may take, in seconds.
    pub stop_timeout_seconds: u64,
    /// How long one call to a VMM's own API may take, in seconds; a VMM
    /// that does not answer in time makes the operation `unavailable`.
    pub vmm_api_timeout_seconds: u64,
    pub api: ApiSettings,
    pub jailer: JailerSettings,
    pub network: NetworkSettings,
    pub billing: BillingSettings,
    pub auth: AuthSettings,
    pub capacity: CapacitySettings,
    /// Announcing this host to gateways, which then place VMs on it; unset: it is added by hand.
    pub announce: Option<AnnounceSettings>,
    pub telemetry: TelemetrySettings,
}

/// `[announce]`: the gateways this host announces itself to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceSettings {
    /// Each gateway's URL (`http://gateway:7080`); every one is told.
    pub gateways: Vec<String>,
    /// Where the gateways should call this host: `http://10.0.0.5:7070` (`https://` with `[api.tls]`).
    pub url: String,
    /// The host's name at the gateways; unset: the machine's hostname.
    #[serde(default)]
    pub name: Option<String>,
    /// How often it announces itself, in seconds; keep it well below the gateways' `announce_ttl_seconds`.
    #[serde(default = "default_announce_interval")]
    pub interval_seconds: u64,
}

fn default_announce_interval() -> u64 {
    5
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("/var/lib/metald"),
            image_root: PathBuf::from("/var/lib/metald/images"),
            firecracker: PathBuf::from("/usr/local/bin/firecracker"),
            cloud_hypervisor: None,
            default_vmm: metald_core::backend::firecracker::VMM.to_owned(),
            stop_timeout_seconds: metald_core::manager::DEFAULT_STOP_TIMEOUT.as_secs(),
            vmm_api_timeout_seconds: FirecrackerConfig::new("").api_timeout.as_secs(),
            api: ApiSettings::default(),
            jailer: JailerSettings::default(),
            network: NetworkSettings::default(),
            billing: BillingSettings::default(),
            auth: AuthSettings::default(),
            capacity: CapacitySettings::default(),
            announce: None,
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// The daemon keeps a few jail children ready; the library, none unless asked.
const DEFAULT_JAIL_POOL_SIZE: usize = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailerSettings {
    /// Jail every VMM (own user, namespaces, cgroup, pivot_root). Off is for development only.
    pub enabled: bool,
    /// The first uid (and gid) VMMs run as; each VM gets its own.
    pub uid_start: u32,
    /// How many uids, so how many VMs at most.
    pub uid_count: u32,
    /// The cgroup folder (under each controller) that holds the VMMs' cgroups.
    pub cgroup_parent: PathBuf,
    /// Expose a dynamically linked VMM's interpreter and libraries
    /// read-only in its jail instead of refusing it (development builds;
    /// production hosts run static ones).
    pub expose_program_libraries: bool,
    /// Jail children kept ready ahead of creates, each cloned into its
    /// namespaces and waiting in a cgroup of its own; 0 makes each on the
    /// create's path.
    pub pool_size: usize,
    /// The pool is topped up once no create has taken a part for this long;
    /// one a create emptied is refilled as soon as no launch is binding a part.
    pub pool_refill_quiet_ms: u64,
}

impl Default for JailerSettings {
    fn default() -> Self {
        let library = JailerConfig::default();
        Self {
            enabled: true,
            uid_start: library.uid_range.start,
            uid_count: library.uid_range.end.saturating_sub(library.uid_range.start),
            cgroup_parent: library.cgroup_parent,
            expose_program_libraries: library.expose_program_libraries,
            pool_size: DEFAULT_JAIL_POOL_SIZE,
            pool_refill_quiet_ms: library.pool_refill_quiet_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSettings {
    /// `true` or `false`; unset means on when running as root.
    pub enabled: Option<bool>,
    /// The IPv6 prefix (/48 to /63) cut into one /64 per tenant; a ULA /48
    /// from the machine id when unset.
    pub ipv6_prefix: Option<String>,
    /// An IPv4 pool for dual stack, cut into one /24 per tenant.
    pub ipv4_pool: Option<String>,
    /// Resolvers the guests are told about.
    pub dns_servers: Vec<String>,
    /// A network namespace to use as the host side (bridges, routes,
    /// firewall) instead of the daemon's own: for tests and for hosts that
    /// keep VM traffic in a namespace of its own.
    pub host_netns: Option<PathBuf>,
    /// VM namespaces are `<netns_prefix><vm id>`.
    pub netns_prefix: String,
    /// Host links are `<link_prefix>v<n>`, tenant bridges `<link_prefix>t<n>`.
    pub link_prefix: String,
    /// The nftables table the daemon owns.
    pub nft_table: String,
    pub mtu: u32,
    /// Network namespaces made ahead of the VMs that get them; 0 makes
    /// each with its VM's create.
    pub namespace_pool: usize,
    /// Deleted VMs' namespaces are let go this many at a time, so the
    /// kernel tears them down in one pass; 1 lets each go with its VM.
    pub namespace_release_batch: usize,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        let library = NetworkConfig::default();
        Self {
            enabled: None,
            ipv6_prefix: None,
            ipv4_pool: None,
            dns_servers: library.dns_servers.iter().map(ToString::to_string).collect(),
            host_netns: None,
            netns_prefix: library.netns_prefix,
            link_prefix: library.link_prefix,
            nft_table: library.table,
            mtu: library.mtu,
            namespace_pool: library.namespace_pool,
            namespace_release_batch: library.namespace_release_batch,
        }
    }
}

/// Where usage goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// JSON lines in `billing.file` (the default: needs nothing else).
    File,
    /// Straight into ClickHouse.
    Clickhouse,
    /// To billaged over `billing.v1`.
    Service,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingSettings {
    /// Meter the VMs at all.
    pub enabled: bool,
    /// How often the meter samples every VM, in milliseconds: the length of
    /// one usage record.
    pub meter_period_ms: u64,
    pub sink: SinkKind,
    /// For `file`; `<data_dir>/usage.jsonl` when unset.
    pub file: Option<PathBuf>,
    pub clickhouse_url: String,
    pub clickhouse_database: String,
    /// For `service`: billaged's URL.
    pub service_url: String,
    /// This host's name in usage rows; the machine's hostname when unset.
    pub host_id: Option<String>,
    /// The spool's disk quota, in bytes.
    pub spool_quota_bytes: u64,
    /// A batch goes out when it holds this many records…
    pub max_batch: usize,
    /// …or its oldest record is this old, in milliseconds.
    pub max_batch_age_ms: u64,
}

impl Default for BillingSettings {
    fn default() -> Self {
        let delivery = DeliveryPolicy::default();
        Self {
            enabled: true,
            meter_period_ms: metald_types::time::saturating_u64(MeterConfig::default().period.as_millis()),
            sink: SinkKind::File,
            file: None,
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_database: "metald".into(),
            service_url: "http://127.0.0.1:7080".into(),
            host_id: None,
            spool_quota_bytes: 10 << 30,
            max_batch: delivery.max_batch,
            max_batch_age_ms: metald_types::time::saturating_u64(delivery.max_age.as_millis()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Tenants that call with a bearer token.
    pub tenants: Vec<TenantSettings>,
    /// Calls forwarded by a gateway, which vouches for the tenant.
    pub gateway: Option<GatewaySettings>,
    /// SHA-256 hashes (hex) of the operator's tokens, which open
    /// `OperatorService` (every tenant's VMs, usage per tenant) and
    /// nothing else. Several, so a token can be replaced without a gap.
    pub operator_token_sha256: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    pub id: String,
    /// SHA-256 of the tenant's bearer token, in hex (`metald token` makes a
    /// token and prints both). Tokens are never stored.
    pub token_sha256: String,
    #[serde(default)]
    pub quota: Quota,
}

/// What one tenant may hold at once; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    pub max_vms: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// A file holding the secret the gateway signs with (at least 32 bytes).
    pub secret_file: PathBuf,
    /// How old a signature may be, in seconds.
    #[serde(default = "default_max_skew")]
    pub max_skew_seconds: u64,
    /// Quotas for tenants that only come through the gateway.
    #[serde(default)]
    pub default_quota: Quota,
    /// Fleet mode: tenant calls are taken only signed by the gateway; a
    /// tenant's bearer token is refused (the operator's still opens
    /// `OperatorService`).
    #[serde(default)]
    pub required: bool,
}

/// What the host holds at most, all tenants together: a create beyond it
/// is `resource_exhausted`, and a gateway places VMs by what is left.
/// Every VM counts, in any state but deleted. 0 is the default named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacitySettings {
    /// vCPUs in all; 0: sixteen per CPU of the host (vCPUs are time-shared,
    /// and a sandbox's are mostly idle).
    pub vcpus: u64,
    /// Guest memory in all, in bytes; 0: the host's memory (`MemTotal`).
    pub memory_bytes: u64,
    /// VMs in all; 0: `jailer.uid_count`, one VMM user each.
    pub vms: u64,
}

/// How many vCPUs one CPU of the host is shared by when `capacity.vcpus` is 0.
pub const DEFAULT_VCPUS_PER_CPU: u64 = 16;

fn default_max_skew() -> u64 {
    60
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every setting that cannot be read, one per line, named by its key.
    #[error("invalid configuration:\n{0}")]
    Invalid(String),
    #[error("{key}: {problem}")]
    Value { key: &'static str, problem: String },
}

/// The top-level keys of [`Settings`]. Only `METALD_*` variables under
/// them are settings: others of that prefix (`METALD_CONFIG`, metalctl's
/// `METALD_ENDPOINT` and `METALD_TOKEN`, …) belong to someone else.
const SETTING_KEYS: [&str; 16] = [
    "listen",
    "data_dir",
    "image_root",
    "firecracker",
    "cloud_hypervisor",
    "default_vmm",
    "stop_timeout_seconds",
    "vmm_api_timeout_seconds",
    "api",
    "jailer",
    "network",
    "billing",
    "auth",
    "capacity",
    "announce",
    "telemetry",
];

impl Settings {
    /// Defaults, then `file` (when given), then `METALD_*` variables, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        let settings: Settings =
            metald_serve::settings::load(file, "METALD_", &SETTING_KEYS, overrides).map_err(|invalid| ConfigError::Invalid(invalid.0))?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let value = |key, problem: &str| Err(ConfigError::Value { key, problem: problem.to_owned() });
        if self.jailer.uid_count == 0 {
            return value("jailer.uid_count", "must be at least 1");
        }
        if self.jailer.uid_start.checked_add(self.jailer.uid_count).is_none() {
            return value("jailer.uid_count", "runs past the last uid");
        }
        if self.stop_timeout_seconds > metald_api::convert::request::MAX_STOP_TIMEOUT_SECONDS {
            return value("stop_timeout_seconds", "must be at most 3600 (one hour), the longest a ShutdownVm may ask for");
        }
        if self.vmm_api_timeout_seconds == 0 {
            return value("vmm_api_timeout_seconds", "must be at least 1");
        }
        if let Some(announce) = &self.announce {
            if self.auth.gateway.is_none() {
                return value("announce", "needs [auth.gateway]: announcements are signed with its secret_file");
            }
            if announce.gateways.is_empty() {
                return value("announce.gateways", "names no gateway");
            }
            if announce.interval_seconds == 0 {
                return value("announce.interval_seconds", "must be at least 1");
            }
        }
        if !(10..=3_600_000).contains(&self.billing.meter_period_ms) {
            return value("billing.meter_period_ms", "must be between 10 (ten milliseconds) and 3600000 (one hour)");
        }
        if let Err((key, problem)) = self.api.check() {
            return value(key, problem);
        }
        if let Some(index) = self.auth.operator_token_sha256.iter().position(|hash| !is_sha256_hex(hash)) {
            return Err(ConfigError::Value {
                key: "auth.operator_token_sha256",
                problem: format!("[{index}] must be 64 hex digits (the SHA-256 of the token)"),
            });
        }
        for (index, tenant) in self.auth.tenants.iter().enumerate() {
            if metald_core::TenantId::new(&tenant.id).is_err() {
                return Err(ConfigError::Value {
                    key: "auth.tenants",
                    problem: format!("[{index}].id {:?} is not a tenant id", tenant.id),
                });
            }
            if !is_sha256_hex(&tenant.token_sha256) {
                return Err(ConfigError::Value {
                    key: "auth.tenants",
                    problem: format!("[{index}].token_sha256 must be 64 hex digits (the SHA-256 of the token)"),
                });
            }
        }
        Ok(())
    }

    pub fn stop_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stop_timeout_seconds)
    }

    pub fn usage_file(&self) -> PathBuf {
        self.billing.file.clone().unwrap_or_else(|| self.data_dir.join("usage.jsonl"))
    }
}

fn is_sha256_hex(text: &str) -> bool {
    hex::decode(text).map(|hash| hash.len()) == Ok(32)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's own error type
mod tests {
    use super::*;
    use figment::providers::Serialized;
    use std::time::Duration;

    #[test]
    fn the_daemons_defaults_are_the_librarys() {
        let settings = Settings::default();
        let jailer = JailerConfig::default();
        assert_eq!(settings.jailer.uid_start..settings.jailer.uid_start + settings.jailer.uid_count, jailer.uid_range);
        assert_eq!(settings.jailer.cgroup_parent, jailer.cgroup_parent);
        let network = NetworkConfig::default();
        assert_eq!(
            (&settings.network.netns_prefix, &settings.network.link_prefix, &settings.network.nft_table, settings.network.mtu),
            (&network.netns_prefix, &network.link_prefix, &network.table, network.mtu)
        );
        assert_eq!(Duration::from_millis(settings.billing.meter_period_ms), MeterConfig::default().period);
        let delivery = DeliveryPolicy::default();
        assert_eq!(
            (settings.billing.max_batch, Duration::from_millis(settings.billing.max_batch_age_ms)),
            (delivery.max_batch, delivery.max_age)
        );
        assert_eq!(Duration::from_secs(settings.stop_timeout_seconds), metald_core::manager::DEFAULT_STOP_TIMEOUT);
        assert_eq!(Duration::from_secs(settings.vmm_api_timeout_seconds), FirecrackerConfig::new("").api_timeout);
    }

    #[test]
    fn every_top_level_setting_is_read_from_the_environment() {
        let settings = serde_json::to_value(Settings::default()).unwrap();
        let mut keys: Vec<&str> = settings.as_object().unwrap().keys().map(String::as_str).collect();
        let mut known = SETTING_KEYS.to_vec();
        keys.sort_unstable();
        known.sort_unstable();
        assert_eq!(keys, known);
    }

    #[test]
    fn a_file_then_the_environment_then_flags_win_in_that_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "metald.toml",
                r#"
                    listen = "127.0.0.1:9000"
                    data_dir = "/srv/metald"
                    [billing]
                    sink = "clickhouse"
                    [[auth.tenants]]
                    id = "acme"
                    token_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
                    quota = { max_vms = 3 }
                "#,
            )?;
            jail.set_env("METALD_DATA_DIR", "/srv/other");
            jail.set_env("METALD_BILLING__MAX_BATCH", "5");
            // Not settings: the file's own variable, and metalctl's.
            jail.set_env("METALD_CONFIG", "metald.toml");
            jail.set_env("METALD_ENDPOINT", "http://127.0.0.1:1");
            let flags = Figment::new().merge(Serialized::default("listen", "127.0.0.1:9001"));
            let settings = Settings::load(Some(Path::new("metald.toml")), flags).map_err(|error| error.to_string())?;
            assert_eq!(settings.listen, SocketAddr::from(([127, 0, 0, 1], 9001)));
            assert_eq!(settings.data_dir, PathBuf::from("/srv/other"));
            assert_eq!(settings.billing.sink, SinkKind::Clickhouse);
            assert_eq!(settings.billing.max_batch, 5);
            assert_eq!(settings.auth.tenants[0].quota.max_vms, Some(3));
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_or_a_bad_hash_is_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "lisen = \"127.0.0.1:1\"")?;
            let error = Settings::load(Some(Path::new("a.toml")), Figment::new()).unwrap_err();
            assert!(format!("{:?}", error).contains("lisen"), "{error:?}");
            jail.create_file("b.toml", "[[auth.tenants]]\nid = \"acme\"\ntoken_sha256 = \"abc\"")?;
            let error = Settings::load(Some(Path::new("b.toml")), Figment::new()).unwrap_err();
            assert!(error.to_string().contains("token_sha256"), "{error}");
            jail.create_file("c.toml", "[billing]\nmeter_period_ms = 0")?;
            let error = Settings::load(Some(Path::new("c.toml")), Figment::new()).unwrap_err();
            assert!(error.to_string().contains("billing.meter_period_ms"), "{error}");
            Ok(())
        });
    }
}
