//! `vmprovisioner.v1.HostService`: what a gateway asks about this host
//! itself, to place VMs. Every call here was admitted as the gateway's own
//! (the server's gate checks the signature and puts a [`GatewayItself`]
//! into the call).

use std::sync::Arc;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_api::proto::vmprovisioner::v1 as wire;

use crate::service::VmApi;

/// A call the gateway signed for itself, put into the call's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayItself;

#[derive(Debug)]
pub struct HostApi {
    vms: Arc<VmApi>,
}

impl HostApi {
    pub fn new(vms: Arc<VmApi>) -> Self {
        Self { vms }
    }
}

fn capacity(total: u64, used: u64) -> wire::Capacity {
    let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    wire::Capacity { total: count(total), used: count(used), ..Default::default() }
}

fn gateway(ctx: &RequestContext) -> Result<GatewayItself, ConnectError> {
    ctx.extensions()
        .get::<GatewayItself>()
        .copied()
        .ok_or_else(|| ConnectError::permission_denied("the call was not signed by a gateway for itself"))
}

#[allow(refining_impl_trait)]
impl wire::HostService for HostApi {
    async fn list_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ListVmsRequest>,
    ) -> ServiceResult<wire::ListVmsResponse> {
        gateway(&ctx)?;
        Response::ok(self.vms.list_page(None, &request.to_owned_message())?)
    }

    async fn get_host_capacity(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, wire::GetHostCapacityRequest>,
    ) -> ServiceResult<wire::GetHostCapacityResponse> {
        gateway(&ctx)?;
        let (total, used) = self.vms.capacity_and_usage();
        Response::ok(wire::GetHostCapacityResponse {
            vcpus: buffa::MessageField::some(capacity(total.vcpus, used.vcpus)),
            memory_bytes: buffa::MessageField::some(capacity(total.memory_bytes, used.memory_bytes)),
            vms: buffa::MessageField::some(capacity(total.vms, used.vms)),
            vmms: self.vms.vmms().into_iter().map(str::to_owned).collect(),
            ..Default::default()
        })
    }
}
