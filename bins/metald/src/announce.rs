//! Announcing this host to its gateways (`[announce]`): every
//! `interval_seconds`, `gateway.v1.RegistrationService/Announce` to each
//! gateway with where to call this host, its capacity in all and its
//! VMMs, signed with the gateway secret for the empty tenant (the same
//! headers a gateway signs its calls to hosts with). A gateway places on
//! a host only while its last announcement is younger than the gateway's
//! TTL, so a host that stops (or cannot reach a gateway) is soon placed
//! on no more there; its VMs keep being served.

use std::time::{Duration, SystemTime};

use connectrpc::Protocol;
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use metald_api::gateway_auth::GatewaySecret;
use metald_api::proto::gateway::v1 as registration;
use tokio::sync::watch;

use crate::config::AnnounceSettings;
use crate::quota::Capacity;

const PROCEDURE: &str = "/gateway.v1.RegistrationService/Announce";

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("announce.gateways: {url:?} is not an http:// URL with a host and a port")]
    BadGatewayUrl { url: String },
    #[error("announce.name: the machine's hostname cannot be read ({0}); set announce.name")]
    NoHostname(nix::Error),
}

/// One gateway and whether its last announcement went through (to log changes only).
struct Gateway {
    url: String,
    client: registration::RegistrationServiceClient<HttpClient>,
    answered: Option<bool>,
}

/// What is announced, and to whom.
pub struct Announcer {
    request: registration::AnnounceRequest,
    secret: GatewaySecret,
    interval: Duration,
    gateways: Vec<Gateway>,
}

impl Announcer {
    pub fn new(settings: &AnnounceSettings, secret: GatewaySecret, capacity: Capacity, vmms: &[&str]) -> Result<Self, AnnounceError> {
        let name = match &settings.name {
            Some(name) => name.clone(),
            None => nix::unistd::gethostname().map_err(AnnounceError::NoHostname)?.to_string_lossy().into_owned(),
        };
        let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let request = registration::AnnounceRequest {
            name,
            url: settings.url.clone(),
            vcpus: count(capacity.vcpus),
            memory_bytes: count(capacity.memory_bytes),
            vms: count(capacity.vms),
            vmms: vmms.iter().map(|vmm| (*vmm).to_owned()).collect(),
            ..Default::default()
        };
        let mut gateways = Vec::new();
        for url in &settings.gateways {
            let uri: http::Uri = url.parse().map_err(|_| AnnounceError::BadGatewayUrl { url: url.clone() })?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.port().is_none() {
                return Err(AnnounceError::BadGatewayUrl { url: url.clone() });
            }
            let config = ClientConfig::new(uri).with_protocol(Protocol::Connect).proto().with_default_timeout(Duration::from_secs(10));
            let client = registration::RegistrationServiceClient::new(HttpClient::plaintext(), config);
            gateways.push(Gateway { url: url.clone(), client, answered: None });
        }
        Ok(Self { request, secret, interval: Duration::from_secs(settings.interval_seconds), gateways })
    }

    fn signed(&self) -> CallOptions {
        let body = buffa::Message::encode_to_vec(&self.request);
        self.secret
            .headers("", PROCEDURE, Some(&body), SystemTime::now())
            .into_iter()
            .fold(CallOptions::default(), |options, (name, value)| options.with_header(name, value))
    }

    /// Announces every `interval` until `stopping` turns true.
    pub async fn run(mut self, mut stopping: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            let announcements: Vec<_> = self
                .gateways
                .iter()
                .map(|gateway| {
                    let (client, request, options) = (gateway.client.clone(), self.request.clone(), self.signed());
                    async move { client.announce_with_options(request, options).await.map(|answer| answer.into_owned().ttl_seconds) }
                })
                .collect();
            let answers = futures::future::join_all(announcements).await;
            for (gateway, answer) in self.gateways.iter_mut().zip(answers) {
                let went_through = answer.is_ok();
                match answer {
                    Ok(ttl_seconds) if gateway.answered != Some(true) => {
                        tracing::info!(gateway = %gateway.url, host = %self.request.name, ttl_seconds, "announced to the gateway");
                    }
                    Err(error) if gateway.answered != Some(false) => {
                        tracing::warn!(gateway = %gateway.url, %error, "cannot announce this host to the gateway; trying again every interval");
                    }
                    _ => {}
                }
                gateway.answered = Some(went_through);
            }
        }
    }
}
