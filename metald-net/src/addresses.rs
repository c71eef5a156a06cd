//! The address book: which /64 each tenant has, which address and MAC each
//! VM interface has, persisted in SQLite so that a restart gives the same
//! answers and never hands out one address twice.
//!
//! The host prefix (a /48 to a /63) is cut into /64s, one per tenant, by
//! slot: slot `t` is the prefix with `t` in the bits between the host
//! prefix and /64. Slot 0 is kept for the host. Inside a tenant's /64, `::1`
//! is the gateway and each interface gets the lowest free interface id from
//! `::2`. With IPv4 configured, the same happens in a pool cut into one
//! subnet per tenant. A tenant's slot is freed with its last interface.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::{Ipv4Net, Ipv6Net};
use metald_core::{TenantId, VmId};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The first interface id handed to a VM in its tenant's /64 (`::1` is the gateway).
const FIRST_HOST: u64 = 2;
/// The most interfaces one tenant may have on a host; keeps MACs unique in 16 bits.
pub const MAX_INTERFACES_PER_TENANT: u64 = 0xfff0;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("the address book's file {path} cannot be made owner-only")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the address book at {path} cannot be used")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the host prefix {0} must be between /48 and /63")]
    HostPrefix(Ipv6Net),
    #[error("the IPv4 pool {pool} cannot hold /{tenant_len} tenant subnets")]
    Ipv4Pool { pool: Ipv4Net, tenant_len: u8 },
    #[error("the address book at {path} was made for host prefix {recorded}, not {configured}")]
    PrefixChanged { path: PathBuf, recorded: String, configured: String },
    #[error("the host prefix {prefix} has no /64 left for tenant {tenant} ({slots} tenants already)")]
    NoTenantPrefix { prefix: Ipv6Net, tenant: TenantId, slots: u64 },
    #[error("tenant {tenant} has no address left in {prefix}")]
    NoAddress { tenant: TenantId, prefix: String },
    #[error("the MAC address {mac} is already used by another interface of this tenant")]
    MacInUse { mac: String },
    #[error("the thread writing the address book did not finish")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// How addresses are carved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPlan {
    pub host_prefix: Ipv6Net,
    /// Dual stack: each tenant gets a subnet of this length from the pool.
    pub ipv4: Option<(Ipv4Net, u8)>,
}

/// One interface's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub vm_id: VmId,
    pub interface: String,
    pub tenant: TenantId,
    /// The tenant's slot (its /64 and, with IPv4, its subnet).
    pub tenant_slot: u64,
    /// The interface's number inside its tenant (interface id in the /64).
    pub host: u64,
    /// A host-wide number for naming the interface's host link.
    pub link_number: u64,
    pub mac: [u8; 6],
    pub ipv6: Ipv6Addr,
    pub tenant_prefix: Ipv6Net,
    pub gateway6: Ipv6Addr,
    pub ipv4: Option<(Ipv4Addr, Ipv4Net, Ipv4Addr)>,
}

impl Allocation {
    pub fn mac_string(&self) -> String {
        format_mac(self.mac)
    }
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(":")
}

/// The persisted address book.
#[derive(Debug)]
pub struct AddressBook {
    path: PathBuf,
    plan: AddressPlan,
    connection: Mutex<Connection>,
}

/// The interfaces table, under a name: the schema's, and the one a
/// migration builds beside it.
macro_rules! interfaces_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS ",
            $name,
            " (
    vm_id TEXT NOT NULL,
    interface TEXT NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants(tenant),
    host INTEGER NOT NULL,
    link_number INTEGER NOT NULL UNIQUE,
    mac TEXT NOT NULL,
    PRIMARY KEY (vm_id, interface),
    UNIQUE (tenant, host),
    UNIQUE (tenant, mac)
);
"
        )
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    tenant TEXT PRIMARY KEY,
    slot INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS tenant_policies (
    tenant TEXT PRIMARY KEY,
    intra_tenant INTEGER NOT NULL
);
",
    interfaces_table!("interfaces")
);

/// Books made before MACs were scoped to their tenant held them unique on
/// the host, so one tenant could take (and probe for) another's: rebuilt
/// with the tenant's scope, rows unchanged.
const SCOPE_MACS_TO_TENANTS: &str = concat!(
    interfaces_table!("interfaces_scoped"),
    "
INSERT INTO interfaces_scoped SELECT vm_id, interface, tenant, host, link_number, mac FROM interfaces;
DROP TABLE interfaces;
ALTER TABLE interfaces_scoped RENAME TO interfaces;
"
);

