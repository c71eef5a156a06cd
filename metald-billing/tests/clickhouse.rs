//! The ClickHouse schema and sink against a real ClickHouse server started
//! by the test on loopback: migrations are idempotent, and a record
//! delivered twice is counted once by the raw table, every rollup and every
//! shipped query.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DATABASE, EPOCH_MS, clickhouse, raw_rows, record};
use metald_billing::clickhouse::{TenantTotals, queries};
use metald_billing::{Batch, BillingSink, HostHeartbeat, UsageGap};
use metald_core::{TenantId, VmId};

#[tokio::test]
async fn migrations_run_once_and_a_second_start_changes_nothing() {
    let Some((_server, sink)) = clickhouse("migrations_run_once_and_a_second_start_changes_nothing").await else { return };
    // The helper migrated once already: a second start applies nothing.
    assert_eq!(sink.migrate().await.unwrap(), Vec::<u32>::new());
    let versions = sink
        .client()
        .query(&format!("SELECT version, count() FROM {DATABASE}.schema_migrations GROUP BY version ORDER BY version"))
        .fetch_all::<(u32, u64)>()
        .await
        .unwrap();
    assert!(versions.iter().all(|(_, count)| *count == 1), "a migration was recorded twice: {versions:?}");
    let (major, minor) = sink.server_version().await.unwrap();
    let expected: Vec<u32> = if (major, minor) >= (20, 1) { vec![1, 2, 3, 4] } else { vec![1, 2, 3] };
    assert_eq!(versions.iter().map(|(version, _)| *version).collect::<Vec<_>>(), expected);
    let tables = sink
        .client()
        .query(&format!("SELECT name FROM system.tables WHERE database = '{DATABASE}' ORDER BY name"))
        .fetch_all::<String>()
        .await
        .unwrap();
    for table in [
        "usage_intervals",
        "usage_hourly_vm",
        "usage_hourly_tenant",
        "usage_daily_vm",
        "usage_daily_tenant",
        "host_heartbeats",
        "usage_gaps",
    ] {
        assert!(tables.iter().any(|name| name == table), "{table} is missing from {tables:?}");
    }
}

