//! Manager and request errors as ConnectRPC errors.
//!
//! The code comes from the error's kind, which the core decides
//! ([`metald_core::ErrorKind`]); this module only maps kinds to codes and
//! words the message. What the caller got wrong is told in full, naming
//! the field (`invalid_argument`, `"storage[1].path: ..."`), the VM
//! (`not_found`, `already_exists`) or the VM's state
//! (`failed_precondition`). What went wrong on the host is told only in
//! general terms: `unavailable` when the VM's VMM is dead or does not
//! answer (a later call may succeed), `resource_exhausted` when the host
//! is full, `internal` otherwise. Host paths, VMM answers and process
//! output never reach the caller; the full error chain goes to the log at
//! error level.

use connectrpc::{ConnectError, ErrorCode};
use metald_core::ErrorKind;
use metald_core::backend::BackendError;
use metald_core::images::ImageError;
use metald_core::manager::ManagerError;
use metald_core::network::NetworkError;

use crate::convert::WireError;

const HOST_FULL: &str = "this host runs as many VMs as it can; delete one, or create it on another host";
const HOST_FAULT: &str = "the host could not complete the operation; its log has the details";

/// The ConnectRPC error a manager error becomes.
pub fn manager_error_to_connect(error: &ManagerError) -> ConnectError {
    let (code, host_side) = match error.kind() {
        ErrorKind::InvalidArgument { .. } => (ErrorCode::InvalidArgument, false),
        ErrorKind::NotFound => (ErrorCode::NotFound, false),
        ErrorKind::AlreadyExists => (ErrorCode::AlreadyExists, false),
        ErrorKind::FailedPrecondition { state: Some(_) } => (ErrorCode::FailedPrecondition, false),
        ErrorKind::FailedPrecondition { state: None } => (ErrorCode::FailedPrecondition, true),
        ErrorKind::Unimplemented => (ErrorCode::Unimplemented, false),
        ErrorKind::Unavailable => (ErrorCode::Unavailable, !matches!(error, ManagerError::ShuttingDown)),
        ErrorKind::Exhausted => (ErrorCode::ResourceExhausted, true),
        ErrorKind::Internal => (ErrorCode::Internal, true),
    };
    if host_side {
        log_host_error(error);
    }
    ConnectError::new(code, caller_message(error))
}

/// What the caller is told: the request's own words for its faults, and
/// for the host's only what it may know.
fn caller_message(error: &ManagerError) -> String {
    match error {
        ManagerError::InvalidConfig(config) => config.to_string(),
        ManagerError::Image(image) => image_message(image),
        ManagerError::Network(NetworkError::Refused { field, reason }) => format!("{field}: {reason}"),
        ManagerError::NotFound(_)
        | ManagerError::AlreadyExists(_)
        | ManagerError::InvalidState { .. }
        | ManagerError::WrongState { .. } => error.to_string(),
        ManagerError::Backend { vm_id, backend, operation, source } => match source.as_ref() {
            BackendError::Unsupported { vmm: _, operation: what } => format!("the {backend} backend of this host cannot {what}"),
            BackendError::FeatureUnavailable { vmm: _, feature, field } => {
                format!("{field}: asks for {feature}, which the {backend} backend of this host does not offer")
            }
            BackendError::DiedBeforeReady { exit, .. } | BackendError::Exited { exit, .. } => {
                format!("the VMM of VM {vm_id} {exit} while asked to {operation} it")
            }
            BackendError::NotRunning => format!("the VMM of VM {vm_id} is not running"),
            // Its reason stays on the host: it names host files.
            BackendError::Unlaunchable { .. } => format!("no VMM can be launched for VM {vm_id} on this host; delete it"),
            BackendError::NotReady { .. } | BackendError::Transport { .. } | BackendError::Timeout { .. } => {
                format!("the VMM of VM {vm_id} did not answer when asked to {operation} it")
            }
            _ => fallback_message(error),
        },
        ManagerError::ShuttingDown => "the host is shutting down; the operation did not finish".into(),
        ManagerError::DeleteIncomplete { vm_id, problems: _ } => {
            format!("deleting VM {vm_id} did not finish; the VM is left Failed and deleting it again may succeed")
        }
        _ => fallback_message(error),
    }
}

