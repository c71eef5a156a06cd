//! `vmprovisioner.v1.VmService` for one host: every call acts for the
//! authenticated tenant, on that tenant's VMs only. Another tenant's VM
//! answers exactly as a VM that does not exist. One thing is shared: VM
//! ids are unique on a host, so a create naming an id another tenant
//! holds is refused as `already_exists` (use generated ids, which are
//! unguessable, to reveal nothing).
//!
//! Why a VM failed is told to its tenant with the host's own paths
//! replaced by `<host>`; the log keeps them.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream};
use metald_api::convert::event::event_to_wire;
use metald_api::convert::info::{metrics_to_wire, uptime, vm_info_to_wire, vm_summary_to_wire};
use metald_api::convert::non_negative_i32;
use metald_api::convert::request::{
    console_max_bytes_from_wire, create_vm_from_wire, optional_vm_id_from_wire, stop_options_from_wire, vm_id_from_wire,
};
use metald_api::convert::state::{state_filter_from_wire, state_to_wire};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::{manager_error_to_connect, wire_error_to_connect};
use metald_core::manager::ManagerError;
use metald_core::operations::{Boot, Delete, InfoWithMetrics, Pause, Reboot, Resume, Shutdown};
use metald_core::{TenantId, VmId, VmManager, VmTarget};
use tokio::sync::{broadcast, watch};

use crate::auth::Caller;
use crate::config::ApiSettings;
use crate::metrics::Metrics;
use crate::quota::{Quotas, Usage};

/// The last CPU reading of a VM, for the CPU percent of the next `GetVmInfo`,
/// and the percent measured when it was taken.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    cpu_time_ns: u64,
    percent: f64,
}

/// The shortest interval a CPU percent is measured over: the process's CPU
/// time counts in clock ticks (10 ms), which over a few milliseconds would
/// read as more CPUs than the host has.
const MIN_CPU_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
pub struct VmApi {
    manager: VmManager,
    quotas: Quotas,
    metrics: std::sync::Arc<Metrics>,
    api: ApiSettings,
    cpu_samples: Mutex<HashMap<VmId, CpuSample>>,
    /// Turns true when the daemon stops: open watch streams end.
    stopping: watch::Receiver<bool>,
    redactor: Redactor,
}

/// Replaces the host's folders in text meant for tenants.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    paths: Vec<String>,
}

impl Redactor {
    /// Hides each of `paths`, as given and as the file system resolves them.
    pub fn new(paths: &[&std::path::Path]) -> Self {
        let mut hidden: Vec<String> = paths
            .iter()
            .flat_map(|path| [Some(path.to_path_buf()), path.canonicalize().ok()])
            .flatten()
            .filter_map(|path| path.to_str().map(str::to_owned))
            .filter(|path| path.len() > 1)
            .collect();
        // Longest first, so a folder inside another is replaced whole.
        hidden.sort_by_key(|path| std::cmp::Reverse(path.len()));
        hidden.dedup();
        Self { paths: hidden }
    }

    pub fn redact(&self, text: &str) -> String {
        self.paths.iter().fold(text.to_owned(), |text, path| text.replace(path.as_str(), "<host>"))
    }
}

impl VmApi {
    pub fn new(
        manager: VmManager,
        quotas: Quotas,
        metrics: std::sync::Arc<Metrics>,
        api: ApiSettings,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self { manager, quotas, metrics, api, cpu_samples: Mutex::default(), stopping, redactor: Redactor::default() }
    }

    pub fn with_redactor(self, redactor: Redactor) -> Self {
        Self { redactor, ..self }
    }

    /// One page of `tenant`'s VMs, or of every tenant's for the operator
    /// (`None`), as `ListVms` answers it.
    /// What the host holds at most, and what its VMs and creates in flight hold.
    pub fn capacity_and_usage(&self) -> (crate::quota::Capacity, Usage) {
        (self.quotas.capacity(), self.quotas.host_usage(&self.manager))
    }

