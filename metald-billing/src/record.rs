//! What metering produces: one [`UsageRecord`] per VM per interval, with
//! the VM's identity, a sequence number that never repeats for that VM, the
//! interval's bounds in milliseconds, and what the VM used in it.

use metald_core::{DeviceCounters, TenantId, VmId};
use serde::{Deserialize, Serialize};

/// Unix time in milliseconds, the clock every record and spool entry uses.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| saturating_u64(elapsed.as_millis())).unwrap_or(0)
}

/// A `u128` duration figure clamped to `u64` (585 years of nanoseconds).
pub fn saturating_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// What a VM used: cumulative since its VMM started when read from the VM,
/// the interval's share in a [`UsageRecord`]; the memory figures are gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// CPU time (none while the VM was paused).
    pub cpu_ns: u64,
    /// Resident memory at the end.
    pub memory_bytes: u64,
    /// The most memory used since the last read (the gauge is reset by reading).
    pub memory_peak_bytes: u64,
    /// Network from the guest's side (what its TAP sent it is received) and block I/O.
    pub devices: DeviceCounters,
}

/// One VM's usage over one interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub tenant_id: TenantId,
    pub vm_id: VmId,
    /// 1, 2, 3, … for each VM, never repeated: with the VM id, the record's identity.
    pub sequence: u64,
    /// Unix time in milliseconds; a record starts where the VM's previous one ended.
    pub start_ms: u64,
    pub end_ms: u64,
    pub usage: Counters,
    /// What the VM was sized for, for allocation-based prices.
    pub vcpus: u32,
    pub memory_limit_bytes: u64,
    /// Ticks in the interval that were not sampled on time (the interval is
    /// then longer than one tick; nothing is lost, it is just coarser).
    pub missed_ticks: u32,
    /// The VM was paused for this interval.
    pub paused: bool,
    /// The VM stopped: no record follows for this VM until it boots again.
    pub final_record: bool,
}

/// A span of a VM's time that has no usage records, and why: the host
/// says so rather than leave finance to guess.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageGap {
    pub tenant_id: TenantId,
    pub vm_id: VmId,
    pub from_ms: u64,
    pub to_ms: u64,
    pub reason: String,
}

/// A host's sign of life, with how much usage it still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostHeartbeat {
    pub sent_at_ms: u64,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub spool_quota_bytes: u64,
}

impl UsageRecord {
    /// The interval's length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}
