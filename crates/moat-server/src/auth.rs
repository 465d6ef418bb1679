//! JWT issuers and client-certificate identities, as the running server
//! holds them: keys loaded from JWKS files, URLs or the issuer's OpenID
//! discovery document (the I/O that `moat_guard::jwt` deliberately does not
//! do), refreshed when a file changes, periodically for URLs, and when a
//! token names an unknown `kid`; and the mapping from a verified token or
//! certificate to a [`Principal`].
//!
//! An unknown `kid` triggers at most one fetch per issuer every
//! `jwks_min_refresh_interval`: otherwise a stream of tokens with random key
//! ids would make moat hammer the issuer (or re-read the file) per request.
//!
//! Where keys are fetched from is decided by the configuration only: the
//! issuer URL (discovery) or `jwks_url`, never a URL inside a token. Every
//! fetch goes through [`IssuerResolver`], which refuses loopback, private,
//! link-local and metadata addresses (unless the issuer is marked
//! `allow_loopback`) and is the resolver the connection really uses, so a
//! DNS answer cannot change between the check and the connect. No
//! redirects, no proxy from the environment, bounded size and time.

use crate::config::JwtIssuerConfig;
use moat_guard::jwt::{IssuerPolicy, Jwk, Jwks, JwtError, Key, Verifier};
use moat_guard::{Principal, PrincipalKind, Role};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Largest JWKS (or discovery) document read from a file or URL.
const MAX_JWKS_BYTES: u64 = 1 << 20;

type Stamp = Option<(SystemTime, u64, u64)>;

fn file_stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Why a bearer token did not yield a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// 401: the token itself is bad.
    Invalid(JwtError),
    /// 403: the token is valid but grants nothing here.
    NoGrant { reason: &'static str, message: String },
}

struct IssuerState {
    config: JwtIssuerConfig,
    file_stamp: Mutex<Stamp>,
    /// When keys were last fetched (or a fetch was last started), for the
    /// periodic refresh.
    last_fetch: Mutex<Option<Instant>>,
    /// When an unknown `kid` last caused a fetch: the rate limit of those.
    last_kid_refresh: Mutex<Option<Instant>>,
}

/// The configured issuers and their current keys.
pub struct JwtAuth {
    issuers: Vec<IssuerState>,
    verifier: RwLock<Arc<Verifier>>,
}