    /// The VMMs a VM may name, the host's default first.
    pub fn vmms(&self) -> Vec<&'static str> {
        self.manager.backend_names()
    }

    pub fn list_page(&self, tenant: Option<&TenantId>, message: &wire::ListVmsRequest) -> Result<wire::ListVmsResponse, ConnectError> {
        let states = state_filter_from_wire(&message.state_filter).map_err(|error| wire_error_to_connect(&error))?;
        let asked = non_negative_i32("page_size", message.page_size).map_err(|error| wire_error_to_connect(&error))?;
        let page_size = match usize::try_from(asked) {
            Ok(0) | Err(_) => self.api.default_page_size,
            // More than the host gives in one page is trimmed, not refused.
            Ok(asked) => asked.min(self.api.max_page_size),
        };
        let after = page_token_from_wire(&message.page_token)?;
        let page = self.manager.list_page(tenant, &states, after.as_ref(), page_size);
        let next_page_token = match (page.more, page.vms.last()) {
            (true, Some(last)) => page_token_to_wire(&last.vm_id),
            _ => String::new(),
        };
        let total_count = i32::try_from(page.total).unwrap_or(i32::MAX);
        Ok(wire::ListVmsResponse {
            vms: page
                .vms
                .iter()
                .map(|vm| {
                    let mut entry = vm_summary_to_wire(vm);
                    entry.failure_reason = self.redactor.redact(&entry.failure_reason);
                    entry
                })
                .collect(),
            next_page_token,
            total_count,
            ..Default::default()
        })
    }

    /// A manager error for the caller, counting the backend's failures.
    fn fail(&self, error: &ManagerError) -> ConnectError {
        self.count_backend_error(error);
        manager_error_to_connect(error)
    }

    fn count_backend_error(&self, error: &ManagerError) {
        if let ManagerError::Backend { operation, .. } = error {
            self.metrics.backend_error(operation.label());
        }
    }

    /// The caller's VM named in `field`, or NotFound, whether the VM is
    /// missing or another tenant's: the two answers are the same. Looked at
    /// first, so a missing VM is said before the rest of the request is
    /// judged; the manager checks again under the VM's lock as it acts, so
    /// a VM that passed to another tenant in between is not acted on.
    fn own_vm(&self, caller: &Caller, field: &str, value: &str) -> Result<VmTarget, ConnectError> {
        let vm_id = vm_id_from_wire(field, value).map_err(|error| wire_error_to_connect(&error))?;
        tracing::Span::current().record("vm_id", tracing::field::display(vm_id.as_str()));
        let target = VmTarget::of_tenant(&caller.tenant, &vm_id);
        self.manager.find(&target).map_err(|error| self.fail(&error))?;
        Ok(target)
    }

    fn state_now(&self, vm: &VmTarget) -> wire::VmState {
        self.manager.state(vm).map_or(wire::VmState::VM_STATE_UNSPECIFIED, state_to_wire)
    }

    /// CPU percent (100 = one host CPU) over the interval between two
    /// `GetVmInfo` of this VM (by any caller) at least [`MIN_CPU_INTERVAL`]
    /// apart: the latest such interval's figure. The first look after a
    /// boot, a reboot or a takeover has no interval yet and says 0. The VMM's
    /// CPU time counts its earlier processes and the time before its guest
    /// booted, so it is never divided by the time since the boot.
    fn cpu_percent(&self, vm_id: &VmId, cpu_time_ns: u64) -> f64 {
        let now = Instant::now();
        let mut samples = self.cpu_samples.lock().unwrap_or_else(PoisonError::into_inner);
        let percent = match samples.get(vm_id) {
            Some(sample) if now.duration_since(sample.at) < MIN_CPU_INTERVAL => return sample.percent,
            Some(sample) if cpu_time_ns >= sample.cpu_time_ns => {
                let wall = now.duration_since(sample.at);
                (cpu_time_ns - sample.cpu_time_ns) as f64 / wall.as_nanos() as f64 * 100.0
            }
            _ => 0.0,
        };
        samples.insert(vm_id.clone(), CpuSample { at: now, cpu_time_ns, percent });
        percent
    }

    fn forget_samples(&self, vm_id: &VmId) {
        self.cpu_samples.lock().unwrap_or_else(PoisonError::into_inner).remove(vm_id);
    }
}

/// The authenticated caller, which the interceptor put into the request.
fn caller(ctx: &RequestContext) -> Result<Caller, ConnectError> {
    ctx.extensions().get::<Caller>().cloned().ok_or_else(|| ConnectError::unauthenticated("the call carries no authenticated tenant"))
}

