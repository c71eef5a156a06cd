//! The metald test guest and the rules by which tests find their host tools.
//!
//! This crate owns the tiny PVH guest in `guest/` (built from source by
//! `build.rs` with the host's gcc and ld), the names of the kernel
//! command-line tokens that steer it and of the lines it prints, and the
//! policy for tests that need KVM or Firecracker: in CI (`CI=true`) a missing
//! requirement fails the test; elsewhere the test is skipped with the reason
//! printed. It knows nothing about metald itself.
//!
//! It also starts the real servers tests write to: [`clickhouse`] runs a
//! ClickHouse server of the test's own on loopback, [`postgres`] a
//! PostgreSQL server.

pub mod clickhouse;
pub mod nft;
pub mod postgres;

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The test guest's ELF kernel, built by this crate's build script.
pub fn kernel_path() -> &'static Path {
    Path::new(env!("METALD_TESTGUEST_KERNEL"))
}

/// Kernel command-line tokens understood by the guest.
pub mod cmdline {
    /// Print a heartbeat line every N milliseconds.
    pub fn heartbeat_ms(interval_ms: u64) -> String {
        format!("testguest.heartbeat_ms={interval_ms}")
    }

    /// Spin about N loop iterations after the ready line. How long that
    /// takes differs between hosts (the loop runs emulated), so no test may
    /// treat it as a duration; `METALD_TESTGUEST_BURN_SCALE` (a factor,
    /// default 1) scales every count, to prove exactly that.
    pub fn burn(iterations: u64) -> String {
        format!("testguest.burn={}", scaled(iterations))
    }

    /// Spin until the VM is stopped.
    pub fn burn_forever() -> String {
        format!("testguest.burn={}", u64::MAX / 2)
    }

    /// `iterations` as the guest will be told it, after the scale.
    pub fn scaled(iterations: u64) -> u64 {
        let scale = std::env::var(BURN_SCALE_ENV).ok().and_then(|value| value.parse::<f64>().ok()).filter(|scale| *scale > 0.0);
        match scale {
            // `as` saturates at u64::MAX, and a count never drops to zero (which means "no burn").
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            Some(scale) => ((iterations as f64 * scale) as u64).max(1),
            None => iterations,
        }
    }

    /// The variable that scales every burn count.
    pub const BURN_SCALE_ENV: &str = "METALD_TESTGUEST_BURN_SCALE";

    /// Touch every page of N MiB of guest RAM after the ready line.
    pub fn mem_mib(mib: u64) -> String {
        format!("testguest.mem_mib={mib}")
    }

    /// Reset the VM right after the ready line.
    pub const RESET: &str = "testguest.reset";

    /// Ignore Ctrl+Alt+Del (say so on the console and keep running), so a
    /// graceful stop has to fall back to killing the VMM.
    pub const IGNORE_SHUTDOWN: &str = "testguest.ignore_shutdown";
}

/// Prefixes of the lines the guest prints on its serial console.
pub mod console {
    /// Printed once at start, followed by `cmdline="..."`.
    pub const READY: &str = "TESTGUEST READY";
    /// Printed at every heartbeat, followed by `n=<count> t_ms=<guest ms>`.
    pub const HEARTBEAT: &str = "TESTGUEST HEARTBEAT";
    /// Printed on Ctrl+Alt+Del, just before the guest resets.
    pub const SHUTDOWN: &str = "TESTGUEST SHUTDOWN";
    /// Printed on Ctrl+Alt+Del when told to ignore it.
    pub const IGNORED_SHUTDOWN: &str = "TESTGUEST IGNORED SHUTDOWN";
    /// Printed when a `testguest.burn` loop has finished.
    pub const BURN_DONE: &str = "TESTGUEST BURN DONE";
    /// Printed when `testguest.mem_mib` pages have all been written.
    pub const MEM_DONE: &str = "TESTGUEST MEM DONE";
}

/// The workspace this crate was built in.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The environment variable that names a Firecracker binary to use instead
/// of the one `scripts/install-firecracker.sh` puts in `.tools/bin`.
pub const FIRECRACKER_ENV: &str = "METALD_FIRECRACKER_BIN";

/// Where the pinned Firecracker binary is, or why it cannot be used.
pub fn firecracker_binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os(FIRECRACKER_ENV) {
        Some(path) => PathBuf::from(path),
        None => workspace_root().join(".tools/bin/firecracker"),
    };
    let metadata = std::fs::metadata(&path).map_err(|error| {
        format!("no Firecracker binary at {} ({error}); run scripts/install-firecracker.sh or set {FIRECRACKER_ENV}", path.display())
    })?;
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", path.display()));
    }
    Ok(path)
}

/// Whether this process can open `/dev/kvm` for reading and writing.
pub fn kvm_usable() -> Result<(), String> {
    OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop).map_err(|error| format!("/dev/kvm cannot be opened ({error})"))
}

