//! From settings to a running daemon: the locks that keep it the only
//! one on its data folder, the store, the network, the jail, the manager,
//! billing, the takeover of the previous run's VMs, then the server until
//! SIGTERM.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use metald_billing::clickhouse::ClickHouseSink;
use metald_billing::delivery::DeliveryPolicy;
use metald_billing::meter::MeterConfig;
use metald_billing::service::ServiceSink;
use metald_billing::{Billing, BillingConfig, BillingSink, JsonLinesSink, Spool};
use metald_core::jailer::Jailer;
use metald_core::jailer::JailerConfig;
use metald_core::launch::Launcher;
use metald_core::network::NetworkProvider;
use metald_core::store::{SqliteVmStore, VmStore};
use metald_core::unjailed::Unjailed;
use metald_core::{CloudHypervisorBackend, CloudHypervisorConfig, FirecrackerBackend, FirecrackerConfig, TenantId, VmManager, VmmBackend};
use tokio::sync::watch;

use metald_serve::tls::TlsTerminator;

use crate::auth::{Authenticator, GatewayTrust};
use crate::config::{BillingSettings, JailerSettings, NetworkSettings, Settings, SinkKind};
use crate::instance_lock::{self, InstanceLocks};
use crate::metrics::{BillingFigures, Metrics};
use crate::operator::UsageReadBack;
use crate::quota::Quotas;
use crate::server::Readiness;
use crate::service::{Redactor, VmApi};

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let tls = settings.api.tls.clone().map(TlsTerminator::load).transpose()?.map(Arc::new);
    metald_serve::shutdown::answer_hangups(
        tls.clone(),
        "nothing to reload; the usage file is reopened at its next write if it was rotated",
    );
    // What can be checked before anything is touched is checked first.
    check_executable("firecracker", &settings.firecracker)?;
    if let Some(cloud_hypervisor) = &settings.cloud_hypervisor {
        check_executable("cloud_hypervisor", cloud_hypervisor)?;
    }
    check_jailer_can_run(&settings.jailer)?;
    check_default_vmm(&settings)?;
    let (auth, quotas) = tenants(&settings)?;
    let data_dir = &settings.data_dir;
    // Tenants' console output and usage live here: no other local user reads it.
    let widened = metald_core::private_files::private_dir(data_dir)
        .with_context(|| format!("data_dir: cannot create {} or make it owner-only", data_dir.display()))?;
    if let Some(mode) = widened {
        tracing::warn!(data_dir = %data_dir.display(), was = format!("{mode:o}"), "data_dir was readable by others; made it 0700");
    }
    // Before the store, the network or a VM is touched: a second daemon on
    // the same folder (or uids, or cgroups) stops here. Held until run
    // returns; the kernel drops it however the process ends.
    let jailer = settings.jailer.enabled.then_some(&settings.jailer);
    let _instance_locks = InstanceLocks::take(data_dir, jailer, Path::new(instance_lock::RUN_DIR))?;
    let store = Arc::new(SqliteVmStore::open(data_dir.join("vms.db")).context("cannot open the VM store")?);
    let network = network_provider(&settings.network, data_dir).await?;
    let mut builder = backends(&settings)?
        .into_iter()
        .fold(VmManager::builder(), |builder, backend| builder.backend(backend))
        .image_root(&settings.image_root)
        .vm_root(data_dir.join("vms"))
        .stop_timeout(settings.stop_timeout())
        .store(store as Arc<dyn VmStore>);
    if let Some(network) = network {
        builder = builder.network(network);
    }
    let manager = builder.build().context("cannot set up the VM manager")?;

    // Billing listens before the takeover, so the VMs taken over are metered
    // on from where the spool says they were.
    let (billing, usage) = match settings.billing.enabled {
        true => {
            let (billing, usage) = start_billing(&settings.billing, &settings, &manager).await?;
            (Some(billing), usage)
        }
        false => {
            tracing::info!("billing off: no usage is metered");
            (None, UsageReadBack::Unreadable("billing is off on this host (billing.enabled = false): there is no usage".to_owned()))
        }
    };
    let figures = billing.as_ref().map(|billing| BillingFigures {
        spool: Arc::clone(billing.spool()),
        meter: Arc::clone(billing.meter_stats()),
        delivery: Arc::clone(billing.delivery_stats()),
    });
    let metrics = Arc::new(Metrics::new(manager.clone(), figures));
    let (stop, stopping) = watch::channel(false);
    let stopped = stopping.clone();
    let mut host_paths = vec![settings.data_dir.as_path(), settings.image_root.as_path(), settings.firecracker.as_path()];
    host_paths.extend(settings.cloud_hypervisor.as_deref());
    let redactor = Redactor::new(&host_paths);
    let api = VmApi::new(manager.clone(), quotas, Arc::clone(&metrics), settings.api.clone(), stopping).with_redactor(redactor);
    let readiness = Arc::new(Readiness::default());
    let app = crate::server::app(api, usage, Arc::new(auth), Arc::clone(&metrics), Arc::clone(&readiness), settings.api.max_body_bytes);

    let announcer = announcer(&settings, &manager.backend_names())?;
    // Listening starts before the takeover, so probes see /health answer
    // and /ready say 503 (API calls: unavailable) until it is done.
    raise_open_file_limit(settings.api.max_connections);
    let listener =
        tokio::net::TcpListener::bind(settings.listen).await.with_context(|| format!("listen: cannot listen on {}", settings.listen))?;
    let address = listener.local_addr().context("cannot read the listening address")?;
    tracing::info!(
        %address,
        backend = manager.backend_name(),
        vmms = %manager.backend_names().join(", "),
        "metald listening; taking over the VMs of the previous run"
    );
    let shutdown = {
        let readiness = Arc::clone(&readiness);
        async move {
            metald_serve::shutdown::stop_signal().await;
            tracing::info!("stopping: no new calls; calls in flight finish; VMs keep running");
            readiness.mark_stopping();
            let _ = stop.send(true);
        }
    };
    let server = tokio::spawn(metald_serve::listener::serve(listener, app, settings.api.connection_limits(), tls, shutdown));

    let takeover = manager.take_over().await.context("cannot take over the VMs of the previous run")?;
    tracing::info!(
        taken_over = takeover.taken_over.len(),
        lost = takeover.lost.len(),
        stopped = takeover.stopped.len(),
        "VMs of the previous run reconciled"
    );
    metrics.record_takeover(&takeover);
    if let Some(billing) = &billing {
        billing.takeover_done(manager.list(None).into_iter().map(|summary| summary.vm_id));
    }
    if readiness.mark_ready() {
        tracing::info!(%address, "metald serving");
    }
    // Announced once it serves: a gateway places on it from its first announcement.
    if let Some(announcer) = announcer {
        tokio::spawn(announcer.run(stopped.clone()));
    }
    let drain = Duration::from_secs(settings.api.drain_timeout_seconds);
    metald_serve::shutdown::drain_then_stop(server, stopped, drain).await?;
    if let Some(billing) = billing {
        billing.stop().await;
    }
    for problem in manager.release_spares().await {
        tracing::warn!(problem, "metald stopped, but cannot remove a jail child it kept ready");
    }
    match manager.release_host_when_empty().await {
        None => tracing::info!("metald stopped; its VMs run on and the next start takes them over"),
        Some(problems) if problems.is_empty() => {
            tracing::info!("metald stopped; no VM was left, so its firewall table and cgroup folders are removed")
        }
        Some(problems) => {
            for problem in problems {
                tracing::warn!(problem, "metald stopped with no VM left, but cannot remove what it set up for VMs");
            }
        }
    }
    Ok(())
}

