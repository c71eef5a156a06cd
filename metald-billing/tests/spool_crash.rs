//! The process that holds the spool is killed with SIGKILL mid-stream,
//! three times, and started again: ClickHouse ends up with every interval
//! of every VM exactly once.
//!
//! The holder is this test binary run again as a child process (see
//! `spool_holder_child`). Its 50 VMs are synthetic, with CPU counters that
//! are a known function of the clock, because a real VMM would die with a
//! holder that is killed; the meter, the spool, the delivery and ClickHouse
//! are the real ones. The same VMs "boot" again in every new holder with
//! the same process ids, as VMs a restarted daemon finds still running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{assert_complete, vm_rows};
use metald_billing::clickhouse::ClickHouseSink;
use metald_billing::delivery::DeliveryPolicy;
use metald_billing::source::{CounterSource, MeterTarget};
use metald_billing::{Billing, BillingConfig, Counters, Spool};
use metald_core::cgroups::CgroupUsage;
use metald_core::events::{RunningVmm, VmEvent, VmEventKind};
use metald_core::{TenantId, VmId, VmState};

const HOLDER_ENV: &str = "METALD_TEST_SPOOL_HOLDER";
const VMS: u32 = 50;
/// Each VM uses half a CPU: this much CPU per wall-clock millisecond.
const CPU_NS_PER_MS: u64 = 500_000;

/// Every VM's CPU counter: a function of the clock, so the test knows what
/// the sum of a VM's records must be.
/// Once the VMs are stopped their counters stand still, as a cgroup's do
/// when its processes are gone, so a read that comes late cannot count on.
#[derive(Debug)]
struct HalfBusy {
    booted_ms: u64,
    stopped_ms: std::sync::atomic::AtomicU64,
}

impl HalfBusy {
    fn new(booted_ms: u64) -> Self {
        Self { booted_ms, stopped_ms: std::sync::atomic::AtomicU64::new(u64::MAX) }
    }

    fn at(&self, ms: u64) -> u64 {
        ms.min(self.stopped_ms.load(std::sync::atomic::Ordering::SeqCst)).saturating_sub(self.booted_ms) * CPU_NS_PER_MS
    }

