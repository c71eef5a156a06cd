//! metald: one host's VMs behind the `vmprovisioner.v1` ConnectRPC API.
//!
//! It wires the library crates together (the VM manager with the
//! Firecracker backend and the jailer, IPv6 networking, billing) around a
//! SQLite store in its data folder, takes over the VMs a previous run left
//! running, and serves the API with tenants, quotas, health and metrics.
//! SIGTERM stops taking calls, lets the ones in flight finish and leaves
//! every VM running for the next start.

mod announce;
mod auth;
mod config;
mod host_service;
mod instance_lock;
mod metrics;
mod operator;
mod privilege;
mod process_metrics;
mod quota;
mod server;
mod service;
mod wiring;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "metald",
    version,
    about = "Runs microVMs for many tenants behind the vmprovisioner.v1 API",
    after_help = "Settings come from built-in defaults, then the TOML file (--config), then METALD_* \
                  environment variables named after a setting (nested keys joined by `__`, e.g. \
                  METALD_BILLING__SINK=clickhouse; other METALD_* variables are not settings and are left alone), \
                  then these flags. Every setting is described in docs/api/configuration.md."
)]
// Every flag may come before or after the command (`metald print-config --config f`).
struct Args {
    /// A TOML settings file.
    #[arg(long, env = "METALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Where the API, /health, /ready and /metrics listen [default: 127.0.0.1:7070].
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// The daemon's state: VM store, VM folders, spool, address book [default: /var/lib/metald].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Every kernel, initrd and drive must come from here [default: /var/lib/metald/images].
    #[arg(long, global = true)]
    image_root: Option<PathBuf>,
    /// The firecracker executable [default: /usr/local/bin/firecracker].
    #[arg(long, global = true)]
    firecracker: Option<PathBuf>,
    /// Log filter in RUST_LOG syntax [default: info].
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new bearer token: prints the token (give it to the tenant, or
    /// keep it as the operator) and the settings lines with its hash (the
    /// token itself is never stored).
    #[command(group = clap::ArgGroup::new("owner").required(true))]
    Token {
        /// The tenant the token is for: prints an [[auth.tenants]] table.
        #[arg(long, group = "owner")]
        tenant: Option<String>,
        /// The token is the host operator's (every tenant's VMs, usage):
        /// prints auth.operator_token_sha256.
        #[arg(long, group = "owner")]
        operator: bool,
    },
    /// Print the settings as they result from the file, the environment and the flags, as JSON.
    PrintConfig,
}

impl Args {
    /// The flags that were given, as the top layer of the settings.
    fn overrides(&self) -> Figment {
        let mut figment = Figment::new();
        if let Some(listen) = self.listen {
            figment = figment.merge(Serialized::default("listen", listen));
        }
        if let Some(dir) = &self.data_dir {
            figment = figment.merge(Serialized::default("data_dir", dir));
        }
        if let Some(dir) = &self.image_root {
            figment = figment.merge(Serialized::default("image_root", dir));
        }
        if let Some(path) = &self.firecracker {
            figment = figment.merge(Serialized::default("firecracker", path));
        }
        if let Some(filter) = &self.log {
            figment = figment.merge(Serialized::default("telemetry.log", filter));
        }
        figment
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Token { tenant, .. }) = &args.command {
        if let Some(tenant) = tenant {
            metald_core::TenantId::new(tenant).map_err(|error| anyhow::anyhow!("--tenant {tenant:?}: {error}"))?;
        }
        let (token, hash) = auth::new_token();
        println!("token: {token}");
        println!();
        match tenant {
            Some(tenant) => println!("[[auth.tenants]]\nid = {tenant:?}\ntoken_sha256 = {hash:?}"),
            None => println!("[auth]\noperator_token_sha256 = [{hash:?}]"),
        }
        return Ok(());
    }
    let settings = Settings::load(args.config.as_deref(), args.overrides()).map_err(|error| anyhow::anyhow!(error_report(&error)))?;
    if let Some(Command::PrintConfig) = &args.command {
        // A closed pipe (`metald print-config | head`) is not an error.
        let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    // Tests pause a launch at a fail point (FAILPOINTS=name=pause) to kill
    // metald there; without the `failpoints` feature this does nothing.
    let _fail_points = fail::FailScenario::setup();
    // Before the runtime makes its threads, which inherit what this one keeps.
    let capabilities =
        privilege::keep_only(&privilege::kept(settings.listen.port())).context("cannot drop the capabilities metald does not use")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let telemetry = metald_serve::telemetry::init(&settings.telemetry)?;
        let settings_file =
            args.config.as_ref().map_or_else(|| "none (built-in defaults and METALD_*)".to_owned(), |path| path.display().to_string());
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            settings = settings_file,
            capabilities = %privilege::names(&capabilities),
            "metald starting"
        );
        let result = wiring::run(settings).await;
        if let Err(error) = &result {
            tracing::error!(error = %format!("{error:#}"), "metald stopped on an error");
        }
        telemetry.shutdown();
        result
    })
}

/// An error with its causes, one per line, as an operator reads it.
fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut report = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        report.push_str(&format!("\n  because: {cause}"));
        source = cause.source();
    }
    report
}