/// Lifts the soft limit on open files to the hard one, as the API's
/// connections and every VM's pipes and sockets need descriptors, and says
/// so when even that leaves less than `max_connections` and a margin.
fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(%error, soft, hard, "cannot raise the limit on open files");
    }
    let wanted = max_connections as u64 + 1024;
    if hard < wanted {
        tracing::warn!(
            limit = hard,
            wanted,
            "the limit on open files is below api.max_connections and a margin for the VMs; raise it (LimitNOFILE=)"
        );
    }
}

/// A VMM binary must be there and executable; otherwise the first create
/// would be the one to find out.
fn check_executable(setting: &str, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).with_context(|| format!("{setting}: cannot use {}", path.display()))?;
    if !metadata.is_file() || metadata.permissions().mode() & 0o111 == 0 {
        bail!("{setting}: {} is not an executable file", path.display());
    }
    Ok(())
}

/// The VMMs this host offers, the default first, all launching through
/// one launcher, so a VM's uid is leased once whichever VMM runs it.
fn backends(settings: &Settings) -> anyhow::Result<Vec<Arc<dyn VmmBackend>>> {
    let launcher: Arc<dyn Launcher> = if settings.jailer.enabled {
        let jailer = &settings.jailer;
        let end = jailer.uid_start.saturating_add(jailer.uid_count);
        let jail = JailerConfig {
            uid_range: jailer.uid_start..end,
            cgroup_parent: jailer.cgroup_parent.clone(),
            expose_program_libraries: jailer.expose_program_libraries,
            pool_size: jailer.pool_size,
            pool_refill_quiet_ms: jailer.pool_refill_quiet_ms,
            ..JailerConfig::default()
        };
        Arc::new(Jailer::new(jail).context("cannot set up the jailer")?)
    } else {
        Arc::new(Unjailed)
    };
    let api_timeout = Duration::from_secs(settings.vmm_api_timeout_seconds);
    let firecracker = FirecrackerConfig { api_timeout, ..FirecrackerConfig::new(&settings.firecracker) };
    let mut offered: Vec<Arc<dyn VmmBackend>> = vec![Arc::new(FirecrackerBackend::new(firecracker, Arc::clone(&launcher)))];
    if let Some(binary) = &settings.cloud_hypervisor {
        let cloud_hypervisor = CloudHypervisorConfig { api_timeout, ..CloudHypervisorConfig::new(binary) };
        offered.push(Arc::new(CloudHypervisorBackend::new(cloud_hypervisor, launcher)));
    }
    if let Some(default) = offered.iter().position(|backend| backend.name() == settings.default_vmm) {
        offered.swap(0, default);
    }
    Ok(offered)
}