impl JwtAuth {
    /// Loads every issuer's keys (blocking: files and HTTPS). A key source
    /// that cannot be read stops the start, naming the issuer.
    pub fn load(configs: &[JwtIssuerConfig]) -> Result<Self, String> {
        let mut issuers = Vec::new();
        let mut list = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let stamp = c.jwks_file.as_deref().and_then(file_stamp);
            let keys = load_keys(c).map_err(|e| format!("auth.jwt[{i}] ({}): {e}", c.issuer))?;
            list.push((policy(c), keys));
            issuers.push(IssuerState {
                config: c.clone(),
                file_stamp: Mutex::new(stamp),
                last_fetch: Mutex::new(Some(Instant::now())),
                last_kid_refresh: Mutex::new(None),
            });
        }
        Ok(JwtAuth {
            issuers,
            verifier: RwLock::new(Arc::new(Verifier { issuers: list })),
        })
    }

    fn verifier(&self) -> Arc<Verifier> {
        self.verifier.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace_keys(&self, index: usize, keys: Jwks) {
        let mut guard = self.verifier.write().unwrap_or_else(|p| p.into_inner());
        let mut v = (**guard).clone();
        if let Some(slot) = v.issuers.get_mut(index) {
            slot.1 = keys;
        }
        *guard = Arc::new(v);
    }

    /// Re-reads the JWKS files that changed (called about once a second).
    pub fn reload_changed_files(&self) {
        for (i, st) in self.issuers.iter().enumerate() {
            let Some(path) = &st.config.jwks_file else {
                continue;
            };
            let now = file_stamp(path);
            {
                let mut last = st.file_stamp.lock().unwrap_or_else(|p| p.into_inner());
                if *last == now {
                    continue;
                }
                *last = now;
            }
            match load_keys(&st.config) {
                Ok(keys) => {
                    tracing::info!(issuer = %st.config.issuer, keys = keys.keys.len(), "JWKS file changed; reloaded");
                    self.replace_keys(i, keys);
                }
                Err(e) => {
                    tracing::error!(issuer = %st.config.issuer, error = %e, "JWKS file changed but cannot be used; keeping the previous keys")
                }
            }
        }
    }

    /// Fetches again the keys of URL and discovery issuers whose
    /// `jwks_refresh_interval` has passed (called about once a second, on a
    /// blocking thread). A failed fetch keeps the previous keys.
    pub fn refresh_due(&self) {
        for (i, st) in self.issuers.iter().enumerate() {
            let c = &st.config;
            if !(c.discovery || c.jwks_url.is_some()) {
                continue;
            }
            {
                let mut last = st.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_some_and(|t| t.elapsed() < c.jwks_refresh_interval) {
                    continue;
                }
                *last = Some(Instant::now());
            }
            match load_keys(c) {
                Ok(keys) => {
                    tracing::info!(issuer = %c.issuer, keys = keys.keys.len(), "JWKS refreshed (periodic)");
                    self.replace_keys(i, keys);
                }
                Err(e) => {
                    tracing::warn!(issuer = %c.issuer, error = %e, "periodic JWKS refresh failed; keeping the previous keys")
                }
            }
        }
    }

    /// Verifies `token` and maps it to a principal. On an unknown `kid` the
    /// issuer's keys are refreshed once (rate-limited) and the token
    /// checked again.
    pub async fn authenticate(self: &Arc<Self>, token: &str, now: u64) -> Result<Principal, TokenRefusal> {
        let first = self.verifier().verify(token, now);
        let verified = match first {
            Err(JwtError::UnknownKid(kid)) => {
                let iss = moat_guard::jwt::parse(token, usize::MAX)
                    .ok()
                    .and_then(|p| p.issuer().map(str::to_owned));
                let index = iss.and_then(|iss| self.issuers.iter().position(|s| s.config.issuer == iss));
                match index {
                    Some(i) if self.may_refresh(i) => {
                        let me = self.clone();
                        let loaded = tokio::task::spawn_blocking(move || {
                            me.issuers.get(i).map(|s| load_keys(&s.config))
                        })
                        .await;
                        match loaded {
                            Ok(Some(Ok(keys))) => {
                                tracing::info!(issuer_index = i, kid = %kid, keys = keys.keys.len(), "unknown key id: JWKS refreshed");
                                self.replace_keys(i, keys);
                            }
                            Ok(Some(Err(e))) => {
                                tracing::warn!(error = %e, "JWKS refresh failed; keeping the previous keys")
                            }
                            _ => {}
                        }
                        self.verifier().verify(token, now)
                    }
                    _ => Err(JwtError::UnknownKid(kid)),
                }
            }
            other => other,
        }
        .map_err(TokenRefusal::Invalid)?;
        let Some(st) = self.issuers.iter().find(|s| s.config.issuer == verified.issuer) else {
            return Err(TokenRefusal::Invalid(JwtError::UnknownIssuer(verified.issuer)));
        };
        let c = &st.config;
        let role = match &c.role_claim {
            None => Role::user(),
            Some(claim) => {
                let values = claim_strings(verified.claims.get(claim));
                mapped_role(&values, &c.roles).ok_or_else(|| TokenRefusal::NoGrant {
                    reason: "jwt_role_unmapped",
                    message: format!("token claim {claim:?} maps to no moat role"),
                })?
            }
        };
        let models = match &c.models_claim {
            None => None,
            Some(claim) => match verified.claims.get(claim) {
                None => {
                    return Err(TokenRefusal::NoGrant {
                        reason: "jwt_models_missing",
                        message: format!("token lacks the models claim {claim:?}"),
                    });
                }
                v => Some(claim_strings(v)),
            },
        };
        Ok(Principal::new(
            PrincipalKind::Jwt,
            format!("jwt:{}#{}", verified.issuer, verified.subject),
            role,
            models,
        )
        // Keys a token holder creates may not outlive the token.
        .with_expiry(Some(verified.expires)))
    }

    fn may_refresh(&self, index: usize) -> bool {
        let Some(st) = self.issuers.get(index) else {
            return false;
        };
        let mut last = st.last_kid_refresh.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < st.config.jwks_min_refresh_interval) {
            return false;
        }
        *last = Some(Instant::now());
        // The periodic refresh counts from here too.
        *st.last_fetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        true
    }
}

