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
