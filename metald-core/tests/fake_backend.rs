//! The manager's failure, incomplete-delete and takeover branches, driven
//! by the scriptable fake backend: no KVM, no Firecracker, plain `cargo test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake::{self, Call, FakeBackend, FakeHost};
use metald_core::backend::Capabilities;
use metald_core::events::{VmEvent, VmEventKind};
use metald_core::operations::{Boot, Delete, Info, Pause, Shutdown};
use metald_core::store::{SqliteVmStore, VmStore};
use metald_core::{CreateVm, ErrorKind, ManagerError, StopOptions, TenantId, VmConfig, VmId, VmManager, VmState};

const FORCED: StopOptions = StopOptions { force: true, timeout: None };
const GRACEFUL: StopOptions = StopOptions { force: false, timeout: Some(Duration::from_secs(30)) };

struct Host {
    dir: tempfile::TempDir,
    host: Arc<FakeHost>,
    store: Arc<SqliteVmStore>,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/kernel"), b"not a kernel").unwrap();
        let store = Arc::new(SqliteVmStore::open(dir.path().join("vms.db")).unwrap());
        Self { dir, host: FakeHost::new(), store }
    }

    fn manager(&self, capabilities: Capabilities) -> VmManager {
        VmManager::builder()
            .backend(Arc::new(FakeBackend::new(fake::FAKE_VMM, &self.host, capabilities, 960_000..960_004)))
            .image_root(self.dir.path().join("images"))
            .vm_root(self.dir.path().join("vms"))
            .store(Arc::clone(&self.store) as Arc<dyn VmStore>)
            .build()
            .unwrap()
    }

    fn folders(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("vms"))
            .map(|entries| entries.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

fn config() -> VmConfig {
    let mut config = VmConfig::default();
    config.cpu.vcpu_count = 1;
    config.memory.size_bytes = 32 << 20;
    config.boot.kernel_path = "kernel".into();
    config
}

async fn create(manager: &VmManager) -> Result<VmId, ManagerError> {
    manager.create(CreateVm { vm_id: None, tenant: TenantId::new("fake-tenant").unwrap(), config: config() }).await
}

fn kinds(events: &mut tokio::sync::broadcast::Receiver<VmEvent>) -> Vec<&'static str> {
    std::iter::from_fn(|| events.try_recv().ok()).map(|event| event.kind.name()).collect()
}

#[tokio::test]
async fn a_create_the_backend_refuses_leaves_nothing_and_gives_the_uid_back() {
    let host = Host::new();
    let manager = host.manager(fake::firecracker_like());
    host.host.fail_next(Call::Create, "no room for this VM");
    let error = create(&manager).await.unwrap_err();
    assert!(metald_core::error_chain(&error).contains("no room for this VM"), "{}", metald_core::error_chain(&error));
    assert!(manager.list(None).is_empty());
    assert!(host.folders().is_empty(), "{:?}", host.folders());
    assert_eq!(manager.identity_capacity().map(|capacity| capacity.leased), Some(0), "the uid went back");
    assert!(host.host.running().is_empty());
}

#[tokio::test]
async fn a_boot_the_backend_refuses_fails_the_vm_with_its_reason_and_a_boot_again_works() {
    let host = Host::new();
    let manager = host.manager(fake::firecracker_like());
    let vm_id = create(&manager).await.unwrap();
    host.host.fail_next(Call::Boot, "the kernel is not bootable");
    let error = manager.run(&vm_id, Boot).await.unwrap_err();
    assert!(matches!(error, ManagerError::Backend { .. }), "{error}");
    let info = manager.run(&vm_id, Info).await.unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert!(info.failure.as_deref().unwrap().contains("the kernel is not bootable"), "{info:?}");
    assert!(host.host.running().is_empty(), "the failed boot's VMM is stopped");

    manager.run(&vm_id, Boot).await.unwrap();
    assert_eq!(manager.state(&vm_id).unwrap(), VmState::Running);
    assert_eq!(manager.run(&vm_id, Info).await.unwrap().failure, None);
    manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    assert!(host.folders().is_empty() && host.host.running().is_empty());
}

