//! Per-key limits: the quotas and caps one API key carries on top of its
//! role's (`[rate_limits]`).
//!
//! A key's limits can only tighten what its role allows: the server takes,
//! field by field, the smaller of the two (see [`KeyLimits::tightest`]).
//! [`KeyLimits::is_within`] answers the other question a key issuer asks,
//! "are these grants a subset of mine?", so that a key created by someone
//! can never carry looser limits than that someone (the LiteLLM
//! privilege-escalation lesson). `None` everywhere means "no limit".

use serde::{Deserialize, Serialize};

/// Limits of one key; every field is optional and `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Requests that may arrive back to back (GCRA burst); needs
    /// `requests_per_minute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Largest `max_tokens` one request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Largest `n` (choices) one request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_n: Option<u32>,
}

/// `a` is at most `b`, where `None` is infinity.
fn le<T: PartialOrd>(a: Option<T>, b: Option<T>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a <= b,
    }
}

/// The smaller of two limits, where `None` is infinity.
fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl KeyLimits {
    /// No field set: the key adds nothing to its role's limits.
    pub fn is_empty(&self) -> bool {
        *self == KeyLimits::default()
    }

    /// Every limit here is at least as tight as in `bound` (a limit that
    /// `bound` sets must be set here too, and not larger). Used to check
    /// that a key's grants are a subset of its creator's.
    pub fn is_within(&self, bound: &KeyLimits) -> bool {
        le(self.requests_per_minute, bound.requests_per_minute)
            && le(self.burst, bound.burst)
            && le(self.tokens_per_minute, bound.tokens_per_minute)
            && le(self.max_concurrent, bound.max_concurrent)
            && le(self.max_tokens, bound.max_tokens)
            && le(self.max_n, bound.max_n)
    }

    /// Field by field, the tighter of `self` and `other`: what applies to
    /// a key whose role allows `self` and which itself carries `other`.
    pub fn tightest(&self, other: &KeyLimits) -> KeyLimits {
        KeyLimits {
            requests_per_minute: min(self.requests_per_minute, other.requests_per_minute),
            burst: min(self.burst, other.burst),
            tokens_per_minute: min(self.tokens_per_minute, other.tokens_per_minute),
            max_concurrent: min(self.max_concurrent, other.max_concurrent),
            max_tokens: min(self.max_tokens, other.max_tokens),
            max_n: min(self.max_n, other.max_n),
        }
    }

    /// Refuses values no request could pass: zeros (leave a field out
    /// for "no limit"), a burst without a rate, `max_tokens` above the
    /// tokens/min budget. The message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("requests_per_minute", self.requests_per_minute == Some(0)),
            ("burst", self.burst == Some(0)),
            ("tokens_per_minute", self.tokens_per_minute == Some(0)),
            ("max_concurrent", self.max_concurrent == Some(0)),
            ("max_tokens", self.max_tokens == Some(0)),
            ("max_n", self.max_n == Some(0)),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, z)| *z) {
            return Err(format!("{name} must be at least 1 (leave it out for no limit)"));
        }
        if self.burst.is_some() && self.requests_per_minute.is_none() {
            return Err("burst needs requests_per_minute".into());
        }
        if let (Some(tpm), Some(mt)) = (self.tokens_per_minute, self.max_tokens)
            && mt > tpm
        {
            return Err(format!(
                "max_tokens {mt} exceeds tokens_per_minute {tpm}: no request could ever be admitted"
            ));
        }
        Ok(())
    }
}