/// A claim as a list of strings: a string (split on spaces, as OAuth
/// `scope` is) or an array of strings.
fn claim_strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn policy(c: &JwtIssuerConfig) -> IssuerPolicy {
    IssuerPolicy {
        issuer: c.issuer.clone(),
        audiences: c.audiences.clone(),
        algorithms: c.algorithms.clone(),
        leeway: c.leeway,
        max_token_bytes: c.max_token_bytes,
    }
}

/// The issuer's keys: its JWKS (file or URL) plus the HS256 secret.
fn load_keys(c: &JwtIssuerConfig) -> Result<Jwks, String> {
    let mut keys = Jwks::default();
    if let Some(path) = &c.jwks_file {
        let bytes = read_capped(path)?;
        keys = Jwks::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    } else if let Some(url) = &c.jwks_url {
        let bytes = fetch(url, c.allow_loopback)?;
        keys = Jwks::parse(&bytes).map_err(|e| format!("{url}: {e}"))?;
    } else if c.discovery {
        let url = discover(c)?;
        let bytes = fetch(&url, c.allow_loopback)?;
        keys = Jwks::parse(&bytes).map_err(|e| format!("{url} (jwks_uri): {e}"))?;
    }
    if let Some(path) = &c.hs256_secret_file {
        let mut secret = read_capped(path)?;
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        if secret.len() < 32 {
            return Err(format!(
                "{}: an HS256 secret needs at least 32 bytes",
                path.display()
            ));
        }
        keys.keys.push(Jwk {
            kid: None,
            key: Key::Hmac(zeroize::Zeroizing::new(secret)),
        });
    }
    Ok(keys)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    f.take(MAX_JWKS_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if out.len() as u64 > MAX_JWKS_BYTES {
        return Err(format!("{}: larger than {MAX_JWKS_BYTES} bytes", path.display()));
    }
    Ok(out)
}

/// The `jwks_uri` of the issuer's OpenID Provider Configuration
/// (`{issuer}/.well-known/openid-configuration`, OpenID Connect Discovery
/// 1.0 §4). The document's `issuer` must be exactly the configured one
/// (§4.3: otherwise one provider could hand out another's keys), and the
/// `jwks_uri` must be https (http only where the issuer allows loopback).
fn discover(c: &JwtIssuerConfig) -> Result<String, String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        c.issuer.trim_end_matches('/')
    );
    let bytes = fetch(&url, c.allow_loopback)?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not JSON: {e}"))?;
    let issuer = doc
        .get("issuer")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{url}: no \"issuer\" string"))?;
    if issuer != c.issuer {
        return Err(format!(
            "{url}: the document names issuer {issuer:?}, not the configured {:?}",
            c.issuer
        ));
    }
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{url}: no \"jwks_uri\" string"))?;
    let scheme_ok = jwks_uri.starts_with("https://") || (c.allow_loopback && jwks_uri.starts_with("http://"));
    if !scheme_ok {
        return Err(format!(
            "{url}: jwks_uri {jwks_uri:?} is not https (http needs allow_loopback = true)"
        ));
    }
    Ok(jwks_uri.to_owned())
}

/// Resolves an issuer's host and refuses the answer when any address is
/// loopback, private, link-local, metadata or otherwise not public (unless
/// `allow_internal`). It is the resolver ureq connects with, so the
/// addresses checked are the addresses used.
#[derive(Debug, Clone, Copy)]
pub struct IssuerResolver {
    pub allow_internal: bool,
}

/// Resolves `host:port` (a literal address as itself) and refuses the whole
/// name when any address is not public and `allow_internal` is false (a
/// mixed answer is how rebinding attacks hedge).
fn resolve_checked(host: &str, port: u16, allow_internal: bool) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => (bare, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {bare}: {e}"))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("{bare} resolves to no address"));
    }
    if !allow_internal
        && let Some((a, why)) = addrs
            .iter()
            .find_map(|a| moat_artifact::source::policy::non_public(a.ip()).map(|w| (a, w)))
    {
        return Err(format!(
            "{bare} resolves to {}, a {why} address (set allow_loopback = true to allow)",
            a.ip()
        ));
    }
    Ok(addrs)
}

