//! The access-control part of the configuration: per-plane network
//! allowlists and TLS, connection limits (`[limits]`), identities
//! (`[[auth.jwt]]`, `[auth.mtls]`) and rate limits (`[rate_limits]`).
//!
//! Kept apart from `config.rs` because these keys are many and each has
//! its own validation; the same two-phase shape applies: `Raw*` mirrors
//! the file and refuses unknown keys, `validate` names the full key path.

use super::{ConfigError, invalid};
use crate::net::Allowlist;
use crate::tls::{ClientAuth, MinVersion, TlsSettings};
use moat_guard::jwt::{Algorithm, DEFAULT_MAX_TOKEN_BYTES};
use moat_guard::{Rbac, Role};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `[inference.tls]` / `[metrics.tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub min_version: Option<String>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: Option<String>,
}

impl RawTls {
    pub fn validate(self, prefix: &str) -> Result<TlsSettings, ConfigError> {
        let cert = self
            .cert
            .ok_or_else(|| invalid(format!("{prefix}.cert"), "required when TLS is configured"))?;
        let key = self
            .key
            .ok_or_else(|| invalid(format!("{prefix}.key"), "required when TLS is configured"))?;
        let min_version = match self.min_version.as_deref() {
            None | Some("1.3") => MinVersion::Tls13,
            Some("1.2") => MinVersion::Tls12,
            Some(v) => {
                return Err(invalid(
                    format!("{prefix}.min_version"),
                    format!("{v:?}: use \"1.3\" (default) or \"1.2\""),
                ));
            }
        };
        let ca = || {
            self.client_ca.clone().ok_or_else(|| {
                invalid(
                    format!("{prefix}.client_ca"),
                    "required when client_auth is \"optional\" or \"required\"",
                )
            })
        };
        let client_auth = match self.client_auth.as_deref() {
            None | Some("off") => {
                if self.client_ca.is_some() {
                    return Err(invalid(
                        format!("{prefix}.client_auth"),
                        "client_ca is set but client_auth is \"off\": say \"optional\" or \"required\"",
                    ));
                }
                ClientAuth::Off
            }
            Some("optional") => ClientAuth::Optional(ca()?),
            Some("required") => ClientAuth::Required(ca()?),
            Some(v) => {
                return Err(invalid(
                    format!("{prefix}.client_auth"),
                    format!("{v:?}: use \"off\", \"optional\" or \"required\""),
                ));
            }
        };
        let settings = TlsSettings {
            cert,
            key,
            min_version,
            client_auth,
        };
        // Load once now so a bad file is a config error naming the key.
        crate::tls::server_config(&settings).map_err(|e| invalid(prefix, e.to_string()))?;
        Ok(settings)
    }
}

/// A plane's network and TLS settings, validated.
#[derive(Debug, Clone, Default)]
pub struct PlaneAccess {
    pub allow: Allowlist,
    pub tls: Option<TlsSettings>,
}

pub fn plane_access(
    prefix: &str,
    cidrs: Option<Vec<String>>,
    tls: Option<RawTls>,
) -> Result<PlaneAccess, ConfigError> {
    let cidrs = cidrs.unwrap_or_default();
    let allow = Allowlist::parse(&cidrs).map_err(|e| {
        let i = cidrs
            .iter()
            .position(|c| crate::net::Cidr::parse(c).is_err())
            .unwrap_or(0);
        invalid(format!("{prefix}.allow_cidrs[{i}]"), e)
    })?;
    let tls = match tls {
        None => None,
        Some(t) => Some(t.validate(&format!("{prefix}.tls"))?),
    };
    Ok(PlaneAccess { allow, tls })
}

/// Parses `500ms`, `10s`, `5m`, `1h` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (num, mult_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        (t, 1000)
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult_ms).map(Duration::from_millis)
}

/// A duration key: a string like `"10s"` or an integer of seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(u64),
    Text(String),
}

pub(crate) fn duration(
    key: &str,
    v: Option<RawDuration>,
    default: Duration,
    range: (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let d = match v {
        None => return Ok(default),
        Some(RawDuration::Seconds(s)) => Duration::from_secs(s),
        Some(RawDuration::Text(t)) => parse_duration(&t).ok_or_else(|| {
            invalid(
                key,
                format!("{t:?} is not a duration like \"500ms\", \"10s\" or \"5m\""),
            )
        })?,
    };
    if d < range.0 || d > range.1 {
        return Err(invalid(
            key,
            format!("{d:?} is not between {:?} and {:?}", range.0, range.1),
        ));
    }
    Ok(d)
}

/// `[limits]`: what one connection may cost.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_header_bytes: Option<usize>,
    pub header_read_timeout: Option<RawDuration>,
    pub request_timeout: Option<RawDuration>,
    pub idle_timeout: Option<RawDuration>,
    pub drain_timeout: Option<RawDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line + headers); hyper's read buffer.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head (and, on TLS
    /// listeners, to finish the handshake): the slowloris cut-off.
    pub header_read_timeout: Duration,
    /// Time until the response head; longer requests get 504.
    pub request_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// After SIGTERM, how long in-flight requests (streams included) may
    /// run on; then streams end with a `shutting_down` error and `[DONE]`.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl RawLimits {
    pub fn validate(self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let max_header_bytes = self.max_header_bytes.unwrap_or(d.max_header_bytes);
        // hyper's read buffer cannot be smaller than 8 KiB.
        if !(8192..=(1 << 20)).contains(&max_header_bytes) {
            return Err(invalid(
                "limits.max_header_bytes",
                format!("{max_header_bytes} is not between 8192 and 1048576"),
            ));
        }
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        Ok(Limits {
            max_header_bytes,
            header_read_timeout: duration(
                "limits.header_read_timeout",
                self.header_read_timeout,
                d.header_read_timeout,
                (ms(100), s(300)),
            )?,
            request_timeout: duration(
                "limits.request_timeout",
                self.request_timeout,
                d.request_timeout,
                (ms(100), s(86_400)),
            )?,
            idle_timeout: duration(
                "limits.idle_timeout",
                self.idle_timeout,
                d.idle_timeout,
                (ms(100), s(86_400)),
            )?,
            drain_timeout: duration(
                "limits.drain_timeout",
                self.drain_timeout,
                d.drain_timeout,
                (ms(100), s(3_600)),
            )?,
        })
    }
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default)]
    pub jwt: Vec<RawJwtIssuer>,
    #[serde(default)]
    pub mtls: RawMtls,
}

/// One `[[auth.jwt]]` issuer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtIssuer {
    pub issuer: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub algorithms: Option<Vec<String>>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub discovery: Option<bool>,
    pub jwks_refresh_interval: Option<RawDuration>,
    pub jwks_min_refresh_interval: Option<RawDuration>,
    pub allow_loopback: Option<bool>,
    pub hs256_secret_file: Option<PathBuf>,
    pub leeway: Option<RawDuration>,
    pub max_token_bytes: Option<usize>,
    pub role_claim: Option<String>,
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    pub models_claim: Option<String>,
}

/// A validated JWT issuer.
#[derive(Debug, Clone)]
pub struct JwtIssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// Find the JWKS through `{issuer}/.well-known/openid-configuration`.
    pub discovery: bool,
    /// A JWKS from a URL (or discovery) is fetched again this often.
    pub jwks_refresh_interval: Duration,
    /// Shortest time between two fetches caused by tokens naming an
    /// unknown `kid`: a flood of made-up key ids costs one fetch per
    /// interval, not one per request.
    pub jwks_min_refresh_interval: Duration,
    /// Loopback/private addresses (and plain http) allowed for the issuer's
    /// URLs: for tests and in-cluster issuers only.
    pub allow_loopback: bool,
    pub hs256_secret_file: Option<PathBuf>,
    pub leeway: Duration,
    pub max_token_bytes: usize,
    /// Claim whose value(s) map to a role; `None`: every token is a user.
    pub role_claim: Option<String>,
    pub roles: BTreeMap<String, Role>,
    /// Claim listing the models the token may use (array or space-separated).
    pub models_claim: Option<String>,
}

/// A role name from the file that `rbac` must define: a mapping to a role
/// that does not exist would authenticate callers who are then refused
/// everything, which is a typo the operator wants to hear about now.
fn role(key: &str, v: &str, rbac: &Rbac) -> Result<Role, ConfigError> {
    let r = Role::new(v).map_err(|e| invalid(key, e.to_string()))?;
    if !rbac.is_defined(&r) {
        return Err(invalid(
            key,
            format!(
                "role {v:?} is not defined (defined: {}; add [rbac.roles.{v}] to define it)",
                rbac.names()
            ),
        ));
    }
    Ok(r)
}

impl RawJwtIssuer {
    /// `rbac`: the roles `roles` may map to.
    pub fn validate(self, prefix: &str, rbac: &Rbac) -> Result<JwtIssuerConfig, ConfigError> {
        let issuer = self
            .issuer
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(format!("{prefix}.issuer"), "required (the exact `iss` value)"))?;
        let audiences = self.audiences.unwrap_or_default();
        if audiences.is_empty() {
            return Err(invalid(
                format!("{prefix}.audiences"),
                "list at least one audience the token's `aud` must contain",
            ));
        }
        let names = self
            .algorithms
            .unwrap_or_else(|| vec!["RS256".into(), "ES256".into()]);
        let mut algorithms = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let a = Algorithm::parse(n).ok_or_else(|| {
                invalid(
                    format!("{prefix}.algorithms[{i}]"),
                    format!("{n:?}: use RS256, ES256, EdDSA or HS256 (never none)"),
                )
            })?;
            algorithms.push(a);
        }
        if algorithms.is_empty() {
            return Err(invalid(format!("{prefix}.algorithms"), "must not be empty"));
        }
        let hs = algorithms.contains(&Algorithm::Hs256);
        if hs != self.hs256_secret_file.is_some() {
            return Err(invalid(
                format!("{prefix}.hs256_secret_file"),
                "set it exactly when HS256 is among the algorithms",
            ));
        }
        let discovery = self.discovery.unwrap_or(false);
        let allow_loopback = self.allow_loopback.unwrap_or(false);
        let sources = [self.jwks_file.is_some(), self.jwks_url.is_some(), discovery];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(invalid(
                format!("{prefix}.discovery"),
                "use one key source: jwks_file, jwks_url or discovery = true",
            ));
        }
        let asymmetric = algorithms.iter().any(|a| *a != Algorithm::Hs256);
        if asymmetric && !sources.iter().any(|s| *s) {
            return Err(invalid(
                format!("{prefix}.jwks_file"),
                "an asymmetric algorithm needs jwks_file, jwks_url or discovery = true",
            ));
        }
        // Keys fetched over plain http can be swapped by anyone on the
        // path; only an issuer explicitly marked as local may use it.
        let url_ok = |u: &str| u.starts_with("https://") || (allow_loopback && u.starts_with("http://"));
        if let Some(u) = &self.jwks_url
            && !url_ok(u)
        {
            return Err(invalid(
                format!("{prefix}.jwks_url"),
                format!("{u:?} is not an https URL (http needs allow_loopback = true)"),
            ));
        }
        if discovery && !url_ok(&issuer) {
            return Err(invalid(
                format!("{prefix}.issuer"),
                format!("{issuer:?}: discovery needs an https issuer URL (http needs allow_loopback = true)"),
            ));
        }
        let fetched = discovery || self.jwks_url.is_some();
        if !fetched && (self.jwks_refresh_interval.is_some() || self.jwks_min_refresh_interval.is_some()) {
            return Err(invalid(
                format!("{prefix}.jwks_refresh_interval"),
                "only applies to jwks_url or discovery (a jwks_file is re-read when it changes)",
            ));
        }
        let jwks_refresh_interval = duration(
            &format!("{prefix}.jwks_refresh_interval"),
            self.jwks_refresh_interval,
            Duration::from_secs(3600),
            (Duration::from_secs(1), Duration::from_secs(7 * 86_400)),
        )?;
        let jwks_min_refresh_interval = duration(
            &format!("{prefix}.jwks_min_refresh_interval"),
            self.jwks_min_refresh_interval,
            Duration::from_secs(10),
            (Duration::from_secs(1), Duration::from_secs(3600)),
        )?;
        let leeway = duration(
            &format!("{prefix}.leeway"),
            self.leeway,
            Duration::from_secs(60),
            (Duration::ZERO, Duration::from_secs(600)),
        )?;
        let max_token_bytes = self.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
        if !(256..=65_536).contains(&max_token_bytes) {
            return Err(invalid(
                format!("{prefix}.max_token_bytes"),
                format!("{max_token_bytes} is not between 256 and 65536"),
            ));
        }
        let mut roles = BTreeMap::new();
        for (claim, r) in &self.roles {
            roles.insert(claim.clone(), role(&format!("{prefix}.roles.{claim}"), r, rbac)?);
        }
        if !roles.is_empty() && self.role_claim.is_none() {
            return Err(invalid(
                format!("{prefix}.role_claim"),
                "roles are mapped but no role_claim names the claim to read",
            ));
        }
        Ok(JwtIssuerConfig {
            issuer,
            audiences,
            algorithms,
            jwks_file: self.jwks_file,
            jwks_url: self.jwks_url,
            discovery,
            jwks_refresh_interval,
            jwks_min_refresh_interval,
            allow_loopback,
            hs256_secret_file: self.hs256_secret_file,
            leeway,
            max_token_bytes,
            role_claim: self.role_claim,
            roles,
            models_claim: self.models_claim,
        })
    }
}

/// `[auth.mtls]`: client-certificate principal → role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMtls {
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
}

impl RawMtls {
    /// `rbac`: the roles a certificate may map to.
    pub fn validate(self, rbac: &Rbac) -> Result<BTreeMap<String, Role>, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, r) in self.roles {
            let v = role(&format!("auth.mtls.roles.\"{name}\""), &r, rbac)?;
            out.insert(name, v);
        }
        Ok(out)
    }
}

/// Per-principal limits, as written (defaults or one role's overrides).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPrincipalLimits {
    pub requests_per_minute: Option<u64>,
    pub burst: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub max_tokens: Option<u64>,
    pub max_n: Option<u32>,
}

/// `[rate_limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    #[serde(flatten)]
    pub defaults: RawPrincipalLimits,
    pub global_requests_per_second: Option<u64>,
    pub redis_url: Option<String>,
    pub redis_timeout: Option<RawDuration>,
    pub on_redis_error: Option<String>,
    pub concurrency_lease_ttl: Option<RawDuration>,
    #[serde(default)]
    pub roles: BTreeMap<String, RawPrincipalLimits>,
}

