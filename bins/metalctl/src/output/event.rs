//! One `watch` event as one line of text.

use metald_api::proto::vmprovisioner::v1::VmEvent;

use super::values::{format_time_ms, state_name};

/// `TIME VM KIND STATE [REASON]`, separated by spaces; the reason, which
/// may itself hold spaces, comes last.
pub fn event_line(event: &VmEvent) -> String {
    let kind = if event.kind.is_empty() { "-" } else { event.kind.as_str() };
    let mut line = format!("{} {} {kind} {}", format_time_ms(event.timestamp), event.vm_id, state_name(event.state));
    let reason = event.reason.split_whitespace().collect::<Vec<_>>().join(" ");
    if !reason.is_empty() {
        line.push(' ');
        line.push_str(&reason);
    }
    line
}

#[cfg(test)]
mod tests {
    use metald_api::proto::vmprovisioner::v1::VmState;

    use super::*;

    #[test]
    fn an_event_reads_time_vm_kind_state_reason() {
        let event = VmEvent {
            vm_id: "vm-1".into(),
            state: VmState::VM_STATE_SHUTDOWN.into(),
            kind: "stopped".into(),
            timestamp: 1_714_564_800_250,
            reason: "exited with code 0".into(),
            ..Default::default()
        };
        assert_eq!(event_line(&event), "2024-05-01T12:00:00.250Z vm-1 stopped shutdown exited with code 0");
    }

    #[test]
    fn a_deleted_vm_has_no_state_and_no_reason() {
        let event = VmEvent { vm_id: "vm-1".into(), kind: "deleted".into(), timestamp: 1_714_564_800_000, ..Default::default() };
        assert_eq!(event_line(&event), "2024-05-01T12:00:00.000Z vm-1 deleted -");
    }
}
