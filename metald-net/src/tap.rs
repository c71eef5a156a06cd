//! TAP devices, made with the `TUNSETIFF` ioctl inside the VM's network
//! namespace (the kernel refuses to make them over rtnetlink), persistent,
//! and owned by the VMM's user so that a jailed VMM can open them.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::netns::{NetnsError, run_in};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot {action} TAP device {name}")]
    Io {
        action: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP device name {0:?} is longer than 15 bytes")]
    Name(String),
    #[error(transparent)]
    Namespace(#[from] NetnsError),
}

/// `struct ifreq` as `TUNSETIFF` reads it: a name and the flags.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, InterfaceRequest);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_group, libc::TUNSETGROUP);

fn request(name: &str, flags: libc::c_int) -> Result<InterfaceRequest, TapError> {
    if name.len() >= libc::IFNAMSIZ || name.is_empty() {
        return Err(TapError::Name(name.to_owned()));
    }
    let mut request = InterfaceRequest { name: [0; libc::IFNAMSIZ], flags: 0, _rest: [0; 22] };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    request.flags = libc::c_short::try_from(flags).map_err(|_| TapError::Io {
        action: "describe",
        name: name.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "TUN flags do not fit"),
    })?;
    Ok(request)
}

/// Opens (and creates, if it does not exist) TAP `name` in the current thread's namespace.
fn attach(name: &str, flags: libc::c_int) -> Result<OwnedFd, TapError> {
    let failed = |action: &'static str| move |source: io::Error| TapError::Io { action, name: name.to_owned(), source };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(failed("open /dev/net/tun for"))?;
    let request = request(name, flags)?;
    // SAFETY: TUNSETIFF reads a live, correctly sized ifreq from us.
    unsafe { tun_set_iff(tun.as_raw_fd(), &request) }.map_err(|errno| failed("attach to")(errno.into()))?;
    Ok(tun.into())
}

/// Creates persistent TAP `name` in `namespace`, owned by `owner` (uid, gid).
pub fn create(namespace: impl AsFd + Send, name: &str, owner: Option<(u32, u32)>) -> Result<(), TapError> {
    // Firecracker and Cloud Hypervisor open TAPs with a virtio-net header and no packet info.
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let made = run_in(namespace, || -> Result<(), TapError> {
        let tun = attach(name, flags)?;
        let failed =
            |action: &'static str| move |errno: nix::errno::Errno| TapError::Io { action, name: name.to_owned(), source: errno.into() };
        if let Some((uid, gid)) = owner {
            // SAFETY: TUNSETOWNER and TUNSETGROUP take integers by value.
            unsafe { tun_set_owner(tun.as_raw_fd(), uid as libc::c_int) }.map_err(failed("set the owner of"))?;
            // SAFETY: as above.
            unsafe { tun_set_group(tun.as_raw_fd(), gid as libc::c_int) }.map_err(failed("set the group of"))?;
        }
        // SAFETY: TUNSETPERSIST takes an integer by value.
        unsafe { tun_set_persist(tun.as_raw_fd(), 1) }.map_err(failed("make persistent"))?;
        Ok(())
    })?;
    made.map_err(|errno| TapError::Io { action: "enter the namespace of", name: name.to_owned(), source: errno.into() })?
}

/// Opens TAP `name` in `namespace` as its guest would: frames written to
/// the descriptor arrive on the TAP; frames the host sends can be read.
/// Without a virtio-net header, so frames are plain Ethernet.
pub fn open_as_guest(namespace: impl AsFd + Send, name: &str) -> Result<OwnedFd, TapError> {
    let opened = run_in(namespace, || attach(name, libc::IFF_TAP | libc::IFF_NO_PI))?;
    opened.map_err(|errno| TapError::Io { action: "enter the namespace of", name: name.to_owned(), source: errno.into() })?
}
