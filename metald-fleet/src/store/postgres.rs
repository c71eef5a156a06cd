//! The fleet store several gateways share: a PostgreSQL database (also
//! reachable on engines that speak its protocol; `docs/architecture/components/gateway.md`
//! lists the SQL it relies on). Connections come from a small pool
//! (`deadpool-postgres`); each call takes one, so calls run side by side.
//!
//! A reservation locks its tenant's row (`SELECT … FOR UPDATE`) before it
//! counts the tenant's placements, so reservations of one tenant, from any
//! gateway, run one after another, and those of different tenants do not
//! wait for each other. Migrations run at start in one transaction under
//! an advisory lock, so gateways starting together apply each once.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{
    FleetStore, Held, HostMode, HostRecord, Idempotency, KeyRecord, Placement, PlacementStatus, Quota, Reservation, StoreError, Tenant,
    read, stored,
};

/// The schema, one migration per entry; `metald_schema_migrations` says which are applied.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        max_vms BIGINT,
        max_vcpus BIGINT,
        max_memory_bytes BIGINT,
        created_at_ms BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(id),
        digest BYTEA NOT NULL,
        label TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT,
        revoked_at_ms BIGINT,
        last_used_ms BIGINT
    );
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        mode TEXT NOT NULL,
        added_at_ms BIGINT NOT NULL
    );
    CREATE TABLE placements (
        vm_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        host TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        vcpus BIGINT NOT NULL,
        memory_bytes BIGINT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );
    CREATE INDEX placements_by_host ON placements(host);
    CREATE INDEX placements_by_tenant ON placements(tenant);
    CREATE TABLE idempotency (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        request_digest BYTEA NOT NULL,
        vm_id TEXT NOT NULL,
        PRIMARY KEY (tenant, key)
    );
",
    r"
    ALTER TABLE hosts ADD COLUMN announced_at_ms BIGINT;
",
];

/// The advisory lock migrations hold: any constant of our own.
const MIGRATION_LOCK: i64 = 0x6d65_7461_6c64_0001;

/// How many connections one gateway keeps at most.
const POOL_SIZE: usize = 16;

/// How long a call waits for a connection (to make or to free) before it is `unavailable`.
const CONNECTION_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct PostgresStore {
    /// Where the server is, without credentials, for errors.
    server: String,
    pool: Pool,
}

