//! The Cloud Hypervisor backend: one `cloud-hypervisor` process per VM in
//! the integrated jailer, with its API socket in the VM's folder,
//! configured by one `vm.create` body and driven over `/api/v1/…`.
//!
//! Where it differs from Firecracker, as its [`Capabilities`] say: it
//! reboots a guest in place (`vm.reboot`, and a guest reset, which its
//! event monitor reports), asks a guest to shut down through its ACPI power
//! button, takes a CPU topology and room for CPU and memory hotplug, and
//! has one rate limiter per interface for both directions.

mod api;
mod instance;
mod models;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{BackendError, Capabilities, VmmBackend, VmmInstance, VmmSpec};
use crate::console::ConsoleLog;
use crate::jailer::{JailError, Jailer, JailerConfig};
use crate::launch::{Launcher, TakeoverTicket};
use crate::unjailed::Unjailed;
use instance::CloudHypervisorVm;

/// Its name, by which VMs ask for it.
pub const VMM: &str = "cloud-hypervisor";

/// The most vCPUs metald gives a Cloud Hypervisor VM: what a guest
/// without x2APIC can address (Cloud Hypervisor itself allows more).
const MAX_VCPUS: u32 = 254;

/// How to run Cloud Hypervisor.
#[derive(Debug, Clone)]
pub struct CloudHypervisorConfig {
    /// The `cloud-hypervisor` executable, v54 or newer.
    pub binary: PathBuf,
    /// How long a newly launched VMM may take to answer on its socket.
    pub ready_timeout: Duration,
    /// How long one API call may take.
    pub api_timeout: Duration,
    /// How many `-v` it is given: 0 logs warnings and errors to its stderr, 1 adds info.
    pub log_verbosity: u8,
}

impl CloudHypervisorConfig {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self { binary: binary.into(), ready_timeout: Duration::from_secs(5), api_timeout: Duration::from_secs(10), log_verbosity: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct CloudHypervisorBackend {
    config: Arc<CloudHypervisorConfig>,
    launcher: Arc<dyn Launcher>,
}

impl CloudHypervisorBackend {
    /// A backend whose VMMs `launcher` starts: the integrated jailer
    /// ([`Jailer`], shared with the host's other backends) or, for
    /// development, [`Unjailed`].
    pub fn new(config: CloudHypervisorConfig, launcher: Arc<dyn Launcher>) -> Self {
        Self { config: Arc::new(config), launcher }
    }

    /// Cloud Hypervisor in the integrated jailer as `jail` says.
    pub fn jailed(config: CloudHypervisorConfig, jail: JailerConfig) -> Result<Self, JailError> {
        Ok(Self::new(config, Arc::new(Jailer::new(jail)?)))
    }

    /// Cloud Hypervisor without a jail, for development only.
    pub fn unjailed(config: CloudHypervisorConfig) -> Self {
        Self::new(config, Arc::new(Unjailed))
    }

    pub fn config(&self) -> &CloudHypervisorConfig {
        &self.config
    }
}

#[async_trait]
impl VmmBackend for CloudHypervisorBackend {
    fn name(&self) -> &'static str {
        VMM
    }

    fn launcher(&self) -> Option<&dyn Launcher> {
        Some(self.launcher.as_ref())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reboot: true,
            // The ACPI power button; the guest must run to handle it.
            graceful_shutdown: true,
            graceful_stop_needs_running_guest: true,
            pause: true,
            cpu_hotplug: true,
            cpu_topology: true,
            memory_hotplug: true,
            separate_rx_tx_rate_limits: false,
            max_vcpus: MAX_VCPUS,
            // It picks its own I/O engine and honours flushes: no choice to offer.
            io_engines: &[],
            cache_modes: &[],
            // Its limit is 64 KiB; a guest kernel's own is what binds first.
            kernel_cmdline_capacity: 4095,
            // Its devices are on PCI: it adds nothing to the command line.
            kernel_cmdline_bytes_per_device: 0,
        }
    }

    async fn create(&self, spec: VmmSpec, console: ConsoleLog) -> Result<Box<dyn VmmInstance>, BackendError> {
        let vm = CloudHypervisorVm::launch(Arc::clone(&self.config), Arc::clone(&self.launcher), spec, console).await?;
        Ok(Box::new(vm))
    }

    fn unlaunched(&self, spec: VmmSpec, console: ConsoleLog) -> Box<dyn VmmInstance> {
        Box::new(CloudHypervisorVm::unlaunched(Arc::clone(&self.config), Arc::clone(&self.launcher), spec, console))
    }

    async fn take_over(&self, spec: VmmSpec, console: ConsoleLog, ticket: &TakeoverTicket) -> Result<Box<dyn VmmInstance>, BackendError> {
        let vm = CloudHypervisorVm::take_over(Arc::clone(&self.config), Arc::clone(&self.launcher), spec, console, ticket).await?;
        Ok(Box::new(vm))
    }
}
