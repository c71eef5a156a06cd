//! The VM manager: owns every VM on this host by id, drives the backend,
//! enforces the state machine and publishes [`VmEvent`]s.
//!
//! Operations on one VM run one at a time (each VM has its own lock, held
//! across the backend call); different VMs proceed in parallel. A VMM that
//! dies is noticed by a watcher task the moment its process ends, and the
//! VM becomes Failed with the exit recorded. The manager does not know who
//! calls it (API, CLI, an embedding service) or who listens to its events.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, OwnedMutexGuard, broadcast};

use crate::backend::{
    BackendError, Capabilities, DriveSpec, InterfaceSpec, StopMode, StopOutcome, Unlaunchable, VmmBackend, VmmInfo, VmmInstance,
    VmmMetrics, VmmSpec,
};
use crate::cgroups::CgroupUsage;
use crate::config::{ConfigError, Problem, VmConfig};
use crate::console::{ConsoleError, ConsoleLog};
use crate::events::{EndedVmm, KEPT_ENDS, RunningVmm, VmEvent, VmEventKind};
use crate::ids::{TenantId, VmId};
use crate::images::{self, ImageError, ImageFile, ImageRoot};
use crate::jailer::{IdentityLease, JailError};
use crate::launch::VmmExit;
use crate::network::{AttachRequest, NetworkAttachment, NetworkError, NetworkProvider};
use crate::process::ProcessExit;
use crate::state::{IllegalTransition, VmState};
use crate::store::{StoreError, VmRecord, VmStore};
use crate::target::VmTarget;
use crate::vm_dir::VmDir;
use metald_types::time::{from_unix_millis, unix_millis};

/// Default cap of each console file (see [`ConsoleLog`]).
pub const DEFAULT_CONSOLE_LIMIT_BYTES: u64 = 1 << 20;
/// Default time a guest gets to shut down before its VMM is killed.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("the runtime is shutting down; the operation did not finish")]
    ShuttingDown,
    #[error("the manager needs {0}")]
    Incomplete(&'static str),
    #[error("cannot set up the jailer")]
    Jail(#[from] JailError),
    #[error("cannot use {what} {path}")]
    Setup {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid VM configuration")]
    InvalidConfig(#[source] ConfigError),
    #[error("image refused")]
    Image(#[source] ImageError),
    #[error("network refused or failed")]
    Network(#[source] NetworkError),
    #[error("VM {0} does not exist")]
    NotFound(VmId),
    #[error("VM {0} already exists")]
    AlreadyExists(VmId),
    #[error("VM {vm_id} is {current} and cannot {operation}")]
    InvalidState {
        vm_id: VmId,
        operation: &'static str,
        current: VmState,
        #[source]
        source: IllegalTransition,
    },
    #[error("VM {vm_id} is {current}; to {operation} it must be {required}")]
    WrongState { vm_id: VmId, operation: &'static str, current: VmState, required: &'static str },
    #[error("the {backend} backend failed to {operation} VM {vm_id}")]
    Backend {
        vm_id: VmId,
        backend: String,
        operation: BackendOperation,
        #[source]
        source: Box<BackendError>,
    },
    #[error("cannot {action} the folder of VM {vm_id} at {path}")]
    VmDir {
        vm_id: VmId,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the console of VM {vm_id}")]
    Console {
        vm_id: VmId,
        #[source]
        source: ConsoleError,
    },
    #[error("deleting VM {vm_id} left work undone: {}", .problems.join("; "))]
    DeleteIncomplete { vm_id: VmId, problems: Vec<String> },
    #[error("cannot read the VM store")]
    Store(#[source] StoreError),
}

/// What the manager asked of the backend. It reads as a verb in messages
/// ("failed to shut down VM web-1"); [`BackendOperation::label`] is its
/// stable name for metrics and logs that are queried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendOperation {
    Create,
    Boot,
    Reboot,
    Pause,
    Resume,
    Shutdown,
    /// A graceful stop of a paused VM resumes it first, so that its guest can act on the request.
    ResumeBeforeShutdown,
    Recover,
    Reattach,
    ReadMetrics,
}

impl BackendOperation {
    /// Lower-case, no spaces: `create`, `boot`, `reboot`, `pause`, `resume`,
    /// `shutdown`, `resume_before_shutdown`, `recover`, `reattach`, `read_metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Boot => "boot",
            Self::Reboot => "reboot",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Shutdown => "shutdown",
            Self::ResumeBeforeShutdown => "resume_before_shutdown",
            Self::Recover => "recover",
            Self::Reattach => "reattach",
            Self::ReadMetrics => "read_metrics",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Shutdown => "shut down",
            Self::ResumeBeforeShutdown => "resume before shutdown",
            Self::Reattach => "reattach to",
            Self::ReadMetrics => "read metrics of",
            other => other.label(),
        }
    }
}

impl std::fmt::Display for BackendOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb())
    }
}

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

struct VmEntry {
    state: VmState,
    config: VmConfig,
    instance: Box<dyn VmmInstance>,
    /// The user the VM's VMMs run as, for the VM's whole life.
    identity: Option<Arc<IdentityLease>>,
    /// What the network provider made for the VM.
    network: Option<NetworkAttachment>,
    vm_dir: VmDir,
    failure: Option<String>,
    last_exit: Option<ProcessExit>,
    booted_at: Option<SystemTime>,
    /// How the last VMMs ended, oldest first, kept in the store for the meter of a later metald.
    recent_ends: Vec<EndedVmm>,
    created_at: SystemTime,
    modified_at: SystemTime,
    /// Bumped whenever a new VMM process is watched; a watcher of an older
    /// process has nothing to say.
    watch_generation: u64,
    watched_pid: Option<u32>,
    /// Restarts in a row its restart policy made.
    restarts: crate::restart::RestartCount,
}

impl VmEntry {
    /// Counts a death of its VMM (or a restart that failed) against its
    /// restart policy: when to boot it again, if the policy allows.
    fn next_restart(&mut self, vm_id: &VmId, ran_for: Option<Duration>) -> Option<crate::restart::NextRestart> {
        let policy = self.config.restart;
        let next = self.restarts.next(&policy, ran_for);
        if next.is_none() && policy.on_failure {
            tracing::warn!(%vm_id, "the VM stays failed: its restart policy allows no more restarts");
        }
        next
    }
}

struct VmSlot {
    vm_id: VmId,
    tenant: TenantId,
    /// The VMM that runs it, as its configuration names it.
    vmm: String,
    console: ConsoleLog,
    entry: Arc<Mutex<VmEntry>>,
    summary: StdMutex<VmSummary>,
}

impl VmSlot {
    fn new(vm_id: VmId, tenant: TenantId, console: ConsoleLog, entry: VmEntry) -> Arc<Self> {
        let summary = StdMutex::new(summary_of(&vm_id, &tenant, &entry));
        let vmm = entry.config.vmm.clone();
        Arc::new(Self { vm_id, tenant, vmm, console, summary, entry: Arc::new(Mutex::new(entry)) })
    }
}

impl std::fmt::Debug for VmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSlot").field("vm_id", &self.vm_id).field("tenant", &self.tenant).finish_non_exhaustive()
    }
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

/// The VMs by id, and the ids being created (not yet visible).
#[derive(Default)]
struct Registry {
    /// In id order, so a list is read in order and a page starts where the last ended.
    vms: std::collections::BTreeMap<VmId, Arc<VmSlot>>,
    reserved: std::collections::HashSet<VmId>,
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
    /// [`VmManager::recover`]). Without one, VMs are known only in memory.
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
                registry: RwLock::new(Registry::default()),
                events,
                hold_deleted: std::sync::atomic::AtomicBool::new(false),
                published: crate::events::EventCounts::default(),
            }),
        })
    }
}

/// A locked VM: its slot and exclusive access to its entry.
struct Locked {
    slot: Arc<VmSlot>,
    entry: OwnedMutexGuard<VmEntry>,
}

impl VmManager {
    pub fn builder() -> VmManagerBuilder {
        VmManagerBuilder::default()
    }

    /// Validates the request, confines its images, launches and configures
    /// the VMM. Nothing is left behind when any step fails.
    pub async fn create(&self, request: CreateVm) -> Result<VmId, ManagerError> {
        self.create_holding(request, ()).await
    }

    /// [`VmManager::create`], keeping `held` until the create is over, also
    /// when the caller stopped waiting: a quota's reservation for the VM,
    /// say, which must not be released while the create still runs.
    pub async fn create_holding(&self, request: CreateVm, held: impl Send + 'static) -> Result<VmId, ManagerError> {
        let manager = self.clone();
        let span = tracing::info_span!(
            "vm.create",
            vm_id = request.vm_id.as_ref().map(VmId::as_str),
            tenant = %request.tenant,
            vmm = self.backend_of(&request.config).map_or("", |backend| backend.name())
        );
        detached(span, async move {
            let created = manager.create_now(request).await;
            drop(held);
            created
        })
        .await
    }

