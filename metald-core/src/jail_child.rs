//! The jail's child: a process cloned into new mount, PID, IPC and UTS
//! namespaces that waits, inside its cgroup, for its orders (what to
//! mount where, which network namespace to join, which user to become,
//! what to exec), then confines itself and execs the VMM, which becomes
//! PID 1 of its namespace.
//!
//! The wait is what lets the jail pool ([`crate::jail_pool`]) make
//! children ahead of time: the clone and the move into a cgroup (which on
//! cgroup v1 waits for an RCU grace period) happen off a create's path, and
//! a create only sends the VM's orders.
//!
//! The child shares our memory until it execs (`CLONE_VM | CLONE_VFORK`,
//! as `posix_spawn` does), so a start costs the same however large metald
//! has grown. A copy of the daemon's memory (a plain fork) would copy its
//! page tables at the clone and tear them down at the exec: with 1000 VMs
//! held, that made every start ~10 ms slower on this kind of host. A
//! thread of ours is the child's parent: it blocks every signal, allocates
//! the child's stack and buffers, and stays parked in `clone` until the
//! child has exec'd or ended, so nothing else touches that memory while
//! the child runs and the thread's own state (its `errno`) is the child's
//! alone. The child only makes raw system calls on that memory: the orders
//! arrive as one message on a `SOCK_SEQPACKET` socket, into a buffer made
//! beforehand, with the descriptors they name (stdio, the network
//! namespace, a detached mount of each exposed file) passed along as
//! `SCM_RIGHTS`. A parent that closes the socket without sending orders
//! ends the child.

use std::ffi::OsStr;
use std::io;
use std::io::IoSlice;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::mman::{MapFlags, ProtFlags};
use nix::sys::resource::Resource;
use nix::sys::signal::SigSet;
use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use tokio::io::AsyncReadExt;

use crate::jailer::JailError;

