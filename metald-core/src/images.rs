//! Keeps every file a VM boots from inside the operator's image root.
//!
//! A kernel, initrd or drive path is resolved against the root; `..`
//! components are refused outright, and after every symlink is followed the
//! file must still lie inside the root and be a regular file. Writable
//! drives are copied per VM (a reflink where the filesystem offers one,
//! otherwise a sparse copy) so that no two VMs ever write the same file.
//! Every accepted image is opened once, with `openat2(RESOLVE_BENEATH)`
//! from the root's own descriptor, and from then on used only through that
//! descriptor: a symlink swapped in after validation changes nothing.
//! This module does not decide where per-VM copies live; the caller does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image root {path} is not a usable folder")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{field}: {path:?} climbs out with '..', which is not allowed")]
    ParentComponent { field: String, path: String },
    #[error("{field}: {path:?} is outside the image root {root}")]
    OutsideRoot { field: String, path: String, root: PathBuf },
    #[error("{field}: {path:?} leads through a symlink to {target}, outside the image root {root}")]
    SymlinkEscape { field: String, path: String, target: PathBuf, root: PathBuf },
    #[error("{field}: {path:?} cannot be found in the image root")]
    Missing {
        field: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{field}: {path:?} is not a regular file")]
    NotAFile { field: String, path: String },
    /// A writable drive's image that not every user may read: its copy
    /// would hand its content to the VM's user.
    #[error("{field}: {path:?} is not readable by every user (mode {mode:o}); a writable drive's image must be world-readable")]
    NotShared { field: String, path: String, mode: u32 },
    #[error("{field}: {path:?} changed while it was being opened and now leads outside the image root")]
    ChangedUnderUs { field: String, path: String },
    #[error("{field}: cannot open {path:?}")]
    Open {
        field: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy drive image {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The folder every VM image must come from.
#[derive(Debug, Clone)]
pub struct ImageRoot {
    /// As configured, for lexical checks of absolute request paths.
    configured: PathBuf,
    /// With every symlink resolved, for the final containment check.
    canonical: PathBuf,
    /// The root folder itself, which every open starts from.
    dir: Arc<OwnedFd>,
}

/// An accepted image, open for reading. Use the descriptor, not the path:
/// the path only names it in messages and for an unjailed VMM.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub path: PathBuf,
    pub file: Arc<OwnedFd>,
    pub size: u64,
    /// Permission bits, to tell whether an unprivileged VMM may read it.
    pub mode: u32,
}

impl ImageFile {
    /// Whether any user may read it (a jailed VMM runs as a user of its own).
    pub fn world_readable(&self) -> bool {
        self.mode & 0o004 != 0
    }
}

impl ImageRoot {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let configured = root.into();
        let canonical = configured.canonicalize().map_err(|source| ImageError::Root { path: configured.clone(), source })?;
        if !canonical.is_dir() {
            let source = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
            return Err(ImageError::Root { path: configured, source });
        }
        let dir = nix::fcntl::open(&canonical, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
            .map_err(|errno| ImageError::Root { path: configured.clone(), source: errno.into() })?;
        Ok(Self { configured, canonical, dir: Arc::new(dir) })
    }

    /// Checks `requested` as [`ImageRoot::resolve`] does, then opens it
    /// beneath the root: the kernel refuses any path that leaves the root
    /// at the moment of opening, whatever changed since the check.
    pub fn open(&self, field: &str, requested: &str) -> Result<ImageFile, ImageError> {
        let path = self.resolve(field, requested)?;
        let relative = path.strip_prefix(&self.canonical).unwrap_or(&path);
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let file = match nix::fcntl::openat2(&*self.dir, relative, how) {
            Ok(file) => file,
            Err(nix::errno::Errno::EXDEV | nix::errno::Errno::ELOOP) => {
                return Err(ImageError::ChangedUnderUs { field: field.to_owned(), path: requested.to_owned() });
            }
            Err(errno) => return Err(ImageError::Open { field: field.to_owned(), path: requested.to_owned(), source: errno.into() }),
        };
        let metadata = File::from(file.try_clone().map_err(|source| ImageError::Open {
            field: field.to_owned(),
            path: requested.to_owned(),
            source,
        })?)
        .metadata()
        .map_err(|source| ImageError::Open { field: field.to_owned(), path: requested.to_owned(), source })?;
        if !metadata.is_file() {
            return Err(ImageError::NotAFile { field: field.to_owned(), path: requested.to_owned() });
        }
        Ok(ImageFile { path, file: Arc::new(file), size: metadata.len(), mode: metadata.mode() })
    }

    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// The real path of the regular file that `requested` names inside the
    /// root. `field` names the request field in errors.
    pub fn resolve(&self, field: &str, requested: &str) -> Result<PathBuf, ImageError> {
        let requested_path = Path::new(requested);
        if requested_path.components().any(|component| component == Component::ParentDir) {
            return Err(ImageError::ParentComponent { field: field.to_owned(), path: requested.to_owned() });
        }
        let joined = if requested_path.is_absolute() {
            if !requested_path.starts_with(&self.configured) && !requested_path.starts_with(&self.canonical) {
                return Err(ImageError::OutsideRoot { field: field.to_owned(), path: requested.to_owned(), root: self.canonical.clone() });
            }
            requested_path.to_path_buf()
        } else {
            self.canonical.join(requested_path)
        };
        let real =
            joined.canonicalize().map_err(|source| ImageError::Missing { field: field.to_owned(), path: requested.to_owned(), source })?;
        if !real.starts_with(&self.canonical) {
            return Err(ImageError::SymlinkEscape {
                field: field.to_owned(),
                path: requested.to_owned(),
                target: real,
                root: self.canonical.clone(),
            });
        }
        let metadata =
            real.metadata().map_err(|source| ImageError::Missing { field: field.to_owned(), path: requested.to_owned(), source })?;
        if !metadata.is_file() {
            return Err(ImageError::NotAFile { field: field.to_owned(), path: requested.to_owned() });
        }
        Ok(real)
    }
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Opens a per-VM copy made by [`copy_image`].
pub fn open_copy(field: &str, path: &Path) -> Result<ImageFile, ImageError> {
    let open_error = |source| ImageError::Open { field: field.to_owned(), path: path.display().to_string(), source };
    let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW).open(path).map_err(open_error)?;
    let metadata = file.metadata().map_err(open_error)?;
    Ok(ImageFile { path: path.to_path_buf(), file: Arc::new(file.into()), size: metadata.len(), mode: metadata.mode() })
}

/// Copies an opened image to `destination`, which must not exist yet:
/// a reflink when the filesystem can, otherwise a copy that keeps holes.
/// The copy is readable and writable by its owner only.
pub fn copy_image(source: &ImageFile, destination: &Path) -> Result<(), ImageError> {
    let copy_error =
        |source_error: io::Error| ImageError::Copy { from: source.path.clone(), to: destination.to_path_buf(), source: source_error };
    let input = File::from(source.file.try_clone().map_err(copy_error)?);
    let output =
        OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_CLOEXEC).open(destination).map_err(copy_error)?;
    let result = reflink(&input, &output).or_else(|_| sparse_copy(&input, &output));
    if let Err(error) = result {
        let _ = std::fs::remove_file(destination);
        return Err(copy_error(error));
    }
    Ok(())
}

fn reflink(input: &File, output: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument and touches no
    // memory of ours; both fds are open for the whole call.
    unsafe { ficlone(output.as_raw_fd(), input.as_raw_fd() as libc::c_ulong) }.map(drop).map_err(io::Error::from)
}

/// Copies only the data extents, so holes stay holes.
fn sparse_copy(input: &File, output: &File) -> io::Result<()> {
    use nix::unistd::{Whence, lseek};
    let length = input.metadata()?.len();
    let length_offset = i64::try_from(length).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let mut offset: i64 = 0;
    while offset < length_offset {
        let data_start = match lseek(input, offset, Whence::SeekData) {
            Ok(start) => start,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(errno) => return Err(errno.into()),
        };
        let data_end = lseek(input, data_start, Whence::SeekHole)?;
        copy_range(input, output, data_start, data_end)?;
        offset = data_end;
    }
    output.set_len(length)?;
    output.sync_all()
}

/// Copies bytes `start..end` in the kernel where it can; between file
/// systems of different types (an image root on one, the VMs' folders on
/// another) the kernel refuses that, and the bytes pass through a buffer.
fn copy_range(input: &File, output: &File, start: i64, end: i64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let shrank = || io::Error::new(io::ErrorKind::UnexpectedEof, "image shrank while it was copied");
    let (mut from, mut to) = (start, start);
    while from < end {
        let chunk = usize::try_from(end - from).unwrap_or(usize::MAX);
        match nix::fcntl::copy_file_range(input, Some(&mut from), output, Some(&mut to), chunk) {
            Ok(0) => return Err(shrank()),
            Ok(_) => {}
            Err(nix::errno::Errno::EXDEV | nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => break,
            Err(errno) => return Err(errno.into()),
        }
    }
    let mut buffer = vec![0u8; 1 << 20];
    while from < end {
        let wanted = usize::try_from(end - from).unwrap_or(usize::MAX).min(buffer.len());
        let position = u64::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let read = input.read_at(&mut buffer[..wanted], position)?;
        if read == 0 {
            return Err(shrank());
        }
        output.write_all_at(&buffer[..read], position)?;
        from += i64::try_from(read).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn root_with_kernel() -> (tempfile::TempDir, ImageRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kernels")).unwrap();
        std::fs::write(dir.path().join("kernels/vmlinux"), b"kernel").unwrap();
        let root = ImageRoot::new(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn relative_and_absolute_paths_inside_the_root_resolve() {
        let (dir, root) = root_with_kernel();
        let expected = dir.path().canonicalize().unwrap().join("kernels/vmlinux");
        assert_eq!(root.resolve("boot.kernel_path", "kernels/vmlinux").unwrap(), expected);
        let absolute = dir.path().join("kernels/vmlinux");
        assert_eq!(root.resolve("boot.kernel_path", absolute.to_str().unwrap()).unwrap(), expected);
    }

    #[test]
    fn parent_components_are_refused_even_when_they_stay_inside() {
        let (_dir, root) = root_with_kernel();
        let error = root.resolve("boot.kernel_path", "kernels/../kernels/vmlinux").unwrap_err();
        assert!(matches!(error, ImageError::ParentComponent { .. }), "{error}");
        let error = root.resolve("boot.kernel_path", "../../etc/passwd").unwrap_err();
        assert!(error.to_string().starts_with("boot.kernel_path: \"../../etc/passwd\" climbs out"), "{error}");
    }

    #[test]
    fn absolute_paths_outside_the_root_are_refused() {
        let (_dir, root) = root_with_kernel();
        let error = root.resolve("storage[0].path", "/etc/passwd").unwrap_err();
        assert!(matches!(error, ImageError::OutsideRoot { ref field, .. } if field == "storage[0].path"), "{error}");
    }

    #[test]
    fn a_symlink_leading_out_of_the_root_is_refused() {
        let (dir, root) = root_with_kernel();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        for path in ["escape", "etc/passwd"] {
            let error = root.resolve("boot.initrd_path", path).unwrap_err();
            assert!(matches!(error, ImageError::SymlinkEscape { ref target, .. } if target.starts_with("/etc")), "{error}");
        }
    }

    #[test]
    fn a_symlink_inside_the_root_is_followed() {
        let (dir, root) = root_with_kernel();
        std::os::unix::fs::symlink("kernels/vmlinux", dir.path().join("current")).unwrap();
        assert!(root.resolve("boot.kernel_path", "current").unwrap().ends_with("kernels/vmlinux"));
    }

    #[test]
    fn an_opened_image_keeps_its_content_when_the_path_is_swapped_afterwards() {
        let (dir, root) = root_with_kernel();
        let image = root.open("boot.kernel_path", "kernels/vmlinux").unwrap();
        std::fs::remove_file(dir.path().join("kernels/vmlinux")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("kernels/vmlinux")).unwrap();
        let mut content = String::new();
        io::Read::read_to_string(&mut File::from(image.file.try_clone().unwrap()), &mut content).unwrap();
        assert_eq!(content, "kernel");
        assert!(matches!(root.open("boot.kernel_path", "kernels/vmlinux").unwrap_err(), ImageError::SymlinkEscape { .. }));
    }

    #[test]
    fn folders_and_missing_files_are_refused() {
        let (_dir, root) = root_with_kernel();
        assert!(matches!(root.resolve("f", "kernels").unwrap_err(), ImageError::NotAFile { .. }));
        assert!(matches!(root.resolve("f", "nothing").unwrap_err(), ImageError::Missing { .. }));
    }

    #[test]
    fn a_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("disk.img");
        let mut file = File::create(&source).unwrap();
        file.write_all(b"head").unwrap();
        file.seek(SeekFrom::Start(64 << 20)).unwrap();
        file.write_all(b"tail").unwrap();
        drop(file);
        let copy = dir.path().join("copy.img");
        let image = ImageRoot::new(dir.path()).unwrap().open("storage[0].path", "disk.img").unwrap();
        assert_eq!(image.size, (64 << 20) + 4);
        copy_image(&image, &copy).unwrap();
        let (original, copied) = (std::fs::read(&source).unwrap(), std::fs::read(&copy).unwrap());
        assert_eq!(original, copied);
        let blocks = std::fs::metadata(&copy).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "the copy is not sparse: {blocks} blocks");
        assert!(matches!(copy_image(&image, &copy).unwrap_err(), ImageError::Copy { .. }), "an existing copy is never overwritten");
        assert_eq!(std::fs::metadata(&copy).unwrap().mode() & 0o777, 0o600);
    }
}
