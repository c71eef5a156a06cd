//! Reaching the API: the endpoint, the bearer token, the wire protocol and
//! the call deadline become one `VmServiceClient` (and, for the
//! operator's commands, one `OperatorServiceClient`). A metald daemon and the
//! gateway are reached the same way. Nothing here retries: a failed call is
//! reported, and its exit code tells a script whether trying again may help.

use std::time::Duration;

use connectrpc::Protocol;
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use metald_api::proto::gateway::v1::AdminServiceClient;
use metald_api::proto::vmprovisioner::v1::{OperatorServiceClient, VmServiceClient};

use crate::cli::{GlobalArgs, WireProtocol};
use crate::exit::CliError;

/// How long a graceful stop may take when the host's default grace time
/// applies, which metalctl cannot know; it extends the call's deadline.
const HOST_DEFAULT_GRACE_ALLOWANCE: Duration = Duration::from_secs(60);

/// The VM service of the endpoint, with the deadline each call gets.
#[derive(Clone)]
pub struct Api {
    client: VmServiceClient<HttpClient>,
    operator: OperatorServiceClient<HttpClient>,
    admin: AdminServiceClient<HttpClient>,
    deadline: Option<Duration>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base_uri", self.client.config().base_uri()).field("deadline", &self.deadline).finish()
    }
}

impl Api {
    /// A client for the endpoint, token, protocol and deadline the options give.
    pub fn new(global: &GlobalArgs) -> Result<Self, CliError> {
        let uri = parse_endpoint(&global.endpoint)?;
        let (protocol, transport) = match global.protocol {
            WireProtocol::Connect => (Protocol::Connect, HttpClient::plaintext()),
            // gRPC needs HTTP/2; over cleartext that means prior knowledge (h2c).
            WireProtocol::Grpc => (Protocol::Grpc, HttpClient::plaintext_http2_only()),
        };
        let mut config = ClientConfig::new(uri).with_protocol(protocol);
        if let Some(token) = &global.token {
            config = config.with_default_headers(bearer_headers(token)?);
        }
        let deadline = (global.timeout > 0).then(|| Duration::from_secs(global.timeout));
        let operator = OperatorServiceClient::new(transport.clone(), config.clone());
        let admin = AdminServiceClient::new(transport.clone(), config.clone());
        Ok(Self { client: VmServiceClient::new(transport, config), operator, admin, deadline })
    }

    /// The generated client, for making calls.
    pub fn vms(&self) -> &VmServiceClient<HttpClient> {
        &self.client
    }

    /// The operator's service, which takes only the operator's token.
    pub fn operator(&self) -> &OperatorServiceClient<HttpClient> {
        &self.operator
    }

    /// A gateway's admin service, which takes only the gateway's admin token.
    pub fn admin(&self) -> &AdminServiceClient<HttpClient> {
        &self.admin
    }

    /// Options for a call that should answer within the deadline.
    pub fn call(&self) -> CallOptions {
        self.deadline.map_or_else(CallOptions::default, |deadline| CallOptions::default().with_timeout(deadline))
    }

    /// Options for a call that waits for a guest to stop: the deadline plus
    /// the grace time (`None` when the host's default applies).
    pub fn call_waiting_for_guest(&self, grace: Option<Duration>) -> CallOptions {
        let grace = grace.unwrap_or(HOST_DEFAULT_GRACE_ALLOWANCE);
        self.deadline.map_or_else(CallOptions::default, |deadline| CallOptions::default().with_timeout(deadline + grace))
    }

    /// Options for a stream that runs until it is stopped: no deadline, which
    /// would otherwise end it.
    pub fn stream(&self) -> CallOptions {
        CallOptions::default()
    }
}

