//! ClickHouse: the schema metald writes to (versioned migrations applied at
//! start, idempotent), the sink that writes usage records there exactly
//! once, and the queries a finance team would run.
//!
//! Exactly once: a record's identity is (tenant, VM, sequence). The sink
//! looks up which of a batch's identities the table already has and
//! inserts only the others, in one INSERT; the raw table is a
//! ReplacingMergeTree keyed by that identity, so even a duplicate that got
//! past the lookup collapses on merge, and the raw queries read with FINAL.
//! The rollups (hourly and daily, per VM) are fed by materialized views
//! from what is inserted, so they count each interval once because no
//! interval is inserted twice. One gap remains in ClickHouse itself: an
//! insert can die after its raw part is written and before every view has
//! run. The host then sends the batch again, the lookup finds the records,
//! and the sink brings those VMs' rollup buckets up to the raw table
//! before answering. The per-tenant rollups are views that sum the per-VM
//! ones, so that repair reaches them too, without racing other hosts'
//! inserts for the same tenant. The lookup and the repair are safe with
//! one writer per VM at a time, which the spool's in-order delivery and
//! the billing service's per-host lock give.
//!
//! Everything here works on ClickHouse 18.16 and on current ClickHouse:
//! millisecond times are UInt64, and extras such as TTL are applied only
//! where the server supports them.

use std::collections::HashSet;

use async_trait::async_trait;
use clickhouse::Client;
use serde::{Deserialize, Serialize};

use crate::record::{HostHeartbeat, UsageGap, UsageRecord};
use crate::sink::{Batch, BillingSink, Delivered, SinkError};
use crate::summary::{SummaryError, TenantUsage, UsageHistory, UsageWindow};

/// The raw table.
pub const USAGE_TABLE: &str = "usage_intervals";

/// How often, and how far apart, a resent batch looks for an earlier insert still running.
const EARLIER_INSERT_CHECKS: u32 = 50;
const EARLIER_INSERT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The start of the query id of every insert of a host's usage.
fn usage_insert_prefix(host_id: &str) -> String {
    format!("metald-usage-{host_id}-")
}

/// Unique among this process's inserts and across its restarts.
fn unique_suffix() -> String {
    static INSERTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = INSERTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_nanos()).unwrap_or(0);
    format!("{}-{started:x}-{count}", std::process::id())
}

/// VMs per rollup repair query, to stay under `max_query_size`.
const RECONCILE_VMS: usize = 1_000;

/// The most query text one identity lookup sends.
const LOOKUP_QUERY_BYTES: usize = 200 * 1024;

/// One migration: statements run in order, each idempotent.
struct Migration {
    version: u32,
    description: &'static str,
    /// The oldest server (major, minor) it runs on; older ones skip it and try again at the next start.
    requires: (u32, u32),
    statements: fn(&str) -> Vec<String>,
}

/// How a figure is summed from raw rows: the one spelling of each, for
/// the rollups and the shipped queries alike.
mod raw_sums {
    pub const INTERVALS: &str = "count()";
    pub const DURATION_MS: &str = "sum(toUInt64(end_ms - start_ms))";
    pub const VCPU_MS: &str = "sum(toUInt64(vcpus * (end_ms - start_ms)))";
    pub const MEMORY_MIB_MS: &str = "sum(toUInt64(intDiv(memory_bytes, 1048576) * (end_ms - start_ms)))";
    pub const MEMORY_LIMIT_KIB_MS: &str = "sum(toUInt64(intDiv(memory_limit_bytes, 1024) * (end_ms - start_ms)))";
    pub const MEMORY_RESIDENT_KIB_MS: &str = "sum(toUInt64(intDiv(memory_bytes, 1024) * (end_ms - start_ms)))";
}

