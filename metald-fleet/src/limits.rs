//! Request rates per API key, by method class: reads (`GetVmInfo`,
//! `ListVms`, `GetConsole`, `WatchVms`), mutations (every other change)
//! and creates (`CreateVm`), each its own GCRA bucket (`governor`). A call
//! over its bucket is `resource_exhausted` with `Retry-After` and the
//! `RateLimit-*` headers of the IETF draft, and the caller is let in again
//! once the wait passes. This is the rate of requests; how many VMs a
//! tenant may hold is its quota, and each error says which it hit.
//!
//! The buckets live in each gateway's memory. With several gateways behind
//! one load balancer, `gateways = N` makes each enforce 1/N of every rate
//! and burst, so a key spread over all of them gets at most its allowance
//! (and one that reaches only some gateways, less): no call waits on the
//! store for a rate.

use std::num::NonZeroU32;
use std::time::Duration;

use connectrpc::ConnectError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Which bucket a method draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodClass {
    Read,
    Mutation,
    Create,
}

impl MethodClass {
    pub fn of(method: &str) -> Self {
        match method {
            "GetVmInfo" | "ListVms" | "GetConsole" | "WatchVms" => MethodClass::Read,
            "CreateVm" => MethodClass::Create,
            _ => MethodClass::Mutation,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MethodClass::Read => "reads",
            MethodClass::Mutation => "mutations",
            MethodClass::Create => "creates",
        }
    }
}

/// One class's allowance: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// The allowance of every key, per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateSettings {
    pub reads: Rate,
    pub mutations: Rate,
    pub creates: Rate,
    /// How many gateways share each key's allowance; each enforces its share.
    pub gateways: u32,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            gateways: 1,
            reads: Rate { per_second: 100, burst: 200 },
            mutations: Rate { per_second: 20, burst: 40 },
            creates: Rate { per_second: 10, burst: 20 },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZeroRate {
    #[error("rate_limits.{class}: per_second and burst must each be at least 1")]
    Zero { class: &'static str },
    #[error("rate_limits.gateways must be at least 1")]
    NoGateways,
    #[error(
        "rate_limits.{class}.burst ({burst}) must be at least rate_limits.gateways ({gateways}): each gateway lets at least one call in at once"
    )]
    BurstBelowGateways { class: &'static str, burst: u32, gateways: u32 },
}

#[derive(Debug)]
struct Bucket {
    /// The fleet's allowance for a key.
    rate: Rate,
    /// How many gateways share it.
    gateways: u32,
    limiter: DefaultKeyedRateLimiter<String>,
}

#[derive(Debug)]
pub struct RateLimits {
    reads: Bucket,
    mutations: Bucket,
    creates: Bucket,
}

/// This gateway's share of `rate`: one call every `gateways / per_second` seconds, `burst / gateways` at once.
fn bucket(class: MethodClass, rate: Rate, gateways: u32) -> Result<Bucket, ZeroRate> {
    if rate.per_second == 0 || rate.burst == 0 {
        return Err(ZeroRate::Zero { class: class.name() });
    }
    let share =
        NonZeroU32::new(rate.burst / gateways).ok_or(ZeroRate::BurstBelowGateways { class: class.name(), burst: rate.burst, gateways })?;
    let period = Duration::from_secs(u64::from(gateways)) / rate.per_second;
    let quota = Quota::with_period(period).ok_or(ZeroRate::Zero { class: class.name() })?.allow_burst(share);
    Ok(Bucket { rate, gateways, limiter: RateLimiter::keyed(quota) })
}

impl RateLimits {
    pub fn new(settings: RateSettings) -> Result<Self, ZeroRate> {
        let gateways = settings.gateways;
        if gateways == 0 {
            return Err(ZeroRate::NoGateways);
        }
        Ok(Self {
            reads: bucket(MethodClass::Read, settings.reads, gateways)?,
            mutations: bucket(MethodClass::Mutation, settings.mutations, gateways)?,
            creates: bucket(MethodClass::Create, settings.creates, gateways)?,
        })
    }

