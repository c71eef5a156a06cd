//! VMs outlive the manager that made them: a new manager on the same store
//! takes over every VMM that still runs (proving it is the same process),
//! marks Failed the VMs whose VMM died meanwhile, and keeps stopped ones
//! ready to boot. The first manager lives in a runtime of its own that is
//! shut down, so nothing of it (watchers, console readers) survives, as
//! when the daemon dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{BOOT_TIMEOUT, GUEST_KERNEL, Sandbox};
use metald_core::events::VmEventKind;
use metald_core::operations::{Boot, Delete, Info, Pause, Resume, Shutdown};
use metald_core::store::{SqliteVmStore, VmStore};
use metald_core::{FirecrackerConfig, StopOptions, VmId, VmManager, VmState};
use metald_testguest::{cmdline, console};

fn manager_on(sandbox: &Sandbox, store: &Arc<SqliteVmStore>) -> VmManager {
    VmManager::builder()
        .backend(Arc::new(
            metald_core::FirecrackerBackend::jailed(FirecrackerConfig::new(&sandbox.firecracker), sandbox.jail.clone()).unwrap(),
        ))
        .image_root(&sandbox.images)
        .vm_root(&sandbox.vms)
        .stop_timeout(Duration::from_secs(10))
        .store(Arc::clone(store) as Arc<dyn VmStore>)
        .build()
        .unwrap()
}

struct FirstRun {
    running: VmId,
    paused: VmId,
    stopped: VmId,
    created: VmId,
    killed: VmId,
    killed_pid: u32,
    uids: Vec<u32>,
}

/// The first manager's life, in a runtime that ends with it.
fn first_run(sandbox: &Sandbox, store: &Arc<SqliteVmStore>) -> FirstRun {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let run = runtime.block_on(async {
        let manager = manager_on(sandbox, store);
        let boot = |tokens: Vec<String>| {
            let manager = manager.clone();
            async move {
                let mut config = sandbox.guest_config(&tokens.iter().map(String::as_str).collect::<Vec<_>>());
                config.boot.kernel_path = GUEST_KERNEL.into();
                let vm_id = manager.create(metald_core::CreateVm { vm_id: None, tenant: Sandbox::tenant(), config }).await.unwrap();
                manager.run(&vm_id, Boot).await.unwrap();
                let console = manager.console(&vm_id).unwrap();
                console.wait_for_line(|line| line.starts_with(console::READY), BOOT_TIMEOUT).await.unwrap();
                vm_id
            }
        };
        let running = boot(vec![cmdline::heartbeat_ms(50)]).await;
        let paused = boot(vec![cmdline::heartbeat_ms(50)]).await;
        manager.run(&paused, Pause).await.unwrap();
        let stopped = boot(Vec::new()).await;
        manager.run(&stopped, Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
        let created = manager
            .create(metald_core::CreateVm { vm_id: None, tenant: Sandbox::tenant(), config: sandbox.guest_config(&[]) })
            .await
            .unwrap();
        let killed = boot(Vec::new()).await;
        let killed_pid = manager.run(&killed, Info).await.unwrap().vmm.unwrap().pid.unwrap();
        let mut uids = Vec::new();
        for vm_id in [&running, &paused, &created, &killed] {
            uids.push(manager.run(vm_id, Info).await.unwrap().vmm.unwrap().identity.unwrap().0);
        }
        FirstRun { running, paused, stopped, created, killed, killed_pid, uids }
    });
    // The manager, its watchers and its console readers end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    run
}

#[test]
fn a_new_manager_takes_over_running_vmms_and_reconciles_the_dead() {
    let test = "a_new_manager_takes_over_running_vmms_and_reconciles_the_dead";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let store = Arc::new(SqliteVmStore::open(sandbox.dir.path().join("vms.db")).unwrap());
    let first = first_run(&sandbox, &store);
    // One VMM dies while no manager watches.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.killed_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let manager = manager_on(&sandbox, &store);
        let mut events = manager.subscribe();
        let takeover = manager.take_over().await.unwrap();
        let mut taken_over = takeover.taken_over.clone();
        taken_over.sort();
        let mut expected = vec![first.running.clone(), first.paused.clone(), first.created.clone()];
        expected.sort();
        assert_eq!(taken_over, expected, "{takeover:?}");
        assert_eq!(takeover.stopped, vec![first.stopped.clone()]);
        assert_eq!(takeover.lost.iter().map(|(vm_id, _)| vm_id.clone()).collect::<Vec<_>>(), vec![first.killed.clone()]);
        let mut taken_over_events = 0;
        while let Ok(event) = events.try_recv() {
            if matches!(event.kind, VmEventKind::TakenOver { .. }) {
                taken_over_events += 1;
            }
        }
        assert_eq!(taken_over_events, 3);

        // The running VM is the same guest, still counting, and its console flows again.
        assert_eq!(manager.state(&first.running).unwrap(), VmState::Running);
        let console = manager.console(&first.running).unwrap();
        let mut lines = console.subscribe();
        // The first line may begin with the tail of one the earlier reader was cut off in.
        let beat = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let line = lines.recv().await.unwrap();
                if line.starts_with(console::HEARTBEAT) {
                    return line;
                }
            }
        })
        .await
        .expect("a heartbeat after the takeover");
        assert!(beat.starts_with(console::HEARTBEAT), "{beat}");
        let info = manager.run(&first.running, Info).await.unwrap();
        assert_eq!(info.vmm.unwrap().vmm_state, "Running");
        // Its exit status goes to its old parent; Firecracker's log tells a clean shutdown anyway.
        manager.run(&first.running, Shutdown(StopOptions::default())).await.unwrap();
        let stopped = manager.run(&first.running, Info).await.unwrap();
        assert_eq!(stopped.state, VmState::Shutdown);
        assert_eq!(stopped.last_exit, Some(metald_core::process::ProcessExit::Exited { code: 0 }));

        // The paused one resumes; the stopped one boots a fresh VMM; the created one boots.
        assert_eq!(manager.state(&first.paused).unwrap(), VmState::Paused);
        manager.run(&first.paused, Resume).await.unwrap();
        let paused_console = manager.console(&first.paused).unwrap();
        let mut paused_lines = paused_console.subscribe();
        let beat = tokio::time::timeout(Duration::from_secs(20), paused_lines.recv()).await.expect("a heartbeat after resume").unwrap();
        assert!(beat.starts_with(console::HEARTBEAT), "{beat}");
        assert_eq!(manager.state(&first.stopped).unwrap(), VmState::Shutdown);
        manager.run(&first.stopped, Boot).await.unwrap();
        manager.run(&first.created, Boot).await.unwrap();
        for vm_id in [&first.stopped, &first.created] {
            let console = manager.console(vm_id).unwrap();
            console.wait_for_line(|line| line.starts_with(console::READY), BOOT_TIMEOUT).await.unwrap();
        }

        // The dead one is Failed with the reason, and its jail is gone.
        let lost = manager.run(&first.killed, Info).await.unwrap();
        assert_eq!(lost.state, VmState::Failed);
        assert!(lost.failure.as_deref().unwrap_or_default().contains("gone when metald started again"), "{:?}", lost.failure);

        // TakeoverOutcome VMs keep their uids; a new VM gets another.
        let newcomer = manager
            .create(metald_core::CreateVm { vm_id: None, tenant: Sandbox::tenant(), config: sandbox.guest_config(&[]) })
            .await
            .unwrap();
        let new_uid = manager.run(&newcomer, Info).await.unwrap().vmm.unwrap().identity.unwrap().0;
        assert!(!first.uids.contains(&new_uid), "uid {new_uid} was leased twice ({:?})", first.uids);

        for vm_id in [&first.running, &first.paused, &first.stopped, &first.created, &first.killed, &newcomer] {
            manager.run(vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
        }
        assert!(manager.list(None).is_empty());
        assert!(store.load_all().unwrap().is_empty(), "deleted VMs left records");
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    // The first run's VMMs were our children: reap what is left before looking.
    while nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).is_ok_and(|status| status.pid().is_some()) {}
    assert_eq!(sandbox.leftovers(), Vec::<String>::new());
}

