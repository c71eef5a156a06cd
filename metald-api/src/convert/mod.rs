//! Conversions between `vmprovisioner.v1` messages and `metald-core` types.
//!
//! Wire to core ([`config`], [`state`], [`request`]) refuses what core
//! types cannot hold (a negative count, an enum value this build does not
//! know) with a [`WireError`] naming the field by its path in the contract
//! (`network[0].rx_rate_limit.bandwidth`). What core types can hold but a VM
//! must not be is core validation's job ([`metald_core::VmConfig::validate`],
//! which names fields the same way), run by the caller afterwards.
//!
//! Core to wire ([`config`], [`state`], [`info`], [`event`]) never fails:
//! every core value has a wire form. These modules decide no policy (who
//! may see what, pagination, defaults of the host); the server does.

pub mod config;
pub mod event;
pub mod info;
pub mod request;
pub mod state;

use std::time::{SystemTime, UNIX_EPOCH};

use metald_core::ids::IdError;

/// A request field that core types cannot take, named by its path in the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{field}: {value} is negative; no negative value is allowed here")]
    Negative { field: String, value: i64 },
    #[error("{field}: {value} is more than the {max} allowed")]
    TooLarge { field: String, value: i64, max: u64 },
    #[error("{field}: {value} is not a {enum_name} value this server knows")]
    UnknownEnumValue { field: String, enum_name: &'static str, value: i32 },
    #[error("{field}: VM_STATE_UNSPECIFIED is not a state a VM can be in")]
    UnspecifiedState { field: String },
    #[error("{field} is not a valid id")]
    InvalidId {
        field: String,
        #[source]
        source: IdError,
    },
    /// A tenant named in the request that is not the caller's own.
    #[error("{field}: {given:?} is not the tenant this call is authenticated as")]
    OtherTenant { field: String, given: String },
}

impl WireError {
    /// The field's path in the contract, e.g. `storage[1].path`.
    pub fn field(&self) -> &str {
        match self {
            WireError::Negative { field, .. }
            | WireError::TooLarge { field, .. }
            | WireError::UnknownEnumValue { field, .. }
            | WireError::UnspecifiedState { field }
            | WireError::InvalidId { field, .. }
            | WireError::OtherTenant { field, .. } => field,
        }
    }
}

/// A wire `int32` that must not be negative.
pub fn non_negative_i32(field: &str, value: i32) -> Result<u32, WireError> {
    u32::try_from(value).map_err(|_| WireError::Negative { field: field.to_owned(), value: value.into() })
}

/// A wire `int64` that must not be negative.
pub fn non_negative_i64(field: &str, value: i64) -> Result<u64, WireError> {
    u64::try_from(value).map_err(|_| WireError::Negative { field: field.to_owned(), value })
}

/// A core count as a wire `int32`. Core values came from the wire or were
/// validated far below `i32::MAX`; should one ever exceed it, the wire
/// shows `i32::MAX` rather than a wrapped negative number.
pub(crate) fn saturating_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// A core counter as a wire `int64`; `i64::MAX` beyond it, never a wrapped negative number.
pub(crate) fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Unix time in milliseconds, as the contract's timestamps are; 0 for a
/// time before 1970, which no clock of ours reports.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn negative_wire_numbers_are_refused_with_their_field() {
        assert_eq!(non_negative_i32("page_size", 7), Ok(7));
        let error = non_negative_i32("page_size", -1).unwrap_err();
        assert_eq!(error.field(), "page_size");
        assert_eq!(error.to_string(), "page_size: -1 is negative; no negative value is allowed here");
        assert_eq!(non_negative_i64("memory.size_bytes", i64::MAX), Ok(i64::MAX as u64));
        assert_eq!(non_negative_i64("memory.size_bytes", i64::MIN).unwrap_err().field(), "memory.size_bytes");
    }

    #[test]
    fn core_numbers_too_big_for_the_wire_saturate() {
        assert_eq!(saturating_i32(u32::MAX), i32::MAX);
        assert_eq!(saturating_i32(32), 32);
        assert_eq!(saturating_i64(u64::MAX), i64::MAX);
    }

    #[test]
    fn timestamps_are_unix_milliseconds() {
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)), 1_700_000_000_123);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