impl PostgresStore {
    /// Connects to the database `url` names (a libpq URL or key-value
    /// string; `password`, when given, instead of one in it) and applies
    /// the migrations it lacks.
    pub async fn open(url: &str, password: Option<&[u8]>) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|source| StoreError::Postgres { server: "(the configured URL)".to_owned(), source })?;
        let server = describe(&config);
        config.connect_timeout(CONNECTION_WAIT);
        if let Some(password) = password {
            config.password(password);
        }
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECTION_WAIT))
            .create_timeout(Some(CONNECTION_WAIT))
            .recycle_timeout(Some(CONNECTION_WAIT))
            .build()
            .map_err(|error| StoreError::PostgresUnreachable { server: server.clone(), reason: error.to_string() })?;
        let store = Self { server, pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(self.failed())?;
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(self.failed())?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS metald_schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
            )
            .await
            .map_err(self.failed())?;
        let applied: i32 = transaction
            .query_one("SELECT COALESCE(max(version), 0) FROM metald_schema_migrations", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(self.failed())?;
        for (version, migration) in (1i32..).zip(MIGRATIONS).filter(|(version, _)| *version > applied) {
            transaction.batch_execute(migration).await.map_err(self.failed())?;
            transaction
                .execute(
                    "INSERT INTO metald_schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                    &[&version, &stored(metald_types::time::unix_millis_now())],
                )
                .await
                .map_err(self.failed())?;
        }
        transaction.commit().await.map_err(self.failed())
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|error| match error {
            PoolError::Backend(source) => StoreError::Postgres { server: self.server.clone(), source },
            other => StoreError::PostgresUnreachable { server: self.server.clone(), reason: other.to_string() },
        })
    }

    fn failed(&self) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
        |source| StoreError::Postgres { server: self.server.clone(), source }
    }

    fn malformed(&self, what: &'static str, value: String) -> StoreError {
        StoreError::Malformed { path: self.server.clone(), what, value }
    }

    async fn one_key(&self, client: &impl GenericClient, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = client.query_opt(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"), &[&id]).await.map_err(self.failed())?;
        row.map(|row| self.key_row(&row)).transpose()
    }

    async fn one_placement(&self, client: &impl GenericClient, vm_id: &str) -> Result<Option<Placement>, StoreError> {
        let row = client
            .query_opt(&format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE vm_id = $1"), &[&vm_id])
            .await
            .map_err(self.failed())?;
        row.map(|row| self.placement_row(&row)).transpose()
    }

    fn key_row(&self, row: &Row) -> Result<KeyRecord, StoreError> {
        let digest: Vec<u8> = row.try_get(2).map_err(self.failed())?;
        let time = |index: usize| row.try_get::<_, Option<i64>>(index).map(|value| value.map(read));
        let record = (|| {
            Ok::<_, tokio_postgres::Error>(KeyRecord {
                id: row.try_get(0)?,
                tenant: row.try_get(1)?,
                digest: [0; 32],
                label: row.try_get(3)?,
                created_at_ms: read(row.try_get(4)?),
                expires_at_ms: time(5)?,
                revoked_at_ms: time(6)?,
                last_used_ms: time(7)?,
            })
        })()
        .map_err(self.failed())?;
        let digest = digest.as_slice().try_into().map_err(|_| self.malformed("key digest", hex::encode(&digest)))?;
        Ok(KeyRecord { digest, ..record })
    }

    fn host_row(&self, row: &Row) -> Result<HostRecord, StoreError> {
        let mode: String = row.try_get(2).map_err(self.failed())?;
        let mode = HostMode::from_name(&mode).ok_or_else(|| self.malformed("host mode", mode.clone()))?;
        let record = (|| {
            Ok::<_, tokio_postgres::Error>(HostRecord {
                name: row.try_get(0)?,
                url: row.try_get(1)?,
                mode,
                added_at_ms: read(row.try_get(3)?),
                announced_at_ms: row.try_get::<_, Option<i64>>(4)?.map(read),
            })
        })();
        record.map_err(self.failed())
    }

    fn placement_row(&self, row: &Row) -> Result<Placement, StoreError> {
        let (status, reason): (String, String) = (row.try_get(3).map_err(self.failed())?, row.try_get(4).map_err(self.failed())?);
        let status = PlacementStatus::from_columns(&status, reason).ok_or_else(|| self.malformed("placement status", status.clone()))?;
        let placement = (|| {
            Ok::<_, tokio_postgres::Error>(Placement {
                vm_id: row.try_get(0)?,
                tenant: row.try_get(1)?,
                host: row.try_get(2)?,
                status,
                vcpus: read(row.try_get(5)?),
                memory_bytes: read(row.try_get(6)?),
                created_at_ms: read(row.try_get(7)?),
            })
        })();
        placement.map_err(self.failed())
    }
}

/// `host:port/dbname` of a connection's settings: what errors name, never its password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("(default database)"))
}

