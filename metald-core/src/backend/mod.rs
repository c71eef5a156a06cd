//! The seam between the manager and a VMM: [`VmmBackend`] launches one VMM
//! process per VM and hands back a [`VmmInstance`] that drives it.
//!
//! The shape serves Firecracker (configured by many PUTs, exits on guest
//! reset, no reboot) and Cloud Hypervisor (one `vm.create` body, reboots in
//! place, hotplug) alike; what a backend cannot do it says in
//! [`Capabilities`] instead of failing late. Backends do not know the state
//! machine: the manager asks them only for moves the table allows.

pub mod cloud_hypervisor;
pub mod firecracker;
pub(crate) mod socket_api;
mod unlaunchable;
pub(crate) mod vmm_io;
pub(crate) mod vmm_usage;

pub use unlaunchable::Unlaunchable;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

pub use metald_types::DeviceCounters;

use crate::cgroups::{Cgroup, CgroupUsage};
use crate::config::RateLimit;
use crate::console::{ConsoleError, ConsoleLog};
use crate::ids::{TenantId, VmId};
use crate::images::ImageFile;
use crate::jailer::IdentityLease;
use crate::launch::{LaunchError, TakeoverTicket, VmmExit};
use crate::process::{ProcessError, ProcessExit};

/// What a backend can and cannot do, so callers can decide before asking.
/// The manager checks every VM's configuration against its backend's
/// capabilities before anything is made, naming the field it refuses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// The VMM can reboot a running guest itself. Without it the manager
    /// stops the VMM and boots a fresh one.
    pub reboot: bool,
    /// The guest can be asked to shut down (Ctrl+Alt+Del, ACPI power
    /// button). Without it every stop kills the VMM.
    pub graceful_shutdown: bool,
    /// A paused guest does not hear a request to shut down, so a graceful
    /// stop of a paused VM resumes it first (and says so in a `Resumed` event).
    pub graceful_stop_needs_running_guest: bool,
    /// The VMM can stop a guest's vCPUs and let them run again.
    pub pause: bool,
    /// vCPUs can be added while the guest runs, up to `cpu.max_vcpu_count`.
    pub cpu_hotplug: bool,
    /// The VMM takes a CPU topology (sockets, cores, threads); without it,
    /// only `cpu.features["smt"]`.
    pub cpu_topology: bool,
    /// Memory can be added while the guest runs, up to `memory.max_size_bytes`.
    pub memory_hotplug: bool,
    /// Receive and transmit limits can differ on one network interface.
    pub separate_rx_tx_rate_limits: bool,
    /// The most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// The I/O engines a drive may ask for (`storage[].options["io_engine"]`).
    pub io_engines: &'static [IoEngine],
    /// The cache modes a drive may ask for (`storage[].options["cache_type"]`).
    pub cache_modes: &'static [CacheMode],
    /// The bytes of kernel command line the guest can be given (its
    /// terminating NUL not counted).
    pub kernel_cmdline_capacity: usize,
    /// The most the VMM adds to the command line for each drive or network
    /// interface (Firecracker on x86: ` virtio_mmio.device=4K@0xd0000000:5`).
    pub kernel_cmdline_bytes_per_device: usize,
}

impl Capabilities {
    /// The names of what the VMM can do, for a caller to read: `reboot`
    /// (in place), `graceful_shutdown`, `pause`, `cpu_hotplug`,
    /// `cpu_topology`, `memory_hotplug`, `separate_rx_tx_rate_limits`.
    pub fn features(&self) -> Vec<&'static str> {
        [
            (self.reboot, "reboot"),
            (self.graceful_shutdown, "graceful_shutdown"),
            (self.pause, "pause"),
            (self.cpu_hotplug, "cpu_hotplug"),
            (self.cpu_topology, "cpu_topology"),
            (self.memory_hotplug, "memory_hotplug"),
            (self.separate_rx_tx_rate_limits, "separate_rx_tx_rate_limits"),
        ]
        .into_iter()
        .filter_map(|(has, name)| has.then_some(name))
        .collect()
    }
}

/// How a VMM does a drive's I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the VMM's own threads.
    Sync,
    /// Asynchronous I/O (io_uring).
    Async,
}