/// What every rollup sums, and how from a raw row.
const MEASURES: &[(&str, &str)] = &[
    ("intervals", raw_sums::INTERVALS),
    ("duration_ms", raw_sums::DURATION_MS),
    ("cpu_ns", "sum(cpu_ns)"),
    ("vcpu_ms", raw_sums::VCPU_MS),
    ("memory_mib_ms", raw_sums::MEMORY_MIB_MS),
    ("net_rx_bytes", "sum(net_rx_bytes)"),
    ("net_tx_bytes", "sum(net_tx_bytes)"),
    ("net_rx_packets", "sum(net_rx_packets)"),
    ("net_tx_packets", "sum(net_tx_packets)"),
    ("block_read_bytes", "sum(block_read_bytes)"),
    ("block_write_bytes", "sum(block_write_bytes)"),
    ("block_read_ops", "sum(block_read_ops)"),
    ("block_write_ops", "sum(block_write_ops)"),
];

/// A per-VM rollup table: `bucket` (hour or day) of `start_ms`.
#[derive(Debug, Clone, Copy)]
struct Rollup {
    table: &'static str,
    /// The tenant-level view over it.
    tenant_view: &'static str,
    bucket: &'static str,
    bucket_type: &'static str,
    /// The bucket of a raw row.
    expression: &'static str,
    bucket_ms: u64,
}

const ROLLUPS: [Rollup; 2] = [
    Rollup {
        table: "usage_hourly_vm",
        tenant_view: "usage_hourly_tenant",
        bucket: "hour",
        bucket_type: "DateTime('UTC')",
        expression: "toStartOfHour(toDateTime(intDiv(start_ms, 1000), 'UTC'))",
        bucket_ms: 3_600_000,
    },
    Rollup {
        table: "usage_daily_vm",
        tenant_view: "usage_daily_tenant",
        bucket: "day",
        bucket_type: "Date",
        expression: "toDate(toDateTime(intDiv(start_ms, 1000), 'UTC'))",
        bucket_ms: 86_400_000,
    },
];