const CHILD_STACK_BYTES: usize = 256 * 1024;
/// Below the child's stack, so an overflow faults instead of writing
/// over our heap; a multiple of every page size Linux uses.
const STACK_GUARD_BYTES: usize = 64 * 1024;
/// The parked parent thread only calls `clone`.
const PARENT_THREAD_STACK_BYTES: usize = 64 * 1024;
/// The largest orders message: paths and arguments of one VMM.
const MAX_ORDER_BYTES: usize = 64 * 1024;
const MAX_ARGS: usize = 256;
const MAX_BINDS: usize = 128;
/// stdin, stdout, stderr and the network namespace, then one per bind.
const FIXED_FDS: usize = 4;
const MAX_FDS: usize = FIXED_FDS + MAX_BINDS;
const HEADER_BYTES: usize = 64;
const MAGIC: u32 = 0x6d6a_6c31;
const HAS_NETNS: u32 = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Declares the steps once: the enum, and its decoding from the code the
/// child reports.
macro_rules! jail_steps {
    ($($(#[$doc:meta])* $step:ident),+ $(,)?) => {
        /// One step of the jail's child, named in errors.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum JailStep {
            $($(#[$doc])* $step),+
        }

        impl JailStep {
            fn from_code(code: u32) -> Option<Self> {
                [$(JailStep::$step),+].into_iter().find(|step| *step as u32 == code)
            }
        }
    };
}

jail_steps! {
    PrivateMounts,
    BindJailRoot,
    BindFile,
    JoinNetworkNamespace,
    SetHostname,
    PivotRoot,
    DetachOldRoot,
    SetRlimits,
    SetStdio,
    ResetSignals,
    DropGroups,
    SetGid,
    SetUid,
    NoNewPrivs,
    CloseFds,
    Exec,
    DieWithParent,
    CloseInherited,
    /// The orders did not arrive whole (too large, cut, or garbled).
    ReceiveOrders,
    /// Clearing the parent-death signal just before exec, so the VMM
    /// outlives metald also when it keeps root (a fixed identity of 0).
    OutliveParent,
}

/// The limits the child sets on itself before it drops root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildLimits {
    pub open_files: u64,
    pub file_size: u64,
    pub processes: u64,
}

/// What the child is to do, written by the parent, before it is sent.
#[derive(Debug)]
pub(crate) struct OrderSheet<'a> {
    /// The jail folder, which becomes the VMM's `/`.
    pub root: &'a Path,
    pub hostname: &'a str,
    /// The program's path inside the jail, also `argv[0]`.
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    /// A detached mount and where it goes (a host path under `root`).
    pub binds: Vec<(BorrowedFd<'a>, PathBuf)>,
    /// Each bind's name in the jail and path on the host, for errors.
    pub bind_names: Vec<(String, PathBuf)>,
    pub netns: Option<BorrowedFd<'a>>,
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    pub uid: u32,
    pub gid: u32,
    pub limits: ChildLimits,
}

/// Orders encoded for the wire, and what errors about them name.
#[derive(Debug)]
pub(crate) struct Orders<'a> {
    message: Vec<u8>,
    fds: Vec<BorrowedFd<'a>>,
    bind_names: Vec<(String, PathBuf)>,
    bind_targets: Vec<PathBuf>,
    program: PathBuf,
}

fn refused(path: &Path, reason: &str) -> JailError {
    JailError::Prepare { path: path.to_path_buf(), source: io::Error::new(io::ErrorKind::InvalidInput, reason.to_owned()) }
}

impl<'a> Orders<'a> {
    /// Encodes `sheet`: a 64-byte header, one offset per string, then the
    /// strings, each ending in NUL. Refused when it holds a NUL byte or is
    /// larger than the child can take.
    pub(crate) fn encode(sheet: OrderSheet<'a>) -> Result<Self, JailError> {
        if sheet.args.len() + 1 > MAX_ARGS {
            return Err(refused(&sheet.program, "the VMM's command line has too many arguments for the jail"));
        }
        if sheet.binds.len() > MAX_BINDS {
            return Err(refused(sheet.root, "too many files to expose in one jail"));
        }
        let mut strings: Vec<&[u8]> =
            vec![sheet.root.as_os_str().as_bytes(), sheet.hostname.as_bytes(), sheet.program.as_os_str().as_bytes()];
        strings.push(sheet.program.as_os_str().as_bytes());
        strings.extend(sheet.args.iter().map(|arg| arg.as_bytes()));
        strings.extend(sheet.binds.iter().map(|(_, target)| target.as_os_str().as_bytes()));
        if let Some(with_nul) = strings.iter().find(|bytes| bytes.contains(&0)) {
            return Err(refused(Path::new(OsStr::from_bytes(with_nul)), "holds a NUL byte"));
        }
        let offsets_end = HEADER_BYTES + 4 * strings.len();
        let total = offsets_end + strings.iter().map(|bytes| bytes.len() + 1).sum::<usize>();
        if total > MAX_ORDER_BYTES {
            return Err(refused(sheet.root, "the jail's paths and arguments are too long for the jail"));
        }
        let as_u32 = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        let mut message = Vec::with_capacity(total);
        let header: [u32; 4] = [MAGIC, sheet.uid, sheet.gid, if sheet.netns.is_some() { HAS_NETNS } else { 0 }];
        header.iter().for_each(|word| message.extend_from_slice(&word.to_le_bytes()));
        for limit in [sheet.limits.open_files, sheet.limits.file_size, sheet.limits.processes] {
            message.extend_from_slice(&limit.to_le_bytes());
        }
        // argv counts the program as argv[0].
        for count in [sheet.args.len() + 1, sheet.binds.len()] {
            message.extend_from_slice(&as_u32(count).to_le_bytes());
        }
        message.resize(HEADER_BYTES, 0);
        let mut at = offsets_end;
        for bytes in &strings {
            message.extend_from_slice(&as_u32(at).to_le_bytes());
            at += bytes.len() + 1;
        }
        for bytes in &strings {
            message.extend_from_slice(bytes);
            message.push(0);
        }
        let mut fds = vec![sheet.stdin, sheet.stdout, sheet.stderr];
        // The slot of the namespace is always there, so binds start at a fixed index.
        fds.push(sheet.netns.unwrap_or(sheet.stdin));
        fds.extend(sheet.binds.iter().map(|(tree, _)| *tree));
        Ok(Self {
            message,
            fds,
            bind_names: sheet.bind_names,
            bind_targets: sheet.binds.into_iter().map(|(_, target)| target).collect(),
            program: sheet.program,
        })
    }
}

/// A child cloned into its namespaces, waiting for its orders.
#[derive(Debug)]
pub(crate) struct WaitingChild {
    pid: u32,
    channel: OwnedFd,
    reports: OwnedFd,
    /// The thread parked in `clone` until the child execs or ends.
    parent: Option<JoinHandle<Result<i32, Errno>>>,
}

/// Our ends of a child that has its orders: the pipe it reports a failed step on.
#[derive(Debug)]
pub(crate) struct OrderedChild {
    reports: OwnedFd,
}

/// Descriptors the child uses to talk to us.
#[derive(Debug, Clone, Copy)]
struct ChildFds {
    channel: RawFd,
    reports: RawFd,
}

/// Memory the child writes into, allocated before the clone.
struct ChildMemory {
    message: Vec<u8>,
    control: Vec<u8>,
    argv: Vec<*const libc::c_char>,
    binds: Vec<(RawFd, *const libc::c_char)>,
    fds: Vec<RawFd>,
}

impl ChildMemory {
    fn new() -> Self {
        let fd_bytes = libc::c_uint::try_from(MAX_FDS * size_of::<RawFd>()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: CMSG_SPACE computes a size from an integer; it reads no memory.
        let control = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        Self {
            message: vec![0; MAX_ORDER_BYTES],
            control: vec![0; control],
            argv: vec![std::ptr::null(); MAX_ARGS + 1],
            binds: vec![(-1, std::ptr::null()); MAX_BINDS],
            fds: vec![-1; MAX_FDS],
        }
    }
}

/// What the child starts with: a pointer to it is `clone`'s argument.
struct ChildStart<'m> {
    memory: &'m mut ChildMemory,
    fds: ChildFds,
}

/// The child's stack, in our memory, with a guard below it.
struct ChildStack {
    base: NonNull<libc::c_void>,
    length: usize,
}

impl ChildStack {
    fn new() -> Result<Self, Errno> {
        let length = CHILD_STACK_BYTES + STACK_GUARD_BYTES;
        let size = NonZeroUsize::new(length).ok_or(Errno::EINVAL)?;
        // SAFETY: a new private anonymous mapping; no memory we use changes.
        let base = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_STACK,
            )
        }?;
        let stack = Self { base, length };
        // SAFETY: the lowest bytes of the mapping just made, which nothing uses yet.
        unsafe { nix::sys::mman::mprotect(base, STACK_GUARD_BYTES, ProtFlags::PROT_NONE) }?;
        Ok(stack)
    }

    /// Where the stack starts (it grows down): the mapping's end, page aligned.
    fn top(&self) -> *mut libc::c_void {
        self.base.as_ptr().wrapping_byte_add(self.length)
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; it is dropped only after `clone` returned,
        // when the child has exec'd into memory of its own or has ended.
        let _ = unsafe { nix::sys::mman::munmap(self.base, self.length) };
    }
}

