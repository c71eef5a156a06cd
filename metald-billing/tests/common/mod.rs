//! What the billing tests share: records to deliver and a migrated
//! ClickHouse of the test's own.

#![allow(dead_code)]

use metald_billing::clickhouse::ClickHouseSink;
use metald_billing::{Counters, UsageRecord};
use metald_core::{TenantId, VmId};
use metald_testguest::clickhouse::{ClickHouseServer, require_clickhouse};

/// The database every test writes to, in its own server.
pub const DATABASE: &str = "metald";

/// 2026-11-27 00:00:00 UTC: records start here, so rollup buckets are known.
pub const EPOCH_MS: u64 = 1_795_737_600_000;

/// A 100 ms record of `vm`, numbered `sequence`, that used `cpu_ns`.
pub fn record(tenant: &str, vm: &str, sequence: u64, cpu_ns: u64) -> UsageRecord {
    let start_ms = EPOCH_MS + (sequence - 1) * 100;
    UsageRecord {
        tenant_id: TenantId::new(tenant).unwrap(),
        vm_id: VmId::new(vm).unwrap(),
        sequence,
        start_ms,
        end_ms: start_ms + 100,
        usage: Counters { cpu_ns, memory_bytes: 64 << 20, memory_peak_bytes: 64 << 20, ..Counters::default() },
        vcpus: 1,
        memory_limit_bytes: 128 << 20,
        missed_ticks: 0,
        paused: false,
        final_record: false,
    }
}

/// A started server and a sink whose migrations have run, or `None` when
/// the test is skipped.
pub async fn clickhouse(test: &str) -> Option<(ClickHouseServer, ClickHouseSink)> {
    let server = require_clickhouse(test)?;
    let sink = ClickHouseSink::new(&server.url(), DATABASE, "host-test");
    sink.migrate().await.unwrap();
    Some((server, sink))
}

/// (rows, distinct identities, sum of cpu_ns) in the raw table, without FINAL.
pub async fn raw_rows(sink: &ClickHouseSink) -> (u64, u64, u64) {
    sink.client()
        .query(&format!(
            "SELECT count(), uniqExact(tenant_id, vm_id, sequence), sum(cpu_ns) FROM {DATABASE}.{}",
            metald_billing::clickhouse::USAGE_TABLE
        ))
        .fetch_one::<(u64, u64, u64)>()
        .await
        .unwrap()
}

/// What the tests look at in one raw row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, clickhouse::Row)]
pub struct RowView {
    pub sequence: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub cpu_ns: u64,
    pub paused: u8,
    pub final_record: u8,
}

/// Every raw row of `vm`, duplicates included, in sequence order.
pub async fn vm_rows(sink: &ClickHouseSink, vm: &str) -> Vec<RowView> {
    sink.client()
        .query(&format!(
            "SELECT sequence, start_ms, end_ms, cpu_ns, paused, final_record FROM {DATABASE}.{} WHERE vm_id = ? ORDER BY sequence",
            metald_billing::clickhouse::USAGE_TABLE
        ))
        .bind(vm)
        .fetch_all::<RowView>()
        .await
        .unwrap()
}

/// Panics unless `rows` are sequences 1..=n, each once, each interval
/// starting where the previous one ended, with exactly one final record, last.
pub fn assert_complete(vm: &str, rows: &[RowView]) {
    assert!(!rows.is_empty(), "{vm} has no rows");
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row.sequence, index as u64 + 1, "{vm}: rows are not 1..=n, each once: {:?}", &rows[index.saturating_sub(2)..]);
        if index > 0 {
            assert_eq!(row.start_ms, rows[index - 1].end_ms, "{vm}: a gap or an overlap before sequence {}", row.sequence);
        }
    }
    let finals: Vec<u64> = rows.iter().filter(|row| row.final_record == 1).map(|row| row.sequence).collect();
    assert_eq!(finals, vec![rows.len() as u64], "{vm}: one final record, the last one");
}
