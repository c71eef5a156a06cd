//! A real metald for each test: the binary `bins/metald` builds, started
//! on a free loopback port with a data folder, image root, uid window,
//! cgroup parent and (when asked) network namespaces of its own, all under
//! a unique `metald-test-` name. Dropping it kills the daemon and every
//! VMM it started and removes what they made, also when the test failed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, HttpClient};
use metald_api::proto::vmprovisioner::v1 as wire;
use sha2::Digest;

pub use metald_testguest as testguest;

pub mod cgroups;
pub mod otlp;

pub const GUEST_KERNEL: &str = "testguest.elf";
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
pub type Client = wire::VmServiceClient<HttpClient>;

/// How a client talks to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    ConnectJson,
    ConnectProto,
    Grpc,
    GrpcWeb,
}

/// One tenant of the test daemon: its id, token and TOML quota line.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub id: &'static str,
    pub token: String,
    pub quota: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    pub tenants: Vec<(&'static str, &'static str)>,
    pub network: bool,
    pub billing: bool,
    /// Deliver usage straight into the ClickHouse at this URL instead of the file sink.
    pub clickhouse_url: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub uid_count: Option<u32>,
    pub vmm_api_timeout_seconds: Option<u64>,
    /// Export traces over OTLP/HTTP to this URL.
    pub otlp_endpoint: Option<String>,
    /// Take calls from a gateway signing with [`GATEWAY_SECRET`].
    pub gateway: bool,
    /// The meter's period instead of its default.
    pub meter_period_ms: Option<u64>,
    /// FAILPOINTS for the first start (the daemon the tests build has them).
    pub fail_points: Option<String>,
    /// A folder put first on the daemon's PATH (a stand-in `nft`, for one).
    pub path_first: Option<PathBuf>,
    /// `api.drain_timeout_seconds` instead of its default.
    pub drain_timeout_seconds: Option<u64>,
    /// More `[api]` settings, as TOML lines.
    pub api_settings: Option<&'static str>,
    /// Offer Cloud Hypervisor too, this binary (its jail exposes its libraries: a build from source is dynamic).
    pub cloud_hypervisor: Option<PathBuf>,
    /// The `[capacity]` settings, as TOML lines.
    pub capacity: Option<&'static str>,
    /// The quota of a tenant that only a gateway names (`auth.gateway.default_quota`), as TOML.
    pub gateway_default_quota: Option<&'static str>,
    /// Fleet mode: tenant calls only through the gateway (`auth.gateway.required`).
    pub gateway_required: bool,
    /// TLS on the port (`[api.tls]`): certificate, key and, for mTLS, the CA of client certificates.
    pub tls: Option<HostTls>,
    /// Announce the host to the gateway at this URL under this name, every second (`[announce]`).
    pub announce_to: Option<(String, String)>,
}

/// Files for `[api.tls]`.
#[derive(Debug, Clone, Default)]
pub struct HostTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

pub const GATEWAY_SECRET: &str = "test-gateway-secret-of-more-than-32-bytes";

pub struct Host {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub config_path: PathBuf,
    pub port: u16,
    pub tenants: Vec<TestTenant>,
    /// The host operator's token, which opens OperatorService.
    pub operator_token: String,
    child: Option<Child>,
    starts: u32,
    pub cgroup_parent: String,
    pub uid_start: u32,
    pub uid_count: u32,
    /// The prefix of this test's network namespaces, and its host namespace's name.
    pub netns_prefix: Option<String>,
    /// FAILPOINTS for the next start, e.g. `jail-before-sync=pause`.
    pub fail_points: Option<String>,
    path_first: Option<PathBuf>,
    /// Whether the port speaks TLS.
    pub tls: bool,
    /// This test's hold on its uid window, for as long as the host lives.
    _uid_claim: nix::fcntl::Flock<std::fs::File>,
}

const UID_SLOT: u32 = 512;
const UID_SLOTS: u32 = 2_000;

