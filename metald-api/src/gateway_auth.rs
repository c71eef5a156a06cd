//! How a gateway vouches to a host: an HMAC-SHA256 signature, under a
//! secret only the two know, over the tenant, the time, the procedure, a
//! nonce and the SHA-256 of the request body, sent in four headers. The
//! host takes the tenant from the headers only when the signature holds
//! for the body it received, is fresh, and its nonce was not seen within
//! the skew window: a captured header set can be replayed neither with
//! another body nor as it was. A call the gateway makes for itself (a
//! host's capacity) is signed with an empty tenant, which no tenant call
//! can be. A server stream's request is not in hand when its call is
//! admitted, so its digest is signed as empty; its nonce still holds.
//!
//! The same headers, signed by a host for the empty tenant, carry its
//! announcements to a gateway; [`Verifier`] is the receiving side of both.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The tenant the gateway vouches for; empty for the gateway's own calls.
pub const TENANT_HEADER: &str = "x-metald-tenant";
/// When the gateway signed, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-metald-gateway-timestamp";
/// A value the gateway uses once (32 hex digits from the OS's random source).
pub const NONCE_HEADER: &str = "x-metald-gateway-nonce";
/// Hex HMAC-SHA256 of [`signed_message`] under the shared secret.
pub const SIGNATURE_HEADER: &str = "x-metald-gateway-signature";

/// The shortest secret a gateway and a host may share.
pub const MIN_SECRET_BYTES: usize = 32;

/// What one signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedCall<'a> {
    pub tenant: &'a str,
    pub unix_seconds: u64,
    /// The request's path: `/vmprovisioner.v1.VmService/CreateVm`.
    pub procedure: &'a str,
    pub nonce: &'a str,
    /// Hex SHA-256 of the request body as sent ([`body_digest`]); empty for a server stream.
    pub body_sha256: &'a str,
}

/// The hex SHA-256 of a unary request's body; empty for a stream's (`None`).
pub fn body_digest(body: Option<&[u8]>) -> String {
    body.map(|body| hex::encode(Sha256::digest(body))).unwrap_or_default()
}

/// What a gateway signs: a version, then each part of the call, one per
/// line, so a signature for one call holds for no other method, tenant,
/// time, nonce or body.
pub fn signed_message(call: &SignedCall<'_>) -> String {
    format!("metald-gateway-v2\n{}\n{}\n{}\n{}\n{}", call.tenant, call.unix_seconds, call.procedure, call.nonce, call.body_sha256)
}

/// The secret a gateway and a host share.
#[derive(Clone)]
pub struct GatewaySecret(Vec<u8>);

impl std::fmt::Debug for GatewaySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewaySecret(..)")
    }
}

