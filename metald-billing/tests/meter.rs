//! The meter on real jailed Firecracker VMs running the test guest, with
//! the real spool and real sinks: what a VM's cgroup counted is what
//! ClickHouse holds, a ClickHouse outage loses and doubles nothing, paused
//! time costs no CPU, and a stopped VM gets one final record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../metald-core/tests/common/mod.rs"]
mod sandbox;

use std::sync::Arc;
use std::time::Duration;

use common::{RowView, assert_complete, vm_rows};
use metald_billing::clickhouse::ClickHouseSink;
use metald_billing::delivery::DeliveryPolicy;
use metald_billing::{Billing, BillingConfig, JsonLinesSink, Spool, UsageRecord};
use metald_core::events::{VmEvent, VmEventKind};
use metald_core::operations::{Delete, Pause, Resume, Shutdown};
use metald_core::{StopOptions, VmId};
use metald_testguest::cmdline;
use metald_testguest::wait_until;
use sandbox::Sandbox;
use tokio::sync::broadcast;

const SPOOL_QUOTA: u64 = 64 << 20;

/// Batches close fast, so rows are queryable soon after their tick.
fn quick_delivery() -> BillingConfig {
    BillingConfig {
        // Retries soon after an outage ends: the default backoff grows to 30 s.
        delivery: DeliveryPolicy {
            max_batch: 500,
            max_age: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            ..DeliveryPolicy::default()
        },
        ..BillingConfig::default()
    }
}

/// What the VM's cgroup counted last, from its Stopped event.
async fn stopped_cpu_ns(events: &mut broadcast::Receiver<VmEvent>, vm_id: &VmId) -> u64 {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("a Stopped event").unwrap();
        if &event.vm_id == vm_id
            && let VmEventKind::Stopped { usage, .. } = event.kind
        {
            return usage.expect("a jailed VM's cgroup usage").cpu_ns;
        }
    }
}

/// The cgroup of the VM's VMM, from its Booted event.
async fn booted_cgroup(events: &mut broadcast::Receiver<VmEvent>, vm_id: &VmId) -> metald_core::cgroups::Cgroup {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("a Booted event").unwrap();
        if &event.vm_id == vm_id
            && let VmEventKind::Booted(running) = event.kind
        {
            return running.cgroup.expect("a jailed VM's cgroup");
        }
    }
}

