//! Configuration: one TOML file, read in two phases. [`RawConfig`] mirrors
//! the file exactly and refuses unknown keys; [`RawConfig::validate`] turns
//! it into [`Config`], naming the full key path of anything wrong
//! (`inference.listen: …`, `models[1].name: …`). Every key is documented in
//! `docs/config.md`.

use moat_artifact::name::ModelName;
use moat_artifact::policy::{PolicyError, SignaturePolicy};
use moat_artifact::source::policy::{RawSources, SourcePolicy};
use moat_engine::generate::EngineOptions;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod access;
pub mod management;
pub mod tracing;
pub mod upstream;
pub use access::{
    JwtIssuerConfig, Limits, OnRedisError, PlaneAccess, PrincipalLimits, RateLimitConfig, RawAuth, RawLimits,
    RawRateLimits, RawTls,
};
pub use management::{ManagementConfig, ModelControl, RawManagement, RawRbac};

/// Routes that may be configured public. Everything else always requires a key.
pub const PUBLIC_ROUTE_CHOICES: &[&str] = &["/health", "/ready"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub home: Option<PathBuf>,
    pub keys_file: Option<PathBuf>,
    #[serde(default)]
    pub inference: RawInference,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub engine: RawEngine,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// `[sources]`: which model sources `moat pull` (and later the
    /// management API) may reach.
    #[serde(default)]
    pub sources: RawSources,
    /// `[limits]`: header size and the connection timeouts.
    #[serde(default)]
    pub limits: RawLimits,
    /// `[auth]`: JWT issuers and mTLS role mapping (API keys need none).
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    /// `[management]`: the management plane exists only when present.
    pub management: Option<RawManagement>,
    /// `[rbac.roles.NAME]`: each role's permissions and TOTP step-up.
    #[serde(default)]
    pub rbac: RawRbac,
    /// `[tracing]`: OTLP trace export (off unless an endpoint is set).
    #[serde(default)]
    pub tracing: tracing::RawTracing,
    /// `[encryption]`: the keyring and what is encrypted with it.
    #[serde(default)]
    pub encryption: RawEncryption,
    /// `[store]`: how promoted model files are stored.
    #[serde(default)]
    pub store: RawStore,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEncryption {
    pub keyring: Option<PathBuf>,
    pub encrypt_keys_file: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub encrypt: Option<bool>,
}

/// Encryption at rest (`[encryption]`, `[store] encrypt`, `[audit] capture`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// The keyring file (default `<home>/keyring.json`); its versions may
    /// live in AWS KMS (credentials from the `AWS_*` environment).
    pub keyring: PathBuf,
    /// Store the API-key file as an envelope under the keyring.
    pub encrypt_keys_file: bool,
    /// `moat pull` encrypts the blobs it promotes.
    pub encrypt_store: bool,
}

/// The part of a config the CLI's key and store commands use: where the
/// keys file, keyring and audit log are. Read without validating the rest,
/// so `moat keys create --config moat.toml` works before any model exists.
#[derive(Debug, Clone)]
pub struct CliContext {
    pub home: PathBuf,
    pub keys_file: PathBuf,
    pub encryption: EncryptionConfig,
    pub audit: Option<AuditConfig>,
    /// The config's roles (`[rbac]`), so that `moat keys create --role`
    /// is checked against the roles the server will know; `None` without
    /// a config file.
    pub rbac: Option<moat_guard::Rbac>,
}

impl RawConfig {
    /// `[encryption]` and `[store]` with defaults under `home` (also used by
    /// the CLI, which has a store root but may have no full config).
    pub fn encryption(&self, home: &Path) -> EncryptionConfig {
        encryption_config(&self.encryption, &self.store, home)
    }

    /// See [`CliContext`]; `home` is the config's `home`, else `default_home`.
    pub fn cli_context(&self, default_home: &Path) -> Result<CliContext, ConfigError> {
        let home = self.home.clone().unwrap_or_else(|| default_home.to_owned());
        Ok(CliContext {
            keys_file: self.keys_file.clone().unwrap_or_else(|| home.join("keys.json")),
            encryption: encryption_config(&self.encryption, &self.store, &home),
            audit: audit_config(&self.audit, &home)?,
            rbac: Some(self.rbac.validate()?),
            home,
        })
    }
}

