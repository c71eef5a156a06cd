//! What the manager's operations fail with, and the name of each backend
//! call a failure happened in.

use std::io;
use std::path::PathBuf;

use crate::backend::BackendError;
use crate::config::ConfigError;
use crate::console::ConsoleError;
use crate::ids::VmId;
use crate::images::ImageError;
use crate::jailer::JailError;
use crate::network::NetworkError;
use crate::state::{IllegalTransition, VmState};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("the runtime is shutting down; the operation did not finish")]
    ShuttingDown,
    #[error("the manager needs {0}")]
    Incomplete(&'static str),
    #[error("cannot set up the jailer")]
    Jail(#[from] JailError),
    #[error("cannot use {what} {path}")]
    Setup {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid VM configuration")]
    InvalidConfig(#[source] ConfigError),
    #[error("image refused")]
    Image(#[source] ImageError),
    #[error("network refused or failed")]
    Network(#[source] NetworkError),
    #[error("VM {0} does not exist")]
    NotFound(VmId),
    #[error("VM {0} already exists")]
    AlreadyExists(VmId),
    #[error("VM {vm_id} is {current} and cannot {operation}")]
    InvalidState {
        vm_id: VmId,
        operation: &'static str,
        current: VmState,
        #[source]
        source: IllegalTransition,
    },
    #[error("VM {vm_id} is {current}; to {operation} it must be {required}")]
    WrongState { vm_id: VmId, operation: &'static str, current: VmState, required: &'static str },
    #[error("the {backend} backend failed to {operation} VM {vm_id}")]
    Backend {
        vm_id: VmId,
        backend: String,
        operation: BackendOperation,
        #[source]
        source: Box<BackendError>,
    },
    #[error("cannot {action} the folder of VM {vm_id} at {path}")]
    VmDir {
        vm_id: VmId,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the console of VM {vm_id}")]
    Console {
        vm_id: VmId,
        #[source]
        source: ConsoleError,
    },
    #[error("deleting VM {vm_id} left work undone: {}", .problems.join("; "))]
    DeleteIncomplete { vm_id: VmId, problems: Vec<String> },
    #[error("cannot read the VM store")]
    Store(#[source] StoreError),
}

/// What the manager asked of the backend. It reads as a verb in messages
/// ("failed to shut down VM web-1"); [`BackendOperation::label`] is its
/// stable name for metrics and logs that are queried. An operation that
/// makes a new kind of backend call names it with [`BackendOperation::new`]
/// beside itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendOperation {
    label: &'static str,
    verb: &'static str,
}

impl BackendOperation {
    pub const CREATE: Self = Self::new("create", "create");
    pub const BOOT: Self = Self::new("boot", "boot");
    pub const REBOOT: Self = Self::new("reboot", "reboot");
    pub const PAUSE: Self = Self::new("pause", "pause");
    pub const RESUME: Self = Self::new("resume", "resume");
    pub const SHUTDOWN: Self = Self::new("shutdown", "shut down");
    /// A graceful stop of a paused VM resumes it first, so that its guest can act on the request.
    pub const RESUME_BEFORE_SHUTDOWN: Self = Self::new("resume_before_shutdown", "resume before shutdown");
    /// Taking over a VM's VMM (or its uid) after a restart of metald.
    pub const TAKE_OVER: Self = Self::new("take_over", "take over");
    pub const READ_METRICS: Self = Self::new("read_metrics", "read metrics of");

    /// `label` is lower-case words joined by `_`; `verb` completes "failed to … VM web-1".
    pub const fn new(label: &'static str, verb: &'static str) -> Self {
        Self { label, verb }
    }

    /// Lower-case, no spaces: `create`, `boot`, `shutdown`, `read_metrics`, …
    pub fn label(self) -> &'static str {
        self.label
    }
}

impl std::fmt::Display for BackendOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb)
    }
}

/// What a backend's failure becomes, naming the VMM and the VM.
pub(crate) fn backend_failed(vmm: &str, vm_id: &VmId, operation: BackendOperation, source: BackendError) -> ManagerError {
    ManagerError::Backend { vm_id: vm_id.clone(), backend: vmm.to_owned(), operation, source: Box::new(source) }
}

#[cfg(test)]
mod tests {
    use super::BackendOperation;

    #[test]
    fn a_backend_operation_reads_as_a_verb_and_labels_as_one_word() {
        let all = [
            BackendOperation::CREATE,
            BackendOperation::BOOT,
            BackendOperation::REBOOT,
            BackendOperation::PAUSE,
            BackendOperation::RESUME,
            BackendOperation::SHUTDOWN,
            BackendOperation::RESUME_BEFORE_SHUTDOWN,
            BackendOperation::TAKE_OVER,
            BackendOperation::READ_METRICS,
        ];
        for operation in all {
            let label = operation.label();
            assert!(label.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{label}");
        }
        let labels: std::collections::HashSet<&str> = all.iter().map(|operation| operation.label()).collect();
        assert_eq!(labels.len(), all.len(), "labels are distinct");
        assert_eq!(BackendOperation::SHUTDOWN.to_string(), "shut down");
        assert_eq!(BackendOperation::READ_METRICS.to_string(), "read metrics of");
        assert_eq!(BackendOperation::PAUSE.to_string(), "pause");
    }
}
