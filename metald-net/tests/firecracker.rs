//! A jailed Firecracker VM with a network interface: its TAP is made in its
//! own namespace for its own user, the VMM joins that namespace and
//! attaches to the TAP, and the guest is told its addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{NetSandbox, eth0};
use metald_core::config::MIB;
use metald_core::jailer::JailerConfig;
use metald_core::operations::{Boot, Delete, Info};
use metald_core::{CreateVm, FirecrackerConfig, StopOptions, TenantId, VmConfig, VmManager};
use metald_testguest::console;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vm_gets_its_tap_in_its_namespace_and_firecracker_attaches_to_it() {
    let test = "a_jailed_vm_gets_its_tap_in_its_namespace_and_firecracker_attaches_to_it";
    let Some(firecracker) = metald_testguest::require_firecracker(test) else { return };
    let Some(network) = NetSandbox::new(test).await else { return };
    let images = network.state.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(metald_testguest::kernel_path(), images.join("testguest.elf")).unwrap();
    let cgroup_parent = PathBuf::from(network.prefix.trim_end_matches('-'));
    let jail = JailerConfig { uid_range: 1_200_000..1_200_064, cgroup_parent: cgroup_parent.clone(), ..JailerConfig::default() };
    let sandbox_prefix = network.prefix.clone();
    let manager = VmManager::builder()
        .backend(Arc::new(metald_core::FirecrackerBackend::jailed(FirecrackerConfig::new(&firecracker), jail).unwrap()))
        .network(Arc::clone(&network.provider) as Arc<dyn metald_core::network::NetworkProvider>)
        .image_root(&images)
        .vm_root(network.state.path().join("vms"))
        .build()
        .unwrap();

    let mut config = VmConfig::default();
    config.cpu.vcpu_count = 1;
    config.memory.size_bytes = 32 * MIB;
    config.boot.kernel_path = "testguest.elf".into();
    config.network = vec![eth0()];
    let vm_id = manager.create(CreateVm { vm_id: None, tenant: TenantId::new("acme").unwrap(), config }).await.unwrap();
    manager.run(&vm_id, Boot).await.unwrap();
    let ready =
        manager.console(&vm_id).unwrap().wait_for_line(|line| line.starts_with(console::READY), Duration::from_secs(20)).await.unwrap();
    let info = manager.run(&vm_id, Info).await.unwrap();
    let attached = info.network.as_ref().unwrap();
    let ipv6 = attached.interfaces[0].ipv6.unwrap();
    assert!(ready.contains(&format!("metald.eth0.ipv6={}/64", ipv6.address)), "the guest is told its address: {ready}");
    assert!(ready.contains(&format!("metald.eth0.gateway6={}", ipv6.gateway)), "{ready}");

    let vmm = info.vmm.unwrap();
    let pid = vmm.pid.unwrap();
    let namespace_name = attached.netns_name.clone().unwrap();
    assert!(namespace_name.starts_with(&sandbox_prefix));
    let vm_namespace = std::fs::metadata(PathBuf::from("/run/netns").join(&namespace_name)).unwrap();
    let vmm_namespace = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&vmm_namespace),
        std::os::unix::fs::MetadataExt::ino(&vm_namespace),
        "the VMM runs in the VM's namespace"
    );

    let tap = &attached.interfaces[0].tap_device;
    let details = std::process::Command::new("ip").args(["-n", &namespace_name, "-d", "link", "show", tap]).output().unwrap();
    let details = String::from_utf8_lossy(&details.stdout);
    assert!(details.contains(&format!("user {}", vmm.identity.unwrap().0)), "the TAP belongs to the VMM's user: {details}");
    let on_host = std::process::Command::new("ip").args(["link", "show", tap]).output().unwrap();
    assert!(!on_host.status.success(), "the TAP exists only inside the VM's namespace");
    let holds_tap = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .any(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default().contains(&format!("iff:\t{tap}")));
    assert!(holds_tap, "Firecracker has the TAP open");

    manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert_eq!(network.namespaces_left(), std::slice::from_ref(&network.host_name), "the VM's namespace is gone");
    assert_eq!(network.host_ip(&["-o", "link"]).lines().count(), 1, "only lo is left on the host side");
    for controller in ["cpu", "cpuacct", "memory", "pids"] {
        let _ = std::fs::remove_dir(PathBuf::from("/sys/fs/cgroup").join(controller).join(&cgroup_parent));
    }
}
