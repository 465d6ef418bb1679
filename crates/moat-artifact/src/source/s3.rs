//! `s3://bucket/prefix`: ListObjectsV2 (paginated) and ranged GetObject,
//! path-style (`ENDPOINT/bucket/key`, which every S3-compatible store
//! speaks), SigV4-signed with `crypto::sigv4`. SSE-KMS objects need nothing
//! more: S3 decrypts on GET for a caller allowed to use the key.
//!
//! The revision of a prefix is a digest of what the listing says about
//! every object (key, size, ETag): any upload under the prefix changes it.
//! S3 does not give a SHA-256 in listings, so S3 files are pinned by size
//! here and by hash through the lock (`--locked`).

use super::aws::{AwsS3Config, xml_blocks, xml_tag};
use super::http::{HttpClient, HttpError, Response, body_timeout, fetch_error, into_opened};
use super::policy::{Scheme, SourcePolicy};
use super::{Env, FetchError, Listing, Opened, Remote, RemoteFile, SourceError, encode_path, encode_segment};
use crate::crypto::sigv4;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Listing pages are ~1000 keys; a page beyond this is refused.
const MAX_LIST_PAGE: u64 = 16 << 20;
/// Objects under one prefix; a model has tens of files.
const MAX_OBJECTS: usize = 100_000;

#[derive(Debug)]
pub struct S3Remote {
    http: HttpClient,
    cfg: AwsS3Config,
    bucket: String,
    /// Key prefix ending in `/` (folder semantics), or empty.
    prefix: String,
    host_header: String,
    base: String,
}

impl S3Remote {
    pub fn new(
        bucket: &str,
        prefix: &str,
        env: &Env,
        policy: Arc<SourcePolicy>,
    ) -> Result<Self, SourceError> {
        let cfg = AwsS3Config::from_env(env)?;
        if cfg.credentials.is_none() && env.get("MOAT_S3_ANONYMOUS").as_deref() != Some("1") {
            // Going anonymous silently would turn a broken credential setup
            // into confusing 403s (or, worse, a pull from a public look-alike).
            return Err(SourceError::refused(
                format!("s3://{bucket}/{prefix}"),
                "source.s3-auth",
                "no AWS credentials found (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE in the \
                 shared credentials files, or AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN); for a public \
                 bucket set MOAT_S3_ANONYMOUS=1",
            ));
        }
        let bad = |m: String| SourceError::Remote {
            url: cfg.endpoint.clone(),
            message: m,
        };
        let uri: ureq::http::Uri = cfg
            .endpoint
            .parse()
            .map_err(|_| bad("the S3 endpoint is not a URL".into()))?;
        let host = uri
            .host()
            .ok_or_else(|| bad("the S3 endpoint has no host".into()))?;
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("the S3 endpoint must have no path".into()));
        }
        let scheme = uri.scheme_str().unwrap_or("https");
        let default_port = if scheme == "https" { 443 } else { 80 };
        let host_header = match uri.port_u16() {
            Some(p) if p != default_port => format!("{host}:{p}"),
            _ => host.to_owned(),
        };
        let prefix = match prefix.trim_start_matches('/') {
            "" => String::new(),
            p if p.ends_with('/') => p.to_owned(),
            p => format!("{p}/"),
        };
        // The source (bucket/prefix via this endpoint) must be allowed, and
        // the endpoint reachable under the policy (checked again per hop).
        let key = format!("{bucket}/{prefix}");
        policy
            .check_source(Scheme::S3, Some(host), key.trim_end_matches('/'))
            .map_err(|r| SourceError::refused(format!("s3://{key}"), "source.policy", r.0))?;
        let base = format!("{scheme}://{host_header}");
        policy
            .check_hop(Scheme::S3, &base)
            .map_err(|r| SourceError::refused(format!("s3://{key}"), "source.policy", r.0))?;
        Ok(Self {
            http: HttpClient::new(policy, Scheme::S3),
            cfg,
            bucket: bucket.to_owned(),
            prefix,
            host_header,
            base,
        })
    }

    /// Sign and send `GET /bucket[/key]?query`.
    fn get(
        &self,
        encoded_path: &str,
        query: &str,
        range: Option<&str>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let amz_date = sigv4::amz_date(now);
        let mut headers: Vec<(&str, &str)> = vec![
            ("host", self.host_header.as_str()),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", amz_date.as_str()),
        ];
        if let Some(r) = range {
            headers.push(("range", r));
        }
        let authorization;
        if let Some(c) = &self.cfg.credentials {
            if let Some(t) = &c.session_token {
                headers.push(("x-amz-security-token", t.as_str()));
            }
            authorization = sigv4::authorization_with(
                &c.access_key_id,
                &c.secret_access_key,
                &sigv4::Request {
                    method: "GET",
                    path: encoded_path,
                    headers: &headers,
                    payload: b"",
                    amz_date: &amz_date,
                    region: &self.cfg.region,
                    service: "s3",
                },
                query,
                EMPTY_SHA256,
            );
            headers.push(("authorization", authorization.as_str()));
        }
        // `host` is set by the HTTP client from the URL (same value).
        headers.retain(|(k, _)| *k != "host");
        let url = if query.is_empty() {
            format!("{}{encoded_path}", self.base)
        } else {
            format!("{}{encoded_path}?{query}", self.base)
        };
        self.http.get(&url, &headers, None, timeout)
    }

    fn subject(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// An S3 error answer as a clear message: `Code: Message`.
    fn describe_error(resp: Response) -> (u16, String, String) {
        let status = resp.status;
        let body = resp.read_limited(1 << 20).unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let code = xml_tag(&text, "Code").unwrap_or_else(|| format!("HTTP {status}"));
        let message = xml_tag(&text, "Message").unwrap_or_default();
        (status, code, message)
    }

    fn auth_hint(&self) -> String {
        format!("credentials: {}", self.cfg.credential_source)
    }
}

