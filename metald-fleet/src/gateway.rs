//! `vmprovisioner.v1.VmService` for many hosts: the same contract a host
//! serves, for the tenant whose API key opened the call. A create is
//! placed ([`crate::placement`]), written to the store before its host is
//! asked, and corrected by the host's answer; every other call goes to the
//! host the store names. A host that cannot be reached makes its VMs'
//! calls `unavailable` naming it, never `not_found`. Lists fan out over
//! every host and say which did not answer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use connectrpc::{ConnectError, ErrorCode, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream};
use metald_api::convert::request::{create_vm_from_wire, vm_id_from_wire};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::{manager_error_to_connect, wire_error_to_connect};
use metald_types::{TenantId, VmId};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::cache::{CacheSettings, RecentReads};
use crate::hosts::{Ask, Host, Hosts, is_unreachable};
use crate::placement;
use crate::store::{FleetStore, Idempotency, Placement, PlacementStatus, Quota, Reservation, StoreError};

/// The request header that makes a create safe to retry.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// How the gateway places and lists.
#[derive(Debug, Clone, Copy)]
pub struct GatewaySettings {
    /// How many fitting hosts a placement samples before taking the emptiest.
    pub placement_choices: usize,
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// How long where a VM is placed is kept before the store is read again.
    pub cache: CacheSettings,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self { placement_choices: 2, default_page_size: 100, max_page_size: 1000, cache: CacheSettings::default() }
    }
}

#[derive(Debug)]
pub struct Gateway {
    store: Arc<dyn FleetStore>,
    hosts: Arc<Hosts>,
    settings: GatewaySettings,
    metrics: Arc<crate::metrics::GatewayMetrics>,
    strays: Arc<crate::reconcile::Strays>,
    /// Where VMs are, as recently read: routing goes on while the store is away.
    placements: RecentReads<Placement>,
    rng: Mutex<rand::rngs::StdRng>,
}

fn caller(ctx: &RequestContext) -> Result<Caller, ConnectError> {
    ctx.extensions().get::<Caller>().cloned().ok_or_else(|| ConnectError::unauthenticated("the call was not made with an API key"))
}

fn procedure(method: &str) -> String {
    format!("/vmprovisioner.v1.VmService/{method}")
}

fn store_unavailable(error: &StoreError) -> ConnectError {
    tracing::error!(%error, "fleet store failed");
    ConnectError::unavailable(format!("the gateway cannot reach its store: {error}"))
}

/// The host's own answer, passed on as the host gave it (its code and message).
fn passed_on(error: ConnectError) -> ConnectError {
    ConnectError::new(error.code, error.message.unwrap_or_default())
}

/// What a tenant is told of a VM that is not theirs, or not anywhere: exactly what a host says.
fn no_such_vm(vm_id: &VmId) -> ConnectError {
    manager_error_to_connect(&metald_core::manager::ManagerError::NotFound(vm_id.clone()))
}

impl Gateway {
    pub fn new(
        store: Arc<dyn FleetStore>,
        hosts: Arc<Hosts>,
        settings: GatewaySettings,
        metrics: Arc<crate::metrics::GatewayMetrics>,
        strays: Arc<crate::reconcile::Strays>,
    ) -> Self {
        let placements = RecentReads::new(settings.cache);
        Self { store, hosts, settings, metrics, strays, placements, rng: Mutex::new(rand::SeedableRng::from_os_rng()) }
    }

    /// Drops placement reads too old to answer even while the store is away.
    pub fn forget_old(&self) {
        self.placements.forget_old();
    }

    fn unreachable(&self, host: &Host, vm_id: Option<&str>, error: &ConnectError) -> ConnectError {
        host.mark_unreachable(error);
        let holds = vm_id.map(|vm_id| format!(", which holds VM {vm_id},")).unwrap_or_default();
        ConnectError::unavailable(format!("host {}{holds} cannot be reached; try again when it is back", host.name))
    }