impl WaitingChild {
    /// Clones a child into new mount, PID, IPC and UTS namespaces. It dies
    /// with metald until it execs, closes every descriptor it inherited but
    /// its two to us, tells us it waits, and waits for orders.
    pub(crate) fn clone_waiting() -> Result<Self, JailError> {
        let (channel, theirs) = nix::sys::socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|errno| JailError::Handshake(errno.into()))?;
        let (reports, report_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| JailError::Handshake(errno.into()))?;
        let pid = Arc::new(AtomicI32::new(0));
        let pid_slot = Arc::clone(&pid);
        let parent = std::thread::Builder::new()
            .name("metald-jail-child".into())
            .stack_size(PARENT_THREAD_STACK_BYTES)
            .spawn(move || {
                let fds = ChildFds { channel: theirs.as_raw_fd(), reports: report_write.as_raw_fd() };
                let cloned = clone_and_park(fds, &pid_slot);
                // The child's copies closed at its exec or its end; ours now,
                // so that our ends see the child go.
                drop((theirs, report_write));
                cloned
            })
            .map_err(|source| JailError::Thread { name: "jail child", source })?;
        let mut hello = [0u8; 1];
        let heard = loop {
            match nix::sys::socket::recv(channel.as_raw_fd(), &mut hello, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                heard => break heard,
            }
        };
        if heard == Ok(1) {
            // Written by the kernel before the child ran, so before its hello.
            let pid = pid.load(Ordering::Acquire).unsigned_abs();
            return Ok(Self { pid, channel, reports, parent: Some(parent) });
        }
        // The child was never cloned, or ended before it waited; with our
        // end closed, a child that still runs ends too, so the join returns.
        drop(channel);
        match parent.join() {
            Ok(Err(errno)) => Err(JailError::Clone(errno)),
            Ok(Ok(pid)) => {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                let mut report = Vec::with_capacity(REPORT_BYTES);
                io::Read::read_to_end(&mut std::fs::File::from(reports), &mut report).map_err(JailError::Handshake)?;
                Err(Report::decode(&report).map(|report| report.error(None)).unwrap_or_else(|| {
                    JailError::Handshake(io::Error::new(io::ErrorKind::UnexpectedEof, "the child ended before it waited"))
                }))
            }
            Err(_) => Err(JailError::Handshake(io::Error::other("the thread the child is cloned from panicked"))),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the child still waits (it has not ended).
    pub(crate) fn is_waiting(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else { return false };
        let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOHANG | nix::sys::wait::WaitPidFlag::WNOWAIT;
        matches!(
            nix::sys::wait::waitid(nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(pid)), flags),
            Ok(nix::sys::wait::WaitStatus::StillAlive)
        )
    }

