//! Manager and request errors as ConnectRPC errors.
//!
//! What the caller got wrong is told in full, naming the field
//! (`invalid_argument`, "storage[1].path: ..."), the VM (`not_found`,
//! `already_exists`) or the VM's state (`failed_precondition`). What went
//! wrong on the host is told only in general terms: `unavailable` when the
//! VM's VMM is dead or does not answer (a later call may succeed),
//! `internal` otherwise. Host paths, VMM answers and process output never
//! reach the caller; the full error chain goes to the log at error level.
//!
//! Every match is exhaustive, so a new variant in core does not compile
//! until it is mapped here.

use connectrpc::ConnectError;
use metald_core::VmId;
use metald_core::backend::BackendError;
use metald_core::images::ImageError;
use metald_core::manager::ManagerError;
use metald_core::network::NetworkError;

use crate::convert::WireError;

/// The ConnectRPC error a manager error becomes.
pub fn manager_error_to_connect(error: &ManagerError) -> ConnectError {
    match error {
        ManagerError::InvalidConfig(config) => ConnectError::invalid_argument(config.to_string()),
        ManagerError::Image(image) => image_error_to_connect(error, image),
        ManagerError::Network(network) => network_error_to_connect(error, network),
        ManagerError::NotFound(vm_id) => ConnectError::not_found(format!("VM {vm_id} does not exist")),
        ManagerError::AlreadyExists(vm_id) => ConnectError::already_exists(format!("VM {vm_id} already exists")),
        ManagerError::InvalidState { vm_id, operation, current, source: _ } => {
            ConnectError::failed_precondition(format!("VM {vm_id} is {current} and cannot {operation}"))
        }
        ManagerError::WrongState { vm_id, operation, current, required } => {
            ConnectError::failed_precondition(format!("VM {vm_id} is {current}; to {operation} it must be {required}"))
        }
        ManagerError::Backend { vm_id, backend, operation, source } => backend_error_to_connect(error, vm_id, backend, operation, source),
        ManagerError::ShuttingDown => ConnectError::unavailable("the host is shutting down; the operation did not finish"),
        ManagerError::DeleteIncomplete { vm_id, problems: _ } => {
            log_host_error(error);
            ConnectError::internal(format!("deleting VM {vm_id} did not finish; the VM is left Failed and deleting it again may succeed"))
        }
        ManagerError::Incomplete(_)
        | ManagerError::Jail(_)
        | ManagerError::Setup { .. }
        | ManagerError::VmDir { .. }
        | ManagerError::Console { .. } => internal(error),
    }
}

/// The ConnectRPC error a request that cannot be converted becomes.
pub fn wire_error_to_connect(error: &WireError) -> ConnectError {
    match error {
        WireError::OtherTenant { .. } => ConnectError::permission_denied(error.to_string()),
        WireError::InvalidId { .. } => ConnectError::invalid_argument(metald_core::error_chain(error)),
        WireError::Negative { .. }
        | WireError::TooLarge { .. }
        | WireError::UnknownEnumValue { .. }
        | WireError::UnspecifiedState { .. } => ConnectError::invalid_argument(error.to_string()),
    }
}

/// Image errors name the field and the path as the caller gave it, never
/// the host's image root or where a symlink leads.
fn image_error_to_connect(error: &ManagerError, image: &ImageError) -> ConnectError {
    let refused = |field: &str, path: &str, why: &str| ConnectError::invalid_argument(format!("{field}: {path:?} {why}"));
    match image {
        ImageError::ParentComponent { field, path } => refused(field, path, "climbs out with '..', which is not allowed"),
        ImageError::OutsideRoot { field, path, root: _ } => refused(field, path, "is outside the image root"),
        ImageError::SymlinkEscape { field, path, target: _, root: _ } => {
            refused(field, path, "leads through a symlink to somewhere outside the image root")
        }
        ImageError::Missing { field, path, source: _ } => refused(field, path, "cannot be found in the image root"),
        ImageError::NotAFile { field, path } => refused(field, path, "is not a regular file"),
        ImageError::ChangedUnderUs { field, path } => {
            refused(field, path, "changed while it was being opened and now leads outside the image root")
        }
        // The file was found inside the root and still could not be opened
        // or copied, or the root itself is unusable: the host's problem.
        ImageError::Open { .. } | ImageError::Copy { .. } | ImageError::Root { .. } => internal(error),
    }
}

fn network_error_to_connect(error: &ManagerError, network: &NetworkError) -> ConnectError {
    match network {
        NetworkError::Refused { field, reason } => ConnectError::invalid_argument(format!("{field}: {reason}")),
        NetworkError::Attach { .. } | NetworkError::Detach { .. } => internal(error),
    }
}

/// A dead or silent VMM is `unavailable`; what the backend cannot do is
/// `unimplemented`, or `invalid_argument` naming the field that asked for
/// it; the rest is `internal`.
fn backend_error_to_connect(error: &ManagerError, vm_id: &VmId, backend: &str, operation: &str, source: &BackendError) -> ConnectError {
    match source {
        BackendError::Unsupported { vmm: _, operation: what } => {
            ConnectError::unimplemented(format!("the {backend} backend of this host cannot {what}"))
        }
        BackendError::FeatureUnavailable { vmm: _, feature, field } => {
            ConnectError::invalid_argument(format!("{field}: asks for {feature}, which the {backend} backend of this host does not offer"))
        }
        BackendError::DiedBeforeReady { exit, .. } | BackendError::Exited { exit, .. } => {
            log_host_error(error);
            ConnectError::unavailable(format!("the VMM of VM {vm_id} {exit} while asked to {operation} it"))
        }
        BackendError::NotRunning => {
            log_host_error(error);
            ConnectError::unavailable(format!("the VMM of VM {vm_id} is not running"))
        }
        BackendError::NotReady { .. } | BackendError::Transport { .. } | BackendError::Timeout { .. } => {
            log_host_error(error);
            ConnectError::unavailable(format!("the VMM of VM {vm_id} did not answer when asked to {operation} it"))
        }
        BackendError::Prepare { .. }
        | BackendError::SocketPathTooLong { .. }
        | BackendError::Launch(_)
        | BackendError::Api { .. }
        | BackendError::Signal(_)
        | BackendError::Console(_)
        | BackendError::ProcessStats { .. } => internal(error),
    }
}

/// `internal`, with a message that says nothing of the host.
fn internal(error: &ManagerError) -> ConnectError {
    log_host_error(error);
    ConnectError::internal("the host could not complete the operation; its log has the details")
}

fn log_host_error(error: &ManagerError) {
    tracing::error!(error = %metald_core::error_chain(error), "API call failed on the host");
}
