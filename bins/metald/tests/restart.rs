//! VMs outlive the daemon: SIGKILL or SIGTERM leave them running, and the
//! next start takes them over (the same processes), answers for them,
//! meters them on without losing or repeating a record (a VM booted too
//! late for the killed daemon's meter to see is metered from its boot),
//! and marks Failed the ones that died meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Host, HostOptions, Wire, boot_guest, state_of, wait_for_console};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;
use metald_testguest::{cmdline, console};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn vmm_pid(vm_id: &str) -> u32 {
    common::vmm_pid(vm_id).expect("the VM's VMM runs")
}

fn now_ms() -> u64 {
    metald_types::time::unix_millis_now()
}

#[test]
fn vms_outlive_a_killed_daemon_and_are_taken_over_and_metered_on() {
    let test = "vms_outlive_a_killed_daemon_and_are_taken_over_and_metered_on";
    let Some(mut host) = Host::start(test, HostOptions { billing: true, ..HostOptions::default() }) else { return };
    let runtime = runtime();
    let (running, doomed, pids) = runtime.block_on(async {
        let client = host.client("acme", Wire::Grpc);
        let mut running = Vec::new();
        for _ in 0..5 {
            running.push(boot_guest(&client, &[&cmdline::heartbeat_ms(100)]).await);
        }
        let doomed = boot_guest(&client, &[]).await;
        let mut pids = BTreeMap::new();
        for vm_id in running.iter().chain([&doomed]) {
            pids.insert(vm_id.clone(), vmm_pid(vm_id));
        }
        (running, doomed, pids)
    });
    host.wait_for_records_after(&running, now_ms());

    host.kill();
    assert!(pids.values().all(|pid| metald_testguest::process_alive(*pid)), "every VMM outlived metald");
    let doomed_pid = pids[&doomed];
    kill(Pid::from_raw(doomed_pid as i32), Signal::SIGKILL).unwrap();
    // The VMs run on, unwatched and unmetered, for a while.
    std::thread::sleep(Duration::from_millis(700));
    let restarted_at = now_ms();
    host.launch();

    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectJson);
        let list = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
        let states: BTreeMap<String, VmState> = list.vms.iter().map(|vm| (vm.vm_id.clone(), vm.state.as_known().unwrap())).collect();
        for vm_id in &running {
            assert_eq!(states[vm_id], VmState::VM_STATE_RUNNING, "{states:?}");
            assert_eq!(vmm_pid(vm_id), pids[vm_id], "the same VMM process, taken over");
        }
        assert_eq!(states[&doomed], VmState::VM_STATE_FAILED, "{states:?}");
        let failed = list.vms.iter().find(|vm| vm.vm_id == doomed).unwrap();
        assert!(!failed.failure_reason.is_empty(), "{failed:?}");

        // They answer: the console flows again, and one pauses and resumes.
        let before = client
            .get_console(wire::GetConsoleRequest { vm_id: running[0].clone(), ..Default::default() })
            .await
            .unwrap()
            .into_owned()
            .data
            .len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .get_console(wire::GetConsoleRequest { vm_id: running[0].clone(), ..Default::default() })
            .await
            .unwrap()
            .into_owned()
            .data
            .len()
            == before
        {
            assert!(Instant::now() < deadline, "no heartbeat on the console after the takeover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.pause_vm(wire::PauseVmRequest { vm_id: running[1].clone(), ..Default::default() }).await.unwrap();
        client.resume_vm(wire::ResumeVmRequest { vm_id: running[1].clone(), ..Default::default() }).await.unwrap();
        assert_eq!(state_of(&client, &running[1]).await, VmState::VM_STATE_RUNNING);
        wait_for_console(&client, &running[1], console::HEARTBEAT).await;
    });

    // Still metered: records after the restart, and per VM one unbroken
    // chain with no record missing or repeated and no time uncovered.
    host.wait_for_records_after(&running, restarted_at + 300);
    let by_vm = host.usage_by_vm();
    for vm_id in &running {
        let records = &by_vm[vm_id];
        common::assert_one_unbroken_chain(vm_id, records);
        assert!(records.iter().any(|r| r.1 < restarted_at && r.2 > restarted_at), "{vm_id}: one record spans the daemon's absence");
    }

    let metrics = common::http_get(host.port, "/metrics").unwrap().1;
    for family in [
        "metald_vms{state=\"running\"} 5",
        "metald_vms{state=\"failed\"} 1",
        "metald_billing_spool_records ",
        "metald_billing_meter_lag_seconds ",
        "metald_billing_metered_vms 5",
    ] {
        assert!(metrics.contains(family), "{family} in:\n{metrics}");
    }

    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        for vm_id in running.iter().chain([&doomed]) {
            client.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
    });
    // Billed deletes are forgotten: the next start has nothing to tell again.
    let ticks = common::meter_ticks(host.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::meter_ticks(host.port) < ticks + 2 {
        assert!(Instant::now() < deadline, "the meter does not tick; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(host.terminate().success());
    host.launch();
    assert!(!host.log().contains("told again to billing"), "{}", host.log());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

#[test]
fn sigterm_lets_calls_in_flight_finish_and_leaves_vms_running() {
    let test = "sigterm_lets_calls_in_flight_finish_and_leaves_vms_running";
    let Some(mut host) = Host::start(test, HostOptions::default()) else { return };
    let runtime = runtime();
    let (keeper, keeper_pid) = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectJson);
        let keeper = boot_guest(&client, &[&cmdline::heartbeat_ms(100)]).await;
        let stubborn = boot_guest(&client, &[cmdline::IGNORE_SHUTDOWN]).await;
        let keeper_pid = vmm_pid(&keeper);
        // A graceful shutdown the guest ignores takes its whole timeout.
        let slow = {
            let client = host.client("acme", Wire::ConnectJson);
            let stubborn = stubborn.clone();
            tokio::spawn(async move {
                client.shutdown_vm(wire::ShutdownVmRequest { vm_id: stubborn, timeout_seconds: 2, ..Default::default() }).await
            })
        };
        // The guest saying it ignored the request proves the call is inside metald.
        wait_for_console(&client, &stubborn, console::IGNORED_SHUTDOWN).await;
        let daemon = Pid::from_raw(host.pid() as i32);
        kill(daemon, Signal::SIGTERM).unwrap();
        let answer = slow.await.unwrap().expect("the call in flight finished").into_owned();
        assert_eq!(answer.state.as_known(), Some(VmState::VM_STATE_SHUTDOWN));
        (keeper, keeper_pid)
    });
    let status = host.terminate();
    assert!(status.success(), "metald exits cleanly on SIGTERM: {status}");
    assert!(metald_testguest::process_alive(keeper_pid), "the running VM outlived metald");
    assert!(host.log().contains("VMs keep running"), "{}", host.log());

    host.launch();
    runtime.block_on(async {
        let client = host.client("acme", Wire::Grpc);
        assert_eq!(state_of(&client, &keeper).await, VmState::VM_STATE_RUNNING);
        assert_eq!(vmm_pid(&keeper), keeper_pid);
        let list = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
        for vm in &list.vms {
            client.delete_vm(wire::DeleteVmRequest { vm_id: vm.vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
    });
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

/// Waits for the one usage record of a VMM booted and ended before any
/// meter tick saw it, and checks it: from its boot to its end, final, with
/// all its cgroup counted (as the first metald read it before removing the
/// cgroup), and no gap.
fn assert_billed_from_the_store(host: &Host, vm_id: &str, booted_after: u64, ended_before: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host.usage_records().iter().any(|record| record["vm_id"] == vm_id) {
        assert!(Instant::now() < deadline, "no record for {vm_id}; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let records: Vec<serde_json::Value> = host.usage_records().into_iter().filter(|record| record["vm_id"] == vm_id).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!((record["sequence"].as_u64(), record["final_record"].as_bool()), (Some(1), Some(true)), "{record}");
    let (start_ms, end_ms) = (record["start_ms"].as_u64().unwrap(), record["end_ms"].as_u64().unwrap());
    assert!((booted_after..=ended_before).contains(&start_ms) && (start_ms..=ended_before).contains(&end_ms), "{record}");
    let first_log = std::fs::read_to_string(host.log_path(1)).unwrap();
    let counted: u64 = first_log
        .lines()
        .filter(|line| line.contains("VMM cgroup removed") && line.contains(&format!("cgroup={vm_id}.")))
        .find_map(|line| line.split_whitespace().find_map(|word| word.strip_prefix("cpu_ns=")))
        .expect("the VMM's cgroup count in the first run's log")
        .parse()
        .unwrap();
    assert_eq!(record["usage"]["cpu_ns"].as_u64(), Some(counted), "{record}");
    assert!(host.usage_gaps().iter().all(|gap| gap["vm_id"] != vm_id), "{:?}", host.usage_gaps());
}

#[test]
fn vms_booted_stopped_or_deleted_before_the_meter_saw_it_are_billed_from_the_store_after_a_sigkill() {
    let test = "vms_booted_stopped_or_deleted_before_the_meter_saw_it_are_billed_from_the_store_after_a_sigkill";
    // A meter whose first tick is an hour away never learns of the boots,
    // stops and deletes before metald is killed, as in the last tick before
    // a SIGKILL; the same for what the next metald found before it was killed.
    let options = HostOptions { billing: true, meter_period_ms: Some(3_600_000), ..HostOptions::default() };
    let Some(mut host) = Host::start(test, options) else { return };
    let runtime = runtime();
    let before_boots = now_ms();
    let (living, doomed, doomed_pid, stopped, deleted) = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let living = boot_guest(&client, &[&cmdline::heartbeat_ms(100)]).await;
        let doomed = boot_guest(&client, &[]).await;
        let doomed_pid = vmm_pid(&doomed);
        let stopped = boot_guest(&client, &[&cmdline::heartbeat_ms(100)]).await;
        client.shutdown_vm(wire::ShutdownVmRequest { vm_id: stopped.clone(), force: true, ..Default::default() }).await.unwrap();
        let deleted = boot_guest(&client, &[&cmdline::heartbeat_ms(100)]).await;
        client.delete_vm(wire::DeleteVmRequest { vm_id: deleted.clone(), force: true, ..Default::default() }).await.unwrap();
        (living, doomed, doomed_pid, stopped, deleted)
    });
    let after_boots = now_ms();
    assert_eq!(common::meter_ticks(host.port), 0, "the meter ticked before the kill, so it knows the boots; log:\n{}", host.log());

    host.kill();
    kill(Pid::from_raw(doomed_pid as i32), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metald_testguest::process_alive(doomed_pid) {
        assert!(Instant::now() < deadline, "the killed VMM {doomed_pid} is still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second metald takes over and is killed too before its meter ticks: what it found (the
    // dead VMM among them) must still reach the third, from the store.
    let second_started_at = now_ms();
    host.launch();
    assert_eq!(common::meter_ticks(host.port), 0, "the second meter ticked; log:\n{}", host.log());
    host.kill();
    host.edit_config(|toml| toml.replace("meter_period_ms = 3600000", "meter_period_ms = 100"));
    let restarted_at = now_ms();
    host.launch();

    // The VMM that lived on is charged from its boot, not from the takeover.
    host.wait_for_records_after(std::slice::from_ref(&living), restarted_at);
    let records = &host.usage_by_vm()[&living];
    let (sequence, start_ms, _, _) = records[0];
    assert_eq!(sequence, 1, "{records:?}");
    assert!(
        (before_boots..=after_boots).contains(&start_ms),
        "the first record starts at the boot, in {before_boots}..={after_boots}: {records:?}"
    );
    for pair in records.windows(2) {
        assert_eq!(pair[1].1, pair[0].2, "{living}: record {} starts where {} ended", pair[1].0, pair[0].0);
    }

    // The one that died meanwhile: nothing of it was measured, and a gap says so from its boot on.
    let gaps_of_doomed = || -> Vec<(u64, u64)> {
        host.usage_gaps()
            .iter()
            .filter(|gap| gap["vm_id"] == doomed.as_str())
            .map(|gap| (gap["from_ms"].as_u64().unwrap(), gap["to_ms"].as_u64().unwrap()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while gaps_of_doomed().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let gaps = gaps_of_doomed();
    assert_eq!(gaps.len(), 1, "one gap for the VMM that died unmetered: {gaps:?}; log:\n{}", host.log());
    let (from_ms, to_ms) = gaps[0];
    assert!((before_boots..=after_boots).contains(&from_ms), "the gap starts at the boot: {gaps:?}");
    assert!((second_started_at..=restarted_at).contains(&to_ms), "the gap lasts until the second metald found out: {gaps:?}");
    assert!(!host.usage_by_vm().contains_key(&doomed), "no record for a VMM nothing measured");

    // The ones booted and stopped, or deleted, unseen: billed from what the store kept.
    assert_billed_from_the_store(&host, &stopped, before_boots, after_boots);
    assert_billed_from_the_store(&host, &deleted, before_boots, after_boots);

    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        for vm_id in [&living, &doomed, &stopped] {
            client.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
    });
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