    /// Sends the orders in one message; the child then confines itself
    /// and execs. Fails when the child has gone.
    pub(crate) fn send(self, orders: &Orders<'_>) -> Result<OrderedChild, JailError> {
        let fds: Vec<RawFd> = orders.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = nix::sys::socket::sendmsg::<()>(
            self.channel.as_raw_fd(),
            &[IoSlice::new(&orders.message)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|errno| JailError::Handshake(errno.into()))?;
        if sent != orders.message.len() {
            return Err(JailError::Handshake(io::Error::new(io::ErrorKind::WriteZero, "the orders went out cut")));
        }
        // The parked thread ends by itself once the child has exec'd.
        Ok(OrderedChild { reports: self.reports })
    }

    /// Ends a child that will get no orders, reaps it, and waits for the
    /// thread it was cloned from. Blocks until both have gone, which is at
    /// once: the child is killed.
    pub(crate) fn discard(mut self) {
        let Ok(pid) = i32::try_from(self.pid) else { return };
        let pid = nix::unistd::Pid::from_raw(pid);
        // Our unreaped child: the pid cannot name another process.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        if let Some(parent) = self.parent.take() {
            let _ = parent.join();
        }
    }
}

/// Runs on the parent thread: clones the child onto a stack of its own in
/// our memory and stays in `clone` until the child has exec'd or ended.
fn clone_and_park(fds: ChildFds, pid_slot: &AtomicI32) -> Result<i32, Errno> {
    // No signal for metald waits on a thread parked here, and the child
    // starts with every signal blocked (it clears its mask before exec).
    SigSet::all().thread_block()?;
    let stack = ChildStack::new()?;
    let mut memory = ChildMemory::new();
    let mut start = ChildStart { memory: &mut memory, fds };
    let flags = libc::CLONE_VM
        | libc::CLONE_VFORK
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::SIGCHLD;
    // SAFETY: the child runs `child_main` on `stack`, a mapping of its own
    // with a guard page, and touches only `start` and the memory it points
    // at, all of which live in this frame until `clone` returns; with
    // CLONE_VFORK that is after the child has exec'd (into memory of its
    // own) or ended, and this thread does nothing meanwhile. The kernel
    // writes the child's pid to `pid_slot` (CLONE_PARENT_SETTID), an
    // atomic that outlives the call.
    let pid = unsafe { libc::clone(child_main, stack.top(), flags, (&raw mut start).cast(), pid_slot.as_ptr()) };
    Errno::result(pid)
}

