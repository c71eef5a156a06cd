//! One VM's Firecracker process: launching it (jailed unless the host says
//! otherwise), waiting until its API answers, configuring it, and driving
//! it through the VM's life.

use std::fs::File;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::api::FirecrackerApi;
use super::log::WithoutRoutineCalls;
use super::metrics::MetricsReader;
use super::models::{ActionType, BootSource, Drive, InstanceInfo, MachineConfiguration, NetworkInterface, RateLimiter, VmStateName};
use super::{FirecrackerConfig, VMM};
use crate::backend::vmm_io::{
    self, CAPTURE_DRAIN_TIMEOUT, check_socket_path, exposure, fifo, give_room, prepare, reading_end, remove_if_present, utf8,
};
use crate::backend::vmm_usage::VmmUsage;
use crate::backend::{BackendError, CacheMode, IoEngine, StopMode, StopOutcome, VmmInfo, VmmInstance, VmmMetrics, VmmSpec};
use crate::cgroups::{Cgroup, CgroupUsage};
use crate::console::{CaptureStart, ConsoleLog};
use crate::launch::{self, Arg, Exposure, LaunchPlan, Launched, Launcher, Layout, Resources, TakeoverTicket, VmmExit};
use crate::process::ProcessExit;

pub const PROGRAM: &str = "firecracker";
pub const SOCKET_FILE: &str = "firecracker.sock";

/// Firecracker's own log as metald keeps it, capped and rotated (see [`super::log`]).
pub const LOG_FILE: &str = "firecracker.log";
pub const STDERR_FILE: &str = "firecracker.stderr";
/// The named pipes Firecracker writes its serial console, its stderr, its
/// log and its metrics into. Named, not anonymous: a metald that restarts
/// opens them again and goes on reading from the same process.
pub const CONSOLE_FIFO: &str = "console.fifo";
pub const STDERR_FIFO: &str = "firecracker.stderr.fifo";
pub const LOG_FIFO: &str = "firecracker.log.fifo";
pub const METRICS_FIFO: &str = "firecracker.metrics.fifo";
const KERNEL: &str = "kernel";
const INITRD: &str = "initrd";
/// How much of Firecracker's stderr an early death reports.
const STDERR_TAIL_BYTES: usize = 2048;
/// Firecracker's stderr is kept up to this size (twice, with the rotated file).
const STDERR_LIMIT_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
pub struct FirecrackerVm {
    settings: Arc<FirecrackerConfig>,
    launcher: Arc<dyn Launcher>,
    spec: VmmSpec,
    console: ConsoleLog,
    /// The current Firecracker process and its API, while one runs.
    current: Option<Current>,
    /// Firecracker's own stderr (panics, early errors), kept beside the console.
    stderr_log: ConsoleLog,
    /// Firecracker's log, kept the same way.
    vmm_log: ConsoleLog,
    /// The tasks copying the current (or last) process's console and stderr.
    captures: Vec<JoinHandle<()>>,
    /// Whether `InstanceStart` succeeded for the current process.
    started: bool,
    /// Whether the current process was last told to pause (and not to resume).
    paused: bool,
    metrics: MetricsReader,
    usage: VmmUsage,
}

#[derive(Debug)]
struct Current {
    launched: Launched,
    api: FirecrackerApi,
    /// What the process said of itself when its API first answered: its id,
    /// version and name stay its own for its life, and its state word
    /// follows from what we told it (see [`FirecrackerVm::vmm_state`]), so
    /// reading a VM's info costs no round trip to it.
    instance: InstanceInfo,
    /// For a process taken over, its exits as its log tells them (see [`exit_from_log`]).
    exits: Option<watch::Receiver<Option<VmmExit>>>,
}

