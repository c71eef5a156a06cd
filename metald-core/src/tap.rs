//! Opening a TAP device by name with the `TUNSETIFF` ioctl, in the current
//! thread's network namespace or, on a thread of its own, in a VM's. The
//! network provider makes TAPs with it; a backend whose VMM cannot bring
//! a TAP up itself (Cloud Hypervisor in the jail) opens it here and hands
//! the descriptor over.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Flags of a TAP the VMMs use: a virtio-net header and no packet info.
pub const VMM_TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// `struct ifreq` as `TUNSETIFF` reads it: a name and the flags.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, InterfaceRequest);

/// Opens (and creates, if it does not exist) TAP `name` in the current thread's namespace.
pub fn attach(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("TAP device name {name:?} is not 1 to 15 bytes")));
    }
    let flags = libc::c_short::try_from(flags).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "TUN flags do not fit"))?;
    let tun = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun")?;
    let mut request = InterfaceRequest { name: [0; libc::IFNAMSIZ], flags, _rest: [0; 22] };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a live, correctly sized ifreq from us.
    unsafe { tun_set_iff(tun.as_raw_fd(), &request) }?;
    Ok(tun.into())
}

/// Opens TAP `name` in `namespace` (this thread's when `None`), on a
/// thread of its own that joins it, so no other thread changes namespace.
pub fn open_in(namespace: Option<&OwnedFd>, name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let Some(namespace) = namespace else { return attach(name, flags) };
    let namespace = namespace.as_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)?;
                attach(name, flags)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread opening the TAP panicked")))
    })
}
