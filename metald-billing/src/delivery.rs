//! Moves taken records from the spool to a sink: in order, in batches that
//! close at a size or an age, retrying with exponential backoff while the
//! sink is down, acknowledging (and so dropping) records only once the sink
//! has them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::record::HostHeartbeat;
use crate::sink::{Batch, BillingSink};
use crate::spool::Spool;

/// When a batch goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// A batch goes out as soon as this many records wait.
    pub max_batch: usize,
    /// Or once the oldest waiting record is this old.
    pub max_age: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How often the sink hears that this host is alive.
    pub heartbeat_every: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_batch: 10_000,
            max_age: Duration::from_secs(1),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(10),
        }
    }
}

/// What delivery has done so far, for metrics.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub failures: AtomicU64,
}

/// Runs until `stop` turns true, then delivers what it can once more.
pub async fn run(
    spool: Arc<Spool>,
    sink: Arc<dyn BillingSink>,
    policy: DeliveryPolicy,
    stats: Arc<DeliveryStats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = policy.min_backoff;
    let mut next_heartbeat = Instant::now();
    loop {
        let stopping = *stop.borrow();
        if Instant::now() >= next_heartbeat {
            send_heartbeat(&spool, sink.as_ref()).await;
            next_heartbeat = Instant::now() + policy.heartbeat_every;
        }
        if !stopping {
            wait_for_a_batch(&spool, &policy, &mut stop, next_heartbeat).await;
        }
        let delivered = match deliver_once(&spool, sink.as_ref(), policy.max_batch, &stats).await {
            Ok(delivered) => deliver_gaps(&spool, sink.as_ref()).await.map(|()| delivered),
            Err(error) => Err(error),
        };
        match delivered {
            Ok(0) if stopping => return,
            Ok(_) => backoff = policy.min_backoff,
            Err(error) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = sink.name(), error, ?backoff, "usage delivery failed; retrying");
                if stopping {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
    }
}

async fn send_heartbeat(spool: &Spool, sink: &dyn BillingSink) {
    let depth = spool.depth().unwrap_or_default();
    let heartbeat = HostHeartbeat {
        sent_at_ms: metald_types::time::unix_millis_now(),
        spool_records: depth.records,
        spool_bytes: depth.bytes,
        spool_quota_bytes: depth.quota_bytes,
    };
    if let Err(error) = sink.heartbeat(&heartbeat).await {
        tracing::debug!(sink = sink.name(), error = %metald_types::error_chain(&error), "heartbeat not delivered");
    }
}

async fn deliver_gaps(spool: &Spool, sink: &dyn BillingSink) -> Result<(), String> {
    for (id, gap) in spool.pending_gaps().map_err(|error| metald_types::error_chain(&error))? {
        sink.report_gap(&gap).await.map_err(|error| metald_types::error_chain(&error))?;
        spool.drop_gap(id).map_err(|error| metald_types::error_chain(&error))?;
    }
    Ok(())
}

/// Waits until a full batch waits, the oldest record is old enough, a
/// heartbeat is due, or stop.
async fn wait_for_a_batch(spool: &Spool, policy: &DeliveryPolicy, stop: &mut watch::Receiver<bool>, heartbeat_due: Instant) {
    loop {
        let depth = spool.depth().map(|depth| depth.records).unwrap_or(0);
        if usize::try_from(depth).unwrap_or(usize::MAX) >= policy.max_batch {
            return;
        }
        let age_left = match spool.oldest_taken_ms() {
            Ok(Some(taken)) => {
                let age = Duration::from_millis(metald_types::time::unix_millis_now().saturating_sub(taken));
                if age >= policy.max_age {
                    return;
                }
                policy.max_age - age
            }
            _ => policy.max_age,
        };
        let heartbeat_left = heartbeat_due.saturating_duration_since(Instant::now());
        if heartbeat_left.is_zero() {
            return;
        }
        tokio::select! {
            () = spool.taken() => {}
            () = tokio::time::sleep(age_left.min(heartbeat_left)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Delivers one batch; returns how many records left the spool.
pub async fn deliver_once(spool: &Spool, sink: &dyn BillingSink, max_batch: usize, stats: &DeliveryStats) -> Result<usize, String> {
    let pending = spool.pending(max_batch).map_err(|error| metald_types::error_chain(&error))?;
    if pending.records.is_empty() {
        return Ok(0);
    }
    spool.mark_sent(&pending).map_err(|error| metald_types::error_chain(&error))?;
    let batch = Batch { records: &pending.records, resent: pending.resent };
    let delivered = sink.deliver(batch).await.map_err(|error| metald_types::error_chain(&error))?;
    spool.acknowledge(&pending).map_err(|error| metald_types::error_chain(&error))?;
    stats.delivered.fetch_add(delivered.accepted as u64, Ordering::Relaxed);
    stats.duplicates.fetch_add(delivered.duplicates as u64, Ordering::Relaxed);
    Ok(pending.records.len())
}
