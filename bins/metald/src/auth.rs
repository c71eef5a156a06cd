//! Who is calling. Standalone, a caller shows a bearer token, which maps
//! to a tenant through the SHA-256 hashes in the configuration (tokens are
//! never stored). Behind a gateway, the gateway vouches for the tenant
//! with an HMAC-SHA256 signature over the tenant, the time, the
//! procedure, a nonce and the body's digest, made with a secret only it
//! and this host know; metald takes a tenant from a gateway header only
//! when that signature holds for the body it received, is fresh, and its
//! nonce is not one it saw within the skew window.
//!
//! The host's operator has tokens of its own, for `OperatorService` only:
//! an operator's token is no tenant's, and no tenant's token, nor a
//! gateway, reaches the operator's calls.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use metald_core::TenantId;
use sha2::{Digest, Sha256};

use metald_api::gateway_auth::TENANT_HEADER as GATEWAY_TENANT_HEADER;
use metald_api::gateway_auth::{GatewaySecret, Refusal, Verifier};

/// The authenticated caller, put into each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    pub via_gateway: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `authorization: Bearer <token>`")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not known to this host")]
    UnknownToken,
    #[error("this is the operator's token, which only OperatorService takes; VmService calls need a tenant's token")]
    OperatorTokenForTenantCall,
    #[error("OperatorService takes only the operator's token (auth.operator_token_sha256); this token is tenant {0:?}'s")]
    TenantTokenForOperatorCall(String),
    #[error("OperatorService is not taken through a gateway: call the host with the operator's token")]
    OperatorCallViaGateway,
    #[error("this host does not take calls through a gateway")]
    GatewayNotAccepted,
    #[error("this host takes tenant calls only through its gateway (auth.gateway.required)")]
    GatewayRequired,
    #[error("the gateway's tenant {0:?} is not a tenant id")]
    GatewayTenant(String),
    #[error("HostService takes only a gateway's own signed calls")]
    GatewayOnly,
    #[error("HostService calls are the gateway's own: signed for tenant {0:?}, they are refused")]
    TenantForGatewayCall(String),
    /// The gateway headers do not hold: incomplete, forged, stale or taken before.
    #[error(transparent)]
    Signature(#[from] Refusal),
    #[error("a gateway's call to this host needs TLS with a client certificate it trusts (api.tls.client_ca_file); this one came without")]
    GatewayWithoutCertificate,
}

impl AuthError {
    /// Unauthenticated when no credential holds; PermissionDenied when the
    /// call came the gateway way to a host that does not take it.
    pub fn to_connect(&self) -> connectrpc::ConnectError {
        match self {
            AuthError::GatewayNotAccepted
            | AuthError::OperatorTokenForTenantCall
            | AuthError::TenantTokenForOperatorCall(_)
            | AuthError::OperatorCallViaGateway
            | AuthError::TenantForGatewayCall(_)
            | AuthError::GatewayRequired => connectrpc::ConnectError::permission_denied(self.to_string()),
            _ => connectrpc::ConnectError::unauthenticated(self.to_string()),
        }
    }
}

/// The secret a gateway signs with, how much clock difference is
/// tolerated, and the nonces seen within that window.
#[derive(Debug, Clone)]
pub struct GatewayTrust {
    verifier: std::sync::Arc<Verifier>,
    /// Tenant calls come only through the gateway (fleet mode).
    required: bool,
    /// Signed calls come only over TLS with a verified client certificate.
    needs_client_certificate: bool,
}

impl GatewayTrust {
    pub fn new(secret: Vec<u8>, max_skew: Duration) -> Self {
        Self {
            verifier: std::sync::Arc::new(Verifier::new(GatewaySecret::new(secret), max_skew)),
            required: false,
            needs_client_certificate: false,
        }
    }

    /// Fleet mode: a tenant's own token is refused; only the gateway's signature opens tenant calls.
    pub fn required(self, required: bool) -> Self {
        Self { required, ..self }
    }

    /// mTLS: a signed call is taken only from a connection whose client certificate the port verified.
    pub fn needs_client_certificate(self, needs_client_certificate: bool) -> Self {
        Self { needs_client_certificate, ..self }
    }
}

/// What a call presents to be admitted: its headers, path and (for a
/// unary call) its body as received.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'r> {
    pub headers: &'r HeaderMap,
    pub procedure: &'r str,
    /// `None` for a server stream, whose request is not in hand at admission.
    pub body: Option<&'r [u8]>,
    pub now: SystemTime,
    /// Whether its connection showed a client certificate the port verified.
    pub client_certificate: bool,
}

