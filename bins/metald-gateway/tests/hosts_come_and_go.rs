//! The gateway when hosts are away, cordoned or drained, when a create is
//! retried, when a caller goes too fast or sends rubbish, and when the
//! hosts and the store disagree: three real metald hosts behind one real
//! gateway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod gateway;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Host, HostOptions, Wire, create_request, guest_config, http_request};
use connectrpc::ErrorCode;
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;

const GENEROUS_RATES: &str = "[rate_limits]\nreads = { per_second = 10000, burst = 10000 }\n\
                              mutations = { per_second = 10000, burst = 10000 }\ncreates = { per_second = 10000, burst = 10000 }";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn three_hosts(test: &str) -> Option<Vec<Host>> {
    let options = || HostOptions { gateway: true, gateway_default_quota: Some("{}"), ..HostOptions::default() };
    let first = Host::start(test, options())?;
    Some(std::iter::once(first).chain((1..3).map(|index| Host::start(&format!("{test}-{index}"), options()).unwrap())).collect())
}

/// Which host (by index) holds each of the tenant's VMs, from the hosts' own operator lists.
async fn holders(hosts: &[Host]) -> BTreeMap<String, usize> {
    let mut holders = BTreeMap::new();
    for (index, host) in hosts.iter().enumerate() {
        if let Ok(answer) = host.operator_client().list_vms(wire::ListVmsRequest { page_size: 1000, ..Default::default() }).await {
            holders.extend(answer.into_owned().vms.into_iter().map(|vm| (vm.vm_id, index)));
        }
    }
    holders
}

async fn create(client: &common::Client) -> String {
    client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned().vm_id
}

/// The next event of `vm_id` on a watch, skipping others, within a generous deadline.
async fn next_event_of(
    stream: &mut connectrpc::client::ServerStream<hyper_body::Body, wire::__buffa::view::VmEventView<'static>>,
    vm_id: &str,
) -> wire::VmEvent {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream is open");
        let event = message.to_owned_message();
        if event.vm_id == vm_id {
            return event;
        }
    }
}

mod hyper_body {
    pub type Body = <connectrpc::client::HttpClient as connectrpc::client::ClientTransport>::ResponseBody;
}

