//! `gateway.v1.AdminService`: the gateway's operator runs hosts, tenants
//! and API keys. Every call here was admitted with the admin token (the
//! gate puts an [`Admin`] into the call).

use std::sync::Arc;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_api::proto::gateway::v1 as admin;
use metald_types::TenantId;

use crate::auth::Admin;
use crate::hosts::{Hosts, Resource};
use crate::keys::{NewKey, masked};
use crate::reconcile::Strays;
use crate::store::{FleetStore, HostMode, HostRecord, KeyRecord, Quota, StoreError, Tenant};

#[derive(Debug)]
pub struct AdminApi {
    store: Arc<dyn FleetStore>,
    hosts: Arc<Hosts>,
    strays: Arc<Strays>,
    /// Told of revocations, so this gateway refuses a revoked key at once.
    auth: Arc<crate::auth::Authenticator>,
}

impl AdminApi {
    pub fn new(store: Arc<dyn FleetStore>, hosts: Arc<Hosts>, strays: Arc<Strays>, auth: Arc<crate::auth::Authenticator>) -> Self {
        Self { store, hosts, strays, auth }
    }

    async fn host_answer(&self, name: &str) -> Result<admin::Host, ConnectError> {
        let placed = self.store.placements(Some(name)).await.map_err(|error| store_error(&error))?.len();
        let host = self.hosts.get(name).ok_or_else(|| ConnectError::not_found(format!("host {name:?} does not exist")))?;
        Ok(host_to_wire(&host.view(), placed))
    }

    async fn set_mode(&self, ctx: &RequestContext, name: &str, mode: HostMode) -> Result<admin::Host, ConnectError> {
        admitted(ctx)?;
        self.store.set_host_mode(name, mode).await.map_err(|error| store_error(&error))?;
        self.hosts.set_mode(name, mode);
        tracing::info!(host = name, mode = mode.name(), "host mode set");
        self.host_answer(name).await
    }
}

fn admitted(ctx: &RequestContext) -> Result<Admin, ConnectError> {
    ctx.extensions().get::<Admin>().copied().ok_or_else(|| ConnectError::permission_denied("the call was not made with the admin token"))
}

fn store_error(error: &StoreError) -> ConnectError {
    match error {
        StoreError::NoSuchTenant(_) | StoreError::NoSuchKey(_) | StoreError::NoSuchHost(_) => ConnectError::not_found(error.to_string()),
        StoreError::TenantExists(_) | StoreError::HostExists(_) => ConnectError::already_exists(error.to_string()),
        StoreError::HostNotEmpty { .. } => ConnectError::failed_precondition(error.to_string()),
        _ => {
            tracing::error!(%error, "fleet store failed");
            ConnectError::unavailable(format!("the gateway cannot reach its store: {error}"))
        }
    }
}

fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn resource(value: Resource) -> admin::HostResource {
    admin::HostResource { total: count(value.total), used: count(value.used), ..Default::default() }
}

fn host_to_wire(view: &crate::hosts::HostView, placed: usize) -> admin::Host {
    let capacity = view.status.capacity.clone().unwrap_or_default();
    admin::Host {
        name: view.record.name.clone(),
        url: view.record.url.clone(),
        mode: view.record.mode.name().into(),
        health: view.status.health.name().into(),
        health_reason: view.status.health.reason().into(),
        last_seen_timestamp: view.status.last_seen_ms.map_or(0, count),
        vcpus: buffa::MessageField::some(resource(capacity.vcpus)),
        memory_bytes: buffa::MessageField::some(resource(capacity.memory_bytes)),
        vms: buffa::MessageField::some(resource(capacity.vms)),
        vmms: capacity.vmms,
        placed_vms: count(placed as u64),
        last_announced_timestamp: view.record.announced_at_ms.map_or(0, count),
        silent: view.silent,
        ..Default::default()
    }
}

fn quota_from_wire(quota: Option<&admin::Quota>) -> Result<Quota, ConnectError> {
    let Some(quota) = quota else { return Ok(Quota::default()) };
    let limit = |field: &str, value: i64| match value {
        0 => Ok(None),
        value if value < 0 => Err(ConnectError::invalid_argument(format!("quota.{field}: {value} is negative; 0 is no limit"))),
        value => Ok(Some(value.unsigned_abs())),
    };
    Ok(Quota {
        max_vms: limit("max_vms", quota.max_vms)?,
        max_vcpus: limit("max_vcpus", quota.max_vcpus)?,
        max_memory_bytes: limit("max_memory_bytes", quota.max_memory_bytes)?,
    })
}