/// The VMMs the settings offer, by name.
fn offered_vmms(settings: &Settings) -> Vec<&'static str> {
    let mut offered = vec![metald_core::backend::firecracker::VMM];
    if settings.cloud_hypervisor.is_some() {
        offered.push(metald_core::backend::cloud_hypervisor::VMM);
    }
    offered
}

/// The default VMM must be one the host offers, checked before anything is made.
fn check_default_vmm(settings: &Settings) -> anyhow::Result<()> {
    let offered = offered_vmms(settings);
    if !offered.contains(&settings.default_vmm.as_str()) {
        bail!("default_vmm: {:?} is not offered by this host; it offers {}", settings.default_vmm, offered.join(", "));
    }
    Ok(())
}

/// The jailer makes namespaces, cgroups and mounts and switches users.
fn check_jailer_can_run(jailer: &JailerSettings) -> anyhow::Result<()> {
    if jailer.enabled && !running_as_root() {
        bail!(
            "the jailer needs root (it makes namespaces, cgroups and mounts and switches users); run metald as root, or set jailer.enabled = false for development only"
        );
    }
    Ok(())
}

/// SIGHUP, which logrotate's `postrotate` and many service managers send,
/// would end the process by default. There is nothing to reopen: logs go
/// to stderr, and the file sink follows its file across a rotation.
/// The handler is in place when this returns.
/// The secret in `auth.gateway.secret_file`, trimmed and long enough.
fn gateway_secret(gateway: &crate::config::GatewaySettings) -> anyhow::Result<Vec<u8>> {
    let secret = std::fs::read(&gateway.secret_file)
        .with_context(|| format!("auth.gateway.secret_file: cannot read {}", gateway.secret_file.display()))?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < metald_api::gateway_auth::MIN_SECRET_BYTES {
        bail!("auth.gateway.secret_file: the secret must be at least {} bytes", metald_api::gateway_auth::MIN_SECRET_BYTES);
    }
    Ok(secret)
}

/// The host's announcements to its gateways, when `[announce]` is set.
fn announcer(settings: &Settings, vmms: &[&str]) -> anyhow::Result<Option<crate::announce::Announcer>> {
    let (Some(announce), Some(gateway)) = (&settings.announce, &settings.auth.gateway) else { return Ok(None) };
    let secret = metald_api::gateway_auth::GatewaySecret::new(gateway_secret(gateway)?);
    Ok(Some(crate::announce::Announcer::new(announce, secret, host_capacity(settings)?, vmms)?))
}

