//! Model sources: where `moat pull` gets bytes from. `file://` folders are
//! copied directly (see `pull.rs`); `s3://bucket/prefix`, `hf://org/repo` and
//! `https://…` are remotes: each turns into a [`Listing`] (an immutable
//! revision and the files with what the source promises about them) and
//! can open any listed file at a byte offset, which is all the downloader
//! needs for parallel, resumable, hashed downloads.
//!
//! Nothing here writes to disk: a hostile listing is only data until
//! `pull.rs` has checked every name with `lock::check_rel_path`.

pub mod aws;
pub mod hf;
pub mod http;
pub mod https;
pub mod policy;
pub mod s3;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local folder, as an absolute, canonical path.
    Local(PathBuf),
    /// `s3://bucket/prefix`: every object under the prefix.
    S3 { bucket: String, prefix: String },
    /// `hf://org/repo`, at a branch, tag or commit.
    Hf { repo: String, revision: String },
    /// `https://…/manifest.json` (a moat manifest) or one file's URL.
    Https { url: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "source {0:?}: unknown scheme (supported: file://DIR, s3://BUCKET/PREFIX, hf://ORG/REPO, https://URL)"
    )]
    Unsupported(String),
    #[error("source {url:?}: {message}")]
    Malformed { url: String, message: String },
    #[error("source {url:?}: {path}: {source}")]
    Io {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("source {url:?}: {path} is not a folder")]
    NotAFolder { url: String, path: PathBuf },
    #[error("source {0:?}: only hf:// sources have revisions; drop --revision")]
    RevisionNotSupported(String),
    /// The source, its policy or its credentials say no (exit 1): the
    /// subject (URL, file), a rule and why.
    #[error("{subject}: {rule}: {message}")]
    Refused {
        subject: String,
        rule: String,
        message: String,
    },
    /// The source could not be reached or answered nonsense (exit 2).
    #[error("source {url}: {message}")]
    Remote { url: String, message: String },
}

impl SourceError {
    pub fn refused(subject: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        SourceError::Refused {
            subject: subject.into(),
            rule: rule.to_owned(),
            message: message.into(),
        }
    }
}

