//! The integrated jailer: every VMM in a root of its own, in new mount, PID,
//! IPC and UTS namespaces (and the VM's network namespace when it has one),
//! in a cgroup of its own with CPU, memory and pids limits, under rlimits,
//! with `no_new_privs`, as an unprivileged user of its own, with no other
//! file descriptor open. One code path for every VMM: nothing here knows
//! Firecracker or Cloud Hypervisor; a backend says what its VMM needs in a
//! [`LaunchPlan`].
//!
//! The steps, in order (each is undone if a later one fails):
//! 1. pick the VM's user (one uid and gid per VM from a range, or a fixed one);
//! 2. take a child waiting in a cgroup of its own from the jail pool
//!    ([`crate::jail_pool`]), or make one: the cgroup, then a child cloned
//!    into new mount, PID, IPC and UTS namespaces and moved into it
//!    ([`crate::jail_child`]);
//! 3. make the jail folder (owned by that user, mode 0700), the mount points
//!    for every exposed file, the device nodes and the work files;
//! 4. set the cgroup's limits for the VM (and, for a pooled child, its name);
//! 5. make a detached bind mount of every exposed file from our open
//!    descriptor (read-only unless writable, nosuid, nodev), and send the
//!    child its orders; it confines itself and execs the VMM, which
//!    becomes PID 1 of its namespace.
//!
//! The mounts live only in the VMM's mount namespace: when it exits they
//! vanish with it, and the host never sees them.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};

use crate::cgroups::{Cgroup, CgroupError, CgroupHierarchy, CgroupLimits, CgroupVersion, CpuLimit, DEFAULT_CGROUP_ROOT};
pub use crate::jail_child::JailStep;
use crate::jail_child::{ChildLimits, OrderSheet, Orders};
pub use crate::jail_pool::PoolFill;
use crate::jail_pool::{JailPool, ReadyChild};
use crate::launch::{Exposure, LaunchError, LaunchPlan, Launched, Launcher, Layout, TakeoverTicket, Teardown};
use crate::process::Supervised;
pub use crate::uid_lease::{IdentityCapacity, IdentityLease};
use crate::uid_lease::{UidLeaseError, UidPool};

/// How VMMs are jailed on this host.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailerConfig {
    /// Each VM runs as its own uid and gid, picked from this range.
    pub uid_range: Range<u32>,
    /// Run every VM as this uid and gid instead of one per VM.
    pub fixed_identity: Option<(u32, u32)>,
    /// Where cgroup file systems are mounted.
    pub cgroup_root: PathBuf,
    /// The cgroup every VM's cgroup is made under.
    pub cgroup_parent: PathBuf,
    /// Force a cgroup version instead of detecting it.
    pub cgroup_version: Option<CgroupVersion>,
    pub cpu_period_us: u64,
    /// Memory a VMM may use beyond its guest's memory.
    pub memory_overhead_bytes: u64,
    /// No VMM may use more memory than this, whatever its guest's size.
    pub memory_cap_bytes: Option<u64>,
    /// Processes and threads the VMM may have, beyond one per vCPU.
    pub pids_base: u64,
    pub max_open_files: u64,
    /// The least file-size limit; raised to the largest writable drive.
    pub min_file_size_bytes: u64,
    /// A dynamically linked VMM gets its ELF interpreter and shared
    /// libraries exposed read-only in its jail (see [`crate::program_libraries`]).
    /// Off by default: a production host runs static VMM builds, and a
    /// dynamic one is refused at launch naming its interpreter.
    pub expose_program_libraries: bool,
    /// Jail children kept ready ahead of creates (see [`crate::jail_pool`]):
    /// each is a cloned, namespaced child waiting in a cgroup of its own.
    /// 0 makes each one on the create's path.
    pub pool_size: usize,
    /// The pool is topped up once no create has taken a part for this long;
    /// one a create emptied is refilled as soon as no launch is binding a part.
    pub pool_refill_quiet_ms: u64,
}

