//! Logs to stderr, and traces over OTLP/HTTP when an endpoint is
//! configured: every API call is a span (method, client, tenant, VM,
//! result code), and every VM operation under it is a child span with the
//! VM and tenant. A log line carries its spans' fields but those only
//! traces need (`otel.*`, `rpc.system`, `vmm`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where logs and traces go.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Where to export traces over OTLP/HTTP (for example
    /// `http://127.0.0.1:4318/v1/traces`); none when unset.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// The log filter (`RUST_LOG` syntax), for example `info,metald=debug`.
    pub log: String,
}

impl TelemetrySettings {
    /// The defaults for the service `name`: logs at info, no traces.
    pub fn for_service(name: &str) -> Self {
        Self { otlp_endpoint: None, service_name: name.into(), log: "info".into() }
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self::for_service("metald")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log: {filter:?} is not a log filter")]
    Filter { filter: String, source: tracing_subscriber::filter::ParseError },
    #[error("telemetry.otlp_endpoint: cannot export to {endpoint}")]
    Exporter { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
    #[error("cannot install the log subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

/// Flushes traces when the daemon ends.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("traces not flushed: {error}");
        }
    }
}

pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(&settings.log).map_err(|source| TelemetryError::Filter { filter: settings.log.clone(), source })?;
    // Colours only on a terminal: journald and log files get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt::layer().fmt_fields(LogFields).with_writer(std::io::stderr).with_ansi(colour).with_filter(filter);
    let Some(endpoint) = &settings.otlp_endpoint else {
        tracing_subscriber::registry().with(logs).try_init().map_err(TelemetryError::Subscriber)?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter { endpoint: endpoint.clone(), source })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(settings.service_name.clone()).build())
        .build();
    let tracer = provider.tracer(settings.service_name.clone());
    // Spans of the daemon and the library crates, at info and above, go
    // out whatever the log filter says.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new("info,h2=off,hyper=off,reqwest=off,opentelemetry=off"));
    tracing_subscriber::registry().with(logs).with(traces).try_init().map_err(TelemetryError::Subscriber)?;
    Ok(Telemetry { provider: Some(provider) })
}

/// Fields as the default formatter writes them (`name=value`, the message
/// bare), less those meant for traces only.
struct LogFields;

fn for_traces_only(name: &str) -> bool {
    name.starts_with("otel.") || name == "rpc.system" || name == "vmm"
}

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> std::fmt::Result {
        let mut visitor = LogFieldVisitor { writer: &mut writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct LogFieldVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: std::fmt::Result,
}

impl LogFieldVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if self.result.is_err() || for_traces_only(field.name()) {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = match field.name() {
            "message" => write!(self.writer, "{separator}{value}"),
            name => write!(self.writer, "{separator}{name}={value}"),
        };
    }
}

impl Visit for LogFieldVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}
