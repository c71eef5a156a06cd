//! metalctl against a real metald (jailer on, Firecracker on /dev/kvm):
//! every command, the table and JSON outputs, and the exit codes a script
//! relies on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Host, HostOptions};

struct Ctl<'a> {
    host: &'a Host,
    token: String,
}

impl Ctl<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_metalctl"));
        command.args(args).env("METALD_ENDPOINT", self.host.url()).env("METALD_TOKEN", &self.token).env_remove("METALD_JSON");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(output.status.success(), "metalctl {args:?}: {:?}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// Creates and boots a heartbeat guest with `metadata` (`key=value`)
    /// through metalctl and waits for its ready line there; its id.
    fn create_booted(&self, metadata: &str) -> String {
        let heartbeat = metald_testguest::cmdline::heartbeat_ms(100);
        let vm_id = self
            .ok(&[
                "create",
                "--vcpus",
                "1",
                "--memory",
                "32MiB",
                "--kernel",
                common::GUEST_KERNEL,
                "--cmdline",
                &heartbeat,
                "--metadata",
                metadata,
                "--boot",
            ])
            .trim()
            .to_owned();
        self.wait_ready(&vm_id);
        vm_id
    }

    /// Waits until `metalctl console` shows the VM's ready line.
    fn wait_ready(&self, vm_id: &str) {
        let deadline = Instant::now() + common::BOOT_TIMEOUT;
        while !self.ok(&["console", vm_id]).contains(metald_testguest::console::READY) {
            assert!(Instant::now() < deadline, "no ready line through metalctl console");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit code and stderr of a command that must fail.
    fn fails(&self, args: &[&str]) -> (i32, String) {
        let output = self.run(args);
        assert!(!output.status.success(), "metalctl {args:?} should fail: {}", String::from_utf8_lossy(&output.stdout));
        (output.status.code().unwrap(), String::from_utf8(output.stderr).unwrap())
    }
}

#[test]
fn every_command_against_a_daemon_with_meaningful_exit_codes() {
    let test = "every_command_against_a_daemon_with_meaningful_exit_codes";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let ctl = Ctl { host: &host, token: host.token("acme").to_owned() };

    let vm_id = ctl.create_booted("team=db");
    assert!(vm_id.starts_with("vm-"), "{vm_id}");

    let table = ctl.ok(&["list"]);
    assert!(table.contains(&vm_id) && table.to_lowercase().contains("running"), "{table}");
    let listed: serde_json::Value = serde_json::from_str(&ctl.ok(&["--json", "list"])).unwrap();
    assert_eq!(listed["vms"][0]["vmId"], vm_id.as_str(), "{listed}");
    assert_eq!(listed["vms"][0]["state"], "VM_STATE_RUNNING", "{listed}");
    let info = ctl.ok(&["info", &vm_id]);
    assert!(info.contains("firecracker") && info.contains("team"), "{info}");
    let info: serde_json::Value = serde_json::from_str(&ctl.ok(&["info", &vm_id, "--json"])).unwrap();
    assert_eq!(info["customerId"], "acme", "{info}");

    let mut watch = ctl.command(&["--json", "watch", &vm_id]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let watching = lines_of(watch.stderr.take().unwrap());
    let said = watching.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(said.starts_with("metalctl: watching "), "{said}");
    let watched = lines_of(watch.stdout.take().unwrap());
    ctl.ok(&["pause", &vm_id]);
    let (code, message) = ctl.fails(&["pause", &vm_id]);
    assert_eq!(code, 4, "pausing a paused VM is a conflict: {message}");
    assert!(message.starts_with("error: failed_precondition:") && message.contains("Paused"), "{message}");
    ctl.ok(&["resume", &vm_id]);
    ctl.ok(&["--protocol", "grpc", "reboot", &vm_id]);
    ctl.ok(&["shutdown", &vm_id, "--timeout", "10"]);
    ctl.ok(&["boot", &vm_id]);
    ctl.ok(&["delete", &vm_id, "--force"]);
    let mut kinds = Vec::new();
    while kinds.last().is_none_or(|kind| kind != "deleted") {
        let line = watched.recv_timeout(Duration::from_secs(60)).expect("watch printed no deleted event");
        kinds.push(serde_json::from_str::<serde_json::Value>(&line).unwrap()["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds, ["paused", "resumed", "rebooted", "stopped", "booted", "stopped", "deleted"]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(watch.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = watch.wait().unwrap();
    assert!(status.success(), "watch ends cleanly on Ctrl-C: {status:?}");

    let (code, _) = ctl.fails(&["info", &vm_id]);
    assert_eq!(code, 3, "a deleted VM is not found");
    // What only the host can refuse comes back as invalid_argument, naming the field.
    let (code, message) = ctl.fails(&["create", "--vcpus", "1", "--memory", "8MiB", "--kernel", common::GUEST_KERNEL]);
    assert!(code == 5 && message.contains("memory.size_bytes"), "{code} {message}");
    let (code, _) = ctl.fails(&["create", "--memory", "lots", "--kernel", common::GUEST_KERNEL]);
    assert_eq!(code, 2, "a flag metalctl cannot read is a usage error");
    let stranger = Ctl { host: &host, token: "not-a-token".into() };
    let (code, message) = stranger.fails(&["list"]);
    assert!(code == 6 && message.contains("unauthenticated"), "{code} {message}");
    let (code, message) = ctl.fails(&["--endpoint", "http://127.0.0.1:9", "list"]);
    assert_eq!(code, 8, "an unreachable host: {message}");
    assert_eq!(host.leftovers(), Vec::<String>::new());
}

/// The lines a child writes to a pipe, as they come, read on a thread of their own
/// so that a test can wait for one with a deadline.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// The row names of a `metalctl info` table: what comes before the value.
fn info_rows(table: &str) -> Vec<String> {
    table.lines().filter_map(|line| line.split("  ").next()).map(|name| name.trim().to_owned()).filter(|name| !name.is_empty()).collect()
}

#[test]
fn the_info_example_in_the_docs_has_every_row_metalctl_prints_for_a_running_vm() {
    let test = "the_info_example_in_the_docs_has_every_row_metalctl_prints_for_a_running_vm";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let ctl = Ctl { host: &host, token: host.token("acme").to_owned() };
    let vm_id = ctl.create_booted("team=infra");
    let printed = info_rows(&ctl.ok(&["info", &vm_id]));
    let page = std::fs::read_to_string(metald_testguest::workspace_root().join("docs/cli/metalctl.md")).unwrap();
    let example = page.split("metalctl info vm-1 --json\n```\n\n```\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
    let documented = info_rows(example);
    let missing: Vec<&String> = printed.iter().filter(|row| !documented.contains(row)).collect();
    assert!(missing.is_empty(), "docs/cli/metalctl.md's info example lacks {missing:?}; metalctl printed {printed:?}");
    ctl.ok(&["delete", &vm_id, "--force"]);
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn what_got_in_a_first_days_way_is_gone_defaults_ranges_json_and_ends() {
    let test = "what_got_in_a_first_days_way_is_gone_defaults_ranges_json_and_ends";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let ctl = Ctl { host: &host, token: host.token("acme").to_owned() };
    assert_eq!(ctl.ok(&["list"]).trim(), "No VMs.");
    let (code, message) = ctl.fails(&["create"]);
    assert!(code == 2 && message.contains("a kernel is needed"), "{code} {message}");
    let (code, message) = ctl.fails(&["create", "--vcpus", "33", "--kernel", common::GUEST_KERNEL]);
    assert!(code == 2 && message.contains("1..=32"), "the host's range, said before any call: {code} {message}");
    let maybe = ctl.command(&["list"]).env("METALD_JSON", "maybe").output().unwrap();
    assert_eq!(maybe.status.code(), Some(2), "{}", String::from_utf8_lossy(&maybe.stderr));

    // Only a kernel: 1 vCPU and 128 MiB.
    let vm_id = ctl.ok(&["create", "--kernel", common::GUEST_KERNEL]).trim().to_owned();
    let info: serde_json::Value = serde_json::from_str(&ctl.ok(&["--json", "info", &vm_id])).unwrap();
    assert_eq!((info["config"]["cpu"]["vcpuCount"].as_i64(), info["config"]["memory"]["sizeBytes"].as_str()), (Some(1), Some("134217728")));
    let booted: serde_json::Value = serde_json::from_str(&ctl.ok(&["--json", "boot", &vm_id])).unwrap();
    assert_eq!((booted["vmId"].as_str(), booted["state"].as_str()), (Some(vm_id.as_str()), Some("VM_STATE_RUNNING")), "{booted}");

    // A console followed while its VM is deleted ends as a stream does.
    ctl.wait_ready(&vm_id);
    let mut follow = ctl.command(&["console", &vm_id, "--follow"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Its first read is done once the tail it got is printed.
    let mut first = [0u8; 1];
    std::io::Read::read_exact(follow.stdout.as_mut().unwrap(), &mut first).unwrap();
    ctl.ok(&["delete", &vm_id, "--force"]);
    let ended = follow.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(0), "{}", String::from_utf8_lossy(&ended.stderr));
    assert!(String::from_utf8_lossy(&ended.stderr).contains("was deleted; its console ended"));
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}
