//! Shared by the network tests: a host of its own for each test (a network
//! namespace the test made, playing the host), a provider working in it,
//! guests played on TAP descriptors, and frames built as a guest would.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv6Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use metald_core::config::NetworkInterface;
use metald_core::network::{AttachRequest, NetworkAttachment, NetworkProvider};
use metald_core::{TenantId, VmId};
use metald_net::netns::NetnsDir;
use metald_net::{Ipv6Network, NetworkConfig};

pub const HOST_PREFIX: &str = "fd6d:7465:7374::/48";

/// A test's own host: every namespace it makes carries its unique prefix,
/// and dropping it deletes them all (taking links, routes and nft rules
/// with them).
pub struct NetSandbox {
    pub state: tempfile::TempDir,
    pub prefix: String,
    pub namespaces: NetnsDir,
    pub host_name: String,
    pub provider: std::sync::Arc<Ipv6Network>,
}

impl NetSandbox {
    pub async fn new(test: &str) -> Option<Self> {
        Self::with(test, |_| {}).await
    }

    pub async fn with(test: &str, adjust: impl FnOnce(&mut NetworkConfig)) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            return metald_testguest::unmet(test, "network tests need root");
        }
        if std::process::Command::new("nft").arg("--version").output().is_err() {
            return metald_testguest::unmet(test, "nft is not installed (apt-get install nftables)");
        }
        let state = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
        let unique = VmId::generate();
        let prefix = format!("metald-test-{}-", &unique.as_str()[3..11]);
        let namespaces = NetnsDir::new(metald_net::netns::DEFAULT_NETNS_DIR);
        let host_name = format!("{prefix}host");
        namespaces.create(&host_name).unwrap();
        let mut config = NetworkConfig {
            host_prefix: Some(HOST_PREFIX.parse().unwrap()),
            state_dir: state.path().to_path_buf(),
            host_netns: Some(namespaces.path_of(&host_name)),
            netns_prefix: prefix.clone(),
            ..NetworkConfig::default()
        };
        adjust(&mut config);
        let provider = std::sync::Arc::new(Ipv6Network::new(config).await.unwrap());
        Some(Self { state, prefix, namespaces, host_name, provider })
    }

    pub fn host_namespace(&self) -> OwnedFd {
        self.namespaces.open(&self.host_name).unwrap()
    }

    pub async fn attach(&self, vm: &str, tenant: &str) -> NetworkAttachment {
        self.try_attach(vm, tenant, &[eth0()]).await.unwrap()
    }

    pub async fn try_attach(
        &self,
        vm: &str,
        tenant: &str,
        interfaces: &[NetworkInterface],
    ) -> Result<NetworkAttachment, metald_core::network::NetworkError> {
        let (vm_id, tenant) = (VmId::new(vm).unwrap(), TenantId::new(tenant).unwrap());
        let attachment =
            self.provider.attach(AttachRequest { vm_id: &vm_id, tenant: &tenant, interfaces, owner: Some((1_234_567, 1_234_567)) }).await?;
        // As the manager does: the VM may run once its network settled, and is detached if it cannot.
        if let Err(error) = self.provider.settle(&vm_id).await {
            self.provider.detach(&vm_id).await.unwrap();
            return Err(error);
        }
        Ok(attachment)
    }

    /// Attaches without waiting for the network to settle.
    pub async fn attach_unsettled(&self, vm: &str, tenant: &str) {
        let (vm_id, tenant) = (VmId::new(vm).unwrap(), TenantId::new(tenant).unwrap());
        let request = AttachRequest { vm_id: &vm_id, tenant: &tenant, interfaces: &[eth0()], owner: Some((1_234_567, 1_234_567)) };
        self.provider.attach(request).await.unwrap();
    }

    pub async fn detach(&self, vm: &str) {
        self.provider.detach(&VmId::new(vm).unwrap()).await.unwrap();
    }

    /// Plays the guest of `vm` on its first TAP device.
    pub fn guest(&self, vm: &str, attachment: &NetworkAttachment) -> Guest {
        let namespace = self.provider.open_namespace(&VmId::new(vm).unwrap()).unwrap();
        let interface = &attachment.interfaces[0];
        let fd = metald_net::tap::open_as_guest(&namespace, &interface.tap_device).unwrap();
        // Opening the TAP gives it carrier; the kernel turns that into a
        // forwarding bridge port a little later (linkwatch), and frames sent
        // before then are dropped. A VMM opens its TAP long before the guest talks.
        let namespace_name = self.provider.namespace_name(&VmId::new(vm).unwrap());
        wait_until_forwarding(&namespace_name, &interface.tap_device);
        // So does the host's end of the veth pair, the attach's last link.
        wait_until_forwarding(&self.host_name, &interface.host_link);
        let ipv6 = interface.ipv6.unwrap();
        Guest { fd, mac: metald_core::config::parse_mac(&interface.mac_address).unwrap(), address: ipv6.address, gateway: ipv6.gateway }
    }

    /// Namespaces of this test still present (the host's included).
    pub fn namespaces_left(&self) -> Vec<String> {
        std::fs::read_dir(metald_net::netns::DEFAULT_NETNS_DIR)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with(&self.prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `ip` output run in this test's host namespace.
    pub fn host_ip(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("ip").arg("-n").arg(&self.host_name).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The names of the links in this test's host namespace.
    pub fn host_links(&self) -> Vec<String> {
        self.host_ip(&["-o", "link"])
            .lines()
            .map(|line| line.split(": ").nth(1).unwrap_or_default().split('@').next().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Drop for NetSandbox {
    fn drop(&mut self) {
        for name in self.namespaces_left() {
            let _ = self.namespaces.delete(&name);
        }
    }
}

/// Waits (up to 10 s) until `link` in `namespace` is a forwarding bridge port.
pub fn wait_until_forwarding(namespace: &str, link: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = std::process::Command::new("ip").args(["-n", namespace, "-d", "link", "show", link]).output().unwrap();
        let details = String::from_utf8_lossy(&output.stdout);
        if details.contains("LOWER_UP") && details.contains("bridge_slave state forwarding") {
            return;
        }
        assert!(Instant::now() < deadline, "{link} in {namespace} never started forwarding:\n{details}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn eth0() -> NetworkInterface {
    NetworkInterface { id: "eth0".into(), ..NetworkInterface::default() }
}

/// One end of a TAP device, used the way a guest uses its NIC.
pub struct Guest {
    pub fd: OwnedFd,
    pub mac: [u8; 6],
    pub address: Ipv6Addr,
    pub gateway: Ipv6Addr,
}

impl Guest {
    pub fn send(&self, frame: &[u8]) {
        nix::unistd::write(&self.fd, frame).unwrap();
    }

    /// Frames that arrive within `window`, until one satisfies `wanted`.
    pub fn receive(&self, window: Duration, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + window;
        let mut buffer = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut poll = [nix::poll::PollFd::new(self.fd.as_fd(), nix::poll::PollFlags::POLLIN)];
            let timeout = nix::poll::PollTimeout::try_from(left.as_millis().min(10_000) as i32).unwrap();
            if nix::poll::poll(&mut poll, timeout).unwrap() == 0 {
                continue;
            }
            let length = nix::unistd::read(&self.fd, &mut buffer).unwrap();
            let frame = Frame(buffer[..length].to_vec());
            if wanted(&frame) {
                return Some(frame);
            }
        }
    }

    /// Neighbour discovery of the gateway: returns its MAC, and teaches the host ours.
    pub fn resolve_gateway(&self) -> [u8; 6] {
        self.send(&neighbor_solicitation(self.mac, self.address, self.gateway));
        let advert = self
            .receive(Duration::from_secs(20), |frame| frame.icmpv6_type() == Some(136) && frame.destination() == Some(self.address))
            .expect("the gateway answers neighbour discovery");
        advert.source_mac()
    }
}

/// An Ethernet frame, read the simple way.
#[derive(Debug, Clone)]
pub struct Frame(pub Vec<u8>);

impl Frame {
    fn ipv6(&self) -> Option<&[u8]> {
        (self.0.len() >= 54 && self.0[12..14] == [0x86, 0xdd]).then(|| &self.0[14..])
    }

    pub fn source_mac(&self) -> [u8; 6] {
        self.0[6..12].try_into().unwrap()
    }

    pub fn source(&self) -> Option<Ipv6Addr> {
        self.ipv6().map(|ip| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()))
    }

    pub fn destination(&self) -> Option<Ipv6Addr> {
        self.ipv6().map(|ip| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()))
    }

    pub fn icmpv6_type(&self) -> Option<u8> {
        self.ipv6().filter(|ip| ip[6] == 58).map(|ip| ip[40])
    }

    pub fn udp_destination_port(&self) -> Option<u16> {
        self.ipv6().filter(|ip| ip[6] == 17).map(|ip| u16::from_be_bytes([ip[42], ip[43]]))
    }
}

pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn multicast_mac(address: Ipv6Addr) -> [u8; 6] {
    let octets = address.octets();
    [0x33, 0x33, octets[12], octets[13], octets[14], octets[15]]
}

fn build(builder: etherparse::PacketBuilderStep<etherparse::Icmpv6Header>, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

pub fn echo_request(source_mac: [u8; 6], destination_mac: [u8; 6], source: Ipv6Addr, destination: Ipv6Addr) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(source_mac, destination_mac)
        .ipv6(source.octets(), destination.octets(), 64)
        .icmpv6_echo_request(0x6d, 1);
    build(builder, b"metald test")
}

pub fn neighbor_solicitation(source_mac: [u8; 6], source: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let target_octets = target.octets();
    let solicited = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(target_octets[13]),
        u16::from_be_bytes([target_octets[14], target_octets[15]]),
    );
    let icmp = etherparse::Icmpv6Type::Unknown { type_u8: 135, code_u8: 0, bytes5to8: [0; 4] };
    let builder = etherparse::PacketBuilder::ethernet2(source_mac, multicast_mac(solicited))
        .ipv6(source.octets(), solicited.octets(), 255)
        .icmpv6(icmp);
    let mut body = target_octets.to_vec();
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&source_mac);
    build(builder, &body)
}

pub fn router_advertisement(source_mac: [u8; 6], source: Ipv6Addr) -> Vec<u8> {
    // Hop limit 64, no flags, router lifetime 1800 s; then reachable time and retransmit timer.
    let icmp = etherparse::Icmpv6Type::Unknown { type_u8: 134, code_u8: 0, bytes5to8: [64, 0, 0x07, 0x08] };
    let builder = etherparse::PacketBuilder::ethernet2(source_mac, multicast_mac(ALL_NODES))
        .ipv6(source.octets(), ALL_NODES.octets(), 255)
        .icmpv6(icmp);
    build(builder, &[0; 8])
}

pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([mac[0] ^ 2, mac[1]]),
        u16::from_be_bytes([mac[2], 0xff]),
        u16::from_be_bytes([0xfe, mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

/// Sends a UDP datagram from the test's host namespace (as the outside world would reach a VM).
pub fn send_udp_from_host(host: &OwnedFd, destination: Ipv6Addr, port: u16) {
    metald_net::netns::run_in(host, || {
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        socket.send_to(b"hello from the host", (destination, port)).unwrap();
    })
    .unwrap()
    .unwrap();
}

pub fn state_path(sandbox: &NetSandbox) -> PathBuf {
    sandbox.state.path().to_path_buf()
}