    /// Starts the guest (again, after a shutdown).
    pub async fn boot(&self, vm: impl Into<VmTarget>) -> Result<(), ManagerError> {
        let (manager, target) = (self.clone(), vm.into());
        detached(self.operation_span("vm.boot", target.vm_id()), async move { manager.boot_now(&target).await }).await
    }

    /// Stops the guest's vCPUs; its memory stays.
    pub async fn pause(&self, vm: impl Into<VmTarget>) -> Result<(), ManagerError> {
        let (manager, target) = (self.clone(), vm.into());
        detached(self.operation_span("vm.pause", target.vm_id()), async move { manager.pause_now(&target).await }).await
    }

    /// Lets a paused guest run again.
    pub async fn resume(&self, vm: impl Into<VmTarget>) -> Result<(), ManagerError> {
        let (manager, target) = (self.clone(), vm.into());
        detached(self.operation_span("vm.resume", target.vm_id()), async move { manager.resume_now(&target).await }).await
    }

    /// Stops the guest: gracefully first unless forced, killing its VMM
    /// when the timeout runs out.
    pub async fn shutdown(&self, vm: impl Into<VmTarget>, options: StopOptions) -> Result<StopOutcome, ManagerError> {
        let (manager, target) = (self.clone(), vm.into());
        detached(self.operation_span("vm.shutdown", target.vm_id()), async move { manager.shutdown_now(&target, options).await }).await
    }

    /// Restarts a running guest: natively where the backend can, otherwise
    /// by stopping its VMM and booting a fresh one. The VM stays Running.
    pub async fn reboot(&self, vm: impl Into<VmTarget>, options: StopOptions) -> Result<(), ManagerError> {
        let (manager, target) = (self.clone(), vm.into());
        detached(self.operation_span("vm.reboot", target.vm_id()), async move { manager.reboot_now(&target, options).await }).await
    }

    /// Stops the VM when needed (gracefully unless `force`), then removes
    /// its VMM, its folder and every copy made for it.
    pub async fn delete(&self, vm: impl Into<VmTarget>, options: StopOptions) -> Result<(), ManagerError> {
        let (manager, target) = (self.clone(), vm.into());
        detached(self.operation_span("vm.delete", target.vm_id()), async move { manager.delete_now(&target, options).await }).await
    }

