//! How single values read: VM states, byte counts, times and durations.
//! Times are Unix milliseconds on the wire and UTC RFC 3339 here.

use std::time::SystemTime;

use buffa::EnumValue;
use metald_api::proto::vmprovisioner::v1::VmState;

/// `running`, `paused`, ...; `-` for unspecified (a deleted VM's events).
pub fn state_name(state: EnumValue<VmState>) -> String {
    let name = match state.as_known() {
        Some(VmState::VM_STATE_UNSPECIFIED) => "-",
        Some(VmState::VM_STATE_CREATED) => "created",
        Some(VmState::VM_STATE_RUNNING) => "running",
        Some(VmState::VM_STATE_PAUSED) => "paused",
        Some(VmState::VM_STATE_SHUTDOWN) => "shutdown",
        Some(VmState::VM_STATE_FAILED) => "failed",
        None => return format!("unknown({})", state.to_i32()),
    };
    name.to_owned()
}

const BINARY_UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// `512 MiB`, `1.5 GiB`, `300 B`: whole numbers when exact, else one decimal.
pub fn format_bytes(bytes: i64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut exponent = 0;
    let mut unit_size: i64 = 1;
    while exponent + 1 < BINARY_UNITS.len() && bytes / 1024 >= unit_size {
        unit_size *= 1024;
        exponent += 1;
    }
    let unit = BINARY_UNITS[exponent];
    if bytes % unit_size == 0 { format!("{} {unit}", bytes / unit_size) } else { format!("{:.1} {unit}", bytes as f64 / unit_size as f64) }
}

/// `1,234,567`: counts are easier to read grouped.
pub fn format_count(count: i64) -> String {
    let digits = count.unsigned_abs().to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if count < 0 {
        grouped.push('-');
    }
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// An instant in Unix milliseconds (0 before 1970).
pub fn unix_ms(instant: SystemTime) -> i64 {
    i64::try_from(metald_types::time::unix_millis(instant)).unwrap_or(i64::MAX)
}

/// `2024-05-01T12:00:00Z`, or `-` for 0 (not set).
pub fn format_time(unix_ms: i64) -> String {
    if unix_ms == 0 { "-".to_owned() } else { rfc3339(unix_ms, false) }
}

/// `2024-05-01T12:00:00.123Z`: for events, where order within a second matters.
pub fn format_time_ms(unix_ms: i64) -> String {
    rfc3339(unix_ms, true)
}

fn rfc3339(unix_ms: i64, with_millis: bool) -> String {
    let seconds = unix_ms.div_euclid(1000);
    let millis = unix_ms.rem_euclid(1000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let second_of_day = seconds.rem_euclid(86_400);
    let (hour, minute, second) = (second_of_day / 3600, second_of_day % 3600 / 60, second_of_day % 60);
    if with_millis {
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
    }
}

/// Year, month and day of a day number counted from 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `3h ago`, `2d ago`; `-` for 0 (not set).
pub fn format_age(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms == 0 {
        return "-".to_owned();
    }
    let seconds = now_ms.saturating_sub(unix_ms).max(0) / 1000;
    format!("{} ago", format_duration_coarse(seconds))
}

/// `45s`, `12m`, `3h`, `2d`: one unit, for ages.
fn format_duration_coarse(seconds: i64) -> String {
    match seconds {
        ..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86_400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// `1h 2m 3s`, `3d 4h`: the two largest units, for uptimes.
pub fn format_duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    let (days, hours, minutes, secs) = (seconds / 86_400, seconds % 86_400 / 3600, seconds % 3600 / 60, seconds % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {secs}s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_lowercase_words() {
        assert_eq!(state_name(VmState::VM_STATE_RUNNING.into()), "running");
        assert_eq!(state_name(VmState::VM_STATE_FAILED.into()), "failed");
        assert_eq!(state_name(VmState::VM_STATE_UNSPECIFIED.into()), "-");
        assert_eq!(state_name(EnumValue::from(42)), "unknown(42)");
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1 KiB");
        assert_eq!(format_bytes(128 << 20), "128 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(1 << 40), "1 TiB");
        assert_eq!(format_bytes(i64::MAX), "8192.0 PiB");
        assert_eq!(format_bytes(-5), "-5 B");
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(1000), "1,000");
        assert_eq!(format_count(1_234_567), "1,234,567");
        assert_eq!(format_count(-1_234), "-1,234");
    }

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(format_time(1), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_714_564_800_000), "2024-05-01T12:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time_ms(1_714_564_800_123), "2024-05-01T12:00:00.123Z");
        assert_eq!(format_time(-1000), "1969-12-31T23:59:59Z");
        assert_eq!(format_time(0), "-");
    }

    #[test]
    fn ages_and_uptimes_read_in_the_largest_units() {
        let now = 1_714_564_800_000;
        assert_eq!(format_age(now - 45_000, now), "45s ago");
        assert_eq!(format_age(now - 3 * 3_600_000 - 5, now), "3h ago");
        assert_eq!(format_age(now - 2 * 86_400_000, now), "2d ago");
        assert_eq!(format_age(now + 5_000, now), "0s ago");
        assert_eq!(format_age(0, now), "-");
        assert_eq!(format_duration(3723), "1h 2m");
        assert_eq!(format_duration(42), "42s");
        assert_eq!(format_duration(90_061), "1d 1h");
    }
}
