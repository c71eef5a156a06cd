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

/// The `kind` string of an event. The match is exhaustive on purpose: a
/// kind added to core does not compile here until it has a name on the wire.
pub fn event_kind_name(kind: &VmEventKind) -> &'static str {
    match kind {
        VmEventKind::Created => "created",
        VmEventKind::Booted(_) => "booted",
        VmEventKind::Paused { .. } => "paused",
        VmEventKind::Resumed { .. } => "resumed",
        VmEventKind::Rebooted { .. } => "rebooted",
        VmEventKind::Stopped { .. } => "stopped",
        VmEventKind::Failed { .. } => "failed",
        VmEventKind::Deleted => "deleted",
    }
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
        | VmEventKind::Deleted => String::new(),
    }
}
