//! billaged as a process, against a real ClickHouse server on loopback:
//! batches through it land once, heartbeats and gaps land, a host's whole
//! billing pipeline can point at it, and malformed or oversized batches are
//! refused with clear errors while the service stays up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use connectrpc::ErrorCode;
use connectrpc::client::{ClientConfig, HttpClient};
use metald_billing::clickhouse::ClickHouseSink;
use metald_billing::delivery::DeliveryPolicy;
use metald_billing::proto::billing::v1 as wire;
use metald_billing::service::{ServiceSink, record_to_wire};
use metald_billing::{Batch, BillingSink, Counters, HostHeartbeat, UsageGap, UsageRecord};
use metald_core::{TenantId, VmId};
use metald_testguest::clickhouse::{ClickHouseServer, require_clickhouse};
use metald_testguest::wait_until;

const DATABASE: &str = "billing";
const MAX_RECORDS: usize = 1_000;
const MAX_BODY: usize = 256 * 1024;
/// How long a test waits for what must come on a busy host before it fails.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

struct Billaged {
    process: Child,
    address: String,
}

impl Billaged {
    fn start(clickhouse: &ClickHouseServer) -> Self {
        let mut process = Command::new(env!("CARGO_BIN_EXE_billaged"))
            .args(["--listen", "127.0.0.1:0", "--clickhouse-url", &clickhouse.url(), "--database", DATABASE])
            .args(["--max-batch-records", &MAX_RECORDS.to_string(), "--max-body-bytes", &MAX_BODY.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(process.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let address =
            line.trim().strip_prefix("billaged listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_owned();
        Self { process, address }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn assert_running(&mut self) {
        assert!(self.process.try_wait().unwrap().is_none(), "billaged exited");
    }
}

impl Drop for Billaged {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn record(vm: &str, sequence: u64) -> UsageRecord {
    let start_ms = 1_795_737_600_000 + sequence * 100;
    UsageRecord {
        tenant_id: TenantId::new("acme").unwrap(),
        vm_id: VmId::new(vm).unwrap(),
        sequence,
        start_ms,
        end_ms: start_ms + 100,
        usage: Counters { cpu_ns: 5_000_000, memory_bytes: 64 << 20, ..Counters::default() },
        vcpus: 1,
        memory_limit_bytes: 128 << 20,
        missed_ticks: 0,
        paused: false,
        final_record: false,
    }
}

fn batch(vm: &str, sequences: std::ops::RangeInclusive<u64>) -> Vec<UsageRecord> {
    sequences.map(|sequence| record(vm, sequence)).collect()
}

fn client(billaged: &Billaged) -> wire::BillingServiceClient<HttpClient> {
    wire::BillingServiceClient::new(HttpClient::plaintext(), ClientConfig::new(billaged.url().parse().unwrap()))
}

fn request(records: &[UsageRecord]) -> wire::SubmitUsageRequest {
    wire::SubmitUsageRequest {
        host_id: "host-a".into(),
        batch_id: "test-batch".into(),
        records: records.iter().map(record_to_wire).collect(),
        ..Default::default()
    }
}

async fn count(sink: &ClickHouseSink, sql: &str) -> u64 {
    sink.client().query(&sql.replace("{db}", DATABASE)).fetch_one::<u64>().await.unwrap()
}

/// Waits until billaged has migrated the schema and takes batches.
async fn ready(service: &ServiceSink) {
    wait_until("billaged to take heartbeats", WAIT_LIMIT, || async { service.heartbeat(&HostHeartbeat::default()).await.is_ok() }).await;
}

#[tokio::test]
async fn batches_heartbeats_and_gaps_land_once_and_a_replay_is_only_acknowledged() {
    let Some(clickhouse) = require_clickhouse("batches_heartbeats_and_gaps_land_once_and_a_replay_is_only_acknowledged") else { return };
    let billaged = Billaged::start(&clickhouse);
    let service = ServiceSink::new(&billaged.url(), "host-a").unwrap();
    ready(&service).await;
    let reader = ClickHouseSink::new(&clickhouse.url(), DATABASE, "reader");

    let first = batch("vm-a", 1..=300);
    let delivered = service.deliver(Batch::first(&first)).await.unwrap();
    assert_eq!((delivered.accepted, delivered.duplicates), (300, 0));
    let replayed = service.deliver(Batch::resent(&first)).await.unwrap();
    assert_eq!((replayed.accepted, replayed.duplicates), (0, 300));
    let overlapping = batch("vm-a", 250..=400);
    let delivered = service.deliver(Batch::resent(&overlapping)).await.unwrap();
    assert_eq!((delivered.accepted, delivered.duplicates), (100, 51));
    assert_eq!(count(&reader, "SELECT count() FROM {db}.usage_intervals").await, 400);
    assert_eq!(count(&reader, "SELECT uniqExact(vm_id, sequence) FROM {db}.usage_intervals").await, 400);
    assert_eq!(count(&reader, "SELECT sum(intervals) FROM {db}.usage_daily_tenant").await, 400);
    assert_eq!(count(&reader, "SELECT count() FROM {db}.usage_intervals WHERE host_id != 'host-a'").await, 0);

    let gap = UsageGap {
        tenant_id: TenantId::new("acme").unwrap(),
        vm_id: VmId::new("vm-a").unwrap(),
        from_ms: 1_000,
        to_ms: 2_000,
        reason: "test gap".into(),
    };
    service.report_gap(&gap).await.unwrap();
    assert_eq!(count(&reader, "SELECT count() FROM {db}.usage_gaps WHERE host_id = 'host-a' AND to_ms - from_ms = 1000").await, 1);
    assert!(count(&reader, "SELECT count() FROM {db}.host_heartbeats WHERE host_id = 'host-a'").await >= 1);
}

#[tokio::test]
async fn malformed_and_oversized_batches_are_refused_clearly_and_billaged_stays_up() {
    let Some(clickhouse) = require_clickhouse("malformed_and_oversized_batches_are_refused_clearly_and_billaged_stays_up") else { return };
    let mut billaged = Billaged::start(&clickhouse);
    let service = ServiceSink::new(&billaged.url(), "host-a").unwrap();
    ready(&service).await;
    let client = client(&billaged);

    let mut cases: Vec<(&str, wire::SubmitUsageRequest, ErrorCode, &str)> = Vec::new();
    let good = batch("vm-b", 1..=3);
    let mut no_host = request(&good);
    no_host.host_id.clear();
    cases.push(("no host", no_host, ErrorCode::InvalidArgument, "host_id"));
    let mut no_batch_id = request(&good);
    no_batch_id.batch_id.clear();
    cases.push(("no batch id", no_batch_id, ErrorCode::InvalidArgument, "batch_id"));
    cases.push(("no records", request(&[]), ErrorCode::InvalidArgument, "at least one record"));
    let mut bad_vm = request(&good);
    bad_vm.records[1].vm_id = "../etc".into();
    cases.push(("bad VM id", bad_vm, ErrorCode::InvalidArgument, "records[1].vm_id"));
    let mut zero_sequence = request(&good);
    zero_sequence.records[2].sequence = 0;
    cases.push(("sequence 0", zero_sequence, ErrorCode::InvalidArgument, "records[2].sequence"));
    let mut backwards = request(&good);
    backwards.records[0].end_ms = backwards.records[0].start_ms - 1;
    cases.push(("end before start", backwards, ErrorCode::InvalidArgument, "records[0].end_ms"));
    let mut paused_cpu = request(&good);
    paused_cpu.records[0].paused = true;
    cases.push(("CPU while paused", paused_cpu, ErrorCode::InvalidArgument, "records[0].cpu_ns"));
    cases.push(("too many records", request(&batch("vm-b", 1..=1_500)), ErrorCode::ResourceExhausted, "at most 1000"));
    cases.push(("body too large", request(&batch("vm-b", 1..=20_000)), ErrorCode::ResourceExhausted, "exceeds limit"));

    for (case, request, code, needle) in cases {
        let error = client.submit_usage(request).await.expect_err(case);
        let message = error.message.clone().unwrap_or_default();
        eprintln!("{case}: {} {message}", error.code.as_str());
        assert_eq!(error.code, code, "{case}: {error}");
        assert!(message.contains(needle), "{case}: {message:?} does not mention {needle:?}");
        billaged.assert_running();
    }

    // Bytes that are not a request at all, in both encodings.
    for (content_type, body) in
        [("application/json", &b"{\"host_id\": \"host-a\", \"records\": [{"[..]), ("application/proto", &[0xff, 0xff, 0xff][..])]
    {
        let (status, answer) = raw_post(&billaged.address, "/billing.v1.BillingService/SubmitUsage", content_type, body);
        eprintln!("garbage {content_type}: {status} {answer}");
        assert_eq!(status, 400, "garbage {content_type}: {answer}");
        assert!(answer.contains("invalid_argument"), "garbage {content_type}: {answer}");
        billaged.assert_running();
    }

    // Nothing refused was stored, and good batches still go through.
    let delivered = service.deliver(Batch::first(&good)).await.unwrap();
    assert_eq!((delivered.accepted, delivered.duplicates), (3, 0));
    let reader = ClickHouseSink::new(&clickhouse.url(), DATABASE, "reader");
    assert_eq!(count(&reader, "SELECT count() FROM {db}.usage_intervals").await, 3);
    billaged.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_billing_pipeline_can_deliver_through_billaged() {
    let Some(clickhouse) = require_clickhouse("a_hosts_billing_pipeline_can_deliver_through_billaged") else { return };
    let billaged = Billaged::start(&clickhouse);
    let service = ServiceSink::new(&billaged.url(), "host-c").unwrap();
    ready(&service).await;
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let spool = Arc::new(metald_billing::Spool::open(dir.path().join("spool.db"), 16 << 20).unwrap());
    let (events, receiver) = tokio::sync::broadcast::channel(16);
    let config = metald_billing::BillingConfig {
        delivery: DeliveryPolicy {
            max_age: Duration::from_millis(100),
            heartbeat_every: Duration::from_millis(200),
            ..DeliveryPolicy::default()
        },
        ..metald_billing::BillingConfig::default()
    };
    let source = Arc::new(FixedCounters);
    let billing = metald_billing::Billing::start(receiver, Arc::clone(&spool), source, None, Arc::new(service), config).unwrap();
    let vm_id = VmId::new("vm-through-billaged").unwrap();
    let event = |kind| metald_core::VmEvent {
        vm_id: vm_id.clone(),
        tenant: TenantId::new("acme").unwrap(),
        at: std::time::SystemTime::now(),
        state: metald_core::VmState::Running,
        kind,
    };
    let running = metald_core::events::RunningVmm { pid: Some(1), cgroup: None, taps: Vec::new(), vcpus: 2, memory_bytes: 256 << 20 };
    events.send(event(metald_core::VmEventKind::Booted(running))).unwrap();
    // How fast rows come depends on what else the host runs; the test waits for
    // several batches and heartbeats to have gone through billaged, however long that takes.
    let reader = ClickHouseSink::new(&clickhouse.url(), DATABASE, "reader");
    let rows_sql = "SELECT count() FROM {db}.usage_intervals WHERE vm_id = 'vm-through-billaged'";
    let heartbeats_sql = "SELECT count() FROM {db}.host_heartbeats WHERE host_id = 'host-c'";
    wait_until("five rows through billaged", WAIT_LIMIT, || async { count(&reader, rows_sql).await >= 5 }).await;
    wait_until("two heartbeats through billaged", WAIT_LIMIT, || async { count(&reader, heartbeats_sql).await >= 2 }).await;
    events
        .send(event(metald_core::VmEventKind::Stopped { exit: None, forced: false, by_guest: false, usage: None, booted_at: None }))
        .unwrap();
    // Stopping takes the final record on the meter's last tick and delivers it.
    billing.stop().await;

    assert_eq!(spool.depth().unwrap().records, 0);
    let rows = count(&reader, rows_sql).await;
    let last = count(&reader, "SELECT max(sequence) FROM {db}.usage_intervals WHERE vm_id = 'vm-through-billaged'").await;
    let finals = count(&reader, "SELECT countIf(final_record = 1) FROM {db}.usage_intervals WHERE vm_id = 'vm-through-billaged'").await;
    assert_eq!((rows, finals), (last, 1), "each interval once, and one final record");
}

/// A VM whose counters never move: this test is about the path, not the figures.
#[derive(Debug)]
struct FixedCounters;

impl metald_billing::source::CounterSource for FixedCounters {
    fn read(&self, _target: &metald_billing::source::MeterTarget) -> std::io::Result<Counters> {
        Ok(Counters { memory_bytes: 64 << 20, ..Counters::default() })
    }
}

/// One HTTP/1.1 POST, answered with (status, body): for bytes no client library would send.
fn raw_post(address: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, answer)
}
