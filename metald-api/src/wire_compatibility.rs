//! Messages written byte by byte with the contract's field numbers, so a
//! renumbered or retyped field fails here even when both ends of a test
//! would agree with each other.

use buffa::{EnumValue, Message};
use metald_core::TenantId;
use metald_core::config::{NetworkMode, RateLimit};

use crate::convert::request::create_vm_from_wire;
use crate::proto::vmprovisioner::v1 as wire;

fn varint(mut value: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(low);
            return bytes;
        }
        bytes.push(low | 0x80);
    }
}

/// A varint field (wire type 0): int32, int64, bool, enum.
fn number(field: u64, value: i64) -> Vec<u8> {
    let mut bytes = varint(field << 3);
    bytes.extend(varint(value as u64));
    bytes
}

/// A length-delimited field (wire type 2): string, bytes, message, packed list.
fn delimited(field: u64, content: &[u8]) -> Vec<u8> {
    let mut bytes = varint((field << 3) | 2);
    bytes.extend(varint(content.len() as u64));
    bytes.extend(content);
    bytes
}

fn message(fields: &[Vec<u8>]) -> Vec<u8> {
    fields.concat()
}

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

/// `CreateVmRequest { vm_id = 1, config = 2, customer_id = 3 }` with the
/// configuration's numbers down to the rate limits (10 and 11, after the
/// gap at 9).
fn create_vm_request(vcpu_count: i64) -> Vec<u8> {
    let cpu = message(&[number(1, vcpu_count), number(2, 4), delimited(3, &message(&[number(1, 1), number(2, 2), number(3, 2)]))]);
    let memory = message(&[number(1, 256 << 20), number(2, 1), number(3, 512 << 20)]);
    let boot = message(&[delimited(1, b"vmlinux"), delimited(2, b"initrd"), delimited(3, b"console=ttyS0")]);
    let drive = message(&[delimited(1, b"root"), delimited(2, b"root.img"), number(3, 1), number(4, 1), delimited(5, b"virtio-blk")]);
    let ipv6 = message(&[delimited(1, b"fd00::2"), number(2, 64), delimited(3, b"fd00::1"), delimited(4, b"fd00::53"), number(5, 1)]);
    let ipv4 = message(&[delimited(1, b"10.0.0.2"), delimited(2, b"255.255.255.0"), delimited(3, b"10.0.0.1"), number(5, 1)]);
    let interface = message(&[
        delimited(1, b"eth0"),
        delimited(2, b"02:00:00:00:00:01"),
        delimited(3, b"tap0"),
        delimited(4, b"virtio-net"),
        delimited(6, &ipv4),
        delimited(7, &ipv6),
        number(8, 3),
        delimited(10, &message(&[number(1, 1_000_000), number(2, 100), number(3, 4096)])),
        delimited(11, &message(&[number(1, 2_000_000), number(2, 200), number(3, 8192)])),
    ]);
    let console = message(&[number(1, 1), delimited(4, b"serial")]);
    let metadata_entry = message(&[delimited(1, b"team"), delimited(2, b"storage")]);
    let config = message(&[
        delimited(1, &cpu),
        delimited(2, &memory),
        delimited(3, &boot),
        delimited(4, &drive),
        delimited(5, &interface),
        delimited(6, &console),
        delimited(7, &metadata_entry),
    ]);
    message(&[delimited(1, b"vm-1"), delimited(2, &config), delimited(3, b"acme")])
}

#[test]
fn a_create_request_encoded_by_hand_decodes_into_the_core_request() {
    let request = wire::CreateVmRequest::decode_from_slice(&create_vm_request(2)).unwrap();
    assert_eq!((request.vm_id.as_str(), request.customer_id.as_str()), ("vm-1", "acme"));
    let create = create_vm_from_wire(&request, acme()).unwrap();
    let config = &create.config;
    assert_eq!(create.vm_id.unwrap().as_str(), "vm-1");
    assert_eq!((config.cpu.vcpu_count, config.cpu.max_vcpu_count), (2, 4));
    let topology = config.cpu.topology.as_ref().unwrap();
    assert_eq!((topology.sockets, topology.cores_per_socket, topology.threads_per_core), (1, 2, 2));
    assert_eq!((config.memory.size_bytes, config.memory.hotplug_enabled, config.memory.max_size_bytes), (256 << 20, true, 512 << 20));
    assert_eq!(
        (config.boot.kernel_path.as_str(), config.boot.initrd_path.as_str(), config.boot.kernel_args.as_str()),
        ("vmlinux", "initrd", "console=ttyS0")
    );
    let drive = &config.storage[0];
    assert_eq!((drive.id.as_str(), drive.path.as_str(), drive.read_only, drive.is_root_device), ("root", "root.img", true, true));
    assert_eq!(drive.interface_type, "virtio-blk");
    let interface = &config.network[0];
    assert_eq!(
        (interface.id.as_str(), interface.mac_address.as_str(), interface.tap_device.as_str()),
        ("eth0", "02:00:00:00:00:01", "tap0")
    );
    assert_eq!(interface.interface_type, "virtio-net");
    assert_eq!(interface.mode, NetworkMode::Ipv6Only);
    let ipv6 = interface.ipv6_config.as_ref().unwrap();
    assert_eq!((ipv6.address.as_str(), ipv6.prefix_length, ipv6.gateway.as_str(), ipv6.slaac), ("fd00::2", 64, "fd00::1", true));
    assert_eq!(ipv6.dns_servers, ["fd00::53"]);
    let ipv4 = interface.ipv4_config.as_ref().unwrap();
    assert_eq!(
        (ipv4.address.as_str(), ipv4.netmask.as_str(), ipv4.gateway.as_str(), ipv4.dhcp),
        ("10.0.0.2", "255.255.255.0", "10.0.0.1", true)
    );
    assert_eq!(interface.rx_rate_limit, Some(RateLimit { bandwidth: 1_000_000, refill_time_ms: 100, burst: 4096 }));
    assert_eq!(interface.tx_rate_limit, Some(RateLimit { bandwidth: 2_000_000, refill_time_ms: 200, burst: 8192 }));
    assert_eq!((config.console.enabled, config.console.console_type.as_str()), (true, "serial"));
    assert_eq!(config.metadata["team"], "storage");
}

