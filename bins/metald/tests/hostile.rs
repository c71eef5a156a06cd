//! What a hostile tenant, a crash or a slow disk must not do to a host:
//! each test reproduces one way a tenant or an accident could break a real
//! metald (jailer on, Firecracker on /dev/kvm), with the timing that makes
//! it happen forced rather than hoped for.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod stuck_disk;

use std::time::Duration;

use common::{Host, HostOptions, Wire, create_request, guest_config};
use connectrpc::ErrorCode;
use metald_api::proto::vmprovisioner::v1 as wire;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stuck_disk::StuckDisk;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

const PATIENCE: Duration = Duration::from_secs(60);

/// A test-guest VM whose writable drive is a copy of the stuck disk's image `index`.
fn config_with_stuck_drive(index: usize) -> wire::VmConfig {
    let mut config = guest_config(&[]);
    config.storage.push(wire::StorageDevice {
        id: "data".into(),
        path: format!("stuck/{}", stuck_disk::image(index)),
        ..Default::default()
    });
    config
}

#[test]
fn a_create_whose_caller_gave_up_keeps_its_share_of_the_quota_until_it_is_over() {
    let test = "a_create_whose_caller_gave_up_keeps_its_share_of_the_quota_until_it_is_over";
    let Some(host) = Host::start(test, HostOptions { tenants: vec![("acme", "{ max_vms = 1 }")], ..HostOptions::default() }) else {
        return;
    };
    let disk = StuckDisk::mount(&host.dir.path().join("images").join("stuck"), 1, 1 << 20);
    runtime().block_on(async {
        // A create whose deadline passes while it copies its drive: the
        // daemon answers deadline_exceeded and drops the call; the create runs on.
        let impatient = host.client_with_deadline(Some(host.token("acme")), Wire::ConnectProto, Duration::from_secs(1));
        let given_up = impatient.create_vm(create_request(config_with_stuck_drive(0))).await.map(|_| ()).unwrap_err();
        assert_eq!(given_up.code, ErrorCode::DeadlineExceeded, "{given_up:?}");
        assert_eq!(disk.stuck_images(), 1, "the create is still copying");

        let acme = host.client("acme", Wire::ConnectProto);
        let refused = acme.create_vm(create_request(guest_config(&[]))).await.map(|_| ()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::ResourceExhausted, "the abandoned create still counts: {refused:?}");
        assert!(refused.message.as_deref().unwrap_or("").contains("at most 1 VMs"), "{refused:?}");

        disk.release();
        metald_testguest::wait_until("the abandoned create to finish", PATIENCE, || async {
            acme.list_vms(wire::ListVmsRequest::default()).await.is_ok_and(|list| list.into_owned().total_count == 1)
        })
        .await;
        let refused = acme.create_vm(create_request(guest_config(&[]))).await.map(|_| ()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::ResourceExhausted, "the finished create counts: {refused:?}");
    });
}

#[test]
fn drive_copies_stuck_on_a_disk_that_does_not_answer_leave_every_other_call_answered() {
    let test = "drive_copies_stuck_on_a_disk_that_does_not_answer_leave_every_other_call_answered";
    let options = HostOptions { tenants: vec![("acme", "{}"), ("globex", "{}")], ..HostOptions::default() };
    let Some(host) = Host::start(test, options) else { return };
    // Declared after the host, so dropped (unstuck and unmounted) before it.
    // More creates than the daemon has runtime workers (one per CPU).
    let creates = std::thread::available_parallelism().map_or(2, usize::from) + 1;
    let disk = StuckDisk::mount(&host.dir.path().join("images").join("stuck"), creates, 1 << 20);
    runtime().block_on(async {
        let acme = host.client("acme", Wire::ConnectProto);
        let pending: Vec<_> = (0..creates)
            .map(|index| {
                let (client, request) = (acme.clone(), create_request(config_with_stuck_drive(index)));
                tokio::spawn(async move { client.create_vm(request).await.map(|created| created.into_owned().vm_id) })
            })
            .collect();
        metald_testguest::wait_until("every create to be stuck copying its drive", PATIENCE, || {
            std::future::ready(disk.stuck_images() == creates)
        })
        .await;

        let port = host.port;
        let health = tokio::task::spawn_blocking(move || common::http_get(port, "/health")).await.unwrap();
        assert_eq!(health.map(|(status, _)| status), Some(200), "/health answers while drive copies are stuck");
        let globex = host.client("globex", Wire::ConnectJson);
        let listed = globex.list_vms(wire::ListVmsRequest::default()).await.expect("another tenant's ListVms answers");
        assert_eq!(listed.into_owned().total_count, 0);

        disk.release();
        let mut vm_ids = Vec::new();
        for create in pending {
            vm_ids.push(create.await.unwrap().expect("the create finishes once the disk answers"));
        }
        for vm_id in vm_ids {
            acme.delete_vm(wire::DeleteVmRequest { vm_id, ..Default::default() }).await.unwrap();
        }
    });
    drop(disk);
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let parent_of = |stat: &str| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| parent_of(&stat) == Some(pid)))
        .collect()
}

