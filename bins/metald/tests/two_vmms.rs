//! One host, both VMMs: a tenant's Firecracker VM and Cloud Hypervisor VM
//! side by side through the real daemon, networked, through every move,
//! a SIGKILL of metald with both running, and a delete that leaves
//! nothing. No registry here ships Cloud Hypervisor, so CI has none: built
//! ignored, saying why, unless `METALD_CLOUD_HYPERVISOR_BIN` names one at
//! build time (`bins/metald/build.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Client, Host, HostOptions, Wire, state_of, wait_for_console};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;
use metald_testguest::console;

/// Waits until the VM's console holds at least `count` ready lines.
async fn wait_for_ready_lines(client: &Client, vm_id: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data =
            client.get_console(wire::GetConsoleRequest { vm_id: vm_id.into(), ..Default::default() }).await.unwrap().into_owned().data;
        let text = String::from_utf8_lossy(&data).into_owned();
        if metald_testguest::finished_lines(&text).filter(|line| line.starts_with(console::READY)).count() >= count {
            return;
        }
        assert!(Instant::now() < deadline, "VM {vm_id} has not printed {count} ready lines:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
#[cfg_attr(
    not(cloud_hypervisor_available),
    ignore = "needs a real Cloud Hypervisor, which no registry here ships: build it and set METALD_CLOUD_HYPERVISOR_BIN"
)]
fn a_firecracker_vm_and_a_cloud_hypervisor_vm_run_side_by_side_and_outlive_a_killed_daemon() {
    let test = "a_firecracker_vm_and_a_cloud_hypervisor_vm_run_side_by_side_and_outlive_a_killed_daemon";
    let Some(binary) = metald_testguest::require_cloud_hypervisor(test) else { return };
    let options = HostOptions { network: true, billing: true, cloud_hypervisor: Some(binary), ..HostOptions::default() };
    let Some(mut host) = Host::start(test, options) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let vms = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectJson);
        let mut vms = Vec::new();
        for vmm in ["firecracker", "cloud-hypervisor"] {
            let mut config = common::guest_config(&[]);
            config.vmm = vmm.into();
            config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
            let created = client.create_vm(common::create_request(config)).await.expect("CreateVm").into_owned();
            client.boot_vm(wire::BootVmRequest { vm_id: created.vm_id.clone(), ..Default::default() }).await.expect("BootVm");
            let ready = wait_for_console(&client, &created.vm_id, console::READY).await;
            assert!(ready.contains("metald.eth0.ipv6="), "{vmm}: the guest is told its address: {ready}");
            let info = client
                .get_vm_info(wire::GetVmInfoRequest { vm_id: created.vm_id.clone(), ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            assert_eq!(info.config.as_option().map(|config| config.vmm.as_str()), Some(vmm), "GetVmInfo says which VMM runs it");
            let capabilities = (info.backend_info["vmm_capabilities"].as_str(), info.backend_info["vmm_max_vcpus"].as_str());
            let expected = match vmm {
                "firecracker" => ("graceful_shutdown,pause,separate_rx_tx_rate_limits", "32"),
                _ => ("reboot,graceful_shutdown,pause,cpu_hotplug,cpu_topology,memory_hotplug", "254"),
            };
            assert_eq!(capabilities, expected, "{vmm}: GetVmInfo says what its VMM can do");
            vms.push((vmm, created.vm_id));
        }
        for (vmm, vm_id) in &vms {
            client.pause_vm(wire::PauseVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            assert_eq!(state_of(&client, vm_id).await, VmState::VM_STATE_PAUSED, "{vmm}");
            client.resume_vm(wire::ResumeVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            let pid = common::vmm_pid(vm_id).expect("a VMM");
            client.reboot_vm(wire::RebootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            wait_for_ready_lines(&client, vm_id, 2).await;
            assert_eq!(state_of(&client, vm_id).await, VmState::VM_STATE_RUNNING, "{vmm}");
            let same_process = common::vmm_pid(vm_id) == Some(pid);
            assert_eq!(same_process, *vmm == "cloud-hypervisor", "{vmm}: Cloud Hypervisor reboots in place, Firecracker in a fresh VMM");
            let stopped =
                client.shutdown_vm(wire::ShutdownVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap().into_owned();
            assert!(!stopped.killed, "{vmm}: the guest shut down when asked");
            client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            wait_for_ready_lines(&client, vm_id, 3).await;
        }
        vms
    });
    let pids: Vec<u32> = vms.iter().map(|(_, vm_id)| common::vmm_pid(vm_id).expect("a VMM")).collect();
    let vm_ids: Vec<String> = vms.iter().map(|(_, vm_id)| vm_id.clone()).collect();
    // The last boot's life, from here on, is metered without a break (the stops before are breaks).
    let last_boot_up = metald_types::time::unix_millis_now();
    host.wait_for_records_after(&vm_ids, last_boot_up);

    host.kill();
    let restarted_at = metald_types::time::unix_millis_now();
    host.launch();
    runtime.block_on(async {
        let client = host.client("acme", Wire::Grpc);
        for ((vmm, vm_id), pid) in vms.iter().zip(&pids) {
            assert_eq!(state_of(&client, vm_id).await, VmState::VM_STATE_RUNNING, "{vmm}");
            assert_eq!(common::vmm_pid(vm_id), Some(*pid), "{vmm}: the same VMM, taken over");
            client.pause_vm(wire::PauseVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            client.resume_vm(wire::ResumeVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
        }
    });
    // Metered on after the takeover: since the last boot, one unbroken chain per VM.
    host.wait_for_records_after(&vm_ids, restarted_at + 300);
    let by_vm = host.usage_by_vm();
    for (vmm, vm_id) in &vms {
        let records: Vec<_> = by_vm[vm_id].iter().copied().filter(|record| record.2 > last_boot_up).collect();
        common::assert_contiguous(&format!("{vmm} {vm_id}"), &records);
        assert!(records.iter().any(|r| r.1 < restarted_at && r.2 > restarted_at), "{vmm}: one record spans the daemon's absence");
    }
    runtime.block_on(async {
        let client = host.client("acme", Wire::Grpc);
        for (_, vm_id) in &vms {
            // The console is still captured after the takeover: the reboot's ready line is in it.
            client.reboot_vm(wire::RebootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
            wait_for_ready_lines(&client, vm_id, 4).await;
            client.delete_vm(wire::DeleteVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
        }
    });
    assert_eq!(host.nft_set_elements(), Vec::<String>::new(), "the deletes took their ports' firewall elements");
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

/// Each VMM's VM is billed into ClickHouse exactly the CPU its cgroups
/// counted (metered to its end, never paused), a Cloud Hypervisor VM
/// rebooted in place in one VMM's cgroup and a Firecracker VM in two. Asking Cloud Hypervisor for more vCPUs than it has is refused
/// naming the field and the VMM, and leaves nothing.
#[test]
#[cfg_attr(
    not(cloud_hypervisor_available),
    ignore = "needs a real Cloud Hypervisor, which no registry here ships: build it and set METALD_CLOUD_HYPERVISOR_BIN"
)]
fn each_vmm_is_billed_into_clickhouse_exactly_the_cpu_its_cgroups_counted() {
    let test = "each_vmm_is_billed_into_clickhouse_exactly_the_cpu_its_cgroups_counted";
    let Some(binary) = metald_testguest::require_cloud_hypervisor(test) else { return };
    let Some(server) = metald_testguest::clickhouse::require_clickhouse(test) else { return };
    let options =
        HostOptions { billing: true, clickhouse_url: Some(server.url()), cloud_hypervisor: Some(binary), ..HostOptions::default() };
    let Some(host) = Host::start(test, options) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let vms = runtime.block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let mut too_many = common::guest_config(&[]);
        too_many.vmm = "cloud-hypervisor".into();
        too_many.cpu.get_or_insert_default().vcpu_count = 255;
        let refused = client.create_vm(common::create_request(too_many)).await.unwrap_err();
        assert_eq!(refused.code, connectrpc::ErrorCode::InvalidArgument, "{refused:?}");
        assert_eq!(
            refused.message.as_deref(),
            Some("cpu.vcpu_count: 255 is more than the cloud-hypervisor backend allows (254)"),
            "{refused:?}"
        );
        assert_eq!(host.leftovers(), Vec::<String>::new(), "a refused create makes nothing");

        let mut vms = Vec::new();
        for vmm in ["firecracker", "cloud-hypervisor"] {
            let mut config = common::guest_config(&[]);
            config.vmm = vmm.into();
            let created = client.create_vm(common::create_request(config)).await.expect("CreateVm").into_owned();
            client.boot_vm(wire::BootVmRequest { vm_id: created.vm_id.clone(), ..Default::default() }).await.expect("BootVm");
            wait_for_ready_lines(&client, &created.vm_id, 1).await;
            client.reboot_vm(wire::RebootVmRequest { vm_id: created.vm_id.clone(), ..Default::default() }).await.unwrap();
            wait_for_ready_lines(&client, &created.vm_id, 2).await;
            let stopped = client
                .shutdown_vm(wire::ShutdownVmRequest { vm_id: created.vm_id.clone(), ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            assert!(!stopped.killed, "{vmm}: the guest shut down when asked");
            client.delete_vm(wire::DeleteVmRequest { vm_id: created.vm_id.clone(), ..Default::default() }).await.unwrap();
            vms.push((vmm, created.vm_id));
        }
        host.wait_until_billed().await;
        vms
    });
    let removed = common::cgroups::removed_cgroups(host.dir.path());
    let sink = metald_billing::clickhouse::ClickHouseSink::new(&server.url(), "metald", test);
    for (vmm, vm_id) in &vms {
        let query = format!(
            "SELECT count(), uniqExact(sequence), sum(cpu_ns), countIf(final_record = 1) FROM metald.{} WHERE vm_id = ?",
            metald_billing::clickhouse::USAGE_TABLE
        );
        let (rows, sequences, charged_ns, finals): (u64, u64, u64, u64) =
            runtime.block_on(sink.client().query(&query).bind(vm_id.as_str()).fetch_one()).unwrap();
        let cgroups = removed.get(vm_id).cloned().unwrap_or_default();
        let counted_ns: u64 = cgroups.iter().map(|cgroup| cgroup.cpu_ns).sum();
        let vmm_processes = if *vmm == "cloud-hypervisor" { 1 } else { 2 };
        eprintln!("{vmm} {vm_id}: {rows} rows, {charged_ns} ns charged, {counted_ns} ns counted by {} cgroups", cgroups.len());
        assert_eq!(rows, sequences, "{vmm}: each row once");
        assert!(rows > 0 && charged_ns > 0, "{vmm}: metered");
        assert_eq!(cgroups.len(), vmm_processes, "{vmm}: a cgroup per VMM process");
        assert_eq!(finals, 1, "{vmm}: one final record, at the shutdown (a reboot does not end the VM's metered life)");
        assert_eq!(charged_ns, counted_ns, "{vmm}: the charge is the cgroups' count, to the nanosecond");
    }
    drop(runtime);
    let mut host = host;
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
