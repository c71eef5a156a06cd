//! One cgroup per VMM, on cgroup v1 or v2 (detected at run time), with the
//! limits a jail asks for: CPU (quota and period, or a weight), memory and
//! pids. It also answers what the kernel counted there (out-of-memory
//! kills, CPU time, memory use), which is how a death by memory limit is
//! told from any other and where metering reads from.
//!
//! On v1 a VM's cgroup is one folder per controller (`cpu`, `cpuacct`,
//! `memory`, `pids`), each `<controller>/<parent>/<name>`; on v2 it is one
//! folder `<parent>/<name>` with those controllers enabled from the root
//! down. It knows nothing of VMMs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where cgroup file systems are mounted on every mainstream distribution.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {root}: {reason}")]
    Unavailable { root: PathBuf, reason: String },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup name {0:?} must be a plain folder name")]
    BadName(String),
    #[error("processes {processes:?} of cgroup {path} did not die")]
    StillBusy { path: PathBuf, processes: Vec<u32> },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { action, path: path.to_path_buf(), source }
}

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    V1,
    V2,
}

/// CPU time a cgroup may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLimit {
    /// At most `quota_us` of CPU time every `period_us` (2 CPUs: quota = 2 × period).
    Quota { quota_us: u64, period_us: u64 },
    /// A share relative to siblings, 1 to 10000 (100 is the default).
    Weight(u64),
}

/// What a cgroup may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub cpu: CpuLimit,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// The cgroup hierarchy of this host.
#[derive(Debug, Clone)]
pub struct CgroupHierarchy {
    root: PathBuf,
    version: CgroupVersion,
    /// The parent of every VM's cgroup, relative to the root (or to each controller on v1).
    parent: PathBuf,
}

