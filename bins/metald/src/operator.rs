//! `vmprovisioner.v1.OperatorService`: the host's operator across tenants.
//! Every call here was admitted with the operator's token (the server's
//! gate checks it and puts an [`Operator`] into the call); what it lists is
//! what `VmService.ListVms` lists, for every tenant, and its usage summary
//! is read back from the billing sink.

use std::sync::Arc;
use std::time::SystemTime;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_billing::{TenantUsage, UsageHistory, UsageWindow};

use crate::auth::Operator;
use crate::service::VmApi;

/// Where this host's delivered usage can be read back from, or why it cannot.
#[derive(Debug, Clone)]
pub enum UsageReadBack {
    Readable(Arc<dyn UsageHistory>),
    Unreadable(String),
}

#[derive(Debug)]
pub struct OperatorApi {
    vms: Arc<VmApi>,
    usage: UsageReadBack,
}

impl OperatorApi {
    pub fn new(vms: Arc<VmApi>, usage: UsageReadBack) -> Self {
        Self { vms, usage }
    }
}

fn operator(ctx: &RequestContext) -> Result<Operator, ConnectError> {
    ctx.extensions()
        .get::<Operator>()
        .copied()
        .ok_or_else(|| ConnectError::permission_denied("the call was not made with the operator's token"))
}

#[allow(refining_impl_trait)]
impl wire::OperatorService for OperatorApi {
    async fn list_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ListVmsRequest>,
    ) -> ServiceResult<wire::ListVmsResponse> {
        operator(&ctx)?;
        Response::ok(self.vms.list_page(None, &request.to_owned_message())?)
    }

    async fn get_usage_summary(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::GetUsageSummaryRequest>,
    ) -> ServiceResult<wire::GetUsageSummaryResponse> {
        operator(&ctx)?;
        let window = window_from_wire(request.from_timestamp, request.to_timestamp, SystemTime::now())?;
        let history = match &self.usage {
            UsageReadBack::Readable(history) => history,
            UsageReadBack::Unreadable(why) => return Err(ConnectError::failed_precondition(why.clone())),
        };
        let tenants = history.usage_by_tenant(window).await.map_err(|error| {
            let chain = metald_core::error_chain(&error);
            tracing::warn!(error = %chain, "usage summary failed");
            ConnectError::unavailable(format!("cannot read this host's usage: {chain}"))
        })?;
        Response::ok(wire::GetUsageSummaryResponse {
            tenants: tenants.iter().map(tenant_usage_to_wire).collect(),
            source: history.source(),
            from_timestamp: saturating_i64(window.from_ms),
            to_timestamp: saturating_i64(window.to_ms),
            ..Default::default()
        })
    }
}

/// `[from, to)` in Unix milliseconds; 0 is "the first record" and "now".
fn window_from_wire(from: i64, to: i64, now: SystemTime) -> Result<UsageWindow, ConnectError> {
    let millis = |field: &str, value: i64| {
        u64::try_from(value)
            .map_err(|_| ConnectError::invalid_argument(format!("{field}: {value} is before 1970; give Unix time in milliseconds, or 0")))
    };
    let from_ms = millis("from_timestamp", from)?;
    let to_ms = match millis("to_timestamp", to)? {
        0 => metald_types::time::unix_millis(now),
        to_ms => to_ms,
    };
    if from_ms >= to_ms {
        return Err(ConnectError::invalid_argument(format!(
            "from_timestamp ({from_ms}) must be before to_timestamp ({to_ms}): the span is [from, to)"
        )));
    }
    Ok(UsageWindow { from_ms, to_ms })
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

const KIB_PER_GIB: f64 = 1024.0 * 1024.0;

fn tenant_usage_to_wire(usage: &TenantUsage) -> wire::TenantUsage {
    wire::TenantUsage {
        customer_id: usage.tenant_id.clone(),
        vm_count: i32::try_from(usage.vms).unwrap_or(i32::MAX),
        intervals: saturating_i64(usage.intervals),
        cpu_seconds: usage.cpu_ns as f64 / 1e9,
        vcpu_seconds: usage.vcpu_ms as f64 / 1e3,
        memory_gib_seconds: usage.memory_limit_kib_ms as f64 / KIB_PER_GIB / 1e3,
        resident_memory_gib_seconds: usage.memory_resident_kib_ms as f64 / KIB_PER_GIB / 1e3,
        net_rx_bytes: saturating_i64(usage.net_rx_bytes),
        net_tx_bytes: saturating_i64(usage.net_tx_bytes),
        block_read_bytes: saturating_i64(usage.block_read_bytes),
        block_write_bytes: saturating_i64(usage.block_write_bytes),
        first_timestamp: saturating_i64(usage.first_ms),
        last_timestamp: saturating_i64(usage.last_ms),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_defaults_to_now_and_must_not_be_empty_or_before_1970() {
        let now = metald_types::time::from_unix_millis(5_000);
        assert_eq!(window_from_wire(0, 0, now).unwrap(), UsageWindow { from_ms: 0, to_ms: 5_000 });
        assert_eq!(window_from_wire(1_000, 2_000, now).unwrap(), UsageWindow { from_ms: 1_000, to_ms: 2_000 });
        let empty = window_from_wire(2_000, 2_000, now).unwrap_err();
        assert_eq!(empty.code, connectrpc::ErrorCode::InvalidArgument);
        let negative = window_from_wire(-1, 0, now).unwrap_err();
        assert!(negative.message.unwrap_or_default().starts_with("from_timestamp:"));
    }

    #[test]
    fn kib_milliseconds_become_gib_seconds() {
        let usage =
            TenantUsage { memory_limit_kib_ms: 1024 * 1024 * 1000, vcpu_ms: 2_500, cpu_ns: 1_500_000_000, ..TenantUsage::default() };
        let wire = tenant_usage_to_wire(&usage);
        assert_eq!((wire.memory_gib_seconds, wire.vcpu_seconds, wire.cpu_seconds), (1.0, 2.5, 1.5));
    }
}
