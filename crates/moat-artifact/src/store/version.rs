//! Version names: the folder name a lock's `revision` is stored under
//! (`models/NAME/versions/<VERSION>/`), and the check applied to every
//! version name read back (from `current`, or typed by a user).
//!
//! A revision comes from the source (a Hub commit, an S3 or HTTPS content
//! digest) and is therefore untrusted text. Ollama's CVE-2024-37032 turned a
//! digest into a path outside its store; here a revision is mapped onto an
//! allowlist of characters, can never be `.`/`..` or contain a separator,
//! and is length-limited, so it is always exactly one harmless path
//! component. The mapping is not injective (`sha256:ab` and `sha256-ab` give
//! the same name), so promotion compares the stored lock's revision with the
//! incoming one and refuses a collision instead of treating it as a match.

use std::fmt;

/// Longest version name: a 40-hex Hub commit fits whole; longer revisions
/// (`sha256:` + 64 hex) keep 33 hex digits (132 bits) after the prefix.
pub const MAX_VERSION_LEN: usize = 40;

/// Longest revision accepted at all: anything longer is not a revision.
const MAX_REVISION_LEN: usize = 256;

/// A revision that cannot name a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revision {revision:?} cannot name a version: {reason}")]
pub struct InvalidRevision {
    pub revision: String,
    pub reason: &'static str,
}

/// The version folder name for `revision`: characters outside
/// `[A-Za-z0-9._-]` become `-`, a name not starting with a letter or digit
/// gets a `v` prefix, and the result is cut to [`MAX_VERSION_LEN`].
pub fn version_name(revision: &str) -> Result<String, InvalidRevision> {
    let invalid = |reason| InvalidRevision {
        revision: revision.chars().take(80).collect(),
        reason,
    };
    if revision.is_empty() {
        return Err(invalid("empty"));
    }
    if revision.len() > MAX_REVISION_LEN {
        return Err(invalid("longer than 256 bytes"));
    }
    if revision.chars().any(char::is_control) {
        return Err(invalid("contains control characters"));
    }
    let mapped: String = revision
        .chars()
        .map(|c| if is_safe_char(c) { c } else { '-' })
        .collect();
    let mut name = if mapped.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        mapped
    } else {
        format!("v{mapped}")
    };
    // Every character is ASCII now, so cutting at a byte index is safe.
    name.truncate(MAX_VERSION_LEN);
    match check_version_name(&name) {
        Ok(()) => Ok(name),
        Err(_) => Err(invalid("no usable characters")),
    }
}

fn is_safe_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A version name read back from disk or typed by a user that is not one
/// [`version_name`] could have produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeVersionName(pub String);

impl fmt::Display for UnsafeVersionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a version name (1 to {MAX_VERSION_LEN} characters from [A-Za-z0-9._-], starting with a letter or digit)",
            self.0
        )
    }
}

/// Accept only names [`version_name`] can produce: one path component that
/// is never `.`, `..`, hidden, or longer than [`MAX_VERSION_LEN`].
pub fn check_version_name(name: &str) -> Result<(), UnsafeVersionName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VERSION_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(is_safe_char);
    if ok {
        Ok(())
    } else {
        Err(UnsafeVersionName(name.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_become_single_safe_components() {
        let hf = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(version_name(hf).unwrap(), hf);
        let content = format!("sha256:{}", "ab".repeat(32));
        let v = version_name(&content).unwrap();
        assert_eq!(v.len(), MAX_VERSION_LEN);
        assert!(v.starts_with("sha256-abab"), "{v}");
        for (rev, want) in [
            ("../../etc/passwd", "v..-..-etc-passwd"),
            ("/abs", "v-abs"),
            ("..", "v.."),
            (".", "v."),
            ("a/b\\c", "a-b-c"),
            ("main", "main"),
            ("ünï", "v-n-"),
        ] {
            assert_eq!(version_name(rev).unwrap(), want, "{rev:?}");
            assert!(check_version_name(want).is_ok());
        }
    }

    #[test]
    fn unusable_revisions_are_refused() {
        assert!(version_name("").is_err());
        assert!(version_name("a\nb").is_err());
        assert!(version_name("a\0b").is_err());
        assert!(version_name(&"x".repeat(300)).is_err());
    }

    #[test]
    fn read_back_names_are_checked() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "-x",
            "a b",
            "a\0",
            &"x".repeat(41),
        ] {
            assert!(check_version_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_version_name("sha256-00ff").is_ok());
    }
}
