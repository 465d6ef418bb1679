//! `https://…`: either a moat manifest (a URL whose last segment ends in
//! `manifest.json`) listing the files of a model, or one file.
//!
//! Manifest format (JSON, written by whoever publishes the model):
//!
//! ```json
//! {"files": [{"path": "model.safetensors", "size": 123, "sha256": "…",
//!             "url": "weights/model.safetensors"}]}
//! ```
//!
//! `url` is optional (default: `path`) and resolved against the manifest's
//! URL; every file URL and every redirect hop is checked against the
//! policy. `size` and `sha256` are required: a manifest is a promise, and
//! the download is held to it. The revision is the SHA-256 of the manifest
//! bytes. A single file has no listing: its revision is a digest of its URL
//! and its content pins it in the lock.

use super::http::{HttpClient, HttpError, body_timeout, fetch_error, into_opened, join_url};
use super::policy::{Scheme, SourcePolicy};
use super::{FetchError, Listing, Opened, Remote, RemoteFile, SourceError};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

const MAX_MANIFEST: u64 = 16 << 20;

#[derive(Debug)]
pub struct HttpsRemote {
    http: HttpClient,
    url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    files: Vec<ManifestFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    path: String,
    size: u64,
    sha256: String,
    url: Option<String>,
}

/// Does this URL name a manifest (rather than one file)?
pub fn is_manifest_url(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/')
        .next()
        .is_some_and(|last| last.ends_with("manifest.json"))
}

impl HttpsRemote {
    pub fn new(url: &str, policy: Arc<SourcePolicy>) -> Result<Self, SourceError> {
        let uri: ureq::http::Uri = url.parse().map_err(|_| SourceError::Malformed {
            url: url.to_owned(),
            message: "not a URL".into(),
        })?;
        let host = uri.host().unwrap_or("");
        policy
            .check_source(Scheme::Https, Some(host), uri.path())
            .map_err(|r| SourceError::refused(url, "source.policy", r.0))?;
        policy
            .check_hop(Scheme::Https, url)
            .map_err(|r| SourceError::refused(url, "source.policy", r.0))?;
        Ok(Self {
            http: HttpClient::new(policy, Scheme::Https),
            url: url.to_owned(),
        })
    }

    /// The file name a single-file URL is stored under (its last segment).
    fn single_file_name(&self) -> String {
        let path = self.url.split(['?', '#']).next().unwrap_or(&self.url);
        path.rsplit('/').next().unwrap_or("").to_owned()
    }
}

impl Remote for HttpsRemote {
    fn list(&self) -> Result<Listing, SourceError> {
        if !is_manifest_url(&self.url) {
            let name = self.single_file_name();
            return Ok(Listing {
                revision: format!("url-sha256:{}", hex::encode(Sha256::digest(self.url.as_bytes()))),
                files: vec![RemoteFile {
                    path: name,
                    size: None,
                    sha256: None,
                    locator: self.url.clone(),
                }],
            });
        }
        let remote = |message: String| SourceError::Remote {
            url: self.url.clone(),
            message,
        };
        let resp = self
            .http
            .get(&self.url, &[], None, Duration::from_secs(120))
            .map_err(|e| match e {
                HttpError::Policy(r) => SourceError::refused(&self.url, "source.policy", r.0),
                e => remote(e.to_string()),
            })?;
        if resp.status != 200 {
            return Err(remote(format!("manifest: HTTP {}", resp.status)));
        }
        let base = resp.url.clone();
        let bytes = resp
            .read_limited(MAX_MANIFEST)
            .map_err(|e| remote(e.to_string()))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| remote(format!("manifest is not valid: {e}")))?;
        let mut files = Vec::with_capacity(manifest.files.len());
        for (i, f) in manifest.files.into_iter().enumerate() {
            let sha = f.sha256.trim_start_matches("sha256:").to_ascii_lowercase();
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(remote(format!("manifest files[{i}].sha256: not a SHA-256")));
            }
            let rel = f.url.as_deref().unwrap_or(&f.path);
            let locator = join_url(&base, rel)
                .ok_or_else(|| remote(format!("manifest files[{i}].url: {rel:?} is not an http(s) URL")))?;
            files.push(RemoteFile {
                path: f.path,
                size: Some(f.size),
                sha256: Some(sha),
                locator,
            });
        }
        Ok(Listing {
            revision: format!("manifest-sha256:{}", hex::encode(Sha256::digest(&bytes))),
            files,
        })
    }

    fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, FetchError> {
        let range = format!("bytes={offset}-");
        let mut headers = vec![];
        if offset > 0 {
            headers.push(("range", range.as_str()));
        }
        let resp = self
            .http
            .get(&file.locator, &headers, None, body_timeout(file.size))
            .map_err(fetch_error)?;
        match resp.status {
            200 | 206 => into_opened(resp, offset),
            401 | 403 => Err(FetchError::Refused {
                rule: "source.https-auth".into(),
                message: format!("{}: HTTP {}", resp.url, resp.status),
            }),
            404 | 410 => Err(FetchError::NotFound(format!(
                "{}: HTTP {}",
                resp.url, resp.status
            ))),
            s if s >= 500 || s == 429 => Err(FetchError::Retry(format!("{}: HTTP {s}", resp.url))),
            s => Err(FetchError::Fatal(format!("{}: HTTP {s}", resp.url))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_urls() {
        assert!(is_manifest_url("https://h/a/manifest.json"));
        assert!(is_manifest_url("https://h/a/r1.manifest.json?sig=1"));
        assert!(!is_manifest_url("https://h/a/model.safetensors"));
        assert!(!is_manifest_url("https://h/manifest.json/x"));
    }
}
