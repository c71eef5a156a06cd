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

/// Until a TAP is handed over open, a Cloud Hypervisor VM with an
/// interface is refused at create, naming the field and the VMM, and
/// nothing of it is left.
#[test]
#[cfg_attr(
    not(cloud_hypervisor_available),
    ignore = "needs a real Cloud Hypervisor, which no registry here ships: build it and set METALD_CLOUD_HYPERVISOR_BIN"
)]
fn a_network_interface_is_refused_naming_the_field_and_the_vmm() {
    use conformance::{Guest, Subject};
    let test = "a_network_interface_is_refused_naming_the_field_and_the_vmm";
    let Some(subject) = SandboxSubject::<CloudHypervisor>::new(test) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let manager = subject.manager();
        let mut config = subject.config(Guest::Runs);
        config.network =
            vec![metald_core::config::NetworkInterface { id: "eth0".into(), tap_device: "tap-absent".into(), ..Default::default() }];
        let tenant = metald_core::TenantId::new("conformance").unwrap();
        let error = manager.create(metald_core::CreateVm { vm_id: None, tenant, config }).await.unwrap_err();
        assert_eq!(error.kind(), metald_core::ErrorKind::InvalidArgument { field: "network" }, "{}", metald_core::error_chain(&error));
        assert!(
            metald_core::error_chain(&error).contains("cloud-hypervisor does not offer network interfaces"),
            "{}",
            metald_core::error_chain(&error)
        );
        assert!(manager.list(None).is_empty());
    });
    let left = subject.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