impl CgroupHierarchy {
    /// Finds the hierarchy under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: impl Into<PathBuf>, parent: impl Into<PathBuf>) -> Result<Self, CgroupError> {
        let root = root.into();
        let parent = parent.into();
        let version = detect_version(&root)?;
        Ok(Self { root, version, parent })
    }

    /// A hierarchy of the given version without probing: for tests against
    /// a fake tree, where the file system type cannot be cgroup2.
    pub fn assume(root: impl Into<PathBuf>, parent: impl Into<PathBuf>, version: CgroupVersion) -> Self {
        Self { root: root.into(), version, parent: parent.into() }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Creates the cgroup `name` with `limits`. Undone by [`Cgroup::remove`],
    /// and undone here when any step fails.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(CgroupError::BadName(name.to_owned()));
        }
        let cgroup = match self.version {
            CgroupVersion::V1 => {
                let dirs = V1_CONTROLLERS.iter().map(|controller| self.root.join(controller).join(&self.parent).join(name)).collect();
                Cgroup { version: CgroupVersion::V1, dirs }
            }
            CgroupVersion::V2 => {
                self.enable_v2_controllers()?;
                Cgroup { version: CgroupVersion::V2, dirs: vec![self.root.join(&self.parent).join(name)] }
            }
        };
        let mut made = Vec::new();
        let result = (|| {
            for dir in &cgroup.dirs {
                fs::create_dir_all(dir.parent().unwrap_or(dir)).map_err(io_error("create", dir))?;
                fs::create_dir(dir).map_err(io_error("create", dir))?;
                made.push(dir.clone());
            }
            cgroup.apply(limits)
        })();
        if let Err(error) = result {
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            return Err(error);
        }
        Ok(cgroup)
    }

    /// Every cgroup under our parent now, by name: a VMM's of this run or
    /// one an earlier run left (its VMM may still run).
    pub fn existing(&self) -> Vec<Cgroup> {
        let parents: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => V1_CONTROLLERS.iter().map(|controller| self.root.join(controller).join(&self.parent)).collect(),
            CgroupVersion::V2 => vec![self.root.join(&self.parent)],
        };
        let names: std::collections::BTreeSet<std::ffi::OsString> = parents
            .iter()
            .filter_map(|parent| fs::read_dir(parent).ok())
            .flatten()
            .flatten()
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name())
            .collect();
        names
            .into_iter()
            .map(|name| Cgroup { version: self.version, dirs: parents.iter().map(|parent| parent.join(&name)).collect() })
            .collect()
    }

    /// Removes the parent folders (the deepest first) once they are empty,
    /// as a host with no VM left should be; a level something else still
    /// uses is kept. Returns what could not be removed and why.
    pub fn remove_parent(&self) -> Vec<String> {
        let tops: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => V1_CONTROLLERS.iter().map(|controller| self.root.join(controller)).collect(),
            CgroupVersion::V2 => vec![self.root.clone()],
        };
        let mut problems = Vec::new();
        for top in tops {
            let mut levels: Vec<PathBuf> = self
                .parent
                .components()
                .scan(top, |dir, component| {
                    *dir = dir.join(component);
                    Some(dir.clone())
                })
                .collect();
            levels.reverse();
            for (depth, level) in levels.iter().enumerate() {
                match fs::remove_dir(level) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    // An ancestor other cgroups share stays, and that is no problem.
                    Err(error) if error.raw_os_error() == Some(libc::ENOTEMPTY) || error.raw_os_error() == Some(libc::EBUSY) => {
                        if depth == 0 {
                            problems.push(format!("cgroup folder {}: still holds cgroups", level.display()));
                        }
                        break;
                    }
                    Err(error) => {
                        problems.push(format!("cgroup folder {}: {error}", level.display()));
                        break;
                    }
                }
            }
        }
        problems
    }

    /// On v2 a controller is usable in a cgroup only when every ancestor
    /// lists it in `cgroup.subtree_control`.
    fn enable_v2_controllers(&self) -> Result<(), CgroupError> {
        let available =
            fs::read_to_string(self.root.join("cgroup.controllers")).map_err(io_error("read", &self.root.join("cgroup.controllers")))?;
        for controller in V2_CONTROLLERS {
            if !available.split_whitespace().any(|name| name == controller) {
                return Err(CgroupError::Unavailable {
                    root: self.root.clone(),
                    reason: format!("the {controller} controller is not enabled"),
                });
            }
        }
        let mut dir = self.root.clone();
        let mut levels = vec![dir.clone()];
        for component in self.parent.components() {
            dir = dir.join(component);
            levels.push(dir.clone());
        }
        for level in &levels {
            fs::create_dir_all(level).map_err(io_error("create", level))?;
            let control = level.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control).unwrap_or_default();
            let missing: Vec<String> = V2_CONTROLLERS
                .iter()
                .filter(|controller| !enabled.split_whitespace().any(|name| name == **controller))
                .map(|controller| format!("+{controller}"))
                .collect();
            if !missing.is_empty() {
                fs::write(&control, missing.join(" ")).map_err(io_error("enable controllers in", &control))?;
            }
        }
        Ok(())
    }
}

fn detect_version(root: &Path) -> Result<CgroupVersion, CgroupError> {
    let unavailable = |reason: String| CgroupError::Unavailable { root: root.to_path_buf(), reason };
    let stat = nix::sys::statfs::statfs(root).map_err(|errno| unavailable(format!("statfs failed: {errno}")))?;
    if stat.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC {
        return Ok(CgroupVersion::V2);
    }
    let missing: Vec<&str> =
        V1_CONTROLLERS.iter().copied().filter(|controller| !root.join(controller).join("cgroup.procs").exists()).collect();
    if missing.is_empty() { Ok(CgroupVersion::V1) } else { Err(unavailable(format!("neither cgroup2 nor the v1 controllers {missing:?}"))) }
}

/// What a cgroup counted, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupUsage {
    pub cpu_ns: u64,
    /// The peak since the last peak reading, where the cgroup version can tell.
    pub memory_peak_bytes: Option<u64>,
}

