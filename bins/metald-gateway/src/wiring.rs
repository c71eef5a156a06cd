//! Builds the gateway from its settings and serves it until SIGTERM: the
//! store, the hosts (those in the settings added to it), the probes and
//! reconciliation in the background, then the API.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use metald_api::gateway_auth::{GatewaySecret, MIN_SECRET_BYTES, Verifier};
use metald_fleet::admin::AdminApi;
use metald_fleet::auth::Authenticator;
use metald_fleet::gateway::{Gateway, GatewaySettings};
use metald_fleet::hosts::Hosts;
use metald_fleet::limits::RateLimits;
use metald_fleet::metrics::GatewayMetrics;
use metald_fleet::reconcile::{Strays, reconcile};
use metald_fleet::registration::Registration;
use metald_fleet::server::{Parts, Readiness, app};
use metald_fleet::store::postgres::PostgresStore;
use metald_fleet::store::sqlite::SqliteStore;
use metald_fleet::store::{FleetStore, HostMode, HostRecord, StoreError};
use metald_serve::tls::TlsTerminator;
use tokio::sync::watch;

use crate::config::Settings;

/// How far a host's announcement may be from the gateway's clock, either way (as a host takes the gateway's calls).
const ANNOUNCEMENT_SKEW: Duration = Duration::from_secs(60);

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() && !settings.allow_root {
        bail!("metald-gateway needs no privilege and refuses to run as root: start it as a user of its own (or set allow_root = true)");
    }
    let secret = std::fs::read(&settings.host_secret_file)
        .with_context(|| format!("host_secret_file: cannot read {}", settings.host_secret_file.display()))?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        bail!("host_secret_file: the secret must be at least {MIN_SECRET_BYTES} bytes");
    }
    let mut admin_tokens = HashSet::new();
    for (index, hash) in settings.admin_token_sha256.iter().enumerate() {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hash, &mut digest).with_context(|| format!("admin_token_sha256: [{index}] is not 64 hex digits"))?;
        admin_tokens.insert(digest);
    }
    if admin_tokens.is_empty() {
        tracing::warn!("no admin token (admin_token_sha256): AdminService refuses every call");
    }
    let limits = Arc::new(RateLimits::new(settings.rate_limits)?);
    let tls = settings.api.tls.clone().map(TlsTerminator::load).transpose()?.map(Arc::new);
    metald_serve::shutdown::answer_hangups(tls.clone(), "nothing to reload: settings change with a restart");
    let store = open_store(&settings).await?;

    let announcements = Arc::new(Verifier::new(GatewaySecret::new(secret.clone()), ANNOUNCEMENT_SKEW));
    let hosts = Hosts::new(GatewaySecret::new(secret), Duration::from_secs(settings.host_call_timeout_seconds))
        .with_announce_ttl(Duration::from_secs(settings.announce_ttl_seconds));
    let hosts = Arc::new(match &settings.hosts_tls {
        Some(tls) => hosts.with_tls(metald_fleet::host_tls::client_config(tls)?),
        None => hosts,
    });
    for host in &settings.hosts {
        let record = HostRecord {
            name: host.name.clone(),
            url: host.url.clone(),
            mode: HostMode::Active,
            added_at_ms: metald_types::time::unix_millis_now(),
            announced_at_ms: None,
        };
        hosts.check(&record).with_context(|| format!("hosts: {:?}", host.name))?;
        match store.add_host(record).await {
            Ok(()) | Err(StoreError::HostExists(_)) => {}
            Err(error) => return Err(error).context("cannot add the configured hosts to the store"),
        }
    }
    for record in store.hosts().await? {
        let name = record.name.clone();
        hosts.insert(record).with_context(|| format!("the store's host {name:?}"))?;
    }
    hosts.probe_all().await;

    let strays = Arc::new(Strays::default());
    let metrics = Arc::new(GatewayMetrics::new(Arc::clone(&hosts), Arc::clone(&strays)));
    let auth = Arc::new(Authenticator::new(Arc::clone(&store), admin_tokens, settings.cache));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(Arc::clone(&hosts).keep_probing(Duration::from_millis(settings.probe_interval_ms), stopped.clone()));

    let gateway_settings = GatewaySettings {
        placement_choices: settings.placement_choices,
        default_page_size: settings.api.default_page_size,
        max_page_size: settings.api.max_page_size,
        cache: settings.cache,
    };
    let gateway =
        Arc::new(Gateway::new(Arc::clone(&store), Arc::clone(&hosts), gateway_settings, Arc::clone(&metrics), Arc::clone(&strays)));
    tokio::spawn(housekeeping(
        Housekept {
            store: Arc::clone(&store),
            hosts: Arc::clone(&hosts),
            strays: Arc::clone(&strays),
            auth: Arc::clone(&auth),
            limits: Arc::clone(&limits),
            gateway: Arc::clone(&gateway),
        },
        Duration::from_millis(settings.probe_interval_ms),
        Duration::from_secs(settings.pending_settle_seconds),
        stopped.clone(),
    ));
    let readiness = Arc::new(Readiness::default());
    let application = app(Parts {
        gateway: Arc::clone(&gateway),
        admin: AdminApi::new(Arc::clone(&store), Arc::clone(&hosts), strays, Arc::clone(&auth)),
        registration: Registration::new(Arc::clone(&store), Arc::clone(&hosts)),
        announcements,
        auth: Arc::clone(&auth),
        limits,
        metrics,
        readiness: Arc::clone(&readiness),
        max_body_bytes: settings.api.max_body_bytes,
    });
    let listener =
        tokio::net::TcpListener::bind(settings.listen).await.with_context(|| format!("listen: cannot listen on {}", settings.listen))?;
    let address = listener.local_addr().context("cannot read the listening address")?;
    let shutdown = async move {
        metald_serve::shutdown::stop_signal().await;
        tracing::info!("stopping: no new calls; calls in flight finish");
        let _ = stop.send(true);
    };
    let server = tokio::spawn(metald_serve::listener::serve(listener, application, settings.api.connection_limits(), tls, shutdown));
    readiness.mark_ready();
    tracing::info!(%address, hosts = hosts.all().len(), "metald-gateway serving");
    metald_serve::shutdown::drain_then_stop(server, stopped, Duration::from_secs(settings.api.drain_timeout_seconds)).await?;
    if let Err(error) = auth.flush_uses().await {
        tracing::warn!(%error, "the keys' last uses are not all recorded");
    }
    tracing::info!("metald-gateway stopped");
    Ok(())
}