/// A uid window no other test host holds, from any test process: a slot
/// found from the name's hash on, whose lock file this test keeps locked.
/// (A daemon's own lock on its window lasts only while it runs, so between
/// a test's restarts another test could take a window found by hash alone.)
fn claim_uid_window(name: &str) -> (u32, nix::fcntl::Flock<std::fs::File>) {
    let claims = Path::new("/run/metald-test");
    std::fs::create_dir_all(claims).unwrap();
    let first = fxhash(name) % UID_SLOTS;
    for slot in (first..UID_SLOTS).chain(0..first) {
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(claims.join(format!("uids-{slot}.lock"))).unwrap();
        if let Ok(held) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            return (1_300_000 + slot * UID_SLOT, held);
        }
    }
    panic!("every test uid window is taken");
}

/// The nftables table of the test host `name`.
fn nft_table_of(name: &str) -> String {
    format!("mdt{:08x}", fxhash(name))
}

fn fxhash(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

impl Host {
    /// A running daemon for `test`, or `None` (outside CI) when Firecracker or KVM is missing.
    pub fn start(test: &str, options: HostOptions) -> Option<Self> {
        let firecracker = testguest::require_firecracker(test)?;
        if !metald_binary().exists() {
            return testguest::unmet(test, "the metald binary is not built (cargo build -p metald)");
        }
        if !nix::unistd::geteuid().is_root() {
            return testguest::unmet(test, "the daemon tests run metald with its jailer, which needs root");
        }
        let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
        let name = dir.path().file_name().unwrap().to_string_lossy().into_owned();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::copy(testguest::kernel_path(), images.join(GUEST_KERNEL)).unwrap();
        let uid_count = options.uid_count.unwrap_or(256);
        assert!(uid_count <= UID_SLOT, "a test host's uid window is at most {UID_SLOT} uids");
        let (uid_start, uid_claim) = claim_uid_window(&name);
        let tenants: Vec<TestTenant> = if options.tenants.is_empty() { vec![("acme", "{}")] } else { options.tenants.clone() }
            .into_iter()
            .map(|(id, quota)| TestTenant { id, token: format!("test-token-{id}-{}", metald_core::VmId::generate()), quota })
            .collect();
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nimage_root = {:?}\nfirecracker = {:?}\nstop_timeout_seconds = 10\nvmm_api_timeout_seconds = {}\n\
             [telemetry]\nlog = \"info,metald=debug,metald_core=debug\"\n[jailer]\nuid_start = {uid_start}\nuid_count = {uid_count}\ncgroup_parent = {name:?}\n",
            dir.path().join("data"),
            images,
            firecracker,
            options.vmm_api_timeout_seconds.unwrap_or(10),
        );
        if let Some(binary) = &options.cloud_hypervisor {
            toml =
                format!("cloud_hypervisor = {binary:?}\n{toml}").replacen("[jailer]\n", "[jailer]\nexpose_program_libraries = true\n", 1);
        }
        if let Some(endpoint) = &options.otlp_endpoint {
            toml = toml.replacen("[telemetry]\n", &format!("[telemetry]\notlp_endpoint = {endpoint:?}\n"), 1);
        }
        toml.push_str("[api]\n");
        if let Some(bytes) = options.max_body_bytes {
            toml.push_str(&format!("max_body_bytes = {bytes}\n"));
        }
        if let Some(seconds) = options.drain_timeout_seconds {
            toml.push_str(&format!("drain_timeout_seconds = {seconds}\n"));
        }
        if let Some(lines) = options.api_settings {
            toml.push_str(lines);
        }
        if let Some(tls) = &options.tls {
            toml.push_str(&format!("[api.tls]\ncert_file = {:?}\nkey_file = {:?}\n", tls.cert_file, tls.key_file));
            if let Some(ca) = &tls.client_ca_file {
                toml.push_str(&format!("client_ca_file = {ca:?}\n"));
            }
        }
        toml.push_str(&format!("[billing]\nenabled = {}\nmax_batch_age_ms = 200\n", options.billing));
        if let Some(period) = options.meter_period_ms {
            toml.push_str(&format!("meter_period_ms = {period}\n"));
        }
        if let Some(url) = &options.clickhouse_url {
            toml.push_str(&format!("sink = \"clickhouse\"\nclickhouse_url = {url:?}\n"));
        }
        let mut netns_prefix = None;
        if options.network {
            let prefix = format!("metald-test-{:08x}-", fxhash(&name));
            let host_netns = format!("{prefix}host");
            let status = Command::new("ip").args(["netns", "add", &host_netns]).status().unwrap();
            assert!(status.success(), "ip netns add {host_netns}");
            toml.push_str(&format!(
                "[network]\nenabled = true\nipv6_prefix = \"fd6d:7465:7374::/48\"\nhost_netns = \"/run/netns/{host_netns}\"\n\
                 netns_prefix = {prefix:?}\nlink_prefix = \"t{:04x}\"\nnft_table = {:?}\n",
                fxhash(&name) % 0xffff,
                nft_table_of(&name),
            ));
            netns_prefix = Some(prefix);
        } else {
            toml.push_str("[network]\nenabled = false\n");
        }
        let operator_token = format!("test-operator-token-{}", metald_core::VmId::generate());
        toml.push_str(&format!("[auth]\noperator_token_sha256 = [{:?}]\n", hex::encode(sha2::Sha256::digest(operator_token.as_bytes()))));
        for tenant in &tenants {
            let hash = hex::encode(sha2::Sha256::digest(tenant.token.as_bytes()));
            toml.push_str(&format!("[[auth.tenants]]\nid = {:?}\ntoken_sha256 = {hash:?}\nquota = {}\n", tenant.id, tenant.quota));
        }
        if options.gateway {
            let secret_file = dir.path().join("gateway.secret");
            std::fs::write(&secret_file, GATEWAY_SECRET).unwrap();
            let quota = options.gateway_default_quota.unwrap_or("{ max_vms = 1 }");
            toml.push_str(&format!(
                "[auth.gateway]\nsecret_file = {secret_file:?}\ndefault_quota = {quota}\nrequired = {}\n",
                options.gateway_required
            ));
        }
        // Test guests are tiny and mostly idle: a host's default vCPU capacity would cap the storms.
        toml.push_str(&format!("[capacity]\n{}\n", options.capacity.unwrap_or("vcpus = 4096")));
        // An announced host says its URL, so its port is chosen now.
        let port = match &options.announce_to {
            Some((gateway, name)) => {
                let port = free_port();
                toml.push_str(&format!(
                    "[announce]\ngateways = [{gateway:?}]\nurl = \"http://127.0.0.1:{port}\"\nname = {name:?}\ninterval_seconds = 1\n"
                ));
                port
            }
            None => 0,
        };
        let config_path = dir.path().join("metald.toml");
        std::fs::write(&config_path, toml).unwrap();
        let mut host = Host {
            dir,
            name: name.clone(),
            config_path,
            port,
            tenants,
            operator_token,
            child: None,
            starts: 0,
            cgroup_parent: name,
            uid_start,
            uid_count,
            netns_prefix,
            fail_points: options.fail_points.clone(),
            path_first: options.path_first.clone(),
            tls: options.tls.is_some(),
            _uid_claim: uid_claim,
        };
        host.launch();
        Some(host)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("metald.{start}.log"))
    }

    /// Starts the daemon (again) and waits until it is ready. The first
    /// start picks a free port; later starts keep it.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "the daemon runs already");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
        let port = if self.port == 0 { free_port() } else { self.port };
        let mut command = Command::new(metald_binary());
        command.arg("--config").arg(&self.config_path).arg("--listen").arg(format!("127.0.0.1:{port}")).env("NO_COLOR", "1");
        if let Some(fail_points) = &self.fail_points {
            command.env("FAILPOINTS", fail_points);
        }
        if let Some(first) = &self.path_first {
            command.env("PATH", format!("{}:{}", first.display(), std::env::var("PATH").unwrap_or_default()));
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.port = port;
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let log_path = self.log_path(self.starts);
        if self.tls {
            // Plain HTTP cannot ask a TLS port for /ready; its callers wait for readiness their own way.
            wait_until_logged("metald", self.child.as_mut().unwrap(), &log_path, "metald listening");
        } else {
            wait_until_serving("metald", self.child.as_mut().unwrap(), self.port, &log_path);
        }
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status once the daemon is gone.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a running daemon");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait().unwrap()
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn token(&self, tenant: &str) -> &str {
        &self.tenants.iter().find(|t| t.id == tenant).unwrap_or_else(|| panic!("no test tenant {tenant}")).token
    }

    /// A generated client acting as `tenant`.
    pub fn client(&self, tenant: &str, wire_format: Wire) -> Client {
        self.client_with_token(Some(self.token(tenant)), wire_format)
    }

    pub fn client_with_token(&self, token: Option<&str>, wire_format: Wire) -> Client {
        self.client_with_deadline(token, wire_format, Duration::from_secs(60))
    }

    /// A client whose calls carry `deadline` (Connect's `connect-timeout-ms`,
    /// gRPC's `grpc-timeout`), which the daemon enforces.
    pub fn client_with_deadline(&self, token: Option<&str>, wire_format: Wire, deadline: Duration) -> Client {
        let (transport, config) = self.client_config(token, wire_format, deadline);
        wire::VmServiceClient::new(transport, config)
    }

    /// A client of the operator's service, with the operator's token.
    pub fn operator_client(&self) -> wire::OperatorServiceClient<HttpClient> {
        let (transport, config) = self.client_config(Some(&self.operator_token), Wire::ConnectProto, Duration::from_secs(60));
        wire::OperatorServiceClient::new(transport, config)
    }

    fn client_config(&self, token: Option<&str>, wire_format: Wire, deadline: Duration) -> (HttpClient, ClientConfig) {
        client_config(&self.url(), token, wire_format, deadline)
    }

    /// A client of the gateways' own service on this host; its calls need [`gateway_signed`].
    pub fn host_service_client(&self, token: Option<&str>) -> wire::HostServiceClient<HttpClient> {
        let (transport, config) = self.client_config(token, Wire::ConnectProto, Duration::from_secs(60));
        wire::HostServiceClient::new(transport, config)
    }

    /// Live VMM processes of this test (by their cgroup, or their path for unjailed ones).
    pub fn live_vmms(&self) -> Vec<u32> {
        testguest::vmm_processes(&self.data_dir(), Path::new(&self.cgroup_parent))
    }

    /// What a host reboot takes, for a daemon and VMMs that are gone
    /// already: every network namespace of the test (the host's own made
    /// anew, empty: no bridge, no nft table) and every VMM cgroup. The disk
    /// stays; the boot id does not change, which a real reboot would.
    pub fn simulate_reboot(&self) {
        assert!(self.child.is_none() && self.live_vmms().is_empty(), "a reboot ends metald and its VMMs first");
        for name in self.namespaces() {
            assert!(Command::new("ip").args(["netns", "delete", &name]).status().unwrap().success(), "ip netns delete {name}");
        }
        if let Some(prefix) = &self.netns_prefix {
            let host_netns = format!("{prefix}host");
            assert!(Command::new("ip").args(["netns", "add", &host_netns]).status().unwrap().success(), "ip netns add {host_netns}");
        }
        for parent in self.cgroup_parents() {
            for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten().filter(|entry| entry.path().is_dir()) {
                remove_cgroup_once_empty(&entry.path());
            }
        }
    }

    /// Whether the daemon's firewall table exists in the test's host namespace.
    pub fn nft_table_exists(&self) -> bool {
        let prefix = self.netns_prefix.as_ref().expect("a host with networking");
        let table = nft_table_of(&self.name);
        let output = Command::new("ip")
            .args(["netns", "exec", &format!("{prefix}host"), "nft", "list", "table", "bridge", &table])
            .output()
            .unwrap();
        output.status.success()
    }

    /// Every element of the firewall table's sets (`set: element`), as
    /// the VMs' ports put them there; none once every VM is deleted.
    pub fn nft_set_elements(&self) -> Vec<String> {
        let prefix = self.netns_prefix.as_ref().expect("a host with networking");
        let table = nft_table_of(&self.name);
        let output = Command::new("ip")
            .args(["netns", "exec", &format!("{prefix}host"), "nft", "-j", "list", "table", "bridge", &table])
            .output()
            .unwrap();
        assert!(output.status.success(), "nft list table: {}", String::from_utf8_lossy(&output.stderr));
        let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let mut elements = Vec::new();
        for object in listing["nftables"].as_array().into_iter().flatten() {
            let set = &object["set"];
            for element in set["elem"].as_array().into_iter().flatten() {
                elements.push(format!("{}: {element}", set["name"].as_str().unwrap_or("?")));
            }
        }
        elements
    }

    /// The cgroup parent's folders that exist, one per controller on v1.
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut parents: Vec<PathBuf> =
            ["cpu", "cpuacct", "memory", "pids"].iter().map(|controller| root.join(controller).join(&self.cgroup_parent)).collect();
        parents.push(root.join(&self.cgroup_parent));
        parents
    }

    /// CPU the kernel counted in the test's cgroup parent: cgroup v1's
    /// cpuacct and v2's cpu charge each ancestor too, so VMMs long gone and
    /// their cgroups removed are still in it. With the version: v2 counts in
    /// microseconds, so a reading of it may be up to 1 µs short per cgroup.
    pub fn cgroup_parent_cpu_ns(&self) -> Option<(u64, CgroupCounter)> {
        self.cgroup_parents().iter().find_map(|dir| cgroup_cpu_ns(dir))
    }

    fn namespaces(&self) -> Vec<String> {
        self.netns_prefix.as_deref().map(metald_testguest::network_namespaces).unwrap_or_default()
    }

    /// Everything the test's VMs left on the host: VMMs, VM folders,
    /// mounts, cgroups and network namespaces (the test's host namespace aside).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.live_vmms().into_iter().map(|pid| format!("process {pid}")).collect();
        if let Ok(entries) = std::fs::read_dir(self.data_dir().join("vms")) {
            left.extend(entries.flatten().map(|entry| format!("file {}", entry.path().display())));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(mounts.lines().filter(|line| line.contains(&self.name)).map(|line| format!("mount {line}")));
        // A running daemon keeps its jail pool's children ready; a stopped one leaves none.
        let running = self.child.is_some();
        if !running {
            left.extend(
                testguest::jail_pool_processes(Path::new(&self.cgroup_parent)).into_iter().map(|pid| format!("pool process {pid}")),
            );
        }
        for parent in self.cgroup_parents() {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                let pooled =
                    |entry: &std::fs::DirEntry| running && entry.file_name().to_string_lossy().starts_with(testguest::JAIL_POOL_PREFIX);
                left.extend(
                    entries.flatten().filter(|e| e.path().is_dir() && !pooled(e)).map(|e| format!("cgroup {}", e.path().display())),
                );
            }
        }
        let host_netns = self.netns_prefix.as_ref().map(|prefix| format!("{prefix}host"));
        left.extend(self.namespaces().into_iter().filter(|name| Some(name) != host_netns.as_ref()).map(|name| format!("netns {name}")));
        left
    }

    /// Usage records the file sink holds, in file order.
    /// Per VM, its usage records in sequence order: (sequence, start_ms, end_ms, final).
    pub fn usage_by_vm(&self) -> BTreeMap<String, Vec<(u64, u64, u64, bool)>> {
        let mut by_vm: BTreeMap<String, Vec<(u64, u64, u64, bool)>> = BTreeMap::new();
        for record in self.usage_records() {
            let entry = (
                record["sequence"].as_u64().unwrap(),
                record["start_ms"].as_u64().unwrap(),
                record["end_ms"].as_u64().unwrap(),
                record["final_record"].as_bool().unwrap(),
            );
            by_vm.entry(record["vm_id"].as_str().unwrap().to_owned()).or_default().push(entry);
        }
        by_vm
    }

    /// Waits until every stop so far is billed and delivered: the meter
    /// applies events at its ticks, so two more ticks take the stops' final
    /// records; then the spool empties into the sink.
    pub async fn wait_until_billed(&self) {
        let port = self.port;
        let ticks_now = meter_ticks(port);
        testguest::wait_until(
            "two meter ticks after the stops",
            Duration::from_secs(60),
            || async move { meter_ticks(port) >= ticks_now + 2 },
        )
        .await;
        testguest::wait_until("an empty spool", Duration::from_secs(60), || async move {
            http_get(port, "/metrics").is_some_and(|(_, body)| body.lines().any(|line| line == "metald_billing_spool_records 0"))
        })
        .await;
    }

    /// Waits until every VM in `vm_ids` has a record that ends after `after_ms`.
    pub fn wait_for_records_after(&self, vm_ids: &[String], after_ms: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let by_vm = self.usage_by_vm();
            let behind: Vec<&String> =
                vm_ids.iter().filter(|vm_id| !by_vm.get(*vm_id).is_some_and(|records| records.iter().any(|r| r.2 > after_ms))).collect();
            if behind.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "no usage records after {after_ms} for {behind:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn usage_records(&self) -> Vec<serde_json::Value> {
        self.json_lines("usage.jsonl")
    }

    /// The usage gaps the file sink wrote.
    pub fn usage_gaps(&self) -> Vec<serde_json::Value> {
        self.json_lines("usage.jsonl.gaps")
    }

    fn json_lines(&self, file: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.data_dir().join(file)).unwrap_or_default();
        testguest::finished_lines(&text).map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    /// Changes the configuration the next [`Host::launch`] reads.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let toml = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(&self.config_path, edit(toml)).unwrap();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        for pid in self.live_vmms() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        for parent in self.cgroup_parents() {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for entry in entries.flatten().filter(|entry| entry.path().is_dir()) {
                    for _ in 0..200 {
                        if std::fs::remove_dir(entry.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
        for name in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
        for file in jailer_lock_files(self.uid_start, self.uid_count, &self.cgroup_parent) {
            let _ = std::fs::remove_file(file);
        }
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "metald's last log ({}):\n{}", self.name, self.log());
        }
    }
}