/// The host's operator, authenticated: put into the extensions of an
/// `OperatorService` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operator;

/// Maps credentials to tenants, or to the operator.
#[derive(Debug, Default)]
pub struct Authenticator {
    /// SHA-256 of each token → its tenant.
    tokens: HashMap<[u8; 32], TenantId>,
    /// SHA-256 of each of the operator's tokens.
    operator_tokens: HashSet<[u8; 32]>,
    gateway: Option<GatewayTrust>,
}

impl Authenticator {
    pub fn new(tokens: HashMap<[u8; 32], TenantId>, gateway: Option<GatewayTrust>) -> Self {
        Self { tokens, operator_tokens: HashSet::new(), gateway }
    }

    pub fn with_operator_tokens(self, operator_tokens: HashSet<[u8; 32]>) -> Self {
        Self { operator_tokens, ..self }
    }

    /// The tenant making the call, from its headers (and, through a gateway, its body).
    pub fn authenticate(&self, call: Presented<'_>) -> Result<Caller, AuthError> {
        if call.headers.contains_key(GATEWAY_TENANT_HEADER) {
            return self.vouched_by_gateway(call);
        }
        if self.gateway.as_ref().is_some_and(|trust| trust.required) {
            return Err(AuthError::GatewayRequired);
        }
        let hash = bearer_token_hash(call.headers)?;
        if self.operator_tokens.contains(&hash) {
            return Err(AuthError::OperatorTokenForTenantCall);
        }
        let tenant = self.tokens.get(&hash).ok_or(AuthError::UnknownToken)?;
        Ok(Caller { tenant: tenant.clone(), via_gateway: false })
    }

    /// The operator, from the request headers of an `OperatorService` call.
    pub fn authenticate_operator(&self, headers: &HeaderMap) -> Result<Operator, AuthError> {
        if headers.contains_key(GATEWAY_TENANT_HEADER) {
            return Err(AuthError::OperatorCallViaGateway);
        }
        let hash = bearer_token_hash(headers)?;
        if self.operator_tokens.contains(&hash) {
            return Ok(Operator);
        }
        match self.tokens.get(&hash) {
            Some(tenant) => Err(AuthError::TenantTokenForOperatorCall(tenant.to_string())),
            None => Err(AuthError::UnknownToken),
        }
    }

    fn vouched_by_gateway(&self, call: Presented<'_>) -> Result<Caller, AuthError> {
        let tenant = self.signed_by_gateway(call)?;
        if tenant.is_empty() {
            return Err(AuthError::GatewayTenant(String::new()));
        }
        let tenant = TenantId::new(tenant).map_err(|_| AuthError::GatewayTenant(tenant.to_owned()))?;
        Ok(Caller { tenant, via_gateway: true })
    }

    /// The gateway itself, calling for no tenant (`HostService`): signed
    /// with an empty tenant, and nothing else opens these calls.
    pub fn authenticate_gateway(&self, call: Presented<'_>) -> Result<(), AuthError> {
        if !call.headers.contains_key(GATEWAY_TENANT_HEADER) {
            return Err(AuthError::GatewayOnly);
        }
        match self.signed_by_gateway(call)? {
            "" => Ok(()),
            tenant => Err(AuthError::TenantForGatewayCall(tenant.to_owned())),
        }
    }

    /// The tenant of a call whose gateway headers verify for its body,
    /// are fresh, and were not taken before.
    fn signed_by_gateway<'h>(&self, call: Presented<'h>) -> Result<&'h str, AuthError> {
        let trust = self.gateway.as_ref().ok_or(AuthError::GatewayNotAccepted)?;
        if trust.needs_client_certificate && !call.client_certificate {
            return Err(AuthError::GatewayWithoutCertificate);
        }
        let tenant = trust.verifier.check(call.headers, call.procedure, call.body, call.now)?;
        Ok(tenant)
    }
}

