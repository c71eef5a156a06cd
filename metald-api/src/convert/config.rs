//! [`VmConfig`] both ways. The core type mirrors the contract field for
//! field, so the only refusals here are numbers core cannot hold (negative
//! `int32`/`int64`) and enum values this build does not know. A message
//! field left unset on the wire becomes the core default (for `cpu`,
//! `memory`, `boot`, `console`) or `None` (for `topology`, the address
//! configs and the rate limits); core validation then says what is missing.

use std::collections::BTreeMap;

use buffa::{EnumValue, MessageField};
use metald_core::config::{
    BootConfig, ConsoleConfig, CpuConfig, CpuTopology, Ipv4Config, Ipv6Config, MemoryConfig, NetworkInterface, NetworkMode, RateLimit,
    RestartPolicy, StorageDevice, VmConfig,
};

use super::{WireError, non_negative_i32, non_negative_i64, saturating_i32, saturating_i64};
use crate::proto::vmprovisioner::v1 as wire;

/// A wire map as a core map (core keeps its maps sorted).
fn map_from_wire<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> BTreeMap<String, String> {
    map.into_iter().map(|(key, value)| (key.clone(), value.clone())).collect()
}

/// A core map as a wire map.
fn map_to_wire<M: FromIterator<(String, String)>>(map: &BTreeMap<String, String>) -> M {
    map.iter().map(|(key, value)| (key.clone(), value.clone())).collect()
}

/// The wire configuration as core's, or the first field core cannot hold.
/// Run [`VmConfig::validate`] on the result before using it.
pub fn config_from_wire(config: &wire::VmConfig) -> Result<VmConfig, WireError> {
    let storage = config.storage.iter().map(storage_from_wire).collect();
    let network = config
        .network
        .iter()
        .enumerate()
        .map(|(index, interface)| interface_from_wire(interface, &format!("network[{index}]")))
        .collect::<Result<_, _>>()?;
    Ok(VmConfig {
        cpu: config.cpu.as_option().map(cpu_from_wire).transpose()?.unwrap_or_default(),
        memory: config.memory.as_option().map(memory_from_wire).transpose()?.unwrap_or_default(),
        boot: config.boot.as_option().map(boot_from_wire).unwrap_or_default(),
        storage,
        network,
        console: config.console.as_option().map(console_from_wire).unwrap_or_default(),
        metadata: map_from_wire(&config.metadata),
        restart: match config.restart_policy.as_option() {
            Some(policy) => RestartPolicy {
                on_failure: policy.on_failure,
                max_restarts: non_negative_i32("restart_policy.max_restarts", policy.max_restarts)?,
            },
            None => RestartPolicy::default(),
        },
        vmm: config.vmm.clone(),
    })
}

fn cpu_from_wire(cpu: &wire::CpuConfig) -> Result<CpuConfig, WireError> {
    let topology = match cpu.topology.as_option() {
        Some(topology) => Some(CpuTopology {
            sockets: non_negative_i32("cpu.topology.sockets", topology.sockets)?,
            cores_per_socket: non_negative_i32("cpu.topology.cores_per_socket", topology.cores_per_socket)?,
            threads_per_core: non_negative_i32("cpu.topology.threads_per_core", topology.threads_per_core)?,
        }),
        None => None,
    };
    Ok(CpuConfig {
        vcpu_count: non_negative_i32("cpu.vcpu_count", cpu.vcpu_count)?,
        max_vcpu_count: non_negative_i32("cpu.max_vcpu_count", cpu.max_vcpu_count)?,
        topology,
        features: map_from_wire(&cpu.features),
    })
}

fn memory_from_wire(memory: &wire::MemoryConfig) -> Result<MemoryConfig, WireError> {
    Ok(MemoryConfig {
        size_bytes: non_negative_i64("memory.size_bytes", memory.size_bytes)?,
        hotplug_enabled: memory.hotplug_enabled,
        max_size_bytes: non_negative_i64("memory.max_size_bytes", memory.max_size_bytes)?,
        backing: map_from_wire(&memory.backing),
    })
}

