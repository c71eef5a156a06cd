//! `gateway.v1.RegistrationService`: hosts announce themselves. A host
//! configured with the gateway's address calls `Announce` every few
//! seconds, signed with the secret it shares with the gateway (checked by
//! the gate, for the empty tenant): the gateway adds it (active) or takes
//! in its URL, and places on it only while its last announcement is
//! younger than the TTL. The operator's word stands: a cordoned or
//! draining host stays so whatever it announces, and hosts added by hand
//! need not announce.

use std::sync::Arc;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_api::proto::gateway::v1 as admin;

use crate::hosts::{Hosts, check_name};
use crate::store::{FleetStore, HostMode, HostRecord};

/// Put into an `Announce` call's extensions by the gate once its signature holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedByHost;

#[derive(Debug)]
pub struct Registration {
    store: Arc<dyn FleetStore>,
    hosts: Arc<Hosts>,
}

impl Registration {
    pub fn new(store: Arc<dyn FleetStore>, hosts: Arc<Hosts>) -> Self {
        Self { store, hosts }
    }
}

#[allow(refining_impl_trait)]
impl admin::RegistrationService for Registration {
    async fn announce(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::AnnounceRequest>,
    ) -> ServiceResult<admin::AnnounceResponse> {
        if ctx.extensions().get::<SignedByHost>().is_none() {
            return Err(ConnectError::unauthenticated("announcements are signed with the secret the host shares with the gateway"));
        }
        let (name, url) = (request.name.to_owned(), request.url.to_owned());
        check_name(&name).map_err(|error| ConnectError::invalid_argument(error.to_string()))?;
        let now_ms = metald_types::time::unix_millis_now();
        let candidate =
            HostRecord { name: name.clone(), url: url.clone(), mode: HostMode::Active, added_at_ms: now_ms, announced_at_ms: Some(now_ms) };
        self.hosts.check(&candidate).map_err(|error| ConnectError::invalid_argument(error.to_string()))?;
        let record = self.store.announce_host(&name, &url, now_ms).await.map_err(|error| {
            tracing::error!(%error, host = %name, "cannot record a host's announcement");
            ConnectError::unavailable(format!("the gateway cannot reach its store: {error}"))
        })?;
        match self.hosts.take_in(record) {
            Ok(true) => tracing::info!(
                host = %name,
                %url,
                vcpus = request.vcpus,
                memory_bytes = request.memory_bytes,
                vms = request.vms,
                vmms = %request.vmms.iter().copied().collect::<Vec<_>>().join(", "),
                "host announced itself"
            ),
            Ok(false) => {}
            Err(error) => return Err(ConnectError::invalid_argument(error.to_string())),
        }
        let ttl_seconds = u32::try_from(self.hosts.announce_ttl().as_secs()).unwrap_or(u32::MAX);
        Response::ok(admin::AnnounceResponse { ttl_seconds, ..Default::default() })
    }
}
