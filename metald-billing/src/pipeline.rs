//! The whole way from a VM to a sink, started and stopped as one: the
//! meter on its thread, the spool, and the delivery task. This is what the
//! daemon runs and what an embedder starts next to its `VmManager`.

use std::sync::Arc;

use metald_core::VmManager;
use metald_core::events::VmEvent;
use tokio::sync::{broadcast, watch};

use crate::delivery::{self, DeliveryPolicy, DeliveryStats};
use crate::meter::{self, BlockSource, MeterConfig, MeterError, MeterHandle, MeterPeers, MeterStats};
use crate::sink::BillingSink;
use crate::source::{CounterSource, SystemCounters};
use crate::spool::Spool;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BillingConfig {
    pub meter: MeterConfig,
    pub delivery: DeliveryPolicy,
}

/// Running metering and delivery.
#[derive(Debug)]
pub struct Billing {
    meter: Option<MeterHandle>,
    delivery: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    spool: Arc<Spool>,
    delivery_stats: Arc<DeliveryStats>,
    meter_stats: Arc<MeterStats>,
}

impl Billing {
    /// Meters `manager`'s VMs with the host's real counters into `spool`
    /// and delivers to `sink`. Call from within a Tokio runtime.
    pub fn for_manager(
        manager: &VmManager,
        spool: Arc<Spool>,
        sink: Arc<dyn BillingSink>,
        config: BillingConfig,
    ) -> Result<Self, MeterError> {
        let blocks: Arc<dyn BlockSource> = Arc::new(manager.clone());
        // A delete the meter has not billed yet must survive a crash of metald.
        manager.hold_deleted_records();
        let peers = MeterPeers { blocks: Some(blocks), runtime: None, deleted_billed: Some(Arc::new(manager.clone())) };
        Self::start_with(manager.subscribe(), spool, Arc::new(SystemCounters), peers, sink, config)
    }

    /// The same from any event stream and counter source. Call from within a Tokio runtime.
    pub fn start(
        events: broadcast::Receiver<VmEvent>,
        spool: Arc<Spool>,
        source: Arc<dyn CounterSource>,
        blocks: Option<Arc<dyn BlockSource>>,
        sink: Arc<dyn BillingSink>,
        config: BillingConfig,
    ) -> Result<Self, MeterError> {
        Self::start_with(events, spool, source, MeterPeers { blocks, ..MeterPeers::default() }, sink, config)
    }

    fn start_with(
        events: broadcast::Receiver<VmEvent>,
        spool: Arc<Spool>,
        source: Arc<dyn CounterSource>,
        peers: MeterPeers,
        sink: Arc<dyn BillingSink>,
        config: BillingConfig,
    ) -> Result<Self, MeterError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MeterError::NoRuntime)?;
        let peers = MeterPeers { runtime: Some(runtime.clone()), ..peers };
        let meter = meter::start(events, Arc::clone(&spool), source, peers, config.meter)?;
        let meter_stats = Arc::clone(&meter.stats);
        let (stop, stopped) = watch::channel(false);
        let delivery_stats = Arc::new(DeliveryStats::default());
        let delivery = runtime.spawn(delivery::run(Arc::clone(&spool), sink, config.delivery, Arc::clone(&delivery_stats), stopped));
        Ok(Self { meter: Some(meter), delivery: Some(delivery), stop, spool, delivery_stats, meter_stats })
    }

    /// Call once the manager has taken over the previous run's VMs
    /// ([`VmManager::take_over`]), with the VMs it knows now: a VM whose
    /// usage was still open and that the manager no longer knows was deleted
    /// by a metald killed before its final record was taken, and its
    /// unmetered end is reported as a gap.
    pub fn takeover_done(&self, known: impl IntoIterator<Item = metald_core::VmId>) {
        if let Some(meter) = &self.meter {
            meter.takeover_done(known);
        }
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    pub fn meter_stats(&self) -> &Arc<MeterStats> {
        &self.meter_stats
    }

    pub fn delivery_stats(&self) -> &Arc<DeliveryStats> {
        &self.delivery_stats
    }

    /// Takes one last tick of records, then delivers what the sink accepts
    /// once more; whatever it does not stays in the spool for the next start.
    pub async fn stop(mut self) {
        if let Some(meter) = self.meter.take() {
            let _ = tokio::task::spawn_blocking(move || meter.stop()).await;
        }
        let _ = self.stop.send(true);
        if let Some(delivery) = self.delivery.take() {
            let _ = delivery.await;
        }
    }
}

impl Drop for Billing {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
