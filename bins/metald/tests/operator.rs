//! What an operator meets running metald on a host: who may read its
//! files, and what a stop leaves behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{Host, HostOptions, Wire};
use metald_api::proto::vmprovisioner::v1 as wire;

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every file and FIFO metald keeps in `dir` that another local user
/// could read or write, with its mode. A VM's jail (`vms/<id>/root`)
/// belongs to the VM's user and is laid out for it, so it is not walked.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            if path.file_name().is_some_and(|name| name == "root")
                && path.parent().and_then(Path::parent).is_some_and(|p| p.ends_with("vms"))
            {
                continue;
            }
            found.extend(open_to_others(&path));
        } else if (kind.is_file() || kind.is_fifo()) && mode_of(&path) & 0o077 != 0 {
            found.push((path.clone(), mode_of(&path)));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_folder_and_every_file_in_it_are_for_root_alone_also_after_an_older_build_left_them_wider() {
    let test = "the_data_folder_and_every_file_in_it_are_for_root_alone_also_after_an_older_build_left_them_wider";
    let Some(mut host) = Host::start(test, HostOptions { network: true, billing: true, ..HostOptions::default() }) else { return };
    let client = host.client("acme", Wire::ConnectProto);
    let mut config = common::guest_config(&[&common::testguest::cmdline::heartbeat_ms(100)]);
    config.network.push(wire::NetworkInterface { id: "eth0".into(), ..Default::default() });
    let vm_id = client.create_vm(common::create_request(config)).await.unwrap().into_owned().vm_id;
    client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.unwrap();
    common::wait_for_console(&client, &vm_id, common::testguest::console::READY).await;
    let data = host.data_dir();
    let vm_dir = data.join("vms").join(&vm_id);
    // What holds tenants' data, by name, so a file that moves does not pass by being absent.
    let expected = [
        data.join("vms.db"),
        data.join("spool.db"),
        data.join("network/addresses.db"),
        data.join("metald.lock"),
        vm_dir.join("console.log"),
        vm_dir.join("firecracker.log"),
        vm_dir.join("console.fifo"),
        data.join("usage.jsonl"),
    ];
    let check = |when: &str| {
        assert_eq!(mode_of(&data), 0o700, "{when}: the data folder");
        for path in &expected {
            assert_eq!(mode_of(path), 0o600, "{when}: {}", path.display());
        }
        assert_eq!(open_to_others(&data), Vec::new(), "{when}");
    };
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    while host.usage_records().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no usage record was written");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check("as metald made them");

    // An older build made the folder 0755 and its files 0644.
    host.terminate();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    for path in &expected {
        if !std::fs::symlink_metadata(path).unwrap().file_type().is_fifo() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    host.launch();
    common::wait_for_console(&client, &vm_id, common::testguest::console::HEARTBEAT).await;
    assert!(host.log().contains("data_dir was readable by others; made it 0700"), "{}", host.log());
    check("after a start on what an older build left");
    client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}
