//! TLS on both sides of a real gateway, with certificates made at test
//! time: a real metald host that takes gateway calls only over mTLS, a
//! gateway that calls it with its client certificate and serves its own
//! public port over TLS, that port's certificate reloaded on SIGHUP under
//! an open stream, and each way of getting it wrong refused, with the
//! reason in a log: a client certificate of another CA, an expired one,
//! plain HTTP, a host certificate the gateway does not trust, and a signed
//! call over TLS without a client certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod certs;
#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod gateway;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use certs::{Ca, Issued, trusting};
use common::{Host, HostOptions, HostTls, Wire, create_request, gateway_signed, guest_config, wait_for_console};
use connectrpc::ErrorCode;
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;

const GENEROUS_RATES: &str = "[rate_limits]\nreads = { per_second = 10000, burst = 10000 }\n\
                              mutations = { per_second = 10000, burst = 10000 }\ncreates = { per_second = 10000, burst = 10000 }\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn hosts_tls(ca_file: &Path, client: &Issued) -> String {
    format!("[hosts_tls]\nca_file = {ca_file:?}\ncert_file = {:?}\nkey_file = {:?}\n", client.cert_file, client.key_file)
}

/// Waits until `log()` holds a line with every one of `words`, and answers that line.
async fn logged(what: &str, log: impl Fn() -> String, words: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(line) = log().lines().find(|line| words.iter().all(|word| line.contains(word))) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "{what}: no line with {words:?} within 60 s:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health_of(gateway: &Gateway) -> String {
    let hosts = gateway.admin().list_hosts(admin::ListHostsRequest::default()).await.unwrap().into_owned().hosts;
    hosts[0].health.clone()
}

#[test]
fn hosts_take_gateway_calls_only_over_mutual_tls_and_the_public_port_reloads_its_certificate() {
    let test = "hosts_take_gateway_calls_only_over_mutual_tls_and_the_public_port_reloads_its_certificate";
    let files = tempfile::Builder::new().prefix("metald-test-certs-").tempdir().unwrap();
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = files.path();
    let (ca, other_ca) = (Ca::new("metald test CA"), Ca::new("another CA"));
    let ca_file = ca.write(dir, "ca.crt");
    let other_ca_file = other_ca.write(dir, "other-ca.crt");
    let year = time::Duration::days(365);
    let host_cert = ca.issue(dir, "host", year);
    let gateway_cert = ca.issue(dir, "gateway", year);
    let tls = Some(HostTls { cert_file: host_cert.cert_file, key_file: host_cert.key_file, client_ca_file: Some(ca_file.clone()) });
    let options = HostOptions { tls, ..gateway::fleet_host_options() };
    let Some(mut host) = Host::start(test, options) else { return };
    let https = vec![format!("https://127.0.0.1:{}", host.port)];
    let public = ca.issue(dir, "public", year);
    let public_tls = format!("[api.tls]\ncert_file = {:?}\nkey_file = {:?}\n", public.cert_file, public.key_file);
    let mut good = Gateway::start_on(&https, &format!("{GENEROUS_RATES}{}{public_tls}", hosts_tls(&ca_file, &gateway_cert)));
    good.client_tls = Some(trusting(&ca.pem));

    runtime().block_on(async {
        // The right certificates: the whole way is TLS, and the lifecycle works.
        good.wait_for_health("host-0", "ready").await;
        let key = good.tenant_with_key("acme", admin::Quota::default()).await;
        let client = good.client(&key, Wire::ConnectProto);
        let mut watch = client.watch_vms(wire::WatchVmsRequest::default()).await.expect("a stream over TLS");
        let vm_id = client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm over mTLS").into_owned().vm_id;
        client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
        wait_for_console(&client, &vm_id, metald_testguest::console::READY).await;

        // The public certificate replaced and SIGHUP: new connections get the new one, the open stream goes on.
        let renewed = other_ca.issue(dir, "renewed", year);
        std::fs::copy(&renewed.cert_file, &public.cert_file).unwrap();
        std::fs::copy(&renewed.key_file, &public.key_file).unwrap();
        good.hang_up();
        logged("the gateway", || good.log(), &["SIGHUP: TLS certificate reloaded"]).await;
        good.client_tls = Some(trusting(&other_ca.pem));
        let renewed_client = good.client(&key, Wire::ConnectJson);
        let info = renewed_client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() }).await;
        assert_eq!(info.expect("a new connection gets the new certificate").into_owned().vm_id, vm_id);
        good.client_tls = Some(trusting(&ca.pem));
        let old_trust = good.client(&key, Wire::ConnectJson).get_vm_info(wire::GetVmInfoRequest::default()).await.unwrap_err();
        assert_eq!(old_trust.code, ErrorCode::Unavailable, "the old certificate is no longer served: {old_trust:?}");
        client.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.expect("an event").unwrap();
            let event = event.expect("the stream opened before the reload is still open").to_owned_message();
            if event.vm_id == vm_id && event.kind == "deleted" {
                break;
            }
        }

        // A client certificate of another CA: the host refuses the handshake.
        let stranger = other_ca.issue(dir, "stranger", year);
        let foreign = Gateway::start_on(&https, &hosts_tls(&ca_file, &stranger));
        let line = logged("the host", || host.log(), &["the TLS handshake failed", "UnknownIssuer"]).await;
        eprintln!("another CA's client certificate, host log: {line}");
        assert_ne!(health_of(&foreign).await, "ready");

        // An expired client certificate of the right CA: refused too.
        let expired = ca.issue(dir, "expired", -time::Duration::days(1));
        let stale = Gateway::start_on(&https, &hosts_tls(&ca_file, &expired));
        let line = logged("the host", || host.log(), &["the TLS handshake failed", "xpired"]).await;
        eprintln!("an expired client certificate, host log: {line}");
        assert_ne!(health_of(&stale).await, "ready");

        // Plain HTTP to the TLS port.
        let plain = Gateway::start_on(&[format!("http://127.0.0.1:{}", host.port)], "");
        let line = logged("the host", || host.log(), &["it is not TLS (plain HTTP?) on a TLS port"]).await;
        eprintln!("plain HTTP, host log: {line}");
        assert_ne!(health_of(&plain).await, "ready");

        // The gateway checks the host: a host certificate it does not trust is refused.
        let doubting = Gateway::start_on(&https, &hosts_tls(&other_ca_file, &gateway_cert));
        let line = logged("the doubting gateway", || doubting.log(), &["host health changed", "UnknownIssuer"]).await;
        eprintln!("a host certificate of another CA, gateway log: {line}");
        assert_ne!(health_of(&doubting).await, "ready");

        // A signed call over TLS, without a client certificate.
        let transport = connectrpc::client::HttpClient::with_tls(trusting(&ca.pem));
        let (_, config) = common::client_config(&https[0], None, Wire::ConnectProto, Duration::from_secs(30));
        let uncertified = wire::HostServiceClient::new(transport, config);
        let request = wire::GetHostCapacityRequest::default();
        let options = gateway_signed("", "/vmprovisioner.v1.HostService/GetHostCapacity", &request);
        let refused = uncertified.get_host_capacity_with_options(request, options).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthenticated, "{refused:?}");
        assert!(refused.message.as_deref().unwrap_or_default().contains("needs TLS with a client certificate it trusts"), "{refused:?}");
        logged("the host", || host.log(), &["call refused", "needs TLS with a client certificate"]).await;
    });
    assert!(good.terminate().success(), "{}", good.log());
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
