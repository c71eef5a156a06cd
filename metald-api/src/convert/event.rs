//! Core [`VmEvent`]s as `WatchVms` streams them.

use metald_core::{VmEvent, VmEventKind};

use super::state::state_to_wire;
use super::unix_ms;
use crate::proto::vmprovisioner::v1 as wire;

/// One event on the wire. Usage figures and process details stay on the host.
pub fn event_to_wire(event: &VmEvent) -> wire::VmEvent {
    wire::VmEvent {
        vm_id: event.vm_id.to_string(),
        customer_id: event.tenant.to_string(),
        state: state_to_wire(event.state).into(),
        kind: event_kind_name(&event.kind).to_owned(),
        timestamp: unix_ms(event.at),
        reason: event_reason(&event.kind),
        ..Default::default()
    }
}

/// The `kind` string of an event: core's name for it, which a new kind
/// must have before it compiles.
pub fn event_kind_name(kind: &VmEventKind) -> &'static str {
    kind.name()
}

/// Why the VM failed, or how its VMM ended when it stopped; empty for the rest.
fn event_reason(kind: &VmEventKind) -> String {
    match kind {
        VmEventKind::Failed { reason, .. } => reason.clone(),
        VmEventKind::Stopped { exit, .. } => exit.map(|exit| exit.to_string()).unwrap_or_default(),
        VmEventKind::Created
        | VmEventKind::Booted(_)
        | VmEventKind::Paused { .. }
        | VmEventKind::Resumed { .. }
        | VmEventKind::Rebooted { .. }
        | VmEventKind::TakenOver { .. }
        | VmEventKind::FoundStopped { .. }
        | VmEventKind::Deleted => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use metald_core::events::RunningVmm;
    use metald_core::process::ProcessExit;
    use metald_core::{TenantId, VmId, VmState};

    use super::*;

    fn event(state: VmState, kind: VmEventKind) -> wire::VmEvent {
        let event = VmEvent {
            vm_id: VmId::new("vm-1").unwrap(),
            tenant: TenantId::new("acme").unwrap(),
            at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            state,
            kind,
        };
        event_to_wire(&event)
    }

    fn running() -> RunningVmm {
        RunningVmm { pid: Some(1), cgroup: None, taps: vec!["tap0".into()], vcpus: 1, memory_bytes: 128 << 20 }
    }

    #[test]
    fn an_event_carries_the_vm_its_tenant_state_and_time() {
        let wire_event = event(VmState::Created, VmEventKind::Created);
        assert_eq!((wire_event.vm_id.as_str(), wire_event.customer_id.as_str()), ("vm-1", "acme"));
        assert_eq!(wire_event.state, wire::VmState::VM_STATE_CREATED);
        assert_eq!(wire_event.timestamp, 1_700_000_000_000);
        assert_eq!((wire_event.kind.as_str(), wire_event.reason.as_str()), ("created", ""));
    }

    #[test]
    fn every_kind_has_its_name_and_only_failures_and_stops_a_reason() {
        let cases = [
            (VmState::Running, VmEventKind::Booted(running()), "booted", ""),
            (VmState::Paused, VmEventKind::Paused { usage: None }, "paused", ""),
            (VmState::Running, VmEventKind::Resumed { usage: None }, "resumed", ""),
            (VmState::Running, VmEventKind::Rebooted { running: running(), ended: None, previous_booted_at: None }, "rebooted", ""),
            (
                VmState::Shutdown,
                VmEventKind::Stopped {
                    exit: Some(ProcessExit::Exited { code: 0 }),
                    forced: false,
                    by_guest: true,
                    usage: None,
                    booted_at: None,
                },
                "stopped",
                "exited with code 0",
            ),
            (
                VmState::Shutdown,
                VmEventKind::Stopped { exit: None, forced: true, by_guest: false, usage: None, booted_at: None },
                "stopped",
                "",
            ),
            (
                VmState::Failed,
                VmEventKind::Failed {
                    reason: "the VMM died".into(),
                    exit: Some(ProcessExit::Killed { signal: 9 }),
                    usage: None,
                    booted_at: None,
                    earlier_ends: Vec::new(),
                },
                "failed",
                "the VMM died",
            ),
        ];
        for (state, kind, name, reason) in cases {
            let wire_event = event(state, kind);
            assert_eq!((wire_event.kind.as_str(), wire_event.reason.as_str()), (name, reason));
        }
    }

    #[test]
    fn a_deleted_vm_has_no_state_on_the_wire() {
        let wire_event = event(VmState::Deleted, VmEventKind::Deleted);
        assert_eq!(wire_event.kind, "deleted");
        assert_eq!(wire_event.state, wire::VmState::VM_STATE_UNSPECIFIED);
    }
}
