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
