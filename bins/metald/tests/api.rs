//! The API end to end: a real metald (jailer on, Firecracker on /dev/kvm)
//! driven with the generated Rust client over Connect-JSON and gRPC, and
//! with raw HTTP for what no client would send.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Host, HostOptions, Wire, create_request, guest_config, state_of, wait_for_console};
use connectrpc::ErrorCode;
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn id(vm_id: &str) -> String {
    vm_id.to_owned()
}

#[test]
fn the_whole_lifecycle_over_connect_json_and_grpc() {
    let test = "the_whole_lifecycle_over_connect_json_and_grpc";
    let Some(host) = Host::start(test, HostOptions { network: true, billing: true, ..HostOptions::default() }) else { return };
    runtime().block_on(async {
        for wire_format in [Wire::ConnectJson, Wire::Grpc] {
            let client = host.client("acme", wire_format);
            let mut watch = client.watch_vms(wire::WatchVmsRequest::default()).await.expect("WatchVms");

            let mut config = guest_config(&[&metald_testguest::cmdline::heartbeat_ms(100)]);
            config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
            config.metadata.insert("purpose".into(), format!("{wire_format:?}"));
            let created = client.create_vm(create_request(config)).await.expect("CreateVm").into_owned();
            assert_eq!(created.state.as_known(), Some(VmState::VM_STATE_CREATED), "{wire_format:?}");
            let vm_id = created.vm_id.clone();

            let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(info.customer_id, "acme");
            let network = info.network_info.as_option().expect("network facts in VM info");
            assert!(network.ipv6_address.starts_with("fd6d:7465:7374:"), "{network:?}");
            assert!(!network.ipv6_gateway.is_empty() && !network.mac_address.is_empty() && !network.tap_device.is_empty(), "{network:?}");

            let booted = client.boot_vm(wire::BootVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(booted.state.as_known(), Some(VmState::VM_STATE_RUNNING));
            let ready = wait_for_console(&client, &vm_id, metald_testguest::console::READY).await;
            assert!(ready.contains("metald."), "the guest is told its network on the command line: {ready}");
            let console =
                client.get_console(wire::GetConsoleRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            let console = String::from_utf8_lossy(&console.data).into_owned();
            assert!(!console.contains("Firecracker") && !console.contains("API"), "only the guest's output: {console}");
            wait_for_console(&client, &vm_id, metald_testguest::console::HEARTBEAT).await;

            let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(info.state.as_known(), Some(VmState::VM_STATE_RUNNING));
            let metrics = info.metrics.as_option().expect("live metrics while running");
            assert!(metrics.memory_usage_bytes > 0, "{metrics:?}");
            assert!(info.booted_timestamp >= info.created_timestamp && info.booted_timestamp > 0);
            assert_eq!(info.backend_info.get("vmm").map(String::as_str), Some("firecracker"));
            let capabilities = (info.backend_info["vmm_capabilities"].as_str(), info.backend_info["vmm_max_vcpus"].as_str());
            assert_eq!(capabilities, ("graceful_shutdown,pause,separate_rx_tx_rate_limits", "32"), "what Firecracker can do");
            let vmm = info.config.as_option().map(|config| config.vmm.as_str());
            assert_eq!(vmm, Some("firecracker"), "a VM created naming no VMM runs on the host's default, and its configuration says so");

            let paused = client.pause_vm(wire::PauseVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(paused.state.as_known(), Some(VmState::VM_STATE_PAUSED));
            let again = client.pause_vm(wire::PauseVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap_err();
            assert_eq!(again.code, ErrorCode::FailedPrecondition);
            assert!(again.message.as_deref().unwrap_or("").contains("is Paused"), "{again:?}");
            // Booting a paused VM is refused (it is a resume), and the VM stays as it was.
            let boot_paused = client.boot_vm(wire::BootVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap_err();
            assert_eq!(boot_paused.code, ErrorCode::FailedPrecondition);
            assert!(boot_paused.message.as_deref().unwrap_or("").contains("is Paused"), "{boot_paused:?}");
            assert_eq!(state_of(&client, &vm_id).await, VmState::VM_STATE_PAUSED);
            let resumed = client.resume_vm(wire::ResumeVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(resumed.state.as_known(), Some(VmState::VM_STATE_RUNNING));

            let rebooted = client.reboot_vm(wire::RebootVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(rebooted.state.as_known(), Some(VmState::VM_STATE_RUNNING));

            let stopped = client
                .shutdown_vm(wire::ShutdownVmRequest { vm_id: id(&vm_id), timeout_seconds: 10, ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            assert_eq!(stopped.state.as_known(), Some(VmState::VM_STATE_SHUTDOWN));
            let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(info.last_exit, "exited with code 0", "a graceful shutdown: {info:?}");
            client.boot_vm(wire::BootVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap();
            assert_eq!(state_of(&client, &vm_id).await, VmState::VM_STATE_RUNNING);

            let list = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
            assert_eq!((list.total_count, list.vms.len()), (1, 1));
            assert_eq!(list.vms[0].metadata.get("purpose").map(String::as_str), Some(format!("{wire_format:?}").as_str()));

            client.delete_vm(wire::DeleteVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap();
            let gone = client.get_vm_info(wire::GetVmInfoRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap_err();
            assert_eq!(gone.code, ErrorCode::NotFound);

            let mut kinds = Vec::new();
            while kinds.last().map(|(kind, _): &(String, VmState)| kind.as_str()) != Some("deleted") {
                let event = tokio::time::timeout(Duration::from_secs(10), watch.message())
                    .await
                    .expect("an event")
                    .unwrap()
                    .expect("the stream goes on");
                let event = event.to_owned_message();
                assert_eq!(event.vm_id, vm_id);
                kinds.push((event.kind.clone(), event.state.as_known().unwrap_or(VmState::VM_STATE_UNSPECIFIED)));
            }
            let names: Vec<&str> = kinds.iter().map(|(kind, _)| kind.as_str()).collect();
            assert_eq!(
                names,
                ["created", "booted", "paused", "resumed", "rebooted", "stopped", "booted", "stopped", "deleted"],
                "{wire_format:?}"
            );
        }
    });
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

fn code_and_message(error: connectrpc::ConnectError) -> (ErrorCode, String) {
    (error.code, error.message.unwrap_or_default())
}

#[test]
fn tenants_see_and_touch_only_their_own_vms_within_their_quotas() {
    let test = "tenants_see_and_touch_only_their_own_vms_within_their_quotas";
    let options = HostOptions {
        tenants: vec![("acme", "{ max_vms = 2, max_vcpus = 2 }"), ("globex", "{ max_memory_bytes = 67108864 }")],
        gateway: true,
        ..HostOptions::default()
    };
    let Some(host) = Host::start(test, options) else { return };
    runtime().block_on(async {
        let acme = host.client("acme", Wire::ConnectProto);
        let globex = host.client("globex", Wire::ConnectJson);
        let acme_vm = common::boot_guest(&acme, &[]).await;

        // Another tenant's VM is answered exactly like one that does not exist.
        let missing = code_and_message(
            globex.get_vm_info(wire::GetVmInfoRequest { vm_id: "vm-missing".into(), ..Default::default() }).await.unwrap_err(),
        );
        let foreign = code_and_message(
            globex.get_vm_info(wire::GetVmInfoRequest { vm_id: acme_vm.clone(), ..Default::default() }).await.unwrap_err(),
        );
        assert_eq!(foreign.0, ErrorCode::NotFound);
        assert_eq!(foreign.1.replace(&acme_vm, "ID"), missing.1.replace("vm-missing", "ID"), "the same answer as for a missing VM");
        let refusals = [
            globex.boot_vm(wire::BootVmRequest { vm_id: acme_vm.clone(), ..Default::default() }).await.err().map(|e| e.code),
            globex.pause_vm(wire::PauseVmRequest { vm_id: acme_vm.clone(), ..Default::default() }).await.err().map(|e| e.code),
            globex
                .shutdown_vm(wire::ShutdownVmRequest { vm_id: acme_vm.clone(), force: true, ..Default::default() })
                .await
                .err()
                .map(|e| e.code),
            globex
                .delete_vm(wire::DeleteVmRequest { vm_id: acme_vm.clone(), force: true, ..Default::default() })
                .await
                .err()
                .map(|e| e.code),
            globex.get_console(wire::GetConsoleRequest { vm_id: acme_vm.clone(), ..Default::default() }).await.err().map(|e| e.code),
            // A stream carries its error at its end, after the headers.
            match globex.watch_vms(wire::WatchVmsRequest { vm_id: acme_vm.clone(), ..Default::default() }).await {
                Ok(mut stream) => stream.message().await.err().map(|e| e.code),
                Err(error) => Some(error.code),
            },
        ];
        assert!(refusals.iter().all(|code| *code == Some(ErrorCode::NotFound)), "{refusals:?}");
        assert_eq!(state_of(&acme, &acme_vm).await, VmState::VM_STATE_RUNNING, "untouched by the other tenant");
        assert_eq!(globex.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().total_count, 0);
        let impersonation = wire::CreateVmRequest { customer_id: "acme".into(), ..create_request(guest_config(&[])) };
        assert_eq!(globex.create_vm(impersonation).await.unwrap_err().code, ErrorCode::PermissionDenied);

        // Quotas: acme may hold 2 VMs and 2 vCPUs; globex 64 MiB.
        let mut two_vcpus = guest_config(&[]);
        two_vcpus.cpu.get_or_insert_default().vcpu_count = 2;
        let (code, message) = code_and_message(acme.create_vm(create_request(two_vcpus)).await.unwrap_err());
        assert_eq!(code, ErrorCode::ResourceExhausted);
        assert!(message.contains("2 vCPUs"), "{message}");
        let second = acme.create_vm(create_request(guest_config(&[]))).await.unwrap().into_owned().vm_id;
        let (code, message) = code_and_message(acme.create_vm(create_request(guest_config(&[]))).await.unwrap_err());
        assert_eq!(code, ErrorCode::ResourceExhausted);
        assert!(message.contains("at most 2 VMs"), "{message}");
        globex.create_vm(create_request(guest_config(&[]))).await.unwrap();
        globex.create_vm(create_request(guest_config(&[]))).await.unwrap();
        assert_eq!(globex.create_vm(create_request(guest_config(&[]))).await.unwrap_err().code, ErrorCode::ResourceExhausted);

        // Creates racing for the last place: exactly one gets it.
        acme.delete_vm(wire::DeleteVmRequest { vm_id: second, ..Default::default() }).await.unwrap();
        let racers = (0..4).map(|_| {
            let client = host.client("acme", Wire::ConnectProto);
            async move { client.create_vm(create_request(guest_config(&[]))).await.map(|_| ()).map_err(|error| error.code) }
        });
        let outcomes = futures::future::join_all(racers).await;
        assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 1, "{outcomes:?}");
        assert!(outcomes.iter().all(|outcome| *outcome == Ok(()) || *outcome == Err(ErrorCode::ResourceExhausted)), "{outcomes:?}");

        // Calls without a valid credential.
        let anonymous = host.client_with_token(None, Wire::ConnectJson);
        assert_eq!(anonymous.list_vms(wire::ListVmsRequest::default()).await.unwrap_err().code, ErrorCode::Unauthenticated);
        let forged = host.client_with_token(Some("not-a-token"), Wire::Grpc);
        assert_eq!(forged.list_vms(wire::ListVmsRequest::default()).await.unwrap_err().code, ErrorCode::Unauthenticated);

        // Through the gateway: a signed tenant is taken, a forged or stale signature is not.
        let procedure = "/vmprovisioner.v1.VmService/ListVms";
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let signed_headers = |tenant: &str, at: u64, secret: &str, body: &[u8]| {
            let nonce = metald_core::VmId::generate().to_string();
            let digest = metald_api::gateway_auth::body_digest(Some(body));
            let call = metald_api::gateway_auth::SignedCall { tenant, unix_seconds: at, procedure, nonce: &nonce, body_sha256: &digest };
            let signature = metald_api::gateway_auth::GatewaySecret::new(secret.as_bytes().to_vec()).sign(&call);
            vec![
                ("content-type", "application/json".to_owned()),
                ("x-metald-tenant", tenant.to_owned()),
                ("x-metald-gateway-timestamp", at.to_string()),
                ("x-metald-gateway-nonce", nonce),
                ("x-metald-gateway-signature", signature),
            ]
        };
        let send = |headers: &[(&str, String)], body: &[u8]| {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
            common::http_request(host.port, "POST", procedure, &headers, body).unwrap()
        };
        let gateway_call = |tenant: &str, at: u64, secret: &str| send(&signed_headers(tenant, at, secret, b"{}"), b"{}");
        let (status, body) = gateway_call("acme", now, common::GATEWAY_SECRET);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&acme_vm), "the gateway's tenant sees its VMs: {body}");
        let (status, body) = gateway_call("acme", now, "a forged secret that is long enough!!");
        assert_eq!(status, 401, "{body}");
        let (status, body) = gateway_call("acme", now - 600, common::GATEWAY_SECRET);
        assert!(status == 401 && body.contains("clock"), "{status} {body}");
        let (status, body) = gateway_call("initech", now, common::GATEWAY_SECRET);
        assert!(status == 200 && body.trim() == "{}", "a new gateway tenant sees nothing: {status} {body}");
        // Captured headers are taken once, and hold for their own body only.
        let captured = signed_headers("acme", now, common::GATEWAY_SECRET, b"{}");
        assert_eq!(send(&captured, b"{}").0, 200);
        let (status, body) = send(&captured, b"{}");
        assert!(status == 401 && body.contains("already taken"), "the same request again: {status} {body}");
        let captured = signed_headers("acme", now, common::GATEWAY_SECRET, b"{}");
        let (status, body) = send(&captured, br#"{"pageSize": 1}"#);
        assert!(status == 401 && body.contains("does not verify"), "another body: {status} {body}");
    });
}

#[test]
fn bad_requests_get_clear_errors_and_leave_the_daemon_unharmed() {
    let test = "bad_requests_get_clear_errors_and_leave_the_daemon_unharmed";
    let Some(mut host) = Host::start(test, HostOptions { max_body_bytes: Some(64 << 10), ..HostOptions::default() }) else { return };
    let token = format!("Bearer {}", host.token("acme"));
    let call = |content_type: &str, body: &[u8]| {
        let headers = [("authorization", token.as_str()), ("content-type", content_type)];
        common::http_request(host.port, "POST", "/vmprovisioner.v1.VmService/CreateVm", &headers, body).unwrap()
    };
    let (status, body) = call("application/json", b"{\"config\": {\"cpu\": ");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_argument") && body.contains("JSON"), "malformed JSON: {body}");
    let (status, body) = call("application/json", b"{\"config\": {\"cpu\": {\"vcpuCount\": \"many\"}}}");
    assert!(status == 400 && body.contains("invalid_argument"), "a wrong type: {status} {body}");
    let (status, body) = call("application/json", b"{\"config\": {\"network\": [{\"id\": \"eth0\", \"mode\": \"NETWORK_MODE_BRIDGED\"}]}}");
    assert!(status == 400 && body.contains("invalid_argument"), "an enum value the contract lacks: {status} {body}");
    assert!(body.contains("NETWORK_MODE_BRIDGED"), "names the value: {body}");
    let headers = [("content-type", "application/json"), ("authorization", token.as_str())];
    let (status, body) =
        common::http_request(host.port, "POST", "/vmprovisioner.v1.VmService/ListVms", &headers, b"{\"stateFilter\": [\"RUNNING\"]}")
            .unwrap();
    assert!(status == 400 && body.contains("invalid_argument"), "an enum value the contract lacks: {status} {body}");
    assert!(body.contains("\\\"RUNNING\\\" is not a value of this enum field") && body.contains("VM_STATE_RUNNING"), "{body}");
    let (status, body) = call("application/proto", &[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    assert!(status == 400 && body.contains("invalid_argument"), "malformed protobuf: {status} {body}");
    let (status, body) = call("text/plain", b"hello");
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("unsupported content type") && body.contains("application/json"), "{body}");
    let big = vec![b' '; 128 << 10];
    let (status, body) = call("application/json", &big);
    assert!(status == 429 && body.contains("resource_exhausted") && body.contains("limit"), "an oversized body: {status} {body}");
    let (status, body) = call("application/grpc", &[0, 0, 0, 0, 9, 1, 2]);
    assert!(status == 200 || status == 400, "a truncated gRPC frame: {status} {body}");

    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectJson);
        let refused = |config: wire::VmConfig| {
            let client = &client;
            async move { code_and_message(client.create_vm(create_request(config)).await.unwrap_err()) }
        };
        let mut too_many = guest_config(&[]);
        too_many.cpu.get_or_insert_default().vcpu_count = 99;
        assert_eq!(
            refused(too_many).await,
            (ErrorCode::InvalidArgument, "cpu.vcpu_count: 99 is more than the firecracker backend allows (32)".into())
        );
        let mut unoffered = guest_config(&[]);
        unoffered.vmm = "cloud-hypervisor".into();
        assert_eq!(
            refused(unoffered).await,
            (ErrorCode::InvalidArgument, "vmm: \"cloud-hypervisor\" is not offered by this host; it offers firecracker".into())
        );
        let mut escape = guest_config(&[]);
        escape.storage.push(wire::StorageDevice { id: "data".into(), path: "../../etc/shadow".into(), ..Default::default() });
        let (code, message) = refused(escape).await;
        assert!(code == ErrorCode::InvalidArgument && message.starts_with("storage[0].path:"), "{code:?} {message}");
        let mut missing_kernel = guest_config(&[]);
        missing_kernel.boot.get_or_insert_default().kernel_path = "nope.elf".into();
        let (code, message) = refused(missing_kernel).await;
        assert!(code == ErrorCode::InvalidArgument && message.starts_with("boot.kernel_path:"), "{code:?} {message}");
        assert!(!message.contains(host.dir.path().to_str().unwrap()), "no host path leaks: {message}");
        let mut interface = guest_config(&[]);
        interface.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
        let (code, message) = refused(interface).await;
        assert!(code == ErrorCode::InvalidArgument && message.starts_with("network[0]"), "no network on this host: {code:?} {message}");
        let bad_page = client.list_vms(wire::ListVmsRequest { page_token: "zz".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(bad_page.code, ErrorCode::InvalidArgument);
        let negative =
            client.shutdown_vm(wire::ShutdownVmRequest { vm_id: "vm-x".into(), timeout_seconds: -1, ..Default::default() }).await;
        assert_eq!(negative.unwrap_err().code, ErrorCode::NotFound, "the VM is checked first");

        // Still serving, and nothing was made for any of it.
        assert_eq!(client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().total_count, 0);
    });
    assert!(host.alive(), "metald survived");
    assert_eq!(common::http_get(host.port, "/health").map(|(status, _)| status), Some(200));
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

#[test]
fn a_silent_vmm_is_unavailable_and_a_taken_id_already_exists() {
    let test = "a_silent_vmm_is_unavailable_and_a_taken_id_already_exists";
    let Some(host) = Host::start(test, HostOptions { vmm_api_timeout_seconds: Some(5), ..HostOptions::default() }) else { return };
    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let vm_id = common::boot_guest(&client, &[]).await;
        let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap().into_owned();
        assert!(!info.backend_info.contains_key("pid"), "host pids are the operator's business: {:?}", info.backend_info);
        let vmm = nix::unistd::Pid::from_raw(common::vmm_pid(&vm_id).unwrap() as i32);
        // A VMM that stops answering (here: stopped by a signal) makes the call unavailable, not internal.
        nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let silent = client.pause_vm(wire::PauseVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.unwrap_err();
        nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGCONT).unwrap();
        assert_eq!(silent.code, ErrorCode::Unavailable, "{silent:?}");
        assert!(silent.message.as_deref().unwrap_or("").contains("did not answer"), "{silent:?}");
        assert_eq!(state_of(&client, &vm_id).await, VmState::VM_STATE_RUNNING, "a later call may succeed");
        client.pause_vm(wire::PauseVmRequest { vm_id: id(&vm_id), ..Default::default() }).await.expect("the VMM answers again");
        let metrics = common::http_get(host.port, "/metrics").unwrap().1;
        assert!(metrics.contains("metald_backend_errors_total{operation=\"pause\"} 1"), "{metrics}");
        assert!(metrics.contains("metald_rpc_duration_seconds_count{method=\"PauseVm\",code=\"unavailable\"} 1"), "{metrics}");

        let named = wire::CreateVmRequest { vm_id: "vm-named-once".into(), ..create_request(guest_config(&[])) };
        client.create_vm(named.clone()).await.unwrap();
        let (code, message) = code_and_message(client.create_vm(named).await.unwrap_err());
        assert_eq!((code, message.as_str()), (ErrorCode::AlreadyExists, "VM vm-named-once already exists"));
        for vm_id in [vm_id, "vm-named-once".to_owned()] {
            client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
        }
    });
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

/// A gateway reads the host's capacity (and only a gateway, for itself);
/// a create beyond it is `resource_exhausted` saying so, and made nothing.
#[test]
fn the_host_tells_a_gateway_its_capacity_and_refuses_a_create_beyond_it() {
    let test = "the_host_tells_a_gateway_its_capacity_and_refuses_a_create_beyond_it";
    let options = HostOptions {
        gateway: true,
        gateway_default_quota: Some("{}"),
        capacity: Some("vms = 2\nvcpus = 3\nmemory_bytes = 1073741824"),
        ..HostOptions::default()
    };
    let Some(host) = Host::start(test, options) else { return };
    runtime().block_on(async {
        const PROCEDURE: &str = "/vmprovisioner.v1.HostService/GetHostCapacity";
        let capacity_service = host.host_service_client(None);
        let read = || async {
            capacity_service
                .get_host_capacity_with_options(
                    wire::GetHostCapacityRequest::default(),
                    common::gateway_signed("", PROCEDURE, &wire::GetHostCapacityRequest::default()),
                )
                .await
                .unwrap()
                .into_owned()
        };
        let counts = |answer: &wire::GetHostCapacityResponse| {
            let pair = |capacity: Option<&wire::Capacity>| capacity.map(|c| (c.total, c.used)).unwrap();
            (pair(answer.vms.as_option()), pair(answer.vcpus.as_option()), pair(answer.memory_bytes.as_option()))
        };
        let empty = read().await;
        assert_eq!(counts(&empty), ((2, 0), (3, 0), (1 << 30, 0)));
        assert_eq!(empty.vmms, ["firecracker"]);

        let refused = capacity_service
            .get_host_capacity_with_options(
                wire::GetHostCapacityRequest::default(),
                common::gateway_signed("acme", PROCEDURE, &wire::GetHostCapacityRequest::default()),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::PermissionDenied, "a call signed for a tenant is not the gateway's own: {refused:?}");
        let tenant = host.client("acme", Wire::ConnectProto);
        let as_tenant = host.host_service_client(Some(host.token("acme")));
        let refused = as_tenant.get_host_capacity(wire::GetHostCapacityRequest::default()).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthenticated, "a tenant's token opens no HostService call: {refused:?}");

        let mut two_vcpus = guest_config(&[]);
        two_vcpus.cpu.get_or_insert_default().vcpu_count = 2;
        tenant.create_vm(create_request(two_vcpus.clone())).await.unwrap();
        assert_eq!(counts(&read().await), ((2, 1), (3, 2), (1 << 30, 32 << 20)));
        let beyond = tenant.create_vm(create_request(two_vcpus)).await.unwrap_err();
        assert_eq!(beyond.code, ErrorCode::ResourceExhausted);
        assert_eq!(
            beyond.message.as_deref(),
            Some("this host has room for 3 vCPUs in all and 2 are taken; the VM asks for 2: create it on another host")
        );
        tenant.create_vm(create_request(guest_config(&[]))).await.unwrap();
        let full = tenant.create_vm(create_request(guest_config(&[]))).await.unwrap_err();
        assert_eq!(
            full.message.as_deref(),
            Some("this host has room for 2 VMs in all and 2 are taken; the VM asks for 1: create it on another host")
        );
        assert_eq!(counts(&read().await), ((2, 2), (3, 3), (1 << 30, 64 << 20)));
    });
}