fn tenant_to_wire(tenant: &Tenant) -> admin::Tenant {
    let limit = |value: Option<u64>| value.map_or(0, count);
    admin::Tenant {
        id: tenant.id.clone(),
        quota: buffa::MessageField::some(admin::Quota {
            max_vms: limit(tenant.quota.max_vms),
            max_vcpus: limit(tenant.quota.max_vcpus),
            max_memory_bytes: limit(tenant.quota.max_memory_bytes),
            ..Default::default()
        }),
        created_timestamp: count(tenant.created_at_ms),
        ..Default::default()
    }
}

fn key_to_wire(key: &KeyRecord) -> admin::ApiKey {
    let time = |value: Option<u64>| value.map_or(0, count);
    admin::ApiKey {
        id: key.id.clone(),
        masked: masked(&key.id),
        tenant_id: key.tenant.clone(),
        label: key.label.clone(),
        created_timestamp: count(key.created_at_ms),
        expires_timestamp: time(key.expires_at_ms),
        revoked_timestamp: time(key.revoked_at_ms),
        last_used_timestamp: time(key.last_used_ms),
        ..Default::default()
    }
}

#[allow(refining_impl_trait)]
impl admin::AdminService for AdminApi {
    async fn add_host(&self, ctx: RequestContext, request: ServiceRequest<'_, admin::AddHostRequest>) -> ServiceResult<admin::Host> {
        admitted(&ctx)?;
        let record = HostRecord {
            name: request.name.to_owned(),
            url: request.url.to_owned(),
            mode: HostMode::Active,
            added_at_ms: metald_types::time::unix_millis_now(),
            announced_at_ms: None,
        };
        self.hosts.check(&record).map_err(|error| ConnectError::invalid_argument(error.to_string()))?;
        self.store.add_host(record.clone()).await.map_err(|error| store_error(&error))?;
        let host = self.hosts.insert(record).map_err(|error| ConnectError::invalid_argument(error.to_string()))?;
        tracing::info!(host = %host.name, "host added");
        host.probe().await;
        Response::ok(self.host_answer(&host.name).await?)
    }

    async fn list_hosts(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, admin::ListHostsRequest>,
    ) -> ServiceResult<admin::ListHostsResponse> {
        admitted(&ctx)?;
        let placements = self.store.placements(None).await.map_err(|error| store_error(&error))?;
        let hosts = self
            .hosts
            .all()
            .iter()
            .map(|host| host_to_wire(&host.view(), placements.iter().filter(|placement| placement.host == host.name).count()))
            .collect();
        Response::ok(admin::ListHostsResponse { hosts, ..Default::default() })
    }

    async fn cordon_host(&self, ctx: RequestContext, request: ServiceRequest<'_, admin::HostRequest>) -> ServiceResult<admin::Host> {
        Response::ok(self.set_mode(&ctx, request.name, HostMode::Cordoned).await?)
    }

    async fn uncordon_host(&self, ctx: RequestContext, request: ServiceRequest<'_, admin::HostRequest>) -> ServiceResult<admin::Host> {
        Response::ok(self.set_mode(&ctx, request.name, HostMode::Active).await?)
    }

    async fn drain_host(&self, ctx: RequestContext, request: ServiceRequest<'_, admin::HostRequest>) -> ServiceResult<admin::Host> {
        Response::ok(self.set_mode(&ctx, request.name, HostMode::Draining).await?)
    }

    async fn remove_host(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::RemoveHostRequest>,
    ) -> ServiceResult<admin::RemoveHostResponse> {
        admitted(&ctx)?;
        let name = request.name.to_owned();
        self.store.remove_host(&name, request.force).await.map_err(|error| store_error(&error))?;
        if request.force {
            for placement in self.store.placements(Some(&name)).await.map_err(|error| store_error(&error))? {
                self.store.remove_placement(&placement.vm_id).await.map_err(|error| store_error(&error))?;
            }
        }
        self.hosts.remove(&name);
        tracing::info!(host = %name, force = request.force, "host removed");
        Response::ok(admin::RemoveHostResponse::default())
    }

