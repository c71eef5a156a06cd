//! The conformance suite against the real Firecracker on /dev/kvm, jailed,
//! with the test guest: the suite a new backend must pass too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{BOOT_TIMEOUT, Sandbox};
use conformance::{Guest, Subject};
use metald_core::store::{SqliteVmStore, VmStore};
use metald_core::{VmConfig, VmId, VmManager};
use metald_testguest::{cmdline, console};

/// A sandbox host with a store its managers share.
pub struct Firecracker {
    sandbox: Sandbox,
    store: Arc<SqliteVmStore>,
    /// How many ready lines of each VM's console a wait has seen, so each
    /// wait is for the guest of the boot before it.
    ready_seen: Mutex<HashMap<VmId, usize>>,
}

impl std::fmt::Debug for Firecracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firecracker").field("sandbox", &self.sandbox.dir.path()).finish_non_exhaustive()
    }
}

impl Subject for Firecracker {
    fn new(test: &str) -> Option<Self> {
        let sandbox = Sandbox::new(test)?;
        let store = Arc::new(SqliteVmStore::open(sandbox.dir.path().join("vms.db")).unwrap());
        Some(Self { sandbox, store, ready_seen: Mutex::default() })
    }

    fn manager(&self) -> VmManager {
        VmManager::builder()
            .backend(Sandbox::jailed(Sandbox::firecracker_config(&self.sandbox.firecracker), &self.sandbox.jail))
            .image_root(&self.sandbox.images)
            .vm_root(&self.sandbox.vms)
            .stop_timeout(Duration::from_secs(10))
            .store(Arc::clone(&self.store) as Arc<dyn VmStore>)
            .build()
            .unwrap()
    }

    fn config(&self, guest: Guest) -> VmConfig {
        match guest {
            Guest::Runs => self.sandbox.guest_config(&[]),
            Guest::IgnoresShutdown => self.sandbox.guest_config(&[cmdline::IGNORE_SHUTDOWN]),
            Guest::Resets => self.sandbox.guest_config(&[cmdline::RESET]),
        }
    }

    async fn guest_up(&self, manager: &VmManager, vm_id: &VmId) {
        let log = manager.console(vm_id).unwrap();
        let mut lines = log.subscribe();
        let seen = self.ready_seen.lock().unwrap().get(vm_id).copied().unwrap_or(0);
        let ready_lines = || {
            let tail = log.tail(1 << 20).unwrap_or_default();
            String::from_utf8_lossy(&tail).lines().filter(|line| line.starts_with(console::READY)).count()
        };
        let waited = tokio::time::timeout(BOOT_TIMEOUT, async {
            loop {
                if ready_lines() > seen {
                    return;
                }
                let _ = lines.recv().await;
            }
        })
        .await;
        assert!(waited.is_ok(), "VM {vm_id} printed no new ready line; its console has {} (seen {seen})", ready_lines());
        self.ready_seen.lock().unwrap().insert(vm_id.clone(), ready_lines());
    }

    fn kill(&self, pid: u32) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }

    fn leftovers(&self) -> Vec<String> {
        self.sandbox.leftovers()
    }
}

conformance_suite!(Firecracker);
