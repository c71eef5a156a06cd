//! Unix time in milliseconds: the clock every stored, billed and shown
//! instant uses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `at` in milliseconds since the Unix epoch; 0 before it.
pub fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|since| saturating_u64(since.as_millis())).unwrap_or(0)
}

/// Now, in milliseconds since the Unix epoch.
pub fn unix_millis_now() -> u64 {
    unix_millis(SystemTime::now())
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A `u128` duration figure clamped to `u64` (585 years of nanoseconds).
pub fn saturating_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_go_there_and_back_and_the_time_before_the_epoch_is_zero() {
        assert_eq!(unix_millis(from_unix_millis(1_700_000_000_123)), 1_700_000_000_123);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(saturating_u64(u128::MAX), u64::MAX);
    }
}
