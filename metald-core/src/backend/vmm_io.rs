//! The files any VMM process talks through, in the VM's folder: named
//! pipes for its console, stderr and logs (sized so nothing is lost while
//! metald is away), the files it is handed by name, and its API socket,
//! whose appearance is waited for with inotify rather than sleeps.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::backend::BackendError;
use crate::images::ImageFile;
use crate::launch::Exposure;

/// The kernel buffer of each pipe a VMM writes into: 1 MiB, the most an
/// unprivileged process may ask for by default (`fs.pipe-max-size`). What does not fit
/// while metald is away or busy the VMM drops, and a guest's console keeps
/// coming at its own pace; pages are taken only as the buffer fills.
pub const PIPE_BYTES: i32 = 1 << 20;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// What failed, on which file, while preparing a VMM.
pub fn prepare<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |source| BackendError::Prepare { what, path: path.to_path_buf(), source }
}

/// Makes a fresh named pipe at `path` and opens both ends: ours for
/// reading, and the one the VMM writes to.
pub fn fifo(path: &Path) -> io::Result<(tokio::net::unix::pipe::Receiver, OwnedFd)> {
    make_fifo(path)?;
    let reader = tokio::net::unix::pipe::OpenOptions::new().open_receiver(path)?;
    // Read and write: the VMM's end is a reader too, so while metald is
    // away its output waits in the pipe (for the next metald to read)
    // instead of failing with EPIPE and being lost.
    let writer = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    give_room(&reader, path);
    Ok((reader, writer.into()))
}

/// Gives a pipe a VMM writes into [`PIPE_BYTES`] of kernel buffer.
pub fn give_room(pipe: &impl AsFd, path: &Path) {
    if let Err(error) = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)) {
        tracing::debug!(path = %path.display(), %error, "the pipe keeps the kernel's default size");
    }
}

/// Makes a fresh named pipe at `path`, replacing what was there.
pub fn make_fifo(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).map_err(io::Error::from)
}

/// Opens a named pipe's reading end without waiting for a writer; reads never wait either.
pub fn reading_end(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
}

/// A fresh named pipe at `path` that the VMM opens by `name` to write
/// into; the jail hands it to the VMM's user through a reading end, which
/// never keeps our reader from seeing the VMM's end.
pub fn vmm_pipe(name: &str, path: &Path) -> Result<Exposure, BackendError> {
    make_fifo(path).map_err(prepare("a pipe for the VMM's output", path))?;
    let file = reading_end(path).map_err(prepare("a pipe for the VMM's output", path))?;
    Ok(Exposure { name: name.to_owned(), host_path: path.to_path_buf(), file: Arc::new(file.into()), writable: true })
}

/// Removes a file the VMM used, if it is there.
pub fn remove_if_present(path: &Path) -> Result<(), BackendError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(prepare("the removal of a VMM's file", path)(error)),
        _ => Ok(()),
    }
}

/// A VMM's API takes paths as JSON strings, so they must be UTF-8.
pub fn utf8(path: &Path) -> Result<String, BackendError> {
    path.to_str().map(str::to_owned).ok_or_else(|| BackendError::Prepare {
        what: "a path for the VMM",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "a VMM's API takes only UTF-8 paths"),
    })
}

/// An image the VMM opens by `name`, read-only unless `writable`.
pub fn exposure(name: String, image: &ImageFile, writable: bool) -> Exposure {
    Exposure { name, host_path: image.path.clone(), file: Arc::clone(&image.file), writable }
}

/// Refuses an API socket path the kernel cannot bind.
pub fn check_socket_path(socket: &Path) -> Result<(), BackendError> {
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(BackendError::SocketPathTooLong { path: socket.to_path_buf(), len, max: MAX_SOCKET_PATH });
    }
    Ok(())
}

/// Creations in one folder, as inotify reports them.
pub struct SocketCreations {
    inotify: AsyncFd<InotifyFd>,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl SocketCreations {
    pub fn watch(dir: &Path) -> Result<Self, BackendError> {
        let to_io = |errno: nix::errno::Errno| io::Error::from(errno);
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|errno| prepare("an inotify instance", dir)(to_io(errno)))?;
        inotify
            .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .map_err(|errno| prepare("a watch on the VM folder", dir)(to_io(errno)))?;
        // SAFETY: InotifyFd owns the inotify fd and never replaces it, so the
        // fd stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|error| prepare("a watch on the VM folder", dir)(error.into()))?;
        Ok(Self { inotify })
    }

