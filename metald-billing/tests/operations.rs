//! Billing under the operations an operator runs, on real jailed
//! Firecracker VMs with the real meter and spool: every VMM life ends in
//! one final record even when a delete or the next boot follows the stop
//! at once, a reboot charges each VMM only what its own cgroup counted,
//! a VMM that is stopped or stuck delays no other VM's records, and a
//! paused VM that a graceful stop lets run is charged for that run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald-core/tests/common/mod.rs"]
mod sandbox;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metald_billing::delivery::DeliveryPolicy;
use metald_billing::{Billing, BillingConfig, JsonLinesSink, Spool, UsageRecord};
use metald_core::events::{VmEvent, VmEventKind};
use metald_core::operations::{Boot, Delete, Info, Pause, Reboot, Shutdown};
use metald_core::{StopOptions, VmId};
use metald_testguest::{cmdline, console, wait_until};
use sandbox::Sandbox;
use tokio::sync::broadcast;

const SPOOL_QUOTA: u64 = 64 << 20;
const FORCED: StopOptions = StopOptions { force: true, timeout: None };
/// What a record may charge beyond its vCPUs × its length: a VMM's first
/// record also carries its own start-up (jail, VMM, configuration), which
/// its cgroup counted before the boot that starts the record.
const SLACK_NS: u64 = 500_000_000;

fn quick_delivery() -> BillingConfig {
    BillingConfig {
        delivery: DeliveryPolicy { max_batch: 500, max_age: Duration::from_millis(100), ..DeliveryPolicy::default() },
        ..BillingConfig::default()
    }
}

/// A sandbox metered into a JSON Lines file.
struct Metered {
    sandbox: Sandbox,
    billing: Option<Billing>,
    usage_file: std::path::PathBuf,
}

impl Metered {
    fn new(test: &str) -> Option<Self> {
        let sandbox = Sandbox::new(test)?;
        let spool = Arc::new(Spool::open(sandbox.dir.path().join("spool.db"), SPOOL_QUOTA).unwrap());
        let usage_file = sandbox.dir.path().join("usage.jsonl");
        let sink = Arc::new(JsonLinesSink::open(&usage_file).unwrap());
        let billing = Billing::for_manager(&sandbox.manager, spool, sink, quick_delivery()).unwrap();
        Some(Self { sandbox, billing: Some(billing), usage_file })
    }

    fn records(&self, vm_id: &VmId) -> Vec<UsageRecord> {
        records_in(&self.usage_file, vm_id)
    }

    async fn wait_for_records(&self, vm_id: &VmId, count: usize) {
        wait_until("usage records of the VM", Duration::from_secs(60), || {
            let enough = self.records(vm_id).len() >= count;
            async move { enough }
        })
        .await;
    }

    async fn wait_for_finals(&self, vm_id: &VmId, count: usize) {
        wait_until("the VM's final records", Duration::from_secs(30), || {
            let finals = self.records(vm_id).iter().filter(|record| record.final_record).count();
            async move { finals >= count }
        })
        .await;
    }

