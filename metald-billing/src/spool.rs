//! The spool: where a usage record becomes "taken". The meter hands each
//! tick's records to the spool, which writes them, with the meter's
//! position for each VM, in one SQLite transaction committed with a full
//! fsync; only then are they taken. A sink delivers them later, in order,
//! and they leave the spool when the sink acknowledges them.
//!
//! Worst case on power loss: the records of the tick being written (at most
//! one tick, 100 ms, of usage) are not taken, and the meter's position is
//! not advanced either, so the next records cover that time again after a
//! restart of metald; only usage of VMs that died with the power is lost.
//! A crash or SIGKILL of metald loses nothing: the WAL is on disk.
//!
//! Records are unique by (VM, sequence): taking one twice is harmless. The
//! spool is bounded by a quota; a full spool refuses new records, which the
//! meter then keeps counting into a longer interval.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::record::{Counters, UsageGap, UsageRecord};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool at {path} cannot be used")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("a spooled record cannot be read back")]
    Corrupt(#[source] serde_json::Error),
    #[error("the spool is full: {used} of {quota} bytes")]
    Full { used: u64, quota: u64 },
}

/// Where the meter is for one VM, kept with the records it produced so a
/// restarted meter resumes exactly where the taken records end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterPosition {
    pub tenant_id: String,
    pub vm_id: String,
    pub last_sequence: u64,
    pub last_end_ms: u64,
    /// The counters the last taken record ended at.
    pub counters: Counters,
    /// The VMM process those counters belong to (a new process starts from zero).
    pub pid: Option<u32>,
    /// The last record was the VM's final one: nothing is owed until it boots again.
    #[serde(default)]
    pub closed: bool,
}

/// How full the spool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolDepth {
    pub records: u64,
    pub bytes: u64,
    pub quota_bytes: u64,
}

impl SpoolDepth {
    /// 0.0 (empty) to 1.0 (full).
    pub fn fullness(&self) -> f64 {
        if self.quota_bytes == 0 { 1.0 } else { self.bytes as f64 / self.quota_bytes as f64 }
    }
}

#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    quota_bytes: u64,
    store: Mutex<Store>,
    taken: tokio::sync::Notify,
}

/// The database and what it holds, counted as records come and go so that
/// taking a tick's records never scans the spool.
#[derive(Debug)]
struct Store {
    connection: Connection,
    records: u64,
    bytes: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    taken_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (vm_id, sequence)
);
CREATE TABLE IF NOT EXISTS positions (
    vm_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);
";

