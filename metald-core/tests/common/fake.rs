//! A scriptable VMM backend for tests: no process, no KVM, no jail. A
//! [`FakeHost`] plays the machine the VMMs run on and outlives the managers
//! (a restart of metald is a new manager on the same host and store); a
//! test tells it which backend call fails next, kills a VMM, powers a
//! guest off or reboots it inside its VMM, and reads what is left running.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use metald_core::backend::{
    BackendError, CacheMode, Capabilities, IoEngine, StopMode, StopOutcome, VmmBackend, VmmInfo, VmmInstance, VmmMetrics, VmmSpec,
};
use metald_core::cgroups::{Cgroup, CgroupUsage};
use metald_core::console::ConsoleLog;
use metald_core::launch::{Layout, PlanFiles, TakeoverTicket, VmmExit};
use metald_core::process::ProcessExit;
use metald_core::uid_lease::{IdentityCapacity, IdentityLease, UidPool};

/// The fake's own name for its VMM.
pub const FAKE_VMM: &str = "fake";
/// A kernel command-line token: the guest does not act on a request to shut down.
pub const IGNORES_SHUTDOWN: &str = "fake.ignores_shutdown";
/// A kernel command-line token: the guest resets itself right after each boot.
pub const RESETS: &str = "fake.resets";

/// Firecracker-like: no in-place reboot, no hotplug, a paused guest must run to hear a shutdown.
pub fn firecracker_like() -> Capabilities {
    Capabilities {
        reboot: false,
        graceful_shutdown: true,
        graceful_stop_needs_running_guest: true,
        pause: true,
        cpu_hotplug: false,
        cpu_topology: false,
        memory_hotplug: false,
        separate_rx_tx_rate_limits: true,
        max_vcpus: 8,
        io_engines: &[IoEngine::Sync],
        cache_modes: &[CacheMode::Unsafe, CacheMode::Writeback],
        kernel_cmdline_capacity: 2047,
        kernel_cmdline_bytes_per_device: 40,
    }
}

/// Cloud Hypervisor-like: reboots in place, hotplug, topology, a paused guest hears a shutdown.
pub fn in_place_reboots() -> Capabilities {
    Capabilities {
        reboot: true,
        graceful_stop_needs_running_guest: false,
        cpu_hotplug: true,
        cpu_topology: true,
        memory_hotplug: true,
        separate_rx_tx_rate_limits: false,
        io_engines: &[IoEngine::Sync, IoEngine::Async],
        cache_modes: &[CacheMode::Writeback],
        ..firecracker_like()
    }
}

/// The backend calls a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Create,
    Boot,
    Pause,
    Resume,
    Stop,
    Reboot,
    Destroy,
    TakeOver,
    Metrics,
}

/// The machine the fake VMMs run on.
#[derive(Debug, Default)]
pub struct FakeHost {
    state: Mutex<HostState>,
}

#[derive(Debug, Default)]
struct HostState {
    next_pid: u32,
    vmms: HashMap<u32, FakeVmm>,
    failures: HashMap<Call, VecDeque<String>>,
    calls: HashMap<Call, u32>,
    /// VMMs (by pid) a takeover of is refused, with the refusal.
    refused_takeovers: HashMap<u32, String>,
}

#[derive(Debug)]
struct FakeVmm {
    start_time: u64,
    guest: &'static str,
    ignores_shutdown: bool,
    exits: watch::Sender<Option<VmmExit>>,
    reboots: watch::Sender<u64>,
    cpu_time_ns: u64,
}

impl FakeHost {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `call` fails with `message` as the VMM's refusal.
    pub fn fail_next(&self, call: Call, message: &str) {
        self.state().failures.entry(call).or_default().push_back(message.to_owned());
    }

    /// A takeover of the VMM with this pid is refused with `message`, the VMM running on.
    pub fn refuse_take_over(&self, pid: u32, message: &str) {
        self.state().refused_takeovers.insert(pid, message.to_owned());
    }

    /// How many times `call` was made.
    pub fn calls(&self, call: Call) -> u32 {
        self.state().calls.get(&call).copied().unwrap_or(0)
    }

