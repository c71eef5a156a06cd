//! The embedded fleet store: one SQLite file in the gateway's data folder.
//! Calls run on blocking threads, one at a time; a reservation is one
//! `BEGIN IMMEDIATE` transaction, so its quota check and its write see
//! the same placements.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    FleetStore, Held, HostMode, HostRecord, Idempotency, KeyRecord, Placement, PlacementStatus, Quota, Reservation, StoreError, Tenant,
    read, stored,
};

/// The schema, one migration per entry; `PRAGMA user_version` says how many are applied.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        max_vms INTEGER,
        max_vcpus INTEGER,
        max_memory_bytes INTEGER,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(id),
        digest BLOB NOT NULL,
        label TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        revoked_at_ms INTEGER,
        last_used_ms INTEGER
    );
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        mode TEXT NOT NULL,
        added_at_ms INTEGER NOT NULL
    );
    CREATE TABLE placements (
        vm_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        host TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        vcpus INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE INDEX placements_by_host ON placements(host);
    CREATE INDEX placements_by_tenant ON placements(tenant);
    CREATE TABLE idempotency (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        request_digest BLOB NOT NULL,
        vm_id TEXT NOT NULL,
        PRIMARY KEY (tenant, key)
    );
",
    r"
    ALTER TABLE hosts ADD COLUMN announced_at_ms INTEGER;
",
];

#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (or makes) the store at `path` and applies the migrations it lacks.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let failed = |source| StoreError::Sqlite { path: path.display().to_string(), source };
        let mut connection = Connection::open(path).map_err(failed)?;
        connection.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(failed)?;
        connection.busy_timeout(std::time::Duration::from_secs(10)).map_err(failed)?;
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Exclusive).map_err(failed)?;
        let applied: i64 = transaction.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(failed)?;
        for (version, migration) in (1i64..).zip(MIGRATIONS).filter(|(version, _)| *version > applied) {
            transaction.execute_batch(migration).map_err(failed)?;
            transaction.pragma_update(None, "user_version", version).map_err(failed)?;
        }
        transaction.commit().map_err(failed)?;
        Ok(Self { path: path.to_path_buf(), connection: Arc::new(Mutex::new(connection)) })
    }

    /// Runs `work` on a blocking thread with the connection.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let connection = Arc::clone(&self.connection);
        let path = self.path.display().to_string();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut connection, &path)
        })
        .await
        .map_err(|_| StoreError::WorkerGone)?
    }
}

fn sqlite(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_owned(), source }
}

const TENANT_COLUMNS: &str = "id, max_vms, max_vcpus, max_memory_bytes, created_at_ms";

fn tenant_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Tenant> {
    let limit = |index: usize| row.get::<_, Option<i64>>(index).map(|value| value.map(read));
    Ok(Tenant {
        id: row.get(0)?,
        quota: Quota { max_vms: limit(1)?, max_vcpus: limit(2)?, max_memory_bytes: limit(3)? },
        created_at_ms: read(row.get(4)?),
    })
}

const KEY_COLUMNS: &str = "id, tenant, digest, label, created_at_ms, expires_at_ms, revoked_at_ms, last_used_ms";

fn key_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(KeyRecord, Vec<u8>)> {
    let digest: Vec<u8> = row.get(2)?;
    let time = |index: usize| row.get::<_, Option<i64>>(index).map(|value| value.map(read));
    let record = KeyRecord {
        id: row.get(0)?,
        tenant: row.get(1)?,
        digest: [0; 32],
        label: row.get(3)?,
        created_at_ms: read(row.get(4)?),
        expires_at_ms: time(5)?,
        revoked_at_ms: time(6)?,
        last_used_ms: time(7)?,
    };
    Ok((record, digest))
}

fn with_digest(path: &str, (mut record, digest): (KeyRecord, Vec<u8>)) -> Result<KeyRecord, StoreError> {
    record.digest = digest.as_slice().try_into().map_err(|_| StoreError::Malformed {
        path: path.to_owned(),
        what: "key digest",
        value: hex::encode(&digest),
    })?;
    Ok(record)
}

const HOST_COLUMNS: &str = "name, url, mode, added_at_ms, announced_at_ms";

fn host_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(HostRecord, String)> {
    let mode: String = row.get(2)?;
    let record = HostRecord {
        name: row.get(0)?,
        url: row.get(1)?,
        mode: HostMode::Active,
        added_at_ms: read(row.get(3)?),
        announced_at_ms: row.get::<_, Option<i64>>(4)?.map(read),
    };
    Ok((record, mode))
}

