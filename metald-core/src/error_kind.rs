//! How every error of the core is classified for whoever called: the one
//! place that decides whether an error is the request's fault, a missing
//! VM, a VM in the wrong state, a full or unanswering host, or a host
//! fault. An API layer maps a kind to its own codes; it never looks
//! inside the errors to decide.

use crate::backend::BackendError;
use crate::config::ConfigError;
use crate::images::ImageError;
use crate::jailer::JailError;
use crate::launch::LaunchError;
use crate::manager::ManagerError;
use crate::network::NetworkError;
use crate::state::VmState;
use crate::uid_lease::UidLeaseError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind<'a> {
    /// The request asked for something wrong; `field` is its path in the
    /// contract (`storage[1].path`).
    InvalidArgument {
        field: &'a str,
    },
    NotFound,
    AlreadyExists,
    /// The VM's state does not allow the operation (`state`), or the VM
    /// cannot run on this host at all (`None`).
    FailedPrecondition {
        state: Option<VmState>,
    },
    /// The VMM cannot do this at all.
    Unimplemented,
    /// A VMM that does not answer or is gone, or a host that is stopping:
    /// the same call may succeed later.
    Unavailable,
    /// The host is full.
    Exhausted,
    /// A fault of the host, which its log explains.
    Internal,
}

impl ManagerError {
    pub fn kind(&self) -> ErrorKind<'_> {
        match self {
            ManagerError::InvalidConfig(error) => error.kind(),
            ManagerError::Image(error) => error.kind(),
            ManagerError::Network(error) => error.kind(),
            ManagerError::NotFound(_) => ErrorKind::NotFound,
            ManagerError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            ManagerError::InvalidState { current, .. } | ManagerError::WrongState { current, .. } => {
                ErrorKind::FailedPrecondition { state: Some(*current) }
            }
            ManagerError::Backend { source, .. } => source.kind(),
            ManagerError::ShuttingDown => ErrorKind::Unavailable,
            ManagerError::Incomplete(_)
            | ManagerError::Jail(_)
            | ManagerError::Setup { .. }
            | ManagerError::VmDir { .. }
            | ManagerError::Console { .. }
            | ManagerError::DeleteIncomplete { .. }
            | ManagerError::Store(_) => ErrorKind::Internal,
        }
    }

    /// The field of the request at fault, for errors the request caused.
    pub fn field(&self) -> Option<&str> {
        match self.kind() {
            ErrorKind::InvalidArgument { field } => Some(field),
            _ => None,
        }
    }
}

impl ConfigError {
    pub fn kind(&self) -> ErrorKind<'_> {
        ErrorKind::InvalidArgument { field: &self.field }
    }
}

impl ImageError {
    pub fn kind(&self) -> ErrorKind<'_> {
        match self {
            ImageError::ParentComponent { field, .. }
            | ImageError::OutsideRoot { field, .. }
            | ImageError::SymlinkEscape { field, .. }
            | ImageError::Missing { field, .. }
            | ImageError::NotAFile { field, .. }
            | ImageError::NotShared { field, .. }
            | ImageError::ChangedUnderUs { field, .. } => ErrorKind::InvalidArgument { field },
            // Found inside the root and still not opened or copied, or the
            // root itself is unusable: the host's problem.
            ImageError::Open { .. } | ImageError::Copy { .. } | ImageError::Root { .. } => ErrorKind::Internal,
        }
    }
}

impl NetworkError {
    pub fn kind(&self) -> ErrorKind<'_> {
        match self {
            NetworkError::Refused { field, .. } => ErrorKind::InvalidArgument { field },
            NetworkError::Attach { .. } | NetworkError::Detach { .. } => ErrorKind::Internal,
        }
    }
}

impl BackendError {
    pub fn kind(&self) -> ErrorKind<'_> {
        match self {
            BackendError::Unsupported { .. } => ErrorKind::Unimplemented,
            BackendError::FeatureUnavailable { field, .. } => ErrorKind::InvalidArgument { field },
            BackendError::DiedBeforeReady { .. }
            | BackendError::Exited { .. }
            | BackendError::NotRunning
            | BackendError::NotReady { .. }
            | BackendError::Transport { .. }
            | BackendError::Timeout { .. } => ErrorKind::Unavailable,
            BackendError::Unlaunchable { .. } => ErrorKind::FailedPrecondition { state: None },
            BackendError::Launch(error) => error.kind(),
            BackendError::Prepare { .. }
            | BackendError::SocketPathTooLong { .. }
            | BackendError::Api { .. }
            | BackendError::Signal(_)
            | BackendError::Console(_)
            | BackendError::ProcessStats { .. }
            | BackendError::TakeOver(_)
            | BackendError::NotTheSameVmm { .. } => ErrorKind::Internal,
        }
    }
}

impl LaunchError {
    pub fn kind(&self) -> ErrorKind<'static> {
        match self {
            LaunchError::Identity(error) => error.kind(),
            LaunchError::Jail(_) | LaunchError::Process(_) | LaunchError::Prepare { .. } => ErrorKind::Internal,
        }
    }
}

impl UidLeaseError {
    pub fn kind(&self) -> ErrorKind<'static> {
        match self {
            // Every VMM runs as its own user; when the host's range of them
            // is used up, the host is full, which is no fault.
            UidLeaseError::Exhausted(_) => ErrorKind::Exhausted,
            UidLeaseError::Taken(_) => ErrorKind::Internal,
        }
    }
}

impl JailError {
    pub fn kind(&self) -> ErrorKind<'static> {
        match self {
            JailError::Uid(error) => error.kind(),
            JailError::Prepare { .. }
            | JailError::NotReadable { .. }
            | JailError::DynamicProgram { .. }
            | JailError::Libraries(_)
            | JailError::ExposureGone { .. }
            | JailError::Cgroup(_)
            | JailError::Clone(_)
            | JailError::Thread { .. }
            | JailError::Child { .. }
            | JailError::Handshake(_)
            | JailError::Watch(_) => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmId;
    use crate::manager::BackendOperation;
    use crate::state::IllegalTransition;

    fn backend(source: BackendError) -> ManagerError {
        ManagerError::Backend {
            vm_id: VmId::new("vm-1").unwrap(),
            backend: "firecracker".into(),
            operation: BackendOperation::BOOT,
            source: Box::new(source),
        }
    }

    #[test]
    fn a_kind_is_found_however_deep_its_cause() {
        let full = backend(BackendError::Launch(LaunchError::Identity(UidLeaseError::Exhausted(900_000..900_010))));
        assert_eq!(full.kind(), ErrorKind::Exhausted);
        let feature =
            backend(BackendError::FeatureUnavailable { vmm: "firecracker", feature: "memory hotplug", field: "memory.max_size_bytes" });
        assert_eq!(feature.kind(), ErrorKind::InvalidArgument { field: "memory.max_size_bytes" });
        assert_eq!(feature.field(), Some("memory.max_size_bytes"));
        assert_eq!(backend(BackendError::NotRunning).kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn a_vm_in_the_wrong_state_says_which() {
        let paused = ManagerError::InvalidState {
            vm_id: VmId::new("vm-1").unwrap(),
            operation: "pause",
            current: VmState::Paused,
            source: IllegalTransition { from: VmState::Paused, to: VmState::Paused },
        };
        assert_eq!(paused.kind(), ErrorKind::FailedPrecondition { state: Some(VmState::Paused) });
        assert_eq!(paused.field(), None);
    }
}
