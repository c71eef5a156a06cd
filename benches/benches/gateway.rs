//! The gateway's hop, measured in one run on real processes: three metald
//! hosts and two gateways in front of them (the test harnesses of
//! `bins/metald` and `bins/metald-gateway`), one on its embedded SQLite
//! store and one on a PostgreSQL server of the bench's own, each call
//! through a gateway against the same call made to a host directly:
//!
//! 1. `GetVmInfo` of a Created VM, p50 and p99, through each gateway and
//!    directly (criterion reports them too);
//! 2. creates per second with 8 clients for a fixed count, through each
//!    gateway (spread over 3 hosts) and to one host directly;
//! 3. `ListVms` of every VM in pages of 100 with about 300 VMs on each
//!    host, through the gateway, against one host's own pages of 100 (its
//!    share of them), per VM listed.
//!
//! Build the binaries first (a bench cannot depend on another package's):
//!
//! ```text
//! cargo build --release -p metald -p metald-gateway && cargo bench -p metald-benches --bench gateway
//! ```
//!
//! It runs as root (the hosts' jailer) on KVM; the gateway runs as nobody.
//! Everything is removed at the end, also when it panics. It measures and
//! prints; it does not judge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../bins/metald/tests/common/mod.rs"]
mod common;
#[path = "../../bins/metald-gateway/tests/gateway/mod.rs"]
mod gateway;

use std::time::{Duration, Instant};

use common::{Client, Host, HostOptions, Wire, create_request, guest_config};
use criterion::{Criterion, criterion_group, criterion_main};
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_benches::{Latencies, ratio};

const RATES: &str = "[rate_limits]\nreads = { per_second = 1000000, burst = 1000000 }\n\
                     mutations = { per_second = 1000000, burst = 1000000 }\ncreates = { per_second = 1000000, burst = 1000000 }";
const CALLS: usize = 2000;
const WARM_UP: usize = 200;
const CLIENTS: usize = 8;
const CREATES: usize = 160;
const VMS_PER_HOST: usize = 300;
const PAGE: i32 = 100;
const LIST_ROUNDS: usize = 20;

fn info_of(vm_id: &str) -> wire::GetVmInfoRequest {
    wire::GetVmInfoRequest { vm_id: vm_id.to_owned(), ..Default::default() }
}

async fn latencies(client: &Client, vm_id: &str) -> Latencies {
    for _ in 0..WARM_UP {
        client.get_vm_info(info_of(vm_id)).await.unwrap();
    }
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = Instant::now();
        client.get_vm_info(info_of(vm_id)).await.unwrap();
        samples.push(started.elapsed());
    }
    Latencies::of(samples)
}

/// `count` creates from `clients` at once: creates per second, and the ids.
async fn creates(clients: &[Client], count: usize) -> (f64, Vec<String>) {
    let started = Instant::now();
    let each = count / clients.len();
    let made = futures::future::join_all(clients.iter().map(|client| async move {
        let mut made = Vec::new();
        for _ in 0..each {
            made.push(client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned().vm_id);
        }
        made
    }))
    .await;
    let ids: Vec<String> = made.into_iter().flatten().collect();
    (ids.len() as f64 / started.elapsed().as_secs_f64(), ids)
}

async fn delete_all(clients: &[Client], ids: Vec<String>) {
    let chunks: Vec<Vec<String>> = ids.chunks(ids.len().div_ceil(clients.len()).max(1)).map(<[String]>::to_vec).collect();
    futures::future::join_all(clients.iter().zip(chunks).map(|(client, chunk)| async move {
        for vm_id in chunk {
            client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.expect("DeleteVm");
        }
    }))
    .await;
}

/// Every page of 100 of the caller's VMs; how long they all took and how many VMs.
async fn list_all(client: &Client) -> (Duration, usize) {
    let started = Instant::now();
    let (mut token, mut seen) = (String::new(), 0);
    loop {
        let page =
            client.list_vms(wire::ListVmsRequest { page_size: PAGE, page_token: token, ..Default::default() }).await.unwrap().into_owned();
        seen += page.vms.len();
        if page.next_page_token.is_empty() {
            return (started.elapsed(), seen);
        }
        token = page.next_page_token;
    }
}

