//! One VM's Firecracker process: launching it, waiting until its API
//! answers, configuring it, and driving it through the VM's life.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::fcntl::OFlag;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::api::FirecrackerApi;
use super::metrics::MetricsReader;
use super::models::{ActionType, BootSource, Drive, Logger, MachineConfiguration, Metrics, NetworkInterface, RateLimiter, VmStateName};
use super::{FirecrackerConfig, VMM};
use crate::backend::{BackendError, StopMode, StopOutcome, VmmInfo, VmmInstance, VmmMetrics, VmmSpec};
use crate::console::ConsoleLog;
use crate::process::{ProcessExit, ProcessUsage, Supervised};

pub const SOCKET_FILE: &str = "firecracker.sock";
pub const LOG_FILE: &str = "firecracker.log";
pub const METRICS_FILE: &str = "firecracker.metrics";
pub const STDERR_FILE: &str = "firecracker.stderr";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long a dead VMM's console pipe may take to drain.
const CAPTURE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of Firecracker's stderr an early death reports.
const STDERR_TAIL_BYTES: u64 = 2048;

#[derive(Debug)]
pub struct FirecrackerVm {
    settings: Arc<FirecrackerConfig>,
    spec: VmmSpec,
    console: ConsoleLog,
    api: FirecrackerApi,
    process: Option<Supervised>,
    /// The task copying the current (or last) process's console output.
    capture: Option<JoinHandle<()>>,
    /// Whether `InstanceStart` succeeded for the current process.
    started: bool,
    metrics: MetricsReader,
    /// Usage of earlier processes of this VM, so totals never go backwards.
    finished_usage: ProcessUsage,
    last_usage: ProcessUsage,
}

fn prepare<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |source| BackendError::Prepare { what, path: path.to_path_buf(), source }
}