/// `[audit]` checked, with defaults under `home`; `None` when disabled.
/// Also used by the CLI, which records key events with only `--config`.
pub fn audit_config(audit: &RawAudit, home: &Path) -> Result<Option<AuditConfig>, ConfigError> {
    let a = audit;
    Ok(match a.enabled.unwrap_or(true) {
        false => {
            if a.fail_closed == Some(true) {
                return Err(invalid(
                    "audit.fail_closed",
                    "needs the audit log (audit.enabled = true)",
                ));
            }
            if a.capture == Some(true) {
                return Err(invalid(
                    "audit.capture",
                    "needs the audit log (audit.enabled = true): captures are referenced from its records",
                ));
            }
            None
        }
        true => {
            let max_bytes = a.max_bytes.unwrap_or(DEFAULT_AUDIT_MAX_BYTES);
            if max_bytes < 4096 {
                return Err(invalid("audit.max_bytes", format!("{max_bytes} is below 4096")));
            }
            let durable = a.durable.unwrap_or(true);
            let fail_closed = a.fail_closed.unwrap_or(false);
            if fail_closed && !durable {
                return Err(invalid(
                    "audit.fail_closed",
                    "needs audit.durable = true (a record must be on disk)",
                ));
            }
            Some(AuditConfig {
                file: a
                    .file
                    .clone()
                    .unwrap_or_else(|| home.join("audit").join("audit.jsonl")),
                keys_file: a
                    .keys_file
                    .clone()
                    .unwrap_or_else(|| home.join("audit-keys.json")),
                max_bytes,
                rotate_every: match &a.rotate_every {
                    None => None,
                    Some(v) => Some(access::duration(
                        "audit.rotate_every",
                        Some(v.clone()),
                        std::time::Duration::ZERO,
                        (
                            std::time::Duration::from_secs(60),
                            std::time::Duration::from_secs(366 * 86_400),
                        ),
                    )?),
                },
                stdout: a.stdout.unwrap_or(false),
                durable,
                fail_closed,
                checkpoint_every: a.checkpoint_every.unwrap_or(1000),
                capture_dir: match a.capture.unwrap_or(false) {
                    true => Some(
                        a.capture_dir
                            .clone()
                            .unwrap_or_else(|| home.join("audit").join("capture")),
                    ),
                    false => None,
                },
            })
        }
    })
}

fn encryption_config(e: &RawEncryption, store: &RawStore, home: &Path) -> EncryptionConfig {
    EncryptionConfig {
        keyring: e.keyring.clone().unwrap_or_else(|| home.join("keyring.json")),
        encrypt_keys_file: e.encrypt_keys_file.unwrap_or(false),
        encrypt_store: store.encrypt.unwrap_or(false),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInference {
    pub listen: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub public_routes: Option<Vec<String>>,
    pub allow_cidrs: Option<Vec<String>>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
    pub public: Option<bool>,
    pub allow_cidrs: Option<Vec<String>>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub requests: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    pub queue_capacity: Option<usize>,
    pub max_context: Option<usize>,
    pub default_max_tokens: Option<usize>,
    pub max_n: Option<u32>,
    pub kv_budget_bytes: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub max_batch: Option<usize>,
    pub threads: Option<usize>,
    /// Seconds; 0 turns the deadline off.
    pub request_deadline: Option<u64>,
    pub hide_reasoning: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub enabled: Option<bool>,
    pub file: Option<PathBuf>,
    pub keys_file: Option<PathBuf>,
    pub max_bytes: Option<u64>,
    pub rotate_every: Option<access::RawDuration>,
    pub stdout: Option<bool>,
    pub durable: Option<bool>,
    pub fail_closed: Option<bool>,
    pub checkpoint_every: Option<u64>,
    pub capture: Option<bool>,
    pub capture_dir: Option<PathBuf>,
}

/// The tamper-evident audit log (`[audit]`).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub file: PathBuf,
    pub keys_file: PathBuf,
    pub max_bytes: u64,
    /// Rotate the live file once it has held records this long (`None`:
    /// by size only).
    pub rotate_every: Option<std::time::Duration>,
    pub stdout: bool,
    pub durable: bool,
    pub fail_closed: bool,
    pub checkpoint_every: u64,
    /// Prompt/response capture folder, each record an envelope under the
    /// keyring; `None` = off (the default).
    pub capture_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    pub signature: Option<RawSignature>,
    /// `"embedded"` (the default: weights from the trusted store) or
    /// `"upstream"` (OpenAI-compatible servers in `upstreams`).
    pub backend: Option<String>,
    #[serde(default)]
    pub upstreams: Vec<upstream::RawUpstream>,
    pub pool: Option<upstream::RawPool>,
    /// Quantise the float weights at load: `"q8_0"`, `"q4_0"`, `"q4_k"`
    /// (alias `"q4k"`) or `"q6_k"`.
    pub quantize: Option<String>,
}

/// `[models.signature]`: who must have signed the model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignature {
    pub public_key: Option<PathBuf>,
    #[serde(default)]
    pub certificate_chain: Vec<PathBuf>,
    pub identity: Option<String>,
    pub issuer: Option<String>,
    pub file: Option<String>,
}