/// Whether a VMM honours a guest's flushes of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum CacheMode {
    /// Flushes are acknowledged without reaching the disk.
    Unsafe,
    /// Flushes reach the disk.
    Writeback,
}

impl IoEngine {
    pub const ALL: [IoEngine; 2] = [IoEngine::Sync, IoEngine::Async];

    /// Its name in a configuration: `Sync`, `Async`.
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Sync => "Sync",
            IoEngine::Async => "Async",
        }
    }
}

impl CacheMode {
    pub const ALL: [CacheMode; 2] = [CacheMode::Unsafe, CacheMode::Writeback];

    /// Its name in a configuration: `Unsafe`, `Writeback`.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Unsafe => "Unsafe",
            CacheMode::Writeback => "Writeback",
        }
    }
}

/// A drive as the VMM should see it: opened inside the image root (or, for
/// a writable drive, the VM's own copy).
#[derive(Debug, Clone)]
pub struct DriveSpec {
    pub id: String,
    pub image: ImageFile,
    pub read_only: bool,
    pub is_root_device: bool,
    /// The backend's default when `None`; one of its `Capabilities::io_engines` otherwise.
    pub io_engine: Option<IoEngine>,
    /// The backend's default when `None`; one of its `Capabilities::cache_modes` otherwise.
    pub cache: Option<CacheMode>,
}

/// A network interface backed by a TAP device that already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub id: String,
    pub tap_device: String,
    pub guest_mac: Option<String>,
    pub rx_rate_limit: Option<RateLimit>,
    pub tx_rate_limit: Option<RateLimit>,
}

/// Everything a backend needs to launch one VM's VMM. The manager has
/// validated and resolved every part of it.
#[derive(Debug, Clone)]
pub struct VmmSpec {
    pub vm_id: VmId,
    pub tenant: TenantId,
    pub cpu: CpuSpec,
    pub memory: MemorySpec,
    pub kernel: ImageFile,
    pub initrd: Option<ImageFile>,
    pub kernel_args: String,
    pub drives: Vec<DriveSpec>,
    pub interfaces: Vec<InterfaceSpec>,
    /// A folder of this VM's own: the backend keeps its socket, logs and
    /// console there. The manager creates it and removes it at delete.
    pub vm_dir: crate::vm_dir::VmDir,
    /// The VM's network namespace, if the network provider made one.
    pub netns: Option<Arc<OwnedFd>>,
    /// The user the VM's VMMs run as, leased for the VM's life (jailed backends).
    pub identity: Option<Arc<IdentityLease>>,
}

/// The guest's CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSpec {
    /// vCPUs the guest boots with.
    pub boot_vcpus: u32,
    /// vCPUs it may have, with hotplug; `boot_vcpus` without.
    pub max_vcpus: u32,
    /// Sockets × cores × threads = `max_vcpus`, when the VMM takes a topology.
    pub topology: Option<crate::config::CpuTopology>,
    /// Two threads per core, where the VMM takes no topology but this.
    pub smt: bool,
}

/// The guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySpec {
    /// Memory the guest boots with, in MiB.
    pub size_mib: u64,
    /// Memory that may be added while it runs, in MiB; 0 without hotplug.
    pub hotplug_mib: u64,
    /// Backed by 2 MiB huge pages.
    pub huge_pages: bool,
}

/// How to stop a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest, wait up to the timeout for the VMM to exit, then kill it.
    Graceful { timeout: Duration },
    /// Kill the VMM at once.
    Forced,
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// The guest did not go within the timeout and the VMM was killed.
    pub forced: bool,
    pub exit: ProcessExit,
}

/// What the VMM reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmmInfo {
    pub vmm: String,
    pub vmm_version: String,
    /// The VMM's own word for the VM's state (e.g. Firecracker's "Not started").
    pub vmm_state: String,
    /// Where the VMM runs on the host, the operator's business: its pid,
    /// the uid and gid it runs as when jailed, its cgroup folders (one per
    /// controller on cgroup v1). They tell how the host is laid out and
    /// how full it is, so an API shows a tenant none of them.
    pub pid: Option<u32>,
    pub identity: Option<(u32, u32)>,
    pub cgroup: Vec<PathBuf>,
    pub api_socket: Option<PathBuf>,
    /// Anything else worth showing a VM's owner, keyed for `backend_info`.
    pub extra: BTreeMap<String, String>,
    /// How long each step of the current VMM's launch took, in order.
    pub launch_timings: Vec<(&'static str, Duration)>,
}