#[allow(refining_impl_trait)]
impl wire::VmService for VmApi {
    async fn create_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::CreateVmRequest>,
    ) -> ServiceResult<wire::CreateVmResponse> {
        let caller = caller(&ctx)?;
        let message = request.to_owned_message();
        let create = create_vm_from_wire(&message, caller.tenant.clone()).map_err(|error| wire_error_to_connect(&error))?;
        if let Some(vm_id) = &create.vm_id {
            tracing::Span::current().record("vm_id", tracing::field::display(vm_id.as_str()));
        }
        // An invalid request is told so before any quota or capacity is counted.
        self.manager.check_config(&create.config).map_err(|error| manager_error_to_connect(&error))?;
        let asked = Usage { vms: 1, vcpus: create.config.cpu.vcpu_count.into(), memory_bytes: create.config.memory.size_bytes };
        let admission = self
            .quotas
            .admit(&self.manager, &caller.tenant, asked)
            .map_err(|exceeded| ConnectError::resource_exhausted(exceeded.to_string()))?;
        // The create runs on when its caller hangs up or its deadline passes;
        // so does its share of the quota, or cancelled creates could pass it.
        let vm_id = self.manager.create_holding(create, admission).await.map_err(|error| self.fail(&error))?;
        tracing::Span::current().record("vm_id", tracing::field::display(vm_id.as_str()));
        let state = self.state_now(&VmTarget::of_tenant(&caller.tenant, &vm_id));
        Response::ok(wire::CreateVmResponse { vm_id: vm_id.to_string(), state: state.into(), ..Default::default() })
    }

    async fn delete_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::DeleteVmRequest>,
    ) -> ServiceResult<wire::DeleteVmResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        let vm_id = vm.vm_id().clone();
        let options = stop_options_from_wire(request.force, 0).map_err(|error| wire_error_to_connect(&error))?;
        self.manager.run(&vm, Delete(options)).await.map_err(|error| self.fail(&error))?;
        self.forget_samples(&vm_id);
        Response::ok(wire::DeleteVmResponse { success: true, ..Default::default() })
    }

    async fn boot_vm(&self, ctx: RequestContext, request: ServiceRequest<'_, wire::BootVmRequest>) -> ServiceResult<wire::BootVmResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        let vm_id = vm.vm_id().clone();
        let started = Instant::now();
        self.manager.run(&vm, Boot).await.map_err(|error| self.fail(&error))?;
        self.metrics.observe_boot(started.elapsed());
        self.forget_samples(&vm_id);
        Response::ok(wire::BootVmResponse { success: true, state: self.state_now(&vm).into(), ..Default::default() })
    }

    async fn shutdown_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ShutdownVmRequest>,
    ) -> ServiceResult<wire::ShutdownVmResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        let options = stop_options_from_wire(request.force, request.timeout_seconds).map_err(|error| wire_error_to_connect(&error))?;
        let outcome = self.manager.run(&vm, Shutdown(options)).await.map_err(|error| self.fail(&error))?;
        Response::ok(wire::ShutdownVmResponse {
            success: true,
            state: self.state_now(&vm).into(),
            killed: outcome.forced,
            ..Default::default()
        })
    }

    async fn pause_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::PauseVmRequest>,
    ) -> ServiceResult<wire::PauseVmResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        self.manager.run(&vm, Pause).await.map_err(|error| self.fail(&error))?;
        Response::ok(wire::PauseVmResponse { success: true, state: self.state_now(&vm).into(), ..Default::default() })
    }

    async fn resume_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ResumeVmRequest>,
    ) -> ServiceResult<wire::ResumeVmResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        self.manager.run(&vm, Resume).await.map_err(|error| self.fail(&error))?;
        Response::ok(wire::ResumeVmResponse { success: true, state: self.state_now(&vm).into(), ..Default::default() })
    }

    async fn reboot_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::RebootVmRequest>,
    ) -> ServiceResult<wire::RebootVmResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        let vm_id = vm.vm_id().clone();
        let options = stop_options_from_wire(request.force, 0).map_err(|error| wire_error_to_connect(&error))?;
        self.manager.run(&vm, Reboot(options)).await.map_err(|error| self.fail(&error))?;
        self.forget_samples(&vm_id);
        Response::ok(wire::RebootVmResponse { success: true, state: self.state_now(&vm).into(), ..Default::default() })
    }

    async fn get_vm_info(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::GetVmInfoRequest>,
    ) -> ServiceResult<wire::GetVmInfoResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        let vm_id = vm.vm_id().clone();
        let (info, metrics) = self.manager.run(&vm, InfoWithMetrics).await.map_err(|error| self.fail(&error))?;
        let metrics = match metrics {
            Some(Ok(metrics)) => {
                let since_boot = uptime(info.booted_at, SystemTime::now());
                let percent = self.cpu_percent(&vm_id, metrics.cpu_time_ns);
                Some(metrics_to_wire(&metrics, since_boot, percent))
            }
            // The VMM did not answer: the info is still worth answering without figures.
            Some(Err(error)) => {
                self.count_backend_error(&error);
                tracing::warn!(%vm_id, error = %metald_core::error_chain(&error), "metrics unavailable");
                None
            }
            None => None,
        };
        let mut answer = vm_info_to_wire(&info, metrics);
        answer.failure_reason = self.redactor.redact(&answer.failure_reason);
        Response::ok(answer)
    }

    async fn list_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::ListVmsRequest>,
    ) -> ServiceResult<wire::ListVmsResponse> {
        let caller = caller(&ctx)?;
        Response::ok(self.list_page(Some(&caller.tenant), &request.to_owned_message())?)
    }

    async fn get_console(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::GetConsoleRequest>,
    ) -> ServiceResult<wire::GetConsoleResponse> {
        let caller = caller(&ctx)?;
        let vm = self.own_vm(&caller, "vm_id", request.vm_id)?;
        let vm_id = vm.vm_id().clone();
        let max_bytes = console_max_bytes_from_wire(request.max_bytes).map_err(|error| wire_error_to_connect(&error))?;
        let data = self.manager.console_tail(&vm, max_bytes).map_err(|error| self.fail(&error))?;
        Response::ok(wire::GetConsoleResponse { vm_id: vm_id.to_string(), data, ..Default::default() })
    }

    async fn watch_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, wire::WatchVmsRequest>,
    ) -> ServiceResult<ServiceStream<wire::VmEvent>> {
        let caller = caller(&ctx)?;
        let only = optional_vm_id_from_wire("vm_id", request.vm_id).map_err(|error| wire_error_to_connect(&error))?;
        // Subscribe before the ownership check so nothing between the two is missed.
        let events = self.manager.subscribe();
        if let Some(vm_id) = &only {
            self.own_vm(&caller, "vm_id", vm_id.as_str())?;
        }
        let watch =
            Watch { events, stopping: self.stopping.clone(), tenant: caller.tenant, only, redactor: self.redactor.clone(), ended: false };
        Ok(Response::stream(futures::stream::unfold(watch, Watch::next)))
    }
}

