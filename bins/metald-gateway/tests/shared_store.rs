//! Two real gateways sharing one real PostgreSQL (a server of the test's
//! own on loopback) in front of three real metald hosts: either gateway
//! gives the same answers; a gateway SIGKILLed mid-create leaves the VM
//! once or not at all with its quota right; racing creates through both
//! for a tenant's last slot let exactly one in; a revoked key stops
//! working at both within the cache's bound; a key's rate is shared; and
//! while PostgreSQL is down, what the gateways can serve they serve, the
//! rest is `unavailable`, and nothing is lost or doubled when it is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod gateway;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Host, HostOptions, Wire, create_request, guest_config};
use connectrpc::ErrorCode;
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_testguest::postgres::{PostgresServer, require_postgres};

/// How long a key record answers without the store: the revocation bound (the default).
const FRESH: Duration = Duration::from_millis(2000);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Both gateways' settings: one store, a rate shared by two, pending
/// creates settled after 10 s (a create here takes well under that).
fn shared_settings(postgres: &PostgresServer) -> String {
    format!(
        "pending_settle_seconds = 10\n\
         [store]\npostgres_url = {:?}\n\
         [cache]\nstale_if_unavailable_ms = 3600000\n\
         [rate_limits]\ngateways = 2\n\
         reads = {{ per_second = 10000, burst = 10000 }}\ncreates = {{ per_second = 10000, burst = 10000 }}\n\
         mutations = {{ per_second = 1, burst = 6 }}",
        postgres.url()
    )
}

fn fleet_host(test: &str, fail_points: Option<&str>) -> Option<Host> {
    Host::start(test, HostOptions { fail_points: fail_points.map(str::to_owned), ..gateway::fleet_host_options() })
}

