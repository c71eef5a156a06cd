//! The daemon's API, measured on a real metald in one run:
//!
//! 1. latency (p50, p99, mean) of `GetVmInfo` on a Created and on a Running
//!    VM and of `ListVms` (the default page, and a page of 1000) while the
//!    daemon holds 1000 VMs (800 Created, and the 200 booted for phase 3, of
//!    which all but 5 are paused first: 200 idle test guests keep more than
//!    half of a 2-CPU host busy with their timer ticks, which would measure
//!    the guests, not the API), against a plain `GET /health` through the
//!    same client and connection pool, called in the same rounds, plus
//!    `GetVmInfo` over gRPC in every fifth round; then the calls per second
//!    8 clients get at once;
//! 2. create+boot to the guest's ready line through the API (`CreateVm`,
//!    `BootVm`, then `GetConsole` every 2 ms) against
//!    `firecracker --no-api --config-file` with the same guest: medians and
//!    their ratio, with criterion's report; then the same on a second
//!    daemon with networking on, each VM with one interface (its network
//!    namespace, TAP, bridge port and firewall elements), against the same
//!    raw baseline (which has no interface): a tenant's first VM, then
//!    back-to-back creates, then creates that each wait (untimed) for a
//!    full jail pool;
//! 3. the daemon's resident memory per Created VM (800, made from 8
//!    clients on a host that runs no guest, which also gives `CreateVm`'s
//!    latencies and creates per second), per running VM (200 more) and per
//!    VM of all 1000 held (and, for context only, the VMMs' own); measured
//!    first, they set up the 1000 VMs phase 1 calls.
//!
//! A bench cannot depend on another package's binary, so build it first:
//!
//! ```text
//! cargo build --release -p metald && cargo bench -p metald-benches --bench api
//! ```
//!
//! The daemon is `$METALD_BIN`, else `target/release/metald`, else
//! `target/debug/metald`. It runs with its jailer (so as root), on KVM,
//! with the Firecracker the other benches use, billing off, networking off
//! but for phase 2's second daemon, which lives in a network namespace the
//! bench makes (`metald-test-…-host`) and removes.
//! Everything it makes lives under a `metald-test-` folder, a uid window
//! and a cgroup parent of this run's own, and is removed at the end, also
//! when the bench panics. This file measures and prints; it does not judge.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use connectrpc::client::{ClientConfig, ClientTransport, HttpClient, full_body};
use connectrpc::{ConnectError, Protocol};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use http_body_util::BodyExt;
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;
use metald_benches::{
    BenchHost, BootPhases, GUEST_KERNEL, GUEST_MEMORY_MIB, Latencies, Recorder, median, ms, ms3, ratio, timed_iterations,
};
use metald_testguest::console;
use sha2::Digest;

type Client = wire::VmServiceClient<HttpClient>;

const METALD_BIN_ENV: &str = "METALD_BIN";
const BUILD_IT: &str = "build it first: cargo build --release -p metald";
const TENANT: &str = "bench";
const RUNNING_VMS: usize = 200;
const HELD_VMS: usize = 1000;
const CLIENTS: usize = 8;
/// Measured calls of each kind, after the warm-up.
const CALLS: usize = 2000;
const WARM_UP_CALLS: usize = 200;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(3);
/// How often the timed create+boot asks for the console.
const READY_POLL: Duration = Duration::from_millis(2);
/// A refill makes each child in milliseconds; a pool not full after this is broken.
const POOL_REFILL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the untimed fleet boots ask for it.
const FLEET_READY_POLL: Duration = Duration::from_millis(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);
const UID_COUNT: u32 = 2048;
/// Booted VMs left running (not paused) during the latency phase.
const RUNNING_DURING_LATENCY: usize = 5;
/// gRPC calls are made in every this many rounds only: some of them stall
/// for about 40 ms (see the report), which would stretch the run.
const GRPC_EVERY: usize = 5;

/// A metald of this run's own; dropping it kills it and every VMM it
/// started and removes their cgroups. The folder goes with the `TempDir`.
#[derive(Debug)]
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    token: String,
    /// The folder's name, also the cgroup parent: unique to this run.
    name: String,
    /// With networking on: the prefix of every network namespace it has
    /// (the host namespace made for it, `<prefix>host`, among them).
    netns_prefix: Option<String>,
}

