//! The hosts a gateway places VMs on: a link to each host's metald (its
//! `VmService` and `HostService`, every call signed with the secret the
//! two share), what the last probe found (ready, starting, unreachable,
//! and the host's capacity), and the creates in flight to it, which the
//! next probe has not seen yet.
//!
//! A probe is one `HostService.GetHostCapacity`: a host that answers is
//! ready; one that answers `unavailable` is starting (taking over its VMs)
//! or stopping; one that cannot be reached is unreachable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use connectrpc::{ConnectError, ErrorCode, Protocol};
use metald_api::gateway_auth::GatewaySecret;
use metald_api::proto::vmprovisioner::v1 as wire;

use crate::store::{HostMode, HostRecord};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host {name:?}: {url:?} is not an {scheme}:// URL with a host and a port{why}")]
    BadUrl { name: String, url: String, scheme: &'static str, why: &'static str },
    #[error("host name {0:?}: 1 to 64 ASCII letters, digits, '-', '.' or '_'")]
    BadName(String),
}

/// What the last probe of a host found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Ready,
    /// metald answers but takes no calls yet (it is taking over its VMs) or any more.
    Starting(String),
    Unreachable(String),
}

impl Health {
    pub fn name(&self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Ready => "ready",
            Health::Starting(_) => "starting",
            Health::Unreachable(_) => "unreachable",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Health::Unknown | Health::Ready => "",
            Health::Starting(reason) | Health::Unreachable(reason) => reason,
        }
    }
}

/// A resource's total and what is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resource {
    pub total: u64,
    pub used: u64,
}

impl Resource {
    pub fn free(self) -> u64 {
        self.total.saturating_sub(self.used)
    }
}

/// What a host said it holds, at its last answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapacityReport {
    pub vcpus: Resource,
    pub memory_bytes: Resource,
    pub vms: Resource,
    pub vmms: Vec<String>,
}

impl CapacityReport {
    fn from_wire(answer: &wire::GetHostCapacityResponse) -> Self {
        let resource = |capacity: Option<&wire::Capacity>| {
            capacity.map_or_else(Resource::default, |capacity| Resource {
                total: u64::try_from(capacity.total).unwrap_or(0),
                used: u64::try_from(capacity.used).unwrap_or(0),
            })
        };
        Self {
            vcpus: resource(answer.vcpus.as_option()),
            memory_bytes: resource(answer.memory_bytes.as_option()),
            vms: resource(answer.vms.as_option()),
            vmms: answer.vmms.clone(),
        }
    }
}

/// What a create asks of a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    pub vcpus: u64,
    pub memory_bytes: u64,
}

#[derive(Debug)]
struct InFlightCreate {
    id: u64,
    ask: Ask,
    /// When its host answered it; a probe begun after that counts it itself.
    answered: Option<Instant>,
}

#[derive(Debug, Default)]
struct InFlight {
    next_id: u64,
    creates: Vec<InFlightCreate>,
}

/// One host: its link, its record and what the gateway knows of it now.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    link: HostLink,
    record: Mutex<HostRecord>,
    status: Mutex<HostStatus>,
    in_flight: Arc<Mutex<InFlight>>,
    /// How long an announcing host stays placeable after its last announcement.
    announce_ttl: Duration,
}

/// What the last probe found.
#[derive(Debug, Clone)]
pub struct HostStatus {
    pub health: Health,
    pub capacity: Option<CapacityReport>,
    pub last_seen_ms: Option<u64>,
}

/// A snapshot of a host for placement and for lists.
#[derive(Debug, Clone)]
pub struct HostView {
    pub record: HostRecord,
    pub status: HostStatus,
    /// What creates in flight (sent, or answered since the last probe began) hold.
    pub in_flight: Ask,
    pub in_flight_vms: u64,
    /// It announces itself, and its last announcement is older than the TTL: nothing new goes there.
    pub silent: bool,
}

/// A create counted against its host until the host's own figures hold it.
#[derive(Debug)]
pub struct InFlightGuard {
    id: u64,
    in_flight: Arc<Mutex<InFlight>>,
    answered: bool,
}

impl InFlightGuard {
    /// The host made the VM: it stays counted until a probe begun from now on sees it.
    pub fn made(mut self) {
        self.answered = true;
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(create) = in_flight.creates.iter_mut().find(|create| create.id == self.id) {
            create.answered = Some(Instant::now());
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if !self.answered {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            in_flight.creates.retain(|create| create.id != self.id);
        }
    }
}

impl Host {
    fn new(
        record: HostRecord,
        secret: GatewaySecret,
        call_timeout: Duration,
        tls: Option<&Arc<rustls::ClientConfig>>,
        announce_ttl: Duration,
    ) -> Result<Self, HostError> {
        let link = HostLink::new(&record, secret, call_timeout, tls)?;
        let status = HostStatus { health: Health::Unknown, capacity: None, last_seen_ms: None };
        Ok(Self {
            name: record.name.clone(),
            link,
            record: Mutex::new(record),
            status: Mutex::new(status),
            in_flight: Arc::default(),
            announce_ttl,
        })
    }

