//! `[[models]] backend = "upstream"`: the keys of a model served by
//! OpenAI-compatible upstreams (`[[models.upstreams]]`, `[models.pool]`),
//! checked into a [`PoolConfig`] with every error naming its key. API key
//! files are read here, so `moat serve --check` proves they are readable;
//! the key itself only ever lives in a redacting type.

use super::access::{RawDuration, duration};
use super::{ConfigError, invalid};
use moat_engine::upstream::{ApiKey, BaseUrl, PoolConfig, UpstreamConfig};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `[[models.upstreams]]`: one replica.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    /// The model's name at the upstream; defaults to the model's name here.
    pub model: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub health_path: Option<String>,
    pub connect_timeout: Option<RawDuration>,
    pub response_timeout: Option<RawDuration>,
    pub read_timeout: Option<RawDuration>,
    /// PEM CA bundle an https upstream's certificate must chain to
    /// (default: Mozilla's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate chain and key to present to an https upstream that
    /// asks for mutual TLS; both or neither.
    pub tls_client_cert_file: Option<PathBuf>,
    pub tls_client_key_file: Option<PathBuf>,
}

/// `[models.pool]`: how the replicas are checked, cooled down and retried.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub health_interval: Option<RawDuration>,
    pub health_timeout: Option<RawDuration>,
    pub unhealthy_threshold: Option<u32>,
    pub healthy_threshold: Option<u32>,
    pub cooldown: Option<RawDuration>,
    pub max_cooldown: Option<RawDuration>,
    pub failure_threshold: Option<u32>,
    pub max_attempts: Option<usize>,
}

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);

fn upstream(prefix: &str, name: &str, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
    let url = raw.url.ok_or_else(|| {
        invalid(
            format!("{prefix}.url"),
            "missing (like \"http://127.0.0.1:8000/v1\")",
        )
    })?;
    let url = BaseUrl::parse(&url).map_err(|e| invalid(format!("{prefix}.url"), e))?;
    let model = raw.model.unwrap_or_else(|| name.to_owned());
    if model.is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
        return Err(invalid(
            format!("{prefix}.model"),
            "must be 1 to 256 printable characters",
        ));
    }
    let mut u = UpstreamConfig::new(url, model);
    if let Some(p) = raw.health_path {
        if !p.starts_with('/') || p.contains(['?', '#']) || p.chars().any(|c| c.is_control() || c == ' ') {
            return Err(invalid(
                format!("{prefix}.health_path"),
                format!("{p:?}: an absolute path like \"/health\" or \"/v1/models\""),
            ));
        }
        u.health_path = p;
    }
    if let Some(path) = raw.api_key_file {
        u.api_key = Some(ApiKey::from_file(&path).map_err(|e| invalid(format!("{prefix}.api_key_file"), e))?);
    }
    u.connect_timeout = duration(
        &format!("{prefix}.connect_timeout"),
        raw.connect_timeout,
        u.connect_timeout,
        (MS, Duration::from_secs(60)),
    )?;
    u.response_timeout = duration(
        &format!("{prefix}.response_timeout"),
        raw.response_timeout,
        u.response_timeout,
        (MS, HOUR),
    )?;
    u.read_timeout = duration(
        &format!("{prefix}.read_timeout"),
        raw.read_timeout,
        u.read_timeout,
        (MS, HOUR),
    )?;
    let tls_keys = [
        ("tls_ca_file", raw.tls_ca_file.is_some()),
        ("tls_client_cert_file", raw.tls_client_cert_file.is_some()),
        ("tls_client_key_file", raw.tls_client_key_file.is_some()),
    ];
    if !u.url.is_tls() {
        if let Some((key, _)) = tls_keys.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("{prefix}.{key}"),
                "applies to https:// upstreams only; this url is http://",
            ));
        }
        return Ok(u);
    }
    let client = match (&raw.tls_client_cert_file, &raw.tls_client_key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => {
            return Err(invalid(
                format!("{prefix}.tls_client_cert_file"),
                "tls_client_cert_file and tls_client_key_file go together",
            ));
        }
    };
    let key = if client.is_some() {
        "tls_client_cert_file"
    } else {
        "tls_ca_file"
    };
    u.tls = Some(
        moat_engine::upstream::tls_client_config(raw.tls_ca_file.as_deref(), client)
            .map_err(|e| invalid(format!("{prefix}.{key}"), e))?,
    );
    Ok(u)
}

/// Check a model's upstream keys (`prefix` is `models[i]`).
pub fn pool(
    prefix: &str,
    name: &str,
    upstreams: Vec<RawUpstream>,
    raw: RawPool,
) -> Result<PoolConfig, ConfigError> {
    if upstreams.is_empty() {
        return Err(invalid(
            format!("{prefix}.upstreams"),
            "backend = \"upstream\" needs at least one [[models.upstreams]] with a url",
        ));
    }
    let mut list = Vec::with_capacity(upstreams.len());
    for (j, u) in upstreams.into_iter().enumerate() {
        let u = upstream(&format!("{prefix}.upstreams[{j}]"), name, u)?;
        if list.iter().any(|o: &UpstreamConfig| o.url == u.url) {
            return Err(invalid(
                format!("{prefix}.upstreams[{j}].url"),
                format!("{} is listed twice", u.url),
            ));
        }
        list.push(u);
    }
    let mut p = PoolConfig::new(name.to_owned(), list);
    let key = |k: &str| format!("{prefix}.pool.{k}");
    p.health_interval = duration(
        &key("health_interval"),
        raw.health_interval,
        p.health_interval,
        (Duration::from_millis(10), HOUR),
    )?;
    p.health_timeout = duration(
        &key("health_timeout"),
        raw.health_timeout,
        p.health_timeout,
        (MS, Duration::from_secs(60)),
    )?;
    p.cooldown = duration(&key("cooldown"), raw.cooldown, p.cooldown, (MS, HOUR))?;
    p.max_cooldown = duration(&key("max_cooldown"), raw.max_cooldown, p.max_cooldown, (MS, HOUR))?;
    if p.max_cooldown < p.cooldown {
        return Err(invalid(key("max_cooldown"), "must be at least pool.cooldown"));
    }
    for (k, v, dst) in [
        (
            "unhealthy_threshold",
            raw.unhealthy_threshold,
            &mut p.unhealthy_threshold,
        ),
        (
            "healthy_threshold",
            raw.healthy_threshold,
            &mut p.healthy_threshold,
        ),
        (
            "failure_threshold",
            raw.failure_threshold,
            &mut p.failure_threshold,
        ),
    ] {
        if let Some(v) = v {
            if !(1..=100).contains(&v) {
                return Err(invalid(key(k), format!("{v} is not between 1 and 100")));
            }
            *dst = v;
        }
    }
    if let Some(n) = raw.max_attempts {
        if !(1..=16).contains(&n) {
            return Err(invalid(
                key("max_attempts"),
                format!("{n} is not between 1 and 16"),
            ));
        }
        p.max_attempts = n;
    }
    Ok(p)
}