impl RawSignature {
    /// Load the key or certificates; errors name the key under `prefix`.
    pub fn into_policy(self, prefix: &str) -> Result<SignaturePolicy, ConfigError> {
        SignaturePolicy::from_files(
            self.public_key.as_deref(),
            &self.certificate_chain,
            self.identity,
            self.issuer,
            self.file,
        )
        .map_err(|e| {
            let key = match &e {
                PolicyError::Io { path, .. } | PolicyError::Invalid { path, .. }
                    if self.public_key.as_deref() == Some(path.as_path()) =>
                {
                    "public_key"
                }
                PolicyError::Io { .. } | PolicyError::Invalid { .. } => "certificate_chain",
                PolicyError::Config(_) => "",
            };
            let full = if key.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}.{key}")
            };
            invalid(full, e.to_string())
        })
    }
}

/// A served model and the signer it must have.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: ModelName,
    pub signature: Option<Arc<SignaturePolicy>>,
    pub backend: ModelBackend,
    /// In-situ quantisation of float weights (embedded models only).
    pub quantize: Option<moat_engine::cpu::quant::QType>,
}

/// What serves a model.
#[derive(Debug, Clone)]
pub enum ModelBackend {
    /// The embedded engine, on weights from the trusted store.
    Embedded,
    /// A pool of OpenAI-compatible upstreams.
    Upstream(Arc<moat_engine::upstream::PoolConfig>),
}

/// Where request records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestLogTarget {
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub home: PathBuf,
    pub keys_file: PathBuf,
    pub inference_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub public_routes: Vec<String>,
    pub metrics_listen: SocketAddr,
    pub metrics_public: bool,
    pub request_log: RequestLogTarget,
    pub engine: EngineOptions,
    pub models: Vec<ModelConfig>,
    /// `None` when `audit.enabled = false`.
    pub audit: Option<AuditConfig>,
    /// Allowed model sources (`[sources]`).
    pub sources: SourcePolicy,
    /// Network allowlist and TLS of each plane.
    pub inference_access: PlaneAccess,
    pub metrics_access: PlaneAccess,
    pub limits: Limits,
    pub jwt: Vec<JwtIssuerConfig>,
    /// Client-certificate principal (SAN URI, DNS, e-mail or CN) → role.
    pub mtls_roles: std::collections::BTreeMap<String, moat_guard::Role>,
    pub rate_limits: RateLimitConfig,
    /// The management plane, when `[management]` is configured.
    pub management: Option<ManagementConfig>,
    pub rbac: moat_guard::Rbac,
    /// OTLP trace export; `None` when off.
    pub tracing: Option<tracing::TracingConfig>,
    pub encryption: EncryptionConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

pub const DEFAULT_INFERENCE_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:8082";
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 100 << 20;

