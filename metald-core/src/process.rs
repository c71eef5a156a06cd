//! Supervision of VMM processes through pidfds.
//!
//! A [`Supervised`] process is watched by a task that waits for its pidfd to
//! become readable, so an exit is noticed the moment it happens (no polling),
//! and reaps it with `waitid(P_PIDFD)`. Signals go through
//! `pidfd_send_signal`, so a recycled pid can never be hit by mistake. This
//! module knows nothing about VMMs; it only owns processes.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// How a supervised process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessExit {
    /// It called `exit` with this code.
    Exited { code: i32 },
    /// A signal ended it.
    Killed { signal: i32 },
    /// It ended, but not as our child (it was taken over after a restart of
    /// metald), so its status went to its parent.
    Unknown,
}

impl ProcessExit {
    pub fn is_clean(self) -> bool {
        self == ProcessExit::Exited { code: 0 }
    }
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ProcessExit::Exited { code } => write!(f, "exited with code {code}"),
            ProcessExit::Killed { signal } => match Signal::try_from(signal) {
                Ok(name) => write!(f, "was killed by signal {signal} ({name})"),
                Err(_) => write!(f, "was killed by signal {signal}"),
            },
            ProcessExit::Unknown => write!(f, "ended (its exit status went to its parent, not to metald)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a pidfd for process {pid}")]
    PidfdOpen {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch process {pid}'s pidfd")]
    Watch {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} is not the one that was started (it started at tick {found}, not {expected})")]
    NotTheSame { pid: u32, expected: u64, found: u64 },
    #[error("process {pid} is gone")]
    Gone {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot send {signal} to process {pid}")]
    Signal {
        pid: u32,
        signal: Signal,
        #[source]
        source: io::Error,
    },
}

/// A child process whose exit is published the moment it happens.
#[derive(Debug, Clone)]
pub struct Supervised {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ProcessExit>>,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no
    // memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reaps the process behind `pidfd`, which must have exited.
fn reap(pidfd: &OwnedFd) -> io::Result<ProcessExit> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value for it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(pidfd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: waitid writes into `info`, which lives for the whole call; the
    // pidfd is open because we hold a reference to it.
    let result = unsafe { libc::waitid(libc::P_PIDFD, id, &mut info, libc::WEXITED) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded for WEXITED, so `info` holds a SIGCHLD record
    // whose si_status field is initialised.
    let status = unsafe { info.si_status() };
    Ok(match info.si_code {
        libc::CLD_EXITED => ProcessExit::Exited { code: status },
        _ => ProcessExit::Killed { signal: status },
    })
}

impl Supervised {
    /// Starts `command` and begins watching it. Must be called inside a
    /// Tokio runtime. The child is not reaped by anyone else: this module
    /// owns its exit.
    pub fn spawn(command: &mut Command) -> Result<Self, ProcessError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command.spawn().map_err(|source| ProcessError::Spawn { program, source })?;
        // Dropping a std Child neither kills nor reaps it; the pidfd takes over.
        let pid = child.id();
        drop(child);
        Self::watch_child(pid)
    }

    /// Watches process `pid`, which must be our own unreaped child (one
    /// started by `clone` rather than [`Supervised::spawn`]).
    pub fn watch_child(pid: u32) -> Result<Self, ProcessError> {
        let pidfd = Arc::new(pidfd_open(pid).map_err(|source| ProcessError::PidfdOpen { pid, source })?);
        // SAFETY: the Arc keeps the pidfd open, unchanged, for as long as
        // the AsyncFd that holds it lives.
        let readiness = unsafe { AsyncFd::register_with_interest(Arc::clone(&pidfd), Interest::READABLE) }
            .map_err(|error| ProcessError::Watch { pid, source: error.into() })?;
        let (publish, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = match readiness.readable().await {
                Ok(_) => reap(readiness.get_ref()),
                Err(error) => Err(error),
            };
            match status {
                Ok(status) => {
                    tracing::debug!(pid, %status, "supervised process ended");
                    publish.send_replace(Some(status));
                }
                Err(error) => {
                    // Without a status the exit is still real: report it as
                    // a kill so that nobody waits forever.
                    tracing::error!(pid, %error, "cannot reap supervised process");
                    publish.send_replace(Some(ProcessExit::Killed { signal: libc::SIGKILL }));
                }
            }
        });
        Ok(Self { pid, pidfd, exit })
    }

    /// Watches process `pid`, which is not our child (it outlived an
    /// earlier metald), after proving that it is the process that was
    /// started at `start_time` (see [`start_time`]): a pid alone may have
    /// been given to another process since. Its exit is noticed as soon as
    /// it happens; its status is [`ProcessExit::Unknown`].
    pub fn take_over(pid: u32, expected_start_time: u64) -> Result<Self, ProcessError> {
        let pidfd = pidfd_open(pid).map_err(|source| ProcessError::Gone { pid, source })?;
        // Checked after the pidfd exists: from here on it names this process even if the pid is reused.
        let found = start_time(pid).map_err(|source| ProcessError::Gone { pid, source })?;
        if found != expected_start_time {
            return Err(ProcessError::NotTheSame { pid, expected: expected_start_time, found });
        }
        // A pidfd is readable once its process has ended: one that died
        // unreaped (a zombie its dead parent left) is gone, not taken over.
        let mut poll = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&pidfd), nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).map_err(|errno| ProcessError::Gone { pid, source: errno.into() })? > 0 {
            return Err(ProcessError::Gone { pid, source: io::Error::other("it has ended and waits to be reaped") });
        }
        let pidfd = Arc::new(pidfd);
        // SAFETY: the Arc keeps the pidfd open, unchanged, for as long as
        // the AsyncFd that holds it lives.
        let readiness = unsafe { AsyncFd::register_with_interest(Arc::clone(&pidfd), Interest::READABLE) }
            .map_err(|error| ProcessError::Watch { pid, source: error.into() })?;
        let (publish, exit) = watch::channel(None);
        tokio::spawn(async move {
            let _ = readiness.readable().await;
            tracing::debug!(pid, "process taken over ended");
            publish.send_replace(Some(ProcessExit::Unknown));
        });
        Ok(Self { pid, pidfd, exit })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit, once it happened.
    pub fn exit_status(&self) -> Option<ProcessExit> {
        *self.exit.borrow()
    }

    /// A channel that changes once, when the process ends.
    pub fn exits(&self) -> watch::Receiver<Option<ProcessExit>> {
        self.exit.clone()
    }

    /// Waits until the process has ended and been reaped.
    pub async fn wait(&self) -> ProcessExit {
        let mut exit = self.exit.clone();
        loop {
            if let Some(status) = *exit.borrow_and_update() {
                return status;
            }
            if exit.changed().await.is_err() {
                // The watcher task is gone; it always publishes first.
                return self.exit_status().unwrap_or(ProcessExit::Killed { signal: libc::SIGKILL });
            }
        }
    }

    /// Waits at most `timeout` for the process to end.
    pub async fn wait_timeout(&self, timeout: Duration) -> Option<ProcessExit> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    /// Sends `signal`; a process that has already ended is not an error.
    pub fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        // SAFETY: pidfd_send_signal reads only its integer arguments; a null
        // siginfo asks the kernel to fill it in as kill(2) would.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(ProcessError::Signal { pid: self.pid, signal, source })
    }

    /// Kills the process with SIGKILL and waits until it is reaped.
    pub async fn kill(&self) -> Result<ProcessExit, ProcessError> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL)?;
        Ok(self.wait().await)
    }
}