    pub fn link(&self) -> &HostLink {
        &self.link
    }

    pub fn view(&self) -> HostView {
        let record = self.record.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let mut asked = Ask::default();
        for create in &in_flight.creates {
            asked.vcpus += create.ask.vcpus;
            asked.memory_bytes += create.ask.memory_bytes;
        }
        let ttl_ms = u64::try_from(self.announce_ttl.as_millis()).unwrap_or(u64::MAX);
        let silent = record.announced_at_ms.is_some_and(|at| metald_types::time::unix_millis_now().saturating_sub(at) > ttl_ms);
        HostView { record, status, in_flight: asked, in_flight_vms: in_flight.creates.len() as u64, silent }
    }

    pub fn health(&self) -> Health {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).health.clone()
    }

    fn set_mode(&self, mode: HostMode) {
        self.record.lock().unwrap_or_else(PoisonError::into_inner).mode = mode;
    }

    /// The store's record of this host, at its URL: its mode and its last announcement.
    fn take_record(&self, record: HostRecord) {
        *self.record.lock().unwrap_or_else(PoisonError::into_inner) = record;
    }

    /// Counts a create against this host until its own figures hold it.
    pub fn reserve(&self, ask: Ask) -> InFlightGuard {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        in_flight.next_id += 1;
        let id = in_flight.next_id;
        in_flight.creates.push(InFlightCreate { id, ask, answered: None });
        InFlightGuard { id, in_flight: Arc::clone(&self.in_flight), answered: false }
    }

    /// Asks the host for its capacity, and records what that says of its health.
    pub async fn probe(&self) -> Health {
        let began = Instant::now();
        let procedure = "/vmprovisioner.v1.HostService/GetHostCapacity";
        let request = wire::GetHostCapacityRequest::default();
        let options = self.link.call_options("", procedure, &request, None);
        let answer = self.link.host.get_host_capacity_with_options(request, options).await;
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let health = match answer {
            Ok(answer) => {
                status.capacity = Some(CapacityReport::from_wire(&answer.into_owned()));
                status.last_seen_ms = Some(metald_types::time::unix_millis(SystemTime::now()));
                let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
                in_flight.creates.retain(|create| create.answered.is_none_or(|answered| answered >= began));
                Health::Ready
            }
            Err(error) if error.code == ErrorCode::Unavailable && is_answer(&error) => {
                status.last_seen_ms = Some(metald_types::time::unix_millis(SystemTime::now()));
                Health::Starting(error.message.unwrap_or_default())
            }
            Err(error) => Health::Unreachable(describe(&error)),
        };
        if status.health != health {
            tracing::info!(host = %self.name, health = health.name(), reason = health.reason(), "host health changed");
        }
        status.health = health.clone();
        health
    }

    /// Records that a call could not reach the host, without waiting for the next probe.
    pub fn mark_unreachable(&self, error: &ConnectError) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if !matches!(status.health, Health::Unreachable(_)) {
            tracing::info!(host = %self.name, error = %describe(error), "host unreachable");
        }
        status.health = Health::Unreachable(describe(error));
    }
}

/// Whether an error came from the host itself (an answer), not from failing to reach it.
pub fn is_answer(error: &ConnectError) -> bool {
    !error.response_headers().is_empty()
}

/// Whether a call failed for want of reaching the host.
pub fn is_unreachable(error: &ConnectError) -> bool {
    matches!(error.code, ErrorCode::Unavailable | ErrorCode::Unknown | ErrorCode::DeadlineExceeded) && !is_answer(error)
}

fn describe(error: &ConnectError) -> String {
    let mut text = error.message.clone().unwrap_or_else(|| error.code.as_str().to_owned());
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The signed way to one host's metald.
pub struct HostLink {
    pub vms: wire::VmServiceClient<HttpClient>,
    host: wire::HostServiceClient<HttpClient>,
    secret: GatewaySecret,
    call_timeout: Duration,
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLink").field("base_uri", self.vms.config().base_uri()).finish_non_exhaustive()
    }
}

