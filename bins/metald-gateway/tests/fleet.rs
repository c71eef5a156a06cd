//! The gateway in front of three real metald hosts on this machine, each
//! with its own data folder, uid window, cgroup parent and port, the
//! gateway running as `nobody`: the lifecycle over all four protocols,
//! VMs spread over the hosts, lists paged across them, tenants kept apart
//! and keys that stop working when revoked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod gateway;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Host, Wire, create_request, guest_config, wait_for_console};
use connectrpc::ErrorCode;
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;

/// Rates no test here reaches, but the one about rates.
const GENEROUS_RATES: &str = "[rate_limits]\nreads = { per_second = 10000, burst = 10000 }\n\
                              mutations = { per_second = 10000, burst = 10000 }\ncreates = { per_second = 10000, burst = 10000 }";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A host in fleet mode: it takes tenant calls only from the test gateway, for any tenant, without a quota of its own.
fn fleet_host(test: &str) -> Option<Host> {
    Host::start(test, gateway::fleet_host_options())
}

/// Which host holds each VM, from the hosts' own operator lists.
async fn holders(hosts: &[Host]) -> BTreeMap<String, usize> {
    let mut holders = BTreeMap::new();
    for (index, host) in hosts.iter().enumerate() {
        let request = wire::ListVmsRequest { page_size: 1000, ..Default::default() };
        for vm in host.operator_client().list_vms(request).await.unwrap().into_owned().vms {
            holders.insert(vm.vm_id, index);
        }
    }
    holders
}