/// One VMM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    version: CgroupVersion,
    /// One folder on v2; one per controller (cpu, cpuacct, memory, pids) on v1.
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The cgroup's own name, the last part of its path.
    pub fn name(&self) -> String {
        self.dirs.first().and_then(|dir| dir.file_name()).map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The cgroup's folders (one on v2, one per controller on v1).
    pub fn paths(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn controller(&self, name: &str) -> &Path {
        match self.version {
            CgroupVersion::V2 => &self.dirs[0],
            CgroupVersion::V1 => {
                let index = V1_CONTROLLERS.iter().position(|controller| *controller == name).unwrap_or(0);
                &self.dirs[index]
            }
        }
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.controller(controller).join(file);
        fs::write(&path, value).map_err(io_error("write", &path))
    }

    fn read(&self, controller: &str, file: &str) -> Result<String, CgroupError> {
        let path = self.controller(controller).join(file);
        fs::read_to_string(&path).map_err(io_error("read", &path))
    }

    /// The cgroup under another name in the same parent (every
    /// controller's folder on v1), its processes staying in it. cgroup v2
    /// refuses renames; on any failure the folders keep their names.
    pub fn renamed(&self, name: &str) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(CgroupError::BadName(name.to_owned()));
        }
        let mut done: Vec<(PathBuf, PathBuf)> = Vec::new();
        for dir in &self.dirs {
            let to = dir.with_file_name(name);
            if let Err(source) = fs::rename(dir, &to) {
                for (from, to) in done.iter().rev() {
                    let _ = fs::rename(to, from);
                }
                return Err(CgroupError::Io { action: "rename", path: dir.clone(), source });
            }
            done.push((dir.clone(), to));
        }
        Ok(Cgroup { version: self.version, dirs: done.into_iter().map(|(_, to)| to).collect() })
    }

    /// Sets the cgroup's limits, replacing the ones it had. Limits only
    /// rise this way on v1, where a memory limit below use is refused.
    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        self.apply(limits)
    }

    fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        match (self.version, limits.cpu) {
            (CgroupVersion::V1, CpuLimit::Quota { quota_us, period_us }) => {
                self.write("cpu", "cpu.cfs_period_us", &period_us.to_string())?;
                self.write("cpu", "cpu.cfs_quota_us", &quota_us.to_string())?;
            }
            // v1 shares run 2..=262144 with 1024 as the default; v2 weights 1..=10000 with 100.
            (CgroupVersion::V1, CpuLimit::Weight(weight)) => {
                self.write("cpu", "cpu.shares", &(weight.clamp(1, 10_000) * 1024 / 100).max(2).to_string())?
            }
            (CgroupVersion::V2, CpuLimit::Quota { quota_us, period_us }) => {
                self.write("cpu", "cpu.max", &format!("{quota_us} {period_us}"))?
            }
            (CgroupVersion::V2, CpuLimit::Weight(weight)) => self.write("cpu", "cpu.weight", &weight.clamp(1, 10_000).to_string())?,
        }
        match self.version {
            CgroupVersion::V1 => self.write("memory", "memory.limit_in_bytes", &limits.memory_bytes.to_string())?,
            CgroupVersion::V2 => {
                self.write("memory", "memory.max", &limits.memory_bytes.to_string())?;
                // Without swap limits a v2 cgroup would page out instead of stopping.
                self.write("memory", "memory.swap.max", "0")
                    .or_else(|error| if self.controller("memory").join("memory.swap.max").exists() { Err(error) } else { Ok(()) })?;
            }
        }
        self.write("pids", "pids.max", &limits.pids.to_string())
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(io_error("add a process to", &procs))?;
        }
        Ok(())
    }

    /// The processes in the cgroup now.
    pub fn processes(&self) -> Result<Vec<u32>, CgroupError> {
        let text = self.read("pids", "cgroup.procs")?;
        Ok(text.lines().filter_map(|line| line.trim().parse().ok()).collect())
    }

    /// Kills every process in the cgroup and waits until none is left.
    pub fn kill_all(&self, timeout: std::time::Duration) -> Result<(), CgroupError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let processes = self.processes()?;
            if processes.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(CgroupError::StillBusy { path: self.controller("pids").to_path_buf(), processes });
            }
            for pid in processes {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
            // A killed process leaves the cgroup when the kernel has torn it down.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// How many times the kernel's out-of-memory killer struck in this cgroup.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let (file, key) = match self.version {
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
        };
        Ok(keyed_value(&self.read("memory", file)?, key).unwrap_or(0))
    }

    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> Result<u64, CgroupError> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        };
        let text = self.read("memory", file)?;
        Ok(text.trim().parse().unwrap_or(u64::MAX))
    }

    /// The CPU quota and period in force, if any.
    pub fn cpu_quota(&self) -> Result<Option<(u64, u64)>, CgroupError> {
        let (quota, period) = match self.version {
            CgroupVersion::V1 => (self.read("cpu", "cpu.cfs_quota_us")?, self.read("cpu", "cpu.cfs_period_us")?),
            CgroupVersion::V2 => {
                let text = self.read("cpu", "cpu.max")?;
                let mut parts = text.split_whitespace();
                (parts.next().unwrap_or("max").to_owned(), parts.next().unwrap_or("100000").to_owned())
            }
        };
        Ok(quota.trim().parse::<u64>().ok().zip(period.trim().parse::<u64>().ok()))
    }

    /// The pids limit in force.
    pub fn pids_limit(&self) -> Result<Option<u64>, CgroupError> {
        Ok(self.read("pids", "pids.max")?.trim().parse().ok())
    }

    /// Memory the cgroup uses now, in bytes.
    pub fn memory_current(&self) -> Result<u64, CgroupError> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.usage_in_bytes",
            CgroupVersion::V2 => "memory.current",
        };
        Ok(self.read("memory", file)?.trim().parse().unwrap_or(0))
    }

    /// The most memory the cgroup used since the last call, which starts
    /// the next period (v1 resets `memory.max_usage_in_bytes`; on v2, whose
    /// `memory.peak` cannot be reset everywhere, `None`).
    pub fn memory_peak_since_last(&self) -> Result<Option<u64>, CgroupError> {
        match self.version {
            CgroupVersion::V1 => {
                let peak = self.read("memory", "memory.max_usage_in_bytes")?.trim().parse().unwrap_or(0);
                self.write("memory", "memory.max_usage_in_bytes", "0")?;
                Ok(Some(peak))
            }
            CgroupVersion::V2 => Ok(None),
        }
    }

    /// CPU time used by everything that ran in the cgroup, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Result<u64, CgroupError> {
        match self.version {
            CgroupVersion::V1 => Ok(self.read("cpuacct", "cpuacct.usage")?.trim().parse().unwrap_or(0)),
            CgroupVersion::V2 => Ok(keyed_value(&self.read("cpu", "cpu.stat")?, "usage_usec").unwrap_or(0) * 1000),
        }
    }

    /// CPU time and memory peak now.
    pub fn usage(&self) -> Result<CgroupUsage, CgroupError> {
        Ok(CgroupUsage { cpu_ns: self.cpu_usage_ns()?, memory_peak_bytes: self.memory_peak_since_last()? })
    }

    /// Removes the cgroup. It must hold no process; every folder is tried.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first_error = None;
        for dir in &self.dirs {
            match remove_cgroup_dir(dir) {
                Ok(()) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A cgroup folder goes with `rmdir` only; a process that has just exited
/// may still be counted for a moment, so a busy folder is retried briefly.
fn remove_cgroup_dir(dir: &Path) -> Result<(), CgroupError> {
    for attempt in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            Err(error) => return Err(CgroupError::Io { action: "remove", path: dir.to_path_buf(), source: error }),
        }
    }
    Ok(())
}

fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(key)).then(|| parts.next().and_then(|value| value.parse().ok())).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CgroupLimits =
        CgroupLimits { cpu: CpuLimit::Quota { quota_us: 200_000, period_us: 100_000 }, memory_bytes: 256 << 20, pids: 64 };

    /// A directory tree shaped like a cgroup2 mount with every controller available.
    fn fake_v2() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n").unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        root
    }

    #[test]
    fn v2_enables_controllers_down_the_tree_and_writes_limits() {
        let root = fake_v2();
        let hierarchy = CgroupHierarchy::assume(root.path(), "metald", CgroupVersion::V2);
        let cgroup = hierarchy.create("vm-1", &LIMITS).unwrap();
        let dir = root.path().join("metald/vm-1");
        assert_eq!(cgroup.paths(), std::slice::from_ref(&dir));
        assert_eq!(fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert_eq!(fs::read_to_string(root.path().join("metald/cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "200000 100000");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), (256u64 << 20).to_string());
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "64");
        assert_eq!(cgroup.cpu_quota().unwrap(), Some((200_000, 100_000)));
        assert_eq!(cgroup.memory_limit().unwrap(), 256 << 20);
        assert_eq!(cgroup.pids_limit().unwrap(), Some(64));

        cgroup.add_process(4242).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "4242");
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(cgroup.oom_kills().unwrap(), 1);
        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n").unwrap();
        assert_eq!(cgroup.cpu_usage_ns().unwrap(), 1_500_000);
    }

    #[test]
    fn v2_weight_is_written_as_is_and_a_missing_controller_is_named() {
        let root = fake_v2();
        let hierarchy = CgroupHierarchy::assume(root.path(), "metald", CgroupVersion::V2);
        let cgroup = hierarchy.create("vm-2", &CgroupLimits { cpu: CpuLimit::Weight(250), ..LIMITS }).unwrap();
        assert_eq!(fs::read_to_string(cgroup.paths()[0].join("cpu.weight")).unwrap(), "250");

        fs::write(root.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        let error = hierarchy.create("vm-3", &LIMITS).unwrap_err();
        assert!(error.to_string().contains("the memory controller is not enabled"), "{error}");
        assert!(!root.path().join("metald/vm-3").exists());
    }

    #[test]
    fn a_failed_create_leaves_no_folder() {
        let root = fake_v2();
        // A file where the cgroup folder should be makes the second step fail.
        let hierarchy = CgroupHierarchy::assume(root.path(), "metald", CgroupVersion::V1);
        fs::create_dir_all(root.path().join("cpu/metald")).unwrap();
        fs::create_dir_all(root.path().join("cpuacct/metald/vm-4")).unwrap();
        let error = hierarchy.create("vm-4", &LIMITS).unwrap_err();
        assert!(matches!(error, CgroupError::Io { action: "create", .. }), "{error}");
        assert!(!root.path().join("cpu/metald/vm-4").exists(), "the cpu folder made before the failure is gone");
    }

    #[test]
    fn names_that_are_not_plain_folder_names_are_refused() {
        let root = fake_v2();
        let hierarchy = CgroupHierarchy::assume(root.path(), "metald", CgroupVersion::V2);
        for name in ["", "..", "a/b"] {
            assert!(matches!(hierarchy.create(name, &LIMITS), Err(CgroupError::BadName(_))));
        }
    }

    #[test]
    fn v1_shares_scale_from_weights() {
        let root = tempfile::tempdir().unwrap();
        let hierarchy = CgroupHierarchy::assume(root.path(), "metald", CgroupVersion::V1);
        let cgroup = hierarchy.create("vm-5", &CgroupLimits { cpu: CpuLimit::Weight(100), ..LIMITS }).unwrap();
        assert_eq!(fs::read_to_string(root.path().join("cpu/metald/vm-5/cpu.shares")).unwrap(), "1024");
        assert_eq!(cgroup.paths().len(), 4);
        assert_eq!(fs::read_to_string(root.path().join("memory/metald/vm-5/memory.limit_in_bytes")).unwrap(), (256u64 << 20).to_string());
    }
}