/// The words for a host's error that has none of its own.
fn fallback_message(error: &ManagerError) -> String {
    match error.kind() {
        ErrorKind::Exhausted => HOST_FULL.into(),
        _ => HOST_FAULT.into(),
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
/// the host's image root or where a symlink leads. A symlink that leads
/// outside is answered as a file that is not there: telling the two apart
/// would say which files outside the root exist.
fn image_message(image: &ImageError) -> String {
    let refused = |field: &str, path: &str, why: &str| format!("{field}: {path:?} {why}");
    match image {
        ImageError::ParentComponent { field, path } => refused(field, path, "climbs out with '..', which is not allowed"),
        ImageError::OutsideRoot { field, path, root: _ } => refused(field, path, "is outside the image root"),
        ImageError::SymlinkEscape { field, path, target: _, root: _ } | ImageError::Missing { field, path, source: _ } => {
            refused(field, path, "cannot be found in the image root")
        }
        ImageError::NotShared { field, path, mode } => refused(
            field,
            path,
            &format!(
                "is not readable by every user (mode {mode:o}); a writable drive is copied for the VM alone, so its image must be world-readable, as every image is"
            ),
        ),
        ImageError::NotAFile { field, path } => refused(field, path, "is not a regular file"),
        ImageError::ChangedUnderUs { field, path } => {
            refused(field, path, "changed while it was being opened and now leads outside the image root")
        }
        ImageError::Open { .. } | ImageError::Copy { .. } | ImageError::Root { .. } => HOST_FAULT.into(),
    }
}

fn log_host_error(error: &ManagerError) {
    tracing::error!(error = %metald_core::error_chain(error), "API call failed on the host");
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;
    use std::time::Duration;

    use connectrpc::ErrorCode;
    use metald_core::VmId;
    use metald_core::VmState;
    use metald_core::config::{ConfigError, Problem};
    use metald_core::launch::LaunchError;
    use metald_core::manager::BackendOperation;
    use metald_core::process::ProcessExit;
    use metald_core::state::IllegalTransition;

    use super::*;

    fn vm() -> VmId {
        VmId::new("vm-1").unwrap()
    }

    /// The code and message the caller sees.
    fn seen(error: ManagerError) -> (ErrorCode, String) {
        let connect = manager_error_to_connect(&error);
        (connect.code, connect.message.unwrap_or_default())
    }

    fn backend(source: BackendError) -> ManagerError {
        ManagerError::Backend { vm_id: vm(), backend: "firecracker".into(), operation: BackendOperation::BOOT, source: Box::new(source) }
    }

    fn assert_generic_internal((code, message): (ErrorCode, String)) {
        assert_eq!(code, ErrorCode::Internal);
        assert_eq!(message, "the host could not complete the operation; its log has the details");
    }

    #[test]
    fn a_host_out_of_vmm_users_is_full_not_broken() {
        let full = backend(BackendError::Launch(LaunchError::Identity(metald_core::uid_lease::UidLeaseError::Exhausted(900_000..900_010))));
        let (code, message) = seen(full);
        assert_eq!(code, ErrorCode::ResourceExhausted);
        assert!(!message.contains("900"), "{message}");
    }

    #[test]
    fn an_invalid_configuration_names_the_field() {
        let error = ManagerError::InvalidConfig(ConfigError { field: "storage[1].path".into(), problem: Problem::Required });
        assert_eq!(seen(error), (ErrorCode::InvalidArgument, "storage[1].path: is required".into()));
    }

    #[test]
    fn refused_images_name_the_field_and_the_callers_path_but_not_the_host() {
        let outside = ManagerError::Image(ImageError::OutsideRoot {
            field: "boot.kernel_path".into(),
            path: "/etc/vmlinux".into(),
            root: PathBuf::from("/srv/secret-images"),
        });
        assert_eq!(seen(outside), (ErrorCode::InvalidArgument, "boot.kernel_path: \"/etc/vmlinux\" is outside the image root".into()));
        let symlink = ManagerError::Image(ImageError::SymlinkEscape {
            field: "storage[1].path".into(),
            path: "data.img".into(),
            target: PathBuf::from("/etc/shadow"),
            root: PathBuf::from("/srv/secret-images"),
        });
        let (code, message) = seen(symlink);
        assert_eq!(code, ErrorCode::InvalidArgument);
        assert!(message.starts_with("storage[1].path: \"data.img\""), "{message}");
        assert!(!message.contains("/etc/shadow") && !message.contains("secret"), "{message}");
        let missing = ManagerError::Image(ImageError::Missing {
            field: "boot.initrd_path".into(),
            path: "initrd".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
        assert_eq!(seen(missing).0, ErrorCode::InvalidArgument);
        let parent = ManagerError::Image(ImageError::ParentComponent { field: "storage[0].path".into(), path: "../x".into() });
        assert_eq!(seen(parent).0, ErrorCode::InvalidArgument);
    }

    #[test]
    fn images_the_host_cannot_open_or_copy_are_internal() {
        let open = ManagerError::Image(ImageError::Open {
            field: "boot.kernel_path".into(),
            path: "vmlinux".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
        assert_generic_internal(seen(open));
        let copy = ManagerError::Image(ImageError::Copy {
            from: PathBuf::from("/srv/images/root.img"),
            to: PathBuf::from("/run/metald/vms/vm-1/drives/root.img"),
            source: io::Error::from(io::ErrorKind::StorageFull),
        });
        assert_generic_internal(seen(copy));
    }

    #[test]
    fn a_refused_network_names_the_field_and_a_failed_one_is_internal() {
        let refused = ManagerError::Network(NetworkError::Refused {
            field: "network[0].ipv6_config.address".into(),
            reason: "is not in the tenant's prefix".into(),
        });
        assert_eq!(seen(refused), (ErrorCode::InvalidArgument, "network[0].ipv6_config.address: is not in the tenant's prefix".into()));
        let failed = ManagerError::Network(NetworkError::Attach { vm_id: vm(), source: "netlink said EPERM on /run/netns/x".into() });
        assert_generic_internal(seen(failed));
    }

    #[test]
    fn missing_and_existing_vms_are_named() {
        assert_eq!(seen(ManagerError::NotFound(vm())), (ErrorCode::NotFound, "VM vm-1 does not exist".into()));
        assert_eq!(seen(ManagerError::AlreadyExists(vm())), (ErrorCode::AlreadyExists, "VM vm-1 already exists".into()));
    }

    #[test]
    fn a_vm_in_the_wrong_state_is_a_failed_precondition_naming_its_state() {
        let invalid = ManagerError::InvalidState {
            vm_id: vm(),
            operation: "pause",
            current: VmState::Shutdown,
            source: IllegalTransition { from: VmState::Shutdown, to: VmState::Paused },
        };
        assert_eq!(seen(invalid), (ErrorCode::FailedPrecondition, "VM vm-1 is Shutdown and cannot pause".into()));
        let wrong = ManagerError::WrongState {
            vm_id: vm(),
            operation: "read its metrics",
            current: VmState::Failed,
            required: "Created, Running or Paused",
        };
        assert_eq!(
            seen(wrong),
            (ErrorCode::FailedPrecondition, "VM vm-1 is Failed; to read its metrics it must be Created, Running or Paused".into())
        );
    }

    #[test]
    fn a_dead_or_silent_vmm_is_unavailable() {
        let exited =
            backend(BackendError::Exited { vmm: "firecracker", operation: "being driven", exit: ProcessExit::Killed { signal: 9 } });
        let (code, message) = seen(exited);
        assert_eq!(code, ErrorCode::Unavailable);
        assert!(message.starts_with("the VMM of VM vm-1 was killed by signal 9"), "{message}");
        let died = backend(BackendError::DiedBeforeReady {
            vmm: "firecracker",
            exit: ProcessExit::Exited { code: 1 },
            stderr: "cannot open /dev/kvm".into(),
        });
        let (code, message) = seen(died);
        assert_eq!(code, ErrorCode::Unavailable);
        assert!(!message.contains("/dev/kvm"), "stderr stays on the host: {message}");
        assert_eq!(seen(backend(BackendError::NotRunning)).0, ErrorCode::Unavailable);
        let timeout =
            backend(BackendError::Timeout { vmm: "firecracker", method: "PUT", path: "/actions".into(), timeout: Duration::from_secs(5) });
        assert_eq!(seen(timeout), (ErrorCode::Unavailable, "the VMM of VM vm-1 did not answer when asked to boot it".into()));
        let transport =
            backend(BackendError::Transport { vmm: "firecracker", method: "GET", path: "/".into(), source: "connection refused".into() });
        assert_eq!(seen(transport).0, ErrorCode::Unavailable);
        let not_ready = backend(BackendError::NotReady { vmm: "firecracker", timeout: Duration::from_secs(5) });
        assert_eq!(seen(not_ready).0, ErrorCode::Unavailable);
    }

    #[test]
    fn what_a_backend_cannot_do_is_said_as_such() {
        let unsupported = backend(BackendError::Unsupported { vmm: "firecracker", operation: "reboot a running guest in place" });
        assert_eq!(
            seen(unsupported),
            (ErrorCode::Unimplemented, "the firecracker backend of this host cannot reboot a running guest in place".into())
        );
        let feature =
            backend(BackendError::FeatureUnavailable { vmm: "firecracker", feature: "memory hotplug", field: "memory.hotplug_enabled" });
        let (code, message) = seen(feature);
        assert_eq!(code, ErrorCode::InvalidArgument);
        assert!(message.starts_with("memory.hotplug_enabled: "), "{message}");
    }

    #[test]
    fn other_backend_failures_are_internal_without_details() {
        let api = backend(BackendError::Api {
            vmm: "firecracker",
            method: "PUT",
            path: "/drives/root".into(),
            status: 400,
            fault_message: "cannot open /run/metald/vms/vm-1/root/drives/root.img".into(),
        });
        assert_generic_internal(seen(api));
        let prepare = backend(BackendError::Prepare {
            what: "the VM folder",
            path: PathBuf::from("/run/metald/vms/vm-1"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
        assert_generic_internal(seen(prepare));
        let stats = backend(BackendError::ProcessStats { what: "stat", pid: 7, source: io::Error::from(io::ErrorKind::NotFound) });
        assert_generic_internal(seen(stats));
    }

    #[test]
    fn host_failures_outside_the_backend_are_internal_or_unavailable() {
        assert_eq!(seen(ManagerError::ShuttingDown).0, ErrorCode::Unavailable);
        let delete = ManagerError::DeleteIncomplete { vm_id: vm(), problems: vec!["cannot remove /run/metald/vms/vm-1".into()] };
        let (code, message) = seen(delete);
        assert_eq!(code, ErrorCode::Internal);
        assert!(message.contains("vm-1") && !message.contains("/run/"), "{message}");
        let vm_dir = ManagerError::VmDir {
            vm_id: vm(),
            action: "create",
            path: PathBuf::from("/run/metald/vms/vm-1"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_generic_internal(seen(vm_dir));
        assert_generic_internal(seen(ManagerError::Incomplete("an image root")));
    }

    #[test]
    fn request_errors_are_invalid_arguments_and_another_tenant_is_denied() {
        let negative = WireError::Negative { field: "cpu.vcpu_count".into(), value: -1 };
        let connect = wire_error_to_connect(&negative);
        assert_eq!(
            (connect.code, connect.message.as_deref()),
            (ErrorCode::InvalidArgument, Some("cpu.vcpu_count: -1 is negative; no negative value is allowed here"))
        );
        let id = crate::convert::request::vm_id_from_wire("vm_id", "a/b").unwrap_err();
        let connect = wire_error_to_connect(&id);
        assert_eq!(connect.code, ErrorCode::InvalidArgument);
        assert_eq!(
            connect.message.as_deref(),
            Some("vm_id is not a valid id: VM id \"a/b\" holds '/'; only ASCII letters, digits and '-' are allowed")
        );
        let other = WireError::OtherTenant { field: "customer_id".into(), given: "globex".into() };
        assert_eq!(wire_error_to_connect(&other).code, ErrorCode::PermissionDenied);
    }
}
