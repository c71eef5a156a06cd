//! The platform, as an operator and a tenant meet it: a metald daemon in a
//! scratch folder on its embedded defaults, a tenant with a token, two VMs
//! created through metalctl with an IPv6 interface each, their console,
//! every state change and how long each step took in plain words, the
//! operator's usage summary, and everything removed at the end (also when
//! a step fails).
//!
//! Run with `scripts/demo.sh` (as root, on a host with /dev/kvm). It runs
//! the `metald` and `metalctl` built beside it (`--bin-dir DIR` to choose);
//! `METALD_*` variables in its environment reach the daemon as settings.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use metald_testguest::{cmdline, console};

const TENANT: &str = "demo";
const DEADLINE: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let bin_dir = bin_dir()?;
    let firecracker = metald_testguest::firecracker_binary().map_err(anyhow::Error::msg)?;
    metald_testguest::kvm_usable().map_err(anyhow::Error::msg)?;
    let mut demo = Demo::start(&bin_dir, &firecracker)?;
    let result = demo.walk_through();
    let cleanup = demo.clean_up();
    result.and(cleanup)
}

/// Where `metald` and `metalctl` are: `--bin-dir DIR`, or beside this
/// program's folder (`target/release/examples/..`).
fn bin_dir() -> Result<PathBuf> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--bin-dir"), Some(dir)) => Ok(PathBuf::from(dir)),
        (None, _) => {
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            exe.parent().and_then(Path::parent).map(Path::to_path_buf).context("this program is not in a cargo target folder")
        }
        _ => bail!("usage: platform_demo [--bin-dir DIR]"),
    }
}

struct Demo {
    scratch: tempfile::TempDir,
    metald_bin: PathBuf,
    metalctl_bin: PathBuf,
    metald: Option<Child>,
    watch: Option<Child>,
    /// The events `metalctl watch` printed, as they come.
    events: Option<std::sync::mpsc::Receiver<serde_json::Value>>,
    endpoint: String,
    tenant_token: String,
    operator_token: String,
    vms: Vec<String>,
    timings: Vec<(String, Duration)>,
    started: Instant,
}

