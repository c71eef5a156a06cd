//! The jail pool of a real metald: its waiting children become VMMs of
//! one VM each, die with a metald that is killed, are swept with their
//! cgroups by the next start, and are gone when metald stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Host, HostOptions, Wire, create_request, guest_config};
use metald_api::proto::vmprovisioner::v1 as wire;

const PATIENCE: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The pool cgroups under the host's cgroup parent, by name.
fn pool_cgroups(host: &Host) -> BTreeSet<String> {
    host.cgroup_parents()
        .iter()
        .filter_map(|parent| std::fs::read_dir(parent).ok())
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(metald_testguest::JAIL_POOL_PREFIX))
        .collect()
}

fn waiting(host: &Host) -> BTreeSet<u32> {
    metald_testguest::jail_pool_processes(Path::new(&host.cgroup_parent)).into_iter().collect()
}

#[test]
fn pool_parts_serve_one_vm_each_die_with_metald_and_are_swept_by_the_next_start() {
    let test = "pool_parts_serve_one_vm_each_die_with_metald_and_are_swept_by_the_next_start";
    let Some(mut host) = Host::start(test, HostOptions::default()) else { return };
    let runtime = runtime();
    runtime.block_on(metald_testguest::wait_until("two children waiting in the pool", PATIENCE, || {
        std::future::ready(waiting(&host).len() == 2 && pool_cgroups(&host).len() == 2)
    }));
    let before = waiting(&host);
    let client = host.client("acme", Wire::ConnectProto);
    let vm_id = runtime.block_on(async { client.create_vm(create_request(guest_config(&[]))).await.unwrap().into_owned().vm_id });
    let vmms = host.live_vmms();
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    assert!(before.contains(&vmms[0]), "the create took a waiting child: {vmms:?} of {before:?}");
    let vm_cgroup_named_for_it = host.cgroup_parents().iter().any(|parent| {
        std::fs::read_dir(parent)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with(&format!("{vm_id}.")))
    });
    assert!(vm_cgroup_named_for_it, "the VM's cgroup is named for it");
    let still_waiting: BTreeSet<u32> = waiting(&host);
    let old_pool = pool_cgroups(&host);

    host.kill();
    runtime.block_on(metald_testguest::wait_until("the waiting children to die with metald", PATIENCE, || {
        std::future::ready(still_waiting.iter().all(|pid| !metald_testguest::process_alive(*pid)))
    }));
    assert_eq!(host.live_vmms(), vmms, "the VMM outlives metald");

    host.launch();
    let swept = pool_cgroups(&host);
    assert!(swept.is_disjoint(&old_pool), "the earlier run's pool cgroups {old_pool:?} were swept, found {swept:?}");
    runtime.block_on(metald_testguest::wait_until("the new pool to fill", PATIENCE, || std::future::ready(waiting(&host).len() == 2)));
    assert!(waiting(&host).is_disjoint(&before), "no child of the earlier run is used again");
    let client = host.client("acme", Wire::ConnectProto);
    runtime.block_on(async {
        let info = client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap().into_owned();
        assert_eq!(info.state.as_known(), Some(wire::VmState::VM_STATE_CREATED), "the VM was taken over");
        client.delete_vm(wire::DeleteVmRequest { vm_id, ..Default::default() }).await.unwrap();
    });
    assert!(host.terminate().success());
    assert!(host.leftovers().is_empty(), "left behind: {:?}", host.leftovers());
}
