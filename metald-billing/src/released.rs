//! What the meter tells the VM manager back: a deleted VM's usage is
//! closed in the spool, so the manager may forget the record it kept for
//! a restart (see `VmManager::hold_deleted_records`).

use metald_core::{VmId, VmManager};

/// Where the meter says that a deleted VM is billed to its end.
pub trait DeletedBilled: Send + Sync + std::fmt::Debug {
    fn deleted_billed(&self, vm_id: &VmId);
}

impl DeletedBilled for VmManager {
    fn deleted_billed(&self, vm_id: &VmId) {
        if let Err(error) = self.release_deleted(vm_id) {
            // The record is replayed at the next start; the meter finds its end already billed.
            tracing::warn!(%vm_id, error = %metald_types::error_chain(&error), "cannot forget a deleted VM's record");
        }
    }
}