impl GatewaySecret {
    pub fn new(secret: Vec<u8>) -> Self {
        Self(secret)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this never fails.
        match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        }
    }

    /// The signature of `call`, in hex.
    pub fn sign(&self, call: &SignedCall<'_>) -> String {
        let mut mac = self.mac();
        mac.update(signed_message(call).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `signature_hex` is this secret's signature of `call`, compared in constant time.
    pub fn verify(&self, call: &SignedCall<'_>, signature_hex: &str) -> bool {
        let Ok(signature) = hex::decode(signature_hex) else { return false };
        let mut mac = self.mac();
        mac.update(signed_message(call).as_bytes());
        mac.verify_slice(&signature).is_ok()
    }

    /// The four headers of a call for `tenant` to `procedure` with `body`
    /// (`None` for a server stream), signed now with a fresh nonce.
    pub fn headers(&self, tenant: &str, procedure: &str, body: Option<&[u8]>, now: SystemTime) -> [(&'static str, String); 4] {
        let unix_seconds = now.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let body_sha256 = body_digest(body);
        let signature = self.sign(&SignedCall { tenant, unix_seconds, procedure, nonce: &nonce, body_sha256: &body_sha256 });
        [
            (TENANT_HEADER, tenant.to_owned()),
            (TIMESTAMP_HEADER, unix_seconds.to_string()),
            (NONCE_HEADER, nonce),
            (SIGNATURE_HEADER, signature),
        ]
    }
}

/// Why a signed call is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the gateway headers are incomplete: {0} is missing")]
    HeaderMissing(&'static str),
    #[error("the gateway's signature does not verify")]
    BadSignature,
    #[error("the gateway's signature is {age_seconds} s away from this host's clock; at most {max_seconds} s are accepted")]
    Stale { age_seconds: u64, max_seconds: u64 },
    #[error("the gateway's signed call was already taken: a signed call is taken once")]
    Replayed,
}

/// The receiving side: a signature checked for the call's body, its age
/// within `max_skew` either way, and its nonce not taken before.
#[derive(Debug)]
pub struct Verifier {
    secret: GatewaySecret,
    max_skew: Duration,
    seen: Mutex<SeenNonces>,
}

/// Nonces of signed calls taken, with when each stops mattering (its
/// signature goes stale), so a call is taken once.
#[derive(Debug, Default)]
struct SeenNonces {
    until: HashMap<String, u64>,
    /// When the map was last pruned of nonces whose calls are stale anyway.
    pruned_at: u64,
}

impl SeenNonces {
    /// Takes `nonce` (valid until `until`), or says it was taken before.
    fn take(&mut self, nonce: &str, until: u64, now: u64) -> bool {
        if now > self.pruned_at {
            self.until.retain(|_, until| *until >= now);
            self.pruned_at = now;
        }
        if self.until.contains_key(nonce) {
            return false;
        }
        self.until.insert(nonce.to_owned(), until);
        true
    }
}

impl Verifier {
    pub fn new(secret: GatewaySecret, max_skew: Duration) -> Self {
        Self { secret, max_skew, seen: Mutex::default() }
    }

    /// The tenant of a call to `procedure` with `body` (`None`: a stream)
    /// whose headers verify, are fresh at `now`, and were not taken before.
    pub fn check<'h>(
        &self,
        headers: &'h http::HeaderMap,
        procedure: &str,
        body: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<&'h str, Refusal> {
        let header = |name: &'static str| headers.get(name).and_then(|value| value.to_str().ok()).ok_or(Refusal::HeaderMissing(name));
        let tenant = header(TENANT_HEADER)?;
        let timestamp = header(TIMESTAMP_HEADER)?;
        let nonce = header(NONCE_HEADER)?;
        let signature = header(SIGNATURE_HEADER)?;
        let unix_seconds: u64 = timestamp.parse().map_err(|_| Refusal::BadSignature)?;
        let body_sha256 = body_digest(body);
        let signed = SignedCall { tenant, unix_seconds, procedure, nonce, body_sha256: &body_sha256 };
        if !self.secret.verify(&signed, signature) {
            return Err(Refusal::BadSignature);
        }
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        let age_seconds = now.abs_diff(unix_seconds);
        let max_seconds = self.max_skew.as_secs();
        if age_seconds > max_seconds {
            return Err(Refusal::Stale { age_seconds, max_seconds });
        }
        // Only a signature that holds reaches the memory of nonces, so only a holder of the secret can fill it.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if !seen.take(nonce, unix_seconds.saturating_add(max_seconds), now) {
            return Err(Refusal::Replayed);
        }
        Ok(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_tenant_time_procedure_nonce_and_body_only() {
        let secret = GatewaySecret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let body = body_digest(Some(b"{\"vm_id\":\"a\"}"));
        let call = SignedCall { tenant: "acme", unix_seconds: 1000, procedure: "/p/A", nonce: "n1", body_sha256: &body };
        let signature = secret.sign(&call);
        assert!(secret.verify(&call, &signature));
        let other_body = body_digest(Some(b"{\"vm_id\":\"b\"}"));
        for changed in [
            SignedCall { tenant: "globex", ..call },
            SignedCall { unix_seconds: 1001, ..call },
            SignedCall { procedure: "/p/B", ..call },
            SignedCall { nonce: "n2", ..call },
            SignedCall { body_sha256: &other_body, ..call },
            SignedCall { body_sha256: "", ..call },
        ] {
            assert!(!secret.verify(&changed, &signature), "{changed:?}");
        }
        assert!(!GatewaySecret::new(b"another secret of enough length!".to_vec()).verify(&call, &signature));
        assert!(!secret.verify(&call, "not hex"));
    }

    #[test]
    fn a_nonce_is_forgotten_only_once_its_call_is_stale_anyway() {
        let mut seen = SeenNonces::default();
        assert!(seen.take("n1", 1060, 1000));
        assert!(!seen.take("n1", 1060, 1059));
        assert!(seen.take("n2", 1120, 1061));
        assert!(!seen.until.contains_key("n1"), "n1's call is stale by now: forgotten");
    }

    #[test]
    fn each_call_gets_a_nonce_of_its_own() {
        let secret = GatewaySecret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let first = secret.headers("acme", "/p/A", Some(b"x"), SystemTime::now());
        let second = secret.headers("acme", "/p/A", Some(b"x"), SystemTime::now());
        assert_ne!(first[2].1, second[2].1);
        assert_eq!(first[2].1.len(), 32);
    }
}
