//! Helpers shared by the benchmarks: a scratch host with the test guest in
//! its image root, a manager on the real Firecracker, the raw baseline
//! (`firecracker --no-api --config-file`), and reporting of medians and
//! ratios measured in the same run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metald_core::config::MIB;
use metald_core::jailer::JailerConfig;
use metald_core::operations::{Boot, Delete, Info};
use metald_core::{CreateVm, FirecrackerBackend, FirecrackerConfig, StopOptions, TenantId, VmConfig, VmId, VmManager};
use metald_testguest::console;
use tokio::io::{AsyncBufReadExt, BufReader};

pub const GUEST_KERNEL: &str = "testguest.elf";
pub const GUEST_MEMORY_MIB: u64 = 32;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A scratch folder with an image root and a VM root, and a manager on them.
/// A jailed host's VMs get cgroups under a parent of its own, removed with it.
#[derive(Debug)]
pub struct BenchHost {
    pub dir: tempfile::TempDir,
    pub firecracker: PathBuf,
    pub manager: VmManager,
    /// Declared after the manager, so it goes after the manager's jail pool.
    _cgroup_parent: Option<CgroupParent>,
}

/// The cgroup parent of one bench host; dropping it removes it.
#[derive(Debug)]
struct CgroupParent(String);

impl CgroupParent {
    fn new() -> Self {
        static HOSTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let host = HOSTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(format!("metald-test-bench-{}-{host}", std::process::id()))
    }

    /// `jail` with its VMs' cgroups under this parent.
    fn holding(&self, jail: JailerConfig) -> JailerConfig {
        JailerConfig { cgroup_parent: PathBuf::from(&self.0), ..jail }
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        metald_testguest::remove_cgroup_parent(&self.0);
    }
}

impl BenchHost {
    /// A host whose VMMs are jailed (the default); `None`, with the reason
    /// printed, when KVM or Firecracker is missing.
    pub fn new() -> Option<Self> {
        Self::on(true)
    }

    /// A host whose VMMs run without a jail, the raw baseline of the jail's cost.
    pub fn unjailed() -> Option<Self> {
        Self::on(false)
    }

    /// A jailed host whose jailer keeps `pool_size` children ready.
    pub fn pooled(pool_size: usize) -> Option<Self> {
        Self::with_jail(Some(JailerConfig { pool_size, ..JailerConfig::default() }))
    }