    /// Pids of the VMMs that run.
    pub fn running(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.state().vmms.keys().copied().collect();
        pids.sort_unstable();
        pids
    }

    /// The VMM dies as `exit` says, as if killed from outside.
    pub fn kill(&self, pid: u32, exit: ProcessExit) {
        if let Some(vmm) = self.state().vmms.remove(&pid) {
            vmm.exits.send_replace(Some(VmmExit { status: exit, cause: None }));
        }
    }

    /// The guest powers itself off: its VMM exits cleanly.
    pub fn guest_powers_off(&self, pid: u32) {
        self.kill(pid, ProcessExit::Exited { code: 0 });
    }

    /// The guest resets and reboots inside the same VMM process.
    pub fn guest_reboots(&self, pid: u32) {
        if let Some(vmm) = self.state().vmms.get(&pid) {
            vmm.reboots.send_modify(|count| *count += 1);
        }
    }

    /// The state the VMM says its guest is in.
    pub fn guest(&self, pid: u32) -> Option<&'static str> {
        self.state().vmms.get(&pid).map(|vmm| vmm.guest)
    }

    /// Counts `call` and says whether a test made it fail this time.
    fn enter(&self, call: Call) -> Result<(), BackendError> {
        let mut state = self.state();
        *state.calls.entry(call).or_default() += 1;
        match state.failures.get_mut(&call).and_then(VecDeque::pop_front) {
            Some(fault_message) => {
                Err(BackendError::Api { vmm: FAKE_VMM, method: "PUT", path: format!("/{call:?}"), status: 400, fault_message })
            }
            None => Ok(()),
        }
    }

    fn spawn(&self, spec: &VmmSpec) -> Launched {
        let mut state = self.state();
        state.next_pid += 1;
        let pid = 4_000_000 + state.next_pid;
        let (exits, exit_receiver) = watch::channel(None);
        let (reboots, reboot_receiver) = watch::channel(0);
        let ignores_shutdown = spec.kernel_args.split_ascii_whitespace().any(|token| token == IGNORES_SHUTDOWN);
        let start_time = u64::from(pid) * 7;
        state.vmms.insert(pid, FakeVmm { start_time, guest: "Not started", ignores_shutdown, exits, reboots, cpu_time_ns: 0 });
        Launched { pid, start_time, exits: exit_receiver, reboots: reboot_receiver }
    }

    fn take_over(&self, ticket: &TakeoverTicket) -> Option<Launched> {
        let state = self.state();
        let vmm = state.vmms.get(&ticket.pid).filter(|vmm| vmm.start_time == ticket.start_time)?;
        Some(Launched { pid: ticket.pid, start_time: vmm.start_time, exits: vmm.exits.subscribe(), reboots: vmm.reboots.subscribe() })
    }

    fn set_guest(&self, pid: u32, guest: &'static str) -> Result<(), BackendError> {
        match self.state().vmms.get_mut(&pid) {
            Some(vmm) => {
                vmm.guest = guest;
                Ok(())
            }
            None => Err(BackendError::NotRunning),
        }
    }

    /// Ends the VMM as a stop in `mode` would: whether it was killed, and how it ended.
    fn stop(&self, pid: u32, mode: StopMode, paused_guest_hears: bool) -> Option<StopOutcome> {
        let vmm = self.state().vmms.remove(&pid)?;
        let hears = vmm.guest == "Running" || (vmm.guest == "Paused" && paused_guest_hears);
        let answers = matches!(mode, StopMode::Graceful { .. }) && !vmm.ignores_shutdown && hears;
        let outcome = if answers {
            StopOutcome { forced: false, exit: ProcessExit::Exited { code: 0 } }
        } else {
            StopOutcome { forced: true, exit: ProcessExit::Killed { signal: 9 } }
        };
        vmm.exits.send_replace(Some(VmmExit { status: outcome.exit, cause: None }));
        Some(outcome)
    }
}

/// A fake VMM that was started or taken over.
#[derive(Debug)]
struct Launched {
    pid: u32,
    start_time: u64,
    exits: watch::Receiver<Option<VmmExit>>,
    reboots: watch::Receiver<u64>,
}

