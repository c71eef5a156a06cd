//! The `info` view: one VM as key/value rows, grouped as the host reports
//! it (identity and state, configuration, network, live metrics, what the
//! VMM says about itself, labels). Rows for fields the host left empty are
//! left out.

use metald_api::proto::vmprovisioner::v1::{GetVmInfoResponse, VmConfig, VmMetrics, VmNetworkInfo};

use super::values::{format_age, format_bytes, format_count, format_duration, format_time, state_name};
use super::{plain_table, render};

/// The VM as a two-column table; `now_ms` dates the relative times.
pub fn info_table(info: &GetVmInfoResponse, now_ms: i64) -> String {
    let mut table = plain_table();
    for (key, value) in info_rows(info, now_ms) {
        table.add_row([key, value]);
    }
    render(&mut table)
}

type Rows = Vec<(String, String)>;

fn info_rows(info: &GetVmInfoResponse, now_ms: i64) -> Rows {
    let mut rows = Rows::new();
    push(&mut rows, "vm id", &info.vm_id);
    push(&mut rows, "state", &state_name(info.state));
    push(&mut rows, "failure", &info.failure_reason);
    push(&mut rows, "last exit", &info.last_exit);
    push(&mut rows, "customer", &info.customer_id);
    push_time(&mut rows, "created", info.created_timestamp, now_ms);
    push_time(&mut rows, "modified", info.modified_timestamp, now_ms);
    push_time(&mut rows, "booted", info.booted_timestamp, now_ms);
    if let Some(config) = info.config.as_option() {
        config_rows(&mut rows, config);
    }
    if let Some(network) = info.network_info.as_option() {
        network_rows(&mut rows, network);
    }
    if let Some(metrics) = info.metrics.as_option() {
        metrics_rows(&mut rows, metrics);
    }
    for (key, value) in sorted(&info.backend_info) {
        push(&mut rows, &format!("backend {key}"), value);
    }
    if let Some(config) = info.config.as_option() {
        for (key, value) in sorted(&config.metadata) {
            push(&mut rows, &format!("metadata {key}"), value);
        }
    }
    rows
}

fn config_rows(rows: &mut Rows, config: &VmConfig) {
    if let Some(cpu) = config.cpu.as_option() {
        let mut vcpus = cpu.vcpu_count.to_string();
        if cpu.max_vcpu_count > cpu.vcpu_count {
            vcpus.push_str(&format!(" (up to {})", cpu.max_vcpu_count));
        }
        push(rows, "vcpus", &vcpus);
    }
    if let Some(memory) = config.memory.as_option() {
        let mut size = format_bytes(memory.size_bytes);
        if memory.max_size_bytes > memory.size_bytes {
            size.push_str(&format!(" (up to {})", format_bytes(memory.max_size_bytes)));
        }
        push(rows, "memory", &size);
    }
    if let Some(boot) = config.boot.as_option() {
        push(rows, "kernel", &boot.kernel_path);
        push(rows, "initrd", &boot.initrd_path);
        push(rows, "cmdline", &boot.kernel_args);
    }
    for disk in &config.storage {
        let mut flags = Vec::new();
        if disk.is_root_device {
            flags.push("root");
        }
        if disk.read_only {
            flags.push("read-only");
        }
        let value = if flags.is_empty() { disk.path.clone() } else { format!("{} ({})", disk.path, flags.join(", ")) };
        push(rows, &format!("disk {}", disk.id), &value);
    }
    if let Some(restart) = config.restart_policy.as_option().filter(|restart| restart.on_failure) {
        let most = if restart.max_restarts == 0 { "the host's default".to_owned() } else { restart.max_restarts.to_string() };
        push(rows, "restart", &format!("on failure, at most {most} in a row"));
    }
}