/// The first two bytes of every MAC the book generates; a caller's MAC may
/// not start with them, so a generated one is never already taken.
pub const GENERATED_MAC_PREFIX: [u8; 2] = [0x02, 0x6d];

impl AddressBook {
    /// Opens (or creates) the book at `path` for `plan`. A book made for
    /// another host prefix is refused rather than silently reinterpreted.
    pub fn open(path: impl Into<PathBuf>, plan: AddressPlan) -> Result<Self, AddressError> {
        let path = path.into();
        if !(48..=63).contains(&plan.host_prefix.prefix_len()) {
            return Err(AddressError::HostPrefix(plan.host_prefix));
        }
        if let Some((pool, tenant_len)) = plan.ipv4
            && (tenant_len <= pool.prefix_len() || tenant_len > 30)
        {
            return Err(AddressError::Ipv4Pool { pool, tenant_len });
        }
        let store = |source| AddressError::Store { path: path.clone(), source };
        metald_core::private_files::prepare_database(&path).map_err(|source| AddressError::Prepare { path: path.clone(), source })?;
        let connection = Connection::open(&path).map_err(store)?;
        // WAL with normal sync: a committed allocation survives a crash of
        // metald; a power loss may forget the last ones, together with the
        // VMs that held them, which did not survive it either.
        connection.pragma_update(None, "journal_mode", "WAL").map_err(store)?;
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(store)?;
        connection.pragma_update(None, "foreign_keys", "ON").map_err(store)?;
        connection.busy_timeout(std::time::Duration::from_secs(5)).map_err(store)?;
        connection.execute_batch(SCHEMA).map_err(store)?;
        let table: String = connection
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'interfaces'", [], |row| row.get(0))
            .map_err(store)?;
        if !table.contains("UNIQUE (tenant, mac)") {
            connection.execute_batch(&format!("BEGIN; {SCOPE_MACS_TO_TENANTS} COMMIT;")).map_err(store)?;
        }
        let configured = plan.host_prefix.trunc().to_string();
        let recorded: Option<String> =
            connection.query_row("SELECT value FROM meta WHERE key = 'host_prefix'", [], |row| row.get(0)).optional().map_err(store)?;
        match recorded {
            Some(recorded) if recorded != configured => {
                let in_use: i64 = connection.query_row("SELECT COUNT(*) FROM interfaces", [], |row| row.get(0)).map_err(store)?;
                if in_use > 0 {
                    return Err(AddressError::PrefixChanged { path, recorded, configured });
                }
                connection.execute("UPDATE meta SET value = ?1 WHERE key = 'host_prefix'", params![configured]).map_err(store)?;
            }
            Some(_) => {}
            None => {
                connection.execute("INSERT INTO meta (key, value) VALUES ('host_prefix', ?1)", params![configured]).map_err(store)?;
            }
        }
        Ok(Self { path, plan, connection: Mutex::new(connection) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn plan(&self) -> &AddressPlan {
        &self.plan
    }

    fn store(&self) -> impl Fn(rusqlite::Error) -> AddressError + '_ {
        |source| AddressError::Store { path: self.path.clone(), source }
    }

    /// How many /64s the host prefix holds for tenants (slot 0 is the host's).
    pub fn tenant_slots(&self) -> u64 {
        let slots_v6 = 1u64 << (64 - self.plan.host_prefix.prefix_len());
        match self.plan.ipv4 {
            Some((pool, tenant_len)) => slots_v6.min(1u64 << (tenant_len - pool.prefix_len())),
            None => slots_v6,
        }
    }

    /// The addresses of `interface` of `vm_id`: the same ones every time it
    /// is asked, until [`AddressBook::release`]. `mac` is the caller's choice,
    /// if any; otherwise one is made from the tenant and host numbers.
    pub fn allocate(&self, vm_id: &VmId, interface: &str, tenant: &TenantId, mac: Option<[u8; 6]>) -> Result<Allocation, AddressError> {
        let mut connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.store())?;
        if let Some(existing) = self.find(&transaction, vm_id, interface)? {
            return Ok(existing);
        }
        let slot = match transaction
            .query_row("SELECT slot FROM tenants WHERE tenant = ?1", params![tenant.as_str()], |row| row.get::<_, i64>(0))
            .optional()
            .map_err(self.store())?
        {
            Some(slot) => slot as u64,
            None => {
                let slot = lowest_free(&transaction, "SELECT slot FROM tenants ORDER BY slot", [], 1).map_err(self.store())?;
                if slot >= self.tenant_slots() {
                    return Err(AddressError::NoTenantPrefix {
                        prefix: self.plan.host_prefix,
                        tenant: tenant.clone(),
                        slots: self.tenant_slots() - 1,
                    });
                }
                transaction
                    .execute("INSERT INTO tenants (tenant, slot) VALUES (?1, ?2)", params![tenant.as_str(), slot as i64])
                    .map_err(self.store())?;
                slot
            }
        };
        let host =
            lowest_free(&transaction, "SELECT host FROM interfaces WHERE tenant = ?1 ORDER BY host", params![tenant.as_str()], FIRST_HOST)
                .map_err(self.store())?;
        let max_host = match self.plan.ipv4 {
            Some((_, tenant_len)) => MAX_INTERFACES_PER_TENANT.min((1u64 << (32 - tenant_len)) - 2),
            None => MAX_INTERFACES_PER_TENANT,
        };
        if host > max_host {
            return Err(AddressError::NoAddress { tenant: tenant.clone(), prefix: self.tenant_prefix(slot).to_string() });
        }
        let link_number =
            lowest_free(&transaction, "SELECT link_number FROM interfaces ORDER BY link_number", [], 1).map_err(self.store())?;
        let mac = mac.unwrap_or_else(|| generated_mac(slot, host));
        let mac_text = format_mac(mac);
        let taken: Option<String> = transaction
            .query_row("SELECT vm_id FROM interfaces WHERE tenant = ?1 AND mac = ?2", params![tenant.as_str(), mac_text], |row| row.get(0))
            .optional()
            .map_err(self.store())?;
        if taken.is_some() {
            return Err(AddressError::MacInUse { mac: mac_text });
        }
        transaction
            .execute(
                "INSERT INTO interfaces (vm_id, interface, tenant, host, link_number, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![vm_id.as_str(), interface, tenant.as_str(), host as i64, link_number as i64, mac_text],
            )
            .map_err(self.store())?;
        let allocation = self.allocation(vm_id.clone(), interface.to_owned(), tenant.clone(), slot, host, link_number, mac);
        transaction.commit().map_err(self.store())?;
        Ok(allocation)
    }

    /// Every allocation of one VM, in interface order.
    pub fn allocations_of(&self, vm_id: &VmId) -> Result<Vec<Allocation>, AddressError> {
        let connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statement =
            connection.prepare("SELECT i.interface FROM interfaces i WHERE i.vm_id = ?1 ORDER BY i.interface").map_err(self.store())?;
        let interfaces: Vec<String> = statement
            .query_map(params![vm_id.as_str()], |row| row.get(0))
            .map_err(self.store())?
            .collect::<Result<_, _>>()
            .map_err(self.store())?;
        drop(statement);
        interfaces.iter().filter_map(|interface| self.find(&connection, vm_id, interface).transpose()).collect()
    }

    /// Every VM that holds an address.
    pub fn vm_ids(&self) -> Result<Vec<VmId>, AddressError> {
        let connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statement = connection.prepare("SELECT DISTINCT vm_id FROM interfaces ORDER BY vm_id").map_err(self.store())?;
        let ids: Vec<String> =
            statement.query_map([], |row| row.get(0)).map_err(self.store())?.collect::<Result<_, _>>().map_err(self.store())?;
        Ok(ids.iter().filter_map(|id| VmId::new(id).ok()).collect())
    }

    /// Every allocation of a tenant.
    pub fn allocations_of_tenant(&self, tenant: &TenantId) -> Result<Vec<Allocation>, AddressError> {
        let connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statement =
            connection.prepare("SELECT vm_id, interface FROM interfaces WHERE tenant = ?1 ORDER BY host").map_err(self.store())?;
        let rows: Vec<(String, String)> = statement
            .query_map(params![tenant.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.store())?
            .collect::<Result<_, _>>()
            .map_err(self.store())?;
        drop(statement);
        rows.iter()
            .filter_map(|(vm_id, interface)| {
                VmId::new(vm_id.as_str()).ok().and_then(|vm_id| self.find(&connection, &vm_id, interface).transpose())
            })
            .collect()
    }

    /// Frees a VM's interfaces, and its tenant's slot with the tenant's last one.
    /// Returns what was freed.
    pub fn release(&self, vm_id: &VmId) -> Result<Vec<Allocation>, AddressError> {
        let freed = self.allocations_of(vm_id)?;
        let mut connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(self.store())?;
        transaction.execute("DELETE FROM interfaces WHERE vm_id = ?1", params![vm_id.as_str()]).map_err(self.store())?;
        transaction
            .execute("DELETE FROM tenants WHERE tenant NOT IN (SELECT DISTINCT tenant FROM interfaces)", [])
            .map_err(self.store())?;
        transaction.commit().map_err(self.store())?;
        Ok(freed)
    }

    /// Whether the tenant lets its VMs reach one another.
    pub fn intra_tenant(&self, tenant: &TenantId) -> Result<bool, AddressError> {
        let connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let allowed: Option<i64> = connection
            .query_row("SELECT intra_tenant FROM tenant_policies WHERE tenant = ?1", params![tenant.as_str()], |row| row.get(0))
            .optional()
            .map_err(self.store())?;
        Ok(allowed.unwrap_or(0) != 0)
    }

    /// Records the tenant's policy; it holds before the tenant's first VM and after its last.
    pub fn set_intra_tenant(&self, tenant: &TenantId, allowed: bool) -> Result<(), AddressError> {
        let connection = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        connection
            .execute(
                "INSERT INTO tenant_policies (tenant, intra_tenant) VALUES (?1, ?2) ON CONFLICT(tenant) DO UPDATE SET intra_tenant = excluded.intra_tenant",
                params![tenant.as_str(), i64::from(allowed)],
            )
            .map_err(self.store())?;
        Ok(())
    }

    /// The /64 of tenant slot `slot`.
    pub fn tenant_prefix(&self, slot: u64) -> Ipv6Net {
        let base = u128::from(self.plan.host_prefix.trunc().addr());
        let address = base | (u128::from(slot) << 64);
        Ipv6Net::new(Ipv6Addr::from(address), 64).unwrap_or_default()
    }

    fn tenant_subnet(&self, slot: u64) -> Option<Ipv4Net> {
        let (pool, tenant_len) = self.plan.ipv4?;
        let base = u32::from(pool.trunc().addr());
        let offset = u32::try_from(slot).ok()?.checked_shl(32 - u32::from(tenant_len))?;
        Ipv4Net::new(Ipv4Addr::from(base | offset), tenant_len).ok()
    }

    #[allow(clippy::too_many_arguments)]
    fn allocation(
        &self,
        vm_id: VmId,
        interface: String,
        tenant: TenantId,
        slot: u64,
        host: u64,
        link_number: u64,
        mac: [u8; 6],
    ) -> Allocation {
        let tenant_prefix = self.tenant_prefix(slot);
        let network = u128::from(tenant_prefix.addr());
        let ipv4 = self.tenant_subnet(slot).and_then(|subnet| {
            let base = u32::from(subnet.addr());
            let address = Ipv4Addr::from(base | u32::try_from(host).ok()?);
            Some((address, subnet, Ipv4Addr::from(base | 1)))
        });
        Allocation {
            vm_id,
            interface,
            tenant,
            tenant_slot: slot,
            host,
            link_number,
            mac,
            ipv6: Ipv6Addr::from(network | u128::from(host)),
            tenant_prefix,
            gateway6: Ipv6Addr::from(network | 1),
            ipv4,
        }
    }

    fn find(&self, connection: &Connection, vm_id: &VmId, interface: &str) -> Result<Option<Allocation>, AddressError> {
        let row = connection
            .query_row(
                "SELECT i.tenant, t.slot, i.host, i.link_number, i.mac FROM interfaces i JOIN tenants t ON t.tenant = i.tenant WHERE i.vm_id = ?1 AND i.interface = ?2",
                params![vm_id.as_str(), interface],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?, row.get::<_, i64>(3)?, row.get::<_, String>(4)?)),
            )
            .optional()
            .map_err(self.store())?;
        let Some((tenant, slot, host, link_number, mac)) = row else { return Ok(None) };
        let corrupt = |what: &str| AddressError::Store {
            path: self.path.clone(),
            source: rusqlite::Error::InvalidColumnName(format!("{what} of {vm_id}/{interface} is not valid")),
        };
        let tenant = TenantId::new(tenant).map_err(|_| corrupt("tenant"))?;
        let mac = metald_core::config::parse_mac(&mac).ok_or_else(|| corrupt("mac"))?;
        Ok(Some(self.allocation(vm_id.clone(), interface.to_owned(), tenant, slot as u64, host as u64, link_number as u64, mac)))
    }
}

