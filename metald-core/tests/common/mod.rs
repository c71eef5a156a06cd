//! What the integration tests share: a host sandbox per test with its own
//! image root and VM root under a unique `metald-test-` folder, a manager on
//! the real Firecracker, and checks for anything left behind. Dropping the
//! sandbox kills any VMM it started and removes its folder, also when the
//! test failed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use metald_core::config::{MIB, StorageDevice};
use metald_core::jailer::JailerConfig;
use metald_core::operations::Boot;
use metald_core::{CreateVm, FirecrackerConfig, TenantId, VmConfig, VmId, VmManager};
use metald_testguest as testguest;

pub mod fake;

pub const GUEST_KERNEL: &str = "testguest.elf";
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub images: PathBuf,
    pub vms: PathBuf,
    pub manager: VmManager,
    pub firecracker: PathBuf,
    /// The jail settings of this sandbox: its own uid window and cgroup parent.
    pub jail: JailerConfig,
}

impl Sandbox {
    /// A sandbox for `test`, or `None` (outside CI) when Firecracker or KVM is missing.
    pub fn new(test: &str) -> Option<Self> {
        Self::with(test, |builder, _| builder)
    }

    /// A sandbox whose manager `customise` adjusts; it is handed the
    /// sandbox's jail settings, to give a backend of its own.
    pub fn with(
        test: &str,
        customise: impl FnOnce(metald_core::VmManagerBuilder, &JailerConfig) -> metald_core::VmManagerBuilder,
    ) -> Option<Self> {
        Self::with_jail(test, |_| {}, customise)
    }

    /// A jailed Firecracker backend with the product's settings made for a
    /// busy test host: the sandbox's default, and a start for a variant.
    pub fn firecracker_config(binary: &std::path::Path) -> FirecrackerConfig {
        // The product's deadlines for a VMM's socket and answers are made for a host that is not
        // also running a test suite; a busy test host gets longer ones.
        let mut vmm = FirecrackerConfig::new(binary);
        vmm.ready_timeout = Duration::from_secs(30);
        vmm.api_timeout = Duration::from_secs(30);
        vmm
    }

    pub fn jailed(vmm: FirecrackerConfig, jail: &JailerConfig) -> std::sync::Arc<dyn metald_core::VmmBackend> {
        std::sync::Arc::new(metald_core::FirecrackerBackend::jailed(vmm, jail.clone()).expect("a jailer"))
    }

    /// A sandbox whose jail settings `adjust` changes.
    pub fn with_jail(
        test: &str,
        adjust: impl FnOnce(&mut JailerConfig),
        customise: impl FnOnce(metald_core::VmManagerBuilder, &JailerConfig) -> metald_core::VmManagerBuilder,
    ) -> Option<Self> {
        let firecracker = testguest::require_firecracker(test)?;
        let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().expect("a temporary folder");
        let images = dir.path().join("images");
        let vms = dir.path().join("vms");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::copy(testguest::kernel_path(), images.join(GUEST_KERNEL)).unwrap();
        let unique = dir.path().file_name().unwrap().to_string_lossy().into_owned();
        // Sandboxes run side by side: each gets uids and a cgroup parent no other uses.
        let window = 1_100_000 + (fxhash(&unique) % 10_000) * 64;
        let mut jail = JailerConfig { uid_range: window..window + 64, cgroup_parent: PathBuf::from(&unique), ..JailerConfig::default() };
        adjust(&mut jail);
        let builder = VmManager::builder()
            .backend(Self::jailed(Self::firecracker_config(&firecracker), &jail))
            .image_root(&images)
            .vm_root(&vms)
            .stop_timeout(Duration::from_secs(10));
        let manager = customise(builder, &jail).build().expect("a manager");
        Some(Self { dir, images, vms, manager, firecracker, jail })
    }

    pub fn tenant() -> TenantId {
        TenantId::new("test-tenant").unwrap()
    }

    /// A test-guest VM: one vCPU, 32 MiB, the given command-line tokens.
    pub fn guest_config(&self, tokens: &[&str]) -> VmConfig {
        let mut config = VmConfig::default();
        config.cpu.vcpu_count = 1;
        config.memory.size_bytes = 32 * MIB;
        config.boot.kernel_path = GUEST_KERNEL.into();
        config.boot.kernel_args = tokens.join(" ");
        config
    }

