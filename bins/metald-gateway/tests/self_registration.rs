//! Hosts that register themselves: a real gateway configured with no host,
//! two real metald hosts announcing themselves to it every second. Both are
//! placed on; one that stops announcing (restarted without `[announce]`,
//! still serving) is placed on no more once its last announcement is older
//! than the gateway's TTL, while its VM is still served; the operator can
//! still cordon and remove hosts by hand; and an announcement not signed
//! with the hosts' secret is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod gateway;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Host, HostOptions, Wire, create_request, guest_config};
use connectrpc::ErrorCode;
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;

const GENEROUS_RATES: &str = "announce_ttl_seconds = 3\n[rate_limits]\nreads = { per_second = 10000, burst = 10000 }\n\
                              mutations = { per_second = 10000, burst = 10000 }\ncreates = { per_second = 10000, burst = 10000 }\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn announcing_host(test: &str, gateway: &Gateway, name: &str) -> Option<Host> {
    let announce_to = Some((format!("http://127.0.0.1:{}", gateway.port), name.to_owned()));
    Host::start(test, HostOptions { announce_to, ..gateway::fleet_host_options() })
}

async fn hosts_of(gateway: &Gateway) -> BTreeMap<String, admin::Host> {
    let listed = gateway.admin().list_hosts(admin::ListHostsRequest::default()).await.unwrap().into_owned().hosts;
    listed.into_iter().map(|host| (host.name.clone(), host)).collect()
}

async fn wait_for(what: &str, gateway: &Gateway, fact: impl Fn(&BTreeMap<String, admin::Host>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = hosts_of(gateway).await;
        if fact(&hosts) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s: {hosts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The host (by index) each of `vms` is on.
async fn holders(hosts: &[&Host], vms: &[String]) -> Vec<usize> {
    let mut on = BTreeMap::new();
    for (index, host) in hosts.iter().enumerate() {
        let request = wire::ListVmsRequest { page_size: 1000, ..Default::default() };
        for vm in host.operator_client().list_vms(request).await.unwrap().into_owned().vms {
            on.insert(vm.vm_id, index);
        }
    }
    vms.iter().map(|vm_id| on[vm_id]).collect()
}

#[test]
fn hosts_that_announce_themselves_are_placed_on_until_they_stop() {
    let test = "hosts_that_announce_themselves_are_placed_on_until_they_stop";
    let gateway = Gateway::start_on(&[], GENEROUS_RATES);
    let Some(first) = announcing_host(test, &gateway, "host-a") else { return };
    let mut second = announcing_host(&format!("{test}-b"), &gateway, "host-b").unwrap();
    runtime().block_on(async {
        wait_for("both hosts announced and ready", &gateway, |hosts| {
            ["host-a", "host-b"].iter().all(|name| hosts.get(*name).is_some_and(|host| host.health == "ready" && !host.silent))
        })
        .await;
        let listed = hosts_of(&gateway).await;
        assert_eq!(listed["host-a"].url, format!("http://127.0.0.1:{}", first.port), "the URL it announced");
        assert!(listed["host-a"].last_announced_timestamp > 0);
        let key = gateway.tenant_with_key("acme", admin::Quota::default()).await;
        let client = gateway.client(&key, Wire::ConnectProto);
        let mut vms = Vec::new();
        while holders(&[&first, &second], &vms).await.iter().collect::<std::collections::BTreeSet<_>>().len() < 2 {
            vms.push(client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned().vm_id);
            assert!(vms.len() < 40, "placement never chose one of the two announced hosts");
        }
        let on_b = vms[holders(&[&first, &second], &vms).await.iter().position(|holder| *holder == 1).unwrap()].clone();

        // host-b stops announcing but keeps serving.
        second.terminate();
        second.edit_config(|toml| toml[..toml.find("[announce]").unwrap()].to_owned());
        second.launch();
        wait_for("host-b is silent", &gateway, |hosts| hosts["host-b"].silent && !hosts["host-a"].silent).await;
        for _ in 0..6 {
            let vm_id = client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned().vm_id;
            assert_eq!(holders(&[&first, &second], std::slice::from_ref(&vm_id)).await, [0], "nothing new on the silent host");
            vms.push(vm_id);
        }
        let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: on_b.clone(), ..Default::default() }).await;
        assert_eq!(info.expect("its VM is still served").into_owned().vm_id, on_b);

        // The operator's word stands: cordoned, host-a is placed on no more whatever it announces.
        gateway.admin().cordon_host(admin::HostRequest { name: "host-a".into(), ..Default::default() }).await.unwrap();
        let cordoned_at = hosts_of(&gateway).await["host-a"].last_announced_timestamp;
        wait_for("host-a announces again", &gateway, |hosts| hosts["host-a"].last_announced_timestamp > cordoned_at).await;
        assert_eq!(hosts_of(&gateway).await["host-a"].mode, "cordoned", "an announcement does not uncordon");
        let nowhere = client.create_vm(create_request(guest_config(&[]))).await.unwrap_err();
        assert_eq!(nowhere.code, ErrorCode::ResourceExhausted);
        assert_eq!(
            nowhere.message.as_deref(),
            Some("no host can take this VM: of 2 hosts, 1 cordoned or draining, 1 no longer announcing")
        );
        gateway.admin().uncordon_host(admin::HostRequest { name: "host-a".into(), ..Default::default() }).await.unwrap();
        for vm_id in vms {
            client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
        }
        gateway.admin().remove_host(admin::RemoveHostRequest { name: "host-b".into(), ..Default::default() }).await.unwrap();
        assert!(!hosts_of(&gateway).await.contains_key("host-b"), "removed by hand");

        // An announcement with the wrong secret is refused.
        let (transport, config) =
            common::client_config(&format!("http://127.0.0.1:{}", gateway.port), None, Wire::ConnectProto, Duration::from_secs(10));
        let registration = admin::RegistrationServiceClient::new(transport, config);
        let request = admin::AnnounceRequest { name: "intruder".into(), url: "http://127.0.0.1:1".into(), ..Default::default() };
        let forged = metald_api::gateway_auth::GatewaySecret::new(b"not the secret the hosts and the gateway share".to_vec());
        let options = forged
            .headers(
                "",
                "/gateway.v1.RegistrationService/Announce",
                Some(&buffa::Message::encode_to_vec(&request)),
                std::time::SystemTime::now(),
            )
            .into_iter()
            .fold(connectrpc::client::CallOptions::default(), |options, (name, value)| options.with_header(name, value));
        let refused = registration.announce_with_options(request, options).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthenticated, "{refused:?}");
        assert!(!hosts_of(&gateway).await.contains_key("intruder"));
    });
    drop(gateway);
    for mut host in [first, second] {
        assert!(host.terminate().success());
        assert_eq!(host.leftovers(), Vec::<String>::new());
    }
}