async fn final_row_arrived(sink: &ClickHouseSink, vm: &str) -> bool {
    vm_rows(sink, vm).await.iter().any(|row| row.final_record == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burning_vms_cpu_in_clickhouse_equals_what_its_cgroup_counted() {
    let test = "a_burning_vms_cpu_in_clickhouse_equals_what_its_cgroup_counted";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let Some((_server, sink)) = common::clickhouse(test).await else { return };
    let spool = Arc::new(Spool::open(sandbox.dir.path().join("spool.db"), SPOOL_QUOTA).unwrap());
    let mut events = sandbox.manager.subscribe();
    let billing = Billing::for_manager(&sandbox.manager, spool, Arc::new(sink.clone()), quick_delivery()).unwrap();

    // The guest spins until stopped; it is stopped once its cgroup has counted a second of
    // CPU, however fast this host runs the guest's loop.
    let vm_id = sandbox.boot_guest(&[&cmdline::burn_forever()]).await;
    let cgroup = booted_cgroup(&mut events, &vm_id).await;
    wait_until("a second of CPU in the VM's cgroup", Duration::from_secs(120), || {
        let counted = cgroup.cpu_usage_ns().unwrap_or(0);
        async move { counted >= 1_000_000_000 }
    })
    .await;
    sandbox.manager.run(&vm_id, Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
    let cgroup_cpu_ns = stopped_cpu_ns(&mut events, &vm_id).await;
    wait_until("the final row in ClickHouse", Duration::from_secs(20), || final_row_arrived(&sink, vm_id.as_str())).await;
    billing.stop().await;

    let rows = vm_rows(&sink, vm_id.as_str()).await;
    assert_complete(vm_id.as_str(), &rows);
    let charged_ns: u64 = rows.iter().map(|row| row.cpu_ns).sum();
    eprintln!("{} intervals; charged {charged_ns} ns; the cgroup counted {cgroup_cpu_ns} ns", rows.len());
    assert!(cgroup_cpu_ns > 1_000_000_000, "the guest burned only {cgroup_cpu_ns} ns of CPU");
    // One interval of one vCPU is the most the two may differ by.
    assert!(
        charged_ns.abs_diff(cgroup_cpu_ns) <= 100_000_000,
        "ClickHouse holds {charged_ns} ns of CPU, the cgroup counted {cgroup_cpu_ns} ns"
    );
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert_eq!(sandbox.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_vm_is_charged_no_cpu_and_a_stopped_vm_gets_one_final_record_then_none() {
    let test = "a_paused_vm_is_charged_no_cpu_and_a_stopped_vm_gets_one_final_record_then_none";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let spool = Arc::new(Spool::open(sandbox.dir.path().join("spool.db"), SPOOL_QUOTA).unwrap());
    let usage_file = sandbox.dir.path().join("usage.jsonl");
    let sink = Arc::new(JsonLinesSink::open(&usage_file).unwrap());
    let billing = Billing::for_manager(&sandbox.manager, spool, sink, quick_delivery()).unwrap();

    // Busy until stopped.
    let vm_id = sandbox.boot_guest(&[&cmdline::burn_forever()]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The pause lasts at least the sleep and at most the time around both calls.
    let around_pause = std::time::Instant::now();
    sandbox.manager.run(&vm_id, Pause).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    sandbox.manager.run(&vm_id, Resume).await.unwrap();
    let pause_bound_ms = u64::try_from(around_pause.elapsed().as_millis()).unwrap();
    let records = || {
        let text = std::fs::read_to_string(&usage_file).unwrap_or_default();
        metald_testguest::finished_lines(&text)
            .map(|line| serde_json::from_str::<UsageRecord>(line).unwrap())
            .filter(|record| record.vm_id == vm_id)
            .collect::<Vec<_>>()
    };
    // Running again for at least a few whole intervals, however busy the host is.
    wait_until("whole running intervals after the pause", Duration::from_secs(60), || {
        let records = records();
        let after = records.iter().rposition(|record| record.paused).map_or(0, |last| records.len() - last - 1);
        async move { after >= 3 }
    })
    .await;
    sandbox.manager.run(&vm_id, Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
    wait_until("the final record", Duration::from_secs(60), || {
        let done = records().iter().any(|record| record.final_record);
        async move { done }
    })
    .await;
    // Nothing follows the final record, however long the meter keeps going.
    tokio::time::sleep(Duration::from_millis(500)).await;
    billing.stop().await;

    let records = records();
    let rows: Vec<RowView> = records
        .iter()
        .map(|record| RowView {
            sequence: record.sequence,
            start_ms: record.start_ms,
            end_ms: record.end_ms,
            cpu_ns: record.usage.cpu_ns,
            paused: u8::from(record.paused),
            final_record: u8::from(record.final_record),
        })
        .collect();
    assert_complete(vm_id.as_str(), &rows);
    let paused: Vec<&UsageRecord> = records.iter().filter(|record| record.paused).collect();
    let paused_ms: u64 = paused.iter().map(|record| record.duration_ms()).sum();
    // Records end on 100 ms ticks, so either end may be off by one tick.
    assert!(
        paused_ms + 100 >= 800 && paused_ms <= pause_bound_ms + 100,
        "paused records cover {paused_ms} ms of a pause of 800..={pause_bound_ms} ms"
    );
    assert!(paused.iter().all(|record| record.usage.cpu_ns == 0), "a paused record charged CPU: {paused:?}");
    // Running, the guest spins: it is charged before the pause and after it. (How much, and how
    // many intervals there are, depends on what else runs on the host; tests run side by side,
    // so only "some" is certain.)
    let first_paused = records.iter().position(|record| record.paused).unwrap();
    let last_paused = records.iter().rposition(|record| record.paused).unwrap();
    let whole = |record: &&UsageRecord| !record.paused && !record.final_record && record.duration_ms() >= 90;
    let before: Vec<&UsageRecord> = records[..first_paused].iter().filter(whole).collect();
    let after: Vec<&UsageRecord> = records[last_paused + 1..].iter().filter(whole).collect();
    assert!(!before.is_empty() && !after.is_empty(), "running intervals before ({}) and after ({}) the pause", before.len(), after.len());
    // A spinning vCPU that the host did not run for a whole interval charges nothing in it;
    // over all of them it is charged on both sides of the pause.
    for side in [&before, &after] {
        assert!(side.iter().any(|record| record.usage.cpu_ns > 0), "running intervals charged no CPU: {side:?}");
    }
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert_eq!(sandbox.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clickhouse_down_for_ten_seconds_loses_and_doubles_nothing() {
    let test = "clickhouse_down_for_ten_seconds_loses_and_doubles_nothing";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let Some((mut server, sink)) = common::clickhouse(test).await else { return };
    let spool = Arc::new(Spool::open(sandbox.dir.path().join("spool.db"), SPOOL_QUOTA).unwrap());
    let billing = Billing::for_manager(&sandbox.manager, Arc::clone(&spool), Arc::new(sink.clone()), quick_delivery()).unwrap();

    let first = sandbox.boot_guest(&[&cmdline::heartbeat_ms(50)]).await;
    let second = sandbox.boot_guest(&[&cmdline::burn_forever()]).await;
    wait_until("rows in ClickHouse", Duration::from_secs(60), || async { !vm_rows(&sink, first.as_str()).await.is_empty() }).await;

    server.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Two VMs make 200 records in ten seconds on an idle host; a busy one may take longer.
    wait_until("records waiting in the spool during the outage", Duration::from_secs(60), || async {
        spool.depth().unwrap().records >= 150
    })
    .await;
    server.restart().unwrap();

    tokio::time::sleep(Duration::from_secs(1)).await;
    for vm_id in [&first, &second] {
        sandbox.manager.run(vm_id, Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
    }
    for vm_id in [&first, &second] {
        wait_until("the final row in ClickHouse", Duration::from_secs(30), || final_row_arrived(&sink, vm_id.as_str())).await;
    }
    let failures = billing.delivery_stats().failures.load(std::sync::atomic::Ordering::Relaxed);
    billing.stop().await;
    assert!(failures > 0, "delivery never failed, so ClickHouse was never really down");
    assert_eq!(spool.depth().unwrap().records, 0, "records were left in the spool");

    for vm_id in [&first, &second] {
        let rows = vm_rows(&sink, vm_id.as_str()).await;
        assert_complete(vm_id.as_str(), &rows);
        let span_ms = rows.last().unwrap().end_ms - rows[0].start_ms;
        assert!(span_ms >= 11_000, "{vm_id}'s rows cover only {span_ms} ms");
    }
    let (rows, identities, _) = common::raw_rows(&sink).await;
    assert_eq!(rows, identities, "a record arrived twice");
    // Every rollup counts what the raw table holds, once.
    for table in ["usage_hourly_vm", "usage_daily_vm", "usage_hourly_tenant", "usage_daily_tenant"] {
        let intervals: u64 =
            sink.client().query(&format!("SELECT sum(intervals) FROM {}.{table}", common::DATABASE)).fetch_one::<u64>().await.unwrap();
        assert_eq!(intervals, rows, "{table}");
    }
    for vm_id in [&first, &second] {
        sandbox.manager.run(vm_id, Delete(StopOptions::default())).await.unwrap();
    }
    assert_eq!(sandbox.leftovers(), Vec::<String>::new());
}
