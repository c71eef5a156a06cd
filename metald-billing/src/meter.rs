//! The meter: from boot to stop, every running VM is sampled every 100 ms
//! on a monotonic schedule that never drifts (tick k is due at start + k ×
//! period, whatever happened before). A tick that comes too late is counted
//! as missed in the record that covers it; nothing is hidden and nothing is
//! lost, the interval is just longer.
//!
//! Each sample becomes a [`UsageRecord`] with the deltas since the VM's
//! previous record, handed to the [`Spool`] together with the meter's
//! position for that VM, in one transaction. A record not taken (a full
//! spool) leaves the position where it was, so the next record covers both
//! intervals. A paused VM's records charge no CPU; a stopped VM gets one
//! final record (its CPU read from its cgroup just before the cgroup went)
//! and no more. Sequence numbers continue across boots of the same VM and
//! across restarts of the meter, from the positions kept in the spool.
//!
//! The meter learns of VMs from the core's events and knows nothing else
//! about the manager; it runs on a thread of its own, since its work is
//! file reads and a SQLite commit per tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metald_core::cgroups::CgroupUsage;
use metald_core::events::{EndedVmm, RunningVmm, VmEvent, VmEventKind};
use metald_core::{DeviceCounters, TenantId, VmId, VmState};
use metald_types::time::unix_millis;
use tokio::sync::broadcast;

use crate::block_reads::BlockReads;
pub use crate::block_reads::BlockSource;
use crate::record::{Counters, UsageGap, UsageRecord};
use crate::released::DeletedBilled;
use crate::source::{CounterSource, MeterTarget};
use crate::spool::{MeterPosition, Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("cannot read the meter's positions")]
    Spool(#[from] SpoolError),
    #[error("cannot start the meter's thread")]
    Thread(#[source] std::io::Error),
    #[error("billing must start inside a Tokio runtime: delivery is a task and block counters are read through one")]
    NoRuntime,
}

/// How often, and how block counters are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterConfig {
    pub period: Duration,
    /// Block counters come from the VMM (a metrics flush), every this many
    /// ticks; 0 turns them off.
    pub block_every: u32,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self { period: Duration::from_millis(100), block_every: 10 }
    }
}

/// What the meter has done, for metrics and tests.
#[derive(Debug)]
pub struct MeterStats {
    pub ticks: AtomicU64,
    pub missed_ticks: AtomicU64,
    /// How late the last tick ran, in nanoseconds.
    pub last_lag_ns: AtomicU64,
    pub records: AtomicU64,
    pub metered_vms: AtomicU64,
    pub spool_full: AtomicU64,
    pub read_failures: AtomicU64,
    /// The meter's clock: tick k is due at `epoch + k × period`.
    epoch: Instant,
    /// When the tick being worked on was due, in nanoseconds since `epoch`;
    /// `IDLE` while the meter waits for its next tick.
    working_on_due_ns: AtomicU64,
}

const IDLE: u64 = u64::MAX;

/// Why a gap is reported.
const UNMETERED_END: &str = "the VM's VMM ended while metald was not metering it; its last usage is unknown";

impl Default for MeterStats {
    fn default() -> Self {
        Self {
            ticks: AtomicU64::default(),
            missed_ticks: AtomicU64::default(),
            last_lag_ns: AtomicU64::default(),
            records: AtomicU64::default(),
            metered_vms: AtomicU64::default(),
            spool_full: AtomicU64::default(),
            read_failures: AtomicU64::default(),
            epoch: Instant::now(),
            working_on_due_ns: AtomicU64::new(IDLE),
        }
    }
}

impl MeterStats {
    /// How far behind its schedule the meter is now: the lateness of its
    /// last tick, or, while a tick is still being worked on, how long ago
    /// that tick was due. A meter stuck inside a tick shows here at once,
    /// not only when the tick is over.
    pub fn lag(&self) -> Duration {
        let last = Duration::from_nanos(self.last_lag_ns.load(Ordering::Relaxed));
        match self.working_on_due_ns.load(Ordering::Relaxed) {
            IDLE => last,
            due_ns => self.epoch.elapsed().saturating_sub(Duration::from_nanos(due_ns)).max(last),
        }
    }
}

/// The running meter; stops (after one last tick) when dropped or stopped.
#[derive(Debug)]
pub struct MeterHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<MeterStats>,
    takeovers: std::sync::mpsc::Sender<TakeoverDone>,
}

