//! What a pool of OpenAI-compatible upstreams is built from. The server's
//! config validation produces these (naming its own keys in errors); this
//! module owns the rules that are about upstreams themselves: a URL is plain
//! `http://host[:port]/path` from the operator's config (never from a
//! client, never with credentials in it), and an API key is read from a file
//! into a type that cannot be printed.

use hyper::Uri;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// An upstream's bearer token. `Debug` never shows it and the bytes are
/// wiped on drop; the only way out is the `Authorization` header value.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// Read a key file: the whole file, surrounding whitespace trimmed.
    /// Errors name the file, never its content.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        );
        let key = text.trim();
        if key.is_empty() {
            return Err(format!("{} is empty", path.display()));
        }
        if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(format!(
                "{} must hold one token of visible ASCII characters",
                path.display()
            ));
        }
        Ok(Self(Zeroizing::new(key.to_owned())))
    }

    pub(crate) fn header_value(&self) -> Option<hyper::header::HeaderValue> {
        let mut v = hyper::header::HeaderValue::try_from(format!("Bearer {}", self.0.as_str())).ok()?;
        // Keeps the value out of hyper's own debug output.
        v.set_sensitive(true);
        Some(v)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The parts of an upstream base URL we keep: `http://authority` and the
/// path prefix without a trailing slash (`/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `https`: the connection is TLS, verified against [`UpstreamConfig::tls`].
    pub(crate) tls: bool,
    pub(crate) authority: String,
    pub(crate) path: String,
}

impl BaseUrl {
    /// Accept `http(s)://host[:port][/path]` only: no credentials, query
    /// or fragment (they would leak into logs and metric labels), no other
    /// scheme.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text.parse().map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{text:?}: use an http:// or https:// URL like http://127.0.0.1:8000/v1"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?} has no host"))?
            .as_str()
            .to_owned();
        if authority.contains('@') {
            return Err(format!(
                "{text:?}: credentials in the URL are refused; use api_key_file"
            ));
        }
        if uri.query().is_some() || text.contains('#') {
            return Err(format!("{text:?}: a query or fragment is not allowed"));
        }
        let path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self { tls, authority, path })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The absolute URL of `path` on this upstream (`path` starts with `/`).
    pub(crate) fn join(&self, path: &str) -> Result<Uri, String> {
        format!("{}://{}{path}", self.scheme(), self.authority)
            .parse()
            .map_err(|e| format!("bad upstream path {path:?}: {e}"))
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.authority, self.path)
    }
}

/// One replica: where it is, what it calls the model, how to reach it.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: BaseUrl,
    /// The model name sent upstream (`model` in the request body).
    pub model: String,
    pub api_key: Option<ApiKey>,
    /// Absolute path probed by health checks (`/v1/models`, `/health`).
    pub health_path: String,
    /// TCP connect.
    pub connect_timeout: Duration,
    /// From sending the request to the response head (for a non-streamed
    /// request: to the whole answer).
    pub response_timeout: Duration,
    /// Longest silence between two pieces of a streamed body.
    pub read_timeout: Duration,
    /// TLS settings of an `https` upstream (`None`: Mozilla's roots, no
    /// client certificate).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl UpstreamConfig {
    /// Defaults for everything but the URL and model.
    pub fn new(url: BaseUrl, model: String) -> Self {
        let health_path = format!("{}/models", url.path);
        Self {
            url,
            model,
            api_key: None,
            health_path,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(300),
            read_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// A model served by a pool of replicas.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The model's name here (what clients ask for).
    pub name: String,
    pub upstreams: Vec<UpstreamConfig>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Consecutive failed checks that take a replica out.
    pub unhealthy_threshold: u32,
    /// Consecutive passed checks that bring it back.
    pub healthy_threshold: u32,
    /// First cooldown once the breaker opens; doubles with each further
    /// failure up to `max_cooldown`. A 429's `Retry-After` wins when given.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    /// Failed requests in a row (5xx, timeouts, broken bodies, refused
    /// credentials) before the cooldown starts; a refused connection and a
    /// 429 start it at once.
    pub failure_threshold: u32,
    /// Most replicas one request tries (each at most once).
    pub max_attempts: usize,
}

impl PoolConfig {
    pub fn new(name: String, upstreams: Vec<UpstreamConfig>) -> Self {
        Self {
            name,
            upstreams,
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(2),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(60),
            failure_threshold: 3,
            max_attempts: 3,
        }
    }
}

/// The TLS client settings of an https upstream: trust only `ca_file`'s
/// certificates when given (a private CA: the usual case for an inference
/// cluster), else Mozilla's roots; present `client_cert` when the upstream
/// wants mutual TLS. TLS 1.2 and 1.3, rustls defaults otherwise.
pub fn tls_client_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no PEM certificate in it", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: certificate refused: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!("{}: no PEM certificate in it", cert.display()));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
    };
    Ok(Arc::new(config))
}
