//! What the meter reads and when: network counters come from the VM's
//! interface as its VMM's network namespace sees it, turned to the guest's
//! side; and a tick that comes late is recorded as missed, in a longer
//! interval, with nothing lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use metald_billing::delivery::DeliveryPolicy;
use metald_billing::meter::MeterConfig;
use metald_billing::source::{CounterSource, MeterTarget, SystemCounters};
use metald_billing::{Billing, BillingConfig, Counters, JsonLinesSink, Spool, UsageRecord};
use metald_core::events::{RunningVmm, VmEvent, VmEventKind};
use metald_core::{TenantId, VmId, VmState};

/// Two network namespaces joined by a veth pair: `tap0` in the VMM's
/// namespace stands in for the VM's TAP (both are counted by the same
/// `/proc/<pid>/net/dev`), its peer in the other plays the guest.
struct Namespaces {
    vmm: String,
    guest: String,
    holder: Child,
}

impl Namespaces {
    fn new() -> Option<Self> {
        let test = "network_counters_come_from_the_vms_interface_in_its_namespace_turned_to_the_guests_side";
        if !nix::unistd::geteuid().is_root() {
            return metald_testguest::unmet(test, "network namespaces need root");
        }
        let id = std::process::id();
        let (vmm, guest) = (format!("metald-test-{id}-vmm"), format!("metald-test-{id}-guest"));
        let mut namespaces = Self { vmm: vmm.clone(), guest: guest.clone(), holder: Command::new("true").spawn().ok()? };
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap_or_else(|error| panic!("ip {args:?}: {error}"));
            assert!(status.success(), "ip {args:?} failed");
        };
        ip(&["netns", "add", &vmm]);
        ip(&["netns", "add", &guest]);
        // No IPv6 on these links: its neighbour discovery would add packets the test does not send.
        for name in [&vmm, &guest] {
            ip(&["netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        ip(&["-n", &vmm, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns", &guest]);
        ip(&["-n", &vmm, "addr", "add", "10.99.0.1/24", "dev", "tap0"]);
        ip(&["-n", &guest, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
        ip(&["-n", &vmm, "link", "set", "tap0", "up"]);
        ip(&["-n", &guest, "link", "set", "eth0", "up"]);
        // A process in the VMM's namespace, as the VMM would be.
        namespaces.holder = Command::new("ip").args(["netns", "exec", &vmm, "sleep", "60"]).stdout(Stdio::null()).spawn().unwrap();
        let wanted = std::fs::metadata(format!("/run/netns/{vmm}")).unwrap().ino();
        let holder_namespace = format!("/proc/{}/ns/net", namespaces.holder.id());
        let started = std::time::Instant::now();
        while std::fs::metadata(&holder_namespace).map(|namespace| namespace.ino()).ok() != Some(wanted) {
            assert!(started.elapsed() < Duration::from_secs(30), "the holder never entered {vmm}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(namespaces)
    }

    /// Runs `work` on a thread inside namespace `name`.
    fn run_in<R: Send + 'static>(name: &str, work: impl FnOnce() -> R + Send + 'static) -> R {
        let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            work()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        for name in [&self.vmm, &self.guest] {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

#[test]
fn network_counters_come_from_the_vms_interface_in_its_namespace_turned_to_the_guests_side() {
    let Some(namespaces) = Namespaces::new() else { return };
    let target = MeterTarget { pid: Some(namespaces.holder.id()), cgroup: None, taps: vec!["tap0".into()] };
    let before = SystemCounters.read(&target).unwrap();

    // The "guest" sends 20 datagrams of 1000 bytes; the host side answers each with 100.
    let echo = Namespaces::run_in(&namespaces.vmm, || UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 1), 7)).unwrap());
    let echoing = std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        for _ in 0..20 {
            let (size, from) = echo.recv_from(&mut buffer).unwrap();
            // Short answers, so that the two directions cannot be mistaken for each other.
            echo.send_to(&buffer[..size.min(100)], from).unwrap();
        }
    });
    Namespaces::run_in(&namespaces.guest, || {
        let socket = UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 2), 0)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buffer = [0u8; 2048];
        for _ in 0..20 {
            socket.send_to(&[7u8; 1000], SocketAddr::from((Ipv4Addr::new(10, 99, 0, 1), 7))).unwrap();
            socket.recv_from(&mut buffer).unwrap();
        }
    });
    echoing.join().unwrap();

    let after = SystemCounters.read(&target).unwrap();
    let used = after.devices.since(&before.devices);
    eprintln!("guest side: {used:?}");
    // 1000 bytes of payload are 1042 on the wire, 100 are 142; ARP adds a packet or two each way.
    assert!((20..=24).contains(&used.net_tx_packets), "what the guest sent: {used:?}");
    assert!((20 * 1042..20 * 1042 + 200).contains(&used.net_tx_bytes), "what the guest sent: {used:?}");
    assert!((20..=24).contains(&used.net_rx_packets), "what the guest received: {used:?}");
    assert!((20 * 142..20 * 142 + 200).contains(&used.net_rx_bytes), "what the guest received: {used:?}");
}