impl Spool {
    pub fn open(path: impl Into<PathBuf>, quota_bytes: u64) -> Result<Self, SpoolError> {
        let path = path.into();
        let store = |source| SpoolError::Store { path: path.clone(), source };
        let connection = Connection::open(&path).map_err(store)?;
        connection.pragma_update(None, "journal_mode", "WAL").map_err(store)?;
        // Every commit is fsynced: a record is taken only once it is on disk.
        connection.pragma_update(None, "synchronous", "FULL").map_err(store)?;
        connection.busy_timeout(Duration::from_secs(5)).map_err(store)?;
        connection.execute_batch(SCHEMA).map_err(store)?;
        let (records, bytes): (i64, i64) = connection
            .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(store)?;
        let (records, bytes) = (u64::try_from(records).unwrap_or(0), u64::try_from(bytes).unwrap_or(0));
        Ok(Self { path, quota_bytes, store: Mutex::new(Store { connection, records, bytes }), taken: tokio::sync::Notify::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn store(&self) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
        |source| SpoolError::Store { path: self.path.clone(), source }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `records` and moves the meter's `positions`, all or nothing.
    pub fn take(&self, records: &[UsageRecord], positions: &[MeterPosition]) -> Result<(), SpoolError> {
        let bodies: Vec<String> =
            records.iter().map(|record| serde_json::to_string(record).map_err(SpoolError::Corrupt)).collect::<Result<_, _>>()?;
        let incoming: u64 = bodies.iter().map(|body| body.len() as u64).sum();
        let mut store = self.lock();
        if incoming > 0 && store.bytes + incoming > self.quota_bytes {
            return Err(SpoolError::Full { used: store.bytes, quota: self.quota_bytes });
        }
        let transaction = store.connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.store())?;
        let taken_ms = i64::try_from(crate::record::unix_millis()).unwrap_or(i64::MAX);
        let (mut added_records, mut added_bytes) = (0, 0);
        for (record, body) in records.iter().zip(&bodies) {
            let inserted = transaction
                .execute(
                    "INSERT OR IGNORE INTO records (vm_id, sequence, taken_ms, size, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![record.vm_id.as_str(), i64::try_from(record.sequence).unwrap_or(i64::MAX), taken_ms, body.len() as i64, body],
                )
                .map_err(self.store())?;
            // A record taken twice is ignored, and counted once.
            if inserted > 0 {
                added_records += 1;
                added_bytes += body.len() as u64;
            }
        }
        for position in positions {
            let body = serde_json::to_string(position).map_err(SpoolError::Corrupt)?;
            transaction
                .execute(
                    "INSERT INTO positions (vm_id, body) VALUES (?1, ?2) ON CONFLICT(vm_id) DO UPDATE SET body = excluded.body",
                    params![position.vm_id, body],
                )
                .map_err(self.store())?;
        }
        transaction.commit().map_err(self.store())?;
        store.records += added_records;
        store.bytes += added_bytes;
        drop(store);
        if !records.is_empty() {
            self.taken.notify_one();
        }
        Ok(())
    }

    /// Keeps a gap until a sink has it.
    pub fn add_gap(&self, gap: &UsageGap) -> Result<(), SpoolError> {
        let body = serde_json::to_string(gap).map_err(SpoolError::Corrupt)?;
        self.lock().connection.execute("INSERT INTO gaps (body) VALUES (?1)", params![body]).map_err(self.store())?;
        self.taken.notify_one();
        Ok(())
    }

    /// Gaps not yet delivered, oldest first, with the id to drop them by.
    pub fn pending_gaps(&self) -> Result<Vec<(i64, UsageGap)>, SpoolError> {
        let store = self.lock();
        let mut statement = store.connection.prepare("SELECT id, body FROM gaps ORDER BY id LIMIT 100").map_err(self.store())?;
        let rows: Vec<(i64, String)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.store())?
            .collect::<Result<_, _>>()
            .map_err(self.store())?;
        rows.into_iter().map(|(id, body)| Ok((id, serde_json::from_str(&body).map_err(SpoolError::Corrupt)?))).collect()
    }

    pub fn drop_gap(&self, id: i64) -> Result<(), SpoolError> {
        self.lock().connection.execute("DELETE FROM gaps WHERE id = ?1", params![id]).map_err(self.store())?;
        Ok(())
    }

    /// Forgets the meter's position for a VM that will not be metered again.
    pub fn forget(&self, vm_id: &str) -> Result<(), SpoolError> {
        self.lock().connection.execute("DELETE FROM positions WHERE vm_id = ?1", params![vm_id]).map_err(self.store())?;
        Ok(())
    }

    /// Where the meter stood for every VM, for a restarted meter.
    pub fn positions(&self) -> Result<Vec<MeterPosition>, SpoolError> {
        let store = self.lock();
        let mut statement = store.connection.prepare("SELECT body FROM positions").map_err(self.store())?;
        let bodies: Vec<String> =
            statement.query_map([], |row| row.get(0)).map_err(self.store())?.collect::<Result<_, _>>().map_err(self.store())?;
        bodies.iter().map(|body| serde_json::from_str(body).map_err(SpoolError::Corrupt)).collect()
    }

    /// Up to `limit` records not yet acknowledged, oldest first, with the
    /// id to acknowledge them by.
    pub fn pending(&self, limit: usize) -> Result<(Vec<UsageRecord>, Option<i64>), SpoolError> {
        let store = self.lock();
        let mut statement = store.connection.prepare("SELECT id, body FROM records ORDER BY id LIMIT ?1").map_err(self.store())?;
        let rows: Vec<(i64, String)> = statement
            .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.store())?
            .collect::<Result<_, _>>()
            .map_err(self.store())?;
        let last = rows.last().map(|(id, _)| *id);
        let records = rows.iter().map(|(_, body)| serde_json::from_str(body).map_err(SpoolError::Corrupt)).collect::<Result<_, _>>()?;
        Ok((records, last))
    }

    /// When the oldest pending record was taken (Unix ms).
    pub fn oldest_taken_ms(&self) -> Result<Option<u64>, SpoolError> {
        // Records are numbered in the order they were taken.
        let taken: Option<i64> = self
            .lock()
            .connection
            .query_row("SELECT taken_ms FROM records ORDER BY id LIMIT 1", [], |row| row.get(0))
            .optional()
            .map_err(self.store())?;
        Ok(taken.map(|taken| u64::try_from(taken).unwrap_or(0)))
    }

