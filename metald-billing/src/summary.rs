//! Reading delivered usage back: per tenant totals over a span of time, for
//! an operator's summary. A sink that can be read back implements
//! [`UsageHistory`]: the JSON Lines file sink reads its file and its last
//! rotation, the ClickHouse sink asks ClickHouse ([`crate::clickhouse`]).
//! The billing service's sink cannot: its usage is the service's.
//!
//! Every figure is a sum of exact integers over the intervals that start
//! in the span, computed the same way from a file as in ClickHouse, so the
//! two agree to the unit on the same records.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;

use crate::record::UsageRecord;

/// The intervals that start in `[from_ms, to_ms)`, Unix time in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWindow {
    pub from_ms: u64,
    pub to_ms: u64,
}

impl UsageWindow {
    fn holds(&self, record: &UsageRecord) -> bool {
        (self.from_ms..self.to_ms).contains(&record.start_ms)
    }
}

/// What one tenant's VMs used over a span.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, clickhouse::Row)]
pub struct TenantUsage {
    pub tenant_id: String,
    /// Distinct VMs with an interval in the span.
    pub vms: u64,
    pub intervals: u64,
    pub cpu_ns: u64,
    /// vCPUs allocated times the interval's length.
    pub vcpu_ms: u64,
    /// Guest memory allocated, in KiB, times the interval's length.
    pub memory_limit_kib_ms: u64,
    /// Resident memory at the interval's end, in KiB, times its length.
    pub memory_resident_kib_ms: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    /// The first interval's start and the last one's end.
    pub first_ms: u64,
    pub last_ms: u64,
}

impl TenantUsage {
    fn add(&mut self, record: &UsageRecord) {
        let length = record.duration_ms();
        let first = self.intervals == 0;
        self.intervals += 1;
        self.cpu_ns = self.cpu_ns.saturating_add(record.usage.cpu_ns);
        self.vcpu_ms = self.vcpu_ms.saturating_add(u64::from(record.vcpus).saturating_mul(length));
        self.memory_limit_kib_ms = self.memory_limit_kib_ms.saturating_add((record.memory_limit_bytes / 1024).saturating_mul(length));
        self.memory_resident_kib_ms = self.memory_resident_kib_ms.saturating_add((record.usage.memory_bytes / 1024).saturating_mul(length));
        let devices = &record.usage.devices;
        self.net_rx_bytes = self.net_rx_bytes.saturating_add(devices.net_rx_bytes);
        self.net_tx_bytes = self.net_tx_bytes.saturating_add(devices.net_tx_bytes);
        self.block_read_bytes = self.block_read_bytes.saturating_add(devices.block_read_bytes);
        self.block_write_bytes = self.block_write_bytes.saturating_add(devices.block_write_bytes);
        self.first_ms = if first { record.start_ms } else { self.first_ms.min(record.start_ms) };
        self.last_ms = self.last_ms.max(record.end_ms);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("cannot read usage from {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read usage from ClickHouse")]
    ClickHouse(#[source] clickhouse::error::Error),
    #[error("reading the usage file stopped unexpectedly")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// Delivered usage that can be read back.
#[async_trait]
pub trait UsageHistory: Send + Sync + std::fmt::Debug {
    /// Where the usage is read from, for people: `file /var/lib/metald/usage.jsonl`.
    fn source(&self) -> String;

    /// Every tenant with usage in `window`, in tenant order.
    async fn usage_by_tenant(&self, window: UsageWindow) -> Result<Vec<TenantUsage>, SummaryError>;
}

/// Sums the records in `files` (those that exist) that fall in `window`.
/// A line that is not a record (a torn last line after a power loss) is
/// not counted. Reads on the blocking pool: a usage file can be large.
pub async fn summarise_files(files: Vec<PathBuf>, window: UsageWindow) -> Result<Vec<TenantUsage>, SummaryError> {
    tokio::task::spawn_blocking(move || {
        let mut totals = Totals::default();
        for path in &files {
            totals.add_file(path, window)?;
        }
        Ok(totals.into_tenants())
    })
    .await
    .map_err(SummaryError::Interrupted)?
}

/// Per tenant sums, and the VMs seen for each.
#[derive(Debug, Default)]
struct Totals {
    tenants: BTreeMap<String, (TenantUsage, HashSet<String>)>,
}

impl Totals {
    fn add_file(&mut self, path: &Path, window: UsageWindow) -> Result<(), SummaryError> {
        let file_error = |source| SummaryError::File { path: path.to_owned(), source };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(file_error(error)),
        };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(file_error)?;
            if let Ok(record) = serde_json::from_str::<UsageRecord>(&line)
                && window.holds(&record)
            {
                self.add(&record);
            }
        }
        Ok(())
    }

    fn add(&mut self, record: &UsageRecord) {
        let (usage, vms) = self.tenants.entry(record.tenant_id.to_string()).or_default();
        usage.add(record);
        vms.insert(record.vm_id.to_string());
    }

    fn into_tenants(self) -> Vec<TenantUsage> {
        self.tenants.into_iter().map(|(tenant_id, (usage, vms))| TenantUsage { tenant_id, vms: vms.len() as u64, ..usage }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::tests::record;

    #[tokio::test]
    async fn records_are_summed_per_tenant_over_the_intervals_that_start_in_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let rotated = dir.path().join("usage.jsonl.1");
        let current = dir.path().join("usage.jsonl");
        let mut first = record("vm-a", 1);
        first.start_ms = 1_000;
        first.end_ms = 1_100;
        let mut second = record("vm-a", 2);
        second.start_ms = 1_100;
        second.end_ms = 1_300;
        let mut late = record("vm-b", 1);
        late.start_ms = 5_000;
        late.end_ms = 5_100;
        let line = |record: &UsageRecord| serde_json::to_string(record).unwrap() + "\n";
        std::fs::write(&rotated, line(&first)).unwrap();
        // A torn last line is no record.
        std::fs::write(&current, line(&second) + &line(&late) + "{\"tenant_id\":").unwrap();

        let window = UsageWindow { from_ms: 0, to_ms: 2_000 };
        let tenants = summarise_files(vec![rotated.clone(), current.clone(), dir.path().join("absent")], window).await.unwrap();
        assert_eq!(tenants.len(), 1);
        let usage = &tenants[0];
        assert_eq!((usage.vms, usage.intervals), (1, 2));
        assert_eq!(usage.cpu_ns, first.usage.cpu_ns + second.usage.cpu_ns);
        assert_eq!(usage.vcpu_ms, u64::from(first.vcpus) * 300);
        assert_eq!(usage.memory_limit_kib_ms, first.memory_limit_bytes / 1024 * 300);
        assert_eq!((usage.first_ms, usage.last_ms), (1_000, 1_300));

        let everything = summarise_files(vec![rotated, current], UsageWindow { from_ms: 0, to_ms: u64::MAX }).await.unwrap();
        assert_eq!(everything[0].vms, 2, "vm-b belongs to the same tenant");
        assert_eq!(everything[0].intervals, 3);
    }
}