impl HostLink {
    /// A link to the host at `record.url`: `http://` in plain, `https://` with `tls` (mTLS to the hosts).
    fn new(
        record: &HostRecord,
        secret: GatewaySecret,
        call_timeout: Duration,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Self, HostError> {
        let (scheme, why) = match tls {
            Some(_) => ("https", ": hosts_tls is set, so hosts are called over TLS"),
            None => ("http", " (https:// needs hosts_tls)"),
        };
        let bad = || HostError::BadUrl { name: record.name.clone(), url: record.url.clone(), scheme, why };
        let uri: http::Uri = record.url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some(scheme) || uri.host().is_none() || uri.port().is_none() {
            return Err(bad());
        }
        let config = ClientConfig::new(uri).with_protocol(Protocol::Connect).proto();
        let transport = match tls {
            Some(tls) => HttpClient::with_tls(Arc::clone(tls)),
            None => HttpClient::plaintext(),
        };
        Ok(Self {
            vms: wire::VmServiceClient::new(transport.clone(), config.clone()),
            host: wire::HostServiceClient::new(transport, config),
            secret,
            call_timeout,
        })
    }

    /// Every tenant's VMs on the host, a page (`HostService.ListVms`).
    pub async fn list_all_vms(
        &self,
        request: wire::ListVmsRequest,
        options: CallOptions,
    ) -> Result<connectrpc::client::UnaryResponse<buffa::view::OwnedView<wire::__buffa::view::ListVmsResponseView<'static>>>, ConnectError>
    {
        self.host.list_vms_with_options(request, options).await
    }

    /// A unary call to `procedure` for `tenant` ("" for the gateway
    /// itself) with `request`, signed now over its body, ending by the
    /// caller's deadline or the call timeout, carrying the current trace.
    pub fn call_options(&self, tenant: &str, procedure: &str, request: &impl buffa::Message, deadline: Option<Instant>) -> CallOptions {
        let timeout = deadline.map_or(self.call_timeout, |deadline| deadline.saturating_duration_since(Instant::now()));
        self.signed(tenant, procedure, Some(&request.encode_to_vec()), timeout)
    }

    /// A server stream to `procedure` for `tenant`, open until either side ends it.
    pub fn stream_options(&self, tenant: &str, procedure: &str) -> CallOptions {
        self.signed(tenant, procedure, None, Duration::from_secs(365 * 24 * 3600))
    }

    fn signed(&self, tenant: &str, procedure: &str, body: Option<&[u8]>, timeout: Duration) -> CallOptions {
        let trace = metald_serve::trace_context::current_headers();
        let traced =
            CallOptions::default().with_timeout(timeout).with_headers(trace.iter().map(|(name, value)| (name.clone(), value.clone())));
        self.secret
            .headers(tenant, procedure, body, SystemTime::now())
            .into_iter()
            .fold(traced, |options, (name, value)| options.with_header(name, value))
    }
}

/// Checks a host's name: it names the host in errors, lists and metrics.
pub fn check_name(name: &str) -> Result<(), HostError> {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_');
    if name.is_empty() || name.len() > 64 || !name.bytes().all(allowed) {
        return Err(HostError::BadName(name.to_owned()));
    }
    Ok(())
}

/// How long an announcing host stays placeable after its last announcement, unless set.
pub const DEFAULT_ANNOUNCE_TTL: Duration = Duration::from_secs(15);

/// Every host the gateway knows, by name.
#[derive(Debug)]
pub struct Hosts {
    secret: GatewaySecret,
    call_timeout: Duration,
    /// How hosts are called over TLS (the gateway's client certificate, the hosts' CA), if they are.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// How long an announcing host stays placeable after its last announcement.
    announce_ttl: Duration,
    hosts: RwLock<BTreeMap<String, Arc<Host>>>,
    /// When this gateway last changed each host itself (added, moded,
    /// removed, announced), so a read of the store begun before that does
    /// not undo it.
    changed_here: Mutex<HashMap<String, Instant>>,
}

impl Hosts {
    pub fn new(secret: GatewaySecret, call_timeout: Duration) -> Self {
        Self {
            secret,
            call_timeout,
            tls: None,
            announce_ttl: DEFAULT_ANNOUNCE_TTL,
            hosts: RwLock::default(),
            changed_here: Mutex::default(),
        }
    }

    /// How long an announcing host stays placeable after its last announcement.
    pub fn with_announce_ttl(self, announce_ttl: Duration) -> Self {
        Self { announce_ttl, ..self }
    }

    pub fn announce_ttl(&self) -> Duration {
        self.announce_ttl
    }

    /// Hosts called over mutual TLS ([`crate::host_tls`]).
    pub fn with_tls(self, tls: Arc<rustls::ClientConfig>) -> Self {
        Self { tls: Some(tls), ..self }
    }

    /// Knows `record` from now on (replacing a host of its name).
    pub fn insert(&self, record: HostRecord) -> Result<Arc<Host>, HostError> {
        check_name(&record.name)?;
        let host = Arc::new(Host::new(record, self.secret.clone(), self.call_timeout, self.tls.as_ref(), self.announce_ttl)?);
        self.changed(&host.name);
        self.hosts.write().unwrap_or_else(PoisonError::into_inner).insert(host.name.clone(), Arc::clone(&host));
        Ok(host)
    }