fn boot_from_wire(boot: &wire::BootConfig) -> BootConfig {
    BootConfig {
        kernel_path: boot.kernel_path.clone(),
        initrd_path: boot.initrd_path.clone(),
        kernel_args: boot.kernel_args.clone(),
        boot_options: map_from_wire(&boot.boot_options),
    }
}

/// Drives hold no numbers or enums: nothing in them can be refused here.
fn storage_from_wire(drive: &wire::StorageDevice) -> StorageDevice {
    StorageDevice {
        id: drive.id.clone(),
        path: drive.path.clone(),
        read_only: drive.read_only,
        is_root_device: drive.is_root_device,
        interface_type: drive.interface_type.clone(),
        options: map_from_wire(&drive.options),
    }
}

/// `field` is the interface's path, e.g. `network[0]`.
fn interface_from_wire(interface: &wire::NetworkInterface, field: &str) -> Result<NetworkInterface, WireError> {
    let ipv6_config = match interface.ipv6_config.as_option() {
        Some(ipv6) => Some(Ipv6Config {
            address: ipv6.address.clone(),
            prefix_length: non_negative_i32(&format!("{field}.ipv6_config.prefix_length"), ipv6.prefix_length)?,
            gateway: ipv6.gateway.clone(),
            dns_servers: ipv6.dns_servers.clone(),
            slaac: ipv6.slaac,
            privacy_extensions: ipv6.privacy_extensions,
            link_local: ipv6.link_local.clone(),
        }),
        None => None,
    };
    let rx_rate_limit =
        interface.rx_rate_limit.as_option().map(|limit| rate_limit_from_wire(limit, &format!("{field}.rx_rate_limit"))).transpose()?;
    let tx_rate_limit =
        interface.tx_rate_limit.as_option().map(|limit| rate_limit_from_wire(limit, &format!("{field}.tx_rate_limit"))).transpose()?;
    Ok(NetworkInterface {
        id: interface.id.clone(),
        mac_address: interface.mac_address.clone(),
        tap_device: interface.tap_device.clone(),
        interface_type: interface.interface_type.clone(),
        options: map_from_wire(&interface.options),
        ipv4_config: interface.ipv4_config.as_option().map(ipv4_from_wire),
        ipv6_config,
        mode: network_mode_from_wire(interface.mode, &format!("{field}.mode"))?,
        rx_rate_limit,
        tx_rate_limit,
    })
}

fn ipv4_from_wire(ipv4: &wire::IPv4Config) -> Ipv4Config {
    Ipv4Config {
        address: ipv4.address.clone(),
        netmask: ipv4.netmask.clone(),
        gateway: ipv4.gateway.clone(),
        dns_servers: ipv4.dns_servers.clone(),
        dhcp: ipv4.dhcp,
    }
}

/// `field` is the limit's path, e.g. `network[0].rx_rate_limit`.
fn rate_limit_from_wire(limit: &wire::RateLimit, field: &str) -> Result<RateLimit, WireError> {
    Ok(RateLimit {
        bandwidth: non_negative_i64(&format!("{field}.bandwidth"), limit.bandwidth)?,
        refill_time_ms: non_negative_i64(&format!("{field}.refill_time"), limit.refill_time)?,
        burst: non_negative_i64(&format!("{field}.burst"), limit.burst)?,
    })
}

fn network_mode_from_wire(mode: EnumValue<wire::NetworkMode>, field: &str) -> Result<NetworkMode, WireError> {
    match mode {
        EnumValue::Known(wire::NetworkMode::NETWORK_MODE_UNSPECIFIED) => Ok(NetworkMode::Unspecified),
        EnumValue::Known(wire::NetworkMode::NETWORK_MODE_DUAL_STACK) => Ok(NetworkMode::DualStack),
        EnumValue::Known(wire::NetworkMode::NETWORK_MODE_IPV4_ONLY) => Ok(NetworkMode::Ipv4Only),
        EnumValue::Known(wire::NetworkMode::NETWORK_MODE_IPV6_ONLY) => Ok(NetworkMode::Ipv6Only),
        EnumValue::Unknown(value) => Err(WireError::UnknownEnumValue { field: field.to_owned(), enum_name: "NetworkMode", value }),
    }
}

