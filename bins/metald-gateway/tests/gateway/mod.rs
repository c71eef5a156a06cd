//! A real `metald-gateway` for each test, in front of real `metald` hosts
//! (the host harness of `bins/metald/tests/common`): its own data folder,
//! port and admin token, run as `nobody` (it needs no privilege), and
//! stopped, also when the test failed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use connectrpc::client::{ClientConfig, HttpClient};
use metald_api::proto::gateway::v1 as admin;
use metald_api::proto::vmprovisioner::v1 as wire;
use sha2::Digest;

use crate::common::{GATEWAY_SECRET, Host, HostOptions, Wire, client_config, wait_until_logged, wait_until_serving};

/// The user the gateway runs as in the tests.
pub const NOBODY: u32 = 65534;

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_token: String,
    config_path: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Whether its public port speaks TLS.
    tls: bool,
    /// How the test's clients call a TLS port (the CA they trust).
    pub client_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A host in fleet mode: it takes tenant calls only from the test gateway, for any tenant, without a quota of its own.
pub fn fleet_host_options() -> HostOptions {
    HostOptions { gateway: true, gateway_default_quota: Some("{}"), gateway_required: true, ..HostOptions::default() }
}

pub fn gateway_binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_metald-gateway") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe().unwrap().parent().and_then(Path::parent).unwrap().join("metald-gateway"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Gateway {
    /// A gateway placing on `hosts`, with `extra` TOML lines appended to its settings.
    pub fn start(hosts: &[&Host], extra: &str) -> Self {
        let urls: Vec<String> = hosts.iter().map(|host| format!("http://127.0.0.1:{}", host.port)).collect();
        Self::start_on(&urls, extra)
    }

    /// A gateway placing on hosts at `urls` (`host-0`, `host-1`, …), with `extra` TOML lines appended.
    pub fn start_on(urls: &[String], extra: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("metald-test-gateway-").tempdir().unwrap();
        let secret_file = dir.path().join("host.secret");
        std::fs::write(&secret_file, GATEWAY_SECRET).unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        for path in [dir.path(), data_dir.as_path(), secret_file.as_path()] {
            nix::unistd::chown(path, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
        }
        let admin_token = format!("mda_test_{}", metald_core::VmId::generate());
        // The test's own [telemetry] lines join the log filter's table.
        let log = "log = \"info,metald_fleet=debug\"\n";
        let extra = if extra.contains("[telemetry]\n") {
            extra.replacen("[telemetry]\n", &format!("[telemetry]\n{log}"), 1)
        } else {
            format!("{extra}\n[telemetry]\n{log}")
        };
        let mut toml = format!(
            "data_dir = {data_dir:?}\nhost_secret_file = {secret_file:?}\nadmin_token_sha256 = [{:?}]\nprobe_interval_ms = 200\n{extra}\n",
            hex::encode(sha2::Sha256::digest(admin_token.as_bytes())),
        );
        for (index, url) in urls.iter().enumerate() {
            toml.push_str(&format!("[[hosts]]\nname = \"host-{index}\"\nurl = {url:?}\n"));
        }
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, toml).unwrap();
        let tls = extra.contains("[api.tls]");
        let mut gateway = Self { dir, port: free_port(), admin_token, config_path, child: None, starts: 0, tls, client_tls: None };
        gateway.launch();
        gateway
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("gateway.{start}.log"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// Starts the gateway (again), as nobody, and waits until it is ready.
    pub fn launch(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
        let child = Command::new(gateway_binary())
            .arg("--config")
            .arg(&self.config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("NO_COLOR", "1")
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let log_path = self.log_path(self.starts);
        if self.tls {
            wait_until_logged("metald-gateway", self.child.as_mut().unwrap(), &log_path, "metald-gateway serving");
        } else {
            wait_until_serving("metald-gateway", self.child.as_mut().unwrap(), self.port, &log_path);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a running gateway");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait().unwrap()
    }

    /// SIGKILL: the gateway dies wherever it is.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("a running gateway");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    fn config(&self, token: Option<&str>, wire_format: Wire) -> (HttpClient, ClientConfig) {
        match &self.client_tls {
            Some(tls) => {
                let (_, config) = client_config(&format!("https://127.0.0.1:{}", self.port), token, wire_format, Duration::from_secs(60));
                (HttpClient::with_tls(std::sync::Arc::clone(tls)), config)
            }
            None => client_config(&format!("http://127.0.0.1:{}", self.port), token, wire_format, Duration::from_secs(60)),
        }
    }

    /// Sends SIGHUP (a TLS port reloads its certificate).
    pub fn hang_up(&self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// A tenant's client, with its API key.
    pub fn client(&self, key: &str, wire_format: Wire) -> wire::VmServiceClient<HttpClient> {
        let (transport, config) = self.config(Some(key), wire_format);
        wire::VmServiceClient::new(transport, config)
    }

    pub fn admin(&self) -> admin::AdminServiceClient<HttpClient> {
        let (transport, config) = self.config(Some(&self.admin_token), Wire::ConnectProto);
        admin::AdminServiceClient::new(transport, config)
    }

    /// A tenant made through the admin service, and a key of its.
    pub async fn tenant_with_key(&self, tenant: &str, quota: admin::Quota) -> String {
        let admin = self.admin();
        admin
            .create_tenant(admin::CreateTenantRequest { id: tenant.into(), quota: buffa::MessageField::some(quota), ..Default::default() })
            .await
            .unwrap();
        let made = admin
            .create_api_key(admin::CreateApiKeyRequest { tenant_id: tenant.into(), label: "test".into(), ..Default::default() })
            .await
            .unwrap()
            .into_owned();
        made.key
    }

    /// Waits until every host the gateway knows has the health `health` (by name, e.g. `ready`).
    pub async fn wait_for_health(&self, host: &str, health: &str) {
        let admin = self.admin();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hosts = admin.list_hosts(admin::ListHostsRequest::default()).await.unwrap().into_owned().hosts;
            if hosts.iter().any(|listed| listed.name == host && listed.health == health) {
                return;
            }
            assert!(Instant::now() < deadline, "host {host} is not {health}: {hosts:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