impl Rollup {
    fn create(&self, db: &str) -> Vec<String> {
        let Rollup { table, tenant_view, bucket, bucket_type, expression, .. } = self;
        let columns: Vec<String> = MEASURES.iter().map(|(name, _)| format!("{name} UInt64")).collect();
        let sums: Vec<String> = MEASURES.iter().map(|(name, sum)| format!("{sum} AS {name}")).collect();
        let resums: Vec<String> = MEASURES.iter().map(|(name, _)| format!("sum({name}) AS {name}")).collect();
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.{table} ({bucket} {bucket_type}, tenant_id String, vm_id String, {})
                 ENGINE = SummingMergeTree() PARTITION BY toYYYYMM({bucket}) ORDER BY (tenant_id, {bucket}, vm_id)",
                columns.join(", ")
            ),
            format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{table}_mv TO {db}.{table} AS
                 SELECT {expression} AS {bucket}, tenant_id, vm_id, {} FROM {db}.{USAGE_TABLE} GROUP BY {bucket}, tenant_id, vm_id",
                sums.join(", ")
            ),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{tenant_view} AS
                 SELECT {bucket}, tenant_id, {} FROM {db}.{table} GROUP BY {bucket}, tenant_id",
                resums.join(", ")
            ),
        ]
    }

    /// Adds to this rollup what the raw table holds for `vms`' buckets
    /// from `from_ms` to `to_ms` and the rollup lacks: the rows of an insert
    /// whose materialized views did not all run (the server died between
    /// writing the raw part and pushing it to the views). One writer per VM
    /// makes the comparison safe. The subqueries are named because current
    /// ClickHouse requires it of a join. Binds: the (tenant, VM) pairs, the span,
    /// the pairs again, the span again.
    fn reconcile(&self, db: &str, vms: usize) -> String {
        let Rollup { table, bucket, expression, .. } = self;
        let raw: Vec<String> = MEASURES.iter().map(|(name, sum)| format!("{sum} AS raw_{name}")).collect();
        let rolled: Vec<String> = MEASURES.iter().map(|(name, _)| format!("sum({name}) AS rolled_{name}")).collect();
        let deltas: Vec<String> = MEASURES.iter().map(|(name, _)| format!("raw_{name} - rolled_{name}")).collect();
        let names: Vec<&str> = MEASURES.iter().map(|(name, _)| *name).collect();
        let pairs = vec!["(?, ?)"; vms].join(", ");
        format!(
            "INSERT INTO {db}.{table} ({bucket}, tenant_id, vm_id, {names})
             SELECT {bucket}, tenant_id, vm_id, {deltas} FROM (
                 SELECT {expression} AS {bucket}, tenant_id, vm_id, {raw} FROM {db}.{USAGE_TABLE}
                 WHERE (tenant_id, vm_id) IN ({pairs}) AND start_ms >= ? AND start_ms < ? GROUP BY {bucket}, tenant_id, vm_id
             ) AS raw ANY LEFT JOIN (
                 SELECT {bucket}, tenant_id, vm_id, {rolled} FROM {db}.{table}
                 WHERE (tenant_id, vm_id) IN ({pairs}) AND {bucket} >= {expression_from} AND {bucket} < {expression_to}
                 GROUP BY {bucket}, tenant_id, vm_id
             ) AS rolled USING ({bucket}, tenant_id, vm_id)
             WHERE raw_intervals > rolled_intervals",
            names = names.join(", "),
            deltas = deltas.join(", "),
            raw = raw.join(", "),
            rolled = rolled.join(", "),
            expression_from = expression.replace("start_ms", "toUInt64(?)"),
            expression_to = expression.replace("start_ms", "toUInt64(?)"),
        )
    }
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "raw usage intervals",
        requires: (18, 16),
        statements: |db| {
            vec![format!(
                "CREATE TABLE IF NOT EXISTS {db}.{USAGE_TABLE} (
                    tenant_id String, vm_id String, sequence UInt64, start_ms UInt64, end_ms UInt64,
                    cpu_ns UInt64, memory_bytes UInt64, memory_peak_bytes UInt64,
                    net_rx_bytes UInt64, net_tx_bytes UInt64, net_rx_packets UInt64, net_tx_packets UInt64,
                    block_read_bytes UInt64, block_write_bytes UInt64, block_read_ops UInt64, block_write_ops UInt64,
                    vcpus UInt32, memory_limit_bytes UInt64, missed_ticks UInt32, paused UInt8, final_record UInt8,
                    host_id String, inserted_at DateTime('UTC') DEFAULT now()
                ) ENGINE = ReplacingMergeTree()
                PARTITION BY toYYYYMM(toDateTime(intDiv(start_ms, 1000), 'UTC'))
                ORDER BY (tenant_id, vm_id, sequence)"
            )]
        },
    },
    Migration {
        version: 2,
        description: "hourly and daily rollups per VM, and per tenant over them",
        requires: (18, 16),
        statements: |db| ROLLUPS.iter().flat_map(|rollup| rollup.create(db)).collect(),
    },
    Migration {
        version: 3,
        description: "host heartbeats and reported gaps",
        requires: (18, 16),
        statements: |db| {
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {db}.host_heartbeats (
                        host_id String, sent_at_ms UInt64, spool_records UInt64, spool_bytes UInt64,
                        received_at DateTime('UTC') DEFAULT now()
                    ) ENGINE = MergeTree() PARTITION BY toYYYYMM(received_at) ORDER BY (host_id, sent_at_ms)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {db}.usage_gaps (
                        host_id String, tenant_id String, vm_id String, from_ms UInt64, to_ms UInt64, reason String,
                        reported_at DateTime('UTC') DEFAULT now()
                    ) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(reported_at) ORDER BY (tenant_id, vm_id, from_ms)"
                ),
            ]
        },
    },
    Migration {
        version: 4,
        description: "compress millisecond columns (servers with column codecs)",
        requires: (20, 1),
        statements: |db| {
            ["start_ms", "end_ms"]
                .iter()
                .map(|column| format!("ALTER TABLE {db}.{USAGE_TABLE} MODIFY COLUMN {column} UInt64 CODEC(DoubleDelta, ZSTD)"))
                .collect()
        },
    },
];

