//! The small languages of the command line: sizes (`512MiB`), drives
//! (`PATH[,ro][,root][,id=NAME]`) and labels (`KEY=VALUE`), and turning
//! `--disk` flags into the API's storage list. Each parser returns a
//! message clap shows after the flag's name; none of them talks to the host.

use std::collections::HashSet;

use metald_api::proto::vmprovisioner::v1::StorageDevice;

/// Bytes from `N`, `N<unit>` or `N <unit>`, where the unit is binary:
/// K/KiB, M/MiB, G/GiB, T/TiB (any case). Decimal units (MB, GB) are
/// refused rather than guessed at, and so are fractions.
pub fn parse_size(text: &str) -> Result<i64, String> {
    let trimmed = text.trim();
    let digits = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    if number.is_empty() {
        return Err(format!("{text:?} is not a size: write a whole number of bytes or, e.g., 512MiB or 1GiB"));
    }
    let multiplier = unit_multiplier(unit.trim()).map_err(|problem| format!("{text:?}: {problem}"))?;
    number
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .and_then(|bytes| i64::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn unit_multiplier(unit: &str) -> Result<u64, String> {
    match unit.to_ascii_lowercase().as_str() {
        "" | "b" => Ok(1),
        "k" | "kib" => Ok(1 << 10),
        "m" | "mib" => Ok(1 << 20),
        "g" | "gib" => Ok(1 << 30),
        "t" | "tib" => Ok(1 << 40),
        "kb" | "mb" | "gb" | "tb" => Err(format!("{unit} is ambiguous; use a binary unit (KiB, MiB, GiB, TiB)")),
        fraction if fraction.starts_with('.') || fraction.starts_with(',') => {
            Err("use a whole number (1536MiB rather than 1.5GiB)".to_owned())
        }
        _ => Err(format!("{unit:?} is not a unit; use KiB, MiB, GiB or TiB")),
    }
}

/// One `--disk` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: String,
    pub read_only: bool,
    pub root: bool,
    pub id: Option<String>,
}

const DISK_SYNTAX: &str = "PATH[,ro][,root][,id=NAME]";

/// A drive from `PATH[,ro][,root][,id=NAME]`.
pub fn parse_disk(text: &str) -> Result<DiskSpec, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!("{text:?}: a disk starts with its path: {DISK_SYNTAX}"));
    }
    let mut disk = DiskSpec { path: path.to_owned(), read_only: false, root: false, id: None };
    for option in parts {
        match option {
            "ro" => disk.read_only = true,
            "rw" => disk.read_only = false,
            "root" => disk.root = true,
            _ => match option.strip_prefix("id=") {
                Some(_) if disk.id.is_some() => return Err(format!("{text:?}: id= is given twice")),
                Some(id) => {
                    check_device_id(id).map_err(|problem| format!("{text:?}: {problem}"))?;
                    disk.id = Some(id.to_owned());
                }
                None => return Err(format!("{text:?}: {option:?} is not a disk option; use {DISK_SYNTAX}")),
            },
        }
    }
    Ok(disk)
}

/// Drive ids as the API takes them: letters, digits and '_', 1 to 64.
fn check_device_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty() && id.len() <= 64 && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
    if valid { Ok(()) } else { Err(format!("id {id:?} must be 1 to 64 letters, digits or '_'")) }
}

/// A label from `KEY=VALUE`; the value may contain '=' and may be empty.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        Some(_) => Err(format!("{text:?}: the key before '=' is empty")),
        None => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// A `--restart` policy: `never`, `on-failure` or `on-failure:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartFlag {
    pub on_failure: bool,
    /// 0 for the host's default.
    pub max_restarts: i32,
}

pub fn parse_restart(text: &str) -> Result<RestartFlag, String> {
    let (mode, count) = match text.split_once(':') {
        Some((mode, count)) => (mode, Some(count)),
        None => (text, None),
    };
    match (mode, count) {
        ("never", None) => Ok(RestartFlag { on_failure: false, max_restarts: 0 }),
        ("on-failure", None) => Ok(RestartFlag { on_failure: true, max_restarts: 0 }),
        ("on-failure", Some(count)) => match count.parse::<i32>() {
            Ok(count) if (1..=100).contains(&count) => Ok(RestartFlag { on_failure: true, max_restarts: count }),
            _ => Err(format!("{count:?}: the most restarts in a row is a number from 1 to 100")),
        },
        _ => Err(format!("{text:?} is not never, on-failure or on-failure:N")),
    }
}

/// `90s`, `15m`, `24h`, `7d`, `1h 30m`: a span back from now.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("{error}; write a duration such as 90s, 15m, 24h or 7d"))
}

/// An RFC 3339 instant in UTC: `2026-12-01T00:00:00Z` (a space for the `T` is taken too).
pub fn parse_instant(text: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(text).map_err(|error| format!("{error}; write an instant in UTC such as 2026-12-01T00:00:00Z"))
}

