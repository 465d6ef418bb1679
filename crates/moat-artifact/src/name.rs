//! Model names. A name becomes a folder in the store, so it is an allowlist of
//! characters: nothing that could be a path separator, a parent reference or
//! a hidden file.

use std::fmt;

/// A model name checked to be safe as a single path component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelName(String);

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid model name {0:?}: use 1 to 64 characters from [A-Za-z0-9._-], starting with a letter or digit"
)]
pub struct InvalidName(pub String);

impl ModelName {
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidName(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ModelName;

    #[test]
    fn accepts_plain_names() {
        for n in ["demo", "r1-distill-qwen-1.5b", "A_b.c", "7b"] {
            assert!(ModelName::parse(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_path_like_names() {
        for n in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "-x",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(ModelName::parse(n).is_err(), "{n:?}");
        }
    }
}