/// The smallest number from `start` that the (sorted) query does not return.
fn lowest_free(connection: &Connection, query: &str, parameters: impl rusqlite::Params, start: u64) -> Result<u64, rusqlite::Error> {
    let mut statement = connection.prepare(query)?;
    let mut candidate = start;
    for used in statement.query_map(parameters, |row| row.get::<_, i64>(0))? {
        let used = used? as u64;
        if used == candidate {
            candidate += 1;
        } else if used > candidate {
            break;
        }
    }
    Ok(candidate)
}

/// A locally administered unicast MAC that encodes the tenant slot and the
/// interface number, so no two interfaces on a host share one.
fn generated_mac(slot: u64, host: u64) -> [u8; 6] {
    let slot = slot.to_be_bytes();
    let host = host.to_be_bytes();
    [GENERATED_MAC_PREFIX[0], GENERATED_MAC_PREFIX[1], slot[6], slot[7], host[6], host[7]]
}

/// The default host prefix: a ULA /48 (RFC 4193) whose 40-bit global id
/// comes from the host's machine id, so it is stable for the host and
/// unlikely to clash with another host's.
pub fn default_host_prefix(machine_id: &str) -> Ipv6Net {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(machine_id.trim().as_bytes());
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&digest[..5]);
    Ipv6Net::new(Ipv6Addr::from(octets), 48).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(prefix: &str) -> AddressPlan {
        AddressPlan { host_prefix: prefix.parse().unwrap(), ipv4: None }
    }

    fn vm(id: &str) -> VmId {
        VmId::new(id).unwrap()
    }

    fn tenant(id: &str) -> TenantId {
        TenantId::new(id).unwrap()
    }

    #[test]
    fn tenants_get_a_64_and_interfaces_an_address_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let book = AddressBook::open(dir.path().join("addresses.db"), plan("fd12:3456:789a::/48")).unwrap();
        let first = book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap();
        assert_eq!(first.tenant_prefix.to_string(), "fd12:3456:789a:1::/64");
        assert_eq!(first.ipv6, "fd12:3456:789a:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(first.gateway6, "fd12:3456:789a:1::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(first.mac_string(), "02:6d:00:01:00:02");
        let second = book.allocate(&vm("vm-2"), "eth0", &tenant("acme"), None).unwrap();
        assert_eq!(second.ipv6, "fd12:3456:789a:1::3".parse::<Ipv6Addr>().unwrap());
        let other = book.allocate(&vm("vm-3"), "eth0", &tenant("globex"), None).unwrap();
        assert_eq!(other.tenant_prefix.to_string(), "fd12:3456:789a:2::/64");
        assert_ne!(first.link_number, second.link_number);
        assert_eq!(book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap(), first, "asking again gives the same answer");
    }

    #[test]
    fn answers_survive_a_restart_and_nothing_is_handed_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addresses.db");
        let (first, second) = {
            let book = AddressBook::open(&path, plan("fd00:1::/48")).unwrap();
            (
                book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap(),
                book.allocate(&vm("vm-2"), "eth0", &tenant("acme"), None).unwrap(),
            )
        };
        let book = AddressBook::open(&path, plan("fd00:1::/48")).unwrap();
        assert_eq!(book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap(), first);
        let third = book.allocate(&vm("vm-3"), "eth0", &tenant("acme"), None).unwrap();
        assert!(third.ipv6 != first.ipv6 && third.ipv6 != second.ipv6);
        assert!(matches!(AddressBook::open(&path, plan("fd00:2::/48")), Err(AddressError::PrefixChanged { .. })));
    }

    #[test]
    fn a_release_frees_the_address_and_the_last_one_the_tenant_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let book = AddressBook::open(dir.path().join("a.db"), plan("fd00:1::/48")).unwrap();
        let first = book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap();
        book.allocate(&vm("vm-2"), "eth0", &tenant("acme"), None).unwrap();
        assert_eq!(book.release(&vm("vm-1")).unwrap(), vec![first.clone()]);
        assert_eq!(book.allocate(&vm("vm-4"), "eth0", &tenant("acme"), None).unwrap().ipv6, first.ipv6, "the freed address is reused");
        book.release(&vm("vm-2")).unwrap();
        book.release(&vm("vm-4")).unwrap();
        assert!(book.release(&vm("vm-unknown")).unwrap().is_empty());
        let other = book.allocate(&vm("vm-5"), "eth0", &tenant("globex"), None).unwrap();
        assert_eq!(other.tenant_slot, 1, "acme's slot was freed with its last interface");
    }

    #[test]
    fn an_exhausted_prefix_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let book = AddressBook::open(dir.path().join("a.db"), plan("fd00:1::/62")).unwrap();
        for index in 1..=3 {
            book.allocate(&vm(&format!("vm-{index}")), "eth0", &tenant(&format!("t{index}")), None).unwrap();
        }
        let error = book.allocate(&vm("vm-4"), "eth0", &tenant("t4"), None).unwrap_err();
        assert!(matches!(error, AddressError::NoTenantPrefix { slots: 3, .. }), "{error}");
        assert!(matches!(AddressBook::open(dir.path().join("b.db"), plan("fd00::/40")), Err(AddressError::HostPrefix(_))));
    }

    #[test]
    fn dual_stack_gives_each_tenant_a_subnet_under_the_same_rules() {
        let dir = tempfile::tempdir().unwrap();
        let plan = AddressPlan { host_prefix: "fd00:1::/48".parse().unwrap(), ipv4: Some(("10.200.0.0/16".parse().unwrap(), 24)) };
        let book = AddressBook::open(dir.path().join("a.db"), plan).unwrap();
        let first = book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap();
        let (address, subnet, gateway) = first.ipv4.unwrap();
        assert_eq!(
            (address.to_string(), subnet.to_string(), gateway.to_string()),
            ("10.200.1.2".into(), "10.200.1.0/24".into(), "10.200.1.1".into())
        );
        assert_eq!(book.tenant_slots(), 256);
        let small = AddressPlan { host_prefix: "fd00:2::/48".parse().unwrap(), ipv4: Some(("10.9.0.0/24".parse().unwrap(), 30)) };
        let book = AddressBook::open(dir.path().join("b.db"), small).unwrap();
        book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), None).unwrap();
        let error = book.allocate(&vm("vm-2"), "eth0", &tenant("acme"), None).unwrap_err();
        assert!(matches!(error, AddressError::NoAddress { .. }), "a /30 holds a gateway and one VM: {error}");
    }

    #[test]
    fn a_chosen_mac_is_kept_and_never_shared() {
        let dir = tempfile::tempdir().unwrap();
        let book = AddressBook::open(dir.path().join("a.db"), plan("fd00:1::/48")).unwrap();
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        assert_eq!(book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), Some(mac)).unwrap().mac, mac);
        assert!(matches!(book.allocate(&vm("vm-2"), "eth0", &tenant("acme"), Some(mac)), Err(AddressError::MacInUse { .. })));
        // Another tenant's bridge is another Ethernet: its MACs are its own.
        assert_eq!(book.allocate(&vm("vm-3"), "eth0", &tenant("globex"), Some(mac)).unwrap().mac, mac);
    }

    #[test]
    fn a_book_that_held_macs_unique_on_the_host_scopes_them_to_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let old_schema =
            SCHEMA.replace("    mac TEXT NOT NULL,", "    mac TEXT NOT NULL UNIQUE,").replace(",\n    UNIQUE (tenant, mac)", "");
        assert!(!old_schema.contains("UNIQUE (tenant, mac)"));
        Connection::open(&path).unwrap().execute_batch(&old_schema).unwrap();
        let book = AddressBook::open(&path, plan("fd00:1::/48")).unwrap();
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        book.allocate(&vm("vm-1"), "eth0", &tenant("acme"), Some(mac)).unwrap();
        drop(book);
        let book = AddressBook::open(&path, plan("fd00:1::/48")).unwrap();
        assert_eq!(book.allocations_of(&vm("vm-1")).unwrap()[0].mac, mac, "rows survive the rebuild");
        assert_eq!(book.allocate(&vm("vm-2"), "eth0", &tenant("globex"), Some(mac)).unwrap().mac, mac);
    }

    #[test]
    fn the_default_prefix_is_a_stable_ula_48() {
        let prefix = default_host_prefix("3d1219c7c4c5404aaa1f6d2a48adfda4\n");
        assert_eq!(prefix.prefix_len(), 48);
        assert_eq!(prefix.addr().octets()[0], 0xfd);
        assert_eq!(prefix, default_host_prefix("3d1219c7c4c5404aaa1f6d2a48adfda4"));
        assert_ne!(prefix, default_host_prefix("another-machine"));
    }
}