async fn store_rows(postgres: &PostgresServer, sql: &str) -> Vec<tokio_postgres::Row> {
    let (client, connection) = tokio_postgres::connect(&postgres.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.query(sql, &[]).await.unwrap()
}

/// The VM ids a host has, from its operator list.
async fn held_by(host: &Host) -> Vec<String> {
    let request = wire::ListVmsRequest { page_size: 1000, ..Default::default() };
    host.operator_client().list_vms(request).await.unwrap().into_owned().vms.into_iter().map(|vm| vm.vm_id).collect()
}

async fn listed(gateway: &Gateway, key: &str) -> Vec<String> {
    let request = wire::ListVmsRequest { page_size: 1000, ..Default::default() };
    let mut ids: Vec<String> =
        gateway.client(key, Wire::ConnectProto).list_vms(request).await.unwrap().into_owned().vms.into_iter().map(|vm| vm.vm_id).collect();
    ids.sort();
    ids
}

async fn wait_until<F, Fut>(what: &str, mut fact: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fact().await {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn two_gateways_on_one_postgres_share_tenants_quotas_keys_rates_and_outages() {
    let test = "two_gateways_on_one_postgres_share_tenants_quotas_keys_rates_and_outages";
    let Some(mut postgres) = require_postgres(test) else { return };
    // host-0's first create sleeps a second before it records the VM: the window the first gateway is killed in.
    let Some(first) = fleet_host(test, Some("create-before-record=1*sleep(1000)")) else { return };
    let hosts: Vec<Host> =
        std::iter::once(first).chain((1..3).map(|index| fleet_host(&format!("{test}-{index}"), None).unwrap())).collect();
    let host_refs: Vec<&Host> = hosts.iter().collect();
    let settings = shared_settings(&postgres);
    let mut one = Gateway::start(&host_refs, &settings);
    let two = Gateway::start(&host_refs, &settings);
    runtime().block_on(async {
        // A gateway killed mid-create: its create goes to host-0, the only host not cordoned.
        let crash_key = one.tenant_with_key("crash", admin::Quota { max_vms: 1, ..Default::default() }).await;
        for name in ["host-1", "host-2"] {
            one.admin().cordon_host(admin::HostRequest { name: name.into(), ..Default::default() }).await.unwrap();
        }
        let creating = {
            let client = one.client(&crash_key, Wire::ConnectProto);
            tokio::spawn(async move { client.create_vm(create_request(guest_config(&[]))).await.map(|answer| answer.into_owned()) })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while store_rows(&postgres, "SELECT vm_id FROM placements WHERE tenant = 'crash' AND status = 'pending'").await.is_empty() {
            assert!(!creating.is_finished(), "the create ended before it was seen pending: {:?}", creating.await);
            assert!(Instant::now() < deadline, "the create's placement is not pending within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        one.kill();
        assert!(creating.await.unwrap().is_err(), "the caller of a killed gateway gets no answer");
        wait_until("the other gateway settles the pending placement", || async {
            store_rows(&postgres, "SELECT vm_id FROM placements WHERE tenant = 'crash' AND status = 'pending'").await.is_empty()
        })
        .await;
        let placed: Vec<String> =
            store_rows(&postgres, "SELECT vm_id FROM placements WHERE tenant = 'crash'").await.iter().map(|row| row.get(0)).collect();
        let on_host = held_by(&hosts[0]).await;
        eprintln!("after the gateway was killed mid-create: {} VM placed, {} on its host", placed.len(), on_host.len());
        assert_eq!(placed, on_host, "the VM is placed exactly when its host has it: once or not at all");
        let crash = two.client(&crash_key, Wire::ConnectProto);
        let again = crash.create_vm(create_request(guest_config(&[]))).await;
        match placed.len() {
            1 => assert_eq!(again.unwrap_err().code, ErrorCode::ResourceExhausted, "the made VM holds the tenant's one slot"),
            0 => assert!(again.is_ok(), "the VM that was not made holds no quota: {again:?}"),
            more => panic!("{more} placements for one create"),
        }
        assert_eq!(listed(&two, &crash_key).await.len(), 1, "the tenant has one VM, seen through the other gateway");
        for name in ["host-1", "host-2"] {
            two.admin().uncordon_host(admin::HostRequest { name: name.into(), ..Default::default() }).await.unwrap();
        }
        one.launch();
        for gateway in [&one, &two] {
            for name in ["host-0", "host-1", "host-2"] {
                gateway.wait_for_health(name, "ready").await;
            }
        }

        // Eight creates race through both gateways for a tenant's last slot.
        let racer_key = one.tenant_with_key("racer", admin::Quota { max_vms: 3, ..Default::default() }).await;
        for gateway in [&one, &two] {
            gateway.client(&racer_key, Wire::ConnectProto).create_vm(create_request(guest_config(&[]))).await.unwrap();
        }
        let racers = (0..8).map(|index| {
            let client = if index % 2 == 0 { &one } else { &two }.client(&racer_key, Wire::ConnectProto);
            tokio::spawn(async move { client.create_vm(create_request(guest_config(&[]))).await.map(|answer| answer.into_owned()) })
        });
        let outcomes: Vec<_> = futures::future::join_all(racers).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 1, "{outcomes:?}");
        for refused in outcomes.iter().filter_map(|outcome| outcome.as_ref().err()) {
            assert_eq!(refused.code, ErrorCode::ResourceExhausted, "{refused:?}");
            assert!(
                refused.message.as_deref().unwrap_or_default().contains("tenant racer may hold at most 3 VMs across the fleet"),
                "the refusal names the quota: {refused:?}"
            );
        }

        // Either gateway gives the same answers.
        let racer_vms = listed(&one, &racer_key).await;
        assert_eq!(racer_vms.len(), 3);
        assert_eq!(listed(&two, &racer_key).await, racer_vms);
        for vm_id in &racer_vms {
            let info = |gateway: &Gateway| {
                let client = gateway.client(&racer_key, Wire::ConnectJson);
                let request = wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() };
                async move {
                    let info = client.get_vm_info(request).await.unwrap().into_owned();
                    (info.vm_id, info.state, info.customer_id)
                }
            };
            assert_eq!(info(&one).await, info(&two).await);
        }
        // A VM made through one gateway boots, shows its console and pauses through the other.
        let booted = &racer_vms[0];
        let (via_one, via_two) = (one.client(&racer_key, Wire::Grpc), two.client(&racer_key, Wire::GrpcWeb));
        via_two.boot_vm(wire::BootVmRequest { vm_id: booted.clone(), ..Default::default() }).await.unwrap();
        common::wait_for_console(&via_one, booted, metald_testguest::console::READY).await;
        via_one.pause_vm(wire::PauseVmRequest { vm_id: booted.clone(), ..Default::default() }).await.unwrap();
        let paused = via_two.get_vm_info(wire::GetVmInfoRequest { vm_id: booted.clone(), ..Default::default() }).await.unwrap();
        assert_eq!(paused.into_owned().state.as_known(), Some(wire::VmState::VM_STATE_PAUSED));
        via_two.resume_vm(wire::ResumeVmRequest { vm_id: booted.clone(), ..Default::default() }).await.unwrap();
        let other_key = two.tenant_with_key("other", admin::Quota::default()).await;
        let foreign = one
            .client(&other_key, Wire::ConnectJson)
            .get_vm_info(wire::GetVmInfoRequest { vm_id: racer_vms[0].clone(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(foreign.code, ErrorCode::NotFound, "a tenant made on one gateway is kept apart on the other");

        // A key's rate, shared by two gateways: at most its burst at once plus its rate since.
        let rated_key = one.tenant_with_key("rated", admin::Quota::default()).await;
        let started = Instant::now();
        let mut admitted = 0u64;
        for index in 0..16 {
            let gateway = if index % 2 == 0 { &one } else { &two };
            let request = wire::PauseVmRequest { vm_id: "vm-nowhere".into(), ..Default::default() };
            match gateway.client(&rated_key, Wire::ConnectProto).pause_vm(request).await {
                Err(error) if error.code == ErrorCode::ResourceExhausted => {
                    assert!(
                        error.message.as_deref().unwrap_or_default().contains("across 2 gateways, 3 at once through each"),
                        "{error:?}"
                    );
                }
                _ => admitted += 1,
            }
        }
        let allowance = 6 + started.elapsed().as_secs() + 1;
        assert!((6..=allowance).contains(&admitted), "{admitted} calls let in; the allowance was {allowance}");

        // A key revoked through one gateway stops opening calls through both.
        let revoked_key = one.tenant_with_key("revoked", admin::Quota::default()).await;
        for gateway in [&one, &two] {
            listed(gateway, &revoked_key).await;
        }
        let keys = one.admin().list_api_keys(admin::ListApiKeysRequest { tenant_id: "revoked".into(), ..Default::default() }).await;
        let key_id = keys.unwrap().into_owned().keys[0].id.clone();
        one.admin().revoke_api_key(admin::RevokeApiKeyRequest { id: key_id, ..Default::default() }).await.unwrap();
        let revoked_at = Instant::now();
        for gateway in [&one, &two] {
            let client = gateway.client(&revoked_key, Wire::ConnectProto);
            wait_until("the revoked key is refused", || {
                let client = client.clone();
                async move {
                    let request = wire::ListVmsRequest::default();
                    matches!(client.list_vms(request).await, Err(error) if error.code == ErrorCode::Unauthenticated)
                }
            })
            .await;
        }
        let took = revoked_at.elapsed();
        eprintln!("the revocation reached both gateways in {took:?} (bound: cache.fresh_ms = {FRESH:?})");
        assert!(took < FRESH + Duration::from_secs(10), "{took:?}");

        // PostgreSQL stopped for 10 s: routing from what was read goes on, the rest is unavailable.
        let before = listed(&one, &racer_key).await;
        let late_key = one.tenant_with_key("late", admin::Quota::default()).await;
        postgres.stop();
        let outage = Instant::now();
        for gateway in [&one, &two] {
            let client = gateway.client(&racer_key, Wire::ConnectProto);
            let request = wire::GetVmInfoRequest { vm_id: before[0].clone(), ..Default::default() };
            let info = client.get_vm_info(request).await.expect("a VM whose place was read is served without the store");
            assert_eq!(info.into_owned().customer_id, "racer");
            let refused = client.create_vm(create_request(guest_config(&[]))).await.unwrap_err();
            assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
            assert!(refused.message.as_deref().unwrap_or_default().contains("the gateway cannot reach its store"), "{refused:?}");
        }
        let unread = two.client(&late_key, Wire::ConnectProto).list_vms(wire::ListVmsRequest::default()).await.unwrap_err();
        assert_eq!(unread.code, ErrorCode::Unavailable, "a key never read cannot be checked without the store: {unread:?}");
        if let Some(rest) = Duration::from_secs(10).checked_sub(outage.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        postgres.restart().unwrap();
        let back = two.client(&racer_key, Wire::ConnectProto);
        back.delete_vm(wire::DeleteVmRequest { vm_id: before[0].clone(), ..Default::default() })
            .await
            .expect("calls that need the store work once it is back");
        let after = listed(&one, &racer_key).await;
        let expected: Vec<String> = before[1..].to_vec();
        assert_eq!(after, expected, "nothing lost or doubled");
        let placed: BTreeSet<String> =
            store_rows(&postgres, "SELECT vm_id FROM placements WHERE tenant = 'racer'").await.iter().map(|row| row.get(0)).collect();
        assert_eq!(placed, expected.iter().cloned().collect(), "the store agrees");
    });
}
