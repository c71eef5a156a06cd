//! Bad input gets a typed error naming what is wrong, and leaves nothing
//! behind: no VMM process, no VM folder, no drive copy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Sandbox;
use metald_core::backend::BackendError;
use metald_core::config::{MIB, NetworkInterface};
use metald_core::images::ImageError;
use metald_core::operations::{Boot, Delete, Info, Pause, Reboot, Resume, Shutdown};
use metald_core::{CreateVm, ManagerError, StopOptions, VmConfig, VmId, VmState};

/// A change that makes a valid test-guest configuration invalid.
type Change = Box<dyn Fn(&mut VmConfig)>;
/// Whether an image refusal is the expected kind.
type Expected = fn(&ImageError) -> bool;

async fn create(sandbox: &Sandbox, config: VmConfig) -> Result<VmId, ManagerError> {
    sandbox.manager.create(CreateVm { vm_id: None, tenant: Sandbox::tenant(), config }).await
}

fn assert_nothing_left(sandbox: &Sandbox) {
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
    assert!(sandbox.manager.list(None).is_empty());
}

#[tokio::test]
async fn invalid_configurations_are_refused_with_the_field_and_leave_nothing() {
    let Some(sandbox) = Sandbox::new("invalid_configurations_are_refused_with_the_field_and_leave_nothing") else { return };
    let cases: Vec<(&str, Change)> = vec![
        ("cpu.vcpu_count", Box::new(|c| c.cpu.vcpu_count = 0)),
        ("cpu.vcpu_count", Box::new(|c| c.cpu.vcpu_count = 33)),
        ("memory.size_bytes", Box::new(|c| c.memory.size_bytes = 8 * MIB)),
        ("memory.size_bytes", Box::new(|c| c.memory.size_bytes = 32 * MIB + 512)),
        ("boot.kernel_path", Box::new(|c| c.boot.kernel_path.clear())),
        ("storage[1].id", Box::new(|c| c.storage = vec![Sandbox::drive("a", "x.img", true), Sandbox::drive("a", "y.img", true)])),
        (
            "storage[1].is_root_device",
            Box::new(|c| {
                c.storage = vec![Sandbox::drive("a", "x.img", true), Sandbox::drive("b", "y.img", true)];
                c.storage.iter_mut().for_each(|drive| drive.is_root_device = true);
            }),
        ),
        ("console.output", Box::new(|c| c.console.output = "/var/log/vm.log".into())),
        // Refused because of what the backend cannot do, not the contract.
        (
            "memory.hotplug_enabled",
            Box::new(|c| {
                c.memory.hotplug_enabled = true;
                c.memory.max_size_bytes = 64 * MIB;
            }),
        ),
        ("cpu.max_vcpu_count", Box::new(|c| c.cpu.max_vcpu_count = 4)),
        ("network[0].tap_device", Box::new(|c| c.network = vec![NetworkInterface { id: "eth0".into(), ..Default::default() }])),
    ];
    for (field, change) in cases {
        let mut config = sandbox.guest_config(&[]);
        change(&mut config);
        let error = create(&sandbox, config).await.expect_err(field);
        assert!(matches!(error, ManagerError::InvalidConfig(_)), "{field}: {error}");
        assert_eq!(error.field(), Some(field), "{}", metald_core::error_chain(&error));
        assert_nothing_left(&sandbox);
    }
}

