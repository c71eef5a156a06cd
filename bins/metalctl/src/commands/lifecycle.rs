//! Boot, pause, resume, shutdown, reboot and delete: one call each, which
//! answers with the VM's new state. People see `VM_ID: STATE`; `--json`
//! prints the response with the VM's id added as `vmId` (the API's
//! responses do not carry it), so a script piping several needs no more.

use std::time::Duration;

use buffa::EnumValue;
use metald_api::proto::vmprovisioner::v1::{
    BootVmRequest, DeleteVmRequest, PauseVmRequest, RebootVmRequest, ResumeVmRequest, ShutdownVmRequest, VmState,
};
use serde::Serialize;

use crate::cli::{DeleteArgs, RebootArgs, ShutdownArgs};
use crate::client::Api;
use crate::exit::CliError;
use crate::output::Printer;
use crate::output::values::state_name;

pub async fn boot(api: &Api, out: &mut Printer, vm_id: &str) -> Result<(), CliError> {
    let request = BootVmRequest { vm_id: vm_id.to_owned(), ..Default::default() };
    let response = api.vms().boot_vm_with_options(request, api.call()).await?.into_owned();
    settled(out, vm_id, "boot", response.success, response.state, &response)
}

pub async fn pause(api: &Api, out: &mut Printer, vm_id: &str) -> Result<(), CliError> {
    let request = PauseVmRequest { vm_id: vm_id.to_owned(), ..Default::default() };
    let response = api.vms().pause_vm_with_options(request, api.call()).await?.into_owned();
    settled(out, vm_id, "pause", response.success, response.state, &response)
}

pub async fn resume(api: &Api, out: &mut Printer, vm_id: &str) -> Result<(), CliError> {
    let request = ResumeVmRequest { vm_id: vm_id.to_owned(), ..Default::default() };
    let response = api.vms().resume_vm_with_options(request, api.call()).await?.into_owned();
    settled(out, vm_id, "resume", response.success, response.state, &response)
}

pub async fn shutdown(api: &Api, out: &mut Printer, args: &ShutdownArgs) -> Result<(), CliError> {
    let request = ShutdownVmRequest {
        vm_id: args.vm_id.clone(),
        force: args.force,
        timeout_seconds: args.grace_seconds.unwrap_or(0),
        ..Default::default()
    };
    let options = api.call_waiting_for_guest(grace(args.force, args.grace_seconds));
    let response = api.vms().shutdown_vm_with_options(request, options).await?.into_owned();
    if response.killed && !args.force && !out.json_mode() {
        // Shut down as asked, so not an error; but the guest was not given its clean end.
        eprintln!("metalctl: the guest of {} did not power off within the grace time; its VMM was killed", args.vm_id);
    }
    settled(out, &args.vm_id, "shut down", response.success, response.state, &response)
}

pub async fn reboot(api: &Api, out: &mut Printer, args: &RebootArgs) -> Result<(), CliError> {
    let request = RebootVmRequest { vm_id: args.vm_id.clone(), force: args.force, ..Default::default() };
    let options = api.call_waiting_for_guest(grace(args.force, None));
    let response = api.vms().reboot_vm_with_options(request, options).await?.into_owned();
    settled(out, &args.vm_id, "reboot", response.success, response.state, &response)
}

pub async fn delete(api: &Api, out: &mut Printer, args: &DeleteArgs) -> Result<(), CliError> {
    let request = DeleteVmRequest { vm_id: args.vm_id.clone(), force: args.force, ..Default::default() };
    let options = api.call_waiting_for_guest(grace(args.force, None));
    let response = api.vms().delete_vm_with_options(request, options).await?.into_owned();
    if !response.success {
        return Err(unsuccessful(&args.vm_id, "delete"));
    }
    if out.json_mode() { out.json(&with_vm_id(&args.vm_id, &response)?) } else { out.line(&format!("{}: deleted", args.vm_id)) }
}

/// How long the host may wait for the guest: nothing when forced, the
/// given seconds, or `None` for the host's default.
fn grace(force: bool, seconds: Option<i32>) -> Option<Duration> {
    if force {
        return Some(Duration::ZERO);
    }
    seconds.and_then(|seconds| u64::try_from(seconds).ok()).map(Duration::from_secs)
}

/// Reports the state an operation left the VM in.
fn settled<T: Serialize>(
    out: &mut Printer,
    vm_id: &str,
    operation: &str,
    success: bool,
    state: EnumValue<VmState>,
    response: &T,
) -> Result<(), CliError> {
    if !success {
        return Err(unsuccessful(vm_id, operation));
    }
    if out.json_mode() { out.json(&with_vm_id(vm_id, response)?) } else { out.line(&format!("{vm_id}: {}", state_name(state))) }
}

/// The response as proto JSON with `vmId` in it.
fn with_vm_id<T: Serialize>(vm_id: &str, response: &T) -> Result<serde_json::Value, CliError> {
    let mut value =
        serde_json::to_value(response).map_err(|error| CliError::Unexpected(format!("cannot print the answer as JSON: {error}")))?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert("vmId".to_owned(), serde_json::Value::String(vm_id.to_owned()));
    }
    Ok(value)
}

/// The host answered without an error but did not report success either.
pub fn unsuccessful(vm_id: &str, operation: &str) -> CliError {
    CliError::Unexpected(format!("the host did not report success when asked to {operation} VM {vm_id}, and gave no error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_stop_waits_for_no_guest() {
        assert_eq!(grace(true, Some(30)), Some(Duration::ZERO));
        assert_eq!(grace(false, Some(30)), Some(Duration::from_secs(30)));
        assert_eq!(grace(false, None), None);
    }
}
