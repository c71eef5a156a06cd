//! The conformance suite every VMM backend must pass, generic over a
//! [`Subject`]: a host with one backend, whose managers (a new one is a
//! restart of metald) share one store. `conformance_suite!(Subject)` makes
//! one test of each case. It runs against the real Firecracker in CI
//! (`tests/conformance_firecracker.rs`), against the fake backend in plain
//! `cargo test` (`tests/conformance_fake.rs`), and is what a new backend
//! has to pass (docs/development/adding-a-vmm-backend.md).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod sandbox;

use std::time::Duration;

use metald_core::backend::{CacheMode, IoEngine};
use metald_core::config::{CpuTopology, Problem};
use metald_core::events::{VmEvent, VmEventKind};
use metald_core::operations::{Boot, Delete, Info, Metrics, Pause, Reboot, Resume, Shutdown};
use metald_core::{CreateVm, ErrorKind, ManagerError, StopOptions, TenantId, VmConfig, VmId, VmManager, VmState};
use tokio::sync::broadcast;

/// What a test guest does once it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Runs until stopped, and shuts down when asked.
    Runs,
    /// Does not act on a request to shut down.
    IgnoresShutdown,
    /// Resets itself right after it is up.
    Resets,
}

/// A host with the backend under test.
pub trait Subject: Sized {
    /// `None` (outside CI) when the VMM cannot run here.
    fn new(test: &str) -> Option<Self>;
    /// A manager on this host and its store; another call is a restart of metald.
    fn manager(&self) -> VmManager;
    /// A configuration of a bootable VM whose guest does `guest`.
    fn config(&self, guest: Guest) -> VmConfig;
    /// Waits until the guest runs (for a real VMM, its ready line).
    fn guest_up(&self, manager: &VmManager, vm_id: &VmId) -> impl Future<Output = ()>;
    /// Kills the VMM with this pid from outside.
    fn kill(&self, pid: u32);
    /// What VMs left on the host: processes, folders, mounts, cgroups.
    fn leftovers(&self) -> Vec<String>;
}

