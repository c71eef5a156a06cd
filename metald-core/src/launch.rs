//! How a VMM process is started and taken over: the port a backend
//! launches through. A backend describes what its VMM needs in a
//! [`LaunchPlan`] without knowing how it will be confined; a [`Launcher`]
//! starts it (the integrated jailer, [`crate::jailer::Jailer`], or for
//! development [`crate::unjailed::Unjailed`]), and the returned [`Layout`]
//! tells the backend which path the VMM sees for each file and which path
//! the host uses for it. Nothing here knows a jail.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::cgroups::{Cgroup, CgroupUsage};
use crate::process::{ProcessError, ProcessExit, Supervised};
use crate::uid_lease::{IdentityCapacity, IdentityLease, UidLeaseError};

/// A file the VMM must be able to open, already opened by us.
#[derive(Debug, Clone)]
pub struct Exposure {
    /// Where the VMM finds it, relative to its root (`kernel`, `drives/root.img`).
    pub name: String,
    /// Its path on the host, for messages and for an unjailed VMM.
    pub host_path: PathBuf,
    pub file: Arc<OwnedFd>,
    /// Writable exposures are per-VM files; the jail hands them to the VMM's user.
    pub writable: bool,
}

/// A device node the VMM needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Path inside the VMM's root, e.g. `dev/kvm`.
    pub name: &'static str,
    pub major: u64,
    pub minor: u64,
}

pub const KVM: Device = Device { name: "dev/kvm", major: 10, minor: 232 };
pub const TUN: Device = Device { name: "dev/net/tun", major: 10, minor: 200 };
pub const URANDOM: Device = Device { name: "dev/urandom", major: 1, minor: 9 };

/// A command-line argument: literal, or the path the VMM sees for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Literal(String),
    /// A file in the VMM's root (an exposure, a work file, or one it creates).
    PathOf(String),
    /// `<key>=<the path the VMM sees for the file>`, as in Cloud Hypervisor's `path=/events.fifo`.
    KeyPathOf(&'static str, String),
}

impl Arg {
    /// The file this argument names, if it names one.
    pub fn file(&self) -> Option<&str> {
        match self {
            Arg::Literal(_) => None,
            Arg::PathOf(name) | Arg::KeyPathOf(_, name) => Some(name),
        }
    }

    /// The argument as the VMM is given it, with paths as `layout` places them.
    pub fn render(&self, layout: &Layout) -> std::ffi::OsString {
        match self {
            Arg::Literal(text) => text.into(),
            Arg::PathOf(name) => layout.inside(name).into_os_string(),
            Arg::KeyPathOf(key, name) => {
                let mut rendered = std::ffi::OsString::from(format!("{key}="));
                rendered.push(layout.inside(name));
                rendered
            }
        }
    }
}

/// The resources a VM is sized for; the jail derives its limits from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// The largest file the VMM writes (a writable drive), so the file-size
    /// limit never cuts a drive short.
    pub largest_writable_bytes: u64,
}

/// Everything a VMM needs to start, said independently of the jail.
#[derive(Debug)]
pub struct LaunchPlan {
    /// The VM's id: hostname and cgroup name in a jail.
    pub name: String,
    /// The VM's own folder on the host.
    pub vm_dir: crate::vm_dir::VmDir,
    /// The VMM executable, opened. A jail holds no libraries: it must be statically linked,
    /// unless the jailer exposes its interpreter and libraries (`JailerConfig::expose_program_libraries`).
    pub program: Exposure,
    pub args: Vec<Arg>,
    pub exposures: Vec<Exposure>,
    /// Files the VMM writes into (log, metrics): created empty and handed to its user.
    pub work_files: Vec<String>,
    pub devices: Vec<Device>,
    /// The network namespace to run in; joined before the VMM opens any TAP.
    pub netns: Option<Arc<OwnedFd>>,
    pub resources: Resources,
    /// The user to run as, leased for the VM's life; one is leased per launch when absent.
    pub identity: Option<Arc<IdentityLease>>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Where each file of a launched VMM is, seen from inside and from the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// The host folder the VMM sees as `/` when jailed; the VM's folder otherwise.
    root: PathBuf,
    jailed: bool,
    /// Files that live elsewhere on the host: exposures and work files.
    placed: BTreeMap<String, PathBuf>,
}

impl Layout {
    /// `root` is the jail folder; exposures and work files are mounted into it.
    pub fn jailed(root: PathBuf, vm_dir: &crate::vm_dir::VmDir, plan_files: &PlanFiles<'_>) -> Self {
        Self { root, jailed: true, placed: plan_files.placed(vm_dir) }
    }

    /// Everything at its own host path; other files in the VM's folder.
    pub fn unjailed(vm_dir: &crate::vm_dir::VmDir, plan_files: &PlanFiles<'_>) -> Self {
        let placed = plan_files.placed(vm_dir);
        Self { root: vm_dir.path().to_path_buf(), jailed: false, placed }
    }

    /// The path the VMM uses for `name`.
    pub fn inside(&self, name: &str) -> PathBuf {
        if self.jailed { Path::new("/").join(name) } else { self.host(name) }
    }

