//! Create: a new VM from a validated configuration. Its id is reserved,
//! its user leased, its network attached, its folder and drive copies made
//! and its VMM launched; when any step fails, every earlier one is undone
//! and nothing of the VM is left.

use std::sync::Arc;
use std::time::SystemTime;

use tracing::Instrument;

use super::error::backend_failed;
use super::operation::detached;
use super::slot::{VmEntry, VmSlot, write_lock};
use super::spec::{ResolvedImages, SpecOf, copy_writable_drives};
use super::{BackendOperation, CreateVm, ManagerError, VmManager};
use crate::backend::VmmInstance;
use crate::config::VmConfig;
use crate::console::ConsoleLog;
use crate::events::VmEventKind;
use crate::ids::{TenantId, VmId};
use crate::jailer::IdentityLease;
use crate::network::{AttachRequest, NetworkAttachment};
use crate::restart::RestartCount;
use crate::state::VmState;
use crate::vm_dir::VmDir;

impl VmManager {
    /// Validates the request, confines its images, launches and configures
    /// the VMM. Nothing is left behind when any step fails.
    pub async fn create(&self, request: CreateVm) -> Result<VmId, ManagerError> {
        self.create_holding(request, ()).await
    }

    /// [`VmManager::create`], keeping `held` until the create is over, also
    /// when the caller stopped waiting: a quota's reservation for the VM,
    /// say, which must not be released while the create still runs.
    pub async fn create_holding(&self, request: CreateVm, held: impl Send + 'static) -> Result<VmId, ManagerError> {
        let manager = self.clone();
        let span = tracing::info_span!(
            "vm.create",
            vm_id = request.vm_id.as_ref().map(VmId::as_str),
            tenant = %request.tenant,
            vmm = self.backend_of(&request.config).map_or("", |backend| backend.name())
        );
        detached(span, async move {
            let created = manager.create_now(request).await;
            drop(held);
            created
        })
        .await
    }

    async fn create_now(&self, request: CreateVm) -> Result<VmId, ManagerError> {
        let CreateVm { vm_id, tenant, mut config } = request;
        config.validate().map_err(ManagerError::InvalidConfig)?;
        // The VM keeps the name of its VMM, also when the host's default changes.
        config.vmm = self.backend_of(&config)?.name().to_owned();
        self.check_capabilities(&config)?;
        let resolved = self.resolve_images(&config)?;
        let vm_id = vm_id.unwrap_or_else(VmId::generate);
        {
            let mut registry = write_lock(&self.inner.registry);
            if registry.vms.contains_key(&vm_id) || !registry.reserved.insert(vm_id.clone()) {
                return Err(ManagerError::AlreadyExists(vm_id));
            }
        }
        let vm_dir = VmDir::of(&self.inner.vm_root, &vm_id);
        let console = vm_dir.console(self.inner.console_limit_bytes);
        let prepared = self.prepare(&vm_id, &tenant, &config, resolved, &vm_dir, console.clone()).await;
        let (instance, identity, network) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                super::spec::remove_vm_dir(&vm_dir);
                write_lock(&self.inner.registry).reserved.remove(&vm_id);
                return Err(error);
            }
        };
        fail::fail_point!("create-before-record");
        let now = SystemTime::now();
        let entry = VmEntry {
            state: VmState::Created,
            config,
            instance,
            identity,
            network,
            vm_dir,
            failure: None,
            last_exit: None,
            booted_at: None,
            recent_ends: Vec::new(),
            created_at: now,
            modified_at: now,
            watch_generation: 0,
            watched_pid: None,
            restarts: RestartCount::default(),
        };
        let slot = VmSlot::new(vm_id.clone(), tenant.clone(), console, entry);
        {
            let mut entry = slot.entry.lock().await;
            self.watch_vmm(&slot, &mut entry);
            {
                let mut registry = write_lock(&self.inner.registry);
                registry.reserved.remove(&vm_id);
                registry.vms.insert(vm_id.clone(), Arc::clone(&slot));
            }
            super::records::publish(&self.inner, &slot, &mut entry, VmEventKind::Created).await;
        }
        Ok(vm_id)
    }

    /// Leases the VM's user, attaches its network, then launches its VMM
    /// while the network settles. Whatever was done is undone when a later
    /// step fails.
    async fn prepare(
        &self,
        vm_id: &VmId,
        tenant: &TenantId,
        config: &VmConfig,
        images: ResolvedImages,
        vm_dir: &VmDir,
        console: ConsoleLog,
    ) -> Result<Prepared, ManagerError> {
        let backend = self.backend_of(config)?;
        let identity =
            backend.lease_identity().map_err(|source| backend_failed(backend.name(), vm_id, BackendOperation::CREATE, source))?;
        let network = match &self.inner.network {
            Some(provider) if !config.network.is_empty() => {
                let owner = identity.as_ref().map(|lease| (lease.uid(), lease.gid()));
                let request = AttachRequest { vm_id, tenant, interfaces: &config.network, owner };
                let attach = provider.attach(request).instrument(tracing::info_span!("vm.network.attach"));
                Some(attach.await.map_err(ManagerError::Network)?)
            }
            _ => None,
        };
        let vm = SpecOf { vm_id, tenant, config, vm_dir, identity: identity.clone(), network: network.as_ref() };
        // The network's rules load while the VMM starts; the VM is Created
        // only once both are done.
        let settled = async {
            match (&self.inner.network, &network) {
                (Some(provider), Some(_)) => {
                    provider.settle(vm_id).instrument(tracing::info_span!("vm.network.settle")).await.map_err(ManagerError::Network)
                }
                _ => Ok(()),
            }
        };
        let launched = self.launch(vm, images, console).instrument(tracing::info_span!("vm.launch"));
        let failure = match tokio::join!(launched, settled) {
            (Ok(instance), Ok(())) => return Ok((instance, identity, network)),
            (Ok(mut instance), Err(error)) => {
                if let Err(destroy_error) = instance.destroy().await {
                    tracing::error!(%vm_id, error = %crate::error_chain(&destroy_error), "cannot remove the VMM of a VM whose network failed");
                }
                error
            }
            (Err(error), _) => error,
        };
        if network.is_some()
            && let Some(provider) = &self.inner.network
            && let Err(detach_error) = provider.detach(vm_id).await
        {
            tracing::error!(%vm_id, error = %crate::error_chain(&detach_error), "cannot undo the network of a VM that failed to start");
        }
        Err(failure)
    }

    /// Makes the VM's folder and drive copies, then asks the backend for a VMM.
    async fn launch(&self, vm: SpecOf<'_>, images: ResolvedImages, console: ConsoleLog) -> Result<Box<dyn VmmInstance>, ManagerError> {
        let (vm_id, config, vm_dir) = (vm.vm_id, vm.config, vm.vm_dir);
        vm_dir.create().map_err(|source| ManagerError::VmDir {
            vm_id: vm_id.clone(),
            action: "create",
            path: vm_dir.path().to_path_buf(),
            source,
        })?;
        copy_writable_drives(vm_id, config, &images, vm_dir).await?;
        let spec = self.build_spec(vm, images)?;
        let backend = self.backend_of(config)?;
        backend.create(spec, console).await.map_err(|source| backend_failed(backend.name(), vm_id, BackendOperation::CREATE, source))
    }
}

/// A launched VMM, its user's lease and its network.
type Prepared = (Box<dyn VmmInstance>, Option<Arc<IdentityLease>>, Option<NetworkAttachment>);
