//! The `admin` tables: hosts, tenants, keys and stray VMs, one row each.

use metald_api::proto::gateway::v1 as admin;

use super::values::{format_bytes, format_time};
use super::{plain_table, render};

fn used_of(resource: Option<&admin::HostResource>, show: impl Fn(i64) -> String) -> String {
    resource.map_or_else(|| "-".to_owned(), |resource| format!("{}/{}", show(resource.used), show(resource.total)))
}

fn limit(value: i64, show: impl Fn(i64) -> String) -> String {
    if value == 0 { "-".to_owned() } else { show(value) }
}

fn time_or_dash(value: i64) -> String {
    if value == 0 { "-".to_owned() } else { format_time(value) }
}

/// NAME, URL, MODE, HEALTH, VMS (placed), VCPUS, MEMORY and SLOTS (used/total), VMMS.
pub fn hosts_table(hosts: &[admin::Host]) -> String {
    if hosts.is_empty() {
        return "No hosts.".to_owned();
    }
    let mut table = plain_table();
    table.set_header(["NAME", "URL", "MODE", "HEALTH", "VMS", "VCPUS", "MEMORY", "SLOTS", "VMMS"]);
    for host in hosts {
        let health = if host.health_reason.is_empty() { host.health.clone() } else { format!("{} ({})", host.health, host.health_reason) };
        table.add_row([
            host.name.clone(),
            host.url.clone(),
            host.mode.clone(),
            health,
            host.placed_vms.to_string(),
            used_of(host.vcpus.as_option(), |value| value.to_string()),
            used_of(host.memory_bytes.as_option(), format_bytes),
            used_of(host.vms.as_option(), |value| value.to_string()),
            host.vmms.join(","),
        ]);
    }
    render(&mut table)
}

/// TENANT, MAX VMS, MAX VCPUS, MAX MEMORY ("-": no limit), CREATED.
pub fn tenants_table(tenants: &[admin::Tenant]) -> String {
    if tenants.is_empty() {
        return "No tenants.".to_owned();
    }
    let mut table = plain_table();
    table.set_header(["TENANT", "MAX VMS", "MAX VCPUS", "MAX MEMORY", "CREATED"]);
    for tenant in tenants {
        let quota = tenant.quota.as_option().cloned().unwrap_or_default();
        table.add_row([
            tenant.id.clone(),
            limit(quota.max_vms, |value| value.to_string()),
            limit(quota.max_vcpus, |value| value.to_string()),
            limit(quota.max_memory_bytes, format_bytes),
            format_time(tenant.created_timestamp),
        ]);
    }
    render(&mut table)
}

/// KEY (masked), TENANT, LABEL, CREATED, EXPIRES, LAST USED, REVOKED.
pub fn keys_table(keys: &[admin::ApiKey]) -> String {
    if keys.is_empty() {
        return "No API keys.".to_owned();
    }
    let mut table = plain_table();
    table.set_header(["KEY", "TENANT", "LABEL", "CREATED", "EXPIRES", "LAST USED", "REVOKED"]);
    for key in keys {
        table.add_row([
            key.masked.clone(),
            key.tenant_id.clone(),
            key.label.clone(),
            format_time(key.created_timestamp),
            time_or_dash(key.expires_timestamp),
            time_or_dash(key.last_used_timestamp),
            time_or_dash(key.revoked_timestamp),
        ]);
    }
    render(&mut table)
}

/// HOST, VM, TENANT.
pub fn strays_table(strays: &[admin::StrayVm]) -> String {
    if strays.is_empty() {
        return "No stray VMs: every VM on the hosts is one the gateway placed there.".to_owned();
    }
    let mut table = plain_table();
    table.set_header(["HOST", "VM", "TENANT"]);
    for stray in strays {
        table.add_row([stray.host.clone(), stray.vm_id.clone(), stray.customer_id.clone()]);
    }
    render(&mut table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_row_shows_its_health_and_room() {
        let host = admin::Host {
            name: "h1".into(),
            url: "http://10.0.0.5:7070".into(),
            mode: "cordoned".into(),
            health: "unreachable".into(),
            health_reason: "connection refused".into(),
            placed_vms: 3,
            vcpus: buffa::MessageField::some(admin::HostResource { total: 64, used: 6, ..Default::default() }),
            vmms: vec!["firecracker".into()],
            ..Default::default()
        };
        let text = hosts_table(&[host]);
        assert!(text.contains("cordoned  unreachable (connection refused)  3    6/64"), "{text}");
        assert_eq!(hosts_table(&[]), "No hosts.");
    }

    #[test]
    fn a_key_row_is_masked_and_says_when_it_was_used() {
        let key = admin::ApiKey { masked: "mdk_0123456789abcdef_…".into(), tenant_id: "acme".into(), ..Default::default() };
        let text = keys_table(&[key]);
        assert!(text.contains("mdk_0123456789abcdef_…  acme") && text.contains('-'), "{text}");
    }
}
