//! One VM's `cloud-hypervisor` process: launched in the jail with its API
//! socket, its serial port on its stdout (metald's console pipe) and its
//! events on a named pipe; configured by one `vm.create`; booted, paused,
//! rebooted in place, asked to power off, and taken over after a restart.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::api::{Action, CloudHypervisorApi};
use super::models::{
    ConsoleConfig, ConsoleMode, CpuTopology, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, PlatformConfig,
    RateLimiterConfig, VmConfig,
};
use super::{CloudHypervisorConfig, VMM};
use crate::backend::vmm_io::{self, CAPTURE_DRAIN_TIMEOUT, check_socket_path, exposure, fifo, prepare, remove_if_present, utf8};
use crate::backend::vmm_usage::VmmUsage;
use crate::backend::{BackendError, DeviceCounters, StopMode, StopOutcome, VmmInfo, VmmInstance, VmmMetrics, VmmSpec};
use crate::cgroups::{Cgroup, CgroupUsage};
use crate::console::{CaptureStart, ConsoleLog};
use crate::launch::{self, Arg, LaunchPlan, Launched, Launcher, Layout, Resources, TakeoverTicket, VmmExit};
use crate::process::ProcessExit;

pub const PROGRAM: &str = "cloud-hypervisor";
pub const SOCKET_FILE: &str = "cloud-hypervisor.sock";
/// Cloud Hypervisor's stderr (its log) as metald keeps it, capped and rotated.
pub const STDERR_FILE: &str = "cloud-hypervisor.stderr";
pub const CONSOLE_FIFO: &str = "console.fifo";
pub const STDERR_FIFO: &str = "cloud-hypervisor.stderr.fifo";
/// Its event monitor (`--event-monitor`): JSON objects, one per event.
pub const EVENTS_FIFO: &str = "cloud-hypervisor.events.fifo";
const KERNEL: &str = "kernel";
const INITRD: &str = "initrd";
/// How much of its stderr an early death reports.
const STDERR_TAIL_BYTES: usize = 2048;
const STDERR_LIMIT_BYTES: u64 = 256 * 1024;

#[derive(Debug)]
pub struct CloudHypervisorVm {
    settings: Arc<CloudHypervisorConfig>,
    launcher: Arc<dyn Launcher>,
    spec: VmmSpec,
    console: ConsoleLog,
    stderr_log: ConsoleLog,
    current: Option<Current>,
    /// The tasks copying the current (or last) process's console and stderr.
    captures: Vec<JoinHandle<()>>,
    /// Whether `vm.boot` succeeded for the current process.
    booted: bool,
    /// Reboots the guest made itself, as the event monitor tells them.
    guest_reboots: watch::Sender<u64>,
    /// Reboots metald asked for and the event monitor has not told yet.
    asked_reboots: Arc<AtomicU64>,
    usage: VmmUsage,
    /// Device counters of earlier processes, so totals never go backwards.
    finished_devices: DeviceCounters,
    last_devices: DeviceCounters,
}

#[derive(Debug)]
struct Current {
    launched: Launched,
    api: CloudHypervisorApi,
    /// The process's exits, told from its events when it was not our child.
    exits: watch::Receiver<Option<VmmExit>>,
    events: JoinHandle<()>,
}

impl CloudHypervisorVm {
    /// Launches Cloud Hypervisor for `spec` and creates the VM in it. On error no process is left.
    pub async fn launch(
        settings: Arc<CloudHypervisorConfig>,
        launcher: Arc<dyn Launcher>,
        spec: VmmSpec,
        console: ConsoleLog,
    ) -> Result<Self, BackendError> {
        check_socket_path(&spec.vm_dir.in_jail(SOCKET_FILE))?;
        let mut vm = Self::unlaunched(settings, launcher, spec, console);
        vm.start_process().await?;
        Ok(vm)
    }

