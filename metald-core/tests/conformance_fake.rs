//! The conformance suite against the fake backend, in two profiles: one
//! like Firecracker (a guest reset ends the VMM, no hotplug) and one that
//! reboots in place with hotplug, as Cloud Hypervisor does. No KVM needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::sync::Arc;

use common::fake::{self, FakeBackend, FakeHost};
use conformance::{Guest, Subject};
use metald_core::backend::Capabilities;
use metald_core::store::{SqliteVmStore, VmStore};
use metald_core::{VmConfig, VmId, VmManager};

/// Which capabilities the fake backend claims.
pub trait Profile {
    fn capabilities() -> Capabilities;
}

/// A fake host in a folder of its own, with one kernel image.
#[derive(Debug)]
pub struct FakeSubject<P> {
    dir: tempfile::TempDir,
    host: Arc<FakeHost>,
    store: Arc<SqliteVmStore>,
    profile: std::marker::PhantomData<P>,
}

impl<P: Profile> Subject for FakeSubject<P> {
    fn new(_test: &str) -> Option<Self> {
        let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/kernel"), b"not a kernel").unwrap();
        let store = Arc::new(SqliteVmStore::open(dir.path().join("vms.db")).unwrap());
        Some(Self { dir, host: FakeHost::new(), store, profile: std::marker::PhantomData })
    }

    fn manager(&self) -> VmManager {
        VmManager::builder()
            .backend(Arc::new(FakeBackend::new(fake::FAKE_VMM, &self.host, P::capabilities(), 950_000..950_064)))
            .image_root(self.dir.path().join("images"))
            .vm_root(self.dir.path().join("vms"))
            .store(Arc::clone(&self.store) as Arc<dyn VmStore>)
            .build()
            .unwrap()
    }

    fn config(&self, guest: Guest) -> VmConfig {
        let mut config = VmConfig::default();
        config.cpu.vcpu_count = 1;
        config.memory.size_bytes = 32 << 20;
        config.boot.kernel_path = "kernel".into();
        config.boot.kernel_args = match guest {
            Guest::Runs => String::new(),
            Guest::IgnoresShutdown => fake::IGNORES_SHUTDOWN.into(),
            Guest::Resets => fake::RESETS.into(),
        };
        config
    }

    async fn guest_up(&self, _manager: &VmManager, _vm_id: &VmId) {}

    fn kill(&self, pid: u32) {
        self.host.kill(pid, metald_core::process::ProcessExit::Killed { signal: 9 });
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.host.running().into_iter().map(|pid| format!("fake VMM {pid}")).collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("vms")) {
            left.extend(entries.flatten().map(|entry| format!("file {}", entry.path().display())));
        }
        left
    }
}

mod firecracker_like {
    pub struct FirecrackerLike;

    impl super::Profile for FirecrackerLike {
        fn capabilities() -> metald_core::backend::Capabilities {
            super::fake::firecracker_like()
        }
    }

    crate::conformance_suite!(super::FakeSubject<FirecrackerLike>);
}

mod in_place_reboots {
    pub struct InPlaceReboots;

    impl super::Profile for InPlaceReboots {
        fn capabilities() -> metald_core::backend::Capabilities {
            super::fake::in_place_reboots()
        }
    }

    crate::conformance_suite!(super::FakeSubject<InPlaceReboots>);
}