#[tokio::test]
async fn a_replayed_or_overlapping_batch_is_counted_once_by_every_table_and_query() {
    let Some((_server, sink)) = clickhouse("a_replayed_or_overlapping_batch_is_counted_once_by_every_table_and_query").await else {
        return;
    };
    let vms = ["vm-a", "vm-b", "vm-c"];
    // 2 hours of 100 ms intervals would be 72 000 records per VM; crossing one
    // hour boundary is what matters, so records are spread 36 s apart.
    let spread = |mut record: metald_billing::UsageRecord| {
        record.start_ms = EPOCH_MS + (record.sequence - 1) * 36_000;
        record.end_ms = record.start_ms + 100;
        record
    };
    let first: Vec<_> =
        vms.iter().flat_map(|vm| (1..=150).map(move |sequence| spread(record("acme", vm, sequence, sequence * 1_000)))).collect();
    let overlapping: Vec<_> =
        vms.iter().flat_map(|vm| (100..=200).map(move |sequence| spread(record("acme", vm, sequence, sequence * 1_000)))).collect();

    let delivered = sink.deliver(Batch::first(&first)).await.unwrap();
    assert_eq!((delivered.accepted, delivered.duplicates), (450, 0));
    let replayed = sink.deliver(Batch::resent(&first)).await.unwrap();
    assert_eq!((replayed.accepted, replayed.duplicates), (0, 450));
    let delivered = sink.deliver(Batch::resent(&overlapping)).await.unwrap();
    assert_eq!((delivered.accepted, delivered.duplicates), (150, 153));

    let expected_cpu: u64 = 3 * (1..=200u64).map(|sequence| sequence * 1_000).sum::<u64>();
    assert_eq!(raw_rows(&sink).await, (600, 600, expected_cpu), "(rows, identities, cpu_ns) of the raw table");

    let (from, to) = (EPOCH_MS, EPOCH_MS + 86_400_000);
    let mut totals = Vec::new();
    for sql in [queries::tenant_totals_raw(DATABASE), queries::tenant_totals_hourly(DATABASE), queries::tenant_totals_daily_vm(DATABASE)] {
        let found = sink.client().query(&sql).bind("acme").bind(from).bind(to).fetch_one::<TenantTotals>().await.unwrap();
        totals.push(found);
    }
    let expected = TenantTotals {
        intervals: 600,
        cpu_ns: expected_cpu,
        vcpu_ms: 600 * 100,
        memory_mib_ms: 600 * 64 * 100,
        net_rx_bytes: 0,
        net_tx_bytes: 0,
    };
    assert_eq!(totals, vec![expected; 3], "raw, hourly and daily-per-VM totals");

    // Both hourly rollups split the same intervals over the same hours.
    let per_hour = |table: &str| {
        format!(
            "SELECT toUInt64(hour), sum(intervals), sum(cpu_ns) FROM {DATABASE}.{table} WHERE tenant_id = 'acme' GROUP BY hour ORDER BY hour"
        )
    };
    let by_vm = sink.client().query(&per_hour("usage_hourly_vm")).fetch_all::<(u64, u64, u64)>().await.unwrap();
    let by_tenant = sink.client().query(&per_hour("usage_hourly_tenant")).fetch_all::<(u64, u64, u64)>().await.unwrap();
    assert_eq!(by_vm, by_tenant);
    assert_eq!(by_vm.len(), 2, "200 records 36 s apart span two hours: {by_vm:?}");
    assert_eq!(by_vm.iter().map(|(_, intervals, _)| intervals).sum::<u64>(), 600);

    // The finance queries count the same intervals once.
    let invoice = sink
        .client()
        .query(&queries::tenant_monthly_invoice(DATABASE))
        .bind("acme")
        .bind(from)
        .bind(to)
        .fetch_all::<(u16, u64, f64, f64, f64, f64, f64)>()
        .await
        .unwrap();
    assert_eq!(invoice.len(), 1, "{invoice:?}");
    assert_eq!(invoice[0].1, 600);
    assert!((invoice[0].2 - expected_cpu as f64 / 1e9).abs() < 1e-9, "{invoice:?}");
    let hours = sink
        .client()
        .query(&queries::vm_usage_by_hour(DATABASE))
        .bind("acme")
        .bind(from)
        .bind(to)
        .fetch_all::<(String, u64, u64, u64, u64, u64)>()
        .await
        .unwrap();
    assert_eq!(hours.len(), 6, "three VMs over two hours: {hours:?}");
    assert!(hours.iter().all(|(_, _, intervals, ..)| *intervals == 100), "{hours:?}");
}

#[tokio::test]
async fn a_gap_or_heartbeat_sent_twice_is_reported_once() {
    let Some((_server, sink)) = clickhouse("a_gap_or_heartbeat_sent_twice_is_reported_once").await else { return };
    let gap = UsageGap {
        tenant_id: TenantId::new("acme").unwrap(),
        vm_id: VmId::new("vm-g").unwrap(),
        from_ms: EPOCH_MS,
        to_ms: EPOCH_MS + 5_000,
        reason: "test".into(),
    };
    sink.report_gap(&gap).await.unwrap();
    sink.report_gap(&gap).await.unwrap();
    let gaps = sink
        .client()
        .query(&queries::tenant_gaps(DATABASE))
        .bind("acme")
        .bind(EPOCH_MS)
        .bind(EPOCH_MS + 86_400_000)
        .fetch_all::<(String, u64, u64, String, String)>()
        .await
        .unwrap();
    assert_eq!(gaps, vec![("vm-g".into(), EPOCH_MS, EPOCH_MS + 5_000, "test".into(), "host-test".into())]);
    for (sent_at_ms, spool_records) in [(1_000, 7), (2_000, 3)] {
        sink.heartbeat(&HostHeartbeat { sent_at_ms, spool_records, spool_bytes: 100, spool_quota_bytes: 1 << 20 }).await.unwrap();
    }
    let hosts = sink.client().query(&queries::host_freshness(DATABASE)).fetch_all::<(String, u64, u64, u64)>().await.unwrap();
    assert_eq!(hosts, vec![("host-test".into(), 2_000, 3, 100)]);
}