fn network_mode_to_wire(mode: NetworkMode) -> wire::NetworkMode {
    match mode {
        NetworkMode::Unspecified => wire::NetworkMode::NETWORK_MODE_UNSPECIFIED,
        NetworkMode::DualStack => wire::NetworkMode::NETWORK_MODE_DUAL_STACK,
        NetworkMode::Ipv4Only => wire::NetworkMode::NETWORK_MODE_IPV4_ONLY,
        NetworkMode::Ipv6Only => wire::NetworkMode::NETWORK_MODE_IPV6_ONLY,
    }
}

/// Core's configuration as it goes on the wire (in `GetVmInfoResponse`).
/// The sections core always has (`cpu`, `memory`, `boot`, `console`) are
/// always set.
pub fn config_to_wire(config: &VmConfig) -> wire::VmConfig {
    wire::VmConfig {
        cpu: MessageField::some(cpu_to_wire(&config.cpu)),
        memory: MessageField::some(memory_to_wire(&config.memory)),
        boot: MessageField::some(boot_to_wire(&config.boot)),
        storage: config.storage.iter().map(storage_to_wire).collect(),
        network: config.network.iter().map(interface_to_wire).collect(),
        console: MessageField::some(console_to_wire(&config.console)),
        metadata: map_to_wire(&config.metadata),
        restart_policy: match config.restart {
            policy if policy == RestartPolicy::default() => MessageField::none(),
            policy => MessageField::some(wire::RestartPolicy {
                on_failure: policy.on_failure,
                max_restarts: saturating_i32(policy.max_restarts),
                ..Default::default()
            }),
        },
        vmm: config.vmm.clone(),
        ..Default::default()
    }
}

fn cpu_to_wire(cpu: &CpuConfig) -> wire::CpuConfig {
    let topology = cpu.topology.as_ref().map(|topology| wire::CpuTopology {
        sockets: saturating_i32(topology.sockets),
        cores_per_socket: saturating_i32(topology.cores_per_socket),
        threads_per_core: saturating_i32(topology.threads_per_core),
        ..Default::default()
    });
    wire::CpuConfig {
        vcpu_count: saturating_i32(cpu.vcpu_count),
        max_vcpu_count: saturating_i32(cpu.max_vcpu_count),
        topology: topology.map_or_else(MessageField::none, MessageField::some),
        features: map_to_wire(&cpu.features),
        ..Default::default()
    }
}

fn memory_to_wire(memory: &MemoryConfig) -> wire::MemoryConfig {
    wire::MemoryConfig {
        size_bytes: saturating_i64(memory.size_bytes),
        hotplug_enabled: memory.hotplug_enabled,
        max_size_bytes: saturating_i64(memory.max_size_bytes),
        backing: map_to_wire(&memory.backing),
        ..Default::default()
    }
}

fn boot_to_wire(boot: &BootConfig) -> wire::BootConfig {
    wire::BootConfig {
        kernel_path: boot.kernel_path.clone(),
        initrd_path: boot.initrd_path.clone(),
        kernel_args: boot.kernel_args.clone(),
        boot_options: map_to_wire(&boot.boot_options),
        ..Default::default()
    }
}

fn storage_to_wire(drive: &StorageDevice) -> wire::StorageDevice {
    wire::StorageDevice {
        id: drive.id.clone(),
        path: drive.path.clone(),
        read_only: drive.read_only,
        is_root_device: drive.is_root_device,
        interface_type: drive.interface_type.clone(),
        options: map_to_wire(&drive.options),
        ..Default::default()
    }
}

