//! One daemon per data folder, uid window and cgroup parent: a second
//! metald that would share one with a running daemon refuses to start,
//! names the setting, and leaves the first and its VMs alone; a daemon
//! killed with SIGKILL leaves its folder free for the next start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Host, HostOptions, Wire, boot_guest, state_of};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// What a second daemon shares with the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shared {
    DataDir,
    UidWindow,
    CgroupParent,
}

/// A second metald beside a test's host, with the host's settings except
/// that it shares only one of data folder, uid window and cgroup parent.
/// Its own ones carry the host's test name; dropping it kills it and
/// removes the lock files it may have made.
struct Rival {
    child: Child,
    log_path: PathBuf,
    lock_files: Vec<PathBuf>,
}

impl Rival {
    fn start(host: &Host, shared: Shared) -> Self {
        let data_dir = if shared == Shared::DataDir { host.data_dir() } else { host.dir.path().join("rival-data") };
        // The host's uids are the first half of the 512 the harness keeps for its test.
        let uid_start = if shared == Shared::UidWindow { host.uid_start } else { host.uid_start + host.uid_count };
        let cgroup_parent = if shared == Shared::CgroupParent { host.cgroup_parent.clone() } else { format!("{}-rival", host.name) };
        let config = std::fs::read_to_string(&host.config_path).unwrap();
        let config: Vec<String> = config
            .lines()
            .map(|line| match line.split_once(" = ").map(|(key, _)| key) {
                Some("data_dir") => format!("data_dir = {data_dir:?}"),
                Some("uid_start") => format!("uid_start = {uid_start}"),
                Some("cgroup_parent") => format!("cgroup_parent = {cgroup_parent:?}"),
                _ => line.to_owned(),
            })
            .collect();
        let config_path = host.dir.path().join("rival.toml");
        std::fs::write(&config_path, config.join("\n")).unwrap();
        let log_path = host.dir.path().join("rival.log");
        let child = Command::new(common::metald_binary())
            .arg("--config")
            .arg(&config_path)
            // A port of its own: only the shared setting may collide.
            .args(["--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let host_lock_files = common::jailer_lock_files(host.uid_start, host.uid_count, &host.cgroup_parent);
        let lock_files = common::jailer_lock_files(uid_start, host.uid_count, &cgroup_parent)
            .into_iter()
            .filter(|file| !host_lock_files.contains(file))
            .collect();
        Rival { child, log_path, lock_files }
    }

    /// Its exit status and what it said, once it has exited.
    fn refusal(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, std::fs::read_to_string(&self.log_path).unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "the second metald still runs after 30 s: {}",
                std::fs::read_to_string(&self.log_path).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Rival {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in &self.lock_files {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn vmm_pid(vm_id: &str) -> u32 {
    common::vmm_pid(vm_id).expect("the VM's VMM runs")
}

async fn delete_every_vm(client: &common::Client) {
    let list = client.list_vms(wire::ListVmsRequest::default()).await.unwrap().into_owned();
    for vm in &list.vms {
        client.delete_vm(wire::DeleteVmRequest { vm_id: vm.vm_id.clone(), force: true, ..Default::default() }).await.unwrap();
    }
}

fn lock_file_pid(host: &Host) -> String {
    std::fs::read_to_string(host.data_dir().join("metald.lock")).unwrap().trim().to_owned()
}

#[test]
fn a_second_daemon_on_the_same_data_folder_is_refused_and_the_first_serves_on() {
    let test = "a_second_daemon_on_the_same_data_folder_is_refused_and_the_first_serves_on";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let runtime = runtime();
    let client = host.client("acme", Wire::ConnectJson);
    let (vm_id, pid) = runtime.block_on(async {
        let vm_id = boot_guest(&client, &[]).await;
        let pid = vmm_pid(&vm_id);
        (vm_id, pid)
    });

    let (status, message) = Rival::start(&host, Shared::DataDir).refusal();
    assert!(!status.success(), "{status}: {message}");
    let expected =
        format!("data_dir {} is in use by another metald (pid {}); one daemon per data folder", host.data_dir().display(), host.pid());
    assert!(message.contains(&expected), "{message}");

    assert_eq!(common::http_get(host.port, "/health").map(|(status, _)| status), Some(200), "the first daemon serves on");
    assert_eq!(lock_file_pid(&host), host.pid().to_string(), "the lock file still names the first daemon");
    runtime.block_on(async {
        assert_eq!(state_of(&client, &vm_id).await, VmState::VM_STATE_RUNNING);
        assert_eq!(vmm_pid(&vm_id), pid, "the same VMM");
        assert!(metald_testguest::process_alive(pid));
        delete_every_vm(&client).await;
    });
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

#[test]
fn a_killed_daemon_leaves_its_data_folder_to_the_next_start() {
    let test = "a_killed_daemon_leaves_its_data_folder_to_the_next_start";
    let Some(mut host) = Host::start(test, HostOptions::default()) else { return };
    let runtime = runtime();
    let (vm_id, pid) = runtime.block_on(async {
        let client = host.client("acme", Wire::Grpc);
        let vm_id = boot_guest(&client, &[]).await;
        let pid = vmm_pid(&vm_id);
        (vm_id, pid)
    });
    let killed = host.pid();
    host.kill();
    assert!(metald_testguest::process_alive(pid), "the VMM outlived metald");
    assert_eq!(lock_file_pid(&host), killed.to_string(), "the file stays; only the kernel's lock went with the process");

    // Ready again, though the VMM metald started lives on: it holds no lock.
    host.launch();
    assert_eq!(lock_file_pid(&host), host.pid().to_string());
    runtime.block_on(async {
        let client = host.client("acme", Wire::Grpc);
        assert_eq!(state_of(&client, &vm_id).await, VmState::VM_STATE_RUNNING);
        assert_eq!(vmm_pid(&vm_id), pid, "taken over");
        delete_every_vm(&client).await;
    });
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

#[test]
fn two_daemons_sharing_a_uid_window_are_refused_by_name() {
    let test = "two_daemons_sharing_a_uid_window_are_refused_by_name";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let (status, message) = Rival::start(&host, Shared::UidWindow).refusal();
    assert!(!status.success(), "{status}: {message}");
    let window = format!("(uids {} to {})", host.uid_start, host.uid_start + host.uid_count - 1);
    let expected = format!("jailer.uid_start/jailer.uid_count {window} is in use by another metald (pid {})", host.pid());
    assert!(message.contains(&expected), "{message}");
    // Refused before its VM store was opened.
    let made: Vec<_> = std::fs::read_dir(host.dir.path().join("rival-data")).unwrap().flatten().map(|entry| entry.file_name()).collect();
    assert_eq!(made, ["metald.lock"]);
    assert_eq!(common::http_get(host.port, "/health").map(|(status, _)| status), Some(200));
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

#[test]
fn two_daemons_sharing_a_cgroup_parent_are_refused_by_name() {
    let test = "two_daemons_sharing_a_cgroup_parent_are_refused_by_name";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let (status, message) = Rival::start(&host, Shared::CgroupParent).refusal();
    assert!(!status.success(), "{status}: {message}");
    let expected = format!("jailer.cgroup_parent {} is in use by another metald (pid {})", host.cgroup_parent, host.pid());
    assert!(message.contains(&expected), "{message}");
    assert_eq!(common::http_get(host.port, "/health").map(|(status, _)| status), Some(200));
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
