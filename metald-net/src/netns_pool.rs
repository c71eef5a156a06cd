//! Network namespaces made ahead of the VMs that will get them. Making one
//! runs every network subsystem's setup in the kernel, and on a busy host
//! (another VM's namespace being torn down) that was the slowest step of an
//! attach. A pooled namespace is held only by metald's descriptor and has
//! no name, so one never handed out leaves nothing when metald stops or
//! dies: the kernel frees it with the descriptor. Each is handed out once,
//! and only the VM's attach names it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::netns::{NetnsError, unnamed, write_sysctl};

/// Namespaces ready for VMs, refilled in the background up to its size.
#[derive(Debug)]
pub struct NamespacePool {
    size: usize,
    ready: Mutex<Vec<OwnedFd>>,
    refilling: AtomicBool,
}

impl NamespacePool {
    /// A pool of `size` namespaces (none made yet: see [`NamespacePool::refill`]);
    /// `0` makes each namespace when its VM asks.
    pub fn new(size: usize) -> Arc<Self> {
        Arc::new(Self { size, ready: Mutex::new(Vec::with_capacity(size)), refilling: AtomicBool::new(false) })
    }

    /// A namespace no VM had, prepared as every VM's starts: the pool's
    /// when one is ready (the pool then refills in the background), made
    /// now otherwise.
    pub async fn take(self: &Arc<Self>) -> Result<OwnedFd, NetnsError> {
        let pooled = self.ready.lock().unwrap_or_else(PoisonError::into_inner).pop();
        self.refill();
        match pooled {
            Some(namespace) => Ok(namespace),
            None => tokio::task::spawn_blocking(prepared).await.map_err(|_| NetnsError::ThreadPanicked)?,
        }
    }

    /// Makes namespaces on a blocking thread until the pool is full; one
    /// refill runs at a time. Needs a Tokio runtime.
    pub fn refill(self: &Arc<Self>) {
        if self.size == 0 || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            loop {
                while pool.ready() < pool.size {
                    match prepared() {
                        Ok(namespace) => pool.ready.lock().unwrap_or_else(PoisonError::into_inner).push(namespace),
                        Err(error) => {
                            // Creates make their own until a later refill succeeds.
                            tracing::warn!(error = %metald_core::error_chain(&error), "cannot make a network namespace for the pool");
                            break;
                        }
                    }
                }
                pool.refilling.store(false, Ordering::SeqCst);
                // A take between the last count and the flag's release finds the flag still set.
                if pool.ready() >= pool.size || pool.refilling.swap(true, Ordering::SeqCst) {
                    break;
                }
            }
        });
    }

    /// How many namespaces are ready.
    pub fn ready(&self) -> usize {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// The inode numbers of the ready namespaces (what `/proc/<pid>/ns/net`
    /// links show as `net:[<inode>]`), to see where each one goes.
    pub fn ready_inodes(&self) -> Vec<u64> {
        let ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        ready.iter().filter_map(|namespace| nix::sys::stat::fstat(namespace).ok()).map(|stat| stat.st_ino).collect()
    }
}

/// A namespace as every VM's starts: no IPv6 of its own, since its links
/// only bridge frames.
fn prepared() -> Result<OwnedFd, NetnsError> {
    let namespace = unnamed()?;
    for key in ["net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"] {
        write_sysctl(&namespace, key, "1")?;
    }
    Ok(namespace)
}
