//! Traces leave over OTLP/HTTP when an endpoint is configured: a span per
//! API call and one per VM operation under it, each naming the VM and the
//! tenant, and the steps of a create (network attach, VMM launch, network
//! settle) under its span. The receiver here is a plain HTTP listener on loopback that
//! keeps what metald's OTLP exporter posts (protobuf, whose strings are
//! plain bytes, so the names can be found in it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::otlp::otlp_receiver;
use common::{Host, HostOptions, Wire};

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
}

#[test]
fn calls_and_vm_operations_are_traced_over_otlp_with_vm_and_tenant() {
    let test = "calls_and_vm_operations_are_traced_over_otlp_with_vm_and_tenant";
    let (url, received) = otlp_receiver();
    let Some(mut host) = Host::start(test, HostOptions { otlp_endpoint: Some(url), network: true, ..HostOptions::default() }) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let vm_id = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let mut config = common::guest_config(&[]);
        config.network.push(metald_api::proto::vmprovisioner::v1::NetworkInterface { id: "eth0".into(), ..Default::default() });
        let vm_id = common::boot_config(&client, config).await;
        client
            .delete_vm(metald_api::proto::vmprovisioner::v1::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() })
            .await
            .unwrap();
        vm_id
    });
    // Stopping flushes the exporter's batch.
    assert!(host.terminate().success());
    let posts = received.lock().unwrap().clone();
    assert!(!posts.is_empty(), "nothing exported; log:\n{}", host.log());
    assert!(
        posts.iter().all(|(request, _)| request.starts_with("POST /v1/traces") && request.contains("application/x-protobuf")),
        "{posts:?}"
    );
    let exported: Vec<u8> = posts.into_iter().flat_map(|(_, body)| body).collect();
    for name in [
        "/vmprovisioner.v1.VmService/CreateVm",
        "/vmprovisioner.v1.VmService/BootVm",
        "vm.create",
        "vm.network.attach",
        "vm.launch",
        "vm.network.settle",
        "vm.boot",
        "vm.delete",
        "metald",
    ] {
        assert!(contains(&exported, name), "no {name:?} in the exported spans");
    }
    assert!(contains(&exported, &vm_id) && contains(&exported, "acme"), "spans carry the VM and the tenant");
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