fn bench(c: &mut Criterion) {
    let test = "bench_gateway";
    let options = || HostOptions { gateway: true, gateway_default_quota: Some("{}"), uid_count: Some(400), ..HostOptions::default() };
    let Some(first) = Host::start(test, options()) else { return };
    let hosts: Vec<Host> =
        std::iter::once(first).chain((1..3).map(|index| Host::start(&format!("{test}-{index}"), options()).unwrap())).collect();
    let mut gateway = Gateway::start(&hosts.iter().collect::<Vec<_>>(), RATES);
    let postgres = metald_testguest::postgres::require_postgres(test).expect("a PostgreSQL server");
    let mut gateway_pg =
        Gateway::start(&hosts.iter().collect::<Vec<_>>(), &format!("{RATES}\n[store]\npostgres_url = {:?}", postgres.url()));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let key = runtime.block_on(gateway.tenant_with_key("acme", admin::Quota::default()));
    let key_pg = runtime.block_on(gateway_pg.tenant_with_key("acme", admin::Quota::default()));
    let through = |wire_format| gateway.client(&key, wire_format);
    let through_pg = |wire_format| gateway_pg.client(&key_pg, wire_format);
    let direct = |host: &Host| host.client("acme", Wire::ConnectProto);

    // 1. GetVmInfo of a Created VM.
    let (via_gateway, via_postgres, on_host, vm_id, holder_client) = runtime.block_on(async {
        let gateway_client = through(Wire::ConnectProto);
        let vm_id = gateway_client.create_vm(create_request(guest_config(&[]))).await.unwrap().into_owned().vm_id;
        let postgres_client = through_pg(Wire::ConnectProto);
        let pg_vm_id = postgres_client.create_vm(create_request(guest_config(&[]))).await.unwrap().into_owned().vm_id;
        let mut holder = None;
        for host in &hosts {
            if direct(host).get_vm_info(info_of(&vm_id)).await.is_ok() {
                holder = Some(direct(host));
            }
        }
        let host_client = holder.expect("a host holds the VM");
        let via_gateway = latencies(&gateway_client, &vm_id).await;
        let via_postgres = latencies(&postgres_client, &pg_vm_id).await;
        let on_host = latencies(&host_client, &vm_id).await;
        postgres_client.delete_vm(wire::DeleteVmRequest { vm_id: pg_vm_id, force: true, ..Default::default() }).await.unwrap();
        (via_gateway, via_postgres, on_host, vm_id, host_client)
    });
    println!("GetVmInfo of a Created VM, {CALLS} calls, one client:");
    println!("  through the gateway on SQLite      {}", via_gateway.summary());
    println!("  through the gateway on PostgreSQL  {}", via_postgres.summary());
    println!("  the host directly                  {}", on_host.summary());
    for (store, latencies) in [("SQLite", &via_gateway), ("PostgreSQL", &via_postgres)] {
        println!(
            "  hop on {store}: p50 {:.2}x, p99 {:.2}x of the host's",
            ratio(latencies.percentile(50), on_host.percentile(50)),
            ratio(latencies.percentile(99), on_host.percentile(99))
        );
    }
    let mut group = c.benchmark_group("gateway");
    let gateway_client = through(Wire::ConnectProto);
    group.bench_function("GetVmInfo through the gateway", |b| {
        b.to_async(&runtime).iter(|| async { gateway_client.get_vm_info(info_of(&vm_id)).await.unwrap() });
    });
    group.bench_function("GetVmInfo on the host", |b| {
        b.to_async(&runtime).iter(|| async { holder_client.get_vm_info(info_of(&vm_id)).await.unwrap() });
    });
    group.finish();

    runtime.block_on(async { gateway_client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap() });

    // 2. Creates per second, 8 clients.
    runtime.block_on(async {
        let gateway_clients: Vec<Client> = (0..CLIENTS).map(|_| through(Wire::ConnectProto)).collect();
        let postgres_clients: Vec<Client> = (0..CLIENTS).map(|_| through_pg(Wire::ConnectProto)).collect();
        let host_clients: Vec<Client> = (0..CLIENTS).map(|_| direct(&hosts[0])).collect();
        let (gateway_rate, made) = creates(&gateway_clients, CREATES).await;
        delete_all(&gateway_clients, made).await;
        let (postgres_rate, made) = creates(&postgres_clients, CREATES).await;
        delete_all(&postgres_clients, made).await;
        let (host_rate, made) = creates(&host_clients, CREATES).await;
        delete_all(&host_clients, made).await;
        println!("CreateVm, {CREATES} from {CLIENTS} clients:");
        println!("  through the gateway on SQLite (3 hosts)      {gateway_rate:.1} creates/s, {:.2}x the host's", gateway_rate / host_rate);
        println!(
            "  through the gateway on PostgreSQL (3 hosts)  {postgres_rate:.1} creates/s, {:.2}x the host's",
            postgres_rate / host_rate
        );
        println!("  one host directly                            {host_rate:.1} creates/s");
    });

    // 3. ListVms in pages of 100, 300 VMs on each host.
    runtime.block_on(async {
        // About 300 on each host: placement spreads them.
        let gateway_clients: Vec<Client> = (0..CLIENTS).map(|_| through(Wire::ConnectProto)).collect();
        let (_, placed) = creates(&gateway_clients, VMS_PER_HOST * 3).await;
        let client = through(Wire::ConnectProto);
        let one_host = direct(&hosts[0]);
        let (mut via_gateway, mut on_host) = (Vec::new(), Vec::new());
        let (mut listed_gateway, mut listed_host) = (0, 0);
        for _ in 0..LIST_ROUNDS {
            let (took, seen) = list_all(&client).await;
            via_gateway.push(took);
            listed_gateway = seen;
            let (took, seen) = list_all(&one_host).await;
            on_host.push(took);
            listed_host = seen;
        }
        let (via_gateway, on_host) = (Latencies::of(via_gateway), Latencies::of(on_host));
        println!("ListVms, every page of {PAGE}, {LIST_ROUNDS} rounds:");
        println!("  through the gateway, {listed_gateway} VMs on 3 hosts  {}", via_gateway.summary());
        println!("  one host directly, {listed_host} VMs                 {}", on_host.summary());
        println!(
            "  per VM listed: {:.2}x",
            (via_gateway.percentile(50).as_secs_f64() / listed_gateway.max(1) as f64)
                / (on_host.percentile(50).as_secs_f64() / listed_host.max(1) as f64)
        );
        delete_all(&gateway_clients, placed).await;
    });
    assert!(gateway.terminate().success());
    assert!(gateway_pg.terminate().success());
    for mut host in hosts {
        assert!(host.terminate().success());
        assert_eq!(host.leftovers(), Vec::<String>::new());
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