impl RawConfig {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Check every value. `default_home` is used when `home` is not set
    /// (the caller resolves `$MOAT_HOME` / `~/.local/share/moat`).
    pub fn validate(self, default_home: Option<PathBuf>) -> Result<Config, ConfigError> {
        let home = self
            .home
            .or(default_home)
            .ok_or_else(|| invalid("home", "not set, and neither $MOAT_HOME nor $HOME is available"))?;
        let keys_file = self.keys_file.unwrap_or_else(|| home.join("keys.json"));
        let encryption = encryption_config(&self.encryption, &self.store, &home);
        let audit = audit_config(&self.audit, &home)?;
        let addr = |key: &str, v: Option<String>, default: &str| -> Result<SocketAddr, ConfigError> {
            let s = v.unwrap_or_else(|| default.to_owned());
            s.parse()
                .map_err(|_| invalid(key, format!("{s:?} is not an address like {default}")))
        };
        let inference_listen = addr(
            "inference.listen",
            self.inference.listen,
            DEFAULT_INFERENCE_LISTEN,
        )?;
        let metrics_listen = addr("metrics.listen", self.metrics.listen, DEFAULT_METRICS_LISTEN)?;
        if inference_listen == metrics_listen && inference_listen.port() != 0 {
            return Err(invalid(
                "metrics.listen",
                format!("{metrics_listen} is also inference.listen"),
            ));
        }
        let max_body_bytes = self.inference.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if !(1024..=(64 << 20)).contains(&max_body_bytes) {
            return Err(invalid(
                "inference.max_body_bytes",
                format!("{max_body_bytes} is not between 1024 and 67108864"),
            ));
        }
        let public_routes = self
            .inference
            .public_routes
            .unwrap_or_else(|| vec!["/health".to_owned()]);
        for (i, r) in public_routes.iter().enumerate() {
            if !PUBLIC_ROUTE_CHOICES.contains(&r.as_str()) {
                return Err(invalid(
                    format!("inference.public_routes[{i}]"),
                    format!(
                        "{r:?} cannot be public (allowed: {})",
                        PUBLIC_ROUTE_CHOICES.join(", ")
                    ),
                ));
            }
        }
        let request_log = match self.log.requests.as_deref() {
            None | Some("stdout") => RequestLogTarget::Stdout,
            Some("stderr") => RequestLogTarget::Stderr,
            Some(p) if p.starts_with('/') => RequestLogTarget::File(PathBuf::from(p)),
            Some(p) => {
                return Err(invalid(
                    "log.requests",
                    format!("{p:?}: use stdout, stderr or an absolute file path"),
                ));
            }
        };
        let defaults = EngineOptions::default();
        let engine = EngineOptions {
            queue_capacity: self.engine.queue_capacity.unwrap_or(defaults.queue_capacity),
            max_context: self.engine.max_context.unwrap_or(defaults.max_context),
            default_max_tokens: self
                .engine
                .default_max_tokens
                .unwrap_or(defaults.default_max_tokens),
            max_n: self.engine.max_n.unwrap_or(defaults.max_n),
            kv_budget_bytes: self.engine.kv_budget_bytes.unwrap_or(defaults.kv_budget_bytes),
            prefill_chunk: self.engine.prefill_chunk.unwrap_or(defaults.prefill_chunk),
            max_batch: self.engine.max_batch.unwrap_or(defaults.max_batch),
            threads: self.engine.threads.unwrap_or(defaults.threads),
            request_deadline: match self.engine.request_deadline {
                None => defaults.request_deadline,
                Some(0) => None,
                Some(s) => Some(std::time::Duration::from_secs(s)),
            },
            hide_reasoning: self.engine.hide_reasoning.unwrap_or(defaults.hide_reasoning),
            // Per model (`[[models]] quantize`), set when each is loaded.
            quantize: None,
        };
        if !(1..=16).contains(&engine.max_n) {
            return Err(invalid("engine.max_n", "must be between 1 and 16"));
        }
        if engine.kv_budget_bytes < (1 << 20) {
            return Err(invalid(
                "engine.kv_budget_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if !(1..=65_536).contains(&engine.prefill_chunk) {
            return Err(invalid("engine.prefill_chunk", "must be between 1 and 65536"));
        }
        if !(1..=1024).contains(&engine.max_batch) {
            return Err(invalid("engine.max_batch", "must be between 1 and 1024"));
        }
        if !(1..=1024).contains(&engine.threads) {
            return Err(invalid("engine.threads", "must be between 1 and 1024"));
        }
        if !(1..=100_000).contains(&engine.queue_capacity) {
            return Err(invalid("engine.queue_capacity", "must be between 1 and 100000"));
        }
        if !(16..=1_048_576).contains(&engine.max_context) {
            return Err(invalid("engine.max_context", "must be between 16 and 1048576"));
        }
        if engine.default_max_tokens == 0 || engine.default_max_tokens > engine.max_context {
            return Err(invalid(
                "engine.default_max_tokens",
                "must be at least 1 and at most engine.max_context",
            ));
        }
        let mut models: Vec<ModelConfig> = Vec::new();
        for (i, m) in self.models.into_iter().enumerate() {
            let name =
                ModelName::parse(&m.name).map_err(|e| invalid(format!("models[{i}].name"), e.to_string()))?;
            if models.iter().any(|c| c.name == name) {
                return Err(invalid(
                    format!("models[{i}].name"),
                    format!("\"{name}\" is listed twice"),
                ));
            }
            let backend = match m.backend.as_deref() {
                None | Some("embedded") => {
                    if !m.upstreams.is_empty() || m.pool.is_some() {
                        return Err(invalid(
                            format!("models[{i}].upstreams"),
                            "only for backend = \"upstream\"",
                        ));
                    }
                    ModelBackend::Embedded
                }
                Some("upstream") => {
                    if m.signature.is_some() {
                        return Err(invalid(
                            format!("models[{i}].signature"),
                            "only for embedded models (an upstream's weights are not ours to verify)",
                        ));
                    }
                    ModelBackend::Upstream(Arc::new(upstream::pool(
                        &format!("models[{i}]"),
                        name.as_str(),
                        m.upstreams,
                        m.pool.unwrap_or_default(),
                    )?))
                }
                Some(other) => {
                    return Err(invalid(
                        format!("models[{i}].backend"),
                        format!("{other:?}: use \"embedded\" or \"upstream\""),
                    ));
                }
            };
            let signature = match m.signature {
                None => None,
                Some(raw) => Some(Arc::new(raw.into_policy(&format!("models[{i}].signature"))?)),
            };
            use moat_engine::cpu::quant::QType;
            let quantize = match m.quantize.as_deref() {
                None => None,
                Some(_) if matches!(backend, ModelBackend::Upstream(_)) => {
                    return Err(invalid(
                        format!("models[{i}].quantize"),
                        "only for embedded models",
                    ));
                }
                Some("q8_0") => Some(QType::Q8_0),
                Some("q4_0") => Some(QType::Q4_0),
                Some("q4_k" | "q4k") => Some(QType::Q4K),
                Some("q6_k") => Some(QType::Q6K),
                Some(other) => {
                    return Err(invalid(
                        format!("models[{i}].quantize"),
                        format!("{other:?}: use \"q8_0\", \"q4_0\", \"q4_k\" or \"q6_k\""),
                    ));
                }
            };
            models.push(ModelConfig {
                name,
                signature,
                backend,
                quantize,
            });
        }
        if models.is_empty() {
            return Err(invalid(
                "models",
                "no models configured: add [[models]] name = \"…\"",
            ));
        }
        let sources = self
            .sources
            .validate("sources")
            .map_err(|(key, message)| invalid(key, message))?;
        let inference_access =
            access::plane_access("inference", self.inference.allow_cidrs, self.inference.tls)?;
        let metrics_access = access::plane_access("metrics", self.metrics.allow_cidrs, self.metrics.tls)?;
        let limits = self.limits.validate()?;
        // First: the JWT, mTLS and rate-limit sections may name only the
        // roles it defines.
        let rbac = self.rbac.validate()?;
        let mut jwt: Vec<JwtIssuerConfig> = Vec::new();
        for (i, raw) in self.auth.jwt.into_iter().enumerate() {
            let prefix = format!("auth.jwt[{i}]");
            let issuer = raw.validate(&prefix, &rbac)?;
            if jwt.iter().any(|j| j.issuer == issuer.issuer) {
                return Err(invalid(
                    format!("{prefix}.issuer"),
                    format!("{:?} is listed twice", issuer.issuer),
                ));
            }
            jwt.push(issuer);
        }
        let mtls_roles = self.auth.mtls.validate(&rbac)?;
        let management = self.management.map(|m| m.validate(&home)).transpose()?;
        if let Some(m) = &management
            && [inference_listen, metrics_listen].contains(&m.listen)
            && m.listen.port() != 0
        {
            return Err(invalid(
                "management.listen",
                format!("{} is also the inference or metrics address", m.listen),
            ));
        }
        if !mtls_roles.is_empty()
            && inference_access.tls.is_none()
            && metrics_access.tls.is_none()
            && management.as_ref().is_none_or(|m| m.access.tls.is_none())
        {
            return Err(invalid(
                "auth.mtls.roles",
                "client certificates need TLS with client_auth on a plane",
            ));
        }
        let rate_limits = self.rate_limits.validate(&rbac)?;
        let tracing = self.tracing.validate()?;
        Ok(Config {
            management,
            rbac,
            tracing,
            encryption,
            inference_access,
            metrics_access,
            limits,
            jwt,
            mtls_roles,
            rate_limits,
            sources,
            home,
            keys_file,
            inference_listen,
            max_body_bytes,
            public_routes,
            metrics_listen,
            metrics_public: self.metrics.public.unwrap_or(false),
            request_log,
            engine,
            models,
            audit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, ConfigError> {
        RawConfig::from_toml(text, Path::new("moat.toml"))?.validate(Some("/h".into()))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = check("[[models]]\nname = \"demo\"\n").unwrap();
        assert_eq!(c.inference_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:8082");
        assert_eq!(c.keys_file, PathBuf::from("/h/keys.json"));
        assert_eq!(c.public_routes, vec!["/health"]);
    }

    #[test]
    fn encryption_store_and_capture_settings() {
        let c = check("[[models]]\nname = \"demo\"\n").unwrap();
        assert_eq!(c.encryption.keyring, PathBuf::from("/h/keyring.json"));
        assert!(!c.encryption.encrypt_keys_file && !c.encryption.encrypt_store);
        assert_eq!(
            c.audit.as_ref().unwrap().capture_dir,
            None,
            "capture is off by default"
        );

        let c = check(
            "[encryption]\nkeyring = \"/k/ring.json\"\nencrypt_keys_file = true\n[store]\nencrypt = true\n\
             [audit]\ncapture = true\n[[models]]\nname = \"demo\"\n",
        )
        .unwrap();
        assert_eq!(c.encryption.keyring, PathBuf::from("/k/ring.json"));
        assert!(c.encryption.encrypt_keys_file && c.encryption.encrypt_store);
        assert_eq!(
            c.audit.unwrap().capture_dir,
            Some(PathBuf::from("/h/audit/capture"))
        );

        let err = check("[audit]\nenabled = false\ncapture = true\n[[models]]\nname = \"demo\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("audit.capture:"), "{err}");
        let err = check("[store]\nencrypted = true\n[[models]]\nname = \"demo\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("encrypted"), "unknown keys are refused: {err}");

        // The CLI's view needs no [[models]].
        let raw =
            RawConfig::from_toml("[encryption]\nencrypt_keys_file = true\n", Path::new("m.toml")).unwrap();
        let ctx = raw.cli_context(Path::new("/store")).unwrap();
        assert_eq!(ctx.keys_file, PathBuf::from("/store/keys.json"));
        assert_eq!(ctx.audit.unwrap().file, PathBuf::from("/store/audit/audit.jsonl"));
    }

    #[test]
    fn access_settings_parse() {
        let c = check(
            "[inference]\nallow_cidrs = [\"10.0.0.0/8\"]\n[limits]\nheader_read_timeout = \"500ms\"\nidle_timeout = 5\n\
             [[auth.jwt]]\nissuer = \"https://idp\"\naudiences = [\"moat\"]\njwks_file = \"/j.json\"\n\
             role_claim = \"groups\"\nroles = { ops = \"admin\" }\n\
             [rate_limits]\nrequests_per_minute = 60\nredis_url = \"redis://127.0.0.1:6379\"\non_redis_error = \"open\"\n\
             [rate_limits.roles.admin]\nrequests_per_minute = 600\n[[models]]\nname = \"demo\"\n",
        )
        .unwrap();
        assert!(!c.inference_access.allow.allows("127.0.0.1".parse().unwrap()));
        assert!(c.metrics_access.allow.is_unrestricted());
        assert_eq!(
            c.limits.header_read_timeout,
            std::time::Duration::from_millis(500)
        );
        assert_eq!(c.limits.idle_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.jwt[0].roles.get("ops"), Some(&moat_guard::Role::admin()));
        assert_eq!(
            c.rate_limits
                .for_role(&moat_guard::Role::user())
                .requests_per_minute,
            Some(60)
        );
        assert_eq!(
            c.rate_limits
                .for_role(&moat_guard::Role::admin())
                .requests_per_minute,
            Some(600)
        );
        assert_eq!(c.rate_limits.redis_addr.as_deref(), Some("127.0.0.1:6379"));
        assert_eq!(c.rate_limits.on_redis_error, OnRedisError::Open);
        assert_eq!(
            c.rate_limits.concurrency_lease_ttl,
            std::time::Duration::from_secs(30)
        );
    }

    #[test]
    fn upstream_models_parse_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "tok-123\n").unwrap();
        let c = check(&format!(
            "[[models]]\nname = \"r1\"\nbackend = \"upstream\"\n\
             [models.pool]\nhealth_interval = \"500ms\"\ncooldown = 1\nmax_attempts = 2\nfailure_threshold = 5\n\
             [[models.upstreams]]\nurl = \"http://10.0.0.1:8000/v1\"\napi_key_file = {key:?}\nmodel = \"deepseek\"\n\
             [[models.upstreams]]\nurl = \"http://10.0.0.2:8000/v1\"\nhealth_path = \"/health\"\nread_timeout = \"5s\"\n"
        ))
        .unwrap();
        let ModelBackend::Upstream(p) = &c.models[0].backend else {
            panic!("upstream backend expected")
        };
        assert_eq!(p.upstreams.len(), 2);
        assert_eq!(p.upstreams[0].model, "deepseek");
        assert_eq!(p.upstreams[1].model, "r1", "defaults to the name here");
        assert_eq!(p.upstreams[0].health_path, "/v1/models");
        assert_eq!(p.upstreams[1].health_path, "/health");
        assert_eq!(p.health_interval, std::time::Duration::from_millis(500));
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.failure_threshold, 5);
        assert!(
            !format!("{c:?}").contains("tok-123"),
            "the key never shows in Debug"
        );

        let cases = [
            ("backend = \"remote\"", "models[0].backend"),
            ("backend = \"upstream\"", "models[0].upstreams"),
            (
                "backend = \"upstream\"\nquantize = \"q8_0\"\n[[models.upstreams]]\nurl = \"http://x/v1\"",
                "models[0].quantize",
            ),
            ("quantize = \"int3\"", "models[0].quantize"),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"ftp://x/v1\"",
                "models[0].upstreams[0].url",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"http://x/v1\"\ntls_ca_file = \"/ca.pem\"",
                "models[0].upstreams[0].tls_ca_file",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"https://x/v1\"\ntls_ca_file = \"/nonexistent/ca.pem\"",
                "models[0].upstreams[0].tls_ca_file",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"https://x/v1\"\ntls_client_key_file = \"/k.pem\"",
                "models[0].upstreams[0].tls_client_cert_file",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"http://u:p@x/v1\"",
                "models[0].upstreams[0].url",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"http://x/v1\"\napi_key_file = \"/nonexistent/k\"",
                "models[0].upstreams[0].api_key_file",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"http://x/v1\"\n[[models.upstreams]]\nurl = \"http://x/v1/\"",
                "models[0].upstreams[1].url",
            ),
            (
                "backend = \"upstream\"\n[[models.upstreams]]\nurl = \"http://x/v1\"\nconnect_timeout = \"soon\"",
                "models[0].upstreams[0].connect_timeout",
            ),
            (
                "backend = \"upstream\"\n[models.pool]\nmax_attempts = 0\n[[models.upstreams]]\nurl = \"http://x/v1\"",
                "models[0].pool.max_attempts",
            ),
            (
                "backend = \"upstream\"\n[models.pool]\ncooldown = 10\nmax_cooldown = 1\n[[models.upstreams]]\nurl = \"http://x/v1\"",
                "models[0].pool.max_cooldown",
            ),
            (
                "[[models.upstreams]]\nurl = \"http://x/v1\"",
                "models[0].upstreams",
            ),
            (
                "backend = \"upstream\"\n[models.signature]\npublic_key = \"/k\"\n[[models.upstreams]]\nurl = \"http://x/v1\"",
                "models[0].signature",
            ),
        ];
        for (text, key) in cases {
            let text = format!("[[models]]\nname = \"a\"\n{text}\n");
            let err = check(&text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[inference]\nlisten = \"nope\"\n[[models]]\nname=\"a\"",
                "inference.listen",
            ),
            (
                "[inference]\npublic_routes = [\"/v1/models\"]\n[[models]]\nname=\"a\"",
                "inference.public_routes[0]",
            ),
            (
                "[[models]]\nname=\"a\"\n[[models]]\nname=\"../x\"",
                "models[1].name",
            ),
            ("[[models]]\nname=\"a\"\n[[models]]\nname=\"a\"", "models[1].name"),
            (
                "[engine]\nmax_context = 1\n[[models]]\nname=\"a\"",
                "engine.max_context",
            ),
            ("", "models"),
            (
                "[audit]\nrotate_every = \"30s\"\n[[models]]\nname=\"a\"",
                "audit.rotate_every",
            ),
            (
                "[audit]\nrotate_every = \"daily\"\n[[models]]\nname=\"a\"",
                "audit.rotate_every",
            ),
        ];
        for (text, key) in cases {
            let err = check(text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{text:?}: {err}");
        }
        let access_cases = [
            (
                "[inference]\nallow_cidrs = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
                "inference.allow_cidrs[1]",
            ),
            ("[metrics.tls]\nkey = \"/k\"", "metrics.tls.cert"),
            (
                "[inference.tls]\ncert = \"/c\"\nkey = \"/k\"\nmin_version = \"1.1\"",
                "inference.tls.min_version",
            ),
            (
                "[inference.tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_auth = \"required\"",
                "inference.tls.client_ca",
            ),
            ("[limits]\nmax_header_bytes = 100", "limits.max_header_bytes"),
            (
                "[limits]\nheader_read_timeout = \"soon\"",
                "limits.header_read_timeout",
            ),
            ("[[auth.jwt]]\naudiences = [\"a\"]", "auth.jwt[0].issuer"),
            (
                "[[auth.jwt]]\nissuer = \"i\"\naudiences = [\"a\"]\nalgorithms = [\"none\"]",
                "auth.jwt[0].algorithms[0]",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\naudiences = [\"a\"]",
                "auth.jwt[0].jwks_file",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]",
                "auth.jwt[0].hs256_secret_file",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_file = \"/j\"\nroles = { x = \"root\" }\nrole_claim = \"r\"",
                "auth.jwt[0].roles.x",
            ),
            (
                "[auth.mtls]\nroles = { \"spiffe://a\" = \"admin\" }",
                "auth.mtls.roles",
            ),
            (
                "[rate_limits]\nrequests_per_minute = 0",
                "rate_limits.requests_per_minute",
            ),
            (
                "[rate_limits.roles.user]\nburst = 0\nrequests_per_minute = 1",
                "rate_limits.roles.user.burst",
            ),
            ("[rate_limits.roles.guest]\nburst = 1", "rate_limits.roles.guest"),
            (
                "[rate_limits]\nredis_url = \"http://x:1\"",
                "rate_limits.redis_url",
            ),
            (
                "[rate_limits]\non_redis_error = \"open\"",
                "rate_limits.on_redis_error",
            ),
            (
                "[rate_limits]\nconcurrency_lease_ttl = \"30s\"",
                "rate_limits.concurrency_lease_ttl",
            ),
            (
                "[rate_limits]\nredis_url = \"redis://127.0.0.1:1\"\nconcurrency_lease_ttl = \"10ms\"",
                "rate_limits.concurrency_lease_ttl",
            ),
            (
                "[rate_limits]\ntokens_per_minute = 10\nmax_tokens = 11",
                "rate_limits.max_tokens",
            ),
        ];
        for (text, key) in access_cases {
            let text = format!("{text}\n[[models]]\nname=\"a\"\n");
            let err = check(&text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{text:?}: {err}");
        }
        let err = check("[inference]\nlisten2 = 1\n").unwrap_err().to_string();
        assert!(err.contains("listen2"), "{err}");
    }

    #[test]
    fn custom_roles_can_be_mapped_and_limited_once_defined() {
        use moat_guard::Role;
        let ops = Role::new("ops").unwrap();
        let c = check(
            "[rbac.roles.ops]\npermissions = [\"models:read\", \"models:write\"]\n\
             [rbac.roles.auditor]\npermissions = [\"audit:read\"]\n\
             [[auth.jwt]]\nissuer = \"https://idp\"\naudiences = [\"moat\"]\njwks_file = \"/j.json\"\n\
             role_claim = \"groups\"\nroles = { sre = \"ops\", audit = \"auditor\", staff = \"user\" }\n\
             [rate_limits]\nrequests_per_minute = 60\n\
             [rate_limits.roles.ops]\nrequests_per_minute = 5\n[[models]]\nname = \"demo\"\n",
        )
        .unwrap();
        assert_eq!(c.jwt[0].roles.get("sre"), Some(&ops));
        assert_eq!(c.rate_limits.for_role(&ops).requests_per_minute, Some(5));
        // A role without its own section gets the [rate_limits] values,
        // as `user` and `admin` do.
        let auditor = Role::new("auditor").unwrap();
        assert_eq!(c.rate_limits.for_role(&auditor).requests_per_minute, Some(60));
        assert_eq!(
            c.rate_limits.for_role(&Role::admin()).requests_per_minute,
            Some(60)
        );

        let jwt =
            "[[auth.jwt]]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_file = \"/j\"\nrole_claim = \"r\"\n";
        let cases = [
            // Not a role name at all.
            (
                format!("{jwt}roles = {{ x = \"Ops\" }}"),
                "auth.jwt[0].roles.x",
                "lower-case",
            ),
            // A name, but no [rbac.roles.ops] defines it.
            (
                format!("{jwt}roles = {{ x = \"ops\" }}"),
                "auth.jwt[0].roles.x",
                "not defined",
            ),
            (
                "[auth.mtls]\nroles = { \"spiffe://a\" = \"ops\" }".to_owned(),
                "auth.mtls.roles.\"spiffe://a\"",
                "not defined",
            ),
            (
                "[rate_limits.roles.nosuch]\nrequests_per_minute = 1".to_owned(),
                "rate_limits.roles.nosuch",
                "not defined",
            ),
            (
                "[rate_limits.roles.\"No Such\"]\nrequests_per_minute = 1".to_owned(),
                "rate_limits.roles.No Such",
                "lower-case",
            ),
            (
                "[rbac.roles.\"-ops\"]\npermissions = []".to_owned(),
                "rbac.roles.-ops",
                "lower-case",
            ),
        ];
        for (text, key, why) in cases {
            let text = format!("{text}\n[[models]]\nname=\"a\"\n");
            let err = check(&text).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{key}:")) && err.contains(why),
                "{text:?}: {err}"
            );
        }
        // Top-level values incomplete alone (a burst without a rate) are
        // fine while every role has its own rate, and an error as soon as
        // a role without a section would get them.
        let sectioned = "[rate_limits]\nburst = 2\n[rate_limits.roles.admin]\nrequests_per_minute = 600\n\
                         [rate_limits.roles.user]\nrequests_per_minute = 60\n";
        let c = check(&format!("{sectioned}[[models]]\nname=\"a\"\n")).unwrap();
        assert_eq!(c.rate_limits.for_role(&Role::user()).burst, Some(2));
        let err = check(&format!(
            "{sectioned}[rbac.roles.ops]\npermissions = []\n[[models]]\nname=\"a\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("rate_limits.burst:"), "{err}");
        // Defined in [rbac], the same mapping is accepted.
        let text = format!(
            "{jwt}roles = {{ x = \"ops\" }}\n[rbac.roles.ops]\npermissions = []\n[[models]]\nname=\"a\"\n"
        );
        assert!(check(&text).is_ok());
    }
}