/// One principal's limits; `None` is unlimited. The same shape as a key's
/// own limits, so that the two combine field by field
/// ([`moat_guard::KeyLimits::tightest`]).
pub type PrincipalLimits = moat_guard::KeyLimits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Admit the request (availability over the limit).
    Open,
    /// Refuse with 503 (the limit over availability).
    Closed,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// What a role without its own `[rate_limits.roles.NAME]` gets: the
    /// top-level `[rate_limits]` values (the built-ins included).
    pub defaults: PrincipalLimits,
    /// Each `[rate_limits.roles.NAME]`, merged over the defaults.
    pub roles: BTreeMap<Role, PrincipalLimits>,
    pub global_requests_per_second: Option<u64>,
    /// `host:port` of the Redis server shared by replicas.
    pub redis_addr: Option<String>,
    pub redis_timeout: Duration,
    pub on_redis_error: OnRedisError,
    /// How long a concurrency slot held in Redis outlives its replica: the
    /// lease is renewed every third of this while the request runs, so a
    /// crashed replica's slots come back after at most this long.
    pub concurrency_lease_ttl: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            defaults: PrincipalLimits::default(),
            roles: BTreeMap::new(),
            global_requests_per_second: None,
            redis_addr: None,
            redis_timeout: Duration::from_millis(50),
            on_redis_error: OnRedisError::Closed,
            concurrency_lease_ttl: Duration::from_secs(30),
        }
    }
}

