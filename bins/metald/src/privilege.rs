//! The capabilities metald keeps. It runs as root to build jails and
//! networks, but uses only some of root's powers; at start, before any
//! thread is made (capabilities are per thread and inherited), it drops
//! every other from its bounding set (so no program it starts can regain
//! them) and from its effective, permitted and inheritable sets, and
//! clears the ambient set. What each kept one is for:
//!
//! | capability | used for |
//! |---|---|
//! | `CAP_SYS_ADMIN` | mounts and `pivot_root` in a jail, network namespaces (`setns`, `unshare`), cgroups |
//! | `CAP_SYS_CHROOT` | the jail's root |
//! | `CAP_MKNOD` | `/dev/kvm`, `/dev/net/tun` and the like inside a jail |
//! | `CAP_SETUID`, `CAP_SETGID` | a VMM's own uid and gid |
//! | `CAP_CHOWN`, `CAP_FOWNER`, `CAP_FSETID` | a jail's files, owned by its VM's uid |
//! | `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH` | reading and cleaning files jailed uids own |
//! | `CAP_KILL` | signalling VMMs that run as their own uids |
//! | `CAP_NET_ADMIN` | TAP devices, links, addresses, routes and nftables |
//! | `CAP_NET_BIND_SERVICE` | only when `listen` is a port below 1024 |

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read this process's {set:?} capabilities: {source}")]
    Read { set: CapSet, source: caps::errors::CapsError },
    #[error("cannot drop {capability} from this process's {set:?} capabilities: {source}")]
    Drop { set: CapSet, capability: Capability, source: caps::errors::CapsError },
    #[error("cannot set this process's {set:?} capabilities: {source}")]
    Set { set: CapSet, source: caps::errors::CapsError },
}

/// What metald needs, whatever it is configured to do.
const NEEDED: [Capability; 12] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_MKNOD,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_CHOWN,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_KILL,
    Capability::CAP_NET_ADMIN,
];

/// The capabilities metald keeps, given the port it listens on.
pub fn kept(listen_port: u16) -> CapsHashSet {
    let mut kept: CapsHashSet = NEEDED.into_iter().collect();
    if listen_port < 1024 {
        kept.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    kept
}

/// Drops every capability but `keep` from this thread (call it before any
/// other thread exists). A process that holds no capabilities (not root)
/// has nothing to drop; one without `CAP_SETPCAP` cannot shrink its
/// bounding set and keeps it. Answers what the effective set now is.
pub fn keep_only(keep: &CapsHashSet) -> Result<CapsHashSet, PrivilegeError> {
    let read = |set| caps::read(None, set).map_err(|source| PrivilegeError::Read { set, source });
    // The bounding set first: shrinking it takes CAP_SETPCAP, dropped below.
    if read(CapSet::Effective)?.contains(&Capability::CAP_SETPCAP) {
        for capability in read(CapSet::Bounding)?.difference(keep) {
            caps::drop(None, CapSet::Bounding, *capability).map_err(|source| PrivilegeError::Drop {
                set: CapSet::Bounding,
                capability: *capability,
                source,
            })?;
        }
    }
    let kept: CapsHashSet = read(CapSet::Permitted)?.intersection(keep).copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(|source| PrivilegeError::Set { set: CapSet::Ambient, source })?;
    caps::clear(None, CapSet::Inheritable).map_err(|source| PrivilegeError::Set { set: CapSet::Inheritable, source })?;
    caps::set(None, CapSet::Effective, &kept).map_err(|source| PrivilegeError::Set { set: CapSet::Effective, source })?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|source| PrivilegeError::Set { set: CapSet::Permitted, source })?;
    Ok(kept)
}

/// `CAP_A, CAP_B, …` in a stable order, for the log.
pub fn names(set: &CapsHashSet) -> String {
    let mut names: Vec<String> = set.iter().map(ToString::to_string).collect();
    names.sort();
    names.join(", ")
}
