//! What the manager tells the rest of the house about VMs. Subscribers
//! (metering, the API's watch stream, tests) learn of every state change
//! from here; the core never knows who listens.

use std::time::SystemTime;

use crate::cgroups::{Cgroup, CgroupUsage};
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
    /// The guest started.
    Booted(RunningVmm),
    /// The guest's vCPUs stopped; `usage` is what its cgroup counted once they had.
    Paused {
        usage: Option<CgroupUsage>,
    },
    /// The guest runs again; `usage` is what its cgroup counted just before.
    Resumed {
        usage: Option<CgroupUsage>,
    },
    /// The guest was restarted, natively or by a stop and a fresh boot;
    /// `ended` is what the previous VMM's cgroup counted last, when it ended;
    /// `previous_booted_at` when that VMM had booted.
    Rebooted {
        running: RunningVmm,
        ended: Option<CgroupUsage>,
        previous_booted_at: Option<SystemTime>,
    },
    /// The guest stopped: asked to, forced, or on its own (a guest reset).
    /// `usage` is what the VMM's cgroup counted just before it was removed;
    /// `booted_at` when that VMM booted.
    Stopped {
        exit: Option<ProcessExit>,
        forced: bool,
        by_guest: bool,
        usage: Option<CgroupUsage>,
        booted_at: Option<SystemTime>,
    },
    /// The VMM died or an operation broke it.
    Failed {
        reason: String,
        exit: Option<ProcessExit>,
        usage: Option<CgroupUsage>,
        /// When the VMM that ended had booted, where there was one: a VMM
        /// found dead after a restart of metald may never have been seen
        /// by the meter, which then knows from when its time is unknown.
        booted_at: Option<SystemTime>,
        /// Found dead after a restart: how the VM's VMMs before it ended.
        earlier_ends: Vec<EndedVmm>,
    },
    Deleted,
    /// The VM's VMM outlived an earlier metald and was taken over after a
    /// restart; the VM keeps its state (in the event) and its VMM.
    /// `booted_at` is when that VMM booted, as the earlier metald stored it:
    /// a boot the earlier meter never saw is metered from then;
    /// `earlier_ends` is how the VM's VMMs before it ended, ends that meter
    /// may not have seen either.
    TakenOver {
        running: RunningVmm,
        booted_at: Option<SystemTime>,
        earlier_ends: Vec<EndedVmm>,
    },
    /// A VM with no VMM (Created, Shutdown or Failed) found again after a
    /// restart of metald, with how its last VMMs ended as the store kept
    /// them: the earlier metald may have been killed before its meter saw
    /// those ends.
    FoundStopped {
        earlier_ends: Vec<EndedVmm>,
    },
}

impl VmEventKind {
    /// Every kind's name, in [`VmEventKind::index`] order.
    pub const NAMES: [&'static str; 10] =
        ["created", "booted", "paused", "resumed", "rebooted", "stopped", "failed", "deleted", "taken_over", "found_stopped"];

    /// Its name on the wire and in metrics: `booted`, `failed`, …
    pub fn name(&self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// The match is exhaustive on purpose: a new kind does not compile
    /// until it has a name.
    fn index(&self) -> usize {
        match self {
            VmEventKind::Created => 0,
            VmEventKind::Booted(_) => 1,
            VmEventKind::Paused { .. } => 2,
            VmEventKind::Resumed { .. } => 3,
            VmEventKind::Rebooted { .. } => 4,
            VmEventKind::Stopped { .. } => 5,
            VmEventKind::Failed { .. } => 6,
            VmEventKind::Deleted => 7,
            VmEventKind::TakenOver { .. } => 8,
            VmEventKind::FoundStopped { .. } => 9,
        }
    }
}

/// How many events of each kind a manager published since it was built,
/// for counters that must not miss one (a subscriber may lag and lose some).
#[derive(Debug, Default)]
pub struct EventCounts {
    counts: [std::sync::atomic::AtomicU64; 10],
}

impl EventCounts {
    pub fn count(&self, kind: &VmEventKind) {
        self.counts[kind.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Each kind's name with its count, every kind included.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        VmEventKind::NAMES.iter().zip(&self.counts).map(|(name, count)| (*name, count.load(std::sync::atomic::Ordering::Relaxed))).collect()
    }
}

/// How many VMM ends the VM store keeps per VM. The meter bills every
/// end within a tick, so a few cover what a killed metald can leave unbilled.
pub const KEPT_ENDS: usize = 16;

/// A VMM's life once it ended, as the VM store keeps it (the last
/// [`KEPT_ENDS`] of each VM): enough for a metald started after a crash to
/// bill an end (or a whole short life) the earlier meter had not yet seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndedVmm {
    pub booted_at_ms: u64,
    pub ended_at_ms: u64,
    /// What its cgroup counted in all; unknown for a VMM found dead after
    /// a restart of metald (its use after its last record is a gap).
    pub cpu_ns: Option<u64>,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// It ended at a reboot: the VM ran on in a fresh VMM.
    #[serde(default)]
    pub by_reboot: bool,
}

/// What a running VM's VMM is made of, for those who measure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningVmm {
    /// The VMM process.
    pub pid: Option<u32>,
    /// The VMM's cgroup when jailed: where its CPU and memory are counted.
    pub cgroup: Option<Cgroup>,
    /// The VM's TAP devices, as named inside the VMM's network namespace.
    pub taps: Vec<String>,
    pub vcpus: u32,
    pub memory_bytes: u64,
}