#[tokio::test]
async fn images_outside_the_image_root_are_refused_before_anything_starts() {
    let Some(sandbox) = Sandbox::new("images_outside_the_image_root_are_refused_before_anything_starts") else { return };
    let outside = sandbox.dir.path().join("outside.img");
    std::fs::write(&outside, b"not an image of ours").unwrap();
    std::os::unix::fs::symlink(&outside, sandbox.images.join("link-out.img")).unwrap();
    std::os::unix::fs::symlink(sandbox.dir.path(), sandbox.images.join("dir-out")).unwrap();
    let writable = sandbox.image("ok.img", MIB);

    let kernel = |path: String| -> Change { Box::new(move |c| c.boot.kernel_path = path.clone()) };
    let cases: Vec<(&str, Change, Expected)> = vec![
        ("boot.kernel_path", kernel(outside.display().to_string()), |e| matches!(e, ImageError::OutsideRoot { .. })),
        ("boot.kernel_path", kernel("/etc/passwd".into()), |e| matches!(e, ImageError::OutsideRoot { .. })),
        ("boot.kernel_path", kernel("../outside.img".into()), |e| matches!(e, ImageError::ParentComponent { .. })),
        ("boot.kernel_path", kernel("link-out.img".into()), |e| matches!(e, ImageError::SymlinkEscape { .. })),
        ("boot.kernel_path", kernel("dir-out/outside.img".into()), |e| matches!(e, ImageError::SymlinkEscape { .. })),
        ("boot.initrd_path", Box::new(|c| c.boot.initrd_path = "link-out.img".into()), |e| matches!(e, ImageError::SymlinkEscape { .. })),
        (
            "storage[1].path",
            Box::new(move |c| c.storage = vec![Sandbox::drive("ok", &writable, false), Sandbox::drive("escape", "link-out.img", false)]),
            |e| matches!(e, ImageError::SymlinkEscape { .. }),
        ),
        ("storage[0].path", Box::new(|c| c.storage = vec![Sandbox::drive("gone", "missing.img", true)]), |e| {
            matches!(e, ImageError::Missing { .. })
        }),
    ];
    for (field, change, expected) in cases {
        let mut config = sandbox.guest_config(&[]);
        change(&mut config);
        let error = create(&sandbox, config).await.expect_err(field);
        match &error {
            ManagerError::Image(image_error) => assert!(expected(image_error), "{field}: {image_error}"),
            other => panic!("{field}: expected an image refusal, got {other}"),
        }
        assert_eq!(error.field(), Some(field));
        assert_nothing_left(&sandbox);
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"not an image of ours");
}

#[tokio::test]
async fn a_kernel_firecracker_cannot_load_fails_the_boot_with_firecrackers_message() {
    let Some(sandbox) = Sandbox::new("a_kernel_firecracker_cannot_load_fails_the_boot_with_firecrackers_message") else { return };
    std::fs::write(sandbox.images.join("garbage.elf"), b"this is no ELF kernel").unwrap();
    let mut config = sandbox.guest_config(&[]);
    config.boot.kernel_path = "garbage.elf".into();
    let vm_id = create(&sandbox, config).await.unwrap();

    let error = sandbox.manager.run(&vm_id, Boot).await.unwrap_err();
    let ManagerError::Backend { source, operation: metald_core::BackendOperation::BOOT, .. } = &error else {
        panic!("expected a backend error, got {error}")
    };
    match source.as_ref() {
        BackendError::Api { status, fault_message, path, .. } => {
            assert_eq!(*status, 400);
            assert_eq!(path, "/actions");
            assert!(fault_message.contains("Cannot load kernel"), "{fault_message}");
        }
        other => panic!("expected Firecracker's refusal, got {other}"),
    }
    let info = sandbox.manager.run(&vm_id, Info).await.unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert!(info.failure.unwrap().contains("Cannot load kernel"));
    assert!(sandbox.live_vmms().is_empty(), "a failed boot leaves no VMM");
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert_nothing_left(&sandbox);
}

#[tokio::test]
async fn a_refusal_while_configuring_firecracker_leaves_nothing() {
    let Some(sandbox) = Sandbox::new("a_refusal_while_configuring_firecracker_leaves_nothing") else { return };
    // Valid by the contract, but Firecracker takes SMT only with 1 or an even number of vCPUs.
    let mut config = sandbox.guest_config(&[]);
    config.cpu.vcpu_count = 3;
    config.cpu.features.insert("smt".into(), "true".into());
    let error = create(&sandbox, config).await.unwrap_err();
    let chain = metald_core::error_chain(&error);
    let ManagerError::Backend { source, operation: metald_core::BackendOperation::CREATE, .. } = &error else {
        panic!("expected a backend error, got {chain}")
    };
    match source.as_ref() {
        BackendError::Api { path, status, fault_message, .. } => {
            assert_eq!((path.as_str(), *status), ("/machine-config", 400));
            assert!(fault_message.to_lowercase().contains("smt") || fault_message.contains("vCPU"), "{fault_message}");
            assert!(chain.contains(fault_message.as_str()), "Firecracker's own message reaches the caller: {chain}");
        }
        other => panic!("expected Firecracker's refusal, got {other}"),
    }
    assert_nothing_left(&sandbox);
}