/// S3 error codes that mean "these credentials may not do this": a
/// refusal (exit 1), never retried.
fn is_auth_error(status: u16, code: &str) -> bool {
    status == 401
        || status == 403
        || matches!(
            code,
            "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "InvalidToken"
                | "TokenRefreshRequired"
                | "AllAccessDisabled"
        )
}

impl Remote for S3Remote {
    fn list(&self) -> Result<Listing, SourceError> {
        let subject = self.subject(&self.prefix);
        let mut files = Vec::new();
        let mut revision = Sha256::new();
        let mut token: Option<String> = None;
        loop {
            // Canonical query: keys sorted, values URI-encoded (SigV4 needs
            // exactly what is sent).
            let mut q = Vec::new();
            if let Some(t) = &token {
                q.push(format!("continuation-token={}", encode_segment(t)));
            }
            q.push("list-type=2".to_owned());
            q.push(format!("prefix={}", encode_segment(&self.prefix)));
            let query = q.join("&");
            let path = format!("/{}", encode_segment(&self.bucket));
            let resp = self
                .get(&path, &query, None, Duration::from_secs(120))
                .map_err(|e| match e {
                    HttpError::Policy(r) => SourceError::refused(&subject, "source.policy", r.0),
                    e => SourceError::Remote {
                        url: subject.clone(),
                        message: format!("ListObjectsV2: {e}"),
                    },
                })?;
            if resp.status != 200 {
                let (status, code, message) = Self::describe_error(resp);
                if is_auth_error(status, &code) {
                    return Err(SourceError::refused(
                        &subject,
                        "source.s3-auth",
                        format!(
                            "S3 refused ListObjectsV2: {code}: {message} ({})",
                            self.auth_hint()
                        ),
                    ));
                }
                return Err(SourceError::Remote {
                    url: subject,
                    message: format!("ListObjectsV2: HTTP {status} {code}: {message}"),
                });
            }
            let body = resp
                .read_limited(MAX_LIST_PAGE)
                .map_err(|e| SourceError::Remote {
                    url: subject.clone(),
                    message: e.to_string(),
                })?;
            let text = String::from_utf8_lossy(&body);
            for obj in xml_blocks(&text, "Contents") {
                let key = xml_tag(obj, "Key").unwrap_or_default();
                let size: u64 = xml_tag(obj, "Size")
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| SourceError::Remote {
                        url: subject.clone(),
                        message: format!("ListObjectsV2: object {key:?} has no Size"),
                    })?;
                let etag = xml_tag(obj, "ETag").unwrap_or_default();
                let version = xml_tag(obj, "VersionId").unwrap_or_default();
                for part in [key.as_str(), &size.to_string(), &etag, &version] {
                    revision.update(part.as_bytes());
                    revision.update([0]);
                }
                revision.update(b"\n");
                // Folder markers (`dir/`, empty) are not files.
                if key.ends_with('/') && size == 0 {
                    continue;
                }
                let Some(rel) = key.strip_prefix(&self.prefix) else {
                    return Err(SourceError::Remote {
                        url: subject,
                        message: format!("ListObjectsV2 returned {key:?}, outside the prefix"),
                    });
                };
                files.push(RemoteFile {
                    path: rel.to_owned(),
                    size: Some(size),
                    sha256: None,
                    locator: key.clone(),
                });
                if files.len() > MAX_OBJECTS {
                    return Err(SourceError::Remote {
                        url: subject,
                        message: format!("more than {MAX_OBJECTS} objects under the prefix"),
                    });
                }
            }
            let truncated = xml_tag(&text, "IsTruncated").is_some_and(|t| t.trim() == "true");
            token = xml_tag(&text, "NextContinuationToken");
            if !truncated {
                break;
            }
            if token.is_none() {
                return Err(SourceError::Remote {
                    url: subject,
                    message: "ListObjectsV2: truncated without a NextContinuationToken".into(),
                });
            }
        }
        Ok(Listing {
            revision: format!("s3-sha256:{}", hex::encode(revision.finalize())),
            files,
        })
    }

    fn open(&self, file: &RemoteFile, offset: u64) -> Result<Opened, FetchError> {
        let path = format!("/{}/{}", encode_segment(&self.bucket), encode_path(&file.locator));
        let range = format!("bytes={offset}-");
        let resp = self
            .get(
                &path,
                "",
                (offset > 0).then_some(range.as_str()),
                body_timeout(file.size),
            )
            .map_err(fetch_error)?;
        match resp.status {
            200 | 206 => into_opened(resp, offset),
            _ => {
                let (status, code, message) = Self::describe_error(resp);
                let what = self.subject(&file.locator);
                if is_auth_error(status, &code) {
                    Err(FetchError::Refused {
                        rule: "source.s3-auth".into(),
                        message: format!(
                            "S3 refused GetObject {what}: {code}: {message} ({})",
                            self.auth_hint()
                        ),
                    })
                } else if status == 404 {
                    Err(FetchError::NotFound(format!("{what}: {code}: {message}")))
                } else if status >= 500 || status == 429 || code == "SlowDown" {
                    Err(FetchError::Retry(format!(
                        "{what}: HTTP {status} {code}: {message}"
                    )))
                } else {
                    Err(FetchError::Fatal(format!(
                        "{what}: HTTP {status} {code}: {message}"
                    )))
                }
            }
        }
    }
}