/// One `WatchVms` stream.
struct Watch {
    events: broadcast::Receiver<metald_core::VmEvent>,
    stopping: watch::Receiver<bool>,
    tenant: TenantId,
    only: Option<VmId>,
    redactor: Redactor,
    /// The stream told the caller why it ends; nothing follows.
    ended: bool,
}

impl Watch {
    async fn next(mut self) -> Option<(Result<wire::VmEvent, ConnectError>, Self)> {
        loop {
            if self.ended || *self.stopping.borrow() {
                return None;
            }
            let received = tokio::select! {
                received = self.events.recv() => received,
                _ = self.stopping.changed() => return None,
            };
            match received {
                Ok(event) if event.tenant == self.tenant && self.only.as_ref().is_none_or(|vm_id| &event.vm_id == vm_id) => {
                    let mut wire_event = event_to_wire(&event);
                    wire_event.reason = self.redactor.redact(&wire_event.reason);
                    return Some((Ok(wire_event), self));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let error = ConnectError::aborted(format!(
                        "the watch fell {missed} events behind and was ended; reconnect and read ListVms for the current states"
                    ));
                    self.ended = true;
                    return Some((Err(error), self));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Page tokens are the last VM id of the previous page, in hex so that
/// callers treat them as opaque.
fn page_token_to_wire(last: &VmId) -> String {
    hex::encode(last.as_str())
}

fn page_token_from_wire(token: &str) -> Result<Option<VmId>, ConnectError> {
    if token.is_empty() {
        return Ok(None);
    }
    let refused = || ConnectError::invalid_argument("page_token: not a token this server gave out");
    let bytes = hex::decode(token).map_err(|_| refused())?;
    let text = String::from_utf8(bytes).map_err(|_| refused())?;
    VmId::new(text).map(Some).map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_folders_are_hidden_from_tenants() {
        let redactor = Redactor::new(&[std::path::Path::new("/srv/metald"), std::path::Path::new("/srv/metald/images")]);
        assert_eq!(
            redactor.redact("cannot open /srv/metald/images/k.elf or /srv/metald/vms/vm-1/firecracker.sock"),
            "cannot open <host>/k.elf or <host>/vms/vm-1/firecracker.sock"
        );
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let vm_id = VmId::new("vm-42").unwrap();
        assert_eq!(page_token_from_wire(&page_token_to_wire(&vm_id)).unwrap(), Some(vm_id));
        assert_eq!(page_token_from_wire("").unwrap(), None);
        let error = page_token_from_wire("not-hex").unwrap_err();
        assert_eq!(error.code, connectrpc::ErrorCode::InvalidArgument);
        assert!(error.message.unwrap_or_default().starts_with("page_token:"));
    }
}