/// Firecracker's own word on how it ended, once its log has it or the
/// process's side of the pipe is closed (the log starts empty with each
/// process). A taken-over process's status goes to its parent, not to us;
/// this tells a guest that shut itself down from a crash, and a signal it
/// caught at a resource limit from a kill.
async fn exit_from_log(log: &ConsoleLog) -> Option<ProcessExit> {
    let line = log.wait_for_line(|line| exit_in_log_line(line).is_some(), CAPTURE_DRAIN_TIMEOUT).await.ok()?;
    exit_in_log_line(&line)
}

/// The exit a line of Firecracker's log tells: `… exit_code=<n>` as it
/// ends, or `Shutting down VM after intercepting signal <n>` from its
/// signal handlers, which then exit with a code of their own for each.
fn exit_in_log_line(line: &str) -> Option<ProcessExit> {
    if let Some((_, code)) = line.rsplit_once("exit_code=") {
        return code.trim().parse().ok().map(|code| ProcessExit::Exited { code });
    }
    let (_, signal) = line.split_once("after intercepting signal ")?;
    let signal: i32 = signal.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    CAUGHT_SIGNALS.iter().find(|(caught, _, _)| *caught == signal).map(|(_, code, _)| ProcessExit::Exited { code: *code })
}

/// The VMM's exits as the launcher sees them, told in Firecracker's terms:
/// the status from its log when it was not our child (taken over after a
/// restart), and what its own exit codes for a signal it caught mean.
fn explained_exits(mut raw: watch::Receiver<Option<VmmExit>>, log: ConsoleLog) -> watch::Receiver<Option<VmmExit>> {
    let (publish, exits) = watch::channel(None);
    tokio::spawn(async move {
        // The first exit published; none if the publisher is gone first.
        let Some(exit) = raw.wait_for(Option::is_some).await.ok().and_then(|exit| exit.clone()) else { return };
        let status = if exit.status == ProcessExit::Unknown { exit_from_log(&log).await.unwrap_or(exit.status) } else { exit.status };
        let cause = exit.cause.or_else(|| caught_signal_cause(status));
        publish.send_replace(Some(VmmExit { status, cause }));
    });
    exits
}

/// Firecracker catches the signals the kernel sends at a resource limit
/// (and others) and exits with a code of its own for each: the signal,
/// the code, and what it means.
const CAUGHT_SIGNALS: [(i32, i32, &str); 8] = [
    (libc::SIGSYS, 148, "it made a system call its seccomp filter forbids"),
    (libc::SIGBUS, 149, "it caught SIGBUS"),
    (libc::SIGSEGV, 150, "it caught SIGSEGV"),
    (
        libc::SIGXFSZ,
        151,
        "it caught SIGXFSZ: a file it wrote reached its file-size limit (RLIMIT_FSIZE: the larger of \
         jailer.min_file_size_bytes and its largest writable drive)",
    ),
    (libc::SIGXCPU, 154, "it caught SIGXCPU: it reached its CPU-time limit (RLIMIT_CPU)"),
    (libc::SIGPIPE, 155, "it caught SIGPIPE: it wrote to a pipe nobody reads"),
    (libc::SIGHUP, 156, "it caught SIGHUP"),
    (libc::SIGILL, 157, "it caught SIGILL"),
];

fn caught_signal_cause(status: ProcessExit) -> Option<String> {
    let ProcessExit::Exited { code } = status else { return None };
    CAUGHT_SIGNALS.iter().find(|(_, caught_code, _)| *caught_code == code).map(|(_, _, cause)| (*cause).to_owned())
}

fn drive_name(id: &str) -> String {
    format!("drives/{id}")
}

impl FirecrackerVm {
    /// Launches and configures Firecracker for `spec`. On error no process is left.
    pub async fn launch(
        settings: Arc<FirecrackerConfig>,
        launcher: Arc<dyn Launcher>,
        spec: VmmSpec,
        console: ConsoleLog,
    ) -> Result<Self, BackendError> {
        // The longest socket path either launcher may use.
        check_socket_path(&spec.vm_dir.in_jail(SOCKET_FILE))?;
        let mut vm = Self::unlaunched(settings, launcher, spec, console);
        vm.start_process().await?;
        Ok(vm)
    }