impl Daemon {
    /// A daemon with networking off, or on (`networked`): then in a host
    /// network namespace made for it, each VM in one of its own with its
    /// TAP, bridge port and firewall elements.
    fn start(binary: &Path, firecracker: &Path, networked: bool) -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().map_err(|error| format!("scratch folder: {error}"))?;
        let name = dir.path().file_name().map(|name| name.to_string_lossy().into_owned()).ok_or("scratch folder without a name")?;
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).map_err(|error| format!("{}: {error}", images.display()))?;
        std::fs::copy(metald_testguest::kernel_path(), images.join(GUEST_KERNEL)).map_err(|error| format!("copying the guest: {error}"))?;
        let token =
            format!("bench-token-{name}-{}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
        let uid_start = 1_500_000 + (fxhash(&name) % 1_000) * UID_COUNT;
        let netns_prefix = networked.then(|| format!("{name}-"));
        if let Some(prefix) = &netns_prefix {
            let made = Command::new("ip").args(["netns", "add", &format!("{prefix}host")]).status();
            if !made.is_ok_and(|status| status.success()) {
                return Err(format!("ip netns add {prefix}host failed"));
            }
        }
        let settings = format!(
            "data_dir = {data:?}\nimage_root = {images:?}\nfirecracker = {firecracker:?}\nstop_timeout_seconds = 10\n\
             [jailer]\nuid_start = {uid_start}\nuid_count = {UID_COUNT}\ncgroup_parent = {name:?}\n\
             {network}[billing]\nenabled = false\n\
             [capacity]\nvcpus = {HELD_VMS}\nmemory_bytes = {held_memory}\n\
             [[auth.tenants]]\nid = {TENANT:?}\ntoken_sha256 = {hash:?}\nquota = {{}}\n",
            data = dir.path().join("data"),
            hash = hex::encode(sha2::Sha256::digest(token.as_bytes())),
            // The bench holds more than a host of this size admits by default.
            held_memory = HELD_VMS as u64 * GUEST_MEMORY_MIB * 1024 * 1024,
            network = match &netns_prefix {
                Some(prefix) => format!(
                    "[network]\nenabled = true\nipv6_prefix = \"fd6d:6265:6e63::/48\"\nhost_netns = \"/run/netns/{prefix}host\"\n\
                     netns_prefix = {prefix:?}\nlink_prefix = \"b{:04x}\"\nnft_table = \"mdb{:08x}\"\n",
                    fxhash(&name) % 0xffff,
                    fxhash(&name)
                ),
                None => "[network]\nenabled = false\n".to_owned(),
            },
        );
        let config = dir.path().join("metald.toml");
        std::fs::write(&config, settings).map_err(|error| format!("{}: {error}", config.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("no free port: {error}"))?
            .port();
        let log = std::fs::File::create(dir.path().join("metald.log")).map_err(|error| format!("metald.log: {error}"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) => {
                remove_namespaces(netns_prefix.as_deref());
                return Err(format!("starting {}: {error}", binary.display()));
            }
        };
        // From here on, Drop cleans up whatever happens next.
        let mut daemon = Self { dir, child: Some(child), port, token, name, netns_prefix };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("metald exited with {status} before it was ready; its log:\n{}", self.log()));
            }
            if blocking_status(self.port, "/ready") == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("metald not ready after {DAEMON_READY_TIMEOUT:?}; its log:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("metald.log")).unwrap_or_default()
    }

    fn uri(&self, path: &str) -> Result<http::Uri, String> {
        format!("http://127.0.0.1:{}{path}", self.port).parse().map_err(|error| format!("URI of {path}: {error}"))
    }

    /// A generated client for the bench's tenant, binary protobuf, over `transport`.
    fn client(&self, transport: HttpClient, protocol: Protocol) -> Result<Client, String> {
        let config = ClientConfig::new(self.uri("")?)
            .with_default_timeout(Duration::from_secs(60))
            .with_protocol(protocol)
            .proto()
            .with_default_header("authorization", format!("Bearer {}", self.token));
        Ok(wire::VmServiceClient::new(transport, config))
    }

    /// One caller with connections of its own.
    fn callers(&self) -> Result<Callers, String> {
        let transport = HttpClient::plaintext();
        Ok(Callers {
            connect: self.client(transport.clone(), Protocol::Connect)?,
            grpc: self.client(HttpClient::plaintext_http2_only(), Protocol::Grpc)?,
            transport,
            health: self.uri("/health")?,
            metrics: self.uri("/metrics")?,
        })
    }

    fn vmms(&self) -> Vec<u32> {
        processes_in_cgroup(&self.name)
    }

    /// What the VMs left on the host: VMMs, VM folders, cgroups.
    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.vmms().into_iter().map(|pid| format!("process {pid}")).collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("data").join("vms")) {
            left.extend(entries.flatten().map(|entry| format!("folder {}", entry.path().display())));
        }
        // The running daemon's jail pool keeps its waiting children and their cgroups.
        let pooled =
            |path: &PathBuf| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(metald_testguest::JAIL_POOL_PREFIX));
        for parent in metald_testguest::cgroup_parent_dirs(&self.name) {
            left.extend(
                metald_testguest::child_cgroups(&parent)
                    .into_iter()
                    .filter(|path| !pooled(path))
                    .map(|path| format!("cgroup {}", path.display())),
            );
        }
        if let Some(prefix) = &self.netns_prefix {
            let host = format!("{prefix}host");
            left.extend(
                metald_testguest::network_namespaces(prefix).into_iter().filter(|name| *name != host).map(|name| format!("netns {name}")),
            );
        }
        left
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for _ in 0..250 {
            let vmms = self.vmms();
            if vmms.is_empty() {
                break;
            }
            for pid in vmms {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        metald_testguest::remove_cgroup_parent(&self.name);
        remove_namespaces(self.netns_prefix.as_deref());
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("metald's last log lines ({}):", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
}

/// Everything one caller needs: the generated client over Connect
/// (binary protobuf, HTTP/1.1), one over gRPC (h2c), and the Connect
/// client's own transport for the plain GETs, so both share one pool.
#[derive(Clone)]
struct Callers {
    connect: Client,
    grpc: Client,
    transport: HttpClient,
    health: http::Uri,
    metrics: http::Uri,
}

/// The VMs the daemon holds for the latency and throughput phases.
#[derive(Debug, Clone, Default)]
struct Fleet {
    running: Vec<String>,
    paused: Vec<String>,
    created: Vec<String>,
}

impl Fleet {
    fn len(&self) -> usize {
        self.running.len() + self.paused.len() + self.created.len()
    }

    fn pick(ids: &[String], turn: usize) -> Result<&str, String> {
        ids.get(turn % ids.len().max(1)).map(String::as_str).ok_or_else(|| "the fleet has no VM of that kind".to_owned())
    }
}

/// One kind of call the latency phase makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Health,
    InfoCreated,
    InfoRunning,
    ListDefaultPage,
    ListPageOf1000,
    InfoCreatedGrpc,
}

impl Probe {
    const ALL: [Self; 6] =
        [Self::Health, Self::InfoCreated, Self::InfoRunning, Self::ListDefaultPage, Self::ListPageOf1000, Self::InfoCreatedGrpc];

    fn label(self) -> &'static str {
        match self {
            Self::Health => "GET /health (baseline)",
            Self::InfoCreated => "GetVmInfo, Created VM",
            Self::InfoRunning => "GetVmInfo, Running VM",
            Self::ListDefaultPage => "ListVms, default page",
            Self::ListPageOf1000 => "ListVms, page_size 1000",
            Self::InfoCreatedGrpc => "GetVmInfo, Created, gRPC",
        }
    }

    /// It is called in every round of the latency phase, or in every `every()`th.
    fn every(self) -> usize {
        if self == Self::InfoCreatedGrpc { GRPC_EVERY } else { 1 }
    }

    /// One call, its answer checked. `turn` picks the VM, round robin.
    async fn call(self, callers: &Callers, fleet: &Fleet, turn: usize) -> Result<(), String> {
        match self {
            Self::Health => {
                let body = http_get(&callers.transport, &callers.health).await?;
                if body.as_ref() == b"ok\n" { Ok(()) } else { Err(format!("/health answered {:?}", String::from_utf8_lossy(&body))) }
            }
            Self::InfoCreated => vm_info(&callers.connect, Fleet::pick(&fleet.created, turn)?, VmState::VM_STATE_CREATED).await,
            Self::InfoRunning => vm_info(&callers.connect, Fleet::pick(&fleet.running, turn)?, VmState::VM_STATE_RUNNING).await,
            Self::ListDefaultPage => list_vms(&callers.connect, 0, fleet.len()).await,
            Self::ListPageOf1000 => list_vms(&callers.connect, 1000, fleet.len()).await,
            Self::InfoCreatedGrpc => vm_info(&callers.grpc, Fleet::pick(&fleet.created, turn)?, VmState::VM_STATE_CREATED).await,
        }
    }
}