/// CPU time (user plus system, all threads) and resident memory of a
/// running process, read from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessUsage {
    pub cpu_time_ns: u64,
    pub resident_bytes: u64,
}

impl ProcessUsage {
    /// One read of `/proc/<pid>/stat`, which holds both figures: the
    /// resident set there is the count `VmRSS` in `status` gives (a file
    /// the kernel takes several times as long to write), read without
    /// summing the per-CPU caches of its counters, so it may lag by up to
    /// `3 × max(32, 2 × CPUs)` pages per CPU: a few hundred KiB, against a
    /// VMM's tens of MiB. Billing reads the cgroup's counters, not this.
    pub fn read(pid: u32) -> io::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| malformed("stat"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime, stime and rss are fields 14, 15 and 24 of proc_pid_stat(5); `fields` starts at field 3.
        let field = |index: usize| fields.get(index).and_then(|value| value.parse::<u64>().ok()).ok_or_else(|| malformed("stat"));
        let cpu_ticks = field(11)? + field(12)?;
        let resident_pages = field(21)?;
        let (ticks_per_second, page_bytes) = *KERNEL_UNITS.get_or_init(kernel_units);
        Ok(Self { cpu_time_ns: cpu_ticks * (1_000_000_000 / ticks_per_second.max(1)), resident_bytes: resident_pages * page_bytes })
    }
}