impl RateLimitConfig {
    /// The role's own section, else the defaults (an undefined role gets
    /// the defaults too, and is refused by `[rbac]` before they matter).
    pub fn for_role(&self, role: &Role) -> &PrincipalLimits {
        self.roles.get(role).unwrap_or(&self.defaults)
    }
}

fn positive<T: PartialEq + Default + std::fmt::Display + Copy>(
    key: String,
    v: Option<T>,
) -> Result<Option<T>, ConfigError> {
    match v {
        Some(x) if x == T::default() => Err(invalid(key, "must be at least 1 (leave it out for no limit)")),
        other => Ok(other),
    }
}

fn merge(
    prefix: &str,
    base: &RawPrincipalLimits,
    over: &RawPrincipalLimits,
) -> Result<PrincipalLimits, ConfigError> {
    let k = |name: &str| format!("{prefix}.{name}");
    let l = PrincipalLimits {
        requests_per_minute: positive(
            k("requests_per_minute"),
            over.requests_per_minute.or(base.requests_per_minute),
        )?,
        burst: positive(k("burst"), over.burst.or(base.burst))?,
        tokens_per_minute: positive(
            k("tokens_per_minute"),
            over.tokens_per_minute.or(base.tokens_per_minute),
        )?,
        max_concurrent: positive(k("max_concurrent"), over.max_concurrent.or(base.max_concurrent))?,
        max_tokens: positive(k("max_tokens"), over.max_tokens.or(base.max_tokens))?,
        max_n: positive(k("max_n"), over.max_n.or(base.max_n))?,
    };
    if l.burst.is_some() && l.requests_per_minute.is_none() {
        return Err(invalid(k("burst"), "needs requests_per_minute"));
    }
    if let (Some(tpm), Some(mt)) = (l.tokens_per_minute, l.max_tokens)
        && mt > tpm
    {
        return Err(invalid(
            k("max_tokens"),
            format!("{mt} exceeds tokens_per_minute ({tpm}): no request could ever be admitted"),
        ));
    }
    Ok(l)
}

