//! `hf://org/repo`: the Hugging Face Hub HTTP API, as documented.
//!
//! 1. `GET /api/models/{repo}/revision/{rev}` resolves a branch, tag or
//!    commit to the commit `sha` (the immutable revision the lock records);
//! 2. `GET /api/models/{repo}/tree/{sha}?recursive=true` lists files with
//!    `size` and, for LFS files, `lfs.oid` (the SHA-256 every download is
//!    checked against); pages follow the `Link: <…>; rel="next"` header;
//! 3. `GET /{repo}/resolve/{sha}/{path}` downloads, usually through a 302 to
//!    the CDN. Redirects are followed by `http.rs`, hop by hop under the
//!    policy, and `HF_TOKEN` goes only to the Hub's own origin.
//!
//! `HF_ENDPOINT` replaces `https://huggingface.co` (mirrors, tests); such an
//! endpoint must be allowed by a `[[sources.allow]]` rule like any host.

use super::http::{HttpClient, HttpError, ScopedAuth, body_timeout, fetch_error, into_opened, origin};
use super::policy::{Scheme, SourcePolicy};
use super::{Env, FetchError, Listing, Opened, Remote, RemoteFile, SourceError, encode_path, encode_segment};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// API answers (revision info, one tree page) larger than this are refused.
const MAX_API_BODY: u64 = 32 << 20;
const MAX_PAGES: usize = 1000;

#[derive(Debug)]
pub struct HfRemote {
    http: HttpClient,
    endpoint: String,
    repo: String,
    revision: String,
    auth: Option<ScopedAuth>,
}

