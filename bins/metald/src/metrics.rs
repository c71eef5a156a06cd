//! The daemon's Prometheus metrics. RPC latencies, boot times and backend
//! errors are recorded as they happen; VM counts and events, uids, the
//! process, the spool and the meter are read when `/metrics` is scraped,
//! so they are never stale.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metald_billing::delivery::DeliveryStats;
use metald_billing::meter::MeterStats;
use metald_billing::spool::Spool;
use metald_core::{VmManager, VmState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method name, e.g. `CreateVm`.
    pub method: String,
    /// The Connect code, `ok` on success.
    pub code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// What the backend was asked to do, e.g. `boot`.
    pub operation: String,
}

/// Billing's live figures, when billing runs.
#[derive(Debug, Clone)]
pub struct BillingFigures {
    pub spool: Arc<Spool>,
    pub meter: Arc<MeterStats>,
    pub delivery: Arc<DeliveryStats>,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc_duration: Family<RpcLabels, Histogram>,
    backend_errors: Family<BackendLabels, Counter>,
    boot_duration: Histogram,
    takeover: Arc<TakeoverFigures>,
}

/// What the takeover of the previous run's VMs found, once it is done.
#[derive(Debug, Default)]
struct TakeoverFigures {
    done: std::sync::atomic::AtomicBool,
    taken_over: AtomicU64,
    lost: AtomicU64,
    stopped: AtomicU64,
}

fn rpc_histogram() -> Histogram {
    // 0.5 ms to about 33 s: reads answer in well under a millisecond, a
    // create with its jail takes tens of milliseconds, a graceful
    // shutdown may take its whole timeout.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17))
}

