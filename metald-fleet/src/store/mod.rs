//! What a gateway keeps: tenants and their fleet quotas, API keys (as
//! digests), hosts, which host holds each VM, and idempotency records.
//! The hosts stay the source of truth for their VMs; the store knows only
//! where each VM lives and what it was placed with.
//!
//! [`FleetStore`] is the port; [`sqlite::SqliteStore`] the embedded
//! default, [`postgres::PostgresStore`] the one several gateways share. A
//! placement and its tenant's quota are checked and written in one
//! transaction, so racing creates cannot together pass a quota.

pub mod postgres;
pub mod sqlite;

use crate::keys::KeyDigest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("tenant {0:?} does not exist")]
    NoSuchTenant(String),
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("API key {0} does not exist")]
    NoSuchKey(String),
    #[error("host {0:?} does not exist")]
    NoSuchHost(String),
    #[error("host {0:?} already exists")]
    HostExists(String),
    #[error("host {host:?} still holds {vms} VMs; drain it first, or remove it with force")]
    HostNotEmpty { host: String, vms: u64 },
    #[error("VM {0} is already placed")]
    VmExists(String),
    #[error("tenant {tenant} may hold at most {limit} {what} across the fleet; it holds {held} and asks for {asked} more")]
    QuotaExceeded { tenant: String, what: &'static str, limit: u64, held: u64, asked: u64 },
    #[error("idempotency key {key:?} was used for another request; use a new key for a new request")]
    IdempotencyKeyReused { key: String },
    #[error("the fleet store at {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("the fleet store on PostgreSQL at {server}: {source}")]
    Postgres { server: String, source: tokio_postgres::Error },
    #[error("the fleet store on PostgreSQL at {server}: no connection: {reason}")]
    PostgresUnreachable { server: String, reason: String },
    #[error("the fleet store at {path} holds a malformed {what}: {value:?}")]
    Malformed { path: String, what: &'static str, value: String },
    #[error("the fleet store's worker ended")]
    WorkerGone,
}

/// What a tenant may hold across the fleet; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    pub max_vms: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_memory_bytes: Option<u64>,
}

/// What a tenant's pending and placed VMs hold together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_bytes: u64,
}