fn interface_to_wire(interface: &NetworkInterface) -> wire::NetworkInterface {
    let ipv4 = interface.ipv4_config.as_ref().map(|ipv4| wire::IPv4Config {
        address: ipv4.address.clone(),
        netmask: ipv4.netmask.clone(),
        gateway: ipv4.gateway.clone(),
        dns_servers: ipv4.dns_servers.clone(),
        dhcp: ipv4.dhcp,
        ..Default::default()
    });
    let ipv6 = interface.ipv6_config.as_ref().map(|ipv6| wire::IPv6Config {
        address: ipv6.address.clone(),
        prefix_length: saturating_i32(ipv6.prefix_length),
        gateway: ipv6.gateway.clone(),
        dns_servers: ipv6.dns_servers.clone(),
        slaac: ipv6.slaac,
        privacy_extensions: ipv6.privacy_extensions,
        link_local: ipv6.link_local.clone(),
        ..Default::default()
    });
    wire::NetworkInterface {
        id: interface.id.clone(),
        mac_address: interface.mac_address.clone(),
        tap_device: interface.tap_device.clone(),
        interface_type: interface.interface_type.clone(),
        options: map_to_wire(&interface.options),
        ipv4_config: ipv4.map_or_else(MessageField::none, MessageField::some),
        ipv6_config: ipv6.map_or_else(MessageField::none, MessageField::some),
        mode: network_mode_to_wire(interface.mode).into(),
        rx_rate_limit: interface
            .rx_rate_limit
            .as_ref()
            .map_or_else(MessageField::none, |limit| MessageField::some(rate_limit_to_wire(limit))),
        tx_rate_limit: interface
            .tx_rate_limit
            .as_ref()
            .map_or_else(MessageField::none, |limit| MessageField::some(rate_limit_to_wire(limit))),
        ..Default::default()
    }
}

fn rate_limit_to_wire(limit: &RateLimit) -> wire::RateLimit {
    wire::RateLimit {
        bandwidth: saturating_i64(limit.bandwidth),
        refill_time: saturating_i64(limit.refill_time_ms),
        burst: saturating_i64(limit.burst),
        ..Default::default()
    }
}

fn console_from_wire(console: &wire::ConsoleConfig) -> ConsoleConfig {
    ConsoleConfig {
        enabled: console.enabled,
        output: console.output.clone(),
        input: console.input.clone(),
        console_type: console.console_type.clone(),
    }
}

