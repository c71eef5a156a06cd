//! A ClickHouse server of the test's own: a fresh folder under the system's
//! temporary directory (named `metald-test-clickhouse-…`), a free loopback
//! port, its own configuration and users, so it never touches the system's
//! ClickHouse. It can be stopped and started again on the same data and
//! port, and it is killed and its folder removed when dropped, also when
//! the test panics.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that names a `clickhouse-server` binary to use
/// instead of Debian's `/usr/sbin/clickhouse-server`.
pub const CLICKHOUSE_ENV: &str = "METALD_CLICKHOUSE_SERVER";

const STARTUP_LIMIT: Duration = Duration::from_secs(30);

/// A running (or stopped) ClickHouse server owned by one test.
#[derive(Debug)]
pub struct ClickHouseServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// Where the `clickhouse-server` binary is, or why it cannot be used.
pub fn clickhouse_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os(CLICKHOUSE_ENV).map_or_else(|| PathBuf::from("/usr/sbin/clickhouse-server"), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("no ClickHouse server at {}; run scripts/install-packages.sh or set {CLICKHOUSE_ENV}", path.display()))
    }
}

/// A started server for `test`, or `None` (after [`crate::unmet`]) when this
/// machine has no ClickHouse server.
pub fn require_clickhouse(test: &str) -> Option<ClickHouseServer> {
    crate::require_server(test, "ClickHouse", clickhouse_binary(), ClickHouseServer::start)
}

impl ClickHouseServer {
    /// Starts a server in a fresh folder on a free loopback port.
    pub fn start(binary: PathBuf) -> io::Result<Self> {
        let mut server = Self { binary, dir: crate::fresh_server_dir("clickhouse")?, port: 0, child: None };
        crate::serve_on_a_free_port(|port| {
            server.port = port;
            server.write_config()?;
            server.run()
        })?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`, for the `clickhouse` crate.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (SIGKILL: as abrupt as an outage gets), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again, on the same data and port.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.run()
    }

    fn run(&mut self) -> io::Result<()> {
        let log = std::fs::File::create(self.dir.join("stdout.log"))?;
        let child = Command::new(&self.binary)
            .arg(format!("--config-file={}", self.dir.join("config.xml").display()))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let started = Instant::now();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        // The server opens its HTTP port once its tables are loaded.
        while started.elapsed() < STARTUP_LIMIT {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "clickhouse-server exited with {status}; see {}",
                    self.dir.join("log/error.log").display()
                )));
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(io::Error::other(format!("clickhouse-server did not open port {} within {STARTUP_LIMIT:?}", self.port)))
    }

    fn write_config(&self) -> io::Result<()> {
        let dir = self.dir.display();
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        std::fs::write(
            self.dir.join("config.xml"),
            format!(
                r#"<yandex>
    <logger><level>warning</level><log>{dir}/log/server.log</log><errorlog>{dir}/log/error.log</errorlog><size>10M</size><count>2</count></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{port}</http_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#,
                port = self.port
            ),
        )?;
        std::fs::write(
            self.dir.join("users.xml"),
            r#"<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#,
        )
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
