//! The VM lifecycle on the real Firecracker and /dev/kvm, with the test guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Sandbox;
use metald_core::events::VmEventKind;
use metald_core::operations::{Boot, Delete, Info, Metrics, Pause, Reboot, Resume, Shutdown};
use metald_core::{StopOptions, VmState};
use metald_testguest::{cmdline, console};
use tokio::sync::broadcast::error::TryRecvError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_lives_through_boot_pause_resume_shutdown_and_delete() {
    let Some(sandbox) = Sandbox::new("a_vm_lives_through_boot_pause_resume_shutdown_and_delete") else { return };
    let mut events = sandbox.manager.subscribe();
    let writable = sandbox.image("scratch.img", 8 << 20);
    let shared = sandbox.image("shared.img", 4 << 20);
    let mut config = sandbox.guest_config(&[&cmdline::heartbeat_ms(100)]);
    config.storage = vec![Sandbox::drive("scratch", &writable, false), Sandbox::drive("shared", &shared, true)];

    let vm_id = sandbox.create(config).await;
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Created);
    let vm_dir = sandbox.vms.join(vm_id.as_str());
    let copy = vm_dir.join("drives/scratch.img");
    assert!(copy.is_file(), "the writable drive is copied for this VM");
    assert!(!vm_dir.join("drives/shared.img").exists(), "a read-only drive is shared, not copied");

    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    let ready = sandbox.wait_for_line(&vm_id, console::READY).await;
    assert!(ready.contains("testguest.heartbeat_ms=100"), "the ready line carries the command line: {ready}");
    sandbox.wait_for_line(&vm_id, console::HEARTBEAT).await;
    let info = sandbox.manager.run(&vm_id, Info).await.unwrap();
    let vmm = info.vmm.expect("a running VMM reports itself");
    assert_eq!(vmm.vmm_state, "Running");
    let pid = vmm.pid.expect("a pid");

    sandbox.manager.run(&vm_id, Pause).await.unwrap();
    assert_eq!(sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().vmm_state, "Paused");
    let mut lines = sandbox.manager.console(&vm_id).unwrap().subscribe();
    Sandbox::last_line_once_quiet(&mut lines).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    match lines.try_recv() {
        Err(TryRecvError::Empty) => {}
        other => panic!("a paused guest printed {other:?}"),
    }

    sandbox.manager.run(&vm_id, Resume).await.unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(20), lines.recv()).await.expect("a heartbeat after resume").unwrap();
    assert!(beat.starts_with(console::HEARTBEAT), "{beat}");

    sandbox.manager.run(&vm_id, Shutdown(StopOptions { force: false, timeout: Some(Duration::from_secs(10)) })).await.unwrap();
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Shutdown);
    let console_text = String::from_utf8_lossy(&sandbox.manager.console_tail(&vm_id, 1 << 20).unwrap()).into_owned();
    assert!(console_text.contains(console::SHUTDOWN), "the guest saw Ctrl+Alt+Del:\n{console_text}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the VMM process is gone");
    assert!(sandbox.live_vmms().is_empty());

    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(matches!(sandbox.manager.state(&vm_id), Err(metald_core::ManagerError::NotFound(_))));
    assert!(!vm_dir.exists(), "no run folder, socket or drive copy is left");
    assert!(!copy.exists());
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());

    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.vm_id, vm_id);
        seen.push(std::mem::discriminant(&event.kind));
    }
    let expected = [
        VmEventKind::Created,
        VmEventKind::Booted(metald_core::events::RunningVmm { pid: None, cgroup: None, taps: Vec::new(), vcpus: 1, memory_bytes: 0 }),
        VmEventKind::Paused { usage: None },
        VmEventKind::Resumed { usage: None },
        VmEventKind::Stopped { exit: None, forced: false, by_guest: false, usage: None, booted_at: None },
        VmEventKind::Deleted,
    ];
    assert_eq!(seen, expected.iter().map(std::mem::discriminant).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_with_sigkill_makes_its_vm_failed_with_the_reason() {
    let Some(sandbox) = Sandbox::new("a_vmm_killed_with_sigkill_makes_its_vm_failed_with_the_reason") else { return };
    let vm_id = sandbox.boot_guest(&[&cmdline::heartbeat_ms(100)]).await;
    let mut events = sandbox.manager.subscribe();
    let pid = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().pid.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    let event = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("the death is noticed").unwrap();
    match &event.kind {
        VmEventKind::Failed { reason, exit, .. } => {
            assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
            assert_eq!(*exit, Some(metald_core::process::ProcessExit::Killed { signal: 9 }));
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let info = sandbox.manager.run(&vm_id, Info).await.unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert!(info.failure.unwrap().contains("SIGKILL"));

    let error = sandbox.manager.run(&vm_id, Pause).await.unwrap_err();
    assert!(error.to_string().contains("is Failed and cannot pause"), "{error}");
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_boot_concurrently_and_all_delete_cleanly() {
    let Some(sandbox) = Sandbox::new("twenty_vms_boot_concurrently_and_all_delete_cleanly") else { return };
    let sandbox = std::sync::Arc::new(sandbox);
    let boots = (0..20).map(|_| {
        let sandbox = std::sync::Arc::clone(&sandbox);
        tokio::spawn(async move { sandbox.boot_guest(&[]).await })
    });
    let mut vm_ids = Vec::new();
    for boot in boots {
        vm_ids.push(boot.await.unwrap());
    }
    assert_eq!(sandbox.manager.list(None).len(), 20);
    assert!(sandbox.manager.list(None).iter().all(|vm| vm.state == VmState::Running));
    assert_eq!(sandbox.live_vmms().len(), 20);

    let deletes = vm_ids.into_iter().map(|vm_id| {
        let sandbox = std::sync::Arc::clone(&sandbox);
        tokio::spawn(async move {
            sandbox.manager.run(&vm_id, Delete(StopOptions { force: false, timeout: Some(Duration::from_secs(10)) })).await
        })
    });
    for delete in deletes {
        delete.await.unwrap().unwrap();
    }
    assert!(sandbox.manager.list(None).is_empty());
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_resets_itself_is_shut_down_and_boots_again() {
    let Some(sandbox) = Sandbox::new("a_guest_that_resets_itself_is_shut_down_and_boots_again") else { return };
    let mut events = sandbox.manager.subscribe();
    let vm_id = sandbox.create(sandbox.guest_config(&[cmdline::RESET])).await;
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("the reset is noticed").unwrap();
        if let VmEventKind::Stopped { by_guest, exit, .. } = event.kind {
            assert!(by_guest);
            assert_eq!(exit, Some(metald_core::process::ProcessExit::Exited { code: 0 }));
            break;
        }
    }
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Shutdown);
    assert!(sandbox.live_vmms().is_empty());

    // Booting again launches a fresh VMM; the guest resets again at once.
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    let console = sandbox.manager.console(&vm_id).unwrap();
    let text = loop {
        let text = String::from_utf8_lossy(&console.tail(1 << 16).unwrap()).into_owned();
        if text.matches(console::READY).count() >= 2 {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(text.matches(console::READY).count(), 2);
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_restarts_the_guest_and_keeps_the_vm_running() {
    let Some(sandbox) = Sandbox::new("reboot_restarts_the_guest_and_keeps_the_vm_running") else { return };
    let vm_id = sandbox.boot_guest(&[]).await;
    let first_pid = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().pid;
    let mut lines = sandbox.manager.console(&vm_id).unwrap().subscribe();
    sandbox.manager.run(&vm_id, Reboot(StopOptions { force: false, timeout: Some(Duration::from_secs(10)) })).await.unwrap();
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Running);
    let mut saw_shutdown = false;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.recv()).await.expect("the guest comes back").unwrap();
        saw_shutdown |= line.starts_with(console::SHUTDOWN);
        if line.starts_with(console::READY) {
            break;
        }
    }
    assert!(saw_shutdown, "a graceful reboot asks the guest first");
    let second_pid = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().pid;
    assert_ne!(first_pid, second_pid, "Firecracker cannot reboot in place: a fresh VMM runs");
    assert_eq!(sandbox.live_vmms().len(), 1);
    sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

/// A persistent TAP device in the host namespace, removed on drop.
struct TestTap(String);

impl TestTap {
    fn create() -> Option<Self> {
        let name = format!("mdt{}", &uuid_suffix()[..8]);
        let status = std::process::Command::new("ip").args(["tuntap", "add", "dev", &name, "mode", "tap"]).status();
        match status {
            Ok(status) if status.success() => Some(Self(name)),
            other => metald_testguest::unmet(
                "a_vm_attaches_to_an_existing_tap_device",
                &format!("cannot create a TAP device with ip(8): {other:?}"),
            ),
        }
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", "dev", &self.0]).status();
    }
}

fn uuid_suffix() -> String {
    let id = metald_core::VmId::generate();
    id.as_str().trim_start_matches("vm-").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_attaches_to_an_existing_tap_device() {
    let Some(sandbox) = Sandbox::new("a_vm_attaches_to_an_existing_tap_device") else { return };
    let Some(tap) = TestTap::create() else { return };
    let mut config = sandbox.guest_config(&[]);
    config.network = vec![metald_core::config::NetworkInterface {
        id: "eth0".into(),
        tap_device: tap.0.clone(),
        mac_address: "02:00:00:00:00:42".into(),
        rx_rate_limit: Some(metald_core::config::RateLimit { bandwidth: 1 << 20, refill_time_ms: 100, burst: 0 }),
        tx_rate_limit: Some(metald_core::config::RateLimit { bandwidth: 1 << 20, refill_time_ms: 100, burst: 0 }),
        ..Default::default()
    }];
    let vm_id = sandbox.create(config).await;
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    let ready = sandbox.wait_for_line(&vm_id, console::READY).await;
    assert!(ready.contains("virtio_mmio.device="), "Firecracker added the net device to the command line: {ready}");
    let pid = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().pid.unwrap();
    let holds_tap = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .any(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default().contains(&format!("iff:\t{}", tap.0)));
    assert!(holds_tap, "Firecracker holds {} open", tap.0);
    sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_console_rotates_at_its_cap() {
    let Some(sandbox) = Sandbox::with("a_chatty_console_rotates_at_its_cap", |builder, _| builder.console_limit_bytes(512)) else { return };
    let vm_id = sandbox.boot_guest(&[&cmdline::heartbeat_ms(20)]).await;
    let console_log = sandbox.manager.console(&vm_id).unwrap();
    let mut lines = console_log.subscribe();
    // Forty heartbeats are far more than the cap holds.
    let beat = |line: &str| {
        line.strip_prefix(console::HEARTBEAT)
            .and_then(|rest| rest.trim_start().strip_prefix("n="))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    console_log.wait_for_line(|line| beat(line).is_some_and(|n| n >= 40), common::BOOT_TIMEOUT).await.unwrap();
    // Paused, the guest prints nothing more, so the last line published is the newest output.
    sandbox.manager.run(&vm_id, Pause).await.unwrap();
    let newest = Sandbox::last_line_once_quiet(&mut lines).await.expect("heartbeats were published");
    let vm_dir = sandbox.vms.join(vm_id.as_str());
    let current = std::fs::metadata(vm_dir.join("console.log")).unwrap().len();
    let rotated = std::fs::metadata(vm_dir.join("console.log.1")).unwrap().len();
    assert!(current <= 512 && rotated == 512, "each file holds at most the cap: {current} and {rotated}");
    let tail = String::from_utf8(sandbox.manager.console_tail(&vm_id, 1024).unwrap()).unwrap();
    assert!(tail.contains(&*newest), "the newest output ({newest}) is kept: {tail}");
    assert!(!tail.contains(console::READY), "the oldest output is gone");
    sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_ctrl_alt_del_is_killed_at_the_timeout_while_other_vms_carry_on() {
    let Some(sandbox) = Sandbox::new("a_guest_that_ignores_ctrl_alt_del_is_killed_at_the_timeout_while_other_vms_carry_on") else { return };
    let sandbox = std::sync::Arc::new(sandbox);
    let stubborn = sandbox.boot_guest(&[cmdline::IGNORE_SHUTDOWN]).await;
    let other = sandbox.boot_guest(&[]).await;
    let mut events = sandbox.manager.subscribe();

    let shutdown = {
        let (sandbox, stubborn) = (std::sync::Arc::clone(&sandbox), stubborn.clone());
        tokio::spawn(async move {
            sandbox.manager.run(&stubborn, Shutdown(StopOptions { force: false, timeout: Some(Duration::from_secs(8)) })).await
        })
    };
    sandbox.wait_for_line(&stubborn, console::IGNORED_SHUTDOWN).await;

    // The stubborn VM's lock is held by its shutdown; the other VM is not held up.
    sandbox.manager.run(&other, Pause).await.unwrap();
    sandbox.manager.run(&other, Resume).await.unwrap();
    assert!(!shutdown.is_finished(), "the other VM's operations finished while the shutdown still waited");
    assert_eq!(sandbox.manager.state(&stubborn).unwrap(), VmState::Running);
    // An operation on the stubborn VM itself waits for the shutdown to end.
    let info = sandbox.manager.run(&stubborn, Info).await.unwrap();
    assert_eq!(info.state, VmState::Shutdown, "info waited for the shutdown holding the VM");
    shutdown.await.unwrap().unwrap();

    let stopped = loop {
        let event = events.recv().await.unwrap();
        if event.vm_id == stubborn && matches!(event.kind, VmEventKind::Stopped { .. }) {
            break event.kind;
        }
    };
    assert!(matches!(stopped, VmEventKind::Stopped { forced: true, by_guest: false, .. }), "{stopped:?}");
    assert_eq!(sandbox.live_vmms().len(), 1, "only the other VM's VMM is left");
    for vm_id in [stubborn, other] {
        sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    }
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_uses_real_cpu_and_memory() {
    let Some(sandbox) = Sandbox::new("a_busy_guest_uses_real_cpu_and_memory") else { return };
    let before = {
        let vm_id = sandbox.boot_guest(&[]).await;
        let idle = sandbox.manager.run(&vm_id, Metrics).await.unwrap();
        sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
        idle
    };
    let vm_id = sandbox.boot_guest(&[&cmdline::burn(3000), &cmdline::mem_mib(24)]).await;
    let burnt = sandbox.wait_for_line(&vm_id, console::BURN_DONE).await;
    assert!(burnt.contains(&format!("iterations={}", cmdline::scaled(3000))), "{burnt}");
    let touched = sandbox.wait_for_line(&vm_id, console::MEM_DONE).await;
    assert!(touched.contains("mib=24"), "{touched}");
    let busy = sandbox.manager.run(&vm_id, Metrics).await.unwrap();
    assert!(
        busy.resident_bytes >= before.resident_bytes + (20 << 20),
        "24 MiB touched: {} bytes resident, {} when idle",
        busy.resident_bytes,
        before.resident_bytes
    );
    // /proc counts CPU in 10 ms ticks: a fast host may not have used one yet, but it will.
    metald_testguest::wait_until("the VMM's CPU time in /proc", Duration::from_secs(60), || async {
        sandbox.manager.run(&vm_id, Metrics).await.is_ok_and(|metrics| metrics.cpu_time_ns > 0)
    })
    .await;
    sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

/// One HTTP/1.1 request on a fresh connection to a VMM's API socket; the answer's status line.
fn raw_vmm_request(socket: &std::path::Path, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // Firecracker keeps the connection open: read the head, then the body its length announces.
    loop {
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "the VMM hung up without answering");
        answer.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase().strip_prefix("content-length:").map(|value| value.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return head.lines().next().unwrap_or_default().to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vmm_log_keeps_within_its_cap_and_routine_calls_leave_no_line_in_it() {
    const LOG_LIMIT: u64 = 16 << 10;
    let test = "the_vmm_log_keeps_within_its_cap_and_routine_calls_leave_no_line_in_it";
    let Some(sandbox) = Sandbox::with(test, |builder, jail| {
        let binary = metald_testguest::require_firecracker(test).expect("Firecracker, as the sandbox found it");
        let mut vmm = Sandbox::firecracker_config(&binary);
        vmm.log_limit_bytes = LOG_LIMIT;
        builder.backend(Sandbox::jailed(vmm, jail))
    }) else {
        return;
    };
    let vm_id = sandbox.boot_guest(&[&cmdline::heartbeat_ms(100)]).await;
    let vm_dir = sandbox.vms.join(vm_id.as_str());
    let log_path = vm_dir.join("firecracker.log");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // What a tenant looping GetVmInfo and the meter reading every tick do.
    for _ in 0..100 {
        sandbox.manager.run(&vm_id, Info).await.unwrap();
        sandbox.manager.run(&vm_id, Metrics).await.unwrap();
    }
    let log = read_log();
    assert!(log.contains("InstanceStart"), "calls that change the VM are logged:\n{log}");
    assert!(!log.contains("received a Get request"), "state reads leave no line:\n{log}");
    assert!(!log.contains("FlushMetrics"), "metrics flushes leave no line:\n{log}");
    assert!(
        !vm_dir.join("firecracker.metrics").exists() && !vm_dir.join("jail/firecracker.metrics").exists(),
        "no metrics file grows on disk"
    );

    // Calls that Firecracker refuses are logged with their bodies; far more
    // of them than the cap holds.
    let socket = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().api_socket.unwrap();
    let padding = "x".repeat(400);
    for attempt in 0..200 {
        let body = format!(r#"{{"vcpu_count":1,"mem_size_mib":32,"note":"attempt-{attempt}-{padding}"}}"#);
        let status = raw_vmm_request(&socket, "PUT", "/machine-config", &body);
        assert!(status.contains(" 400 "), "a reconfiguration after start is refused: {status}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !read_log().contains("attempt-199-") {
        assert!(std::time::Instant::now() < deadline, "the last refused call never reached the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rotated = vm_dir.join("firecracker.log.1");
    let (current_bytes, rotated_bytes) = (std::fs::metadata(&log_path).unwrap().len(), std::fs::metadata(&rotated).unwrap().len());
    assert!(current_bytes <= LOG_LIMIT && rotated_bytes <= LOG_LIMIT, "the log holds {current_bytes} + {rotated_bytes} bytes");
    assert!(!read_log().contains("attempt-0-"), "the oldest lines made room");

    // The VMM runs on, its guest too.
    let mut lines = sandbox.manager.console(&vm_id).unwrap().subscribe();
    tokio::time::timeout(Duration::from_secs(20), lines.recv()).await.expect("a heartbeat after the flood").unwrap();
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Running);
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(!vm_dir.exists());
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}