    /// A host's error as this caller should see it.
    fn host_error(&self, host: &Host, vm_id: &str, error: ConnectError) -> ConnectError {
        if is_unreachable(&error) { self.unreachable(host, Some(vm_id), &error) } else { passed_on(error) }
    }

    /// A placed VM its host answers it does not have is lost: marked so at
    /// once (reconciliation would find the same), and said so.
    async fn lost_if_gone(&self, placement: &Placement, host: &Host, error: ConnectError) -> ConnectError {
        if error.code != ErrorCode::NotFound || is_unreachable(&error) || placement.status != PlacementStatus::Placed {
            return self.host_error(host, &placement.vm_id, error);
        }
        // What was read may be old: another gateway may have deleted or moved it since.
        self.placements.forget(&placement.vm_id);
        match self.store.placement(&placement.vm_id).await {
            Ok(Some(now)) if now.host == placement.host && now.status == PlacementStatus::Placed => {}
            Ok(_) => return passed_on(error),
            Err(store_error) => return store_unavailable(&store_error),
        }
        let reason = lost_reason(&host.name);
        tracing::warn!(vm_id = %placement.vm_id, host = %host.name, "VM lost");
        if let Err(store_error) =
            self.store.update_placement(&placement.vm_id, &host.name, PlacementStatus::Lost { reason: reason.clone() }).await
        {
            return store_unavailable(&store_error);
        }
        self.placements.forget(&placement.vm_id);
        lost_refusal(&placement.vm_id, &reason)
    }

    /// The caller's VM: where it is placed and its host.
    async fn locate(&self, caller: &Caller, vm_id: &str) -> Result<(Placement, Arc<Host>), ConnectError> {
        let id = vm_id_from_wire("vm_id", vm_id).map_err(|error| wire_error_to_connect(&error))?;
        let placement =
            self.placements.get(id.as_str(), self.store.placement(id.as_str())).await.map_err(|error| store_unavailable(&error))?;
        let Some(placement) = placement.filter(|placement| placement.tenant == caller.tenant) else {
            return Err(no_such_vm(&id));
        };
        let host = self.hosts.get(&placement.host).ok_or_else(|| {
            ConnectError::unavailable(format!("host {}, which holds VM {vm_id}, is no longer known to this gateway", placement.host))
        })?;
        Ok((placement, host))
    }

    /// The caller's VM on its host, unless it is lost.
    async fn live(&self, caller: &Caller, vm_id: &str) -> Result<(Placement, Arc<Host>), ConnectError> {
        let (placement, host) = self.locate(caller, vm_id).await?;
        if let PlacementStatus::Lost { reason } = &placement.status {
            return Err(lost_refusal(vm_id, reason));
        }
        Ok((placement, host))
    }

    fn tenant_quota(tenant: Option<crate::store::Tenant>) -> Quota {
        tenant.map(|tenant| tenant.quota).unwrap_or_default()
    }