impl Quota {
    /// Whether `placement` fits beside what its tenant holds; the error names the first limit it passes.
    pub fn admit(&self, held: Held, placement: &Placement) -> Result<(), StoreError> {
        let checks = [
            ("VMs", self.max_vms, held.vms, 1),
            ("vCPUs", self.max_vcpus, held.vcpus, placement.vcpus),
            ("bytes of memory", self.max_memory_bytes, held.memory_bytes, placement.memory_bytes),
        ];
        for (what, limit, held, asked) in checks {
            if let Some(limit) = limit
                && held.saturating_add(asked) > limit
            {
                return Err(StoreError::QuotaExceeded { tenant: placement.tenant.clone(), what, limit, held, asked });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub quota: Quota,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub digest: KeyDigest,
    /// What the key is for, as its maker said.
    pub label: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    pub last_used_ms: Option<u64>,
}

impl KeyRecord {
    /// Whether the key opens calls at `now_ms`: not revoked, not expired.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|expires| now_ms < expires)
    }
}

/// What an operator said of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostMode {
    /// New VMs may be placed here.
    Active,
    /// Nothing new is placed here; its VMs run on.
    Cordoned,
    /// Nothing new is placed here, and it is on its way out: once it
    /// holds no VMs it can be removed.
    Draining,
}

impl HostMode {
    pub fn name(self) -> &'static str {
        match self {
            HostMode::Active => "active",
            HostMode::Cordoned => "cordoned",
            HostMode::Draining => "draining",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [HostMode::Active, HostMode::Cordoned, HostMode::Draining].into_iter().find(|mode| mode.name() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub name: String,
    /// Where its metald listens: `http://10.0.0.5:7070`.
    pub url: String,
    pub mode: HostMode,
    pub added_at_ms: u64,
    /// When it last announced itself (`RegistrationService`); `None` for a host added by hand that never did.
    pub announced_at_ms: Option<u64>,
}

/// Where a VM is in the gateway's eyes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementStatus {
    /// Written before its host is asked to create it; the host's answer
    /// makes it placed (or removes it).
    Pending,
    Placed,
    /// Its host answered, and does not have it.
    Lost {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub vm_id: String,
    pub tenant: String,
    pub host: String,
    pub status: PlacementStatus,
    pub vcpus: u64,
    pub memory_bytes: u64,
    pub created_at_ms: u64,
}

impl PlacementStatus {
    /// The status and reason columns both stores keep it in.
    pub(crate) fn columns(&self) -> (&'static str, &str) {
        match self {
            PlacementStatus::Pending => ("pending", ""),
            PlacementStatus::Placed => ("placed", ""),
            PlacementStatus::Lost { reason } => ("lost", reason),
        }
    }

    pub(crate) fn from_columns(status: &str, reason: String) -> Option<Self> {
        match status {
            "pending" => Some(PlacementStatus::Pending),
            "placed" => Some(PlacementStatus::Placed),
            "lost" => Some(PlacementStatus::Lost { reason }),
            _ => None,
        }
    }
}

/// SQL keeps integers signed; the store's are never negative.
pub(crate) fn stored(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn read(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A create's idempotency key and the digest of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub request_digest: [u8; 32],
}

/// What a reservation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The placement is written and the quota counts it.
    Reserved,
    /// The same idempotency key and request made this VM before.
    Existing(Placement),
}

#[async_trait::async_trait]
pub trait FleetStore: Send + Sync + std::fmt::Debug {
    async fn create_tenant(&self, tenant: Tenant) -> Result<(), StoreError>;
    async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError>;
    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    async fn set_quota(&self, id: &str, quota: Quota) -> Result<Tenant, StoreError>;

    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError>;
    async fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key, or one tenant's, in creation order.
    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;
    async fn revoke_key(&self, id: &str, at_ms: u64) -> Result<KeyRecord, StoreError>;
    /// Records when keys were last used; a later use never goes back.
    async fn record_key_uses(&self, uses: Vec<(String, u64)>) -> Result<(), StoreError>;

    async fn add_host(&self, host: HostRecord) -> Result<(), StoreError>;
    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;
    async fn set_host_mode(&self, name: &str, mode: HostMode) -> Result<HostRecord, StoreError>;
    /// A host's announcement at `at_ms`: a new host is added (active), a
    /// known one takes the announced URL and time; its mode stays the operator's.
    async fn announce_host(&self, name: &str, url: &str, at_ms: u64) -> Result<HostRecord, StoreError>;
    /// Removes a host; one that still holds placements only with `force`.
    async fn remove_host(&self, name: &str, force: bool) -> Result<(), StoreError>;

    /// Checks the tenant's quota against its placements (pending and
    /// placed) and writes `placement`, in one transaction; with an
    /// idempotency key, a create seen before answers its placement instead.
    /// The tenant must exist.
    async fn reserve_placement(
        &self,
        placement: Placement,
        quota: Quota,
        idempotency: Option<Idempotency>,
    ) -> Result<Reservation, StoreError>;
    async fn placement(&self, vm_id: &str) -> Result<Option<Placement>, StoreError>;
    /// Moves a placement to another host (its first host had no room) or status.
    async fn update_placement(&self, vm_id: &str, host: &str, status: PlacementStatus) -> Result<(), StoreError>;
    /// Forgets a VM: deleted, or its create failed. Its idempotency record goes with it.
    async fn remove_placement(&self, vm_id: &str) -> Result<(), StoreError>;
    /// Placements, of one host or all, in vm_id order.
    async fn placements(&self, host: Option<&str>) -> Result<Vec<Placement>, StoreError>;
    /// A tenant's lost placements, in vm_id order.
    async fn lost_placements(&self, tenant: &str) -> Result<Vec<Placement>, StoreError>;
}