impl Default for JailerConfig {
    fn default() -> Self {
        Self {
            uid_range: 900_000..910_000,
            fixed_identity: None,
            cgroup_root: PathBuf::from(DEFAULT_CGROUP_ROOT),
            cgroup_parent: PathBuf::from("metald"),
            cgroup_version: None,
            cpu_period_us: 100_000,
            memory_overhead_bytes: 64 << 20,
            memory_cap_bytes: None,
            pids_base: 32,
            max_open_files: 4096,
            min_file_size_bytes: 1 << 30,
            expose_program_libraries: false,
            pool_size: 0,
            pool_refill_quiet_ms: 250,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Uid(#[from] UidLeaseError),
    #[error("cannot prepare the jail at {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name} ({path}) is not readable by the VMM's unprivileged user (mode {mode:o}); make it world-readable")]
    NotReadable { name: String, path: PathBuf, mode: u32 },
    #[error(
        "{path} is dynamically linked (it asks for {interpreter}); a jail holds no libraries: use a static build, \
         or let the jail expose its interpreter and libraries read-only (expose_program_libraries)"
    )]
    DynamicProgram { path: PathBuf, interpreter: String },
    #[error("cannot find what the VMM's program needs to start")]
    Libraries(#[from] crate::program_libraries::LibraryError),
    #[error("{name} ({path}) was removed or replaced while the VMM was being started; nothing was exposed, try again")]
    ExposureGone { name: String, path: PathBuf },
    #[error("cannot set up the VMM's cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("cannot clone the jailed process")]
    Clone(#[source] nix::errno::Errno),
    #[error("cannot start the jailer's {name} thread")]
    Thread {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the jailed process failed at {step:?}{}", .detail.as_ref().map(|detail| format!(" ({detail})")).unwrap_or_default())]
    Child {
        step: JailStep,
        detail: Option<String>,
        #[source]
        source: io::Error,
    },
    #[error("lost contact with the jailed process before it started the VMM")]
    Handshake(#[source] io::Error),
    #[error("cannot watch the jailed process")]
    Watch(#[source] crate::process::ProcessError),
}

fn prepare<'a>(path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Prepare { path: path.to_path_buf(), source }
}

/// Each VMM gets a cgroup of its own, never one an earlier VMM of the same
/// VM had: the cgroup's CPU counter is what billing charges, so a reading
/// taken around a reboot must belong to exactly one VMM.
fn cgroup_name(vm: &str) -> String {
    static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let launch = LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_nanos()).unwrap_or(0);
    format!("{vm}.{started:x}{launch:x}")
}

/// Launches VMMs into jails.
#[derive(Debug)]
pub struct Jailer {
    config: JailerConfig,
    cgroups: CgroupHierarchy,
    uids: UidPool,
    /// Children made ahead of time, when `pool_size` is above 0.
    pool: Option<JailPool>,
    /// Every VMM's stdin.
    dev_null: OwnedFd,
}

impl Jailer {
    pub fn new(config: JailerConfig) -> Result<Self, JailError> {
        let cgroups = match config.cgroup_version {
            Some(version) => CgroupHierarchy::assume(&config.cgroup_root, &config.cgroup_parent, version),
            None => CgroupHierarchy::detect(&config.cgroup_root, &config.cgroup_parent)?,
        };
        let uids = UidPool::new(config.uid_range.clone(), config.fixed_identity);
        let dev_null = fs::File::open("/dev/null").map_err(prepare(Path::new("/dev/null")))?.into();
        let mut jailer = Self { config, cgroups, uids, pool: None, dev_null };
        if jailer.config.pool_size > 0 {
            let quiet = Duration::from_millis(jailer.config.pool_refill_quiet_ms);
            jailer.pool = Some(JailPool::start(jailer.config.pool_size, quiet, jailer.cgroups.clone(), jailer.waiting_limits())?);
        }
        Ok(jailer)
    }

    /// How many jail children wait ready, of how many the pool keeps; `None` without a pool.
    pub fn pool_fill(&self) -> Option<PoolFill> {
        self.pool.as_ref().map(JailPool::fill)
    }

    /// Ends the pool's waiting children and removes their cgroups; the
    /// pool makes no more. What could not be removed.
    pub fn release_spares(&self) -> Vec<String> {
        self.pool.as_ref().map(JailPool::stop).unwrap_or_default()
    }

    pub fn config(&self) -> &JailerConfig {
        &self.config
    }

    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroups.version()
    }

    /// The cgroup limits of a VM of this size.
    pub fn limits_for(&self, resources: &crate::launch::Resources) -> CgroupLimits {
        let config = &self.config;
        let vcpus = u64::from(resources.vcpus.max(1));
        let mut memory = resources.memory_bytes.saturating_add(config.memory_overhead_bytes);
        if let Some(cap) = config.memory_cap_bytes {
            memory = memory.min(cap);
        }
        CgroupLimits {
            cpu: CpuLimit::Quota { quota_us: vcpus * config.cpu_period_us, period_us: config.cpu_period_us },
            memory_bytes: memory,
            pids: config.pids_base + vcpus,
        }
    }

    /// Kills and removes every cgroup under our parent but `in_use`: what
    /// launches of an earlier run left that no VM took over, a VMM exec'd
    /// by a create cut off before the store recorded it included. Returns
    /// what could not be removed.
    pub fn sweep_strays(&self, in_use: &BTreeSet<String>) -> Vec<String> {
        const KILL_TIMEOUT: Duration = Duration::from_secs(10);
        let mut problems = Vec::new();
        for cgroup in self.cgroups.existing() {
            let name = cgroup.name();
            if in_use.contains(&name) || self.pool.as_ref().is_some_and(|pool| pool.owns(&name)) {
                continue;
            }
            match cgroup.processes() {
                Ok(processes) if !processes.is_empty() => {
                    tracing::warn!(cgroup = %name, ?processes, "killing what an earlier run launched and no VM took over");
                }
                _ => {}
            }
            if let Err(error) = cgroup.kill_all(KILL_TIMEOUT).and_then(|()| cgroup.remove()) {
                problems.push(format!("cgroup {name}: {}", crate::error_chain(&error)));
            }
        }
        problems
    }

    /// Removes the cgroup parent folders, for a host with no VM left
    /// (the pool's waiting children first).
    pub fn release_host(&self) -> Vec<String> {
        let mut problems = self.release_spares();
        problems.extend(self.cgroups.remove_parent());
        problems
    }

    /// Launches `plan` in a fresh jail under `plan.vm_dir`.
    pub async fn launch(&self, mut plan: LaunchPlan) -> Result<Launched, JailError> {
        if self.config.expose_program_libraries {
            plan.exposures.extend(program_libraries(&plan.program)?);
        } else {
            check_static(&plan.program.host_path, &plan.program.file)?;
        }
        for exposure in plan.exposures.iter().filter(|exposure| !exposure.writable) {
            check_world_readable(&exposure.name, &exposure.host_path, &exposure.file)?;
        }
        let identity = match &plan.identity {
            Some(lease) => Arc::clone(lease),
            None => Arc::new(self.uids.lease()?),
        };
        let root = plan.vm_dir.jail_root();
        let mut teardown = JailTeardown { root: None, cgroup: None, identity: Some(Arc::clone(&identity)) };
        let mut timings = Vec::new();
        match self.launch_in(&plan, &root, &identity, &mut teardown, &mut timings).await {
            Ok((process, cgroup)) => {
                let layout = Layout::jailed(root, &plan.vm_dir, &plan.files());
                let mut launched =
                    Launched::new(process, layout, Some(cgroup), Some((identity.uid(), identity.gid())), Some(Box::new(teardown)));
                launched.timings = timings;
                Ok(launched)
            }
            Err(error) => {
                for problem in teardown.run() {
                    tracing::error!(vm_id = %plan.name, problem, "cannot undo a failed jail");
                }
                Err(error)
            }
        }
    }

    async fn launch_in(
        &self,
        plan: &LaunchPlan,
        root: &Path,
        identity: &Identity,
        teardown: &mut JailTeardown,
        timings: &mut Vec<(&'static str, Duration)>,
    ) -> Result<(Supervised, Cgroup), JailError> {
        let mut clock = Instant::now();
        let mut lap = |name: &'static str| {
            timings.push((name, clock.elapsed()));
            clock = Instant::now();
        };
        let _launching = self.pool.as_ref().map(JailPool::launching);
        let ready = match self.pool.as_ref().and_then(JailPool::take) {
            Some(ready) => {
                lap("jail.child_from_pool");
                ready
            }
            None => {
                let ready = ReadyChild::make(&self.cgroups, &cgroup_name(&plan.name), &self.waiting_limits())?;
                lap("jail.child_made");
                ready
            }
        };
        let ReadyChild { child, cgroup } = ready;
        teardown.cgroup = Some(cgroup.clone());
        let process = match Supervised::watch_child(child.pid()) {
            Ok(process) => process,
            Err(error) => {
                child.discard();
                return Err(JailError::Watch(error));
            }
        };
        // From here on, killing the process ends the child; dropping `child` closes its channel.
        let prepared = self.bind(plan, root, identity, &cgroup, teardown, &mut lap);
        let (cgroup, work_files, trees) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                let _ = process.kill().await;
                return Err(error);
            }
        };
        let orders = match self.orders(plan, root, identity, &work_files, &trees) {
            Ok(orders) => orders,
            Err(error) => {
                let _ = process.kill().await;
                return Err(error);
            }
        };
        lap("jail.mounts");
        fail::fail_point!("jail-before-sync");
        let ordered = match child.send(&orders) {
            Ok(ordered) => ordered,
            Err(error) => {
                let _ = process.kill().await;
                return Err(error);
            }
        };
        fail::fail_point!("jail-after-sync");
        if let Err(error) = ordered.outcome(&orders).await {
            let _ = process.kill().await;
            return Err(error);
        }
        lap("jail.namespaces_to_exec");
        Ok((process, cgroup))
    }

    fn file_size_limit(&self, plan: &LaunchPlan) -> u64 {
        self.config.min_file_size_bytes.max(plan.resources.largest_writable_bytes)
    }

    /// The limits a child waits under, before it is a VM's: those of the
    /// smallest VM, so binding a VM's only raises them.
    fn waiting_limits(&self) -> CgroupLimits {
        self.limits_for(&crate::launch::Resources { vcpus: 1, memory_bytes: 0, largest_writable_bytes: 0 })
    }

    /// Makes a waiting child's part the VM's: its work files, its jail
    /// folder, its cgroup's limits and name, a detached mount of each file
    /// it is given. Returns the cgroup under its new name, the work files
    /// and the mounts.
    fn bind(
        &self,
        plan: &LaunchPlan,
        root: &Path,
        identity: &Identity,
        cgroup: &Cgroup,
        teardown: &mut JailTeardown,
        lap: &mut impl FnMut(&'static str),
    ) -> Result<(Cgroup, Vec<Exposure>, Vec<OwnedFd>), JailError> {
        let work_files = open_work_files(plan, identity)?;
        build_jail_folder(plan, &work_files, root, identity, teardown)?;
        lap("jail.folder");
        cgroup.set_limits(&self.limits_for(&plan.resources))?;
        let cgroup = if cgroup.name().starts_with(crate::jail_pool::POOL_PREFIX) {
            match cgroup.renamed(&cgroup_name(&plan.name)) {
                Ok(renamed) => renamed,
                // cgroup v2 renames nothing: the VMM's cgroup keeps its pool name.
                Err(_) if cgroup.version() == CgroupVersion::V2 => cgroup.clone(),
                Err(error) => return Err(error.into()),
            }
        } else {
            cgroup.clone()
        };
        teardown.cgroup = Some(cgroup.clone());
        lap("jail.cgroup_bind");
        // Bind mounts of our descriptors must be made here, as detached
        // mounts: the child's mount namespace refuses binds from ours.
        let trees = exposed(plan, &work_files).map(detached_mount).collect::<Result<Vec<_>, _>>()?;
        Ok((cgroup, work_files, trees))
    }

    /// The child's orders for `plan`.
    fn orders<'a>(
        &'a self,
        plan: &'a LaunchPlan,
        root: &'a Path,
        identity: &Identity,
        work_files: &'a [Exposure],
        trees: &'a [OwnedFd],
    ) -> Result<Orders<'a>, JailError> {
        let layout = Layout::jailed(root.to_path_buf(), &plan.vm_dir, &plan.files());
        let exposures: Vec<&Exposure> = exposed(plan, work_files).collect();
        let binds = exposures.iter().zip(trees).map(|(exposure, tree)| (tree.as_fd(), root.join(&exposure.name))).collect();
        let bind_names = exposures.iter().map(|exposure| (exposure.name.clone(), exposure.host_path.clone())).collect();
        let program = layout.inside(&plan.program.name);
        let stdin = self.dev_null.as_fd();
        let limits = self.limits_for(&plan.resources);
        Orders::encode(OrderSheet {
            root,
            hostname: &plan.name,
            program,
            args: plan.args.iter().map(|arg| arg.render(&layout)).collect(),
            binds,
            bind_names,
            netns: plan.netns.as_ref().map(|netns| netns.as_fd()),
            stdin,
            stdout: plan.stdout.as_fd(),
            stderr: plan.stderr.as_fd(),
            uid: identity.uid(),
            gid: identity.gid(),
            limits: ChildLimits { open_files: self.config.max_open_files, file_size: self.file_size_limit(plan), processes: limits.pids },
        })
    }
}