    /// The span an operation on one VM runs in, with the VM and its tenant,
    /// under the caller's span (an API call's, for the daemon).
    fn operation_span(&self, name: &'static str, vm_id: &VmId) -> tracing::Span {
        let (tenant, vmm) = self.slot(vm_id).map(|slot| (slot.tenant.to_string(), slot.vmm.clone())).unwrap_or_default();
        tracing::info_span!("vm.operation", otel.name = name, vm_id = %vm_id, tenant = %tenant, vmm = %vmm)
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
    /// Billing calls this before [`VmManager::recover`]: a delete its meter
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

    async fn create_now(&self, request: CreateVm) -> Result<VmId, ManagerError> {
        let CreateVm { vm_id, tenant, mut config } = request;
        config.validate().map_err(ManagerError::InvalidConfig)?;
        // The VM keeps the name of its VMM, also when the host's default changes.
        config.vmm = self.backend_of(&config)?.name().to_owned();
        self.check_capabilities(&config)?;
        let resolved = self.resolve_images(&config)?;
        let vm_id = vm_id.unwrap_or_else(VmId::generate);
        {
            let mut registry = write_lock(&self.inner.registry);
            if registry.vms.contains_key(&vm_id) || !registry.reserved.insert(vm_id.clone()) {
                return Err(ManagerError::AlreadyExists(vm_id));
            }
        }
        let vm_dir = VmDir::of(&self.inner.vm_root, &vm_id);
        let console = vm_dir.console(self.inner.console_limit_bytes);
        let prepared = self.prepare(&vm_id, &tenant, &config, resolved, &vm_dir, console.clone()).await;
        let (instance, identity, network) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                remove_vm_dir(&vm_dir);
                write_lock(&self.inner.registry).reserved.remove(&vm_id);
                return Err(error);
            }
        };
        fail::fail_point!("create-before-record");
        let now = SystemTime::now();
        let entry = VmEntry {
            state: VmState::Created,
            config,
            instance,
            identity,
            network,
            vm_dir,
            failure: None,
            last_exit: None,
            booted_at: None,
            recent_ends: Vec::new(),
            created_at: now,
            modified_at: now,
            watch_generation: 0,
            watched_pid: None,
            restarts: crate::restart::RestartCount::default(),
        };
        let slot = VmSlot::new(vm_id.clone(), tenant.clone(), console, entry);
        {
            let mut entry = slot.entry.lock().await;
            self.watch_vmm(&slot, &mut entry);
            {
                let mut registry = write_lock(&self.inner.registry);
                registry.reserved.remove(&vm_id);
                registry.vms.insert(vm_id.clone(), Arc::clone(&slot));
            }
            self.publish(&slot, &mut entry, VmEventKind::Created).await;
        }
        tracing::info!(%vm_id, %tenant, "VM created");
        Ok(vm_id)
    }

    /// The guest's kernel command line is the caller's, then what the VMM
    /// and the network add: all of it must fit, so a line too long is told
    /// at the request, naming what takes the room, not at the boot.
    fn check_command_line(&self, config: &VmConfig, capabilities: &Capabilities) -> Result<(), ManagerError> {
        let network_bytes = self.inner.network.as_ref().map_or(0, |network| network.kernel_args_bound(&config.network));
        let devices = config.storage.len() + config.network.len();
        let host_bytes = network_bytes + devices * capabilities.kernel_cmdline_bytes_per_device;
        let capacity = capabilities.kernel_cmdline_capacity;
        let refuse = |field: &str, reason: String| {
            Err(ManagerError::InvalidConfig(ConfigError { field: field.to_owned(), problem: Problem::Inconsistent { reason } }))
        };
        if host_bytes > capacity {
            return refuse(
                "network",
                format!(
                    "{} interfaces and {} drives need up to {host_bytes} bytes of the guest's kernel command line for the host's own \
                     entries (addresses, devices); it holds {capacity}",
                    config.network.len(),
                    config.storage.len()
                ),
            );
        }
        let room = capacity - host_bytes;
        let asked = config.boot.kernel_args.len();
        if asked > room {
            return refuse(
                "boot.kernel_args",
                format!(
                    "is {asked} bytes long; with up to {host_bytes} bytes the host adds for this VM's {devices} devices, \
                     at most {room} fit in the {capacity} of the guest's kernel command line"
                ),
            );
        }
        Ok(())
    }

    fn check_capabilities(&self, config: &VmConfig) -> Result<(), ManagerError> {
        let backend = self.backend_of(config)?;
        let capabilities = backend.capabilities();
        let refuse = |field: &str, reason: &str| {
            Err(ManagerError::InvalidConfig(ConfigError {
                field: field.to_owned(),
                problem: Problem::Inconsistent { reason: format!("{reason}, which the {} backend cannot do", backend.name()) },
            }))
        };
        if config.memory.hotplug_enabled && !capabilities.memory_hotplug {
            return refuse("memory.hotplug_enabled", "asks for memory hotplug");
        }
        if config.cpu.max_vcpu_count > config.cpu.vcpu_count && !capabilities.cpu_hotplug {
            return refuse("cpu.max_vcpu_count", "asks for CPU hotplug");
        }
        if config.cpu.vcpu_count > capabilities.max_vcpus {
            return refuse("cpu.vcpu_count", "asks for more vCPUs than the VMM supports");
        }
        self.check_command_line(config, &capabilities)?;
        for (index, interface) in config.network.iter().enumerate() {
            let tap_problem = match (&self.inner.network, interface.tap_device.is_empty()) {
                (None, true) => Some("is required: this manager has no network provider to make a TAP device"),
                (Some(_), false) => Some("must be empty: the network provider makes and names the TAP device"),
                _ => None,
            };
            if let Some(reason) = tap_problem {
                return Err(ManagerError::InvalidConfig(ConfigError {
                    field: format!("network[{index}].tap_device"),
                    problem: Problem::Inconsistent { reason: reason.into() },
                }));
            }
            let asymmetric = interface.rx_rate_limit != interface.tx_rate_limit;
            if asymmetric && !capabilities.separate_rx_tx_rate_limits {
                return refuse(&format!("network[{index}].tx_rate_limit"), "differs from rx_rate_limit");
            }
        }
        Ok(())
    }

    fn resolve_images(&self, config: &VmConfig) -> Result<ResolvedImages, ManagerError> {
        let resolved = self.resolve_images_with(config, |field, path| self.inner.images.open(field, path))?;
        // Shared images are checked by the jail (its VMM must read them); a
        // writable one is copied by root for the VM, so it is checked here.
        for (index, (drive, image)) in config.storage.iter().zip(&resolved.drives).enumerate() {
            if !drive.read_only && !image.world_readable() {
                let (field, path, mode) = (format!("storage[{index}].path"), drive.path.clone(), image.mode & 0o7777);
                return Err(ManagerError::Image(ImageError::NotShared { field, path, mode }));
            }
        }
        Ok(resolved)
    }

    /// The images of a VM found after a restart. One that is no longer in
    /// the image root does not stop the takeover: its VMM loaded the kernel
    /// and holds its drives already. It stands in as an unlinked empty
    /// file, which the jail refuses to expose if the VM is ever launched
    /// again ("was removed or replaced").
    fn resolve_found_images(&self, vm_id: &VmId, config: &VmConfig) -> Result<ResolvedImages, ManagerError> {
        self.resolve_images_with(config, |field, path| match self.inner.images.open(field, path) {
            Err(ImageError::Missing { .. } | ImageError::SymlinkEscape { .. } | ImageError::NotAFile { .. }) => {
                tracing::warn!(%vm_id, field, path, "an image of a VM found after a restart is gone from the image root; the VM cannot be launched again");
                removed_image(&self.inner.vm_root, field, path)
            }
            opened => opened,
        })
    }

    fn resolve_images_with(
        &self,
        config: &VmConfig,
        open: impl Fn(&str, &str) -> Result<ImageFile, ImageError>,
    ) -> Result<ResolvedImages, ManagerError> {
        let kernel = open("boot.kernel_path", &config.boot.kernel_path).map_err(ManagerError::Image)?;
        let initrd = if config.boot.initrd_path.is_empty() {
            None
        } else {
            Some(open("boot.initrd_path", &config.boot.initrd_path).map_err(ManagerError::Image)?)
        };
        let drives = config
            .storage
            .iter()
            .enumerate()
            .map(|(index, drive)| open(&format!("storage[{index}].path"), &drive.path).map_err(ManagerError::Image))
            .collect::<Result<_, _>>()?;
        Ok(ResolvedImages { kernel, initrd, drives })
    }

    /// Leases the VM's user, attaches its network, then launches its VMM.
    /// Whatever was done is undone when a later step fails.
    async fn prepare(
        &self,
        vm_id: &VmId,
        tenant: &TenantId,
        config: &VmConfig,
        images: ResolvedImages,
        vm_dir: &VmDir,
        console: ConsoleLog,
    ) -> Result<Prepared, ManagerError> {
        let backend = self.backend_of(config)?;
        let identity =
            backend.lease_identity().map_err(|source| backend_failed(backend.name(), vm_id, BackendOperation::Create, source))?;
        let network = match &self.inner.network {
            Some(provider) if !config.network.is_empty() => {
                let owner = identity.as_ref().map(|lease| (lease.uid(), lease.gid()));
                let request = AttachRequest { vm_id, tenant, interfaces: &config.network, owner };
                Some(provider.attach(request).await.map_err(ManagerError::Network)?)
            }
            _ => None,
        };
        match self.launch(vm_id, tenant, config, images, vm_dir, console, identity.clone(), network.as_ref()).await {
            Ok(instance) => Ok((instance, identity, network)),
            Err(error) => {
                if network.is_some()
                    && let Some(provider) = &self.inner.network
                    && let Err(detach_error) = provider.detach(vm_id).await
                {
                    tracing::error!(%vm_id, error = %crate::error_chain(&detach_error), "cannot undo the network of a VM that failed to start");
                }
                Err(error)
            }
        }
    }

    /// Makes the VM's folder and drive copies, then asks the backend for a VMM.
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        &self,
        vm_id: &VmId,
        tenant: &TenantId,
        config: &VmConfig,
        images: ResolvedImages,
        vm_dir: &VmDir,
        console: ConsoleLog,
        identity: Option<Arc<IdentityLease>>,
        network: Option<&NetworkAttachment>,
    ) -> Result<Box<dyn VmmInstance>, ManagerError> {
        vm_dir.create().map_err(|source| ManagerError::VmDir {
            vm_id: vm_id.clone(),
            action: "create",
            path: vm_dir.path().to_path_buf(),
            source,
        })?;
        copy_writable_drives(vm_id, config, &images, vm_dir).await?;
        let spec = self.build_spec(vm_id, tenant, config, images, vm_dir, identity, network)?;
        let backend = self.backend_of(config)?;
        backend.create(spec, console).await.map_err(|source| backend_failed(backend.name(), vm_id, BackendOperation::Create, source))
    }

    /// What the backend needs to run the VM: its resolved images, its
    /// drives (the copies [`copy_writable_drives`] made of the writable
    /// ones), its interfaces and kernel command line.
    #[allow(clippy::too_many_arguments)]
    fn build_spec(
        &self,
        vm_id: &VmId,
        tenant: &TenantId,
        config: &VmConfig,
        images: ResolvedImages,
        vm_dir: &VmDir,
        identity: Option<Arc<IdentityLease>>,
        network: Option<&NetworkAttachment>,
    ) -> Result<VmmSpec, ManagerError> {
        let mut drives = Vec::with_capacity(config.storage.len());
        for (index, (drive, source)) in config.storage.iter().zip(images.drives).enumerate() {
            let image = if drive.read_only {
                source
            } else {
                images::open_copy(&format!("storage[{index}].path"), &vm_dir.drive_copy(&drive.id)).map_err(ManagerError::Image)?
            };
            drives.push(DriveSpec {
                id: drive.id.clone(),
                image,
                read_only: drive.read_only,
                is_root_device: drive.is_root_device,
                io_engine: drive.options.get("io_engine").cloned(),
                cache_type: drive.options.get("cache_type").cloned(),
            });
        }
        let interfaces = config
            .network
            .iter()
            .map(|interface| {
                let attached = network.and_then(|network| network.interfaces.iter().find(|attached| attached.id == interface.id));
                let (tap_device, guest_mac) = match attached {
                    Some(attached) => (attached.tap_device.clone(), Some(attached.mac_address.clone())),
                    None => (interface.tap_device.clone(), (!interface.mac_address.is_empty()).then(|| interface.mac_address.clone())),
                };
                InterfaceSpec {
                    id: interface.id.clone(),
                    tap_device,
                    guest_mac,
                    rx_rate_limit: interface.rx_rate_limit.clone(),
                    tx_rate_limit: interface.tx_rate_limit.clone(),
                }
            })
            .collect();
        let mut kernel_args = config.boot.kernel_args.clone();
        for token in network.iter().flat_map(|network| network.kernel_args.iter()) {
            if !kernel_args.is_empty() {
                kernel_args.push(' ');
            }
            kernel_args.push_str(token);
        }
        Ok(VmmSpec {
            vm_id: vm_id.clone(),
            tenant: tenant.clone(),
            vcpus: config.cpu.vcpu_count,
            memory_mib: config.memory_mib(),
            smt: config.cpu.features.get("smt").is_some_and(|value| value == "true"),
            huge_pages: config.memory.backing.get("huge_pages").is_some_and(|value| value == "2M"),
            kernel: images.kernel,
            initrd: images.initrd,
            kernel_args,
            drives,
            interfaces,
            vm_dir: vm_dir.clone(),
            netns: network.and_then(|network| network.netns.clone()),
            identity,
        })
    }

    async fn boot_now(&self, target: &VmTarget) -> Result<(), ManagerError> {
        let mut locked = self.lock(target).await?;
        // The table lets Paused become Running too, but that is a resume. A
        // Failed VM boots in a fresh VMM on its configuration and disks.
        self.require(&locked, "boot", &[VmState::Created, VmState::Shutdown, VmState::Failed], "Created, Shutdown or Failed")?;
        self.prepare_fresh_vmm(&mut locked).await?;
        let result = locked.entry.instance.boot().await;
        match result {
            Ok(()) => {
                locked.entry.booted_at = Some(SystemTime::now());
                locked.entry.failure = None;
                self.watch_vmm(&locked.slot, &mut locked.entry);
                let running = running_vmm(&locked.entry);
                self.transition(&mut locked, VmState::Running, VmEventKind::Booted(running)).await;
                Ok(())
            }
            Err(source) => Err(self.fail_operation(&mut locked, BackendOperation::Boot, source).await),
        }
    }

    /// Before a boot that needs a fresh VMM: a Failed VM is given a new VMM
    /// instance on its configuration and disks (its images resolved again,
    /// so one put back in the image root is found), and a VM whose network
    /// namespace is gone (a host reboot) its network again, with the same
    /// addresses. No VMM runs for the VM here, so nothing of a running one
    /// is touched.
    async fn prepare_fresh_vmm(&self, locked: &mut Locked) -> Result<(), ManagerError> {
        let namespace_gone = locked.entry.network.as_ref().is_some_and(|network| network.netns.is_none());
        if locked.entry.state != VmState::Failed && !namespace_gone {
            return Ok(());
        }
        let (vm_id, tenant) = (locked.slot.vm_id.clone(), locked.slot.tenant.clone());
        if namespace_gone && let Some(provider) = &self.inner.network {
            let owner = locked.entry.identity.as_ref().map(|lease| (lease.uid(), lease.gid()));
            let request = AttachRequest { vm_id: &vm_id, tenant: &tenant, interfaces: &locked.entry.config.network, owner };
            locked.entry.network = Some(provider.attach(request).await.map_err(ManagerError::Network)?);
            tracing::info!(%vm_id, "the VM's network was set up again: its namespace was gone");
        }
        let entry = &mut *locked.entry;
        // An image gone from the image root stands in as such, and the launch names it.
        let images = self.resolve_found_images(&vm_id, &entry.config)?;
        let spec =
            self.build_spec(&vm_id, &tenant, &entry.config, images, &entry.vm_dir, entry.identity.clone(), entry.network.as_ref())?;
        // What the ended VMM left (its jail, its cgroup) goes before the new instance takes its place.
        match entry.instance.stop(StopMode::Forced).await {
            Ok(outcome) => entry.last_exit = Some(outcome.exit),
            Err(error) => tracing::debug!(%vm_id, error = %crate::error_chain(&error), "nothing of an earlier VMM to clear"),
        }
        entry.instance = self.backend_of(&entry.config)?.dormant(spec, locked.slot.console.clone());
        Ok(())
    }

    async fn pause_now(&self, target: &VmTarget) -> Result<(), ManagerError> {
        let vm_id = target.vm_id();
        let mut locked = self.lock(target).await?;
        self.check(&locked, "pause", VmState::Paused)?;
        locked.entry.instance.pause().await.map_err(|source| backend_failed(&locked.slot.vmm, vm_id, BackendOperation::Pause, source))?;
        let usage = cgroup_usage(&locked.entry);
        self.transition(&mut locked, VmState::Paused, VmEventKind::Paused { usage }).await;
        Ok(())
    }

    async fn resume_now(&self, target: &VmTarget) -> Result<(), ManagerError> {
        let vm_id = target.vm_id();
        let mut locked = self.lock(target).await?;
        // The table lets Created and Shutdown become Running too, but that is a boot.
        self.require(&locked, "resume", &[VmState::Paused], "Paused")?;
        let usage = cgroup_usage(&locked.entry);
        locked.entry.instance.resume().await.map_err(|source| backend_failed(&locked.slot.vmm, vm_id, BackendOperation::Resume, source))?;
        self.transition(&mut locked, VmState::Running, VmEventKind::Resumed { usage }).await;
        Ok(())
    }

    async fn shutdown_now(&self, target: &VmTarget, options: StopOptions) -> Result<StopOutcome, ManagerError> {
        let mut locked = self.lock(target).await?;
        self.check(&locked, "shut down", VmState::Shutdown)?;
        self.stop_locked(&mut locked, options).await
    }

    /// Stops the VM's VMM; how it went (whether it was killed, how it ended).
    async fn stop_locked(&self, locked: &mut Locked, options: StopOptions) -> Result<StopOutcome, ManagerError> {
        let vm_id = locked.slot.vm_id.clone();
        let mode = self.stop_mode(options);
        // A paused guest cannot see Ctrl+Alt+Del; let it run to hear it. It
        // runs, and uses CPU, until it stops: say so, as a resume would.
        if locked.entry.state == VmState::Paused && matches!(mode, StopMode::Graceful { .. }) {
            let usage = cgroup_usage(&locked.entry);
            locked
                .entry
                .instance
                .resume()
                .await
                .map_err(|source| backend_failed(&locked.slot.vmm, &vm_id, BackendOperation::ResumeBeforeShutdown, source))?;
            self.transition(locked, VmState::Running, VmEventKind::Resumed { usage }).await;
        }
        let outcome = locked
            .entry
            .instance
            .stop(mode)
            .await
            .map_err(|source| backend_failed(&locked.slot.vmm, &vm_id, BackendOperation::Shutdown, source))?;
        locked.entry.last_exit = Some(outcome.exit);
        let booted_at = locked.entry.booted_at.take();
        let usage = locked.entry.instance.take_ended_usage();
        let kind = VmEventKind::Stopped { exit: Some(outcome.exit), forced: outcome.forced, by_guest: false, usage, booted_at };
        self.transition(locked, VmState::Shutdown, kind).await;
        Ok(outcome)
    }

    fn stop_mode(&self, options: StopOptions) -> StopMode {
        if options.force { StopMode::Forced } else { StopMode::Graceful { timeout: options.timeout.unwrap_or(self.inner.stop_timeout) } }
    }

    async fn reboot_now(&self, target: &VmTarget, options: StopOptions) -> Result<(), ManagerError> {
        let mut locked = self.lock(target).await?;
        self.require(&locked, "reboot", &[VmState::Running], "Running")?;
        let result = if self.backend_of(&locked.entry.config)?.capabilities().reboot && !options.force {
            locked.entry.instance.reboot().await
        } else {
            let mode = self.stop_mode(options);
            match locked.entry.instance.stop(mode).await {
                Ok(outcome) => {
                    locked.entry.last_exit = Some(outcome.exit);
                    locked.entry.instance.boot().await
                }
                Err(error) => Err(error),
            }
        };
        match result {
            Ok(()) => {
                let previous_booted_at = locked.entry.booted_at.replace(SystemTime::now());
                self.watch_vmm(&locked.slot, &mut locked.entry);
                let ended = locked.entry.instance.take_ended_usage();
                let running = running_vmm(&locked.entry);
                locked.entry.modified_at = SystemTime::now();
                self.publish(&locked.slot, &mut locked.entry, VmEventKind::Rebooted { running, ended, previous_booted_at }).await;
                Ok(())
            }
            Err(source) => Err(self.fail_operation(&mut locked, BackendOperation::Reboot, source).await),
        }
    }

    async fn delete_now(&self, target: &VmTarget, options: StopOptions) -> Result<(), ManagerError> {
        let vm_id = target.vm_id();
        let mut locked = self.lock(target).await?;
        if locked.entry.state.has_live_vmm()
            && let Err(error) = self.stop_locked(&mut locked, options).await
        {
            tracing::warn!(%vm_id, error = %crate::error_chain(&error), "stop before delete failed; killing the VMM");
        }
        let mut problems = Vec::new();
        if let Err(error) = locked.entry.instance.destroy().await {
            problems.push(crate::error_chain(&error));
        }
        match locked.entry.vm_dir.remove() {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                problems.push(format!("removing {}: {error}", locked.entry.vm_dir.path().display()))
            }
            _ => {}
        }
        if locked.entry.network.is_some()
            && let Some(provider) = &self.inner.network
        {
            match provider.detach(vm_id).await {
                Ok(()) => locked.entry.network = None,
                Err(error) => problems.push(crate::error_chain(&error)),
            }
        }
        if !problems.is_empty() {
            let reason = format!("delete incomplete: {}", problems.join("; "));
            if locked.entry.state.can_transition_to(VmState::Failed) {
                let booted_at = locked.entry.booted_at;
                let failed = VmEventKind::Failed { reason: reason.clone(), exit: None, usage: None, booted_at, earlier_ends: Vec::new() };
                self.transition(&mut locked, VmState::Failed, failed).await;
            }
            locked.entry.failure = Some(reason);
            return Err(ManagerError::DeleteIncomplete { vm_id: vm_id.clone(), problems });
        }
        locked.entry.identity = None;
        self.transition(&mut locked, VmState::Deleted, VmEventKind::Deleted).await;
        write_lock(&self.inner.registry).vms.remove(vm_id);
        tracing::info!(%vm_id, "VM deleted");
        Ok(())
    }

    /// Finds the VMs of an earlier run in the store: takes over each VMM
    /// that still runs and is provably the same process (the VM keeps its
    /// state and a `Reattached` event says so), marks Failed each VM whose
    /// VMM is gone (cleaning up what its jail left), and keeps stopped VMs
    /// ready to boot. Call once, before serving; a VM already known is skipped.
    pub async fn recover(&self) -> Result<Recovery, ManagerError> {
        let Some(store) = self.inner.store.clone() else { return Ok(Recovery::default()) };
        let records = store.load_all().map_err(ManagerError::Store)?;
        let stored: std::collections::HashSet<VmId> = records.iter().map(|record| record.vm_id.clone()).collect();
        let mut recovery = Recovery::default();
        for record in records {
            if read_lock(&self.inner.registry).vms.contains_key(&record.vm_id) {
                continue;
            }
            if record.deleted {
                self.replay_deleted(store.as_ref(), record);
                continue;
            }
            let vm_id = record.vm_id.clone();
            match self.recover_one(record).await {
                Ok(Recovered::Reattached) => recovery.reattached.push(vm_id),
                Ok(Recovered::Lost(reason)) => recovery.lost.push((vm_id, reason)),
                Ok(Recovered::Stopped) => recovery.stopped.push(vm_id),
                Err(error) => {
                    let reason = crate::error_chain(&error);
                    tracing::error!(%vm_id, %reason, "cannot recover a stored VM");
                    recovery.lost.push((vm_id, reason));
                }
            }
        }
        tracing::info!(
            reattached = recovery.reattached.len(),
            lost = recovery.lost.len(),
            stopped = recovery.stopped.len(),
            "VMs of the earlier run recovered"
        );
        // VMMs first: the folders and namespaces below may be theirs.
        self.sweep_stray_vmms().await;
        self.sweep_unrecorded(&stored).await;
        Ok(recovery)
    }

    /// Kills and removes VMMs (and their cgroups) that earlier runs
    /// launched and no VM took over now, so none runs on unwatched with a
    /// uid the next VM may be given.
    async fn sweep_stray_vmms(&self) {
        let slots: Vec<Arc<VmSlot>> = read_lock(&self.inner.registry).vms.values().cloned().collect();
        let mut in_use = std::collections::BTreeSet::new();
        for slot in slots {
            if let Some(cgroup) = slot.entry.lock().await.instance.cgroup() {
                in_use.insert(cgroup.name());
            }
        }
        let backends = self.inner.backends.clone();
        let problems =
            tokio::task::spawn_blocking(move || backends.iter().flat_map(|backend| backend.sweep_strays(&in_use)).collect::<Vec<_>>())
                .await
                .unwrap_or_default();
        for problem in problems {
            tracing::warn!(problem, "cannot remove what an earlier run launched");
        }
    }

    /// Removes what a create cut off by a crash left of a VM the store never
    /// recorded: its network (namespace, links, firewall elements, address
    /// rows) and its folder with any partial drive copy. Such a VM never had
    /// a VMM the store knows: its launch had not finished.
    async fn sweep_unrecorded(&self, stored: &std::collections::HashSet<VmId>) {
        if let Some(network) = &self.inner.network {
            for problem in network.forget_all_but(stored).await {
                tracing::warn!(problem, "cannot remove the network of a VM a crash left half made");
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.inner.vm_root) else { return };
        let unrecorded: Vec<VmDir> = entries
            .flatten()
            .filter(|entry| VmId::new(entry.file_name().to_string_lossy().into_owned()).is_ok_and(|vm_id| !stored.contains(&vm_id)))
            .map(|entry| VmDir::at(entry.path()))
            .collect();
        for vm_dir in unrecorded {
            tracing::warn!(path = %vm_dir.path().display(), "removing the folder of a VM a crash left half made");
            // A partial copy of a large drive takes a while to unlink.
            let _ = tokio::task::spawn_blocking(move || remove_vm_dir(&vm_dir)).await;
        }
    }

    /// A VM deleted by an earlier metald that was killed before its billing
    /// released the record: its end and its delete are told again.
    fn replay_deleted(&self, store: &dyn VmStore, record: VmRecord) {
        let VmRecord { vm_id, tenant, recent_ends, .. } = record;
        for kind in [VmEventKind::FoundStopped { earlier_ends: recent_ends.clone() }, VmEventKind::Deleted] {
            let event = VmEvent { vm_id: vm_id.clone(), tenant: tenant.clone(), at: SystemTime::now(), state: VmState::Deleted, kind };
            let _ = self.inner.events.send(event);
        }
        tracing::info!(%vm_id, "a VM deleted just before metald stopped, told again to billing");
        if !self.inner.hold_deleted.load(std::sync::atomic::Ordering::SeqCst)
            && let Err(error) = store.remove(&vm_id)
        {
            tracing::error!(%vm_id, error = %crate::error_chain(&error), "cannot forget a deleted VM's record");
        }
    }

    async fn recover_one(&self, record: VmRecord) -> Result<Recovered, ManagerError> {
        let VmRecord { vm_id, tenant, mut config, mut state, .. } = record.clone();
        // A record from before VMs named their VMM ran on the host's default.
        if config.vmm.is_empty() {
            config.vmm = self.inner.default_backend.name().to_owned();
        }
        let vm_dir = VmDir::of(&self.inner.vm_root, &vm_id);
        let console = vm_dir.console(self.inner.console_limit_bytes);
        // Why no VMM can be taken over or launched for this VM, if so.
        let mut unrecoverable = None;
        // A VMM the host no longer offers: the VM stays, Failed, saying so.
        let backend = match self.backend_of(&config) {
            Ok(backend) => backend,
            Err(error) => {
                unrecoverable = Some(format!("its VMM is not offered by this host: {}", crate::error_chain(&error)));
                Arc::clone(&self.inner.default_backend)
            }
        };
        let identity = match record.identity {
            Some((uid, gid)) => match backend.reserve_identity(uid, gid) {
                Ok(lease) => lease,
                Err(source) => {
                    let error = backend_failed(&config.vmm, &vm_id, BackendOperation::Recover, source);
                    unrecoverable = Some(format!("its uid {uid} cannot be leased again: {}", crate::error_chain(&error)));
                    None
                }
            },
            None => None,
        };
        let network = match (record.network, &self.inner.network) {
            (Some(attachment), Some(provider)) => match provider.reopen(&vm_id, attachment.clone()).await {
                Ok(reopened) => Some(reopened),
                Err(error) => {
                    tracing::warn!(%vm_id, error = %crate::error_chain(&error), "cannot reopen a recovered VM's network namespace");
                    Some(attachment)
                }
            },
            (attachment, _) => attachment,
        };
        let spec = |identity: Option<Arc<IdentityLease>>| {
            let images = self.resolve_found_images(&vm_id, &config)?;
            self.build_spec(&vm_id, &tenant, &config, images, &vm_dir, identity, network.as_ref())
        };
        // A VM is never dropped: one no VMM can be launched for stays listed, Failed.
        let dormant = |identity: Option<Arc<IdentityLease>>| match spec(identity).and_then(|spec| Ok((self.backend_of(&config)?, spec))) {
            Ok((backend, spec)) => (backend.dormant(spec, console.clone()), None),
            Err(error) => {
                let reason = format!("no VMM can be launched for it on this host: {}", crate::error_chain(&error));
                (Box::new(Unlaunchable::new(backend.name(), reason.clone())) as Box<dyn VmmInstance>, Some(reason))
            }
        };
        let mut failure = record.failure.clone();
        let mut outcome = Recovered::Stopped;
        let live = state.has_live_vmm();
        let (instance, unlaunchable) = match (&record.vmm, live, unrecoverable) {
            (Some(ticket), true, None) => {
                let reattached = match spec(identity.clone()) {
                    Ok(spec) => backend
                        .reattach(spec, console.clone(), ticket)
                        .await
                        .map_err(|source| backend_failed(&config.vmm, &vm_id, BackendOperation::Reattach, source)),
                    Err(error) => Err(error),
                };
                match reattached {
                    Ok(instance) => {
                        outcome = Recovered::Reattached;
                        (instance, None)
                    }
                    Err(error) => {
                        for problem in backend.clean_up(ticket) {
                            tracing::warn!(%vm_id, problem, "cannot clean up after a VMM that ended while metald was away");
                        }
                        let gone = matches!(&error, ManagerError::Backend { source, .. } if matches!(**source, BackendError::Adopt(_) | BackendError::Exited { .. }));
                        let reason = if gone {
                            format!("its VMM was gone when metald started again: {}", crate::error_chain(&error))
                        } else {
                            // Its VMM, if it runs, is stopped with the strays (see `sweep_stray_vmms`).
                            format!("metald could not take over its VMM after a restart and stopped it: {}", crate::error_chain(&error))
                        };
                        outcome = Recovered::Lost(reason.clone());
                        failure = Some(reason);
                        state = VmState::Failed;
                        dormant(identity.clone())
                    }
                }
            }
            (vmm, true, unrecoverable) => {
                let reason = unrecoverable.unwrap_or_else(|| "its VMM was not recorded before metald stopped".to_owned());
                if let Some(ticket) = vmm {
                    for problem in backend.clean_up(ticket) {
                        tracing::warn!(%vm_id, problem, "cannot clean up after a VMM metald could not take over");
                    }
                }
                outcome = Recovered::Lost(reason.clone());
                failure = Some(reason);
                state = VmState::Failed;
                dormant(identity.clone())
            }
            (_, false, unrecoverable) => {
                if let Some(reason) = unrecoverable {
                    failure = Some(reason);
                    state = VmState::Failed;
                }
                dormant(identity.clone())
            }
        };
        if let Some(reason) = unlaunchable {
            tracing::warn!(%vm_id, %reason, "a stored VM stays listed as failed");
            if !matches!(outcome, Recovered::Lost(_)) {
                outcome = Recovered::Lost(reason.clone());
            }
            if state != VmState::Failed {
                failure = Some(reason);
                state = VmState::Failed;
            }
        }
        let stored_boot = record.booted_at_ms.map(from_unix_millis);
        let booted_at = stored_boot.filter(|_| matches!(outcome, Recovered::Reattached));
        let entry = VmEntry {
            state,
            config: config.clone(),
            instance,
            identity,
            network,
            vm_dir,
            failure: failure.clone(),
            last_exit: record.last_exit,
            booted_at,
            recent_ends: record.recent_ends.clone(),
            created_at: from_unix_millis(record.created_at_ms),
            modified_at: if state == record.state { from_unix_millis(record.modified_at_ms) } else { SystemTime::now() },
            watch_generation: 0,
            watched_pid: None,
            restarts: crate::restart::RestartCount::default(),
        };
        let slot = VmSlot::new(vm_id.clone(), tenant.clone(), console, entry);
        let mut entry = slot.entry.lock().await;
        self.watch_vmm(&slot, &mut entry);
        write_lock(&self.inner.registry).vms.insert(vm_id.clone(), Arc::clone(&slot));
        match &outcome {
            Recovered::Reattached => {
                let running = running_vmm(&entry);
                let earlier_ends = entry.recent_ends.clone();
                self.publish(&slot, &mut entry, VmEventKind::Reattached { running, booted_at: stored_boot, earlier_ends }).await;
                tracing::info!(%vm_id, state = %entry.state, "VMM taken over from the earlier run");
            }
            Recovered::Lost(reason) => {
                let reason = reason.clone();
                tracing::warn!(%vm_id, %reason, "VM failed while metald was away");
                let earlier_ends = entry.recent_ends.clone();
                let failed = VmEventKind::Failed { reason, exit: None, usage: None, booted_at: stored_boot, earlier_ends };
                self.publish(&slot, &mut entry, failed).await;
                // A host reboot or a VMM killed while metald was away is a death like any other.
                if let Some(next) = entry.next_restart(&vm_id, None) {
                    restart_later(self.clone(), vm_id.clone(), next);
                }
            }
            Recovered::Stopped => {
                let earlier_ends = entry.recent_ends.clone();
                self.publish(&slot, &mut entry, VmEventKind::FoundStopped { earlier_ends }).await;
            }
        }
        Ok(outcome)
    }

    /// Everything known about a VM, including what its VMM reports.
    pub async fn info(&self, vm: impl Into<VmTarget>) -> Result<VmInfo, ManagerError> {
        let target = vm.into();
        let vm_id = target.vm_id();
        let locked = self.lock(&target).await?;
        let entry = &locked.entry;
        let vmm = if entry.state.has_live_vmm() {
            match entry.instance.info().await {
                Ok(info) => Some(info),
                Err(error) => {
                    tracing::warn!(%vm_id, error = %crate::error_chain(&error), "VMM info unavailable");
                    None
                }
            }
        } else {
            None
        };
        Ok(VmInfo {
            vm_id: locked.slot.vm_id.clone(),
            tenant: locked.slot.tenant.clone(),
            state: entry.state,
            config: entry.config.clone(),
            created_at: entry.created_at,
            modified_at: entry.modified_at,
            failure: entry.failure.clone(),
            last_exit: entry.last_exit,
            booted_at: entry.booted_at,
            vm_dir: entry.vm_dir.path().to_path_buf(),
            console_path: locked.slot.console.path().to_path_buf(),
            vmm,
            network: entry.network.clone(),
        })
    }

    /// Usage counters of a VM whose VMM runs.
    pub async fn metrics(&self, vm: impl Into<VmTarget>) -> Result<VmmMetrics, ManagerError> {
        let target = vm.into();
        let vm_id = target.vm_id();
        let mut locked = self.lock(&target).await?;
        if !locked.entry.state.has_live_vmm() {
            let current = locked.entry.state;
            return Err(ManagerError::WrongState {
                vm_id: vm_id.clone(),
                operation: "read its metrics",
                current,
                required: "Created, Running or Paused",
            });
        }
        locked
            .entry
            .instance
            .metrics()
            .await
            .map_err(|source| backend_failed(&locked.slot.vmm, vm_id, BackendOperation::ReadMetrics, source))
    }

    /// The state of one VM, without waiting for an operation in progress.
    pub fn state(&self, vm: impl Into<VmTarget>) -> Result<VmState, ManagerError> {
        self.owned_slot(&vm.into()).map(|slot| lock_summary(&slot).state)
    }

    /// One VM's summary (its tenant, state, size), without waiting for an
    /// operation in progress.
    pub fn summary(&self, vm: impl Into<VmTarget>) -> Result<VmSummary, ManagerError> {
        let target = vm.into();
        let summary = self.owned_slot(&target).map(|slot| lock_summary(&slot).clone())?;
        if summary.state == VmState::Deleted { Err(ManagerError::NotFound(target.vm_id().clone())) } else { Ok(summary) }
    }

    /// The uid pool's size and use, when VMs get uids of their own.
    /// The backends of one host share one launcher, so the default's is the host's.
    pub fn identity_capacity(&self) -> Option<crate::jailer::IdentityCapacity> {
        self.inner.default_backend.identity_capacity()
    }

    /// How many events of each kind this manager published (`failed`,
    /// `booted`, …), every kind listed.
    pub fn event_counts(&self) -> Vec<(&'static str, u64)> {
        self.inner.published.snapshot()
    }

    /// For a process that is ending: when it holds no VM and no create is
    /// under way, removes what was set up on the host for all VMs (the
    /// network's firewall table, the cgroup parent folders), so a host left
    /// without VMs is left as it was found. `None` when VMs remain (they
    /// run on, and the next start takes them over); else what could not be
    /// removed.
    pub async fn release_host_when_empty(&self) -> Option<Vec<String>> {
        {
            let registry = read_lock(&self.inner.registry);
            let holds_a_vm = registry.vms.values().any(|slot| lock_summary(slot).state != VmState::Deleted);
            if holds_a_vm || !registry.reserved.is_empty() {
                return None;
            }
        }
        let mut problems = match &self.inner.network {
            Some(network) => network.release_host().await,
            None => Vec::new(),
        };
        let backends = self.inner.backends.clone();
        problems.extend(
            tokio::task::spawn_blocking(move || backends.iter().flat_map(|backend| backend.release_host()).collect::<Vec<_>>())
                .await
                .unwrap_or_default(),
        );
        Some(problems)
    }

    /// Every VM, optionally of one tenant, in id order; never waits for an
    /// operation in progress.
    pub fn list(&self, tenant: Option<&TenantId>) -> Vec<VmSummary> {
        let registry = read_lock(&self.inner.registry);
        registry
            .vms
            .values()
            .filter(|slot| tenant.is_none_or(|tenant| &slot.tenant == tenant))
            .map(|slot| lock_summary(slot).clone())
            .filter(|summary| summary.state != VmState::Deleted)
            .collect()
    }

    /// One page of a tenant's VMs (every tenant's with `None`) in id order:
    /// those after `after`, in one of `states` (any state when empty), at
    /// most `limit` of them. Only the page is copied; the rest is counted.
    /// Never waits for an operation in progress.
    pub fn list_page(&self, tenant: Option<&TenantId>, states: &[VmState], after: Option<&VmId>, limit: usize) -> VmPage {
        let registry = read_lock(&self.inner.registry);
        let mut page = VmPage::default();
        for (vm_id, slot) in registry.vms.iter().filter(|(_, slot)| tenant.is_none_or(|tenant| &slot.tenant == tenant)) {
            let summary = lock_summary(slot);
            if summary.state == VmState::Deleted || !(states.is_empty() || states.contains(&summary.state)) {
                continue;
            }
            page.total += 1;
            if after.is_some_and(|after| vm_id <= after) {
                continue;
            }
            if page.vms.len() < limit {
                page.vms.push(summary.clone());
            } else {
                page.more = true;
            }
        }
        page
    }

    /// The VM's console: its tail, its lines as they come, a wait for a line.
    /// It stays readable after the guest stops, until the VM is deleted.
    pub fn console(&self, vm: impl Into<VmTarget>) -> Result<ConsoleLog, ManagerError> {
        self.owned_slot(&vm.into()).map(|slot| slot.console.clone())
    }

    /// The last `max_bytes` the guest printed.
    pub fn console_tail(&self, vm: impl Into<VmTarget>, max_bytes: usize) -> Result<Vec<u8>, ManagerError> {
        let target = vm.into();
        self.console(&target)?.tail(max_bytes).map_err(|source| ManagerError::Console { vm_id: target.vm_id().clone(), source })
    }

    fn slot(&self, vm_id: &VmId) -> Result<Arc<VmSlot>, ManagerError> {
        read_lock(&self.inner.registry).vms.get(vm_id).cloned().ok_or_else(|| ManagerError::NotFound(vm_id.clone()))
    }

    /// The target's slot; another tenant's VM is not found, as a missing one.
    fn owned_slot(&self, target: &VmTarget) -> Result<Arc<VmSlot>, ManagerError> {
        let slot = self.slot(target.vm_id())?;
        if target.admits(&slot.tenant) { Ok(slot) } else { Err(ManagerError::NotFound(target.vm_id().clone())) }
    }

    /// The target's VM, locked. Its tenant is checked on the very VM that
    /// is locked, so the act that follows is on the VM the caller owns.
    async fn lock(&self, target: &VmTarget) -> Result<Locked, ManagerError> {
        let slot = self.owned_slot(target)?;
        let entry = Arc::clone(&slot.entry).lock_owned().await;
        if entry.state == VmState::Deleted {
            return Err(ManagerError::NotFound(target.vm_id().clone()));
        }
        Ok(Locked { slot, entry })
    }

    fn check(&self, locked: &Locked, operation: &'static str, to: VmState) -> Result<(), ManagerError> {
        let current = locked.entry.state;
        current.transition(to).map(drop).map_err(|source| ManagerError::InvalidState {
            vm_id: locked.slot.vm_id.clone(),
            operation,
            current,
            source,
        })
    }

    /// The operation needs the VM in one of `states`, not merely in one
    /// from which the target state is reachable.
    fn require(&self, locked: &Locked, operation: &'static str, states: &[VmState], required: &'static str) -> Result<(), ManagerError> {
        let current = locked.entry.state;
        if states.contains(&current) {
            Ok(())
        } else {
            Err(ManagerError::WrongState { vm_id: locked.slot.vm_id.clone(), operation, current, required })
        }
    }

    async fn transition(&self, locked: &mut Locked, to: VmState, kind: VmEventKind) {
        apply_transition(&locked.slot, &mut locked.entry, to);
        self.publish(&locked.slot, &mut locked.entry, kind).await;
    }

    async fn publish(&self, slot: &VmSlot, entry: &mut VmEntry, kind: VmEventKind) {
        publish(&self.inner, slot, entry, kind).await;
    }

    /// A boot or reboot that failed leaves the VM Failed, with no VMM left.
    async fn fail_operation(&self, locked: &mut Locked, operation: BackendOperation, source: BackendError) -> ManagerError {
        let vm_id = locked.slot.vm_id.clone();
        let error = backend_failed(&locked.slot.vmm, &vm_id, operation, source);
        let reason = crate::error_chain(&error);
        match locked.entry.instance.stop(StopMode::Forced).await {
            Ok(outcome) => locked.entry.last_exit = Some(outcome.exit),
            Err(BackendError::NotRunning) => {}
            Err(stop_error) => tracing::error!(%vm_id, error = %crate::error_chain(&stop_error), "cannot stop the VMM of a failed VM"),
        }
        locked.entry.failure = Some(reason.clone());
        let booted_at = locked.entry.booted_at.take();
        if locked.entry.state.can_transition_to(VmState::Failed) {
            let exit = locked.entry.last_exit;
            let usage = locked.entry.instance.take_ended_usage();
            let failed = VmEventKind::Failed { reason, exit, usage, booted_at, earlier_ends: Vec::new() };
            self.transition(locked, VmState::Failed, failed).await;
        } else {
            // Failed already (a boot again that failed too): the newer reason is the one to show.
            *lock_summary(&locked.slot) = summary_of(&locked.slot.vm_id, &locked.slot.tenant, &locked.entry);
            save_record(&self.inner, &locked.slot, &locked.entry).await;
        }
        error
    }

    /// Starts a watcher for the VMM process, if it is one not yet watched.
    fn watch_vmm(&self, slot: &Arc<VmSlot>, entry: &mut VmEntry) {
        let pid = entry.instance.pid();
        if pid.is_none() || pid == entry.watched_pid {
            return;
        }
        let Some(mut exits) = entry.instance.exits() else { return };
        entry.watch_generation += 1;
        entry.watched_pid = pid;
        let generation = entry.watch_generation;
        let inner = Arc::downgrade(&self.inner);
        let slot = Arc::clone(slot);
        tokio::spawn(async move {
            // The first exit published; none if the publisher is gone first.
            let Some(exit) = exits.wait_for(Option::is_some).await.ok().and_then(|exit| exit.clone()) else { return };
            on_vmm_exit(inner, slot, generation, exit).await;
        });
    }
}