/// The endpoint as a base URI. A bare `HOST:PORT` means `http://HOST:PORT`;
/// `https://` is refused because this build has no TLS.
pub fn parse_endpoint(text: &str) -> Result<http::Uri, CliError> {
    let usage = |problem: String| CliError::Usage(format!("--endpoint {text:?}: {problem}"));
    let with_scheme = if text.contains("://") { text.to_owned() } else { format!("http://{text}") };
    let uri: http::Uri = with_scheme.parse().map_err(|error| usage(format!("not a URL ({error})")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(usage(
                "https is not supported: this metalctl is built without TLS; use http:// or a local TLS-terminating proxy".to_owned(),
            ));
        }
        _ => return Err(usage("use http://HOST:PORT".to_owned())),
    }
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(uri),
        _ => Err(usage("no host; use http://HOST:PORT".to_owned())),
    }
}

/// `authorization: Bearer <token>`, marked sensitive so it is never logged.
fn bearer_headers(token: &str) -> Result<HeaderMap, CliError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(CliError::Usage("--token is empty (METALD_TOKEN?)".to_owned()));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| CliError::Usage("--token holds characters an HTTP header cannot carry".to_owned()))?;
    value.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn global(args: &[&str]) -> GlobalArgs {
        let mut argv = vec!["metalctl"];
        argv.extend_from_slice(args);
        argv.push("list");
        Cli::try_parse_from(argv).unwrap().global
    }

    #[test]
    fn an_endpoint_without_a_scheme_is_http() {
        assert_eq!(parse_endpoint("10.0.0.5:7070").unwrap().to_string(), "http://10.0.0.5:7070/");
        assert_eq!(parse_endpoint("http://gateway.example:8080/api").unwrap().path(), "/api");
    }

    #[test]
    fn an_endpoint_this_build_cannot_reach_is_a_usage_error() {
        let https = parse_endpoint("https://gateway.example").unwrap_err();
        assert!(matches!(&https, CliError::Usage(message) if message.contains("without TLS")));
        assert!(matches!(parse_endpoint("unix:///run/metald.sock"), Err(CliError::Usage(_))));
        assert!(matches!(parse_endpoint("http://"), Err(CliError::Usage(_))));
        assert!(matches!(parse_endpoint("not a url"), Err(CliError::Usage(_))));
    }

    #[test]
    fn the_token_travels_as_a_sensitive_bearer_header() {
        let headers = bearer_headers(" s3cret\n").unwrap();
        let value = &headers[AUTHORIZATION];
        assert_eq!(value, "Bearer s3cret");
        assert!(value.is_sensitive());
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert!(matches!(bearer_headers("  "), Err(CliError::Usage(_))));
        assert!(matches!(bearer_headers("line\nbreak"), Err(CliError::Usage(_))));
    }

    #[test]
    fn the_deadline_grows_by_the_grace_time_for_calls_that_wait_for_a_guest() {
        let api = Api::new(&global(&["--timeout", "10"])).unwrap();
        assert_eq!(api.call().timeout(), Some(Duration::from_secs(10)));
        assert_eq!(api.call_waiting_for_guest(Some(Duration::from_secs(5))).timeout(), Some(Duration::from_secs(15)));
        assert_eq!(api.call_waiting_for_guest(None).timeout(), Some(Duration::from_secs(70)));
        assert_eq!(api.stream().timeout(), None);
    }

    #[test]
    fn a_zero_timeout_means_no_deadline() {
        let api = Api::new(&global(&["--timeout", "0"])).unwrap();
        assert_eq!(api.call().timeout(), None);
        assert_eq!(api.call_waiting_for_guest(None).timeout(), None);
    }

    #[test]
    fn grpc_is_selected_on_the_client() {
        let api = Api::new(&global(&["--protocol", "grpc"])).unwrap();
        assert_eq!(api.vms().config().protocol(), Protocol::Grpc);
        let api = Api::new(&global(&["--token", "t"])).unwrap();
        assert_eq!(api.vms().config().protocol(), Protocol::Connect);
        assert_eq!(api.vms().config().default_headers()[AUTHORIZATION], "Bearer t");
    }
}