/// The storage list the `--disk` flags ask for, in their order. A drive
/// without an id gets `disk<N>`, N being its place among the flags (or the
/// next number no other drive uses). At most one drive may be the root.
pub fn storage_from_disks(disks: &[DiskSpec]) -> Result<Vec<StorageDevice>, String> {
    if disks.iter().filter(|disk| disk.root).count() > 1 {
        return Err("--disk: only one disk can be the root device".to_owned());
    }
    let mut taken = HashSet::new();
    for id in disks.iter().filter_map(|disk| disk.id.as_deref()) {
        if !taken.insert(id.to_owned()) {
            return Err(format!("--disk: id {id:?} is given to two disks"));
        }
    }
    let mut storage = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let id = match &disk.id {
            Some(id) => id.clone(),
            None => unused_default_id(index, &mut taken),
        };
        storage.push(StorageDevice {
            id,
            path: disk.path.clone(),
            read_only: disk.read_only,
            is_root_device: disk.root,
            ..Default::default()
        });
    }
    Ok(storage)
}

fn unused_default_id(index: usize, taken: &mut HashSet<String>) -> String {
    let mut number = index;
    loop {
        let id = format!("disk{number}");
        if taken.insert(id.clone()) {
            return id;
        }
        number += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_are_read_with_their_limit() {
        assert_eq!(parse_restart("never"), Ok(RestartFlag { on_failure: false, max_restarts: 0 }));
        assert_eq!(parse_restart("on-failure"), Ok(RestartFlag { on_failure: true, max_restarts: 0 }));
        assert_eq!(parse_restart("on-failure:3"), Ok(RestartFlag { on_failure: true, max_restarts: 3 }));
        assert!(parse_restart("on-failure:0").unwrap_err().contains("1 to 100"));
        assert!(parse_restart("always").unwrap_err().contains("never, on-failure or on-failure:N"));
    }

    #[test]
    fn sizes_take_plain_bytes_and_binary_units() {
        assert_eq!(parse_size("134217728"), Ok(134_217_728));
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512 mib"), Ok(512 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("4096B"), Ok(4096));
    }

    #[test]
    fn sizes_refuse_what_they_would_have_to_guess() {
        assert!(parse_size("128MB").unwrap_err().contains("binary unit"));
        assert!(parse_size("1.5GiB").unwrap_err().contains("whole number"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12 parsecs").unwrap_err().contains("not a unit"));
    }

    #[test]
    fn sizes_that_overflow_the_api_are_refused() {
        assert!(parse_size("9223372036854775807").is_ok());
        assert!(parse_size("9223372036854775808").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999TiB").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999999").unwrap_err().contains("too large"));
    }

    #[test]
    fn a_disk_is_a_path_with_options() {
        assert_eq!(parse_disk("rootfs.ext4"), Ok(DiskSpec { path: "rootfs.ext4".into(), read_only: false, root: false, id: None }));
        assert_eq!(
            parse_disk("images/root.ext4,ro,root,id=rootfs"),
            Ok(DiskSpec { path: "images/root.ext4".into(), read_only: true, root: true, id: Some("rootfs".into()) })
        );
        assert_eq!(parse_disk("data.img,id=data_1,rw").map(|disk| disk.read_only), Ok(false));
    }

    #[test]
    fn a_disk_refuses_unknown_or_malformed_options() {
        assert!(parse_disk("").is_err());
        assert!(parse_disk(",ro").unwrap_err().contains("starts with its path"));
        assert!(parse_disk("a.img,readonly").unwrap_err().contains("not a disk option"));
        assert!(parse_disk("a.img,id=x,id=y").unwrap_err().contains("twice"));
        assert!(parse_disk("a.img,id=").is_err());
        assert!(parse_disk("a.img,id=has-dash").unwrap_err().contains("letters, digits"));
        assert!(parse_disk("a.img,").is_err());
    }

    #[test]
    fn disks_get_ids_in_flag_order_without_clashing() {
        let disks = [parse_disk("root.ext4,root").unwrap(), parse_disk("data.img,id=disk2").unwrap(), parse_disk("scratch.img").unwrap()];
        let storage = storage_from_disks(&disks).unwrap();
        let ids: Vec<_> = storage.iter().map(|device| device.id.as_str()).collect();
        assert_eq!(ids, ["disk0", "disk2", "disk3"]);
        assert!(storage[0].is_root_device);
        assert!(!storage[2].read_only);
    }

    #[test]
    fn two_roots_or_a_shared_id_are_refused() {
        let roots = [parse_disk("a.img,root").unwrap(), parse_disk("b.img,root").unwrap()];
        assert!(storage_from_disks(&roots).unwrap_err().contains("only one"));
        let same = [parse_disk("a.img,id=x").unwrap(), parse_disk("b.img,id=x").unwrap()];
        assert!(storage_from_disks(&same).unwrap_err().contains("two disks"));
    }

    #[test]
    fn labels_split_at_the_first_equals_sign() {
        assert_eq!(parse_key_value("team=infra"), Ok(("team".into(), "infra".into())));
        assert_eq!(parse_key_value("query=a=b"), Ok(("query".into(), "a=b".into())));
        assert_eq!(parse_key_value("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_key_value("=value").is_err());
        assert!(parse_key_value("novalue").is_err());
    }
}
