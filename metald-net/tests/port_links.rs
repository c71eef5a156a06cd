//! The links an attach leaves in the making beside the VMM's start: a
//! failure among them fails the settle, and the detach that follows leaves
//! nothing. Its own test binary, since a fail point is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NetSandbox, eth0};
use metald_core::VmId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_that_cannot_be_made_fail_the_settle_and_leave_nothing() {
    let test = "links_that_cannot_be_made_fail_the_settle_and_leave_nothing";
    let Some(sandbox) = NetSandbox::new(test).await else { return };
    let scenario = fail::FailScenario::setup();
    fail::cfg("network-port-links", "return").unwrap();
    let error = sandbox.try_attach("vm-a", "acme", &[eth0()]).await.unwrap_err();
    fail::remove("network-port-links");
    assert!(metald_core::error_chain(&error).contains("injected failure"), "{}", metald_core::error_chain(&error));
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name), "the VM's namespace is gone");
    assert_eq!(sandbox.host_links(), ["lo"], "no tenant bridge or VM link is left");
    assert_eq!(sandbox.provider.firewall().chains().unwrap(), ["prerouting", "forward", "output"], "no tenant chain is left");
    assert!(sandbox.provider.addresses().allocations_of(&VmId::new("vm-a").unwrap()).unwrap().is_empty());

    // The same VM then attaches whole: the failure left nothing in its way.
    let attachment = sandbox.try_attach("vm-a", "acme", &[eth0()]).await.unwrap();
    assert!(sandbox.host_links().contains(&attachment.interfaces[0].host_link), "{:?}", sandbox.host_links());
    sandbox.detach("vm-a").await;
    assert_eq!(sandbox.host_links(), ["lo"]);
    scenario.teardown();
}