/// A backend of fake VMMs on `host`.
#[derive(Debug)]
pub struct FakeBackend {
    name: &'static str,
    host: Arc<FakeHost>,
    capabilities: Capabilities,
    uids: UidPool,
}

impl FakeBackend {
    /// Its VMMs run as uids from `uids`, as a jailed backend's would.
    pub fn new(name: &'static str, host: &Arc<FakeHost>, capabilities: Capabilities, uids: std::ops::Range<u32>) -> Self {
        Self { name, host: Arc::clone(host), capabilities, uids: UidPool::new(uids, None) }
    }
}

#[async_trait]
impl VmmBackend for FakeBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    fn lease_identity(&self) -> Result<Option<Arc<IdentityLease>>, BackendError> {
        let lease = self.uids.lease().map_err(|error| BackendError::Launch(error.into()))?;
        Ok(Some(Arc::new(lease)))
    }

    async fn create(&self, spec: VmmSpec, console: ConsoleLog) -> Result<Box<dyn VmmInstance>, BackendError> {
        self.host.enter(Call::Create)?;
        let mut instance = FakeInstance::new(self, spec, console);
        instance.launched = Some(self.host.spawn(&instance.spec));
        Ok(Box::new(instance))
    }

    fn identity_capacity(&self) -> Option<IdentityCapacity> {
        self.uids.capacity()
    }

    fn take_over_identity(&self, uid: u32, gid: u32) -> Result<Option<Arc<IdentityLease>>, BackendError> {
        let lease = self.uids.take_over(uid, gid).map_err(|error| BackendError::Launch(error.into()))?;
        Ok(Some(Arc::new(lease)))
    }

    fn unlaunched(&self, spec: VmmSpec, console: ConsoleLog) -> Box<dyn VmmInstance> {
        Box::new(FakeInstance::new(self, spec, console))
    }

    async fn take_over(&self, spec: VmmSpec, console: ConsoleLog, ticket: &TakeoverTicket) -> Result<Box<dyn VmmInstance>, BackendError> {
        self.host.enter(Call::TakeOver)?;
        if let Some(fault_message) = self.host.state().refused_takeovers.get(&ticket.pid).cloned() {
            return Err(BackendError::Api { vmm: FAKE_VMM, method: "GET", path: "/".into(), status: 500, fault_message });
        }
        let Some(launched) = self.host.take_over(ticket) else {
            return Err(BackendError::Exited { vmm: FAKE_VMM, operation: "being taken over", exit: ProcessExit::Unknown });
        };
        let mut instance = FakeInstance::new(self, spec, console);
        instance.launched = Some(launched);
        Ok(Box::new(instance))
    }

    fn clean_up_after(&self, _ticket: &TakeoverTicket) -> Vec<String> {
        Vec::new()
    }

    /// The fake has no cgroups: a VMM no VM took over is one whose takeover was refused.
    fn sweep_strays(&self, _in_use: &BTreeSet<String>) -> Vec<String> {
        let refused: Vec<u32> = self.host.state().refused_takeovers.drain().map(|(pid, _)| pid).collect();
        for pid in refused {
            self.host.kill(pid, ProcessExit::Killed { signal: 9 });
        }
        Vec::new()
    }
}

/// One VM's fake VMM.
#[derive(Debug)]
struct FakeInstance {
    name: &'static str,
    host: Arc<FakeHost>,
    spec: VmmSpec,
    launched: Option<Launched>,
    capabilities: Capabilities,
}

impl FakeInstance {
    fn new(backend: &FakeBackend, spec: VmmSpec, _console: ConsoleLog) -> Self {
        Self { name: backend.name, host: Arc::clone(&backend.host), spec, launched: None, capabilities: backend.capabilities.clone() }
    }

    fn pid_or_not_running(&self) -> Result<u32, BackendError> {
        self.launched.as_ref().map(|launched| launched.pid).ok_or(BackendError::NotRunning)
    }
}

#[async_trait]
impl VmmInstance for FakeInstance {
    fn pid(&self) -> Option<u32> {
        self.launched.as_ref().map(|launched| launched.pid)
    }