    async fn create_tenant(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::CreateTenantRequest>,
    ) -> ServiceResult<admin::Tenant> {
        admitted(&ctx)?;
        let request = request.to_owned_message();
        let id = TenantId::new(request.id.as_str()).map_err(|error| ConnectError::invalid_argument(format!("id: {error}")))?;
        let tenant = Tenant {
            id: id.to_string(),
            quota: quota_from_wire(request.quota.as_option())?,
            created_at_ms: metald_types::time::unix_millis_now(),
        };
        self.store.create_tenant(tenant.clone()).await.map_err(|error| store_error(&error))?;
        Response::ok(tenant_to_wire(&tenant))
    }

    async fn set_tenant_quota(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::SetTenantQuotaRequest>,
    ) -> ServiceResult<admin::Tenant> {
        admitted(&ctx)?;
        let request = request.to_owned_message();
        let quota = quota_from_wire(request.quota.as_option())?;
        let tenant = self.store.set_quota(&request.id, quota).await.map_err(|error| store_error(&error))?;
        Response::ok(tenant_to_wire(&tenant))
    }

    async fn list_tenants(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, admin::ListTenantsRequest>,
    ) -> ServiceResult<admin::ListTenantsResponse> {
        admitted(&ctx)?;
        let tenants = self.store.tenants().await.map_err(|error| store_error(&error))?;
        Response::ok(admin::ListTenantsResponse { tenants: tenants.iter().map(tenant_to_wire).collect(), ..Default::default() })
    }

    async fn create_api_key(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::CreateApiKeyRequest>,
    ) -> ServiceResult<admin::CreateApiKeyResponse> {
        admitted(&ctx)?;
        if request.expires_timestamp < 0 {
            return Err(ConnectError::invalid_argument("expires_timestamp: negative; 0 is never"));
        }
        let made = NewKey::generate();
        let record = KeyRecord {
            id: made.id.clone(),
            tenant: request.tenant_id.to_owned(),
            digest: made.digest,
            label: request.label.to_owned(),
            created_at_ms: metald_types::time::unix_millis_now(),
            expires_at_ms: (request.expires_timestamp > 0).then(|| request.expires_timestamp.unsigned_abs()),
            revoked_at_ms: None,
            last_used_ms: None,
        };
        self.store.insert_key(record.clone()).await.map_err(|error| store_error(&error))?;
        tracing::info!(key = %masked(&record.id), tenant = %record.tenant, "API key made");
        Response::ok(admin::CreateApiKeyResponse {
            key: made.key.clone(),
            info: buffa::MessageField::some(key_to_wire(&record)),
            ..Default::default()
        })
    }

    async fn list_api_keys(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::ListApiKeysRequest>,
    ) -> ServiceResult<admin::ListApiKeysResponse> {
        admitted(&ctx)?;
        let tenant = (!request.tenant_id.is_empty()).then_some(request.tenant_id);
        let keys = self.store.keys(tenant).await.map_err(|error| store_error(&error))?;
        Response::ok(admin::ListApiKeysResponse { keys: keys.iter().map(key_to_wire).collect(), ..Default::default() })
    }

    async fn revoke_api_key(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, admin::RevokeApiKeyRequest>,
    ) -> ServiceResult<admin::ApiKey> {
        admitted(&ctx)?;
        let id = request.id.trim_start_matches(crate::keys::KEY_PREFIX).trim_end_matches("_…").to_owned();
        let key = self.store.revoke_key(&id, metald_types::time::unix_millis_now()).await.map_err(|error| store_error(&error))?;
        self.auth.forget_key(&key.id);
        tracing::info!(key = %masked(&key.id), tenant = %key.tenant, "API key revoked");
        Response::ok(key_to_wire(&key))
    }

    async fn list_stray_vms(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, admin::ListStrayVmsRequest>,
    ) -> ServiceResult<admin::ListStrayVmsResponse> {
        admitted(&ctx)?;
        let vms = self
            .strays
            .all()
            .into_iter()
            .map(|stray| admin::StrayVm { host: stray.host, vm_id: stray.vm_id, customer_id: stray.tenant, ..Default::default() })
            .collect();
        Response::ok(admin::ListStrayVmsResponse { vms, ..Default::default() })
    }
}