#[test]
fn a_vm_no_vmm_can_be_launched_for_after_a_restart_stays_listed_as_failed_and_its_vmm_is_stopped() {
    let test = "a_vm_no_vmm_can_be_launched_for_after_a_restart_stays_listed_as_failed_and_its_vmm_is_stopped";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let store = Arc::new(SqliteVmStore::open(sandbox.dir.path().join("vms.db")).unwrap());
    let scratch = sandbox.image("scratch.img", 4 << 20);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (running, stopped, pid) = runtime.block_on(async {
        let manager = manager_on(&sandbox, &store);
        let mut vms = Vec::new();
        for _ in 0..2 {
            let mut config = sandbox.guest_config(&[]);
            config.storage = vec![Sandbox::drive("scratch", &scratch, false)];
            let vm_id = manager.create(metald_core::CreateVm { vm_id: None, tenant: Sandbox::tenant(), config }).await.unwrap();
            manager.run(&vm_id, Boot).await.unwrap();
            vms.push(vm_id);
        }
        manager.run(&vms[1], Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
        let pid = manager.run(&vms[0], Info).await.unwrap().vmm.unwrap().pid.unwrap();
        (vms[0].clone(), vms[1].clone(), pid)
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    // Each VM's own drive copy is gone while no manager runs: no VMM can be launched for either.
    for vm_id in [&running, &stopped] {
        std::fs::remove_file(sandbox.vms.join(vm_id.as_str()).join("drives/scratch.img")).unwrap();
    }
    assert!(metald_testguest::process_alive(pid));

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let manager = manager_on(&sandbox, &store);
        let takeover = manager.take_over().await.unwrap();
        assert_eq!(takeover.lost.len(), 2, "{takeover:?}");
        for vm_id in [&running, &stopped] {
            let info = manager.run(vm_id, Info).await.expect("the VM is still listed");
            assert_eq!(info.state, VmState::Failed);
            let reason = info.failure.unwrap_or_default();
            assert!(reason.contains("scratch"), "the reason names what is missing: {reason}");
        }
        assert!(!metald_testguest::process_alive(pid), "the VMM no VM could take over was stopped");
        assert!(sandbox.live_vmms().is_empty());
        // A boot tries again, and says what is still missing.
        let boot = manager.run(&running, Boot).await.unwrap_err();
        assert!(metald_core::error_chain(&boot).contains("scratch"), "{}", metald_core::error_chain(&boot));
        assert_eq!(manager.state(&running).unwrap(), VmState::Failed);
        assert!(sandbox.live_vmms().is_empty());
        for vm_id in [&running, &stopped] {
            manager.run(vm_id, Delete(StopOptions::default())).await.unwrap();
        }
        assert!(manager.list(None).is_empty());
    });
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}
