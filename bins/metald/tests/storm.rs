//! A lifecycle storm: 100 VMs driven by 8 clients at once, over every
//! protocol, with clients also poking each other's VMs. Every answer is a
//! success or a clear refusal (the VM is in another state, or gone), the
//! states the API reports agree with the processes on the host, and at
//! the end nothing is left.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{Host, HostOptions, Wire, create_request, guest_config};
use connectrpc::{ConnectError, ErrorCode};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;

const CLIENTS: usize = 8;
const VMS: usize = 100;

/// A refusal a racing client may get; anything else fails the test.
fn tolerated<T>(result: Result<T, ConnectError>, what: &str) {
    if let Err(error) = result {
        assert!(
            matches!(error.code, ErrorCode::FailedPrecondition | ErrorCode::NotFound),
            "{what}: {:?} {}",
            error.code,
            error.message.unwrap_or_default()
        );
    }
}

#[test]
fn a_storm_of_100_vms_from_8_clients_leaves_consistent_states_and_nothing_behind() {
    let test = "a_storm_of_100_vms_from_8_clients_leaves_consistent_states_and_nothing_behind";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    runtime.block_on(async {
        let wires = [Wire::ConnectJson, Wire::ConnectProto, Wire::Grpc, Wire::GrpcWeb];
        // Phase 1: every client creates and boots its share, all at once.
        let creators = (0..CLIENTS).map(|index| {
            let client = host.client("acme", wires[index % wires.len()]);
            let share = VMS / CLIENTS + usize::from(index < VMS % CLIENTS);
            async move {
                let mut mine = Vec::new();
                for _ in 0..share {
                    let created = client.create_vm(create_request(guest_config(&[]))).await.expect("CreateVm").into_owned();
                    client.boot_vm(wire::BootVmRequest { vm_id: created.vm_id.clone(), ..Default::default() }).await.expect("BootVm");
                    mine.push(created.vm_id);
                }
                mine
            }
        });
        let shares: Vec<Vec<String>> = futures::future::join_all(creators).await;
        let client = host.client("acme", Wire::ConnectProto);
        let list = client.list_vms(wire::ListVmsRequest { page_size: 1000, ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(list.total_count as usize, VMS);
        assert!(list.vms.iter().all(|vm| vm.state.as_known() == Some(VmState::VM_STATE_RUNNING)), "all running");
        assert_eq!(host.live_vmms().len(), VMS, "one VMM per VM");
        // Pages of 7 walk every VM once, in id order, each page telling the total.
        let (mut walked, mut token) = (Vec::new(), String::new());
        loop {
            let page = client
                .list_vms(wire::ListVmsRequest { page_size: 7, page_token: token.clone(), ..Default::default() })
                .await
                .unwrap()
                .into_owned();
            assert_eq!(page.total_count as usize, VMS);
            assert!(page.vms.len() <= 7);
            walked.extend(page.vms.iter().map(|vm| vm.vm_id.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let mut sorted = walked.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!((walked.len(), &walked), (VMS, &sorted), "every VM once, in order");
        let paused_only = client
            .list_vms(wire::ListVmsRequest { state_filter: vec![VmState::VM_STATE_PAUSED.into()], ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        assert_eq!((paused_only.total_count, paused_only.vms.len()), (0, 0));

        // Phase 2: each client takes its VMs through pause, resume and a
        // stop, while poking a neighbour's VMs with the same calls.
        let workers = shares.iter().enumerate().map(|(index, mine)| {
            let client = host.client("acme", wires[(index + 1) % wires.len()]);
            let neighbours = shares[(index + 1) % CLIENTS].clone();
            let mine = mine.clone();
            async move {
                for (turn, vm_id) in mine.iter().enumerate() {
                    let other = neighbours[turn % neighbours.len()].clone();
                    tolerated(client.pause_vm(wire::PauseVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await, "pause");
                    tolerated(client.pause_vm(wire::PauseVmRequest { vm_id: other.clone(), ..Default::default() }).await, "pause other");
                    tolerated(client.resume_vm(wire::ResumeVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await, "resume");
                    tolerated(client.resume_vm(wire::ResumeVmRequest { vm_id: other.clone(), ..Default::default() }).await, "resume other");
                    if turn % 2 == 0 {
                        let stop = wire::ShutdownVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() };
                        tolerated(client.shutdown_vm(stop).await, "shutdown");
                    } else {
                        tolerated(
                            client.reboot_vm(wire::RebootVmRequest { vm_id: vm_id.clone(), force: true, ..Default::default() }).await,
                            "reboot",
                        );
                    }
                    tolerated(client.boot_vm(wire::BootVmRequest { vm_id: other, ..Default::default() }).await, "boot other");
                }
            }
        });
        futures::future::join_all(workers).await;

        // The API's states agree with the host: a VMM runs exactly for the VMs that say so.
        let list = client.list_vms(wire::ListVmsRequest { page_size: 1000, ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(list.total_count as usize, VMS);
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for vm in &list.vms {
            *states.entry(format!("{:?}", vm.state.as_known().unwrap())).or_default() += 1;
        }
        let with_vmm = list
            .vms
            .iter()
            .filter(|vm| {
                matches!(vm.state.as_known(), Some(VmState::VM_STATE_RUNNING | VmState::VM_STATE_PAUSED | VmState::VM_STATE_CREATED))
            })
            .count();
        assert_eq!(host.live_vmms().len(), with_vmm, "{states:?}");
        assert!(!states.contains_key("VM_STATE_FAILED"), "no VM failed: {states:?}");
        for vm in list.vms.iter().take(10) {
            let info =
                client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm.vm_id.clone(), ..Default::default() }).await.unwrap().into_owned();
            assert_eq!(info.state, vm.state, "GetVmInfo and ListVms agree on {}", vm.vm_id);
        }

        // Phase 3: everyone deletes, in parallel.
        let deleters = shares.into_iter().enumerate().map(|(index, mine)| {
            let client = host.client("acme", wires[index % wires.len()]);
            async move {
                for vm_id in mine {
                    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.expect("DeleteVm");
                }
            }
        });
        futures::future::join_all(deleters).await;
        let list = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
        assert_eq!(list.total_count, 0);
    });
    let metrics = common::http_get(host.port, "/metrics").unwrap().1;
    for line in metrics.lines().filter(|line| line.starts_with("metald_vms{")) {
        assert!(line.ends_with(" 0"), "no VM counted after the storm: {line}");
    }
    assert!(!metrics.contains("code=\"internal\""), "no internal errors:\n{metrics}");
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
