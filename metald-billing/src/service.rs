//! The billing service (`billing.v1` over ConnectRPC): the host's side, a
//! [`ServiceSink`] that delivers batches to it, and the service's side,
//! [`BillingService`], which checks every batch and writes it through the
//! ClickHouse sink. `bins/billaged` serves the latter.
//!
//! A batch is refused whole, with a message that names the field at fault
//! (`records[3].vm_id: ...`), when anything in it is malformed, and with
//! `resource_exhausted` when it holds more records than the service takes
//! at once (the body size limit is the server's, before decoding). One
//! host's batches are written one at a time, which is what makes the
//! ClickHouse sink's identity lookup safe; hosts do not share VMs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_types::{TenantId, VmId};

use crate::clickhouse::ClickHouseSink;
use crate::proto::billing::v1 as wire;
use crate::proto::billing::v1::__buffa::view::UsageRecordView;
use crate::record::{HostHeartbeat, UsageGap, UsageRecord};
use crate::sink::{Batch, BillingSink, Delivered, SinkError};

/// The most records the service takes in one batch, unless configured.
pub const DEFAULT_MAX_BATCH_RECORDS: usize = 10_000;

/// A record as it goes on the wire.
pub fn record_to_wire(record: &UsageRecord) -> wire::UsageRecord {
    metald_types::flatten_usage_record!(record => wire::UsageRecord {
        tenant_id: record.tenant_id.to_string(),
        vm_id: record.vm_id.to_string(),
        ..Default::default()
    })
}

/// A record from the wire, or what is wrong with it (`index` names it).
pub fn record_from_wire(index: usize, record: &UsageRecordView<'_>) -> Result<UsageRecord, String> {
    let field = |name: &str, problem: String| format!("records[{index}].{name}: {problem}");
    let tenant_id = TenantId::new(record.tenant_id).map_err(|error| field("tenant_id", error.to_string()))?;
    let vm_id = VmId::new(record.vm_id).map_err(|error| field("vm_id", error.to_string()))?;
    if record.sequence == 0 {
        return Err(field("sequence", "sequences start at 1".into()));
    }
    if record.end_ms < record.start_ms {
        return Err(field("end_ms", format!("{} is before start_ms {}", record.end_ms, record.start_ms)));
    }
    if record.paused && record.cpu_ns > 0 {
        return Err(field("cpu_ns", format!("{} ns charged to a paused interval", record.cpu_ns)));
    }
    let mut usage = UsageRecord::zeroed(tenant_id, vm_id);
    metald_types::unflatten_usage_record!(record => usage);
    Ok(usage)
}

/// A batch's identity: the same records give the same id, so the service
/// can tell a replay from a new batch in its logs.
pub fn batch_id(batch: &[UsageRecord]) -> String {
    match (batch.first(), batch.last()) {
        (Some(first), Some(last)) => {
            format!("{}/{}..{}/{}+{}", first.vm_id, first.sequence, last.vm_id, last.sequence, batch.len())
        }
        _ => "empty".into(),
    }
}

/// Delivers to the billing service over Connect (binary protobuf).
#[derive(Clone)]
pub struct ServiceSink {
    client: wire::BillingServiceClient<HttpClient>,
    host_id: String,
    url: String,
}

impl std::fmt::Debug for ServiceSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSink").field("url", &self.url).field("host_id", &self.host_id).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{url} is not a URL the billing service can be reached at")]
pub struct BadServiceUrl {
    pub url: String,
    #[source]
    pub source: http::uri::InvalidUri,
}

impl ServiceSink {
    /// A sink for the service at `url` (`http://host:port`), on behalf of `host_id`.
    pub fn new(url: &str, host_id: &str) -> Result<Self, BadServiceUrl> {
        let uri: http::Uri = url.parse().map_err(|source| BadServiceUrl { url: url.to_owned(), source })?;
        let config = ClientConfig::new(uri).with_default_timeout(std::time::Duration::from_secs(30));
        Ok(Self {
            client: wire::BillingServiceClient::new(HttpClient::plaintext(), config),
            host_id: host_id.to_owned(),
            url: url.to_owned(),
        })
    }
}

#[async_trait]
impl BillingSink for ServiceSink {
    fn name(&self) -> &'static str {
        "billing-service"
    }

    async fn deliver(&self, batch: Batch<'_>) -> Result<Delivered, SinkError> {
        let request = wire::SubmitUsageRequest {
            host_id: self.host_id.clone(),
            batch_id: batch_id(batch.records),
            records: batch.records.iter().map(record_to_wire).collect(),
            resent: batch.resent,
            ..Default::default()
        };
        let response = self.client.submit_usage(request).await.map_err(SinkError::Service)?;
        let answer = response.view();
        Ok(Delivered { accepted: answer.accepted as usize, duplicates: answer.duplicates as usize })
    }

    async fn report_gap(&self, gap: &UsageGap) -> Result<(), SinkError> {
        let request = wire::ReportGapRequest {
            host_id: self.host_id.clone(),
            tenant_id: gap.tenant_id.to_string(),
            vm_id: gap.vm_id.to_string(),
            from_ms: gap.from_ms,
            to_ms: gap.to_ms,
            reason: gap.reason.clone(),
            ..Default::default()
        };
        self.client.report_gap(request).await.map_err(SinkError::Service)?;
        Ok(())
    }

    async fn heartbeat(&self, heartbeat: &HostHeartbeat) -> Result<(), SinkError> {
        let request = wire::HeartbeatRequest {
            host_id: self.host_id.clone(),
            sent_at_ms: heartbeat.sent_at_ms,
            spool_records: heartbeat.spool_records,
            spool_bytes: heartbeat.spool_bytes,
            spool_quota_bytes: heartbeat.spool_quota_bytes,
            ..Default::default()
        };
        self.client.heartbeat(request).await.map_err(SinkError::Service)?;
        Ok(())
    }
}