    /// A VM with no Firecracker running; its next boot launches one.
    pub fn unlaunched(settings: Arc<FirecrackerConfig>, launcher: Arc<dyn Launcher>, spec: VmmSpec, console: ConsoleLog) -> Self {
        let stderr_log = ConsoleLog::named(spec.vm_dir.path(), STDERR_FILE, STDERR_LIMIT_BYTES);
        let vmm_log = ConsoleLog::named(spec.vm_dir.path(), LOG_FILE, settings.log_limit_bytes);
        Self {
            settings,
            launcher,
            spec,
            console,
            current: None,
            stderr_log,
            vmm_log,
            captures: Vec::new(),
            started: false,
            paused: false,
            metrics: MetricsReader::default(),
            usage: VmmUsage::default(),
        }
    }

    /// Takes over the Firecracker that `ticket` describes: the same process
    /// (pid and start time), answering on the VM's socket as this VM.
    pub async fn take_over(
        settings: Arc<FirecrackerConfig>,
        launcher: Arc<dyn Launcher>,
        spec: VmmSpec,
        console: ConsoleLog,
        ticket: &TakeoverTicket,
    ) -> Result<Self, BackendError> {
        let ticket = ticket.clone();
        let mut vm = Self::unlaunched(settings, launcher, spec, console);
        let launched = vm.launcher.take_over(ticket, vm.spec.identity.clone()).map_err(BackendError::TakeOver)?;
        let api = FirecrackerApi::new(&launched.layout.host(SOCKET_FILE), vm.settings.api_timeout);
        let instance = match api.instance_info().await {
            Ok(instance) => instance,
            // Nobody listens on its socket: a process that is ending closes
            // its descriptors before the kernel says it has ended.
            Err(error @ BackendError::Transport { .. }) => match launched.process.wait_timeout(vm.settings.ready_timeout).await {
                Some(exit) => return Err(BackendError::Exited { vmm: VMM, operation: "being taken over", exit }),
                None => return Err(error),
            },
            Err(error) => return Err(error),
        };
        if instance.id != vm.spec.vm_id.as_str() {
            return Err(BackendError::NotTheSameVmm { vmm: VMM, expected: vm.spec.vm_id.to_string(), found: instance.id });
        }
        let open = |name: &str| {
            let path = vm.file(name);
            tokio::net::unix::pipe::OpenOptions::new().open_receiver(&path).map_err(prepare("a Firecracker output pipe", &path))
        };
        let (console, stderr, log) = (open(CONSOLE_FIFO)?, open(STDERR_FIFO)?, open(LOG_FIFO)?);
        vm.capture_outputs(console, stderr, log, CaptureStart::SameStream)?;
        vm.started = instance.state != "Not started";
        let metrics_path = vm.file(METRICS_FIFO);
        let metrics_pipe = reading_end(&metrics_path).map_err(prepare("Firecracker's metrics pipe", &metrics_path))?;
        vm.metrics.follow_from_now(metrics_pipe).map_err(prepare("Firecracker's metrics pipe", &metrics_path))?;
        let exits = explained_exits(launched.exits(), vm.vmm_log.clone());
        vm.paused = instance.state == "Paused";
        vm.current = Some(Current { launched, api, exits: Some(exits), instance });
        Ok(vm)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.spec.vm_dir.file(name)
    }

    /// A fresh named pipe in the VM's folder that Firecracker opens by path.
    fn vmm_pipe(&self, name: &str) -> Result<Exposure, BackendError> {
        vmm_io::vmm_pipe(name, &self.file(name))
    }