/// Runs an operation to its end in a task of its own, so that a caller who
/// stops waiting (a dropped future, a client that hung up) cannot leave a VM
/// half-created or half-stopped.
async fn detached<T: Send + 'static>(
    span: tracing::Span,
    work: impl Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> Result<T, ManagerError> {
    match tokio::spawn(tracing::Instrument::instrument(work, span)).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(ManagerError::ShuttingDown),
    }
}

/// What a watcher does when a VMM process ends: nothing, if an operation
/// expected it (the VM is no longer in a state with a live VMM) or a newer
/// process is watched; otherwise the VM stops (a clean guest reset) or fails.
async fn on_vmm_exit(inner: Weak<Inner>, slot: Arc<VmSlot>, generation: u64, vmm_exit: VmmExit) {
    let Some(inner) = inner.upgrade() else { return };
    let mut entry = slot.entry.lock().await;
    if entry.watch_generation != generation || !entry.state.has_live_vmm() {
        return;
    }
    let vm_id = &slot.vm_id;
    let backend = slot.vmm.as_str();
    let exit = vmm_exit.status;
    entry.last_exit = Some(exit);
    let booted_at = entry.booted_at.take();
    entry.watched_pid = None;
    // Lets the backend forget the process; it has already been reaped.
    let _ = entry.instance.stop(StopMode::Forced).await;
    if exit.is_clean() && entry.state == VmState::Running {
        tracing::info!(%vm_id, %exit, "guest stopped itself");
        apply_transition(&slot, &mut entry, VmState::Shutdown);
        let usage = entry.instance.take_ended_usage();
        publish(&inner, &slot, &mut entry, VmEventKind::Stopped { exit: Some(exit), forced: false, by_guest: true, usage, booted_at })
            .await;
    } else {
        let reason = format!("{backend} {vmm_exit} while the VM was {}", entry.state);
        tracing::warn!(%vm_id, %reason, "VMM died");
        entry.failure = Some(reason.clone());
        apply_transition(&slot, &mut entry, VmState::Failed);
        let usage = entry.instance.take_ended_usage();
        let failed = VmEventKind::Failed { reason, exit: Some(exit), usage, booted_at, earlier_ends: Vec::new() };
        publish(&inner, &slot, &mut entry, failed).await;
        let ran_for = booted_at.and_then(|booted_at| booted_at.elapsed().ok());
        if let Some(next) = entry.next_restart(vm_id, ran_for) {
            restart_later(VmManager { inner: Arc::clone(&inner) }, vm_id.clone(), next);
        }
    }
}