type Identity = IdentityLease;

/// Every file a jail exposes, in the one order its detached mounts and
/// the orders' binds both follow.
fn exposed<'a>(plan: &'a LaunchPlan, work_files: &'a [Exposure]) -> impl Iterator<Item = &'a Exposure> {
    std::iter::once(&plan.program).chain(plan.exposures.iter()).chain(work_files.iter())
}

/// What a jail made on the host, to remove once its VMM has gone.
#[derive(Debug)]
pub(crate) struct JailTeardown {
    root: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    /// Dropped last: the uid goes back to the pool once no one holds it.
    identity: Option<Arc<IdentityLease>>,
}

impl JailTeardown {
    /// What the jail of a VMM taken over after a restart holds on the host: its folder and cgroup.
    pub(crate) fn taken_over(root: PathBuf, cgroup: Option<Cgroup>, identity: Option<Arc<IdentityLease>>) -> Self {
        Self { root: Some(root), cgroup, identity }
    }

    /// Removes the cgroup and the jail folder and frees the identity; every
    /// step is tried and each failure reported.
    pub(crate) fn run(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(cgroup) = self.cgroup.take() {
            // The VMM's whole use, as the kernel counted it: what its usage records must add up to.
            if let Ok(cpu_ns) = cgroup.cpu_usage_ns() {
                tracing::debug!(cgroup = %cgroup.name(), cpu_ns, "VMM cgroup removed");
            }
            if let Err(error) = cgroup.remove() {
                problems.push(crate::error_chain(&error));
            }
        }
        if let Some(root) = self.root.take() {
            match fs::remove_dir_all(&root) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => problems.push(format!("removing {}: {error}", root.display())),
                _ => {}
            }
        }
        drop(self.identity.take());
        problems
    }
}