fn refused(what: &str, error: &ConnectError) -> String {
    format!("{what}: {:?} {}", error.code, error.message.as_deref().unwrap_or(""))
}

/// A GET through the same pool the Connect client uses; the body of a 200.
async fn http_get(transport: &HttpClient, uri: &http::Uri) -> Result<Bytes, String> {
    let request = http::Request::get(uri.clone()).body(full_body(Bytes::new())).map_err(|error| format!("GET {uri}: {error}"))?;
    let response = transport.send(request).await.map_err(|error| refused(&format!("GET {uri}"), &error))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|error| format!("GET {uri}: {error}"))?.to_bytes();
    if status == http::StatusCode::OK { Ok(body) } else { Err(format!("GET {uri}: {status}")) }
}

async fn vm_info(client: &Client, vm_id: &str, expected: VmState) -> Result<(), String> {
    let response = client
        .get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.to_owned(), ..Default::default() })
        .await
        .map_err(|error| refused("GetVmInfo", &error))?;
    let info = response.view();
    if info.state.as_known() != Some(expected) {
        return Err(format!("GetVmInfo {vm_id}: state {:?}, expected {expected:?}", info.state.as_known()));
    }
    if expected == VmState::VM_STATE_RUNNING && info.metrics.as_option().is_none() {
        return Err(format!("GetVmInfo {vm_id}: a running VM without metrics (see the daemon's log)"));
    }
    Ok(())
}

/// The first page of `page_size` (0: the daemon's default), which must
/// count `held` VMs in all.
async fn list_vms(client: &Client, page_size: i32, held: usize) -> Result<(), String> {
    let response =
        client.list_vms(wire::ListVmsRequest { page_size, ..Default::default() }).await.map_err(|error| refused("ListVms", &error))?;
    let page = response.view();
    let expected_page = if page_size == 0 { held.min(100) } else { held.min(usize::try_from(page_size).unwrap_or(0)) };
    if usize::try_from(page.total_count).ok() != Some(held) || page.vms.len() != expected_page {
        return Err(format!(
            "ListVms page_size {page_size}: {} of {} VMs, expected {expected_page} of {held}",
            page.vms.len(),
            page.total_count
        ));
    }
    Ok(())
}

fn guest_config(networked: bool) -> wire::VmConfig {
    let network = if networked { vec![wire::NetworkInterface { id: "eth0".into(), ..Default::default() }] } else { Vec::new() };
    wire::VmConfig {
        network,
        cpu: buffa::MessageField::some(wire::CpuConfig { vcpu_count: 1, ..Default::default() }),
        memory: buffa::MessageField::some(wire::MemoryConfig {
            size_bytes: i64::try_from(GUEST_MEMORY_MIB << 20).unwrap_or(i64::MAX),
            ..Default::default()
        }),
        boot: buffa::MessageField::some(wire::BootConfig { kernel_path: GUEST_KERNEL.into(), ..Default::default() }),
        ..Default::default()
    }
}

async fn create_vm(client: &Client) -> Result<String, String> {
    create_vm_with(client, false).await
}

async fn create_vm_with(client: &Client, networked: bool) -> Result<String, String> {
    let request = wire::CreateVmRequest { config: buffa::MessageField::some(guest_config(networked)), ..Default::default() };
    let response = client.create_vm(request).await.map_err(|error| refused("CreateVm", &error))?;
    Ok(response.view().vm_id.to_owned())
}

async fn boot_vm(client: &Client, vm_id: &str) -> Result<(), String> {
    client
        .boot_vm(wire::BootVmRequest { vm_id: vm_id.to_owned(), ..Default::default() })
        .await
        .map_err(|error| refused("BootVm", &error))?;
    Ok(())
}

async fn delete_vm(client: &Client, vm_id: &str) -> Result<(), String> {
    client
        .delete_vm(wire::DeleteVmRequest { vm_id: vm_id.to_owned(), force: true, ..Default::default() })
        .await
        .map_err(|error| refused(&format!("DeleteVm {vm_id}"), &error))?;
    Ok(())
}

/// Asks for the console every `poll` until a line starts with the guest's ready line.
async fn wait_for_ready_line(client: &Client, vm_id: &str, poll: Duration) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let response = client
            .get_console(wire::GetConsoleRequest { vm_id: vm_id.to_owned(), ..Default::default() })
            .await
            .map_err(|error| refused("GetConsole", &error))?;
        let data = response.view().data;
        if data.split(|byte| *byte == b'\n').any(|line| line.starts_with(console::READY.as_bytes())) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("VM {vm_id} printed no ready line in {READY_TIMEOUT:?}; its console: {}", String::from_utf8_lossy(data)));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Create, boot, ready line, through the API: how long each took, and the VM.
async fn api_boot_to_ready(client: &Client, networked: bool) -> Result<(BootPhases, String), String> {
    let started = Instant::now();
    let vm_id = create_vm_with(client, networked).await?;
    let created = Instant::now();
    boot_vm(client, &vm_id).await?;
    let booted = Instant::now();
    wait_for_ready_line(client, &vm_id, READY_POLL).await?;
    let phases = BootPhases { create: created - started, boot: booted - created, to_ready: booted.elapsed() };
    Ok((phases, vm_id))
}

/// Create+boots through the API, phase by phase.
#[derive(Default)]
struct ApiBoots(std::sync::Mutex<Vec<BootPhases>>);