/// The service's side of `billing.v1`.
#[derive(Debug)]
pub struct BillingService {
    sink: ClickHouseSink,
    max_batch_records: usize,
    /// One lock per host: its batches are written one at a time.
    hosts: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl BillingService {
    /// A service writing through `sink`; it answers `unavailable` until
    /// `ready` turns true (the schema is migrated).
    pub fn new(sink: ClickHouseSink, max_batch_records: usize, ready: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { sink, max_batch_records, hosts: Mutex::new(HashMap::new()), ready }
    }

    fn host_lock(&self, host_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(hosts.entry(host_id.to_owned()).or_default())
    }

    fn check_ready(&self) -> Result<(), ConnectError> {
        if *self.ready.borrow() {
            Ok(())
        } else {
            Err(ConnectError::unavailable("the billing service is still preparing its ClickHouse schema"))
        }
    }
}

fn check_host(host_id: &str) -> Result<(), ConnectError> {
    let valid = !host_id.is_empty()
        && host_id.len() <= 128
        && host_id.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b':'));
    if valid {
        Ok(())
    } else {
        Err(ConnectError::invalid_argument(format!("host_id: {host_id:?} is not a host id (1 to 128 letters, digits, '-', '_', '.', ':')")))
    }
}

fn unavailable(error: &SinkError) -> ConnectError {
    ConnectError::unavailable(format!("ClickHouse did not take the write: {}", metald_types::error_chain(error)))
}

#[allow(refining_impl_trait)]
impl wire::BillingService for BillingService {
    async fn submit_usage(
        &self,
        _context: RequestContext,
        request: ServiceRequest<'_, wire::SubmitUsageRequest>,
    ) -> ServiceResult<wire::SubmitUsageResponse> {
        check_host(request.host_id)?;
        if request.batch_id.is_empty() || request.batch_id.len() > 256 {
            return Err(ConnectError::invalid_argument("batch_id: a batch needs an id of 1 to 256 bytes"));
        }
        let count = request.records.len();
        if count == 0 {
            return Err(ConnectError::invalid_argument("records: a batch holds at least one record"));
        }
        if count > self.max_batch_records {
            return Err(ConnectError::resource_exhausted(format!(
                "records: {count} records in one batch; this service takes at most {}",
                self.max_batch_records
            )));
        }
        let records: Vec<UsageRecord> = request
            .records
            .iter()
            .enumerate()
            .map(|(index, record)| record_from_wire(index, record))
            .collect::<Result<_, _>>()
            .map_err(ConnectError::invalid_argument)?;
        self.check_ready()?;
        let host_lock = self.host_lock(request.host_id);
        let _one_at_a_time = host_lock.lock().await;
        let batch = Batch { records: &records, resent: request.resent };
        let delivered = self.sink.insert_new(batch, request.host_id).await.map_err(|error| unavailable(&error))?;
        tracing::debug!(
            host_id = request.host_id,
            batch_id = request.batch_id,
            accepted = delivered.accepted,
            duplicates = delivered.duplicates,
            "batch stored"
        );
        Response::ok(wire::SubmitUsageResponse {
            accepted: u32::try_from(delivered.accepted).unwrap_or(u32::MAX),
            duplicates: u32::try_from(delivered.duplicates).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn heartbeat(
        &self,
        _context: RequestContext,
        request: ServiceRequest<'_, wire::HeartbeatRequest>,
    ) -> ServiceResult<wire::HeartbeatResponse> {
        check_host(request.host_id)?;
        self.check_ready()?;
        let heartbeat = HostHeartbeat {
            sent_at_ms: request.sent_at_ms,
            spool_records: request.spool_records,
            spool_bytes: request.spool_bytes,
            spool_quota_bytes: request.spool_quota_bytes,
        };
        self.sink.insert_heartbeat(&heartbeat, request.host_id).await.map_err(|error| unavailable(&error))?;
        Response::ok(wire::HeartbeatResponse { received_at_ms: metald_types::time::unix_millis_now(), ..Default::default() })
    }

    async fn report_gap(
        &self,
        _context: RequestContext,
        request: ServiceRequest<'_, wire::ReportGapRequest>,
    ) -> ServiceResult<wire::ReportGapResponse> {
        check_host(request.host_id)?;
        let tenant_id = TenantId::new(request.tenant_id).map_err(|error| ConnectError::invalid_argument(format!("tenant_id: {error}")))?;
        let vm_id = VmId::new(request.vm_id).map_err(|error| ConnectError::invalid_argument(format!("vm_id: {error}")))?;
        if request.to_ms < request.from_ms {
            return Err(ConnectError::invalid_argument(format!("to_ms: {} is before from_ms {}", request.to_ms, request.from_ms)));
        }
        self.check_ready()?;
        let gap = UsageGap { tenant_id, vm_id, from_ms: request.from_ms, to_ms: request.to_ms, reason: request.reason.to_owned() };
        self.sink.insert_gap(&gap, request.host_id).await.map_err(|error| unavailable(&error))?;
        Response::ok(wire::ReportGapResponse::default())
    }
}
