//! Marks whether a real Cloud Hypervisor is named for the tests
//! (`METALD_CLOUD_HYPERVISOR_BIN`): without one, the daemon tests that run
//! it are built ignored, saying why, and counted as skipped.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cloud_hypervisor_available)");
    println!("cargo::rerun-if-env-changed=METALD_CLOUD_HYPERVISOR_BIN");
    if std::env::var_os("METALD_CLOUD_HYPERVISOR_BIN").is_some_and(|path| !path.is_empty()) {
        println!("cargo::rustc-cfg=cloud_hypervisor_available");
    }
}