/// Every statement the migrations run on a server of version `server`
/// (major, minor), in order, with the migration each belongs to: what
/// `migrate` applies, for operators who review or apply a schema by hand.
/// Migration 0 stands for the database and the migrations' own table.
pub fn schema_statements(db: &str, server: (u32, u32)) -> Vec<(u32, String)> {
    let bookkeeping = bookkeeping_statements(db).into_iter().map(|statement| (0, statement));
    let migrations = MIGRATIONS
        .iter()
        .filter(|migration| server >= migration.requires)
        .flat_map(|migration| (migration.statements)(db).into_iter().map(move |statement| (migration.version, statement)));
    bookkeeping.chain(migrations).collect()
}

/// The database and the table that records which migrations ran.
fn bookkeeping_statements(db: &str) -> Vec<String> {
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, description String, applied_at DateTime('UTC') DEFAULT now()) ENGINE = MergeTree() ORDER BY version"
        ),
    ]
}

/// A raw row, as ClickHouse stores it.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct UsageRow {
    pub tenant_id: String,
    pub vm_id: String,
    pub sequence: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub net_rx_packets: u64,
    pub net_tx_packets: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    pub block_read_ops: u64,
    pub block_write_ops: u64,
    pub vcpus: u32,
    pub memory_limit_bytes: u64,
    pub missed_ticks: u32,
    pub paused: u8,
    pub final_record: u8,
    pub host_id: String,
}

impl UsageRow {
    pub fn from_record(record: &UsageRecord, host_id: &str) -> Self {
        metald_types::flatten_usage_record!(record => UsageRow {
            tenant_id: record.tenant_id.to_string(),
            vm_id: record.vm_id.to_string(),
            host_id: host_id.to_owned(),
        })
    }
}

