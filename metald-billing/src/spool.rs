//! The spool: where a usage record becomes "taken". The meter hands each
//! tick's records to the spool, which writes them, with the meter's
//! position for each of those VMs, as one row in one SQLite transaction
//! committed with a full fsync (WAL, `synchronous = FULL`); only then are
//! they taken. A sink delivers them later, whole ticks at a time and in
//! order, and they leave the spool when the sink acknowledges them; the
//! positions they carried then move to the positions table.
//!
//! Worst case on power loss: the records of the tick being written (at most
//! one tick, 100 ms, of usage) are not taken, and the meter's position is
//! not advanced either, so the next records cover that time again after a
//! restart of metald; only usage of VMs that died with the power is lost.
//! A crash or SIGKILL of metald loses nothing: the WAL is on disk.
//!
//! Before a batch goes out, its ticks are marked as sent (one more fsync'd
//! commit), so after a crash the sink is told the batch may already be at
//! the destination and checks; a batch never sent before needs no check.
//! The spool is bounded by a quota; a full spool refuses new records, which
//! the meter then keeps counting into a longer interval.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::record::{Counters, UsageGap, UsageRecord};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool's file {path} cannot be made owner-only")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spool at {path} cannot be used")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("a spooled record cannot be read back")]
    Corrupt(#[source] serde_json::Error),
    #[error("tick {tick} of the spool cannot be read back (written by another version of metald?)")]
    CorruptTick {
        tick: i64,
        #[source]
        source: postcard::Error,
    },
    #[error("a tick cannot be encoded for the spool")]
    Encode(#[source] postcard::Error),
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

/// Records waiting for a sink, whole ticks, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pending {
    pub records: Vec<UsageRecord>,
    /// Some of these records went out before: the destination may have them.
    pub resent: bool,
    /// The last tick included, to mark and acknowledge by.
    pub last_tick: Option<i64>,
    positions: Vec<MeterPosition>,
}

/// One tick's row, in postcard (compact binary, about a fifth of the same
/// in JSON): its records and the meter's positions after them. A change
/// to these types changes the format: drain the spool before upgrading.
#[derive(Debug, Serialize, Deserialize)]
struct Tick {
    records: Vec<UsageRecord>,
    positions: Vec<MeterPosition>,
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
CREATE TABLE IF NOT EXISTS ticks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    taken_ms INTEGER NOT NULL,
    records INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    vm_id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    forgotten INTEGER NOT NULL DEFAULT 0
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
        metald_types::private_files::prepare_database(&path).map_err(|source| SpoolError::Prepare { path: path.clone(), source })?;
        let connection = Connection::open(&path).map_err(store)?;
        connection.pragma_update(None, "journal_mode", "WAL").map_err(store)?;
        // Every commit is fsynced: a record is taken only once it is on disk.
        connection.pragma_update(None, "synchronous", "FULL").map_err(store)?;
        connection.busy_timeout(Duration::from_secs(5)).map_err(store)?;
        connection.execute_batch(SCHEMA).map_err(store)?;
        let (records, bytes): (i64, i64) = connection
            .query_row("SELECT COALESCE(SUM(records), 0), COALESCE(SUM(size), 0) FROM ticks", [], |row| Ok((row.get(0)?, row.get(1)?)))
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
        if records.is_empty() {
            return self.set_positions(positions);
        }
        let tick = Tick { records: records.to_vec(), positions: positions.to_vec() };
        let body = postcard::to_stdvec(&tick).map_err(SpoolError::Encode)?;
        let size = body.len() as u64;
        let mut store = self.lock();
        if store.bytes + size > self.quota_bytes {
            return Err(SpoolError::Full { used: store.bytes, quota: self.quota_bytes });
        }
        let taken_ms = i64::try_from(metald_types::time::unix_millis_now()).unwrap_or(i64::MAX);
        store
            .connection
            .prepare_cached("INSERT INTO ticks (taken_ms, records, size, body) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut insert| insert.execute(params![taken_ms, records.len() as i64, size as i64, body]))
            .map_err(self.store())?;
        store.records += records.len() as u64;
        store.bytes += size;
        drop(store);
        self.taken.notify_one();
        Ok(())
    }

    /// Moves positions without records (the meter's bookkeeping, or a test's).
    fn set_positions(&self, positions: &[MeterPosition]) -> Result<(), SpoolError> {
        let mut store = self.lock();
        let transaction = store.connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.store())?;
        upsert_positions(&transaction, positions.iter()).map_err(self.store())?;
        transaction.commit().map_err(self.store())
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
        self.lock()
            .connection
            .execute(
                "INSERT INTO positions (vm_id, body, forgotten) VALUES (?1, '', 1) ON CONFLICT(vm_id) DO UPDATE SET forgotten = 1",
                params![vm_id],
            )
            .map_err(self.store())?;
        Ok(())
    }

    /// Where the meter stood for every VM, for a restarted meter: the
    /// positions table, updated by the ticks still waiting.
    pub fn positions(&self) -> Result<Vec<MeterPosition>, SpoolError> {
        let store = self.lock();
        let mut statement = store.connection.prepare("SELECT vm_id, body, forgotten FROM positions").map_err(self.store())?;
        let rows: Vec<(String, String, bool)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(self.store())?
            .collect::<Result<_, _>>()
            .map_err(self.store())?;
        let mut positions: HashMap<String, MeterPosition> = HashMap::new();
        let mut forgotten = std::collections::HashSet::new();
        for (vm_id, body, is_forgotten) in rows {
            if is_forgotten {
                forgotten.insert(vm_id);
            } else {
                positions.insert(vm_id, serde_json::from_str(&body).map_err(SpoolError::Corrupt)?);
            }
        }
        let mut statement = store.connection.prepare("SELECT id, body FROM ticks ORDER BY id").map_err(self.store())?;
        let bodies: Vec<(i64, Vec<u8>)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.store())?
            .collect::<Result<_, _>>()
            .map_err(self.store())?;
        for (id, body) in bodies {
            let tick: Tick = postcard::from_bytes(&body).map_err(|source| SpoolError::CorruptTick { tick: id, source })?;
            for position in tick.positions.into_iter().filter(|position| !forgotten.contains(&position.vm_id)) {
                positions.insert(position.vm_id.clone(), position);
            }
        }
        Ok(positions.into_values().collect())
    }

    /// Whole ticks not yet acknowledged, oldest first, until they hold at
    /// least `limit` records (always at least one tick when any waits).
    pub fn pending(&self, limit: usize) -> Result<Pending, SpoolError> {
        let store = self.lock();
        let mut statement =
            store.connection.prepare_cached("SELECT id, records, sent, body FROM ticks ORDER BY id").map_err(self.store())?;
        let mut rows = statement.query([]).map_err(self.store())?;
        let mut pending = Pending::default();
        while let Some(row) = rows.next().map_err(self.store())? {
            let id: i64 = row.get(0).map_err(self.store())?;
            let sent: bool = row.get(2).map_err(self.store())?;
            let body: Vec<u8> = row.get(3).map_err(self.store())?;
            let tick: Tick = postcard::from_bytes(&body).map_err(|source| SpoolError::CorruptTick { tick: id, source })?;
            pending.records.extend(tick.records);
            pending.positions.extend(tick.positions);
            pending.resent |= sent;
            pending.last_tick = Some(id);
            if pending.records.len() >= limit {
                break;
            }
        }
        Ok(pending)
    }

    /// Notes on disk that `pending` is about to go out, so that a crash
    /// before its acknowledgement makes the next attempt a resend.
    pub fn mark_sent(&self, pending: &Pending) -> Result<(), SpoolError> {
        let Some(last) = pending.last_tick else { return Ok(()) };
        if pending.resent && pending.records.is_empty() {
            return Ok(());
        }
        self.lock().connection.execute("UPDATE ticks SET sent = 1 WHERE id <= ?1 AND sent = 0", params![last]).map_err(self.store())?;
        Ok(())
    }

    /// When the oldest pending record was taken (Unix ms).
    pub fn oldest_taken_ms(&self) -> Result<Option<u64>, SpoolError> {
        let taken: Option<i64> = self
            .lock()
            .connection
            .query_row("SELECT taken_ms FROM ticks ORDER BY id LIMIT 1", [], |row| row.get(0))
            .optional()
            .map_err(self.store())?;
        Ok(taken.map(|taken| u64::try_from(taken).unwrap_or(0)))
    }

    /// Drops `pending`'s ticks (the sink has them) and keeps the positions they carried.
    pub fn acknowledge(&self, pending: &Pending) -> Result<(), SpoolError> {
        let Some(last) = pending.last_tick else { return Ok(()) };
        let mut latest: HashMap<&str, &MeterPosition> = HashMap::new();
        for position in &pending.positions {
            latest.insert(position.vm_id.as_str(), position);
        }
        let mut store = self.lock();
        let transaction = store.connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.store())?;
        let (records, bytes): (i64, i64) = transaction
            .query_row("SELECT COALESCE(SUM(records), 0), COALESCE(SUM(size), 0) FROM ticks WHERE id <= ?1", params![last], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(self.store())?;
        upsert_positions(&transaction, latest.into_values()).map_err(self.store())?;
        transaction.execute("DELETE FROM ticks WHERE id <= ?1", params![last]).map_err(self.store())?;
        let remaining: i64 = transaction.query_row("SELECT COUNT(*) FROM ticks", [], |row| row.get(0)).map_err(self.store())?;
        if remaining == 0 {
            // No waiting tick can bring a deleted VM's position back any more.
            transaction.execute("DELETE FROM positions WHERE forgotten = 1", []).map_err(self.store())?;
        }
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

/// Writes positions, leaving forgotten VMs forgotten.
fn upsert_positions<'a>(
    transaction: &rusqlite::Transaction<'_>,
    positions: impl Iterator<Item = &'a MeterPosition>,
) -> Result<(), rusqlite::Error> {
    let mut upsert = transaction.prepare_cached(
        "INSERT INTO positions (vm_id, body) VALUES (?1, ?2) ON CONFLICT(vm_id) DO UPDATE SET body = excluded.body WHERE forgotten = 0",
    )?;
    for position in positions {
        let body = serde_json::to_string(position).map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
        upsert.execute(params![position.vm_id, body])?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metald_types::{TenantId, VmId};

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
        let pending = spool.pending(10).unwrap();
        assert_eq!(
            pending.records.iter().map(|r| (r.vm_id.as_str().to_owned(), r.sequence)).collect::<Vec<_>>(),
            [("vm-a".into(), 1), ("vm-b".into(), 1), ("vm-a".into(), 2)]
        );
        assert!(!pending.resent);
        // Whole ticks: a limit of one still brings the first tick's two records.
        let first_tick = spool.pending(1).unwrap();
        assert_eq!(first_tick.records.len(), 2);
        spool.mark_sent(&first_tick).unwrap();
        assert!(spool.pending(1).unwrap().resent, "a tick that went out before comes back marked");
        spool.acknowledge(&first_tick).unwrap();
        let rest = spool.pending(10).unwrap();
        assert_eq!((rest.records.clone(), rest.resent), (vec![record("vm-a", 2)], false));
        spool.acknowledge(&rest).unwrap();
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
        let pending = reopened.pending(10).unwrap();
        assert_eq!(pending.records, vec![record("vm-a", 7)]);
        assert_eq!(reopened.positions().unwrap(), vec![position.clone()]);
        // Acknowledged, the position stays; forgotten, it goes, even with ticks still carrying it.
        reopened.acknowledge(&pending).unwrap();
        assert_eq!(reopened.positions().unwrap(), vec![position.clone()]);
        reopened.take(&[record("vm-a", 8)], std::slice::from_ref(&position)).unwrap();
        reopened.forget("vm-a").unwrap();
        assert!(reopened.positions().unwrap().is_empty());
        let pending = reopened.pending(10).unwrap();
        reopened.acknowledge(&pending).unwrap();
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
