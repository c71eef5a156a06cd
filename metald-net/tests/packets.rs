//! Real frames through the real datapath: each guest is played on its TAP
//! descriptor, inside namespaces the test made, and what arrives where is
//! read back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{ALL_NODES, NetSandbox, echo_request, link_local, router_advertisement, send_udp_from_host};
use metald_core::TenantId;

/// Long enough for a frame that is coming to come, on a busy test host.
const ARRIVES: Duration = Duration::from_secs(20);
/// How long a frame that must not come is waited for.
const NEVER: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_packet_reaches_the_gateway_and_a_vm_of_the_same_tenant() {
    let Some(sandbox) = NetSandbox::new("a_correct_packet_reaches_the_gateway_and_a_vm_of_the_same_tenant").await else { return };
    sandbox.provider.set_intra_tenant(&TenantId::new("acme").unwrap(), true).await.unwrap();
    let (a, b) = (sandbox.attach("vm-a", "acme").await, sandbox.attach("vm-b", "acme").await);
    let (guest_a, guest_b) = (sandbox.guest("vm-a", &a), sandbox.guest("vm-b", &b));
    assert_eq!(a.interfaces[0].ipv6.unwrap().gateway, b.interfaces[0].ipv6.unwrap().gateway, "one tenant, one /64, one gateway");

    let gateway_mac = guest_a.resolve_gateway();
    guest_a.send(&echo_request(guest_a.mac, gateway_mac, guest_a.address, guest_a.gateway));
    let reply = guest_a.receive(ARRIVES, |frame| frame.icmpv6_type() == Some(129));
    assert_eq!(reply.expect("the gateway answers the echo request").source(), Some(guest_a.gateway));

    guest_a.send(&echo_request(guest_a.mac, guest_b.mac, guest_a.address, guest_b.address));
    let arrived = guest_b.receive(ARRIVES, |frame| frame.icmpv6_type() == Some(128));
    assert_eq!(arrived.expect("the tenant's other VM receives it").source(), Some(guest_a.address));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_source_address_or_mac_is_dropped() {
    let Some(sandbox) = NetSandbox::new("a_spoofed_source_address_or_mac_is_dropped").await else { return };
    sandbox.provider.set_intra_tenant(&TenantId::new("acme").unwrap(), true).await.unwrap();
    let (a, b) = (sandbox.attach("vm-a", "acme").await, sandbox.attach("vm-b", "acme").await);
    let (guest_a, guest_b) = (sandbox.guest("vm-a", &a), sandbox.guest("vm-b", &b));
    let gateway_mac = guest_a.resolve_gateway();

    // B's own address, claimed by A.
    guest_a.send(&echo_request(guest_a.mac, guest_b.mac, guest_b.address, guest_b.address));
    assert!(guest_b.receive(NEVER, |frame| frame.icmpv6_type() == Some(128)).is_none(), "a spoofed IPv6 source is dropped");
    guest_a.send(&echo_request(guest_a.mac, gateway_mac, "fd6d:7465:7374:1::99".parse().unwrap(), guest_a.gateway));
    assert!(guest_a.receive(NEVER, |frame| frame.icmpv6_type() == Some(129)).is_none(), "the gateway never sees it either");

    let spoofed_mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    guest_a.send(&echo_request(spoofed_mac, guest_b.mac, guest_a.address, guest_b.address));
    assert!(guest_b.receive(NEVER, |frame| frame.icmpv6_type() == Some(128)).is_none(), "a spoofed MAC is dropped");

    // The same frame, honest, goes through.
    guest_a.send(&echo_request(guest_a.mac, guest_b.mac, guest_a.address, guest_b.address));
    assert!(guest_b.receive(ARRIVES, |frame| frame.icmpv6_type() == Some(128)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_to_another_tenants_vm_is_dropped() {
    let Some(sandbox) = NetSandbox::new("a_packet_to_another_tenants_vm_is_dropped").await else { return };
    let (a, c) = (sandbox.attach("vm-a", "acme").await, sandbox.attach("vm-c", "globex").await);
    let (guest_a, guest_c) = (sandbox.guest("vm-a", &a), sandbox.guest("vm-c", &c));
    assert_ne!(guest_a.gateway, guest_c.gateway, "each tenant has its own /64");
    let gateway_mac = guest_a.resolve_gateway();
    guest_c.resolve_gateway();

    // The host reaches C: routing to it works...
    send_udp_from_host(&sandbox.host_namespace(), guest_c.address, 7001);
    assert!(guest_c.receive(ARRIVES, |frame| frame.udp_destination_port() == Some(7001)).is_some(), "the host reaches the VM");
    // ...but A's packet, routed through the host, never arrives.
    guest_a.send(&echo_request(guest_a.mac, gateway_mac, guest_a.address, guest_c.address));
    assert!(guest_c.receive(NEVER, |frame| frame.icmpv6_type() == Some(128)).is_none(), "another tenant's VM is unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_one_tenant_reach_each_other_only_when_the_tenant_allows_it() {
    let Some(sandbox) = NetSandbox::new("vms_of_one_tenant_reach_each_other_only_when_the_tenant_allows_it").await else { return };
    let (a, b) = (sandbox.attach("vm-a", "acme").await, sandbox.attach("vm-b", "acme").await);
    let (guest_a, guest_b) = (sandbox.guest("vm-a", &a), sandbox.guest("vm-b", &b));
    let gateway_mac = guest_a.resolve_gateway();
    guest_b.resolve_gateway();
    let direct = echo_request(guest_a.mac, guest_b.mac, guest_a.address, guest_b.address);
    let through_gateway = echo_request(guest_a.mac, gateway_mac, guest_a.address, guest_b.address);

    for (name, frame) in [("direct", &direct), ("through the gateway", &through_gateway)] {
        guest_a.send(frame);
        assert!(guest_b.receive(NEVER, |frame| frame.icmpv6_type() == Some(128)).is_none(), "kept apart by default ({name})");
    }
    let acme = TenantId::new("acme").unwrap();
    sandbox.provider.set_intra_tenant(&acme, true).await.unwrap();
    for frame in [&direct, &through_gateway] {
        guest_a.send(frame);
        assert!(guest_b.receive(ARRIVES, |frame| frame.icmpv6_type() == Some(128)).is_some(), "allowed once the tenant says so");
    }
    sandbox.provider.set_intra_tenant(&acme, false).await.unwrap();
    guest_a.send(&direct);
    assert!(guest_b.receive(NEVER, |frame| frame.icmpv6_type() == Some(128)).is_none(), "and apart again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_advertisement_from_a_vm_is_dropped() {
    let Some(sandbox) = NetSandbox::new("a_router_advertisement_from_a_vm_is_dropped").await else { return };
    sandbox.provider.set_intra_tenant(&TenantId::new("acme").unwrap(), true).await.unwrap();
    let (a, b) = (sandbox.attach("vm-a", "acme").await, sandbox.attach("vm-b", "acme").await);
    let (guest_a, guest_b) = (sandbox.guest("vm-a", &a), sandbox.guest("vm-b", &b));
    let source = link_local(guest_a.mac);

    guest_a.send(&router_advertisement(guest_a.mac, source));
    assert!(guest_b.receive(NEVER, |frame| frame.icmpv6_type() == Some(134)).is_none(), "no VM hears a VM's router advertisement");
    let routes = sandbox.host_ip(&["-6", "route", "show", "default"]);
    assert!(routes.trim().is_empty(), "the host took no route from it: {routes}");

    // Multicast from the same VM still flows: only the advertisement is dropped.
    guest_a.send(&echo_request(guest_a.mac, [0x33, 0x33, 0, 0, 0, 1], source, ALL_NODES));
    assert!(guest_b.receive(ARRIVES, |frame| frame.icmpv6_type() == Some(128)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_flooding_icmpv6_is_held_to_its_rate() {
    let Some(sandbox) = NetSandbox::new("a_vm_flooding_icmpv6_is_held_to_its_rate").await else { return };
    sandbox.provider.set_intra_tenant(&TenantId::new("acme").unwrap(), true).await.unwrap();
    let (a, b) = (sandbox.attach("vm-a", "acme").await, sandbox.attach("vm-b", "acme").await);
    let (guest_a, guest_b) = (sandbox.guest("vm-a", &a), sandbox.guest("vm-b", &b));
    let sent = 1000;
    let frame = echo_request(guest_a.mac, guest_b.mac, guest_a.address, guest_b.address);
    let sending = std::time::Instant::now();
    for _ in 0..sent {
        guest_a.send(&frame);
    }
    let sending_s = sending.elapsed().as_secs_f64();
    let mut received = 0;
    while guest_b.receive(Duration::from_millis(300), |frame| frame.icmpv6_type() == Some(128)).is_some() {
        received += 1;
    }
    // The meter lets a burst of 100 through and then 200 a second, for as long as the flood
    // took to send, however slow the host made that.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let allowed = 100 + (200.0 * sending_s).ceil() as u32 + 20;
    assert!(received > 0, "some get through");
    assert!(
        received <= allowed.min(sent - 1),
        "{received} of {sent} flooded echo requests got through the per-VM limit (sent in {sending_s:.3} s, {allowed} allowed)"
    );
}