#[tokio::test]
async fn a_vm_id_can_be_chosen_once() {
    let Some(sandbox) = Sandbox::new("a_vm_id_can_be_chosen_once") else { return };
    let vm_id = VmId::new("chosen-1").unwrap();
    let request = CreateVm { vm_id: Some(vm_id.clone()), tenant: Sandbox::tenant(), config: sandbox.guest_config(&[]) };
    sandbox.manager.create(request.clone()).await.unwrap();
    let error = sandbox.manager.create(request).await.unwrap_err();
    assert!(matches!(error, ManagerError::AlreadyExists(ref id) if *id == vm_id), "{error}");
    assert_eq!(sandbox.live_vmms().len(), 1, "the refused create started nothing");
    sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert_nothing_left(&sandbox);
}

#[tokio::test]
async fn operations_the_state_table_forbids_name_the_current_state() {
    let Some(sandbox) = Sandbox::new("operations_the_state_table_forbids_name_the_current_state") else { return };
    let vm_id = create(&sandbox, sandbox.guest_config(&[])).await.unwrap();
    let error = sandbox.manager.run(&vm_id, Pause).await.unwrap_err();
    assert!(matches!(error, ManagerError::InvalidState { current: VmState::Created, .. }), "{error}");
    assert_eq!(error.to_string(), format!("VM {vm_id} is Created and cannot pause"));
    assert_eq!(metald_core::error_chain(&error), format!("VM {vm_id} is Created and cannot pause: a VM cannot go from Created to Paused"));
    let error = sandbox.manager.run(&vm_id, Reboot(StopOptions::default())).await.unwrap_err();
    assert!(matches!(error, ManagerError::WrongState { current: VmState::Created, required: "Running", .. }), "{error}");
    // Created may become Running, but by a boot: a resume is refused
    // before the VMM is asked, and a boot of a paused VM likewise.
    let error = sandbox.manager.run(&vm_id, Resume).await.unwrap_err();
    assert!(matches!(error, ManagerError::WrongState { current: VmState::Created, required: "Paused", .. }), "{error}");
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    sandbox.manager.run(&vm_id, Pause).await.unwrap();
    let error = sandbox.manager.run(&vm_id, Boot).await.unwrap_err();
    assert_eq!(error.to_string(), format!("VM {vm_id} is Paused; to boot it must be Created, Shutdown or Failed"));
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Paused, "the refused boot changed nothing");
    sandbox.manager.run(&vm_id, Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
    let error = sandbox.manager.run(&vm_id, Resume).await.unwrap_err();
    assert!(matches!(error, ManagerError::WrongState { current: VmState::Shutdown, .. }), "{error}");
    let missing = VmId::new("no-such-vm").unwrap();
    assert!(matches!(sandbox.manager.run(&missing, Boot).await.unwrap_err(), ManagerError::NotFound(_)));
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(matches!(sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap_err(), ManagerError::NotFound(_)));
    assert_nothing_left(&sandbox);
}

#[tokio::test]
async fn a_create_whose_caller_stops_waiting_still_finishes_whole() {
    let Some(sandbox) = Sandbox::new("a_create_whose_caller_stops_waiting_still_finishes_whole") else { return };
    let abandoned = tokio::time::timeout(std::time::Duration::from_micros(10), create(&sandbox, sandbox.guest_config(&[]))).await;
    assert!(abandoned.is_err(), "the caller gave up before the create finished");
    let vm = loop {
        if let Some(vm) = sandbox.manager.list(None).pop() {
            break vm;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(vm.state, VmState::Created);
    assert_eq!(sandbox.live_vmms().len(), 1);
    sandbox.manager.run(&vm.vm_id, Delete(StopOptions::default())).await.unwrap();
    assert_nothing_left(&sandbox);
}
