//! Assembling a [`VmManager`]: its backends (the first is the host's
//! default), where images and VM folders are, the network provider, the
//! store, and the defaults of consoles and stops.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use super::{Inner, ManagerError, VmManager};
use crate::backend::VmmBackend;
use crate::images::ImageRoot;
use crate::network::NetworkProvider;
use crate::store::VmStore;

/// Default cap of each console file (see [`ConsoleLog`](crate::console::ConsoleLog)).
pub const DEFAULT_CONSOLE_LIMIT_BYTES: u64 = 1 << 20;
/// Default time a guest gets to shut down before its VMM is killed.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_CAPACITY: usize = 4096;

/// Assembles a [`VmManager`].
#[derive(Debug, Default)]
pub struct VmManagerBuilder {
    backends: Vec<Arc<dyn VmmBackend>>,
    network: Option<Arc<dyn NetworkProvider>>,
    image_root: Option<PathBuf>,
    vm_root: Option<PathBuf>,
    console_limit_bytes: Option<u64>,
    stop_timeout: Option<Duration>,
    store: Option<Arc<dyn VmStore>>,
}

impl VmManagerBuilder {
    /// Where VM records are kept, so that VMs outlive this process (see
    /// [`VmManager::take_over`]). Without one, VMs are known only in memory.
    pub fn store(mut self, store: Arc<dyn VmStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// A VMM backend the host offers, for example
    /// [`FirecrackerBackend::jailed`](crate::FirecrackerBackend::jailed).
    /// A backend of the same name given again replaces the earlier one.
    pub fn backend(mut self, backend: Arc<dyn VmmBackend>) -> Self {
        match self.backends.iter_mut().find(|known| known.name() == backend.name()) {
            Some(known) => *known = backend,
            None => self.backends.push(backend),
        }
        self
    }

    /// Who makes VMs' networks (namespaces, TAP devices, addresses, firewall).
    /// Without one, every interface must name an existing TAP device.
    pub fn network(mut self, provider: Arc<dyn NetworkProvider>) -> Self {
        self.network = Some(provider);
        self
    }

    /// The folder every kernel, initrd and drive must come from.
    pub fn image_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.image_root = Some(path.into());
        self
    }

    /// Where each VM gets a folder of its own (socket, logs, console, drive copies).
    pub fn vm_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.vm_root = Some(path.into());
        self
    }

    pub fn console_limit_bytes(mut self, bytes: u64) -> Self {
        self.console_limit_bytes = Some(bytes);
        self
    }

    /// How long a graceful stop waits when the caller gives no timeout.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = Some(timeout);
        self
    }

    pub fn build(self) -> Result<VmManager, ManagerError> {
        let default_backend = self.backends.first().cloned().ok_or(ManagerError::Incomplete("a VMM backend"))?;
        let image_root = self.image_root.ok_or(ManagerError::Incomplete("an image root"))?;
        let images = ImageRoot::new(&image_root).map_err(ManagerError::Image)?;
        let vm_root = self.vm_root.ok_or(ManagerError::Incomplete("a VM root folder"))?;
        // Tenants' consoles and disks: owner-only, also when it existed wider.
        crate::private_files::private_dir(&vm_root).map_err(|source| ManagerError::Setup {
            what: "the VM root folder",
            path: vm_root.clone(),
            source,
        })?;
        let vm_root =
            vm_root.canonicalize().map_err(|source| ManagerError::Setup { what: "the VM root folder", path: vm_root.clone(), source })?;
        if vm_root.to_str().is_none() {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8");
            return Err(ManagerError::Setup { what: "the VM root folder", path: vm_root, source });
        }
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(VmManager {
            inner: Arc::new(Inner {
                default_backend,
                backends: self.backends,
                images,
                vm_root,
                console_limit_bytes: self.console_limit_bytes.unwrap_or(DEFAULT_CONSOLE_LIMIT_BYTES),
                stop_timeout: self.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
                network: self.network,
                store: self.store,
                registry: RwLock::new(super::slot::Registry::default()),
                events,
                hold_deleted: std::sync::atomic::AtomicBool::new(false),
                published: crate::events::EventCounts::default(),
            }),
        })
    }
}
