//! The parts of requests that are not a VM's configuration: ids, the
//! tenant named in a request, stop options, console sizes.

use std::time::Duration;

use metald_core::{CreateVm, StopOptions, TenantId, VmId};

use super::config::config_from_wire;
use super::{WireError, non_negative_i32};
use crate::proto::vmprovisioner::v1 as wire;

/// What `GetConsole` returns when `max_bytes` is 0.
pub const DEFAULT_CONSOLE_BYTES: usize = 64 << 10;
/// The most `GetConsole` returns at once.
pub const MAX_CONSOLE_BYTES: usize = 1 << 20;

/// A VM id the request must carry.
pub fn vm_id_from_wire(field: &str, value: &str) -> Result<VmId, WireError> {
    VmId::new(value).map_err(|source| WireError::InvalidId { field: field.to_owned(), source })
}

/// A VM id the request may leave empty (`CreateVmRequest.vm_id`, `WatchVmsRequest.vm_id`).
pub fn optional_vm_id_from_wire(field: &str, value: &str) -> Result<Option<VmId>, WireError> {
    if value.is_empty() { Ok(None) } else { vm_id_from_wire(field, value).map(Some) }
}

/// A `customer_id` in a request may only repeat the caller's tenant; empty is fine.
pub fn check_customer_id(field: &str, customer_id: &str, tenant: &TenantId) -> Result<(), WireError> {
    if customer_id.is_empty() || customer_id == tenant.as_str() {
        Ok(())
    } else {
        Err(WireError::OtherTenant { field: field.to_owned(), given: customer_id.to_owned() })
    }
}

/// A `CreateVmRequest` from the authenticated `tenant`. The configuration
/// is converted, not validated: [`metald_core::VmManager::create`]
/// validates it (naming fields the same way).
pub fn create_vm_from_wire(request: &wire::CreateVmRequest, tenant: TenantId) -> Result<CreateVm, WireError> {
    check_customer_id("customer_id", &request.customer_id, &tenant)?;
    let vm_id = optional_vm_id_from_wire("vm_id", &request.vm_id)?;
    let config = match request.config.as_option() {
        Some(config) => config_from_wire(config)?,
        None => metald_core::VmConfig::default(),
    };
    Ok(CreateVm { vm_id, tenant, config })
}

/// How to stop a guest: `timeout_seconds` of 0 leaves the manager's
/// default; a negative one is refused. `DeleteVm` and `RebootVm`, which
/// carry no timeout, pass 0.
pub fn stop_options_from_wire(force: bool, timeout_seconds: i32) -> Result<StopOptions, WireError> {
    let seconds = non_negative_i32("timeout_seconds", timeout_seconds)?;
    let timeout = (seconds > 0).then(|| Duration::from_secs(seconds.into()));
    Ok(StopOptions { force, timeout })
}

/// How many console bytes `GetConsole` returns: [`DEFAULT_CONSOLE_BYTES`]
/// for 0, at most [`MAX_CONSOLE_BYTES`]; more or a negative number is
/// refused as `max_bytes`.
pub fn console_max_bytes_from_wire(max_bytes: i32) -> Result<usize, WireError> {
    let bytes = non_negative_i32("max_bytes", max_bytes)?;
    match usize::try_from(bytes) {
        Ok(0) => Ok(DEFAULT_CONSOLE_BYTES),
        Ok(bytes) if bytes <= MAX_CONSOLE_BYTES => Ok(bytes),
        _ => Err(WireError::TooLarge { field: "max_bytes".into(), value: max_bytes.into(), max: MAX_CONSOLE_BYTES as u64 }),
    }
}
