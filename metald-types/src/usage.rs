//! What metering produces: one [`UsageRecord`] per VM per interval, with
//! the VM's identity, a sequence number that never repeats for that VM, the
//! interval's bounds in milliseconds, and what the VM used in it.

use serde::{Deserialize, Serialize};

use crate::{DeviceCounters, TenantId, VmId};

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
    /// A record of `vm_id` with every figure zero, to be filled in.
    pub fn zeroed(tenant_id: TenantId, vm_id: VmId) -> Self {
        Self {
            tenant_id,
            vm_id,
            sequence: 0,
            start_ms: 0,
            end_ms: 0,
            usage: Counters::default(),
            vcpus: 0,
            memory_limit_bytes: 0,
            missed_ticks: 0,
            paused: false,
            final_record: false,
        }
    }

    /// The interval's length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}

/// `with_usage_figures!([callback] { args })` calls
/// `callback! { args ; flat_name = path.in.record, ... }` with
/// every figure of a [`UsageRecord`]: its flat name, as the wire and the
/// ClickHouse row spell it, and where it sits in the nested record. The one
/// list of them; [`flatten_usage_record!`] and [`unflatten_usage_record!`]
/// are made from it, so a new figure is added here and nowhere else.
#[macro_export]
macro_rules! with_usage_figures {
    ([$($callback:tt)+] { $($args:tt)* }) => {
        $($callback)+! { $($args)* ;
            sequence = sequence,
            start_ms = start_ms,
            end_ms = end_ms,
            cpu_ns = usage.cpu_ns,
            memory_bytes = usage.memory_bytes,
            memory_peak_bytes = usage.memory_peak_bytes,
            net_rx_bytes = usage.devices.net_rx_bytes,
            net_tx_bytes = usage.devices.net_tx_bytes,
            net_rx_packets = usage.devices.net_rx_packets,
            net_tx_packets = usage.devices.net_tx_packets,
            block_read_bytes = usage.devices.block_read_bytes,
            block_write_bytes = usage.devices.block_write_bytes,
            block_read_ops = usage.devices.block_read_ops,
            block_write_ops = usage.devices.block_write_ops,
            vcpus = vcpus,
            memory_limit_bytes = memory_limit_bytes,
            missed_ticks = missed_ticks,
            paused = paused,
            final_record = final_record,
        }
    };
}

/// A flat struct literal of `$target` from the record `$record`: every
/// figure by its flat name (converted with `From`, so a flag may become a
/// `u8`), then the fields in braces (the ids, as the target spells them).
///
/// ```
/// # use metald_types::{TenantId, UsageRecord, VmId};
/// struct Row { tenant_id: String, sequence: u64, start_ms: u64, end_ms: u64, cpu_ns: u64, memory_bytes: u64,
///     memory_peak_bytes: u64, net_rx_bytes: u64, net_tx_bytes: u64, net_rx_packets: u64, net_tx_packets: u64,
///     block_read_bytes: u64, block_write_bytes: u64, block_read_ops: u64, block_write_ops: u64, vcpus: u32,
///     memory_limit_bytes: u64, missed_ticks: u32, paused: u8, final_record: u8 }
/// let record = UsageRecord::zeroed(TenantId::new("acme").unwrap(), VmId::new("vm-1").unwrap());
/// let row = metald_types::flatten_usage_record!(record => Row { tenant_id: record.tenant_id.to_string() });
/// assert_eq!(row.tenant_id, "acme");
/// ```
#[macro_export]
macro_rules! flatten_usage_record {
    ($record:ident => $($target:ident)::+ { $($rest:tt)* }) => {
        $crate::with_usage_figures!([$crate::__flatten_usage_record] { $record, $($target)::+, { $($rest)* } })
    };
}

/// Sets every figure of the record `$record` (a mutable place) from the
/// fields of the same flat names of `$flat`.
#[macro_export]
macro_rules! unflatten_usage_record {
    ($flat:ident => $record:ident) => {
        $crate::with_usage_figures!([$crate::__unflatten_usage_record] { $flat, $record })
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __flatten_usage_record {
    ($record:ident, $($target:ident)::+, { $($rest:tt)* } ; $($flat:ident = $($path:ident).+),* $(,)?) => {
        $($target)::+ { $($flat: ::core::convert::From::from($record.$($path).+),)* $($rest)* }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __unflatten_usage_record {
    ($flat:ident, $record:ident ; $($name:ident = $($path:ident).+),* $(,)?) => {
        $( $record.$($path).+ = $flat.$name; )*
    };
}