/// Writes usage records to ClickHouse, exactly once.
#[derive(Clone)]
pub struct ClickHouseSink {
    client: Client,
    database: String,
    host_id: String,
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSink").field("database", &self.database).field("host_id", &self.host_id).finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, clickhouse::Row)]
struct GapRow {
    host_id: String,
    tenant_id: String,
    vm_id: String,
    from_ms: u64,
    to_ms: u64,
    reason: String,
}

#[derive(Debug, Serialize, clickhouse::Row)]
struct HeartbeatRow {
    host_id: String,
    sent_at_ms: u64,
    spool_records: u64,
    spool_bytes: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Identity {
    vm_id: String,
    sequence: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct VersionRow {
    version: u32,
}

impl ClickHouseSink {
    /// A sink writing to `database` at `url` (`http://host:8123`), on behalf of `host_id`.
    pub fn new(url: &str, database: &str, host_id: &str) -> Self {
        // Row validation needs server features 18.16 lacks.
        let client = Client::default().with_url(url).with_validation(false);
        Self { client, database: database.to_owned(), host_id: host_id.to_owned() }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The server's (major, minor) version.
    pub async fn server_version(&self) -> Result<(u32, u32), SinkError> {
        let text = self.client.query("SELECT version()").fetch_one::<String>().await.map_err(SinkError::ClickHouse)?;
        let mut parts = text.split('.').map(|part| part.parse::<u32>().unwrap_or(0));
        Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
    }

    /// Applies every migration this server supports and has not seen;
    /// returns the versions applied now. Safe to run at every start.
    pub async fn migrate(&self) -> Result<Vec<u32>, SinkError> {
        let db = &self.database;
        let run = |sql: String| async move { self.client.query(&sql).execute().await.map_err(SinkError::ClickHouse) };
        for statement in bookkeeping_statements(db) {
            run(statement).await?;
        }
        let done: HashSet<u32> = self
            .client
            .query(&format!("SELECT DISTINCT version FROM {db}.schema_migrations"))
            .fetch_all::<VersionRow>()
            .await
            .map_err(SinkError::ClickHouse)?
            .into_iter()
            .map(|row| row.version)
            .collect();
        let server = self.server_version().await?;
        let mut applied = Vec::new();
        for migration in MIGRATIONS.iter().filter(|migration| !done.contains(&migration.version)) {
            if server < migration.requires {
                tracing::info!(version = migration.version, ?server, "ClickHouse migration skipped: the server is too old for it");
                continue;
            }
            for statement in (migration.statements)(db) {
                run(statement).await?;
            }
            self.client
                .query(&format!("INSERT INTO {db}.schema_migrations (version, description) VALUES (?, ?)"))
                .bind(migration.version)
                .bind(migration.description)
                .execute()
                .await
                .map_err(SinkError::ClickHouse)?;
            applied.push(migration.version);
        }
        Ok(applied)
    }

    /// The identities of `batch` the table already has: the whole identity
    /// tuple against the primary key, in queries kept under ClickHouse's
    /// default `max_query_size` of 256 KiB.
    async fn existing(&self, batch: &[UsageRecord]) -> Result<HashSet<(String, u64)>, SinkError> {
        let mut existing = HashSet::new();
        let mut rest = batch;
        while !rest.is_empty() {
            let mut text_bytes = 0;
            let count = rest
                .iter()
                .take_while(|record| {
                    text_bytes += record.tenant_id.as_str().len() + record.vm_id.as_str().len() + 32;
                    text_bytes < LOOKUP_QUERY_BYTES
                })
                .count()
                .max(1);
            let (chunk, later) = rest.split_at(count.min(rest.len()));
            rest = later;
            let tuples = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let mut query = self.client.query(&format!(
                "SELECT vm_id, sequence FROM {}.{USAGE_TABLE} WHERE (tenant_id, vm_id, sequence) IN ({tuples})",
                self.database
            ));
            for record in chunk {
                query = query.bind(record.tenant_id.as_str()).bind(record.vm_id.as_str()).bind(record.sequence);
            }
            let found = query.fetch_all::<Identity>().await.map_err(SinkError::ClickHouse)?;
            existing.extend(found.into_iter().map(|identity| (identity.vm_id, identity.sequence)));
        }
        Ok(existing)
    }

    /// Records a gap `host_id` reported (a replay collapses on merge: same VM and start).
    pub async fn insert_gap(&self, gap: &UsageGap, host_id: &str) -> Result<(), SinkError> {
        let row = GapRow {
            host_id: host_id.to_owned(),
            tenant_id: gap.tenant_id.to_string(),
            vm_id: gap.vm_id.to_string(),
            from_ms: gap.from_ms,
            to_ms: gap.to_ms,
            reason: gap.reason.clone(),
        };
        self.insert_one("usage_gaps", &row).await
    }

    pub async fn insert_heartbeat(&self, heartbeat: &HostHeartbeat, host_id: &str) -> Result<(), SinkError> {
        let row = HeartbeatRow {
            host_id: host_id.to_owned(),
            sent_at_ms: heartbeat.sent_at_ms,
            spool_records: heartbeat.spool_records,
            spool_bytes: heartbeat.spool_bytes,
        };
        self.insert_one("host_heartbeats", &row).await
    }

    async fn insert_one<T>(&self, table: &str, row: &T) -> Result<(), SinkError>
    where
        T: clickhouse::Row + Serialize + Send + Sync + 'static,
        for<'a> T: clickhouse::RowWrite<Value<'a> = T>,
    {
        let mut insert = self.client.clone().with_database(&self.database).insert::<T>(table).await.map_err(SinkError::ClickHouse)?;
        insert.write(row).await.map_err(SinkError::ClickHouse)?;
        insert.end().await.map_err(SinkError::ClickHouse)
    }

    /// A batch came again with records the raw table has: the insert that
    /// stored them may have died before its materialized views ran, so the
    /// per-VM rollups of those VMs' buckets are brought up to the raw table.
    async fn reconcile_rollups(&self, batch: &[UsageRecord], stored: &HashSet<(String, u64)>) -> Result<(), SinkError> {
        let mut vms: HashSet<(&str, &str)> = HashSet::new();
        let (mut first_ms, mut last_ms) = (u64::MAX, 0);
        for record in batch.iter().filter(|record| stored.contains(&(record.vm_id.to_string(), record.sequence))) {
            vms.insert((record.tenant_id.as_str(), record.vm_id.as_str()));
            first_ms = first_ms.min(record.start_ms);
            last_ms = last_ms.max(record.start_ms);
        }
        let vms: Vec<(&str, &str)> = vms.into_iter().collect();
        for chunk in vms.chunks(RECONCILE_VMS) {
            for rollup in &ROLLUPS {
                let from_ms = first_ms - first_ms % rollup.bucket_ms;
                let to_ms = last_ms - last_ms % rollup.bucket_ms + rollup.bucket_ms;
                let mut query = self.client.query(&rollup.reconcile(&self.database, chunk.len()));
                for _ in 0..2 {
                    for (tenant, vm) in chunk {
                        query = query.bind(*tenant).bind(*vm);
                    }
                    query = query.bind(from_ms).bind(to_ms);
                }
                query.execute().await.map_err(SinkError::ClickHouse)?;
            }
        }
        Ok(())
    }

    /// Waits, briefly, until no insert of `host_id`'s usage that an earlier
    /// attempt started is still running inside ClickHouse: a sender that
    /// died (or timed out) may leave its insert running, with the raw rows
    /// visible before its materialized views have run, and a resent batch
    /// checked against that would add to the rollups what the views are
    /// about to add. Still running after the wait: an error, so delivery
    /// retries later.
    async fn wait_for_earlier_inserts(&self, host_id: &str) -> Result<(), SinkError> {
        let prefix = usage_insert_prefix(host_id);
        for _ in 0..EARLIER_INSERT_CHECKS {
            let running = self
                .client
                .query("SELECT count() FROM system.processes WHERE startsWith(query_id, ?)")
                .bind(prefix.as_str())
                .fetch_one::<u64>()
                .await
                .map_err(SinkError::ClickHouse)?;
            if running == 0 {
                return Ok(());
            }
            tokio::time::sleep(EARLIER_INSERT_PAUSE).await;
        }
        Err(SinkError::EarlierInsertRunning { host_id: host_id.to_owned() })
    }

    /// Inserts the records of `batch` the table does not have yet.
    pub async fn insert_new(&self, batch: Batch<'_>, host_id: &str) -> Result<Delivered, SinkError> {
        if batch.resent {
            self.wait_for_earlier_inserts(host_id).await?;
        }
        let mut seen = if batch.resent { self.existing(batch.records).await? } else { HashSet::new() };
        if !seen.is_empty() {
            self.reconcile_rollups(batch.records, &seen).await?;
        }
        let mut delivered = Delivered::default();
        // The crate quotes an insert's table as one name, so the database goes in the client.
        // The query id names the host, so that a resend can see this insert while it runs.
        let query_id = format!("{}{}", usage_insert_prefix(host_id), unique_suffix());
        let mut insert = self
            .client
            .clone()
            .with_database(&self.database)
            .with_setting("query_id", query_id)
            .insert::<UsageRow>(USAGE_TABLE)
            .await
            .map_err(SinkError::ClickHouse)?;
        for record in batch.records {
            if !seen.insert((record.vm_id.to_string(), record.sequence)) {
                delivered.duplicates += 1;
                continue;
            }
            insert.write(&UsageRow::from_record(record, host_id)).await.map_err(SinkError::ClickHouse)?;
            delivered.accepted += 1;
        }
        insert.end().await.map_err(SinkError::ClickHouse)?;
        Ok(delivered)
    }
}

#[async_trait]
impl BillingSink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    async fn deliver(&self, batch: Batch<'_>) -> Result<Delivered, SinkError> {
        self.insert_new(batch, &self.host_id).await
    }

    async fn report_gap(&self, gap: &UsageGap) -> Result<(), SinkError> {
        self.insert_gap(gap, &self.host_id).await
    }

    async fn heartbeat(&self, heartbeat: &HostHeartbeat) -> Result<(), SinkError> {
        self.insert_heartbeat(heartbeat, &self.host_id).await
    }
}

#[async_trait]
impl UsageHistory for ClickHouseSink {
    fn source(&self) -> String {
        format!("clickhouse database {} (host {})", self.database, self.host_id)
    }

    /// This host's usage only, as the file sink would hold it: other hosts
    /// writing to the same database are theirs to summarise.
    async fn usage_by_tenant(&self, window: UsageWindow) -> Result<Vec<TenantUsage>, SummaryError> {
        self.client
            .query(&queries::host_usage_by_tenant(&self.database))
            .bind(&self.host_id)
            .bind(window.from_ms)
            .bind(window.to_ms)
            .fetch_all::<TenantUsage>()
            .await
            .map_err(SummaryError::ClickHouse)
    }
}

/// Totals of one tenant over a span, as billing reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clickhouse::Row)]
pub struct TenantTotals {
    pub intervals: u64,
    pub cpu_ns: u64,
    pub vcpu_ms: u64,
    pub memory_mib_ms: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// The queries shipped with metald; each counts every interval once.
pub mod queries {
    use super::raw_sums::{INTERVALS, MEMORY_LIMIT_KIB_MS, MEMORY_MIB_MS, MEMORY_RESIDENT_KIB_MS, VCPU_MS};

    /// A tenant's usage between two instants, from the raw table (FINAL
    /// collapses any duplicate that got in).
    pub fn tenant_totals_raw(db: &str) -> String {
        format!(
            "SELECT {INTERVALS} AS intervals, sum(cpu_ns) AS cpu_ns, {VCPU_MS} AS vcpu_ms, {MEMORY_MIB_MS} AS memory_mib_ms,
                    sum(net_rx_bytes) AS net_rx_bytes, sum(net_tx_bytes) AS net_tx_bytes
             FROM {db}.usage_intervals FINAL WHERE tenant_id = ? AND start_ms >= ? AND start_ms < ?"
        )
    }

    /// A tenant's usage over whole hours, from the hourly rollup (summed
    /// again because a SummingMergeTree merges in the background).
    pub fn tenant_totals_hourly(db: &str) -> String {
        format!(
            "SELECT sum(intervals) AS intervals, sum(cpu_ns) AS cpu_ns, sum(vcpu_ms) AS vcpu_ms, sum(memory_mib_ms) AS memory_mib_ms,
                    sum(net_rx_bytes) AS net_rx_bytes, sum(net_tx_bytes) AS net_tx_bytes
             FROM {db}.usage_hourly_tenant WHERE tenant_id = ? AND hour >= toDateTime(intDiv(?, 1000), 'UTC') AND hour < toDateTime(intDiv(?, 1000), 'UTC')"
        )
    }

    /// The same from the daily per-VM rollup, all VMs of the tenant.
    pub fn tenant_totals_daily_vm(db: &str) -> String {
        format!(
            "SELECT sum(intervals) AS intervals, sum(cpu_ns) AS cpu_ns, sum(vcpu_ms) AS vcpu_ms, sum(memory_mib_ms) AS memory_mib_ms,
                    sum(net_rx_bytes) AS net_rx_bytes, sum(net_tx_bytes) AS net_tx_bytes
             FROM {db}.usage_daily_vm WHERE tenant_id = ? AND day >= toDate(toDateTime(intDiv(?, 1000), 'UTC')) AND day < toDate(toDateTime(intDiv(?, 1000), 'UTC'))"
        )
    }

    /// A tenant's invoice lines per calendar month (UTC) from the daily
    /// per-VM rollup: CPU seconds, vCPU hours and GiB hours allocated,
    /// network and block gigabytes. Binds: tenant, from and to (Unix ms,
    /// whole days).
    pub fn tenant_monthly_invoice(db: &str) -> String {
        format!(
            "SELECT toStartOfMonth(day) AS month, sum(intervals) AS intervals,
                    sum(cpu_ns) / 1e9 AS cpu_seconds,
                    sum(vcpu_ms) / 3.6e6 AS vcpu_hours,
                    sum(memory_mib_ms) / 1024 / 3.6e6 AS memory_gib_hours,
                    (sum(net_rx_bytes) + sum(net_tx_bytes)) / 1e9 AS network_gb,
                    (sum(block_read_bytes) + sum(block_write_bytes)) / 1e9 AS block_gb
             FROM {db}.usage_daily_vm
             WHERE tenant_id = ? AND day >= toDate(toDateTime(intDiv(?, 1000), 'UTC')) AND day < toDate(toDateTime(intDiv(?, 1000), 'UTC'))
             GROUP BY month ORDER BY month"
        )
    }

    /// Each VM of a tenant, hour by hour, from the hourly per-VM rollup.
    /// Binds: tenant, from, to (Unix ms, whole hours).
    pub fn vm_usage_by_hour(db: &str) -> String {
        format!(
            "SELECT vm_id, toUInt64(hour) AS hour_unix, sum(intervals) AS intervals, sum(cpu_ns) AS cpu_ns, sum(vcpu_ms) AS vcpu_ms,
                    sum(memory_mib_ms) AS memory_mib_ms
             FROM {db}.usage_hourly_vm
             WHERE tenant_id = ? AND hour >= toDateTime(intDiv(?, 1000), 'UTC') AND hour < toDateTime(intDiv(?, 1000), 'UTC')
             GROUP BY vm_id, hour ORDER BY vm_id, hour"
        )
    }

    /// One host's usage per tenant between two instants, from the raw
    /// table, in the columns and units of [`TenantUsage`] (and in its
    /// order: rows are read by position). Binds: host, from, to (Unix ms).
    pub fn host_usage_by_tenant(db: &str) -> String {
        format!(
            "SELECT tenant_id, uniqExact(vm_id) AS vms, {INTERVALS} AS intervals, sum(cpu_ns) AS cpu_ns, {VCPU_MS} AS vcpu_ms,
                    {MEMORY_LIMIT_KIB_MS} AS memory_limit_kib_ms, {MEMORY_RESIDENT_KIB_MS} AS memory_resident_kib_ms,
                    sum(net_rx_bytes) AS net_rx_bytes, sum(net_tx_bytes) AS net_tx_bytes,
                    sum(block_read_bytes) AS block_read_bytes, sum(block_write_bytes) AS block_write_bytes,
                    min(start_ms) AS first_ms, max(end_ms) AS last_ms
             FROM {db}.usage_intervals FINAL WHERE host_id = ? AND start_ms >= ? AND start_ms < ?
             GROUP BY tenant_id ORDER BY tenant_id"
        )
    }

    /// Spans of a tenant's VMs that hosts could not meter, which an invoice
    /// should mention rather than hide. Binds: tenant, from, to (Unix ms).
    pub fn tenant_gaps(db: &str) -> String {
        format!(
            "SELECT vm_id, from_ms, to_ms, reason, host_id FROM {db}.usage_gaps FINAL
             WHERE tenant_id = ? AND to_ms > ? AND from_ms < ? ORDER BY vm_id, from_ms"
        )
    }

    /// Every host's last heartbeat and what its spool still held: a host
    /// whose heartbeat is old, or whose spool grows, is holding usage back.
    pub fn host_freshness(db: &str) -> String {
        format!(
            "SELECT host_id, max(sent_at_ms) AS last_heartbeat_ms, argMax(spool_records, sent_at_ms) AS spool_records,
                    argMax(spool_bytes, sent_at_ms) AS spool_bytes
             FROM {db}.host_heartbeats GROUP BY host_id ORDER BY host_id"
        )
    }
}