#[tokio::test]
async fn a_replay_after_an_insert_whose_views_did_not_run_completes_the_rollups_once() {
    let Some((_server, sink)) = clickhouse("a_replay_after_an_insert_whose_views_did_not_run_completes_the_rollups_once").await else {
        return;
    };
    let execute = |sql: String| {
        let client = sink.client().clone();
        async move { client.query(&sql).execute().await.unwrap() }
    };
    let batch: Vec<_> = (1..=100).map(|sequence| record("acme", "vm-r", sequence, 7_000)).collect();
    // As if the server died between writing the raw part and pushing it to the hourly view.
    execute(format!("DETACH TABLE {DATABASE}.usage_hourly_vm_mv")).await;
    sink.deliver(Batch::first(&batch[..60])).await.unwrap();
    execute(format!("ATTACH TABLE {DATABASE}.usage_hourly_vm_mv")).await;

    let replayed = sink.deliver(Batch::resent(&batch)).await.unwrap();
    assert_eq!((replayed.accepted, replayed.duplicates), (40, 60));
    // A second replay finds nothing missing and adds nothing.
    sink.deliver(Batch::resent(&batch)).await.unwrap();

    for table in ["usage_hourly_vm", "usage_daily_vm", "usage_hourly_tenant", "usage_daily_tenant"] {
        let (intervals, cpu_ns) = sink
            .client()
            .query(&format!("SELECT sum(intervals), sum(cpu_ns) FROM {DATABASE}.{table} WHERE tenant_id = 'acme'"))
            .fetch_one::<(u64, u64)>()
            .await
            .unwrap();
        assert_eq!((intervals, cpu_ns), (100, 700_000), "{table}");
    }
    assert_eq!(raw_rows(&sink).await, (100, 100, 700_000));
}

#[tokio::test]
async fn the_usage_summary_from_clickhouse_equals_the_one_from_the_file_sink_for_the_same_records() {
    use metald_billing::{JsonLinesSink, UsageHistory, UsageWindow};
    let test = "the_usage_summary_from_clickhouse_equals_the_one_from_the_file_sink_for_the_same_records";
    let Some((server, sink)) = clickhouse(test).await else { return };
    let mut records = Vec::new();
    for (tenant, vm, count) in [("acme", "vm-a", 30), ("acme", "vm-b", 7), ("globex", "vm-c", 12)] {
        for sequence in 1..=count {
            let mut record = record(tenant, vm, sequence, 1_000 * sequence + 7);
            record.vcpus = 2;
            record.usage.memory_bytes = (40 << 20) + 512 * sequence;
            record.usage.devices.net_rx_bytes = 100 + sequence;
            record.usage.devices.block_write_bytes = 4096 * sequence;
            records.push(record);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = JsonLinesSink::open(dir.path().join("usage.jsonl")).unwrap();
    file.deliver(Batch::first(&records)).await.unwrap();
    sink.deliver(Batch::first(&records)).await.unwrap();
    // A replay is no usage twice, and another host's rows are its own.
    sink.deliver(Batch::resent(&records[..10])).await.unwrap();
    let other_host = metald_billing::clickhouse::ClickHouseSink::new(&server.url(), DATABASE, "host-other");
    other_host.deliver(Batch::first(&[record("acme", "vm-z", 1, 5)])).await.unwrap();

    for window in [
        UsageWindow { from_ms: 0, to_ms: u64::MAX / 2 },
        UsageWindow { from_ms: EPOCH_MS + 500, to_ms: EPOCH_MS + 1_500 },
        UsageWindow { from_ms: 0, to_ms: EPOCH_MS },
    ] {
        let from_file = file.usage_by_tenant(window).await.unwrap();
        let from_clickhouse = sink.usage_by_tenant(window).await.unwrap();
        assert_eq!(from_clickhouse, from_file, "{window:?}");
    }
    let all = sink.usage_by_tenant(UsageWindow { from_ms: 0, to_ms: u64::MAX / 2 }).await.unwrap();
    let tenants: Vec<_> = all.iter().map(|usage| (usage.tenant_id.as_str(), usage.vms, usage.intervals)).collect();
    assert_eq!(tenants, [("acme", 2, 37), ("globex", 1, 12)]);
    assert_eq!(all[0].vcpu_ms, 2 * 100 * 37);
    assert!(sink.source().contains("host-test"), "{}", sink.source());
}