impl RawRateLimits {
    /// `rbac`: the roles `[rate_limits.roles.NAME]` may name.
    pub fn validate(self, rbac: &Rbac) -> Result<RateLimitConfig, ConfigError> {
        let empty = RawPrincipalLimits::default();
        // The top-level values are what every role without its own section
        // gets, so they must make sense alone, unless every defined role
        // has a section (then they only count merged into those, checked
        // below, e.g. a top-level `burst` with each role's own rate).
        let all_sectioned = rbac.roles().all(|(r, _)| self.roles.contains_key(r.as_str()));
        let defaults = match merge("rate_limits", &self.defaults, &empty) {
            Ok(d) => d,
            Err(_) if all_sectioned => raw_limits(&self.defaults),
            Err(e) => return Err(e),
        };
        let mut roles = BTreeMap::new();
        for (name, over) in &self.roles {
            let key = format!("rate_limits.roles.{name}");
            let r = role(&key, name, rbac)?;
            let limits = merge(&key, &self.defaults, over).map_err(|e| rename_default(e, over))?;
            roles.insert(r, limits);
        }
        let global_requests_per_second = positive(
            "rate_limits.global_requests_per_second".into(),
            self.global_requests_per_second,
        )?;
        let redis_addr = match self.redis_url {
            None => None,
            Some(u) => Some(redis_addr(&u).ok_or_else(|| {
                invalid(
                    "rate_limits.redis_url",
                    format!("{u:?} is not like redis://host:port (TLS and passwords are not supported)"),
                )
            })?),
        };
        let redis_timeout = duration(
            "rate_limits.redis_timeout",
            self.redis_timeout,
            Duration::from_millis(50),
            (Duration::from_millis(1), Duration::from_secs(10)),
        )?;
        let on_redis_error = match self.on_redis_error.as_deref() {
            None | Some("closed") => OnRedisError::Closed,
            Some("open") => OnRedisError::Open,
            Some(v) => {
                return Err(invalid(
                    "rate_limits.on_redis_error",
                    format!("{v:?}: use \"open\" or \"closed\""),
                ));
            }
        };
        if redis_addr.is_none() && self.on_redis_error.is_some() {
            return Err(invalid(
                "rate_limits.on_redis_error",
                "needs rate_limits.redis_url",
            ));
        }
        if redis_addr.is_none() && self.concurrency_lease_ttl.is_some() {
            return Err(invalid(
                "rate_limits.concurrency_lease_ttl",
                "needs rate_limits.redis_url (without Redis, concurrency is counted in this process)",
            ));
        }
        let concurrency_lease_ttl = duration(
            "rate_limits.concurrency_lease_ttl",
            self.concurrency_lease_ttl,
            Duration::from_secs(30),
            (Duration::from_secs(1), Duration::from_secs(3600)),
        )?;
        Ok(RateLimitConfig {
            defaults,
            roles,
            global_requests_per_second,
            redis_addr,
            redis_timeout,
            on_redis_error,
            concurrency_lease_ttl,
        })
    }
}