impl ApiBoots {
    fn record(&self, phases: BootPhases) {
        if let Ok(mut all) = self.0.lock() {
            all.push(phases);
        }
    }

    fn all(&self) -> Vec<BootPhases> {
        self.0.lock().map(|all| all.clone()).unwrap_or_default()
    }

    fn median_of(&self, phase: fn(&BootPhases) -> Duration) -> Duration {
        median(&self.all().iter().map(phase).collect::<Vec<_>>())
    }

    fn median(&self) -> Duration {
        self.median_of(BootPhases::total)
    }

    /// The median, each phase's median (where the whole goes) and the ratio to `raw_median`, labelled `ratio_label`.
    fn report(&self, what: &str, ratio_label: &str, raw_median: Duration) {
        println!("  {what}: median {} over {} boots", ms(self.median()), self.all().len());
        println!(
            "    CreateVm {}, BootVm {}, then to the ready line {}",
            ms(self.median_of(|phases| phases.create)),
            ms(self.median_of(|phases| phases.boot)),
            ms(self.median_of(|phases| phases.to_ready))
        );
        println!("  ratio {ratio_label}: {:.2}", ratio(self.median(), raw_median));
    }
}

/// `count` VMs from all clients at once, each booted to its ready line
/// when `boot`: their ids, and how long each `CreateVm` took, both in the
/// order the creates ended.
async fn create_vms(clients: &[Client], count: usize, boot: bool) -> Result<(Vec<String>, Vec<Duration>), String> {
    let shares = clients.iter().enumerate().map(|(index, client)| {
        let share = count / clients.len() + usize::from(index < count % clients.len());
        async move {
            let mut created = Vec::with_capacity(share);
            for _ in 0..share {
                let started = Instant::now();
                let vm_id = create_vm(client).await?;
                created.push((Instant::now(), started.elapsed(), vm_id.clone()));
                if boot {
                    boot_vm(client, &vm_id).await?;
                    wait_for_ready_line(client, &vm_id, FLEET_READY_POLL).await?;
                }
            }
            Ok::<_, String>(created)
        }
    });
    let mut created: Vec<(Instant, Duration, String)> = futures::future::try_join_all(shares).await?.into_iter().flatten().collect();
    created.sort_by_key(|(ended, _, _)| *ended);
    Ok(created.into_iter().map(|(_, took, vm_id)| (vm_id, took)).unzip())
}

/// Pauses VMs from all clients at once.
async fn pause_vms(clients: &[Client], ids: &[String]) -> Result<(), String> {
    let chunk = ids.len().div_ceil(clients.len()).max(1);
    let jobs = ids.chunks(chunk).zip(clients).map(|(ids, client)| async move {
        for vm_id in ids {
            client
                .pause_vm(wire::PauseVmRequest { vm_id: vm_id.clone(), ..Default::default() })
                .await
                .map_err(|error| refused(&format!("PauseVm {vm_id}"), &error))?;
        }
        Ok::<_, String>(())
    });
    futures::future::try_join_all(jobs).await.map(drop)
}

/// Deletes (forced) from all clients at once.
async fn delete_vms(clients: &[Client], ids: &[String]) -> Result<(), String> {
    let chunk = ids.len().div_ceil(clients.len()).max(1);
    let jobs = ids.chunks(chunk).zip(clients).map(|(ids, client)| async move {
        for vm_id in ids {
            delete_vm(client, vm_id).await?;
        }
        Ok::<_, String>(())
    });
    futures::future::try_join_all(jobs).await.map(drop)
}

/// A number from `/proc/<pid>/status`, such as `VmRSS` (in KiB) or `Threads`.
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

/// The daemon's resident set in KiB: the median of five readings 100 ms apart.
fn daemon_rss_kib(daemon: &Daemon) -> u64 {
    let Some(pid) = daemon.pid() else { return 0 };
    let mut readings: Vec<u64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            status_field(pid, "VmRSS").unwrap_or(0)
        })
        .collect();
    readings.sort_unstable();
    readings[readings.len() / 2]
}

fn daemon_threads(daemon: &Daemon) -> u64 {
    daemon.pid().and_then(|pid| status_field(pid, "Threads")).unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Live (not zombie) processes whose cgroup path names `parent`.
/// The VMMs in cgroups under `parent`; the jail pool's waiting children are not VMMs.
fn processes_in_cgroup(parent: &str) -> Vec<u32> {
    let needle = format!("/{parent}/");
    let pool = format!("/{parent}/{}", metald_testguest::JAIL_POOL_PREFIX);
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_string_lossy().parse().ok()?;
            let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            (cgroups.contains(&needle) && !cgroups.contains(&pool) && !zombie).then_some(pid)
        })
        .collect()
}

/// Deletes every network namespace of `prefix` (with the firewall table
/// and links inside them).
fn remove_namespaces(prefix: Option<&str>) {
    for name in prefix.map(metald_testguest::network_namespaces).unwrap_or_default() {
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
}

fn fxhash(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

/// A plain blocking HTTP/1.1 GET on loopback: its status.
fn blocking_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (in clock ticks) so far of the host, the daemon, its VMMs and
/// this bench, to tell who kept the CPUs busy between two snapshots.
#[derive(Debug, Clone, Default)]
struct CpuSnapshot {
    host_idle: u64,
    host_total: u64,
    daemon: u64,
    bench: u64,
    vmms: std::collections::BTreeMap<u32, u64>,
}

impl CpuSnapshot {
    fn take(daemon: &Daemon) -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> =
            stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
        let field = |index: usize| fields.get(index).copied().unwrap_or(0);
        Self {
            host_idle: field(3) + field(4),
            host_total: fields.iter().take(8).sum(),
            daemon: daemon.pid().and_then(process_ticks).unwrap_or(0),
            bench: process_ticks(std::process::id()).unwrap_or(0),
            vmms: daemon.vmms().into_iter().filter_map(|pid| Some((pid, process_ticks(pid)?))).collect(),
        }
    }

    /// Shares of the whole host (100% = every CPU busy) since `earlier`.
    fn shares_since(&self, earlier: &Self) -> String {
        let total = self.host_total.saturating_sub(earlier.host_total).max(1) as f64;
        let share = |ticks: u64| 100.0 * ticks as f64 / total;
        let busy = 100.0 - share(self.host_idle.saturating_sub(earlier.host_idle));
        let vmms = share(self.vmms.iter().filter_map(|(pid, ticks)| Some(ticks.saturating_sub(*earlier.vmms.get(pid)?))).sum());
        let daemon = share(self.daemon.saturating_sub(earlier.daemon));
        let bench = share(self.bench.saturating_sub(earlier.bench));
        format!(
            "host CPUs {busy:.0}% busy (100% = all CPUs): VMMs {vmms:.0}%, metald {daemon:.0}%, \
             this bench's client {bench:.0}%, everything else {:.0}%",
            (busy - vmms - daemon - bench).max(0.0)
        )
    }
}

/// A process's user and system time in clock ticks, all its threads included.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Who keeps the CPUs busy while nobody calls.
fn idle_cpu(daemon: &Daemon, window: Duration) -> String {
    let before = CpuSnapshot::take(daemon);
    std::thread::sleep(window);
    CpuSnapshot::take(daemon).shares_since(&before)
}

fn requirements() -> Option<PathBuf> {
    let firecracker = metald_benches::firecracker_on_kvm()?;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benchmark skipped: metald runs its VMMs with its jailer, which needs root");
        return None;
    }
    Some(firecracker)
}

