//! The conformance suite against a real Cloud Hypervisor (v54 or newer) on
//! /dev/kvm, jailed, with the test guest. No registry this project can use
//! ships Cloud Hypervisor, so CI has none: these tests are built ignored,
//! saying why, unless `METALD_CLOUD_HYPERVISOR_BIN` names a binary when
//! they are built (`metald-core/build.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::sync::Arc;

use conformance::sandbox::{RealVmm, SandboxSubject};
use metald_core::jailer::JailerConfig;
use metald_core::{CloudHypervisorBackend, CloudHypervisorConfig, VmmBackend};

#[derive(Debug)]
pub struct CloudHypervisor;

impl RealVmm for CloudHypervisor {
    fn binary(test: &str) -> Option<std::path::PathBuf> {
        metald_testguest::require_cloud_hypervisor(test)
    }

    /// A binary built here is dynamically linked (only the static release needs nothing).
    fn adjust_jail(jail: &mut JailerConfig) {
        jail.expose_program_libraries = true;
    }

    fn backend(binary: &std::path::Path, jail: &JailerConfig) -> Arc<dyn VmmBackend> {
        let mut config = CloudHypervisorConfig::new(binary);
        // The product's deadlines are made for a host that is not also running a test suite.
        config.ready_timeout = std::time::Duration::from_secs(30);
        config.api_timeout = std::time::Duration::from_secs(30);
        Arc::new(CloudHypervisorBackend::jailed(config, jail.clone()).expect("a jailer"))
    }
}

conformance_suite!(
    SandboxSubject<CloudHypervisor>,
    #[cfg_attr(
        not(cloud_hypervisor_available),
        ignore = "needs a real Cloud Hypervisor, which no registry here ships: build it and set METALD_CLOUD_HYPERVISOR_BIN"
    )]
);

/// A TAP removed when the test ends, also on failure.
struct TestTap(String);

impl TestTap {
    fn new() -> Self {
        let unique = format!(
            "mdt{:08x}",
            std::process::id() ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
        );
        let name: String = unique.chars().take(15).collect();
        let made = std::process::Command::new("ip").args(["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]).status().unwrap();
        assert!(made.success(), "ip tuntap add {name}");
        assert!(std::process::Command::new("ip").args(["link", "set", &name, "up"]).status().unwrap().success());
        Self(name)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// Whether process `pid` holds a descriptor attached to TAP `name` (its
/// `fdinfo` says `iff: <name>`).
fn holds_tap(pid: u32, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return false };
    entries
        .flatten()
        .any(|entry| std::fs::read_to_string(entry.path()).is_ok_and(|info| info.lines().any(|line| line == format!("iff:\t{name}"))))
}

/// The jailed, unprivileged Cloud Hypervisor cannot bring a TAP up, so
/// metald opens it and hands it over with `vm.add-net`: the VM boots with
/// the interface, its VMM holds the TAP, and delete leaves nothing.
#[test]
#[cfg_attr(
    not(cloud_hypervisor_available),
    ignore = "needs a real Cloud Hypervisor, which no registry here ships: build it and set METALD_CLOUD_HYPERVISOR_BIN"
)]
fn a_network_interface_gets_its_tap_handed_over_open() {
    use conformance::{Guest, Subject};
    use metald_core::operations::{Boot, Delete, Info, Metrics};
    let test = "a_network_interface_gets_its_tap_handed_over_open";
    let Some(subject) = SandboxSubject::<CloudHypervisor>::new(test) else { return };
    let tap = TestTap::new();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let manager = subject.manager();
        let mut config = subject.config(Guest::Runs);
        config.network = vec![metald_core::config::NetworkInterface {
            id: "eth0".into(),
            tap_device: tap.0.clone(),
            mac_address: "02:00:00:00:00:31".into(),
            ..Default::default()
        }];
        let tenant = metald_core::TenantId::new("conformance").unwrap();
        let vm_id = manager.create(metald_core::CreateVm { vm_id: None, tenant, config }).await.expect("create");
        manager.run(&vm_id, Boot).await.expect("boot");
        subject.guest_up(&manager, &vm_id).await;
        let pid = manager.run(&vm_id, Info).await.unwrap().vmm.and_then(|vmm| vmm.pid).expect("a pid");
        assert!(holds_tap(pid, &tap.0), "the VMM holds TAP {}", tap.0);
        manager.run(&vm_id, Metrics).await.expect("its counters, the interface's among them");
        manager.run(&vm_id, Delete(metald_core::StopOptions { force: true, timeout: None })).await.unwrap();
    });
    let left = subject.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
