//! Recent reads of the fleet store, kept a short while so a call does not
//! read the store each time: API keys and where VMs are placed. An entry
//! younger than `fresh_ms` answers without the store; an older one is read
//! again. When the store cannot be read, an entry younger than
//! `stale_if_unavailable_ms` answers instead of the error, so calls that
//! need only those reads go on while the store is away.
//!
//! `fresh_ms` is the bound on how long a change made through another
//! gateway (a key revoked, a VM deleted) takes to reach this one while the
//! store answers. A gateway that cannot read the store cannot learn of
//! changes; none can be made while the store is away, and one made just
//! before it went reaches this gateway when it is back.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::store::StoreError;

/// How long reads are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// How long a read answers without the store, in milliseconds (0: every call reads it).
    pub fresh_ms: u64,
    /// How long a read answers while the store cannot be read, in milliseconds.
    pub stale_if_unavailable_ms: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self { fresh_ms: 2000, stale_if_unavailable_ms: 60_000 }
    }
}

/// Values read from the store by id, with when each was read.
#[derive(Debug)]
pub struct RecentReads<V> {
    fresh: Duration,
    stale: Duration,
    entries: Mutex<HashMap<String, (V, Instant)>>,
}

impl<V: Clone> RecentReads<V> {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            fresh: Duration::from_millis(settings.fresh_ms),
            stale: Duration::from_millis(settings.stale_if_unavailable_ms.max(settings.fresh_ms)),
            entries: Mutex::default(),
        }
    }

    fn entry(&self, id: &str) -> Option<(V, Duration)> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(id).map(|(value, read_at)| (value.clone(), read_at.elapsed()))
    }

    /// The value of `id`: kept if fresh, else `read` from the store (and
    /// kept), else, when the store fails, kept if not too old.
    pub async fn get<F>(&self, id: &str, read: F) -> Result<Option<V>, StoreError>
    where
        F: Future<Output = Result<Option<V>, StoreError>>,
    {
        let kept = self.entry(id);
        if let Some((value, age)) = &kept
            && *age < self.fresh
        {
            return Ok(Some(value.clone()));
        }
        match read.await {
            Ok(Some(value)) => {
                self.entries.lock().unwrap_or_else(PoisonError::into_inner).insert(id.to_owned(), (value.clone(), Instant::now()));
                Ok(Some(value))
            }
            Ok(None) => {
                self.forget(id);
                Ok(None)
            }
            Err(error) => match kept {
                Some((value, age)) if age < self.stale => {
                    tracing::debug!(%id, %error, "the store cannot be read: answering from a read {age:?} old");
                    Ok(Some(value))
                }
                _ => Err(error),
            },
        }
    }

    /// Drops `id`, so its next read goes to the store: this gateway changed it.
    pub fn forget(&self, id: &str) {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    /// Drops what is too old to answer even while the store is away.
    pub fn forget_old(&self) {
        let stale = self.stale;
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, (_, read_at)| read_at.elapsed() < stale);
    }
}
