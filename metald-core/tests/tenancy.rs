//! A tenant's operation acts only on that tenant's VM, checked on the VM
//! the manager holds locked: a VM id that passed from one tenant to another
//! between a caller's look and its act is not acted on (real Firecracker,
//! jailed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Sandbox;
use metald_core::operations::{Boot, Delete, Info, Metrics, Pause, Reboot, Resume, Shutdown};
use metald_core::{CreateVm, ManagerError, StopOptions, TenantId, VmId, VmState, VmTarget};

fn forced() -> StopOptions {
    StopOptions { force: true, timeout: None }
}

fn not_found<T: std::fmt::Debug>(what: &str, result: Result<T, ManagerError>) {
    assert!(matches!(result, Err(ManagerError::NotFound(_))), "{what}: {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_id_that_passed_to_another_tenant_between_a_look_and_an_act_is_not_acted_on() {
    let test = "a_vm_id_that_passed_to_another_tenant_between_a_look_and_an_act_is_not_acted_on";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let manager = &sandbox.manager;
    let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
    let id = VmId::new("shared-id").unwrap();
    let create = |tenant: &TenantId| CreateVm { vm_id: Some(id.clone()), tenant: tenant.clone(), config: sandbox.guest_config(&[]) };

    // acme looks at its VM (what an API call does before acting)...
    manager.create(create(&acme)).await.unwrap();
    let acmes = VmTarget::of_tenant(&acme, &id);
    assert_eq!(manager.summary(&acmes).unwrap().tenant, acme);
    // ...the VM is deleted and globex creates one under the same id before acme's act lands.
    manager.run(&acmes, Delete(forced())).await.unwrap();
    manager.create(create(&globex)).await.unwrap();
    manager.run(VmTarget::of_tenant(&globex, &id), Boot).await.unwrap();
    let mut events = manager.subscribe();
    not_found("pause", manager.run(&acmes, Pause).await);
    not_found("resume", manager.run(&acmes, Resume).await);
    not_found("boot", manager.run(&acmes, Boot).await);
    not_found("reboot", manager.run(&acmes, Reboot(forced())).await);
    not_found("shutdown", manager.run(&acmes, Shutdown(forced())).await);
    not_found("delete", manager.run(&acmes, Delete(forced())).await);
    not_found("info", manager.run(&acmes, Info).await);
    not_found("metrics", manager.run(&acmes, Metrics).await);
    not_found("console", manager.console_tail(&acmes, 100));
    not_found("state", manager.state(&acmes));
    not_found("summary", manager.summary(&acmes));
    assert_eq!(manager.state(VmTarget::of_tenant(&globex, &id)).unwrap(), VmState::Running, "globex's VM runs on");
    assert!(events.try_recv().is_err(), "no act reached globex's VM");
    manager.run(VmTarget::of_tenant(&globex, &id), Delete(forced())).await.unwrap();

    // The race made likely: acme deletes the id over and over while it passes
    // between acme and globex; every VM globex creates survives until globex
    // deletes it itself.
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (manager, stop, attempts, acmes) = (manager.clone(), Arc::clone(&stop), Arc::clone(&attempts), acmes.clone());
        tokio::spawn(async move {
            let mut deleted = 0u32;
            while !stop.load(Ordering::SeqCst) {
                if manager.run(&acmes, Delete(forced())).await.is_ok() {
                    deleted += 1;
                }
                attempts.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
            deleted
        })
    };
    let globexs = VmTarget::of_tenant(&globex, &id);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    while rounds < 20 {
        assert!(Instant::now() < deadline, "the id never came free for 20 rounds");
        // acme holds the id for a moment: the attacker's deletes are acme's own then.
        if manager.create(create(&acme)).await.is_ok() {
            let held = attempts.load(Ordering::SeqCst);
            while manager.state(&acmes).is_ok() && attempts.load(Ordering::SeqCst) < held + 3 {
                tokio::task::yield_now().await;
            }
        }
        match manager.create(create(&globex)).await {
            Ok(_) => {}
            Err(ManagerError::AlreadyExists(_)) => continue,
            Err(error) => panic!("globex's create: {error}"),
        }
        // Globex's VM stands while acme's deletes keep coming...
        let since = attempts.load(Ordering::SeqCst);
        while attempts.load(Ordering::SeqCst) < since + 5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(manager.state(&globexs).unwrap(), VmState::Created, "round {rounds}: acme's delete reached globex's VM");
        // ...until globex deletes it.
        manager.run(&globexs, Delete(forced())).await.unwrap_or_else(|error| panic!("round {rounds}: globex's own delete: {error}"));
        rounds += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let deleted = attacker.await.unwrap();
    eprintln!("{rounds} rounds; acme's racing deletes removed {deleted} of acme's own VMs and none of globex's");
    assert!(deleted > 0, "the attacker's deletes raced with acme's own VMs");
    assert_eq!(sandbox.leftovers(), Vec::<String>::new());
}