    async fn create(
        &self,
        ctx: &RequestContext,
        caller: &Caller,
        mut request: wire::CreateVmRequest,
    ) -> Result<wire::CreateVmResponse, ConnectError> {
        let tenant = TenantId::new(caller.tenant.as_str()).map_err(|_| ConnectError::internal("the key's tenant is not a tenant id"))?;
        let create = create_vm_from_wire(&request, tenant).map_err(|error| wire_error_to_connect(&error))?;
        create.config.validate().map_err(|error| manager_error_to_connect(&metald_core::manager::ManagerError::InvalidConfig(error)))?;
        let idempotency = idempotency_of(ctx, &request)?;
        if request.vm_id.is_empty() {
            request.vm_id = VmId::generate().to_string();
        }
        let ask = Ask { vcpus: create.config.cpu.vcpu_count.into(), memory_bytes: create.config.memory.size_bytes };
        let order = {
            let views: Vec<_> = self.hosts.all().iter().map(|host| host.view()).collect();
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            placement::choose(&views, &create.config.vmm, ask, self.settings.placement_choices, &mut *rng).map_err(|no_room| {
                self.metrics.placement_failed("no_room");
                ConnectError::resource_exhausted(no_room.to_string())
            })?
        };
        let quota = Self::tenant_quota(self.store.tenant(&caller.tenant).await.map_err(|error| store_unavailable(&error))?);
        let placement = Placement {
            vm_id: request.vm_id.clone(),
            tenant: caller.tenant.clone(),
            host: order[0].clone(),
            status: PlacementStatus::Pending,
            vcpus: ask.vcpus,
            memory_bytes: ask.memory_bytes,
            created_at_ms: metald_types::time::unix_millis_now(),
        };
        match self.store.reserve_placement(placement, quota, idempotency).await {
            Ok(Reservation::Reserved) => {}
            Ok(Reservation::Existing(earlier)) => return Ok(self.answer_again(caller, &earlier).await),
            Err(error @ StoreError::QuotaExceeded { .. }) => {
                self.metrics.placement_failed("quota");
                return Err(ConnectError::resource_exhausted(error.to_string()));
            }
            Err(error @ StoreError::IdempotencyKeyReused { .. }) => return Err(ConnectError::failed_precondition(error.to_string())),
            Err(StoreError::VmExists(vm_id)) => {
                return Err(manager_error_to_connect(&metald_core::manager::ManagerError::AlreadyExists(
                    VmId::new(vm_id).map_err(|_| ConnectError::internal("a stored VM id is not a VM id"))?,
                )));
            }
            Err(error) => return Err(store_unavailable(&error)),
        }
        let vm_id = request.vm_id.clone();
        let outcome = self.create_on_hosts(ctx, caller, &order, request, ask).await;
        match outcome {
            Ok(answer) => Ok(answer),
            Err(error) => {
                if let Err(store_error) = self.store.remove_placement(&vm_id).await {
                    tracing::error!(%vm_id, error = %store_error, "cannot forget a VM whose create failed");
                }
                self.placements.forget(&vm_id);
                Err(error)
            }
        }
    }

    /// Asks each host in `order` to make the VM until one does; a host
    /// that is full or cannot be reached passes it to the next.
    async fn create_on_hosts(
        &self,
        ctx: &RequestContext,
        caller: &Caller,
        order: &[String],
        request: wire::CreateVmRequest,
        ask: Ask,
    ) -> Result<wire::CreateVmResponse, ConnectError> {
        let vm_id = request.vm_id.clone();
        let mut refusals = Vec::new();
        for (index, name) in order.iter().enumerate() {
            let Some(host) = self.hosts.get(name) else { continue };
            if index > 0 {
                self.store.update_placement(&vm_id, name, PlacementStatus::Pending).await.map_err(|error| store_unavailable(&error))?;
            }
            let in_flight = host.reserve(ask);
            let options = host.link().call_options(&caller.tenant, &procedure("CreateVm"), &request, ctx.deadline());
            match host.link().vms.create_vm_with_options(request.clone(), options).await {
                Ok(answer) => {
                    in_flight.made();
                    // Forgotten after the write: a read between the two would keep the old row.
                    self.store.update_placement(&vm_id, name, PlacementStatus::Placed).await.map_err(|error| store_unavailable(&error))?;
                    self.placements.forget(&vm_id);
                    tracing::info!(%vm_id, host = %name, tenant = %caller.tenant, "VM placed");
                    return Ok(answer.into_owned());
                }
                Err(error) if error.code == ErrorCode::ResourceExhausted && !is_unreachable(&error) => {
                    refusals.push(format!("{name}: {}", error.message.unwrap_or_default()));
                }
                Err(error) if is_unreachable(&error) => {
                    self.unreachable(&host, None, &error);
                    refusals.push(format!("{name}: cannot be reached"));
                }
                Err(error) => return Err(passed_on(error)),
            }
        }
        self.metrics.placement_failed("hosts_refused");
        Err(ConnectError::resource_exhausted(format!("no host could take VM {vm_id}: {}", refusals.join("; "))))
    }