    /// Waits until something was created in the folder.
    pub async fn next(&self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

impl std::fmt::Debug for SocketCreations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketCreations").finish_non_exhaustive()
    }
}

/// Waits, without fixed sleeps, until the VMM's API socket exists (inotify
/// on its folder) and `probe` answers, for at most `timeout`; a refused
/// connection just after the socket appears is retried at once. A process
/// that ends first is `Ok(Err(exit))`, for its backend to explain from its
/// own last words; the deadline passing is [`BackendError::NotReady`], and
/// another error of `probe` is returned as is.
pub async fn wait_until_ready<T, F, Fut>(
    vmm: &'static str,
    launched: &crate::launch::Launched,
    socket: &Path,
    timeout: std::time::Duration,
    probe: F,
) -> Result<Result<(), crate::process::ProcessExit>, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    match answering(socket, &launched.process, deadline, probe).await? {
        Ok(()) => Ok(Ok(())),
        Err(NotReady::Exited(exit)) => Ok(Err(exit)),
        Err(NotReady::TimedOut(refusal)) => {
            if let Some(error) = refusal {
                tracing::warn!(vmm, socket = %socket.display(), error = %crate::error_chain(&error), "the VMM's API never answered");
            }
            Err(BackendError::NotReady { vmm, timeout })
        }
    }
}

/// How a wait for a VMM's API ended, when it did not answer.
#[derive(Debug)]
enum NotReady {
    /// The process ended first.
    Exited(crate::process::ProcessExit),
    /// The deadline passed; the last refusal, if the socket was there.
    TimedOut(Option<BackendError>),
}

async fn answering<T, F, Fut>(
    socket: &Path,
    process: &crate::process::Supervised,
    deadline: tokio::time::Instant,
    mut probe: F,
) -> Result<Result<(), NotReady>, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let folder = socket.parent().unwrap_or(Path::new("/")).to_path_buf();
    let creations = SocketCreations::watch(&folder)?;
    let appeared = async {
        while !socket.exists() {
            tokio::select! {
                ready = creations.next() => ready.map_err(prepare("a watch on the VM folder", &folder))?,
                exit = process.wait() => return Ok(Err(NotReady::Exited(exit))),
                () = tokio::time::sleep_until(deadline) => return Ok(Err(NotReady::TimedOut(None))),
            }
        }
        Ok(Ok(()))
    }
    .await;
    // Closing an inotify instance waits for an RCU grace period (often
    // more than 10 ms here); let a blocking thread wait for it instead of the boot.
    tokio::task::spawn_blocking(move || drop(creations));
    if let Err(not_ready) = appeared? {
        return Ok(Err(not_ready));
    }
    loop {
        match probe().await {
            Ok(_) => return Ok(Ok(())),
            Err(error @ BackendError::Transport { .. }) => {
                if let Some(exit) = process.exit_status() {
                    return Ok(Err(NotReady::Exited(exit)));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(Err(NotReady::TimedOut(Some(error))));
                }
                tokio::task::yield_now().await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How long a dead VMM's pipes may take to drain into their files.
pub const CAPTURE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until the last process's output is all in its files, so two
/// captures never write one file. The pipes end with the process.
pub async fn finish_captures(captures: &mut Vec<tokio::task::JoinHandle<()>>, vm_id: &crate::ids::VmId) {
    for capture in std::mem::take(captures) {
        if tokio::time::timeout(CAPTURE_DRAIN_TIMEOUT, capture).await.is_err() {
            tracing::warn!(%vm_id, "output capture still open after its VMM ended");
        }
    }
}

/// Kills a VMM whose launch failed after its process started and undoes
/// its jail, logging what could not be undone.
pub async fn undo_failed_launch(launched: &mut crate::launch::Launched, vm_id: &crate::ids::VmId, vmm: &str) {
    if let Err(error) = launched.process.kill().await {
        tracing::error!(%vm_id, vmm, error = %crate::error_chain(&error), "cannot kill a VMM that failed to start");
    }
    for problem in launched.release().await {
        tracing::error!(%vm_id, vmm, problem, "cannot undo a failed launch");
    }
}
