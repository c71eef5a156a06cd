//! Request and response bodies of the Firecracker v1.12 API, one type per
//! resource. Firecracker refuses unknown fields, so these carry exactly the
//! fields metald sends and nothing else.

use serde::{Deserialize, Serialize};

use crate::config::RateLimit;

#[derive(Debug, Serialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    pub smt: bool,
    pub huge_pages: &'static str,
}

#[derive(Debug, Serialize)]
pub struct BootSource<'a> {
    pub kernel_image_path: &'a str,
    pub boot_args: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct Drive<'a> {
    pub drive_id: &'a str,
    pub path_on_host: &'a str,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct NetworkInterface<'a> {
    pub iface_id: &'a str,
    pub host_dev_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Serialize)]
pub struct RateLimiter {
    pub bandwidth: TokenBucket,
}

/// Firecracker's token bucket: `size` bytes refilled every `refill_time` ms.
#[derive(Debug, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub one_time_burst: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl RateLimiter {
    /// Our limit is bytes per second; Firecracker's bucket holds `size`
    /// bytes per `refill_time` ms, so the bucket is sized to keep the rate.
    pub fn from_limit(limit: &RateLimit) -> Option<Self> {
        if limit.bandwidth == 0 {
            return None;
        }
        let size = limit.bandwidth.saturating_mul(limit.refill_time_ms) / 1000;
        Some(Self { bandwidth: TokenBucket { size: size.max(1), refill_time: limit.refill_time_ms, one_time_burst: limit.burst } })
    }
}

#[derive(Debug, Serialize)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Serialize)]
pub struct VmStateChange {
    pub state: VmStateName,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum VmStateName {
    Paused,
    Resumed,
}

/// `GET /`.
#[derive(Debug, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// The body of every error answer.
#[derive(Debug, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_becomes_a_bucket_that_keeps_the_rate() {
        let limit = RateLimit { bandwidth: 10_000_000, refill_time_ms: 100, burst: 5_000 };
        let limiter = RateLimiter::from_limit(&limit).unwrap();
        let json = serde_json::to_value(&limiter).unwrap();
        assert_eq!(json, serde_json::json!({"bandwidth": {"size": 1_000_000, "refill_time": 100, "one_time_burst": 5000}}));
        assert!(RateLimiter::from_limit(&RateLimit::default()).is_none());
    }
}