/// `$METALD_BIN`, else the workspace's release build, else its debug build.
fn metald_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(METALD_BIN_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("${METALD_BIN_ENV} names {}, which is not a file; {BUILD_IT}", path.display()))
        };
    }
    let target = metald_testguest::workspace_root().join("target");
    ["release", "debug"].iter().map(|profile| target.join(profile).join("metald")).find(|path| path.is_file()).ok_or_else(|| {
        format!(
            "no metald binary: ${METALD_BIN_ENV} is unset and neither {0}/release/metald nor {0}/debug/metald exists; {BUILD_IT}",
            target.display()
        )
    })
}

/// The newest modification time of the Rust sources the daemon is built from.
fn newest_daemon_source() -> Option<SystemTime> {
    fn newest(dir: &Path) -> Option<SystemTime> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|entry| {
                let path = entry.path();
                if path.is_dir() {
                    newest(&path)
                } else if path.extension().is_some_and(|extension| extension == "rs") {
                    entry.metadata().and_then(|metadata| metadata.modified()).ok()
                } else {
                    None
                }
            })
            .max()
    }
    let root = metald_testguest::workspace_root();
    ["bins/metald/src", "metald-core/src", "metald-api/src", "metald-net/src", "metald-billing/src"]
        .iter()
        .filter_map(|crate_src| newest(&root.join(crate_src)))
        .max()
}

