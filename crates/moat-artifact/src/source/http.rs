//! The one HTTP client remote sources use. Redirects are followed here, by
//! hand, never by ureq, so that every hop is checked against the
//! `[sources]` policy (host, scheme, resolved address) and credentials go
//! only where they belong: a bearer token is sent to the one host it was
//! issued for and dropped on any hop to another host (the Hub's CDN never
//! sees `HF_TOKEN`). Connections go through [`PinnedResolver`], so the
//! address checked is the address connected to. No proxy from the
//! environment is used: a proxy would make the resolver's check moot.

use super::policy::{POLICY_ERROR_TAG, PinnedResolver, PolicyRefusal, Scheme, SourcePolicy};
use super::{FetchError, Opened};
use std::sync::Arc;
use std::time::Duration;

/// Redirect hops followed before giving up (browsers use ~20; the Hub uses 1).
const MAX_REDIRECTS: usize = 8;

#[derive(Debug, Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
    policy: Arc<SourcePolicy>,
    scheme: Scheme,
}

/// A response after redirects.
pub struct Response {
    pub status: u16,
    /// The URL that answered (after redirects).
    pub url: String,
    pub headers: ureq::http::HeaderMap,
    pub body: ureq::Body,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as bytes, at most `limit` of them (listings, manifests).
    pub fn read_limited(self, limit: u64) -> Result<Vec<u8>, HttpError> {
        self.body
            .into_with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| HttpError::Transport(format!("{}: reading the response: {e}", self.url)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The policy refused a hop: never retried, exit 1.
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    /// Network trouble: connection refused or reset, timeout, TLS.
    #[error("{0}")]
    Transport(String),
    /// A broken redirect chain.
    #[error("{0}")]
    Redirect(String),
}

/// Authority (`host[:port]`) a credential is scoped to, and the header
/// value to send there.
#[derive(Clone)]
pub struct ScopedAuth {
    pub origin: String,
    pub header: String,
}

impl std::fmt::Debug for ScopedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScopedAuth({}, <redacted>)", self.origin)
    }
}

impl HttpClient {
    pub fn new(policy: Arc<SourcePolicy>, scheme: Scheme) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_resolve(Some(Duration::from_secs(10)))
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("moat/", env!("CARGO_PKG_VERSION")))
            .build();
        let resolver = PinnedResolver {
            policy: policy.clone(),
            scheme,
        };
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new(),
            resolver,
        );
        Self {
            agent,
            policy,
            scheme,
        }
    }

    pub fn policy(&self) -> &SourcePolicy {
        &self.policy
    }

    /// GET `url`, following redirects (each hop policy-checked). `auth` is
    /// sent only on hops to its origin. `body_timeout` bounds reading the
    /// whole body.
    pub fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        auth: Option<&ScopedAuth>,
        body_timeout: Duration,
    ) -> Result<Response, HttpError> {
        let mut current = url.to_owned();
        for _hop in 0..=MAX_REDIRECTS {
            self.policy.check_hop(self.scheme, &current)?;
            let mut req = self
                .agent
                .get(&current)
                .config()
                .timeout_recv_body(Some(body_timeout))
                .build();
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(a) = auth
                && origin(&current).is_some_and(|o| o == a.origin)
            {
                req = req.header("authorization", a.header.as_str());
            }
            let resp = req.call().map_err(|e| classify(&current, e))?;
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let location = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        HttpError::Redirect(format!("{current}: HTTP {status} without a Location"))
                    })?;
                current = join_url(&current, location)
                    .ok_or_else(|| HttpError::Redirect(format!("{current}: bad Location {location:?}")))?;
                continue;
            }
            let (parts, body) = resp.into_parts();
            return Ok(Response {
                status,
                url: current,
                headers: parts.headers,
                body,
            });
        }
        Err(HttpError::Redirect(format!(
            "{url}: more than {MAX_REDIRECTS} redirects"
        )))
    }
}