impl Teardown for JailTeardown {
    fn run(self: Box<Self>) -> Vec<String> {
        JailTeardown::run(*self)
    }
}

/// The jailer is the launcher of every jailed VMM.
#[async_trait::async_trait]
impl Launcher for Jailer {
    fn is_jailed(&self) -> bool {
        true
    }

    fn lease_identity(&self) -> Result<Option<Arc<IdentityLease>>, LaunchError> {
        Ok(Some(Arc::new(self.uids.lease()?)))
    }

    fn identity_capacity(&self) -> Option<IdentityCapacity> {
        self.uids.capacity()
    }

    fn take_over_identity(&self, uid: u32, gid: u32) -> Result<Option<Arc<IdentityLease>>, LaunchError> {
        Ok(Some(Arc::new(self.uids.take_over(uid, gid)?)))
    }

    async fn launch(&self, plan: LaunchPlan) -> Result<Launched, LaunchError> {
        Jailer::launch(self, plan).await.map_err(|error| match error {
            JailError::Uid(error) => LaunchError::Identity(error),
            other => LaunchError::Jail(Box::new(other)),
        })
    }

    fn take_over(&self, ticket: TakeoverTicket, identity: Option<Arc<IdentityLease>>) -> Result<Launched, crate::process::ProcessError> {
        let process = Supervised::take_over(ticket.pid, ticket.start_time)?;
        let ids = identity.as_ref().map(|lease| (lease.uid(), lease.gid()));
        let teardown = JailTeardown::taken_over(ticket.layout.root().to_path_buf(), ticket.cgroup.clone(), identity);
        Ok(Launched::new(process, ticket.layout, ticket.cgroup, ids, Some(Box::new(teardown))))
    }

