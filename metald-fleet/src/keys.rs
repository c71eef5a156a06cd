//! API keys: what a gateway's callers show. A key is
//! `mdk_<id>_<secret>`: the prefix lets secret scanners find a leaked key,
//! the id (64 bits, hex) names the key in lists and logs, and the secret
//! (256 bits, hex) is what makes it a key. The store keeps the id and the
//! SHA-256 of the whole key, never the key; a key is checked by finding
//! its id and comparing digests in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every key starts with.
pub const KEY_PREFIX: &str = "mdk_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A key's SHA-256, as the store keeps it.
pub type KeyDigest = [u8; 32];

/// A key as a caller showed it, well formed; not yet known to be real.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey {
    id: String,
    digest: KeyDigest,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedKey").field("id", &self.id).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an API key is `{KEY_PREFIX}` followed by a {ID_HEX}-digit hex id, `_` and a {SECRET_HEX}-digit hex secret")]
pub struct MalformedKey;

impl PresentedKey {
    pub fn parse(text: &str) -> Result<Self, MalformedKey> {
        let rest = text.strip_prefix(KEY_PREFIX).ok_or(MalformedKey)?;
        let (id, secret) = rest.split_once('_').ok_or(MalformedKey)?;
        let hex = |part: &str, len: usize| part.len() == len && part.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
        if !hex(id, ID_HEX) || !hex(secret, SECRET_HEX) {
            return Err(MalformedKey);
        }
        Ok(Self { id: id.to_owned(), digest: digest_of(text) })
    }

    /// The key's id: public, shown in lists and logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this key is the one whose digest the store keeps, compared in constant time.
    pub fn matches(&self, stored: &KeyDigest) -> bool {
        bool::from(self.digest.ct_eq(stored))
    }
}

/// A key just made: shown once to whoever asked for it.
#[derive(Clone)]
pub struct NewKey {
    pub key: String,
    pub id: String,
    pub digest: KeyDigest,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl NewKey {
    pub fn generate() -> Self {
        let id: [u8; ID_HEX / 2] = rand::random();
        let secret: [u8; SECRET_HEX / 2] = rand::random();
        let id = hex::encode(id);
        let key = format!("{KEY_PREFIX}{id}_{}", hex::encode(secret));
        let digest = digest_of(&key);
        Self { key, id, digest }
    }
}

/// How a key is shown after it was made: its id, never its secret.
pub fn masked(id: &str) -> String {
    format!("{KEY_PREFIX}{id}_…")
}

fn digest_of(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_parses_back_to_its_id_and_matches_only_its_digest() {
        let made = NewKey::generate();
        assert!(made.key.starts_with(KEY_PREFIX));
        assert_eq!(made.key.len(), KEY_PREFIX.len() + ID_HEX + 1 + SECRET_HEX);
        let presented = PresentedKey::parse(&made.key).unwrap();
        assert_eq!(presented.id(), made.id);
        assert!(presented.matches(&made.digest));
        assert!(!presented.matches(&NewKey::generate().digest));
        assert_ne!(made.key, NewKey::generate().key);
        assert!(!format!("{made:?} {presented:?}").contains(&made.key[KEY_PREFIX.len() + ID_HEX + 1..]), "no secret in debug output");
    }

    #[test]
    fn a_forged_key_with_a_real_id_does_not_match() {
        let made = NewKey::generate();
        let forged = format!("{KEY_PREFIX}{}_{}", made.id, "0".repeat(SECRET_HEX));
        assert!(!PresentedKey::parse(&forged).unwrap().matches(&made.digest));
    }

    #[test]
    fn anything_but_the_shape_of_a_key_is_malformed() {
        let id = "0123456789abcdef";
        let secret = "a".repeat(SECRET_HEX);
        for text in [
            String::new(),
            "Bearer x".into(),
            format!("mdt_{id}_{secret}"),
            format!("{KEY_PREFIX}{id}{secret}"),
            format!("{KEY_PREFIX}{id}_{}", &secret[1..]),
            format!("{KEY_PREFIX}{}_{secret}", id.to_uppercase()),
            format!("{KEY_PREFIX}{id}_{secret}x"),
        ] {
            assert_eq!(PresentedKey::parse(&text), Err(MalformedKey), "{text:?}");
        }
        assert!(PresentedKey::parse(&format!("{KEY_PREFIX}{id}_{secret}")).is_ok());
    }
}
