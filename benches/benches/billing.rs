//! Billing, against raw baselines measured in the same run:
//!
//! 1. The meter's CPU for 1000 VMs at 100 ms, as a share of one core, next
//!    to a hand-rolled loop that reads the same counters and appends the same
//!    records to a file with one fdatasync per tick. The counters are
//!    synthetic (no host boots 1000 VMs for a benchmark); the meter, its
//!    records and the spool are the real ones.
//! 2. Rows per second into a real ClickHouse through the sink (identity
//!    lookup, then insert) at several batch sizes, next to bare inserts of
//!    the same rows with the `clickhouse` crate.
//! 3. How long from a sample to a row a query finds, through the whole
//!    pipeline (meter, spool, delivery, ClickHouse), with the default
//!    delivery policy and a quick one, next to one bare insert-then-select.
//! 4. The operator's usage summary from a usage file (`metalctl usage` on a
//!    file sink), next to what an operator did by hand before it: every
//!    line parsed as untyped JSON and summed per tenant (`jq`'s way).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use metald_benches::{median, ms};
use metald_billing::clickhouse::{ClickHouseSink, USAGE_TABLE, UsageRow};
use metald_billing::delivery::DeliveryPolicy;
use metald_billing::meter::{self, MeterConfig, MeterPeers};
use metald_billing::source::{CounterSource, MeterTarget};
use metald_billing::{Batch, Billing, BillingConfig, BillingSink, Counters, Spool, UsageRecord};
use metald_core::events::{RunningVmm, VmEvent, VmEventKind};
use metald_core::{TenantId, VmId, VmState};
use metald_testguest::clickhouse::ClickHouseServer;

const METERED_VMS: u32 = 1000;
const METER_RUN: Duration = Duration::from_secs(5);
const PERIOD: Duration = Duration::from_millis(100);

/// Counters that grow with the clock, different per VM, and cost nothing to read.
#[derive(Debug)]
struct Synthetic;

impl CounterSource for Synthetic {
    fn read(&self, target: &MeterTarget) -> std::io::Result<Counters> {
        Ok(synthetic_counters(target.pid.unwrap_or(0)))
    }
}

fn synthetic_counters(seed: u32) -> Counters {
    let now_ms = metald_types::time::unix_millis_now();
    let mut counters = Counters { cpu_ns: now_ms * 1_000 + u64::from(seed), memory_bytes: 64 << 20, ..Counters::default() };
    counters.devices.net_rx_bytes = now_ms + u64::from(seed);
    counters.devices.net_tx_bytes = now_ms / 2;
    counters
}

/// CPU time a thread of this process has used, by name (`/proc/self/task/*/schedstat`).
fn thread_cpu(name: &str) -> Option<Duration> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            return Some(Duration::from_nanos(stat.split_whitespace().next()?.parse().ok()?));
        }
    }
    None
}

fn booted(index: u32) -> VmEvent {
    VmEvent {
        vm_id: VmId::new(format!("bench-vm-{index:04}")).unwrap_or_else(|error| panic!("{error}")),
        tenant: TenantId::new(format!("tenant-{}", index % 50)).unwrap_or_else(|error| panic!("{error}")),
        at: SystemTime::now(),
        state: VmState::Running,
        kind: VmEventKind::Booted(RunningVmm { pid: Some(index), cgroup: None, taps: Vec::new(), vcpus: 1, memory_bytes: 128 << 20 }),
    }
}

/// The meter's thread CPU share with `METERED_VMS` synthetic VMs.
fn meter_share(dir: &std::path::Path) -> (f64, u64, u64) {
    let spool = Arc::new(Spool::open(dir.join("meter-spool.db"), 1 << 34).unwrap_or_else(|error| panic!("{error}")));
    let (events, receiver) = tokio::sync::broadcast::channel(4096);
    let meter = meter::start(
        receiver,
        Arc::clone(&spool),
        Arc::new(Synthetic),
        MeterPeers::default(),
        MeterConfig { period: PERIOD, block_every: 0 },
    )
    .unwrap_or_else(|error| panic!("{error}"));
    for index in 0..METERED_VMS {
        let _ = events.send(booted(index));
    }
    // Let it pick the VMs up, then measure whole ticks.
    std::thread::sleep(Duration::from_millis(300));
    let (cpu_before, wall_before) = (thread_cpu("metald-meter").unwrap_or_default(), Instant::now());
    let records_before = meter.stats.records.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(METER_RUN);
    let cpu = thread_cpu("metald-meter").unwrap_or_default().saturating_sub(cpu_before);
    let wall = wall_before.elapsed();
    let records = meter.stats.records.load(std::sync::atomic::Ordering::Relaxed) - records_before;
    let missed = meter.stats.missed_ticks.load(std::sync::atomic::Ordering::Relaxed);
    meter.stop();
    (cpu.as_secs_f64() / wall.as_secs_f64(), records, missed)
}

