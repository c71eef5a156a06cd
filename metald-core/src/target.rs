//! Which VM an operation acts on, and for whom. A tenant's call names the
//! VM and its tenant; the manager checks the tenant against the VM it
//! holds locked, in the same critical section as the act, so a VM deleted
//! and created again under the same id by another tenant between a caller's
//! look and its act is not acted on: it answers as a VM that does not
//! exist. The host's own callers (an embedding service, the operator) act
//! on any tenant's VM.

use crate::ids::{TenantId, VmId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTarget {
    vm_id: VmId,
    /// `None`: whoever owns it.
    tenant: Option<TenantId>,
}

impl VmTarget {
    /// `vm_id`, only if `tenant` owns it.
    pub fn of_tenant(tenant: &TenantId, vm_id: &VmId) -> Self {
        Self { vm_id: vm_id.clone(), tenant: Some(tenant.clone()) }
    }

    /// `vm_id`, whoever owns it.
    pub fn any_tenant(vm_id: &VmId) -> Self {
        Self { vm_id: vm_id.clone(), tenant: None }
    }

    pub fn vm_id(&self) -> &VmId {
        &self.vm_id
    }

    /// Whether a VM owned by `owner` is this target.
    pub fn admits(&self, owner: &TenantId) -> bool {
        self.tenant.as_ref().is_none_or(|tenant| tenant == owner)
    }
}

impl From<&VmId> for VmTarget {
    fn from(vm_id: &VmId) -> Self {
        Self::any_tenant(vm_id)
    }
}

impl From<VmId> for VmTarget {
    fn from(vm_id: VmId) -> Self {
        Self { vm_id, tenant: None }
    }
}

impl From<&VmTarget> for VmTarget {
    fn from(target: &VmTarget) -> Self {
        target.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_target_admits_only_that_tenant_and_the_hosts_admits_any() {
        let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
        let vm_id = VmId::new("vm-1").unwrap();
        let scoped = VmTarget::of_tenant(&acme, &vm_id);
        assert!(scoped.admits(&acme) && !scoped.admits(&globex));
        assert!(VmTarget::from(&vm_id).admits(&globex));
    }
}
