//! [`VmState`] both ways, and `ListVmsRequest.state_filter` to core states.

use buffa::EnumValue;
use metald_core::VmState;

use super::WireError;
use crate::proto::vmprovisioner::v1 as wire;

/// A core state as the wire shows it.
pub fn state_to_wire(state: VmState) -> wire::VmState {
    match state {
        VmState::Created => wire::VmState::VM_STATE_CREATED,
        VmState::Running => wire::VmState::VM_STATE_RUNNING,
        VmState::Paused => wire::VmState::VM_STATE_PAUSED,
        VmState::Shutdown => wire::VmState::VM_STATE_SHUTDOWN,
        VmState::Failed => wire::VmState::VM_STATE_FAILED,
        // The contract has no deleted state: a deleted VM is not found.
        // Only the last event of a VM (kind "deleted") carries this state,
        // and there the kind says what happened.
        VmState::Deleted => wire::VmState::VM_STATE_UNSPECIFIED,
    }
}

/// A wire state as a core state; `None` for `VM_STATE_UNSPECIFIED`, which
/// names no state.
pub fn state_from_wire(state: wire::VmState) -> Option<VmState> {
    match state {
        wire::VmState::VM_STATE_UNSPECIFIED => None,
        wire::VmState::VM_STATE_CREATED => Some(VmState::Created),
        wire::VmState::VM_STATE_RUNNING => Some(VmState::Running),
        wire::VmState::VM_STATE_PAUSED => Some(VmState::Paused),
        wire::VmState::VM_STATE_SHUTDOWN => Some(VmState::Shutdown),
        wire::VmState::VM_STATE_FAILED => Some(VmState::Failed),
    }
}

/// The states `ListVms` keeps; empty means every state. An unknown value
/// or `VM_STATE_UNSPECIFIED` is refused as `state_filter[i]` rather than
/// silently matching nothing.
pub fn state_filter_from_wire(filter: &[EnumValue<wire::VmState>]) -> Result<Vec<VmState>, WireError> {
    filter
        .iter()
        .enumerate()
        .map(|(index, value)| {
            let field = format!("state_filter[{index}]");
            match value {
                EnumValue::Known(state) => state_from_wire(*state).ok_or(WireError::UnspecifiedState { field }),
                EnumValue::Unknown(value) => Err(WireError::UnknownEnumValue { field, enum_name: "VmState", value: *value }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_state_goes_to_the_wire_and_back() {
        for state in VmState::ALL {
            let wire_state = state_to_wire(state);
            if state == VmState::Deleted {
                assert_eq!(wire_state, wire::VmState::VM_STATE_UNSPECIFIED);
                assert_eq!(state_from_wire(wire_state), None);
            } else {
                assert_eq!(state_from_wire(wire_state), Some(state), "{state}");
            }
        }
    }

    #[test]
    fn wire_states_keep_the_contract_numbers() {
        let numbers = [
            (wire::VmState::VM_STATE_UNSPECIFIED, 0),
            (wire::VmState::VM_STATE_CREATED, 1),
            (wire::VmState::VM_STATE_RUNNING, 2),
            (wire::VmState::VM_STATE_PAUSED, 3),
            (wire::VmState::VM_STATE_SHUTDOWN, 4),
            (wire::VmState::VM_STATE_FAILED, 5),
        ];
        for (state, number) in numbers {
            assert_eq!(state as i32, number, "{state:?}");
        }
    }

    #[test]
    fn a_state_filter_names_core_states() {
        let filter = [wire::VmState::VM_STATE_RUNNING.into(), wire::VmState::VM_STATE_FAILED.into()];
        assert_eq!(state_filter_from_wire(&filter), Ok(vec![VmState::Running, VmState::Failed]));
        assert_eq!(state_filter_from_wire(&[]), Ok(vec![]));
    }

    #[test]
    fn a_state_filter_refuses_unknown_and_unspecified_values_by_index() {
        let unknown = [wire::VmState::VM_STATE_RUNNING.into(), EnumValue::Unknown(42)];
        let error = state_filter_from_wire(&unknown).unwrap_err();
        assert_eq!(error, WireError::UnknownEnumValue { field: "state_filter[1]".into(), enum_name: "VmState", value: 42 });
        assert_eq!(error.to_string(), "state_filter[1]: 42 is not a VmState value this server knows");
        let unspecified = [wire::VmState::VM_STATE_UNSPECIFIED.into()];
        assert_eq!(state_filter_from_wire(&unspecified).unwrap_err().field(), "state_filter[0]");
    }
}