fn network_rows(rows: &mut Rows, network: &VmNetworkInfo) {
    if network.interfaces.is_empty() {
        // A host that reports only the original contract's fields.
        let address = if network.ipv6_address.is_empty() { &network.ip_address } else { &network.ipv6_address };
        push(rows, "ipv6", address);
        push(rows, "ipv4", &network.ipv4_address);
        push(rows, "mac", &network.mac_address);
        push(rows, "tap", &network.tap_device);
    }
    for interface in &network.interfaces {
        let parts = [
            ("ipv6", &interface.ipv6_address),
            ("ipv4", &interface.ipv4_address),
            ("mac", &interface.mac_address),
            ("tap", &interface.tap_device),
        ];
        let value = parts
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| format!("{name} {value}"))
            .collect::<Vec<_>>()
            .join(", ");
        push(rows, &format!("interface {}", interface.id), &value);
    }
    let ipv6_gateway = if network.ipv6_gateway.is_empty() { &network.gateway } else { &network.ipv6_gateway };
    push(rows, "ipv6 gateway", ipv6_gateway);
    push(rows, "ipv4 gateway", &network.ipv4_gateway);
    push(rows, "dns", &network.dns_servers.join(", "));
    push(rows, "netns", &network.network_namespace);
}

fn metrics_rows(rows: &mut Rows, metrics: &VmMetrics) {
    push(rows, "cpu", &format!("{:.1}%", metrics.cpu_usage_percent));
    push(rows, "memory used", &format_bytes(metrics.memory_usage_bytes));
    if let Some(net) = metrics.network_stats.as_option() {
        let traffic = |bytes: i64, packets: i64| format!("{} ({} packets)", format_bytes(bytes), format_count(packets));
        push(rows, "net rx", &traffic(net.bytes_received, net.packets_received));
        push(rows, "net tx", &traffic(net.bytes_transmitted, net.packets_transmitted));
    }
    if let Some(block) = metrics.storage_stats.as_option() {
        let io = |bytes: i64, operations: i64| format!("{} ({} ops)", format_bytes(bytes), format_count(operations));
        push(rows, "block read", &io(block.bytes_read, block.read_operations));
        push(rows, "block written", &io(block.bytes_written, block.write_operations));
    }
    if metrics.uptime_seconds > 0 {
        push(rows, "uptime", &format_duration(metrics.uptime_seconds));
    }
}

fn push(rows: &mut Rows, key: &str, value: &str) {
    let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
    if !value.is_empty() {
        rows.push((key.to_owned(), value));
    }
}

fn push_time(rows: &mut Rows, key: &str, unix_ms: i64, now_ms: i64) {
    if unix_ms != 0 {
        push(rows, key, &format!("{} ({})", format_time(unix_ms), format_age(unix_ms, now_ms)));
    }
}

fn sorted<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> Vec<(&'a String, &'a String)> {
    let mut entries: Vec<_> = map.into_iter().collect();
    entries.sort();
    entries
}

#[cfg(test)]
mod tests {
    use buffa::MessageField;
    use metald_api::proto::vmprovisioner::v1::{
        BootConfig, CpuConfig, MemoryConfig, NetworkStats, StorageDevice, StorageStats, VmInterfaceInfo, VmState,
    };

    use super::*;

    const NOW: i64 = 1_714_564_800_000;

