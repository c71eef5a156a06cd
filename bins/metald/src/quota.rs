//! Per-tenant quotas on VMs, vCPUs and memory, and the host's capacity of
//! the same three, which a gateway reads to place VMs. A quota (or the
//! capacity) counts every VM the tenant (or the host) has, in any state
//! but deleted since a stopped VM may boot again, plus the creates in
//! flight, so concurrent creates cannot together pass a limit that each
//! of them alone respects.

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
pub enum QuotaExceeded {
    #[error("tenant {tenant} may hold at most {limit} {what}; it holds {held} and asks for {asked} more")]
    Tenant { tenant: TenantId, what: &'static str, limit: u64, held: u64, asked: u64 },
    #[error("this host has room for {limit} {what} in all and {held} are taken; the VM asks for {asked}: create it on another host")]
    Host { what: &'static str, limit: u64, held: u64, asked: u64 },
}

#[derive(Debug)]
pub struct Quotas {
    limits: HashMap<TenantId, Quota>,
    /// For tenants without a quota of their own.
    default: Quota,
    /// What the host holds at most, all tenants together.
    capacity: Capacity,
    in_flight: Arc<Mutex<HashMap<TenantId, Usage>>>,
}

/// What a host holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_bytes: u64,
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
    pub fn new(limits: HashMap<TenantId, Quota>, default: Quota, capacity: Capacity) -> Self {
        Self { limits, default, capacity, in_flight: Arc::default() }
    }

    pub fn quota(&self, tenant: &TenantId) -> Quota {
        self.limits.get(tenant).copied().unwrap_or(self.default)
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// What the host's VMs and the creates in flight hold.
    pub fn host_usage(&self, manager: &VmManager) -> Usage {
        let in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        held_by(manager, None, in_flight.values().copied())
    }

    /// Lets a create of `asked` in, or says which limit it would pass:
    /// the host's capacity first, then the tenant's quota.
    pub fn admit(&self, manager: &VmManager, tenant: &TenantId, asked: Usage) -> Result<Admission, QuotaExceeded> {
        let quota = self.quota(tenant);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let host = held_by(manager, None, in_flight.values().copied());
        let capacity = self.capacity;
        for (what, limit, held, asked) in checks(Some(capacity.vms), Some(capacity.vcpus), Some(capacity.memory_bytes), host, asked) {
            if held.saturating_add(asked) > limit {
                return Err(QuotaExceeded::Host { what, limit, held, asked });
            }
        }
        if quota != Quota::default() {
            let held = held_by(manager, Some(tenant), in_flight.get(tenant).copied());
            for (what, limit, held, asked) in checks(quota.max_vms, quota.max_vcpus, quota.max_memory_bytes, held, asked) {
                if held.saturating_add(asked) > limit {
                    return Err(QuotaExceeded::Tenant { tenant: tenant.clone(), what, limit, held, asked });
                }
            }
        }
        in_flight.entry(tenant.clone()).or_default().add(asked);
        Ok(Admission { tenant: tenant.clone(), asked, in_flight: Arc::clone(&self.in_flight) })
    }
}

/// What the VMs of `tenant` (all tenants: `None`) hold, with `in_flight` added.
fn held_by(manager: &VmManager, tenant: Option<&TenantId>, in_flight: impl IntoIterator<Item = Usage>) -> Usage {
    let mut held = Usage::default();
    for usage in in_flight {
        held.add(usage);
    }
    let vms = manager.holdings(tenant);
    held.add(Usage { vms: vms.vms, vcpus: vms.vcpus, memory_bytes: vms.memory_bytes });
    held
}

/// Each limit that is set, with what is held and asked of it.
fn checks(
    vms: Option<u64>,
    vcpus: Option<u64>,
    memory_bytes: Option<u64>,
    held: Usage,
    asked: Usage,
) -> impl Iterator<Item = (&'static str, u64, u64, u64)> {
    [
        ("VMs", vms, held.vms, asked.vms),
        ("vCPUs", vcpus, held.vcpus, asked.vcpus),
        ("bytes of memory", memory_bytes, held.memory_bytes, asked.memory_bytes),
    ]
    .into_iter()
    .filter_map(|(what, limit, held, asked)| limit.map(|limit| (what, limit, held, asked)))
}
