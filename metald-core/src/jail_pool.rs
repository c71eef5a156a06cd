//! The jail pool: jail children made ahead of time, each already cloned
//! into its namespaces and moved into a cgroup of its own, waiting for
//! the orders of the VM that takes it. A create takes one and only binds
//! what is the VM's (limits, name, files, network namespace, user), so the
//! clone and the move into the cgroup (an RCU grace period on cgroup v1)
//! are off its path. A thread of its own refills the pool to its size,
//! once no create has taken a part for a quiet interval: a part made
//! while a VMM starts (on cgroup v1, the move into its cgroup above all)
//! slows that start by more than a part left in the pool saves. A pool
//! that a create emptied is refilled as soon as no launch is binding a
//! part: under sustained creates each then finds the part made during
//! the one before, instead of making its own on its path. Not during the
//! launch itself: on cgroup v1 the refill's move holds the cgroup mutex
//! through a grace period, which the launch's cgroup rename then waits
//! out (12 ms of a 23 ms networked create, seen with `perf sched`).
//!
//! A part is never given twice: taking one removes it from the pool, and
//! a child obeys one message of orders only. Nothing outlives the pool:
//! its children die with metald (their parent-death signal stands until
//! their exec), and stopping it ends and reaps each one
//! and removes its cgroup. After a restart of metald, the cgroups of an
//! earlier run's pool hold no process and are swept like any stray
//! (their names start with [`POOL_PREFIX`], and this run's are skipped).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::cgroups::{Cgroup, CgroupHierarchy, CgroupLimits};
use crate::jail_child::WaitingChild;
use crate::jailer::JailError;

/// Every pool cgroup's name starts with this.
pub const POOL_PREFIX: &str = "pool-";
/// How long the refill waits after it failed to make a part.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A child waiting in its cgroup.
#[derive(Debug)]
pub(crate) struct ReadyChild {
    pub child: WaitingChild,
    pub cgroup: Cgroup,
}

impl ReadyChild {
    /// Makes one: a cgroup with `limits`, a child cloned and moved into it.
    /// Nothing is left when a step fails.
    pub(crate) fn make(cgroups: &CgroupHierarchy, name: &str, limits: &CgroupLimits) -> Result<Self, JailError> {
        let cgroup = cgroups.create(name, limits)?;
        let child = match WaitingChild::clone_waiting() {
            Ok(child) => child,
            Err(error) => {
                let _ = cgroup.remove();
                return Err(error);
            }
        };
        // The child waits for its orders, so it is inside its cgroup before it allocates anything.
        if let Err(error) = cgroup.add_process(child.pid()) {
            child.discard();
            let _ = cgroup.remove();
            return Err(error.into());
        }
        Ok(Self { child, cgroup })
    }

    /// Ends the child, reaps it, and removes its cgroup; what could not be removed.
    pub(crate) fn discard(self) -> Option<String> {
        self.child.discard();
        self.cgroup.remove().err().map(|error| crate::error_chain(&error))
    }
}

#[derive(Debug, Default)]
struct PoolState {
    ready: VecDeque<ReadyChild>,
    stopping: bool,
    made: u64,
    /// When a create last took a part (or found none).
    last_take: Option<Instant>,
    /// Launches between asking for a part and their VMM's exec.
    launching: usize,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<PoolState>,
    changed: Condvar,
    size: usize,
    /// How long no create may have taken a part before the refill makes one.
    quiet: Duration,
    cgroups: CgroupHierarchy,
    /// Limits a part waits under; a VM's are at least these, so binding only raises them.
    waiting_limits: CgroupLimits,
    /// This run's pool cgroups are named `<prefix><n>`.
    prefix: String,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the pool holds now, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFill {
    pub ready: usize,
    pub size: usize,
}

/// Jail children made ahead of time, refilled in the background.
#[derive(Debug)]
pub(crate) struct JailPool {
    shared: Arc<Shared>,
    refill: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl JailPool {
    /// Starts the refill thread, which makes `size` parts right away.
    pub(crate) fn start(size: usize, quiet: Duration, cgroups: CgroupHierarchy, waiting_limits: CgroupLimits) -> Result<Self, JailError> {
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_nanos()).unwrap_or(0);
        let prefix = format!("{POOL_PREFIX}{:x}-{started:x}-", std::process::id());
        let shared = Arc::new(Shared {
            state: Mutex::new(PoolState::default()),
            changed: Condvar::new(),
            size,
            quiet,
            cgroups,
            waiting_limits,
            prefix,
        });
        let refilled = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("metald-jail-pool".into())
            .spawn(move || refill(&refilled))
            .map_err(|source| JailError::Thread { name: "jail pool", source })?;
        Ok(Self { shared, refill: Mutex::new(Some(thread)) })
    }

    /// Marks a launch as running until the guard is dropped; the refill
    /// makes no part meanwhile.
    pub(crate) fn launching(&self) -> Launching {
        self.shared.state().launching += 1;
        Launching { shared: Arc::clone(&self.shared) }
    }

