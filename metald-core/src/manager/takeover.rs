//! Takeover after a restart of metald: the VMs of the earlier run are
//! found in the store; each VMM that still runs and is provably the same
//! process is taken over, a VM whose VMM is gone is marked Failed, and
//! what earlier runs left that no VM claims is swept away.

use std::sync::Arc;
use std::time::SystemTime;

use super::error::backend_failed;
use super::exits::restart_later;
use super::records::{publish, running_vmm};
use super::slot::{VmEntry, VmSlot, read_lock, write_lock};
use super::spec::{SpecOf, remove_vm_dir};
use super::{BackendOperation, ManagerError, VmManager};
use crate::backend::{BackendError, Unlaunchable, VmmInstance};
use crate::events::{VmEvent, VmEventKind};
use crate::ids::VmId;
use crate::jailer::IdentityLease;
use crate::restart::RestartCount;
use crate::state::VmState;
use crate::store::{VmRecord, VmStore};
use crate::vm_dir::VmDir;
use metald_types::time::from_unix_millis;

impl VmManager {
    /// Finds the VMs of an earlier run in the store: takes over each VMM
    /// that still runs and is provably the same process (the VM keeps its
    /// state and a `TakenOver` event says so), marks Failed each VM whose
    /// VMM is gone (cleaning up what its jail left), and keeps stopped VMs
    /// ready to boot. Call once, before serving; a VM already known is skipped.
    pub async fn take_over(&self) -> Result<Takeover, ManagerError> {
        let Some(store) = self.inner.store.clone() else { return Ok(Takeover::default()) };
        let records = store.load_all().map_err(ManagerError::Store)?;
        let stored: std::collections::HashSet<VmId> = records.iter().map(|record| record.vm_id.clone()).collect();
        let mut takeover = Takeover::default();
        for record in records {
            if read_lock(&self.inner.registry).vms.contains_key(&record.vm_id) {
                continue;
            }
            if record.deleted {
                self.replay_deleted(store.as_ref(), record);
                continue;
            }
            let vm_id = record.vm_id.clone();
            match self.take_over_one(record).await {
                Ok(TakeoverOutcome::TakenOver) => takeover.taken_over.push(vm_id),
                Ok(TakeoverOutcome::Lost(reason)) => takeover.lost.push((vm_id, reason)),
                Ok(TakeoverOutcome::Stopped) => takeover.stopped.push(vm_id),
                Err(error) => {
                    let reason = crate::error_chain(&error);
                    tracing::error!(%vm_id, %reason, "cannot take over a stored VM");
                    takeover.lost.push((vm_id, reason));
                }
            }
        }
        tracing::info!(
            taken_over = takeover.taken_over.len(),
            lost = takeover.lost.len(),
            stopped = takeover.stopped.len(),
            "VMs of the earlier run taken over"
        );
        // VMMs first: the folders and namespaces below may be theirs.
        self.sweep_stray_vmms().await;
        self.sweep_unrecorded(&stored).await;
        Ok(takeover)
    }

    /// Kills and removes VMMs (and their cgroups) that earlier runs
    /// launched and no VM took over now, so none runs on unwatched with a
    /// uid the next VM may be given.
    async fn sweep_stray_vmms(&self) {
        let slots: Vec<Arc<VmSlot>> = read_lock(&self.inner.registry).vms.values().cloned().collect();
        let mut in_use = std::collections::BTreeSet::new();
        for slot in slots {
            if let Some(cgroup) = slot.entry.lock().await.instance.cgroup() {
                in_use.insert(cgroup.name());
            }
        }
        let backends = self.inner.backends.clone();
        let problems =
            tokio::task::spawn_blocking(move || backends.iter().flat_map(|backend| backend.sweep_strays(&in_use)).collect::<Vec<_>>())
                .await
                .unwrap_or_default();
        for problem in problems {
            tracing::warn!(problem, "cannot remove what an earlier run launched");
        }
    }

