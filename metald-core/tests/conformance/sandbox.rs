//! A [`Subject`] on the test sandbox: the real VMM in the integrated
//! jailer, the test guest, a store its managers share. Each real backend's
//! conformance file names its VMM with a [`RealVmm`].

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Guest, Subject};
use crate::common::{BOOT_TIMEOUT, Sandbox};
use metald_core::VmmBackend;
use metald_core::jailer::JailerConfig;
use metald_core::store::{SqliteVmStore, VmStore};
use metald_core::{VmConfig, VmId, VmManager};
use metald_testguest::{cmdline, console};

/// A VMM the sandbox runs for real.
pub trait RealVmm {
    /// The VMM's binary, or `None` (with why, and a failure in CI) when it is not here.
    fn binary(test: &str) -> Option<std::path::PathBuf>;
    /// What its jail needs beyond the sandbox's settings.
    fn adjust_jail(_jail: &mut JailerConfig) {}
    /// Its backend, in the sandbox's jail.
    fn backend(binary: &std::path::Path, jail: &JailerConfig) -> Arc<dyn VmmBackend>;
}

/// A sandbox host with a store its managers share.
pub struct SandboxSubject<V> {
    sandbox: Sandbox,
    binary: std::path::PathBuf,
    store: Arc<SqliteVmStore>,
    /// How many ready lines of each VM's console a wait has seen, so each
    /// wait is for the guest of the boot before it.
    ready_seen: Mutex<HashMap<VmId, usize>>,
    vmm: PhantomData<V>,
}

impl<V> std::fmt::Debug for SandboxSubject<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxSubject").field("sandbox", &self.sandbox.dir.path()).finish_non_exhaustive()
    }
}

impl<V: RealVmm> Subject for SandboxSubject<V> {
    fn new(test: &str) -> Option<Self> {
        let binary = V::binary(test)?;
        let sandbox = Sandbox::with_jail(test, V::adjust_jail, |builder, _| builder)?;
        let store = Arc::new(SqliteVmStore::open(sandbox.dir.path().join("vms.db")).unwrap());
        Some(Self { sandbox, binary, store, ready_seen: Mutex::default(), vmm: PhantomData })
    }

    fn manager(&self) -> VmManager {
        VmManager::builder()
            .backend(V::backend(&self.binary, &self.sandbox.jail))
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