    /// A VM with no Cloud Hypervisor running; its next boot launches one.
    pub fn unlaunched(settings: Arc<CloudHypervisorConfig>, launcher: Arc<dyn Launcher>, spec: VmmSpec, console: ConsoleLog) -> Self {
        let stderr_log = ConsoleLog::named(spec.vm_dir.path(), STDERR_FILE, STDERR_LIMIT_BYTES);
        Self {
            settings,
            launcher,
            spec,
            console,
            stderr_log,
            current: None,
            captures: Vec::new(),
            booted: false,
            guest_reboots: watch::channel(0).0,
            asked_reboots: Arc::new(AtomicU64::new(0)),
            usage: VmmUsage::default(),
            finished_devices: DeviceCounters::default(),
            last_devices: DeviceCounters::default(),
        }
    }

    /// Takes over the Cloud Hypervisor that `ticket` describes: the same
    /// process (pid and start time), answering on the VM's socket as this VM.
    pub async fn take_over(
        settings: Arc<CloudHypervisorConfig>,
        launcher: Arc<dyn Launcher>,
        spec: VmmSpec,
        console: ConsoleLog,
        ticket: &TakeoverTicket,
    ) -> Result<Self, BackendError> {
        let mut vm = Self::unlaunched(settings, launcher, spec, console);
        let launched = vm.launcher.take_over(ticket.clone(), vm.spec.identity.clone()).map_err(BackendError::TakeOver)?;
        let api = CloudHypervisorApi::new(&launched.layout.host(SOCKET_FILE), vm.settings.api_timeout);
        let info = match api.info().await {
            Ok(info) => info,
            // Nobody listens on its socket: a process that is ending closes
            // its descriptors before the kernel says it has ended.
            Err(error @ BackendError::Transport { .. }) => match launched.process.wait_timeout(vm.settings.ready_timeout).await {
                Some(exit) => return Err(BackendError::Exited { vmm: VMM, operation: "being taken over", exit }),
                None => return Err(error),
            },
            Err(error) => return Err(error),
        };
        let found = info.config.platform.and_then(|platform| platform.system_serial_number).unwrap_or_default();
        if found != vm.spec.vm_id.as_str() {
            return Err(BackendError::NotTheSameVmm { vmm: VMM, expected: vm.spec.vm_id.to_string(), found });
        }
        let open = |name: &str| {
            let path = vm.spec.vm_dir.file(name);
            tokio::net::unix::pipe::OpenOptions::new().open_receiver(&path).map_err(prepare("a Cloud Hypervisor output pipe", &path))
        };
        let (console_pipe, stderr_pipe, events_pipe) = (open(CONSOLE_FIFO)?, open(STDERR_FIFO)?, open(EVENTS_FIFO)?);
        vm.capture_outputs(console_pipe, stderr_pipe, CaptureStart::SameStream)?;
        vm.booted = info.state != "Created";
        vm.current = Some(vm.watch(launched, api, events_pipe));
        Ok(vm)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.spec.vm_dir.file(name)
    }

    fn capture_outputs(
        &mut self,
        console: tokio::net::unix::pipe::Receiver,
        stderr: tokio::net::unix::pipe::Receiver,
        start: CaptureStart,
    ) -> Result<(), BackendError> {
        self.captures.push(self.console.capture_pipe(console, start).map_err(BackendError::Console)?);
        self.captures.push(self.stderr_log.capture_pipe(stderr, start).map_err(BackendError::Console)?);
        Ok(())
    }

    /// Follows the process's events: the guest's own reboots, and how it ended.
    fn watch(&self, launched: Launched, api: CloudHypervisorApi, events_pipe: tokio::net::unix::pipe::Receiver) -> Current {
        let (told_exit, exits) = watch::channel(None);
        let mut raw_exits = launched.exits();
        let shut_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let events =
            tokio::spawn(follow_events(events_pipe, self.guest_reboots.clone(), Arc::clone(&self.asked_reboots), Arc::clone(&shut_down)));
        tokio::spawn(async move {
            let Some(exit) = raw_exits.wait_for(Option::is_some).await.ok().and_then(|exit| exit.clone()) else { return };
            // A process taken over was not our child: its status went to its
            // old parent, and its events say whether it shut down on purpose.
            let status = if exit.status == ProcessExit::Unknown && shut_down.load(Ordering::SeqCst) {
                ProcessExit::Exited { code: 0 }
            } else {
                exit.status
            };
            told_exit.send_replace(Some(VmmExit { status, cause: exit.cause }));
        });
        Current { launched, api, exits, events }
    }