/// Every path handed to Firecracker was checked to be UTF-8 in `launch`.
fn path_str(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

impl FirecrackerVm {
    /// Launches and configures Firecracker for `spec`. On error no process is left.
    pub async fn launch(settings: Arc<FirecrackerConfig>, spec: VmmSpec, console: ConsoleLog) -> Result<Self, BackendError> {
        let socket = spec.vm_dir.join(SOCKET_FILE);
        let socket_len = socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(BackendError::SocketPathTooLong { path: socket, len: socket_len, max: MAX_SOCKET_PATH });
        }
        let paths = [("the VM folder", &spec.vm_dir), ("the kernel", &spec.kernel)]
            .into_iter()
            .chain(spec.initrd.iter().map(|initrd| ("the initrd", initrd)))
            .chain(spec.drives.iter().map(|drive| ("a drive", &drive.path)));
        for (what, path) in paths {
            if path.to_str().is_none() {
                return Err(BackendError::Prepare {
                    what,
                    path: path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "Firecracker's API takes only UTF-8 paths"),
                });
            }
        }
        let api = FirecrackerApi::new(&socket, settings.api_timeout);
        let mut vm = Self {
            settings,
            spec,
            console,
            api,
            process: None,
            capture: None,
            started: false,
            metrics: MetricsReader::default(),
            finished_usage: ProcessUsage::default(),
            last_usage: ProcessUsage::default(),
        };
        vm.start_process().await?;
        Ok(vm)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.spec.vm_dir.join(name)
    }

    /// Spawns Firecracker, waits for its API and configures it.
    async fn start_process(&mut self) -> Result<(), BackendError> {
        self.finish_capture().await;
        let process = self.spawn()?;
        let result = async {
            self.wait_until_ready(&process).await?;
            self.configure().await
        }
        .await;
        match result {
            Ok(()) => {
                self.process = Some(process);
                self.started = false;
                self.metrics.restart();
                Ok(())
            }
            Err(error) => {
                if let Err(kill_error) = process.kill().await {
                    tracing::error!(vm_id = %self.spec.vm_id, error = %crate::error_chain(&kill_error), "cannot kill a Firecracker that failed to start");
                }
                Err(error)
            }
        }
    }

    fn spawn(&mut self) -> Result<Supervised, BackendError> {
        let socket = self.file(SOCKET_FILE);
        match std::fs::remove_file(&socket) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(prepare("a stale API socket", &socket)(error)),
            _ => {}
        }
        // Firecracker opens these rather than creating them.
        for name in [LOG_FILE, METRICS_FILE] {
            let path = self.file(name);
            File::create(&path).map_err(prepare("a Firecracker output file", &path))?;
        }
        let stderr_path = self.file(STDERR_FILE);
        let stderr = File::create(&stderr_path).map_err(prepare("Firecracker's stderr file", &stderr_path))?;
        let (console_read, console_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| prepare("the console pipe", &self.spec.vm_dir)(errno.into()))?;

        let mut command = Command::new(&self.settings.binary);
        command
            .arg("--api-sock")
            .arg(&socket)
            .arg("--id")
            .arg(self.spec.vm_id.as_str())
            .current_dir(&self.spec.vm_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(console_write))
            .stderr(Stdio::from(stderr))
            // Its own process group: a Ctrl+C meant for metald never reaches the VMs.
            .process_group(0);
        let process = Supervised::spawn(&mut command).map_err(BackendError::Launch)?;
        // Our copy of the pipe's write end lives in `command`; once it is
        // gone, the console sees end-of-file exactly when Firecracker exits.
        drop(command);

        let console_source =
            tokio::net::unix::pipe::Receiver::from_owned_fd(console_read).map_err(prepare("the console pipe", &self.spec.vm_dir));
        let capture = console_source.and_then(|source| self.console.capture(source).map_err(BackendError::Console));
        if let Err(error) = capture {
            let _ = process.signal(nix::sys::signal::Signal::SIGKILL);
            return Err(error);
        }
        Ok(process)
    }

    /// Waits, without fixed sleeps, until the API socket exists and answers.
    async fn wait_until_ready(&self, process: &Supervised) -> Result<(), BackendError> {
        let deadline = Instant::now() + self.settings.ready_timeout;
        let socket = self.file(SOCKET_FILE);
        let creations = SocketCreations::watch(&self.spec.vm_dir)?;
        let appeared = async {
            while !socket.exists() {
                tokio::select! {
                    ready = creations.next() => ready.map_err(prepare("a watch on the VM folder", &self.spec.vm_dir))?,
                    exit = process.wait() => return Err(self.died_before_ready(exit)),
                    () = tokio::time::sleep_until(deadline) => return Err(BackendError::NotReady { vmm: VMM, timeout: self.settings.ready_timeout }),
                }
            }
            Ok(())
        }
        .await;
        // Closing an inotify instance waits for an RCU grace period (often
        // more than 10 ms here); let a blocking thread wait for it instead of the boot.
        tokio::task::spawn_blocking(move || drop(creations));
        appeared?;
        // The socket is bound and listening within microseconds of appearing;
        // a refused connection in that window is retried at once.
        loop {
            match self.api.instance_info().await {
                Ok(_) => return Ok(()),
                Err(error @ BackendError::Transport { .. }) => {
                    if let Some(exit) = process.exit_status() {
                        return Err(self.died_before_ready(exit));
                    }
                    if Instant::now() >= deadline {
                        tracing::warn!(vm_id = %self.spec.vm_id, error = %crate::error_chain(&error), "Firecracker API never answered");
                        return Err(BackendError::NotReady { vmm: VMM, timeout: self.settings.ready_timeout });
                    }
                    tokio::task::yield_now().await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn died_before_ready(&self, exit: ProcessExit) -> BackendError {
        BackendError::DiedBeforeReady { vmm: VMM, exit, stderr: read_tail(&self.file(STDERR_FILE), STDERR_TAIL_BYTES) }
    }

    async fn configure(&self) -> Result<(), BackendError> {
        let spec = &self.spec;
        let log_path = self.file(LOG_FILE);
        let metrics_path = self.file(METRICS_FILE);
        self.api
            .put_logger(&Logger {
                log_path: path_str(&log_path),
                level: &self.settings.log_level,
                show_level: true,
                show_log_origin: false,
            })
            .await?;
        self.api.put_metrics(&Metrics { metrics_path: path_str(&metrics_path) }).await?;
        self.api
            .put_machine_config(&MachineConfiguration {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
                smt: spec.smt,
                huge_pages: if spec.huge_pages { "2M" } else { "None" },
            })
            .await?;
        let initrd = spec.initrd.as_deref().map(path_str);
        let boot_args = if spec.kernel_args.is_empty() { None } else { Some(spec.kernel_args.as_str()) };
        self.api
            .put_boot_source(&BootSource {
                kernel_image_path: path_str(&spec.kernel),
                boot_args: boot_args.unwrap_or_default(),
                initrd_path: initrd,
            })
            .await?;
        for drive in &spec.drives {
            self.api
                .put_drive(&Drive {
                    drive_id: &drive.id,
                    path_on_host: path_str(&drive.path),
                    is_root_device: drive.is_root_device,
                    is_read_only: drive.read_only,
                    io_engine: drive.io_engine.as_deref(),
                    cache_type: drive.cache_type.as_deref(),
                })
                .await?;
        }
        for interface in &spec.interfaces {
            self.api
                .put_network_interface(&NetworkInterface {
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

    /// Waits until the last process's console output is all in the log, so
    /// two captures never write one file. The pipe ends with the process.
    async fn finish_capture(&mut self) {
        if let Some(capture) = self.capture.take()
            && tokio::time::timeout(CAPTURE_DRAIN_TIMEOUT, capture).await.is_err()
        {
            tracing::warn!(vm_id = %self.spec.vm_id, "console capture still open after its VMM ended");
        }
    }

    /// The process, if it still runs.
    fn running(&self) -> Result<&Supervised, BackendError> {
        match &self.process {
            Some(process) => match process.exit_status() {
                None => Ok(process),
                Some(exit) => Err(BackendError::Exited { vmm: VMM, operation: "being driven", exit }),
            },
            None => Err(BackendError::NotRunning),
        }
    }

    /// Forgets an ended process, keeping what it used.
    fn retire_process(&mut self) {
        if self.process.take().is_some() {
            self.finished_usage.cpu_time_ns += self.last_usage.cpu_time_ns;
            self.last_usage = ProcessUsage::default();
        }
        self.started = false;
    }

    async fn kill(&mut self) -> Result<ProcessExit, BackendError> {
        let Some(process) = &self.process else {
            return Err(BackendError::NotRunning);
        };
        let exit = process.kill().await.map_err(BackendError::Signal)?;
        self.retire_process();
        Ok(exit)
    }

    async fn graceful_stop(&mut self, timeout: Duration) -> Result<StopOutcome, BackendError> {
        let process = self.running()?.clone();
        if self.started {
            match self.api.action(ActionType::SendCtrlAltDel).await {
                Ok(()) => {
                    if let Some(exit) = process.wait_timeout(timeout).await {
                        self.retire_process();
                        return Ok(StopOutcome { forced: false, exit });
                    }
                    tracing::info!(vm_id = %self.spec.vm_id, ?timeout, "guest did not stop in time; killing its VMM");
                }
                Err(error) => {
                    if let Some(exit) = process.exit_status() {
                        self.retire_process();
                        return Ok(StopOutcome { forced: false, exit });
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
        self.running().ok().map(Supervised::pid)
    }

    fn exits(&self) -> Option<watch::Receiver<Option<ProcessExit>>> {
        self.process.as_ref().map(Supervised::exits)
    }

    async fn boot(&mut self) -> Result<(), BackendError> {
        let needs_new_process = match &self.process {
            None => true,
            Some(process) => process.exit_status().is_some() || self.started,
        };
        if needs_new_process {
            if let Some(process) = &self.process {
                process.kill().await.map_err(BackendError::Signal)?;
            }
            self.retire_process();
            self.start_process().await?;
        }
        self.api.action(ActionType::InstanceStart).await?;
        self.started = true;
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.running()?;
        self.api.set_vm_state(VmStateName::Paused).await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.running()?;
        self.api.set_vm_state(VmStateName::Resumed).await
    }

    async fn stop(&mut self, mode: StopMode) -> Result<StopOutcome, BackendError> {
        if let Some(process) = &self.process
            && let Some(exit) = process.exit_status()
        {
            self.retire_process();
            return Ok(StopOutcome { forced: false, exit });
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
        let mut info = VmmInfo { vmm: VMM.into(), pid: self.pid(), api_socket: Some(self.file(SOCKET_FILE)), ..VmmInfo::default() };
        if self.running().is_ok() {
            let instance = self.api.instance_info().await?;
            info.vmm_version = instance.vmm_version;
            info.vmm_state = instance.state;
            info.extra.insert("app_name".into(), instance.app_name);
            info.extra.insert("instance_id".into(), instance.id);
        } else {
            info.vmm_state = "Exited".into();
            info.api_socket = None;
        }
        Ok(info)
    }

    async fn metrics(&mut self) -> Result<VmmMetrics, BackendError> {
        if let Ok(process) = self.running() {
            let pid = process.pid();
            if self.started {
                self.api.action(ActionType::FlushMetrics).await?;
            }
            match ProcessUsage::read(pid) {
                Ok(usage) => self.last_usage = usage,
                // The process may have ended between the check and the read.
                Err(source) if self.running().is_ok() => {
                    return Err(BackendError::ProcessStats { what: "CPU and memory use", pid, source });
                }
                Err(_) => {}
            }
        }
        let path = self.file(METRICS_FILE);
        let devices = self.metrics.update(&path).map_err(prepare("Firecracker's metrics", &path))?;
        let resident_bytes = if self.running().is_ok() { self.last_usage.resident_bytes } else { 0 };
        Ok(VmmMetrics {
            cpu_time_ns: self.finished_usage.cpu_time_ns + self.last_usage.cpu_time_ns,
            resident_bytes,
            net_rx_bytes: devices.net_rx_bytes,
            net_tx_bytes: devices.net_tx_bytes,
            net_rx_packets: devices.net_rx_packets,
            net_tx_packets: devices.net_tx_packets,
            block_read_bytes: devices.block_read_bytes,
            block_write_bytes: devices.block_write_bytes,
            block_read_ops: devices.block_read_ops,
            block_write_ops: devices.block_write_ops,
        })
    }

    async fn destroy(&mut self) -> Result<(), BackendError> {
        if let Some(process) = &self.process {
            process.kill().await.map_err(BackendError::Signal)?;
        }
        self.retire_process();
        self.finish_capture().await;
        for name in [SOCKET_FILE, LOG_FILE, METRICS_FILE, STDERR_FILE] {
            let path = self.file(name);
            match std::fs::remove_file(&path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    return Err(prepare("removal of a Firecracker file", &path)(error));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Creations in one folder, as inotify reports them.
struct SocketCreations {
    inotify: AsyncFd<InotifyFd>,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl SocketCreations {
    fn watch(dir: &Path) -> Result<Self, BackendError> {
        let to_io = |errno: nix::errno::Errno| io::Error::from(errno);
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|errno| prepare("an inotify instance", dir)(to_io(errno)))?;
        inotify
            .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .map_err(|errno| prepare("a watch on the VM folder", dir)(to_io(errno)))?;
        // SAFETY: InotifyFd owns the inotify fd and never replaces it, so the
        // fd stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|error| prepare("a watch on the VM folder", dir)(error.into()))?;
        Ok(Self { inotify })
    }

    /// Waits until something was created in the folder.
    async fn next(&self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

fn read_tail(path: &Path, max_bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(max_bytes)));
    let mut text = String::new();
    let _ = file.take(max_bytes).read_to_string(&mut text);
    text
}