    /// A waiting child no one else has or will get, if one is ready.
    pub(crate) fn take(&self) -> Option<ReadyChild> {
        let mut state = self.shared.state();
        state.last_take = Some(Instant::now());
        self.shared.changed.notify_all();
        while let Some(part) = state.ready.pop_front() {
            self.shared.changed.notify_all();
            if part.child.is_waiting() {
                return Some(part);
            }
            // Killed from outside while it waited: no use to anyone.
            if let Some(problem) = part.discard() {
                tracing::warn!(problem, "cannot remove a jail pool part that died while it waited");
            }
        }
        None
    }

    /// Whether `cgroup` names one of this run's pool parts, waiting or taken.
    pub(crate) fn owns(&self, cgroup: &str) -> bool {
        cgroup.starts_with(&self.shared.prefix)
    }

    pub(crate) fn fill(&self) -> PoolFill {
        PoolFill { ready: self.shared.state().ready.len(), size: self.shared.size }
    }

    /// Stops the refill and ends every waiting part; what could not be removed.
    pub(crate) fn stop(&self) -> Vec<String> {
        self.shared.state().stopping = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.refill.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = thread.join();
        }
        let parts: Vec<ReadyChild> = self.shared.state().ready.drain(..).collect();
        parts.into_iter().filter_map(ReadyChild::discard).collect()
    }
}

impl Drop for JailPool {
    fn drop(&mut self) {
        for problem in self.stop() {
            tracing::warn!(problem, "cannot remove a jail pool part");
        }
    }
}

/// A launch in progress (see [`JailPool::launching`]).
#[derive(Debug)]
pub(crate) struct Launching {
    shared: Arc<Shared>,
}

impl Drop for Launching {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.launching = state.launching.saturating_sub(1);
        self.shared.changed.notify_all();
    }
}

/// What the refill does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Stop,
    /// Until the state changes, or at most this long.
    Wait(Option<Duration>),
    Make,
}

/// The refill's rule. Made while a VMM starts, a part slows that start,
/// which a part left in the pool does not repay: it waits while a launch
/// is binding, and a pool that still holds parts waits for the quiet
/// interval. An empty pool is refilled once no launch is binding: creates
/// then come faster than the quiet interval, and the next would make its
/// child on its own path.
fn next_step(state: &PoolState, size: usize, quiet: Duration) -> Next {
    if state.stopping {
        return Next::Stop;
    }
    if state.ready.len() >= size || state.launching > 0 {
        return Next::Wait(None);
    }
    match state.last_take.map(|taken| taken.elapsed()) {
        Some(since) if since < quiet && !state.ready.is_empty() => Next::Wait(Some(quiet - since)),
        _ => Next::Make,
    }
}

/// The refill thread: makes parts while the pool holds fewer than its size.
fn refill(shared: &Shared) {
    loop {
        let name = {
            let mut state = shared.state();
            loop {
                match next_step(&state, shared.size, shared.quiet) {
                    Next::Stop => return,
                    Next::Make => break,
                    Next::Wait(None) => state = shared.changed.wait(state).unwrap_or_else(PoisonError::into_inner),
                    Next::Wait(Some(quiet_left)) => {
                        state = shared.changed.wait_timeout(state, quiet_left).unwrap_or_else(PoisonError::into_inner).0
                    }
                }
            }
            state.made += 1;
            format!("{}{}", shared.prefix, state.made)
        };

        match ReadyChild::make(&shared.cgroups, &name, &shared.waiting_limits) {
            Ok(part) => {
                let mut state = shared.state();
                if state.stopping {
                    drop(state);
                    let _ = part.discard();
                    return;
                }
                state.ready.push_back(part);
            }
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "cannot make a jail pool part; trying again in a second");
                let state = shared.state();
                let _ = shared.changed.wait_timeout_while(state, RETRY_AFTER_FAILURE, |state| !state.stopping);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 2;
    const QUIET: Duration = Duration::from_secs(3600);

    fn taken_just_now(launching: usize) -> PoolState {
        PoolState { last_take: Some(Instant::now()), launching, ..PoolState::default() }
    }

    #[test]
    fn an_emptied_pool_waits_for_the_launch_that_emptied_it_then_refills_at_once() {
        assert_eq!(next_step(&taken_just_now(1), SIZE, QUIET), Next::Wait(None));
        assert_eq!(next_step(&taken_just_now(0), SIZE, QUIET), Next::Make);
    }

    #[test]
    fn a_new_pool_fills_and_a_stopping_one_stops() {
        assert_eq!(next_step(&PoolState::default(), SIZE, QUIET), Next::Make);
        let stopping = PoolState { stopping: true, ..taken_just_now(1) };
        assert_eq!(next_step(&stopping, SIZE, QUIET), Next::Stop);
    }
}
