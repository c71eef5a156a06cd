//! Durable VM records, so VMs outlive the process that manages them.
//!
//! The manager writes a VM's [`VmRecord`] at every change (creation, every
//! state change, a new VMM process) and removes it when the VM is deleted.
//! After a restart it reads them all back and takes over the VMMs that
//! still run (see [`crate::manager::VmManager::take_over`]). [`VmStore`] is
//! the port; [`SqliteVmStore`] is the embedded default, one SQLite file in
//! WAL mode: a commit survives the process being killed; a power loss can
//! take the last transitions with it, which the takeover then reconciles from
//! what it finds running.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::ids::{TenantId, VmId};
use crate::network::NetworkAttachment;
use crate::process::ProcessExit;
use crate::state::VmState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the VM store's file {path} cannot be made owner-only")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM store at {path} cannot be used")]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the record of VM {vm_id} cannot be encoded or read back")]
    Record {
        vm_id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the thread writing the VM store did not finish")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// Everything needed to know a VM again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub vm_id: VmId,
    pub tenant: TenantId,
    pub config: VmConfig,
    pub state: VmState,
    pub created_at_ms: u64,
    pub modified_at_ms: u64,
    pub failure: Option<String>,
    pub last_exit: Option<ProcessExit>,
    pub booted_at_ms: Option<u64>,
    pub network: Option<NetworkAttachment>,
    /// The uid and gid the VM's VMMs run as, when jailed.
    pub identity: Option<(u32, u32)>,
    /// The backend's description of the VMM process that runs now, enough
    /// to find it again and prove it is the same process.
    pub vmm: Option<crate::launch::TakeoverTicket>,
    /// How the VM's last VMMs ended, oldest first, for the meter of a later metald.
    #[serde(default)]
    pub recent_ends: Vec<crate::events::EndedVmm>,
    /// The VM was deleted; the record waits until billing has its end.
    #[serde(default)]
    pub deleted: bool,
}

/// Where VM records are kept.
pub trait VmStore: Send + Sync + std::fmt::Debug {
    /// Writes `record`, replacing the VM's previous one.
    fn save(&self, record: &VmRecord) -> Result<(), StoreError>;
    /// Forgets a deleted VM.
    fn remove(&self, vm_id: &VmId) -> Result<(), StoreError>;
    /// Every record, in VM id order.
    fn load_all(&self) -> Result<Vec<VmRecord>, StoreError>;
}

/// The embedded store: one SQLite file.
#[derive(Debug)]
pub struct SqliteVmStore {
    path: PathBuf,
    connection: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_by_tenant ON vms (tenant, vm_id);
";

impl SqliteVmStore {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let database = |source| StoreError::Database { path: path.clone(), source };
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        crate::private_files::prepare_database(&path).map_err(|source| StoreError::Prepare { path: path.clone(), source })?;
        let connection = Connection::open(&path).map_err(database)?;
        connection.pragma_update(None, "journal_mode", "WAL").map_err(database)?;
        // A commit reaches the OS at once (it survives the process); fsync
        // is left to checkpoints, since the takeover reconciles from what runs.
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(database)?;
        connection.busy_timeout(Duration::from_secs(5)).map_err(database)?;
        connection.execute_batch(SCHEMA).map_err(database)?;
        Ok(Self { path, connection: Mutex::new(connection) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn database(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Database { path: self.path.clone(), source }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl VmStore for SqliteVmStore {
    fn save(&self, record: &VmRecord) -> Result<(), StoreError> {
        let body = serde_json::to_string(record).map_err(|source| StoreError::Record { vm_id: record.vm_id.to_string(), source })?;
        self.lock()
            .prepare_cached(
                "INSERT INTO vms (vm_id, tenant, state, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(vm_id) DO UPDATE SET tenant = excluded.tenant, state = excluded.state, body = excluded.body",
            )
            .and_then(|mut statement| {
                statement.execute(params![record.vm_id.as_str(), record.tenant.as_str(), record.state.to_string(), body])
            })
            .map_err(self.database())?;
        Ok(())
    }

    fn remove(&self, vm_id: &VmId) -> Result<(), StoreError> {
        self.lock().execute("DELETE FROM vms WHERE vm_id = ?1", params![vm_id.as_str()]).map_err(self.database())?;
        Ok(())
    }

    fn load_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare("SELECT vm_id, body FROM vms ORDER BY vm_id").map_err(self.database())?;
        let rows: Vec<(String, String)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.database())?
            .collect::<Result<_, _>>()
            .map_err(self.database())?;
        rows.into_iter().map(|(vm_id, body)| serde_json::from_str(&body).map_err(|source| StoreError::Record { vm_id, source })).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vm: &str, state: VmState) -> VmRecord {
        VmRecord {
            vm_id: VmId::new(vm).unwrap(),
            tenant: TenantId::new("acme").unwrap(),
            config: VmConfig::default(),
            state,
            created_at_ms: 1,
            modified_at_ms: 2,
            failure: None,
            last_exit: Some(ProcessExit::Exited { code: 0 }),
            booted_at_ms: None,
            network: None,
            identity: Some((1_000_000, 1_000_000)),
            // As earlier builds stored it: a ticket is read back in that shape.
            vmm: Some(
                serde_json::from_value(serde_json::json!({
                    "pid": 42, "start_time": 7, "layout": {"root": "/srv/vms/vm-a/root", "jailed": true, "placed": {}}, "cgroup": null
                }))
                .unwrap(),
            ),
            recent_ends: Vec::new(),
            deleted: false,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_are_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vms.db");
        let store = SqliteVmStore::open(&path).unwrap();
        store.save(&record("vm-b", VmState::Created)).unwrap();
        store.save(&record("vm-a", VmState::Created)).unwrap();
        store.save(&record("vm-b", VmState::Running)).unwrap();
        drop(store);
        let reopened = SqliteVmStore::open(&path).unwrap();
        let json = |records: Vec<VmRecord>| serde_json::to_value(records).unwrap();
        assert_eq!(json(reopened.load_all().unwrap()), json(vec![record("vm-a", VmState::Created), record("vm-b", VmState::Running)]));
        reopened.remove(&VmId::new("vm-a").unwrap()).unwrap();
        assert_eq!(json(reopened.load_all().unwrap()), json(vec![record("vm-b", VmState::Running)]));
    }
}