/// The VMs the manager knows after it took over the previous run's: any
/// other VM with usage still open was deleted by a metald killed before
/// its meter took the VM's final record.
#[derive(Debug)]
struct TakeoverDone {
    known: std::collections::HashSet<VmId>,
    at_ms: u64,
}

impl MeterHandle {
    /// Tells the meter the takeover after a restart is done and which VMs
    /// the manager knows; it is applied at the next tick.
    pub fn takeover_done(&self, known: impl IntoIterator<Item = VmId>) {
        let done = TakeoverDone { known: known.into_iter().collect(), at_ms: metald_types::time::unix_millis_now() };
        // A meter that has stopped has nothing left to close.
        let _ = self.takeovers.send(done);
    }

    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MeterHandle {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One metered VM.
#[derive(Debug)]
struct Metered {
    tenant: TenantId,
    target: MeterTarget,
    vcpus: u32,
    memory_limit_bytes: u64,
    next_sequence: u64,
    start_ms: u64,
    baseline: Counters,
    block_baseline: Option<DeviceCounters>,
    block_latest: Option<DeviceCounters>,
    last_counters: Counters,
    paused: bool,
    missed: u32,
    /// The VM stopped; its final record is still to be taken.
    ending: Option<Ending>,
}

impl Metered {
    /// A VM of `vcpus` and `memory_limit_bytes` metered from a position:
    /// its next sequence, from when, and the counters it starts from.
    fn from(
        tenant: TenantId,
        target: MeterTarget,
        (vcpus, memory_limit_bytes): (u32, u64),
        (next_sequence, start_ms, baseline): (u64, u64, Counters),
    ) -> Self {
        Self {
            tenant,
            target,
            vcpus,
            memory_limit_bytes,
            next_sequence,
            start_ms,
            baseline,
            block_baseline: None,
            block_latest: None,
            last_counters: baseline,
            paused: false,
            missed: 0,
            ending: None,
        }
    }
}

/// How a stopped VM's last interval ends.
#[derive(Debug, Clone, Copy)]
struct Ending {
    /// What its cgroup counted just before it was removed.
    usage: Option<CgroupUsage>,
    at_ms: u64,
}

struct MeterLoop {
    spool: Arc<Spool>,
    source: Arc<dyn CounterSource>,
    blocks: BlockReads,
    config: MeterConfig,
    events: broadcast::Receiver<VmEvent>,
    takeovers_done: std::sync::mpsc::Receiver<TakeoverDone>,
    deleted_billed: Option<Arc<dyn DeletedBilled>>,
    stats: Arc<MeterStats>,
    vms: HashMap<VmId, Metered>,
    positions: HashMap<String, MeterPosition>,
    tick: u64,
}

/// Where the meter reads and whom it tells: block counters (with `runtime`,
/// needed when `config.block_every > 0`) and who forgets a deleted VM once
/// it is billed.
#[derive(Debug, Default)]
pub struct MeterPeers {
    pub blocks: Option<Arc<dyn BlockSource>>,
    pub runtime: Option<tokio::runtime::Handle>,
    pub deleted_billed: Option<Arc<dyn DeletedBilled>>,
}

/// Starts metering on a thread of its own.
pub fn start(
    events: broadcast::Receiver<VmEvent>,
    spool: Arc<Spool>,
    source: Arc<dyn CounterSource>,
    peers: MeterPeers,
    config: MeterConfig,
) -> Result<MeterHandle, MeterError> {
    let MeterPeers { blocks, runtime, deleted_billed } = peers;
    let positions = spool.positions()?.into_iter().map(|position| (position.vm_id.clone(), position)).collect();
    let stats = Arc::new(MeterStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let blocks = BlockReads::new(blocks, runtime);
    let (takeovers, takeovers_done) = std::sync::mpsc::channel();
    let mut meter = MeterLoop {
        spool,
        source,
        blocks,
        config,
        events,
        takeovers_done,
        deleted_billed,
        stats: Arc::clone(&stats),
        vms: HashMap::new(),
        positions,
        tick: 0,
    };
    let stopping = Arc::clone(&stop);
    let thread = std::thread::Builder::new().name("metald-meter".into()).spawn(move || meter.run(&stopping)).map_err(MeterError::Thread)?;
    Ok(MeterHandle { stop, thread: Some(thread), stats, takeovers })
}

impl MeterLoop {
    fn run(&mut self, stop: &AtomicBool) {
        let period = self.config.period;
        let epoch = self.stats.epoch;
        let mut due: u64 = 1;
        loop {
            let due_after_epoch = period * u32::try_from(due).unwrap_or(u32::MAX);
            let deadline = epoch + due_after_epoch;
            let now = Instant::now();
            if deadline > now {
                std::thread::sleep(deadline - now);
            }
            self.stats.working_on_due_ns.store(metald_types::time::saturating_u64(due_after_epoch.as_nanos()), Ordering::Relaxed);
            let stopping = stop.load(Ordering::Relaxed);
            self.apply_events();
            self.apply_takeovers();
            let skipped = self.sample(deadline);
            due += 1 + skipped;
            self.stats.ticks.fetch_add(1, Ordering::Relaxed);
            self.stats.working_on_due_ns.store(IDLE, Ordering::Relaxed);
            if stopping {
                return;
            }
        }
    }

    fn apply_events(&mut self) {
        loop {
            match self.events.try_recv() {
                Ok(event) => self.apply(event),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    tracing::error!(missed, "the meter fell behind the VM events; some VMs may be metered late or not at all");
                }
                Err(_) => return,
            }
        }
    }

    fn apply_takeovers(&mut self) {
        while let Ok(done) = self.takeovers_done.try_recv() {
            let forgotten: Vec<(VmId, TenantId)> = self
                .positions
                .values()
                .filter(|position| !position.closed)
                .filter_map(|position| Some((VmId::new(&position.vm_id).ok()?, TenantId::new(&position.tenant_id).ok()?)))
                .filter(|(vm_id, _)| !done.known.contains(vm_id) && !self.vms.contains_key(vm_id))
                .collect();
            for (vm_id, tenant) in forgotten {
                self.ended_unmetered(&vm_id, &tenant, None, done.at_ms);
                self.forget(&vm_id);
            }
        }
    }

    /// Drops what the meter keeps of a VM that will not be metered again.
    fn forget(&mut self, vm_id: &VmId) {
        self.positions.remove(vm_id.as_str());
        self.blocks.forget(vm_id);
        if let Err(error) = self.spool.forget(vm_id.as_str()) {
            tracing::warn!(%vm_id, error = %metald_types::error_chain(&error), "cannot forget a deleted VM's meter position");
        }
    }

    fn apply(&mut self, event: VmEvent) {
        let at_ms = unix_millis(event.at);
        match event.kind {
            VmEventKind::Booted(running) => self.begin(event.vm_id, event.tenant, running, at_ms),
            VmEventKind::TakenOver { running, booted_at, earlier_ends } => {
                self.found_ends(&event.vm_id, &event.tenant, &earlier_ends);
                // Taken over after a restart of metald: the same VMM continues
                // from the spool's position for it; one booted too shortly before the
                // earlier metald ended to have a position is metered from its boot.
                // Only a running or paused VM is metered.
                if matches!(event.state, VmState::Running | VmState::Paused) {
                    let booted_ms = booted_at.map_or(at_ms, unix_millis);
                    self.begin(event.vm_id.clone(), event.tenant, running, booted_ms);
                    if let Some(vm) = self.vms.get_mut(&event.vm_id) {
                        vm.paused = event.state == VmState::Paused;
                    }
                }
            }
            VmEventKind::Rebooted { running, ended, .. } => {
                // The old VMM's last counters close its time; the new one starts from zero.
                self.close_interval(&event.vm_id, ended.as_ref(), at_ms);
                if let Some(position) = self.positions.get_mut(event.vm_id.as_str()) {
                    position.closed = true;
                }
                self.begin(event.vm_id, event.tenant, running, at_ms);
            }
            VmEventKind::Paused { usage } => {
                // What ran up to the pause is charged; the paused time that follows is not.
                self.close_interval(&event.vm_id, usage.as_ref(), at_ms);
                if let Some(vm) = self.vms.get_mut(&event.vm_id) {
                    vm.paused = true;
                }
            }
            VmEventKind::Resumed { usage } => {
                self.close_interval(&event.vm_id, usage.as_ref(), at_ms);
                if let Some(vm) = self.vms.get_mut(&event.vm_id) {
                    vm.paused = false;
                }
            }
            VmEventKind::Stopped { usage, .. } => self.ending(&event, usage, None, at_ms),
            VmEventKind::Failed { usage, booted_at, ref earlier_ends, .. } => {
                self.found_ends(&event.vm_id, &event.tenant, earlier_ends);
                self.ending(&event, usage, booted_at.map(unix_millis), at_ms);
            }
            VmEventKind::Deleted => {
                // A VMM killed at the delete without a stop of its own still
                // gets its final record, from its last reading.
                if let Some(vm) = self.vms.get_mut(&event.vm_id) {
                    vm.ending.get_or_insert(Ending { usage: None, at_ms });
                }
                self.end_now(&event.vm_id);
                self.vms.remove(&event.vm_id);
                // Its end is in the spool now (or will never be): the manager may forget its record.
                if let Some(deleted_billed) = &self.deleted_billed {
                    deleted_billed.deleted_billed(&event.vm_id);
                }
                self.forget(&event.vm_id);
            }
            // Stopped before the earlier metald's meter took the VM's last record (it was killed
            // within a tick of the stop): the store says how the VMM ended.
            VmEventKind::FoundStopped { earlier_ends } => {
                self.found_ends(&event.vm_id, &event.tenant, &earlier_ends);
                self.ended_unmetered(&event.vm_id, &event.tenant, None, at_ms);
            }
            VmEventKind::Created => {}
        }
        self.stats.metered_vms.store(self.vms.len() as u64, Ordering::Relaxed);
    }

    /// A stop or failure: taken with the tick's other records, unless an
    /// event about the VM comes first; for a VM not metered, a gap.
    fn ending(&mut self, event: &VmEvent, usage: Option<CgroupUsage>, booted_ms: Option<u64>, at_ms: u64) {
        match self.vms.get_mut(&event.vm_id) {
            Some(vm) => vm.ending = Some(Ending { usage, at_ms }),
            None => self.ended_unmetered(&event.vm_id, &event.tenant, booted_ms, at_ms),
        }
    }

    /// A VM whose VMM ended while no meter watched it (found dead when metald
    /// took its VMs over): what it used after its last record is unknown, and
    /// said so once as a gap, up to when metald found out. A VMM the meter
    /// never saw at all (booted less than a tick before the earlier metald
    /// was killed) is unknown from its boot, when the boot is known.
    fn ended_unmetered(&mut self, vm_id: &VmId, tenant: &TenantId, booted_ms: Option<u64>, at_ms: u64) {
        let open = self.positions.get_mut(vm_id.as_str()).filter(|position| !position.closed);
        let from_ms = match (open, booted_ms) {
            (Some(position), _) => {
                position.closed = true;
                position.last_end_ms
            }
            (None, Some(booted_ms)) => {
                let billed_until = self.positions.get(vm_id.as_str()).map_or(0, |position| position.last_end_ms);
                if booted_ms < billed_until {
                    return;
                }
                booted_ms
            }
            (None, None) => return,
        };
        let gap =
            UsageGap { tenant_id: tenant.clone(), vm_id: vm_id.clone(), from_ms, to_ms: at_ms.max(from_ms), reason: UNMETERED_END.into() };
        if let Err(error) = self.spool.add_gap(&gap) {
            tracing::error!(%vm_id, error = %metald_types::error_chain(&error), "cannot keep a usage gap");
        }
        // Closed up to the gap's end, also for the next metald: the same end found again is not reported twice.
        let position = MeterPosition {
            tenant_id: tenant.to_string(),
            vm_id: vm_id.to_string(),
            last_sequence: self.positions.get(vm_id.as_str()).map_or(0, |position| position.last_sequence),
            last_end_ms: gap.to_ms,
            counters: Counters::default(),
            pid: None,
            closed: true,
        };
        if let Err(error) = self.spool.take(&[], std::slice::from_ref(&position)) {
            tracing::warn!(%vm_id, error = %metald_types::error_chain(&error), "cannot keep a closed meter position");
        }
        self.positions.insert(position.vm_id.clone(), position);
    }

    /// Bills, oldest first, the VMM ends the VM store kept that the earlier
    /// meter had not billed.
    fn found_ends(&mut self, vm_id: &VmId, tenant: &TenantId, ends: &[EndedVmm]) {
        for ended in ends {
            self.found_ended(vm_id, tenant, *ended);
        }
    }

    /// Bills a VMM's end the earlier meter did not take, from what the VM
    /// store kept of it: the rest of a life metered up to its last record,
    /// or a whole life too short for any tick to have seen. An end already
    /// billed (or reported as a gap) is left alone.
    fn found_ended(&mut self, vm_id: &VmId, tenant: &TenantId, ended: EndedVmm) {
        let position = self.positions.get(vm_id.as_str()).cloned();
        // Records of a later VMM taken, or this end's own record (a stop's is its final one): billed.
        let billed = position.as_ref().is_some_and(|position| {
            position.last_end_ms > ended.ended_at_ms || (position.last_end_ms == ended.ended_at_ms && (position.closed || ended.by_reboot))
        });
        if billed {
            return;
        }
        let Some(cpu_ns) = ended.cpu_ns else {
            // Found dead after a restart: its use is unknown from its last record, or its boot.
            return self.ended_unmetered(vm_id, tenant, Some(ended.booted_at_ms), ended.ended_at_ms);
        };
        let (next_sequence, start_ms, baseline) = match position {
            Some(position) if !position.closed && position.last_end_ms >= ended.booted_at_ms => {
                (position.last_sequence + 1, position.last_end_ms, position.counters)
            }
            Some(position) => {
                if !position.closed {
                    // An earlier VMM ended unseen before this one booted.
                    self.ended_unmetered(vm_id, tenant, None, ended.booted_at_ms);
                }
                (position.last_sequence + 1, ended.booted_at_ms.max(position.last_end_ms), Counters::default())
            }
            None => (1, ended.booted_at_ms, Counters::default()),
        };
        let target = MeterTarget { pid: None, cgroup: None, taps: Vec::new() };
        let sized = (ended.vcpus, ended.memory_bytes);
        let mut metered = Metered::from(tenant.clone(), target, sized, (next_sequence, start_ms, baseline));
        metered.last_counters.cpu_ns = cpu_ns.max(baseline.cpu_ns);
        // A reboot's end closes the old VMM's time, as a `Rebooted` event would, without ending the VM's.
        let record = finish_record(vm_id, &metered, metered.last_counters, ended.ended_at_ms, !ended.by_reboot);
        self.vms.insert(vm_id.clone(), metered);
        self.take_one(vm_id, record);
        self.vms.remove(vm_id);
        if let Some(position) = self.positions.get_mut(vm_id.as_str()) {
            position.closed = true;
        }
    }

    /// Starts metering a VM from the moment it booted. A fresh VMM's
    /// counters start at zero, so everything its cgroup counts is charged,
    /// its own start included; the same VMM after a restart of the meter
    /// continues from the position kept in the spool.
    fn begin(&mut self, vm_id: VmId, tenant: TenantId, running: RunningVmm, at_ms: u64) {
        self.end_now(&vm_id);
        let target = MeterTarget { pid: running.pid, cgroup: running.cgroup, taps: running.taps };
        // A position of no process is one billed from the store: its VMM's end is in it.
        let previous_vmm_ended_unmetered = self
            .positions
            .get(vm_id.as_str())
            .is_some_and(|position| !position.closed && position.pid.is_some() && position.pid != target.pid);
        if previous_vmm_ended_unmetered {
            self.ended_unmetered(&vm_id, &tenant, None, at_ms);
        }
        let position = self.positions.get(vm_id.as_str());
        let (next_sequence, start_ms, baseline) = match position {
            Some(position) if position.pid.is_some() && position.pid == target.pid => {
                (position.last_sequence + 1, position.last_end_ms, position.counters)
            }
            Some(position) => (position.last_sequence + 1, at_ms.max(position.last_end_ms), Counters::default()),
            None => (1, at_ms, Counters::default()),
        };
        let metered = Metered::from(tenant, target, (running.vcpus, running.memory_bytes), (next_sequence, start_ms, baseline));
        self.vms.insert(vm_id, metered);
    }

    /// Takes a stopped VM's final record now, before an event right behind
    /// the stop (a delete, the next boot) replaces the VM; a stop is mostly
    /// closed with the tick's other records instead, in one commit.
    fn end_now(&mut self, vm_id: &VmId) {
        let Some(vm) = self.vms.get_mut(vm_id) else { return };
        let Some(ending) = vm.ending else { return };
        let record = final_record(vm_id, vm, ending);
        self.take_one(vm_id, record);
    }

    /// Takes a record for a VM up to an event (a pause, a resume, a reboot),
    /// with the CPU its cgroup counted then, or read now where it has none.
    fn close_interval(&mut self, vm_id: &VmId, usage: Option<&CgroupUsage>, at_ms: u64) {
        let Some(vm) = self.vms.get_mut(vm_id) else { return };
        match usage {
            Some(usage) => vm.last_counters.cpu_ns = usage.cpu_ns.max(vm.last_counters.cpu_ns),
            None => {
                if let Ok(counters) = self.source.read(&vm.target) {
                    vm.last_counters = counters;
                }
            }
        }
        let record = finish_record(vm_id, vm, vm.last_counters, at_ms, false);
        self.take_one(vm_id, record);
    }

    /// Takes a record outside the tick. One not taken (a full spool) is
    /// covered by the VM's next record, which then cannot tell paused time apart.
    fn take_one(&mut self, vm_id: &VmId, record: UsageRecord) {
        let position = position_of(vm_id, self.vms.get(vm_id), &record);
        match self.spool.take(std::slice::from_ref(&record), std::slice::from_ref(&position)) {
            Ok(()) => {
                self.stats.records.fetch_add(1, Ordering::Relaxed);
                if let Some(vm) = self.vms.get_mut(vm_id) {
                    advance(vm, &record);
                }
                self.positions.insert(position.vm_id.clone(), position);
                if record.final_record {
                    self.vms.remove(vm_id);
                }
            }
            Err(error) => {
                if matches!(error, SpoolError::Full { .. }) {
                    self.stats.spool_full.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(%vm_id, error = %metald_types::error_chain(&error), "a usage record was not taken; the VM's next record covers its time");
            }
        }
    }

    /// Asks for fresh block totals every `block_every` ticks and takes the
    /// newest that have arrived; a VMM slow to answer only keeps its own
    /// figures older.
    fn read_blocks(&mut self) {
        if self.config.block_every == 0 || !self.blocks.enabled() {
            return;
        }
        let asking = self.tick.is_multiple_of(u64::from(self.config.block_every));
        for (vm_id, vm) in self.vms.iter_mut().filter(|(_, vm)| vm.ending.is_none()) {
            if asking {
                self.blocks.request(vm_id, vm.target.pid);
            }
            if let Some(totals) = self.blocks.latest(vm_id, vm.target.pid) {
                if vm.block_baseline.is_none() {
                    vm.block_baseline = Some(totals);
                }
                vm.block_latest = Some(totals);
            }
        }
    }

    /// Counts the ticks that passed since `deadline` as missed, in the
    /// records about to be taken, which are the ones that cover them.
    fn count_missed(&mut self, deadline: Instant) -> u64 {
        let period = self.config.period;
        let late = Instant::now().saturating_duration_since(deadline);
        // Ticks whose time passed while this one ran late are missed, not replayed.
        let skipped = metald_types::time::saturating_u64(late.as_nanos() / period.as_nanos().max(1));
        self.stats.last_lag_ns.store(metald_types::time::saturating_u64(late.as_nanos()), Ordering::Relaxed);
        if skipped > 0 {
            self.stats.missed_ticks.fetch_add(skipped, Ordering::Relaxed);
            for vm in self.vms.values_mut() {
                vm.missed = vm.missed.saturating_add(u32::try_from(skipped).unwrap_or(u32::MAX));
            }
        }
        skipped
    }

    /// Takes this tick's records; returns how many ticks were missed.
    fn sample(&mut self, deadline: Instant) -> u64 {
        self.tick += 1;
        self.read_blocks();
        let skipped = self.count_missed(deadline);
        let now = metald_types::time::unix_millis_now();
        let mut records = Vec::with_capacity(self.vms.len());
        for (vm_id, vm) in &mut self.vms {
            if let Some(ending) = vm.ending {
                // A final record the spool did not take when the VM stopped.
                records.push(final_record(vm_id, vm, ending));
                continue;
            }
            let counters = match self.source.read(&vm.target) {
                Ok(counters) => counters,
                Err(error) => {
                    self.stats.read_failures.fetch_add(1, Ordering::Relaxed);
                    // The first tick of a run of failures is worth a line; the rest are counted.
                    if vm.missed == 0 {
                        tracing::warn!(%vm_id, %error, "cannot read a VM's counters; its next record covers the time");
                    } else {
                        tracing::debug!(%vm_id, %error, "cannot read a VM's counters this tick");
                    }
                    vm.missed = vm.missed.saturating_add(1);
                    continue;
                }
            };
            vm.last_counters = counters;
            records.push(finish_record(vm_id, vm, counters, now, false));
        }
        if records.is_empty() {
            return skipped;
        }
        let positions: Vec<MeterPosition> =
            records.iter().map(|record| position_of(&record.vm_id, self.vms.get(&record.vm_id), record)).collect();
        match self.spool.take(&records, &positions) {
            Ok(()) => {
                self.stats.records.fetch_add(records.len() as u64, Ordering::Relaxed);
                for (record, position) in records.iter().zip(positions) {
                    if let Some(vm) = self.vms.get_mut(&record.vm_id) {
                        advance(vm, record);
                    }
                    self.positions.insert(position.vm_id.clone(), position);
                    if record.final_record {
                        self.vms.remove(&record.vm_id);
                    }
                }
            }
            Err(error) => {
                if matches!(error, SpoolError::Full { .. }) {
                    self.stats.spool_full.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(error = %metald_types::error_chain(&error), "usage records not taken this tick; the next records will cover this time");
            }
        }
        self.stats.metered_vms.store(self.vms.len() as u64, Ordering::Relaxed);
        skipped
    }
}

/// A stopped VM's last record: its cgroup's last word for CPU (the VMM is
/// gone), the last reading for the rest, ending at the stop.
fn final_record(vm_id: &VmId, vm: &mut Metered, ending: Ending) -> UsageRecord {
    if let Some(usage) = ending.usage {
        vm.last_counters.cpu_ns = usage.cpu_ns.max(vm.last_counters.cpu_ns);
    }
    finish_record(vm_id, vm, vm.last_counters, ending.at_ms, true)
}

/// The record from a VM's last position to `counters` at `now`.
fn finish_record(vm_id: &VmId, vm: &Metered, counters: Counters, now: u64, final_record: bool) -> UsageRecord {
    let network = counters.devices.since(&vm.baseline.devices);
    let block = match (vm.block_baseline, vm.block_latest) {
        (Some(base), Some(latest)) => latest.since(&base),
        _ => DeviceCounters::default(),
    };
    UsageRecord {
        tenant_id: vm.tenant.clone(),
        vm_id: vm_id.clone(),
        sequence: vm.next_sequence,
        start_ms: vm.start_ms,
        end_ms: now.max(vm.start_ms),
        usage: Counters {
            cpu_ns: if vm.paused { 0 } else { counters.cpu_ns.saturating_sub(vm.baseline.cpu_ns) },
            memory_bytes: counters.memory_bytes,
            memory_peak_bytes: counters.memory_peak_bytes.max(counters.memory_bytes),
            devices: DeviceCounters {
                block_read_bytes: block.block_read_bytes,
                block_write_bytes: block.block_write_bytes,
                block_read_ops: block.block_read_ops,
                block_write_ops: block.block_write_ops,
                ..network
            },
        },
        vcpus: vm.vcpus,
        memory_limit_bytes: vm.memory_limit_bytes,
        missed_ticks: vm.missed,
        paused: vm.paused,
        final_record,
    }
}

/// Moves a VM's position past a taken record.
fn advance(vm: &mut Metered, record: &UsageRecord) {
    vm.next_sequence = record.sequence + 1;
    vm.start_ms = record.end_ms;
    vm.baseline = vm.last_counters;
    vm.block_baseline = vm.block_latest.or(vm.block_baseline);
    vm.missed = 0;
}

fn position_of(vm_id: &VmId, vm: Option<&Metered>, record: &UsageRecord) -> MeterPosition {
    MeterPosition {
        tenant_id: record.tenant_id.to_string(),
        vm_id: vm_id.to_string(),
        last_sequence: record.sequence,
        last_end_ms: record.end_ms,
        counters: vm.map(|vm| vm.last_counters).unwrap_or_default(),
        pid: vm.and_then(|vm| vm.target.pid),
        closed: record.final_record,
    }
}
