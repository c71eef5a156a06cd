//! Where the meter reads a VM's counters: its VMM's cgroup for CPU and
//! memory (or `/proc/<pid>` for an unjailed VMM), and the VMM's view of
//! `/proc/<pid>/net/dev` for its TAP devices, which live in the VM's
//! network namespace. A trait, so a synthetic source can stand in when
//! measuring the meter itself at a scale no test host can boot.

use std::io;

use metald_core::cgroups::Cgroup;
use metald_core::process::ProcessUsage;

use crate::record::Counters;

/// What to read for one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterTarget {
    pub pid: Option<u32>,
    pub cgroup: Option<Cgroup>,
    pub taps: Vec<String>,
}

/// Reads a VM's counters (block I/O excepted, which comes from the VMM).
pub trait CounterSource: Send + Sync + std::fmt::Debug {
    fn read(&self, target: &MeterTarget) -> io::Result<Counters>;
}

/// The real host: cgroups, `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemCounters;

impl CounterSource for SystemCounters {
    fn read(&self, target: &MeterTarget) -> io::Result<Counters> {
        let mut counters = Counters::default();
        match &target.cgroup {
            Some(cgroup) => {
                let cgroup_error = |error: metald_core::cgroups::CgroupError| io::Error::other(metald_types::error_chain(&error));
                counters.cpu_ns = cgroup.cpu_usage_ns().map_err(cgroup_error)?;
                counters.memory_bytes = cgroup.memory_current().map_err(cgroup_error)?;
                counters.memory_peak_bytes = cgroup.memory_peak_since_last().map_err(cgroup_error)?.unwrap_or(counters.memory_bytes);
            }
            None => {
                let pid = target.pid.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "neither a cgroup nor a process to read"))?;
                let usage = ProcessUsage::read(pid)?;
                counters.cpu_ns = usage.cpu_time_ns;
                counters.memory_bytes = usage.resident_bytes;
                counters.memory_peak_bytes = usage.resident_bytes;
            }
        }
        if let (Some(pid), false) = (target.pid, target.taps.is_empty()) {
            let table = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))?;
            for tap in &target.taps {
                if let Some(tap_counters) = net_dev_line(&table, tap) {
                    // The TAP's receive side is what the guest sent, and the other way round.
                    counters.devices.net_tx_bytes += tap_counters.rx_bytes;
                    counters.devices.net_tx_packets += tap_counters.rx_packets;
                    counters.devices.net_rx_bytes += tap_counters.tx_bytes;
                    counters.devices.net_rx_packets += tap_counters.tx_packets;
                }
            }
        }
        Ok(counters)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct InterfaceCounters {
    rx_bytes: u64,
    rx_packets: u64,
    tx_bytes: u64,
    tx_packets: u64,
}

/// One interface's counters from `/proc/net/dev`.
fn net_dev_line(table: &str, interface: &str) -> Option<InterfaceCounters> {
    let line = table.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        (name.trim() == interface).then_some(rest)
    })?;
    let fields: Vec<u64> = line.split_whitespace().filter_map(|field| field.parse().ok()).collect();
    // receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes packets ...
    Some(InterfaceCounters {
        rx_bytes: *fields.first()?,
        rx_packets: *fields.get(1)?,
        tx_bytes: *fields.get(8)?,
        tx_packets: *fields.get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_line_is_read_from_proc_net_dev() {
        let table = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  tap0:    1500      10    0    0    0     0          0         0     3000      20    0    0    0     0       0          0\n";
        assert_eq!(net_dev_line(table, "tap0"), Some(InterfaceCounters { rx_bytes: 1500, rx_packets: 10, tx_bytes: 3000, tx_packets: 20 }));
        assert_eq!(net_dev_line(table, "tap1"), None);
    }

    #[test]
    fn an_unjailed_process_is_read_from_proc() {
        let counters = SystemCounters.read(&MeterTarget { pid: Some(std::process::id()), ..MeterTarget::default() }).unwrap();
        assert!(counters.memory_bytes > 0);
    }
}