/// Whether this run is CI, where a missing requirement is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// Deals with a test requirement that is not met: panics in CI, otherwise
/// prints why the test is skipped. Returns `None` so callers can `return`.
pub fn unmet<T>(test: &str, reason: &str) -> Option<T> {
    if in_ci() {
        panic!("{test} needs something this CI machine lacks: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    None
}

/// The Firecracker binary, when KVM and Firecracker are both usable here.
pub fn require_firecracker(test: &str) -> Option<PathBuf> {
    if let Err(reason) = kvm_usable() {
        return unmet(test, &reason);
    }
    match firecracker_binary() {
        Ok(path) => Some(path),
        Err(reason) => unmet(test, &reason),
    }
}

/// The variable naming a real Cloud Hypervisor (v54 or newer) for the tests.
pub const CLOUD_HYPERVISOR_ENV: &str = "METALD_CLOUD_HYPERVISOR_BIN";

/// The Cloud Hypervisor binary `METALD_CLOUD_HYPERVISOR_BIN` names, when
/// KVM and it are both usable here. No registry this project can use ships
/// one, so CI never has it: its tests are built ignored there (see
/// `metald-core/build.rs`), and one that runs without it says why.
pub fn require_cloud_hypervisor(test: &str) -> Option<PathBuf> {
    if let Err(reason) = kvm_usable() {
        return unmet(test, &reason);
    }
    let Some(path) = std::env::var_os(CLOUD_HYPERVISOR_ENV).map(PathBuf::from) else {
        return unmet(test, &format!("{CLOUD_HYPERVISOR_ENV} names no Cloud Hypervisor binary"));
    };
    match std::fs::metadata(&path) {
        Ok(metadata) if metadata.permissions().mode() & 0o111 != 0 => Some(path),
        Ok(_) => unmet(test, &format!("{} is not executable", path.display())),
        Err(error) => unmet(test, &format!("no Cloud Hypervisor binary at {} ({error})", path.display())),
    }
}

/// Where the host's cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The folders of the cgroup parent `name` that exist: one per v1
/// controller hierarchy, or the one of cgroup v2.
pub fn cgroup_parent_dirs(name: &str) -> Vec<PathBuf> {
    let mut parents = vec![Path::new(CGROUP_ROOT).join(name)];
    if let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) {
        parents.extend(hierarchies.flatten().map(|hierarchy| hierarchy.path().join(name)));
    }
    parents.retain(|parent| parent.is_dir());
    parents
}

/// The cgroups directly under `parent`.
pub fn child_cgroups(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .map(|entries| entries.flatten().map(|entry| entry.path()).filter(|path| path.is_dir()).collect())
        .unwrap_or_default()
}

/// Removes the cgroup parent `name` and the cgroups in it, in every
/// hierarchy. A cgroup whose last process was just killed is refused until
/// the kernel has reaped it, so each removal is tried for a while.
pub fn remove_cgroup_parent(name: &str) {
    for parent in cgroup_parent_dirs(name) {
        for cgroup in child_cgroups(&parent) {
            for _ in 0..200 {
                if std::fs::remove_dir(&cgroup).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = std::fs::remove_dir(&parent);
    }
}

/// Live (not zombie) processes whose command line mentions `root` (an
/// unjailed VMM started there) or whose cgroup path names `cgroup_parent`
/// (a jailed one): what a test's VMs may have left running.
pub fn vmm_processes(root: &Path, cgroup_parent: &Path) -> Vec<u32> {
    let needle = root.to_string_lossy().into_owned();
    let cgroup_needle = format!("/{}/", cgroup_parent.display());
    // The jail pool's children wait in cgroups of that name; a VMM's cgroup is its VM's (cgroup v1 renames it).
    let pool_needle = format!("/{}/{JAIL_POOL_PREFIX}", cgroup_parent.display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        if cgroups.contains(&pool_needle) {
            continue;
        }
        let jailed_here = cgroups.contains(&cgroup_needle);
        if cmdline.is_empty() || !(jailed_here || String::from_utf8_lossy(&cmdline).contains(&needle)) {
            continue;
        }
        if !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// How the jail pool's cgroups are named (`metald_core::jail_pool::POOL_PREFIX`).
pub const JAIL_POOL_PREFIX: &str = "pool-";

/// The named network namespaces (in `/run/netns`) whose names start with `prefix`.
pub fn network_namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The jail pool's waiting children under `cgroup_parent`: not VMMs, but
/// nothing may be left of them once their daemon has stopped.
pub fn jail_pool_processes(cgroup_parent: &Path) -> Vec<u32> {
    let pool_needle = format!("/{}/{JAIL_POOL_PREFIX}", cgroup_parent.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).ok()?;
            (cgroups.contains(&pool_needle) && !is_zombie(pid)).then_some(pid)
        })
        .collect()
}

/// Polls `check` every 50 ms until it holds; a test that waits longer than
/// `limit` has failed. The limit only bounds a failure, so make it generous.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lines of a file another process is still appending to that it has
/// finished writing: a last line without its newline may be half a record.
pub fn finished_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n').filter_map(|line| line.strip_suffix('\n')).filter(|line| !line.trim().is_empty())
}

/// The process exists and has not ended (a zombie has ended; only its parent's wait is missing).
pub fn process_alive(pid: u32) -> bool {
    std::fs::metadata(format!("/proc/{pid}")).is_ok() && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    state.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// A fresh folder for one server a test starts: `metald-test-<kind>-<pid>-<n>` under the temporary directory.
pub(crate) fn fresh_server_dir(kind: &str) -> std::io::Result<PathBuf> {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("metald-test-{kind}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs `serve_on` with free loopback ports until one serves (another
/// process can take a port between our probe and the server's bind), a few
/// times at most; answers the last error when none did.
pub(crate) fn serve_on_a_free_port(mut serve_on: impl FnMut(u16) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut last_error = None;
    for _ in 0..5 {
        match serve_on(free_loopback_port()?) {
            Ok(()) => return Ok(()),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no attempt was made")))
}

/// A loopback port free at the moment of asking, for a server a test starts.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// A server a test starts, or `None` (after [`unmet`]) when `found` says
/// its program is not here or `start` fails; `what` names it in the reason.
pub fn require_server<S>(
    test: &str,
    what: &str,
    found: Result<PathBuf, String>,
    start: impl FnOnce(PathBuf) -> std::io::Result<S>,
) -> Option<S> {
    let program = match found {
        Ok(program) => program,
        Err(reason) => return unmet(test, &reason),
    };
    match start(program) {
        Ok(server) => Some(server),
        Err(error) => unmet(test, &format!("the {what} server does not start: {error}")),
    }
}