    fn stop_at(&self, ms: u64) {
        self.stopped_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl CounterSource for HalfBusy {
    fn read(&self, _target: &MeterTarget) -> io::Result<Counters> {
        Ok(Counters { cpu_ns: self.at(metald_types::time::unix_millis_now()), memory_bytes: 64 << 20, ..Counters::default() })
    }
}

fn vm(index: u32) -> VmId {
    VmId::new(format!("crash-vm-{index:02}")).unwrap()
}

fn event(index: u32, at: SystemTime, kind: VmEventKind) -> VmEvent {
    VmEvent { vm_id: vm(index), tenant: TenantId::new("crash-tenant").unwrap(), at, state: VmState::Running, kind }
}

fn millis(at: SystemTime) -> u64 {
    u64::try_from(at.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// Not a test on its own: the body of the spool-holding child process. It
/// does nothing unless `spool_holder_is_killed_three_times_and_nothing_is_lost_or_doubled`
/// runs it with its settings in the environment.
#[test]
fn spool_holder_child() {
    let Ok(settings) = std::env::var(HOLDER_ENV) else { return };
    let fields: Vec<&str> = settings.split('|').collect();
    let [spool_path, url, booted_ms, run_ms] = fields[..] else { panic!("bad holder settings {settings}") };
    let booted_ms: u64 = booted_ms.parse().unwrap();
    // 0: run until killed; otherwise stop the VMs after this long and exit.
    let run_ms: u64 = run_ms.parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let spool = Arc::new(Spool::open(spool_path, 64 << 20).unwrap());
        let sink = Arc::new(ClickHouseSink::new(url, common::DATABASE, "crash-host"));
        let (events, receiver) = tokio::sync::broadcast::channel(4096);
        let config = BillingConfig {
            // Small, frequent batches: a kill lands mid-delivery often.
            delivery: DeliveryPolicy { max_batch: 25, max_age: Duration::from_millis(20), ..DeliveryPolicy::default() },
            ..BillingConfig::default()
        };
        let source = Arc::new(HalfBusy::new(booted_ms));
        let billing = Billing::start(receiver, spool, Arc::clone(&source) as Arc<dyn CounterSource>, None, sink, config).unwrap();
        let booted = UNIX_EPOCH + Duration::from_millis(booted_ms);
        for index in 0..VMS {
            let running = RunningVmm { pid: Some(40_000 + index), cgroup: None, taps: Vec::new(), vcpus: 1, memory_bytes: 128 << 20 };
            events.send(event(index, booted, VmEventKind::Booted(running))).unwrap();
        }
        println!("HOLDER STARTED");
        if run_ms == 0 {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        let stopped = SystemTime::now();
        source.stop_at(millis(stopped));
        let usage = CgroupUsage { cpu_ns: source.at(millis(stopped)), memory_peak_bytes: None };
        for index in 0..VMS {
            let kind = VmEventKind::Stopped { exit: None, forced: true, by_guest: false, usage: Some(usage), booted_at: None };
            events.send(event(index, stopped, kind)).unwrap();
        }
        // Two ticks: the final records are taken.
        tokio::time::sleep(Duration::from_millis(250)).await;
        billing.stop().await;
        assert_eq!(billing_depth(spool_path), 0, "the holder left records undelivered");
    });
}

fn billing_depth(spool_path: &str) -> u64 {
    Spool::open(spool_path, 64 << 20).unwrap().depth().unwrap().records
}

fn holder(settings: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "spool_holder_child", "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, settings)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_holder_is_killed_three_times_and_nothing_is_lost_or_doubled() {
    let test = "spool_holder_is_killed_three_times_and_nothing_is_lost_or_doubled";
    let Some((server, sink)) = common::clickhouse(test).await else { return };
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let spool_path = dir.path().join("spool.db");
    let booted_ms = metald_types::time::unix_millis_now();
    let settings = |run_ms: u64| format!("{}|{}|{booted_ms}|{run_ms}", spool_path.display(), server.url());

    let mut undelivered_at_kill = Vec::new();
    for lifetime_ms in [1_300, 900, 1_100] {
        let mut child = holder(&settings(0)).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(lifetime_ms)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        undelivered_at_kill.push(billing_depth(spool_path.to_str().unwrap()));
    }
    let finished = holder(&settings(1_000)).output().unwrap();
    assert!(finished.status.success(), "the last holder failed: {}", String::from_utf8_lossy(&finished.stdout));
    eprintln!("records in the spool at each kill: {undelivered_at_kill:?}");

    let (rows, identities, _) = common::raw_rows(&sink).await;
    assert_eq!(rows, identities, "a record arrived twice");
    for index in 0..VMS {
        let vm = vm(index);
        let vm_rows = vm_rows(&sink, vm.as_str()).await;
        assert_complete(vm.as_str(), &vm_rows);
        assert_eq!(vm_rows[0].start_ms, booted_ms, "{vm} was not charged from its boot");
        let charged: u64 = vm_rows.iter().map(|row| row.cpu_ns).sum();
        let counted = HalfBusy::new(booted_ms).at(vm_rows.last().unwrap().end_ms);
        // A record's end is taken just before its VMs are read, a millisecond
        // off at most; one lost or doubled record would be 100 ms off.
        assert!(
            charged.abs_diff(counted) <= 5 * CPU_NS_PER_MS,
            "{vm}: the records sum to {charged} ns of CPU, its counter says {counted} ns"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_vmm_changed_while_nothing_metered_it_gets_a_reported_gap() {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path().join("spool.db"), 1 << 20).unwrap());
    // Where an earlier meter left VM 1: its VMM (pid 7) was metered up to 1 000 ms and not stopped.
    let position = metald_billing::MeterPosition {
        tenant_id: "crash-tenant".into(),
        vm_id: vm(1).to_string(),
        last_sequence: 3,
        last_end_ms: 1_000,
        counters: Counters::default(),
        pid: Some(7),
        closed: false,
    };
    spool.take(&[], &[position]).unwrap();
    let usage_file = dir.path().join("usage.jsonl");
    let sink = Arc::new(metald_billing::JsonLinesSink::open(&usage_file).unwrap());
    let (events, receiver) = tokio::sync::broadcast::channel(16);
    let source = Arc::new(HalfBusy::new(0));
    let config = BillingConfig {
        delivery: DeliveryPolicy { max_age: Duration::from_millis(50), ..DeliveryPolicy::default() },
        ..BillingConfig::default()
    };
    let billing = Billing::start(receiver, Arc::clone(&spool), source, None, sink, config).unwrap();
    let booted = UNIX_EPOCH + Duration::from_millis(5_000);
    let running = RunningVmm { pid: Some(8), cgroup: None, taps: Vec::new(), vcpus: 1, memory_bytes: 128 << 20 };
    events.send(event(1, booted, VmEventKind::Booted(running))).unwrap();
    let usage_file_has_records = || async { std::fs::read_to_string(&usage_file).is_ok_and(|usage| !usage.is_empty()) };
    metald_testguest::wait_until("the new VMM's first record", Duration::from_secs(60), usage_file_has_records).await;
    billing.stop().await;

    let gaps = std::fs::read_to_string(dir.path().join("usage.jsonl.gaps")).unwrap();
    let gaps: Vec<metald_billing::UsageGap> = gaps.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!((gaps[0].vm_id.clone(), gaps[0].from_ms, gaps[0].to_ms), (vm(1), 1_000, 5_000));
    // The new VMM's records continue the VM's sequence.
    let usage = std::fs::read_to_string(&usage_file).unwrap();
    let first: metald_billing::UsageRecord = serde_json::from_str(usage.lines().next().unwrap()).unwrap();
    assert_eq!((first.sequence, first.start_ms), (4, 5_000));
}
