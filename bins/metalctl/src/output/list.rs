//! The `list` table: one row per VM.

use metald_api::proto::vmprovisioner::v1::ListVmsResponse;

use super::values::{format_bytes, format_time, state_name};
use super::{plain_table, render};

/// VM ID, STATE, VCPUS, MEMORY, CREATED, FAILURE for each VM, in the
/// host's order (by id); TENANT first when the VMs are every tenant's.
pub fn list_table(response: &ListVmsResponse, with_tenant: bool) -> String {
    if response.vms.is_empty() {
        return "No VMs.".to_owned();
    }
    let mut table = plain_table();
    let header = ["TENANT", "VM ID", "STATE", "VCPUS", "MEMORY", "CREATED", "FAILURE"];
    let skip = usize::from(!with_tenant);
    table.set_header(&header[skip..]);
    for vm in &response.vms {
        let row = [
            vm.customer_id.clone(),
            vm.vm_id.clone(),
            state_name(vm.state),
            vm.vcpu_count.to_string(),
            format_bytes(vm.memory_size_bytes),
            format_time(vm.created_timestamp),
            one_line(&vm.failure_reason),
        ];
        table.add_row(row.into_iter().skip(skip));
    }
    render(&mut table)
}

/// A failure reason can span lines; a table row cannot.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use metald_api::proto::vmprovisioner::v1::{VmInfo, VmState};

    use super::*;

    fn vm(id: &str, state: VmState, vcpus: i32, memory: i64, failure: &str) -> VmInfo {
        VmInfo {
            vm_id: id.into(),
            state: state.into(),
            vcpu_count: vcpus,
            memory_size_bytes: memory,
            created_timestamp: 1_714_564_800_000,
            failure_reason: failure.into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_vm_is_a_row_under_the_header() {
        let response = ListVmsResponse {
            vms: vec![
                vm("vm-a", VmState::VM_STATE_RUNNING, 2, 512 << 20, ""),
                vm("vm-b", VmState::VM_STATE_FAILED, 1, 1 << 30, "the VMM exited with code 1\nwhile booting"),
            ],
            total_count: 2,
            ..Default::default()
        };
        let expected = "\
VM ID  STATE    VCPUS  MEMORY   CREATED               FAILURE
vm-a   running  2      512 MiB  2024-05-01T12:00:00Z
vm-b   failed   1      1 GiB    2024-05-01T12:00:00Z  the VMM exited with code 1 while booting";
        assert_eq!(list_table(&response, false), expected);
    }

    #[test]
    fn every_tenants_vms_carry_their_tenant_first() {
        let mut owned = vm("vm-a", VmState::VM_STATE_RUNNING, 2, 512 << 20, "");
        owned.customer_id = "acme".into();
        let response = ListVmsResponse { vms: vec![owned], total_count: 1, ..Default::default() };
        let expected = "\
TENANT  VM ID  STATE    VCPUS  MEMORY   CREATED               FAILURE
acme    vm-a   running  2      512 MiB  2024-05-01T12:00:00Z";
        assert_eq!(list_table(&response, true), expected);
    }

    #[test]
    fn no_vms_is_just_the_header() {
        assert_eq!(list_table(&ListVmsResponse::default(), false), "No VMs.");
    }
}
