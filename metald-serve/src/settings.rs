//! Settings layered the same way for every daemon of ours: built-in
//! defaults, then a TOML file, then `<PREFIX>_*` environment variables
//! named after a setting (nested keys joined by `__`), then the flags. An
//! error names each key that cannot be read and where it was set.

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