    /// Drops every record up to and including `id`: the sink has them.
    pub fn acknowledge(&self, id: i64) -> Result<(), SpoolError> {
        let mut store = self.lock();
        let transaction = store.connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.store())?;
        let (records, bytes): (i64, i64) = transaction
            .query_row("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE id <= ?1", params![id], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(self.store())?;
        transaction.execute("DELETE FROM records WHERE id <= ?1", params![id]).map_err(self.store())?;
        transaction.commit().map_err(self.store())?;
        store.records = store.records.saturating_sub(u64::try_from(records).unwrap_or(0));
        store.bytes = store.bytes.saturating_sub(u64::try_from(bytes).unwrap_or(0));
        Ok(())
    }

    pub fn depth(&self) -> Result<SpoolDepth, SpoolError> {
        let store = self.lock();
        Ok(SpoolDepth { records: store.records, bytes: store.bytes, quota_bytes: self.quota_bytes })
    }

    /// Resolves when records were taken since the last call (or at once if some were).
    pub async fn taken(&self) {
        self.taken.notified().await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metald_core::{TenantId, VmId};

    pub(crate) fn record(vm: &str, sequence: u64) -> UsageRecord {
        UsageRecord {
            tenant_id: TenantId::new("acme").unwrap(),
            vm_id: VmId::new(vm).unwrap(),
            sequence,
            start_ms: sequence * 100,
            end_ms: sequence * 100 + 100,
            usage: Counters { cpu_ns: 1000 * sequence, memory_bytes: 1 << 20, memory_peak_bytes: 1 << 20, ..Counters::default() },
            vcpus: 1,
            memory_limit_bytes: 32 << 20,
            missed_ticks: 0,
            paused: false,
            final_record: false,
        }
    }

    #[test]
    fn taken_records_come_back_in_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("spool.db"), 1 << 20).unwrap();
        spool.take(&[record("vm-a", 1), record("vm-b", 1)], &[]).unwrap();
        spool.take(&[record("vm-a", 2)], &[]).unwrap();
        spool.take(&[record("vm-a", 2)], &[]).unwrap();
        let (pending, last) = spool.pending(10).unwrap();
        assert_eq!(
            pending.iter().map(|r| (r.vm_id.as_str().to_owned(), r.sequence)).collect::<Vec<_>>(),
            [("vm-a".into(), 1), ("vm-b".into(), 1), ("vm-a".into(), 2)]
        );
        let (first_two, up_to) = spool.pending(2).unwrap();
        assert_eq!(first_two.len(), 2);
        spool.acknowledge(up_to.unwrap()).unwrap();
        assert_eq!(spool.pending(10).unwrap().0, vec![record("vm-a", 2)]);
        spool.acknowledge(last.unwrap()).unwrap();
        assert_eq!(spool.depth().unwrap().records, 0);
    }

    #[test]
    fn records_and_positions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let position = MeterPosition {
            tenant_id: "acme".into(),
            vm_id: "vm-a".into(),
            last_sequence: 7,
            last_end_ms: 700,
            counters: Counters { cpu_ns: 42, ..Counters::default() },
            pid: Some(9),
            closed: false,
        };
        Spool::open(&path, 1 << 20).unwrap().take(&[record("vm-a", 7)], std::slice::from_ref(&position)).unwrap();
        let reopened = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(reopened.pending(10).unwrap().0, vec![record("vm-a", 7)]);
        assert_eq!(reopened.positions().unwrap(), vec![position]);
        reopened.forget("vm-a").unwrap();
        assert!(reopened.positions().unwrap().is_empty());
    }

    #[test]
    fn a_full_spool_refuses_and_says_how_full() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("spool.db"), 1000).unwrap();
        let mut sequence = 0;
        let error = loop {
            sequence += 1;
            if let Err(error) = spool.take(&[record("vm-a", sequence)], &[]) {
                break error;
            }
        };
        assert!(matches!(error, SpoolError::Full { quota: 1000, .. }), "{error}");
        let depth = spool.depth().unwrap();
        assert!(depth.fullness() > 0.5 && depth.fullness() <= 1.0, "{depth:?}");
        assert_eq!(depth.records, sequence - 1, "the refused record was not written");
    }
}
