//! The per-VM migration encryption policy.

use std::fmt;
use std::str::FromStr;

/// How a VM's migrations are protected (docs/design.md, "A policy per VM").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Never encrypt: the stream is relayed as is.
    Disabled,
    /// Encrypt when both hosts can; migrate plain otherwise (the default).
    #[default]
    Opportunistic,
    /// Encrypt, or refuse to migrate.
    Required,
}

/// The rule: a VM with an encrypted disk, or whose policy is `required`,
/// never migrates in plaintext. The one place it is written; the hook, the
/// CLI and the migration daemon all ask here.
pub fn must_migrate_encrypted(policy: Policy, encrypted: bool) -> bool {
    encrypted || policy == Policy::Required
}

impl Policy {
    /// The name used on command lines and in domain metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Disabled => "disabled",
            Policy::Opportunistic => "opportunistic",
            Policy::Required => "required",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown policy {0:?} (disabled, opportunistic or required)")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disabled" => Ok(Policy::Disabled),
            "opportunistic" => Ok(Policy::Opportunistic),
            "required" => Ok(Policy::Required),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [Policy::Disabled, Policy::Opportunistic, Policy::Required] {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
        }
        assert!("plain".parse::<Policy>().is_err());
        assert_eq!(Policy::default(), Policy::Opportunistic);
    }
}

#[cfg(test)]
mod must_tests {
    use super::*;

    /// The whole table: encrypted VMs and `required` ones never go plain.
    #[test]
    fn must_migrate_encrypted_table() {
        for (policy, encrypted, want) in [
            (Policy::Disabled, false, false),
            (Policy::Opportunistic, false, false),
            (Policy::Required, false, true),
            (Policy::Disabled, true, true),
            (Policy::Opportunistic, true, true),
            (Policy::Required, true, true),
        ] {
            assert_eq!(
                must_migrate_encrypted(policy, encrypted),
                want,
                "{policy:?} {encrypted}"
            );
        }
    }
}
