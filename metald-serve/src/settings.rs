//! Settings layered the same way for every daemon of ours: built-in
//! defaults, then a TOML file, then `<PREFIX>_*` environment variables
//! named after a setting (nested keys joined by `__`), then the flags. An
//! error names each key that cannot be read and where it was set. The
//! `[api]` table every server has is here too.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

/// Every setting that cannot be read, one per line, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{0}")]
pub struct InvalidSettings(pub String);

/// Defaults, then `file` (when given), then `<prefix>*` variables whose
/// first key is one of `keys`, then `overrides`.
pub fn load<T>(file: Option<&Path>, prefix: &str, keys: &'static [&'static str], overrides: Figment) -> Result<T, InvalidSettings>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    // Only variables under a setting's key are settings: others of the prefix belong to someone else.
    let env = Env::prefixed(prefix)
        .filter(move |key| {
            let top = key.as_str().split("__").next().unwrap_or_default();
            keys.iter().any(|setting| setting.eq_ignore_ascii_case(top))
        })
        .split("__");
    figment.merge(env).merge(overrides).extract().map_err(|error| InvalidSettings(describe(error)))
}

/// Each of figment's errors as `key: problem (where it was set)`, without
/// figment's profile name in front of the key (`default.listen`).
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|error| {
            let key = if error.path.is_empty() { "the settings".to_owned() } else { error.path.join(".") };
            let origin = match &error.metadata {
                Some(metadata) => match &metadata.source {
                    Some(source) => format!(" (in {source})"),
                    None => format!(" (from {})", metadata.name),
                },
                None => String::new(),
            };
            format!("  {key}: {}{origin}", error.kind)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The API port: bodies, pages, the drain at a stop, and the bounds on
/// connections (see [`crate::listener`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The largest request body, in bytes; a larger one is refused before it is read.
    pub max_body_bytes: usize,
    /// How many VMs a page of `ListVms` holds when the caller does not say.
    pub default_page_size: usize,
    /// The most a caller may ask for in one page.
    pub max_page_size: usize,
    /// After SIGTERM, how long calls in flight may take to finish before
    /// the daemon stops without them (a graceful stop waiting for its guest, say).
    pub drain_timeout_seconds: u64,
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// Open connections from one IP address at most.
    pub max_connections_per_client: usize,
    /// How long a connection may take to send a request head (HTTP/1.1,
    /// each one) or its preface (h2c).
    pub header_read_timeout_seconds: u64,
    /// How long a request body may stop arriving before the call ends.
    pub body_read_timeout_seconds: u64,
    /// How long a connection with no call in flight stays open.
    pub idle_timeout_seconds: u64,
    /// TLS on the port; unset: plain HTTP/1.1 and h2c.
    pub tls: Option<crate::tls::TlsSettings>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            default_page_size: 100,
            max_page_size: 1000,
            drain_timeout_seconds: 10,
            max_connections: 4096,
            max_connections_per_client: 256,
            header_read_timeout_seconds: 10,
            body_read_timeout_seconds: 30,
            idle_timeout_seconds: 120,
            tls: None,
        }
    }
}

impl ApiSettings {
    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_seconds),
            body_read_timeout: std::time::Duration::from_secs(self.body_read_timeout_seconds),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_seconds),
        }
    }

    /// The first setting that cannot hold, as (key, problem).
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let bounds = [
            ("api.max_connections", self.max_connections as u64),
            ("api.max_connections_per_client", self.max_connections_per_client as u64),
            ("api.header_read_timeout_seconds", self.header_read_timeout_seconds),
            ("api.body_read_timeout_seconds", self.body_read_timeout_seconds),
            ("api.idle_timeout_seconds", self.idle_timeout_seconds),
        ];
        if let Some((key, _)) = bounds.iter().find(|(_, value)| *value == 0) {
            return Err((key, "must be at least 1"));
        }
        if self.max_connections_per_client > self.max_connections {
            return Err(("api.max_connections_per_client", "must be at most api.max_connections"));
        }
        if self.default_page_size == 0 || self.default_page_size > self.max_page_size {
            return Err(("api.default_page_size", "must be between 1 and api.max_page_size"));
        }
        Ok(())
    }
}