impl Demo {
    /// Tokens, settings, and the daemon, until it serves.
    fn start(bin_dir: &Path, firecracker: &Path) -> Result<Self> {
        let scratch = tempfile::Builder::new().prefix("metald-demo-").tempdir().context("cannot make a scratch folder")?;
        let metald_bin = bin_dir.join("metald");
        let metalctl_bin = bin_dir.join("metalctl");
        for binary in [&metald_bin, &metalctl_bin] {
            if !binary.is_file() {
                bail!("{} is not built (cargo build --release -p metald -p metalctl)", binary.display());
            }
        }
        let mut demo = Self {
            scratch,
            metald_bin,
            metalctl_bin,
            metald: None,
            watch: None,
            events: None,
            endpoint: String::new(),
            tenant_token: String::new(),
            operator_token: String::new(),
            vms: Vec::new(),
            timings: Vec::new(),
            started: Instant::now(),
        };
        let root = demo.scratch.path().to_path_buf();
        heading(&format!("A metald daemon in the scratch folder {}", root.display()));
        let images = root.join("images");
        std::fs::create_dir_all(&images)?;
        std::fs::copy(metald_testguest::kernel_path(), images.join("testguest.elf")).context("cannot copy the test guest")?;
        println!("The image root holds the guest kernel testguest.elf (the project's tiny test guest).");
        demo.tenant_token = demo.make_token(&["token", "--tenant", TENANT])?;
        demo.operator_token = demo.make_token(&["token", "--operator"])?;
        let hash = |token: &str| hex_sha256(token);
        let settings = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nimage_root = {:?}\nfirecracker = {:?}\n\n\
             [auth]\noperator_token_sha256 = [{:?}]\n\n[[auth.tenants]]\nid = {TENANT:?}\ntoken_sha256 = {:?}\n",
            root.join("data"),
            images,
            firecracker,
            hash(&demo.operator_token),
            hash(&demo.tenant_token),
        );
        let config = root.join("metald.toml");
        std::fs::write(&config, &settings)?;
        println!("\nIts settings, {} (everything else is metald's default):\n\n{settings}", config.display());
        demo.launch_metald(&config)?;
        Ok(demo)
    }

    /// `metald token ...`, shown; the token it made.
    fn make_token(&self, args: &[&str]) -> Result<String> {
        println!("$ metald {}", args.join(" "));
        let output = Command::new(&self.metald_bin).args(args).output().context("cannot run metald token")?;
        if !output.status.success() {
            bail!("metald {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let token = text.lines().find_map(|line| line.strip_prefix("token: ")).context("metald token printed no token")?.to_owned();
        println!("  a new token ({}…), kept only as its SHA-256 in the settings", &token[..12.min(token.len())]);
        Ok(token)
    }

    fn launch_metald(&mut self, config: &Path) -> Result<()> {
        let log_path = self.scratch.path().join("metald.log");
        println!("$ metald --config {}    (its log: {})", config.display(), log_path.display());
        let log = std::fs::File::create(&log_path)?;
        let launched = Instant::now();
        let mut child =
            Command::new(&self.metald_bin).arg("--config").arg(config).env("NO_COLOR", "1").stdin(Stdio::null()).stderr(log).spawn()?;
        let serving = wait_for("metald to serve", || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(status) = child.try_wait()? {
                bail!("metald exited with {status}:\n{log}");
            }
            Ok(log.lines().find(|line| line.contains("metald serving")).map(str::to_owned).map(|line| (line, log.clone())))
        });
        self.metald = Some(child);
        let (line, log) = serving?;
        let address = field(&line, "address").context("metald's serving line has no address")?;
        self.endpoint = format!("http://{address}");
        self.timed("metald start, to serving", launched.elapsed());
        println!("metald serves on {address} after {}.", ms(launched.elapsed()));
        match log.lines().find(|line| line.contains("VM networking on")).and_then(|line| field(line, "ipv6_prefix")) {
            Some(prefix) => println!("VM networking is on: each tenant gets a /64 of {prefix}."),
            None => println!("VM networking is off (see the log); the VMs' interfaces will be refused."),
        }
        if let Some(billing) = log.lines().find(|line| line.contains("billing on")) {
            println!("Billing is on: usage goes to {}.", field(billing, "destination").unwrap_or_else(|| "its sink".into()));
        }
        Ok(())
    }

    fn walk_through(&mut self) -> Result<()> {
        heading("State changes, as metalctl watch reports them");
        self.follow_state_changes()?;

        heading(&format!("Two VMs of tenant {TENANT:?}, each with an IPv6 interface"));
        let heartbeat = cmdline::heartbeat_ms(250);
        for name in ["web", "worker"] {
            let args = [
                "create",
                "--vcpus",
                "1",
                "--memory",
                "64MiB",
                "--kernel",
                "testguest.elf",
                "--cmdline",
                &heartbeat,
                "--network",
                "ipv6",
                "--metadata",
            ];
            let label = format!("role={name}");
            let mut args: Vec<&str> = args.to_vec();
            args.extend([label.as_str(), "--boot"]);
            let began = Instant::now();
            let vm_id = self.metalctl_shown(&args)?.trim().to_owned();
            let created = began.elapsed();
            self.vms.push(vm_id.clone());
            self.timed(&format!("{name}: create and boot (metalctl create --boot)"), created);
            wait_for("the guest's ready line", || Ok(self.metalctl(&["console", &vm_id])?.contains(console::READY).then_some(())))?;
            let ready = began.elapsed();
            self.timed(&format!("{name}: create to the guest's first console line"), ready);
            self.show_events_until(&vm_id, "booted")?;
            println!(
                "{vm_id} ({name}) was created and booted in {}; its guest said it was up {} after the create began.",
                ms(created),
                ms(ready)
            );
        }
        let first = self.vms[0].clone();

        heading("What the tenant sees");
        println!("{}", self.metalctl_shown(&["list"])?);
        let info = self.metalctl_shown(&["info", &first])?;
        println!("{info}");
        let address = info.lines().find_map(|line| line.split_once(" ipv6 ")).and_then(|(_, rest)| rest.split(',').next());
        if let Some(address) = address {
            println!("Its eth0 got an address of the tenant's /64: {address}");
        }
        wait_for("two heartbeats on the console", || {
            Ok((self.metalctl(&["console", &first])?.matches(console::HEARTBEAT).count() >= 2).then_some(()))
        })?;
        println!("\n{}", self.metalctl_shown(&["console", "--bytes", "600", &first])?.trim_end());
        println!("(The guest learns its addresses from its kernel command line, metald.eth0.ipv6=...; its heartbeats follow.)");

        heading("Changing its state");
        let changes = [
            ("pause", "paused", "paused (its vCPUs stop; its memory is kept)"),
            ("resume", "resumed", "resumed"),
            ("shutdown", "stopped", "shut down (the guest was asked and powered off)"),
            ("boot", "booted", "booted again, in a fresh VMM on its configuration and disks,"),
        ];
        for (command, kind, words) in changes {
            let began = Instant::now();
            self.metalctl_shown(&[command, &first])?;
            let took = began.elapsed();
            self.timed(&format!("web: {command}"), took);
            self.show_events_until(&first, kind)?;
            println!("{first} {words} in {}.", ms(took));
        }

        heading("The operator's view (the operator's token)");
        println!("{}", self.operator_shown(&["list", "--all-tenants"])?);
        wait_for("both VMs' usage to be delivered", || {
            let summary: serde_json::Value = serde_json::from_str(&self.operator(&["--json", "usage"])?)?;
            let vms = summary["tenants"].as_array().and_then(|tenants| tenants.first()).map(|tenant| tenant["vmCount"].as_i64());
            Ok((vms == Some(Some(self.vms.len() as i64))).then_some(()))
        })?;
        println!("{}", self.operator_shown(&["usage"])?);
        Ok(())
    }

    /// `metalctl --json watch` in the background, its events retold in words.
    fn follow_state_changes(&mut self) -> Result<()> {
        let mut child =
            self.metalctl_command(&self.tenant_token, &["--json", "watch"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().context("no stdout from metalctl watch")?;
        let stderr = child.stderr.take().context("no stderr from metalctl watch")?;
        self.watch = Some(child);
        let (events, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                    && events.send(event).is_err()
                {
                    return;
                }
            }
        });
        self.events = Some(received);
        // Watching has begun once metalctl says so.
        let said = BufReader::new(stderr).lines().next().transpose()?.unwrap_or_default();
        println!("$ metalctl watch    ({})", said.trim_start_matches("metalctl: "));
        Ok(())
    }

    /// Deletes the VMs, stops metald, removes the scratch folder: what a
    /// failed step left is removed too.
    fn clean_up(&mut self) -> Result<()> {
        heading("Removing everything");
        for vm_id in std::mem::take(&mut self.vms) {
            let began = Instant::now();
            // Gracefully, as a tenant would; forced only if that fails.
            let deleted = self.metalctl_shown(&["delete", &vm_id]).or_else(|_| self.metalctl_shown(&["delete", "--force", &vm_id]));
            match deleted {
                Ok(_) => {
                    let took = began.elapsed();
                    if let Err(error) = self.show_events_until(&vm_id, "deleted") {
                        println!("{error:#}");
                    }
                    println!("{vm_id} deleted with its VMM, network and files in {}.", ms(took));
                }
                Err(error) => println!("{vm_id}: {error:#}"),
            }
        }
        if let Some(mut watch) = self.watch.take() {
            let _ = watch.kill();
            let _ = watch.wait();
        }
        if let Some(mut metald) = self.metald.take() {
            let began = Instant::now();
            stop(&mut metald)?;
            let log = std::fs::read_to_string(self.scratch.path().join("metald.log")).unwrap_or_default();
            let last = log.lines().rev().find(|line| line.contains("metald stopped")).unwrap_or("");
            println!(
                "metald stopped on SIGTERM in {}: {}",
                ms(began.elapsed()),
                last.split("metald stopped").nth(1).unwrap_or("").trim_start_matches([';', ' '])
            );
        }
        let scratch = self.scratch.path().to_path_buf();
        std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
        println!("Removed the scratch folder {}.", scratch.display());
        heading("How long each step took");
        for (step, took) in &self.timings {
            println!("  {step:<55} {:>10}", ms(*took));
        }
        Ok(())
    }

    fn metalctl_command(&self, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(&self.metalctl_bin);
        command.args(args).env("METALD_ENDPOINT", &self.endpoint).env("METALD_TOKEN", token).env_remove("METALD_JSON");
        command
    }

    fn run(&self, token: &str, args: &[&str]) -> Result<String> {
        let output = self.metalctl_command(token, args).output().context("cannot run metalctl")?;
        if !output.status.success() {
            bail!("metalctl {} failed ({}): {}", args.join(" "), output.status, String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn metalctl(&self, args: &[&str]) -> Result<String> {
        self.run(&self.tenant_token, args)
    }

    fn operator(&self, args: &[&str]) -> Result<String> {
        self.run(&self.operator_token, args)
    }

    /// A tenant's metalctl command, printed as typed.
    fn metalctl_shown(&self, args: &[&str]) -> Result<String> {
        println!("$ metalctl {}", shell_words(args));
        self.metalctl(args)
    }

    fn operator_shown(&self, args: &[&str]) -> Result<String> {
        println!("$ metalctl {}    (operator)", shell_words(args));
        self.operator(args)
    }

    /// Prints the watched events up to `vm_id`'s `kind`, so that each
    /// state change shows beside the command that caused it.
    fn show_events_until(&self, vm_id: &str, kind: &str) -> Result<()> {
        let Some(events) = &self.events else { return Ok(()) };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match events.recv_timeout(left) {
                Ok(event) => event,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!("metalctl watch did not report {vm_id} {kind}"),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("metalctl watch ended before it reported {vm_id} {kind}"),
            };
            println!("  [{:>6.2} s, watch] {}", self.started.elapsed().as_secs_f64(), event_in_words(&event));
            if event["vmId"] == vm_id && event["kind"] == kind {
                return Ok(());
            }
        }
    }

    fn timed(&mut self, step: &str, took: Duration) {
        self.timings.push((step.to_owned(), took));
    }
}

/// Polls `check` until it yields, fails, or [`DEADLINE`] passes.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {} s", DEADLINE.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then up to a minute for the process to end.
fn stop(child: &mut Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + DEADLINE;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            bail!("metald did not stop within {} s of SIGTERM", DEADLINE.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One VM event of `metalctl --json watch`, as a sentence.
fn event_in_words(event: &serde_json::Value) -> String {
    let vm = event["vmId"].as_str().unwrap_or("?");
    let kind = event["kind"].as_str().unwrap_or("changed");
    let state = event["state"].as_str().unwrap_or("").trim_start_matches("VM_STATE_").to_lowercase();
    let reason = event["reason"].as_str().filter(|reason| !reason.is_empty()).map(|reason| format!(": {reason}")).unwrap_or_default();
    match kind {
        "deleted" => format!("{vm} was deleted{reason}"),
        _ => format!("{vm} {kind}, now {state}{reason}"),
    }
}

/// `key=value` (or `key="value"`) from a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next()?,
        None => rest.split_whitespace().next()?,
    };
    Some(value.to_owned())
}

fn hex_sha256(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The arguments as a shell line: those with a space in quotes.
fn shell_words(args: &[&str]) -> String {
    args.iter().map(|arg| if arg.contains(' ') { format!("'{arg}'") } else { (*arg).to_owned() }).collect::<Vec<_>>().join(" ")
}

fn heading(text: &str) {
    println!("\n== {text} ==\n");
}

fn ms(took: Duration) -> String {
    format!("{:.1} ms", took.as_secs_f64() * 1000.0)
}
