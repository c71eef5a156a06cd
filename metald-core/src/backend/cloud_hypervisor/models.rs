//! Request and response bodies of the Cloud Hypervisor API (v54,
//! `vmm/src/api/openapi/cloud-hypervisor.yaml`): the one `vm.create` body
//! built from the typed spec, and what `vm.info` and `vm.counters` answer.
//! Cloud Hypervisor ignores fields it does not know; these carry only what
//! metald sets, so its defaults stay its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::RateLimit;

#[derive(Debug, Serialize)]
pub struct VmConfig<'a> {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig<'a>>,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
    pub platform: PlatformConfig<'a>,
}

#[derive(Debug, Serialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CpuTopology {
    pub threads_per_core: u32,
    pub cores_per_die: u32,
    pub dies_per_package: u32,
    pub packages: u32,
}

#[derive(Debug, Serialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub hotplug_size: u64,
    pub hugepages: bool,
}

#[derive(Debug, Serialize)]
pub struct PayloadConfig<'a> {
    pub kernel: &'a str,
    pub cmdline: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct DiskConfig<'a> {
    pub id: &'a str,
    pub path: &'a str,
    pub readonly: bool,
}

/// An interface `vm.add-net` adds, its TAP passed as an open descriptor
/// beside the request: `vm.create` takes no descriptors.
#[derive(Debug, Serialize)]
pub struct NetConfig<'a> {
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
}

/// Cloud Hypervisor's limiter: one per device, for both directions.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RateLimiterConfig {
    pub bandwidth: TokenBucket,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub one_time_burst: u64,
}

impl RateLimiterConfig {
    /// `None` for a limit of 0 bytes, which means no limit.
    pub fn from_limit(limit: &RateLimit) -> Option<Self> {
        (limit.bandwidth > 0).then_some(Self {
            bandwidth: TokenBucket { size: limit.bandwidth, refill_time: limit.refill_time_ms, one_time_burst: limit.burst },
        })
    }
}

/// Where a serial port or virtio console goes.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
pub enum ConsoleMode {
    /// The VMM's own stdout, which is metald's console pipe.
    Tty,
    Off,
}

#[derive(Debug, Serialize)]
pub struct PlatformConfig<'a> {
    /// The VM's id, which `vm.info` hands back: what proves at a takeover
    /// that the VMM on the socket runs this VM.
    pub system_serial_number: &'a str,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// What `vm.info` answers, the parts metald reads.
#[derive(Debug, Deserialize)]
pub struct VmInfo {
    /// `Created`, `Running`, `Shutdown`, `Paused`, `BreakPoint`.
    pub state: String,
    pub config: VmInfoConfig,
}

#[derive(Debug, Deserialize)]
pub struct VmInfoConfig {
    #[serde(default)]
    pub platform: Option<VmInfoPlatform>,
}

#[derive(Debug, Deserialize)]
pub struct VmInfoPlatform {
    #[serde(default)]
    pub system_serial_number: Option<String>,
}

/// What `vmm.ping` answers.
#[derive(Debug, Deserialize)]
pub struct VmmPing {
    pub version: String,
}

/// What `vm.counters` answers: each device's counters by name
/// (`read_bytes`, `write_bytes`, `read_ops`, `write_ops`, `rx_bytes`, …).
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Field names and shapes as `cloud-hypervisor.yaml` (v54) has them:
    /// `VmConfig`, `CpusConfig`, `CpuTopology`, `MemoryConfig`,
    /// `PayloadConfig`, `DiskConfig`, `NetConfig`, `RateLimiterConfig`,
    /// `TokenBucket`, `ConsoleConfig`, `PlatformConfig`.
    #[test]
    fn the_create_body_has_the_api_s_field_names() {
        let body = VmConfig {
            cpus: CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 2,
                topology: Some(CpuTopology { threads_per_core: 1, cores_per_die: 2, dies_per_package: 1, packages: 1 }),
            },
            memory: MemoryConfig { size: 32 << 20, hotplug_size: 0, hugepages: false },
            payload: PayloadConfig { kernel: "/kernel", cmdline: "console=ttyS0", initramfs: None },
            disks: vec![DiskConfig { id: "root", path: "/drives/root", readonly: true }],
            serial: ConsoleConfig { mode: ConsoleMode::Tty },
            console: ConsoleConfig { mode: ConsoleMode::Off },
            platform: PlatformConfig { system_serial_number: "vm-1" },
        };
        let json = serde_json::to_value(&body).unwrap();
        let expected = serde_json::json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 2, "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 1}},
            "memory": {"size": 33554432, "hugepages": false},
            "payload": {"kernel": "/kernel", "cmdline": "console=ttyS0"},
            "disks": [{"id": "root", "path": "/drives/root", "readonly": true}],
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
            "platform": {"system_serial_number": "vm-1"}
        });
        assert_eq!(json, expected);
        let net = NetConfig {
            id: "eth0",
            mac: Some("02:00:00:00:00:01"),
            rate_limiter_config: RateLimiterConfig::from_limit(&RateLimit { bandwidth: 1000, refill_time_ms: 100, burst: 0 }),
        };
        let expected = serde_json::json!({"id": "eth0", "mac": "02:00:00:00:00:01", "rate_limiter_config": {"bandwidth": {"size": 1000, "refill_time": 100}}});
        assert_eq!(serde_json::to_value(&net).unwrap(), expected);
        assert_eq!(RateLimiterConfig::from_limit(&RateLimit { bandwidth: 0, refill_time_ms: 100, burst: 0 }), None, "0 is no limit");
    }

    #[test]
    fn info_and_counters_read_as_the_api_answers_them() {
        let info: VmInfo = serde_json::from_str(
            r#"{"config":{"cpus":{"boot_vcpus":1},"platform":{"num_pci_segments":1,"system_serial_number":"vm-1"}},"state":"Running","memory_actual_size":33554432}"#,
        )
        .unwrap();
        assert_eq!(info.state, "Running");
        assert_eq!(info.config.platform.and_then(|platform| platform.system_serial_number).as_deref(), Some("vm-1"));
        let ping: VmmPing = serde_json::from_str(r#"{"build_version":"v54.0.0","version":"54.0.0","pid":42,"features":["kvm"]}"#).unwrap();
        assert_eq!(ping.version, "54.0.0");
    }
}
