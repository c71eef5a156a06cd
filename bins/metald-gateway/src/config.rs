//! The gateway's settings: defaults, then a TOML file, then
//! `METALD_GATEWAY_*` environment variables (nested keys joined by `__`),
//! then command-line flags. Every key is documented in
//! `docs/architecture/components/gateway.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use metald_fleet::cache::CacheSettings;
use metald_fleet::host_tls::HostTlsSettings;
use metald_fleet::limits::RateSettings;
use metald_serve::settings::ApiSettings;
use metald_serve::telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the API (and `/health`, `/ready`, `/metrics`) listens.
    pub listen: SocketAddr,
    /// The gateway's own state: its SQLite fleet store, unless `store.postgres_url` is set.
    pub data_dir: PathBuf,
    pub store: StoreSettings,
    /// How long key records and placements read from the store are kept.
    pub cache: CacheSettings,
    /// A file holding the secret the gateway signs host calls with (at
    /// least 32 bytes; each host's `auth.gateway.secret_file` holds the same).
    pub host_secret_file: PathBuf,
    /// SHA-256 (hex) of each admin token, which alone opens `AdminService`.
    pub admin_token_sha256: Vec<String>,
    /// Mutual TLS to the hosts: their CA, the gateway's client certificate
    /// and key. Unset: hosts are called over plain HTTP.
    pub hosts_tls: Option<HostTlsSettings>,
    /// Hosts to place VMs on, added to the store at start if it lacks them;
    /// `AdminService.AddHost` adds more while the gateway runs.
    pub hosts: Vec<HostSetting>,
    /// How long a host that announces itself stays placeable after its last
    /// announcement, in seconds (a few of the hosts' announce intervals).
    pub announce_ttl_seconds: u64,
    /// How often each host is probed (its readiness and capacity) and held
    /// against the store, in milliseconds.
    pub probe_interval_ms: u64,
    /// How long one call to a host may take when its caller set no deadline, in seconds.
    pub host_call_timeout_seconds: u64,
    /// How old a pending placement (its create's answer never came: its
    /// gateway died) must be before reconciliation settles it by what its
    /// host has, in seconds; longer than any create takes.
    pub pending_settle_seconds: u64,
    /// How many fitting hosts a placement samples before it takes the emptiest.
    pub placement_choices: usize,
    /// The gateway refuses to start as root unless this is true: it needs
    /// no privilege, and touches no VM directly.
    pub allow_root: bool,
    pub api: ApiSettings,
    pub rate_limits: RateSettings,
    pub telemetry: TelemetrySettings,
}

/// Where the fleet store is: SQLite in `data_dir` (one gateway), or a
/// PostgreSQL database several gateways share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `postgresql://USER@HOST:PORT/DATABASE` (libpq URL or key-value form).
    pub postgres_url: Option<String>,
    /// A file holding the database password, so it stays out of the URL and of `print-config`.
    pub postgres_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSetting {
    pub name: String,
    /// Where its metald listens: `http://10.0.0.5:7070`.
    pub url: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            data_dir: PathBuf::from("/var/lib/metald-gateway"),
            store: StoreSettings::default(),
            cache: CacheSettings::default(),
            host_secret_file: PathBuf::from("/etc/metald-gateway/host.secret"),
            admin_token_sha256: Vec::new(),
            hosts_tls: None,
            hosts: Vec::new(),
            announce_ttl_seconds: 15,
            probe_interval_ms: 2000,
            host_call_timeout_seconds: 60,
            pending_settle_seconds: 120,
            placement_choices: 2,
            allow_root: false,
            api: ApiSettings::default(),
            rate_limits: RateSettings::default(),
            telemetry: TelemetrySettings::for_service("metald-gateway"),
        }
    }
}

/// The top-level keys of [`Settings`]: only `METALD_GATEWAY_*` variables under them are settings.
const SETTING_KEYS: [&str; 17] = [
    "listen",
    "data_dir",
    "store",
    "cache",
    "host_secret_file",
    "admin_token_sha256",
    "hosts_tls",
    "hosts",
    "announce_ttl_seconds",
    "probe_interval_ms",
    "host_call_timeout_seconds",
    "pending_settle_seconds",
    "placement_choices",
    "allow_root",
    "api",
    "rate_limits",
    "telemetry",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Invalid(#[from] metald_serve::settings::InvalidSettings),
    #[error("{key}: {problem}")]
    Value { key: &'static str, problem: String },
}

impl Settings {
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = metald_serve::settings::load(file, "METALD_GATEWAY_", &SETTING_KEYS, overrides)?;
        let value = |key, problem: &str| Err(ConfigError::Value { key, problem: problem.to_owned() });
        if settings.probe_interval_ms == 0 {
            return value("probe_interval_ms", "must be at least 1");
        }
        if settings.announce_ttl_seconds == 0 {
            return value("announce_ttl_seconds", "must be at least 1");
        }
        if settings.placement_choices == 0 {
            return value("placement_choices", "must be at least 1");
        }
        if let Err((key, problem)) = settings.api.check() {
            return value(key, problem);
        }
        Ok(settings)
    }
}
