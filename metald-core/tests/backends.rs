//! A host may offer several VMMs at once: each VM names its own (none
//! named is the host's default), keeps that name in its configuration, and
//! a name the host does not offer is refused at the request, leaving
//! nothing behind (real Firecracker, jailed, offered under two names that
//! share one jailer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use common::Sandbox;
use metald_core::backend::{BackendError, Capabilities, VmmBackend, VmmInstance, VmmSpec};
use metald_core::console::ConsoleLog;
use metald_core::jailer::{IdentityCapacity, IdentityLease, Jailer};
use metald_core::launch::{Launcher, TakeoverTicket};
use metald_core::operations::{Boot, Delete, Info};
use metald_core::{CreateVm, FirecrackerBackend, ManagerError, StopOptions, VmState};

/// A second VMM of the host: Firecracker again, under another name.
#[derive(Debug)]
struct SecondVmm(FirecrackerBackend);

#[async_trait]
impl VmmBackend for SecondVmm {
    fn name(&self) -> &'static str {
        "second-vmm"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn lease_identity(&self) -> Result<Option<Arc<IdentityLease>>, BackendError> {
        self.0.lease_identity()
    }
    async fn create(&self, spec: VmmSpec, console: ConsoleLog) -> Result<Box<dyn VmmInstance>, BackendError> {
        self.0.create(spec, console).await
    }
    fn identity_capacity(&self) -> Option<IdentityCapacity> {
        self.0.identity_capacity()
    }
    fn take_over_identity(&self, uid: u32, gid: u32) -> Result<Option<Arc<IdentityLease>>, BackendError> {
        self.0.take_over_identity(uid, gid)
    }
    fn unlaunched(&self, spec: VmmSpec, console: ConsoleLog) -> Box<dyn VmmInstance> {
        self.0.unlaunched(spec, console)
    }
    async fn take_over(&self, spec: VmmSpec, console: ConsoleLog, ticket: &TakeoverTicket) -> Result<Box<dyn VmmInstance>, BackendError> {
        self.0.take_over(spec, console, ticket).await
    }
    fn clean_up_after(&self, ticket: &TakeoverTicket) -> Vec<String> {
        self.0.clean_up_after(ticket)
    }
    fn sweep_strays(&self, in_use: &BTreeSet<String>) -> Vec<String> {
        self.0.sweep_strays(in_use)
    }
    fn release_host(&self) -> Vec<String> {
        self.0.release_host()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vm_runs_on_the_vmm_it_names_and_an_unoffered_one_is_refused() {
    let test = "each_vm_runs_on_the_vmm_it_names_and_an_unoffered_one_is_refused";
    let Some(sandbox) = Sandbox::with(test, |builder, jail| {
        let binary = metald_testguest::require_firecracker(test).expect("Firecracker, as the sandbox found it");
        // One jailer for both, so each VM's uid is leased once.
        let launcher: Arc<dyn Launcher> = Arc::new(Jailer::new(jail.clone()).unwrap());
        let vmm = Sandbox::firecracker_config(&binary);
        builder
            .backend(Arc::new(FirecrackerBackend::new(vmm.clone(), Arc::clone(&launcher))))
            .backend(Arc::new(SecondVmm(FirecrackerBackend::new(vmm, launcher))))
    }) else {
        return;
    };
    assert_eq!(sandbox.manager.backend_names(), ["firecracker", "second-vmm"]);

    let on_default = sandbox.create(sandbox.guest_config(&[])).await;
    let mut config = sandbox.guest_config(&[]);
    config.vmm = "second-vmm".into();
    let on_second = sandbox.create(config).await;
    for (vm_id, vmm) in [(&on_default, "firecracker"), (&on_second, "second-vmm")] {
        sandbox.manager.run(vm_id, Boot).await.unwrap();
        sandbox.wait_for_line(vm_id, metald_testguest::console::READY).await;
        let info = sandbox.manager.run(vm_id, Info).await.unwrap();
        assert_eq!((info.state, info.config.vmm.as_str()), (VmState::Running, vmm), "the configuration names the VMM it runs on");
    }
    let mut uids = BTreeSet::new();
    for vm_id in [&on_default, &on_second] {
        uids.insert(sandbox.manager.run(vm_id, Info).await.unwrap().vmm.unwrap().identity.unwrap().0);
    }
    assert_eq!(uids.len(), 2, "two VMs, two uids, whichever VMM runs them");

    let mut unoffered = sandbox.guest_config(&[]);
    unoffered.vmm = "cloud-hypervisor".into();
    let error = sandbox.manager.create(CreateVm { vm_id: None, tenant: Sandbox::tenant(), config: unoffered }).await.unwrap_err();
    assert!(matches!(error, ManagerError::InvalidConfig(_)), "{error}");
    assert_eq!(error.field(), Some("vmm"));
    assert_eq!(
        metald_core::error_chain(&error),
        "invalid VM configuration: vmm: \"cloud-hypervisor\" is not offered by this host; it offers firecracker, second-vmm"
    );

    for vm_id in [&on_default, &on_second] {
        sandbox.manager.run(vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    }
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}