    /// What Cloud Hypervisor needs, for the launcher to provide.
    fn plan(&self, stdout: OwnedFd, stderr: OwnedFd, events: launch::Exposure) -> Result<LaunchPlan, BackendError> {
        let spec = &self.spec;
        let binary = &self.settings.binary;
        let program_file = File::open(binary).map_err(prepare("the Cloud Hypervisor binary", binary))?;
        let program =
            launch::Exposure { name: PROGRAM.into(), host_path: binary.clone(), file: Arc::new(program_file.into()), writable: false };
        let mut exposures = vec![events];
        exposures.push(exposure(KERNEL.into(), &spec.kernel, false));
        exposures.extend(spec.initrd.iter().map(|initrd| exposure(INITRD.into(), initrd, false)));
        exposures.extend(spec.drives.iter().map(|drive| exposure(drive_name(&drive.id), &drive.image, !drive.read_only)));
        // Its entropy device reads /dev/urandom.
        let mut devices = vec![launch::KVM, launch::URANDOM];
        if !spec.interfaces.is_empty() {
            devices.push(launch::TUN);
        }
        let largest_writable_bytes = spec.drives.iter().filter(|drive| !drive.read_only).map(|drive| drive.image.size).max().unwrap_or(0);
        let mut args = vec![
            Arg::Literal("--api-socket".into()),
            Arg::PathOf(SOCKET_FILE.into()),
            Arg::Literal("--event-monitor".into()),
            Arg::KeyPathOf("path", EVENTS_FIFO.into()),
        ];
        args.extend(std::iter::repeat_n(Arg::Literal("-v".into()), usize::from(self.settings.log_verbosity)));
        Ok(LaunchPlan {
            name: spec.vm_id.to_string(),
            vm_dir: spec.vm_dir.clone(),
            program,
            args,
            exposures,
            work_files: Vec::new(),
            devices,
            netns: spec.netns.clone(),
            resources: Resources { vcpus: spec.cpu.max_vcpus, memory_bytes: spec.memory.size_mib << 20, largest_writable_bytes },
            identity: spec.identity.clone(),
            stdout,
            stderr,
        })
    }