/// Boots a VM its restart policy restarts once `next.after` has passed,
/// unless something else booted or deleted it meanwhile; a boot that fails
/// counts as a death and is tried again while the policy allows.
fn restart_later(manager: VmManager, vm_id: VmId, mut next: crate::restart::NextRestart) {
    tokio::spawn(async move {
        loop {
            tracing::info!(%vm_id, restart = next.number, of = next.of, after_s = next.after.as_secs(), "restarting the VM: its VMM died");
            tokio::time::sleep(next.after).await;
            if !matches!(manager.state(&vm_id), Ok(VmState::Failed)) {
                return;
            }
            let error = match manager.boot(&vm_id).await {
                Ok(()) => return tracing::info!(%vm_id, restart = next.number, "VM restarted"),
                Err(error) => error,
            };
            tracing::warn!(%vm_id, error = %crate::error_chain(&error), "a restart of the VM failed");
            let Ok(slot) = manager.slot(&vm_id) else { return };
            let mut entry = slot.entry.lock().await;
            match entry.next_restart(&vm_id, None) {
                Some(following) => next = following,
                None => return,
            }
        }
    });
}

/// What [`VmManager::recover`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// VMs whose VMM still ran and was taken over.
    pub reattached: Vec<VmId>,
    /// VMs whose VMM was gone, now Failed, and why.
    pub lost: Vec<(VmId, String)>,
    /// VMs that were stopped or failed already, ready to boot again.
    pub stopped: Vec<VmId>,
}