extern "C" fn child_main(start: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `start` is the `ChildStart` of `clone_and_park`, live and
    // touched by no one else until this child has exec'd or ended.
    let start = unsafe { &mut *start.cast::<ChildStart<'_>>() };
    wait_then_exec(start.memory, start.fds)
}

/// Bytes of a failure report: the step, the errno, an index.
const REPORT_BYTES: usize = 12;

/// A step the child reports as failed.
struct Report {
    step: JailStep,
    errno: i32,
    index: usize,
}

impl Report {
    fn encode(step: JailStep, errno: i32, index: u32) -> [u8; REPORT_BYTES] {
        let mut report = [0u8; REPORT_BYTES];
        report[..4].copy_from_slice(&(step as u32).to_le_bytes());
        report[4..8].copy_from_slice(&errno.to_le_bytes());
        report[8..].copy_from_slice(&index.to_le_bytes());
        report
    }

    fn decode(report: &[u8]) -> Option<Self> {
        let word = |at: usize| report.get(at..at + 4).and_then(|bytes| bytes.try_into().ok()).map(u32::from_le_bytes);
        Some(Self {
            step: word(0).and_then(JailStep::from_code)?,
            errno: word(4).map(|value| value as i32).unwrap_or(0),
            index: word(8).and_then(|value| usize::try_from(value).ok()).unwrap_or(0),
        })
    }

    /// The error, naming what `orders` (when they were sent) say about the step.
    fn error(self, orders: Option<&Orders<'_>>) -> JailError {
        if self.step == JailStep::BindFile
            && self.errno == libc::ENOENT
            && let Some((name, path)) = orders.and_then(|orders| orders.bind_names.get(self.index))
        {
            // An unlinked file cannot be mounted: it was replaced after we opened it.
            return JailError::ExposureGone { name: name.clone(), path: path.clone() };
        }
        let detail = orders.and_then(|orders| match self.step {
            JailStep::BindFile => orders.bind_targets.get(self.index).map(|target| target.to_string_lossy().into_owned()),
            JailStep::Exec => Some(orders.program.to_string_lossy().into_owned()),
            _ => None,
        });
        JailError::Child { step: self.step, detail, source: io::Error::from_raw_os_error(self.errno) }
    }
}

impl OrderedChild {
    /// Waits for the child to exec (its report pipe closes without a word)
    /// or to report the step that failed.
    pub(crate) async fn outcome(self, orders: &Orders<'_>) -> Result<(), JailError> {
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(self.reports).map_err(JailError::Handshake)?;
        let mut report = Vec::with_capacity(REPORT_BYTES);
        pipe.read_to_end(&mut report).await.map_err(JailError::Handshake)?;
        if report.is_empty() {
            return Ok(());
        }
        let report =
            Report::decode(&report).ok_or_else(|| JailError::Handshake(io::Error::new(io::ErrorKind::InvalidData, "garbled report")))?;
        Err(report.error(Some(orders)))
    }
}

/// Closes every descriptor above 2 but `kept` (sorted). System calls only.
fn close_inherited(kept: &[RawFd]) -> Result<(), Errno> {
    let mut next: libc::c_uint = 3;
    for fd in kept.iter().filter_map(|fd| libc::c_uint::try_from(*fd).ok()) {
        if fd > next {
            // SAFETY: closes descriptors of this process only; integer arguments.
            if unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0 as libc::c_uint) } != 0 {
                return Err(Errno::last());
            }
        }
        next = fd.saturating_add(1);
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_close_range, next, libc::c_uint::MAX, 0 as libc::c_uint) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Reports a failed step to the parent and ends the child.
fn child_failed(fds: ChildFds, step: JailStep, errno: i32, index: u32) -> libc::c_int {
    let report = Report::encode(step, errno, index);
    // SAFETY: writes the report from a live stack buffer to our own pipe.
    unsafe { libc::write(fds.reports, report.as_ptr().cast(), report.len()) };
    127
}

/// The orders as the child reads them: pointers into its message buffer.
struct Received<'m> {
    uid: u32,
    gid: u32,
    rlimits: [(Resource, u64); 3],
    root: &'m std::ffi::CStr,
    hostname: &'m [u8],
    program: &'m std::ffi::CStr,
    argv: *const *const libc::c_char,
    binds: &'m [(RawFd, *const libc::c_char)],
    netns: Option<RawFd>,
    stdio: [RawFd; 3],
}