    /// Launches Cloud Hypervisor, waits for its API and creates the VM.
    async fn start_process(&mut self) -> Result<(), BackendError> {
        self.finish_captures().await;
        let pipe = |name: &str| {
            let path = self.file(name);
            fifo(&path).map_err(prepare("a pipe for Cloud Hypervisor's output", &path))
        };
        let (console_read, console_write) = pipe(CONSOLE_FIFO)?;
        let (stderr_read, stderr_write) = pipe(STDERR_FIFO)?;
        let events_pipe = vmm_io::vmm_pipe(EVENTS_FIFO, &self.file(EVENTS_FIFO))?;
        let events_read = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&events_pipe.host_path)
            .map_err(prepare("Cloud Hypervisor's event pipe", &events_pipe.host_path))?;
        let plan = self.plan(console_write, stderr_write, events_pipe)?;
        let mut launched = self.launcher.launch(plan).await.map_err(BackendError::Launch)?;
        let api = CloudHypervisorApi::new(&launched.layout.host(SOCKET_FILE), self.settings.api_timeout);
        let mut timings = Vec::new();
        let result = async {
            self.capture_outputs(console_read, stderr_read, CaptureStart::NewStream)?;
            let clock = std::time::Instant::now();
            self.wait_until_ready(&launched, &api).await?;
            timings.push(("vmm.api_ready", clock.elapsed()));
            let clock = std::time::Instant::now();
            self.create_vm(&launched.layout, &api).await?;
            timings.push(("vmm.configure", clock.elapsed()));
            Ok(())
        }
        .await;
        launched.timings.extend(timings);
        match result {
            Ok(()) => {
                self.current = Some(self.watch(launched, api, events_read));
                self.booted = false;
                Ok(())
            }
            Err(error) => {
                vmm_io::undo_failed_launch(&mut launched, &self.spec.vm_id, VMM).await;
                Err(error)
            }
        }
    }

    /// Waits, without fixed sleeps, until the API socket exists and answers.
    async fn wait_until_ready(&self, launched: &Launched, api: &CloudHypervisorApi) -> Result<(), BackendError> {
        let socket = launched.layout.host(SOCKET_FILE);
        match vmm_io::wait_until_ready(VMM, launched, &socket, self.settings.ready_timeout, || api.ping()).await? {
            Ok(()) => Ok(()),
            Err(exit) => Err(self.died_before_ready(exit).await),
        }
    }

    /// What to say when Cloud Hypervisor died before its API answered: its last words on stderr.
    async fn died_before_ready(&self, exit: ProcessExit) -> BackendError {
        let _ = self.stderr_log.wait_for_line(|_| false, CAPTURE_DRAIN_TIMEOUT).await;
        let stderr = self.stderr_log.tail(STDERR_TAIL_BYTES).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
        BackendError::DiedBeforeReady { vmm: VMM, exit, stderr }
    }

    /// Creates the VM with one `vm.create` body, paths as the VMM sees them.
    async fn create_vm(&self, layout: &Layout, api: &CloudHypervisorApi) -> Result<(), BackendError> {
        let spec = &self.spec;
        let inside = |name: &str| utf8(&layout.inside(name));
        let kernel = inside(KERNEL)?;
        let initramfs = match &spec.initrd {
            Some(_) => Some(inside(INITRD)?),
            None => None,
        };
        let drive_paths = spec.drives.iter().map(|drive| inside(&drive_name(&drive.id))).collect::<Result<Vec<_>, _>>()?;
        let body = vm_config(spec, &kernel, initramfs.as_deref(), &drive_paths);
        api.create(&body).await?;
        // Cloud Hypervisor would bring a TAP it opens up itself, which its
        // unprivileged user may not: each is opened here, in the VM's
        // namespace, and handed over with the interface.
        for interface in &spec.interfaces {
            let (netns, name) = (spec.netns.clone(), interface.tap_device.clone());
            let tap = tokio::task::spawn_blocking(move || crate::tap::open_in(netns.as_deref(), &name, crate::tap::VMM_TAP_FLAGS))
                .await
                .map_err(|error| {
                    prepare("the TAP of an interface", std::path::Path::new(&interface.tap_device))(std::io::Error::other(error))
                })?
                .map_err(prepare("the TAP of an interface", std::path::Path::new(&interface.tap_device)))?;
            let net = NetConfig {
                id: &interface.id,
                mac: interface.guest_mac.as_deref(),
                // One limiter for both directions; the manager refused two that differ.
                rate_limiter_config: interface.rx_rate_limit.as_ref().and_then(RateLimiterConfig::from_limit),
            };
            api.add_net(&net, tap).await?;
        }
        Ok(())
    }

    async fn finish_captures(&mut self) {
        vmm_io::finish_captures(&mut self.captures, &self.spec.vm_id).await;
    }

    /// The current process and its API, if it still runs.
    fn running(&self) -> Result<&Current, BackendError> {
        match &self.current {
            Some(current) => match current.launched.process.exit_status() {
                None => Ok(current),
                Some(exit) => Err(BackendError::Exited { vmm: VMM, operation: "being driven", exit }),
            },
            None => Err(BackendError::NotRunning),
        }
    }

    /// Forgets an ended process, keeping what it used, and undoes its jail.
    async fn retire_process(&mut self) {
        if let Some(mut current) = self.current.take() {
            self.finished_devices = add(&self.finished_devices, &self.last_devices);
            self.last_devices = DeviceCounters::default();
            current.events.abort();
            self.usage.retire(&mut current.launched, &self.spec.vm_id).await;
        }
        self.booted = false;
    }

    async fn kill(&mut self) -> Result<ProcessExit, BackendError> {
        let Some(current) = &self.current else {
            return Err(BackendError::NotRunning);
        };
        let exit = current.launched.process.kill().await.map_err(BackendError::Signal)?;
        self.retire_process().await;
        Ok(if exit == ProcessExit::Unknown { ProcessExit::Killed { signal: libc::SIGKILL } } else { exit })
    }

    /// The exit the process's watcher told, or its raw status.
    fn told_exit(&self, raw: ProcessExit) -> ProcessExit {
        self.current.as_ref().and_then(|current| current.exits.borrow().as_ref().map(|exit| exit.status)).unwrap_or(raw)
    }

    async fn graceful_stop(&mut self, timeout: Duration) -> Result<StopOutcome, BackendError> {
        let current = self.running()?;
        let process = current.launched.process.clone();
        if self.booted {
            match current.api.act(Action::PowerButton).await {
                Ok(()) => {
                    if let Some(exit) = process.wait_timeout(timeout).await {
                        let exit = self.told_exit(exit);
                        self.retire_process().await;
                        return Ok(StopOutcome { forced: false, exit });
                    }
                    tracing::info!(vm_id = %self.spec.vm_id, ?timeout, "guest did not power off in time; killing its VMM");
                }
                Err(error) => {
                    if let Some(exit) = process.exit_status() {
                        let exit = self.told_exit(exit);
                        self.retire_process().await;
                        return Ok(StopOutcome { forced: false, exit });
                    }
                    tracing::warn!(vm_id = %self.spec.vm_id, error = %crate::error_chain(&error), "power button refused; killing the VMM");
                }
            }
        }
        let exit = self.kill().await?;
        Ok(StopOutcome { forced: true, exit })
    }
}

