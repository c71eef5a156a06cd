//! metalctl against a real metald (jailer on, Firecracker on /dev/kvm):
//! every command, the table and JSON outputs, and the exit codes a script
//! relies on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod ctl;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Host, HostOptions};
use ctl::Ctl;

trait GuestCommands {
    fn create_booted(&self, metadata: &str) -> String;
    fn wait_ready(&self, vm_id: &str);
}

impl GuestCommands for Ctl {
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
}

#[test]
fn every_command_against_a_daemon_with_meaningful_exit_codes() {
    let test = "every_command_against_a_daemon_with_meaningful_exit_codes";
    let Some(host) = Host::start(test, HostOptions::default()) else { return };
    let ctl = Ctl::new(host.url(), host.token("acme").to_owned());

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
    let stranger = Ctl::new(host.url(), "not-a-token");
    let (code, message) = stranger.fails(&["list"]);
    assert!(code == 6 && message.contains("unauthenticated"), "{code} {message}");
    let (code, message) = ctl.fails(&["--endpoint", "http://127.0.0.1:9", "list"]);
    assert_eq!(code, 8, "an unreachable host: {message}");
    let operator = Ctl::new(host.url(), host.operator_token.clone());
    let (code, message) = operator.fails(&["usage"]);
    assert!(code == 4 && message.contains("billing is off"), "a host without billing has no usage to sum: {code} {message}");
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
    let ctl = Ctl::new(host.url(), host.token("acme").to_owned());
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
    let ctl = Ctl::new(host.url(), host.token("acme").to_owned());
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

    // A graceful shutdown that ended in a kill says so; the VM is shut down as asked.
    let stubborn = ctl
        .ok(&["create", "--kernel", common::GUEST_KERNEL, "--cmdline", metald_testguest::cmdline::IGNORE_SHUTDOWN, "--boot"])
        .trim()
        .to_owned();
    ctl.wait_ready(&stubborn);
    let output = ctl.run(&["shutdown", &stubborn, "--timeout", "1"]);
    let (said, warned) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{said} {warned}");
    assert_eq!(said.trim(), format!("{stubborn}: shutdown"));
    assert!(warned.contains("did not power off within the grace time; its VMM was killed"), "{warned}");
    ctl.ok(&["boot", &stubborn]);
    ctl.wait_ready(&stubborn);
    let killed: serde_json::Value = serde_json::from_str(&ctl.ok(&["--json", "shutdown", &stubborn, "--timeout", "1"])).unwrap();
    assert_eq!(killed["killed"], true, "{killed}");
    ctl.ok(&["boot", &stubborn]);
    let forced: serde_json::Value = serde_json::from_str(&ctl.ok(&["--json", "shutdown", &stubborn, "--force"])).unwrap();
    assert_eq!(forced["killed"], true, "a forced stop kills: {forced}");
    ctl.ok(&["delete", &stubborn]);
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// An int64 in proto JSON is a string; a small one may come as a number.
fn int64(value: &serde_json::Value) -> u64 {
    value.as_u64().or_else(|| value.as_str().and_then(|text| text.parse().ok())).unwrap_or(0)
}

#[test]
fn the_operator_lists_every_tenants_vms_and_sums_their_usage_as_the_usage_file_holds_it() {
    let test = "the_operator_lists_every_tenants_vms_and_sums_their_usage_as_the_usage_file_holds_it";
    let options = HostOptions { tenants: vec![("acme", "{}"), ("globex", "{}")], billing: true, ..HostOptions::default() };
    let Some(host) = Host::start(test, options) else { return };
    let acme = Ctl::new(host.url(), host.token("acme").to_owned());
    let globex = Ctl::new(host.url(), host.token("globex").to_owned());
    let operator = Ctl::new(host.url(), host.operator_token.clone());
    let acme_vm = acme.create_booted("team=a");
    let globex_vm = globex.create_booted("team=b");

    let table = operator.ok(&["list", "--all-tenants"]);
    assert!(table.starts_with("TENANT"), "{table}");
    for (tenant, vm_id) in [("acme", &acme_vm), ("globex", &globex_vm)] {
        assert!(table.lines().any(|row| row.starts_with(tenant) && row.contains(vm_id.as_str())), "{table}");
    }
    let listed: serde_json::Value = serde_json::from_str(&operator.ok(&["--json", "list", "-A"])).unwrap();
    let owners: Vec<_> = listed["vms"].as_array().unwrap().iter().map(|vm| vm["customerId"].as_str().unwrap().to_owned()).collect();
    assert_eq!(owners.iter().filter(|owner| *owner == "acme").count(), 1, "{listed}");
    assert_eq!(owners.iter().filter(|owner| *owner == "globex").count(), 1, "{listed}");
    assert!(!acme.ok(&["list"]).contains(&globex_vm), "a tenant still sees only its own VMs");

    // Each token opens its own service only.
    let (code, message) = acme.fails(&["list", "--all-tenants"]);
    assert!(code == 6 && message.contains("permission_denied") && message.contains("operator's token"), "{code} {message}");
    let (code, message) = acme.fails(&["usage"]);
    assert!(code == 6 && message.contains("acme"), "{code} {message}");
    let (code, message) = operator.fails(&["list"]);
    assert!(code == 6 && message.contains("tenant's token"), "{code} {message}");

    // Once both VMs stopped and their last records are in the file, the summary is the file's sums.
    acme.ok(&["shutdown", &acme_vm, "--force"]);
    globex.ok(&["shutdown", &globex_vm, "--force"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let records = host.usage_records();
        let finished = |vm_id: &str| records.iter().any(|record| record["vm_id"] == vm_id && record["final_record"] == true);
        if finished(&acme_vm) && finished(&globex_vm) {
            break records;
        }
        assert!(Instant::now() < deadline, "no final usage records in the file: {records:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let summary: serde_json::Value = serde_json::from_str(&operator.ok(&["--json", "usage"])).unwrap();
    assert!(summary["source"].as_str().unwrap().starts_with("file ") && summary["source"].as_str().unwrap().ends_with("usage.jsonl"));
    let tenants = summary["tenants"].as_array().unwrap();
    assert_eq!(tenants.iter().map(|tenant| tenant["customerId"].as_str().unwrap()).collect::<Vec<_>>(), ["acme", "globex"]);
    for tenant in tenants {
        let own: Vec<_> = records.iter().filter(|record| record["tenant_id"] == tenant["customerId"]).collect();
        let cpu_ns: u64 = own.iter().map(|record| record["usage"]["cpu_ns"].as_u64().unwrap()).sum();
        let vcpu_ms: u64 = own
            .iter()
            .map(|record| record["vcpus"].as_u64().unwrap() * (record["end_ms"].as_u64().unwrap() - record["start_ms"].as_u64().unwrap()))
            .sum();
        assert_eq!(int64(&tenant["intervals"]), own.len() as u64, "{tenant}");
        assert_eq!(tenant["vmCount"], 1, "{tenant}");
        assert!(cpu_ns > 0, "a booted guest used CPU");
        assert!((tenant["cpuSeconds"].as_f64().unwrap() - cpu_ns as f64 / 1e9).abs() < 1e-9, "{tenant} against {cpu_ns} ns");
        assert!((tenant["vcpuSeconds"].as_f64().unwrap() - vcpu_ms as f64 / 1e3).abs() < 1e-9, "{tenant} against {vcpu_ms} ms");
        assert!(tenant["memoryGibSeconds"].as_f64().unwrap() > 0.0, "{tenant}");
    }
    let table = operator.ok(&["usage", "--since", "1h"]);
    assert!(table.starts_with("TENANT") && table.contains("\nacme ") && table.contains("\nglobex "), "{table}");
    assert!(table.contains("read from file "), "{table}");
    let none = operator.ok(&["usage", "--from", "2100-01-01T00:00:00Z", "--to", "2100-01-02T00:00:00Z"]);
    assert!(none.starts_with("No usage from 2100-01-01T00:00:00Z"), "{none}");

    acme.ok(&["delete", &acme_vm]);
    globex.ok(&["delete", &globex_vm]);
    assert_eq!(operator.ok(&["list", "-A"]).trim(), "No VMs.");
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