/// The store of the settings: PostgreSQL when `store.postgres_url` is set, else SQLite in `data_dir`.
async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn FleetStore>> {
    if let Some(url) = &settings.store.postgres_url {
        let password = match &settings.store.postgres_password_file {
            Some(file) => Some(
                std::fs::read(file)
                    .with_context(|| format!("store.postgres_password_file: cannot read {}", file.display()))?
                    .trim_ascii()
                    .to_vec(),
            ),
            None => None,
        };
        let store = PostgresStore::open(url, password.as_deref()).await.context("store.postgres_url: cannot open the fleet store")?;
        return Ok(Arc::new(store));
    }
    std::fs::create_dir_all(&settings.data_dir).with_context(|| format!("data_dir: cannot make {}", settings.data_dir.display()))?;
    Ok(Arc::new(SqliteStore::open(&settings.data_dir.join("fleet.db"))?))
}

/// What housekeeping tends.
struct Housekept {
    store: Arc<dyn FleetStore>,
    hosts: Arc<Hosts>,
    strays: Arc<Strays>,
    auth: Arc<Authenticator>,
    limits: Arc<RateLimits>,
    gateway: Arc<Gateway>,
}

/// Every `interval`: the hosts other gateways added, moded or removed
/// taken in, the store held against the hosts, the keys' last uses
/// written, idle rate buckets and old reads forgotten.
async fn housekeeping(kept: Housekept, interval: Duration, settle: Duration, mut stop: watch::Receiver<bool>) {
    let Housekept { store, hosts, strays, auth, limits, gateway } = kept;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let read_at = std::time::Instant::now();
        match store.hosts().await {
            Ok(records) => hosts.follow(records, read_at),
            Err(error) => tracing::warn!(%error, "cannot read the hosts from the store"),
        }
        if let Err(error) = reconcile(store.as_ref(), &hosts, &strays, settle).await {
            tracing::warn!(%error, "cannot hold the store against the hosts");
        }
        if let Err(error) = auth.flush_uses().await {
            tracing::warn!(%error, "cannot record the keys' last uses");
        }
        limits.forget_idle();
        auth.forget_old();
        gateway.forget_old();
    }
}
