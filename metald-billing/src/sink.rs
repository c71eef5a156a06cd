//! Where usage records go: the [`BillingSink`] trait, and the JSON Lines
//! file sink that embedded users get by default. A sink takes a batch and
//! answers only once the batch is durable at its destination; a record it
//! already has (same VM and sequence) is acknowledged again, never counted
//! twice.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::record::{HostHeartbeat, UsageGap, UsageRecord};
use crate::summary::{SummaryError, TenantUsage, UsageHistory, UsageWindow};

/// What a sink did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivered {
    pub accepted: usize,
    /// Records it already had, acknowledged without being stored again.
    pub duplicates: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write usage to {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ClickHouse refused or failed")]
    ClickHouse(#[source] clickhouse::error::Error),
    #[error("an earlier insert of host {host_id}'s usage still runs in ClickHouse; the resent batch waits for it")]
    EarlierInsertRunning { host_id: String },
    #[error("the billing service refused or failed")]
    Service(#[source] connectrpc::ConnectError),
}

/// Records on their way to a sink, in order.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub records: &'a [UsageRecord],
    /// Some of them went out before and the answer was lost: the
    /// destination may hold them already and has to check. A batch that
    /// never went out needs no check.
    pub resent: bool,
}

impl<'a> Batch<'a> {
    /// Records that never went out.
    pub fn first(records: &'a [UsageRecord]) -> Self {
        Self { records, resent: false }
    }

    /// Records that may be at the destination already.
    pub fn resent(records: &'a [UsageRecord]) -> Self {
        Self { records, resent: true }
    }
}

/// A destination for usage records.
#[async_trait]
pub trait BillingSink: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// Makes `batch` durable at the destination, in order; records it
    /// already has are acknowledged and not stored again.
    async fn deliver(&self, batch: Batch<'_>) -> Result<Delivered, SinkError>;

    /// Records a span of a VM's time that has no usage records.
    async fn report_gap(&self, gap: &UsageGap) -> Result<(), SinkError>;

    /// Tells the destination this host is alive; destinations without a
    /// notion of hosts ignore it.
    async fn heartbeat(&self, _heartbeat: &HostHeartbeat) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Appends records as JSON lines to a file, fsyncing each batch. The last
/// sequence per VM is read from the file (and from its last rotation,
/// `<name>.1`) at open, so a replayed record is recognised and not written
/// twice. Gaps go to a file beside it, with `.gaps` added to its name.
///
/// Made to be rotated the way logrotate does it: once the file at the
/// path is no longer the one open (moved away or removed), the next batch
/// opens a new one there. No signal is needed.
#[derive(Debug)]
pub struct JsonLinesSink {
    path: PathBuf,
    state: Mutex<JsonLinesState>,
}

#[derive(Debug)]
struct JsonLinesState {
    file: File,
    last_sequence: HashMap<String, u64>,
}

impl JsonLinesSink {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SinkError> {
        let path = path.into();
        let file_error = |source| SinkError::File { path: path.clone(), source };
        let mut last_sequence = HashMap::new();
        for written in written_files(&path) {
            let Ok(existing) = File::open(&written) else { continue };
            for line in BufReader::new(existing).lines() {
                let line = line.map_err(|source| SinkError::File { path: written.clone(), source })?;
                // A torn last line (power loss mid-write) is not a record.
                if let Ok(record) = serde_json::from_str::<UsageRecord>(&line) {
                    let last = last_sequence.entry(record.vm_id.to_string()).or_insert(0);
                    *last = (*last).max(record.sequence);
                }
            }
        }
        let file = metald_types::private_files::open_append(&path).map_err(file_error)?;
        Ok(Self { path, state: Mutex::new(JsonLinesState { file, last_sequence }) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a sink writing to `path` has written: its last rotation (`<path>.1`) and the file itself.
fn written_files(path: &Path) -> [PathBuf; 2] {
    let mut rotated = path.to_path_buf().into_os_string();
    rotated.push(".1");
    [PathBuf::from(rotated), path.to_path_buf()]
}

#[async_trait]
impl UsageHistory for JsonLinesSink {
    fn source(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn usage_by_tenant(&self, window: UsageWindow) -> Result<Vec<TenantUsage>, SummaryError> {
        crate::summary::summarise_files(written_files(&self.path).to_vec(), window).await
    }
}

#[async_trait]
impl BillingSink for JsonLinesSink {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    async fn deliver(&self, batch: Batch<'_>) -> Result<Delivered, SinkError> {
        // The last sequence per VM is in memory: checking costs nothing, resent or not.
        let mut state = self.state.lock().await;
        let mut text = String::new();
        let mut delivered = Delivered::default();
        let mut newest: HashMap<String, u64> = HashMap::new();
        for record in batch.records {
            let vm = record.vm_id.to_string();
            let last = newest.get(&vm).or_else(|| state.last_sequence.get(&vm)).copied().unwrap_or(0);
            if record.sequence <= last {
                delivered.duplicates += 1;
                continue;
            }
            let line = serde_json::to_string(record).map_err(|error| SinkError::File { path: self.path.clone(), source: error.into() })?;
            text.push_str(&line);
            text.push('\n');
            newest.insert(vm, record.sequence);
            delivered.accepted += 1;
        }
        let file_error = |source| SinkError::File { path: self.path.clone(), source };
        if !still_at(&state.file, &self.path).map_err(file_error)? {
            state.file = metald_types::private_files::open_append(&self.path).map_err(file_error)?;
        }
        state.file.write_all(text.as_bytes()).map_err(file_error)?;
        state.file.sync_data().map_err(file_error)?;
        state.last_sequence.extend(newest);
        Ok(delivered)
    }

    async fn report_gap(&self, gap: &UsageGap) -> Result<(), SinkError> {
        let mut name = self.path.clone().into_os_string();
        name.push(".gaps");
        let path = PathBuf::from(name);
        let file_error = |source| SinkError::File { path: path.clone(), source };
        let mut line = serde_json::to_string(gap).map_err(|error| file_error(error.into()))?;
        line.push('\n');
        let _serialised = self.state.lock().await;
        let mut file = metald_types::private_files::open_append(&path).map_err(file_error)?;
        file.write_all(line.as_bytes()).map_err(file_error)?;
        file.sync_data().map_err(file_error)
    }
}

/// Whether `file` is still the one at `path`, not moved away or removed.
fn still_at(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(at_path) => Ok((at_path.dev(), at_path.ino()) == (open.dev(), open.ino())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::tests::record;

    #[tokio::test]
    async fn a_replayed_record_is_acknowledged_and_not_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let sink = JsonLinesSink::open(&path).unwrap();
        let batch = [record("vm-a", 1), record("vm-a", 2), record("vm-b", 1)];
        assert_eq!(sink.deliver(Batch::first(&batch)).await.unwrap(), Delivered { accepted: 3, duplicates: 0 });
        drop(sink);
        let reopened = JsonLinesSink::open(&path).unwrap();
        let again = [record("vm-a", 2), record("vm-a", 3)];
        assert_eq!(reopened.deliver(Batch::resent(&again)).await.unwrap(), Delivered { accepted: 1, duplicates: 1 });
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 4);
    }

    #[tokio::test]
    async fn a_file_rotated_away_is_followed_by_a_new_one_and_its_records_still_count_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let rotated = dir.path().join("usage.jsonl.1");
        let sink = JsonLinesSink::open(&path).unwrap();
        sink.deliver(Batch::first(&[record("vm-a", 1), record("vm-a", 2)])).await.unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        sink.deliver(Batch::first(&[record("vm-a", 3)])).await.unwrap();
        let lines = |path: &Path| std::fs::read_to_string(path).unwrap().lines().count();
        assert_eq!((lines(&rotated), lines(&path)), (2, 1), "the new records go to a new file at the path");
        std::fs::remove_file(&path).unwrap();
        sink.deliver(Batch::first(&[record("vm-a", 4)])).await.unwrap();
        assert_eq!(lines(&path), 1, "a removed file is made anew");
        drop(sink);
        // After a restart, a record that went out just before the rotation is known.
        std::fs::rename(&path, &rotated).unwrap();
        let reopened = JsonLinesSink::open(&path).unwrap();
        let again = reopened.deliver(Batch::resent(&[record("vm-a", 4), record("vm-a", 5)])).await.unwrap();
        assert_eq!(again, Delivered { accepted: 1, duplicates: 1 });
    }
}