/// Makes one `#[test]` of each case for `$subject`, each with the
/// attributes given after it (an `ignore` where the VMM is not here).
#[macro_export]
macro_rules! conformance_suite {
    ($subject:ty $(, #[$attr:meta])*) => {
        #[test]
        $(#[$attr])*
        fn every_lifecycle_move_holds() {
            $crate::conformance::every_lifecycle_move::<$subject>("every_lifecycle_move_holds");
        }
        #[test]
        $(#[$attr])*
        fn stop_modes_say_how_the_guest_went() {
            $crate::conformance::stop_modes::<$subject>("stop_modes_say_how_the_guest_went");
        }
        #[test]
        $(#[$attr])*
        fn a_vmm_that_dies_fails_its_vm_which_boots_again() {
            $crate::conformance::a_vmm_that_dies::<$subject>("a_vmm_that_dies_fails_its_vm_which_boots_again");
        }
        #[test]
        $(#[$attr])*
        fn a_guest_reset_is_a_stop_or_a_reboot_as_the_capabilities_say() {
            $crate::conformance::a_guest_reset::<$subject>("a_guest_reset_is_a_stop_or_a_reboot_as_the_capabilities_say");
        }
        #[test]
        $(#[$attr])*
        fn a_new_manager_takes_over_every_vmm() {
            $crate::conformance::takeover::<$subject>("a_new_manager_takes_over_every_vmm");
        }
        #[test]
        $(#[$attr])*
        fn metrics_are_read_while_a_vmm_runs() {
            $crate::conformance::metrics::<$subject>("metrics_are_read_while_a_vmm_runs");
        }
        #[test]
        $(#[$attr])*
        fn what_the_backend_cannot_do_is_refused_naming_the_field() {
            $crate::conformance::capabilities_honoured::<$subject>("what_the_backend_cannot_do_is_refused_naming_the_field");
        }
    };
}

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
const FORCED: StopOptions = StopOptions { force: true, timeout: None };

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn tenant() -> TenantId {
    TenantId::new("conformance").unwrap()
}

async fn create(manager: &VmManager, config: VmConfig) -> VmId {
    manager.create(CreateVm { vm_id: None, tenant: tenant(), config }).await.expect("create")
}

async fn boot_up<S: Subject>(subject: &S, manager: &VmManager, guest: Guest) -> VmId {
    let vm_id = create(manager, subject.config(guest)).await;
    manager.run(&vm_id, Boot).await.expect("boot");
    subject.guest_up(manager, &vm_id).await;
    vm_id
}

/// The next event of `vm_id` that `wanted` accepts.
async fn event_of(events: &mut broadcast::Receiver<VmEvent>, vm_id: &VmId, wanted: impl Fn(&VmEventKind) -> bool) -> VmEvent {
    let found = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match events.recv().await {
                Ok(event) if &event.vm_id == vm_id && wanted(&event.kind) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the manager's events ended"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("VM {vm_id} published no such event within {EVENT_TIMEOUT:?}"))
}

fn pid_of(info: &metald_core::VmInfo) -> u32 {
    info.vmm.as_ref().and_then(|vmm| vmm.pid).expect("a running VMM's pid")
}

fn assert_nothing_left<S: Subject>(subject: &S) {
    let left = subject.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Create, boot, pause, resume, reboot, graceful stop, boot again, delete;
/// each move in the state it must leave and with its event.
pub fn every_lifecycle_move<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let manager = subject.manager();
        let capabilities = manager.capabilities();
        let mut events = manager.subscribe();
        let vm_id = create(&manager, subject.config(Guest::Runs)).await;
        assert_eq!(manager.state(&vm_id).unwrap(), VmState::Created);
        event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Created)).await;

        manager.run(&vm_id, Boot).await.unwrap();
        subject.guest_up(&manager, &vm_id).await;
        event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Booted(_))).await;
        let first_boot = manager.run(&vm_id, Info).await.unwrap().booted_at.expect("a running VM's boot time");

        if capabilities.pause {
            manager.run(&vm_id, Pause).await.unwrap();
            assert_eq!(manager.state(&vm_id).unwrap(), VmState::Paused);
            manager.run(&vm_id, Resume).await.unwrap();
            assert_eq!(manager.state(&vm_id).unwrap(), VmState::Running);
        } else {
            let refused = manager.run(&vm_id, Pause).await.unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::Unimplemented, "{refused}");
        }

        manager.run(&vm_id, Reboot(StopOptions::default())).await.unwrap();
        subject.guest_up(&manager, &vm_id).await;
        let rebooted = event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Rebooted { .. })).await;
        let VmEventKind::Rebooted { previous_booted_at, .. } = rebooted.kind else { unreachable!() };
        assert_eq!(previous_booted_at, Some(first_boot), "the reboot ends the first boot");
        let info = manager.run(&vm_id, Info).await.unwrap();
        assert_eq!(info.state, VmState::Running, "a reboot leaves the VM running");
        assert!(info.booted_at.expect("a boot time") >= first_boot);

        let outcome = manager.run(&vm_id, Shutdown(StopOptions { force: false, timeout: Some(EVENT_TIMEOUT) })).await.unwrap();
        assert!(!outcome.forced, "a guest that answers is not killed: {outcome:?}");
        assert_eq!(manager.state(&vm_id).unwrap(), VmState::Shutdown);
        assert!(manager.run(&vm_id, Info).await.unwrap().vmm.is_none(), "no VMM runs for a stopped VM");

        manager.run(&vm_id, Boot).await.unwrap();
        subject.guest_up(&manager, &vm_id).await;
        assert_eq!(manager.state(&vm_id).unwrap(), VmState::Running);

        manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
        event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Deleted)).await;
        assert!(matches!(manager.state(&vm_id), Err(ManagerError::NotFound(_))));
    });
    assert_nothing_left(&subject);
}

/// A graceful stop of a guest that ignores it ends in a kill, said so; a
/// forced stop kills at once; a graceful stop of a paused guest works.
pub fn stop_modes<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let manager = subject.manager();
        let ignoring = boot_up(&subject, &manager, Guest::IgnoresShutdown).await;
        let outcome = manager.run(&ignoring, Shutdown(StopOptions { force: false, timeout: Some(Duration::from_secs(1)) })).await.unwrap();
        assert!(outcome.forced, "a guest that ignores the request is killed at the timeout: {outcome:?}");
        assert_eq!(manager.state(&ignoring).unwrap(), VmState::Shutdown);

        let forced = boot_up(&subject, &manager, Guest::Runs).await;
        let outcome = manager.run(&forced, Shutdown(FORCED)).await.unwrap();
        assert!(outcome.forced, "{outcome:?}");

        if manager.capabilities().pause {
            let paused = boot_up(&subject, &manager, Guest::Runs).await;
            manager.run(&paused, Pause).await.unwrap();
            let outcome = manager.run(&paused, Shutdown(StopOptions { force: false, timeout: Some(EVENT_TIMEOUT) })).await.unwrap();
            assert!(!outcome.forced, "a paused guest still hears a graceful stop: {outcome:?}");
            manager.run(&paused, Delete(FORCED)).await.unwrap();
        }
        for vm_id in [ignoring, forced] {
            manager.run(&vm_id, Delete(FORCED)).await.unwrap();
        }
    });
    assert_nothing_left(&subject);
}