/// Reads the orders: one message and its descriptors. `None` when the
/// parent closed the socket without sending any. System calls only.
fn receive(memory: &mut ChildMemory, channel: RawFd) -> Result<Option<Received<'_>>, Errno> {
    let mut iov = libc::iovec { iov_base: memory.message.as_mut_ptr().cast(), iov_len: memory.message.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid value for it.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = memory.control.as_mut_ptr().cast();
    header.msg_controllen = memory.control.len() as _;
    // SAFETY: recvmsg writes into the message and control buffers `header`
    // points at, both live and as long as `header` says.
    let length = unsafe { libc::recvmsg(channel, &mut header, libc::MSG_CMSG_CLOEXEC) };
    if length < 0 {
        return Err(Errno::last());
    }
    let length = length.unsigned_abs();
    if length == 0 {
        return Ok(None);
    }
    if header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(Errno::EMSGSIZE);
    }
    let mut fd_count = 0;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within the length it set.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for index in 0..bytes / size_of::<RawFd>() {
                    if fd_count < memory.fds.len() {
                        memory.fds[fd_count] = data.add(index).read_unaligned();
                        fd_count += 1;
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    parse(memory, length, fd_count).map(Some).ok_or(Errno::EBADMSG)
}

/// The orders in `memory.message[..length]`, checked: every offset in
/// the message, every string ending in NUL, as many descriptors as named.
fn parse(memory: &mut ChildMemory, length: usize, fd_count: usize) -> Option<Received<'_>> {
    let message = memory.message.get(..length)?;
    if *message.last()? != 0 {
        return None;
    }
    let u32_at = |at: usize| Some(u32::from_le_bytes(message.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(message.get(at..at + 8)?.try_into().ok()?));
    if u32_at(0)? != MAGIC {
        return None;
    }
    let (args, binds) = (usize::try_from(u32_at(40)?).ok()?, usize::try_from(u32_at(44)?).ok()?);
    if args == 0 || args > MAX_ARGS || binds > MAX_BINDS || fd_count != FIXED_FDS + binds {
        return None;
    }
    // Since the message ends in NUL, a string at any offset inside it ends there at the latest.
    let string_at = |index: usize| -> Option<*const libc::c_char> {
        let offset = usize::try_from(u32_at(HEADER_BYTES + 4 * index)?).ok()?;
        (offset < length).then(|| message[offset..].as_ptr().cast())
    };
    for index in 0..args {
        memory.argv[index] = string_at(3 + index)?;
    }
    memory.argv[args] = std::ptr::null();
    for index in 0..binds {
        memory.binds[index] = (memory.fds[FIXED_FDS + index], string_at(3 + args + index)?);
    }
    // SAFETY: each pointer is into `message`, which outlives the result, and ends at a NUL inside it.
    let c_str = |pointer: *const libc::c_char| unsafe { std::ffi::CStr::from_ptr(pointer) };
    Some(Received {
        uid: u32_at(4)?,
        gid: u32_at(8)?,
        rlimits: [(Resource::RLIMIT_NOFILE, u64_at(16)?), (Resource::RLIMIT_FSIZE, u64_at(24)?), (Resource::RLIMIT_NPROC, u64_at(32)?)],
        root: c_str(string_at(0)?),
        hostname: c_str(string_at(1)?).to_bytes(),
        program: c_str(string_at(2)?),
        argv: memory.argv.as_ptr(),
        binds: &memory.binds[..binds],
        netns: (u32_at(12)? & HAS_NETNS != 0).then_some(memory.fds[3]),
        stdio: [memory.fds[0], memory.fds[1], memory.fds[2]],
    })
}

/// The child between `clone` and `exec`. System calls only.
fn wait_then_exec(memory: &mut ChildMemory, fds: ChildFds) -> libc::c_int {
    let fail = |step: JailStep, errno: Errno| child_failed(fds, step, errno as i32, 0);

    // Until just before exec, the child dies with the thread it was cloned
    // from, which is parked until then and dies with metald; the VMM must
    // outlive metald, which takes it over when it starts again.
    if let Err(errno) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        return fail(JailStep::DieWithParent, errno);
    }
    // Among them our copy of the parent's end of the socket: closed before
    // the hello, a parent that died before the prctl above shows as its end.
    let mut kept = [fds.channel, fds.reports];
    kept.sort_unstable();
    if let Err(errno) = close_inherited(&kept) {
        return fail(JailStep::CloseInherited, errno);
    }
    // The parent learns our pid only when we say we wait.
    if nix::sys::socket::send(fds.channel, &[1], MsgFlags::MSG_NOSIGNAL).is_err() {
        return 0;
    }
    let orders = match receive(memory, fds.channel) {
        Ok(Some(orders)) => orders,
        // No orders: the parent gave this child up.
        Ok(None) => return 0,
        Err(errno) => return fail(JailStep::ReceiveOrders, errno),
    };
    confine_and_exec(&orders, fds)
}

