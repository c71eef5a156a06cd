//! README's first command, run as CI runs it: the platform demo against the
//! metald and metalctl of this build, with its daemon's network in
//! namespaces this test makes and its jail in a uid window and cgroup of
//! its own (through `METALD_*` variables, which the demo passes on). What
//! it must show is checked, and that it left nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The test's network namespace playing the host; removed on drop.
struct HostNamespace(String);

impl Drop for HostNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// target/<profile>/deps/<this test> → target/<profile>
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

#[test]
fn the_platform_demo_shows_daemon_tenant_ipv6_vms_console_states_usage_and_removes_everything() {
    let test = "the_platform_demo_shows_daemon_tenant_ipv6_vms_console_states_usage_and_removes_everything";
    if metald_testguest::require_firecracker(test).is_none() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        metald_testguest::unmet::<()>(test, "the demo runs metald with its jailer and networking, which need root");
        return;
    }
    let profile = profile_dir();
    let demo = profile.join("examples").join("platform_demo");
    for binary in [&demo, &profile.join("metald"), &profile.join("metalctl")] {
        if !binary.is_file() {
            metald_testguest::unmet::<()>(test, &format!("{} is not built (cargo test --workspace builds it)", binary.display()));
            return;
        }
    }
    let tag = format!("{:06x}", std::process::id() % 0xff_ffff);
    let prefix = format!("metald-test-demo{tag}-");
    let host = HostNamespace(format!("{prefix}host"));
    assert!(Command::new("ip").args(["netns", "add", &host.0]).status().unwrap().success(), "ip netns add {}", host.0);
    let cgroup_parent = format!("metald-test-demo{tag}");
    let nft_table = format!("mdtdemo{tag}");
    let uid_start = 2_400_000 + (std::process::id() % 1000) * 256;

    let output = Command::new(&demo)
        .args(["--bin-dir".as_ref(), profile.as_os_str()])
        .env("METALD_NETWORK__HOST_NETNS", format!("/run/netns/{}", host.0))
        .env("METALD_NETWORK__NETNS_PREFIX", &prefix)
        .env("METALD_NETWORK__LINK_PREFIX", format!("d{}", &tag[2..]))
        .env("METALD_NETWORK__NFT_TABLE", &nft_table)
        .env("METALD_JAILER__UID_START", uid_start.to_string())
        .env("METALD_JAILER__UID_COUNT", "256")
        .env("METALD_JAILER__CGROUP_PARENT", &cgroup_parent)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{shown}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the demo failed: {:?}", output.status);

    for expected in [
        "$ metald token --tenant demo",
        "VM networking is on: each tenant gets a /64 of",
        "$ metalctl create --vcpus 1 --memory 64MiB --kernel testguest.elf",
        "--network ipv6",
        "was created and booted in",
        "its guest said it was up",
        "Its eth0 got an address of the tenant's /64:",
        metald_testguest::console::READY,
        "watch] vm-",
        "paused, now paused",
        "resumed, now running",
        "stopped, now shutdown",
        "booted again, in a fresh VMM",
        "$ metalctl list --all-tenants    (operator)",
        "TENANT  VMS  INTERVALS",
        "was deleted",
        "metald stopped on SIGTERM",
        "no VM was left",
        "Removed the scratch folder",
        "How long each step took",
    ] {
        assert!(shown.contains(expected), "the demo did not show {expected:?}");
    }
    let usage_row = shown.lines().skip_while(|line| !line.starts_with("TENANT  VMS")).nth(1).expect("a usage row");
    assert!(usage_row.split_whitespace().nth(1) == Some("2"), "both VMs are in the usage: {usage_row}");

    // Nothing is left: scratch folder, namespaces, firewall table, cgroups, processes.
    let scratch = shown.lines().find_map(|line| line.strip_prefix("Removed the scratch folder ")).unwrap().trim_end_matches('.');
    assert!(!Path::new(scratch).exists(), "{scratch} is left");
    let namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix) && *name != host.0)
        .collect();
    assert_eq!(namespaces, Vec::<String>::new(), "VM namespaces are left");
    let tables = Command::new("ip").args(["netns", "exec", &host.0, "nft", "list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains(&nft_table), "the firewall table is left");
    let links = Command::new("ip").args(["-n", &host.0, "-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert_eq!(links.lines().count(), 1, "only the namespace's loopback is left: {links}");
    let root = Path::new("/sys/fs/cgroup");
    for parent in ["", "cpu", "cpuacct", "memory", "pids"].map(|controller| root.join(controller).join(&cgroup_parent)) {
        assert!(!parent.exists(), "{} is left", parent.display());
    }
}
