//! A call through the gateway is one trace: the host's span of the call
//! the gateway made is a child of the gateway's span of the caller's call
//! (W3C trace context on the hop), and the gateway's metrics name the
//! methods and hosts. Both export over OTLP/HTTP to one receiver on
//! loopback; the spans are decoded with the OpenTelemetry protobuf types.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod gateway;

use common::otlp::otlp_receiver;
use common::{Host, HostOptions, Wire};
use gateway::Gateway;
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// An exported span: (service name, span name, trace id, span id, parent span id).
type ExportedSpan = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

fn spans(posts: &common::otlp::Posts) -> Vec<ExportedSpan> {
    let mut spans = Vec::new();
    for (_, body) in posts.lock().unwrap().iter() {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref())
                .map(|value| format!("{:?}", value.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span.name, span.trace_id, span.span_id, span.parent_span_id));
                }
            }
        }
    }
    spans
}

#[test]
fn a_call_through_the_gateway_is_one_trace_with_the_hosts_span_under_the_gateways() {
    let test = "a_call_through_the_gateway_is_one_trace_with_the_hosts_span_under_the_gateways";
    let (url, posts) = otlp_receiver();
    let options =
        HostOptions { gateway: true, gateway_default_quota: Some("{}"), otlp_endpoint: Some(url.clone()), ..HostOptions::default() };
    let Some(mut host) = Host::start(test, options) else { return };
    let mut gateway = Gateway::start(&[&host], &format!("[telemetry]\notlp_endpoint = {url:?}"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let key = gateway.tenant_with_key("acme", admin::Quota::default()).await;
        gateway.client(&key, Wire::ConnectProto).list_vms(wire::ListVmsRequest::default()).await.unwrap();
    });
    let metrics = common::http_get(gateway.port, "/metrics").unwrap().1;
    for line in [
        "metald_gateway_rpc_duration_seconds_count{method=\"ListVms\",code=\"ok\"} 1",
        "metald_gateway_host_health{host=\"host-0\",health=\"ready\"} 1",
    ] {
        assert!(metrics.lines().any(|metric| metric == line), "no {line} in:\n{metrics}");
    }
    // Stopping flushes each exporter's batch.
    assert!(gateway.terminate().success(), "{}", gateway.log());
    assert!(host.terminate().success());
    let spans = spans(&posts);
    let list = "/vmprovisioner.v1.VmService/ListVms";
    let at_gateway = spans.iter().find(|span| span.0.contains("metald-gateway") && span.1 == list).expect("the gateway's span");
    let at_host = spans.iter().find(|span| !span.0.contains("metald-gateway") && span.1 == list).expect("the host's span");
    assert_eq!(at_host.2, at_gateway.2, "one trace");
    assert_eq!(at_host.4, at_gateway.3, "the host's span is a child of the gateway's");
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