/// A 200 or 206 answer to a (possibly ranged) GET as an [`Opened`] body.
/// A 206 must start exactly at `offset` (`Content-Range: bytes OFFSET-…`);
/// a 200 means the server ignored the range and sends from byte 0.
pub fn into_opened(resp: Response, offset: u64) -> Result<Opened, FetchError> {
    let url = resp.url.clone();
    let length = resp
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (start, total) = match resp.status {
        200 => (0, length),
        206 => {
            let range = resp.header("content-range").unwrap_or("");
            let parsed = range.strip_prefix("bytes ").and_then(|r| {
                let (span, total) = r.split_once('/')?;
                let (a, _b) = span.split_once('-')?;
                Some((a.trim().parse::<u64>().ok()?, total.trim().parse::<u64>().ok()))
            });
            match parsed {
                Some((a, total)) if a == offset => (a, total),
                _ => {
                    return Err(FetchError::Retry(format!(
                        "{url}: HTTP 206 with Content-Range {range:?} does not start at byte {offset}"
                    )));
                }
            }
        }
        s => return Err(FetchError::Fatal(format!("{url}: unexpected HTTP {s}"))),
    };
    Ok(Opened {
        reader: Box::new(resp.body.into_reader()),
        start,
        total,
    })
}

/// Map a transport/policy failure of a file request.
pub fn fetch_error(e: HttpError) -> FetchError {
    match e {
        HttpError::Policy(r) => FetchError::Refused {
            rule: "source.policy".into(),
            message: r.0,
        },
        HttpError::Transport(m) => FetchError::Retry(m),
        HttpError::Redirect(m) => FetchError::Fatal(m),
    }
}

/// Body timeout for a file of `size` bytes: generous (a floor of 1 MiB/s
/// plus two minutes), but bounded so a stalled server cannot hang a pull.
pub fn body_timeout(size: Option<u64>) -> Duration {
    Duration::from_secs(120 + size.unwrap_or(8 << 30) / (1 << 20))
}

fn classify(url: &str, e: ureq::Error) -> HttpError {
    if let ureq::Error::Io(io) = &e
        && io.kind() == std::io::ErrorKind::PermissionDenied
    {
        let text = io.to_string();
        if let Some(rest) = text.strip_prefix(POLICY_ERROR_TAG) {
            return HttpError::Policy(PolicyRefusal(rest.trim().to_owned()));
        }
    }
    HttpError::Transport(format!("{url}: {e}"))
}

/// `scheme://host[:port]` of a URL (lower-cased host), the unit a
/// credential is scoped to.
pub fn origin(url: &str) -> Option<String> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let host = uri.host()?.to_ascii_lowercase();
    let default = if scheme == "https" { 443 } else { 80 };
    Some(match uri.port_u16() {
        Some(p) if p != default => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Resolve `rel` (absolute URL, `//host/…`, `/path` or `path`) against
/// `base`, as a browser would for a Location header or a manifest entry.
pub fn join_url(base: &str, rel: &str) -> Option<String> {
    if rel.starts_with("https://") || rel.starts_with("http://") {
        return Some(rel.to_owned());
    }
    let uri: ureq::http::Uri = base.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?.as_str();
    if let Some(rest) = rel.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if rel.starts_with('/') {
        return Some(format!("{scheme}://{authority}{rel}"));
    }
    if rel.contains("://") {
        return None; // another scheme: never followed
    }
    let path = uri.path();
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    Some(format!("{scheme}://{authority}{dir}/{rel}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step must abort")]
    use super::*;

    #[test]
    fn joins_urls() {
        let b = "https://h.example/a/b/manifest.json?x=1";
        assert_eq!(join_url(b, "w.bin").unwrap(), "https://h.example/a/b/w.bin");
        assert_eq!(join_url(b, "/w.bin").unwrap(), "https://h.example/w.bin");
        assert_eq!(join_url(b, "//cdn.example/w").unwrap(), "https://cdn.example/w");
        assert_eq!(join_url(b, "http://o.example/w").unwrap(), "http://o.example/w");
        assert!(join_url(b, "file:///etc/passwd").is_none());
    }

    #[test]
    fn origins() {
        assert_eq!(origin("https://HF.co/x").unwrap(), "https://hf.co");
        assert_eq!(origin("https://hf.co:443/x").unwrap(), "https://hf.co");
        assert_eq!(
            origin("http://127.0.0.1:8080/x").unwrap(),
            "http://127.0.0.1:8080"
        );
    }
}