fn with_mode(path: &str, (mut record, mode): (HostRecord, String)) -> Result<HostRecord, StoreError> {
    record.mode = HostMode::from_name(&mode).ok_or(StoreError::Malformed { path: path.to_owned(), what: "host mode", value: mode })?;
    Ok(record)
}

const PLACEMENT_COLUMNS: &str = "vm_id, tenant, host, status, reason, vcpus, memory_bytes, created_at_ms";

fn placement_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Placement, String, String)> {
    let placement = Placement {
        vm_id: row.get(0)?,
        tenant: row.get(1)?,
        host: row.get(2)?,
        status: PlacementStatus::Pending,
        vcpus: read(row.get(5)?),
        memory_bytes: read(row.get(6)?),
        created_at_ms: read(row.get(7)?),
    };
    Ok((placement, row.get(3)?, row.get(4)?))
}

fn with_status(path: &str, (mut placement, status, reason): (Placement, String, String)) -> Result<Placement, StoreError> {
    placement.status = PlacementStatus::from_columns(&status, reason).ok_or_else(|| StoreError::Malformed {
        path: path.to_owned(),
        what: "placement status",
        value: status,
    })?;
    Ok(placement)
}

fn is_constraint(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(failure, _) if failure.code == rusqlite::ErrorCode::ConstraintViolation)
}

#[async_trait::async_trait]
impl FleetStore for SqliteStore {
    async fn create_tenant(&self, tenant: Tenant) -> Result<(), StoreError> {
        self.run(move |connection, path| {
            let quota = tenant.quota;
            let inserted = connection.execute(
                "INSERT INTO tenants (id, max_vms, max_vcpus, max_memory_bytes, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    tenant.id,
                    quota.max_vms.map(stored),
                    quota.max_vcpus.map(stored),
                    quota.max_memory_bytes.map(stored),
                    stored(tenant.created_at_ms)
                ],
            );
            match inserted {
                Ok(_) => Ok(()),
                Err(error) if is_constraint(&error) => Err(StoreError::TenantExists(tenant.id)),
                Err(error) => Err(sqlite(path)(error)),
            }
        })
        .await
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let id = id.to_owned();
        self.run(move |connection, path| {
            connection
                .query_row(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"), [id], tenant_row)
                .optional()
                .map_err(sqlite(path))
        })
        .await
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.run(move |connection, path| {
            let mut statement = connection.prepare(&format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id")).map_err(sqlite(path))?;
            let rows = statement.query_map([], tenant_row).map_err(sqlite(path))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sqlite(path))
        })
        .await
    }