/// A VMM killed from outside makes its VM Failed with the reason; the VM
/// boots again in a fresh VMM.
pub fn a_vmm_that_dies<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let manager = subject.manager();
        let mut events = manager.subscribe();
        let vm_id = boot_up(&subject, &manager, Guest::Runs).await;
        let pid = pid_of(&manager.run(&vm_id, Info).await.unwrap());
        subject.kill(pid);
        let failed = event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Failed { .. })).await;
        assert_eq!(failed.state, VmState::Failed);
        let info = manager.run(&vm_id, Info).await.unwrap();
        assert!(info.failure.as_deref().is_some_and(|reason| !reason.is_empty()), "{info:?}");
        assert!(info.last_exit.is_some_and(|exit| !exit.is_clean()), "{info:?}");

        manager.run(&vm_id, Boot).await.unwrap();
        subject.guest_up(&manager, &vm_id).await;
        let info = manager.run(&vm_id, Info).await.unwrap();
        assert_eq!(info.state, VmState::Running);
        assert_ne!(pid_of(&info), pid, "a fresh VMM");
        manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    });
    assert_nothing_left(&subject);
}

/// A guest that resets itself: where the VMM reboots it in place the VM runs
/// on and a `Rebooted` event says so; where the reset ends the VMM the VM
/// is stopped by its guest.
pub fn a_guest_reset<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let manager = subject.manager();
        let mut events = manager.subscribe();
        let vm_id = create(&manager, subject.config(Guest::Resets)).await;
        manager.run(&vm_id, Boot).await.unwrap();
        if manager.capabilities().reboot {
            let rebooted = event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Rebooted { .. })).await;
            assert_eq!(rebooted.state, VmState::Running);
            let VmEventKind::Rebooted { previous_booted_at, .. } = rebooted.kind else { unreachable!() };
            let previous_booted_at = previous_booted_at.expect("the reset ends a boot");
            assert!(previous_booted_at <= rebooted.at);
            let info = manager.run(&vm_id, Info).await.unwrap();
            assert_eq!(info.state, VmState::Running, "a guest that reset itself runs on");
            assert!(info.booted_at.expect("a boot time") >= previous_booted_at, "the boot time is the reboot's");
        } else {
            let stopped = event_of(&mut events, &vm_id, |kind| matches!(kind, VmEventKind::Stopped { .. })).await;
            assert!(matches!(stopped.kind, VmEventKind::Stopped { by_guest: true, .. }), "{:?}", stopped.kind);
            assert_eq!(manager.state(&vm_id).unwrap(), VmState::Shutdown);
        }
        manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    });
    assert_nothing_left(&subject);
}

/// A new manager on the same store takes over each VMM the earlier one
/// left running (same process, same state), and keeps a stopped VM stopped.
pub fn takeover<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    let earlier = runtime();
    let (running, created, stopped, pids) = earlier.block_on(async {
        let manager = subject.manager();
        let running = boot_up(&subject, &manager, Guest::Runs).await;
        let created = create(&manager, subject.config(Guest::Runs)).await;
        let stopped = boot_up(&subject, &manager, Guest::Runs).await;
        manager.run(&stopped, Shutdown(FORCED)).await.unwrap();
        let mut pids = Vec::new();
        for vm_id in [&running, &created] {
            pids.push(pid_of(&manager.run(vm_id, Info).await.unwrap()));
        }
        (running, created, stopped, pids)
    });
    // The earlier metald ends, and nothing of it runs on.
    earlier.shutdown_timeout(Duration::from_secs(5));

    runtime().block_on(async {
        let manager = subject.manager();
        let mut events = manager.subscribe();
        let takeover = manager.take_over().await.unwrap();
        let mut taken_over = takeover.taken_over.clone();
        taken_over.sort();
        let mut expected = vec![running.clone(), created.clone()];
        expected.sort();
        assert_eq!(taken_over, expected, "{takeover:?}");
        assert_eq!(takeover.stopped, vec![stopped.clone()], "{takeover:?}");
        assert!(takeover.lost.is_empty(), "{takeover:?}");
        event_of(&mut events, &running, |kind| matches!(kind, VmEventKind::TakenOver { .. })).await;
        for (vm_id, pid, state) in [(&running, pids[0], VmState::Running), (&created, pids[1], VmState::Created)] {
            let info = manager.run(vm_id, Info).await.unwrap();
            assert_eq!((info.state, pid_of(&info)), (state, pid), "VM {vm_id} keeps its VMM and its state");
        }
        manager.run(&running, Metrics).await.expect("a VMM taken over is metered");
        manager.run(&created, Boot).await.unwrap();
        subject.guest_up(&manager, &created).await;
        manager.run(&stopped, Boot).await.unwrap();
        subject.guest_up(&manager, &stopped).await;
        for vm_id in [&running, &created, &stopped] {
            manager.run(vm_id, Delete(FORCED)).await.unwrap();
        }
    });
    assert_nothing_left(&subject);
}