/// The `vm.create` body for `spec`, with the paths the VMM sees.
fn vm_config<'a>(spec: &'a VmmSpec, kernel: &'a str, initramfs: Option<&'a str>, drive_paths: &'a [String]) -> VmConfig<'a> {
    let cpu = &spec.cpu;
    let topology = match (&cpu.topology, cpu.smt) {
        (Some(topology), _) => Some(CpuTopology {
            threads_per_core: topology.threads_per_core,
            cores_per_die: topology.cores_per_socket,
            dies_per_package: 1,
            packages: topology.sockets,
        }),
        // Two threads per core, as Firecracker's smt gives, where the count allows it.
        (None, true) if cpu.max_vcpus.is_multiple_of(2) => {
            Some(CpuTopology { threads_per_core: 2, cores_per_die: cpu.max_vcpus / 2, dies_per_package: 1, packages: 1 })
        }
        (None, _) => None,
    };
    VmConfig {
        cpus: CpusConfig { boot_vcpus: cpu.boot_vcpus, max_vcpus: cpu.max_vcpus, topology },
        memory: MemoryConfig {
            size: spec.memory.size_mib << 20,
            hotplug_size: spec.memory.hotplug_mib << 20,
            hugepages: spec.memory.huge_pages,
        },
        payload: PayloadConfig { kernel, cmdline: &spec.kernel_args, initramfs },
        disks: spec
            .drives
            .iter()
            .zip(drive_paths)
            .map(|(drive, path)| DiskConfig { id: &drive.id, path, readonly: drive.read_only })
            .collect(),
        serial: ConsoleConfig { mode: ConsoleMode::Tty },
        console: ConsoleConfig { mode: ConsoleMode::Off },
        platform: PlatformConfig { system_serial_number: spec.vm_id.as_str() },
    }
}