    /// Copies the process's console, stderr and log into their files;
    /// `start` says whether the process is new or taken over.
    fn capture_outputs(
        &mut self,
        console: tokio::net::unix::pipe::Receiver,
        stderr: tokio::net::unix::pipe::Receiver,
        log: tokio::net::unix::pipe::Receiver,
        start: CaptureStart,
    ) -> Result<(), BackendError> {
        self.captures.push(self.console.capture_pipe(console, start).map_err(BackendError::Console)?);
        self.captures.push(self.stderr_log.capture_pipe(stderr, start).map_err(BackendError::Console)?);
        self.captures.push(self.vmm_log.capture(WithoutRoutineCalls::new(log)).map_err(BackendError::Console)?);
        Ok(())
    }

    /// What Firecracker needs, for the launcher to provide. `pipes` are
    /// the named pipes it opens by path (log and metrics).
    fn plan(&self, stdout: OwnedFd, stderr: OwnedFd, pipes: Vec<Exposure>) -> Result<LaunchPlan, BackendError> {
        let spec = &self.spec;
        let binary = &self.settings.binary;
        let program_file = File::open(binary).map_err(prepare("the Firecracker binary", binary))?;
        let program = Exposure { name: PROGRAM.into(), host_path: binary.clone(), file: Arc::new(program_file.into()), writable: false };
        let mut exposures = pipes;
        exposures.push(exposure(KERNEL.into(), &spec.kernel, false));
        exposures.extend(spec.initrd.iter().map(|initrd| exposure(INITRD.into(), initrd, false)));
        exposures.extend(spec.drives.iter().map(|drive| exposure(drive_name(&drive.id), &drive.image, !drive.read_only)));
        let mut devices = vec![launch::KVM];
        if !spec.interfaces.is_empty() {
            devices.push(launch::TUN);
        }
        let largest_writable_bytes = spec.drives.iter().filter(|drive| !drive.read_only).map(|drive| drive.image.size).max().unwrap_or(0);
        Ok(LaunchPlan {
            name: spec.vm_id.to_string(),
            vm_dir: spec.vm_dir.clone(),
            program,
            args: vec![
                Arg::Literal("--api-sock".into()),
                Arg::PathOf(SOCKET_FILE.into()),
                Arg::Literal("--id".into()),
                Arg::Literal(spec.vm_id.to_string()),
                // Logger and metrics from the first instruction: configured
                // later over the API, Firecracker's own start-up lines would
                // go to stdout, which is the guest's console.
                Arg::Literal("--log-path".into()),
                Arg::PathOf(LOG_FIFO.into()),
                Arg::Literal("--level".into()),
                Arg::Literal(self.settings.log_level.clone()),
                Arg::Literal("--show-level".into()),
                Arg::Literal("--metrics-path".into()),
                Arg::PathOf(METRICS_FIFO.into()),
            ],
            exposures,
            work_files: Vec::new(),
            devices,
            netns: spec.netns.clone(),
            resources: Resources { vcpus: spec.cpu.boot_vcpus, memory_bytes: spec.memory.size_mib << 20, largest_writable_bytes },
            identity: spec.identity.clone(),
            stdout,
            stderr,
        })
    }