    /// Stops billing (one last tick, then delivery) and returns the gaps it reported.
    async fn stop(&mut self) -> Vec<String> {
        if let Some(billing) = self.billing.take() {
            billing.stop().await;
        }
        let mut gaps = self.usage_file.clone().into_os_string();
        gaps.push(".gaps");
        std::fs::read_to_string(gaps).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

fn records_in(path: &Path, vm_id: &VmId) -> Vec<UsageRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    metald_testguest::finished_lines(&text)
        .map(|line| serde_json::from_str::<UsageRecord>(line).unwrap())
        .filter(|record| &record.vm_id == vm_id)
        .collect()
}

/// Splits a VM's records into VMM lives: a life ends with its final record.
fn lives(records: &[UsageRecord]) -> Vec<&[UsageRecord]> {
    records.split_inclusive(|record| record.final_record).filter(|life| !life.is_empty()).collect()
}

/// Sequences 1..=n once each, and within each life every record starts where the one before ended.
fn assert_contiguous(vm_id: &VmId, records: &[UsageRecord]) {
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.sequence, index as u64 + 1, "{vm_id}: sequences are not 1..=n: {records:?}");
    }
    for life in lives(records) {
        for pair in life.windows(2) {
            assert_eq!(pair[1].start_ms, pair[0].end_ms, "{vm_id}: a gap or overlap before sequence {}", pair[1].sequence);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_vmm_life_ends_in_one_final_record_when_a_delete_or_boot_follows_its_stop_at_once() {
    let test = "every_vmm_life_ends_in_one_final_record_when_a_delete_or_boot_follows_its_stop_at_once";
    let Some(mut metered) = Metered::new(test) else { return };
    let sandbox = &metered.sandbox;

    // Deleted while running, forced and graceful: the delete stops the VMM itself.
    let forced_delete = sandbox.boot_guest(&[]).await;
    let graceful_delete = sandbox.boot_guest(&[]).await;
    // Stopped, then deleted at once.
    let stop_then_delete = sandbox.boot_guest(&[]).await;
    // Stopped and booted again at once, three times, then deleted while running.
    let stop_then_boot = sandbox.boot_guest(&[]).await;
    for vm_id in [&forced_delete, &graceful_delete, &stop_then_delete, &stop_then_boot] {
        metered.wait_for_records(vm_id, 2).await;
    }

    sandbox.manager.run(&forced_delete, Delete(FORCED)).await.unwrap();
    sandbox.manager.run(&graceful_delete, Delete(StopOptions::default())).await.unwrap();
    sandbox.manager.run(&stop_then_delete, Shutdown(FORCED)).await.unwrap();
    sandbox.manager.run(&stop_then_delete, Delete(FORCED)).await.unwrap();
    for _ in 0..3 {
        sandbox.manager.run(&stop_then_boot, Shutdown(FORCED)).await.unwrap();
        sandbox.manager.run(&stop_then_boot, Boot).await.unwrap();
        sandbox.wait_for_line(&stop_then_boot, console::READY).await;
    }
    sandbox.manager.run(&stop_then_boot, Delete(FORCED)).await.unwrap();

    for (vm_id, vmm_lives) in [(&forced_delete, 1), (&graceful_delete, 1), (&stop_then_delete, 1), (&stop_then_boot, 4)] {
        metered.wait_for_finals(vm_id, vmm_lives).await;
    }
    let gaps = metered.stop().await;
    assert_eq!(gaps, Vec::<String>::new(), "metald metered all along, so no time is unknown");
    for (vm_id, vmm_lives) in [(&forced_delete, 1), (&graceful_delete, 1), (&stop_then_delete, 1), (&stop_then_boot, 4)] {
        let records = metered.records(vm_id);
        assert_contiguous(vm_id, &records);
        let finals = records.iter().filter(|record| record.final_record).count();
        assert_eq!(finals, vmm_lives, "{vm_id}: one final record per VMM life: {records:?}");
        assert!(records.last().unwrap().final_record, "{vm_id}: nothing follows the last final record");
    }
    assert_eq!(metered.sandbox.leftovers(), Vec::<String>::new());
}

/// The time of an event as the meter stamps records with it.
fn event_ms(at: SystemTime) -> u64 {
    u64::try_from(at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// What each VMM of the VM counted in its cgroup when it ended, and when, from Rebooted and Stopped events.
async fn ended_vmms(events: &mut broadcast::Receiver<VmEvent>, vm_id: &VmId, count: usize) -> Vec<(u64, u64)> {
    let mut ended = Vec::new();
    while ended.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("an event").unwrap();
        if &event.vm_id != vm_id {
            continue;
        }
        let usage = match event.kind {
            VmEventKind::Rebooted { ended, .. } => ended,
            VmEventKind::Stopped { usage, .. } => usage,
            _ => continue,
        };
        ended.push((event_ms(event.at), usage.expect("a jailed VMM's cgroup usage").cpu_ns));
    }
    ended
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reboot_charges_each_vmm_exactly_what_its_own_cgroup_counted() {
    let test = "a_reboot_charges_each_vmm_exactly_what_its_own_cgroup_counted";
    let Some(mut metered) = Metered::new(test) else { return };
    let mut events = metered.sandbox.manager.subscribe();
    let sandbox = &metered.sandbox;
    // One vCPU, spinning: every VMM charges about a core while it runs.
    let vm_id = sandbox.boot_guest(&[&cmdline::burn_forever()]).await;
    let reboots = 4;
    for round in 1..=reboots {
        metered.wait_for_records(&vm_id, round * 3).await;
        sandbox.manager.run(&vm_id, Reboot(FORCED)).await.unwrap();
        sandbox.wait_for_line(&vm_id, console::READY).await;
    }
    metered.wait_for_records(&vm_id, (reboots + 1) * 3).await;
    sandbox.manager.run(&vm_id, Shutdown(FORCED)).await.unwrap();
    let ended = ended_vmms(&mut events, &vm_id, reboots + 1).await;
    metered.wait_for_finals(&vm_id, 1).await;
    metered.stop().await;

    let records = metered.records(&vm_id);
    assert_contiguous(&vm_id, &records);
    for record in &records {
        let most_ns = u64::from(record.vcpus) * record.duration_ms() * 1_000_000 + SLACK_NS;
        assert!(
            record.usage.cpu_ns <= most_ns,
            "{} vCPU(s) cannot use {} ns in {} ms: {record:?}",
            record.vcpus,
            record.usage.cpu_ns,
            record.duration_ms()
        );
    }
    // Each VMM's records end where its Rebooted or Stopped event says, and add up to its cgroup's count.
    let mut from = 0;
    for (index, (end_ms, cgroup_ns)) in ended.iter().enumerate() {
        // A tick taken in the event's millisecond, before the meter applied it, ends there
        // too: the VMM's closing record is the last one that does.
        let to = records[from..]
            .iter()
            .rposition(|record| record.end_ms == *end_ms)
            .map(|at| from + at)
            .unwrap_or_else(|| panic!("no record of VMM {} ends at its event's time {end_ms}: {records:?}", index + 1));
        let charged: u64 = records[from..=to].iter().map(|record| record.usage.cpu_ns).sum();
        assert_eq!(charged, *cgroup_ns, "VMM {} was charged {charged} ns, its cgroup counted {cgroup_ns} ns", index + 1);
        from = to + 1;
    }
    assert_eq!(from, records.len(), "records after the last VMM ended: {:?}", &records[from..]);
    metered.sandbox.manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    assert_eq!(metered.sandbox.leftovers(), Vec::<String>::new());
}

/// Sends a signal to a VMM process.
fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_vmm_and_a_slow_graceful_stop_delay_no_other_vms_records() {
    let test = "a_stopped_vmm_and_a_slow_graceful_stop_delay_no_other_vms_records";
    let Some(mut metered) = Metered::new(test) else { return };
    let sandbox = &metered.sandbox;
    let mut others = Vec::new();
    for _ in 0..18 {
        others.push(sandbox.boot_guest(&[]).await);
    }
    let frozen = sandbox.boot_guest(&[]).await;
    let ignoring = sandbox.boot_guest(&[cmdline::IGNORE_SHUTDOWN]).await;
    for vm_id in others.iter().chain([&frozen, &ignoring]) {
        metered.wait_for_records(vm_id, 2).await;
    }
    let frozen_pid = sandbox.manager.run(&frozen, Info).await.unwrap().vmm.and_then(|vmm| vmm.pid).expect("the VMM's pid");
    signal(frozen_pid, nix::sys::signal::Signal::SIGSTOP);

    // The graceful stop holds its VM for the whole timeout: the guest ignores it.
    let stall = Duration::from_secs(6);
    let stall_started_ms = metald_types::time::unix_millis_now();
    sandbox.manager.run(&ignoring, Shutdown(StopOptions { force: false, timeout: Some(stall) })).await.unwrap();
    let stall_ended_ms = metald_types::time::unix_millis_now();
    // Whole records past the stall, for every VM.
    for vm_id in &others {
        let taken = metered.records(vm_id).len();
        metered.wait_for_records(vm_id, taken + 2).await;
    }
    signal(frozen_pid, nix::sys::signal::Signal::SIGCONT);
    let stats = Arc::clone(metered.billing.as_ref().unwrap().meter_stats());
    for vm_id in others.iter().chain([&frozen, &ignoring]) {
        metered.sandbox.manager.run(vm_id, Delete(FORCED)).await.unwrap();
    }
    metered.stop().await;

    let meter_missed = stats.missed_ticks.load(std::sync::atomic::Ordering::Relaxed);
    let mut longest = (0, None);
    for vm_id in &others {
        let records = metered.records(vm_id);
        assert_contiguous(vm_id, &records);
        let during: Vec<&UsageRecord> =
            records.iter().filter(|record| record.end_ms > stall_started_ms && record.start_ms < stall_ended_ms).collect();
        assert!(!during.is_empty(), "{vm_id} has no record during the stall");
        for record in during {
            if record.duration_ms() > longest.0 {
                longest = (record.duration_ms(), Some(record.clone()));
            }
            assert!(u64::from(record.missed_ticks) <= meter_missed, "{vm_id}: {record:?} shows ticks the meter never missed");
        }
    }
    eprintln!(
        "stall of {} ms; the longest record of the other VMs during it: {longest:?}; the meter missed {meter_missed} ticks",
        stall_ended_ms - stall_started_ms
    );
    // A tick or a few may come late on a busy host; the stall itself lasted seconds, and a
    // meter waiting on the stuck VM made one record of all of it.
    assert!(
        longest.0 < (stall_ended_ms - stall_started_ms) / 2,
        "a VM's record spans {} ms of a {} ms stall: {:?}",
        longest.0,
        stall_ended_ms - stall_started_ms,
        longest.1
    );
    assert_eq!(metered.sandbox.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_vm_stopped_booted_and_killed_gets_a_final_record_for_each_vmm() {
    let test = "a_paused_vm_stopped_booted_and_killed_gets_a_final_record_for_each_vmm";
    let Some(mut metered) = Metered::new(test) else { return };
    let sandbox = &metered.sandbox;
    let vm_id = sandbox.create(sandbox.guest_config(&[&cmdline::heartbeat_ms(50)])).await;
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    sandbox.manager.run(&vm_id, Pause).await.unwrap();
    sandbox.manager.run(&vm_id, Shutdown(FORCED)).await.unwrap();
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    let pid = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.and_then(|vmm| vmm.pid).unwrap();
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    wait_until("the VM to fail", Duration::from_secs(20), || async {
        sandbox.manager.state(&vm_id).unwrap() == metald_core::VmState::Failed
    })
    .await;
    metered.wait_for_finals(&vm_id, 2).await;
    metered.stop().await;
    let records = metered.records(&vm_id);
    assert_contiguous(&vm_id, &records);
    assert_eq!(records.iter().filter(|record| record.final_record).count(), 2, "{records:?}");
    metered.sandbox.manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    assert_eq!(metered.sandbox.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_vm_stopped_gracefully_is_charged_for_the_time_it_ran_to_hear_the_stop() {
    let test = "a_paused_vm_stopped_gracefully_is_charged_for_the_time_it_ran_to_hear_the_stop";
    let Some(mut metered) = Metered::new(test) else { return };
    let mut events = metered.sandbox.manager.subscribe();
    let sandbox = &metered.sandbox;
    let vm_id = sandbox.boot_guest(&[&cmdline::burn_forever()]).await;
    metered.wait_for_records(&vm_id, 2).await;
    sandbox.manager.run(&vm_id, Pause).await.unwrap();
    // A graceful stop resumes the guest so that it hears Ctrl+Alt+Del; it spins until it stops.
    sandbox.manager.run(&vm_id, Shutdown(StopOptions { force: false, timeout: Some(Duration::from_secs(2)) })).await.unwrap();
    let (mut paused_at, mut resumed_at, mut ended) = (None, None, None);
    while ended.is_none() {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("an event").unwrap();
        if event.vm_id != vm_id {
            continue;
        }
        match event.kind {
            VmEventKind::Paused { usage } => paused_at = usage,
            VmEventKind::Resumed { usage } => resumed_at = usage,
            VmEventKind::Stopped { usage, .. } => ended = usage,
            _ => {}
        }
    }
    metered.wait_for_finals(&vm_id, 1).await;
    metered.stop().await;

    let (paused_at, ended) = (paused_at.expect("the pause's reading").cpu_ns, ended.expect("the stop's reading").cpu_ns);
    let resumed_at = resumed_at.expect("a Resumed event when the stop let the paused guest run").cpu_ns;
    let records = metered.records(&vm_id);
    assert_contiguous(&vm_id, &records);
    // Everything the cgroup counted, except while the VM was paused.
    let charged: u64 = records.iter().map(|record| record.usage.cpu_ns).sum();
    assert_eq!(charged, ended - (resumed_at - paused_at), "{records:?}");
    metered.sandbox.manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    assert_eq!(metered.sandbox.leftovers(), Vec::<String>::new());
}
