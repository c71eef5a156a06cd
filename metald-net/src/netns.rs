//! Named network namespaces, kept the way iproute2 keeps them (a file in a
//! folder, normally `/run/netns`, bind-mounted from the namespace), so that
//! `ip netns` and `ip -n` see ours; and running code inside one, on a
//! thread of its own, since a thread's network namespace is its own.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Where iproute2 keeps named namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot {action} network namespace {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in a network namespace panicked")]
    ThreadPanicked,
    #[error("cannot make a network namespace")]
    Unshare(#[source] io::Error),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Io { action, path: path.to_path_buf(), source }
}

fn errno<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(nix::errno::Errno) -> NetnsError + 'a {
    move |errno| NetnsError::Io { action, path: path.to_path_buf(), source: errno.into() }
}

/// Runs `work` on a thread that has joined `namespace`, and returns what it returns.
pub fn run_in<R: Send>(namespace: impl AsFd + Send, work: impl FnOnce() -> R + Send) -> Result<Result<R, nix::errno::Errno>, NetnsError> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(namespace, CloneFlags::CLONE_NEWNET)?;
                Ok(work())
            })
            .join()
            .map_err(|_| NetnsError::ThreadPanicked)
    })
}

/// The folder of named namespaces.
#[derive(Debug, Clone)]
pub struct NetnsDir {
    dir: PathBuf,
}

impl NetnsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Makes the folder a shared mount point, as `ip netns add` does, so
    /// namespace mounts made here reach mount namespaces that share it.
    fn prepare(&self) -> Result<(), NetnsError> {
        std::fs::create_dir_all(&self.dir).map_err(io_error("create the folder of", &self.dir))?;
        let none: Option<&str> = None;
        let shared = || nix::mount::mount(none, &self.dir, none, MsFlags::MS_SHARED | MsFlags::MS_REC, none);
        if shared().is_err() {
            // Not a mount point yet: make it one first.
            nix::mount::mount(Some(&self.dir), &self.dir, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
                .map_err(errno("bind the folder of", &self.dir))?;
            shared().map_err(errno("share the folder of", &self.dir))?;
        }
        Ok(())
    }

    /// Creates namespace `name` and returns it open. A leftover of the same
    /// name (from a crash) is removed first.
    pub fn create(&self, name: &str) -> Result<OwnedFd, NetnsError> {
        let namespace = unnamed()?;
        self.name(name, &namespace)?;
        Ok(namespace)
    }

    /// Gives `namespace` (made by [`unnamed`]) the name `name`. A leftover
    /// of the same name (from a crash) is removed first.
    pub fn name(&self, name: &str, namespace: &OwnedFd) -> Result<(), NetnsError> {
        self.prepare()?;
        let path = self.path_of(name);
        self.delete(name)?;
        OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_error("create", &path))?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", namespace.as_raw_fd()));
        let none: Option<&str> = None;
        if let Err(error) = nix::mount::mount(Some(&source), &path, none, MsFlags::MS_BIND, none) {
            let _ = self.delete(name);
            return Err(NetnsError::Io { action: "create", path, source: error.into() });
        }
        Ok(())
    }

    pub fn open(&self, name: &str) -> Result<OwnedFd, NetnsError> {
        let path = self.path_of(name);
        File::open(&path).map(OwnedFd::from).map_err(io_error("open", &path))
    }

    pub fn exists(&self, name: &str) -> bool {
        self.path_of(name).exists()
    }

    /// Removes namespace `name`; it goes away when nothing else holds it.
    /// Removing one that does not exist is not an error.
    pub fn delete(&self, name: &str) -> Result<(), NetnsError> {
        let path = self.path_of(name);
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(error) => return Err(NetnsError::Io { action: "unmount", path, source: error.into() }),
        }
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(NetnsError::Io { action: "remove", path, source: error }),
            _ => Ok(()),
        }
    }
}

/// A new network namespace, held only by the descriptor returned: it is
/// gone when that closes, unless [`NetnsDir::name`] gave it a name.
pub fn unnamed() -> Result<OwnedFd, NetnsError> {
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<OwnedFd> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
                File::open("/proc/thread-self/ns/net").map(OwnedFd::from)
            })
            .join()
    });
    match made {
        Ok(Ok(namespace)) => Ok(namespace),
        Ok(Err(error)) => Err(NetnsError::Unshare(error)),
        Err(_) => Err(NetnsError::ThreadPanicked),
    }
}

/// Writes a sysctl under `/proc/sys` as seen from `namespace`.
pub fn write_sysctl(namespace: impl AsFd + Send, key: &str, value: &str) -> Result<(), NetnsError> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let written = run_in(namespace, || std::fs::write(&path, value))?;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(NetnsError::Io { action: "write sysctl in", path, source: error }),
        Err(error) => Err(NetnsError::Io { action: "enter", path, source: error.into() }),
    }
}