impl Source {
    pub fn parse(url: &str, revision: Option<&str>) -> Result<Self, SourceError> {
        let malformed = |message: &str| SourceError::Malformed {
            url: url.to_owned(),
            message: message.to_owned(),
        };
        if url.contains('\0') || url.chars().any(char::is_control) {
            return Err(malformed("contains control characters"));
        }
        if let Some(rest) = url.strip_prefix("hf://") {
            let mut parts = rest.trim_end_matches('/').split('/');
            let (Some(org), Some(repo), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(malformed("expected hf://ORG/REPO"));
            };
            for part in [org, repo] {
                if !valid_hf_name(part) {
                    return Err(malformed(&format!(
                        "{part:?} is not a Hub name (letters, digits, - _ . only)"
                    )));
                }
            }
            let revision = revision.unwrap_or("main");
            if revision.is_empty() || revision.contains("..") || revision.chars().any(|c| c.is_whitespace()) {
                return Err(malformed(&format!(
                    "--revision {revision:?} is not a branch, tag or commit"
                )));
            }
            return Ok(Source::Hf {
                repo: format!("{org}/{repo}"),
                revision: revision.to_owned(),
            });
        }
        if revision.is_some() {
            return Err(SourceError::RevisionNotSupported(url.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(malformed(&format!("{bucket:?} is not an S3 bucket name")));
            }
            if prefix.split('/').any(|p| p == "..") {
                return Err(malformed("the key prefix contains .."));
            }
            return Ok(Source::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if url.starts_with("https://") || url.starts_with("http://") {
            let uri: ureq::http::Uri = url.parse().map_err(|_| malformed("not a URL"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(malformed("the URL has no host"));
            }
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                return Err(malformed(
                    "credentials in the URL are refused (they would end up in the lock and logs)",
                ));
            }
            return Ok(Source::Https { url: url.to_owned() });
        }
        let Some(rest) = url.strip_prefix("file://") else {
            return Err(SourceError::Unsupported(url.to_owned()));
        };
        if rest.is_empty() {
            return Err(malformed(
                "expected file:///absolute/path or file://relative/path",
            ));
        }
        let raw = PathBuf::from(rest);
        let path = std::fs::canonicalize(&raw).map_err(|source| SourceError::Io {
            url: url.to_owned(),
            path: raw.clone(),
            source,
        })?;
        if !path.is_dir() {
            return Err(SourceError::NotAFolder {
                url: url.to_owned(),
                path,
            });
        }
        Ok(Source::Local(path))
    }

    /// The canonical URL recorded in the lock (no revision: that has its
    /// own field).
    pub fn url(&self) -> String {
        match self {
            Source::Local(p) => format!("file://{}", p.display()),
            Source::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Source::Hf { repo, .. } => format!("hf://{repo}"),
            Source::Https { url } => url.clone(),
        }
    }
}

fn valid_hf_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 96
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn valid_bucket(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// How the process environment is read: injected, so tests pass a map and
/// the CLI passes `std::env::var`.
#[derive(Clone)]
pub struct Env(Arc<EnvFn>);

type EnvFn = dyn Fn(&str) -> Option<String> + Send + Sync;

impl Env {
    pub fn new(f: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The real process environment.
    pub fn process() -> Self {
        Self::new(|k| std::env::var(k).ok())
    }

    pub fn from_map(map: BTreeMap<String, String>) -> Self {
        Self::new(move |k| map.get(k).cloned())
    }

    /// The value of `key`, `None` when unset or blank.
    pub fn get(&self, key: &str) -> Option<String> {
        (self.0)(key).filter(|v| !v.trim().is_empty())
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets: never printed.
        f.write_str("Env(..)")
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::process()
    }
}

/// One file as a remote lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Model-relative path as the source names it (untrusted until checked).
    pub path: String,
    /// Size the source promises, when it gives one.
    pub size: Option<u64>,
    /// SHA-256 (lower-case hex) the source promises (Hub LFS oid, manifest).
    pub sha256: Option<String>,
    /// What the remote needs to fetch it (S3 key, URL).
    pub locator: String,
}

/// A remote at one immutable revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Hub commit sha; `s3-sha256:…` over (key, size, ETag, VersionId) of
    /// every object; `manifest-sha256:…` of a manifest; for a single file
    /// `url-sha256:…` of the URL until its content is known.
    pub revision: String,
    pub files: Vec<RemoteFile>,
}

/// A file opened at an offset.
pub struct Opened {
    pub reader: Box<dyn Read + Send>,
    /// The offset the server actually starts at: the requested one, or 0
    /// when it ignored the range.
    pub start: u64,
    /// Full size of the file when the server said (Content-Length /
    /// Content-Range).
    pub total: Option<u64>,
}

/// Why opening (or reading) a file failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Worth another try (connection error, 5xx, 429, truncation).
    Retry(String),
    /// The source says the file is not there (404).
    NotFound(String),
    /// A refusal (policy, credentials, gated repo): exit 1, never retried.
    Refused { rule: String, message: String },
    /// Anything else: exit 2, never retried.
    Fatal(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Retry(m) | FetchError::NotFound(m) | FetchError::Fatal(m) => f.write_str(m),
            FetchError::Refused { rule, message } => write!(f, "{rule}: {message}"),
        }
    }
}

/// A remote source: list once, then open files (in parallel, at offsets).
pub trait Remote: Send + Sync {
    fn list(&self) -> Result<Listing, SourceError>;
    fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, FetchError>;
}

/// Percent-encode one path segment (RFC 3986 unreserved characters kept),
/// as S3's SigV4 canonical URI and the Hub's URLs want.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encode a `/`-separated path, keeping the slashes.
pub fn encode_path(p: &str) -> String {
    p.split('/').map(encode_segment).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step must abort")]
    use super::*;

    #[test]
    fn parses_remote_schemes() {
        assert_eq!(
            Source::parse("s3://models/r1/distill", None).unwrap(),
            Source::S3 {
                bucket: "models".into(),
                prefix: "r1/distill".into()
            }
        );
        assert_eq!(
            Source::parse("hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", Some("v1")).unwrap(),
            Source::Hf {
                repo: "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B".into(),
                revision: "v1".into()
            }
        );
        assert!(matches!(
            Source::parse("https://h.example/m/manifest.json", None).unwrap(),
            Source::Https { .. }
        ));
        for bad in [
            "hf://a",
            "hf://a/b/c",
            "hf://../b",
            "s3://A_B/x",
            "s3://bucket/../x",
            "https://user:pw@h.example/x",
            "ftp://x",
            "https://",
        ] {
            assert!(Source::parse(bad, None).is_err(), "{bad}");
        }
        assert!(matches!(
            Source::parse("s3://bucket/x", Some("v1")),
            Err(SourceError::RevisionNotSupported(_))
        ));
    }

    #[test]
    fn encodes_paths() {
        assert_eq!(encode_path("a b/c+d/é.bin"), "a%20b/c%2Bd/%C3%A9.bin");
        assert_eq!(encode_segment("x/y"), "x%2Fy");
    }
}