fn confine_and_exec(orders: &Received<'_>, fds: ChildFds) -> libc::c_int {
    let fail = |step: JailStep, errno: Errno| child_failed(fds, step, errno as i32, 0);
    let none: Option<&std::ffi::CStr> = None;
    if let Err(errno) = nix::mount::mount(none, c"/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none) {
        return fail(JailStep::PrivateMounts, errno);
    }
    if let Err(errno) = nix::mount::mount(Some(orders.root), orders.root, none, MsFlags::MS_BIND, none) {
        return fail(JailStep::BindJailRoot, errno);
    }
    for (index, (tree, target)) in orders.binds.iter().enumerate() {
        // SAFETY: attaches a detached mount we were given at a path inside
        // the orders' buffer; the empty path is a static C string.
        let moved = unsafe { libc::syscall(libc::SYS_move_mount, *tree, c"".as_ptr(), libc::AT_FDCWD, *target, MOVE_MOUNT_F_EMPTY_PATH) };
        if moved != 0 {
            return child_failed(fds, JailStep::BindFile, Errno::last() as i32, u32::try_from(index).unwrap_or(u32::MAX));
        }
    }
    if let Some(netns) = orders.netns {
        // SAFETY: the descriptor came with the orders and stays open until exec.
        let netns = unsafe { BorrowedFd::borrow_raw(netns) };
        if let Err(errno) = nix::sched::setns(netns, CloneFlags::CLONE_NEWNET) {
            return fail(JailStep::JoinNetworkNamespace, errno);
        }
    }
    if let Err(errno) = nix::unistd::sethostname(OsStr::from_bytes(orders.hostname)) {
        return fail(JailStep::SetHostname, errno);
    }
    if let Err(errno) = nix::unistd::chdir(orders.root).and_then(|()| nix::unistd::pivot_root(c".", c".")) {
        return fail(JailStep::PivotRoot, errno);
    }
    if let Err(errno) = nix::mount::umount2(c".", MntFlags::MNT_DETACH).and_then(|()| nix::unistd::chdir(c"/")) {
        return fail(JailStep::DetachOldRoot, errno);
    }
    for (resource, limit) in orders.rlimits {
        if let Err(errno) = nix::sys::resource::setrlimit(resource, limit, limit) {
            return fail(JailStep::SetRlimits, errno);
        }
    }
    for (from, to) in orders.stdio.into_iter().zip(0..) {
        // SAFETY: dup2 on descriptors we own; no memory is involved.
        if unsafe { libc::dup2(from, to) } < 0 {
            return fail(JailStep::SetStdio, Errno::last());
        }
    }
    // Rust ignores SIGPIPE and an ignored signal would stay ignored across exec.
    // SAFETY: resets one disposition to its default and clears the mask; no handler code runs.
    let reset = unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
            || libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
    };
    if reset {
        return fail(JailStep::ResetSignals, Errno::last());
    }
    // Credentials change through raw system calls: glibc's wrappers would
    // signal every thread of metald, whose memory we share, to change theirs.
    // SAFETY: setgroups with an empty list reads no memory.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
        return fail(JailStep::DropGroups, Errno::last());
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresgid, orders.gid, orders.gid, orders.gid) } != 0 {
        return fail(JailStep::SetGid, Errno::last());
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setresuid, orders.uid, orders.uid, orders.uid) } != 0 {
        return fail(JailStep::SetUid, Errno::last());
    }
    if let Err(errno) = nix::sys::prctl::set_no_new_privs() {
        return fail(JailStep::NoNewPrivs, errno);
    }
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: marks descriptors close-on-exec; integer arguments only.
    if unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) } != 0 {
        return fail(JailStep::CloseFds, Errno::last());
    }
    if let Err(errno) = nix::sys::prctl::set_pdeathsig(None) {
        return fail(JailStep::OutliveParent, errno);
    }
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv is a NULL-terminated array of pointers to C strings in
    // the orders' buffer, envp an empty one; both outlive this call.
    unsafe { libc::execve(orders.program.as_ptr(), orders.argv, envp.as_ptr()) };
    fail(JailStep::Exec, Errno::last())
}
