//! billaged handles ids and usage records only: its build links no VMM
//! client, jailer or network code, which live in metald-core and metald-net.

use std::process::Command;

#[test]
fn billaged_links_no_jailer_or_firecracker_client() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--package", "billaged", "--edges", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "cargo tree: {}", String::from_utf8_lossy(&output.stderr));
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(tree.lines().any(|line| line.starts_with("metald-types ")), "{tree}");
    let linked: Vec<&str> = tree.lines().filter(|line| line.starts_with("metald-core ") || line.starts_with("metald-net ")).collect();
    assert_eq!(linked, Vec::<&str>::new(), "billaged's normal dependencies");
}