enum Recovered {
    Reattached,
    Lost(String),
    Stopped,
}

/// A launched VMM, its user's lease and its network.
type Prepared = (Box<dyn VmmInstance>, Option<Arc<IdentityLease>>, Option<NetworkAttachment>);

struct ResolvedImages {
    kernel: ImageFile,
    initrd: Option<ImageFile>,
    drives: Vec<ImageFile>,
}

/// What the VM's cgroup has counted so far, where it has one, for the
/// events that split its time into running and paused.
fn cgroup_usage(entry: &VmEntry) -> Option<CgroupUsage> {
    let cgroup = entry.instance.cgroup()?;
    // CPU only: reading the memory peak would reset it under the meter.
    cgroup
        .cpu_usage_ns()
        .map(|cpu_ns| CgroupUsage { cpu_ns, memory_peak_bytes: None })
        .map_err(|error| tracing::warn!(error = %crate::error_chain(&error), "cannot read a VM's cgroup CPU at a pause or resume"))
        .ok()
}

/// The VMM a VM runs on now, as events describe it.
fn running_vmm(entry: &VmEntry) -> RunningVmm {
    let taps = match &entry.network {
        Some(network) => network.interfaces.iter().map(|interface| interface.tap_device.clone()).collect(),
        None => entry.config.network.iter().map(|interface| interface.tap_device.clone()).collect(),
    };
    RunningVmm {
        pid: entry.instance.pid(),
        cgroup: entry.instance.cgroup(),
        taps,
        vcpus: entry.config.cpu.vcpu_count,
        memory_bytes: entry.config.memory.size_bytes,
    }
}