    /// The path metald uses for `name`.
    pub fn host(&self, name: &str) -> PathBuf {
        self.placed.get(name).cloned().unwrap_or_else(|| self.root.join(name))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_jailed(&self) -> bool {
        self.jailed
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Identity(#[from] UidLeaseError),
    /// The launcher's own confinement failed (for the jailer, a [`crate::jailer::JailError`]).
    #[error("cannot jail the VMM")]
    Jail(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot start the VMM")]
    Process(#[from] ProcessError),
    #[error("cannot prepare {path} for the VMM")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The files of a plan that live outside the VMM's root.
#[derive(Debug)]
pub struct PlanFiles<'a> {
    pub exposures: &'a [Exposure],
    pub work_files: &'a [String],
}

impl PlanFiles<'_> {
    fn placed(&self, vm_dir: &crate::vm_dir::VmDir) -> BTreeMap<String, PathBuf> {
        let exposures = self.exposures.iter().map(|exposure| (exposure.name.clone(), exposure.host_path.clone()));
        let work_files = self.work_files.iter().map(|name| (name.clone(), vm_dir.file(name)));
        exposures.chain(work_files).collect()
    }
}

impl LaunchPlan {
    pub fn files(&self) -> PlanFiles<'_> {
        PlanFiles { exposures: &self.exposures, work_files: &self.work_files }
    }
}

/// How a VMM process ended, and why when the launcher can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmExit {
    pub status: ProcessExit,
    /// A cause beyond the status, e.g. the out-of-memory killer at the cgroup's limit.
    pub cause: Option<String>,
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            Some(cause) => write!(f, "{} ({cause})", self.status),
            None => write!(f, "{}", self.status),
        }
    }
}

/// What finds a running VMM again after a restart of metald and proves it
/// is the same process: its pid and start time, where its jail is, its
/// cgroup. The launcher's facts, so a VMM of any backend is found by it;
/// the VM store keeps it with the VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TakeoverTicket {
    pub pid: u32,
    pub start_time: u64,
    pub layout: Layout,
    pub cgroup: Option<Cgroup>,
}

/// A started VMM and what was made for it.
#[derive(Debug)]
pub struct Launched {
    pub process: Supervised,
    /// When the process started (see [`crate::process::start_time`]): with
    /// its pid, what proves it is the same process after a restart.
    pub start_time: Option<u64>,
    pub layout: Layout,
    /// The VMM's cgroup, when jailed.
    pub cgroup: Option<Cgroup>,
    /// The uid and gid the VMM runs as, when jailed.
    pub identity: Option<(u32, u32)>,
    exit: watch::Receiver<Option<VmmExit>>,
    /// Undoes the confinement once the process is gone.
    teardown: Option<Box<dyn Teardown>>,
    /// How long each step of the launch took, in order.
    pub timings: Vec<(&'static str, Duration)>,
    /// What the cgroup counted last, read just before release removed it.
    pub ended_usage: Option<CgroupUsage>,
}

impl Launched {
    pub(crate) fn new(
        process: Supervised,
        layout: Layout,
        cgroup: Option<Cgroup>,
        identity: Option<(u32, u32)>,
        teardown: Option<Box<dyn Teardown>>,
    ) -> Self {
        let (publish, exit) = watch::channel(None);
        let (watched, counted) = (process.clone(), cgroup.clone());
        let oom_kills_before = cgroup.as_ref().and_then(|cgroup| cgroup.oom_kills().ok()).unwrap_or(0);
        tokio::spawn(async move {
            let status = watched.wait().await;
            let cause = counted.and_then(|cgroup| out_of_memory_cause(&cgroup, oom_kills_before));
            publish.send_replace(Some(VmmExit { status, cause }));
        });
        let start_time = crate::process::start_time(process.pid()).ok();
        Self { process, start_time, layout, cgroup, identity, exit, teardown, timings: Vec::new(), ended_usage: None }
    }

    /// The ticket that finds this process again; `None` when its start
    /// time could not be read, which proves nothing.
    pub fn ticket(&self) -> Option<TakeoverTicket> {
        Some(TakeoverTicket {
            pid: self.process.pid(),
            start_time: self.start_time?,
            layout: self.layout.clone(),
            cgroup: self.cgroup.clone(),
        })
    }

    /// A channel that changes once, when the VMM has ended.
    pub fn exits(&self) -> watch::Receiver<Option<VmmExit>> {
        self.exit.clone()
    }