/// A counter source whose third read takes `stall`, as a stalled host would.
#[derive(Debug)]
struct StallsOnce {
    reads: AtomicU32,
    stall: Duration,
}

impl Default for StallsOnce {
    fn default() -> Self {
        Self { reads: AtomicU32::new(0), stall: Duration::from_millis(350) }
    }
}

impl CounterSource for StallsOnce {
    fn read(&self, _target: &MeterTarget) -> std::io::Result<Counters> {
        if self.reads.fetch_add(1, Ordering::Relaxed) == 2 {
            std::thread::sleep(self.stall);
        }
        Ok(Counters { cpu_ns: metald_types::time::unix_millis_now() * 1_000, ..Counters::default() })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_tick_is_recorded_as_missed_in_a_longer_interval_and_nothing_is_lost() {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path().join("spool.db"), 1 << 20).unwrap());
    let usage_file = dir.path().join("usage.jsonl");
    let sink = Arc::new(JsonLinesSink::open(&usage_file).unwrap());
    let (events, receiver) = tokio::sync::broadcast::channel(16);
    let config = BillingConfig {
        meter: MeterConfig { period: Duration::from_millis(100), block_every: 0 },
        delivery: DeliveryPolicy { max_age: Duration::from_millis(50), ..DeliveryPolicy::default() },
    };
    let billing = Billing::start(receiver, spool, Arc::new(StallsOnce::default()), None, sink, config).unwrap();
    let vm_id = VmId::new("vm-late").unwrap();
    let running = RunningVmm { pid: Some(1), cgroup: None, taps: Vec::new(), vcpus: 1, memory_bytes: 1 << 27 };
    let booted = VmEvent {
        vm_id: vm_id.clone(),
        tenant: TenantId::new("acme").unwrap(),
        at: SystemTime::now(),
        state: VmState::Running,
        kind: VmEventKind::Booted(running),
    };
    events.send(booted).unwrap();
    let stats = Arc::clone(billing.meter_stats());
    // The stall happens on the third read; a few ticks after it, the meter is stopped.
    metald_testguest::wait_until("eight meter ticks", Duration::from_secs(60), || async { stats.ticks.load(Ordering::Relaxed) >= 8 }).await;
    billing.stop().await;
    let missed = stats.missed_ticks.load(Ordering::Relaxed);

    let records: Vec<UsageRecord> =
        std::fs::read_to_string(&usage_file).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert!(missed >= 2, "the meter counted {missed} missed ticks for a 350 ms stall");
    // A busy host may make other ticks late too, some perhaps before the VM was metered; every
    // missed tick a record shows was counted, and one record covers the stall.
    let recorded: u64 = records.iter().map(|record| u64::from(record.missed_ticks)).sum();
    assert!(recorded <= missed, "records show {recorded} missed ticks, the meter counted {missed}: {records:?}");
    assert!(
        records.iter().any(|record| record.missed_ticks >= 2 && record.duration_ms() >= 300),
        "no record covers the stall: {records:?}"
    );
    for pair in records.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
        assert_eq!(pair[1].start_ms, pair[0].end_ms, "a gap in time around {:?}", pair[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_stuck_inside_a_tick_shows_its_lag_while_it_is_stuck() {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path().join("spool.db"), 1 << 20).unwrap());
    let sink = Arc::new(JsonLinesSink::open(dir.path().join("usage.jsonl")).unwrap());
    let (events, receiver) = tokio::sync::broadcast::channel(16);
    let config = BillingConfig { meter: MeterConfig { period: Duration::from_millis(100), block_every: 0 }, ..BillingConfig::default() };
    // Stuck far longer than any scheduling delay, so the lag seen can only be the stall's.
    let source = StallsOnce { reads: AtomicU32::new(0), stall: Duration::from_secs(3) };
    let billing = Billing::start(receiver, spool, Arc::new(source), None, sink, config).unwrap();
    let running = RunningVmm { pid: Some(1), cgroup: None, taps: Vec::new(), vcpus: 1, memory_bytes: 1 << 27 };
    events
        .send(VmEvent {
            vm_id: VmId::new("vm-stuck").unwrap(),
            tenant: TenantId::new("acme").unwrap(),
            at: SystemTime::now(),
            state: VmState::Running,
            kind: VmEventKind::Booted(running),
        })
        .unwrap();
    let stats = Arc::clone(billing.meter_stats());
    metald_testguest::wait_until("a lag of a second while the tick is stuck", Duration::from_secs(60), || {
        let lag = stats.lag();
        async move { lag >= Duration::from_secs(1) }
    })
    .await;
    let ticks_while_stuck = stats.ticks.load(Ordering::Relaxed);
    metald_testguest::wait_until("ticks after the stall", Duration::from_secs(60), || async {
        stats.ticks.load(Ordering::Relaxed) > ticks_while_stuck + 2
    })
    .await;
    billing.stop().await;
    assert!(stats.missed_ticks.load(Ordering::Relaxed) >= 10, "a 3 s stall misses at least 10 ticks");
}
