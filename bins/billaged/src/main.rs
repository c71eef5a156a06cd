//! billaged: the billing service. metald hosts send it their usage batches,
//! heartbeats and gaps over `billing.v1` (ConnectRPC: Connect, gRPC and
//! gRPC-Web on one port); it checks each batch and writes it to ClickHouse
//! exactly once. The schema's migrations run at start, retried until
//! ClickHouse answers; until then calls get `unavailable`, so hosts keep
//! their records and retry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use connectrpc::{ConnectRpcService, Limits, Router, Server};
use metald_billing::clickhouse::ClickHouseSink;
use metald_billing::proto::billing::v1::BillingServiceExt;
use metald_billing::service::{BillingService, DEFAULT_MAX_BATCH_RECORDS};

#[derive(Debug, Parser)]
#[command(version, about = "The metald billing service")]
struct Args {
    /// Where to listen (port 0 picks a free port; the address is printed).
    #[arg(long, env = "BILLAGED_LISTEN", default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// ClickHouse's HTTP interface.
    #[arg(long, env = "BILLAGED_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    #[arg(long, env = "BILLAGED_DATABASE", default_value = "metald")]
    database: String,
    /// The most records one batch may hold.
    #[arg(long, env = "BILLAGED_MAX_BATCH_RECORDS", default_value_t = DEFAULT_MAX_BATCH_RECORDS)]
    max_batch_records: usize,
    /// The largest request body, in bytes, before decoding.
    #[arg(long, env = "BILLAGED_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Print the schema's statements for a server of this version (for
    /// example 24.8) and exit, without connecting to anything.
    #[arg(long, value_name = "MAJOR.MINOR")]
    print_schema: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.database.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_') || args.database.is_empty() {
        anyhow::bail!("--database {:?}: use letters, digits and '_' only", args.database);
    }
    if let Some(version) = &args.print_schema {
        let parse = |part: Option<&str>| part.and_then(|part| part.parse::<u32>().ok());
        let mut parts = version.split('.');
        let (Some(major), Some(minor)) = (parse(parts.next()), parse(parts.next())) else {
            anyhow::bail!("--print-schema {version:?}: give the server's version as MAJOR.MINOR, for example 24.8");
        };
        for (migration, statement) in metald_billing::clickhouse::schema_statements(&args.database, (major, minor)) {
            println!("-- migration {migration}\n{statement};\n");
        }
        return Ok(());
    }
    let sink = ClickHouseSink::new(&args.clickhouse_url, &args.database, "billaged");
    let (ready, is_ready) = tokio::sync::watch::channel(false);
    tokio::spawn(migrate_until_done(sink.clone(), ready));

    let service = Arc::new(BillingService::new(sink, args.max_batch_records, is_ready));
    let router = service.register(Router::new());
    let limits = Limits::default().with_max_request_body_size(args.max_body_bytes).with_max_message_size(args.max_body_bytes);
    let server = Server::bind(args.listen).await.map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", args.listen))?;
    let address = server.local_addr().context("cannot read the listening address")?;
    // Tests and supervisors read this line for the port.
    println!("billaged listening on {address}");
    tracing::info!(%address, clickhouse = %args.clickhouse_url, database = %args.database, "billaged started");
    server
        .serve_with_service_and_shutdown(ConnectRpcService::new(router).with_limits(limits), shutdown_signal())
        .await
        .map_err(|error| anyhow::anyhow!("the server stopped: {error}"))?;
    tracing::info!("billaged stopped");
    Ok(())
}

async fn migrate_until_done(sink: ClickHouseSink, ready: tokio::sync::watch::Sender<bool>) {
    let mut wait = Duration::from_millis(100);
    loop {
        match sink.migrate().await {
            Ok(applied) => {
                tracing::info!(?applied, "ClickHouse schema is current");
                let _ = ready.send(true);
                return;
            }
            Err(error) => {
                tracing::warn!(error = %metald_types::error_chain(&error), ?wait, "cannot migrate the ClickHouse schema yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn shutdown_signal() {
    let interrupted = tokio::signal::ctrl_c();
    let terminated = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupted => {}
        () = terminated => {}
    }
}
