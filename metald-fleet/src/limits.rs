//! Request rates per API key, by method class: reads (`GetVmInfo`,
//! `ListVms`, `GetConsole`, `WatchVms`), mutations (every other change)
//! and creates (`CreateVm`), each its own GCRA bucket (`governor`). A call
//! over its bucket is `resource_exhausted` with `Retry-After` and the
//! `RateLimit-*` headers of the IETF draft, and the caller is let in again
//! once the wait passes. This is the rate of requests; how many VMs a
//! tenant may hold is its quota, and each error says which it hit.

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
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            reads: Rate { per_second: 100, burst: 200 },
            mutations: Rate { per_second: 20, burst: 40 },
            creates: Rate { per_second: 10, burst: 20 },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("rate_limits.{class}: per_second and burst must each be at least 1")]
pub struct ZeroRate {
    pub class: &'static str,
}

#[derive(Debug)]
struct Bucket {
    rate: Rate,
    limiter: DefaultKeyedRateLimiter<String>,
}

#[derive(Debug)]
pub struct RateLimits {
    reads: Bucket,
    mutations: Bucket,
    creates: Bucket,
}

fn bucket(class: MethodClass, rate: Rate) -> Result<Bucket, ZeroRate> {
    let (Some(per_second), Some(burst)) = (NonZeroU32::new(rate.per_second), NonZeroU32::new(rate.burst)) else {
        return Err(ZeroRate { class: class.name() });
    };
    Ok(Bucket { rate, limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)) })
}

impl RateLimits {
    pub fn new(settings: RateSettings) -> Result<Self, ZeroRate> {
        Ok(Self {
            reads: bucket(MethodClass::Read, settings.reads)?,
            mutations: bucket(MethodClass::Mutation, settings.mutations)?,
            creates: bucket(MethodClass::Create, settings.creates)?,
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
        Err(refusal(class, bucket.rate, wait))
    }

    /// Forgets keys whose buckets are full again, so the map does not grow with every key ever seen.
    pub fn forget_idle(&self) {
        for bucket in [&self.reads, &self.mutations, &self.creates] {
            bucket.limiter.retain_recent();
        }
    }
}

fn refusal(class: MethodClass, rate: Rate, wait: Duration) -> ConnectError {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut headers = http::HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("retry-after", seconds.max(1).to_string());
    set("ratelimit-limit", rate.burst.to_string());
    set("ratelimit-remaining", "0".into());
    set("ratelimit-reset", seconds.max(1).to_string());
    set("ratelimit-policy", format!("{};w=1;burst={}", rate.per_second, rate.burst));
    ConnectError::resource_exhausted(format!(
        "rate limit: this API key may make {} {} per second ({} at once); retry after {} ms",
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
}
