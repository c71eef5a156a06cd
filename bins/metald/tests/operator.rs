//! What an operator meets running metald on a host: who may read its
//! files, and what a stop leaves behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{Host, HostOptions, Wire};
use metald_api::proto::vmprovisioner::v1 as wire;

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every file and FIFO metald keeps in `dir` that another local user
/// could read or write, with its mode. A VM's jail (`vms/<id>/root`)
/// belongs to the VM's user and is laid out for it, so it is not walked.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            if path.file_name().is_some_and(|name| name == "root")
                && path.parent().and_then(Path::parent).is_some_and(|p| p.ends_with("vms"))
            {
                continue;
            }
            found.extend(open_to_others(&path));
        } else if (kind.is_file() || kind.is_fifo()) && mode_of(&path) & 0o077 != 0 {
            found.push((path.clone(), mode_of(&path)));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_folder_and_every_file_in_it_are_for_root_alone_also_after_an_older_build_left_them_wider() {
    let test = "the_data_folder_and_every_file_in_it_are_for_root_alone_also_after_an_older_build_left_them_wider";
    let Some(mut host) = Host::start(test, HostOptions { network: true, billing: true, ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let mut config = common::guest_config(&[&common::testguest::cmdline::heartbeat_ms(100)]);
    config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
    let vm_id = common::boot_config(&client, config).await;
    let data = host.data_dir();
    let vm_dir = data.join("vms").join(&vm_id);
    // What holds tenants' data, by name, so a file that moves does not pass by being absent.
    let expected = [
        data.join("vms.db"),
        data.join("spool.db"),
        data.join("network/addresses.db"),
        data.join("metald.lock"),
        vm_dir.join("console.log"),
        vm_dir.join("firecracker.log"),
        vm_dir.join("console.fifo"),
        data.join("usage.jsonl"),
    ];
    let check = |when: &str| {
        assert_eq!(mode_of(&data), 0o700, "{when}: the data folder");
        for path in &expected {
            assert_eq!(mode_of(path), 0o600, "{when}: {}", path.display());
        }
        assert_eq!(open_to_others(&data), Vec::new(), "{when}");
    };
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    while host.usage_records().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no usage record was written");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check("as metald made them");

    // An older build made the folder 0755 and its files 0644.
    host.terminate();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for path in &expected {
        if !std::fs::symlink_metadata(path).unwrap().file_type().is_fifo() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    host.launch();
    common::wait_for_console(&client, &vm_id, common::testguest::console::HEARTBEAT).await;
    assert!(host.log().contains("data_dir was readable by others; made it 0700"), "{}", host.log());
    check("after a start on what an older build left");
    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_file_is_rotated_as_logrotate_does_it_and_sighup_leaves_metald_running() {
    let test = "the_usage_file_is_rotated_as_logrotate_does_it_and_sighup_leaves_metald_running";
    let Some(mut host) = Host::start(test, HostOptions { billing: true, ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let vm_id = common::boot_guest(&client, &[&common::testguest::cmdline::heartbeat_ms(100)]).await;
    let usage = host.data_dir().join("usage.jsonl");
    let rotated = host.data_dir().join("usage.jsonl.1");
    let records_in = |path: &Path| -> Vec<(String, u64)> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        common::testguest::finished_lines(&text)
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .map(|record| (record["vm_id"].as_str().unwrap().to_owned(), record["sequence"].as_u64().unwrap()))
            .collect()
    };
    let wait_for_records = |path: &Path| {
        let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
        while records_in(path).is_empty() {
            assert!(std::time::Instant::now() < deadline, "no usage record reached {}", path.display());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_for_records(&usage);

    // logrotate's default: move the file aside, then `postrotate kill -HUP`.
    std::fs::rename(&usage, &rotated).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(host.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for_records(&usage);
    assert!(host.alive(), "SIGHUP stopped metald:\n{}", host.log());
    assert!(host.log().contains("SIGHUP: nothing to reload"), "{}", host.log());
    assert_eq!(mode_of(&usage), 0o600);
    assert_eq!(common::state_of(&client, &vm_id).await, wire::VmState::VM_STATE_RUNNING);

    // Every record is in one file or the other, once, in order.
    let mut all = records_in(&rotated);
    all.extend(records_in(&usage));
    let sequences: Vec<u64> = all.iter().filter(|(vm, _)| *vm == vm_id).map(|(_, sequence)| *sequence).collect();
    let expected: Vec<u64> = (sequences[0]..sequences[0] + sequences.len() as u64).collect();
    assert_eq!(sequences, expected, "no record lost or written twice across the rotation");
    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_stop_with_no_vm_left_leaves_no_firewall_table_or_cgroup_folder_and_one_with_vms_keeps_them() {
    let test = "a_clean_stop_with_no_vm_left_leaves_no_firewall_table_or_cgroup_folder_and_one_with_vms_keeps_them";
    let Some(mut host) = Host::start(test, HostOptions { network: true, ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let networked = || {
        let mut config = common::guest_config(&[]);
        config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
        config
    };
    let cgroup_folders = |host: &Host| host.cgroup_parents().into_iter().filter(|dir| dir.exists()).collect::<Vec<_>>();

    // With a VM running, a stop keeps what the VM needs.
    let vm_id = common::boot_config(&client, networked()).await;
    assert!(host.nft_table_exists() && !cgroup_folders(&host).is_empty());
    assert!(host.terminate().success());
    assert!(host.nft_table_exists(), "a running VM keeps its firewall table");
    assert!(!cgroup_folders(&host).is_empty(), "a running VM keeps its cgroup");
    assert!(host.log().contains("its VMs run on"), "{}", host.log());

    // With none left, nothing of metald's stays.
    host.launch();
    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    assert!(host.terminate().success());
    assert!(host.log().contains("no VM was left, so its firewall table and cgroup folders are removed"), "{}", host.log());
    assert!(!host.nft_table_exists(), "the firewall table is removed");
    assert_eq!(cgroup_folders(&host), Vec::<PathBuf>::new());
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());

    // And the next start sets it all up again.
    host.launch();
    let vm_id = common::boot_config(&client, networked()).await;
    assert!(host.nft_table_exists());
    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn console_lines_stay_whole_and_in_order_however_often_metald_is_killed_mid_line() {
    let test = "console_lines_stay_whole_and_in_order_however_often_metald_is_killed_mid_line";
    let Some(mut host) = Host::start(test, HostOptions::default()) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    // A line every millisecond: a kill lands in the middle of one often.
    let vm_id = common::boot_guest(&client, &[&common::testguest::cmdline::heartbeat_ms(1)]).await;
    let console = host.data_dir().join("vms").join(&vm_id).join("console.log");
    let heartbeats = || {
        let bytes = std::fs::read(&console).unwrap();
        String::from_utf8_lossy(&bytes).matches("TESTGUEST HEARTBEAT").count()
    };
    const KILLS: usize = 12;
    for _ in 0..KILLS {
        let before = heartbeats();
        host.kill();
        host.launch();
        // Output flows again before the next kill.
        let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
        while heartbeats() < before + 20 {
            assert!(std::time::Instant::now() < deadline, "the console never flowed again");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    let run_together: Vec<&str> = text.lines().filter(|line| line.matches("TESTGUEST").count() > 1).collect();
    assert_eq!(run_together, Vec::<&str>::new(), "lines that lost their end");
    // Beats are in order, never twice and none lost: the kernel moves the
    // console's bytes from the pipe into the file, so a kill takes none of
    // them with it, and the metald after it continues from the same pipe.
    let beat = |line: &str| line.strip_prefix("TESTGUEST HEARTBEAT n=")?.split(' ').next()?.parse::<u64>().ok();
    let broken: Vec<&str> = text.lines().filter(|line| line.starts_with("TESTGUEST HEARTBEAT") && beat(line).is_none()).collect();
    assert_eq!(broken, Vec::<&str>::new(), "heartbeat lines cut short");
    let beats: Vec<u64> = text.lines().filter_map(beat).collect();
    assert!(beats.windows(2).all(|pair| pair[0] < pair[1]), "heartbeats in order, once each: {beats:?}");
    let gaps: Vec<&[u64]> = beats.windows(2).filter(|pair| pair[1] != pair[0] + 1).collect();
    assert_eq!(gaps, Vec::<&[u64]>::new(), "beats lost over {KILLS} kills");
    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// The value of the sample `series` (name and labels as scraped) in an exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn scrape(host: &Host) -> String {
    common::http_get(host.port, "/metrics").unwrap().1
}

/// Waits until `series` has `value` in a scrape; the last scrape.
fn wait_for_sample(host: &Host, series: &str, value: f64) -> String {
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    loop {
        let metrics = scrape(host);
        if sample(&metrics, series) == Some(value) {
            return metrics;
        }
        assert!(std::time::Instant::now() < deadline, "{series} never became {value}:\n{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_an_operator_alerts_on_are_exported_and_every_one_is_documented() {
    let test = "the_metrics_an_operator_alerts_on_are_exported_and_every_one_is_documented";
    let Some(mut host) = Host::start(test, HostOptions { billing: true, uid_count: Some(64), ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let metrics = scrape(&host);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(sample(&metrics, &format!("metald_build_info{{version=\"{version}\",backend=\"firecracker\"}}")), Some(1.0), "{metrics}");
    assert!(sample(&metrics, "process_cpu_seconds_total").is_some(), "{metrics}");
    for series in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_threads"] {
        assert!(sample(&metrics, series).is_some_and(|value| value > 0.0), "{series}:\n{metrics}");
    }
    let started = sample(&metrics, "process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started <= now && started > now - 3600.0, "started {started}, now {now}");
    assert_eq!((sample(&metrics, "metald_uids"), sample(&metrics, "metald_uids_free")), (Some(64.0), Some(64.0)));
    assert_eq!(sample(&metrics, "metald_takeover_vms{outcome=\"taken_over\"}"), Some(0.0), "{metrics}");
    let pool = (sample(&metrics, "metald_jail_pool_ready"), sample(&metrics, "metald_jail_pool_size"));
    assert!(matches!(pool, (Some(ready), Some(size)) if ready <= size && size > 0.0), "{pool:?}:\n{metrics}");

    let heartbeat = common::testguest::cmdline::heartbeat_ms(100);
    let mut vms = Vec::new();
    for _ in 0..3 {
        vms.push(common::boot_guest(&client, &[&heartbeat]).await);
    }
    let metrics = scrape(&host);
    assert_eq!(sample(&metrics, "metald_uids_free"), Some(61.0), "each VM holds a uid");
    assert_eq!(sample(&metrics, "metald_vm_boot_duration_seconds_count"), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, "metald_vm_events_total{kind=\"booted\"}"), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, "metald_vm_events_total{kind=\"failed\"}"), Some(0.0), "every kind is present: {metrics}");

    // A VMM killed under metald is a failure; one killed while metald is away is lost at the takeover.
    let kill = |vm_id: &str| {
        let pid = common::vmm_pid(vm_id).expect("the VM's VMM");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    };
    kill(&vms[0]);
    wait_for_sample(&host, "metald_vm_events_total{kind=\"failed\"}", 1.0);
    host.kill();
    kill(&vms[1]);
    host.launch();
    let metrics = wait_for_sample(&host, "metald_takeover_vms{outcome=\"taken_over\"}", 1.0);
    assert_eq!(sample(&metrics, "metald_takeover_vms{outcome=\"lost\"}"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "metald_takeover_vms{outcome=\"stopped\"}"), Some(1.0), "{metrics}");
    assert_eq!(host.log().matches("VM failed while metald was away").count(), 1, "said once:\n{}", host.log());

    // Every metric metald exports is on the metrics page, by the name it is scraped as.
    let page = std::fs::read_to_string(common::testguest::workspace_root().join("docs/reference/metrics-reference.md")).unwrap();
    let mut undocumented = Vec::new();
    for line in metrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")) {
        let (name, kind) = line.split_once(' ').unwrap();
        let scraped = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
        if !page.contains(&format!("`{scraped}`")) {
            undocumented.push(scraped);
        }
    }
    assert_eq!(undocumented, Vec::<String>::new(), "not in docs/reference/metrics-reference.md");
    for vm_id in vms {
        client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    }
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_host_reboot_every_vm_boots_again_with_its_disks_and_addresses() {
    let test = "after_a_host_reboot_every_vm_boots_again_with_its_disks_and_addresses";
    let Some(mut host) = Host::start(test, HostOptions { network: true, ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    std::fs::write(host.dir.path().join("images/data.img"), vec![0u8; 1 << 20]).unwrap();
    let networked_with_disk = |restart: bool| {
        let mut config = common::guest_config(&[&common::testguest::cmdline::heartbeat_ms(100)]);
        config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
        config.storage.push(wire::StorageDevice { id: "data".into(), path: "data.img".into(), ..Default::default() });
        if restart {
            config.restart_policy = buffa::MessageField::some(wire::RestartPolicy { on_failure: true, ..Default::default() });
        }
        config
    };
    let info = |vm_id: String| {
        let client = client.clone();
        async move { client.get_vm_info(wire::GetVmInfoRequest { vm_id, ..Default::default() }).await.unwrap().into_owned() }
    };
    let address = |info: &wire::GetVmInfoResponse| info.network_info.as_option().expect("network facts").ipv6_address.clone();
    // One VM running, one shut down when the host goes, and one running that restarts on failure.
    let mut vms = Vec::new();
    for restart in [false, false, true] {
        let vm_id = common::boot_config(&client, networked_with_disk(restart)).await;
        vms.push(vm_id);
    }
    client.shutdown_vm(wire::ShutdownVmRequest { vm_id: vms[1].clone(), force: true, ..Default::default() }).await.unwrap();
    let addresses: Vec<String> = futures::future::join_all(vms.iter().map(|vm_id| info(vm_id.clone()))).await.iter().map(address).collect();
    // What the tenant wrote to its disk (the test guest writes none itself).
    let disks: Vec<PathBuf> = vms.iter().map(|vm_id| host.data_dir().join("vms").join(vm_id).join("drives/data.img")).collect();
    for (disk, vm_id) in disks.iter().zip(&vms) {
        let mut content = std::fs::read(disk).unwrap();
        content[..vm_id.len()].copy_from_slice(vm_id.as_bytes());
        std::fs::write(disk, content).unwrap();
    }

    // The host reboots: every process, namespace, link, nft table and cgroup goes; the disk stays.
    host.kill();
    for pid in host.live_vmms() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    while !host.live_vmms().is_empty() {
        assert!(std::time::Instant::now() < deadline, "VMMs outlived SIGKILL");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    host.simulate_reboot();
    host.launch();

    for (index, vm_id) in vms.iter().enumerate() {
        let found = info(vm_id.clone()).await;
        if index == 0 {
            assert_eq!(found.state.as_known(), Some(wire::VmState::VM_STATE_FAILED), "{found:?}");
            assert!(found.failure_reason.contains("its VMM was gone"), "{}", found.failure_reason);
        }
        if index < 2 {
            client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
        }
        // The third comes back by itself; waited for as its guest's ready line, printed anew.
        let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
        while info(vm_id.clone()).await.state.as_known() != Some(wire::VmState::VM_STATE_RUNNING) {
            assert!(std::time::Instant::now() < deadline, "{vm_id} never ran again:\n{}", host.log());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        common::wait_for_console(&client, vm_id, common::testguest::console::READY).await;
        let booted = info(vm_id.clone()).await;
        assert_eq!(booted.state.as_known(), Some(wire::VmState::VM_STATE_RUNNING));
        assert_eq!(address(&booted), addresses[index], "the VM keeps its address");
        assert!(booted.failure_reason.is_empty(), "{}", booted.failure_reason);
        assert!(std::fs::read(&disks[index]).unwrap().starts_with(vm_id.as_bytes()), "the VM keeps its disk");
    }
    assert!(host.nft_table_exists());
    for vm_id in vms {
        client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    }
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_whose_vmm_dies_is_restarted_as_its_policy_says_up_to_its_limit_and_a_failed_vm_boots_by_hand() {
    let test = "a_vm_whose_vmm_dies_is_restarted_as_its_policy_says_up_to_its_limit_and_a_failed_vm_boots_by_hand";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let create = |restart: Option<wire::RestartPolicy>| {
        let client = client.clone();
        async move {
            let mut config = common::guest_config(&[&common::testguest::cmdline::heartbeat_ms(100)]);
            config.restart_policy = restart.map_or_else(buffa::MessageField::none, buffa::MessageField::some);
            common::boot_config(&client, config).await
        }
    };
    let kill_vmm = |vm_id: &str| {
        let pid = common::vmm_pid(vm_id).expect("a VMM");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        pid
    };
    let restarting = create(Some(wire::RestartPolicy { on_failure: true, max_restarts: 2, ..Default::default() })).await;
    let staying = create(None).await;
    let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: restarting.clone(), ..Default::default() }).await.unwrap().into_owned();
    assert_eq!(info.config.restart_policy.as_option().map(|policy| (policy.on_failure, policy.max_restarts)), Some((true, 2)));

    kill_vmm(&staying);
    for restart in 1..=2 {
        let killed = kill_vmm(&restarting);
        // Backs off 1 s, then 2 s: waited for as facts, a new VMM whose guest runs.
        let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
        while common::vmm_pid(&restarting).is_none_or(|pid| pid == killed)
            || common::state_of(&client, &restarting).await != wire::VmState::VM_STATE_RUNNING
        {
            assert!(std::time::Instant::now() < deadline, "restart {restart} never came:\n{}", host.log());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(host.log().contains(&format!("restart={restart} of=2")), "{}", host.log());
    }
    kill_vmm(&restarting);
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    while !host.log().contains("the VM stays failed: its restart policy allows no more restarts") {
        assert!(std::time::Instant::now() < deadline, "{}", host.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for vm_id in [&restarting, &staying] {
        assert_eq!(common::state_of(&client, vm_id).await, wire::VmState::VM_STATE_FAILED, "{vm_id}");
        // By hand, a failed VM boots in a fresh VMM.
        client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
        common::wait_for_console(&client, vm_id, common::testguest::console::READY).await;
        let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(info.state.as_known(), Some(wire::VmState::VM_STATE_RUNNING));
        assert!(info.failure_reason.is_empty(), "{}", info.failure_reason);
    }
    for vm_id in [restarting, staying] {
        client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    }
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_is_an_audit_trail_of_every_change_with_who_asked_and_says_at_start_what_the_host_is() {
    let test = "the_log_is_an_audit_trail_of_every_change_with_who_asked_and_says_at_start_what_the_host_is";
    let Some(host) = Host::start(test, HostOptions { network: true, billing: true, ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let vm_id = common::boot_guest(&client, &[&common::testguest::cmdline::heartbeat_ms(100)]).await;
    let id = || vm_id.clone();
    client.pause_vm(wire::PauseVmRequest { vm_id: id(), ..Default::default() }).await.unwrap();
    client.resume_vm(wire::ResumeVmRequest { vm_id: id(), ..Default::default() }).await.unwrap();
    client.reboot_vm(wire::RebootVmRequest { vm_id: id(), force: true, ..Default::default() }).await.unwrap();
    client.shutdown_vm(wire::ShutdownVmRequest { vm_id: id(), force: true, ..Default::default() }).await.unwrap();
    client.delete_vm(wire::DeleteVmRequest { vm_id: id(), ..Default::default() }).await.unwrap();
    let stranger = host.client_with_token(Some("not-a-token"), Wire::ConnectProto);
    stranger.list_vms(wire::ListVmsRequest::default()).await.unwrap_err();

    let log = host.log();
    let line_of = |words: &[&str]| log.lines().find(|line| words.iter().all(|word| line.contains(word))).map(str::to_owned);
    let start = line_of(&["metald starting"]).unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert!(start.contains(env!("CARGO_PKG_VERSION")) && start.contains(&host.config_path.display().to_string()), "{start}");
    assert!(line_of(&["VM networking on", "fd6d:7465:7374::/48"]).is_some(), "the prefix to route:\n{log}");
    assert!(line_of(&["billing on", "usage.jsonl"]).is_some(), "where usage goes:\n{log}");
    for change in ["VM created", "VM booted", "VM paused", "VM resumed", "VM rebooted", "VM stopped", "VM deleted"] {
        let line = line_of(&[change, &vm_id]).unwrap_or_else(|| panic!("no {change:?} line:\n{log}"));
        assert!(line.contains(" INFO ") && line.contains("client=127.0.0.1:") && line.contains("tenant=acme"), "{line}");
    }
    let refused = line_of(&["call refused"]).unwrap_or_else(|| panic!("no refusal line:\n{log}"));
    assert!(refused.contains("client=127.0.0.1:") && refused.contains("ListVms"), "{refused}");
    let noise: Vec<&str> = log.lines().filter(|line| line.contains("otel.") || line.contains("rpc.system")).collect();
    assert_eq!(noise, Vec::<&str>::new(), "fields for traces only are left out of the log");
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}