impl Metrics {
    pub fn new(manager: VmManager, billing: Option<BillingFigures>) -> Self {
        let mut registry = Registry::default();
        let rpc_duration = Family::<RpcLabels, Histogram>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        registry.register("metald_rpc_duration_seconds", "How long API calls took, by method and result code", rpc_duration.clone());
        let backend_errors = Family::<BackendLabels, Counter>::default();
        registry.register("metald_backend_errors", "Calls the VMM backend failed, by operation", backend_errors.clone());
        // 1 ms to about 16 s: a boot takes tens of milliseconds, one
        // waiting on a slow disk or a starved host far longer.
        let boot_duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "metald_vm_boot_duration_seconds",
            "How long BootVm took from the call to the guest running, for boots that succeeded",
            boot_duration.clone(),
        );
        let takeover = Arc::new(TakeoverFigures::default());
        registry.register_collector(Box::new(HostCollector { manager, billing, takeover: Arc::clone(&takeover) }));
        Self { registry, rpc_duration, backend_errors, boot_duration, takeover }
    }

    pub fn observe_boot(&self, elapsed: Duration) {
        self.boot_duration.observe(elapsed.as_secs_f64());
    }

    /// What this run's takeover of the previous run's VMs found.
    pub fn record_takeover(&self, takeover: &metald_core::Takeover) {
        self.takeover.taken_over.store(takeover.taken_over.len() as u64, Ordering::Relaxed);
        self.takeover.lost.store(takeover.lost.len() as u64, Ordering::Relaxed);
        self.takeover.stopped.store(takeover.stopped.len() as u64, Ordering::Relaxed);
        self.takeover.done.store(true, Ordering::Release);
    }

    pub fn observe_rpc(&self, method: &str, code: &str, elapsed: Duration) {
        let labels = RpcLabels { method: method.to_owned(), code: code.to_owned() };
        self.rpc_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn backend_error(&self, operation: &str) {
        self.backend_errors.get_or_create(&BackendLabels { operation: operation.to_owned() }).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads the manager and billing at scrape time.
#[derive(Debug)]
struct HostCollector {
    manager: VmManager,
    billing: Option<BillingFigures>,
    takeover: Arc<TakeoverFigures>,
}

const STATES: [VmState; 5] = [VmState::Created, VmState::Running, VmState::Paused, VmState::Shutdown, VmState::Failed];

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut by_state: BTreeMap<String, i64> = STATES.iter().map(|state| (state_label(*state), 0)).collect();
        for summary in self.manager.list(None) {
            *by_state.entry(state_label(summary.state)).or_default() += 1;
        }
        let family = Family::<[(&str, String); 1], prometheus_client::metrics::gauge::Gauge>::default();
        for (state, count) in &by_state {
            family.get_or_create(&[("state", state.clone())]).set(*count);
        }
        family.encode(encoder.encode_descriptor("metald_vms", "VMs on this host by state", None, family.metric_type())?)?;
        let build = Family::<[(&str, &str); 2], prometheus_client::metrics::gauge::Gauge>::default();
        build.get_or_create(&[("version", env!("CARGO_PKG_VERSION")), ("backend", self.manager.backend_name())]).set(1);
        build.encode(encoder.encode_descriptor(
            "metald_build_info",
            "Always 1; the labels say which metald and VMM backend run",
            None,
            build.metric_type(),
        )?)?;
        let events = Family::<[(&str, &str); 1], Counter>::default();
        for (kind, count) in self.manager.event_counts() {
            events.get_or_create(&[("kind", kind)]).inc_by(count);
        }
        events.encode(encoder.encode_descriptor(
            "metald_vm_events",
            "VM events since metald started, by kind (failed: a VMM died or an operation broke it)",
            None,
            events.metric_type(),
        )?)?;
        if let Some(uids) = self.manager.identity_capacity() {
            gauge(&mut encoder, "metald_uids", "The jailer's uid window: how many VMs this host can hold at once", uids.total)?;
            gauge(
                &mut encoder,
                "metald_uids_free",
                "uids no VM holds: how many more VMs this host can take",
                uids.total.saturating_sub(uids.leased),
            )?;
        }
        if let Some(fill) = self.manager.jail_pool_fill() {
            gauge(&mut encoder, "metald_jail_pool_size", "Jail children the jailer keeps ready ahead of creates", fill.size as u64)?;
            gauge(
                &mut encoder,
                "metald_jail_pool_ready",
                "Jail children ready now: a create that finds none makes its own (an RCU grace period on cgroup v1)",
                fill.ready as u64,
            )?;
        }
        if self.takeover.done.load(Ordering::Acquire) {
            let outcomes = Family::<[(&str, &str); 1], prometheus_client::metrics::gauge::Gauge>::default();
            for (outcome, count) in
                [("taken_over", &self.takeover.taken_over), ("lost", &self.takeover.lost), ("stopped", &self.takeover.stopped)]
            {
                outcomes.get_or_create(&[("outcome", outcome)]).set(i64::try_from(count.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            }
            outcomes.encode(encoder.encode_descriptor(
                "metald_takeover_vms",
                "What this run's start found of the previous run's VMs: taken_over (VMM taken over), lost (VMM gone or not taken over: now failed), stopped (had no VMM)",
                None,
                outcomes.metric_type(),
            )?)?;
        }
        crate::process_metrics::encode(&mut encoder)?;
        let Some(billing) = &self.billing else { return Ok(()) };
        if let Ok(depth) = billing.spool.depth() {
            gauge(
                &mut encoder,
                "metald_billing_spool_records",
                "Usage records in the spool not yet acknowledged by the sink",
                depth.records,
            )?;
            gauge(&mut encoder, "metald_billing_spool_bytes", "Bytes the spool's records take on disk", depth.bytes)?;
            gauge(&mut encoder, "metald_billing_spool_quota_bytes", "The spool's disk quota", depth.quota_bytes)?;
        }
        let lag_seconds = billing.meter.lag().as_secs_f64();
        let lag = ConstGauge::new(lag_seconds);
        lag.encode(encoder.encode_descriptor(
            "metald_billing_meter_lag_seconds",
            "How far behind its schedule the meter is: the lateness of its last tick, or how long ago the tick it is still working on was due",
            None,
            lag.metric_type(),
        )?)?;
        let counters = [
            ("metald_billing_meter_ticks", "Meter ticks run", &billing.meter.ticks),
            (
                "metald_billing_meter_missed_ticks",
                "Meter ticks not sampled on time; nothing is lost: the next record covers the time and counts them in missed_ticks",
                &billing.meter.missed_ticks,
            ),
            ("metald_billing_records", "Usage records the meter took", &billing.meter.records),
            ("metald_billing_meter_read_failures", "Counter reads that failed", &billing.meter.read_failures),
            ("metald_billing_spool_full", "Ticks the spool refused because its quota was reached", &billing.meter.spool_full),
            ("metald_billing_delivered_records", "Records the sink acknowledged", &billing.delivery.delivered),
            ("metald_billing_duplicate_records", "Records the sink already had (replays made harmless)", &billing.delivery.duplicates),
            ("metald_billing_delivery_failures", "Deliveries the sink refused or did not answer", &billing.delivery.failures),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        gauge(&mut encoder, "metald_billing_metered_vms", "VMs the meter samples", billing.meter.metered_vms.load(Ordering::Relaxed))?;
        Ok(())
    }
}

pub(crate) fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn state_label(state: VmState) -> String {
    state.to_string().to_lowercase()
}
