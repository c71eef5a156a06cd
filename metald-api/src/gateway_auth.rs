//! How a gateway vouches to a host: an HMAC-SHA256 signature, under a
//! secret only the two know, over the tenant, the time and the procedure,
//! sent in three headers. The host takes the tenant from the headers only
//! when the signature holds and is fresh. A call the gateway makes for
//! itself (a host's capacity) is signed with an empty tenant, which no
//! tenant call can be.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The tenant the gateway vouches for; empty for the gateway's own calls.
pub const TENANT_HEADER: &str = "x-metald-tenant";
/// When the gateway signed, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-metald-gateway-timestamp";
/// Hex HMAC-SHA256 of [`signed_message`] under the shared secret.
pub const SIGNATURE_HEADER: &str = "x-metald-gateway-signature";

/// The shortest secret a gateway and a host may share.
pub const MIN_SECRET_BYTES: usize = 32;

/// What a gateway signs: a version, the tenant, the time and the procedure
/// path (`/vmprovisioner.v1.VmService/CreateVm`), one per line, so a
/// signature for one call cannot be reused for another method or tenant.
pub fn signed_message(tenant: &str, unix_seconds: u64, procedure: &str) -> String {
    format!("metald-gateway-v1\n{tenant}\n{unix_seconds}\n{procedure}")
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

    /// The signature for `tenant` calling `procedure` at `unix_seconds`, in hex.
    pub fn sign(&self, tenant: &str, unix_seconds: u64, procedure: &str) -> String {
        let mut mac = self.mac();
        mac.update(signed_message(tenant, unix_seconds, procedure).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `signature_hex` is this secret's signature, compared in constant time.
    pub fn verify(&self, tenant: &str, unix_seconds: u64, procedure: &str, signature_hex: &str) -> bool {
        let Ok(signature) = hex::decode(signature_hex) else { return false };
        let mut mac = self.mac();
        mac.update(signed_message(tenant, unix_seconds, procedure).as_bytes());
        mac.verify_slice(&signature).is_ok()
    }

    /// The three headers of a call for `tenant` to `procedure`, signed now.
    pub fn headers(&self, tenant: &str, procedure: &str, now: SystemTime) -> [(&'static str, String); 3] {
        let unix_seconds = now.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        [
            (TENANT_HEADER, tenant.to_owned()),
            (TIMESTAMP_HEADER, unix_seconds.to_string()),
            (SIGNATURE_HEADER, self.sign(tenant, unix_seconds, procedure)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_tenant_time_and_procedure_only() {
        let secret = GatewaySecret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let signature = secret.sign("acme", 1000, "/p/A");
        assert!(secret.verify("acme", 1000, "/p/A", &signature));
        for (tenant, at, procedure) in [("globex", 1000, "/p/A"), ("acme", 1001, "/p/A"), ("acme", 1000, "/p/B")] {
            assert!(!secret.verify(tenant, at, procedure, &signature), "{tenant} {at} {procedure}");
        }
        assert!(!GatewaySecret::new(b"another secret of enough length!".to_vec()).verify("acme", 1000, "/p/A", &signature));
        assert!(!secret.verify("acme", 1000, "/p/A", "not hex"));
    }
}