fn print_conditions(binary: &Path, firecracker: &Path) {
    println!("\nmetald API bench: conditions");
    println!("  daemon binary: {}", binary.display());
    if binary.components().any(|part| part.as_os_str() == "debug") {
        println!("  NOTE: a debug build; its figures are not representative ({BUILD_IT})");
    }
    let built = std::fs::metadata(binary).and_then(|metadata| metadata.modified()).ok();
    if let (Some(built), Some(source)) = (built, newest_daemon_source())
        && source > built
    {
        println!("  NOTE: the daemon's sources changed after this binary was built ({BUILD_IT})");
    }
    println!("  firecracker: {}", firecracker.display());
    let cpus = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = |field: &str| meminfo.lines().find(|line| line.starts_with(field)).map(|line| line.trim().to_owned()).unwrap_or_default();
    println!("  host: {cpus} CPUs, {}, {}", memory("MemTotal"), memory("MemAvailable"));
    println!("  load average: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("  kernel: {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim());
}

/// The daemon's resident memory before any VM, once every client's
/// connection is open and each path was served once, so that it holds
/// what any serving daemon holds.
fn serving_baseline(runtime: &tokio::runtime::Runtime, daemon: &Daemon, callers: &[Callers]) -> u64 {
    let rss_at_ready = daemon_rss_kib(daemon);
    runtime.block_on(async {
        for caller in callers {
            for _ in 0..20 {
                Probe::Health.call(caller, &Fleet::default(), 0).await.unwrap_or_else(|error| panic!("{error}"));
                list_vms(&caller.connect, 0, 0).await.unwrap_or_else(|error| panic!("{error}"));
            }
        }
    });
    let (rss, threads) = (daemon_rss_kib(daemon), daemon_threads(daemon));
    println!(
        "
metald VmRSS at /ready: {rss_at_ready} KiB ({}); serving, before any VM (rss_0): {rss} KiB ({}), {threads} threads",
        mib(rss_at_ready),
        mib(rss)
    );
    rss
}

/// Phase 3, on the daemon that holds the Created VMs of phase 1's set-up:
/// its resident memory before and with 200 more VMs running. Returns them.
fn memory_per_vm(runtime: &tokio::runtime::Runtime, daemon: &Daemon, clients: &[Client]) -> Vec<String> {
    let (rss_before, threads_before) = (daemon_rss_kib(daemon), daemon_threads(daemon));
    let started = Instant::now();
    let (running, _) =
        runtime.block_on(create_vms(clients, RUNNING_VMS, true)).unwrap_or_else(|error| panic!("booting {RUNNING_VMS} VMs: {error}"));
    let took = started.elapsed();
    let all_running = runtime.block_on(async {
        let request = wire::ListVmsRequest { state_filter: vec![VmState::VM_STATE_RUNNING.into()], page_size: 1000, ..Default::default() };
        clients[0].list_vms(request).await.map(|response| response.view().total_count).map_err(|error| refused("ListVms", &error))
    });
    std::thread::sleep(Duration::from_secs(1));
    let (rss_with_vms, threads_with_vms) = (daemon_rss_kib(daemon), daemon_threads(daemon));
    let vmms = daemon.vmms();
    let vmm_rss: u64 = vmms.iter().filter_map(|pid| status_field(*pid, "VmRSS")).sum();
    let per_vm = rss_with_vms.saturating_sub(rss_before) as f64 / RUNNING_VMS as f64;
    let idle = idle_cpu(daemon, Duration::from_secs(2));

    println!(
        "\ndaemon memory per managed VM ({RUNNING_VMS} VMs created, booted and at their ready line from {CLIENTS} clients in {:.1} s):",
        took.as_secs_f64()
    );
    println!("  VMs Running per ListVms: {}", all_running.map_or_else(|error| error, |count| count.to_string()));
    println!("  metald VmRSS before they ran (rss_c):   {:>8} KiB ({}), {threads_before} threads", rss_before, mib(rss_before));
    println!(
        "  metald VmRSS with {RUNNING_VMS} running (rss_r):    {:>8} KiB ({}), {threads_with_vms} threads",
        rss_with_vms,
        mib(rss_with_vms)
    );
    println!("  metald per running VM: (rss_r - rss_c) / {RUNNING_VMS} = {per_vm:.1} KiB");
    println!(
        "  for context, NOT the daemon's: {} VMM processes hold {} in all, {:.1} KiB per VMM (guest memory touched so far included)",
        vmms.len(),
        mib(vmm_rss),
        vmm_rss as f64 / vmms.len().max(1) as f64
    );
    println!("  over 2 s with the {RUNNING_VMS} guests idle and no calls: {idle}");
    running
}

/// Creates (without booting) `HELD_VMS - RUNNING_VMS` VMs from all clients
/// on a host that runs no guest: the `CreateVm` latencies and creates per
/// second, and the daemon's memory per Created VM against `rss_0`.
fn create_held(runtime: &tokio::runtime::Runtime, daemon: &Daemon, clients: &[Client], rss_0: u64) -> Vec<String> {
    let count = HELD_VMS - RUNNING_VMS;
    let started = Instant::now();
    let (created, create_times) =
        runtime.block_on(create_vms(clients, count, false)).unwrap_or_else(|error| panic!("creating {count} VMs: {error}"));
    let took = started.elapsed();
    let rss_after = daemon_rss_kib(daemon);
    println!(
        "\n{count} VMs created (not booted, no guest running) from {CLIENTS} clients in {:.1} s ({:.0} creates/s)",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64()
    );
    let tenth = (create_times.len() / 10).max(1);
    let (first, last) = (&create_times[..tenth], &create_times[create_times.len().saturating_sub(tenth)..]);
    let all = Latencies::of(create_times.clone());
    println!("  CreateVm, all {count}:          {}", all.summary());
    println!("  CreateVm, first {tenth} to end:  {}", Latencies::of(first.to_vec()).summary());
    println!("  CreateVm, last {tenth} to end:   {}", Latencies::of(last.to_vec()).summary());
    println!("  CreateVm p99 / p50: {:.2}", ratio(all.percentile(99), all.percentile(50)));
    println!(
        "  metald VmRSS with {count} VMs: {} KiB ({}), {} threads; (rss - rss_0) / {count} = {:.1} KiB per Created VM; {} VMM processes",
        rss_after,
        mib(rss_after),
        daemon_threads(daemon),
        rss_after.saturating_sub(rss_0) as f64 / count as f64,
        daemon.vmms().len()
    );
    created
}

/// The daemon now holds `HELD_VMS`: its memory per VM against `rss_0`;
/// then all but a few of the running ones are paused.
fn hold_vms(
    runtime: &tokio::runtime::Runtime,
    daemon: &Daemon,
    clients: &[Client],
    created: Vec<String>,
    mut running: Vec<String>,
    rss_0: u64,
) -> Fleet {
    let rss = daemon_rss_kib(daemon);
    let held = created.len() + running.len();
    println!(
        "\nthe daemon holds {held} VMs ({} Created, {} Running): VmRSS {rss} KiB ({}); (rss - rss_0) / {held} = {:.1} KiB per VM",
        created.len(),
        running.len(),
        mib(rss),
        rss.saturating_sub(rss_0) as f64 / held.max(1) as f64
    );
    let paused = running.split_off(RUNNING_DURING_LATENCY.min(running.len()));
    runtime.block_on(pause_vms(clients, &paused)).unwrap_or_else(|error| panic!("pausing: {error}"));
    println!("  {} of the {RUNNING_VMS} running VMs paused for the next phases; {} keep running", paused.len(), running.len());
    Fleet { running, paused, created }
}

/// Phase 1a: each kind of call `CALLS` times, one after another from one
/// client, all kinds in the same rounds (the order rotating each round).
fn latencies(runtime: &tokio::runtime::Runtime, daemon: &Daemon, callers: &Callers, fleet: &Fleet) {
    let idle = idle_cpu(daemon, Duration::from_secs(1));
    let kinds = Probe::ALL.len();
    let samples = runtime.block_on(async {
        // One pass over every VM first: each VMM's API connection is then open.
        for (turn, _) in fleet.created.iter().enumerate() {
            Probe::InfoCreated.call(callers, fleet, turn).await?;
        }
        for (turn, _) in fleet.running.iter().enumerate() {
            Probe::InfoRunning.call(callers, fleet, turn).await?;
        }
        for round in 0..WARM_UP_CALLS {
            for offset in 0..kinds {
                let probe = Probe::ALL[(round + offset) % kinds];
                if round % probe.every() == 0 {
                    probe.call(callers, fleet, round).await?;
                }
            }
        }
        let before = CpuSnapshot::take(daemon);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(CALLS); kinds];
        for round in 0..CALLS {
            for offset in 0..kinds {
                let kind = (round + offset) % kinds;
                let probe = Probe::ALL[kind];
                if round % probe.every() != 0 {
                    continue;
                }
                let started = Instant::now();
                probe.call(callers, fleet, round / probe.every()).await?;
                samples[kind].push(started.elapsed());
            }
        }
        Ok::<_, String>((samples, CpuSnapshot::take(daemon).shares_since(&before)))
    });
    let (samples, during) = samples.unwrap_or_else(|error| panic!("latency phase: {error}"));
    let measured: Vec<(Probe, Latencies)> = Probe::ALL.into_iter().zip(samples.into_iter().map(Latencies::of)).collect();

    println!(
        "\nAPI latency with {} VMs held ({} Running, {} Paused, {} Created), one client, sequential calls, \
         Connect binary protobuf over HTTP/1.1 keep-alive unless said:",
        fleet.len(),
        fleet.running.len(),
        fleet.paused.len(),
        fleet.created.len()
    );
    println!("  over 1 s before, no calls: {idle}");
    println!("  during the measured rounds: {during}");
    for (probe, latencies) in &measured {
        println!("  {:<26} {}", probe.label(), latencies.summary());
    }
    let p50 = |wanted: Probe| {
        measured.iter().find(|(probe, _)| *probe == wanted).map(|(_, latencies)| latencies.percentile(50)).unwrap_or_default()
    };
    let health = p50(Probe::Health);
    println!("  ratios of p50 to p50(GET /health) = {}:", ms3(health));
    for probe in Probe::ALL.into_iter().filter(|probe| *probe != Probe::Health) {
        println!("    {:<26} {:.2}", probe.label(), ratio(p50(probe), health));
    }
}

