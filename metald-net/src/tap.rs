//! TAP devices, made with the `TUNSETIFF` ioctl inside the VM's network
//! namespace (the kernel refuses to make them over rtnetlink), persistent,
//! and owned by the VMM's user so that a jailed VMM can open them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

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

nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_group, libc::TUNSETGROUP);

/// Opens (and creates, if it does not exist) TAP `name` in the current thread's namespace.
fn attach(name: &str, flags: libc::c_int) -> Result<OwnedFd, TapError> {
    if name.len() >= libc::IFNAMSIZ || name.is_empty() {
        return Err(TapError::Name(name.to_owned()));
    }
    metald_core::tap::attach(name, flags).map_err(|source| TapError::Io { action: "attach to", name: name.to_owned(), source })
}

/// Creates persistent TAP `name` in `namespace`, owned by `owner` (uid, gid).
pub fn create(namespace: impl AsFd + Send, name: &str, owner: Option<(u32, u32)>) -> Result<(), TapError> {
    let flags = metald_core::tap::VMM_TAP_FLAGS;
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