/// Reads the event monitor's stream of JSON objects: a reboot the guest
/// made itself is counted (one metald asked for is not: the manager tells
/// that one), and a shutdown of the VMM is noted, so a clean end of a
/// process taken over is known as such.
async fn follow_events(
    mut pipe: tokio::net::unix::pipe::Receiver,
    guest_reboots: watch::Sender<u64>,
    asked_reboots: Arc<AtomicU64>,
    shut_down: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
        let mut stream = serde_json::Deserializer::from_slice(&buffer).into_iter::<Event>();
        let mut consumed = 0;
        while let Some(Ok(event)) = stream.next() {
            consumed = stream.byte_offset();
            match (event.source.as_str(), event.event.as_str()) {
                ("vm", "rebooted") => {
                    let asked = asked_reboots.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |asked| asked.checked_sub(1)).is_ok();
                    if !asked {
                        guest_reboots.send_modify(|count| *count += 1);
                    }
                }
                ("vmm", "shutdown") | ("vm", "shutdown") => shut_down.store(true, Ordering::SeqCst),
                _ => {}
            }
        }
        buffer.drain(..consumed);
    }
}

/// One event of Cloud Hypervisor's event monitor.
#[derive(Debug, serde::Deserialize)]
struct Event {
    source: String,
    event: String,
}

fn drive_name(id: &str) -> String {
    format!("drives/{id}")
}

fn add(left: &DeviceCounters, right: &DeviceCounters) -> DeviceCounters {
    DeviceCounters {
        net_rx_bytes: left.net_rx_bytes + right.net_rx_bytes,
        net_tx_bytes: left.net_tx_bytes + right.net_tx_bytes,
        net_rx_packets: left.net_rx_packets + right.net_rx_packets,
        net_tx_packets: left.net_tx_packets + right.net_tx_packets,
        block_read_bytes: left.block_read_bytes + right.block_read_bytes,
        block_write_bytes: left.block_write_bytes + right.block_write_bytes,
        block_read_ops: left.block_read_ops + right.block_read_ops,
        block_write_ops: left.block_write_ops + right.block_write_ops,
    }
}

/// `vm.counters` summed over the VM's devices.
fn device_counters(counters: &super::models::VmCounters) -> DeviceCounters {
    let mut total = DeviceCounters::default();
    for device in counters.values() {
        let count = |name: &str| device.get(name).copied().unwrap_or(0);
        total.net_rx_bytes += count("rx_bytes");
        total.net_tx_bytes += count("tx_bytes");
        total.net_rx_packets += count("rx_frames");
        total.net_tx_packets += count("tx_frames");
        total.block_read_bytes += count("read_bytes");
        total.block_write_bytes += count("write_bytes");
        total.block_read_ops += count("read_ops");
        total.block_write_ops += count("write_ops");
    }
    total
}

#[async_trait]
impl VmmInstance for CloudHypervisorVm {
    fn pid(&self) -> Option<u32> {
        self.running().ok().map(|current| current.launched.process.pid())
    }

    fn cgroup(&self) -> Option<Cgroup> {
        self.running().ok().and_then(|current| current.launched.cgroup.clone())
    }

    fn ticket(&self) -> Option<TakeoverTicket> {
        self.running().ok()?.launched.ticket()
    }

    fn take_ended_usage(&mut self) -> Option<CgroupUsage> {
        self.usage.take_ended()
    }

    fn exits(&self) -> Option<watch::Receiver<Option<VmmExit>>> {
        self.current.as_ref().map(|current| current.exits.clone())
    }

    fn guest_reboots(&self) -> Option<watch::Receiver<u64>> {
        Some(self.guest_reboots.subscribe())
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        let needs_new_process = match &self.current {
            None => true,
            Some(current) => current.launched.process.exit_status().is_some(),
        };
        if needs_new_process {
            self.retire_process().await;
            self.start_process().await?;
        }
        self.running()?.api.act(Action::Boot).await?;
        self.booted = true;
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.running()?.api.act(Action::Pause).await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.running()?.api.act(Action::Resume).await
    }

