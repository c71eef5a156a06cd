//! A PostgreSQL server of the test's own: `initdb` into a fresh folder under
//! the system's temporary directory (named `metald-test-postgres-…`), then
//! `postgres` on a free loopback port with its socket in that folder, so it
//! never touches a system cluster. PostgreSQL refuses to run as root, so
//! under root the server runs as `nobody`, who owns the folder. It can be
//! stopped and started again on the same data and port, and it is killed
//! and its folder removed when dropped, also when the test panics.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that names the folder of PostgreSQL's programs
/// to use instead of Debian's `/usr/lib/postgresql/15/bin`.
pub const POSTGRES_ENV: &str = "METALD_POSTGRES_BIN_DIR";

const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// Who runs the server when the test runs as root.
const NOBODY: u32 = 65534;

/// A running (or stopped) PostgreSQL server owned by one test.
#[derive(Debug)]
pub struct PostgresServer {
    bin_dir: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// Where PostgreSQL's programs are, or why they cannot be used.
pub fn postgres_bin_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os(POSTGRES_ENV).map_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"), PathBuf::from);
    if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
        Ok(dir)
    } else {
        Err(format!("no PostgreSQL server in {}; run scripts/install-packages.sh or set {POSTGRES_ENV}", dir.display()))
    }
}

/// A started server for `test`, or `None` (after [`crate::unmet`]) when this
/// machine has no PostgreSQL.
pub fn require_postgres(test: &str) -> Option<PostgresServer> {
    crate::require_server(test, "PostgreSQL", postgres_bin_dir(), PostgresServer::start)
}

fn is_root() -> bool {
    // The owner of our own /proc entry is our effective uid; std has no geteuid.
    std::fs::metadata("/proc/self").map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0).unwrap_or(false)
}

impl PostgresServer {
    /// Makes a cluster in a fresh folder and starts it on a free loopback port.
    pub fn start(bin_dir: PathBuf) -> io::Result<Self> {
        let mut server = Self { bin_dir, dir: crate::fresh_server_dir("postgres")?, port: 0, child: None };
        if is_root() {
            std::os::unix::fs::chown(&server.dir, Some(NOBODY), Some(NOBODY))?;
        }
        let output = server
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(server.data())
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!("initdb failed: {}", String::from_utf8_lossy(&output.stderr).trim())));
        }
        crate::serve_on_a_free_port(|port| {
            server.port = port;
            server.run()
        })?;
        Ok(server)
    }

    /// A libpq connection string for the `postgres` database as its superuser.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        if is_root() {
            command.uid(NOBODY).gid(NOBODY);
        }
        command.current_dir(&self.dir);
        command
    }

    /// Stops the server (SIGKILL: as abrupt as an outage gets), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The postmaster's children notice it is gone and end within moments;
        // until they do the data folder is still in use, so wait for them.
        let started = Instant::now();
        while started.elapsed() < STARTUP_LIMIT && self.backends_alive() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a process still holds the cluster (the postmaster's children
    /// keep `postmaster.pid`'s shared memory attached until they exit).
    fn backends_alive(&self) -> bool {
        let data = self.data();
        let Ok(entries) = std::fs::read_dir("/proc") else { return false };
        entries.flatten().any(|entry| {
            let cwd = entry.path().join("cwd");
            std::fs::read_link(cwd).is_ok_and(|cwd| cwd == data)
        })
    }

    /// Starts the stopped server again, on the same data and port.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.run()
    }

    fn run(&mut self) -> io::Result<()> {
        let log = std::fs::File::create(self.dir.join("server.log"))?;
        if is_root() {
            std::os::unix::fs::chown(self.dir.join("server.log"), Some(NOBODY), Some(NOBODY))?;
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let started = Instant::now();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        // The server opens its port once it accepts connections (after crash recovery, if any).
        while started.elapsed() < STARTUP_LIMIT {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!("postgres exited with {status}; see {}", self.dir.join("server.log").display())));
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() && self.accepting() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(io::Error::other(format!("postgres did not accept connections on port {} within {STARTUP_LIMIT:?}", self.port)))
    }

    /// `pg_isready`: the port is open before recovery ends.
    fn accepting(&self) -> bool {
        Command::new(self.bin_dir.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