#[test]
fn the_lifecycle_through_the_gateway_spreads_vms_over_hosts_and_keeps_tenants_apart() {
    let test = "the_lifecycle_through_the_gateway_spreads_vms_over_hosts_and_keeps_tenants_apart";
    let Some(first) = fleet_host(test) else { return };
    let hosts: Vec<Host> = std::iter::once(first).chain((1..3).map(|index| fleet_host(&format!("{test}-{index}")).unwrap())).collect();
    let mut gateway = Gateway::start(&hosts.iter().collect::<Vec<_>>(), GENEROUS_RATES);
    // The gateway holds no privilege: nobody's uid, and no capability in any set.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.pid())).unwrap();
    let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).unwrap().trim().to_owned();
    assert!(field("Uid:").split_whitespace().all(|uid| uid == gateway::NOBODY.to_string()), "{status}");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(u64::from_str_radix(&field(set), 16).unwrap(), 0, "the gateway's {set}");
    }
    runtime().block_on(async {
        let acme_key = gateway.tenant_with_key("acme", admin::Quota::default()).await;
        let globex_key = gateway.tenant_with_key("globex", admin::Quota::default()).await;

        // The lifecycle over each protocol.
        let mut booted = Vec::new();
        for wire_format in [Wire::ConnectJson, Wire::ConnectProto, Wire::Grpc, Wire::GrpcWeb] {
            let client = gateway.client(&acme_key, wire_format);
            let created = client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned();
            let vm_id = created.vm_id.clone();
            assert_eq!(created.state.as_known(), Some(VmState::VM_STATE_CREATED), "{wire_format:?}");
            client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            let ready = wait_for_console(&client, &vm_id, metald_testguest::console::READY).await;
            assert!(!ready.is_empty());
            client.pause_vm(wire::PauseVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            client.resume_vm(wire::ResumeVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            let info =
                client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!((info.state.as_known(), info.customer_id.as_str()), (Some(VmState::VM_STATE_RUNNING), "acme"), "{wire_format:?}");
            client.reboot_vm(wire::RebootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            client.shutdown_vm(wire::ShutdownVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
            booted.push(vm_id);
        }

        // Another tenant: told of acme's VM exactly what it is told of one that does not exist.
        let globex = gateway.client(&globex_key, Wire::ConnectJson);
        let foreign = globex.get_vm_info(wire::GetVmInfoRequest { vm_id: booted[0].clone(), ..Default::default() }).await.unwrap_err();
        let missing = globex.get_vm_info(wire::GetVmInfoRequest { vm_id: "vm-missing".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(
            (foreign.code, foreign.message.as_deref().map(|m| m.replace(&booted[0], "<id>"))),
            (ErrorCode::NotFound, Some("VM <id> does not exist".into()))
        );
        assert_eq!((missing.code, missing.message.as_deref()), (ErrorCode::NotFound, Some("VM vm-missing does not exist")));
        let deleted = globex.delete_vm(wire::DeleteVmRequest { vm_id: booted[0].clone(), ..Default::default() }).await.unwrap_err();
        assert_eq!(deleted.code, ErrorCode::NotFound);
        assert_eq!(globex.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().total_count, 0);

        // 56 more VMs (60 in all), spread; listed in pages of 7, each once, in id order.
        let acme = gateway.client(&acme_key, Wire::ConnectProto);
        let creators = (0..4).map(|_| {
            let client = gateway.client(&acme_key, Wire::ConnectProto);
            async move {
                let mut made = Vec::new();
                for _ in 0..14 {
                    made.push(client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned().vm_id);
                }
                made
            }
        });
        let mut all: BTreeSet<String> = futures::future::join_all(creators).await.into_iter().flatten().collect();
        all.extend(booted.iter().cloned());
        assert_eq!(all.len(), 60);
        let placed = holders(&hosts).await;
        let per_host: BTreeMap<usize, usize> = placed.values().fold(BTreeMap::new(), |mut counts, host| {
            *counts.entry(*host).or_default() += 1;
            counts
        });
        assert_eq!(per_host.len(), 3, "every host holds some: {per_host:?}");
        assert!(all.iter().all(|vm_id| placed.contains_key(vm_id)), "each VM is on exactly one host");
        let mut listed = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = acme
                .list_vms(wire::ListVmsRequest { page_size: 7, page_token: page_token.clone(), ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            assert_eq!((page.total_count, page.unreachable_hosts.len()), (60, 0));
            assert!(page.vms.len() <= 7);
            listed.extend(page.vms.into_iter().map(|vm| vm.vm_id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        assert_eq!(listed, all.iter().cloned().collect::<Vec<_>>(), "each VM once, in id order");
        let shut_down = acme
            .list_vms(wire::ListVmsRequest { state_filter: vec![VmState::VM_STATE_SHUTDOWN.into()], ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!(shut_down.total_count, 4, "the state filter holds across hosts");

        // A revoked key is refused; so are no key, a malformed one and a forged one, all alike.
        let admin = gateway.admin();
        let keys =
            admin.list_api_keys(admin::ListApiKeysRequest { tenant_id: "acme".into(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(keys.keys.len(), 1);
        assert!(keys.keys[0].masked.ends_with("_…") && !keys.keys[0].masked.contains(&acme_key[24..]), "{:?}", keys.keys[0]);
        assert!(keys.keys[0].last_used_timestamp >= 0);
        let forged = format!("{}{}", &acme_key[..acme_key.len() - 4], "0000");
        for key in [forged.as_str(), "mdk_nonsense", "Bearer"] {
            let refused = gateway.client(key, Wire::ConnectJson).list_vms(wire::ListVmsRequest::default()).await.unwrap_err();
            assert_eq!((refused.code, refused.message.as_deref()), (ErrorCode::Unauthenticated, Some("the API key is not valid")), "{key}");
        }
        admin.revoke_api_key(admin::RevokeApiKeyRequest { id: keys.keys[0].id.clone(), ..Default::default() }).await.unwrap();
        let revoked = acme.list_vms(wire::ListVmsRequest::default()).await.unwrap_err();
        assert_eq!((revoked.code, revoked.message.as_deref()), (ErrorCode::Unauthenticated, Some("the API key is not valid")));
        let admin_as_tenant = gateway.client(&gateway.admin_token, Wire::ConnectJson).list_vms(wire::ListVmsRequest::default()).await;
        assert_eq!(admin_as_tenant.unwrap_err().code, ErrorCode::PermissionDenied);

        // In fleet mode a host refuses its tenants' own tokens: the gateway is the way in.
        let around = hosts[0].client("acme", Wire::ConnectJson).list_vms(wire::ListVmsRequest::default()).await.unwrap_err();
        assert_eq!(
            (around.code, around.message.as_deref()),
            (ErrorCode::PermissionDenied, Some("this host takes tenant calls only through its gateway (auth.gateway.required)"))
        );

        // Deletes through the gateway leave the hosts empty.
        let new_key = admin
            .create_api_key(admin::CreateApiKeyRequest { tenant_id: "acme".into(), ..Default::default() })
            .await
            .unwrap()
            .into_owned()
            .key;
        let acme = gateway.client(&new_key, Wire::Grpc);
        for vm_id in &all {
            acme.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
        assert!(holders(&hosts).await.is_empty());
        assert_eq!(acme.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().total_count, 0);
    });
    assert!(gateway.terminate().success(), "{}", gateway.log());
    for mut host in hosts {
        assert!(host.terminate().success());
        assert_eq!(host.leftovers(), Vec::<String>::new());
    }
    let _ = Duration::ZERO;
}

/// The gateway needs no privilege: started as root it refuses, saying how
/// to run it, unless its settings allow it.
#[test]
fn the_gateway_refuses_to_run_as_root_unless_told_to() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED the_gateway_refuses_to_run_as_root_unless_told_to: the test must start the gateway as root");
        return;
    }
    let dir = tempfile::Builder::new().prefix("metald-test-gateway-root-").tempdir().unwrap();
    let secret = dir.path().join("host.secret");
    std::fs::write(&secret, common::GATEWAY_SECRET).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nhost_secret_file = {secret:?}\n", dir.path().join("data")))
        .unwrap();
    let output = std::process::Command::new(gateway::gateway_binary()).arg("--config").arg(&config).env("NO_COLOR", "1").output().unwrap();
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("metald-gateway needs no privilege and refuses to run as root"), "{log}");
    assert!(!dir.path().join("data").exists(), "it made nothing");
}