/// A hand-rolled meter: the same reads, records as JSON lines, one fdatasync per tick.
fn raw_meter_share(dir: &std::path::Path) -> f64 {
    let path = dir.join("raw-meter.jsonl");
    let thread = std::thread::Builder::new()
        .name("raw-meter".into())
        .spawn(move || {
            let mut file = std::fs::File::create(&path).unwrap_or_else(|error| panic!("{error}"));
            let started = Instant::now();
            let mut tick: u32 = 1;
            while started.elapsed() < METER_RUN + Duration::from_millis(300) {
                let deadline = started + PERIOD * tick;
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                let mut text = String::with_capacity(400 * METERED_VMS as usize);
                for index in 0..METERED_VMS {
                    let counters = synthetic_counters(index);
                    text.push_str(&serde_json::to_string(&counters).unwrap_or_default());
                    text.push('\n');
                }
                file.write_all(text.as_bytes()).unwrap_or_else(|error| panic!("{error}"));
                file.sync_data().unwrap_or_else(|error| panic!("{error}"));
                tick += 1;
            }
        })
        .unwrap_or_else(|error| panic!("{error}"));
    std::thread::sleep(Duration::from_millis(300));
    let (cpu_before, wall_before) = (thread_cpu("raw-meter").unwrap_or_default(), Instant::now());
    std::thread::sleep(METER_RUN - Duration::from_millis(50));
    let cpu = thread_cpu("raw-meter").unwrap_or_default().saturating_sub(cpu_before);
    let wall = wall_before.elapsed();
    let _ = thread.join();
    cpu.as_secs_f64() / wall.as_secs_f64()
}

fn record(vm: u32, sequence: u64) -> UsageRecord {
    let start_ms = 1_795_737_600_000 + sequence * 100;
    UsageRecord {
        tenant_id: TenantId::new(format!("tenant-{}", vm % 50)).unwrap_or_else(|error| panic!("{error}")),
        vm_id: VmId::new(format!("bench-vm-{vm:04}")).unwrap_or_else(|error| panic!("{error}")),
        sequence,
        start_ms,
        end_ms: start_ms + 100,
        usage: Counters { cpu_ns: 3_000_000, memory_bytes: 64 << 20, ..Counters::default() },
        vcpus: 1,
        memory_limit_bytes: 128 << 20,
        missed_ticks: 0,
        paused: false,
        final_record: false,
    }
}

/// Batches as a host sends them: one record per VM per tick, `VMS` VMs.
fn batches(total: u64, batch_size: usize, first_sequence: u64) -> Vec<Vec<UsageRecord>> {
    const VMS: u64 = 500;
    let records: Vec<UsageRecord> =
        (0..total).map(|index| record(u32::try_from(index % VMS).unwrap_or(0), first_sequence + index / VMS)).collect();
    records.chunks(batch_size).map(<[UsageRecord]>::to_vec).collect()
}

/// Rows per second through the sink: sent for the first time, then the
/// same batches again as resends, which the sink must check row by row.
async fn sink_rows_per_second(sink: &ClickHouseSink, batch_size: usize, first_sequence: u64) -> (f64, f64) {
    const ROWS: u64 = 50_000;
    let batches = batches(ROWS, batch_size, first_sequence);
    let started = Instant::now();
    for batch in &batches {
        sink.deliver(Batch::first(batch)).await.unwrap_or_else(|error| panic!("{}", metald_core::error_chain(&error)));
    }
    let first = ROWS as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for batch in &batches {
        sink.deliver(Batch::resent(batch)).await.unwrap_or_else(|error| panic!("{}", metald_core::error_chain(&error)));
    }
    (first, ROWS as f64 / started.elapsed().as_secs_f64())
}