    async fn set_quota(&self, id: &str, quota: Quota) -> Result<Tenant, StoreError> {
        let id = id.to_owned();
        self.run(move |connection, path| {
            let changed = connection
                .execute(
                    "UPDATE tenants SET max_vms = ?2, max_vcpus = ?3, max_memory_bytes = ?4 WHERE id = ?1",
                    params![id, quota.max_vms.map(stored), quota.max_vcpus.map(stored), quota.max_memory_bytes.map(stored)],
                )
                .map_err(sqlite(path))?;
            if changed == 0 {
                return Err(StoreError::NoSuchTenant(id));
            }
            connection.query_row(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"), [id], tenant_row).map_err(sqlite(path))
        })
        .await
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError> {
        self.run(move |connection, path| {
            let known: bool = connection
                .query_row("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = ?1)", [&key.tenant], |row| row.get(0))
                .map_err(sqlite(path))?;
            if !known {
                return Err(StoreError::NoSuchTenant(key.tenant));
            }
            connection
                .execute(
                    &format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                    params![
                        key.id,
                        key.tenant,
                        key.digest.to_vec(),
                        key.label,
                        stored(key.created_at_ms),
                        key.expires_at_ms.map(stored),
                        key.revoked_at_ms.map(stored),
                        key.last_used_ms.map(stored)
                    ],
                )
                .map_err(sqlite(path))?;
            Ok(())
        })
        .await
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_owned();
        self.run(move |connection, path| {
            let row = connection
                .query_row(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"), [id], key_row)
                .optional()
                .map_err(sqlite(path))?;
            row.map(|row| with_digest(path, row)).transpose()
        })
        .await
    }

    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let tenant = tenant.map(str::to_owned);
        self.run(move |connection, path| {
            let mut statement = connection
                .prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at_ms, id"))
                .map_err(sqlite(path))?;
            let rows = statement.query_map([tenant], key_row).map_err(sqlite(path))?;
            rows.map(|row| row.map_err(sqlite(path)).and_then(|row| with_digest(path, row))).collect()
        })
        .await
    }

    async fn revoke_key(&self, id: &str, at_ms: u64) -> Result<KeyRecord, StoreError> {
        let id = id.to_owned();
        self.run(move |connection, path| {
            connection
                .execute("UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1", params![id, stored(at_ms)])
                .map_err(sqlite(path))?;
            let row = connection
                .query_row(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"), [&id], key_row)
                .optional()
                .map_err(sqlite(path))?;
            match row {
                Some(row) => with_digest(path, row),
                None => Err(StoreError::NoSuchKey(id)),
            }
        })
        .await
    }

    async fn record_key_uses(&self, uses: Vec<(String, u64)>) -> Result<(), StoreError> {
        self.run(move |connection, path| {
            let transaction = connection.transaction().map_err(sqlite(path))?;
            for (id, at_ms) in uses {
                transaction
                    .execute(
                        "UPDATE api_keys SET last_used_ms = MAX(COALESCE(last_used_ms, 0), ?2) WHERE id = ?1",
                        params![id, stored(at_ms)],
                    )
                    .map_err(sqlite(path))?;
            }
            transaction.commit().map_err(sqlite(path))
        })
        .await
    }

    async fn add_host(&self, host: HostRecord) -> Result<(), StoreError> {
        self.run(move |connection, path| {
            let inserted = connection.execute(
                &format!("INSERT INTO hosts ({HOST_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![host.name, host.url, host.mode.name(), stored(host.added_at_ms), host.announced_at_ms.map(stored)],
            );
            match inserted {
                Ok(_) => Ok(()),
                Err(error) if is_constraint(&error) => Err(StoreError::HostExists(host.name)),
                Err(error) => Err(sqlite(path)(error)),
            }
        })
        .await
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.run(move |connection, path| {
            let mut statement = connection.prepare(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name")).map_err(sqlite(path))?;
            let rows = statement.query_map([], host_row).map_err(sqlite(path))?;
            rows.map(|row| row.map_err(sqlite(path)).and_then(|row| with_mode(path, row))).collect()
        })
        .await
    }

    async fn set_host_mode(&self, name: &str, mode: HostMode) -> Result<HostRecord, StoreError> {
        let name = name.to_owned();
        self.run(move |connection, path| {
            connection.execute("UPDATE hosts SET mode = ?2 WHERE name = ?1", params![name, mode.name()]).map_err(sqlite(path))?;
            let row = connection
                .query_row(&format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1"), [&name], host_row)
                .optional()
                .map_err(sqlite(path))?;
            match row {
                Some(row) => with_mode(path, row),
                None => Err(StoreError::NoSuchHost(name)),
            }
        })
        .await
    }

    async fn announce_host(&self, name: &str, url: &str, at_ms: u64) -> Result<HostRecord, StoreError> {
        let (name, url) = (name.to_owned(), url.to_owned());
        self.run(move |connection, path| {
            let row = connection
                .query_row(
                    &format!(
                        "INSERT INTO hosts ({HOST_COLUMNS}) VALUES (?1, ?2, 'active', ?3, ?3) \
                         ON CONFLICT (name) DO UPDATE SET url = excluded.url, announced_at_ms = excluded.announced_at_ms \
                         RETURNING {HOST_COLUMNS}"
                    ),
                    params![name, url, stored(at_ms)],
                    host_row,
                )
                .map_err(sqlite(path))?;
            with_mode(path, row)
        })
        .await
    }

    async fn remove_host(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.run(move |connection, path| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(path))?;
            let vms: i64 = transaction
                .query_row("SELECT count(*) FROM placements WHERE host = ?1", [&name], |row| row.get(0))
                .map_err(sqlite(path))?;
            if vms > 0 && !force {
                return Err(StoreError::HostNotEmpty { host: name, vms: read(vms) });
            }
            let removed = transaction.execute("DELETE FROM hosts WHERE name = ?1", [&name]).map_err(sqlite(path))?;
            if removed == 0 {
                return Err(StoreError::NoSuchHost(name));
            }
            transaction.commit().map_err(sqlite(path))
        })
        .await
    }

    async fn reserve_placement(
        &self,
        placement: Placement,
        quota: Quota,
        idempotency: Option<Idempotency>,
    ) -> Result<Reservation, StoreError> {
        self.run(move |connection, path| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(path))?;
            let known: bool = transaction
                .query_row("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = ?1)", [&placement.tenant], |row| row.get(0))
                .map_err(sqlite(path))?;
            if !known {
                return Err(StoreError::NoSuchTenant(placement.tenant));
            }
            if let Some(idempotency) = &idempotency {
                let earlier: Option<(Vec<u8>, String)> = transaction
                    .query_row(
                        "SELECT request_digest, vm_id FROM idempotency WHERE tenant = ?1 AND key = ?2",
                        params![placement.tenant, idempotency.key],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()
                    .map_err(sqlite(path))?;
                if let Some((digest, vm_id)) = earlier {
                    if digest != idempotency.request_digest {
                        return Err(StoreError::IdempotencyKeyReused { key: idempotency.key.clone() });
                    }
                    let row = transaction
                        .query_row(&format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE vm_id = ?1"), [&vm_id], placement_row)
                        .map_err(sqlite(path))?;
                    return Ok(Reservation::Existing(with_status(path, row)?));
                }
            }
            let (vms, vcpus, memory): (i64, i64, i64) = transaction
                .query_row(
                    "SELECT count(*), COALESCE(sum(vcpus), 0), COALESCE(sum(memory_bytes), 0) FROM placements \
                     WHERE tenant = ?1 AND status != 'lost'",
                    [&placement.tenant],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .map_err(sqlite(path))?;
            quota.admit(Held { vms: read(vms), vcpus: read(vcpus), memory_bytes: read(memory) }, &placement)?;
            let (status, reason) = placement.status.columns();
            let inserted = transaction.execute(
                &format!("INSERT INTO placements ({PLACEMENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![
                    placement.vm_id,
                    placement.tenant,
                    placement.host,
                    status,
                    reason,
                    stored(placement.vcpus),
                    stored(placement.memory_bytes),
                    stored(placement.created_at_ms)
                ],
            );
            match inserted {
                Ok(_) => {}
                Err(error) if is_constraint(&error) => return Err(StoreError::VmExists(placement.vm_id)),
                Err(error) => return Err(sqlite(path)(error)),
            }
            if let Some(idempotency) = idempotency {
                transaction
                    .execute(
                        "INSERT INTO idempotency (tenant, key, request_digest, vm_id) VALUES (?1, ?2, ?3, ?4)",
                        params![placement.tenant, idempotency.key, idempotency.request_digest.to_vec(), placement.vm_id],
                    )
                    .map_err(sqlite(path))?;
            }
            transaction.commit().map_err(sqlite(path))?;
            Ok(Reservation::Reserved)
        })
        .await
    }

    async fn placement(&self, vm_id: &str) -> Result<Option<Placement>, StoreError> {
        let vm_id = vm_id.to_owned();
        self.run(move |connection, path| {
            let row = connection
                .query_row(&format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE vm_id = ?1"), [vm_id], placement_row)
                .optional()
                .map_err(sqlite(path))?;
            row.map(|row| with_status(path, row)).transpose()
        })
        .await
    }

    async fn update_placement(&self, vm_id: &str, host: &str, status: PlacementStatus) -> Result<(), StoreError> {
        let (vm_id, host) = (vm_id.to_owned(), host.to_owned());
        self.run(move |connection, path| {
            let (status, reason) = status.columns();
            connection
                .execute("UPDATE placements SET host = ?2, status = ?3, reason = ?4 WHERE vm_id = ?1", params![vm_id, host, status, reason])
                .map_err(sqlite(path))?;
            Ok(())
        })
        .await
    }

    async fn remove_placement(&self, vm_id: &str) -> Result<(), StoreError> {
        let vm_id = vm_id.to_owned();
        self.run(move |connection, path| {
            let transaction = connection.transaction().map_err(sqlite(path))?;
            transaction.execute("DELETE FROM idempotency WHERE vm_id = ?1", [&vm_id]).map_err(sqlite(path))?;
            transaction.execute("DELETE FROM placements WHERE vm_id = ?1", [&vm_id]).map_err(sqlite(path))?;
            transaction.commit().map_err(sqlite(path))
        })
        .await
    }

    async fn placements(&self, host: Option<&str>) -> Result<Vec<Placement>, StoreError> {
        let host = host.map(str::to_owned);
        self.run(move |connection, path| {
            let mut statement = connection
                .prepare(&format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE ?1 IS NULL OR host = ?1 ORDER BY vm_id"))
                .map_err(sqlite(path))?;
            let rows = statement.query_map([host], placement_row).map_err(sqlite(path))?;
            rows.map(|row| row.map_err(sqlite(path)).and_then(|row| with_status(path, row))).collect()
        })
        .await
    }

    async fn lost_placements(&self, tenant: &str) -> Result<Vec<Placement>, StoreError> {
        let tenant = tenant.to_owned();
        self.run(move |connection, path| {
            let mut statement = connection
                .prepare(&format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE tenant = ?1 AND status = 'lost' ORDER BY vm_id"))
                .map_err(sqlite(path))?;
            let rows = statement.query_map([tenant], placement_row).map_err(sqlite(path))?;
            rows.map(|row| row.map_err(sqlite(path)).and_then(|row| with_status(path, row))).collect()
        })
        .await
    }
}