    /// The answer to a create retried with its idempotency key: the VM it made.
    async fn answer_again(&self, caller: &Caller, earlier: &Placement) -> wire::CreateVmResponse {
        let mut answer = wire::CreateVmResponse { vm_id: earlier.vm_id.clone(), ..Default::default() };
        if let Some(host) = self.hosts.get(&earlier.host) {
            let request = wire::GetVmInfoRequest { vm_id: earlier.vm_id.clone(), ..Default::default() };
            let options = host.link().call_options(&caller.tenant, &procedure("GetVmInfo"), &request, None);
            if let Ok(info) = host.link().vms.get_vm_info_with_options(request, options).await {
                answer.state = info.into_owned().state;
            }
        }
        answer
    }
}

/// A create's idempotency key, with the digest of what it asked.
fn idempotency_of(ctx: &RequestContext, request: &wire::CreateVmRequest) -> Result<Option<Idempotency>, ConnectError> {
    let Some(value) = ctx.headers().get(IDEMPOTENCY_HEADER) else { return Ok(None) };
    let key = value.to_str().ok().filter(|key| !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_BYTES).ok_or_else(|| {
        ConnectError::invalid_argument(format!("{IDEMPOTENCY_HEADER}: 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"))
    })?;
    let request_digest = Sha256::digest(buffa::Message::encode_to_vec(request)).into();
    Ok(Some(Idempotency { key: key.to_owned(), request_digest }))
}

/// A page token of the gateway: the last VM id of the previous page, as a host's.
fn page_token(last: &str) -> String {
    hex::encode(last)
}

fn after_of(token: &str) -> Result<Option<String>, ConnectError> {
    if token.is_empty() {
        return Ok(None);
    }
    let refused = || ConnectError::invalid_argument("page_token: not a token this server gave out");
    let text = String::from_utf8(hex::decode(token).map_err(|_| refused())?).map_err(|_| refused())?;
    VmId::new(text.as_str()).map_err(|_| refused())?;
    Ok(Some(text))
}

pub(crate) fn lost_reason(host: &str) -> String {
    format!("lost: host {host} answers and no longer has this VM")
}

fn lost_refusal(vm_id: &str, reason: &str) -> ConnectError {
    ConnectError::failed_precondition(format!("VM {vm_id} is lost ({reason}); delete it"))
}

/// A lost VM as `GetVmInfo` shows it: failed, with why.
fn lost_info(placement: &Placement, reason: &str) -> wire::GetVmInfoResponse {
    wire::GetVmInfoResponse {
        vm_id: placement.vm_id.clone(),
        state: wire::VmState::VM_STATE_FAILED.into(),
        failure_reason: reason.to_owned(),
        customer_id: placement.tenant.clone(),
        created_timestamp: i64::try_from(placement.created_at_ms).unwrap_or(0),
        ..Default::default()
    }
}

/// A lost VM as a list shows it: failed, with why.
fn lost_in_list(placement: &Placement, reason: &str) -> wire::VmInfo {
    wire::VmInfo {
        vm_id: placement.vm_id.clone(),
        state: wire::VmState::VM_STATE_FAILED.into(),
        vcpu_count: i32::try_from(placement.vcpus).unwrap_or(i32::MAX),
        memory_size_bytes: i64::try_from(placement.memory_bytes).unwrap_or(i64::MAX),
        created_timestamp: i64::try_from(placement.created_at_ms).unwrap_or(0),
        customer_id: placement.tenant.clone(),
        failure_reason: reason.to_owned(),
        ..Default::default()
    }
}