    /// Creates an image file of `size` bytes in the image root.
    pub fn image(&self, name: &str, size: u64) -> String {
        let file = std::fs::File::create(self.images.join(name)).unwrap();
        file.set_len(size).unwrap();
        name.to_owned()
    }

    pub fn drive(id: &str, path: &str, read_only: bool) -> StorageDevice {
        StorageDevice { id: id.into(), path: path.into(), read_only, ..StorageDevice::default() }
    }

    pub async fn create(&self, config: VmConfig) -> VmId {
        self.manager.create(CreateVm { vm_id: None, tenant: Self::tenant(), config }).await.expect("create")
    }

    /// Creates and boots a VM and waits for the guest's ready line.
    pub async fn boot_guest(&self, tokens: &[&str]) -> VmId {
        let vm_id = self.create(self.guest_config(tokens)).await;
        self.manager.run(&vm_id, Boot).await.expect("boot");
        self.wait_for_line(&vm_id, testguest::console::READY).await;
        vm_id
    }

    pub async fn wait_for_line(&self, vm_id: &VmId, prefix: &str) -> String {
        let console = self.manager.console(vm_id).unwrap();
        match console.wait_for_line(|line| line.starts_with(prefix), BOOT_TIMEOUT).await {
            Ok(line) => line,
            Err(error) => {
                let tail = String::from_utf8_lossy(&console.tail(4096).unwrap_or_default()).into_owned();
                panic!("VM {vm_id} never printed {prefix:?} ({error}); its console ends with:\n{tail}");
            }
        }
    }

    /// Follows `lines` until nothing has come for a while and returns the last
    /// line: once a guest is paused, what it printed before may still be on its
    /// way through the console reader, more so on a busy host.
    pub async fn last_line_once_quiet(lines: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<str>>) -> Option<std::sync::Arc<str>> {
        use tokio::sync::broadcast::error::RecvError;
        let mut last = None;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), lines.recv()).await {
                Ok(Ok(line)) => last = Some(line),
                Ok(Err(RecvError::Lagged(_))) => {}
                Ok(Err(RecvError::Closed)) | Err(_) => return last,
            }
        }
    }

    /// Firecracker processes started from this sandbox that are still alive.
    pub fn live_vmms(&self) -> Vec<u32> {
        testguest::vmm_processes(&self.vms, &self.jail.cgroup_parent)
    }

    /// The cgroup folders this sandbox's VMs may make (one per v1 controller, or one on v2).
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        let root = &self.jail.cgroup_root;
        let mut parents: Vec<PathBuf> =
            ["cpu", "cpuacct", "memory", "pids"].iter().map(|controller| root.join(controller).join(&self.jail.cgroup_parent)).collect();
        parents.push(root.join(&self.jail.cgroup_parent));
        parents
    }

    /// Everything this sandbox's VMs left: live VMMs, files in the VM root,
    /// mounts under the sandbox, and cgroups.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.live_vmms().into_iter().map(|pid| format!("process {pid}")).collect();
        let pool = testguest::jail_pool_processes(&self.jail.cgroup_parent);
        left.extend(pool.into_iter().map(|pid| format!("pool process {pid}")));
        if let Ok(entries) = std::fs::read_dir(&self.vms) {
            left.extend(entries.flatten().map(|entry| format!("file {}", entry.path().display())));
        }
        let sandbox = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(mounts.lines().filter(|line| line.contains(&sandbox)).map(|line| format!("mount {line}")));
        for parent in self.cgroup_parents() {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                left.extend(
                    entries.flatten().filter(|entry| entry.path().is_dir()).map(|entry| format!("cgroup {}", entry.path().display())),
                );
            }
        }
        left
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for pid in self.live_vmms() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        // Children first (a failed test may have left some), then the parents.
        for parent in self.cgroup_parents() {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for entry in entries.flatten().filter(|entry| entry.path().is_dir()) {
                    for _ in 0..100 {
                        if std::fs::remove_dir(entry.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

fn fxhash(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}