#[test]
fn a_negative_int32_on_the_wire_is_refused_by_its_path() {
    // int32 -1 travels as a ten-byte varint.
    let request = wire::CreateVmRequest::decode_from_slice(&create_vm_request(-1)).unwrap();
    assert_eq!(request.config.as_option().unwrap().cpu.as_option().unwrap().vcpu_count, -1);
    assert_eq!(create_vm_from_wire(&request, acme()).unwrap_err().field(), "cpu.vcpu_count");
}

#[test]
fn a_state_filter_decodes_packed_or_not() {
    let packed = message(&[delimited(1, &[2, 5]), number(2, 50), delimited(3, b"next")]);
    let request = wire::ListVmsRequest::decode_from_slice(&packed).unwrap();
    let running_and_failed: Vec<EnumValue<wire::VmState>> =
        vec![wire::VmState::VM_STATE_RUNNING.into(), wire::VmState::VM_STATE_FAILED.into()];
    assert_eq!(request.state_filter, running_and_failed);
    assert_eq!((request.page_size, request.page_token.as_str()), (50, "next"));
    let unpacked = message(&[number(1, 2), number(1, 5)]);
    assert_eq!(wire::ListVmsRequest::decode_from_slice(&unpacked).unwrap().state_filter, running_and_failed);
}

#[test]
fn requests_of_the_other_methods_keep_their_numbers() {
    let shutdown = wire::ShutdownVmRequest::decode_from_slice(&message(&[delimited(1, b"vm-1"), number(2, 1), number(3, 30)])).unwrap();
    assert_eq!((shutdown.vm_id.as_str(), shutdown.force, shutdown.timeout_seconds), ("vm-1", true, 30));
    let delete = wire::DeleteVmRequest::decode_from_slice(&message(&[delimited(1, b"vm-1"), number(2, 1)])).unwrap();
    assert_eq!((delete.vm_id.as_str(), delete.force), ("vm-1", true));
    let reboot = wire::RebootVmRequest::decode_from_slice(&message(&[delimited(1, b"vm-1"), number(2, 1)])).unwrap();
    assert!(reboot.force);
    let console = wire::GetConsoleRequest::decode_from_slice(&message(&[delimited(1, b"vm-1"), number(2, 4096)])).unwrap();
    assert_eq!((console.vm_id.as_str(), console.max_bytes), ("vm-1", 4096));
    let watch = wire::WatchVmsRequest::decode_from_slice(&delimited(1, b"vm-1")).unwrap();
    assert_eq!(watch.vm_id, "vm-1");
}

#[test]
fn answers_encode_with_the_contract_numbers() {
    let response = wire::GetVmInfoResponse {
        vm_id: "a".into(),
        state: wire::VmState::VM_STATE_FAILED.into(),
        failure_reason: "x".into(),
        customer_id: "c".into(),
        created_timestamp: 1,
        modified_timestamp: 2,
        booted_timestamp: 3,
        last_exit: "e".into(),
        ..Default::default()
    };
    let expected = message(&[
        delimited(1, b"a"),
        number(3, 5),
        delimited(7, b"x"),
        delimited(8, b"c"),
        number(9, 1),
        number(10, 2),
        number(11, 3),
        delimited(12, b"e"),
    ]);
    assert_eq!(response.encode_to_vec(), expected);

    let network = wire::VmNetworkInfo {
        ip_address: "fd00::2".into(),
        gateway: "fd00::1".into(),
        ipv6_address: "fd00::2".into(),
        ipv4_address: "10.0.0.2".into(),
        interfaces: vec![wire::VmInterfaceInfo { id: "eth0".into(), ipv4_address: "10.0.0.2".into(), ..Default::default() }],
        ..Default::default()
    };
    let interface = message(&[delimited(1, b"eth0"), delimited(5, b"10.0.0.2")]);
    let expected = message(&[
        delimited(1, b"fd00::2"),
        delimited(5, b"fd00::1"),
        delimited(8, b"fd00::2"),
        delimited(10, b"10.0.0.2"),
        delimited(12, &interface),
    ]);
    assert_eq!(network.encode_to_vec(), expected);

    let entry =
        wire::VmInfo { vm_id: "a".into(), vcpu_count: 2, customer_id: "c".into(), failure_reason: "x".into(), ..Default::default() };
    assert_eq!(entry.encode_to_vec(), message(&[delimited(1, b"a"), number(3, 2), delimited(8, b"c"), delimited(9, b"x")]));

    let event = wire::VmEvent {
        vm_id: "a".into(),
        customer_id: "c".into(),
        state: wire::VmState::VM_STATE_SHUTDOWN.into(),
        kind: "stopped".into(),
        timestamp: 7,
        reason: "r".into(),
        ..Default::default()
    };
    let expected =
        message(&[delimited(1, b"a"), delimited(2, b"c"), number(3, 4), delimited(4, b"stopped"), number(5, 7), delimited(6, b"r")]);
    assert_eq!(event.encode_to_vec(), expected);

    let console = wire::GetConsoleResponse { vm_id: "a".into(), data: vec![0xff, b'\n'], ..Default::default() };
    assert_eq!(console.encode_to_vec(), message(&[delimited(1, b"a"), delimited(2, &[0xff, b'\n'])]));
}