impl ureq::unversioned::resolver::Resolver for IssuerResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};
        let host = uri.host().ok_or(ureq::Error::HostNotFound)?;
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
        let addrs = resolve_checked(host, port, self.allow_internal)
            .map_err(|e| ureq::Error::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)))?;
        let mut out = ureq::unversioned::resolver::ResolvedSocketAddrs::from_fn(|_| {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        });
        for a in addrs {
            if out.try_push(a).is_err() {
                break;
            }
        }
        Ok(out)
    }
}

/// GETs an issuer document (JWKS or discovery) over HTTP(S) through
/// [`IssuerResolver`]: no redirects, no environment proxy, 10 s, 1 MiB.
fn fetch(url: &str, allow_internal: bool) -> Result<Vec<u8>, String> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .max_redirects(0)
        .proxy(None)
        .user_agent(concat!("moat/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::new(),
        IssuerResolver { allow_internal },
    );
    let mut resp = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    resp.body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_vec()
        .map_err(|e| format!("{url}: {e}"))
}

/// The role a token's role-claim values map to: the first value, in the
/// claim's own order, that `roles` maps. Roles are not ranked against
/// each other (custom roles' permission sets need not nest), so the rule
/// is positional; it is the claim's order rather than the `[rbac]` table's
/// because that order is the identity provider's statement about this
/// subject, and a TOML table's key order is not kept by the parser. A
/// subject meant to get one role should carry one mapped value.
fn mapped_role(values: &[String], roles: &BTreeMap<String, Role>) -> Option<Role> {
    values.iter().find_map(|v| roles.get(v).cloned())
}

/// Maps a verified client certificate's principal to a role.
pub fn mtls_principal(name: &str, roles: &BTreeMap<String, Role>) -> Option<Principal> {
    roles
        .get(name)
        .map(|role| Principal::new(PrincipalKind::Mtls, format!("mtls:{name}"), role.clone(), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for host in [
            "127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
            "[::1]",
            "::ffff:192.168.0.1",
            "localhost",
        ] {
            let err = resolve_checked(host, 80, false).err().unwrap_or_default();
            assert!(err.contains("allow_loopback"), "{host}: {err}");
        }
        assert_eq!(resolve_checked("127.0.0.1", 8080, true).map(|a| a.len()), Ok(1));
        assert_eq!(
            resolve_checked("93.184.216.34", 443, false).map(|a| a.len()),
            Ok(1)
        );
    }

    #[test]
    fn claims_as_lists() {
        assert_eq!(claim_strings(Some(&Value::from("a b"))), vec!["a", "b"]);
        assert_eq!(
            claim_strings(Some(&serde_json::json!(["x", 1, "y"]))),
            vec!["x", "y"]
        );
        assert!(claim_strings(None).is_empty());
    }

    #[test]
    fn mtls_mapping() {
        let ops = Role::new("ops").unwrap_or_else(|_| Role::user());
        let roles = BTreeMap::from([
            ("spiffe://corp/a".to_owned(), Role::admin()),
            ("spiffe://corp/o".to_owned(), ops.clone()),
        ]);
        let p = mtls_principal("spiffe://corp/a", &roles);
        assert_eq!(
            p.map(|p| (p.key_id, p.role)),
            Some(("mtls:spiffe://corp/a".to_owned(), Role::admin()))
        );
        let p = mtls_principal("spiffe://corp/o", &roles);
        assert_eq!(p.map(|p| p.role), Some(ops));
        assert!(mtls_principal("spiffe://corp/b", &roles).is_none());
    }

    #[test]
    fn a_claim_mapping_to_several_roles_takes_the_first_in_claim_order() {
        let role = |n: &str| Role::new(n).unwrap_or_else(|_| Role::user());
        let roles = BTreeMap::from([
            ("admins".to_owned(), Role::admin()),
            ("sre".to_owned(), role("ops")),
            ("staff".to_owned(), Role::user()),
        ]);
        let v = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            mapped_role(&v(&["other", "sre", "admins"]), &roles),
            Some(role("ops"))
        );
        assert_eq!(mapped_role(&v(&["admins", "sre"]), &roles), Some(Role::admin()));
        assert_eq!(mapped_role(&v(&["staff", "admins"]), &roles), Some(Role::user()));
        assert_eq!(mapped_role(&v(&["other"]), &roles), None);
        assert_eq!(mapped_role(&[], &roles), None);
    }
}
