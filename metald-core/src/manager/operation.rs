//! The one way an operation on one VM runs. Each operation is a small
//! struct in [`super::operations`] implementing [`VmOperation`]: its name,
//! whether it changes the VM, and what it does to the VM once locked.
//! [`VmManager::run`] gives every one the same frame: the caller's tenant
//! checked on the locked VM, a span `vm.<name>` with the VM, its tenant and
//! VMM, and for a change a task of its own that runs to its end even when
//! the caller stops waiting. A new operation (snapshot, restore, resize) is
//! one new struct and its backend call.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::OwnedMutexGuard;

use super::error::backend_failed;
use super::records::{apply_transition, publish, save_record};
use super::slot::{VmEntry, VmSlot};
use super::{BackendOperation, ManagerError, StopOptions, VmManager};
use crate::backend::{BackendError, StopMode, VmmBackend};
use crate::events::{RunningVmm, VmEventKind};
use crate::ids::VmId;
use crate::state::VmState;
use crate::target::VmTarget;

mod sealed {
    pub trait Sealed {}
}
pub(super) use sealed::Sealed;

/// Something a caller asks of one VM, run by [`VmManager::run`].
pub trait VmOperation: Sealed + Send + 'static {
    type Output: Send + 'static;

    /// One lower-case word: the span is `vm.<NAME>`.
    const NAME: &'static str;

    /// Whether the operation changes the VM. A change runs in a task of
    /// its own, so that a caller who stops waiting (a dropped future, a
    /// client that hung up) cannot leave a VM half-created or half-stopped;
    /// a read runs in the caller's task.
    const CHANGES: bool = true;

    /// Does the operation to the locked VM: checks its state, calls the
    /// backend, records and publishes what changed.
    fn act(self, vm: &mut LockedVm) -> impl Future<Output = Result<Self::Output, ManagerError>> + Send;
}

/// A VM under its lock, as an operation sees it. Its tenant was checked
/// on this very VM, so what an operation does is to the VM the caller owns.
pub struct LockedVm {
    pub(super) manager: VmManager,
    pub(super) slot: Arc<VmSlot>,
    pub(super) entry: OwnedMutexGuard<VmEntry>,
}

impl VmManager {
    /// Runs `operation` on the target's VM; see [`super::operations`] for
    /// what there is (`Boot`, `Pause`, `Shutdown(options)`, `Delete(options)`, `Info`, …).
    pub async fn run<O: VmOperation>(&self, vm: impl Into<VmTarget>, operation: O) -> Result<O::Output, ManagerError> {
        let target = vm.into();
        if !O::CHANGES {
            return operation.act(&mut self.lock(&target).await?).await;
        }
        let manager = self.clone();
        let span = self.operation_span(O::NAME, target.vm_id());
        detached(span, async move { operation.act(&mut manager.lock(&target).await?).await }).await
    }

    /// The span an operation on one VM runs in, with the VM and its tenant,
    /// under the caller's span (an API call's, for the daemon).
    fn operation_span(&self, name: &'static str, vm_id: &VmId) -> tracing::Span {
        let (tenant, vmm) = self.slot(vm_id).map(|slot| (slot.tenant.to_string(), slot.vmm.clone())).unwrap_or_default();
        let otel_name = format!("vm.{name}");
        tracing::info_span!("vm.operation", otel.name = %otel_name, vm_id = %vm_id, tenant = %tenant, vmm = %vmm)
    }

    /// The target's VM, locked. Its tenant is checked on the very VM that
    /// is locked, so the act that follows is on the VM the caller owns.
    pub(super) async fn lock(&self, target: &VmTarget) -> Result<LockedVm, ManagerError> {
        let slot = self.owned_slot(target)?;
        let entry = Arc::clone(&slot.entry).lock_owned().await;
        if entry.state == VmState::Deleted {
            return Err(ManagerError::NotFound(target.vm_id().clone()));
        }
        Ok(LockedVm { manager: self.clone(), slot, entry })
    }
}

impl std::fmt::Debug for LockedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedVm").field("vm_id", &self.slot.vm_id).field("state", &self.entry.state).finish_non_exhaustive()
    }
}

impl LockedVm {
    pub(super) fn vm_id(&self) -> &VmId {
        &self.slot.vm_id
    }

    /// The backend that runs this VM.
    pub(super) fn backend(&self) -> Result<Arc<dyn VmmBackend>, ManagerError> {
        self.manager.backend_of(&self.entry.config)
    }