impl Gateway {
    async fn list(
        &self,
        ctx: &RequestContext,
        caller: &Caller,
        request: wire::ListVmsRequest,
    ) -> Result<wire::ListVmsResponse, ConnectError> {
        if request.page_size < 0 {
            return Err(ConnectError::invalid_argument(format!(
                "page_size: {} is negative; no negative value is allowed here",
                request.page_size
            )));
        }
        let size = match usize::try_from(request.page_size).unwrap_or(0) {
            0 => self.settings.default_page_size,
            asked => asked.min(self.settings.max_page_size),
        };
        let after = after_of(&request.page_token)?;
        let hosts = self.hosts.all();
        let asks = hosts.iter().map(|host| {
            let mut page = request.clone();
            page.page_size = i32::try_from(size).unwrap_or(i32::MAX);
            page.page_token = after.as_deref().map(page_token).unwrap_or_default();
            let options = host.link().call_options(&caller.tenant, &procedure("ListVms"), &page, ctx.deadline());
            async move { (host, host.link().vms.list_vms_with_options(page, options).await) }
        });
        let mut vms = Vec::new();
        let (mut total, mut more, mut unreachable_hosts) = (0i64, false, Vec::new());
        for (host, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(answer) => {
                    // VMs the host has and the store does not place there are strays: reported, not listed.
                    let answer = answer.into_owned();
                    let states: Vec<wire::VmState> = request.state_filter.iter().filter_map(|state| state.as_known()).collect();
                    let strays = self.strays.count(&host.name, &caller.tenant, &states);
                    total += i64::from(answer.total_count) - i64::try_from(strays).unwrap_or(0);
                    more |= !answer.next_page_token.is_empty();
                    vms.extend(answer.vms.into_iter().filter(|vm| !self.strays.contains(&host.name, &vm.vm_id)));
                }
                Err(error) if is_unreachable(&error) => {
                    host.mark_unreachable(&error);
                    unreachable_hosts.push(host.name.clone());
                }
                // A host's refusal of the request (a bad filter) is the caller's to hear.
                Err(error) => return Err(passed_on(error)),
            }
        }
        let wants_failed = request.state_filter.is_empty()
            || request.state_filter.iter().any(|state| state.as_known() == Some(wire::VmState::VM_STATE_FAILED));
        if wants_failed {
            for placement in self.store.lost_placements(&caller.tenant).await.map_err(|error| store_unavailable(&error))? {
                if let PlacementStatus::Lost { reason } = &placement.status {
                    total += 1;
                    if after.as_ref().is_none_or(|after| placement.vm_id > *after) {
                        vms.push(lost_in_list(&placement, reason));
                    }
                }
            }
        }
        vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        more |= vms.len() > size;
        vms.truncate(size);
        let next_page_token = match (more, vms.last()) {
            (true, Some(last)) => page_token(&last.vm_id),
            _ => String::new(),
        };
        Ok(wire::ListVmsResponse {
            vms,
            next_page_token,
            total_count: i32::try_from(total).unwrap_or(i32::MAX),
            unreachable_hosts,
            ..Default::default()
        })
    }
}

/// Forwards a call about one VM to its host: `$method` is the client's
/// method, `$name` the procedure's.
macro_rules! forward {
    ($self:ident, $ctx:ident, $request:ident, $method:ident, $name:literal) => {{
        let caller = caller(&$ctx)?;
        let request = $request.to_owned_message();
        let (placement, host) = $self.live(&caller, &request.vm_id).await?;
        let options = host.link().call_options(&caller.tenant, &procedure($name), &request, $ctx.deadline());
        match host.link().vms.$method(request, options).await {
            Ok(answer) => Response::ok(answer.into_owned()),
            Err(error) => Err($self.lost_if_gone(&placement, &host, error).await),
        }
    }};
}

