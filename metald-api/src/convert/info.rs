//! What the manager knows about VMs, as `GetVmInfo` and `ListVms` answer it.
//!
//! Figures that need two readings or a clock (CPU percent, uptime) are the
//! caller's to compute and are taken as arguments: nothing here invents a
//! number. Which VMs and which fields a caller may see is the server's
//! decision, not this module's.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use buffa::MessageField;
use metald_core::config::VmConfig;
use metald_core::network::{AttachedInterface, NetworkAttachment};
use metald_core::{VmmInfo, VmmMetrics};

use super::config::config_to_wire;
use super::state::state_to_wire;
use super::{saturating_i32, saturating_i64, unix_ms};
use crate::proto::vmprovisioner::v1 as wire;

/// The answer to `GetVmInfo`. `metrics` comes from [`metrics_to_wire`]
/// while the VMM runs; `None` leaves the field unset.
pub fn vm_info_to_wire(info: &metald_core::VmInfo, metrics: Option<wire::VmMetrics>) -> wire::GetVmInfoResponse {
    let network_info = match &info.network {
        Some(attachment) => Some(network_info_to_wire(attachment)),
        None => configured_network_info(&info.config),
    };
    wire::GetVmInfoResponse {
        vm_id: info.vm_id.to_string(),
        config: MessageField::some(config_to_wire(&info.config)),
        state: state_to_wire(info.state).into(),
        metrics: metrics.map_or_else(MessageField::none, MessageField::some),
        backend_info: backend_info(info).into_iter().collect(),
        network_info: network_info.map_or_else(MessageField::none, MessageField::some),
        failure_reason: info.failure.clone().unwrap_or_default(),
        customer_id: info.tenant.to_string(),
        created_timestamp: unix_ms(info.created_at),
        modified_timestamp: unix_ms(info.modified_at),
        booted_timestamp: info.booted_at.map_or(0, unix_ms),
        last_exit: info.last_exit.map(|exit| exit.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// One entry of `ListVms`, with why the VM failed when it did.
pub fn vm_summary_to_wire(summary: &metald_core::VmSummary) -> wire::VmInfo {
    wire::VmInfo {
        vm_id: summary.vm_id.to_string(),
        state: state_to_wire(summary.state).into(),
        vcpu_count: saturating_i32(summary.vcpus),
        memory_size_bytes: saturating_i64(summary.memory_bytes),
        created_timestamp: unix_ms(summary.created_at),
        modified_timestamp: unix_ms(summary.modified_at),
        metadata: summary.metadata.iter().map(|(key, value)| (key.clone(), value.clone())).collect(),
        customer_id: summary.tenant.to_string(),
        failure_reason: summary.failure.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// The VM's VMM, for `backend_info`: always `vmm` and what it can do
/// (`vmm_capabilities`, comma-separated [`metald_core::Capabilities::features`], and
/// `vmm_max_vcpus`); while it runs, what it says about itself
/// ([`vmm_reports`]).
pub fn backend_info(info: &metald_core::VmInfo) -> BTreeMap<String, String> {
    let mut backend = info.vmm.as_ref().map(vmm_reports).unwrap_or_default();
    backend.insert("vmm".into(), info.config.vmm.clone());
    backend.insert("vmm_capabilities".into(), info.capabilities.features().join(","));
    backend.insert("vmm_max_vcpus".into(), info.capabilities.max_vcpus.to_string());
    backend
}

/// What a running VMM says about itself: `vmm`, `vmm_version`,
/// `vmm_state`, every entry of [`VmmInfo::extra`], and `vmm_instance`, an
/// opaque name of the VMM process: the same across a takeover after a
/// restart, another for each launch. It stands in for the host pid, uid,
/// gid and cgroup, which are the operator's business (they tell how full
/// the host is and how it is laid out); the API socket's path and the
/// launch timings stay on the host too.
fn vmm_reports(vmm: &VmmInfo) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut info = vmm.extra.clone();
    info.insert("vmm".into(), vmm.vmm.clone());
    info.insert("vmm_version".into(), vmm.vmm_version.clone());
    info.insert("vmm_state".into(), vmm.vmm_state.clone());
    let process = if vmm.cgroup.is_empty() {
        vmm.pid.map(|pid| pid.to_string())
    } else {
        Some(vmm.cgroup.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(","))
    };
    if let Some(process) = process {
        let digest = sha2::Sha256::digest(process.as_bytes());
        info.insert("vmm_instance".into(), digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect());
    }
    info
}

/// The network the provider made. The contract's original fields describe
/// the first interface (IPv6 first, as metald's network is); `interfaces`
/// lists them all.
pub fn network_info_to_wire(attachment: &NetworkAttachment) -> wire::VmNetworkInfo {
    let interfaces = attachment.interfaces.iter().map(attached_interface_to_wire).collect();
    let mut info =
        wire::VmNetworkInfo { network_namespace: attachment.netns_name.clone().unwrap_or_default(), interfaces, ..Default::default() };
    if let Some(first) = attachment.interfaces.first() {
        let ipv6_address = first.ipv6.map(|ipv6| ipv6.address.to_string()).unwrap_or_default();
        let ipv6_gateway = first.ipv6.map(|ipv6| ipv6.gateway.to_string()).unwrap_or_default();
        info.ip_address = ipv6_address.clone();
        info.gateway = ipv6_gateway.clone();
        info.ipv6_address = ipv6_address;
        info.ipv6_gateway = ipv6_gateway;
        info.ipv4_address = first.ipv4.map(|ipv4| ipv4.address.to_string()).unwrap_or_default();
        info.ipv4_gateway = first.ipv4.map(|ipv4| ipv4.gateway.to_string()).unwrap_or_default();
        info.mac_address = first.mac_address.clone();
        info.tap_device = first.tap_device.clone();
        info.dns_servers = first.dns_servers.iter().map(ToString::to_string).collect();
    }
    info
}

fn attached_interface_to_wire(interface: &AttachedInterface) -> wire::VmInterfaceInfo {
    wire::VmInterfaceInfo {
        id: interface.id.clone(),
        mac_address: interface.mac_address.clone(),
        tap_device: interface.tap_device.clone(),
        ipv6_address: interface.ipv6.map(|ipv6| ipv6.address.to_string()).unwrap_or_default(),
        ipv4_address: interface.ipv4.map(|ipv4| ipv4.address.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// A VM without a network provider uses TAP devices that already exist;
/// what it has is what its configuration says (a MAC address left empty
/// there was chosen by the VMM and is not known). `None` without interfaces.
fn configured_network_info(config: &VmConfig) -> Option<wire::VmNetworkInfo> {
    let first = config.network.first()?;
    let ipv6 = first.ipv6_config.as_ref();
    let ipv4 = first.ipv4_config.as_ref();
    let interfaces = config
        .network
        .iter()
        .map(|interface| wire::VmInterfaceInfo {
            id: interface.id.clone(),
            mac_address: interface.mac_address.clone(),
            tap_device: interface.tap_device.clone(),
            ipv6_address: interface.ipv6_config.as_ref().map(|ipv6| ipv6.address.clone()).unwrap_or_default(),
            ipv4_address: interface.ipv4_config.as_ref().map(|ipv4| ipv4.address.clone()).unwrap_or_default(),
            ..Default::default()
        })
        .collect();
    let ipv6_address = ipv6.map(|ipv6| ipv6.address.clone()).unwrap_or_default();
    let ipv6_gateway = ipv6.map(|ipv6| ipv6.gateway.clone()).unwrap_or_default();
    let dns_servers =
        ipv6.iter().flat_map(|ipv6| &ipv6.dns_servers).chain(ipv4.iter().flat_map(|ipv4| &ipv4.dns_servers)).cloned().collect();
    Some(wire::VmNetworkInfo {
        ip_address: ipv6_address.clone(),
        mac_address: first.mac_address.clone(),
        tap_device: first.tap_device.clone(),
        gateway: ipv6_gateway.clone(),
        dns_servers,
        ipv6_address,
        ipv6_gateway,
        ipv4_address: ipv4.map(|ipv4| ipv4.address.clone()).unwrap_or_default(),
        ipv4_gateway: ipv4.map(|ipv4| ipv4.gateway.clone()).unwrap_or_default(),
        interfaces,
        ..Default::default()
    })
}

/// Live figures of a VM whose VMM runs: the counters as the VMM reports
/// them, with the uptime (since the guest booted) and the CPU percent
/// (over the caller's last sampling interval, 100 = one host CPU) that
/// the caller measured.
pub fn metrics_to_wire(metrics: &VmmMetrics, uptime: Duration, cpu_usage_percent: f64) -> wire::VmMetrics {
    let devices = &metrics.devices;
    wire::VmMetrics {
        cpu_usage_percent,
        memory_usage_bytes: saturating_i64(metrics.resident_bytes),
        network_stats: MessageField::some(wire::NetworkStats {
            bytes_received: saturating_i64(devices.net_rx_bytes),
            bytes_transmitted: saturating_i64(devices.net_tx_bytes),
            packets_received: saturating_i64(devices.net_rx_packets),
            packets_transmitted: saturating_i64(devices.net_tx_packets),
            ..Default::default()
        }),
        storage_stats: MessageField::some(wire::StorageStats {
            bytes_read: saturating_i64(devices.block_read_bytes),
            bytes_written: saturating_i64(devices.block_write_bytes),
            read_operations: saturating_i64(devices.block_read_ops),
            write_operations: saturating_i64(devices.block_write_ops),
            ..Default::default()
        }),
        uptime_seconds: saturating_i64(uptime.as_secs()),
        ..Default::default()
    }
}

/// How long the guest has run, for [`metrics_to_wire`]: from its last boot
/// to `now`; zero when it is not booted or the clock went back.
pub fn uptime(booted_at: Option<SystemTime>, now: SystemTime) -> Duration {
    booted_at.and_then(|booted_at| now.duration_since(booted_at).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::path::PathBuf;
    use std::time::UNIX_EPOCH;

    use metald_core::config::{Ipv6Config, NetworkInterface};
    use metald_core::network::Assignment;
    use metald_core::process::ProcessExit;
    use metald_core::{DeviceCounters, TenantId, VmId, VmState};

    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn attachment() -> NetworkAttachment {
        let interface = |id: &str, tap: &str, last: u16| AttachedInterface {
            id: id.into(),
            tap_device: tap.into(),
            mac_address: format!("02:00:00:00:00:{last:02x}"),
            ipv6: Some(Assignment {
                address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last),
                prefix_len: 64,
                gateway: "fd00::1".parse().unwrap(),
            }),
            ipv4: (last == 2).then(|| Assignment {
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            }),
            dns_servers: vec![IpAddr::V6("fd00::53".parse().unwrap())],
            host_link: "veth-host".into(),
        };
        NetworkAttachment {
            netns: None,
            netns_name: Some("metald-vm-1".into()),
            interfaces: vec![interface("eth0", "tap0", 2), interface("eth1", "tap1", 3)],
            kernel_args: vec!["ip=dhcp".into()],
        }
    }

    fn info() -> metald_core::VmInfo {
        let mut config = VmConfig::default();
        config.cpu.vcpu_count = 2;
        config.memory.size_bytes = 128 << 20;
        config.vmm = "firecracker".into();
        metald_core::VmInfo {
            vm_id: VmId::new("vm-1").unwrap(),
            tenant: TenantId::new("acme").unwrap(),
            state: VmState::Failed,
            config,
            created_at: at(1_000),
            modified_at: at(2_000),
            failure: Some("the VMM died".into()),
            last_exit: Some(ProcessExit::Exited { code: 1 }),
            booted_at: None,
            vm_dir: PathBuf::from("/run/metald/vms/vm-1"),
            console_path: PathBuf::from("/run/metald/vms/vm-1/console.log"),
            vmm: Some(VmmInfo {
                vmm: "firecracker".into(),
                vmm_version: "1.12.1".into(),
                vmm_state: "Running".into(),
                pid: Some(4242),
                identity: Some((900_001, 900_001)),
                cgroup: vec![PathBuf::from("/sys/fs/cgroup/metald/vm-1")],
                api_socket: Some(PathBuf::from("/run/metald/vms/vm-1/api.sock")),
                extra: BTreeMap::from([("jailed".to_string(), "true".to_string())]),
                launch_timings: vec![("spawn", Duration::from_millis(3))],
            }),
            network: Some(attachment()),
            capabilities: metald_core::Capabilities {
                reboot: false,
                graceful_shutdown: true,
                graceful_stop_needs_running_guest: false,
                pause: true,
                cpu_hotplug: false,
                cpu_topology: false,
                memory_hotplug: false,
                separate_rx_tx_rate_limits: true,
                max_vcpus: 32,
                io_engines: &[],
                cache_modes: &[],
                kernel_cmdline_capacity: 2047,
                kernel_cmdline_bytes_per_device: 40,
            },
        }
    }

    #[test]
    fn vm_info_carries_the_contract_fields_and_the_extensions() {
        let response = vm_info_to_wire(&info(), None);
        assert_eq!(response.vm_id, "vm-1");
        assert_eq!(response.state, wire::VmState::VM_STATE_FAILED);
        assert_eq!(response.config.as_option().unwrap().cpu.as_option().unwrap().vcpu_count, 2);
        assert!(response.metrics.is_unset());
        assert_eq!(response.failure_reason, "the VMM died");
        assert_eq!(response.customer_id, "acme");
        assert_eq!((response.created_timestamp, response.modified_timestamp), (1_000, 2_000));
        assert_eq!(response.booted_timestamp, 0, "0 when not booted");
        assert_eq!(response.last_exit, "exited with code 1");
    }

    #[test]
    fn a_booted_vm_without_a_failure_shows_its_boot_time_and_empty_texts() {
        let mut info = info();
        info.state = VmState::Running;
        info.failure = None;
        info.last_exit = None;
        info.booted_at = Some(at(1_500));
        let response = vm_info_to_wire(&info, Some(metrics_to_wire(&VmmMetrics::default(), Duration::ZERO, 0.0)));
        assert_eq!(response.state, wire::VmState::VM_STATE_RUNNING);
        assert_eq!(response.booted_timestamp, 1_500);
        assert_eq!((response.failure_reason.as_str(), response.last_exit.as_str()), ("", ""));
        assert!(response.metrics.is_set());
    }

    #[test]
    fn backend_info_leaves_out_the_api_socket_and_launch_timings() {
        let response = vm_info_to_wire(&info(), None);
        let mut keys: Vec<_> = response.backend_info.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["jailed", "vmm", "vmm_capabilities", "vmm_instance", "vmm_max_vcpus", "vmm_state", "vmm_version"],
            "no pid, uid, gid or cgroup"
        );
        assert_eq!(response.backend_info["vmm_capabilities"], "graceful_shutdown,pause,separate_rx_tx_rate_limits");
        assert_eq!(response.backend_info["vmm_max_vcpus"], "32");
        assert_eq!(response.backend_info["vmm_version"], "1.12.1");
        assert!(response.backend_info.values().all(|value| !value.contains("api.sock")), "{:?}", response.backend_info);
    }

    #[test]
    fn network_info_describes_the_first_interface_and_lists_them_all() {
        let network = vm_info_to_wire(&info(), None).network_info.into_option().unwrap();
        assert_eq!(network.ip_address, "fd00::2", "a plain address, without the prefix length");
        assert_eq!(network.gateway, "fd00::1");
        assert_eq!((network.ipv6_address.as_str(), network.ipv6_gateway.as_str()), ("fd00::2", "fd00::1"));
        assert_eq!((network.ipv4_address.as_str(), network.ipv4_gateway.as_str()), ("10.0.0.2", "10.0.0.1"));
        assert_eq!((network.mac_address.as_str(), network.tap_device.as_str()), ("02:00:00:00:00:02", "tap0"));
        assert_eq!(network.network_namespace, "metald-vm-1");
        assert_eq!(network.dns_servers, ["fd00::53"]);
        assert!(network.port_mappings.is_empty());
        let interfaces: Vec<_> = network
            .interfaces
            .iter()
            .map(|i| (i.id.as_str(), i.tap_device.as_str(), i.ipv6_address.as_str(), i.ipv4_address.as_str()))
            .collect();
        assert_eq!(interfaces, [("eth0", "tap0", "fd00::2", "10.0.0.2"), ("eth1", "tap1", "fd00::3", "")]);
    }

    #[test]
    fn without_a_provider_the_network_is_what_the_configuration_says() {
        let mut info = info();
        info.network = None;
        assert!(vm_info_to_wire(&info, None).network_info.is_unset(), "no interfaces, no network info");
        info.config.network = vec![NetworkInterface {
            id: "eth0".into(),
            tap_device: "tap-given".into(),
            ipv6_config: Some(Ipv6Config { address: "fd00::9".into(), prefix_length: 64, gateway: "fd00::1".into(), ..Default::default() }),
            ..Default::default()
        }];
        let network = vm_info_to_wire(&info, None).network_info.into_option().unwrap();
        assert_eq!(
            (network.ip_address.as_str(), network.gateway.as_str(), network.tap_device.as_str()),
            ("fd00::9", "fd00::1", "tap-given")
        );
        assert_eq!(network.network_namespace, "");
        assert_eq!(network.interfaces.len(), 1);
    }

    #[test]
    fn metrics_carry_the_vmm_counters_and_the_callers_figures() {
        let metrics = VmmMetrics {
            cpu_time_ns: 5_000_000_000,
            resident_bytes: 140 << 20,
            devices: DeviceCounters {
                net_rx_bytes: 1,
                net_tx_bytes: 2,
                net_rx_packets: 3,
                net_tx_packets: 4,
                block_read_bytes: 5,
                block_write_bytes: 6,
                block_read_ops: 7,
                block_write_ops: 8,
            },
        };
        let wire_metrics = metrics_to_wire(&metrics, Duration::from_millis(90_999), 37.5);
        assert_eq!(wire_metrics.cpu_usage_percent, 37.5);
        assert_eq!(wire_metrics.memory_usage_bytes, 140 << 20);
        assert_eq!(wire_metrics.uptime_seconds, 90);
        let network = wire_metrics.network_stats.as_option().unwrap();
        assert_eq!(
            (network.bytes_received, network.bytes_transmitted, network.packets_received, network.packets_transmitted),
            (1, 2, 3, 4)
        );
        let storage = wire_metrics.storage_stats.as_option().unwrap();
        assert_eq!((storage.bytes_read, storage.bytes_written, storage.read_operations, storage.write_operations), (5, 6, 7, 8));
    }

    #[test]
    fn uptime_counts_from_the_last_boot() {
        assert_eq!(uptime(Some(at(1_000)), at(4_500)), Duration::from_millis(3_500));
        assert_eq!(uptime(None, at(4_500)), Duration::ZERO);
        assert_eq!(uptime(Some(at(5_000)), at(4_500)), Duration::ZERO, "a clock that went back");
    }

    #[test]
    fn a_list_entry_carries_the_summary_and_the_failure_reason() {
        let summary = metald_core::VmSummary {
            vm_id: VmId::new("vm-2").unwrap(),
            tenant: TenantId::new("acme").unwrap(),
            state: VmState::Paused,
            vcpus: 4,
            memory_bytes: 1 << 30,
            metadata: BTreeMap::from([("team".to_string(), "db".to_string())]),
            created_at: at(10),
            modified_at: at(20),
            failure: None,
        };
        let entry = vm_summary_to_wire(&summary);
        assert_eq!((entry.vm_id.as_str(), entry.customer_id.as_str()), ("vm-2", "acme"));
        assert_eq!(entry.state, wire::VmState::VM_STATE_PAUSED);
        assert_eq!((entry.vcpu_count, entry.memory_size_bytes), (4, 1 << 30));
        assert_eq!((entry.created_timestamp, entry.modified_timestamp), (10, 20));
        assert_eq!(entry.metadata["team"], "db");
        assert_eq!(entry.failure_reason, "");
        let failed = metald_core::VmSummary { state: VmState::Failed, failure: Some("it broke".into()), ..summary };
        assert_eq!(vm_summary_to_wire(&failed).failure_reason, "it broke");
    }
}
