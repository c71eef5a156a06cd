//! The jail around every VMM, checked from the outside on the real
//! Firecracker: who it runs as, what it can see, where it is counted, and
//! that nothing of it outlives the VM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::Sandbox;
use metald_core::config::MIB;
use metald_core::events::VmEventKind;
use metald_core::jailer::{JailError, JailStep, Jailer, JailerConfig};
use metald_core::launch::{self, Arg, Exposure, LaunchError, LaunchPlan, Resources};
use metald_core::operations::{Boot, Delete, Info, Reboot, Shutdown};
use metald_core::{CreateVm, ManagerError, StopOptions, VmState};
use metald_testguest::{cmdline, console};

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|line| line.strip_prefix(key).map(str::trim)).unwrap_or_else(|| panic!("no {key} in status"))
}

/// Mount points and options of a process, as it sees them.
fn mounts_of(pid: u32) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields[4].to_owned(), fields[5].to_owned())
        })
        .collect()
}

fn pid_namespace(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vmm_runs_unprivileged_alone_and_confined() {
    let Some(sandbox) = Sandbox::new("a_jailed_vmm_runs_unprivileged_alone_and_confined") else { return };
    let shared = sandbox.image("shared.img", MIB);
    let mut config = sandbox.guest_config(&[&cmdline::heartbeat_ms(100)]);
    config.storage = vec![Sandbox::drive("shared", &shared, true), Sandbox::drive("scratch", &sandbox.image("scratch.img", MIB), false)];
    let vm_id = sandbox.create(config).await;
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    sandbox.wait_for_line(&vm_id, console::READY).await;
    let vmm = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap();
    let pid = vmm.pid.unwrap();
    assert_eq!(vmm.extra["jailed"], "true");

    // Who it is.
    let status = status(pid);
    let uid = &vmm.identity.expect("a jailed VMM has its own user").0.to_string();
    assert_ne!(uid, "0");
    assert!(sandbox.jail.uid_range.contains(&uid.parse().unwrap()));
    assert_eq!(field(&status, "Uid:").split_whitespace().collect::<Vec<_>>(), [uid.as_str(); 4], "real, effective, saved and fs uid");
    assert_eq!(field(&status, "Gid:").split_whitespace().collect::<Vec<_>>(), [vmm.identity.unwrap().1.to_string().as_str(); 4]);
    assert_eq!(field(&status, "Groups:"), "", "no supplementary groups");
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    assert_eq!(field(&status, "Seccomp:"), "2", "Firecracker's own seccomp filters are on");
    assert_eq!(field(&status, "CapEff:"), "0000000000000000", "no capabilities");

    // Alone in its PID namespace, as its PID 1.
    assert_eq!(field(&status, "NSpid:").split_whitespace().collect::<Vec<_>>(), [pid.to_string().as_str(), "1"]);
    let namespace = pid_namespace(pid);
    assert_ne!(namespace, pid_namespace(std::process::id()));
    let members: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|other| pid_namespace(*other) == namespace)
        .collect();
    assert_eq!(members, [pid]);

    // What it sees: only its jail.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let entries: BTreeSet<String> =
        std::fs::read_dir(&root).unwrap().flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect();
    let expected = ["dev", "drives", "firecracker", "firecracker.log.fifo", "firecracker.metrics.fifo", "firecracker.sock", "kernel"];
    assert_eq!(entries, expected.iter().map(|name| name.to_string()).collect());
    assert_eq!(std::fs::read_dir(root.join("dev")).unwrap().flatten().map(|entry| entry.file_name()).collect::<Vec<_>>(), ["kvm"]);
    for outside in ["etc", "proc", "tmp", "usr", "root"] {
        assert!(!root.join(outside).exists(), "/{outside} is not in the jail");
    }
    let mounts = mounts_of(pid);
    let points: BTreeSet<&str> = mounts.iter().map(|(point, _)| point.as_str()).collect();
    let expected_points =
        ["/", "/drives/scratch", "/drives/shared", "/firecracker", "/firecracker.log.fifo", "/firecracker.metrics.fifo", "/kernel"];
    assert_eq!(points, expected_points.into_iter().collect(), "no other mount reaches the host");
    for (point, options) in &mounts {
        let read_only = options.split(',').any(|option| option == "ro");
        let expect_read_only = ["/firecracker", "/kernel", "/drives/shared"].contains(&point.as_str());
        assert_eq!(read_only, expect_read_only, "{point} is mounted {options}");
        if point != "/" {
            assert!(options.contains("nosuid") && options.contains("nodev"), "{point} is mounted {options}");
        }
    }
    let outside_root =
        |target: &Path| target.is_absolute() && !target.starts_with("/dev/null") && target.exists() && !target.starts_with("/proc");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(fd.path()).unwrap();
        let text = target.to_string_lossy();
        let jail_path = expected.iter().any(|name| text == format!("/{name}")) || text.starts_with("/drives/") || text == "/dev/kvm";
        let kernel_object = text.starts_with("pipe:") || text.starts_with("socket:") || text.starts_with("anon_inode:");
        // Its console and stderr: named pipes in the VM's folder, opened for it
        // write-only; root's, mode 0600, so it cannot open them again itself.
        let output_pipe =
            ["console.fifo", "firecracker.stderr.fifo"].iter().any(|name| target == sandbox.vms.join(vm_id.as_str()).join(name));
        if output_pipe {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let metadata = std::fs::metadata(&target).unwrap();
            assert!(metadata.file_type().is_fifo() && metadata.uid() == 0 && metadata.mode() & 0o777 == 0o600, "{text}: {metadata:?}");
            continue;
        }
        assert!(jail_path || kernel_object || text == "/dev/null", "fd {} of the VMM reaches {text}", fd.file_name().to_string_lossy());
        assert!(!(outside_root(&target) && !jail_path && text != "/dev/null"), "{text}");
    }

    // Where it is counted: its own cgroup, with the limits of its size.
    let cgroups: Vec<PathBuf> = vmm.cgroup.clone();
    assert!(!cgroups.is_empty());
    for cgroup in &cgroups {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string(), "{} holds the VMM and nothing else", cgroup.display());
    }
    let read = |file: &str| cgroups.iter().find_map(|cgroup| std::fs::read_to_string(cgroup.join(file)).ok()).unwrap_or_default();
    let memory = if read("memory.max").is_empty() { read("memory.limit_in_bytes") } else { read("memory.max") };
    assert_eq!(memory.trim().parse::<u64>().unwrap(), 32 * MIB + sandbox.jail.memory_overhead_bytes);
    let quota = if read("cpu.max").is_empty() {
        format!("{} {}", read("cpu.cfs_quota_us").trim(), read("cpu.cfs_period_us").trim())
    } else {
        read("cpu.max")
    };
    assert_eq!(quota.trim(), "100000 100000", "one vCPU gets one CPU");
    assert_eq!(read("pids.max").trim(), (sandbox.jail.pids_base + 1).to_string());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit =
        |name: &str| limits.lines().find(|line| line.starts_with(name)).unwrap().split_whitespace().rev().nth(2).unwrap().to_owned();
    assert_eq!(limit("Max open files"), sandbox.jail.max_open_files.to_string());
    assert_eq!(limit("Max processes"), (sandbox.jail.pids_base + 1).to_string());
    assert_eq!(limit("Max file size"), sandbox.jail.min_file_size_bytes.to_string());

    // Nothing of it outlives the VM.
    let jail_dir = sandbox.vms.join(vm_id.as_str()).join("root");
    assert!(jail_dir.is_dir());
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(!jail_dir.exists());
    for cgroup in &cgroups {
        assert!(!cgroup.exists(), "{} is removed", cgroup.display());
    }
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_writes_past_its_memory_limit_is_killed_and_its_vm_fails_saying_so() {
    let cap = 48 * MIB;
    let test = "a_guest_that_writes_past_its_memory_limit_is_killed_and_its_vm_fails_saying_so";
    let Some(sandbox) = Sandbox::with_jail(test, |jail| jail.memory_cap_bytes = Some(cap), |builder, _| builder) else { return };
    let mut events = sandbox.manager.subscribe();
    let mut config = sandbox.guest_config(&[&cmdline::mem_mib(96)]);
    config.memory.size_bytes = 128 * MIB;
    let vm_id = sandbox.create(config).await;
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    let reason = loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("the VMM dies").unwrap();
        if let VmEventKind::Failed { reason, exit, .. } = event.kind {
            assert_eq!(exit, Some(metald_core::process::ProcessExit::Killed { signal: 9 }));
            break reason;
        }
    };
    assert!(reason.contains("out of memory"), "{reason}");
    assert!(reason.contains(&cap.to_string()), "the limit is named: {reason}");
    let info = sandbox.manager.run(&vm_id, Info).await.unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert_eq!(info.failure.as_deref(), Some(reason.as_str()));
    let console_text = String::from_utf8_lossy(&sandbox.manager.console_tail(&vm_id, 1 << 16).unwrap()).into_owned();
    assert!(!console_text.contains(console::MEM_DONE), "the guest never finished writing:\n{console_text}");
    sandbox.manager.run(&vm_id, Delete(StopOptions::default())).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_swapped_for_a_symlink_after_validation_exposes_no_host_file() {
    let Some(sandbox) = Sandbox::new("an_image_swapped_for_a_symlink_after_validation_exposes_no_host_file") else { return };
    let secret = sandbox.dir.path().join("host-secret");
    std::fs::write(&secret, b"HOST SECRET, NEVER FOR A GUEST").unwrap();
    let image = sandbox.images.join("data.img");
    let original = b"THE REAL IMAGE".to_vec();
    std::fs::write(&image, &original).unwrap();

    // One thread keeps swapping the image for a symlink to the secret and
    // back, atomically, while VMs are created from it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (images, stop, secret, original) = (sandbox.images.clone(), Arc::clone(&stop), secret.clone(), original.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let staged = images.join(".staged");
                let _ = std::fs::remove_file(&staged);
                if swaps.is_multiple_of(2) {
                    std::os::unix::fs::symlink(&secret, &staged).unwrap();
                } else {
                    std::fs::write(&staged, &original).unwrap();
                }
                std::fs::rename(&staged, images.join("data.img")).unwrap();
                swaps += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            swaps
        })
    };
    let (mut booted, mut refused) = (0, 0);
    for _ in 0..30 {
        let mut config = sandbox.guest_config(&[]);
        config.storage = vec![Sandbox::drive("data", "data.img", true)];
        match sandbox.manager.create(CreateVm { vm_id: None, tenant: Sandbox::tenant(), config }).await {
            Ok(vm_id) => {
                let pid = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap().pid.unwrap();
                let seen = std::fs::read(format!("/proc/{pid}/root/drives/data")).unwrap();
                assert_eq!(seen, original, "the VMM sees the image, never the host file");
                sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
                booted += 1;
            }
            Err(ManagerError::Image(error)) => {
                assert!(error.to_string().contains("outside the image root"), "{error}");
                refused += 1;
            }
            // Opened before a swap, the image was unlinked before it could be mounted.
            Err(error) if metald_core::error_chain(&error).contains("was removed or replaced while the VMM was being started") => {
                refused += 1
            }
            Err(other) => panic!("unexpected: {}", metald_core::error_chain(&other)),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!("{booted} VMs saw the image, {refused} creates were refused, over {swaps} swaps");
    assert_eq!(booted + refused, 30);
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_swapped_after_validation_cannot_make_the_jail_expose_a_host_file() {
    let Some(sandbox) = Sandbox::new("a_folder_swapped_after_validation_cannot_make_the_jail_expose_a_host_file") else { return };
    let secret_dir = sandbox.dir.path().join("host-secrets");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("data.img"), b"HOST SECRET").unwrap();
    std::fs::create_dir(sandbox.images.join("disks")).unwrap();
    std::fs::write(sandbox.images.join("disks/data.img"), b"THE REAL IMAGE").unwrap();

    // Validated and opened...
    let root = metald_core::images::ImageRoot::new(&sandbox.images).unwrap();
    let image = root.open("storage[0].path", "disks/data.img").unwrap();
    // ...then the folder is swapped for a symlink that leads out of the image root.
    std::fs::rename(sandbox.images.join("disks"), sandbox.images.join("moved")).unwrap();
    std::os::unix::fs::symlink(&secret_dir, sandbox.images.join("disks")).unwrap();
    assert_eq!(std::fs::read(sandbox.images.join("disks/data.img")).unwrap(), b"HOST SECRET", "the path now names the host file");

    let jailer = Jailer::new(sandbox.jail.clone()).unwrap();
    let vm_dir = sandbox.vms.join("swapped");
    let mut plan = firecracker_plan(&sandbox, &vm_dir, None);
    plan.exposures.push(Exposure {
        name: "drives/data".into(),
        host_path: image.path.clone(),
        file: Arc::clone(&image.file),
        writable: false,
    });
    let mut launched = jailer.launch(plan).await.unwrap();
    let seen = std::fs::read(format!("/proc/{}/root/drives/data", launched.process.pid())).unwrap();
    assert_eq!(seen, b"THE REAL IMAGE", "the jail exposes the file that was validated, not what the path names now");
    launched.process.kill().await.unwrap();
    assert!(launched.release().await.is_empty());
    std::fs::remove_dir_all(&vm_dir).unwrap();

    // Opening the path again is refused.
    assert!(matches!(root.open("storage[0].path", "disks/data.img"), Err(metald_core::images::ImageError::SymlinkEscape { .. })));
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_the_vmm_user_cannot_read_and_dynamic_vmms_are_refused_with_nothing_left() {
    let test = "images_the_vmm_user_cannot_read_and_dynamic_vmms_are_refused_with_nothing_left";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let private = sandbox.image("private.img", MIB);
    std::fs::set_permissions(sandbox.images.join(&private), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut config = sandbox.guest_config(&[]);
    config.storage = vec![Sandbox::drive("private", &private, true)];
    let error = sandbox.manager.create(CreateVm { vm_id: None, tenant: Sandbox::tenant(), config }).await.unwrap_err();
    let chain = metald_core::error_chain(&error);
    assert!(chain.contains("not readable by the VMM's unprivileged user (mode 600)"), "{chain}");
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());

    // A copy made for a writable drive would belong to the VMM's user, and
    // hand it a file it may not read: refused too, before any copy.
    let mut config = sandbox.guest_config(&[]);
    config.storage = vec![Sandbox::drive("private", &private, false)];
    let error = sandbox.manager.create(CreateVm { vm_id: None, tenant: Sandbox::tenant(), config }).await.unwrap_err();
    let chain = metald_core::error_chain(&error);
    assert!(chain.contains("is not readable by every user (mode 600)"), "{chain}");
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());

    let dynamic =
        Sandbox::with(test, |builder, jail| builder.backend(Sandbox::jailed(metald_core::FirecrackerConfig::new("/bin/true"), jail)))
            .unwrap();
    let error =
        dynamic.manager.create(CreateVm { vm_id: None, tenant: Sandbox::tenant(), config: dynamic.guest_config(&[]) }).await.unwrap_err();
    let chain = metald_core::error_chain(&error);
    assert!(chain.contains("/bin/true is dynamically linked"), "{chain}");
    assert!(dynamic.leftovers().is_empty(), "left behind: {:?}", dynamic.leftovers());
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjailed_mode_still_runs_vms_for_development() {
    let Some(sandbox) = Sandbox::with("unjailed_mode_still_runs_vms_for_development", |builder, _| {
        let binary = metald_testguest::require_firecracker("unjailed_mode_still_runs_vms_for_development").expect("Firecracker");
        builder.backend(Arc::new(metald_core::FirecrackerBackend::unjailed(Sandbox::firecracker_config(&binary))))
    }) else {
        return;
    };
    let vm_id = sandbox.boot_guest(&[]).await;
    let vmm = sandbox.manager.run(&vm_id, Info).await.unwrap().vmm.unwrap();
    assert_eq!(vmm.extra["jailed"], "false");
    assert!(vmm.cgroup.is_empty() && vmm.identity.is_none());
    assert_eq!(field(&status(vmm.pid.unwrap()), "Uid:").split_whitespace().next(), Some("0"), "it runs as we do");
    // A second VMM in the same folder, after the first left its API socket behind.
    sandbox.manager.run(&vm_id, Shutdown(StopOptions { force: true, timeout: None })).await.unwrap();
    sandbox.manager.run(&vm_id, Boot).await.unwrap();
    sandbox.manager.run(&vm_id, Reboot(StopOptions { force: true, timeout: None })).await.unwrap();
    sandbox.wait_for_line(&vm_id, console::READY).await;
    assert_eq!(sandbox.manager.state(&vm_id).unwrap(), VmState::Running);
    sandbox.manager.run(&vm_id, Delete(StopOptions { force: true, timeout: None })).await.unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

/// A network namespace made by the test, removed on drop.
struct TestNetns(String);

impl TestNetns {
    fn create(test: &str) -> Option<Self> {
        let name = format!("metald-test-{}", &metald_core::VmId::generate().as_str()[3..11]);
        match std::process::Command::new("ip").args(["netns", "add", &name]).status() {
            Ok(status) if status.success() => Some(Self(name)),
            other => metald_testguest::unmet(test, &format!("cannot create a network namespace with ip(8): {other:?}")),
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

/// A plan that runs Firecracker (no API calls are made) in a jail under `vm_dir`.
fn firecracker_plan(sandbox: &Sandbox, vm_dir: &Path, netns: Option<Arc<std::os::fd::OwnedFd>>) -> LaunchPlan {
    std::fs::create_dir_all(vm_dir).unwrap();
    let program = Exposure {
        name: "firecracker".into(),
        host_path: sandbox.firecracker.clone(),
        file: Arc::new(std::fs::File::open(&sandbox.firecracker).unwrap().into()),
        writable: false,
    };
    let (_, stdout) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (_, stderr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    LaunchPlan {
        name: vm_dir.file_name().unwrap().to_string_lossy().into_owned(),
        vm_dir: metald_core::vm_dir::VmDir::at(vm_dir.to_path_buf()),
        program,
        args: vec![Arg::Literal("--api-sock".into()), Arg::PathOf("api.sock".into())],
        exposures: Vec::new(),
        work_files: vec!["vmm.log".into()],
        devices: vec![launch::KVM, launch::TUN],
        netns,
        resources: Resources { vcpus: 1, memory_bytes: 32 * MIB, largest_writable_bytes: 0 },
        identity: None,
        stdout,
        stderr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vmm_joins_the_network_namespace_it_is_given() {
    let test = "a_jailed_vmm_joins_the_network_namespace_it_is_given";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let Some(netns) = TestNetns::create(test) else { return };
    let jailer = Jailer::new(sandbox.jail.clone()).unwrap();
    let namespace_file = Arc::new(std::fs::File::open(netns.path()).unwrap().into());
    let vm_dir = sandbox.vms.join("netns-probe");
    let mut launched = jailer.launch(firecracker_plan(&sandbox, &vm_dir, Some(namespace_file))).await.unwrap();
    let pid = launched.process.pid();
    let inside = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let given = std::fs::metadata(netns.path()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&inside), std::os::unix::fs::MetadataExt::ino(&given));
    assert!(launched.timings.iter().any(|(step, _)| *step == "jail.child_made"), "{:?}", launched.timings);
    launched.process.kill().await.unwrap();
    assert!(launched.release().await.is_empty());
    std::fs::remove_dir_all(&vm_dir).unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jail_that_fails_halfway_undoes_every_step_before() {
    let Some(sandbox) = Sandbox::new("a_jail_that_fails_halfway_undoes_every_step_before") else { return };
    let jailer =
        Jailer::new(JailerConfig { uid_range: sandbox.jail.uid_range.start..sandbox.jail.uid_range.start + 1, ..sandbox.jail.clone() })
            .unwrap();
    // Not a network namespace: the child fails at setns, after the folder, the cgroup and the mounts exist.
    let not_a_namespace = Arc::new(std::fs::File::open("/dev/null").unwrap().into());
    let vm_dir = sandbox.vms.join("half-made");
    let error = jailer.launch(firecracker_plan(&sandbox, &vm_dir, Some(not_a_namespace))).await.unwrap_err();
    assert!(matches!(error, JailError::Child { step: JailStep::JoinNetworkNamespace, .. }), "{error}");
    assert!(!vm_dir.join("root").exists(), "the jail folder is gone");
    assert!(
        sandbox.leftovers().iter().all(|left| !left.starts_with("cgroup") && !left.starts_with("process")),
        "{:?}",
        sandbox.leftovers()
    );
    // The only uid of the range was given back: the next launch gets it.
    let mut launched = jailer.launch(firecracker_plan(&sandbox, &vm_dir, None)).await.unwrap();
    assert_eq!(launched.identity.map(|(uid, _)| uid), Some(sandbox.jail.uid_range.start));
    launched.process.kill().await.unwrap();
    assert!(launched.release().await.is_empty());
    std::fs::remove_dir_all(&vm_dir).unwrap();

    // A VMM that cannot be executed fails at exec and is undone the same way.
    let not_executable = sandbox.dir.path().join("firecracker-0644");
    std::fs::copy(&sandbox.firecracker, &not_executable).unwrap();
    std::fs::set_permissions(&not_executable, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut plan = firecracker_plan(&sandbox, &vm_dir, None);
    plan.program.file = Arc::new(std::fs::File::open(&not_executable).unwrap().into());
    plan.program.host_path = not_executable;
    // Through the port, as a backend launches: the jail's own error is kept as the cause.
    let launcher: Arc<dyn launch::Launcher> = Arc::new(jailer);
    let error = launcher.launch(plan).await.unwrap_err();
    let cause = match &error {
        LaunchError::Jail(cause) => cause.downcast_ref::<JailError>(),
        _ => None,
    };
    assert!(matches!(cause, Some(JailError::Child { step: JailStep::Exec, .. })), "{error}");
    assert!(!vm_dir.join("root").exists());
    std::fs::remove_dir_all(&vm_dir).unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pool_part_goes_to_one_vmm_and_none_outlives_the_pool() {
    let test = "each_pool_part_goes_to_one_vmm_and_none_outlives_the_pool";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let parent = Path::new(&sandbox.jail.cgroup_parent).to_path_buf();
    let jailer = Jailer::new(JailerConfig { pool_size: 2, pool_refill_quiet_ms: 0, ..sandbox.jail.clone() }).unwrap();
    let full = || jailer.pool_fill().is_some_and(|fill| fill.ready == 2) && metald_testguest::jail_pool_processes(&parent).len() == 2;
    metald_testguest::wait_until("the pool to hold two waiting children", Duration::from_secs(60), || std::future::ready(full())).await;
    let waiting: BTreeSet<u32> = metald_testguest::jail_pool_processes(&parent).into_iter().collect();
    assert!(
        sandbox.leftovers().iter().all(|left| !left.starts_with("process")),
        "waiting children are not VMMs: {:?}",
        sandbox.leftovers()
    );

    // Four at once: the first two take the waiting children, the others make theirs (or take fresh ones).
    let names: Vec<String> = (0..4).map(|index| format!("pooled-{index}")).collect();
    let plan = |index: usize| firecracker_plan(&sandbox, &sandbox.vms.join(&names[index]), None);
    let (first, second, third, fourth) =
        tokio::join!(jailer.launch(plan(0)), jailer.launch(plan(1)), jailer.launch(plan(2)), jailer.launch(plan(3)));
    let mut launched = vec![first.unwrap(), second.unwrap(), third.unwrap(), fourth.unwrap()];
    let pids: BTreeSet<u32> = launched.iter().map(|one| one.process.pid()).collect();
    assert_eq!(pids.len(), 4, "one process per VMM");
    assert!(waiting.is_subset(&pids), "the waiting children {waiting:?} became VMMs {pids:?}");
    let uids: BTreeSet<u32> = launched.iter().filter_map(|one| one.identity.map(|(uid, _)| uid)).collect();
    assert_eq!(uids.len(), 4, "one user per VMM");
    let mut cgroups = BTreeSet::new();
    for (name, one) in names.iter().zip(&launched) {
        let cgroup = one.cgroup.clone().unwrap();
        assert!(cgroup.name().starts_with(&format!("{name}.")), "a pooled cgroup is renamed for its VM: {}", cgroup.name());
        assert_eq!(cgroup.processes().unwrap(), vec![one.process.pid()], "the VMM is alone in its cgroup");
        assert!(cgroups.insert(cgroup.name()));
        let status = status(one.process.pid());
        assert_eq!(field(&status, "Uid:").split_whitespace().next(), Some(one.identity.unwrap().0.to_string().as_str()));
    }

    // Refilled with new children, none of them a VMM's.
    metald_testguest::wait_until("the pool to be refilled", Duration::from_secs(60), || std::future::ready(full())).await;
    let refilled: BTreeSet<u32> = metald_testguest::jail_pool_processes(&parent).into_iter().collect();
    assert!(refilled.is_disjoint(&pids), "{refilled:?} against {pids:?}");
    for one in &mut launched {
        one.process.kill().await.unwrap();
        assert!(one.release().await.is_empty());
    }
    assert!(jailer.release_spares().is_empty());
    assert_eq!(jailer.pool_fill().map(|fill| fill.ready), Some(0));
    assert!(metald_testguest::jail_pool_processes(&parent).is_empty(), "no waiting child outlives the pool");
    for name in &names {
        std::fs::remove_dir_all(sandbox.vms.join(name)).unwrap();
    }
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
    for pid in refilled {
        assert!(!metald_testguest::process_alive(pid), "waiting child {pid} is gone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_a_create_emptied_is_refilled_without_waiting_for_quiet() {
    let test = "a_pool_a_create_emptied_is_refilled_without_waiting_for_quiet";
    let Some(sandbox) = Sandbox::new(test) else { return };
    let parent = Path::new(&sandbox.jail.cgroup_parent).to_path_buf();
    // A quiet interval no test outlasts: only an empty pool is refilled within it.
    let jailer = Jailer::new(JailerConfig { pool_size: 1, pool_refill_quiet_ms: 3_600_000, ..sandbox.jail.clone() }).unwrap();
    let ready = || jailer.pool_fill().is_some_and(|fill| fill.ready == 1) && metald_testguest::jail_pool_processes(&parent).len() == 1;
    metald_testguest::wait_until("the pool to hold its child", Duration::from_secs(60), || std::future::ready(ready())).await;
    let waiting = metald_testguest::jail_pool_processes(&parent);

    let vm_dir = sandbox.vms.join("emptied-the-pool");
    let mut launched = jailer.launch(firecracker_plan(&sandbox, &vm_dir, None)).await.unwrap();
    assert!(launched.timings.iter().any(|(step, _)| *step == "jail.child_from_pool"), "{:?}", launched.timings);
    assert_eq!(waiting, vec![launched.process.pid()], "the waiting child became the VMM");
    metald_testguest::wait_until("the emptied pool to be refilled", Duration::from_secs(60), || std::future::ready(ready())).await;
    assert_ne!(metald_testguest::jail_pool_processes(&parent), waiting, "a new child waits");

    launched.process.kill().await.unwrap();
    assert!(launched.release().await.is_empty());
    assert!(jailer.release_spares().is_empty());
    std::fs::remove_dir_all(&vm_dir).unwrap();
    assert!(sandbox.leftovers().is_empty(), "left behind: {:?}", sandbox.leftovers());
}