/// The SHA-256 of the bearer token in `authorization`. Looking tokens up
/// by their hash, not the token, means the maps' comparisons reveal
/// nothing usable about any stored token.
fn bearer_token_hash(headers: &HeaderMap) -> Result<[u8; 32], AuthError> {
    let value = headers.get(http::header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// A new random token (256 bits, hex) and its SHA-256, as `metald token` prints them.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("mdt_{}", hex::encode(bytes));
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    (token, hash)
}

/// The hash a token is stored as.
#[cfg(test)]
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use metald_api::gateway_auth::{
        NONCE_HEADER as GATEWAY_NONCE_HEADER, SIGNATURE_HEADER as GATEWAY_SIGNATURE_HEADER, SignedCall,
        TIMESTAMP_HEADER as GATEWAY_TIMESTAMP_HEADER, body_digest,
    };

    use super::*;
    use std::time::UNIX_EPOCH;

    const PROCEDURE: &str = "/vmprovisioner.v1.VmService/ListVms";

    fn acme() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn authenticator(gateway: Option<GatewayTrust>) -> Authenticator {
        Authenticator::new(HashMap::from([(token_hash("secret-token"), acme())]), gateway)
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn a_known_bearer_token_is_its_tenant_and_anything_else_is_refused() {
        let auth = authenticator(None);
        let bearer = headers(&[("authorization", "Bearer secret-token".into())]);
        let caller = auth.authenticate(presented(&bearer, None, at(0))).unwrap();
        assert_eq!(caller, Caller { tenant: acme(), via_gateway: false });
        let refused = |value: Option<&str>| {
            let pairs: Vec<_> = value.map(|value| ("authorization", value.to_owned())).into_iter().collect();
            auth.authenticate(presented(&headers(&pairs), None, at(0))).unwrap_err()
        };
        assert_eq!(refused(None), AuthError::Missing);
        assert_eq!(refused(Some("Bearer other")), AuthError::UnknownToken);
        assert_eq!(refused(Some("Basic c2VjcmV0")), AuthError::Malformed);
        assert_eq!(refused(Some("Bearer ")), AuthError::Malformed);
        assert_eq!(refused(None).to_connect().code, connectrpc::ErrorCode::Unauthenticated);
    }

    /// A call with `headers` and `body` to `PROCEDURE` at `now`.
    fn presented<'r>(headers: &'r HeaderMap, body: Option<&'r [u8]>, now: SystemTime) -> Presented<'r> {
        Presented { headers, procedure: PROCEDURE, body, now, client_certificate: false }
    }

    #[test]
    fn a_gateway_signature_is_checked_for_tenant_procedure_age_body_and_replay() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let auth = authenticator(Some(GatewayTrust::new(secret.to_vec(), Duration::from_secs(60))));
        let signer = GatewaySecret::new(secret.to_vec());
        let body: &[u8] = b"{\"vmId\":\"vm-1\"}";
        let signed = |tenant: &str, at_seconds: u64, procedure: &str, nonce: &str, signed_body: Option<&[u8]>| {
            let digest = body_digest(signed_body);
            let call = SignedCall { tenant, unix_seconds: at_seconds, procedure, nonce, body_sha256: &digest };
            headers(&[
                (GATEWAY_TENANT_HEADER, tenant.to_owned()),
                (GATEWAY_TIMESTAMP_HEADER, at_seconds.to_string()),
                (GATEWAY_NONCE_HEADER, nonce.to_owned()),
                (GATEWAY_SIGNATURE_HEADER, signer.sign(&call)),
            ])
        };
        let first = signed("globex", 1000, PROCEDURE, "n1", Some(body));
        let caller = auth.authenticate(presented(&first, Some(body), at(1030))).unwrap();
        assert_eq!((caller.tenant.as_str(), caller.via_gateway), ("globex", true));
        assert_eq!(
            auth.authenticate(presented(&first, Some(body), at(1031))).unwrap_err(),
            AuthError::Signature(Refusal::Replayed),
            "taken once"
        );
        let other_body = signed("globex", 1000, PROCEDURE, "n2", Some(body));
        let refused = auth.authenticate(presented(&other_body, Some(b"{\"vmId\":\"vm-2\"}"), at(1000))).unwrap_err();
        assert_eq!(refused, AuthError::Signature(Refusal::BadSignature), "the headers do not hold for another body");
        let other_method = signed("globex", 1000, "/vmprovisioner.v1.VmService/DeleteVm", "n3", Some(body));
        assert_eq!(
            auth.authenticate(presented(&other_method, Some(body), at(1000))).unwrap_err(),
            AuthError::Signature(Refusal::BadSignature)
        );
        let mut swapped = signed("globex", 1000, PROCEDURE, "n4", Some(body));
        swapped.insert(GATEWAY_TENANT_HEADER, HeaderValue::from_static("acme"));
        assert_eq!(auth.authenticate(presented(&swapped, Some(body), at(1000))).unwrap_err(), AuthError::Signature(Refusal::BadSignature));
        let stale = signed("globex", 1000, PROCEDURE, "n5", Some(body));
        assert_eq!(
            auth.authenticate(presented(&stale, Some(body), at(1061))).unwrap_err(),
            AuthError::Signature(Refusal::Stale { age_seconds: 61, max_seconds: 60 })
        );
        let forged = GatewaySecret::new(b"another secret of enough length!".to_vec());
        let mut forged_headers = signed("globex", 1000, PROCEDURE, "n6", Some(body));
        let digest = body_digest(Some(body));
        let call = SignedCall { tenant: "globex", unix_seconds: 1000, procedure: PROCEDURE, nonce: "n6", body_sha256: &digest };
        forged_headers.insert(GATEWAY_SIGNATURE_HEADER, HeaderValue::from_str(&forged.sign(&call)).unwrap());
        assert_eq!(
            auth.authenticate(presented(&forged_headers, Some(body), at(1000))).unwrap_err(),
            AuthError::Signature(Refusal::BadSignature)
        );
        let stream = signed("globex", 1000, PROCEDURE, "n7", None);
        assert!(auth.authenticate(presented(&stream, None, at(1000))).is_ok(), "a stream is signed with no body");
        let nonce_missing = headers(&[(GATEWAY_TENANT_HEADER, "globex".into()), (GATEWAY_TIMESTAMP_HEADER, "1000".into())]);
        assert_eq!(
            auth.authenticate(presented(&nonce_missing, Some(body), at(1000))).unwrap_err(),
            AuthError::Signature(Refusal::HeaderMissing(GATEWAY_NONCE_HEADER))
        );
    }

    #[test]
    fn in_fleet_mode_a_tenants_own_token_is_refused_and_the_gateways_signature_taken() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let auth = authenticator(Some(GatewayTrust::new(secret.to_vec(), Duration::from_secs(60)).required(true)))
            .with_operator_tokens(HashSet::from([token_hash("operator-token")]));
        let bearer = headers(&[("authorization", "Bearer secret-token".into())]);
        let refused = auth.authenticate(presented(&bearer, None, at(1000))).unwrap_err();
        assert_eq!(refused, AuthError::GatewayRequired);
        assert_eq!(refused.to_connect().code, connectrpc::ErrorCode::PermissionDenied);
        let signed: HeaderMap = GatewaySecret::new(secret.to_vec())
            .headers("acme", PROCEDURE, Some(b"{}"), at(1000))
            .into_iter()
            .map(|(name, value)| (http::HeaderName::from_static(name), HeaderValue::from_str(&value).unwrap()))
            .collect();
        assert_eq!(auth.authenticate(presented(&signed, Some(b"{}"), at(1000))).unwrap().tenant.as_str(), "acme");
        let operator = headers(&[("authorization", "Bearer operator-token".into())]);
        assert_eq!(auth.authenticate_operator(&operator), Ok(Operator), "the operator keeps OperatorService");
    }

    #[test]
    fn gateway_headers_to_a_host_without_a_gateway_are_denied() {
        let auth = authenticator(None);
        let via_gateway = headers(&[(GATEWAY_TENANT_HEADER, "acme".into())]);
        let error = auth.authenticate(presented(&via_gateway, None, at(0))).unwrap_err();
        assert_eq!(error, AuthError::GatewayNotAccepted);
        assert_eq!(error.to_connect().code, connectrpc::ErrorCode::PermissionDenied);
    }

    #[test]
    fn the_operators_token_opens_only_operator_calls_and_a_tenants_only_tenant_calls() {
        let auth = authenticator(None).with_operator_tokens(HashSet::from([token_hash("operator-token")]));
        let bearer = |token: &str| headers(&[("authorization", format!("Bearer {token}"))]);
        assert_eq!(auth.authenticate_operator(&bearer("operator-token")), Ok(Operator));
        assert_eq!(auth.authenticate(presented(&bearer("operator-token"), None, at(0))), Err(AuthError::OperatorTokenForTenantCall));
        assert_eq!(auth.authenticate_operator(&bearer("secret-token")), Err(AuthError::TenantTokenForOperatorCall("acme".into())));
        assert_eq!(auth.authenticate_operator(&bearer("other")), Err(AuthError::UnknownToken));
        let via_gateway = headers(&[(GATEWAY_TENANT_HEADER, "acme".into()), ("authorization", "Bearer operator-token".into())]);
        assert_eq!(auth.authenticate_operator(&via_gateway), Err(AuthError::OperatorCallViaGateway));
        assert_eq!(AuthError::OperatorTokenForTenantCall.to_connect().code, connectrpc::ErrorCode::PermissionDenied);
    }

    #[test]
    fn new_tokens_are_unique_and_hash_as_stored() {
        let (token, hash) = new_token();
        assert_ne!(token, new_token().0);
        assert_eq!(hex::encode(token_hash(&token)), hash);
    }
}