#[allow(refining_impl_trait)]
impl wire::VmService for Gateway {
    async fn create_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::CreateVmRequest>,
    ) -> ServiceResult<wire::CreateVmResponse> {
        let caller = caller(&ctx)?;
        let started = Instant::now();
        let answer = self.create(&ctx, &caller, request.to_owned_message()).await;
        tracing::debug!(elapsed = ?started.elapsed(), ok = answer.is_ok(), "create placed");
        Response::ok(answer?)
    }

    async fn delete_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::DeleteVmRequest>,
    ) -> ServiceResult<wire::DeleteVmResponse> {
        let caller = caller(&ctx)?;
        let request = request.to_owned_message();
        let (placement, host) = self.locate(&caller, &request.vm_id).await?;
        let vm_id = request.vm_id.clone();
        if !matches!(placement.status, PlacementStatus::Lost { .. }) {
            let options = host.link().call_options(&caller.tenant, &procedure("DeleteVm"), &request, ctx.deadline());
            match host.link().vms.delete_vm_with_options(request, options).await {
                Ok(_) => {}
                // The host no longer has it: forgetting it is what the caller asked.
                Err(error) if error.code == ErrorCode::NotFound && !is_unreachable(&error) => {}
                Err(error) => return Err(self.host_error(&host, &vm_id, error)),
            }
        }
        self.store.remove_placement(&vm_id).await.map_err(|error| store_unavailable(&error))?;
        self.placements.forget(&vm_id);
        Response::ok(wire::DeleteVmResponse { success: true, ..Default::default() })
    }

    async fn boot_vm(&self, ctx: RequestContext, request: ServiceRequest<'_, wire::BootVmRequest>) -> ServiceResult<wire::BootVmResponse> {
        forward!(self, ctx, request, boot_vm_with_options, "BootVm")
    }

    async fn shutdown_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ShutdownVmRequest>,
    ) -> ServiceResult<wire::ShutdownVmResponse> {
        forward!(self, ctx, request, shutdown_vm_with_options, "ShutdownVm")
    }

    async fn pause_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::PauseVmRequest>,
    ) -> ServiceResult<wire::PauseVmResponse> {
        forward!(self, ctx, request, pause_vm_with_options, "PauseVm")
    }

    async fn resume_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ResumeVmRequest>,
    ) -> ServiceResult<wire::ResumeVmResponse> {
        forward!(self, ctx, request, resume_vm_with_options, "ResumeVm")
    }

    async fn reboot_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::RebootVmRequest>,
    ) -> ServiceResult<wire::RebootVmResponse> {
        forward!(self, ctx, request, reboot_vm_with_options, "RebootVm")
    }

    async fn get_vm_info(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::GetVmInfoRequest>,
    ) -> ServiceResult<wire::GetVmInfoResponse> {
        let caller = caller(&ctx)?;
        let request = request.to_owned_message();
        let (placement, host) = self.locate(&caller, &request.vm_id).await?;
        if let PlacementStatus::Lost { reason } = &placement.status {
            return Response::ok(lost_info(&placement, reason));
        }
        let options = host.link().call_options(&caller.tenant, &procedure("GetVmInfo"), &request, ctx.deadline());
        match host.link().vms.get_vm_info_with_options(request, options).await {
            Ok(answer) => Response::ok(answer.into_owned()),
            Err(error) => {
                let error = self.lost_if_gone(&placement, &host, error).await;
                if error.code == ErrorCode::FailedPrecondition {
                    return Response::ok(lost_info(&placement, &lost_reason(&host.name)));
                }
                Err(error)
            }
        }
    }

    async fn list_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ListVmsRequest>,
    ) -> ServiceResult<wire::ListVmsResponse> {
        let caller = caller(&ctx)?;
        Response::ok(self.list(&ctx, &caller, request.to_owned_message()).await?)
    }

    async fn get_console(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::GetConsoleRequest>,
    ) -> ServiceResult<wire::GetConsoleResponse> {
        forward!(self, ctx, request, get_console_with_options, "GetConsole")
    }

    async fn watch_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::WatchVmsRequest>,
    ) -> ServiceResult<ServiceStream<wire::VmEvent>> {
        let caller = caller(&ctx)?;
        crate::watch::merged(self.store.clone(), self.hosts.clone(), caller, request.to_owned_message()).await
    }
}