    fn changed(&self, name: &str) {
        self.changed_here.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), Instant::now());
    }

    /// Whether this gateway changed `name` itself after `read_at`.
    fn changed_since(&self, name: &str, read_at: Instant) -> bool {
        self.changed_here.lock().unwrap_or_else(PoisonError::into_inner).get(name).is_some_and(|changed| *changed > read_at)
    }

    /// Checks a record as [`Hosts::insert`] would, without keeping it.
    pub fn check(&self, record: &HostRecord) -> Result<(), HostError> {
        check_name(&record.name)?;
        HostLink::new(record, self.secret.clone(), self.call_timeout, self.tls.as_ref()).map(drop)
    }

    pub fn remove(&self, name: &str) {
        self.changed(name);
        self.hosts.write().unwrap_or_else(PoisonError::into_inner).remove(name);
    }

    pub fn set_mode(&self, name: &str, mode: HostMode) {
        if let Some(host) = self.get(name) {
            self.changed(name);
            host.set_mode(mode);
        }
    }

    /// Takes in the store's hosts as read at `read_at`, as another gateway
    /// may have changed them: new ones known (a new URL makes a new link),
    /// modes and announcements followed, those gone from the store
    /// forgotten; a host this gateway changed after `read_at` keeps what it has.
    pub fn follow(&self, records: Vec<HostRecord>, read_at: Instant) {
        let names: std::collections::BTreeSet<String> = records.iter().map(|record| record.name.clone()).collect();
        for record in records.into_iter().filter(|record| !self.changed_since(&record.name, read_at)) {
            let name = record.name.clone();
            match self.take_in(record) {
                Ok(true) => tracing::info!(host = %name, "host taken in from the store"),
                Ok(false) => {}
                Err(error) => tracing::warn!(host = %name, %error, "the store's host cannot be used"),
            }
        }
        let gone: Vec<String> = self
            .hosts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|name| !names.contains(*name) && !self.changed_since(name, read_at))
            .cloned()
            .collect();
        let mut hosts = self.hosts.write().unwrap_or_else(PoisonError::into_inner);
        for name in gone {
            hosts.remove(&name);
        }
    }

    /// Takes in the store's `record` of a host: a host known at its URL
    /// takes its mode and last announcement; one unknown, or at another
    /// URL, gets a new link. Answers whether the link is new.
    pub fn take_in(&self, record: HostRecord) -> Result<bool, HostError> {
        if let Some(host) = self.get(&record.name) {
            let same_url = host.record.lock().unwrap_or_else(PoisonError::into_inner).url == record.url;
            if same_url {
                self.changed(&record.name);
                host.take_record(record);
                return Ok(false);
            }
        }
        self.insert(record).map(|_| true)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Host>> {
        self.hosts.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    /// Every host, in name order.
    pub fn all(&self) -> Vec<Arc<Host>> {
        self.hosts.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Probes every host at once.
    pub async fn probe_all(&self) {
        futures::future::join_all(self.all().iter().map(|host| host.probe())).await;
    }

    /// Probes every host every `interval` until `stop` turns true.
    pub async fn keep_probing(self: Arc<Self>, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.probe_all().await,
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mode: HostMode) -> HostRecord {
        HostRecord { name: "h1".into(), url: "http://127.0.0.1:1".into(), mode, added_at_ms: 0, announced_at_ms: None }
    }

    fn mode_of(hosts: &Hosts) -> Option<HostMode> {
        hosts.get("h1").map(|host| host.view().record.mode)
    }

    #[test]
    fn a_read_of_the_store_begun_before_a_change_here_does_not_undo_it() {
        let hosts = Hosts::new(GatewaySecret::new(vec![0; 32]), Duration::from_secs(1));
        hosts.insert(record(HostMode::Active)).unwrap();
        let read_at = Instant::now();
        hosts.set_mode("h1", HostMode::Cordoned);
        hosts.follow(vec![record(HostMode::Active)], read_at);
        assert_eq!(mode_of(&hosts), Some(HostMode::Cordoned), "the older read does not uncordon");
        hosts.follow(Vec::new(), read_at);
        assert_eq!(mode_of(&hosts), Some(HostMode::Cordoned), "nor forget the host");
        hosts.follow(vec![record(HostMode::Draining)], Instant::now());
        assert_eq!(mode_of(&hosts), Some(HostMode::Draining), "a newer read is followed");
        hosts.follow(Vec::new(), Instant::now());
        assert_eq!(mode_of(&hosts), None, "a host gone from the store is forgotten");
    }
}