/// Usage counters are read while a VMM runs, never go down, and are refused
/// for a VM without a VMM.
pub fn metrics<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let manager = subject.manager();
        let vm_id = boot_up(&subject, &manager, Guest::Runs).await;
        let first = manager.run(&vm_id, Metrics).await.unwrap();
        let second = manager.run(&vm_id, Metrics).await.unwrap();
        assert!(second.cpu_time_ns >= first.cpu_time_ns, "{first:?} then {second:?}");
        assert!(second.resident_bytes > 0, "{second:?}");
        manager.run(&vm_id, Shutdown(FORCED)).await.unwrap();
        let refused = manager.run(&vm_id, Metrics).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::FailedPrecondition { state: Some(VmState::Shutdown) }, "{refused}");
        manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    });
    assert_nothing_left(&subject);
}

/// A change to a configuration that asks for something.
type Ask = Box<dyn Fn(&mut VmConfig)>;

/// What the backend's capabilities rule out is refused at create, naming
/// the field, before anything is made.
pub fn capabilities_honoured<S: Subject>(test: &str) {
    let Some(subject) = S::new(test) else { return };
    runtime().block_on(async {
        let manager = subject.manager();
        let capabilities = manager.capabilities();
        let mut asks: Vec<(&str, Ask)> = Vec::new();
        let max = capabilities.max_vcpus;
        asks.push(("cpu.vcpu_count", Box::new(move |config| config.cpu.vcpu_count = max + 1)));
        if !capabilities.cpu_hotplug {
            asks.push(("cpu.max_vcpu_count", Box::new(|config| config.cpu.max_vcpu_count = config.cpu.vcpu_count + 1)));
        }
        if !capabilities.memory_hotplug {
            asks.push((
                "memory.hotplug_enabled",
                Box::new(|config| {
                    config.memory.hotplug_enabled = true;
                    config.memory.max_size_bytes = config.memory.size_bytes * 2;
                }),
            ));
        }
        if !capabilities.cpu_topology {
            asks.push((
                "cpu.topology",
                Box::new(|config| {
                    config.cpu.topology = Some(CpuTopology { sockets: 1, cores_per_socket: config.cpu.vcpu_count, threads_per_core: 1 })
                }),
            ));
        }
        let engine = IoEngine::ALL.into_iter().find(|engine| !capabilities.io_engines.contains(engine)).map_or("Turbo", IoEngine::name);
        let cache = CacheMode::ALL.into_iter().find(|mode| !capabilities.cache_modes.contains(mode)).map_or("Turbo", CacheMode::name);
        for (key, value) in [("io_engine", engine), ("cache_type", cache)] {
            let field: &'static str =
                if key == "io_engine" { "storage[0].options[\"io_engine\"]" } else { "storage[0].options[\"cache_type\"]" };
            asks.push((
                field,
                Box::new(move |config| {
                    let mut drive = metald_core::config::StorageDevice {
                        id: "scratch".into(),
                        path: config.boot.kernel_path.clone(),
                        read_only: true,
                        ..Default::default()
                    };
                    drive.options.insert(key.into(), value.into());
                    config.storage = vec![drive];
                }),
            ));
        }
        for (field, ask) in asks {
            let mut config = subject.config(Guest::Runs);
            ask(&mut config);
            let error = manager.create(CreateVm { vm_id: None, tenant: tenant(), config }).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidArgument { field }, "{}", metald_core::error_chain(&error));
            if field == "cpu.vcpu_count" {
                let ManagerError::InvalidConfig(refusal) = &error else { panic!("{error}") };
                assert_eq!(
                    refusal.problem,
                    Problem::BeyondVmm { value: u64::from(max) + 1, max: u64::from(max), vmm: manager.backend_name() }
                );
            }
        }
        assert!(manager.list(None).is_empty(), "a refused create makes no VM");
    });
    assert_nothing_left(&subject);
}