    fn cgroup(&self) -> Option<Cgroup> {
        None
    }

    fn ticket(&self) -> Option<TakeoverTicket> {
        let launched = self.launched.as_ref()?;
        let layout = Layout::unjailed(&self.spec.vm_dir, &PlanFiles { exposures: &[], work_files: &[] });
        Some(TakeoverTicket { pid: launched.pid, start_time: launched.start_time, layout, cgroup: None })
    }

    fn take_ended_usage(&mut self) -> Option<CgroupUsage> {
        None
    }

    fn exits(&self) -> Option<watch::Receiver<Option<VmmExit>>> {
        self.launched.as_ref().map(|launched| launched.exits.clone())
    }

    fn guest_reboots(&self) -> Option<watch::Receiver<u64>> {
        self.launched.as_ref().map(|launched| launched.reboots.clone())
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        self.host.enter(Call::Boot)?;
        // A VM whose VMM ended gets a new one, as Firecracker's does.
        let alive = self.launched.as_ref().is_some_and(|launched| self.host.guest(launched.pid).is_some());
        if !alive {
            self.launched = Some(self.host.spawn(&self.spec));
        }
        let pid = self.pid_or_not_running()?;
        self.host.set_guest(pid, "Running")?;
        if self.spec.kernel_args.split_ascii_whitespace().any(|token| token == RESETS) {
            let (host, in_place) = (Arc::clone(&self.host), self.capabilities.reboot);
            tokio::spawn(async move { if in_place { host.guest_reboots(pid) } else { host.guest_powers_off(pid) } });
        }
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.host.enter(Call::Pause)?;
        self.host.set_guest(self.pid_or_not_running()?, "Paused")
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.host.enter(Call::Resume)?;
        self.host.set_guest(self.pid_or_not_running()?, "Running")
    }

    async fn stop(&mut self, mode: StopMode) -> Result<StopOutcome, BackendError> {
        self.host.enter(Call::Stop)?;
        let launched = self.launched.take().ok_or(BackendError::NotRunning)?;
        match self.host.stop(launched.pid, mode, !self.capabilities.graceful_stop_needs_running_guest) {
            Some(outcome) => Ok(outcome),
            // It had ended already: what it ended with.
            None => match launched.exits.borrow().clone() {
                Some(exit) => Ok(StopOutcome { forced: false, exit: exit.status }),
                None => Err(BackendError::NotRunning),
            },
        }
    }

    async fn reboot(&mut self) -> Result<(), BackendError> {
        self.host.enter(Call::Reboot)?;
        self.host.set_guest(self.pid_or_not_running()?, "Running")
    }

    async fn info(&self) -> Result<VmmInfo, BackendError> {
        let pid = self.pid_or_not_running()?;
        let vmm_state = self.host.guest(pid).ok_or(BackendError::NotRunning)?;
        let identity = self.spec.identity.as_ref().map(|lease| (lease.uid(), lease.gid()));
        Ok(VmmInfo {
            vmm: self.name.to_owned(),
            vmm_version: "0.0.0".into(),
            vmm_state: vmm_state.into(),
            pid: Some(pid),
            identity,
            launch_timings: vec![("spawn", Duration::ZERO)],
            ..VmmInfo::default()
        })
    }

    async fn metrics(&mut self) -> Result<VmmMetrics, BackendError> {
        self.host.enter(Call::Metrics)?;
        let pid = self.pid_or_not_running()?;
        let mut state = self.host.state();
        let vmm = state.vmms.get_mut(&pid).ok_or(BackendError::NotRunning)?;
        // A running guest uses CPU between two readings.
        if vmm.guest == "Running" {
            vmm.cpu_time_ns += 1_000_000;
        }
        Ok(VmmMetrics { cpu_time_ns: vmm.cpu_time_ns, resident_bytes: self.spec.memory.size_mib << 20, ..VmmMetrics::default() })
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        self.host.enter(Call::Destroy)?;
        if let Some(launched) = self.launched.take() {
            self.host.kill(launched.pid, ProcessExit::Killed { signal: 9 });
        }
        Ok(())
    }
}