/// One process's usage, read the cheap way for a figure asked often: its
/// CPU time from the kernel's per-process CPU clock (`clock_gettime`, in
/// nanoseconds, not the clock ticks of `/proc/<pid>/stat`) and its
/// resident set from `/proc/<pid>/statm`, kept open, with one `pread`.
/// The kernel writes `stat` line by line on every read, and it was half a
/// `GetVmInfo`'s cost. The descriptor is opened while the process runs and
/// fails with `ESRCH` once it is reaped, and it is read after the clock:
/// a reading that succeeds was therefore never of another process that
/// got the pid since.
#[derive(Debug)]
pub struct UsageReader {
    pid: u32,
    clock: nix::time::ClockId,
    statm: std::fs::File,
}

impl UsageReader {
    pub fn open(pid: u32) -> io::Result<Self> {
        let process = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?);
        let clock = nix::time::clock_getcpuclockid(process)?;
        Ok(Self { pid, clock, statm: std::fs::File::open(format!("/proc/{pid}/statm"))? })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's usage now.
    pub fn usage(&self) -> io::Result<ProcessUsage> {
        use std::os::unix::fs::FileExt;
        let cpu = nix::time::clock_gettime(self.clock)?;
        // Seven numbers of pages: size, resident, shared, text, lib, data, dirty.
        let mut buffer = [0u8; 256];
        let length = self.statm.read_at(&mut buffer, 0)?;
        let statm = std::str::from_utf8(&buffer[..length]).map_err(|_| malformed("statm"))?;
        let resident_pages: u64 = statm.split_whitespace().nth(1).and_then(|value| value.parse().ok()).ok_or_else(|| malformed("statm"))?;
        let (_, page_bytes) = *KERNEL_UNITS.get_or_init(kernel_units);
        let cpu_time_ns = u64::try_from(cpu.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(cpu.tv_nsec()).unwrap_or(0);
        Ok(ProcessUsage { cpu_time_ns, resident_bytes: resident_pages * page_bytes })
    }
}

/// Clock ticks per second and bytes per page: fixed for the life of the host.
static KERNEL_UNITS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

fn kernel_units() -> (u64, u64) {
    let value = |name, default| {
        nix::unistd::sysconf(name).ok().flatten().and_then(|value| u64::try_from(value).ok()).filter(|value| *value > 0).unwrap_or(default)
    };
    (value(nix::unistd::SysconfVar::CLK_TCK, 100), value(nix::unistd::SysconfVar::PAGE_SIZE, 4096))
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`): with the pid, what names one process for the life
/// of the host.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| malformed("stat"))?;
    // `after_name` starts at field 3.
    after_name.split_whitespace().nth(19).and_then(|value| value.parse().ok()).ok_or_else(|| malformed("stat"))
}

fn malformed(file: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/<pid>/{file} format"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_code_is_reported() {
        let process = Supervised::spawn(Command::new("sh").args(["-c", "exit 7"])).unwrap();
        assert_eq!(process.wait().await, ProcessExit::Exited { code: 7 });
        assert_eq!(process.wait().await.to_string(), "exited with code 7");
    }

    #[tokio::test]
    async fn a_kill_is_noticed_and_named() {
        let process = Supervised::spawn(Command::new("sleep").arg("30")).unwrap();
        assert_eq!(process.wait_timeout(Duration::from_millis(50)).await, None);
        let status = process.kill().await.unwrap();
        assert_eq!(status, ProcessExit::Killed { signal: libc::SIGKILL });
        assert_eq!(status.to_string(), "was killed by signal 9 (SIGKILL)");
        // A second kill of a reaped process is harmless.
        process.signal(Signal::SIGKILL).unwrap();
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let error = Supervised::spawn(&mut Command::new("/nonexistent/metald-test-binary")).unwrap_err();
        assert!(matches!(error, ProcessError::Spawn { .. }), "{error}");
    }

    #[tokio::test]
    async fn a_process_taken_over_is_checked_and_its_end_is_noticed() {
        let process = Supervised::spawn(Command::new("sleep").arg("30")).unwrap();
        let started = start_time(process.pid()).unwrap();
        let wrong = Supervised::take_over(process.pid(), started + 1).unwrap_err();
        assert!(matches!(wrong, ProcessError::NotTheSame { .. }), "{wrong}");
        let taken_over = Supervised::take_over(process.pid(), started).unwrap();
        assert_eq!(taken_over.exit_status(), None);
        taken_over.signal(Signal::SIGKILL).unwrap();
        assert_eq!(taken_over.wait_timeout(Duration::from_secs(5)).await, Some(ProcessExit::Unknown));
        assert_eq!(process.wait().await, ProcessExit::Killed { signal: libc::SIGKILL });
    }

    #[test]
    fn our_own_usage_can_be_read_and_its_resident_set_is_the_one_status_reports() {
        let vm_rss = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let kib = status.lines().find_map(|line| line.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim();
            kib.parse::<u64>().unwrap() * 1024
        };
        // Our resident set may move a little between the reads; it is
        // bracketed, give or take what the per-CPU caches of the kernel's
        // three resident counters (file, anon, shmem) may hold unsummed.
        let (before, usage, after) = (vm_rss(), ProcessUsage::read(std::process::id()).unwrap(), vm_rss());
        let cpus = std::thread::available_parallelism().map_or(64, usize::from) as u64;
        let slack = 3 * 32.max(2 * cpus) * cpus * 4096 + 64 * 4096;
        assert!(usage.resident_bytes > 0);
        assert!(
            usage.resident_bytes + slack >= before.min(after) && usage.resident_bytes <= before.max(after) + slack,
            "stat says {} bytes, status {before} then {after}",
            usage.resident_bytes
        );
    }

    #[tokio::test]
    async fn a_usage_reader_agrees_with_stat_and_reads_nothing_once_its_process_is_reaped() {
        let process = Supervised::spawn(Command::new("sleep").arg("30")).unwrap();
        let reader = UsageReader::open(process.pid()).unwrap();
        let (before, read, after) =
            (ProcessUsage::read(process.pid()).unwrap(), reader.usage().unwrap(), ProcessUsage::read(process.pid()).unwrap());
        // Its CPU time in clock ticks is rounded down, so the clock's is no less.
        assert!(read.resident_bytes > 0, "{read:?}");
        let tick = 1_000_000_000 / KERNEL_UNITS.get_or_init(kernel_units).0;
        assert!(
            read.cpu_time_ns + tick >= before.cpu_time_ns && read.cpu_time_ns <= after.cpu_time_ns + tick,
            "{before:?} {read:?} {after:?}"
        );
        process.kill().await.unwrap();
        let error = reader.usage().unwrap_err();
        // The clock of a reaped process is gone (EINVAL), and so is its statm (ESRCH).
        assert!(matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ESRCH)), "{error}");
    }
}
