//! One daemon per data folder, and, with the jailer, per uid window and
//! per cgroup parent: two daemons sharing one would take over the same
//! VMMs, bill them twice, or hand one uid or cgroup to two VMs.
//!
//! It owns the lock files: `<data_dir>/metald.lock`, and under
//! [`RUN_DIR`] `uids-<start>-<end>.lock` and `cgroup-<parent>.lock`. Each
//! holds an advisory `flock`, taken without waiting, and the holder's pid
//! for the message a second daemon prints. The kernel drops the locks when
//! the process ends, however it ends, so a stale file never blocks a
//! start; the files are never removed (removing one would let two daemons
//! lock two different files of the same name). It does not decide what
//! the daemon does with the folder, the uids or the cgroups.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::config::JailerSettings;

/// Where the locks of host-wide settings live (a tmpfs: empty after a reboot).
pub const RUN_DIR: &str = "/run/metald";
const DATA_DIR_LOCK: &str = "metald.lock";

/// The locks a daemon holds for as long as it runs.
#[derive(Debug)]
pub struct InstanceLocks {
    _held: Vec<Flock<File>>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceLockError {
    /// Another daemon holds the lock.
    #[error("{setting} {value} is in use by another metald{}; one daemon per {per}", holder_text(.holder))]
    InUse { setting: &'static str, value: String, per: &'static str, holder: Option<u32> },
    #[error("{setting}: cannot create {}", .path.display())]
    CreateDir { setting: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{setting}: cannot lock {}", .path.display())]
    Lock { setting: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{setting}: cannot write this daemon's pid to {}", .path.display())]
    RecordPid { setting: &'static str, path: PathBuf, source: std::io::Error },
}

fn holder_text(holder: &Option<u32>) -> String {
    holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// One setting whose value no two daemons may share, and its lock file.
#[derive(Debug)]
struct Claim {
    /// The setting, as an operator writes it.
    setting: &'static str,
    /// Its value, as the message shows it.
    value: String,
    /// What there is one daemon per, in words.
    per: &'static str,
    path: PathBuf,
}

impl InstanceLocks {
    /// Locks `data_dir` (which must exist) and, when the jailer is on, its
    /// uid window and cgroup parent under `run_dir`; refuses with the
    /// setting that collides when another daemon holds one of them.
    pub fn take(data_dir: &Path, jailer: Option<&JailerSettings>, run_dir: &Path) -> Result<Self, InstanceLockError> {
        let mut claims = vec![data_dir_claim(data_dir)];
        if let Some(jailer) = jailer {
            create_run_dir(run_dir)?;
            claims.push(uid_window_claim(jailer, run_dir));
            claims.push(cgroup_parent_claim(&jailer.cgroup_parent, run_dir));
        }
        let held = claims.iter().map(hold).collect::<Result<_, _>>()?;
        Ok(Self { _held: held })
    }
}

fn data_dir_claim(data_dir: &Path) -> Claim {
    Claim { setting: "data_dir", value: data_dir.display().to_string(), per: "data folder", path: data_dir.join(DATA_DIR_LOCK) }
}

fn uid_window_claim(jailer: &JailerSettings, run_dir: &Path) -> Claim {
    let start = jailer.uid_start;
    let end = start.saturating_add(jailer.uid_count);
    Claim {
        setting: "jailer.uid_start/jailer.uid_count",
        value: format!("(uids {start} to {})", end.saturating_sub(1)),
        per: "uid window",
        path: run_dir.join(format!("uids-{start}-{end}.lock")),
    }
}

fn cgroup_parent_claim(cgroup_parent: &Path, run_dir: &Path) -> Claim {
    let parent = normal_cgroup_parent(cgroup_parent);
    Claim {
        setting: "jailer.cgroup_parent",
        value: parent.clone(),
        per: "cgroup parent",
        path: run_dir.join(format!("cgroup-{}.lock", escape_file_name(&parent))),
    }
}

/// `metald`, `/metald/` and `metald/./` are one cgroup: its folders, joined by `/`.
fn normal_cgroup_parent(cgroup_parent: &Path) -> String {
    let folders: Vec<String> = cgroup_parent
        .components()
        .filter_map(|component| match component {
            Component::Normal(folder) => Some(folder.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    folders.join("/")
}

/// A cgroup path as one file name, with no two paths sharing one: `%` and `/` are percent-escaped.
fn escape_file_name(path: &str) -> String {
    path.replace('%', "%25").replace('/', "%2F")
}

fn create_run_dir(run_dir: &Path) -> Result<(), InstanceLockError> {
    DirBuilder::new().recursive(true).mode(0o700).create(run_dir).map_err(|source| InstanceLockError::CreateDir {
        setting: "jailer",
        path: run_dir.to_owned(),
        source,
    })
}

/// Takes the claim's lock without waiting, then writes this daemon's pid into it.
fn hold(claim: &Claim) -> Result<Flock<File>, InstanceLockError> {
    let lock_error = |source| InstanceLockError::Lock { setting: claim.setting, path: claim.path.clone(), source };
    // Not truncated on open: until the lock is ours, the pid in it is the holder's.
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&claim.path).map_err(lock_error)?;
    let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((file, Errno::EWOULDBLOCK)) => return Err(in_use(claim, file)),
        Err((_, errno)) => return Err(lock_error(errno.into())),
    };
    metald_core::private_files::tighten(&locked).map_err(lock_error)?;
    record_pid(&locked).map_err(|source| InstanceLockError::RecordPid { setting: claim.setting, path: claim.path.clone(), source })?;
    Ok(locked)
}

fn in_use(claim: &Claim, file: File) -> InstanceLockError {
    InstanceLockError::InUse { setting: claim.setting, value: claim.value.clone(), per: claim.per, holder: holder_pid(file) }
}

/// The pid the holder wrote, when it has written one yet.
fn holder_pid(mut file: File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn record_pid(file: &File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn jailer(uid_start: u32, cgroup_parent: &str) -> JailerSettings {
        JailerSettings { uid_start, cgroup_parent: PathBuf::from(cgroup_parent), ..JailerSettings::default() }
    }

    #[test]
    fn a_second_lock_on_a_data_folder_is_refused_naming_the_folder_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _first = InstanceLocks::take(dir.path(), None, dir.path()).unwrap();
        let refused = InstanceLocks::take(dir.path(), None, dir.path()).unwrap_err();
        let expected = format!(
            "data_dir {} is in use by another metald (pid {}); one daemon per data folder",
            dir.path().display(),
            std::process::id()
        );
        assert_eq!(refused.to_string(), expected);
    }

    #[test]
    fn a_released_lock_is_taken_again_and_names_the_new_holder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATA_DIR_LOCK), "4000000000 and more from a longer pid\n").unwrap();
        drop(InstanceLocks::take(dir.path(), None, dir.path()).unwrap());
        let _again = InstanceLocks::take(dir.path(), None, dir.path()).unwrap();
        let written = std::fs::read_to_string(dir.path().join(DATA_DIR_LOCK)).unwrap();
        assert_eq!(written, format!("{}\n", std::process::id()));
    }

    #[test]
    fn with_the_jailer_a_shared_uid_window_or_cgroup_parent_is_refused_by_setting() {
        let run = tempfile::tempdir().unwrap();
        let (first, second, third) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _held = InstanceLocks::take(first.path(), Some(&jailer(900_000, "metald")), run.path()).unwrap();
        let same_uids = InstanceLocks::take(second.path(), Some(&jailer(900_000, "other")), run.path()).unwrap_err();
        assert!(same_uids.to_string().starts_with("jailer.uid_start/jailer.uid_count (uids 900000 to 909999) is in use"), "{same_uids}");
        let same_cgroup = InstanceLocks::take(third.path(), Some(&jailer(950_000, "/metald/")), run.path()).unwrap_err();
        assert!(same_cgroup.to_string().starts_with("jailer.cgroup_parent metald is in use"), "{same_cgroup}");
        let elsewhere = InstanceLocks::take(third.path(), Some(&jailer(950_000, "metald/b")), run.path());
        assert!(elsewhere.is_ok(), "nothing shared: {elsewhere:?}");
    }

    #[test]
    fn without_the_jailer_nothing_outside_the_data_folder_is_locked() {
        let (run, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let run_dir = run.path().join("metald");
        let _held = InstanceLocks::take(data.path(), None, &run_dir).unwrap();
        assert!(!run_dir.exists());
    }

    #[test]
    fn cgroup_parents_map_to_distinct_file_names() {
        let name = |parent: &str| escape_file_name(&normal_cgroup_parent(Path::new(parent)));
        assert_eq!(name("metald"), "metald");
        assert_eq!(name("/metald/vms/"), "metald%2Fvms");
        assert_ne!(name("a/b"), name("a%2Fb"));
    }
}