    /// Waits, untimed, until the jail pool holds as many ready children as its size.
    pub async fn pool_refilled(&self) {
        let full = || self.manager.jail_pool_fill().is_none_or(|fill| fill.ready >= fill.size);
        let deadline = Instant::now() + READY_TIMEOUT;
        while !full() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn on(jailed: bool) -> Option<Self> {
        Self::with_jail(jailed.then(JailerConfig::default))
    }

    fn with_jail(jail: Option<JailerConfig>) -> Option<Self> {
        let firecracker = firecracker_on_kvm()?;
        let vmm = FirecrackerConfig::new(&firecracker);
        let (backend, cgroup_parent): (Arc<dyn metald_core::VmmBackend>, _) = match jail {
            Some(jail) => {
                let parent = CgroupParent::new();
                match FirecrackerBackend::jailed(vmm, parent.holding(jail)) {
                    Ok(backend) => (Arc::new(backend), Some(parent)),
                    Err(error) => {
                        eprintln!("benchmark skipped: {}", metald_core::error_chain(&error));
                        return None;
                    }
                }
            }
            None => (Arc::new(FirecrackerBackend::unjailed(vmm)), None),
        };
        Self::with_backend(firecracker, backend, cgroup_parent)
    }

    /// A host whose VMs run on a jailed Cloud Hypervisor, the binary
    /// `METALD_CLOUD_HYPERVISOR_BIN` names; `None`, saying why, without one.
    /// A binary built from source is dynamically linked: its jail exposes
    /// its libraries.
    pub fn cloud_hypervisor() -> Option<(Self, PathBuf)> {
        let firecracker = firecracker_on_kvm()?;
        let Some(binary) = std::env::var_os(metald_testguest::CLOUD_HYPERVISOR_ENV).map(PathBuf::from) else {
            eprintln!("benchmark skipped: {} names no Cloud Hypervisor binary", metald_testguest::CLOUD_HYPERVISOR_ENV);
            return None;
        };
        let cgroup_parent = CgroupParent::new();
        let jail = cgroup_parent.holding(JailerConfig { expose_program_libraries: true, ..JailerConfig::default() });
        let backend = match metald_core::CloudHypervisorBackend::jailed(metald_core::CloudHypervisorConfig::new(&binary), jail) {
            Ok(backend) => Arc::new(backend),
            Err(error) => {
                eprintln!("benchmark skipped: {}", metald_core::error_chain(&error));
                return None;
            }
        };
        Some((Self::with_backend(firecracker, backend, Some(cgroup_parent))?, binary))
    }

    fn with_backend(firecracker: PathBuf, backend: Arc<dyn metald_core::VmmBackend>, cgroup_parent: Option<CgroupParent>) -> Option<Self> {
        let dir = tempfile::Builder::new().prefix("metald-bench-").tempdir().ok()?;
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).ok()?;
        std::fs::copy(metald_testguest::kernel_path(), images.join(GUEST_KERNEL)).ok()?;
        let builder = VmManager::builder().backend(backend).image_root(&images).vm_root(dir.path().join("vms"));
        let manager = match builder.build() {
            Ok(manager) => manager,
            Err(error) => {
                eprintln!("benchmark skipped: {}", metald_core::error_chain(&error));
                return None;
            }
        };
        Some(Self { dir, firecracker, manager, _cgroup_parent: cgroup_parent })
    }

    pub fn guest_config(&self) -> VmConfig {
        let mut config = VmConfig::default();
        config.cpu.vcpu_count = 1;
        config.memory.size_bytes = GUEST_MEMORY_MIB * MIB;
        config.boot.kernel_path = GUEST_KERNEL.into();
        config
    }

    /// Create through the library, not booted.
    pub async fn library_create(&self) -> Result<VmId, String> {
        let tenant = TenantId::new("bench").map_err(|error| error.to_string())?;
        self.manager
            .create(CreateVm { vm_id: None, tenant, config: self.guest_config() })
            .await
            .map_err(|error| metald_core::error_chain(&error))
    }

    /// Create and boot through the library, until the guest's ready line.
    /// Returns the time that took and the VM, still running.
    pub async fn library_boot(&self) -> Result<(Duration, VmId), String> {
        let (phases, vm_id) = self.library_boot_phases().await?;
        Ok((phases.total(), vm_id))
    }

    /// [`BenchHost::library_boot`], timing each of its phases.
    pub async fn library_boot_phases(&self) -> Result<(BootPhases, VmId), String> {
        let started = Instant::now();
        let tenant = TenantId::new("bench").map_err(|error| error.to_string())?;
        let vm_id = self
            .manager
            .create(CreateVm { vm_id: None, tenant, config: self.guest_config() })
            .await
            .map_err(|error| metald_core::error_chain(&error))?;
        let created = Instant::now();
        self.manager.run(&vm_id, Boot).await.map_err(|error| metald_core::error_chain(&error))?;
        let booted = Instant::now();
        let console_log = self.manager.console(&vm_id).map_err(|error| error.to_string())?;
        console_log.wait_for_line(|line| line.starts_with(console::READY), READY_TIMEOUT).await.map_err(|error| error.to_string())?;
        let phases = BootPhases { create: created - started, boot: booted - created, to_ready: booted.elapsed() };
        Ok((phases, vm_id))
    }

