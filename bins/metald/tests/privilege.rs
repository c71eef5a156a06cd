//! What a running metald may still do: the capabilities it keeps, read from
//! `/proc/<pid>/status` of the real daemon while it runs a jailed,
//! networked VM (so what it dropped is shown not to be needed), and the
//! jailed VMM's, which holds none.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{Host, HostOptions, Wire, create_request, guest_config, vmm_pid, wait_for_console};
use metald_api::proto::vmprovisioner::v1 as wire;

/// What metald keeps (listening above port 1024), as `docs/architecture/security/overview.md` lists it.
const KEPT: [&str; 12] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SYS_ADMIN",
    "CAP_SYS_CHROOT",
];

/// The kernel's numbers of the names above (`linux/capability.h`).
fn number(name: &str) -> u32 {
    match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_FOWNER" => 3,
        "CAP_FSETID" => 4,
        "CAP_KILL" => 5,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_CHROOT" => 18,
        "CAP_SYS_ADMIN" => 21,
        "CAP_MKNOD" => 27,
        other => panic!("no number for {other}"),
    }
}

/// The capability numbers of one `Cap…:` line of `/proc/<pid>/status`.
fn capability_set(pid: u32, field: &str) -> BTreeSet<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|line| line.strip_prefix(&format!("{field}:"))).unwrap().trim();
    let mask = u64::from_str_radix(hex, 16).unwrap();
    (0..64).filter(|bit| mask & (1 << bit) != 0).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn metald_keeps_only_the_capabilities_it_uses_and_a_jailed_vmm_holds_none() {
    let test = "metald_keeps_only_the_capabilities_it_uses_and_a_jailed_vmm_holds_none";
    let Some(mut host) = Host::start(test, HostOptions { network: true, ..HostOptions::default() }) else { return };
    let kept: BTreeSet<u32> = KEPT.iter().map(|name| number(name)).collect();
    runtime().block_on(async {
        let client = host.client("acme", Wire::ConnectProto);
        let mut config = guest_config(&[]);
        config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
        let vm_id = client.create_vm(create_request(config)).await.expect("a networked VM is made").into_owned().vm_id;
        client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.expect("and booted");
        wait_for_console(&client, &vm_id, metald_testguest::console::READY).await;

        let daemon = host.pid();
        for field in ["CapBnd", "CapPrm", "CapEff"] {
            assert_eq!(capability_set(daemon, field), kept, "metald's {field}");
        }
        for field in ["CapInh", "CapAmb"] {
            assert!(capability_set(daemon, field).is_empty(), "metald's {field}");
        }
        // Its threads too: capabilities are per thread.
        for task in std::fs::read_dir(format!("/proc/{daemon}/task")).unwrap().flatten() {
            let tid: u32 = task.file_name().to_str().unwrap().parse().unwrap();
            assert_eq!(capability_set(tid, "CapEff"), kept, "thread {tid}");
        }
        assert!(host.log().contains("capabilities=CAP_CHOWN, CAP_DAC_OVERRIDE"), "the start says what it kept:\n{}", host.log());

        let vmm = vmm_pid(&vm_id).expect("the VM's VMM runs");
        for field in ["CapPrm", "CapEff", "CapInh", "CapAmb"] {
            assert!(capability_set(vmm, field).is_empty(), "the jailed VMM's {field}");
        }
        assert!(capability_set(vmm, "CapBnd").is_subset(&kept), "the VMM cannot gain what metald dropped");

        client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    });
    assert!(host.terminate().success());
    assert_eq!(host.leftovers(), Vec::<String>::new());
}
