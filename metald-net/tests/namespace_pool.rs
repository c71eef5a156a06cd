//! The pool of ready network namespaces: each goes to one VM only, the ones
//! no VM got have no name, and none outlives the provider that made it.
//! Deleted VMs' namespaces are held without a name until their batch is
//! released, and never go to another VM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::NetSandbox;
use metald_core::VmId;
use metald_testguest::wait_until;

const POOL: usize = 2;
const DEADLINE: Duration = Duration::from_secs(60);

fn inode_of(sandbox: &NetSandbox, vm: &str) -> u64 {
    let namespace = sandbox.provider.open_namespace(&VmId::new(vm).unwrap()).unwrap();
    std::fs::File::from(namespace).metadata().unwrap().ino()
}

/// Network namespaces this process still holds a descriptor of, by inode
/// (of the namespace filesystem, whatever path the descriptor was opened by).
fn held_by_this_process() -> HashSet<u64> {
    let namespaces = std::fs::metadata("/proc/self/ns/net").unwrap().dev();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::metadata(entry.path()).ok())
        .filter(|target| target.dev() == namespaces)
        .map(|target| target.ino())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pooled_namespace_goes_to_one_vm_and_the_unused_ones_die_with_the_provider() {
    let test = "each_pooled_namespace_goes_to_one_vm_and_the_unused_ones_die_with_the_provider";
    let Some(sandbox) = NetSandbox::with(test, |config| config.namespace_pool = POOL).await else { return };
    let pool = sandbox.provider.namespace_pool();
    wait_until("the pool to fill", DEADLINE, || async { pool.ready() == POOL }).await;
    let filled: HashSet<u64> = pool.ready_inodes().into_iter().collect();
    assert_eq!(filled.len(), POOL);
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name), "a pooled namespace has no name");

    // More VMs than the pool holds, of two tenants: the pool is drained and refilled.
    let vms = [("vm-a", "acme"), ("vm-b", "globex"), ("vm-c", "acme"), ("vm-d", "globex"), ("vm-e", "acme")];
    let mut given = HashSet::new();
    for (vm, tenant) in vms {
        sandbox.attach(vm, tenant).await;
        let inode = inode_of(&sandbox, vm);
        assert!(given.insert(inode), "{vm} got namespace {inode}, which another VM has");
        assert!(!pool.ready_inodes().contains(&inode), "{vm}'s namespace is still in the pool");
    }
    assert!(given.intersection(&filled).count() >= 1, "the first VM got a pooled namespace");

    wait_until("the pool to refill", DEADLINE, || async { pool.ready() == POOL }).await;
    let unused: HashSet<u64> = pool.ready_inodes().into_iter().collect();
    assert!(unused.is_disjoint(&given), "a namespace given to a VM is back in the pool");
    for (vm, _) in vms {
        sandbox.detach(vm).await;
    }
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name));

    // The ones no VM got are held by the provider's descriptors alone: gone with it.
    drop(sandbox);
    wait_until("the unused namespaces to be released", DEADLINE, || {
        let unused = unused.clone();
        async move { held_by_this_process().is_disjoint(&unused) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pool_each_attach_makes_its_namespace() {
    let test = "without_a_pool_each_attach_makes_its_namespace";
    let Some(sandbox) = NetSandbox::with(test, |config| config.namespace_pool = 0).await else { return };
    sandbox.attach("vm-a", "acme").await;
    assert_eq!(sandbox.provider.namespace_pool().ready(), 0);
    assert_eq!(sandbox.namespaces_left().len(), 2, "the host's and vm-a's");
    sandbox.detach("vm-a").await;
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_vms_namespace_is_held_unnamed_until_its_batch_and_never_given_again() {
    let test = "a_deleted_vms_namespace_is_held_unnamed_until_its_batch_and_never_given_again";
    let Some(sandbox) = NetSandbox::with(test, |config| config.namespace_release_batch = 3).await else { return };
    let retired = sandbox.provider.retired_namespaces();
    let mut deleted = HashSet::new();
    for (vm, tenant) in [("vm-a", "acme"), ("vm-b", "globex")] {
        sandbox.attach(vm, tenant).await;
        deleted.insert(inode_of(&sandbox, vm));
        sandbox.detach(vm).await;
    }
    assert_eq!(retired.held(), 2);
    assert_eq!(sandbox.namespaces_left(), std::slice::from_ref(&sandbox.host_name), "a deleted VM's namespace has no name");
    assert!(deleted.is_subset(&held_by_this_process()), "the provider holds the deleted VMs' namespaces");
    assert!(sandbox.provider.namespace_pool().ready_inodes().iter().all(|inode| !deleted.contains(inode)));

    sandbox.attach("vm-c", "acme").await;
    let third = inode_of(&sandbox, "vm-c");
    assert!(!deleted.contains(&third), "vm-c got the namespace of a deleted VM");
    deleted.insert(third);
    sandbox.detach("vm-c").await;
    assert_eq!(retired.held(), 0, "the third delete released the batch");
    assert!(held_by_this_process().is_disjoint(&deleted));

    // Fewer than a batch: released with the provider.
    sandbox.attach("vm-d", "acme").await;
    let last = inode_of(&sandbox, "vm-d");
    sandbox.detach("vm-d").await;
    assert_eq!(retired.held(), 1);
    drop(sandbox);
    wait_until("the held namespace to be released", DEADLINE, || async move { !held_by_this_process().contains(&last) }).await;
}