    async fn stop(&mut self, mode: StopMode) -> Result<StopOutcome, BackendError> {
        if let Some(current) = &self.current
            && let Some(exit) = current.launched.process.exit_status()
        {
            let exit = self.told_exit(exit);
            self.retire_process().await;
            return Ok(StopOutcome { forced: false, exit });
        }
        match mode {
            StopMode::Graceful { timeout } => self.graceful_stop(timeout).await,
            StopMode::Forced => Ok(StopOutcome { forced: true, exit: self.kill().await? }),
        }
    }

    async fn reboot(&mut self) -> Result<(), BackendError> {
        let api = self.running()?.api.clone();
        // The event monitor tells this reboot too; the manager tells it already.
        self.asked_reboots.fetch_add(1, Ordering::SeqCst);
        let rebooted = api.act(Action::Reboot).await;
        if rebooted.is_err() {
            let _ = self.asked_reboots.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |asked| asked.checked_sub(1));
        }
        rebooted
    }

    async fn info(&self) -> Result<VmmInfo, BackendError> {
        let mut info = VmmInfo { vmm: VMM.into(), ..VmmInfo::default() };
        let Ok(current) = self.running() else {
            info.vmm_state = "Exited".into();
            return Ok(info);
        };
        let ping = current.api.ping().await?;
        let vm = current.api.info().await?;
        let launched = &current.launched;
        info.pid = Some(launched.process.pid());
        info.api_socket = Some(launched.layout.host(SOCKET_FILE));
        info.vmm_version = ping.version;
        info.vmm_state = vm.state;
        info.extra.insert("jailed".into(), launched.layout.is_jailed().to_string());
        info.launch_timings = launched.timings.clone();
        info.identity = launched.identity;
        info.cgroup = launched.cgroup.as_ref().map(|cgroup| cgroup.paths().to_vec()).unwrap_or_default();
        Ok(info)
    }

    async fn metrics(&mut self) -> Result<VmmMetrics, BackendError> {
        // The field itself, not `running()`, so the usage can be written meanwhile.
        if let Some(current) = self.current.as_ref().filter(|current| current.launched.process.exit_status().is_none()) {
            if self.booted {
                self.last_devices = device_counters(&current.api.counters().await?);
            }
            self.usage.read(&current.launched)?;
        }
        Ok(VmmMetrics {
            cpu_time_ns: self.usage.cpu_time_ns(),
            resident_bytes: self.usage.resident_bytes(self.running().is_ok()),
            devices: add(&self.finished_devices, &self.last_devices),
        })
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        if let Ok(current) = self.running() {
            // Asked first, so it removes what it made; killed if it does not go.
            let process = current.launched.process.clone();
            let asked = current.api.act(Action::ShutdownVmm).await.is_ok();
            if !asked || process.wait_timeout(self.settings.api_timeout).await.is_none() {
                process.kill().await.map_err(BackendError::Signal)?;
            }
        } else if let Some(current) = &self.current {
            current.launched.process.kill().await.map_err(BackendError::Signal)?;
        }
        self.retire_process().await;
        self.finish_captures().await;
        let rotated_stderr = format!("{STDERR_FILE}.1");
        for name in [SOCKET_FILE, STDERR_FILE, &rotated_stderr, CONSOLE_FIFO, STDERR_FIFO, EVENTS_FIFO] {
            remove_if_present(&self.file(name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_every_device_add_up() {
        let counters: super::super::models::VmCounters = serde_json::from_str(
            r#"{"_disk0":{"read_bytes":512,"write_bytes":1024,"read_ops":1,"write_ops":2,"read_latency_min":18446744073709551615},
                "eth0":{"rx_bytes":100,"tx_bytes":200,"rx_frames":3,"tx_frames":4}}"#,
        )
        .unwrap();
        let total = device_counters(&counters);
        assert_eq!((total.block_read_bytes, total.block_write_bytes, total.block_read_ops, total.block_write_ops), (512, 1024, 1, 2));
        assert_eq!((total.net_rx_bytes, total.net_tx_bytes, total.net_rx_packets, total.net_tx_packets), (100, 200, 3, 4));
    }
}