impl HfRemote {
    pub fn new(
        repo: &str,
        revision: &str,
        env: &Env,
        policy: Arc<SourcePolicy>,
    ) -> Result<Self, SourceError> {
        let endpoint = env
            .get("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
            .trim_end_matches('/')
            .to_owned();
        let subject = format!("hf://{repo}");
        let uri: ureq::http::Uri = endpoint.parse().map_err(|_| SourceError::Remote {
            url: subject.clone(),
            message: format!("HF_ENDPOINT {endpoint:?} is not a URL"),
        })?;
        let host = uri.host().unwrap_or("").to_owned();
        policy
            .check_source(Scheme::Hf, Some(&host), repo)
            .map_err(|r| SourceError::refused(&subject, "source.policy", r.0))?;
        policy
            .check_hop(Scheme::Hf, &endpoint)
            .map_err(|r| SourceError::refused(&subject, "source.policy", r.0))?;
        let auth = env.get("HF_TOKEN").and_then(|t| {
            Some(ScopedAuth {
                origin: origin(&endpoint)?,
                header: format!("Bearer {}", t.trim()),
            })
        });
        Ok(Self {
            http: HttpClient::new(policy, Scheme::Hf),
            endpoint,
            repo: repo.to_owned(),
            revision: revision.to_owned(),
            auth,
        })
    }

    fn subject(&self) -> String {
        format!("hf://{}", self.repo)
    }

    fn gated(&self, status: u16) -> SourceError {
        let token = if self.auth.is_some() {
            "HF_TOKEN is set but does not grant access; accept the model's licence on the Hub with that account"
        } else {
            "set HF_TOKEN to a token of an account with access (and accept the licence on the Hub)"
        };
        SourceError::refused(
            self.subject(),
            "source.hf-auth",
            format!("HTTP {status}: gated or private repo: {token}"),
        )
    }

    /// GET an API URL and parse its JSON; returns the `Link` next page too.
    fn api(&self, url: &str) -> Result<(Value, Option<String>), SourceError> {
        let subject = self.subject();
        let resp = self
            .http
            .get(
                url,
                &[("accept", "application/json")],
                self.auth.as_ref(),
                Duration::from_secs(120),
            )
            .map_err(|e| match e {
                HttpError::Policy(r) => SourceError::refused(&subject, "source.policy", r.0),
                e => SourceError::Remote {
                    url: subject.clone(),
                    message: e.to_string(),
                },
            })?;
        match resp.status {
            200 => {}
            401 | 403 => return Err(self.gated(resp.status)),
            404 => {
                return Err(SourceError::Remote {
                    url: subject,
                    message: format!(
                        "{url}: HTTP 404: no such repo or revision {:?} (private repos also answer 404 without a token)",
                        self.revision
                    ),
                });
            }
            s => {
                return Err(SourceError::Remote {
                    url: subject,
                    message: format!("{url}: HTTP {s}"),
                });
            }
        }
        let next = resp.header("link").and_then(next_link);
        let answered = resp.url.clone();
        let body = resp.read_limited(MAX_API_BODY).map_err(|e| SourceError::Remote {
            url: subject.clone(),
            message: e.to_string(),
        })?;
        let value = serde_json::from_slice(&body).map_err(|e| SourceError::Remote {
            url: subject,
            message: format!("{answered}: not JSON: {e}"),
        })?;
        let next = next.and_then(|n| super::http::join_url(&answered, &n));
        Ok((value, next))
    }
}

/// The `rel="next"` URL of an RFC 8288 `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim().replace(' ', "").as_str(), "rel=\"next\"" | "rel=next"));
        is_next.then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

fn is_sha(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Remote for HfRemote {
    fn list(&self) -> Result<Listing, SourceError> {
        let subject = self.subject();
        let bad = |m: String| SourceError::Remote {
            url: subject.clone(),
            message: m,
        };
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            self.repo,
            encode_segment(&self.revision)
        );
        let (info, _) = self.api(&url)?;
        let sha = info
            .get("sha")
            .and_then(Value::as_str)
            .filter(|s| is_sha(s, 40))
            .ok_or_else(|| bad(format!("{url}: the answer has no 40-hex commit \"sha\"")))?
            .to_owned();
        if is_sha(&self.revision, 40) && self.revision != sha {
            return Err(bad(format!(
                "asked for commit {} but the Hub answered {sha}",
                self.revision
            )));
        }

        let mut files = Vec::new();
        let mut next = Some(format!(
            "{}/api/models/{}/tree/{sha}?recursive=true",
            self.endpoint, self.repo
        ));
        let mut pages = 0;
        while let Some(page_url) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(bad(format!("more than {MAX_PAGES} tree pages")));
            }
            let (page, link) = self.api(&page_url)?;
            let entries = page
                .as_array()
                .ok_or_else(|| bad(format!("{page_url}: expected a JSON array of tree entries")))?;
            for (i, e) in entries.iter().enumerate() {
                if e.get("type").and_then(Value::as_str) == Some("directory") {
                    continue;
                }
                let path = e
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{page_url}: entry {i} has no path")))?;
                let size = e.get("size").and_then(Value::as_u64);
                let lfs = e.get("lfs");
                let sha256 = match lfs {
                    Some(l) if !l.is_null() => {
                        let oid = l
                            .get("oid")
                            .and_then(Value::as_str)
                            .map(|o| o.trim_start_matches("sha256:"))
                            .filter(|o| is_sha(o, 64))
                            .ok_or_else(|| bad(format!("{path:?}: lfs.oid is not a SHA-256")))?;
                        let lfs_size = l.get("size").and_then(Value::as_u64);
                        if let (Some(a), Some(b)) = (size, lfs_size)
                            && a != b
                        {
                            return Err(bad(format!("{path:?}: size {a} but lfs.size {b}")));
                        }
                        Some(oid.to_owned())
                    }
                    _ => None,
                };
                files.push(RemoteFile {
                    path: path.to_owned(),
                    size: size.or_else(|| lfs.and_then(|l| l.get("size")).and_then(Value::as_u64)),
                    sha256,
                    locator: format!(
                        "{}/{}/resolve/{sha}/{}",
                        self.endpoint,
                        self.repo,
                        encode_path(path)
                    ),
                });
            }
            next = link;
        }
        Ok(Listing { revision: sha, files })
    }

    fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, FetchError> {
        let range = format!("bytes={offset}-");
        let mut headers = vec![];
        if offset > 0 {
            headers.push(("range", range.as_str()));
        }
        let resp = self
            .http
            .get(
                &file.locator,
                &headers,
                self.auth.as_ref(),
                body_timeout(file.size),
            )
            .map_err(fetch_error)?;
        match resp.status {
            200 | 206 => into_opened(resp, offset),
            401 | 403 => Err(FetchError::Refused {
                rule: "source.hf-auth".into(),
                message: format!("{}: {}", resp.url, self.gated(resp.status)),
            }),
            404 => Err(FetchError::NotFound(format!("{}: HTTP 404", resp.url))),
            s if s >= 500 || s == 429 => Err(FetchError::Retry(format!("{}: HTTP {s}", resp.url))),
            s => Err(FetchError::Fatal(format!("{}: HTTP {s}", resp.url))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header() {
        assert_eq!(
            next_link(r#"<https://hf.co/api/models/a/b/tree/x?cursor=abc>; rel="next""#).as_deref(),
            Some("https://hf.co/api/models/a/b/tree/x?cursor=abc")
        );
        assert_eq!(next_link(r#"<https://x>; rel="prev""#), None);
    }
}