    /// Launches Firecracker, waits for its API and configures it.
    async fn start_process(&mut self) -> Result<(), BackendError> {
        self.finish_captures().await;
        let pipe = |name: &str| {
            let path = self.file(name);
            fifo(&path).map_err(prepare("a pipe for Firecracker's output", &path))
        };
        let (console_read, console_write) = pipe(CONSOLE_FIFO)?;
        let (stderr_read, stderr_write) = pipe(STDERR_FIFO)?;
        let log_pipe = self.vmm_pipe(LOG_FIFO)?;
        let metrics_pipe = self.vmm_pipe(METRICS_FIFO)?;
        let log_read = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&log_pipe.host_path)
            .map_err(prepare("Firecracker's log pipe", &log_pipe.host_path))?;
        give_room(&log_read, &log_pipe.host_path);
        let metrics_read = reading_end(&metrics_pipe.host_path).map_err(prepare("Firecracker's metrics pipe", &metrics_pipe.host_path))?;
        // Each process's log starts empty, so its exit code is its own.
        for name in [LOG_FILE.to_owned(), format!("{LOG_FILE}.1")] {
            remove_if_present(&self.file(&name))?;
        }
        let plan = self.plan(console_write, stderr_write, vec![log_pipe, metrics_pipe])?;
        let mut launched = self.launcher.launch(plan).await.map_err(BackendError::Launch)?;
        let api = FirecrackerApi::new(&launched.layout.host(SOCKET_FILE), self.settings.api_timeout);
        let mut timings = Vec::new();
        let result = async {
            self.capture_outputs(console_read, stderr_read, log_read, CaptureStart::NewStream)?;
            self.metrics.follow(metrics_read);
            let clock = std::time::Instant::now();
            let instance = self.wait_until_ready(&launched, &api).await?;
            timings.push(("vmm.api_ready", clock.elapsed()));
            let clock = std::time::Instant::now();
            self.configure(&launched.layout, &api).await?;
            timings.push(("vmm.configure", clock.elapsed()));
            Ok(instance)
        }
        .await;
        launched.timings.extend(timings);
        match result {
            Ok(instance) => {
                let exits = explained_exits(launched.exits(), self.vmm_log.clone());
                self.current = Some(Current { launched, api, exits: Some(exits), instance });
                self.started = false;
                self.paused = false;
                Ok(())
            }
            Err(error) => {
                vmm_io::undo_failed_launch(&mut launched, &self.spec.vm_id, VMM).await;
                Err(error)
            }
        }
    }

    /// Waits, without fixed sleeps, until the API socket exists and
    /// answers; what it first answered.
    async fn wait_until_ready(&self, launched: &Launched, api: &FirecrackerApi) -> Result<InstanceInfo, BackendError> {
        let socket = launched.layout.host(SOCKET_FILE);
        let answered = std::sync::Mutex::new(None);
        let probe = || async {
            let instance = api.instance_info().await?;
            *answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(instance);
            Ok(())
        };
        match vmm_io::wait_until_ready(VMM, launched, &socket, self.settings.ready_timeout, probe).await? {
            Ok(()) => answered
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .ok_or(BackendError::NotReady { vmm: VMM, timeout: self.settings.ready_timeout }),
            Err(exit) => Err(self.died_before_ready(exit).await),
        }
    }

    /// Firecracker's word for its state, from what it was told: booted,
    /// paused, resumed. Its process's exit is supervised on its own.
    fn vmm_state(&self) -> &'static str {
        match (self.started, self.paused) {
            (false, _) => "Not started",
            (true, false) => "Running",
            (true, true) => "Paused",
        }
    }

    /// What to say when Firecracker died before its API answered: its last
    /// words on stderr, once the pipe has drained, and in its log, where
    /// it reports its own errors.
    async fn died_before_ready(&self, exit: ProcessExit) -> BackendError {
        let _ = self.stderr_log.wait_for_line(|_| false, CAPTURE_DRAIN_TIMEOUT).await;
        let mut stderr =
            self.stderr_log.tail(STDERR_TAIL_BYTES).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
        let _ = self.vmm_log.wait_for_line(|_| false, CAPTURE_DRAIN_TIMEOUT).await;
        if let Ok(log) = self.vmm_log.tail(STDERR_TAIL_BYTES) {
            stderr.push_str(&String::from_utf8_lossy(&log));
        }
        BackendError::DiedBeforeReady { vmm: VMM, exit, stderr }
    }

    async fn configure(&self, layout: &Layout, api: &FirecrackerApi) -> Result<(), BackendError> {
        let spec = &self.spec;
        let inside = |name: &str| utf8(&layout.inside(name));
        api.put_machine_config(&MachineConfiguration {
            vcpu_count: spec.cpu.boot_vcpus,
            mem_size_mib: spec.memory.size_mib,
            smt: spec.cpu.smt,
            huge_pages: if spec.memory.huge_pages { "2M" } else { "None" },
        })
        .await?;
        let initrd = match &spec.initrd {
            Some(_) => Some(inside(INITRD)?),
            None => None,
        };
        api.put_boot_source(&BootSource {
            kernel_image_path: &inside(KERNEL)?,
            boot_args: &spec.kernel_args,
            initrd_path: initrd.as_deref(),
        })
        .await?;
        for drive in &spec.drives {
            api.put_drive(&Drive {
                drive_id: &drive.id,
                path_on_host: &inside(&drive_name(&drive.id))?,
                is_root_device: drive.is_root_device,
                is_read_only: drive.read_only,
                // Firecracker's words are the capability names.
                io_engine: drive.io_engine.map(IoEngine::name),
                cache_type: drive.cache.map(CacheMode::name),
            })
            .await?;
        }
        for interface in &spec.interfaces {
            api.put_network_interface(&NetworkInterface {
                iface_id: &interface.id,
                host_dev_name: &interface.tap_device,
                guest_mac: interface.guest_mac.as_deref(),
                rx_rate_limiter: interface.rx_rate_limit.as_ref().and_then(RateLimiter::from_limit),
                tx_rate_limiter: interface.tx_rate_limit.as_ref().and_then(RateLimiter::from_limit),
            })
            .await?;
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
            self.usage.retire(&mut current.launched, &self.spec.vm_id).await;
        }
        self.started = false;
    }

    async fn kill(&mut self) -> Result<ProcessExit, BackendError> {
        let Some(current) = &self.current else {
            return Err(BackendError::NotRunning);
        };
        let exit = current.launched.process.kill().await.map_err(BackendError::Signal)?;
        self.retire_process().await;
        // A process taken over that we killed: the kill, unless it had already said how it ended.
        Ok(self.known_exit(exit).await.unwrap_or(ProcessExit::Killed { signal: libc::SIGKILL }))
    }

    /// An exit as we know it: for a process taken over, from its log when it left a word there.
    async fn known_exit(&self, exit: ProcessExit) -> Option<ProcessExit> {
        if exit == ProcessExit::Unknown { exit_from_log(&self.vmm_log).await } else { Some(exit) }
    }

    async fn refined(&self, exit: ProcessExit) -> ProcessExit {
        self.known_exit(exit).await.unwrap_or(exit)
    }

    async fn graceful_stop(&mut self, timeout: Duration) -> Result<StopOutcome, BackendError> {
        let current = self.running()?;
        let process = current.launched.process.clone();
        if self.started {
            match current.api.action(ActionType::SendCtrlAltDel).await {
                Ok(()) => {
                    if let Some(exit) = process.wait_timeout(timeout).await {
                        self.retire_process().await;
                        return Ok(StopOutcome { forced: false, exit: self.refined(exit).await });
                    }
                    tracing::info!(vm_id = %self.spec.vm_id, ?timeout, "guest did not stop in time; killing its VMM");
                }
                Err(error) => {
                    if let Some(exit) = process.exit_status() {
                        self.retire_process().await;
                        return Ok(StopOutcome { forced: false, exit: self.refined(exit).await });
                    }
                    tracing::warn!(vm_id = %self.spec.vm_id, error = %crate::error_chain(&error), "Ctrl+Alt+Del refused; killing the VMM");
                }
            }
        }
        let exit = self.kill().await?;
        Ok(StopOutcome { forced: true, exit })
    }
}