fn tenant_row(row: &Row) -> Result<Tenant, tokio_postgres::Error> {
    let limit = |index: usize| row.try_get::<_, Option<i64>>(index).map(|value| value.map(read));
    Ok(Tenant {
        id: row.try_get(0)?,
        quota: Quota { max_vms: limit(1)?, max_vcpus: limit(2)?, max_memory_bytes: limit(3)? },
        created_at_ms: read(row.try_get(4)?),
    })
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

const TENANT_COLUMNS: &str = "id, max_vms, max_vcpus, max_memory_bytes, created_at_ms";
const KEY_COLUMNS: &str = "id, tenant, digest, label, created_at_ms, expires_at_ms, revoked_at_ms, last_used_ms";
const HOST_COLUMNS: &str = "name, url, mode, added_at_ms, announced_at_ms";
const PLACEMENT_COLUMNS: &str = "vm_id, tenant, host, status, reason, vcpus, memory_bytes, created_at_ms";

#[async_trait::async_trait]
impl FleetStore for PostgresStore {
    async fn create_tenant(&self, tenant: Tenant) -> Result<(), StoreError> {
        let client = self.client().await?;
        let quota = tenant.quota;
        let inserted = client
            .execute(
                &format!("INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"),
                &[
                    &tenant.id,
                    &quota.max_vms.map(stored),
                    &quota.max_vcpus.map(stored),
                    &quota.max_memory_bytes.map(stored),
                    &stored(tenant.created_at_ms),
                ],
            )
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(error) if is_unique_violation(&error) => Err(StoreError::TenantExists(tenant.id)),
            Err(error) => Err(self.failed()(error)),
        }
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"), &[&id]).await.map_err(self.failed())?;
        row.map(|row| tenant_row(&row)).transpose().map_err(self.failed())
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let client = self.client().await?;
        let rows =
            client.query(&format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id COLLATE \"C\""), &[]).await.map_err(self.failed())?;
        rows.iter().map(tenant_row).collect::<Result<_, _>>().map_err(self.failed())
    }

    async fn set_quota(&self, id: &str, quota: Quota) -> Result<Tenant, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("UPDATE tenants SET max_vms = $2, max_vcpus = $3, max_memory_bytes = $4 WHERE id = $1 RETURNING {TENANT_COLUMNS}"),
                &[&id, &quota.max_vms.map(stored), &quota.max_vcpus.map(stored), &quota.max_memory_bytes.map(stored)],
            )
            .await
            .map_err(self.failed())?;
        let row = row.ok_or_else(|| StoreError::NoSuchTenant(id.to_owned()))?;
        tenant_row(&row).map_err(self.failed())
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                &format!(
                    "INSERT INTO api_keys ({KEY_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM tenants WHERE id = $2)"
                ),
                &[
                    &key.id,
                    &key.tenant,
                    &key.digest.as_slice(),
                    &key.label,
                    &stored(key.created_at_ms),
                    &key.expires_at_ms.map(stored),
                    &key.revoked_at_ms.map(stored),
                    &key.last_used_ms.map(stored),
                ],
            )
            .await
            .map_err(self.failed())?;
        if inserted == 0 {
            return Err(StoreError::NoSuchTenant(key.tenant));
        }
        Ok(())
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let client = self.client().await?;
        self.one_key(&client, id).await
    }

    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE $1::TEXT IS NULL OR tenant = $1 ORDER BY created_at_ms, id COLLATE \"C\""
                ),
                &[&tenant],
            )
            .await
            .map_err(self.failed())?;
        rows.iter().map(|row| self.key_row(row)).collect()
    }

    async fn revoke_key(&self, id: &str, at_ms: u64) -> Result<KeyRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1 RETURNING {KEY_COLUMNS}"),
                &[&id, &stored(at_ms)],
            )
            .await
            .map_err(self.failed())?;
        let row = row.ok_or_else(|| StoreError::NoSuchKey(id.to_owned()))?;
        self.key_row(&row)
    }

    async fn record_key_uses(&self, uses: Vec<(String, u64)>) -> Result<(), StoreError> {
        let client = self.client().await?;
        let (ids, times): (Vec<String>, Vec<i64>) = uses.into_iter().map(|(id, at_ms)| (id, stored(at_ms))).unzip();
        client
            .execute(
                "UPDATE api_keys SET last_used_ms = GREATEST(COALESCE(last_used_ms, 0), uses.at_ms) \
                 FROM unnest($1::TEXT[], $2::BIGINT[]) AS uses(id, at_ms) WHERE api_keys.id = uses.id",
                &[&ids, &times],
            )
            .await
            .map_err(self.failed())?;
        Ok(())
    }

    async fn add_host(&self, host: HostRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                &format!("INSERT INTO hosts ({HOST_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"),
                &[&host.name, &host.url, &host.mode.name(), &stored(host.added_at_ms), &host.announced_at_ms.map(stored)],
            )
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(error) if is_unique_violation(&error) => Err(StoreError::HostExists(host.name)),
            Err(error) => Err(self.failed()(error)),
        }
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let client = self.client().await?;
        let rows =
            client.query(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name COLLATE \"C\""), &[]).await.map_err(self.failed())?;
        rows.iter().map(|row| self.host_row(row)).collect()
    }

    async fn set_host_mode(&self, name: &str, mode: HostMode) -> Result<HostRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("UPDATE hosts SET mode = $2 WHERE name = $1 RETURNING {HOST_COLUMNS}"), &[&name, &mode.name()])
            .await
            .map_err(self.failed())?;
        let row = row.ok_or_else(|| StoreError::NoSuchHost(name.to_owned()))?;
        self.host_row(&row)
    }

    async fn announce_host(&self, name: &str, url: &str, at_ms: u64) -> Result<HostRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO hosts ({HOST_COLUMNS}) VALUES ($1, $2, 'active', $3, $3) \
                     ON CONFLICT (name) DO UPDATE SET url = excluded.url, announced_at_ms = excluded.announced_at_ms \
                     RETURNING {HOST_COLUMNS}"
                ),
                &[&name, &url, &stored(at_ms)],
            )
            .await
            .map_err(self.failed())?;
        self.host_row(&row)
    }

    async fn remove_host(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(self.failed())?;
        // Locking the host's row keeps a placement from landing on it while we count.
        let found = transaction.query_opt("SELECT 1 FROM hosts WHERE name = $1 FOR UPDATE", &[&name]).await.map_err(self.failed())?;
        if found.is_none() {
            return Err(StoreError::NoSuchHost(name.to_owned()));
        }
        let vms: i64 = transaction
            .query_one("SELECT count(*) FROM placements WHERE host = $1", &[&name])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(self.failed())?;
        if vms > 0 && !force {
            return Err(StoreError::HostNotEmpty { host: name.to_owned(), vms: read(vms) });
        }
        transaction.execute("DELETE FROM hosts WHERE name = $1", &[&name]).await.map_err(self.failed())?;
        transaction.commit().await.map_err(self.failed())
    }

    async fn reserve_placement(
        &self,
        placement: Placement,
        quota: Quota,
        idempotency: Option<Idempotency>,
    ) -> Result<Reservation, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(self.failed())?;
        let tenant =
            transaction.query_opt("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", &[&placement.tenant]).await.map_err(self.failed())?;
        if tenant.is_none() {
            return Err(StoreError::NoSuchTenant(placement.tenant));
        }
        if let Some(idempotency) = &idempotency {
            let earlier = transaction
                .query_opt(
                    "SELECT request_digest, vm_id FROM idempotency WHERE tenant = $1 AND key = $2",
                    &[&placement.tenant, &idempotency.key],
                )
                .await
                .map_err(self.failed())?;
            if let Some(earlier) = earlier {
                let digest: Vec<u8> = earlier.try_get(0).map_err(self.failed())?;
                let vm_id: String = earlier.try_get(1).map_err(self.failed())?;
                if digest != idempotency.request_digest {
                    return Err(StoreError::IdempotencyKeyReused { key: idempotency.key.clone() });
                }
                let existing = self.one_placement(&transaction, &vm_id).await?;
                return existing.map(Reservation::Existing).ok_or_else(|| self.malformed("idempotency record without its VM", vm_id));
            }
        }
        let held = transaction
            .query_one(
                "SELECT count(*), COALESCE(sum(vcpus), 0)::BIGINT, COALESCE(sum(memory_bytes), 0)::BIGINT FROM placements \
                 WHERE tenant = $1 AND status != 'lost'",
                &[&placement.tenant],
            )
            .await
            .and_then(|row| Ok(Held { vms: read(row.try_get(0)?), vcpus: read(row.try_get(1)?), memory_bytes: read(row.try_get(2)?) }))
            .map_err(self.failed())?;
        quota.admit(held, &placement)?;
        let (status, reason) = placement.status.columns();
        let inserted = transaction
            .execute(
                &format!("INSERT INTO placements ({PLACEMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
                &[
                    &placement.vm_id,
                    &placement.tenant,
                    &placement.host,
                    &status,
                    &reason,
                    &stored(placement.vcpus),
                    &stored(placement.memory_bytes),
                    &stored(placement.created_at_ms),
                ],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => return Err(StoreError::VmExists(placement.vm_id)),
            Err(error) => return Err(self.failed()(error)),
        }
        if let Some(idempotency) = idempotency {
            transaction
                .execute(
                    "INSERT INTO idempotency (tenant, key, request_digest, vm_id) VALUES ($1, $2, $3, $4)",
                    &[&placement.tenant, &idempotency.key, &idempotency.request_digest.as_slice(), &placement.vm_id],
                )
                .await
                .map_err(self.failed())?;
        }
        transaction.commit().await.map_err(self.failed())?;
        Ok(Reservation::Reserved)
    }

    async fn placement(&self, vm_id: &str) -> Result<Option<Placement>, StoreError> {
        let client = self.client().await?;
        self.one_placement(&client, vm_id).await
    }

    async fn update_placement(&self, vm_id: &str, host: &str, status: PlacementStatus) -> Result<(), StoreError> {
        let client = self.client().await?;
        let (status, reason) = status.columns();
        client
            .execute("UPDATE placements SET host = $2, status = $3, reason = $4 WHERE vm_id = $1", &[&vm_id, &host, &status, &reason])
            .await
            .map_err(self.failed())?;
        Ok(())
    }

    async fn remove_placement(&self, vm_id: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(self.failed())?;
        transaction.execute("DELETE FROM idempotency WHERE vm_id = $1", &[&vm_id]).await.map_err(self.failed())?;
        transaction.execute("DELETE FROM placements WHERE vm_id = $1", &[&vm_id]).await.map_err(self.failed())?;
        transaction.commit().await.map_err(self.failed())
    }

    async fn placements(&self, host: Option<&str>) -> Result<Vec<Placement>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE $1::TEXT IS NULL OR host = $1 ORDER BY vm_id COLLATE \"C\""),
                &[&host],
            )
            .await
            .map_err(self.failed())?;
        rows.iter().map(|row| self.placement_row(row)).collect()
    }

    async fn lost_placements(&self, tenant: &str) -> Result<Vec<Placement>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {PLACEMENT_COLUMNS} FROM placements WHERE tenant = $1 AND status = 'lost' ORDER BY vm_id COLLATE \"C\""),
                &[&tenant],
            )
            .await
            .map_err(self.failed())?;
        rows.iter().map(|row| self.placement_row(row)).collect()
    }
}
