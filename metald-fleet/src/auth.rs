//! Who calls the gateway. A tenant shows an API key
//! (`authorization: Bearer mdk_…`); the operator shows an admin token,
//! kept in the settings as its SHA-256. The answer to any key that does
//! not open calls (malformed, unknown, forged, revoked, expired) is the
//! same, so it never tells whether a key exists. Key records are read
//! through [`crate::cache::RecentReads`]: a revocation made through this
//! gateway holds at once, one made through another within the cache's `fresh_ms`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::cache::{CacheSettings, RecentReads};
use crate::keys::PresentedKey;
use crate::store::{FleetStore, KeyRecord, StoreError};

/// A tenant's call, authenticated: put into the call's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub key_id: String,
}

/// The gateway's operator, authenticated: put into an admin call's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admin;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no API key: send `authorization: Bearer <API key>`")]
    Missing,
    #[error("the API key is not valid")]
    NotValid,
    #[error("AdminService takes only the gateway's admin token")]
    NotAdmin,
    #[error("this is the admin token, which opens only AdminService; VmService calls need a tenant's API key")]
    AdminTokenForTenantCall,
    #[error("cannot check the API key now: {0}")]
    Store(#[source] StoreError),
}

impl AuthError {
    pub fn to_connect(&self) -> connectrpc::ConnectError {
        match self {
            AuthError::Store(_) => connectrpc::ConnectError::unavailable(self.to_string()),
            AuthError::AdminTokenForTenantCall => connectrpc::ConnectError::permission_denied(self.to_string()),
            _ => connectrpc::ConnectError::unauthenticated(self.to_string()),
        }
    }
}

/// The bearer credential of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(http::header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::NotValid)?;
    let (scheme, credential) = value.split_once(' ').ok_or(AuthError::NotValid)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NotValid);
    }
    Ok(credential.trim())
}

#[derive(Debug)]
pub struct Authenticator {
    store: Arc<dyn FleetStore>,
    admin_tokens: HashSet<[u8; 32]>,
    keys: RecentReads<KeyRecord>,
    /// When each key was last used, not yet written to the store.
    uses: Mutex<HashMap<String, u64>>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn FleetStore>, admin_tokens: HashSet<[u8; 32]>, cache: CacheSettings) -> Self {
        Self { store, admin_tokens, keys: RecentReads::new(cache), uses: Mutex::default() }
    }

    /// Drops a key's record, so its next use reads the store: it was changed here.
    pub fn forget_key(&self, id: &str) {
        self.keys.forget(id);
    }

    /// Drops key records too old to answer even while the store is away.
    pub fn forget_old(&self) {
        self.keys.forget_old();
    }

    fn is_admin_token(&self, credential: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        self.admin_tokens.contains(&digest)
    }

    /// The tenant whose key opens this call at `now_ms`.
    pub async fn tenant(&self, headers: &HeaderMap, now_ms: u64) -> Result<Caller, AuthError> {
        let credential = bearer(headers)?;
        if self.is_admin_token(credential) {
            return Err(AuthError::AdminTokenForTenantCall);
        }
        let presented = PresentedKey::parse(credential).map_err(|_| AuthError::NotValid)?;
        let id = presented.id();
        let record = self.keys.get(id, self.store.key(id)).await.map_err(AuthError::Store)?.ok_or(AuthError::NotValid)?;
        if !presented.matches(&record.digest) || !record.valid_at(now_ms) {
            return Err(AuthError::NotValid);
        }
        self.uses.lock().unwrap_or_else(PoisonError::into_inner).insert(record.id.clone(), now_ms);
        Ok(Caller { tenant: record.tenant, key_id: record.id })
    }

    /// The operator, from an admin call's headers.
    pub fn admin(&self, headers: &HeaderMap) -> Result<Admin, AuthError> {
        let credential = bearer(headers)?;
        if self.is_admin_token(credential) { Ok(Admin) } else { Err(AuthError::NotAdmin) }
    }

    /// Writes the keys' last uses to the store; a few seconds' worth per write.
    pub async fn flush_uses(&self) -> Result<(), StoreError> {
        let uses: Vec<(String, u64)> = std::mem::take(&mut *self.uses.lock().unwrap_or_else(PoisonError::into_inner)).into_iter().collect();
        if uses.is_empty() {
            return Ok(());
        }
        self.store.record_key_uses(uses).await
    }
}