    /// How long each step of a VM's VMM launch took.
    pub async fn launch_timings(&self, vm_id: &VmId) -> Vec<(&'static str, Duration)> {
        match self.manager.run(vm_id, Info).await {
            Ok(info) => info.vmm.map(|vmm| vmm.launch_timings).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    pub async fn library_delete(&self, vm_id: &VmId) -> Result<(), String> {
        self.manager.run(vm_id, Delete(StopOptions { force: true, timeout: None })).await.map_err(|error| metald_core::error_chain(&error))
    }

    /// The whole lifecycle through the library: create, boot, ready line, delete.
    pub async fn library_lifecycle(&self) -> Result<(), String> {
        let (_, vm_id) = self.library_boot().await?;
        self.library_delete(&vm_id).await
    }

    /// The baseline: `firecracker --no-api --config-file` with the same guest,
    /// from spawn to the ready line on its stdout. The VMM is killed after.
    pub async fn raw_boot(&self, index: u64) -> Result<Duration, String> {
        let config_path = self.raw_config(index)?;
        let mut command = tokio::process::Command::new(&self.firecracker);
        command.args(["--no-api", "--config-file"]).arg(&config_path);
        let result = time_to_ready(command).await;
        let _ = std::fs::remove_file(&config_path);
        result
    }

    /// `cloud-hypervisor --kernel … --cmdline … --serial tty --console off`
    /// with the same guest, unjailed, until its ready line.
    pub async fn raw_cloud_hypervisor_boot(&self, binary: &Path) -> Result<Duration, String> {
        let kernel = self.dir.path().join("images").join(GUEST_KERNEL);
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("--kernel")
            .arg(&kernel)
            .args(["--cmdline", "", "--serial", "tty", "--console", "off", "--cpus", "boot=1"])
            .args(["--memory", &format!("size={GUEST_MEMORY_MIB}M")]);
        time_to_ready(command).await
    }

    fn raw_config(&self, index: u64) -> Result<PathBuf, String> {
        let kernel = self.dir.path().join("images").join(GUEST_KERNEL);
        let config = serde_json::json!({
            "boot-source": { "kernel_image_path": kernel, "boot_args": "" },
            "drives": [],
            "machine-config": { "vcpu_count": 1, "mem_size_mib": GUEST_MEMORY_MIB, "smt": false }
        });
        let path = self.dir.path().join(format!("raw-{index}.json"));
        std::fs::write(&path, config.to_string()).map_err(|error| error.to_string())?;
        Ok(path)
    }

    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

/// How long each phase of a create+boot to the ready line took.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootPhases {
    /// `create` until it returned (the VMM launched and configured).
    pub create: Duration,
    /// `Boot` until it returned (the VMM told to start).
    pub boot: Duration,
    /// From then until the guest's ready line was read.
    pub to_ready: Duration,
}

impl BootPhases {
    pub fn total(&self) -> Duration {
        self.create + self.boot + self.to_ready
    }
}

/// Starts `command` and times it until the guest's ready line on its
/// stdout, then kills it.
async fn time_to_ready(mut command: tokio::process::Command) -> Result<Duration, String> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("spawning {:?}: {error}", command.as_std().get_program()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait_ready = async {
        while let Some(line) = lines.next_line().await.map_err(|error| error.to_string())? {
            if line.starts_with(console::READY) {
                return Ok(started.elapsed());
            }
        }
        Err("the VMM exited before the ready line".to_string())
    };
    let result = tokio::time::timeout(READY_TIMEOUT, wait_ready).await.map_err(|_| "no ready line in time".to_string())?;
    let _ = child.kill().await;
    result
}

/// Runs `once` for each of criterion's `iterations` on `runtime` and sums
/// the time each run reports (setup and cleanup inside `once` are not counted).
pub fn timed_iterations<F, Fut>(runtime: &tokio::runtime::Runtime, iterations: u64, mut once: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Duration>,
{
    runtime.block_on(async {
        let mut total = Duration::ZERO;
        for index in 0..iterations {
            total += once(index).await;
        }
        total
    })
}

/// Durations recorded from inside criterion's closures, for reporting our
/// own medians and ratios once both sides of a comparison have run.
#[derive(Debug, Default)]
pub struct Recorder(std::sync::Mutex<Vec<Duration>>);

impl Recorder {
    pub fn record(&self, took: Duration) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(took);
    }

    pub fn samples(&self) -> Vec<Duration> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn median(&self) -> Duration {
        median(&self.samples())
    }
}

/// The median of some durations.
pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// The host's CPU time (every core, user and system, interrupts included;
/// idle, I/O wait and steal not) since it was taken: what some work cost
/// the machine, not how long it took. On a host whose cores are all busy,
/// throughput is bound by this cost, whatever the latency.
#[derive(Debug, Clone, Copy)]
pub struct HostCpu {
    busy_ticks: u64,
}

impl HostCpu {
    pub fn now() -> Option<Self> {
        Some(Self { busy_ticks: busy_ticks()? })
    }

    /// The CPU time the host spent since `self`, or zero when `/proc/stat`
    /// could not be read.
    pub fn spent(&self) -> Duration {
        let ticks = busy_ticks().unwrap_or(self.busy_ticks).saturating_sub(self.busy_ticks);
        Duration::from_secs_f64(ticks as f64 / procfs::ticks_per_second().max(1) as f64)
    }

    /// How many cores the host's CPU time is shared out over.
    pub fn cores() -> usize {
        std::thread::available_parallelism().map(usize::from).unwrap_or(1)
    }
}

fn busy_ticks() -> Option<u64> {
    let total = <procfs::KernelStats as procfs::CurrentSI>::current().ok()?.total;
    Some(total.user + total.nice + total.system + total.irq.unwrap_or(0) + total.softirq.unwrap_or(0))
}

/// A duration in milliseconds with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// The Firecracker binary, when it and KVM are usable; otherwise `None`,
/// after saying why the benchmark is skipped.
pub fn firecracker_on_kvm() -> Option<PathBuf> {
    if let Err(reason) = metald_testguest::kvm_usable() {
        eprintln!("benchmark skipped: {reason}");
        return None;
    }
    match metald_testguest::firecracker_binary() {
        Ok(path) => Some(path),
        Err(reason) => {
            eprintln!("benchmark skipped: {reason}");
            None
        }
    }
}

/// Sorted durations of one kind of call.
#[derive(Debug, Clone, Default)]
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    /// The nearest-rank percentile.
    pub fn percentile(&self, percent: usize) -> Duration {
        let rank = (percent * self.0.len()).div_ceil(100).max(1);
        self.0.get(rank - 1).copied().unwrap_or_default()
    }

    pub fn mean(&self) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.0.iter().map(Duration::as_secs_f64).sum::<f64>() / self.0.len() as f64)
    }

    pub fn summary(&self) -> String {
        format!(
            "p50 {:>9}  p99 {:>9}  mean {:>9}  min {:>9}  max {:>9}  (n={})",
            ms3(self.percentile(50)),
            ms3(self.percentile(99)),
            ms3(self.mean()),
            ms3(self.0.first().copied().unwrap_or_default()),
            ms3(self.0.last().copied().unwrap_or_default()),
            self.0.len()
        )
    }
}

/// A duration in milliseconds with three decimals, for sub-millisecond calls.
pub fn ms3(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1000.0)
}

/// How many times `baseline` `ours` took.
pub fn ratio(ours: Duration, baseline: Duration) -> f64 {
    ours.as_secs_f64() / baseline.as_secs_f64().max(f64::EPSILON)
}

/// The prefix of what one bench run names on the host (network
/// namespaces): `metald-bench-<pid>-<random>-`. It first removes what runs
/// that no longer live left under such names: a run that aborts (a panic
/// that cannot unwind, such as a write to a closed stdout) cannot clean up
/// after itself, and its pid in the name tells it is gone.
pub fn run_prefix() -> String {
    for name in metald_testguest::network_namespaces(RUN_PREFIX) {
        let owner = name.strip_prefix(RUN_PREFIX).and_then(|rest| rest.split('-').next()).and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !metald_testguest::process_alive(pid)) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    format!("{RUN_PREFIX}{}-{}-", std::process::id(), &VmId::generate().as_str()[3..11])
}

const RUN_PREFIX: &str = "metald-bench-";
