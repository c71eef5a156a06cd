//! What each VMM's cgroup counted in all, from the daemon's logs: metald
//! reads a cgroup's CPU counter just before it removes the cgroup (its
//! jail's teardown, apart from the meter) and logs it, so a test can hold
//! the usage it billed against the kernel's count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A removed VMM cgroup: when it went, and what it counted in all.
#[derive(Debug, Clone)]
pub struct RemovedCgroup {
    pub removed_ms: u64,
    pub cpu_ns: u64,
}

/// Unix milliseconds of a log line's leading `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn log_time_ms(line: &str) -> Option<u64> {
    let number = |range: std::ops::Range<usize>| line.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hours, minutes, seconds, millis) = (number(11..13)?, number(14..16)?, number(17..19)?, number(20..23)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(((days * 24 + hours) * 60 + minutes) * 60 + seconds).ok().map(|secs| secs * 1000 + millis as u64)
}

/// What each VMM's cgroup counted in all, per VM in the order the cgroups
/// went: metald reads it just before it removes a cgroup (its jail's
/// teardown, apart from the meter) and logs it.
pub fn removed_cgroups(dir: &Path) -> BTreeMap<String, Vec<RemovedCgroup>> {
    let mut logs: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let start = name.strip_prefix("metald.")?.strip_suffix(".log")?.parse().ok()?;
            Some((start, entry.path()))
        })
        .collect();
    logs.sort();
    let mut totals: BTreeMap<String, Vec<RemovedCgroup>> = BTreeMap::new();
    for (_, path) in logs {
        for line in std::fs::read_to_string(path).unwrap_or_default().lines().filter(|line| line.contains("VMM cgroup removed")) {
            let field = |key: &str| line.split_whitespace().rev().find_map(|word| word.strip_prefix(key)).map(str::to_owned);
            let (Some(name), Some(cpu_ns), Some(removed_ms)) = (field("cgroup="), field("cpu_ns="), log_time_ms(line)) else { continue };
            let vm_id = name.rsplit_once('.').map_or(name.as_str(), |(vm_id, _)| vm_id).to_owned();
            totals.entry(vm_id).or_default().push(RemovedCgroup { removed_ms, cpu_ns: cpu_ns.parse().unwrap() });
        }
    }
    totals
}
