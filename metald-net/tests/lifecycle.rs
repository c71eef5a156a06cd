//! What the provider leaves behind (nothing), what it remembers (every
//! allocation, across restarts), and what it refuses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NetSandbox, eth0};
use metald_core::config::{Ipv6Config, NetworkInterface, NetworkMode};
use metald_core::network::{NetworkError, NetworkProvider};
use metald_core::{TenantId, VmId};
use metald_net::addresses::AddressError;
use metald_net::provider::ProviderError;
use metald_net::{Ipv6Network, NetworkConfig};

/// Everything of the test's host namespace that could be a leftover.
fn host_state(sandbox: &NetSandbox) -> (Vec<String>, String, String, Vec<String>) {
    let links = sandbox.host_links();
    let addresses = sandbox.host_ip(&["-o", "addr"]);
    let routes = format!("{}{}", sandbox.host_ip(&["-6", "route"]), sandbox.host_ip(&["-4", "route"]));
    let chains = sandbox.provider.firewall().chains().unwrap();
    (links, addresses, routes, chains)
}

fn base_chains() -> Vec<String> {
    ["prerouting", "forward", "output"].map(String::from).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_leaves_no_namespace_link_route_address_or_rule() {
    let test = "teardown_leaves_no_namespace_link_route_address_or_rule";
    let Some(sandbox) = NetSandbox::with(test, |config| config.ipv4_pool = Some("10.77.0.0/16".parse().unwrap())).await else { return };
    let before = host_state(&sandbox);
    assert_eq!(before.0, ["lo"]);
    assert_eq!(before.3, base_chains());

    let dual = NetworkInterface { mode: NetworkMode::DualStack, ..eth0() };
    for (vm, tenant) in [("vm-a", "acme"), ("vm-b", "acme"), ("vm-c", "globex")] {
        sandbox.try_attach(vm, tenant, std::slice::from_ref(&dual)).await.unwrap();
    }
    let during = host_state(&sandbox);
    assert_eq!(during.0.len(), 1 + 2 + 3, "lo, two tenant bridges, three VM links: {:?}", during.0);
    assert!(during.1.contains("fd6d:7465:7374:1::1/64") && during.1.contains("10.77.1.1/24"), "gateways: {}", during.1);
    assert!(during.3.contains(&"tenant_1".to_owned()) && during.3.contains(&"tenant_2".to_owned()), "{:?}", during.3);
    assert_eq!(sandbox.namespaces_left().len(), 4);

    for vm in ["vm-a", "vm-b", "vm-c"] {
        sandbox.detach(vm).await;
    }
    let after = host_state(&sandbox);
    assert_eq!(after.0, ["lo"], "no link is left");
    assert!(!after.1.contains("inet"), "no address is left: {}", after.1);
    assert!(after.2.trim().is_empty(), "no route is left: {}", after.2);
    assert_eq!(after.3, base_chains(), "no tenant chain is left");
    let listing = std::process::Command::new("ip")
        .args(["netns", "exec", &sandbox.host_name, "nft", "list", "table", "bridge", "metald"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(!listing.contains("mdv") && !listing.contains("jump tenant") && !listing.contains("02:6d"), "no element is left:\n{listing}");
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name));
    for vm in ["vm-a", "vm-b", "vm-c"] {
        assert!(sandbox.provider.addresses().allocations_of(&VmId::new(vm).unwrap()).unwrap().is_empty());
    }
    // Detaching again is harmless.
    sandbox.detach("vm-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teardown_step_that_fails_does_not_stop_the_others_and_is_reported() {
    let test = "a_teardown_step_that_fails_does_not_stop_the_others_and_is_reported";
    let script = tempfile::Builder::new().prefix("metald-test-nft-").tempdir().unwrap();
    // An nft that refuses every deletion, so the firewall part of teardown fails.
    let nft = metald_testguest::nft::write_refusing_nft(script.path(), r#"*'"delete"'*"#).unwrap();
    let Some(sandbox) = NetSandbox::with(test, |config| config.nft = nft.clone()).await else { return };
    sandbox.attach("vm-a", "acme").await;

    let error = sandbox.provider.detach(&VmId::new("vm-a").unwrap()).await.unwrap_err();
    let NetworkError::Detach { problems, .. } = error else { panic!("expected a detach report") };
    assert!(!problems.is_empty() && problems.iter().all(|problem| problem.contains("injected failure")), "{problems:?}");
    // Everything else went: namespace, links, addresses.
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name));
    assert_eq!(host_state(&sandbox).0, ["lo"]);
    assert!(sandbox.provider.addresses().allocations_of(&VmId::new("vm-a").unwrap()).unwrap().is_empty());
}

/// The firewall's elements as `nft` lists them in the test's host namespace.
fn firewall_listing(sandbox: &NetSandbox) -> String {
    let listing = std::process::Command::new("ip")
        .args(["netns", "exec", &sandbox.host_name, "nft", "list", "table", "bridge", "metald"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&listing.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_attach_has_its_elements_and_a_detach_while_they_load_leaves_none() {
    let test = "a_settled_attach_has_its_elements_and_a_detach_while_they_load_leaves_none";
    let Some(sandbox) = NetSandbox::new(test).await else { return };
    let settled = sandbox.attach("vm-a", "acme").await;
    let listing = firewall_listing(&sandbox);
    assert!(listing.contains(&settled.interfaces[0].host_link) && listing.contains("jump tenant_1"), "{listing}");
    sandbox.detach("vm-a").await;

    // Detached right after the attach, while its `nft` may still run: the
    // detach waits for it, so nothing is added after the removal.
    for (vm, tenant) in [("vm-b", "acme"), ("vm-c", "globex"), ("vm-d", "acme")] {
        sandbox.attach_unsettled(vm, tenant).await;
        sandbox.detach(vm).await;
    }
    let listing = firewall_listing(&sandbox);
    assert!(!listing.contains("mdv") && !listing.contains("jump tenant") && !listing.contains("02:6d"), "an element is left:\n{listing}");
    assert_eq!(host_state(&sandbox).3, base_chains());
    assert_eq!(host_state(&sandbox).0, ["lo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_that_cannot_load_fails_the_settle_and_leaves_nothing() {
    let test = "a_firewall_that_cannot_load_fails_the_settle_and_leaves_nothing";
    let script = tempfile::Builder::new().prefix("metald-test-nft-").tempdir().unwrap();
    // An nft that refuses to add elements, so a VM's rules cannot load.
    let nft = metald_testguest::nft::write_refusing_nft(script.path(), r#"*'"add"'*'"element"'*"#).unwrap();
    let Some(sandbox) = NetSandbox::with(test, |config| config.nft = nft.clone()).await else { return };
    let error = sandbox.try_attach("vm-a", "acme", &[eth0()]).await.unwrap_err();
    assert!(metald_core::error_chain(&error).contains("injected failure"), "{}", metald_core::error_chain(&error));
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name));
    assert_eq!(host_state(&sandbox).0, ["lo"]);
    assert_eq!(host_state(&sandbox).3, base_chains());
    assert!(sandbox.provider.addresses().allocations_of(&VmId::new("vm-a").unwrap()).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_gives_the_same_answers_and_never_a_used_address() {
    let Some(sandbox) = NetSandbox::new("a_restart_gives_the_same_answers_and_never_a_used_address").await else { return };
    let a = sandbox.attach("vm-a", "acme").await;
    let b = sandbox.attach("vm-b", "acme").await;
    let config = NetworkConfig {
        host_prefix: Some(common::HOST_PREFIX.parse().unwrap()),
        state_dir: common::state_path(&sandbox),
        host_netns: Some(sandbox.namespaces.path_of(&sandbox.host_name)),
        netns_prefix: sandbox.prefix.clone(),
        ..NetworkConfig::default()
    };
    let restarted = Ipv6Network::new(config).await.unwrap();
    let remembered = restarted.addresses().allocations_of(&VmId::new("vm-a").unwrap()).unwrap();
    assert_eq!(remembered[0].ipv6, a.interfaces[0].ipv6.unwrap().address);
    assert_eq!(remembered[0].mac_string(), a.interfaces[0].mac_address);
    let c = restarted.addresses().allocate(&VmId::new("vm-c").unwrap(), "eth0", &TenantId::new("acme").unwrap(), None).unwrap();
    assert!(c.ipv6 != a.interfaces[0].ipv6.unwrap().address && c.ipv6 != b.interfaces[0].ipv6.unwrap().address);
    restarted.addresses().release(&VmId::new("vm-c").unwrap()).unwrap();
    sandbox.detach("vm-a").await;
    sandbox.detach("vm-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_host_prefix_is_a_typed_error_and_leaves_nothing() {
    let test = "an_exhausted_host_prefix_is_a_typed_error_and_leaves_nothing";
    let Some(sandbox) = NetSandbox::with(test, |config| config.host_prefix = Some("fd6d:7465:7374::/62".parse().unwrap())).await else {
        return;
    };
    for tenant in ["t1", "t2", "t3"] {
        sandbox.attach(&format!("vm-{tenant}"), tenant).await;
    }
    let error = sandbox.try_attach("vm-t4", "t4", &[eth0()]).await.unwrap_err();
    let NetworkError::Attach { source, .. } = &error else { panic!("{error}") };
    let cause = source.downcast_ref::<ProviderError>().expect("a provider error");
    assert!(matches!(cause, ProviderError::Addresses(AddressError::NoTenantPrefix { slots: 3, .. })), "{cause}");
    assert!(!sandbox.namespaces_left().iter().any(|name| name.ends_with("vm-t4")), "the refused VM got no namespace");
    for tenant in ["t1", "t2", "t3"] {
        sandbox.detach(&format!("vm-{tenant}")).await;
    }
    assert_eq!(host_state(&sandbox).0, ["lo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_the_providers_to_give() {
    let Some(sandbox) = NetSandbox::new("addresses_are_the_providers_to_give").await else { return };
    let chosen = NetworkInterface {
        ipv6_config: Some(Ipv6Config { address: "fd00::5".into(), prefix_length: 64, ..Ipv6Config::default() }),
        ..eth0()
    };
    let error = sandbox.try_attach("vm-a", "acme", &[chosen]).await.unwrap_err();
    assert!(matches!(&error, NetworkError::Refused { field, .. } if field == "network[0].ipv6_config.address"), "{error}");
    let dual = NetworkInterface { mode: NetworkMode::DualStack, ..eth0() };
    let error = sandbox.try_attach("vm-a", "acme", &[dual]).await.unwrap_err();
    assert!(matches!(&error, NetworkError::Refused { field, .. } if field == "network[0].mode"), "no IPv4 pool is configured: {error}");
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_is_told_its_network_on_the_kernel_command_line() {
    let test = "the_guest_is_told_its_network_on_the_kernel_command_line";
    let Some(sandbox) = NetSandbox::with(test, |config| {
        config.ipv4_pool = Some("10.77.0.0/16".parse().unwrap());
        config.dns_servers = vec!["fd6d:7465:7374::53".parse().unwrap(), "10.77.0.53".parse().unwrap()];
    })
    .await
    else {
        return;
    };
    let attachment = sandbox.try_attach("vm-a", "acme", &[NetworkInterface { mode: NetworkMode::DualStack, ..eth0() }]).await.unwrap();
    assert_eq!(
        attachment.kernel_args,
        [
            "metald.eth0.mac=02:6d:00:01:00:02",
            "metald.eth0.ipv6=fd6d:7465:7374:1::2/64",
            "metald.eth0.gateway6=fd6d:7465:7374:1::1",
            "metald.eth0.ipv4=10.77.1.2/24",
            "metald.eth0.gateway4=10.77.1.1",
            "metald.mtu=1500",
            "metald.dns=fd6d:7465:7374::53,10.77.0.53",
        ]
    );
    let interface = &attachment.interfaces[0];
    assert_eq!((interface.tap_device.as_str(), interface.host_link.as_str()), ("tap0", "mdv1"));
    sandbox.detach("vm-a").await;
}
