//! The gateway's Prometheus metrics: call latencies by method and code,
//! placement failures by reason and rate-limit denials by class as they
//! happen; each host's health and free room, and the stray VMs, read when
//! `/metrics` is scraped.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::hosts::{Health, Hosts};
use crate::reconcile::Strays;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    rpc_duration: Family<RpcLabels, Histogram>,
    placement_failures: Family<[(&'static str, &'static str); 1], Counter>,
    rate_limited: Family<[(&'static str, &'static str); 1], Counter>,
}

fn rpc_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17))
}

impl GatewayMetrics {
    pub fn new(hosts: Arc<Hosts>, strays: Arc<Strays>) -> Self {
        let mut registry = Registry::default();
        let rpc_duration = Family::<RpcLabels, Histogram>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        registry.register(
            "metald_gateway_rpc_duration_seconds",
            "How long calls to the gateway took, by method and result code",
            rpc_duration.clone(),
        );
        let placement_failures = Family::default();
        registry.register(
            "metald_gateway_placement_failures",
            "Creates no host took, by reason (no_room, quota, hosts_refused)",
            placement_failures.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "metald_gateway_rate_limited",
            "Calls refused for their API key's request rate, by method class",
            rate_limited.clone(),
        );
        registry.register_collector(Box::new(HostCollector { hosts, strays }));
        Self { registry, rpc_duration, placement_failures, rate_limited }
    }

    pub fn observe_rpc(&self, method: &str, code: &str, elapsed: std::time::Duration) {
        self.rpc_duration.get_or_create(&RpcLabels { method: method.into(), code: code.into() }).observe(elapsed.as_secs_f64());
    }

    pub fn placement_failed(&self, reason: &'static str) {
        self.placement_failures.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn rate_limited(&self, class: &'static str) {
        self.rate_limited.get_or_create(&[("class", class)]).inc();
    }

    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[derive(Debug)]
struct HostCollector {
    hosts: Arc<Hosts>,
    strays: Arc<Strays>,
}

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let health = Family::<[(&str, String); 2], Gauge>::default();
        let free = Family::<[(&str, String); 2], Gauge>::default();
        for host in self.hosts.all() {
            let view = host.view();
            for state in [Health::Ready.name(), "starting", "unreachable", Health::Unknown.name()] {
                let now = i64::from(view.status.health.name() == state);
                health.get_or_create(&[("host", host.name.clone()), ("health", state.to_owned())]).set(now);
            }
            if let Some(capacity) = &view.status.capacity {
                for (resource, left) in
                    [("vcpus", capacity.vcpus.free()), ("memory_bytes", capacity.memory_bytes.free()), ("vms", capacity.vms.free())]
                {
                    free.get_or_create(&[("host", host.name.clone()), ("resource", resource.to_owned())])
                        .set(i64::try_from(left).unwrap_or(i64::MAX));
                }
            }
        }
        health.encode(encoder.encode_descriptor(
            "metald_gateway_host_health",
            "Each host's health as the last probe found it: 1 for its state (ready, starting, unreachable, unknown)",
            None,
            health.metric_type(),
        )?)?;
        free.encode(encoder.encode_descriptor(
            "metald_gateway_host_free",
            "What each host has left, as it last said",
            None,
            free.metric_type(),
        )?)?;
        let strays = Gauge::<i64>::default();
        strays.set(i64::try_from(self.strays.all().len()).unwrap_or(i64::MAX));
        strays.encode(encoder.encode_descriptor(
            "metald_gateway_stray_vms",
            "VMs hosts have that the gateway's store does not place there (AdminService.ListStrayVms)",
            None,
            strays.metric_type(),
        )?)?;
        Ok(())
    }
}