fn apply_transition(slot: &VmSlot, entry: &mut VmEntry, to: VmState) {
    if let Err(error) = entry.state.transition(to) {
        // Every caller checked first; a refusal here is a bug worth a loud log.
        tracing::error!(vm_id = %slot.vm_id, %error, "unchecked state transition");
    }
    entry.state = to;
    entry.modified_at = SystemTime::now();
    if to != VmState::Failed {
        entry.failure = None;
    }
    *lock_summary(slot) = summary_of(&slot.vm_id, &slot.tenant, entry);
}

/// Tells subscribers, after writing the VM's record: every change is
/// published, so every change is stored.
async fn publish(inner: &Inner, slot: &VmSlot, entry: &mut VmEntry, kind: VmEventKind) {
    inner.published.count(&kind);
    log_change(&slot.vm_id, &kind);
    let at = SystemTime::now();
    if let Some(ended) = ended_vmm(&kind, entry, at) {
        if entry.recent_ends.len() >= KEPT_ENDS {
            entry.recent_ends.remove(0);
        }
        entry.recent_ends.push(ended);
    }
    let forget = matches!(kind, VmEventKind::Deleted) && !inner.hold_deleted.load(std::sync::atomic::Ordering::SeqCst);
    if forget {
        let vm_id = slot.vm_id.clone();
        if let Err(error) = in_store(inner, move |store| store.remove(&vm_id)).await {
            tracing::error!(vm_id = %slot.vm_id, error = %crate::error_chain(&error), "cannot forget the VM's record");
        }
    } else {
        save_record(inner, slot, entry).await;
    }
    let event = VmEvent { vm_id: slot.vm_id.clone(), tenant: slot.tenant.clone(), at, state: entry.state, kind };
    // No subscriber is fine.
    let _ = inner.events.send(event);
}

