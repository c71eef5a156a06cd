//! Restarting a VM whose VMM died, as its [`RestartPolicy`] asks: after
//! 1 s, then 2 s, 4 s, … up to 5 minutes between tries, at most
//! `max_restarts` times in a row; a VM that then ran for 10 minutes counts
//! from 0 again. The same as Kubernetes' `restartPolicy: OnFailure` with
//! its crash-loop backoff, with a limit.

use std::time::Duration;

use crate::config::RestartPolicy;

pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// The most `max_restarts` may be.
pub const MAX_RESTARTS_LIMIT: u32 = 100;
const FIRST_DELAY: Duration = Duration::from_secs(1);
const LONGEST_DELAY: Duration = Duration::from_secs(300);
/// A VMM that ran this long died of something new, not of a crash loop.
const RESET_AFTER: Duration = Duration::from_secs(600);

/// One VM's restarts in a row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartCount {
    pub in_a_row: u32,
}

/// The next restart, when the policy allows one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRestart {
    /// 1 for the first restart in a row.
    pub number: u32,
    pub of: u32,
    pub after: Duration,
}

impl RestartCount {
    /// Counts a death of the VMM (or a restart that failed) and says when
    /// to boot again; `None` when the policy says never or the limit is
    /// reached. `ran_for` is how long the VMM that died had run.
    pub fn next(&mut self, policy: &RestartPolicy, ran_for: Option<Duration>) -> Option<NextRestart> {
        if !policy.on_failure {
            return None;
        }
        if ran_for.is_some_and(|ran_for| ran_for >= RESET_AFTER) {
            self.in_a_row = 0;
        }
        let of = if policy.max_restarts == 0 { DEFAULT_MAX_RESTARTS } else { policy.max_restarts };
        if self.in_a_row >= of {
            return None;
        }
        let after = FIRST_DELAY.saturating_mul(1 << self.in_a_row.min(16)).min(LONGEST_DELAY);
        self.in_a_row += 1;
        Some(NextRestart { number: self.in_a_row, of, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_up_to_their_limit_and_a_long_run_counts_from_zero_again() {
        let policy = RestartPolicy { on_failure: true, max_restarts: 10 };
        let mut count = RestartCount::default();
        let delays: Vec<u64> =
            std::iter::from_fn(|| count.next(&policy, Some(Duration::from_secs(1)))).map(|next| next.after.as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(count.next(&policy, Some(RESET_AFTER)), Some(NextRestart { number: 1, of: 10, after: FIRST_DELAY }));
        assert_eq!(RestartCount::default().next(&RestartPolicy::default(), None), None, "never, by default");
        let default_limit = RestartPolicy { on_failure: true, max_restarts: 0 };
        let mut count = RestartCount::default();
        assert_eq!(std::iter::from_fn(|| count.next(&default_limit, None)).count(), DEFAULT_MAX_RESTARTS as usize);
    }
}
