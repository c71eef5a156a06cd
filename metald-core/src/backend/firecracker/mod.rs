//! The Firecracker backend: one `firecracker` process per VM, each with its
//! own API socket in the VM's folder, configured resource by resource over
//! that socket and booted with `InstanceStart`.
//!
//! What Firecracker cannot do is declared in [`Capabilities`]: it has no
//! reboot (a guest reset ends the process), no hotplug, and its graceful
//! shutdown is Ctrl+Alt+Del through its i8042 device.

mod api;
mod instance;
mod log;
mod metrics;
mod models;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{BackendError, CacheMode, Capabilities, IoEngine, VmmBackend, VmmInstance, VmmSpec};
use crate::console::ConsoleLog;
use crate::jailer::{JailError, Jailer, JailerConfig};
use crate::launch::{Launcher, TakeoverTicket};
use crate::unjailed::Unjailed;
use instance::FirecrackerVm;

/// The most vCPUs Firecracker gives one VM.
const MAX_VCPUS: u32 = 32;

/// Its name, by which VMs ask for it.
pub const VMM: &str = "firecracker";

/// How to run Firecracker.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` executable; operators install it from Firecracker's releases.
    pub binary: PathBuf,
    /// How long a newly launched VMM may take to answer on its socket.
    pub ready_timeout: Duration,
    /// How long one API call may take.
    pub api_timeout: Duration,
    /// Firecracker's log level: Error, Warning, Info or Debug.
    pub log_level: String,
    /// `firecracker.log` is kept up to this size, twice with the rotated file.
    pub log_limit_bytes: u64,
}

impl FirecrackerConfig {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            ready_timeout: Duration::from_secs(5),
            api_timeout: Duration::from_secs(10),
            log_level: "Info".into(),
            log_limit_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FirecrackerBackend {
    config: Arc<FirecrackerConfig>,
    launcher: Arc<dyn Launcher>,
}

impl FirecrackerBackend {
    /// A backend whose VMMs `launcher` starts: the integrated jailer
    /// ([`Jailer`], shared with the host's other backends) or, for
    /// development, [`Unjailed`].
    pub fn new(config: FirecrackerConfig, launcher: Arc<dyn Launcher>) -> Self {
        Self { config: Arc::new(config), launcher }
    }

    /// Firecracker in the integrated jailer as `jail` says: what a
    /// production host runs.
    pub fn jailed(config: FirecrackerConfig, jail: JailerConfig) -> Result<Self, JailError> {
        Ok(Self::new(config, Arc::new(Jailer::new(jail)?)))
    }

    /// Firecracker without a jail: no private root, namespaces, cgroup or
    /// user of its own. For development only; every launch says so in the log.
    pub fn unjailed(config: FirecrackerConfig) -> Self {
        Self::new(config, Arc::new(Unjailed))
    }

    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }
}

#[async_trait]
impl VmmBackend for FirecrackerBackend {
    fn name(&self) -> &'static str {
        VMM
    }

    fn launcher(&self) -> Option<&dyn Launcher> {
        Some(self.launcher.as_ref())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // A guest reset ends Firecracker; the manager boots a fresh one.
            reboot: false,
            // Ctrl+Alt+Del through the emulated i8042, which only a running guest sees.
            graceful_shutdown: true,
            graceful_stop_needs_running_guest: true,
            pause: true,
            cpu_hotplug: false,
            cpu_topology: false,
            memory_hotplug: false,
            separate_rx_tx_rate_limits: true,
            max_vcpus: MAX_VCPUS,
            io_engines: &[IoEngine::Sync, IoEngine::Async],
            cache_modes: &[CacheMode::Unsafe, CacheMode::Writeback],
            // Firecracker's 2048 bytes, less the NUL.
            kernel_cmdline_capacity: 2047,
            // ` virtio_mmio.device=4K@0xd000f000:23`, with room to spare.
            kernel_cmdline_bytes_per_device: 40,
        }
    }

    async fn create(&self, spec: VmmSpec, console: ConsoleLog) -> Result<Box<dyn VmmInstance>, BackendError> {
        let vm = FirecrackerVm::launch(Arc::clone(&self.config), Arc::clone(&self.launcher), spec, console).await?;
        Ok(Box::new(vm))
    }

    fn unlaunched(&self, spec: VmmSpec, console: ConsoleLog) -> Box<dyn VmmInstance> {
        Box::new(FirecrackerVm::unlaunched(Arc::clone(&self.config), Arc::clone(&self.launcher), spec, console))
    }

    async fn take_over(&self, spec: VmmSpec, console: ConsoleLog, ticket: &TakeoverTicket) -> Result<Box<dyn VmmInstance>, BackendError> {
        let vm = FirecrackerVm::take_over(Arc::clone(&self.config), Arc::clone(&self.launcher), spec, console, ticket).await?;
        Ok(Box::new(vm))
    }
}