/// Every change a caller asked for is a line at info, an audit trail
/// with the call's tenant and client from its span. Deaths, takeovers and
/// a guest's own stop are logged where they are found, with their reasons.
fn log_change(vm_id: &VmId, kind: &VmEventKind) {
    match kind {
        VmEventKind::Created
        | VmEventKind::Booted(_)
        | VmEventKind::Paused { .. }
        | VmEventKind::Resumed { .. }
        | VmEventKind::Rebooted { .. }
        | VmEventKind::Deleted => tracing::info!(%vm_id, "VM {}", kind.name()),
        VmEventKind::Stopped { by_guest: false, forced, .. } => tracing::info!(%vm_id, forced, "VM stopped"),
        VmEventKind::Stopped { by_guest: true, .. }
        | VmEventKind::Failed { .. }
        | VmEventKind::Reattached { .. }
        | VmEventKind::FoundStopped { .. } => {}
    }
}

async fn save_record(inner: &Inner, slot: &VmSlot, entry: &VmEntry) {
    let record = record_of(slot, entry);
    if let Err(error) = in_store(inner, move |store| store.save(&record)).await {
        tracing::error!(vm_id = %slot.vm_id, error = %crate::error_chain(&error), "cannot store the VM's record; a restart may not find it as it is");
    }
}

/// Runs `write` against the store, if there is one, on a blocking thread:
/// a SQLite write waits for the disk, and it runs under a VM's lock, so
/// no async worker must wait with it. The caller still waits, which keeps
/// every change stored before its event goes out.
async fn in_store(inner: &Inner, write: impl FnOnce(&dyn VmStore) -> Result<(), StoreError> + Send + 'static) -> Result<(), StoreError> {
    let Some(store) = inner.store.clone() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || write(store.as_ref())).await.map_err(StoreError::Interrupted)?
}

/// How a VMM's life ended, for an event that ends one that had booted.
fn ended_vmm(kind: &VmEventKind, entry: &VmEntry, at: SystemTime) -> Option<EndedVmm> {
    let (booted_at, usage, by_reboot) = match kind {
        VmEventKind::Stopped { booted_at, usage, .. } | VmEventKind::Failed { booted_at, usage, .. } => ((*booted_at)?, usage, false),
        VmEventKind::Rebooted { previous_booted_at, ended, .. } => ((*previous_booted_at)?, ended, true),
        _ => return None,
    };
    Some(EndedVmm {
        booted_at_ms: unix_millis(booted_at),
        ended_at_ms: unix_millis(at),
        cpu_ns: usage.as_ref().map(|usage| usage.cpu_ns),
        vcpus: entry.config.cpu.vcpu_count,
        memory_bytes: entry.config.memory.size_bytes,
        by_reboot,
    })
}

fn record_of(slot: &VmSlot, entry: &VmEntry) -> VmRecord {
    VmRecord {
        vm_id: slot.vm_id.clone(),
        tenant: slot.tenant.clone(),
        config: entry.config.clone(),
        state: entry.state,
        created_at_ms: unix_millis(entry.created_at),
        modified_at_ms: unix_millis(entry.modified_at),
        failure: entry.failure.clone(),
        last_exit: entry.last_exit,
        booted_at_ms: entry.booted_at.map(unix_millis),
        network: entry.network.clone(),
        identity: entry.identity.as_ref().map(|lease| (lease.uid(), lease.gid())),
        vmm: entry.instance.ticket(),
        recent_ends: entry.recent_ends.clone(),
        deleted: entry.state == VmState::Deleted,
    }
}

fn summary_of(vm_id: &VmId, tenant: &TenantId, entry: &VmEntry) -> VmSummary {
    VmSummary {
        vm_id: vm_id.clone(),
        tenant: tenant.clone(),
        state: entry.state,
        vcpus: entry.config.cpu.vcpu_count,
        memory_bytes: entry.config.memory.size_bytes,
        metadata: entry.config.metadata.clone(),
        created_at: entry.created_at,
        modified_at: entry.modified_at,
        failure: entry.failure.clone(),
    }
}

/// The stand-in for an image gone from the image root: an empty file with
/// no name (`O_TMPFILE`), kept under the image's own path for messages.
fn removed_image(vm_root: &Path, field: &str, path: &str) -> Result<ImageFile, ImageError> {
    let failed = |errno: nix::errno::Errno| ImageError::Open { field: field.to_owned(), path: path.to_owned(), source: errno.into() };
    let flags = nix::fcntl::OFlag::O_TMPFILE | nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC;
    let file = nix::fcntl::open(vm_root, flags, nix::sys::stat::Mode::from_bits_truncate(0o444)).map_err(failed)?;
    Ok(ImageFile { path: PathBuf::from(path), file: Arc::new(file), size: 0, mode: 0o100444 })
}

/// Copies the VM's writable drives into its folder, on a thread of the
/// blocking pool: a copy (and its sync) of a large image takes as long as
/// the disk needs, and must not hold up the workers serving every other call.
async fn copy_writable_drives(vm_id: &VmId, config: &VmConfig, images: &ResolvedImages, vm_dir: &VmDir) -> Result<(), ManagerError> {
    let copies: Vec<(ImageFile, PathBuf)> = config
        .storage
        .iter()
        .zip(&images.drives)
        .filter(|(drive, _)| !drive.read_only)
        .map(|(drive, source)| (source.clone(), vm_dir.drive_copy(&drive.id)))
        .collect();
    if copies.is_empty() {
        return Ok(());
    }
    let (vm_id, folder) = (vm_id.clone(), vm_dir.drives());
    let copy = move || {
        std::fs::create_dir(&folder).map_err(|source| ManagerError::VmDir {
            vm_id,
            action: "create drive copies in",
            path: folder.clone(),
            source,
        })?;
        copies.iter().try_for_each(|(source, copy)| images::copy_image(source, copy).map_err(ManagerError::Image))
    };
    tokio::task::spawn_blocking(copy).await.map_err(|_| ManagerError::ShuttingDown)?
}

/// What a backend's failure becomes, naming the VMM and the VM.
fn backend_failed(vmm: &str, vm_id: &VmId, operation: BackendOperation, source: BackendError) -> ManagerError {
    ManagerError::Backend { vm_id: vm_id.clone(), backend: vmm.to_owned(), operation, source: Box::new(source) }
}

fn remove_vm_dir(vm_dir: &VmDir) {
    if let Err(error) = vm_dir.remove() {
        tracing::error!(path = %vm_dir.path().display(), %error, "cannot remove a VM folder")
    }
}

// The std locks below guard plain maps and summaries; no code panics while
// holding them, so a poisoned lock still holds consistent data.
fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_summary(slot: &VmSlot) -> std::sync::MutexGuard<'_, VmSummary> {
    slot.summary.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::BackendOperation;

    #[test]
    fn a_backend_operation_reads_as_a_verb_and_labels_as_one_word() {
        let all = [
            BackendOperation::Create,
            BackendOperation::Boot,
            BackendOperation::Reboot,
            BackendOperation::Pause,
            BackendOperation::Resume,
            BackendOperation::Shutdown,
            BackendOperation::ResumeBeforeShutdown,
            BackendOperation::Recover,
            BackendOperation::Reattach,
            BackendOperation::ReadMetrics,
        ];
        for operation in all {
            let label = operation.label();
            assert!(label.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{label}");
        }
        let labels: std::collections::HashSet<&str> = all.iter().map(|operation| operation.label()).collect();
        assert_eq!(labels.len(), all.len(), "labels are distinct");
        assert_eq!(BackendOperation::Shutdown.to_string(), "shut down");
        assert_eq!(BackendOperation::ReadMetrics.to_string(), "read metrics of");
        assert_eq!(BackendOperation::Pause.to_string(), "pause");
    }
}