fn console_to_wire(console: &ConsoleConfig) -> wire::ConsoleConfig {
    wire::ConsoleConfig {
        enabled: console.enabled,
        output: console.output.clone(),
        input: console.input.clone(),
        console_type: console.console_type.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use buffa::EnumValue;
    use metald_core::config::MIB;

    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    /// A configuration with every field set to something other than its default.
    fn every_field_set() -> VmConfig {
        VmConfig {
            cpu: CpuConfig {
                vcpu_count: 2,
                max_vcpu_count: 4,
                topology: Some(CpuTopology { sockets: 1, cores_per_socket: 2, threads_per_core: 2 }),
                features: map(&[("smt", "true")]),
            },
            memory: MemoryConfig {
                size_bytes: 256 * MIB,
                hotplug_enabled: true,
                max_size_bytes: 512 * MIB,
                backing: map(&[("huge_pages", "2M")]),
            },
            boot: BootConfig {
                kernel_path: "kernels/vmlinux".into(),
                initrd_path: "initrd.img".into(),
                kernel_args: "console=ttyS0 quiet".into(),
                boot_options: map(&[("firmware", "none")]),
            },
            storage: vec![
                StorageDevice {
                    id: "root".into(),
                    path: "root.ext4".into(),
                    read_only: false,
                    is_root_device: true,
                    interface_type: "virtio-blk".into(),
                    options: map(&[("io_engine", "Async"), ("cache_type", "Writeback")]),
                },
                StorageDevice {
                    id: "data".into(),
                    path: "data.ext4".into(),
                    read_only: true,
                    is_root_device: false,
                    interface_type: String::new(),
                    options: map(&[("cache_type", "Unsafe")]),
                },
            ],
            network: vec![
                NetworkInterface {
                    id: "eth0".into(),
                    mac_address: "02:00:00:00:00:01".into(),
                    tap_device: "tap0".into(),
                    interface_type: "virtio-net".into(),
                    options: map(&[("mtu", "1500")]),
                    ipv4_config: Some(Ipv4Config {
                        address: "10.0.0.2".into(),
                        netmask: "255.255.255.0".into(),
                        gateway: "10.0.0.1".into(),
                        dns_servers: vec!["10.0.0.53".into(), "10.0.1.53".into()],
                        dhcp: true,
                    }),
                    ipv6_config: Some(Ipv6Config {
                        address: "fd00::2".into(),
                        prefix_length: 64,
                        gateway: "fd00::1".into(),
                        dns_servers: vec!["fd00::53".into()],
                        slaac: true,
                        privacy_extensions: true,
                        link_local: "fe80::2".into(),
                    }),
                    mode: NetworkMode::DualStack,
                    rx_rate_limit: Some(RateLimit { bandwidth: 1_000_000, refill_time_ms: 100, burst: 64_000 }),
                    tx_rate_limit: Some(RateLimit { bandwidth: 2_000_000, refill_time_ms: 200, burst: 128_000 }),
                },
                NetworkInterface {
                    id: "eth1".into(),
                    mac_address: "02:00:00:00:00:02".into(),
                    tap_device: "tap1".into(),
                    interface_type: String::new(),
                    options: BTreeMap::new(),
                    ipv4_config: None,
                    ipv6_config: Some(Ipv6Config { address: "fd01::2".into(), prefix_length: 48, ..Default::default() }),
                    mode: NetworkMode::Ipv6Only,
                    rx_rate_limit: None,
                    tx_rate_limit: Some(RateLimit { bandwidth: 5, refill_time_ms: 6, burst: 7 }),
                },
            ],
            console: ConsoleConfig { enabled: true, output: "out".into(), input: "in".into(), console_type: "serial".into() },
            metadata: map(&[("team", "storage"), ("purpose", "ci")]),
            restart: RestartPolicy { on_failure: true, max_restarts: 7 },
            vmm: "firecracker".into(),
        }
    }

    /// `change` applied to the wire form of a complete configuration must be refused at `field`.
    fn refused_at(change: impl FnOnce(&mut wire::VmConfig)) -> WireError {
        let mut config = config_to_wire(&every_field_set());
        change(&mut config);
        config_from_wire(&config).expect_err("the change must be refused")
    }

    fn cpu(config: &mut wire::VmConfig) -> &mut wire::CpuConfig {
        config.cpu.as_option_mut().unwrap()
    }

    fn interface(config: &mut wire::VmConfig, index: usize) -> &mut wire::NetworkInterface {
        &mut config.network[index]
    }

    #[test]
    fn a_configuration_with_every_field_set_survives_the_wire() {
        let config = every_field_set();
        assert_eq!(config_from_wire(&config_to_wire(&config)), Ok(config));
    }

    #[test]
    fn the_default_configuration_survives_the_wire() {
        assert_eq!(config_from_wire(&config_to_wire(&VmConfig::default())), Ok(VmConfig::default()));
    }

    #[test]
    fn unset_sections_become_core_defaults_and_core_validation_names_what_is_missing() {
        let config = config_from_wire(&wire::VmConfig::default()).unwrap();
        assert_eq!(config, VmConfig::default());
        assert_eq!(config.validate().unwrap_err().field, "cpu.vcpu_count");
    }

    #[test]
    fn negative_cpu_numbers_are_refused_with_their_path() {
        let error = refused_at(|c| cpu(c).vcpu_count = -1);
        assert_eq!(error, WireError::Negative { field: "cpu.vcpu_count".into(), value: -1 });
        assert_eq!(error.to_string(), "cpu.vcpu_count: -1 is negative; no negative value is allowed here");
        assert_eq!(refused_at(|c| cpu(c).max_vcpu_count = -2).field(), "cpu.max_vcpu_count");
        assert_eq!(refused_at(|c| cpu(c).topology.as_option_mut().unwrap().sockets = -1).field(), "cpu.topology.sockets");
        assert_eq!(refused_at(|c| cpu(c).topology.as_option_mut().unwrap().cores_per_socket = -1).field(), "cpu.topology.cores_per_socket");
        assert_eq!(refused_at(|c| cpu(c).topology.as_option_mut().unwrap().threads_per_core = -1).field(), "cpu.topology.threads_per_core");
    }

    #[test]
    fn negative_memory_sizes_are_refused_with_their_path() {
        let error = refused_at(|c| c.memory.as_option_mut().unwrap().size_bytes = -(1 << 30));
        assert_eq!(error, WireError::Negative { field: "memory.size_bytes".into(), value: -(1 << 30) });
        assert_eq!(refused_at(|c| c.memory.as_option_mut().unwrap().max_size_bytes = i64::MIN).field(), "memory.max_size_bytes");
    }

    #[test]
    fn negative_network_numbers_are_refused_with_the_interface_index() {
        assert_eq!(
            refused_at(|c| interface(c, 1).ipv6_config.as_option_mut().unwrap().prefix_length = -64).field(),
            "network[1].ipv6_config.prefix_length"
        );
        let error = refused_at(|c| interface(c, 0).rx_rate_limit.as_option_mut().unwrap().bandwidth = -1);
        assert_eq!(error.field(), "network[0].rx_rate_limit.bandwidth");
        assert_eq!(error.to_string(), "network[0].rx_rate_limit.bandwidth: -1 is negative; no negative value is allowed here");
        assert_eq!(
            refused_at(|c| interface(c, 1).tx_rate_limit.as_option_mut().unwrap().refill_time = -1).field(),
            "network[1].tx_rate_limit.refill_time"
        );
        assert_eq!(
            refused_at(|c| interface(c, 0).tx_rate_limit.as_option_mut().unwrap().burst = -1).field(),
            "network[0].tx_rate_limit.burst"
        );
    }

    #[test]
    fn an_unknown_network_mode_is_refused_with_its_path() {
        let error = refused_at(|c| interface(c, 1).mode = EnumValue::Unknown(9));
        assert_eq!(error, WireError::UnknownEnumValue { field: "network[1].mode".into(), enum_name: "NetworkMode", value: 9 });
        assert_eq!(error.to_string(), "network[1].mode: 9 is not a NetworkMode value this server knows");
    }

    #[test]
    fn every_network_mode_maps_to_its_core_mode() {
        let modes = [
            (wire::NetworkMode::NETWORK_MODE_UNSPECIFIED, NetworkMode::Unspecified),
            (wire::NetworkMode::NETWORK_MODE_DUAL_STACK, NetworkMode::DualStack),
            (wire::NetworkMode::NETWORK_MODE_IPV4_ONLY, NetworkMode::Ipv4Only),
            (wire::NetworkMode::NETWORK_MODE_IPV6_ONLY, NetworkMode::Ipv6Only),
        ];
        for (wire_mode, mode) in modes {
            assert_eq!(network_mode_from_wire(wire_mode.into(), "mode"), Ok(mode));
            assert_eq!(network_mode_to_wire(mode), wire_mode);
        }
    }

    /// A configuration core validation accepts.
    fn valid() -> VmConfig {
        let mut config = every_field_set();
        config.boot.boot_options.clear();
        config.network.iter_mut().for_each(|interface| interface.options.clear());
        config.network[1].tx_rate_limit = config.network[1].rx_rate_limit.clone();
        config.console.output.clear();
        config.console.input.clear();
        config.validate().expect("the base configuration is valid");
        config
    }

    #[test]
    fn what_core_can_hold_but_a_vm_must_not_be_is_left_to_core_validation() {
        let mut config = config_to_wire(&valid());
        config.storage[1].path.clear();
        let converted = config_from_wire(&config).expect("an empty path is a valid string");
        assert_eq!(converted.validate().unwrap_err().field, "storage[1].path");

        let mut config = config_to_wire(&valid());
        cpu(&mut config).vcpu_count = 0;
        assert_eq!(config_from_wire(&config).unwrap().validate().unwrap_err().field, "cpu.vcpu_count");
    }
}