/// The network provider, when networking is on.
async fn network_provider(settings: &NetworkSettings, data_dir: &Path) -> anyhow::Result<Option<Arc<dyn NetworkProvider>>> {
    let enabled = match settings.enabled {
        Some(enabled) => enabled,
        None if running_as_root() => true,
        None => {
            tracing::warn!(
                "networking is off: metald does not run as root, which network namespaces, TAP devices and nftables need; \
                 VMs with network interfaces are refused (set network.enabled = false to silence this)"
            );
            false
        }
    };
    if !enabled {
        return Ok(None);
    }
    if !running_as_root() {
        bail!("network.enabled = true needs root (network namespaces, TAP devices, nftables)");
    }
    // metald-net reads its own configuration (and refuses bad prefixes by name).
    let config = serde_json::json!({
        "host_prefix": settings.ipv6_prefix,
        "ipv4_pool": settings.ipv4_pool,
        "state_dir": data_dir.join("network"),
        "host_netns": settings.host_netns,
        "netns_prefix": settings.netns_prefix,
        "link_prefix": settings.link_prefix,
        "mtu": settings.mtu,
        "dns_servers": settings.dns_servers,
        "table": settings.nft_table,
        "namespace_pool": settings.namespace_pool,
        "namespace_release_batch": settings.namespace_release_batch,
    });
    let config: metald_net::provider::NetworkConfig =
        serde_json::from_value(config).context("network: the settings are not a valid network layout")?;
    let provider = metald_net::provider::Ipv6Network::new(config).await.context("cannot set up VM networking")?;
    tracing::info!(
        ipv6_prefix = %provider.addresses().plan().host_prefix,
        "VM networking on: each tenant gets a /64 of this prefix, which the network must route to this host"
    );
    Ok(Some(Arc::new(provider)))
}

/// Billing, and where the operator's usage summary reads its usage back.
async fn start_billing(billing: &BillingSettings, settings: &Settings, manager: &VmManager) -> anyhow::Result<(Billing, UsageReadBack)> {
    let host_id = match &billing.host_id {
        Some(host_id) => host_id.clone(),
        None => nix::unistd::gethostname().context("cannot read the hostname for billing.host_id")?.to_string_lossy().into_owned(),
    };
    let destination = match billing.sink {
        SinkKind::File => settings.usage_file().display().to_string(),
        SinkKind::Clickhouse => format!("{} (database {})", billing.clickhouse_url, billing.clickhouse_database),
        SinkKind::Service => billing.service_url.clone(),
    };
    tracing::info!(sink = ?billing.sink, %destination, %host_id, "billing on: usage is metered every {} ms", billing.meter_period_ms);
    let (sink, usage): (Arc<dyn BillingSink>, UsageReadBack) = match billing.sink {
        SinkKind::File => {
            let path = settings.usage_file();
            let sink = Arc::new(JsonLinesSink::open(&path).with_context(|| format!("billing.file: cannot open {}", path.display()))?);
            (Arc::clone(&sink) as Arc<dyn BillingSink>, UsageReadBack::Readable(sink))
        }
        SinkKind::Clickhouse => {
            let sink = ClickHouseSink::new(&billing.clickhouse_url, &billing.clickhouse_database, &host_id);
            // Migrations run at start; if ClickHouse is down they run on
            // the first delivery instead, and the spool holds the usage.
            if let Err(error) = sink.migrate().await {
                tracing::warn!(error = %metald_core::error_chain(&error), "ClickHouse schema not applied yet; usage waits in the spool");
            }
            let sink = Arc::new(sink);
            (Arc::clone(&sink) as Arc<dyn BillingSink>, UsageReadBack::Readable(sink))
        }
        SinkKind::Service => {
            let sink = Arc::new(ServiceSink::new(&billing.service_url, &host_id).context("billing.service_url")?);
            let why = format!(
                "this host's usage goes to the billing service at {}, which holds it; this host cannot read it back",
                billing.service_url
            );
            (sink, UsageReadBack::Unreadable(why))
        }
    };
    let spool =
        Arc::new(Spool::open(settings.data_dir.join("spool.db"), billing.spool_quota_bytes).context("cannot open the billing spool")?);
    let config = BillingConfig {
        meter: MeterConfig { period: Duration::from_millis(billing.meter_period_ms), ..MeterConfig::default() },
        delivery: DeliveryPolicy {
            max_batch: billing.max_batch,
            max_age: Duration::from_millis(billing.max_batch_age_ms),
            ..DeliveryPolicy::default()
        },
    };
    Ok((Billing::for_manager(manager, spool, sink, config).context("cannot start billing")?, usage))
}

