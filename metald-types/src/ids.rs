//! Identifiers of VMs and tenants: validated on the way in, so every later
//! use (folder names, VMM instance ids, log fields) can trust them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than {max} characters")]
    TooLong { kind: &'static str, value: String, max: usize },
    #[error("{kind} {value:?} must start with an ASCII letter or digit")]
    BadStart { kind: &'static str, value: String },
    #[error("{kind} {value:?} holds {found:?}; only ASCII letters, digits and '-' are allowed")]
    BadCharacter { kind: &'static str, value: String, found: char },
}

/// The longest VM id: Firecracker's `--id` takes at most 64 characters.
pub const VM_ID_MAX_LEN: usize = 64;
/// The longest tenant id.
pub const TENANT_ID_MAX_LEN: usize = 128;

fn validate(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    let Some(first) = value.chars().next() else {
        return Err(IdError::Empty { kind });
    };
    if value.len() > max {
        return Err(IdError::TooLong { kind, value: value.to_owned(), max });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadStart { kind, value: value.to_owned() });
    }
    if let Some(found) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
        return Err(IdError::BadCharacter { kind, value: value.to_owned(), found });
    }
    Ok(())
}

/// A VM's identity on this host. Safe to use as a file name and as a VMM
/// instance id: 1 to 64 ASCII letters, digits and dashes, starting with a
/// letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl VmId {
    /// Checks a caller-chosen id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        validate("VM id", &value, VM_ID_MAX_LEN)?;
        Ok(Self(value))
    }

    /// A fresh id carrying 122 random bits from the OS's generator, so ids
    /// are unique and cannot be guessed from one another.
    pub fn generate() -> Self {
        Self(format!("vm-{}", uuid::Uuid::new_v4().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The owner of VMs: the unit of isolation, quotas and billing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        validate("tenant id", &value, TENANT_ID_MAX_LEN)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_id_conversions {
    ($id:ident) => {
        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $id {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::new(value)
            }
        }

        impl TryFrom<String> for $id {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$id> for String {
            fn from(id: $id) -> String {
                id.0
            }
        }

        impl AsRef<str> for $id {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id_conversions!(VmId);
string_id_conversions!(TenantId);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_vm_ids_are_valid_and_distinct() {
        let ids: HashSet<VmId> = (0..10_000).map(|_| VmId::generate()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(VmId::new(id.as_str()), Ok(id.clone()));
            assert_eq!(id.as_str().len(), 35);
        }
    }

    #[test]
    fn vm_ids_refuse_what_is_unsafe_as_a_file_name() {
        assert_eq!(VmId::new(""), Err(IdError::Empty { kind: "VM id" }));
        assert!(matches!(VmId::new("../etc"), Err(IdError::BadStart { .. })));
        assert!(matches!(VmId::new("a/b"), Err(IdError::BadCharacter { found: '/', .. })));
        assert!(matches!(VmId::new("vm_1"), Err(IdError::BadCharacter { found: '_', .. })));
        assert!(matches!(VmId::new("x".repeat(65)), Err(IdError::TooLong { max: 64, .. })));
        assert!(VmId::new("x".repeat(64)).is_ok());
        assert!(VmId::new("Vm-7").is_ok());
    }

    #[test]
    fn ids_round_trip_through_serde_with_validation() {
        let id: VmId = serde_json::from_str("\"vm-1\"").unwrap();
        assert_eq!(id.as_str(), "vm-1");
        assert!(serde_json::from_str::<VmId>("\"-bad\"").is_err());
        assert!(serde_json::from_str::<TenantId>("\"acme corp\"").is_err());
    }
}