#[test]
fn a_host_that_goes_away_makes_its_vms_unavailable_and_comes_back_with_them() {
    let test = "a_host_that_goes_away_makes_its_vms_unavailable_and_comes_back_with_them";
    let Some(mut hosts) = three_hosts(test) else { return };
    let mut gateway = Gateway::start(&hosts.iter().collect::<Vec<_>>(), GENEROUS_RATES);
    let rt = runtime();
    rt.block_on(async {
        let key = gateway.tenant_with_key("acme", admin::Quota::default()).await;
        let client = gateway.client(&key, Wire::ConnectJson);
        let mut watch = client.watch_vms(wire::WatchVmsRequest::default()).await.unwrap();
        let mut vms = Vec::new();
        while holders(&hosts).await.values().collect::<std::collections::BTreeSet<_>>().len() < 3 {
            let vm_id = create(&client).await;
            assert_eq!(next_event_of(&mut watch, &vm_id).await.kind, "created", "the merged watch tells every host's events");
            vms.push(vm_id);
        }
        let placed = holders(&hosts).await;
        let on_first: Vec<String> = vms.iter().filter(|vm_id| placed[*vm_id] == 1).cloned().collect();
        let away = on_first[0].clone();
        client.boot_vm(wire::BootVmRequest { vm_id: away.clone(), ..Default::default() }).await.unwrap();
        assert_eq!(next_event_of(&mut watch, &away).await.kind, "booted");

        // host-1 dies; its VMM runs on. Its VM's calls are unavailable naming it, never not_found.
        hosts[1].kill();
        let refused = client.get_vm_info(wire::GetVmInfoRequest { vm_id: away.clone(), ..Default::default() }).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
        assert_eq!(
            refused.message.as_deref(),
            Some(format!("host host-1, which holds VM {away}, cannot be reached; try again when it is back").as_str())
        );
        let listed = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
        assert_eq!(listed.unreachable_hosts, ["host-1"], "the list says it is short");
        assert!(listed.vms.iter().all(|vm| placed[&vm.vm_id] != 1));
        for _ in 0..4 {
            let vm_id = create(&client).await;
            assert_ne!(holders(&hosts).await.get(&vm_id), Some(&1), "new VMs go to the hosts that answer");
            vms.push(vm_id);
        }
        gateway.wait_for_health("host-1", "unreachable").await;

        // While it is away its VM's VMM dies too; back, the host takes over the rest and the watcher learns.
        let vmm = common::vmm_pid(&away).expect("the VMM of the away VM");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        hosts[1].launch();
        gateway.wait_for_health("host-1", "ready").await;
        let told = next_event_of(&mut watch, &away).await;
        assert_eq!((told.kind.as_str(), told.state.as_known()), ("resynced", Some(VmState::VM_STATE_FAILED)), "{told:?}");
        let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: away.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(info.state.as_known(), Some(VmState::VM_STATE_FAILED));
        for vm_id in on_first.iter().skip(1) {
            let info =
                client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(info.state.as_known(), Some(VmState::VM_STATE_CREATED), "taken over: {vm_id}");
        }
        let listed = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
        assert!(listed.unreachable_hosts.is_empty());
        assert_eq!(listed.total_count as usize, vms.len());
        for vm_id in &vms {
            client.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
        assert!(holders(&hosts).await.is_empty());
    });
    drop(rt);
    assert!(gateway.terminate().success(), "{}", gateway.log());
    for mut host in hosts {
        assert!(host.terminate().success());
        assert_eq!(host.leftovers(), Vec::<String>::new());
    }
}

#[test]
fn cordoned_and_draining_hosts_take_nothing_new_and_a_retried_create_makes_one_vm() {
    let test = "cordoned_and_draining_hosts_take_nothing_new_and_a_retried_create_makes_one_vm";
    let Some(hosts) = three_hosts(test) else { return };
    let mut gateway = Gateway::start(&hosts.iter().collect::<Vec<_>>(), GENEROUS_RATES);
    runtime().block_on(async {
        let key = gateway.tenant_with_key("acme", admin::Quota { max_vms: 12, ..Default::default() }).await;
        let client = gateway.client(&key, Wire::ConnectProto);
        let admin = gateway.admin();
        assert_eq!(
            admin.cordon_host(admin::HostRequest { name: "host-0".into(), ..Default::default() }).await.unwrap().into_owned().mode,
            "cordoned"
        );
        assert_eq!(
            admin.drain_host(admin::HostRequest { name: "host-1".into(), ..Default::default() }).await.unwrap().into_owned().mode,
            "draining"
        );
        let mut vms = Vec::new();
        for _ in 0..6 {
            vms.push(create(&client).await);
        }
        assert!(holders(&hosts).await.values().all(|host| *host == 2), "only host-2 takes VMs");
        admin.drain_host(admin::HostRequest { name: "host-2".into(), ..Default::default() }).await.unwrap();
        let nowhere = client.create_vm(create_request(guest_config(&[]))).await.unwrap_err();
        assert_eq!(nowhere.code, ErrorCode::ResourceExhausted);
        assert_eq!(nowhere.message.as_deref(), Some("no host can take this VM: of 3 hosts, 3 cordoned or draining"));
        let refused = admin.remove_host(admin::RemoveHostRequest { name: "host-2".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::FailedPrecondition, "a host that holds VMs is not forgotten: {refused:?}");
        for name in ["host-0", "host-1", "host-2"] {
            admin.uncordon_host(admin::HostRequest { name: name.into(), ..Default::default() }).await.unwrap();
        }

        // A create retried with its idempotency key: the same VM, one VM.
        let once = || connectrpc::client::CallOptions::default().with_header("idempotency-key", "create-web-1");
        let config = guest_config(&["web"]);
        let first = client.create_vm_with_options(create_request(config.clone()), once()).await.unwrap().into_owned();
        let again = client.create_vm_with_options(create_request(config.clone()), once()).await.unwrap().into_owned();
        assert_eq!(first.vm_id, again.vm_id);
        assert_eq!(holders(&hosts).await.len(), 7, "no second VM");
        let other = client.create_vm_with_options(create_request(guest_config(&["db"])), once()).await.unwrap_err();
        assert_eq!(other.code, ErrorCode::FailedPrecondition, "a key reused for another request: {other:?}");

        // The fleet quota: 12 VMs at most, across hosts.
        for _ in 0..5 {
            create(&client).await;
        }
        let over = client.create_vm(create_request(guest_config(&[]))).await.unwrap_err();
        assert_eq!(
            (over.code, over.message.as_deref()),
            (ErrorCode::ResourceExhausted, Some("tenant acme may hold at most 12 VMs across the fleet; it holds 12 and asks for 1 more"))
        );
        for vm_id in holders(&hosts).await.keys() {
            client.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
        let hosts_now = admin.list_hosts(admin::ListHostsRequest::default()).await.unwrap().into_owned().hosts;
        assert!(hosts_now.iter().all(|host| host.placed_vms == 0 && host.health == "ready"), "{hosts_now:?}");
    });
    assert!(gateway.terminate().success(), "{}", gateway.log());
    for mut host in hosts {
        assert!(host.terminate().success());
        assert_eq!(host.leftovers(), Vec::<String>::new());
    }
}

#[test]
fn a_fast_caller_is_told_when_to_come_back_and_rubbish_changes_nothing() {
    let test = "a_fast_caller_is_told_when_to_come_back_and_rubbish_changes_nothing";
    let Some(host) = Host::start(test, HostOptions { gateway: true, gateway_default_quota: Some("{}"), ..HostOptions::default() }) else {
        return;
    };
    let mut gateway = Gateway::start(&[&host], "[rate_limits]\nreads = { per_second = 1, burst = 3 }");
    runtime().block_on(async {
        let key = gateway.tenant_with_key("acme", admin::Quota::default()).await;
        let client = gateway.client(&key, Wire::ConnectJson);
        let mut refused = None;
        for _ in 0..10 {
            if let Err(error) = client.list_vms(wire::ListVmsRequest::default()).await {
                refused = Some(error);
                break;
            }
        }
        let refused = refused.expect("the fourth read at once is over the burst");
        assert_eq!(refused.code, ErrorCode::ResourceExhausted);
        assert!(refused.message.as_deref().unwrap().starts_with("rate limit: this API key may make 1 reads per second"), "{refused:?}");
        let retry_after: u64 = refused.response_headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry_after >= 1);
        assert_eq!(refused.response_headers()["ratelimit-remaining"], "0");
        // Over HTTP, as any client sees it: 429.
        let headers = [("content-type", "application/json"), ("authorization", &format!("Bearer {key}") as &str)];
        let (status, _) = http_request(gateway.port, "POST", "/vmprovisioner.v1.VmService/ListVms", &headers, b"{}").unwrap();
        assert_eq!(status, 429);
        // Back once the wait passes: waits for the fact, the call let in.
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.list_vms(wire::ListVmsRequest::default()).await.is_err() {
            assert!(Instant::now() < deadline, "still refused after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            gateway.admin().list_tenants(admin::ListTenantsRequest::default()).await.unwrap().into_owned().tenants.len(),
            1,
            "the admin service has no such limit"
        );

        // Rubbish: each told so clearly, the gateway alive, nothing made.
        let auth = format!("Bearer {key}");
        let json = [("content-type", "application/json"), ("authorization", auth.as_str())];
        let (status, body) = http_request(gateway.port, "POST", "/vmprovisioner.v1.VmService/CreateVm", &json, b"{not json").unwrap();
        assert!(status == 400 && body.contains("invalid_argument"), "{status} {body}");
        let big = vec![b'x'; 2 << 20];
        let (status, body) =
            http_request(gateway.port, "POST", "/vmprovisioner.v1.VmService/CreateVm", &json, &big).unwrap_or((0, String::new()));
        assert!(status == 429 || status == 0, "an oversized body is refused: {status} {body}");
        let (status, _) = http_request(gateway.port, "POST", "/vmprovisioner.v1.VmService/NoSuchMethod", &json, b"{}").unwrap();
        assert_eq!(status, 404);
        let forged = [
            ("content-type", "application/json"),
            ("authorization", "Bearer mdk_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000"),
        ];
        let (status, body) = http_request(gateway.port, "POST", "/vmprovisioner.v1.VmService/CreateVm", &forged, b"{}").unwrap();
        assert!(status == 401 && body.contains("the API key is not valid"), "{status} {body}");
        let admin_with_key = [("content-type", "application/json"), ("authorization", auth.as_str())];
        let (status, body) = http_request(gateway.port, "POST", "/gateway.v1.AdminService/ListTenants", &admin_with_key, b"{}").unwrap();
        assert!(status == 401 && body.contains("AdminService takes only the gateway's admin token"), "{status} {body}");
        let mut bad = guest_config(&[]);
        bad.cpu.get_or_insert_default().vcpu_count = 0;
        let invalid = client.create_vm(create_request(bad)).await.unwrap_err();
        assert_eq!(
            (invalid.code, invalid.message.as_deref()),
            (ErrorCode::InvalidArgument, Some("cpu.vcpu_count: 0 is below the minimum of 1"))
        );
        assert!(gateway.alive());
        assert!(holders(std::slice::from_ref(&host)).await.is_empty(), "nothing was made");
    });
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let mut host = host;
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

#[test]
fn a_vm_its_host_lost_is_failed_and_one_the_store_does_not_know_is_reported() {
    let test = "a_vm_its_host_lost_is_failed_and_one_the_store_does_not_know_is_reported";
    let Some(host) = Host::start(test, HostOptions { gateway: true, gateway_default_quota: Some("{}"), ..HostOptions::default() }) else {
        return;
    };
    let mut gateway = Gateway::start(&[&host], GENEROUS_RATES);
    runtime().block_on(async {
        let key = gateway.tenant_with_key("acme", admin::Quota::default()).await;
        let client = gateway.client(&key, Wire::Grpc);
        let placed = create(&client).await;
        // Behind the gateway's back: the VM deleted on its host, another made there.
        let direct = host.client("acme", Wire::ConnectProto);
        direct.delete_vm(wire::DeleteVmRequest { vm_id: placed.clone(), force: true, ..Default::default() }).await.unwrap();
        let stray = create(&direct).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let info = loop {
            let info =
                client.get_vm_info(wire::GetVmInfoRequest { vm_id: placed.clone(), ..Default::default() }).await.unwrap().into_owned();
            if info.state.as_known() == Some(VmState::VM_STATE_FAILED) {
                break info;
            }
            assert!(Instant::now() < deadline, "the lost VM is not marked: {info:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(info.failure_reason, "lost: host host-0 answers and no longer has this VM");
        let boot = client.boot_vm(wire::BootVmRequest { vm_id: placed.clone(), ..Default::default() }).await.unwrap_err();
        assert_eq!(boot.code, ErrorCode::FailedPrecondition);
        let strays = loop {
            let strays = gateway.admin().list_stray_vms(admin::ListStrayVmsRequest::default()).await.unwrap().into_owned().vms;
            if !strays.is_empty() {
                break strays;
            }
            assert!(Instant::now() < deadline, "the stray VM is not reported");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            strays.iter().map(|vm| (vm.host.as_str(), vm.vm_id.as_str(), vm.customer_id.as_str())).collect::<Vec<_>>(),
            [("host-0", stray.as_str(), "acme")]
        );
        // A tenant's list holds its lost VM, failed, and not the stray, which the gateway does not adopt.
        let listed = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
        assert_eq!(
            listed.vms.iter().map(|vm| (vm.vm_id.as_str(), vm.state.as_known())).collect::<Vec<_>>(),
            [(placed.as_str(), Some(VmState::VM_STATE_FAILED))]
        );
        let metrics = common::http_get(gateway.port, "/metrics").unwrap().1;
        assert!(metrics.lines().any(|line| line == "metald_gateway_stray_vms 1"), "{metrics}");
        client.delete_vm(wire::DeleteVmRequest { vm_id: placed.clone(), ..Default::default() }).await.unwrap();
        assert_eq!(client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().total_count, 0, "the lost VM is forgotten");
        direct.delete_vm(wire::DeleteVmRequest { vm_id: stray, force: true, ..Default::default() }).await.unwrap();
    });
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let mut host = host;
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