    /// Removes what the launch made (cgroup, jail folder, identity). The
    /// process must have ended; every step is tried and the errors kept.
    /// It runs on a blocking thread: killing stragglers and removing a
    /// cgroup wait on the kernel, which no async worker should.
    pub async fn release(&mut self) -> Vec<String> {
        let Some(teardown) = self.teardown.take() else {
            return Vec::new();
        };
        let cgroup = self.cgroup.clone();
        let released = tokio::task::spawn_blocking(move || {
            let usage = cgroup.as_ref().and_then(|cgroup| cgroup.usage().ok());
            (usage, teardown.run())
        })
        .await;
        match released {
            Ok((usage, problems)) => {
                self.ended_usage = usage;
                problems
            }
            Err(error) => vec![format!("the jail's teardown did not run to its end: {error}")],
        }
    }
}

/// What undoes a launch's confinement (cgroup, jail folder, the uid's
/// lease) once its VMM has gone; run on a blocking thread.
pub trait Teardown: Send + Sync + std::fmt::Debug {
    /// Every step is tried; what could not be undone is returned.
    fn run(self: Box<Self>) -> Vec<String>;
}

/// Starts VMM processes and takes them over after a restart of metald. The
/// backends of one host share one launcher, so each VM's uid is leased once.
#[async_trait]
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Whether VMMs run confined (own root, namespaces, cgroup, user).
    fn is_jailed(&self) -> bool;

    /// The user a VM's VMMs will run as, leased for the VM's life (none when VMMs do not get users of their own).
    fn lease_identity(&self) -> Result<Option<Arc<IdentityLease>>, LaunchError>;

    /// The uid pool's size and use, when VMs get users of their own.
    fn identity_capacity(&self) -> Option<IdentityCapacity>;

    /// Takes over a VM's known uid and gid after a restart.
    fn take_over_identity(&self, uid: u32, gid: u32) -> Result<Option<Arc<IdentityLease>>, LaunchError>;

    /// Starts the VMM `plan` describes.
    async fn launch(&self, plan: LaunchPlan) -> Result<Launched, LaunchError>;

    /// Takes over the VMM `ticket` describes, which an earlier metald
    /// launched and which still runs, once it is proven to be the same process.
    fn take_over(&self, ticket: TakeoverTicket, identity: Option<Arc<IdentityLease>>) -> Result<Launched, ProcessError>;

    /// Removes what the launch of a VMM that ended while no metald watched
    /// it left behind (its cgroup and jail folder); what could not be removed.
    fn clean_up_after(&self, ticket: &TakeoverTicket) -> Vec<String>;

    /// Kills and removes what launches of an earlier run left that none of
    /// `in_use` (cgroup names) accounts for; what could not be removed.
    fn sweep_strays(&self, in_use: &std::collections::BTreeSet<String>) -> Vec<String>;

    /// Removes what launching set up on the host for every VM, once no VM
    /// is left; what could not be removed.
    fn release_host(&self) -> Vec<String>;

    /// Ends what the launcher made ahead of launches (the jail pool's
    /// waiting children), for a process that is ending; what could not be removed.
    fn release_spares(&self) -> Vec<String> {
        Vec::new()
    }

    /// How full the launcher's jail pool is; `None` when it keeps none.
    fn pool_fill(&self) -> Option<crate::jail_pool::PoolFill> {
        None
    }
}

/// Says so when the kernel's out-of-memory killer struck in the cgroup.
fn out_of_memory_cause(cgroup: &Cgroup, kills_before: u64) -> Option<String> {
    let kills = cgroup.oom_kills().ok()?;
    (kills > kills_before).then(|| match cgroup.memory_limit() {
        Ok(limit) => format!("out of memory: the kernel killed it at its cgroup's limit of {limit} bytes"),
        Err(_) => "out of memory: the kernel killed it at its cgroup's limit".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Vec<Exposure> {
        let file = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        vec![Exposure { name: "kernel".into(), host_path: PathBuf::from("/images/vmlinux"), file, writable: false }]
    }

    #[test]
    fn a_jailed_vmm_sees_everything_under_its_root() {
        let (exposures, work_files) = (kernel(), vec!["vmm.log".to_owned()]);
        let files = PlanFiles { exposures: &exposures, work_files: &work_files };
        let layout = Layout::jailed(PathBuf::from("/vms/vm-1/root"), &crate::vm_dir::VmDir::at(PathBuf::from("/vms/vm-1")), &files);
        assert_eq!(layout.inside("kernel"), PathBuf::from("/kernel"));
        assert_eq!(layout.inside("vmm.log"), PathBuf::from("/vmm.log"));
        assert_eq!(layout.host("vmm.log"), PathBuf::from("/vms/vm-1/vmm.log"), "work files outlive the jail");
        assert_eq!(layout.host("api.sock"), PathBuf::from("/vms/vm-1/root/api.sock"));
    }

    #[test]
    fn an_unjailed_vmm_uses_host_paths() {
        let (exposures, work_files) = (kernel(), vec!["vmm.log".to_owned()]);
        let layout = Layout::unjailed(
            &crate::vm_dir::VmDir::at(PathBuf::from("/vms/vm-1")),
            &PlanFiles { exposures: &exposures, work_files: &work_files },
        );
        assert_eq!(layout.inside("kernel"), PathBuf::from("/images/vmlinux"));
        assert_eq!(layout.inside("vmm.log"), PathBuf::from("/vms/vm-1/vmm.log"));
        assert_eq!(layout.inside("api.sock"), PathBuf::from("/vms/vm-1/api.sock"));
    }
}