/// The values as written, unchecked: the limits of a principal whose role
/// `[rbac]` does not define (refused before any limit applies) when the
/// top-level values are incomplete on their own.
fn raw_limits(r: &RawPrincipalLimits) -> PrincipalLimits {
    PrincipalLimits {
        requests_per_minute: r.requests_per_minute,
        burst: r.burst,
        tokens_per_minute: r.tokens_per_minute,
        max_concurrent: r.max_concurrent,
        max_tokens: r.max_tokens,
        max_n: r.max_n,
    }
}

/// A bad value that came from the top-level defaults is reported under
/// `rate_limits.KEY`, not under the role that inherited it.
fn rename_default(e: ConfigError, over: &RawPrincipalLimits) -> ConfigError {
    match e {
        ConfigError::Invalid { key, message } => {
            let name = key.rsplit('.').next().unwrap_or_default().to_owned();
            let overridden = match name.as_str() {
                "requests_per_minute" => over.requests_per_minute.is_some(),
                "burst" => over.burst.is_some(),
                "tokens_per_minute" => over.tokens_per_minute.is_some(),
                "max_concurrent" => over.max_concurrent.is_some(),
                "max_tokens" => over.max_tokens.is_some(),
                "max_n" => over.max_n.is_some(),
                _ => true,
            };
            let key = if overridden {
                key
            } else {
                format!("rate_limits.{name}")
            };
            ConfigError::Invalid { key, message }
        }
        other => other,
    }
}