#[test]
fn a_jail_child_half_made_when_metald_is_killed_dies_with_it_and_holds_nothing_of_it() {
    let test = "a_jail_child_half_made_when_metald_is_killed_dies_with_it_and_holds_nothing_of_it";
    // The launch stops between the clone of the jail's child and the word that lets it go on.
    let options = HostOptions { fail_points: Some("jail-before-sync=pause".into()), ..HostOptions::default() };
    let Some(mut host) = Host::start(test, options) else { return };
    let (daemon, port) = (host.pid(), host.port);
    let runtime = runtime();
    let client = host.client("acme", Wire::ConnectProto);
    let create = runtime.spawn(async move { client.create_vm(create_request(guest_config(&[]))).await.map(|_| ()) });
    runtime.block_on(metald_testguest::wait_until("the jail's child to be made", PATIENCE, || {
        std::future::ready(!children_of(daemon).is_empty())
    }));
    let child = children_of(daemon)[0];

    host.kill();
    runtime.block_on(metald_testguest::wait_until("the half-made child to die with metald", PATIENCE, || {
        std::future::ready(!metald_testguest::process_alive(child))
    }));
    drop(std::net::TcpListener::bind(("127.0.0.1", port)).expect("nothing holds metald's port"));
    assert!(runtime.block_on(create).unwrap().is_err(), "the create died with metald");

    host.fail_points = None;
    host.launch();
    assert_eq!(host.port, port, "the next metald serves on the same port");
}

#[test]
fn the_cpu_percent_never_shows_more_cpus_than_the_host_has() {
    let test = "the_cpu_percent_never_shows_more_cpus_than_the_host_has";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let host_cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let mut config = guest_config(&[]);
        config.cpu.get_or_insert_default().vcpu_count = 32;
        let vm_id = client.create_vm(create_request(config)).await.unwrap().into_owned().vm_id;
        client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
        // Looks right after the boot, then until the figure spans intervals of the guest's own clock.
        let figures = std::sync::Mutex::new(Vec::new());
        metald_testguest::wait_until("the VM to have run for 3 s", PATIENCE, || async {
            let request = wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() };
            let info = client.get_vm_info(request).await.unwrap().into_owned();
            let metrics = info.metrics.into_option().expect("a running VM has figures");
            figures.lock().unwrap().push(metrics.cpu_usage_percent);
            metrics.uptime_seconds >= 3
        })
        .await;
        let figures = figures.into_inner().unwrap();
        // A process's CPU time counts in 10 ms ticks: over the 1 s interval, 1 % of slack.
        let impossible: Vec<f64> = figures.iter().copied().filter(|percent| *percent > host_cpus * 100.0 + 1.0).collect();
        assert!(impossible.is_empty(), "more than {host_cpus} CPUs busy: {impossible:?} of {} looks", figures.len());
    });
}

