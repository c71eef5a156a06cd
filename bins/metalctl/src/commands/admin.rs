//! `admin`: a gateway's hosts, tenants and API keys, through its
//! `gateway.v1.AdminService` (the admin token). Lists print tables, or the
//! answer as JSON with `--json`; a made key is printed once.

use std::time::SystemTime;

use metald_api::proto::gateway::v1 as admin;

use crate::cli::{AdminCommand, HostsCommand, KeysCommand, QuotaArgs, TenantsCommand};
use crate::client::Api;
use crate::exit::CliError;
use crate::output::values::unix_ms;
use crate::output::{Printer, hosts_table, keys_table, strays_table, tenants_table};

fn quota(args: &QuotaArgs) -> admin::Quota {
    admin::Quota {
        max_vms: args.max_vms.unwrap_or(0),
        max_vcpus: args.max_vcpus.unwrap_or(0),
        max_memory_bytes: args.max_memory.unwrap_or(0),
        ..Default::default()
    }
}

fn host_request(name: &str) -> admin::HostRequest {
    admin::HostRequest { name: name.to_owned(), ..Default::default() }
}

pub async fn admin(api: &Api, out: &mut Printer, command: AdminCommand) -> Result<(), CliError> {
    let service = api.admin();
    match command {
        AdminCommand::Hosts(command) => {
            let changed = match command {
                HostsCommand::List => {
                    let hosts = service.list_hosts_with_options(admin::ListHostsRequest::default(), api.call()).await?.into_owned();
                    return if out.json_mode() { out.json(&hosts) } else { out.line(&hosts_table(&hosts.hosts)) };
                }
                HostsCommand::Add { name, url } => {
                    let request = admin::AddHostRequest { name, url, ..Default::default() };
                    service.add_host_with_options(request, api.call()).await?.into_owned()
                }
                HostsCommand::Cordon { name } => service.cordon_host_with_options(host_request(&name), api.call()).await?.into_owned(),
                HostsCommand::Uncordon { name } => service.uncordon_host_with_options(host_request(&name), api.call()).await?.into_owned(),
                HostsCommand::Drain { name } => service.drain_host_with_options(host_request(&name), api.call()).await?.into_owned(),
                HostsCommand::Remove { name, force } => {
                    let request = admin::RemoveHostRequest { name: name.clone(), force, ..Default::default() };
                    let removed = service.remove_host_with_options(request, api.call()).await?.into_owned();
                    return if out.json_mode() { out.json(&removed) } else { out.line(&format!("host {name} removed")) };
                }
            };
            if out.json_mode() { out.json(&changed) } else { out.line(&hosts_table(std::slice::from_ref(&changed))) }
        }
        AdminCommand::Tenants(command) => {
            let changed = match command {
                TenantsCommand::List => {
                    let tenants = service.list_tenants_with_options(admin::ListTenantsRequest::default(), api.call()).await?.into_owned();
                    return if out.json_mode() { out.json(&tenants) } else { out.line(&tenants_table(&tenants.tenants)) };
                }
                TenantsCommand::Create { id, quota: limits } => {
                    let request = admin::CreateTenantRequest { id, quota: buffa::MessageField::some(quota(&limits)), ..Default::default() };
                    service.create_tenant_with_options(request, api.call()).await?.into_owned()
                }
                TenantsCommand::SetQuota { id, quota: limits } => {
                    let request =
                        admin::SetTenantQuotaRequest { id, quota: buffa::MessageField::some(quota(&limits)), ..Default::default() };
                    service.set_tenant_quota_with_options(request, api.call()).await?.into_owned()
                }
            };
            if out.json_mode() { out.json(&changed) } else { out.line(&tenants_table(std::slice::from_ref(&changed))) }
        }
        AdminCommand::Keys(command) => match command {
            KeysCommand::List { tenant } => {
                let request = admin::ListApiKeysRequest { tenant_id: tenant.unwrap_or_default(), ..Default::default() };
                let keys = service.list_api_keys_with_options(request, api.call()).await?.into_owned();
                if out.json_mode() { out.json(&keys) } else { out.line(&keys_table(&keys.keys)) }
            }
            KeysCommand::Create { tenant, label, expires_in } => {
                let expires = expires_in.and_then(|after| SystemTime::now().checked_add(after)).map_or(0, unix_ms);
                let request = admin::CreateApiKeyRequest { tenant_id: tenant, label, expires_timestamp: expires, ..Default::default() };
                let made = service.create_api_key_with_options(request, api.call()).await?.into_owned();
                if out.json_mode() {
                    return out.json(&made);
                }
                out.line(&made.key)?;
                eprintln!("the key is shown only now: keep it; the gateway stores its SHA-256 alone");
                Ok(())
            }
            KeysCommand::Revoke { id } => {
                let revoked = service
                    .revoke_api_key_with_options(admin::RevokeApiKeyRequest { id, ..Default::default() }, api.call())
                    .await?
                    .into_owned();
                if out.json_mode() { out.json(&revoked) } else { out.line(&keys_table(std::slice::from_ref(&revoked))) }
            }
        },
        AdminCommand::Strays => {
            let strays = service.list_stray_vms_with_options(admin::ListStrayVmsRequest::default(), api.call()).await?.into_owned();
            if out.json_mode() { out.json(&strays) } else { out.line(&strays_table(&strays.vms)) }
        }
    }
}