fn redis_addr(url: &str) -> Option<String> {
    let rest = url.strip_prefix("redis://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') || rest.contains('/') {
        return None;
    }
    let (host, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    (!host.is_empty()).then(|| rest.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    fn issuer(toml_text: &str) -> Result<JwtIssuerConfig, String> {
        let raw: RawJwtIssuer = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        raw.validate("auth.jwt[0]", &Rbac::default())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn mtls_maps_to_defined_roles_only() {
        let mut rbac = Rbac::default();
        let raw = |r: &str| RawMtls {
            roles: BTreeMap::from([("spiffe://corp/ops".to_owned(), r.to_owned())]),
        };
        let e = raw("ops").validate(&rbac).unwrap_err().to_string();
        assert!(e.starts_with("auth.mtls.roles.\"spiffe://corp/ops\":"), "{e}");
        assert!(
            e.contains("defined: admin, user") && e.contains("[rbac.roles.ops]"),
            "{e}"
        );
        let ops = Role::new("ops").unwrap();
        rbac.set(ops.clone(), moat_guard::RoleSpec::new([], false));
        let m = raw("ops").validate(&rbac).unwrap();
        assert_eq!(m.get("spiffe://corp/ops"), Some(&ops));
    }

    #[test]
    fn jwt_key_sources_and_refresh_intervals() {
        let base = "audiences = [\"moat\"]\nalgorithms = [\"ES256\"]\n";
        let ok = issuer(&format!(
            "issuer = \"https://idp.example\"\n{base}discovery = true\n"
        ))
        .unwrap();
        assert!(ok.discovery);
        assert_eq!(ok.jwks_refresh_interval, Duration::from_secs(3600));
        assert_eq!(ok.jwks_min_refresh_interval, Duration::from_secs(10));
        let two = issuer(&format!(
            "issuer = \"https://idp.example\"\n{base}discovery = true\njwks_url = \"https://idp.example/k\"\n"
        ))
        .unwrap_err();
        assert!(
            two.contains("auth.jwt[0].discovery") && two.contains("one key source"),
            "{two}"
        );
        // Plain http only for an issuer marked local.
        let http = issuer(&format!(
            "issuer = \"http://idp.example\"\n{base}discovery = true\n"
        ))
        .unwrap_err();
        assert!(
            http.contains("auth.jwt[0].issuer") && http.contains("allow_loopback"),
            "{http}"
        );
        assert!(
            issuer(&format!(
                "issuer = \"http://127.0.0.1:9\"\n{base}discovery = true\nallow_loopback = true\n"
            ))
            .is_ok()
        );
        let url = issuer(&format!(
            "issuer = \"i\"\n{base}jwks_url = \"http://idp.example/k\"\n"
        ))
        .unwrap_err();
        assert!(url.contains("auth.jwt[0].jwks_url"), "{url}");
        // Refresh intervals only where something is fetched, within range.
        let file = issuer(&format!(
            "issuer = \"i\"\n{base}jwks_file = \"/k.json\"\njwks_refresh_interval = \"5m\"\n"
        ))
        .unwrap_err();
        assert!(file.contains("jwks_refresh_interval"), "{file}");
        let short = issuer(&format!(
            "issuer = \"https://i.example\"\n{base}discovery = true\njwks_min_refresh_interval = \"10ms\"\n"
        ))
        .unwrap_err();
        assert!(short.contains("auth.jwt[0].jwks_min_refresh_interval"), "{short}");
        let set = issuer(&format!(
            "issuer = \"https://i.example\"\n{base}discovery = true\njwks_refresh_interval = \"5m\"\njwks_min_refresh_interval = 2\n"
        ))
        .unwrap();
        assert_eq!(
            (set.jwks_refresh_interval, set.jwks_min_refresh_interval),
            (Duration::from_secs(300), Duration::from_secs(2))
        );
    }

    #[test]
    fn redis_urls() {
        assert_eq!(
            redis_addr("redis://127.0.0.1:6379").as_deref(),
            Some("127.0.0.1:6379")
        );
        assert_eq!(redis_addr("redis://h:1/").as_deref(), Some("h:1"));
        assert_eq!(redis_addr("redis://u:p@h:1"), None);
        assert_eq!(redis_addr("rediss://h:1"), None);
        assert_eq!(redis_addr("redis://h"), None);
    }
}