#[test]
fn a_graceful_stop_is_bounded_and_sigterm_does_not_wait_for_one_in_flight() {
    let test = "a_graceful_stop_is_bounded_and_sigterm_does_not_wait_for_one_in_flight";
    let Some(mut host) = Host::start(test, HostOptions { drain_timeout_seconds: Some(1), ..HostOptions::default() }) else { return };
    let runtime = runtime();
    let client = host.client("acme", Wire::ConnectProto);
    let vm_id = runtime.block_on(async {
        let vm_id = common::boot_guest(&client, &[metald_testguest::cmdline::IGNORE_SHUTDOWN]).await;
        let too_long = wire::ShutdownVmRequest { vm_id: vm_id.clone(), timeout_seconds: i32::MAX, ..Default::default() };
        let refused = client.shutdown_vm(too_long).await.map(|_| ()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
        let message = refused.message.unwrap_or_default();
        assert!(message.starts_with("timeout_seconds:") && message.contains("3600"), "{message}");
        vm_id
    });

    // The longest graceful stop there is, of a guest that ignores it.
    let stopping = {
        let client = host.client_with_deadline(Some(host.token("acme")), Wire::ConnectProto, Duration::from_secs(7200));
        let request = wire::ShutdownVmRequest { vm_id: vm_id.clone(), timeout_seconds: 3600, ..Default::default() };
        runtime.spawn(async move { client.shutdown_vm(request).await.map(|_| ()) })
    };
    runtime.block_on(common::wait_for_console(&client, &vm_id, metald_testguest::console::IGNORED_SHUTDOWN));
    kill(Pid::from_raw(host.pid() as i32), Signal::SIGTERM).unwrap();
    runtime.block_on(metald_testguest::wait_until("metald to stop after its drain", PATIENCE, || std::future::ready(!host.alive())));
    assert!(runtime.block_on(stopping).unwrap().is_err(), "the abandoned stop did not succeed");

    host.kill();
    host.launch();
    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        assert_eq!(common::state_of(&client, &vm_id).await, wire::VmState::VM_STATE_RUNNING, "the VM ran on");
        client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// A TCP connection to the daemon from `source` (any 127.x address is this host).
async fn connect_from(source: &str, port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// Whether the daemon has closed the connection (without answering anything).
fn closed(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("the daemon sent something on a connection that asked nothing"),
        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn one_client_cannot_hold_more_than_its_share_of_the_api_port() {
    let test = "one_client_cannot_hold_more_than_its_share_of_the_api_port";
    let options = HostOptions {
        // Long enough that the stranger's silent connections stay open for the whole test.
        api_settings: Some("max_connections_per_client = 8\nheader_read_timeout_seconds = 600\nidle_timeout_seconds = 600\n"),
        ..HostOptions::default()
    };
    let Some(host) = Host::start(test, options) else { return };
    runtime().block_on(async {
        // A stranger opens 12 connections and sends nothing on them.
        let mut strangers = Vec::new();
        for _ in 0..12 {
            strangers.push(connect_from("127.0.0.2", host.port).await);
        }
        metald_testguest::wait_until("the connections beyond the stranger's 8 to be closed", PATIENCE, || {
            std::future::ready(strangers.iter().filter(|stream| closed(stream)).count() == 4)
        })
        .await;
        // Everyone else is served meanwhile.
        let tenant = host.client("acme", Wire::ConnectProto);
        tenant.list_vms(wire::ListVmsRequest::default()).await.expect("a tenant's call is served");
        let port = host.port;
        let health = tokio::task::spawn_blocking(move || common::http_get(port, "/health")).await.unwrap();
        assert_eq!(health.map(|(status, _)| status), Some(200));
        assert_eq!(strangers.iter().filter(|stream| closed(stream)).count(), 4, "the stranger's first 8 stay open");
        let mut ninth = connect_from("127.0.0.2", host.port).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(&mut ninth, &mut byte)).await.expect("a 9th is closed");
        assert!(read.map_or(true, |bytes| bytes == 0), "a 9th connection is closed unanswered");
    });
}

#[test]
fn silent_slow_and_idle_connections_are_closed() {
    let test = "silent_slow_and_idle_connections_are_closed";
    let settings = "header_read_timeout_seconds = 1\nbody_read_timeout_seconds = 1\nidle_timeout_seconds = 1\n";
    let Some(host) = Host::start(test, HostOptions { api_settings: Some(settings), ..HostOptions::default() }) else { return };
    runtime().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let read_to_end = |mut stream: tokio::net::TcpStream| async move {
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await.expect("the daemon closes the connection");
            String::from_utf8_lossy(&answer).into_owned()
        };
        let silent = connect_from("127.0.0.1", host.port).await;
        let mut slow_head = connect_from("127.0.0.1", host.port).await;
        slow_head.write_all(b"POST /vmprovisioner.v1.VmService/ListVms HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut slow_body = connect_from("127.0.0.1", host.port).await;
        let head = format!(
            "POST /vmprovisioner.v1.VmService/ListVms HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{",
            host.token("acme")
        );
        slow_body.write_all(head.as_bytes()).await.unwrap();
        let mut idle = connect_from("127.0.0.1", host.port).await;
        idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut http2_idle = connect_from("127.0.0.1", host.port).await;
        // The HTTP/2 preface and an empty SETTINGS frame, then nothing.
        http2_idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();

        assert_eq!(read_to_end(silent).await, "", "a connection that sends nothing");
        assert!(!read_to_end(slow_head).await.contains("200 OK"), "a request head that never ends");
        let answer = read_to_end(slow_body).await;
        assert!(!answer.contains("200 OK"), "a request body that stops: {answer}");
        let answer = read_to_end(idle).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("ok"), "an idle keep-alive connection, once answered: {answer}");
        let answer = read_to_end(http2_idle).await;
        assert!(!answer.is_empty(), "an idle HTTP/2 connection is told to go away (GOAWAY) before it is closed");
    });
}

#[test]
fn the_kernel_command_line_is_checked_at_the_request_with_what_the_host_adds() {
    let test = "the_kernel_command_line_is_checked_at_the_request_with_what_the_host_adds";
    let Some(host) = Host::start(test, HostOptions { network: true, ..HostOptions::default() }) else { return };
    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let refusal = |config: wire::VmConfig| {
            let client = client.clone();
            async move {
                let error = client.create_vm(create_request(config)).await.map(|_| ()).unwrap_err();
                assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
                error.message.unwrap_or_default()
            }
        };
        let padded = |bytes: usize| format!("x={}", "a".repeat(bytes - 2));

        let message = refusal(guest_config(&[&padded(2048)])).await;
        assert!(message.starts_with("boot.kernel_args:"), "{message}");
        let mut many = guest_config(&[]);
        many.network = (0..16).map(|index| wire::NetworkInterface { id: format!("eth{index}"), ..Default::default() }).collect();
        let message = refusal(many).await;
        assert!(message.starts_with("network:") && message.contains("16 interfaces"), "{message}");

        // One interface: the most the request may carry, as the refusal of one byte more says.
        let with_interface = |args: &str| {
            let mut config = guest_config(&[args]);
            config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
            config
        };
        let message = refusal(with_interface(&padded(2000))).await;
        let room: usize = message.split("at most ").nth(1).and_then(|rest| rest.split(' ').next()?.parse().ok()).expect(&message);
        let refused = refusal(with_interface(&padded(room + 1))).await;
        assert!(refused.starts_with("boot.kernel_args:"), "{refused}");
        // That much boots, and the guest is told all of it and its own address.
        let longest = padded(room);
        let vm_id = client.create_vm(create_request(with_interface(&longest))).await.unwrap().into_owned().vm_id;
        client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.expect("the longest command line boots");
        let ready = common::wait_for_console(&client, &vm_id, metald_testguest::console::READY).await;
        assert!(ready.contains(&longest) && ready.contains("metald.eth0.ipv6="), "{ready}");
        client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn one_tenant_cannot_take_or_probe_another_tenants_mac_addresses() {
    let test = "one_tenant_cannot_take_or_probe_another_tenants_mac_addresses";
    let options = HostOptions { network: true, tenants: vec![("acme", "{}"), ("globex", "{}")], ..HostOptions::default() };
    let Some(host) = Host::start(test, options) else { return };
    runtime().block_on(async {
        let with_mac = |mac: &str| {
            let mut config = guest_config(&[]);
            config.network.push(wire::NetworkInterface { id: "eth0".into(), mac_address: mac.into(), ..Default::default() });
            create_request(config)
        };
        let (acme, globex) = (host.client("acme", Wire::ConnectProto), host.client("globex", Wire::ConnectJson));
        // The host's own range (what it would give globex next) is no tenant's to claim.
        for host_made in ["02:6d:00:01:00:02", "02:6d:00:02:00:02", "02:6d:00:02:00:03"] {
            let refused = acme.create_vm(with_mac(host_made)).await.map(|_| ()).unwrap_err();
            assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
            assert!(refused.message.unwrap_or_default().starts_with("network[0].mac_address:"));
        }
        // A MAC of one's own choosing is one's own: another tenant may choose it too.
        let chosen = "02:aa:00:00:00:01";
        let mut vm_ids = vec![acme.create_vm(with_mac(chosen)).await.unwrap().into_owned().vm_id];
        vm_ids.push(globex.create_vm(with_mac(chosen)).await.expect("globex's choice is not acme's").into_owned().vm_id);
        vm_ids.push(globex.create_vm(with_mac("")).await.expect("globex gets a MAC of the host's").into_owned().vm_id);
        let twice = acme.create_vm(with_mac(chosen)).await.map(|_| ()).unwrap_err();
        assert_eq!(twice.code, ErrorCode::InvalidArgument, "a tenant's own MAC twice: {twice:?}");
        for (vm_id, client) in vm_ids.into_iter().zip([&acme, &globex, &globex]) {
            client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
        }
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn a_vm_with_several_interfaces_is_deleted_at_the_first_try() {
    let test = "a_vm_with_several_interfaces_is_deleted_at_the_first_try";
    let Some(host) = Host::start(test, HostOptions { network: true, ..HostOptions::default() }) else { return };
    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        for interfaces in [2, 3] {
            let mut config = guest_config(&[]);
            config.network =
                (0..interfaces).map(|index| wire::NetworkInterface { id: format!("eth{index}"), ..Default::default() }).collect();
            let vm_id = client.create_vm(create_request(config)).await.unwrap().into_owned().vm_id;
            client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            let request = wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() };
            client.delete_vm(request).await.unwrap_or_else(|error| panic!("deleting a VM with {interfaces} interfaces: {error:?}"));
            assert!(host.leftovers().is_empty(), "{interfaces} interfaces: {:?}", host.leftovers());
        }
    });
}

#[test]
fn images_reveal_nothing_of_the_host_and_a_writable_drive_copies_no_private_file() {
    let test = "images_reveal_nothing_of_the_host_and_a_writable_drive_copies_no_private_file";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let images = host.dir.path().join("images");
    // A folder inside the root that leads outside it, to a file that exists and to one that does not.
    let outside = host.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("exists.img"), b"host data").unwrap();
    std::os::unix::fs::symlink(&outside, images.join("linked")).unwrap();
    // A private file reachable as an image by a hard link (as /etc/shadow would be).
    let private = images.join("private.img");
    std::fs::write(&private, b"secret").unwrap();
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    std::fs::hard_link(&private, images.join("hardlinked.img")).unwrap();
    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let with_drive = |path: &str| {
            let mut config = guest_config(&[]);
            config.storage.push(wire::StorageDevice { id: "data".into(), path: path.into(), ..Default::default() });
            create_request(config)
        };
        let refusal = |request: wire::CreateVmRequest| {
            let client = client.clone();
            async move {
                let error = client.create_vm(request).await.map(|_| ()).unwrap_err();
                assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
                error.message.unwrap_or_default()
            }
        };
        let existing = refusal(with_drive("linked/exists.img")).await;
        let missing = refusal(with_drive("linked/missing.img")).await;
        assert_eq!(existing.replace("exists", "NAME"), missing.replace("missing", "NAME"), "the same answer either way");
        let private = refusal(with_drive("hardlinked.img")).await;
        assert!(private.starts_with("storage[0].path:") && private.contains("world-readable"), "{private}");
        let cyrillic = client.create_vm(wire::CreateVmRequest { vm_id: "\u{430}1".into(), ..create_request(guest_config(&[])) });
        let message = cyrillic.await.map(|_| ()).unwrap_err().message.unwrap_or_default();
        assert!(message.contains("ASCII"), "{message}");
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn a_vm_whose_kernel_left_the_image_root_is_still_taken_over_after_a_restart() {
    let test = "a_vm_whose_kernel_left_the_image_root_is_still_taken_over_after_a_restart";
    let options = HostOptions { tenants: vec![("acme", "{}"), ("globex", "{}")], ..HostOptions::default() };
    let Some(mut host) = Host::start(test, options) else { return };
    let kernel = host.dir.path().join("images").join("oldk.elf");
    std::fs::copy(metald_testguest::kernel_path(), &kernel).unwrap();
    let runtime = runtime();
    let info_of = |client: &common::Client, vm_id: &str| {
        let (client, vm_id) = (client.clone(), vm_id.to_owned());
        async move { client.get_vm_info(wire::GetVmInfoRequest { vm_id, ..Default::default() }).await.map(|info| info.into_owned()) }
    };
    let (vm_id, pid, uid) = runtime.block_on(async {
        let globex = host.client("globex", Wire::ConnectProto);
        let mut config = guest_config(&[]);
        config.boot.get_or_insert_default().kernel_path = "oldk.elf".into();
        let vm_id = globex.create_vm(create_request(config)).await.unwrap().into_owned().vm_id;
        globex.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
        let info = info_of(&globex, &vm_id).await.unwrap();
        let (pid, instance) = (common::vmm_pid(&vm_id).unwrap(), info.backend_info["vmm_instance"].clone());
        for host_only in ["pid", "uid", "gid", "cgroup"] {
            assert!(!info.backend_info.contains_key(host_only), "{host_only} tells of the host: {:?}", info.backend_info);
        }
        (vm_id, (pid, instance), common::uid_of(pid))
    });
    host.kill();
    std::fs::remove_file(&kernel).unwrap();
    host.launch();
    runtime.block_on(async {
        let globex = host.client("globex", Wire::ConnectProto);
        let info = info_of(&globex, &vm_id).await.expect("the VM is still there");
        assert_eq!(info.state.as_known(), Some(wire::VmState::VM_STATE_RUNNING), "{info:?}");
        assert_eq!((common::vmm_pid(&vm_id).unwrap(), info.backend_info["vmm_instance"].clone()), pid, "its VMM, taken over");
        // Its uid stays its own: another tenant's next VM gets another.
        let acme = host.client("acme", Wire::ConnectProto);
        let other = acme.create_vm(create_request(guest_config(&[]))).await.unwrap().into_owned().vm_id;
        assert_ne!(common::uid_of(common::vmm_pid(&other).unwrap()), uid);
        let again = wire::CreateVmRequest { vm_id: vm_id.clone(), ..create_request(guest_config(&[])) };
        assert_eq!(globex.create_vm(again).await.map(|_| ()).unwrap_err().code, ErrorCode::AlreadyExists);
        // Launching it again needs the kernel, and says so.
        globex.reboot_vm(wire::RebootVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap_err();
        let failed = info_of(&globex, &vm_id).await.unwrap();
        assert!(failed.failure_reason.contains("removed"), "{}", failed.failure_reason);
        for (client, vm_id) in [(&globex, vm_id), (&acme, other)] {
            client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
        }
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn a_vmm_killed_at_a_resource_limit_says_which() {
    let test = "a_vmm_killed_at_a_resource_limit_says_which";
    let Some(mut host) = Host::start(test, HostOptions::default()) else { return };
    let runtime = runtime();
    let (own, adopted) = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        (common::boot_guest(&client, &[]).await, common::boot_guest(&client, &[]).await)
    });
    // One VMM is metald's child; the other is taken over after a restart, so its exit status goes to no one.
    host.kill();
    host.launch();
    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let own_again = common::boot_guest(&client, &[]).await;
        for vm_id in [own_again, adopted] {
            // What the kernel sends a process that writes past its RLIMIT_FSIZE.
            kill(Pid::from_raw(common::vmm_pid(&vm_id).unwrap() as i32), Signal::SIGXFSZ).unwrap();
            metald_testguest::wait_until("the VM to fail", PATIENCE, || async {
                common::state_of(&client, &vm_id).await == wire::VmState::VM_STATE_FAILED
            })
            .await;
            let request = wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() };
            let info = client.get_vm_info(request).await.unwrap().into_owned();
            assert!(info.failure_reason.contains("file-size limit"), "{vm_id}: {}", info.failure_reason);
            client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
        }
        client.delete_vm(wire::DeleteVmRequest { vm_id: own, force: true, ..Default::default() }).await.unwrap();
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn a_create_cut_off_by_a_crash_leaves_nothing_once_metald_is_back() {
    let test = "a_create_cut_off_by_a_crash_leaves_nothing_once_metald_is_back";
    let Some(mut host) = Host::start(test, HostOptions { network: true, ..HostOptions::default() }) else { return };
    let disk = StuckDisk::mount(&host.dir.path().join("images").join("stuck"), 1, 1 << 20);
    let runtime = runtime();
    let mut config = config_with_stuck_drive(0);
    config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
    let request = wire::CreateVmRequest { vm_id: "vm-cut-off".into(), ..create_request(config) };
    let client = host.client("acme", Wire::ConnectProto);
    let cut_off = {
        let (client, request) = (client.clone(), request.clone());
        runtime.spawn(async move { client.create_vm(request).await.map(|_| ()) })
    };
    // The create has its network and is copying its drive when metald dies.
    runtime.block_on(metald_testguest::wait_until("the create to be stuck copying its drive", PATIENCE, || {
        std::future::ready(disk.stuck_images() == 1)
    }));
    host.kill();
    assert!(runtime.block_on(cut_off).unwrap().is_err());
    assert!(host.leftovers().iter().any(|left| left.contains("vm-cut-off")), "the crash left something to clean up");
    disk.release();

    host.launch();
    // The test's own stuck disk aside.
    let left: Vec<String> = host.leftovers().into_iter().filter(|left| !left.contains("/images/stuck")).collect();
    assert!(left.is_empty(), "{left:?}");
    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let mut again = request.clone();
        again.config.get_or_insert_default().storage.clear();
        client.create_vm(again).await.expect("the id is free again");
        client.delete_vm(wire::DeleteVmRequest { vm_id: "vm-cut-off".into(), force: true, ..Default::default() }).await.unwrap();
    });
    drop(disk);
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn a_vmm_launched_by_a_create_cut_off_before_its_record_is_stopped_once_metald_is_back() {
    let test = "a_vmm_launched_by_a_create_cut_off_before_its_record_is_stopped_once_metald_is_back";
    // The create has launched its VMM, networked and jailed, and stops before the store records it.
    let options = HostOptions { network: true, fail_points: Some("create-before-record=pause".into()), ..HostOptions::default() };
    let Some(mut host) = Host::start(test, options) else { return };
    let runtime = runtime();
    let mut config = guest_config(&[]);
    config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
    let request = wire::CreateVmRequest { vm_id: "vm-unrecorded".into(), ..create_request(config) };
    let cut_off = {
        let (client, request) = (host.client("acme", Wire::ConnectProto), request.clone());
        runtime.spawn(async move { client.create_vm(request).await.map(|_| ()) })
    };
    runtime
        .block_on(metald_testguest::wait_until("the create's VMM to run", PATIENCE, || std::future::ready(!host.live_vmms().is_empty())));
    let vmm = host.live_vmms()[0];
    host.kill();
    assert!(runtime.block_on(cut_off).unwrap().is_err(), "the create died with metald");
    assert!(metald_testguest::process_alive(vmm), "a VMM outlives metald, as it must for a takeover");

    host.fail_points = None;
    host.launch();
    assert!(!metald_testguest::process_alive(vmm), "no VMM runs on that no VM accounts for");
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        assert!(client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().vms.is_empty());
        client.create_vm(request.clone()).await.expect("the id is free again");
        client.boot_vm(wire::BootVmRequest { vm_id: "vm-unrecorded".into(), ..Default::default() }).await.expect("and its VM boots");
        client.delete_vm(wire::DeleteVmRequest { vm_id: "vm-unrecorded".into(), force: true, ..Default::default() }).await.unwrap();
    });
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn a_networked_create_whose_firewall_cannot_load_fails_and_leaves_nothing() {
    let test = "a_networked_create_whose_firewall_cannot_load_fails_and_leaves_nothing";
    // An nft that refuses to add elements: the VM's rules cannot load while its VMM starts.
    let stand_in = tempfile::Builder::new().prefix("metald-test-nft-").tempdir().unwrap();
    metald_testguest::nft::write_refusing_nft(stand_in.path(), r#"*'"add"'*'"element"'*"#).unwrap();
    let options = HostOptions { network: true, path_first: Some(stand_in.path().to_path_buf()), ..HostOptions::default() };
    let Some(host) = Host::start(test, options) else { return };
    let runtime = runtime();
    let mut config = guest_config(&[]);
    config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
    runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let error = client.create_vm(create_request(config)).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::Internal, "{error}");
        assert!(client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned().vms.is_empty());
    });
    assert!(host.log().contains("injected failure"), "the log names why: {}", host.log());
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}