    fn clean_up_after(&self, ticket: &TakeoverTicket) -> Vec<String> {
        JailTeardown::taken_over(ticket.layout.root().to_path_buf(), ticket.cgroup.clone(), None).run()
    }

    fn sweep_strays(&self, in_use: &BTreeSet<String>) -> Vec<String> {
        Jailer::sweep_strays(self, in_use)
    }

    fn release_host(&self) -> Vec<String> {
        Jailer::release_host(self)
    }

    fn release_spares(&self) -> Vec<String> {
        Jailer::release_spares(self)
    }

    fn pool_fill(&self) -> Option<PoolFill> {
        Jailer::pool_fill(self)
    }
}

/// The interpreter and libraries of a dynamically linked program, to
/// expose read-only; none for a static one. Said once per program, as
/// it widens what the jail holds.
fn program_libraries(program: &Exposure) -> Result<Vec<Exposure>, JailError> {
    static SAID: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());
    let found = crate::program_libraries::of_program(&program.host_path, &program.file)?;
    if let Some(interpreter) = &found.interpreter
        && SAID.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(program.host_path.clone())
    {
        tracing::warn!(
            program = %program.host_path.display(),
            interpreter = %interpreter.display(),
            files = ?found.files.values().collect::<Vec<_>>(),
            "the VMM is dynamically linked: its interpreter and libraries are exposed read-only in each jail; production hosts run a static build"
        );
    }
    Ok(found.exposures()?)
}