/// `rpm=60,burst=2,max_tokens=512`: the fields set, in a fixed order, as
/// `moat keys list` shows them; `-` when none is set.
impl std::fmt::Display for KeyLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields = [
            ("rpm", self.requests_per_minute),
            ("burst", self.burst),
            ("tpm", self.tokens_per_minute),
            ("max_concurrent", self.max_concurrent.map(u64::from)),
            ("max_tokens", self.max_tokens),
            ("max_n", self.max_n.map(u64::from)),
        ];
        let set: Vec<String> = fields
            .iter()
            .filter_map(|(name, v)| v.map(|v| format!("{name}={v}")))
            .collect();
        if set.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&set.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(n: u64) -> KeyLimits {
        KeyLimits {
            requests_per_minute: Some(n),
            ..KeyLimits::default()
        }
    }

    #[test]
    fn displays_the_fields_set() {
        assert_eq!(KeyLimits::default().to_string(), "-");
        let l = KeyLimits {
            max_n: Some(1),
            burst: Some(2),
            ..rpm(60)
        };
        assert_eq!(l.to_string(), "rpm=60,burst=2,max_n=1");
    }

    #[test]
    fn within_treats_none_as_unlimited() {
        let unlimited = KeyLimits::default();
        assert!(rpm(10).is_within(&unlimited));
        assert!(unlimited.is_within(&unlimited));
        // An unlimited key is not within a limited creator.
        assert!(!unlimited.is_within(&rpm(10)));
        assert!(rpm(10).is_within(&rpm(10)));
        assert!(rpm(9).is_within(&rpm(10)));
        assert!(!rpm(11).is_within(&rpm(10)));
        let mixed = KeyLimits {
            max_n: Some(2),
            ..rpm(5)
        };
        assert!(!mixed.is_within(&KeyLimits {
            max_n: Some(1),
            ..rpm(10)
        }));
    }

    #[test]
    fn tightest_takes_the_smaller_field_by_field() {
        let role = KeyLimits {
            requests_per_minute: Some(600),
            max_tokens: Some(100),
            ..KeyLimits::default()
        };
        let key = KeyLimits {
            requests_per_minute: Some(60),
            max_tokens: Some(500),
            max_concurrent: Some(2),
            ..KeyLimits::default()
        };
        let t = role.tightest(&key);
        assert_eq!(t.requests_per_minute, Some(60));
        assert_eq!(t.max_tokens, Some(100));
        assert_eq!(t.max_concurrent, Some(2));
        assert_eq!(t.tokens_per_minute, None);
        assert_eq!(t, key.tightest(&role));
        assert!(t.is_within(&role) && t.is_within(&key));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(rpm(1).validate().is_ok());
        assert!(rpm(0).validate().unwrap_err().contains("requests_per_minute"));
        let burst_only = KeyLimits {
            burst: Some(3),
            ..KeyLimits::default()
        };
        assert!(burst_only.validate().unwrap_err().contains("burst"));
        let too_big = KeyLimits {
            tokens_per_minute: Some(10),
            max_tokens: Some(11),
            ..KeyLimits::default()
        };
        assert!(too_big.validate().unwrap_err().contains("max_tokens"));
    }

    #[test]
    fn limits_are_stored_with_the_key_and_checked_first() -> Result<(), Box<dyn std::error::Error>> {
        use crate::keys::{KeyStore, Role};
        let dir = tempfile::tempdir()?;
        let store = KeyStore::new(dir.path().join("keys.json"));
        let key = store.create(Role::user(), Vec::new(), None)?;
        assert_eq!(key.record.limits, None);
        // A refused value leaves the file as it was.
        assert!(store.set_limits(&key.record.id, Some(rpm(0))).is_err());
        assert_eq!(store.records()?[0].limits, None);
        store.set_limits(&key.record.id, Some(rpm(30)))?;
        assert_eq!(store.records()?[0].limits, Some(rpm(30)));
        let text = std::fs::read_to_string(store.path())?;
        assert!(text.contains("\"requests_per_minute\": 30"), "{text}");
        // Empty limits are stored as none at all.
        store.set_limits(&key.record.id, Some(KeyLimits::default()))?;
        assert_eq!(store.records()?[0].limits, None);
        assert!(!std::fs::read_to_string(store.path())?.contains("limits"));
        assert!(store.set_limits("nope", Some(rpm(1))).is_err());
        Ok(())
    }

    #[test]
    fn serialises_only_what_is_set_and_refuses_unknown_fields() {
        let json = serde_json::to_string(&rpm(7)).unwrap_or_default();
        assert_eq!(json, r#"{"requests_per_minute":7}"#);
        let back: Result<KeyLimits, _> = serde_json::from_str(&json);
        assert_eq!(back.ok(), Some(rpm(7)));
        assert!(serde_json::from_str::<KeyLimits>(r#"{"rpm":1}"#).is_err());
    }
}