    /// Removes what a create cut off by a crash left of a VM the store never
    /// recorded: its network (namespace, links, firewall elements, address
    /// rows) and its folder with any partial drive copy. Such a VM never had
    /// a VMM the store knows: its launch had not finished.
    async fn sweep_unrecorded(&self, stored: &std::collections::HashSet<VmId>) {
        if let Some(network) = &self.inner.network {
            for problem in network.forget_all_but(stored).await {
                tracing::warn!(problem, "cannot remove the network of a VM a crash left half made");
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.inner.vm_root) else { return };
        let unrecorded: Vec<VmDir> = entries
            .flatten()
            .filter(|entry| VmId::new(entry.file_name().to_string_lossy().into_owned()).is_ok_and(|vm_id| !stored.contains(&vm_id)))
            .map(|entry| VmDir::at(entry.path()))
            .collect();
        for vm_dir in unrecorded {
            tracing::warn!(path = %vm_dir.path().display(), "removing the folder of a VM a crash left half made");
            // A partial copy of a large drive takes a while to unlink.
            let _ = tokio::task::spawn_blocking(move || remove_vm_dir(&vm_dir)).await;
        }
    }

    /// A VM deleted by an earlier metald that was killed before its billing
    /// released the record: its end and its delete are told again.
    fn replay_deleted(&self, store: &dyn VmStore, record: VmRecord) {
        let VmRecord { vm_id, tenant, recent_ends, .. } = record;
        for kind in [VmEventKind::FoundStopped { earlier_ends: recent_ends.clone() }, VmEventKind::Deleted] {
            let event = VmEvent { vm_id: vm_id.clone(), tenant: tenant.clone(), at: SystemTime::now(), state: VmState::Deleted, kind };
            let _ = self.inner.events.send(event);
        }
        tracing::info!(%vm_id, "a VM deleted just before metald stopped, told again to billing");
        if !self.inner.hold_deleted.load(std::sync::atomic::Ordering::SeqCst)
            && let Err(error) = store.remove(&vm_id)
        {
            tracing::error!(%vm_id, error = %crate::error_chain(&error), "cannot forget a deleted VM's record");
        }
    }

    async fn take_over_one(&self, record: VmRecord) -> Result<TakeoverOutcome, ManagerError> {
        let VmRecord { vm_id, tenant, mut config, mut state, .. } = record.clone();
        // A record from before VMs named their VMM ran on the host's default.
        if config.vmm.is_empty() {
            config.vmm = self.inner.default_backend.name().to_owned();
        }
        let vm_dir = VmDir::of(&self.inner.vm_root, &vm_id);
        let console = vm_dir.console(self.inner.console_limit_bytes);
        // Why no VMM can be taken over or launched for this VM, if so.
        let mut cannot_take_over = None;
        // A VMM the host no longer offers: the VM stays, Failed, saying so.
        let backend = match self.backend_of(&config) {
            Ok(backend) => backend,
            Err(error) => {
                cannot_take_over = Some(format!("its VMM is not offered by this host: {}", crate::error_chain(&error)));
                Arc::clone(&self.inner.default_backend)
            }
        };
        let identity = match record.identity {
            Some((uid, gid)) => match backend.take_over_identity(uid, gid) {
                Ok(lease) => lease,
                Err(source) => {
                    let error = backend_failed(&config.vmm, &vm_id, BackendOperation::TAKE_OVER, source);
                    cannot_take_over = Some(format!("its uid {uid} cannot be leased again: {}", crate::error_chain(&error)));
                    None
                }
            },
            None => None,
        };
        let network = match (record.network, &self.inner.network) {
            (Some(attachment), Some(provider)) => match provider.take_over(&vm_id, attachment.clone()).await {
                Ok(taken_over) => Some(taken_over),
                Err(error) => {
                    tracing::warn!(%vm_id, error = %crate::error_chain(&error), "cannot open the network namespace of a VM taken over");
                    Some(attachment)
                }
            },
            (attachment, _) => attachment,
        };
        let spec = |identity: Option<Arc<IdentityLease>>| {
            let images = self.resolve_found_images(&vm_id, &config)?;
            let vm = SpecOf { vm_id: &vm_id, tenant: &tenant, config: &config, vm_dir: &vm_dir, identity, network: network.as_ref() };
            self.build_spec(vm, images)
        };
        // A VM is never dropped: one no VMM can be launched for stays listed, Failed.
        let unlaunched = |identity: Option<Arc<IdentityLease>>| match spec(identity).and_then(|spec| Ok((self.backend_of(&config)?, spec)))
        {
            Ok((backend, spec)) => (backend.unlaunched(spec, console.clone()), None),
            Err(error) => {
                let reason = format!("no VMM can be launched for it on this host: {}", crate::error_chain(&error));
                (Box::new(Unlaunchable::new(backend.name(), reason.clone())) as Box<dyn VmmInstance>, Some(reason))
            }
        };
        let mut failure = record.failure.clone();
        let mut outcome = TakeoverOutcome::Stopped;
        let live = state.has_live_vmm();
        let (instance, unlaunchable) = match (&record.vmm, live, cannot_take_over) {
            (Some(ticket), true, None) => {
                let taken_over = match spec(identity.clone()) {
                    Ok(spec) => backend
                        .take_over(spec, console.clone(), ticket)
                        .await
                        .map_err(|source| backend_failed(&config.vmm, &vm_id, BackendOperation::TAKE_OVER, source)),
                    Err(error) => Err(error),
                };
                match taken_over {
                    Ok(instance) => {
                        outcome = TakeoverOutcome::TakenOver;
                        (instance, None)
                    }
                    Err(error) => {
                        for problem in backend.clean_up_after(ticket) {
                            tracing::warn!(%vm_id, problem, "cannot clean up after a VMM that ended while metald was away");
                        }
                        let gone = matches!(&error, ManagerError::Backend { source, .. } if matches!(**source, BackendError::TakeOver(_) | BackendError::Exited { .. }));
                        let reason = if gone {
                            format!("its VMM was gone when metald started again: {}", crate::error_chain(&error))
                        } else {
                            // Its VMM, if it runs, is stopped with the strays (see `sweep_stray_vmms`).
                            format!("metald could not take over its VMM after a restart and stopped it: {}", crate::error_chain(&error))
                        };
                        outcome = TakeoverOutcome::Lost(reason.clone());
                        failure = Some(reason);
                        state = VmState::Failed;
                        unlaunched(identity.clone())
                    }
                }
            }
            (vmm, true, cannot_take_over) => {
                let reason = cannot_take_over.unwrap_or_else(|| "its VMM was not recorded before metald stopped".to_owned());
                if let Some(ticket) = vmm {
                    for problem in backend.clean_up_after(ticket) {
                        tracing::warn!(%vm_id, problem, "cannot clean up after a VMM metald could not take over");
                    }
                }
                outcome = TakeoverOutcome::Lost(reason.clone());
                failure = Some(reason);
                state = VmState::Failed;
                unlaunched(identity.clone())
            }
            (_, false, cannot_take_over) => {
                if let Some(reason) = cannot_take_over {
                    failure = Some(reason);
                    state = VmState::Failed;
                }
                unlaunched(identity.clone())
            }
        };
        if let Some(reason) = unlaunchable {
            tracing::warn!(%vm_id, %reason, "a stored VM stays listed as failed");
            if !matches!(outcome, TakeoverOutcome::Lost(_)) {
                outcome = TakeoverOutcome::Lost(reason.clone());
            }
            if state != VmState::Failed {
                failure = Some(reason);
                state = VmState::Failed;
            }
        }
        let stored_boot = record.booted_at_ms.map(from_unix_millis);
        let booted_at = stored_boot.filter(|_| matches!(outcome, TakeoverOutcome::TakenOver));
        let entry = VmEntry {
            state,
            config: config.clone(),
            instance,
            identity,
            network,
            vm_dir,
            failure: failure.clone(),
            last_exit: record.last_exit,
            booted_at,
            recent_ends: record.recent_ends.clone(),
            created_at: from_unix_millis(record.created_at_ms),
            modified_at: if state == record.state { from_unix_millis(record.modified_at_ms) } else { SystemTime::now() },
            watch_generation: 0,
            watched_pid: None,
            restarts: RestartCount::default(),
        };
        let slot = VmSlot::new(vm_id.clone(), tenant.clone(), console, entry);
        let mut entry = slot.entry.lock().await;
        self.watch_vmm(&slot, &mut entry);
        write_lock(&self.inner.registry).vms.insert(vm_id.clone(), Arc::clone(&slot));
        match &outcome {
            TakeoverOutcome::TakenOver => {
                let running = running_vmm(&entry);
                let earlier_ends = entry.recent_ends.clone();
                publish(&self.inner, &slot, &mut entry, VmEventKind::TakenOver { running, booted_at: stored_boot, earlier_ends }).await;
                tracing::info!(%vm_id, state = %entry.state, "VMM taken over from the earlier run");
            }
            TakeoverOutcome::Lost(reason) => {
                let reason = reason.clone();
                tracing::warn!(%vm_id, %reason, "VM failed while metald was away");
                let earlier_ends = entry.recent_ends.clone();
                let failed = VmEventKind::Failed { reason, exit: None, usage: None, booted_at: stored_boot, earlier_ends };
                publish(&self.inner, &slot, &mut entry, failed).await;
                // A host reboot or a VMM killed while metald was away is a death like any other.
                if let Some(next) = entry.next_restart(&vm_id, None) {
                    restart_later(self.clone(), vm_id.clone(), next);
                }
            }
            TakeoverOutcome::Stopped => {
                let earlier_ends = entry.recent_ends.clone();
                publish(&self.inner, &slot, &mut entry, VmEventKind::FoundStopped { earlier_ends }).await;
            }
        }
        Ok(outcome)
    }
}

/// What [`VmManager::take_over`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Takeover {
    /// VMs whose VMM still ran and was taken over.
    pub taken_over: Vec<VmId>,
    /// VMs whose VMM was gone, now Failed, and why.
    pub lost: Vec<(VmId, String)>,
    /// VMs that were stopped or failed already, ready to boot again.
    pub stopped: Vec<VmId>,
}

enum TakeoverOutcome {
    TakenOver,
    Lost(String),
    Stopped,
}
