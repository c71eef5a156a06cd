//! The command line: global options, one subcommand per operation, and the
//! help text that documents the exit codes. Values are checked here as far
//! as they can be without the host (sizes, disk specs, ranges); what only
//! the host can judge (paths in its image root, limits, quotas) is left to
//! it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use metald_api::proto::vmprovisioner::v1::{NetworkMode, VmState};

use crate::exit::EXIT_CODES_HELP;
use crate::parse::{DiskSpec, RestartFlag, parse_disk, parse_duration, parse_instant, parse_key_value, parse_restart, parse_size};

/// The largest console tail the API returns (`GetConsoleRequest.max_bytes`).
pub const MAX_CONSOLE_BYTES: i64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "metalctl",
    version,
    about = "The operator's command line for metald hosts and the gateway",
    long_about = "The operator's command line for metald hosts and the gateway.\n\n\
                  metalctl talks to one metald daemon or to the gateway in front of many; \
                  both take the same bearer token and answer the same calls.",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes. All but `--timeout` may come before or
/// after the command; `--timeout` comes before it, because `shutdown
/// --timeout` is the guest's grace time.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// The metald daemon or gateway to talk to (http://HOST:PORT[/PREFIX]).
    #[arg(long, env = "METALD_ENDPOINT", default_value = "http://127.0.0.1:7070", global = true)]
    pub endpoint: String,
    /// Bearer token, sent as `authorization: Bearer <TOKEN>`.
    #[arg(long, env = "METALD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's messages as proto JSON instead of tables.
    #[arg(long, env = "METALD_JSON", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub json: bool,
    /// Deadline for each call, in seconds; 0 for none. Give it before the
    /// command. Calls that wait for a guest to stop get their grace time on
    /// top; `watch` and `console --follow` run until stopped.
    #[arg(long, env = "METALD_TIMEOUT", value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
    /// Wire protocol: Connect over HTTP/1.1 or gRPC over cleartext HTTP/2 (h2c).
    #[arg(long, env = "METALD_PROTOCOL", value_enum, default_value_t = WireProtocol::Connect, global = true)]
    pub protocol: WireProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireProtocol {
    Connect,
    Grpc,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a VM from flags and/or a VmConfig JSON file; prints its id.
    Create(CreateArgs),
    /// Start a VM's guest (again, after a shutdown).
    Boot(VmArg),
    /// List your VMs.
    List(ListArgs),
    /// Everything known about one VM: state, configuration, network, metrics.
    Info(VmArg),
    /// Stop a VM's vCPUs; its memory is kept.
    Pause(VmArg),
    /// Let a paused VM run again.
    Resume(VmArg),
    /// Stop a VM's guest: ask it, then kill its VMM after the grace time.
    Shutdown(ShutdownArgs),
    /// Restart a running VM's guest.
    Reboot(RebootArgs),
    /// Stop a VM if needed and remove it with its network and files.
    Delete(DeleteArgs),
    /// Print the last bytes a VM wrote to its serial console.
    Console(ConsoleArgs),
    /// Print state changes of your VMs as they happen, until Ctrl-C.
    Watch(WatchArgs),
    /// What each tenant's VMs used on the host (the operator's token).
    Usage(UsageArgs),
    /// Run a gateway: its hosts, tenants and API keys (the gateway's admin token).
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// The gateway's AdminService.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// The hosts the gateway places VMs on.
    #[command(subcommand)]
    Hosts(HostsCommand),
    /// The tenants the gateway serves, with their fleet quotas.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// API keys: made (shown once), listed masked, revoked.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// VMs hosts have that the gateway's store does not place there.
    Strays,
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Every host, with its mode, health and room.
    List,
    /// Add a host; it is probed at once.
    Add {
        /// 1 to 64 letters, digits, '-', '.' or '_'.
        name: String,
        /// Where its metald listens: http://HOST:PORT.
        url: String,
    },
    /// Place nothing new on a host; its VMs run on.
    Cordon { name: String },
    /// Let a cordoned or draining host take new VMs again.
    Uncordon { name: String },
    /// Place nothing new on a host on its way out; remove it once it holds no VMs.
    Drain { name: String },
    /// Forget a host; one that holds VMs only with --force, which forgets them too.
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

/// A fleet quota; a limit not given is none.
#[derive(Debug, Args)]
pub struct QuotaArgs {
    /// VMs at most, across every host.
    #[arg(long, value_name = "N")]
    pub max_vms: Option<i64>,
    /// vCPUs at most.
    #[arg(long, value_name = "N")]
    pub max_vcpus: Option<i64>,
    /// Guest memory at most (512MiB, 64GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Every tenant and its quota.
    List,
    /// Make a tenant.
    Create {
        /// 1 to 128 letters, digits and '-'.
        id: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Replace a tenant's quota (limits not given become none).
    SetQuota {
        id: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Keys, masked, with when each was last used.
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Make an API key for a tenant; prints it once.
    Create {
        tenant: String,
        /// What the key is for.
        #[arg(long, default_value = "")]
        label: String,
        /// Refuse the key after this long (90d, 12h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Revoke a key, for good: its id, or its masked form.
    Revoke { id: String },
}

#[derive(Debug, Args)]
pub struct VmArg {
    /// The VM's id.
    #[arg(value_name = "VM_ID")]
    pub vm_id: String,
}

#[derive(Debug, Args)]
#[command(after_help = "Paths are on the host, relative to its image root (or absolute inside it).\n\
                        Flags override the --config file; --disk replaces its storage list.\n\n\
                        Example:\n  metalctl create --vcpus 2 --memory 512MiB --kernel vmlinux \\\n    \
                        --cmdline 'console=ttyS0 reboot=k panic=1' --disk rootfs.ext4,root --network ipv6 --boot")]
pub struct CreateArgs {
    /// A full VmConfig as proto JSON ("-" for stdin); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The new VM's id; the host makes one up when not given.
    #[arg(long, value_name = "ID")]
    pub vm_id: Option<String>,
    /// Number of vCPUs, 1 to 32 (what the host accepts).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=32))]
    pub vcpus: Option<i32>,
    /// Guest memory: plain bytes or with a binary unit (512MiB, 1GiB, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<i64>,
    /// Kernel image.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<String>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// A drive: PATH[,ro][,root][,id=NAME]; repeat for more. Ids default to disk0, disk1, ...
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    pub disks: Vec<DiskSpec>,
    /// A network interface the host makes and addresses: ipv6 (the tenant's
    /// /64), dual (and IPv4) or ipv4; repeat for more (eth0, eth1, ...).
    /// Replaces the --config file's interfaces.
    #[arg(long = "network", value_name = "MODE", value_enum)]
    pub networks: Vec<NetworkArg>,
    /// A label, KEY=VALUE; repeat for more.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub metadata: Vec<(String, String)>,
    /// When its VMM dies: never (the default), on-failure, or on-failure:N
    /// for at most N restarts in a row (5 by default).
    #[arg(long = "restart", value_name = "POLICY", value_parser = parse_restart)]
    pub restart: Option<RestartFlag>,
    /// The VMM to run the VM on, as the host names it (firecracker); the
    /// host's default when not given.
    #[arg(long = "vmm", value_name = "NAME")]
    pub vmm: Option<String>,
    /// Boot the VM right after creating it.
    #[arg(long)]
    pub boot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    Ipv6,
    Dual,
    Ipv4,
}

impl NetworkArg {
    pub fn to_wire(self) -> NetworkMode {
        match self {
            NetworkArg::Ipv6 => NetworkMode::NETWORK_MODE_IPV6_ONLY,
            NetworkArg::Dual => NetworkMode::NETWORK_MODE_DUAL_STACK,
            NetworkArg::Ipv4 => NetworkMode::NETWORK_MODE_IPV4_ONLY,
        }
    }
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// The VM's id.
    #[arg(value_name = "VM_ID")]
    pub vm_id: String,
    /// Kill the VMM at once instead of asking the guest first.
    #[arg(long)]
    pub force: bool,
    /// How long the guest may take to shut down, in seconds (default: the host's).
    #[arg(long = "timeout", value_name = "SECONDS", conflicts_with = "force",
          value_parser = clap::value_parser!(i32).range(1..))]
    pub grace_seconds: Option<i32>,
}

#[derive(Debug, Args)]
pub struct RebootArgs {
    /// The VM's id.
    #[arg(value_name = "VM_ID")]
    pub vm_id: String,
    /// Where the VMM cannot reboot in place: kill it at once instead of asking the guest.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The VM's id.
    #[arg(value_name = "VM_ID")]
    pub vm_id: String,
    /// Kill the VMM at once instead of asking the guest to shut down first.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only VMs in these states (comma-separated or repeated).
    #[arg(long = "state", value_name = "STATE", value_enum, value_delimiter = ',')]
    pub states: Vec<StateArg>,
    /// VMs per call (default: the host's). All pages are fetched unless --page-token is given.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub page_size: Option<i32>,
    /// Fetch only the page this token starts (from a previous page's next_page_token).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Every tenant's VMs, with a TENANT column: needs the host operator's token.
    #[arg(long, short = 'A')]
    pub all_tenants: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Needs the host operator's token (auth.operator_token_sha256 on metald).
                        The figures are the usage the host delivered to its billing sink
                        (its JSON Lines file, or ClickHouse), per tenant.

                        Examples:
  metalctl usage
  metalctl usage --since 24h
                          metalctl usage --from 2026-12-01T00:00:00Z --to 2026-12-02T00:00:00Z")]
pub struct UsageArgs {
    /// Only intervals that started this long ago or later (90s, 15m, 24h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "from")]
    pub since: Option<std::time::Duration>,
    /// Only intervals that started at or after this instant (RFC 3339, UTC: 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_instant)]
    pub from: Option<std::time::SystemTime>,
    /// Only intervals that started before this instant (default: now).
    #[arg(long, value_name = "TIME", value_parser = parse_instant)]
    pub to: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Created,
    Running,
    Paused,
    Shutdown,
    Failed,
}

impl StateArg {
    pub fn to_wire(self) -> VmState {
        match self {
            StateArg::Created => VmState::VM_STATE_CREATED,
            StateArg::Running => VmState::VM_STATE_RUNNING,
            StateArg::Paused => VmState::VM_STATE_PAUSED,
            StateArg::Shutdown => VmState::VM_STATE_SHUTDOWN,
            StateArg::Failed => VmState::VM_STATE_FAILED,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The VM's id.
    #[arg(value_name = "VM_ID")]
    pub vm_id: String,
    /// How many of the console's last bytes to read (default: the host's, 64 KiB; at most 1 MiB).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=MAX_CONSOLE_BYTES))]
    pub bytes: Option<i32>,
    /// Keep reading every 500 ms and print what is new, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this VM's events (default: all of yours).
    #[arg(value_name = "VM_ID")]
    pub vm_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_may_follow_the_command_but_timeout_precedes_it() {
        let cli = Cli::try_parse_from(["metalctl", "--timeout", "5", "shutdown", "vm-1", "--timeout", "40", "--json"]).unwrap();
        assert_eq!(cli.global.timeout, 5);
        assert!(cli.global.json);
        let Command::Shutdown(shutdown) = cli.command else { panic!("not shutdown") };
        assert_eq!(shutdown.grace_seconds, Some(40));
    }

    #[test]
    fn states_are_taken_comma_separated_or_repeated() {
        let cli = Cli::try_parse_from(["metalctl", "list", "--state", "running,paused", "--state", "failed"]).unwrap();
        let Command::List(list) = cli.command else { panic!("not list") };
        assert_eq!(list.states, [StateArg::Running, StateArg::Paused, StateArg::Failed]);
    }

    #[test]
    fn an_errors_usage_line_shows_no_global_option_as_required() {
        let error = Cli::try_parse_from(["metalctl", "info"]).unwrap_err().render().to_string();
        assert!(error.contains("Usage: metalctl info <VM_ID>"), "{error}");
        assert!(!error.contains("--endpoint") && !error.contains("--token"), "{error}");
    }

    #[test]
    fn usage_takes_a_duration_or_instants_but_not_both() {
        let cli = Cli::try_parse_from(["metalctl", "usage", "--since", "24h"]).unwrap();
        let Command::Usage(usage) = cli.command else { panic!("not usage") };
        assert_eq!(usage.since, Some(std::time::Duration::from_secs(86_400)));
        assert!(Cli::try_parse_from(["metalctl", "usage", "--from", "2026-12-01T00:00:00Z", "--to", "2026-12-02T00:00:00Z"]).is_ok());
        let both = Cli::try_parse_from(["metalctl", "usage", "--since", "1h", "--from", "2026-12-01T00:00:00Z"]).unwrap_err();
        assert_eq!(both.exit_code(), 2);
        assert_eq!(Cli::try_parse_from(["metalctl", "usage", "--from", "yesterday"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn a_forced_shutdown_takes_no_grace_time() {
        let error = Cli::try_parse_from(["metalctl", "shutdown", "vm-1", "--force", "--timeout", "3"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }
}
