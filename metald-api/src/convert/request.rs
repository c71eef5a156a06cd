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
/// The longest a graceful stop may be asked to wait for its guest: an hour,
/// as the longest shutdown a cloud's instances get.
pub const MAX_STOP_TIMEOUT_SECONDS: u64 = 3600;

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
    if u64::from(seconds) > MAX_STOP_TIMEOUT_SECONDS {
        return Err(WireError::TooLarge { field: "timeout_seconds".into(), value: timeout_seconds.into(), max: MAX_STOP_TIMEOUT_SECONDS });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    #[test]
    fn vm_ids_are_checked_and_may_be_optional() {
        assert_eq!(vm_id_from_wire("vm_id", "vm-1").unwrap().as_str(), "vm-1");
        let error = vm_id_from_wire("vm_id", "../etc").unwrap_err();
        assert_eq!(error.field(), "vm_id");
        assert!(matches!(error, WireError::InvalidId { .. }));
        assert_eq!(vm_id_from_wire("vm_id", "").unwrap_err().field(), "vm_id");
        assert_eq!(optional_vm_id_from_wire("vm_id", ""), Ok(None));
        assert_eq!(optional_vm_id_from_wire("vm_id", "vm-1").unwrap().unwrap().as_str(), "vm-1");
    }

    #[test]
    fn a_customer_id_may_only_repeat_the_callers_tenant() {
        assert_eq!(check_customer_id("customer_id", "", &acme()), Ok(()));
        assert_eq!(check_customer_id("customer_id", "acme", &acme()), Ok(()));
        let error = check_customer_id("customer_id", "globex", &acme()).unwrap_err();
        assert_eq!(error, WireError::OtherTenant { field: "customer_id".into(), given: "globex".into() });
    }

    #[test]
    fn a_create_request_becomes_a_core_request_for_the_callers_tenant() {
        let mut request = wire::CreateVmRequest { vm_id: "vm-7".into(), customer_id: "acme".into(), ..Default::default() };
        request.config.get_or_insert_default().cpu.get_or_insert_default().vcpu_count = 3;
        let create = create_vm_from_wire(&request, acme()).unwrap();
        assert_eq!(create.vm_id.unwrap().as_str(), "vm-7");
        assert_eq!(create.tenant, acme());
        assert_eq!(create.config.cpu.vcpu_count, 3);

        let generated = create_vm_from_wire(&wire::CreateVmRequest::default(), acme()).unwrap();
        assert_eq!(generated.vm_id, None, "an empty vm_id is generated by the manager");

        request.customer_id = "globex".into();
        assert_eq!(create_vm_from_wire(&request, acme()).unwrap_err().field(), "customer_id");
        request.customer_id.clear();
        request.config.get_or_insert_default().cpu.get_or_insert_default().vcpu_count = -3;
        assert_eq!(create_vm_from_wire(&request, acme()).unwrap_err().field(), "cpu.vcpu_count");
    }

    #[test]
    fn stop_options_take_the_timeout_in_seconds_and_zero_for_the_default() {
        assert_eq!(stop_options_from_wire(false, 0), Ok(StopOptions { force: false, timeout: None }));
        assert_eq!(stop_options_from_wire(true, 45), Ok(StopOptions { force: true, timeout: Some(Duration::from_secs(45)) }));
        assert_eq!(stop_options_from_wire(false, -1).unwrap_err().field(), "timeout_seconds");
    }

    #[test]
    fn console_reads_default_to_64_kib_and_stop_at_1_mib() {
        assert_eq!(console_max_bytes_from_wire(0), Ok(64 * 1024));
        assert_eq!(console_max_bytes_from_wire(100), Ok(100));
        assert_eq!(console_max_bytes_from_wire(1 << 20), Ok(1 << 20));
        let error = console_max_bytes_from_wire((1 << 20) + 1).unwrap_err();
        assert_eq!(error.to_string(), "max_bytes: 1048577 is more than the 1048576 allowed");
        assert_eq!(console_max_bytes_from_wire(-5).unwrap_err().field(), "max_bytes");
    }
}