/// Who may call, and how much each tenant may hold.
fn tenants(settings: &Settings) -> anyhow::Result<(Authenticator, Quotas)> {
    let mut tokens = HashMap::new();
    let mut limits = HashMap::new();
    for tenant in &settings.auth.tenants {
        let id = TenantId::new(&tenant.id).map_err(|error| anyhow::anyhow!("auth.tenants: {:?}: {error}", tenant.id))?;
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&tenant.token_sha256, &mut hash).with_context(|| format!("auth.tenants: {:?}: token_sha256", tenant.id))?;
        // A token names one tenant, and a tenant (one table per token) has one quota: no later table silently wins.
        if let Some(earlier) = tokens.insert(hash, id.clone()) {
            bail!(
                "auth.tenants: {:?} and {:?} have the same token_sha256; each tenant needs a token of its own",
                earlier.as_str(),
                id.as_str()
            );
        }
        if limits.insert(id, tenant.quota).is_some_and(|earlier| earlier != tenant.quota) {
            bail!("auth.tenants: the tables of {:?} give different quotas; give every table of a tenant the same one", tenant.id);
        }
    }
    let (gateway, default_quota) = match &settings.auth.gateway {
        Some(gateway) => {
            let secret = gateway_secret(gateway)?;
            // With client certificates checked on the port, the gateway must show one: mTLS.
            let mutual_tls = settings.api.tls.as_ref().is_some_and(|tls| tls.client_ca_file.is_some());
            let trust = GatewayTrust::new(secret, Duration::from_secs(gateway.max_skew_seconds))
                .required(gateway.required)
                .needs_client_certificate(mutual_tls);
            (Some(trust), gateway.default_quota)
        }
        None => (None, crate::config::Quota::default()),
    };
    if tokens.is_empty() && gateway.is_none() {
        tracing::warn!("no tenants are configured (auth.tenants) and no gateway (auth.gateway): every call will be refused");
    }
    let mut operator_tokens = HashSet::new();
    for (index, hex_hash) in settings.auth.operator_token_sha256.iter().enumerate() {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hex_hash, &mut hash).with_context(|| format!("auth.operator_token_sha256: [{index}]"))?;
        // One token, one role: the operator's token must not also be a tenant's.
        if let Some(tenant) = tokens.get(&hash) {
            bail!(
                "auth.operator_token_sha256: [{index}] is also tenant {:?}'s token_sha256; the operator needs a token of its own",
                tenant.as_str()
            );
        }
        operator_tokens.insert(hash);
    }
    let auth = Authenticator::new(tokens, gateway).with_operator_tokens(operator_tokens);
    Ok((auth, Quotas::new(limits, default_quota, host_capacity(settings)?)))
}

/// The host's capacity: the settings, with each 0 replaced by its default.
fn host_capacity(settings: &Settings) -> anyhow::Result<crate::quota::Capacity> {
    let configured = settings.capacity;
    let vcpus = match configured.vcpus {
        0 => {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            u64::try_from(cpus).unwrap_or(u64::MAX).saturating_mul(crate::config::DEFAULT_VCPUS_PER_CPU)
        }
        vcpus => vcpus,
    };
    let memory_bytes = match configured.memory_bytes {
        0 => {
            <procfs::Meminfo as procfs::Current>::current()
                .context("capacity.memory_bytes: cannot read the host's memory from /proc/meminfo")?
                .mem_total
        }
        bytes => bytes,
    };
    let vms = match configured.vms {
        0 => u64::from(settings.jailer.uid_count),
        vms => vms,
    };
    Ok(crate::quota::Capacity { vms, vcpus, memory_bytes })
}
