//! Per-tenant quotas on VMs, vCPUs and memory. A quota counts every VM
//! the tenant has (in any state but deleted, since a stopped VM may boot
//! again) plus the creates in flight, so concurrent creates cannot
//! together pass a limit that each of them alone respects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use metald_core::{TenantId, VmManager};

use crate::config::Quota;

/// What a tenant holds, or asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_bytes: u64,
}

impl Usage {
    fn add(&mut self, other: Usage) {
        self.vms += other.vms;
        self.vcpus += other.vcpus;
        self.memory_bytes += other.memory_bytes;
    }

    fn remove(&mut self, other: Usage) {
        self.vms = self.vms.saturating_sub(other.vms);
        self.vcpus = self.vcpus.saturating_sub(other.vcpus);
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant {tenant} may hold at most {limit} {what}; it holds {held} and asks for {asked} more")]
pub struct QuotaExceeded {
    pub tenant: TenantId,
    pub what: &'static str,
    pub limit: u64,
    pub held: u64,
    pub asked: u64,
}

#[derive(Debug)]
pub struct Quotas {
    limits: HashMap<TenantId, Quota>,
    /// For tenants without a quota of their own.
    default: Quota,
    in_flight: Arc<Mutex<HashMap<TenantId, Usage>>>,
}

/// A create let in under the quota; its share stays counted until the
/// create is over (by then the VM itself is counted, or there is none).
#[derive(Debug)]
pub struct Admission {
    tenant: TenantId,
    asked: Usage,
    in_flight: Arc<Mutex<HashMap<TenantId, Usage>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(usage) = in_flight.get_mut(&self.tenant) {
            usage.remove(self.asked);
            if *usage == Usage::default() {
                in_flight.remove(&self.tenant);
            }
        }
    }
}

impl Quotas {
    pub fn new(limits: HashMap<TenantId, Quota>, default: Quota) -> Self {
        Self { limits, default, in_flight: Arc::default() }
    }

    pub fn quota(&self, tenant: &TenantId) -> Quota {
        self.limits.get(tenant).copied().unwrap_or(self.default)
    }

    /// Lets a create of `asked` in, or says which limit it would pass.
    pub fn admit(&self, manager: &VmManager, tenant: &TenantId, asked: Usage) -> Result<Admission, QuotaExceeded> {
        let quota = self.quota(tenant);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let mut held = in_flight.get(tenant).copied().unwrap_or_default();
        if quota != Quota::default() {
            for summary in manager.list(Some(tenant)) {
                held.add(Usage { vms: 1, vcpus: summary.vcpus.into(), memory_bytes: summary.memory_bytes });
            }
        }
        let checks = [
            ("VMs", quota.max_vms, held.vms, asked.vms),
            ("vCPUs", quota.max_vcpus, held.vcpus, asked.vcpus),
            ("bytes of memory", quota.max_memory_bytes, held.memory_bytes, asked.memory_bytes),
        ];
        for (what, limit, held, asked) in checks {
            if let Some(limit) = limit
                && held.saturating_add(asked) > limit
            {
                return Err(QuotaExceeded { tenant: tenant.clone(), what, limit, held, asked });
            }
        }
        in_flight.entry(tenant.clone()).or_default().add(asked);
        Ok(Admission { tenant: tenant.clone(), asked, in_flight: Arc::clone(&self.in_flight) })
    }
}