    /// How to stop the VM as the caller asked: gracefully unless forced or
    /// its VMM cannot ask a guest, then within the caller's timeout or the manager's.
    pub(super) fn stop_mode(&self, options: StopOptions) -> Result<StopMode, ManagerError> {
        if options.force || !self.backend()?.capabilities().graceful_shutdown {
            return Ok(StopMode::Forced);
        }
        Ok(StopMode::Graceful { timeout: options.timeout.unwrap_or(self.manager.inner.stop_timeout) })
    }

    /// What a failed backend call becomes, naming this VM and its VMM.
    pub(super) fn backend_failed(&self, operation: BackendOperation, source: BackendError) -> ManagerError {
        backend_failed(&self.slot.vmm, &self.slot.vm_id, operation, source)
    }

    /// The operation moves the VM to `to`, which the state table must allow from where it is.
    pub(super) fn check(&self, operation: &'static str, to: VmState) -> Result<(), ManagerError> {
        let current = self.entry.state;
        current.transition(to).map(drop).map_err(|source| ManagerError::InvalidState {
            vm_id: self.slot.vm_id.clone(),
            operation,
            current,
            source,
        })
    }

    /// The operation needs the VM in one of `states`, not merely in one
    /// from which the target state is reachable.
    pub(super) fn require(&self, operation: &'static str, states: &[VmState], required: &'static str) -> Result<(), ManagerError> {
        let current = self.entry.state;
        if states.contains(&current) {
            Ok(())
        } else {
            Err(ManagerError::WrongState { vm_id: self.slot.vm_id.clone(), operation, current, required })
        }
    }

    /// Moves the VM to `to`, stores it and publishes `kind`.
    pub(super) async fn transition(&mut self, to: VmState, kind: VmEventKind) {
        apply_transition(&self.slot, &mut self.entry, to);
        self.publish(kind).await;
    }

    /// Stores the VM and publishes `kind`, its state unchanged.
    pub(super) async fn publish(&mut self, kind: VmEventKind) {
        publish(&self.manager.inner, &self.slot, &mut self.entry, kind).await;
    }

    /// The VMM the VM runs on now, as events describe it.
    pub(super) fn running_vmm(&self) -> RunningVmm {
        super::records::running_vmm(&self.entry)
    }

    /// Watches the VMM process for its end, if it is one not yet watched.
    pub(super) fn watch_vmm(&mut self) {
        self.manager.watch_vmm(&self.slot, &mut self.entry);
    }

    /// A guest that has just booted: the VMM is watched and the VM is Running.
    pub(super) async fn booted(&mut self) {
        self.entry.booted_at = Some(SystemTime::now());
        self.entry.failure = None;
        self.watch_vmm();
        let running = self.running_vmm();
        self.transition(VmState::Running, VmEventKind::Booted(running)).await;
    }

    /// A boot or reboot that failed leaves the VM Failed, with no VMM left.
    pub(super) async fn fail(&mut self, operation: BackendOperation, source: BackendError) -> ManagerError {
        let vm_id = self.slot.vm_id.clone();
        let error = self.backend_failed(operation, source);
        let reason = crate::error_chain(&error);
        match self.entry.instance.stop(StopMode::Forced).await {
            Ok(outcome) => self.entry.last_exit = Some(outcome.exit),
            Err(BackendError::NotRunning) => {}
            Err(stop_error) => tracing::error!(%vm_id, error = %crate::error_chain(&stop_error), "cannot stop the VMM of a failed VM"),
        }
        self.entry.failure = Some(reason.clone());
        let booted_at = self.entry.booted_at.take();
        if self.entry.state.can_transition_to(VmState::Failed) {
            let exit = self.entry.last_exit;
            let usage = self.entry.instance.take_ended_usage();
            let failed = VmEventKind::Failed { reason, exit, usage, booted_at, earlier_ends: Vec::new() };
            self.transition(VmState::Failed, failed).await;
        } else {
            // Failed already (a boot again that failed too): the newer reason is the one to show.
            self.slot.refresh_summary(&self.entry);
            save_record(&self.manager.inner, &self.slot, &self.entry).await;
        }
        error
    }
}

/// Runs `work` to its end in a task of its own (see [`VmOperation::CHANGES`]).
pub(super) async fn detached<T: Send + 'static>(
    span: tracing::Span,
    work: impl Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> Result<T, ManagerError> {
    match tokio::spawn(tracing::Instrument::instrument(work, span)).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(ManagerError::ShuttingDown),
    }
}