    fn running_vm() -> GetVmInfoResponse {
        GetVmInfoResponse {
            vm_id: "vm-1".into(),
            state: VmState::VM_STATE_RUNNING.into(),
            customer_id: "acme".into(),
            created_timestamp: NOW - 2 * 3_600_000,
            booted_timestamp: NOW - 60_000,
            config: MessageField::some(VmConfig {
                cpu: MessageField::some(CpuConfig { vcpu_count: 2, ..Default::default() }),
                memory: MessageField::some(MemoryConfig { size_bytes: 512 << 20, ..Default::default() }),
                boot: MessageField::some(BootConfig {
                    kernel_path: "vmlinux".into(),
                    kernel_args: "console=ttyS0".into(),
                    ..Default::default()
                }),
                storage: vec![StorageDevice { id: "disk0".into(), path: "rootfs.ext4".into(), is_root_device: true, ..Default::default() }],
                metadata: [("team".to_owned(), "infra".to_owned())].into_iter().collect(),
                ..Default::default()
            }),
            network_info: MessageField::some(VmNetworkInfo {
                ipv6_gateway: "fd00::1".into(),
                ipv4_gateway: "10.0.0.1".into(),
                network_namespace: "vm-1".into(),
                interfaces: vec![VmInterfaceInfo {
                    id: "eth0".into(),
                    mac_address: "02:00:00:00:00:01".into(),
                    tap_device: "tap0".into(),
                    ipv6_address: "fd00::2".into(),
                    ipv4_address: "10.0.0.2".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            metrics: MessageField::some(VmMetrics {
                cpu_usage_percent: 12.5,
                memory_usage_bytes: 300 << 20,
                network_stats: MessageField::some(NetworkStats { bytes_received: 2048, packets_received: 1500, ..Default::default() }),
                storage_stats: MessageField::some(StorageStats { bytes_read: 10 << 20, read_operations: 42, ..Default::default() }),
                uptime_seconds: 60,
                ..Default::default()
            }),
            backend_info: [("vmm".to_owned(), "firecracker".to_owned())].into_iter().collect(),
            ..Default::default()
        }
    }

    fn value<'a>(rows: &'a Rows, key: &str) -> Option<&'a str> {
        rows.iter().find(|(name, _)| name == key).map(|(_, value)| value.as_str())
    }

    #[test]
    fn a_running_vm_shows_its_configuration_network_and_metrics() {
        let rows = info_rows(&running_vm(), NOW);
        assert_eq!(value(&rows, "state"), Some("running"));
        assert_eq!(value(&rows, "created"), Some("2024-05-01T10:00:00Z (2h ago)"));
        assert_eq!(value(&rows, "memory"), Some("512 MiB"));
        assert_eq!(value(&rows, "disk disk0"), Some("rootfs.ext4 (root)"));
        assert_eq!(value(&rows, "interface eth0"), Some("ipv6 fd00::2, ipv4 10.0.0.2, mac 02:00:00:00:00:01, tap tap0"));
        assert_eq!(value(&rows, "ipv4 gateway"), Some("10.0.0.1"));
        assert_eq!(value(&rows, "cpu"), Some("12.5%"));
        assert_eq!(value(&rows, "net rx"), Some("2 KiB (1,500 packets)"));
        assert_eq!(value(&rows, "block read"), Some("10 MiB (42 ops)"));
        assert_eq!(value(&rows, "uptime"), Some("1m 0s"));
        assert_eq!(value(&rows, "backend vmm"), Some("firecracker"));
        assert_eq!(value(&rows, "metadata team"), Some("infra"));
        assert_eq!(value(&rows, "failure"), None);
    }

    #[test]
    fn a_failed_vm_leads_with_why() {
        let info = GetVmInfoResponse {
            vm_id: "vm-2".into(),
            state: VmState::VM_STATE_FAILED.into(),
            failure_reason: "the VMM died".into(),
            last_exit: "was killed by signal 9 (SIGKILL)".into(),
            ..Default::default()
        };
        let table = info_table(&info, NOW);
        assert_eq!(table, "vm id      vm-2\nstate      failed\nfailure    the VMM died\nlast exit  was killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn a_host_without_interface_details_shows_the_first_interface() {
        let info = GetVmInfoResponse {
            vm_id: "vm-3".into(),
            network_info: MessageField::some(VmNetworkInfo {
                ip_address: "fd00::3".into(),
                mac_address: "02:00:00:00:00:03".into(),
                tap_device: "tap3".into(),
                gateway: "fd00::1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let rows = info_rows(&info, NOW);
        assert_eq!(value(&rows, "ipv6"), Some("fd00::3"));
        assert_eq!(value(&rows, "tap"), Some("tap3"));
        assert_eq!(value(&rows, "ipv6 gateway"), Some("fd00::1"));
    }
}