/// Phase 1b: `CLIENTS` clients, each with its own connection, calling as
/// fast as they are answered for `THROUGHPUT_WINDOW`.
fn throughput(runtime: &tokio::runtime::Runtime, daemon: &Daemon, fleet: &Fleet) {
    let fleet = Arc::new(fleet.clone());
    let callers: Vec<Callers> = (0..CLIENTS).map(|_| daemon.callers().unwrap_or_else(|error| panic!("{error}"))).collect();
    println!(
        "\nthroughput, {CLIENTS} clients at once for {:.0} s each (client and daemon share the host's CPUs):",
        THROUGHPUT_WINDOW.as_secs_f64()
    );
    let mut health_rate = 0.0;
    for probe in [Probe::Health, Probe::InfoCreated, Probe::InfoRunning, Probe::ListDefaultPage] {
        let (rate, latencies) = runtime
            .block_on(calls_per_second(&callers, &fleet, probe))
            .unwrap_or_else(|error| panic!("throughput of {}: {error}", probe.label()));
        if probe == Probe::Health {
            health_rate = rate;
        }
        println!(
            "  {:<26} {:>8.0} calls/s ({:.2} of /health)  {}",
            probe.label(),
            rate,
            rate / health_rate.max(f64::EPSILON),
            latencies.summary()
        );
    }
}

async fn calls_per_second(callers: &[Callers], fleet: &Arc<Fleet>, probe: Probe) -> Result<(f64, Latencies), String> {
    for (index, caller) in callers.iter().enumerate() {
        for turn in 0..20 {
            probe.call(caller, fleet, index * 100 + turn).await?;
        }
    }
    let started = Instant::now();
    let deadline = started + THROUGHPUT_WINDOW;
    let tasks: Vec<_> = callers
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, caller)| {
            let fleet = Arc::clone(fleet);
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut turn = index * 97;
                while Instant::now() < deadline {
                    let call_started = Instant::now();
                    probe.call(&caller, &fleet, turn).await?;
                    samples.push(call_started.elapsed());
                    turn += 1;
                }
                Ok::<_, String>(samples)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.map_err(|error| format!("client task: {error}"))??);
    }
    let elapsed = started.elapsed();
    Ok((all.len() as f64 / elapsed.as_secs_f64(), Latencies::of(all)))
}

/// Deletes the whole fleet, forced, from all clients at once.
fn delete_fleet(runtime: &tokio::runtime::Runtime, daemon: &Daemon, clients: &[Client], fleet: Fleet) {
    let ids: Vec<String> = fleet.running.into_iter().chain(fleet.paused).chain(fleet.created).collect();
    let started = Instant::now();
    runtime.block_on(delete_vms(clients, &ids)).unwrap_or_else(|error| panic!("deleting the fleet: {error}"));
    let took = started.elapsed();
    let rss = daemon_rss_kib(daemon);
    println!(
        "\n{} VMs deleted (forced) from {CLIENTS} clients in {:.1} s ({:.0} deletes/s); metald VmRSS after: {} KiB ({}), {} threads",
        ids.len(),
        took.as_secs_f64(),
        ids.len() as f64 / took.as_secs_f64(),
        rss,
        mib(rss),
        daemon_threads(daemon)
    );
}

/// Phase 2: create+boot to the ready line through the API against raw
/// Firecracker with the same guest, on the now empty daemon, and on a
/// second daemon with networking on, whose VMs each get an interface (a
/// network namespace, TAP, bridge port and firewall elements); the raw
/// baseline has none.
fn create_boot(c: &mut Criterion, runtime: &tokio::runtime::Runtime, client: &Client, networked_callers: &Callers, raw_host: &BenchHost) {
    let (api, api_networked, raw) = (&ApiBoots::default(), &ApiBoots::default(), &Recorder::default());
    let (api_first_of_tenant, api_warm_pool) = (&ApiBoots::default(), &ApiBoots::default());
    let networked = &networked_callers.connect;
    let mut group = c.benchmark_group("api_create_boot_to_ready");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    group.bench_function("raw_firecracker_no_api", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(runtime, iterations, |index| async move {
                let took = raw_host.raw_boot(index).await.unwrap_or_else(|error| panic!("raw boot: {error}"));
                raw.record(took);
                took
            })
        })
    });
    group.bench_function("metald_api_connect_proto", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(runtime, iterations, |_| async move {
                let (phases, vm_id) = api_boot_to_ready(client, false).await.unwrap_or_else(|error| panic!("API boot: {error}"));
                delete_vm(client, &vm_id).await.unwrap_or_else(|error| panic!("{error}"));
                api.record(phases);
                phases.total()
            })
        })
    });
    let networked_group =
        |group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, name: &str, recorder: &ApiBoots, warm_pool: bool| {
            group.bench_function(name, |bencher| {
                bencher.iter_custom(|iterations| {
                    timed_iterations(runtime, iterations, |_| async move {
                        if warm_pool {
                            jail_pool_full(networked_callers).await.unwrap_or_else(|error| panic!("{error}"));
                        }
                        let (phases, vm_id) = api_boot_to_ready(networked, true)
                            .await
                            .unwrap_or_else(|error| panic!("API boot with a network interface: {error}"));
                        delete_vm(networked, &vm_id).await.unwrap_or_else(|error| panic!("{error}"));
                        recorder.record(phases);
                        phases.total()
                    })
                })
            });
        };
    // Alone, each VM is its tenant's first: its create also makes the
    // tenant's bridge and firewall chain. With one more VM of the tenant
    // held, it measures the usual case, a tenant that already runs VMs.
    // Back to back, each create empties the jail pool and finds the child
    // refilled during the create before (and its VMM starts while the next
    // is made): the steady state of sustained creates. The warm group waits,
    // untimed, for a full pool before each create: a host between bursts.
    networked_group(&mut group, "metald_api_connect_proto_networked_first_of_tenant", api_first_of_tenant, false);
    let anchor = runtime.block_on(create_vm_with(networked, true)).unwrap_or_else(|error| panic!("the tenant's held VM: {error}"));
    networked_group(&mut group, "metald_api_connect_proto_networked", api_networked, false);
    networked_group(&mut group, "metald_api_connect_proto_networked_warm_pool", api_warm_pool, true);
    runtime.block_on(delete_vm(networked, &anchor)).unwrap_or_else(|error| panic!("{error}"));
    group.finish();

    let raw_median = raw.median();
    println!("\ncreate+boot to ready, same guest, same run:");
    println!("  firecracker --no-api --config-file: median {} over {} boots", ms(raw_median), raw.samples().len());
    let poll = READY_POLL.as_millis();
    api.report(&format!("metald API (CreateVm, BootVm, GetConsole every {poll} ms until ready; jailed)"), "metald API / raw", raw_median);
    api_networked.report(
        "metald API, each VM with a network interface (netns, TAP, bridge port, firewall elements)",
        "metald API with a network interface / raw (which has none)",
        raw_median,
    );
    api_first_of_tenant.report(
        "the same, each VM its tenant's first (the create also makes the tenant's bridge and chain)",
        "metald API, tenant's first VM with a network interface / raw",
        raw_median,
    );
    api_warm_pool.report(
        "the same (not the tenant's first), each create finding the jail pool full",
        "metald API with a network interface, warm jail pool / raw",
        raw_median,
    );
}