/// The lock files a jailed daemon with this uid window and cgroup parent
/// holds in /run/metald while it runs (a daemon never removes them).
pub fn jailer_lock_files(uid_start: u32, uid_count: u32, cgroup_parent: &str) -> [PathBuf; 2] {
    let run = Path::new("/run/metald");
    [run.join(format!("uids-{uid_start}-{}.lock", uid_start + uid_count)), run.join(format!("cgroup-{cgroup_parent}.lock"))]
}

/// A VM's records (as [`Host::usage_by_vm`] gives them) are one chain: no
/// record missing or repeated, each starting where the one before ended.
pub fn assert_one_unbroken_chain(vm_id: &str, records: &[(u64, u64, u64, bool)]) {
    let sequences: Vec<u64> = records.iter().map(|r| r.0).collect();
    assert_eq!(sequences, (1..=records.len() as u64).collect::<Vec<_>>(), "{vm_id}: sequences");
    assert_contiguous(vm_id, records);
}

/// Each record follows the one before: the next sequence, starting where it ended.
pub fn assert_contiguous(vm_id: &str, records: &[(u64, u64, u64, bool)]) {
    for pair in records.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{vm_id}: record {} follows {}", pair[1].0, pair[0].0);
        assert_eq!(pair[1].1, pair[0].2, "{vm_id}: record {} starts where {} ended", pair[1].0, pair[0].0);
    }
}