/// Usage counters of one VM since its VMM started; all cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmmMetrics {
    /// CPU time of the VMM process (vCPUs plus device emulation).
    pub cpu_time_ns: u64,
    /// Resident memory of the VMM process, guest memory included.
    pub resident_bytes: u64,
    pub devices: DeviceCounters,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{vmm} cannot {operation}")]
    Unsupported { vmm: &'static str, operation: &'static str },
    #[error("{vmm} does not offer {feature}, which {field} asks for")]
    FeatureUnavailable { vmm: &'static str, feature: &'static str, field: &'static str },
    #[error("cannot prepare {what} at {path}")]
    Prepare {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the API socket path {path} is {len} bytes long; unix sockets take at most {max}")]
    SocketPathTooLong { path: PathBuf, len: usize, max: usize },
    #[error("cannot launch the VMM")]
    Launch(#[source] LaunchError),
    #[error("{vmm} exited before its API was ready: it {exit}{}", stderr_suffix(.stderr))]
    DiedBeforeReady { vmm: &'static str, exit: ProcessExit, stderr: String },
    #[error("{vmm}'s API socket did not answer within {timeout:?}")]
    NotReady { vmm: &'static str, timeout: Duration },
    #[error("{vmm} refused {method} {path} ({status}): {fault_message}")]
    Api { vmm: &'static str, method: &'static str, path: String, status: u16, fault_message: String },
    #[error("{vmm} API call {method} {path} failed")]
    Transport {
        vmm: &'static str,
        method: &'static str,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{vmm} API call {method} {path} got no answer within {timeout:?}")]
    Timeout { vmm: &'static str, method: &'static str, path: String, timeout: Duration },
    #[error("{vmm} exited while {operation}: it {exit}")]
    Exited { vmm: &'static str, operation: &'static str, exit: ProcessExit },
    #[error("the VMM is not running")]
    NotRunning,
    #[error("no VMM can be launched for this VM: {reason}")]
    Unlaunchable { reason: String },
    #[error("cannot signal the VMM")]
    Signal(#[source] ProcessError),
    #[error("cannot capture the console")]
    Console(#[source] ConsoleError),
    #[error("cannot take over the VMM process")]
    TakeOver(#[source] ProcessError),
    #[error("the process on the VM's API socket is {vmm} instance {found}, not {expected}")]
    NotTheSameVmm { vmm: &'static str, expected: String, found: String },
    #[error("cannot read {what} of process {pid}")]
    ProcessStats {
        what: &'static str,
        pid: u32,
        #[source]
        source: io::Error,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() { String::new() } else { format!("; its stderr ends with: {}", stderr.trim()) }
}

/// Launches VMMs of one kind.
#[async_trait]
pub trait VmmBackend: Send + Sync + fmt::Debug {
    /// A short name such as `firecracker`.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// The launcher its VMMs start through, when it uses one: the methods
    /// below about users and the host then ask it.
    fn launcher(&self) -> Option<&dyn crate::launch::Launcher> {
        None
    }

    /// The user a new VM's VMMs will run as, for its whole life; `None`
    /// when the backend does not run VMMs as a user of their own.
    fn lease_identity(&self) -> Result<Option<Arc<IdentityLease>>, BackendError> {
        self.launcher().map_or(Ok(None), |launcher| launcher.lease_identity().map_err(BackendError::Launch))
    }

    /// Starts the VMM for `spec` and configures it; the guest does not run
    /// until [`VmmInstance::boot`]. On error nothing is left running and
    /// nothing is left in `spec.vm_dir` but what the caller put there.
    async fn create(&self, spec: VmmSpec, console: ConsoleLog) -> Result<Box<dyn VmmInstance>, BackendError>;

    /// How many users the backend can give VMs and how many it has given;
    /// `None` when VMs do not get users of their own.
    fn identity_capacity(&self) -> Option<crate::jailer::IdentityCapacity> {
        self.launcher()?.identity_capacity()
    }

    /// Leases a known VM's user again after a restart of metald.
    fn take_over_identity(&self, uid: u32, gid: u32) -> Result<Option<Arc<IdentityLease>>, BackendError> {
        self.launcher().map_or(Ok(None), |launcher| launcher.take_over_identity(uid, gid).map_err(BackendError::Launch))
    }

    /// A VM with no VMM now (it was shut down or failed while metald was
    /// away); its next [`VmmInstance::boot`] launches one.
    fn unlaunched(&self, spec: VmmSpec, console: ConsoleLog) -> Box<dyn VmmInstance>;

    /// Takes over the VMM that `ticket` (from [`VmmInstance::ticket`])
    /// describes, once it is proven to be the same process and still runs.
    async fn take_over(&self, spec: VmmSpec, console: ConsoleLog, ticket: &TakeoverTicket) -> Result<Box<dyn VmmInstance>, BackendError>;

    /// Removes what a VMM that ended while nobody watched it left on the
    /// host (cgroup, jail folder); returns what could not be removed.
    fn clean_up_after(&self, ticket: &TakeoverTicket) -> Vec<String> {
        self.launcher().map(|launcher| launcher.clean_up_after(ticket)).unwrap_or_default()
    }

    /// Kills and removes what VMM launches of an earlier run left that no
    /// VM took over: everything of this backend's but the cgroups named in
    /// `in_use`. Called once, after every stored VM was taken over or
    /// found gone; returns what could not be removed.
    fn sweep_strays(&self, in_use: &std::collections::BTreeSet<String>) -> Vec<String> {
        self.launcher().map(|launcher| launcher.sweep_strays(in_use)).unwrap_or_default()
    }

    /// Removes what the backend set up on the host for all its VMs (cgroup
    /// parents), once it runs none; returns what could not be removed.
    fn release_host(&self) -> Vec<String> {
        self.launcher().map(|launcher| launcher.release_host()).unwrap_or_default()
    }

    /// Ends what the backend's launcher made ahead of launches (see
    /// [`crate::launch::Launcher::release_spares`]).
    fn release_spares(&self) -> Vec<String> {
        self.launcher().map(|launcher| launcher.release_spares()).unwrap_or_default()
    }
}

/// One VM's VMM, driven over its API.
#[async_trait]
pub trait VmmInstance: Send + Sync + fmt::Debug {
    /// The VMM process, while one runs.
    fn pid(&self) -> Option<u32>;

    /// The VMM's cgroup, while one runs in a jail.
    fn cgroup(&self) -> Option<Cgroup>;

    /// What a later metald needs to find the running VMM again and prove
    /// it is the same process (see [`VmmBackend::take_over`]); `None` when no
    /// VMM runs.
    fn ticket(&self) -> Option<TakeoverTicket>;

    /// What the last ended VMM's cgroup counted just before it was removed,
    /// handed out once.
    fn take_ended_usage(&mut self) -> Option<CgroupUsage>;

    /// A channel that changes once, when the current VMM process ends. A
    /// backend that relaunches its VMM (see [`VmmInstance::boot`]) hands out
    /// a new channel for the new process.
    fn exits(&self) -> Option<watch::Receiver<Option<VmmExit>>>;

    /// A count that goes up each time the guest rebooted inside the same
    /// VMM process (a guest reset under a VMM that reboots in place), for
    /// the manager to say so in a `Rebooted` event and keep `booted_at`
    /// true. `None` for a VMM whose guest reset ends the process.
    fn guest_reboots(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Starts the guest. When the VMM process has gone (a Firecracker guest
    /// that was shut down), a new one is launched and configured first.
    async fn boot(&mut self) -> Result<(), BackendError>;

    async fn pause(&mut self) -> Result<(), BackendError>;

    async fn resume(&mut self) -> Result<(), BackendError>;

    /// Stops the guest; afterwards no VMM process is left.
    async fn stop(&mut self, mode: StopMode) -> Result<StopOutcome, BackendError>;

    /// Reboots a running guest inside the same VMM, where the backend can.
    async fn reboot(&mut self) -> Result<(), BackendError>;

    async fn info(&self) -> Result<VmmInfo, BackendError>;

    async fn metrics(&mut self) -> Result<VmmMetrics, BackendError>;

    /// Kills the VMM if it still runs and removes every file the backend
    /// made. Safe to call more than once.
    async fn destroy(&mut self) -> Result<(), BackendError>;
}