#[async_trait]
impl VmmInstance for FirecrackerVm {
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
        self.current.as_ref().map(|current| current.exits.clone().unwrap_or_else(|| current.launched.exits()))
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        let needs_new_process = match &self.current {
            None => true,
            Some(current) => current.launched.process.exit_status().is_some() || self.started,
        };
        if needs_new_process {
            if let Some(current) = &self.current {
                current.launched.process.kill().await.map_err(BackendError::Signal)?;
            }
            self.retire_process().await;
            self.start_process().await?;
        }
        self.running()?.api.action(ActionType::InstanceStart).await?;
        self.started = true;
        self.paused = false;
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.running()?.api.set_vm_state(VmStateName::Paused).await?;
        self.paused = true;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.running()?.api.set_vm_state(VmStateName::Resumed).await?;
        self.paused = false;
        Ok(())
    }

    async fn stop(&mut self, mode: StopMode) -> Result<StopOutcome, BackendError> {
        if let Some(current) = &self.current
            && let Some(exit) = current.launched.process.exit_status()
        {
            self.retire_process().await;
            return Ok(StopOutcome { forced: false, exit: self.refined(exit).await });
        }
        match mode {
            StopMode::Graceful { timeout } => self.graceful_stop(timeout).await,
            StopMode::Forced => Ok(StopOutcome { forced: true, exit: self.kill().await? }),
        }
    }

    async fn reboot(&mut self) -> Result<(), BackendError> {
        Err(BackendError::Unsupported { vmm: VMM, operation: "reboot a running guest in place" })
    }

    async fn info(&self) -> Result<VmmInfo, BackendError> {
        let mut info = VmmInfo { vmm: VMM.into(), ..VmmInfo::default() };
        let Ok(current) = self.running() else {
            info.vmm_state = "Exited".into();
            return Ok(info);
        };
        let (instance, launched) = (&current.instance, &current.launched);
        info.pid = Some(launched.process.pid());
        info.api_socket = Some(launched.layout.host(SOCKET_FILE));
        info.vmm_version = instance.vmm_version.clone();
        info.vmm_state = self.vmm_state().into();
        info.extra.insert("app_name".into(), instance.app_name.clone());
        info.extra.insert("instance_id".into(), instance.id.clone());
        info.extra.insert("jailed".into(), launched.layout.is_jailed().to_string());
        info.launch_timings = launched.timings.clone();
        info.identity = launched.identity;
        info.cgroup = launched.cgroup.as_ref().map(|cgroup| cgroup.paths().to_vec()).unwrap_or_default();
        Ok(info)
    }

    async fn metrics(&mut self) -> Result<VmmMetrics, BackendError> {
        // The field itself, not `running()`, so the usage can be written meanwhile.
        if let Some(current) = self.current.as_ref().filter(|current| current.launched.process.exit_status().is_none()) {
            if self.started {
                current.api.action(ActionType::FlushMetrics).await?;
            }
            self.usage.read(&current.launched)?;
        }
        let devices = self.metrics.update().map_err(prepare("Firecracker's metrics pipe", &self.file(METRICS_FIFO)))?;
        let resident_bytes = self.usage.resident_bytes(self.running().is_ok());
        Ok(VmmMetrics { cpu_time_ns: self.usage.cpu_time_ns(), resident_bytes, devices })
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        if let Some(current) = &self.current {
            current.launched.process.kill().await.map_err(BackendError::Signal)?;
        }
        self.retire_process().await;
        self.finish_captures().await;
        let (rotated_stderr, rotated_log) = (format!("{STDERR_FILE}.1"), format!("{LOG_FILE}.1"));
        for name in [SOCKET_FILE, LOG_FILE, &rotated_log, STDERR_FILE, &rotated_stderr, CONSOLE_FIFO, STDERR_FIFO, LOG_FIFO, METRICS_FIFO] {
            remove_if_present(&self.file(name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tells_a_clean_exit_and_a_signal_caught_at_a_limit() {
        let clean = "2026-12-03T08:21:28.1 [vm-1:main:INFO] Firecracker exiting successfully. exit_code=0";
        assert_eq!(exit_in_log_line(clean), Some(ProcessExit::Exited { code: 0 }));
        let limit = "2026-12-03T08:21:28.1 [vm-1:main:ERROR] Shutting down VM after intercepting signal 25, code 0.";
        let exit = exit_in_log_line(limit).unwrap();
        assert!(caught_signal_cause(exit).unwrap().contains("file-size limit"), "{exit:?}");
        assert_eq!(exit_in_log_line("[vm-1:main:INFO] Running Firecracker v1.12.1"), None);
    }
}
