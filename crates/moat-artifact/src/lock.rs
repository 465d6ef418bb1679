//! `moat.lock`: what a pull promised. Plain TOML, meant to be reviewed and
//! committed: the model name, where it came from, the resolved revision and,
//! per file, its path, size and SHA-256. Parsing is strict (unknown keys are
//! refused) and every path is checked to stay inside the model folder, so a
//! lock can never name a file outside the store.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};

/// File name of the lock inside a stored model.
pub const LOCK_FILE: &str = "moat.lock";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    pub name: String,
    pub source: String,
    /// The resolved, immutable revision (a commit for hubs; for local
    /// folders a digest of the file list, see [`Lock::content_revision`]).
    pub revision: String,
    /// The verified signer, when the model was pulled under a signature
    /// policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<LockSignature>,
    #[serde(rename = "file", default)]
    pub files: Vec<LockedFile>,
}

/// Who signed the model, as verified at pull time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockSignature {
    /// Model-relative path of the OpenSSF model-signing bundle.
    pub file: String,
    /// The verified signer (`key sha256:…` or `certificate "…" issued by "…"`).
    pub signer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedFile {
    /// Relative path with `/` separators.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: cannot read lock: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid lock: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Lock {
    /// Build a lock; files are sorted by path so the text is stable.
    pub fn new(name: &str, source: &str, revision: &str, mut files: Vec<LockedFile>) -> Self {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Self {
            version: VERSION,
            name: name.to_owned(),
            source: source.to_owned(),
            revision: revision.to_owned(),
            signature: None,
            files,
        }
    }

    /// A revision for sources without one (local folders): the SHA-256 of the
    /// sorted `path\0size\0sha256\n` list, so the same content always gets the
    /// same revision and any change gets a new one.
    pub fn content_revision(files: &[LockedFile]) -> String {
        let mut sorted: Vec<&LockedFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut h = Sha256::new();
        for f in sorted {
            h.update(f.path.as_bytes());
            h.update([0]);
            h.update(f.size.to_string().as_bytes());
            h.update([0]);
            h.update(f.sha256.as_bytes());
            h.update(b"\n");
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# moat.lock: written by `moat pull`; every file's size and SHA-256.\n\
             # Review and commit it; `moat verify` checks the store against it.\n{body}"
        )
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, LockError> {
        let invalid = |message: String| LockError::Invalid {
            path: path.to_owned(),
            message,
        };
        let lock: Lock = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if lock.version != VERSION {
            return Err(invalid(format!(
                "version = {} is not supported (expected {VERSION})",
                lock.version
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, f) in lock.files.iter().enumerate() {
            check_rel_path(&f.path).map_err(|m| invalid(format!("file[{i}].path: {m}")))?;
            if f.sha256.len() != 64
                || !f
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(invalid(format!("file[{i}].sha256: not 64 lower-case hex digits")));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(invalid(format!("file[{i}].path: {:?} listed twice", f.path)));
            }
        }
        Ok(lock)
    }

    pub fn read(path: &Path) -> Result<Self, LockError> {
        let text = std::fs::read_to_string(path).map_err(|source| LockError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn file(&self, rel: &str) -> Option<&LockedFile> {
        self.files.iter().find(|f| f.path == rel)
    }
}

/// A relative path that cannot leave its folder: non-empty `/`-separated
/// normal components, no `.`/`..`, no backslashes, no NUL, no absolute path.
pub fn check_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.contains('\\') || p.contains('\0') {
        return Err(format!("{p:?} contains a backslash or NUL"));
    }
    for part in p.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!("{p:?} is not a plain relative path"));
        }
    }
    if !Path::new(p)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(format!("{p:?} is not a plain relative path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str) -> LockedFile {
        LockedFile {
            path: path.into(),
            size: 3,
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        }
    }

    #[test]
    fn round_trips_and_sorts() {
        let lock = Lock::new("demo", "file:///x", "sha256:00", vec![f("b.json"), f("a/c.bin")]);
        let text = lock.to_toml();
        let back = Lock::parse(&text, Path::new("moat.lock")).unwrap();
        assert_eq!(back, lock);
        assert_eq!(back.files[0].path, "a/c.bin");
    }

    #[test]
    fn refuses_escaping_paths_and_unknown_keys() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "./a"] {
            let lock = Lock::new("demo", "s", "r", vec![f(bad)]);
            let err = Lock::parse(&lock.to_toml(), Path::new("l")).unwrap_err();
            assert!(err.to_string().contains("file[0].path"), "{bad:?}: {err}");
        }
        let text = Lock::new("demo", "s", "r", vec![]).to_toml() + "extra = 1\n";
        assert!(
            Lock::parse(&text, Path::new("l"))
                .unwrap_err()
                .to_string()
                .contains("extra")
        );
    }

    #[test]
    fn content_revision_changes_with_content() {
        let a = Lock::content_revision(&[f("a"), f("b")]);
        let b = Lock::content_revision(&[f("b"), f("a")]);
        let mut g = f("a");
        g.size = 4;
        assert_eq!(a, b);
        assert_ne!(a, Lock::content_revision(&[g, f("b")]));
    }
}