#[tokio::test]
async fn a_delete_that_cannot_remove_the_vmm_leaves_the_vm_failed_saying_so_and_a_delete_again_finishes() {
    let host = Host::new();
    let manager = host.manager(fake::firecracker_like());
    let mut events = manager.subscribe();
    let vm_id = create(&manager).await.unwrap();
    manager.run(&vm_id, Boot).await.unwrap();
    host.host.fail_next(Call::Destroy, "the VMM's files are busy");
    let error = manager.run(&vm_id, Delete(FORCED)).await.unwrap_err();
    let ManagerError::DeleteIncomplete { problems, .. } = &error else { panic!("{error}") };
    assert!(problems.iter().any(|problem| problem.contains("the VMM's files are busy")), "{problems:?}");
    let info = manager.run(&vm_id, Info).await.unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert!(info.failure.as_deref().unwrap().starts_with("delete incomplete: "), "{info:?}");
    assert_eq!(kinds(&mut events), ["created", "booted", "stopped", "failed"]);

    manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    assert!(matches!(manager.state(&vm_id), Err(ManagerError::NotFound(_))));
    assert_eq!(kinds(&mut events), ["deleted"]);
    assert!(host.folders().is_empty() && host.host.running().is_empty());
    assert!(host.store.load_all().unwrap().is_empty(), "no record is left");
}

#[tokio::test]
async fn a_takeover_finds_each_vmm_as_it_is_and_fails_the_vms_it_cannot_take_over() {
    let host = Host::new();
    let (alive, died, refused, pids) = {
        let earlier = host.manager(fake::firecracker_like());
        let mut vms = Vec::new();
        for _ in 0..3 {
            let vm_id = create(&earlier).await.unwrap();
            earlier.run(&vm_id, Boot).await.unwrap();
            vms.push(vm_id);
        }
        let mut pids = Vec::new();
        for vm_id in &vms {
            pids.push(earlier.run(vm_id, Info).await.unwrap().vmm.unwrap().pid.unwrap());
        }
        (vms[0].clone(), vms[1].clone(), vms[2].clone(), pids)
    };
    // While no manager watches: one VMM dies; the next manager cannot take over another.
    host.host.kill(pids[1], metald_core::process::ProcessExit::Killed { signal: 9 });
    host.host.refuse_take_over(pids[2], "answers as another VM");
    let manager = host.manager(fake::firecracker_like());
    let mut events = manager.subscribe();
    let takeover = manager.take_over().await.unwrap();

    assert_eq!(takeover.taken_over, vec![alive.clone()], "{takeover:?}");
    let lost: std::collections::HashMap<VmId, String> = takeover.lost.iter().cloned().collect();
    assert!(lost[&died].contains("its VMM was gone when metald started again"), "{lost:?}");
    assert!(lost[&refused].contains("could not take over its VMM after a restart and stopped it"), "{lost:?}");
    assert!(!host.host.running().contains(&pids[2]), "the VMM not taken over is stopped, not left running unwatched");
    let info = manager.run(&alive, Info).await.unwrap();
    assert_eq!((info.state, info.vmm.unwrap().pid), (VmState::Running, Some(pids[0])));
    assert_eq!(manager.state(&died).unwrap(), VmState::Failed);
    assert_eq!(manager.state(&refused).unwrap(), VmState::Failed);
    let seen = kinds(&mut events);
    assert!(seen.contains(&"taken_over") && seen.contains(&"failed"), "{seen:?}");
    for vm_id in [&alive, &died, &refused] {
        manager.run(vm_id, Delete(FORCED)).await.unwrap();
    }
    assert!(host.folders().is_empty() && host.host.running().is_empty(), "{:?} {:?}", host.folders(), host.host.running());
}

#[tokio::test]
async fn what_a_backend_cannot_do_is_not_asked_of_it() {
    let host = Host::new();
    let cannot = Capabilities { pause: false, graceful_shutdown: false, ..fake::firecracker_like() };
    let manager = host.manager(cannot);
    let vm_id = create(&manager).await.unwrap();
    manager.run(&vm_id, Boot).await.unwrap();
    let pauses = host.host.calls(Call::Pause);
    let refused = manager.run(&vm_id, Pause).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unimplemented, "{refused}");
    assert_eq!((host.host.calls(Call::Pause), manager.state(&vm_id).unwrap()), (pauses, VmState::Running));
    // No way to ask the guest: the stop kills at once, however patient the caller.
    let outcome = manager.run(&vm_id, Shutdown(GRACEFUL)).await.unwrap();
    assert!(outcome.forced, "{outcome:?}");
    manager.run(&vm_id, Delete(FORCED)).await.unwrap();
}

