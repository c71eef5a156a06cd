//! A disk that stops answering, as a FUSE file system of image files:
//! every read of them waits until the test lets it go, which makes "a copy
//! of a drive is in progress" a state a test holds for as long as it needs,
//! whatever the speed of the host's real disks. Readers of one file wait on
//! one read (they share its cached pages), so give each copy its own image.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
};

/// The name of the `index`th image in the mounted folder.
pub fn image(index: usize) -> String {
    format!("disk-{index}.img")
}

/// Image `index` is inode 2 + index.
fn image_index(ino: INodeNo) -> Option<u64> {
    ino.0.checked_sub(2)
}
const TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Reads {
    released: bool,
    /// Reads not yet answered, with the image they read.
    waiting: Vec<(INodeNo, u64, u32, ReplyData)>,
}

struct StuckFs {
    images: u64,
    size: u64,
    reads: Arc<Mutex<Reads>>,
    next_handle: std::sync::atomic::AtomicU64,
}

fn attr(ino: INodeNo, kind: FileType, size: u64, perm: u16) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

/// The image's bytes: a pattern, so a copy that went wrong shows.
fn content(offset: u64, size: u32, image_size: u64) -> Vec<u8> {
    let end = (offset + u64::from(size)).min(image_size);
    (offset..end.max(offset)).map(|at| (at % 251) as u8).collect()
}

impl Filesystem for StuckFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let index = name.to_str().and_then(|name| name.strip_prefix("disk-")?.strip_suffix(".img")?.parse::<u64>().ok());
        if let Some(index) = index.filter(|index| parent == INodeNo::ROOT && *index < self.images) {
            reply.entry(&TTL, &attr(INodeNo(2 + index), FileType::RegularFile, self.size, 0o644), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&TTL, &attr(INodeNo::ROOT, FileType::Directory, 0, 0o755));
        } else if image_index(ino).is_some_and(|index| index < self.images) {
            reply.attr(&TTL, &attr(ino, FileType::RegularFile, self.size, 0o644));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let handle = self.next_handle.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        reply.opened(FileHandle(handle), fuser::FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reads = self.reads.lock().unwrap();
        if reads.released {
            drop(reads);
            reply.data(&content(offset, size, self.size));
        } else {
            reads.waiting.push((ino, offset, size, reply));
        }
    }
}

/// A mounted stuck disk; dropping it answers what waits and unmounts it.
pub struct StuckDisk {
    mountpoint: PathBuf,
    reads: Arc<Mutex<Reads>>,
    size: u64,
    session: Option<fuser::BackgroundSession>,
}

impl StuckDisk {
    /// Mounts `images` images of `size` bytes each at `mountpoint` (made if missing).
    pub fn mount(mountpoint: &Path, images: usize, size: u64) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let reads = Arc::new(Mutex::new(Reads::default()));
        let fs = StuckFs { images: images as u64, size, reads: Arc::clone(&reads), next_handle: std::sync::atomic::AtomicU64::new(1) };
        let mut config = fuser::Config::default();
        config.mount_options.extend([fuser::MountOption::RO, fuser::MountOption::FSName("metald-test-stuck".into())]);
        config.acl = fuser::SessionACL::All;
        let session = fuser::spawn_mount(fs, mountpoint, &config).unwrap();
        Self { mountpoint: mountpoint.to_path_buf(), reads, size, session: Some(session) }
    }

    /// How many images have a read waiting.
    pub fn stuck_images(&self) -> usize {
        let reads = self.reads.lock().unwrap();
        let mut handles: Vec<u64> = reads.waiting.iter().map(|(ino, ..)| ino.0).collect();
        handles.sort_unstable();
        handles.dedup();
        handles.len()
    }

    /// Answers every waiting read and every read from now on.
    pub fn release(&self) {
        let waiting = {
            let mut reads = self.reads.lock().unwrap();
            reads.released = true;
            std::mem::take(&mut reads.waiting)
        };
        for (_, offset, size, reply) in waiting {
            reply.data(&content(offset, size, self.size));
        }
    }
}

impl Drop for StuckDisk {
    fn drop(&mut self) {
        self.release();
        drop(self.session.take());
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
    }
}