/// Waits until the daemon's jail pool is full again (its `/metrics`).
async fn jail_pool_full(callers: &Callers) -> Result<(), String> {
    let deadline = Instant::now() + POOL_REFILL_TIMEOUT;
    loop {
        let text = http_get(&callers.transport, &callers.metrics).await?;
        let text = String::from_utf8_lossy(&text);
        let value = |name: &str| text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
        match (value("metald_jail_pool_ready"), value("metald_jail_pool_size")) {
            (Some(ready), Some(size)) if ready >= size => return Ok(()),
            (None, _) | (_, None) => return Err("the daemon's /metrics has no metald_jail_pool_ready or _size".into()),
            _ if Instant::now() > deadline => return Err(format!("the jail pool was not refilled within {POOL_REFILL_TIMEOUT:?}")),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Nothing held, nothing left, and what the daemon itself counted as failed.
fn final_checks(runtime: &tokio::runtime::Runtime, daemon: &Daemon, callers: &Callers, label: &str) {
    let (held, metrics) = runtime.block_on(async {
        let held = callers.connect.list_vms(wire::ListVmsRequest::default()).await.map(|response| response.view().total_count);
        (held, http_get(&callers.transport, &callers.metrics).await)
    });
    println!("\nafter the run, {label}:");
    let rss = daemon_rss_kib(daemon);
    println!("  metald VmRSS: {rss} KiB ({}), {} threads", mib(rss), daemon_threads(daemon));
    println!("  VMs the daemon still holds: {}", held.map_or_else(|error| refused("ListVms", &error), |count| count.to_string()));
    let left = daemon.leftovers();
    println!("  leftovers on the host: {}", if left.is_empty() { "none".to_owned() } else { left.join(", ") });
    match metrics {
        Ok(text) => {
            let text = String::from_utf8_lossy(&text);
            let failed: Vec<&str> = text
                .lines()
                .filter(|line| {
                    (line.starts_with("metald_rpc_duration_seconds_count{") && !line.contains("code=\"ok\""))
                        || line.starts_with("metald_backend_errors_total{")
                })
                .collect();
            println!("  calls the daemon counted as failed: {}", if failed.is_empty() { "none".to_owned() } else { failed.join("; ") });
        }
        Err(error) => println!("  /metrics unreadable: {error}"),
    }
    let log = daemon.log();
    let notable: Vec<&str> = log.lines().filter(|line| line.contains(" WARN ") || line.contains(" ERROR ")).collect();
    println!("  warnings and errors in the daemon's log: {}", notable.len());
    for line in notable.iter().take(5) {
        println!("    {line}");
    }
}

fn api(c: &mut Criterion) {
    let Some(firecracker) = requirements() else { return };
    let binary = metald_binary().unwrap_or_else(|reason| panic!("{reason}"));
    let Some(raw_host) = BenchHost::unjailed() else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|error| panic!("tokio runtime: {error}"));
    print_conditions(&binary, &firecracker);
    let daemon = Daemon::start(&binary, &firecracker, false).unwrap_or_else(|error| panic!("{error}"));
    let callers: Vec<Callers> = (0..CLIENTS).map(|_| daemon.callers().unwrap_or_else(|error| panic!("{error}"))).collect();
    let clients: Vec<Client> = callers.iter().map(|caller| caller.connect.clone()).collect();

    let rss_0 = serving_baseline(&runtime, &daemon, &callers);
    let created = create_held(&runtime, &daemon, &clients, rss_0);
    let running = memory_per_vm(&runtime, &daemon, &clients);
    let fleet = hold_vms(&runtime, &daemon, &clients, created, running, rss_0);
    latencies(&runtime, &daemon, &callers[0], &fleet);
    throughput(&runtime, &daemon, &fleet);
    delete_fleet(&runtime, &daemon, &clients, fleet);
    let networked = Daemon::start(&binary, &firecracker, true).unwrap_or_else(|error| panic!("networked daemon: {error}"));
    let networked_caller = networked.callers().unwrap_or_else(|error| panic!("{error}"));
    create_boot(c, &runtime, &clients[0], &networked_caller, &raw_host);
    final_checks(&runtime, &daemon, &callers[0], "the daemon without networking");
    final_checks(&runtime, &networked, &networked_caller, "the daemon with networking");
}

criterion_group!(benches, api);
criterion_main!(benches);
