//! metald-gateway: the public entry for many metald hosts. It assembles
//! `metald-fleet` (keys, tenants, quotas, placement, routing, host health,
//! the SQLite fleet store) behind `vmprovisioner.v1.VmService` and the
//! admin service `gateway.v1.AdminService`, on one port.

mod config;
mod wiring;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use sha2::Digest;

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "metald-gateway",
    version,
    about = "One public entry for many metald hosts: API keys, tenants, rate limits, placement and routing",
    after_help = "Settings come from built-in defaults, then the TOML file (--config), then METALD_GATEWAY_* \
                  environment variables named after a setting (nested keys joined by `__`), then these flags. \
                  Every setting is described in docs/architecture/components/gateway.md."
)]
struct Args {
    /// A TOML settings file.
    #[arg(long, env = "METALD_GATEWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Where the API, /health, /ready and /metrics listen [default: 127.0.0.1:7080].
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// The gateway's state: its fleet store [default: /var/lib/metald-gateway].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log filter in RUST_LOG syntax [default: info].
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new admin token: prints the token and the settings line with
    /// its hash (the token itself is never stored).
    AdminToken,
    /// Print the settings as they result from the file, the environment and the flags, as JSON.
    PrintConfig,
}

impl Args {
    fn overrides(&self) -> Figment {
        let mut figment = Figment::new();
        if let Some(listen) = self.listen {
            figment = figment.merge(Serialized::default("listen", listen));
        }
        if let Some(dir) = &self.data_dir {
            figment = figment.merge(Serialized::default("data_dir", dir));
        }
        if let Some(filter) = &self.log {
            figment = figment.merge(Serialized::default("telemetry.log", filter));
        }
        figment
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::AdminToken) = &args.command {
        let token = format!("mda_{}", hex::encode(rand::random::<[u8; 32]>()));
        println!("token: {token}\n\nadmin_token_sha256 = [{:?}]", hex::encode(sha2::Sha256::digest(token.as_bytes())));
        return Ok(());
    }
    let settings = Settings::load(args.config.as_deref(), args.overrides()).map_err(|error| anyhow::anyhow!("{error}"))?;
    if let Some(Command::PrintConfig) = &args.command {
        let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let telemetry = metald_serve::telemetry::init(&settings.telemetry)?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "metald-gateway starting");
        let result = wiring::run(settings).await;
        if let Err(error) = &result {
            tracing::error!(error = %format!("{error:#}"), "metald-gateway stopped on an error");
        }
        telemetry.shutdown();
        result
    })
}
