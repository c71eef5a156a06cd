//! What metald does with nothing configured, and how it says what it
//! cannot do: the embedded defaults, the jailer's need for root, and
//! networking turned off with a clear message when not root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

fn without_metald_env(command: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("METALD_")) {
        command.env_remove(key);
    }
    command
}

#[test]
fn the_embedded_defaults_need_nothing_else() {
    let output = without_metald_env(&mut Command::new(common::metald_binary())).arg("print-config").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let settings: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(settings["data_dir"], "/var/lib/metald");
    assert_eq!(settings["listen"], "127.0.0.1:7070");
    assert_eq!(settings["jailer"]["enabled"], true, "jailed by default");
    assert_eq!(settings["network"]["enabled"], serde_json::Value::Null, "networking follows root");
    assert_eq!(settings["billing"]["sink"], "file", "usage goes to a file in the data folder");
    let flagged = without_metald_env(&mut Command::new(common::metald_binary()))
        .args(["--data-dir", "/srv/elsewhere", "print-config"])
        .env("METALD_BILLING__SINK", "clickhouse")
        .output()
        .unwrap();
    let settings: serde_json::Value = serde_json::from_slice(&flagged.stdout).unwrap();
    assert_eq!((settings["data_dir"].as_str(), settings["billing"]["sink"].as_str()), (Some("/srv/elsewhere"), Some("clickhouse")));
    let refused = without_metald_env(&mut Command::new(common::metald_binary()))
        .arg("print-config")
        .env("METALD_BILLING__SINKK", "x")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("sinkk"), "an unknown key is named: {message}");
    // Variables of the same prefix that are not settings belong to others (metalctl, the service unit).
    let others = without_metald_env(&mut Command::new(common::metald_binary()))
        .arg("print-config")
        .env("METALD_ENDPOINT", "http://127.0.0.1:1")
        .env("METALD_TOKEN", "x")
        .output()
        .unwrap();
    assert!(others.status.success(), "{}", String::from_utf8_lossy(&others.stderr));
}

