//! The conformance suite against the real Firecracker on /dev/kvm, jailed,
//! with the test guest: the suite a new backend must pass too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::sync::Arc;

use common::Sandbox;
use conformance::sandbox::{RealVmm, SandboxSubject};
use metald_core::VmmBackend;
use metald_core::jailer::JailerConfig;

#[derive(Debug)]
pub struct Firecracker;

impl RealVmm for Firecracker {
    fn binary(test: &str) -> Option<std::path::PathBuf> {
        metald_testguest::require_firecracker(test)
    }

    fn backend(binary: &std::path::Path, jail: &JailerConfig) -> Arc<dyn VmmBackend> {
        Sandbox::jailed(Sandbox::firecracker_config(binary), jail)
    }
}

conformance_suite!(SandboxSubject<Firecracker>);
