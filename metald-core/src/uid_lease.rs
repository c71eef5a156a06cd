//! The uids (and equal gids) VMMs run as: a pool that leases each VM one
//! for its whole life and takes it back when the lease is dropped, so its
//! TAP devices and files belong to the same user across every VMM it
//! runs; or one fixed identity that every VM shares.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum UidLeaseError {
    #[error("no uid is free in {0:?}")]
    Exhausted(Range<u32>),
    #[error("uid {0} is already leased to another VM")]
    Taken(u32),
}

/// The uids a host's VMMs run as.
#[derive(Debug)]
pub struct UidPool {
    range: Range<u32>,
    fixed: Option<(u32, u32)>,
    taken: Arc<Mutex<BTreeSet<u32>>>,
}

impl UidPool {
    /// A pool of `range`, or every VM as `fixed` when given.
    pub fn new(range: Range<u32>, fixed: Option<(u32, u32)>) -> Self {
        Self { range, fixed, taken: Arc::default() }
    }

    /// A uid and gid for one VM, held until the lease is dropped.
    pub fn lease(&self) -> Result<IdentityLease, UidLeaseError> {
        if let Some((uid, gid)) = self.fixed {
            return Ok(IdentityLease { uid, gid, pool: None });
        }
        let mut taken = self.taken();
        let uid = self.range.clone().find(|uid| !taken.contains(uid)).ok_or_else(|| UidLeaseError::Exhausted(self.range.clone()))?;
        taken.insert(uid);
        Ok(IdentityLease { uid, gid: uid, pool: Some(Arc::clone(&self.taken)) })
    }

    /// Leases a given uid and gid again, for a VM whose VMM outlived an
    /// earlier metald: it must not be handed to another VM. A uid outside
    /// the pool (the configuration changed since) cannot collide and is not tracked.
    pub fn take_over(&self, uid: u32, gid: u32) -> Result<IdentityLease, UidLeaseError> {
        if self.fixed.is_some() || !self.range.contains(&uid) {
            return Ok(IdentityLease { uid, gid, pool: None });
        }
        if !self.taken().insert(uid) {
            return Err(UidLeaseError::Taken(uid));
        }
        Ok(IdentityLease { uid, gid, pool: Some(Arc::clone(&self.taken)) })
    }

    /// How many uids the pool has and how many are leased now; `None` with
    /// a fixed identity, which every VM shares.
    pub fn capacity(&self) -> Option<IdentityCapacity> {
        if self.fixed.is_some() {
            return None;
        }
        let total = u64::from(self.range.end.saturating_sub(self.range.start));
        let leased = self.taken().iter().filter(|uid| self.range.contains(uid)).count() as u64;
        Some(IdentityCapacity { total, leased })
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The uid pool's size and use: each VM holds one uid for its whole life,
/// so `total - leased` is how many more VMs this host can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityCapacity {
    pub total: u64,
    pub leased: u64,
}

/// A uid and gid, given back to the pool when the lease is dropped.
#[derive(Debug)]
pub struct IdentityLease {
    uid: u32,
    gid: u32,
    pool: Option<Arc<Mutex<BTreeSet<u32>>>>,
}

impl IdentityLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_unique_and_return_to_the_pool() {
        let pool = UidPool::new(5000..5002, None);
        let first = pool.lease().unwrap();
        let second = pool.lease().unwrap();
        assert_eq!((first.uid(), second.uid()), (5000, 5001));
        assert!(matches!(pool.lease(), Err(UidLeaseError::Exhausted(_))));
        assert_eq!(pool.capacity(), Some(IdentityCapacity { total: 2, leased: 2 }));
        drop(first);
        assert_eq!(pool.lease().unwrap().uid(), 5000);
    }

    #[test]
    fn a_reserved_uid_is_not_leased_twice_and_one_outside_the_pool_is_not_tracked() {
        let pool = UidPool::new(5000..5002, None);
        let _kept = pool.take_over(5001, 5001).unwrap();
        assert!(matches!(pool.take_over(5001, 5001), Err(UidLeaseError::Taken(5001))));
        assert_eq!(pool.lease().unwrap().uid(), 5000);
        assert!(pool.take_over(42, 42).is_ok() && pool.take_over(42, 42).is_ok());
        assert_eq!(UidPool::new(5000..5002, Some((7, 7))).capacity(), None);
    }
}