    fn bucket(&self, class: MethodClass) -> &Bucket {
        match class {
            MethodClass::Read => &self.reads,
            MethodClass::Mutation => &self.mutations,
            MethodClass::Create => &self.creates,
        }
    }

    /// Lets a call of `key_id` to `method` in, or says how long to wait.
    pub fn admit(&self, key_id: &str, method: &str) -> Result<(), ConnectError> {
        let class = MethodClass::of(method);
        let bucket = self.bucket(class);
        let Err(not_until) = bucket.limiter.check_key(&key_id.to_owned()) else { return Ok(()) };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        Err(refusal(class, bucket, wait))
    }

    /// Forgets keys whose buckets are full again, so the map does not grow with every key ever seen.
    pub fn forget_idle(&self) {
        for bucket in [&self.reads, &self.mutations, &self.creates] {
            bucket.limiter.retain_recent();
        }
    }
}

fn refusal(class: MethodClass, bucket: &Bucket, wait: Duration) -> ConnectError {
    let (rate, gateways) = (bucket.rate, bucket.gateways);
    let share = rate.burst / gateways;
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut headers = http::HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("retry-after", seconds.max(1).to_string());
    set("ratelimit-limit", share.to_string());
    set("ratelimit-remaining", "0".into());
    set("ratelimit-reset", seconds.max(1).to_string());
    set("ratelimit-policy", format!("{};w={gateways};burst={share}", rate.per_second));
    let across = if gateways > 1 { format!(" across {gateways} gateways, {share} at once through each") } else { String::new() };
    ConnectError::resource_exhausted(format!(
        "rate limit: this API key may make {} {} per second ({} at once){across}; retry after {} ms",
        rate.per_second,
        class.name(),
        rate.burst,
        wait.as_millis().max(1)
    ))
    .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_let_in_and_the_next_call_is_told_when_to_come_back() {
        let rate = Rate { per_second: 1, burst: 2 };
        let limits = RateLimits::new(RateSettings { creates: rate, ..RateSettings::default() }).unwrap();
        assert!(limits.admit("k1", "CreateVm").is_ok());
        assert!(limits.admit("k1", "CreateVm").is_ok());
        let refused = limits.admit("k1", "CreateVm").unwrap_err();
        assert_eq!(refused.code, connectrpc::ErrorCode::ResourceExhausted);
        assert!(refused.message.as_deref().unwrap().starts_with("rate limit: this API key may make 1 creates per second"), "{refused:?}");
        assert_eq!(refused.response_headers()["retry-after"], "1");
        assert_eq!(refused.response_headers()["ratelimit-remaining"], "0");
        assert!(limits.admit("k2", "CreateVm").is_ok(), "another key has a bucket of its own");
        assert!(limits.admit("k1", "GetVmInfo").is_ok(), "reads draw from another bucket");
        assert!(RateLimits::new(RateSettings { reads: Rate { per_second: 0, burst: 1 }, ..RateSettings::default() }).is_err());
    }

    #[test]
    fn each_of_several_gateways_lets_in_its_share_of_a_burst() {
        let rate = Rate { per_second: 1, burst: 4 };
        let limits = RateLimits::new(RateSettings { creates: rate, gateways: 2, ..RateSettings::default() }).unwrap();
        let admitted = (0..6).filter(|_| limits.admit("k1", "CreateVm").is_ok()).count();
        // A refill (one call per 2 s on this gateway) may fall inside the loop on a slow machine.
        assert!((2..=3).contains(&admitted), "{admitted} of a burst of 4 shared by 2 gateways");
        let refused = limits.admit("k1", "CreateVm").unwrap_err();
        assert!(refused.message.as_deref().unwrap().contains("(4 at once) across 2 gateways, 2 at once through each"), "{refused:?}");
        let too_few = RateLimits::new(RateSettings { creates: Rate { per_second: 1, burst: 1 }, gateways: 2, ..RateSettings::default() });
        assert!(matches!(too_few, Err(ZeroRate::BurstBelowGateways { .. })), "{too_few:?}");
    }
}