/// A folder and a copy of metald that the unprivileged user can reach, wherever the checkout lives.
fn unprivileged_setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("metald");
    std::fs::copy(common::metald_binary(), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    for folder in ["data", "images"] {
        std::fs::create_dir(dir.path().join(folder)).unwrap();
        nix::unistd::chown(&dir.path().join(folder), Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    }
    (dir, binary)
}

#[test]
fn without_root_the_jailer_refuses_to_start_and_networking_stays_off_with_a_reason() {
    let test = "without_root_the_jailer_refuses_to_start_and_networking_stays_off_with_a_reason";
    if !nix::unistd::geteuid().is_root() {
        let _: Option<()> = common::testguest::unmet(test, "this test switches to an unprivileged user, which needs root");
        return;
    }
    let (dir, binary) = unprivileged_setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = |jailer: bool| {
        let mut command = Command::new(&binary);
        without_metald_env(&mut command)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--image-root")
            .arg(dir.path().join("images"))
            // Executable is all the start checks; no VM is made here.
            .args(["--firecracker", "/bin/true"])
            .env("METALD_JAILER__ENABLED", jailer.to_string())
            .env("METALD_BILLING__ENABLED", "false")
            .env("NO_COLOR", "1")
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let refused = run(true).output().unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("the jailer needs root"), "{message}");

    let log_path = dir.path().join("unjailed.log");
    let mut daemon = run(false).stderr(std::fs::File::create(&log_path).unwrap()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::http_get(port, "/ready").map(|(status, _)| status) != Some(200) {
        assert!(daemon.try_wait().unwrap().is_none(), "metald exited: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        assert!(Instant::now() < deadline, "not ready: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(daemon.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("networking is off: metald does not run as root"), "{log}");
    assert!(log.contains("no tenants are configured"), "every call is refused, and it says so: {log}");
    assert!(dir.path().join("data/vms.db").exists(), "the VM store is SQLite in the data folder");
}

#[test]
fn a_cloud_hypervisor_that_is_not_there_or_a_default_vmm_not_offered_stops_metald_before_it_makes_anything() {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let start = |settings: &[(&str, &str)]| {
        let mut command = Command::new(common::metald_binary());
        without_metald_env(&mut command)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--firecracker", "/bin/true", "--listen", "127.0.0.1:0"])
            .env("METALD_BILLING__ENABLED", "false")
            .env("NO_COLOR", "1");
        for (key, value) in settings {
            command.env(key, value);
        }
        command.output().unwrap()
    };
    let missing = dir.path().join("no-such-cloud-hypervisor");
    let refused = start(&[("METALD_CLOUD_HYPERVISOR", missing.to_str().unwrap())]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains(&format!("cloud_hypervisor: cannot use {}", missing.display())), "{message}");

    let refused = start(&[("METALD_DEFAULT_VMM", "cloud-hypervisor")]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains(r#"default_vmm: "cloud-hypervisor" is not offered by this host; it offers firecracker"#), "{message}");
    assert!(!dir.path().join("data").exists(), "nothing was made: {:?}", std::fs::read_dir(dir.path()).unwrap().collect::<Vec<_>>());

    let offered = without_metald_env(&mut Command::new(common::metald_binary()))
        .arg("print-config")
        .env("METALD_CLOUD_HYPERVISOR", "/bin/true")
        .env("METALD_DEFAULT_VMM", "cloud-hypervisor")
        .output()
        .unwrap();
    let settings: serde_json::Value = serde_json::from_slice(&offered.stdout).unwrap();
    assert_eq!((settings["cloud_hypervisor"].as_str(), settings["default_vmm"].as_str()), (Some("/bin/true"), Some("cloud-hypervisor")));
}

#[test]
fn a_new_token_is_printed_with_the_hash_to_configure_and_only_the_hash_is_kept() {
    let output = Command::new(common::metald_binary()).args(["token", "--tenant", "acme"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let token = text.lines().find_map(|line| line.strip_prefix("token: ")).expect("the token").trim().to_owned();
    let hash = text.lines().find_map(|line| line.strip_prefix("token_sha256 = ")).expect("the settings line").trim_matches('"').to_owned();
    assert!(token.len() >= 64, "a long random token: {token}");
    assert_eq!(hash, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes())));
    assert!(text.contains("id = \"acme\""), "{text}");
    let refused = Command::new(common::metald_binary()).args(["token", "--tenant", "../x"]).output().unwrap();
    assert!(!refused.status.success());
    let operator = Command::new(common::metald_binary()).args(["token", "--operator"]).output().unwrap();
    let text = String::from_utf8(operator.stdout).unwrap();
    let token = text.lines().find_map(|line| line.strip_prefix("token: ")).expect("the token").trim().to_owned();
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    assert!(text.contains(&format!("[auth]\noperator_token_sha256 = [{hash:?}]")), "{text}");
    let neither = Command::new(common::metald_binary()).arg("token").output().unwrap();
    assert_eq!(neither.status.code(), Some(2), "a token is for a tenant or the operator");
}

#[test]
fn tenants_that_share_a_token_a_tenant_with_two_quotas_or_an_operator_token_of_a_tenant_are_refused_before_anything_is_made() {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let data = dir.path().join("data");
    let hash = |token: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let start_with_operator = |operator: &[String], tenants: &[(&str, String, &str)]| {
        let mut toml = format!("data_dir = {data:?}\nfirecracker = \"/bin/true\"\n[jailer]\nenabled = false\n[billing]\nenabled = false\n");
        toml.push_str(&format!("[auth]\noperator_token_sha256 = {operator:?}\n"));
        for (id, token_hash, quota) in tenants {
            toml.push_str(&format!("[[auth.tenants]]\nid = {id:?}\ntoken_sha256 = {token_hash:?}\nquota = {quota}\n"));
        }
        let config = dir.path().join("metald.toml");
        std::fs::write(&config, toml).unwrap();
        let output = without_metald_env(&mut Command::new(common::metald_binary()))
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!output.status.success(), "metald started with {tenants:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let start_with = |tenants: &[(&str, String, &str)]| start_with_operator(&[], tenants);
    let shared = start_with(&[("acme", hash("one"), "{}"), ("globex", hash("one"), "{}")]);
    assert!(shared.contains(r#""acme" and "globex" have the same token_sha256"#), "{shared}");
    // Two tokens of one tenant are a rotation; two quotas for it are not.
    let quotas = start_with(&[("acme", hash("one"), "{ max_vms = 1 }"), ("acme", hash("two"), "{ max_vms = 2 }")]);
    assert!(quotas.contains(r#"the tables of "acme" give different quotas"#), "{quotas}");
    // The operator's token is no tenant's.
    let operator_is_tenant = start_with_operator(&[hash("one")], &[("acme", hash("one"), "{}")]);
    assert!(operator_is_tenant.contains(r#"auth.operator_token_sha256: [0] is also tenant "acme"'s token_sha256"#), "{operator_is_tenant}");
    let not_a_hash = start_with_operator(&["abc".to_owned()], &[]);
    assert!(not_a_hash.contains("auth.operator_token_sha256") && not_a_hash.contains("64 hex digits"), "{not_a_hash}");
    assert!(!data.exists(), "nothing is made before the settings hold");
}

#[test]
fn flags_come_before_or_after_the_command_and_a_bad_setting_is_named_by_its_own_key() {
    let dir = tempfile::Builder::new().prefix("metald-test-").tempdir().unwrap();
    let config = dir.path().join("metald.toml");
    std::fs::write(&config, "data_dir = \"/srv/after\"\n").unwrap();
    let after =
        without_metald_env(&mut Command::new(common::metald_binary())).arg("print-config").arg("--config").arg(&config).output().unwrap();
    assert!(after.status.success(), "{}", String::from_utf8_lossy(&after.stderr));
    let settings: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(settings["data_dir"], "/srv/after");

    for (toml, key) in [("lisen = \"127.0.0.1:1\"\n", "lisen"), ("[billing]\nsinkk = \"file\"\n", "billing.sinkk")] {
        std::fs::write(&config, toml).unwrap();
        let refused = without_metald_env(&mut Command::new(common::metald_binary()))
            .arg("print-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(!message.contains("default."), "no profile name in the keys: {message}");
        assert!(message.contains(key) && message.contains(&config.display().to_string()), "the key and the file: {message}");
    }
}
