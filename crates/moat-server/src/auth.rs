//! JWT issuers and client-certificate identities, as the running server
//! holds them: keys loaded from JWKS files or URLs (the I/O that
//! `moat_guard::jwt` deliberately does not do), refreshed when a file
//! changes or a token names an unknown `kid`, and the mapping from a
//! verified token or certificate to a [`Principal`].
//!
//! An unknown `kid` triggers at most one refresh per issuer every
//! [`REFRESH_MIN_INTERVAL`]: otherwise a stream of tokens with random key
//! ids would make moat hammer the issuer (or re-read the file) per request.

use crate::config::JwtIssuerConfig;
use moat_guard::jwt::{IssuerPolicy, Jwk, Jwks, JwtError, Key, Verifier};
use moat_guard::{Principal, PrincipalKind, Role};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Shortest time between two unknown-`kid` refreshes of one issuer.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Largest JWKS document read from a file or URL.
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
    last_refresh: Mutex<Option<Instant>>,
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
                last_refresh: Mutex::new(None),
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
                                tracing::info!(issuer_index = i, kid = %kid, "unknown key id: JWKS refreshed");
                                self.replace_keys(i, keys);
                            }
                            Ok(Some(Err(e))) => tracing::warn!(error = %e, "JWKS refresh failed"),
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
            None => Role::User,
            Some(claim) => {
                let values = claim_strings(verified.claims.get(claim));
                let mapped: Vec<Role> = values.iter().filter_map(|v| c.roles.get(v).copied()).collect();
                if mapped.contains(&Role::Admin) {
                    Role::Admin
                } else if mapped.contains(&Role::User) {
                    Role::User
                } else {
                    return Err(TokenRefusal::NoGrant {
                        reason: "jwt_role_unmapped",
                        message: format!("token claim {claim:?} maps to no moat role"),
                    });
                }
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
        let mut last = st.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFRESH_MIN_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
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

/// Fetches a JWKS over HTTP(S). Addresses that are loopback, private or
/// link-local (cloud metadata) are refused unless the issuer allows them:
/// an issuer URL must not become a way to reach internal services.
fn fetch(url: &str, allow_internal: bool) -> Result<Vec<u8>, String> {
    use std::net::ToSocketAddrs as _;
    let parsed: ureq::http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = parsed.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = parsed
        .port_u16()
        .unwrap_or(if parsed.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {host}: {e}"))?
        .collect();
    if !allow_internal && let Some(a) = addrs.iter().find(|a| is_internal(a.ip())) {
        return Err(format!(
            "{url}: {} is a loopback, private or link-local address (set allow_loopback = true to allow)",
            a.ip()
        ));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .max_redirects(0)
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    resp.body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_vec()
        .map_err(|e| format!("{url}: {e}"))
}

fn is_internal(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal(std::net::IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || v6.is_unspecified()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
            }
        },
    }
}

/// Maps a verified client certificate's principal to a role.
pub fn mtls_principal(name: &str, roles: &BTreeMap<String, Role>) -> Option<Principal> {
    roles
        .get(name)
        .map(|role| Principal::new(PrincipalKind::Mtls, format!("mtls:{name}"), *role, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(
                is_internal(ip.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))),
                "{ip}"
            );
        }
        assert!(!is_internal(std::net::IpAddr::from([93, 184, 216, 34])));
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
        let roles = BTreeMap::from([("spiffe://corp/a".to_owned(), Role::Admin)]);
        let p = mtls_principal("spiffe://corp/a", &roles);
        assert_eq!(
            p.map(|p| (p.key_id, p.role)),
            Some(("mtls:spiffe://corp/a".to_owned(), Role::Admin))
        );
        assert!(mtls_principal("spiffe://corp/b", &roles).is_none());
    }
}
