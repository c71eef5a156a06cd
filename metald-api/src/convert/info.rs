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
        backend_info: info.vmm.as_ref().map(backend_info).unwrap_or_default().into_iter().collect(),
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

/// One entry of `ListVms`. The core summary does not carry why a VM
/// failed, so the caller passes it (`None` when the VM is not Failed or
/// the reason is not at hand).
pub fn vm_summary_to_wire(summary: &metald_core::VmSummary, failure_reason: Option<&str>) -> wire::VmInfo {
    wire::VmInfo {
        vm_id: summary.vm_id.to_string(),
        state: state_to_wire(summary.state).into(),
        vcpu_count: saturating_i32(summary.vcpus),
        memory_size_bytes: saturating_i64(summary.memory_bytes),
        created_timestamp: unix_ms(summary.created_at),
        modified_timestamp: unix_ms(summary.modified_at),
        metadata: summary.metadata.iter().map(|(key, value)| (key.clone(), value.clone())).collect(),
        customer_id: summary.tenant.to_string(),
        failure_reason: failure_reason.unwrap_or_default().to_owned(),
        ..Default::default()
    }
}

/// What the VMM says about itself, for `backend_info`: `vmm`,
/// `vmm_version`, `vmm_state`, `pid` when one runs, and every entry of
/// [`VmmInfo::extra`]. The API socket's path and the launch timings stay
/// on the host.
pub fn backend_info(vmm: &VmmInfo) -> BTreeMap<String, String> {
    let mut info = vmm.extra.clone();
    info.insert("vmm".into(), vmm.vmm.clone());
    info.insert("vmm_version".into(), vmm.vmm_version.clone());
    info.insert("vmm_state".into(), vmm.vmm_state.clone());
    if let Some(pid) = vmm.pid {
        info.insert("pid".into(), pid.to_string());
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
