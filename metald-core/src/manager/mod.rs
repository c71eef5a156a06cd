//! The VM manager: owns every VM on this host by id, drives its backend,
//! enforces the state machine and publishes [`VmEvent`]s.
//!
//! Operations on one VM run one at a time (each VM has its own lock, held
//! across the backend call); different VMs proceed in parallel. A VMM that
//! dies is noticed by a watcher task the moment its process ends, and the
//! VM becomes Failed with the exit recorded. The manager does not know who
//! calls it (API, CLI, an embedding service) or who listens to its events.
//!
//! One concern per file:
//! - [`operation`]: the frame every operation on one VM runs in
//!   ([`VmManager::run`], [`VmOperation`], [`LockedVm`]);
//! - [`operations`]: the operations themselves, one struct each;
//! - `create`: a new VM, undone entirely when a step fails;
//! - `spec`: from a configuration to a backend's [`VmmSpec`](crate::backend::VmmSpec);
//! - `takeover`: the VMs of an earlier run after a restart;
//! - `exits`: watching VMM processes, restart policies;
//! - `records`: storing, logging and publishing each change;
//! - `slot`: what is held of each VM; `reads`: what is read without waiting;
//! - `host`: host-wide setup; `builder`; `error`.

mod builder;
mod create;
mod error;
mod exits;
mod host;
pub mod operation;
pub mod operations;
mod reads;
mod records;
mod slot;
mod spec;
mod takeover;

pub use builder::{DEFAULT_CONSOLE_LIMIT_BYTES, DEFAULT_STOP_TIMEOUT, VmManagerBuilder};
pub use error::{BackendOperation, ManagerError};
pub use operation::{LockedVm, VmOperation};
pub use takeover::Takeover;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use crate::backend::{Capabilities, VmmBackend, VmmInfo};
use crate::config::{ConfigError, Problem, VmConfig};
use crate::events::VmEvent;
use crate::ids::{TenantId, VmId};
use crate::images::ImageRoot;
use crate::network::{NetworkAttachment, NetworkProvider};
use crate::process::ProcessExit;
use crate::state::VmState;
use crate::store::VmStore;
use slot::{Registry, read_lock};

/// How a caller wants a VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopOptions {
    /// Kill the VMM at once instead of asking the guest first.
    pub force: bool,
    /// How long the guest may take; the manager's default when `None`.
    pub timeout: Option<Duration>,
}

/// A request for a new VM.
#[derive(Debug, Clone)]
pub struct CreateVm {
    /// Generated when `None`.
    pub vm_id: Option<VmId>,
    pub tenant: TenantId,
    pub config: VmConfig,
}

/// What the manager knows about one VM.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vm_id: VmId,
    pub tenant: TenantId,
    pub state: VmState,
    pub config: VmConfig,
    pub created_at: SystemTime,
    pub modified_at: SystemTime,
    /// Why the VM is Failed.
    pub failure: Option<String>,
    /// How the last VMM process ended.
    pub last_exit: Option<ProcessExit>,
    /// When the guest last booted, while it runs.
    pub booted_at: Option<SystemTime>,
    pub vm_dir: PathBuf,
    pub console_path: PathBuf,
    /// What the backend says, while a VMM runs.
    pub vmm: Option<VmmInfo>,
    /// What the network provider made for the VM.
    pub network: Option<NetworkAttachment>,
    /// What the VM's VMM can do, as its backend reports it.
    pub capabilities: Capabilities,
}

/// What some VMs hold, from [`VmManager::holdings`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_bytes: u64,
}

/// A page of [`VmManager::list_page`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmPage {
    pub vms: Vec<VmSummary>,
    /// How many VMs match, on every page.
    pub total: usize,
    /// More match after this page.
    pub more: bool,
}

/// The part of [`VmInfo`] that listing needs; readable without waiting for
/// an operation in progress on the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSummary {
    pub vm_id: VmId,
    pub tenant: TenantId,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub modified_at: SystemTime,
    /// Why the VM is Failed.
    pub failure: Option<String>,
}

struct Inner {
    /// The VMM a configuration that names none gets: the first offered.
    default_backend: Arc<dyn VmmBackend>,
    /// Every VMM this host offers, the default first.
    backends: Vec<Arc<dyn VmmBackend>>,
    images: ImageRoot,
    vm_root: PathBuf,
    console_limit_bytes: u64,
    stop_timeout: Duration,
    network: Option<Arc<dyn NetworkProvider>>,
    store: Option<Arc<dyn VmStore>>,
    registry: RwLock<Registry>,
    events: broadcast::Sender<VmEvent>,
    /// Deleted VMs' records stay in the store until released (see [`VmManager::hold_deleted_records`]).
    hold_deleted: std::sync::atomic::AtomicBool,
    published: crate::events::EventCounts,
}

/// Owns and drives every VM of this host. Cheap to clone.
#[derive(Clone)]
pub struct VmManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager")
            .field("backends", &self.inner.backends.iter().map(|backend| backend.name()).collect::<Vec<_>>())
            .field("images", &self.inner.images.path())
            .field("vm_root", &self.inner.vm_root)
            .finish_non_exhaustive()
    }
}

impl VmManager {
    pub fn builder() -> VmManagerBuilder {
        VmManagerBuilder::default()
    }

    /// What the host's default VMM can do.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.default_backend.capabilities()
    }

    /// The VMM a configuration that names none runs on.
    pub fn backend_name(&self) -> &'static str {
        self.inner.default_backend.name()
    }

    /// Every VMM this host offers, the default first.
    pub fn backend_names(&self) -> Vec<&'static str> {
        self.inner.backends.iter().map(|backend| backend.name()).collect()
    }

    /// The backend a VM's configuration names; none named is the host's default.
    fn backend_of(&self, config: &VmConfig) -> Result<Arc<dyn VmmBackend>, ManagerError> {
        if config.vmm.is_empty() {
            return Ok(Arc::clone(&self.inner.default_backend));
        }
        self.inner.backends.iter().find(|backend| backend.name() == config.vmm).cloned().ok_or_else(|| {
            ManagerError::InvalidConfig(ConfigError {
                field: "vmm".into(),
                problem: Problem::NotOffered { value: config.vmm.clone(), offered: self.backend_names().join(", ") },
            })
        })
    }

    /// From now on a deleted VM's record stays in the store, marked deleted
    /// and with how its last VMM ended, until [`VmManager::release_deleted`].
    /// Billing calls this before [`VmManager::take_over`]: a delete its meter
    /// had not yet billed when metald was killed is then found again after a
    /// restart, as a `FoundStopped` event followed by `Deleted`.
    pub fn hold_deleted_records(&self) {
        self.inner.hold_deleted.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets the record of a deleted VM that [`VmManager::hold_deleted_records`]
    /// kept; a VM made again under the same id keeps its own.
    pub fn release_deleted(&self, vm_id: &VmId) -> Result<(), ManagerError> {
        let Some(store) = &self.inner.store else { return Ok(()) };
        let registry = read_lock(&self.inner.registry);
        if registry.vms.contains_key(vm_id) || registry.reserved.contains(vm_id) {
            return Ok(());
        }
        store.remove(vm_id).map_err(ManagerError::Store)
    }

    /// Every event from now on. A subscriber more than 4096 events behind
    /// loses the oldest and is told so (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.inner.events.subscribe()
    }
}