fn check_static(path: &Path, file: &OwnedFd) -> Result<(), JailError> {
    let mut header = vec![0u8; 4096];
    let read = nix::sys::uio::pread(file, &mut header, 0).map_err(|errno| prepare(path)(errno.into()))?;
    header.truncate(read);
    if let Some(interpreter) = elf_interpreter(file, &header) {
        return Err(JailError::DynamicProgram { path: path.to_path_buf(), interpreter });
    }
    Ok(())
}

/// The program interpreter an ELF64 file asks for, if any.
fn elf_interpreter(file: &OwnedFd, header: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    if header.len() < 64 || &header[..4] != b"\x7fELF" || header[4] != 2 {
        return None;
    }
    let u16_at = |at: usize| header.get(at..at + 2).map(|bytes| u16::from_le_bytes([bytes[0], bytes[1]]));
    let u32_at =
        |buffer: &[u8], at: usize| buffer.get(at..at + 4).map(|bytes| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
    let u64_at = |buffer: &[u8], at: usize| buffer.get(at..at + 8).and_then(|bytes| bytes.try_into().ok()).map(u64::from_le_bytes);
    let program_headers = usize::try_from(u64_at(header, 32)?).ok()?;
    let entry_size = usize::from(u16_at(54)?);
    let count = usize::from(u16_at(56)?);
    for index in 0..count {
        let at = program_headers + index * entry_size;
        let mut entry = [0u8; 56];
        let read = nix::sys::uio::pread(file, &mut entry, i64::try_from(at).ok()?).ok()?;
        if read < 56 || u32_at(&entry, 0)? != PT_INTERP {
            continue;
        }
        let offset = i64::try_from(u64_at(&entry, 8)?).ok()?;
        let size = usize::try_from(u64_at(&entry, 32)?).ok()?.min(4096);
        let mut name = vec![0u8; size];
        let read = nix::sys::uio::pread(file, &mut name, offset).ok()?;
        name.truncate(read);
        return Some(String::from_utf8_lossy(&name).trim_end_matches('\0').to_owned());
    }
    None
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 1;
const MOUNT_ATTR_NOSUID: u64 = 2;
const MOUNT_ATTR_NODEV: u64 = 4;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A bind mount of an open file that belongs to no mount namespace yet,
/// read-only unless writable, never honouring setuid bits or device nodes.
fn detached_mount(exposure: &Exposure) -> Result<OwnedFd, JailError> {
    let failed = |errno: nix::errno::Errno| JailError::Prepare { path: exposure.host_path.clone(), source: errno.into() };
    if nix::sys::stat::fstat(&*exposure.file).map_err(failed)?.st_nlink == 0 {
        return Err(JailError::ExposureGone { name: exposure.name.clone(), path: exposure.host_path.clone() });
    }
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: open_tree reads our descriptor and a static empty C string and returns a new fd.
    let tree = unsafe { libc::syscall(libc::SYS_open_tree, exposure.file.as_raw_fd(), c"".as_ptr(), flags) };
    let tree = i32::try_from(tree).ok().filter(|fd| *fd >= 0).ok_or_else(|| failed(nix::errno::Errno::last()))?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let tree = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(tree) };
    let mut attr_set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if !exposure.writable {
        attr_set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr { attr_set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr reads `attr`, which lives across the call, and a static empty C string.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            size_of::<MountAttr>(),
        )
    };
    if result != 0 {
        return Err(failed(nix::errno::Errno::last()));
    }
    Ok(tree)
}

fn check_world_readable(name: &str, path: &Path, file: &OwnedFd) -> Result<(), JailError> {
    let stat = nix::sys::stat::fstat(file).map_err(|errno| prepare(path)(errno.into()))?;
    if stat.st_mode & 0o004 == 0 {
        return Err(JailError::NotReadable { name: name.to_owned(), path: path.to_path_buf(), mode: stat.st_mode & 0o7777 });
    }
    Ok(())
}

/// Step 2: the jail folder, its mount points, device nodes and work files.
fn build_jail_folder(
    plan: &LaunchPlan,
    work_files: &[Exposure],
    root: &Path,
    identity: &Identity,
    teardown: &mut JailTeardown,
) -> Result<(), JailError> {
    let (uid, gid) = (Some(Uid::from_raw(identity.uid())), Some(Gid::from_raw(identity.gid())));
    fs::DirBuilder::new().mode(0o700).create(root).map_err(prepare(root))?;
    teardown.root = Some(root.to_path_buf());
    nix::unistd::chown(root, uid, gid).map_err(|errno| prepare(root)(errno.into()))?;

    let mount_points = std::iter::once(&plan.program).chain(plan.exposures.iter()).chain(work_files.iter());
    for exposure in mount_points {
        let target = root.join(&exposure.name);
        make_parents(root, &target)?;
        fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(&target).map_err(prepare(&target))?;
        if exposure.writable {
            nix::unistd::fchown(&*exposure.file, uid, gid).map_err(|errno| prepare(&exposure.host_path)(errno.into()))?;
        }
    }
    for device in &plan.devices {
        let node = root.join(device.name);
        make_parents(root, &node)?;
        nix::sys::stat::mknod(&node, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(device.major, device.minor))
            .map_err(|errno| prepare(&node)(errno.into()))?;
        nix::unistd::chown(&node, uid, gid).map_err(|errno| prepare(&node)(errno.into()))?;
    }
    Ok(())
}

/// Work files live in the VM's folder, outside the jail, so they outlive
/// it; each starts empty, belongs to the VMM's user, and is mounted in.
fn open_work_files(plan: &LaunchPlan, identity: &Identity) -> Result<Vec<Exposure>, JailError> {
    let (uid, gid) = (Some(Uid::from_raw(identity.uid())), Some(Gid::from_raw(identity.gid())));
    let mut files = Vec::with_capacity(plan.work_files.len());
    for name in &plan.work_files {
        let path = plan.vm_dir.file(name);
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(prepare(&path))?;
        nix::unistd::fchown(&file, uid, gid).map_err(|errno| prepare(&path)(errno.into()))?;
        files.push(Exposure { name: name.clone(), host_path: path, file: Arc::new(file.into()), writable: true });
    }
    Ok(files)
}

/// Folders between the jail root and `path`, owned by root and searchable by all.
fn make_parents(root: &Path, path: &Path) -> Result<(), JailError> {
    if let Some(parent) = path.parent()
        && parent != root
    {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(prepare(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_size_and_the_cap() {
        let jailer = Jailer {
            config: JailerConfig::default(),
            cgroups: CgroupHierarchy::assume("/nonexistent", "metald", CgroupVersion::V2),
            uids: UidPool::new(0..0, None),
            pool: None,
            dev_null: fs::File::open("/dev/null").unwrap().into(),
        };
        let resources = crate::launch::Resources { vcpus: 2, memory_bytes: 512 << 20, largest_writable_bytes: 0 };
        let limits = jailer.limits_for(&resources);
        assert_eq!(limits.cpu, CpuLimit::Quota { quota_us: 200_000, period_us: 100_000 });
        assert_eq!(limits.memory_bytes, (512 + 64) << 20);
        assert_eq!(limits.pids, 34);
        let capped = Jailer { config: JailerConfig { memory_cap_bytes: Some(100 << 20), ..JailerConfig::default() }, ..jailer };
        assert_eq!(capped.limits_for(&resources).memory_bytes, 100 << 20);
    }

    #[test]
    fn a_teardown_gives_back_no_uid_another_holder_still_keeps() {
        let pool = UidPool::new(5000..5001, None);
        let first = Arc::new(pool.lease().unwrap());
        let kept = Arc::clone(&first);
        JailTeardown { root: None, cgroup: None, identity: Some(first) }.run();
        assert!(matches!(pool.lease(), Err(UidLeaseError::Exhausted(_))), "a lease still held is not given back");
        drop(kept);
        assert_eq!(pool.lease().unwrap().uid(), 5000);
    }

    #[test]
    fn a_dynamically_linked_program_is_named_as_such() {
        let file: OwnedFd = fs::File::open("/bin/sh").unwrap().into();
        let error = check_static(Path::new("/bin/sh"), &file).unwrap_err();
        assert!(matches!(error, JailError::DynamicProgram { ref interpreter, .. } if interpreter.contains("ld-linux")), "{error}");
        let guest: OwnedFd = fs::File::open(metald_testguest::kernel_path()).unwrap().into();
        check_static(metald_testguest::kernel_path(), &guest).unwrap();
    }
}
