//! Deleted VMs' namespaces, let go of together. The kernel tears a network
//! namespace down in the background, and while it unregisters the
//! namespace's devices it holds the lock every link change on the host
//! takes; on a host where RCU grace periods are slow that stalled the next
//! VM's attach by tens of milliseconds. Held here, a deleted VM's namespace
//! has no name and no process: nothing can enter it, and it is gone when
//! the batch is let go, or when metald stops or dies, since only this
//! descriptor holds it. The kernel tears down the namespaces released
//! together in one pass.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};

/// Deleted VMs' namespaces, released `batch` at a time.
#[derive(Debug)]
pub struct RetiredNamespaces {
    batch: usize,
    held: Mutex<Vec<OwnedFd>>,
}

impl RetiredNamespaces {
    /// Releases namespaces `batch` at a time; `0` or `1` releases each at once.
    pub fn new(batch: usize) -> Self {
        Self { batch, held: Mutex::new(Vec::with_capacity(batch)) }
    }

    /// Holds a deleted VM's namespace (already without a name) until its batch is full.
    pub fn retire(&self, namespace: OwnedFd) {
        let full = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            held.push(namespace);
            if held.len() >= self.batch { std::mem::take(&mut *held) } else { Vec::new() }
        };
        drop(full);
    }

    /// How many are held.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}
