//! The VM lifecycle as an explicit transition table. Everything that moves a
//! VM from one state to another asks [`VmState::transition`] first, so an
//! illegal move is refused in one place with both states named.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The VMM runs and is configured; the guest has not started.
    Created,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are stopped; its memory is kept.
    Paused,
    /// The guest stopped (shutdown, reset, or a forced stop); it may boot again.
    Shutdown,
    /// The VMM died or could not do what it was asked; only delete remains.
    Failed,
    /// Gone. Terminal: nothing leaves this state.
    Deleted,
}

impl VmState {
    pub const ALL: [VmState; 6] =
        [VmState::Created, VmState::Running, VmState::Paused, VmState::Shutdown, VmState::Failed, VmState::Deleted];

    /// Whether a VM may move from `self` to `to`.
    pub fn can_transition_to(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Created, Running | Shutdown | Failed | Deleted)
                | (Running, Paused | Shutdown | Failed)
                | (Paused, Running | Shutdown | Failed)
                | (Shutdown, Running | Failed | Deleted)
                | (Failed, Running | Deleted)
        )
    }

    /// `to`, if the table allows the move; otherwise an error naming both states.
    pub fn transition(self, to: VmState) -> Result<VmState, IllegalTransition> {
        if self.can_transition_to(to) { Ok(to) } else { Err(IllegalTransition { from: self, to }) }
    }

    /// Whether a VMM process is expected to be alive in this state.
    pub fn has_live_vmm(self) -> bool {
        matches!(self, VmState::Created | VmState::Running | VmState::Paused)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
            VmState::Failed => "Failed",
            VmState::Deleted => "Deleted",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move the state table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a VM cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: VmState,
    pub to: VmState,
}

#[cfg(test)]
mod tests {
    use super::VmState::{self, *};

    /// The whole table, written out once more as the reader expects it.
    const ALLOWED: &[(VmState, VmState)] = &[
        (Created, Running),
        (Created, Shutdown),
        (Created, Failed),
        (Created, Deleted),
        (Running, Paused),
        (Running, Shutdown),
        (Running, Failed),
        (Paused, Running),
        (Paused, Shutdown),
        (Paused, Failed),
        (Shutdown, Running),
        (Shutdown, Failed),
        (Shutdown, Deleted),
        (Failed, Running),
        (Failed, Deleted),
    ];

    #[test]
    fn every_pair_of_states_is_allowed_or_refused_as_the_table_says() {
        for from in VmState::ALL {
            for to in VmState::ALL {
                let expected = ALLOWED.contains(&(from, to));
                match from.transition(to) {
                    Ok(state) => {
                        assert!(expected, "{from} -> {to} was allowed");
                        assert_eq!(state, to);
                    }
                    Err(error) => {
                        assert!(!expected, "{from} -> {to} was refused");
                        assert_eq!((error.from, error.to), (from, to));
                        assert_eq!(error.to_string(), format!("a VM cannot go from {from} to {to}"));
                    }
                }
            }
        }
    }

    #[test]
    fn deleted_is_terminal_and_no_state_moves_to_itself() {
        for to in VmState::ALL {
            assert!(!Deleted.can_transition_to(to));
        }
        for state in VmState::ALL {
            assert!(!state.can_transition_to(state));
        }
    }
}