#[tokio::test]
async fn a_paused_guest_is_resumed_for_a_graceful_stop_only_where_it_must_run_to_hear_it() {
    for (capabilities, resumed_first) in [(fake::firecracker_like(), true), (fake::in_place_reboots(), false)] {
        let host = Host::new();
        let manager = host.manager(capabilities);
        let vm_id = create(&manager).await.unwrap();
        manager.run(&vm_id, Boot).await.unwrap();
        manager.run(&vm_id, Pause).await.unwrap();
        let mut events = manager.subscribe();
        let outcome = manager.run(&vm_id, Shutdown(GRACEFUL)).await.unwrap();
        assert!(!outcome.forced, "{outcome:?}");
        let expected: &[&str] = if resumed_first { &["resumed", "stopped"] } else { &["stopped"] };
        assert_eq!(kinds(&mut events), expected);
        manager.run(&vm_id, Delete(FORCED)).await.unwrap();
    }
}

#[tokio::test]
async fn a_guest_reboot_the_backend_reports_keeps_the_vm_running_with_its_new_boot_time() {
    let host = Host::new();
    let manager = host.manager(fake::in_place_reboots());
    let vm_id = create(&manager).await.unwrap();
    manager.run(&vm_id, Boot).await.unwrap();
    let first = manager.run(&vm_id, Info).await.unwrap();
    let mut events = manager.subscribe();
    host.host.guest_reboots(first.vmm.as_ref().unwrap().pid.unwrap());
    let event = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("an event").unwrap();
    let VmEventKind::Rebooted { previous_booted_at, .. } = event.kind else { panic!("{:?}", event.kind) };
    assert_eq!(previous_booted_at, first.booted_at);
    let after = manager.run(&vm_id, Info).await.unwrap();
    assert_eq!(after.state, VmState::Running);
    assert!(after.booted_at > first.booted_at, "{:?} then {:?}", first.booted_at, after.booted_at);
    assert_eq!(after.vmm.unwrap().pid, first.vmm.unwrap().pid, "the same VMM");
    manager.run(&vm_id, Delete(FORCED)).await.unwrap();
}

#[tokio::test]
async fn a_drive_option_is_judged_by_the_vms_backend() {
    let host = Host::new();
    let manager = host.manager(fake::firecracker_like());
    let mut config = config();
    let mut drive = metald_core::config::StorageDevice { id: "data".into(), path: "kernel".into(), read_only: true, ..Default::default() };
    drive.options.insert("io_engine".into(), "io_uring".into());
    config.storage = vec![drive];
    let error = manager.create(CreateVm { vm_id: None, tenant: TenantId::new("fake-tenant").unwrap(), config }).await.unwrap_err();
    let ManagerError::InvalidConfig(refusal) = &error else { panic!("{error}") };
    assert_eq!(refusal.field, "storage[0].options[\"io_engine\"]");
    assert_eq!(refusal.to_string(), "storage[0].options[\"io_engine\"]: \"io_uring\" is not one of [\"Sync\"]");
    assert!(host.folders().is_empty());
}

#[tokio::test]
async fn a_vcpu_ceiling_is_the_backends_for_boot_and_hotplug_alike() {
    let host = Host::new();
    let capabilities = fake::in_place_reboots();
    let max = capabilities.max_vcpus;
    let manager = host.manager(capabilities);
    for (field, set) in [("cpu.vcpu_count", 0), ("cpu.max_vcpu_count", 1)] {
        let mut config = config();
        if set == 0 {
            config.cpu.vcpu_count = max + 1;
        } else {
            config.cpu.max_vcpu_count = max + 1;
        }
        let error = manager.create(CreateVm { vm_id: None, tenant: TenantId::new("fake-tenant").unwrap(), config }).await.unwrap_err();
        let ManagerError::InvalidConfig(refusal) = &error else { panic!("{error}") };
        assert_eq!(refusal.field, field);
        assert_eq!(
            refusal.problem,
            metald_core::config::Problem::BeyondVmm { value: u64::from(max) + 1, max: u64::from(max), vmm: manager.backend_name() }
        );
    }
    assert!(manager.list(None).is_empty() && host.folders().is_empty());
}
