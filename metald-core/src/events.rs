//! What the manager tells the rest of the house about VMs. Subscribers
//! (metering, the API's watch stream, tests) learn of every state change
//! from here; the core never knows who listens.

use std::time::SystemTime;

use crate::cgroups::Cgroup;
use crate::ids::{TenantId, VmId};
use crate::process::ProcessExit;
use crate::state::VmState;

/// One thing that happened to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub vm_id: VmId,
    pub tenant: TenantId,
    pub at: SystemTime,
    /// The VM's state once this event happened.
    pub state: VmState,
    pub kind: VmEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEventKind {
    Created,
    /// The guest started. `pid` is its VMM process, `cgroup` the VMM's
    /// cgroup when jailed (where metering reads CPU and memory).
    Booted {
        pid: Option<u32>,
        cgroup: Option<Cgroup>,
    },
    Paused,
    Resumed,
    /// The guest was restarted, natively or by a stop and a fresh boot.
    Rebooted {
        pid: Option<u32>,
        cgroup: Option<Cgroup>,
    },
    /// The guest stopped: asked to, forced, or on its own (a guest reset).
    Stopped {
        exit: Option<ProcessExit>,
        forced: bool,
        by_guest: bool,
    },
    /// The VMM died or an operation broke it.
    Failed {
        reason: String,
        exit: Option<ProcessExit>,
    },
    Deleted,
}
