//! metalctl against a real gateway in front of a real metald: every
//! command a tenant runs, with an API key, and every admin command, with
//! the gateway's admin token; tables, JSON and exit codes as against a host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;
mod ctl;
#[path = "../../metald-gateway/tests/gateway/mod.rs"]
mod gateway;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Host, HostOptions};
use ctl::Ctl;
use gateway::Gateway;

#[test]
fn every_metalctl_command_works_against_the_gateway() {
    let test = "every_metalctl_command_works_against_the_gateway";
    let Some(mut host) = Host::start(test, HostOptions { gateway: true, gateway_default_quota: Some("{}"), ..HostOptions::default() })
    else {
        return;
    };
    let mut gateway = Gateway::start(&[&host], "");
    let endpoint = format!("http://127.0.0.1:{}", gateway.port);
    let operator = Ctl::new(endpoint.clone(), gateway.admin_token.clone());

    // The admin commands.
    assert!(operator.ok(&["admin", "tenants", "create", "acme", "--max-vms", "3"]).contains("acme"));
    let tenants = operator.ok(&["admin", "tenants", "set-quota", "acme", "--max-vms", "5", "--max-memory", "1GiB"]);
    assert!(tenants.contains("5") && tenants.contains("1 GiB"), "{tenants}");
    assert!(operator.ok(&["admin", "tenants", "list"]).contains("acme"));
    let key = operator.ok(&["admin", "keys", "create", "acme", "--label", "ci", "--expires-in", "1h"]).trim().to_owned();
    assert!(key.starts_with("mdk_"), "{key}");
    let keys = operator.ok(&["admin", "keys", "list"]);
    assert!(keys.contains(&key[..20]) && !keys.contains(&key[21..]) && keys.contains("ci"), "masked: {keys}");
    let listed: serde_json::Value = serde_json::from_str(&operator.ok(&["admin", "keys", "list", "--tenant", "acme", "--json"])).unwrap();
    let key_id = listed["keys"][0]["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !operator.ok(&["admin", "hosts", "list"]).contains("ready") {
        assert!(Instant::now() < deadline, "the host never shows ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let added = operator.ok(&["admin", "hosts", "add", "spare", "http://127.0.0.1:9"]);
    assert!(added.contains("spare") && added.contains("unreachable"), "{added}");
    assert!(operator.ok(&["admin", "hosts", "remove", "spare"]).contains("removed"));
    assert!(operator.ok(&["admin", "hosts", "cordon", "host-0"]).contains("cordoned"));
    let tenant = Ctl::new(endpoint.clone(), key.clone());
    let (code, message) = tenant.fails(&["create", "--vcpus", "1", "--memory", "32MiB", "--kernel", common::GUEST_KERNEL]);
    assert!(code == 7 && message.contains("cordoned or draining"), "{code} {message}");
    assert!(operator.ok(&["admin", "hosts", "drain", "host-0"]).contains("draining"));
    assert!(operator.ok(&["admin", "hosts", "uncordon", "host-0"]).contains("active"));
    assert!(operator.ok(&["admin", "strays"]).contains("No stray VMs"));

    // A tenant's commands, with its key.
    let mut watch = tenant.command(&["watch"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let vm_id = tenant
        .ok(&["create", "--vcpus", "1", "--memory", "32MiB", "--kernel", common::GUEST_KERNEL, "--metadata", "team=ci", "--boot"])
        .trim()
        .to_owned();
    let mut events = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = events.next().unwrap().unwrap();
    assert!(first.contains(&vm_id) && first.contains("created"), "{first}");
    let _ = watch.kill();
    let _ = watch.wait();
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    while !tenant.ok(&["console", &vm_id]).contains(metald_testguest::console::READY) {
        assert!(Instant::now() < deadline, "no ready line through the gateway");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tenant.ok(&["list"]).contains(&vm_id));
    assert!(tenant.ok(&["info", &vm_id]).contains("team"));
    tenant.ok(&["pause", &vm_id]);
    tenant.ok(&["resume", &vm_id]);
    tenant.ok(&["reboot", &vm_id]);
    tenant.ok(&["shutdown", "--force", &vm_id]);
    tenant.ok(&["boot", &vm_id]);
    let listed: serde_json::Value = serde_json::from_str(&tenant.ok(&["list", "--json"])).unwrap();
    assert_eq!(listed["totalCount"], 1);
    let (code, message) = tenant.fails(&["info", "vm-not-there"]);
    assert!(code == 3 && message.contains("does not exist"), "{code} {message}");
    let (code, message) = tenant.fails(&["usage"]);
    assert!(code == 1 && !message.is_empty(), "the host operator's usage is not the gateway's: {code} {message}");
    let (code, message) = tenant.fails(&["admin", "tenants", "list"]);
    assert!(code == 6 && message.contains("admin token"), "{code} {message}");
    tenant.ok(&["delete", "--force", &vm_id]);

    operator.ok(&["admin", "keys", "revoke", &key_id]);
    let (code, message) = tenant.fails(&["list"]);
    assert!(code == 6 && message.contains("the API key is not valid"), "{code} {message}");

    assert!(gateway.terminate().success(), "{}", gateway.log());
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