/// The daemon: this package's binary for metald's own tests; for other
/// packages' tests (metalctl's, the gateway's, the benches'), the one the
/// same build put beside them.
pub fn metald_binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_metald") {
        Some(path) => PathBuf::from(path),
        None => {
            let test = std::env::current_exe().unwrap();
            // target/<profile>/deps/<test> → target/<profile>/metald
            test.parent().and_then(Path::parent).map(|profile| profile.join("metald")).unwrap()
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until the daemon `what` (the `child` writing its log to
/// `log_path`) answers `/ready` on `port`; fails at once if it exits first.
pub fn wait_until_serving(what: &str, child: &mut Child, port: u16, log_path: &Path) {
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited with {status} before it was ready; its log:\n{}", log());
        }
        if http_get(port, "/ready").is_some_and(|(status, _)| status == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} not ready after 30 s; its log:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the daemon `what` has written `line` to its log; fails at once if it exits first.
pub fn wait_until_logged(what: &str, child: &mut Child, log_path: &Path, line: &str) {
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains(line) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited with {status} before it logged {line:?}; its log:\n{}", log());
        }
        assert!(Instant::now() < deadline, "{what} did not log {line:?} within 30 s; its log:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client's transport and settings for `url` over `wire_format`, with `token` as its bearer.
pub fn client_config(url: &str, token: Option<&str>, wire_format: Wire, deadline: Duration) -> (HttpClient, ClientConfig) {
    let uri: http::Uri = url.parse().unwrap();
    let mut config = ClientConfig::new(uri).with_default_timeout(deadline);
    config = match wire_format {
        Wire::ConnectJson => config.with_protocol(Protocol::Connect).json(),
        Wire::ConnectProto => config.with_protocol(Protocol::Connect).proto(),
        Wire::Grpc => config.with_protocol(Protocol::Grpc).proto(),
        Wire::GrpcWeb => config.with_protocol(Protocol::GrpcWeb).proto(),
    };
    if let Some(token) = token {
        config = config.with_default_header("authorization", format!("Bearer {token}"));
    }
    let transport = match wire_format {
        Wire::Grpc => HttpClient::plaintext_http2_only(),
        _ => HttpClient::plaintext(),
    };
    (transport, config)
}

/// Call options that sign a call to `procedure` with `request` as the
/// test gateway does, for `tenant` ("" for the gateway itself).
pub fn gateway_signed(tenant: &str, procedure: &str, request: &impl buffa::Message) -> connectrpc::client::CallOptions {
    let secret = metald_api::gateway_auth::GatewaySecret::new(GATEWAY_SECRET.as_bytes().to_vec());
    secret
        .headers(tenant, procedure, Some(&request.encode_to_vec()), std::time::SystemTime::now())
        .into_iter()
        .fold(connectrpc::client::CallOptions::default(), |options, (name, value)| options.with_header(name, value))
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
/// Which cgroup file a CPU count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupCounter {
    /// cgroup v1 `cpuacct.usage`: nanoseconds.
    CpuacctNs,
    /// cgroup v2 `cpu.stat` `usage_usec`: microseconds.
    CpuStatUsec,
}

fn cgroup_cpu_ns(dir: &Path) -> Option<(u64, CgroupCounter)> {
    if let Ok(text) = std::fs::read_to_string(dir.join("cpuacct.usage")) {
        return text.trim().parse().ok().map(|ns| (ns, CgroupCounter::CpuacctNs));
    }
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let usec: u64 = stat.lines().find_map(|line| line.strip_prefix("usage_usec ")).and_then(|value| value.trim().parse().ok())?;
    Some((usec * 1000, CgroupCounter::CpuStatUsec))
}

/// The meter's ticks so far, from the daemon's /metrics.
pub fn meter_ticks(port: u16) -> u64 {
    let body = http_get(port, "/metrics").map(|(_, body)| body).unwrap_or_default();
    body.lines()
        .find_map(|line| line.strip_prefix("metald_billing_meter_ticks_total ").and_then(|value| value.trim().parse().ok()))
        .unwrap_or(0)
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, &[], b"")
}

/// A raw HTTP/1.1 request, for what a generated client would never send.
pub fn http_request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<(u16, String)> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    // A server may answer and close before reading all of a body it refuses.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Some((status, body))
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut payload = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        payload.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    payload
}

/// A test-guest VM: one vCPU, 32 MiB, the given command-line tokens.
pub fn guest_config(tokens: &[&str]) -> wire::VmConfig {
    wire::VmConfig {
        cpu: buffa::MessageField::some(wire::CpuConfig { vcpu_count: 1, ..Default::default() }),
        memory: buffa::MessageField::some(wire::MemoryConfig { size_bytes: 32 << 20, ..Default::default() }),
        boot: buffa::MessageField::some(wire::BootConfig {
            kernel_path: GUEST_KERNEL.into(),
            kernel_args: tokens.join(" "),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn create_request(config: wire::VmConfig) -> wire::CreateVmRequest {
    wire::CreateVmRequest { config: buffa::MessageField::some(config), ..Default::default() }
}

/// Polls the VM's console through the API until a line starts with `prefix`.
pub async fn wait_for_console(client: &Client, vm_id: &str, prefix: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let response = client
            .get_console(wire::GetConsoleRequest { vm_id: vm_id.into(), ..Default::default() })
            .await
            .expect("GetConsole")
            .into_owned();
        let text = String::from_utf8_lossy(&response.data).into_owned();
        // Only a whole line: the guest may be halfway through writing it.
        if let Some(line) = testguest::finished_lines(&text).find(|line| line.starts_with(prefix)) {
            return line.trim_end().to_owned();
        }
        assert!(Instant::now() < deadline, "VM {vm_id} never printed {prefix:?}; its console:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Creates and boots a test guest and waits for its ready line; its id.
pub async fn boot_guest(client: &Client, tokens: &[&str]) -> String {
    boot_config(client, guest_config(tokens)).await
}

/// Creates a VM of `config`, boots it and waits for its ready line; its id.
pub async fn boot_config(client: &Client, config: wire::VmConfig) -> String {
    let created = client.create_vm(create_request(config)).await.expect("CreateVm").into_owned();
    client.boot_vm(wire::BootVmRequest { vm_id: created.vm_id.clone(), ..Default::default() }).await.expect("BootVm");
    wait_for_console(client, &created.vm_id, testguest::console::READY).await;
    created.vm_id
}

pub async fn state_of(client: &Client, vm_id: &str) -> wire::VmState {
    let info =
        client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.into(), ..Default::default() }).await.expect("GetVmInfo").into_owned();
    info.state.as_known().expect("a known state")
}

/// Counts by key, for readable assertion messages.
pub fn tally<'a>(items: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.to_owned()).or_default() += 1;
    }
    counts
}

/// The pid of the VMM that runs `vm_id` now, found as an operator would:
/// by the VM's cgroup (`<parent>/<vm id>.<launch>`). Tenants are not told host pids.
pub fn vmm_pid(vm_id: &str) -> Option<u32> {
    let needle = format!("/{vm_id}.");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).ok()?;
        (cgroups.lines().any(|line| line.contains(&needle)) && testguest::process_alive(pid)).then_some(pid)
    })
}

/// The uid a process runs as.
pub fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|line| line.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().next()?.parse().ok()).unwrap()
}

/// Removes a cgroup whose tasks were killed: a task that has exited may
/// still be counted in its cgroup until the kernel has reaped it, and
/// until then rmdir answers EBUSY.
fn remove_cgroup_once_empty(cgroup: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::ResourceBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(error) => panic!("removing the cgroup {}: {error}", cgroup.display()),
        }
    }
}