async fn raw_rows_per_second(sink: &ClickHouseSink, batch_size: usize, first_sequence: u64) -> f64 {
    const ROWS: u64 = 50_000;
    let batches = batches(ROWS, batch_size, first_sequence);
    let client = sink.client().clone().with_database(sink.database());
    let started = Instant::now();
    for batch in &batches {
        let mut insert = client.insert::<UsageRow>(USAGE_TABLE).await.unwrap_or_else(|error| panic!("{error}"));
        for record in batch {
            insert.write(&UsageRow::from_record(record, "raw")).await.unwrap_or_else(|error| panic!("{error}"));
        }
        insert.end().await.unwrap_or_else(|error| panic!("{error}"));
    }
    ROWS as f64 / started.elapsed().as_secs_f64()
}

/// From a sample (a record's end) to the moment a query finds its row, through the whole pipeline.
async fn pipeline_latency(dir: &std::path::Path, url: &str, database: &str, policy: DeliveryPolicy, samples: usize) -> Vec<Duration> {
    let sink = ClickHouseSink::new(url, database, "bench-host");
    sink.migrate().await.unwrap_or_else(|error| panic!("{error}"));
    let spool = Arc::new(Spool::open(dir.join(format!("latency-{database}.db")), 1 << 30).unwrap_or_else(|error| panic!("{error}")));
    let (events, receiver) = tokio::sync::broadcast::channel(16);
    let config = BillingConfig { meter: MeterConfig { period: PERIOD, block_every: 0 }, delivery: policy };
    let billing = Billing::start(receiver, spool, Arc::new(Synthetic), None, Arc::new(sink.clone()), config)
        .unwrap_or_else(|error| panic!("{error}"));
    let _ = events.send(booted(1));
    // Every record a poll finds for the first time counts, the batch's oldest as well as its newest.
    let query = format!("SELECT end_ms FROM {database}.{USAGE_TABLE} WHERE vm_id = 'bench-vm-0001' AND end_ms > ? ORDER BY end_ms");
    let mut latencies = Vec::new();
    let mut last_seen = 0;
    let mut first_poll = true;
    while latencies.len() < samples {
        let found = sink.client().query(&query).bind(last_seen).fetch_all::<u64>().await.unwrap_or_default();
        let now = metald_types::time::unix_millis_now();
        if !first_poll {
            latencies.extend(found.iter().map(|end_ms| Duration::from_millis(now.saturating_sub(*end_ms))));
        }
        if let Some(newest) = found.last() {
            last_seen = *newest;
            first_poll = false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    billing.stop().await;
    latencies
}

/// One bare INSERT of one row, then the SELECT that finds it.
async fn raw_latency(sink: &ClickHouseSink, samples: usize) -> Vec<Duration> {
    let client = sink.client().clone().with_database(sink.database());
    let mut latencies = Vec::new();
    for sequence in 1..=samples as u64 {
        let row = UsageRow::from_record(&record(9999, 1_000_000 + sequence), "raw");
        let started = Instant::now();
        let mut insert = client.insert::<UsageRow>(USAGE_TABLE).await.unwrap_or_else(|error| panic!("{error}"));
        insert.write(&row).await.unwrap_or_else(|error| panic!("{error}"));
        insert.end().await.unwrap_or_else(|error| panic!("{error}"));
        let query = format!("SELECT count() FROM {USAGE_TABLE} WHERE vm_id = 'bench-vm-9999' AND sequence = {}", row.sequence);
        while client.query(&query).fetch_one::<u64>().await.unwrap_or(0) == 0 {}
        latencies.push(started.elapsed());
    }
    latencies
}

fn percentile(samples: &[Duration], per_mille: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get((sorted.len() * per_mille).div_ceil(1000).saturating_sub(1)).copied().unwrap_or_default()
}

/// Seconds to sum a usage file of `records` records per tenant: through
/// `summarise_files`, and by parsing each line as untyped JSON.
fn usage_summary_seconds(dir: &std::path::Path, records: u64) -> (f64, f64) {
    let path = dir.join("summary-usage.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap_or_else(|error| panic!("{error}")));
    for batch in batches(records, 10_000, 1) {
        for record in batch {
            let line = serde_json::to_string(&record).unwrap_or_else(|error| panic!("{error}"));
            writeln!(file, "{line}").unwrap_or_else(|error| panic!("{error}"));
        }
    }
    drop(file);
    let window = metald_billing::UsageWindow { from_ms: 0, to_ms: u64::MAX };
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|error| panic!("{error}"));
    let ours = Instant::now();
    let tenants =
        runtime.block_on(metald_billing::summary::summarise_files(vec![path.clone()], window)).unwrap_or_else(|error| panic!("{error}"));
    let ours = ours.elapsed();
    assert_eq!(tenants.iter().map(|tenant| tenant.intervals).sum::<u64>(), records);
    let by_hand = Instant::now();
    let mut sums: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
    let text = std::io::BufReader::new(std::fs::File::open(&path).unwrap_or_else(|error| panic!("{error}")));
    for line in std::io::BufRead::lines(text).map_while(Result::ok) {
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|error| panic!("{error}"));
        let entry = sums.entry(value["tenant_id"].as_str().unwrap_or("").to_owned()).or_default();
        entry.0 += 1;
        entry.1 += value["usage"]["cpu_ns"].as_u64().unwrap_or(0);
    }
    let by_hand = by_hand.elapsed();
    assert_eq!(sums.values().map(|(intervals, _)| intervals).sum::<u64>(), records);
    let _ = std::fs::remove_file(&path);
    (ours.as_secs_f64(), by_hand.as_secs_f64())
}

fn main() {
    let dir = tempfile::Builder::new().prefix("metald-bench-").tempdir().unwrap_or_else(|error| panic!("{error}"));

    const SUMMARY_RECORDS: u64 = 200_000;
    let (summary, by_hand) = usage_summary_seconds(dir.path(), SUMMARY_RECORDS);
    println!(
        "usage summary of a {SUMMARY_RECORDS}-record usage file: {:.0} records/s; untyped JSON per line {:.0} records/s; summary / by hand {:.2} (time)",
        SUMMARY_RECORDS as f64 / summary,
        SUMMARY_RECORDS as f64 / by_hand,
        summary / by_hand
    );

    let (ours, records, missed) = meter_share(dir.path());
    let raw = raw_meter_share(dir.path());
    println!(
        "meter, {METERED_VMS} VMs every {PERIOD:?}: {:.2}% of one core ({records} records in {METER_RUN:?}, {missed} ticks missed)",
        ours * 100.0
    );
    println!("hand-rolled meter, same reads, JSON lines + fdatasync per tick: {:.2}% of one core", raw * 100.0);
    println!("meter / hand-rolled: {:.2}", ours / raw.max(f64::EPSILON));

    let binary = match metald_testguest::clickhouse::clickhouse_binary() {
        Ok(binary) => binary,
        Err(reason) => {
            eprintln!("ClickHouse parts skipped: {reason}");
            return;
        }
    };
    let server = ClickHouseServer::start(binary).unwrap_or_else(|error| panic!("{error}"));
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|error| panic!("{error}"));
    runtime.block_on(async {
        let sink = ClickHouseSink::new(&server.url(), "bench", "bench-host");
        sink.migrate().await.unwrap_or_else(|error| panic!("{error}"));
        let raw_sink = ClickHouseSink::new(&server.url(), "bench_raw", "bench-host");
        raw_sink.migrate().await.unwrap_or_else(|error| panic!("{error}"));
        for (round, batch_size) in [100usize, 1_000, 10_000].into_iter().enumerate() {
            let first_sequence = 1 + round as u64 * 1_000;
            let raw = raw_rows_per_second(&raw_sink, batch_size, first_sequence).await;
            let (ours, resent) = sink_rows_per_second(&sink, batch_size, first_sequence).await;
            println!(
                "ClickHouse sink, batches of {batch_size}: {ours:.0} rows/s; bare inserts {raw:.0} rows/s; sink / bare {:.2}; resent (every row checked, none stored) {resent:.0} rows/s",
                ours / raw
            );
        }

        let quick = DeliveryPolicy { max_age: Duration::from_millis(100), ..DeliveryPolicy::default() };
        let default_policy = pipeline_latency(dir.path(), &server.url(), "latency_default", DeliveryPolicy::default(), 100).await;
        let quick_policy = pipeline_latency(dir.path(), &server.url(), "latency_quick", quick, 100).await;
        let bare = raw_latency(&sink, 50).await;
        let bare_median = median(&bare);
        for (label, samples) in [("default delivery (batch age 1 s)", &default_policy), ("batch age 100 ms", &quick_policy)] {
            println!(
                "sample to queryable row, {label}: median {} p99 {}; bare insert+select {}; ratio {:.1}",
                ms(median(samples)),
                ms(percentile(samples, 990)),
                ms(bare_median),
                median(samples).as_secs_f64() / bare_median.as_secs_f64().max(f64::EPSILON)
            );
        }
    });
}
