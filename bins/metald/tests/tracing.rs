//! Traces leave over OTLP/HTTP when an endpoint is configured: a span per
//! API call and one per VM operation under it, each naming the VM and the
//! tenant. The receiver here is a plain HTTP listener on loopback that
//! keeps what metald's OTLP exporter posts (protobuf, whose strings are
//! plain bytes, so the names can be found in it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::{Host, HostOptions, Wire};

/// Each post: its request line and content type, and its body.
type Posts = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Accepts OTLP/HTTP posts and keeps their bodies.
fn otlp_receiver() -> (String, Posts) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            let mut content_type = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(value) = lower.strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if let Some(value) = lower.strip_prefix("content-type:") {
                    content_type = value.trim().to_owned();
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            keep.lock().unwrap().push((format!("{} {content_type}", request_line.trim()), body));
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, received)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
}

#[test]
fn calls_and_vm_operations_are_traced_over_otlp_with_vm_and_tenant() {
    let test = "calls_and_vm_operations_are_traced_over_otlp_with_vm_and_tenant";
    let (url, received) = otlp_receiver();
    let Some(mut host) = Host::start(test, HostOptions { otlp_endpoint: Some(url), ..HostOptions::default() }) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let vm_id = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let vm_id = common::boot_guest(&client, &[]).await;
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
    for name in
        ["/vmprovisioner.v1.VmService/CreateVm", "/vmprovisioner.v1.VmService/BootVm", "vm.create", "vm.boot", "vm.delete", "metald"]
    {
        assert!(contains(&exported, name), "no {name:?} in the exported spans");
    }
    assert!(contains(&exported, &vm_id) && contains(&exported, "acme"), "spans carry the VM and the tenant");
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
