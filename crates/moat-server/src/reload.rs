//! SIGHUP reload: re-read the keys file, the TLS certificates and the
//! reloadable parts of the configuration at once, without dropping a
//! connection, and record what happened in the audit log.
//!
//! What is reloadable is what can be swapped whole between two requests:
//! the keyring, each plane's TLS configuration (new handshakes use the new
//! certificate; open connections keep theirs), the rate limits, the JWT
//! issuers (`[[auth.jwt]]`), the client-certificate role map
//! (`[auth.mtls]`) and the roles (`[rbac]`). Each is held behind an `Arc`
//! that a request takes once, so a request in flight (a stream, say)
//! finishes under the version it started with. Everything else (listen
//! addresses, models, audit, engine, allowlists, tracing) is bound into
//! listeners, threads or open files at start: a change there is reported as
//! ignored (log and audit record) and needs a restart. A new configuration
//! that fails to validate changes nothing.
//!
//! New JWT issuers are loaded (JWKS files read, discovery documents and
//! JWKS fetched) on a blocking thread before anything is swapped: if one
//! cannot be loaded the reload reports `auth.jwt` as failed and the issuers
//! in force stay, so a typo in a new issuer never locks out the old ones.
//!
//! The keys file and certificates are also watched (about once a second);
//! SIGHUP is for the operator who wants the change in force now, and wants
//! to know it took.

use crate::config::Config;
use crate::state::AppState;
use crate::tls::Reloadable;
use moat_audit::{AuditRecord, Outcome, action};
use moat_guard::keys::KeyStore;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// A value replaced whole at reload. Readers take an `Arc` and keep the
/// version they started with for as long as they hold it.
pub struct Swappable<T>(RwLock<Arc<T>>);

impl<T> Swappable<T> {
    pub fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    pub fn load(&self) -> Arc<T> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poison) => poison.into_inner().clone(),
        }
    }

    pub fn store(&self, value: Arc<T>) {
        match self.0.write() {
            Ok(mut g) => *g = value,
            Err(poison) => *poison.into_inner() = value,
        }
    }
}

enum Request {
    /// Keys and certificates only.
    Files,
    /// Files, and this configuration (or why it could not be read), on
    /// behalf of `origin` (recorded as the principal, e.g. `signal:SIGHUP`).
    Config(&'static str, Box<Result<Config, String>>),
}

/// Asks the running server to reload (the CLI calls it on SIGHUP).
#[derive(Clone)]
pub struct ReloadHandle(mpsc::UnboundedSender<Request>);

impl ReloadHandle {
    /// Re-read the keys file and TLS certificates now.
    pub fn reload(&self) {
        let _ = self.0.send(Request::Files);
    }

    /// Re-read the files and apply `config`'s reloadable sections; `Err`
    /// is the reason the configuration file could not be read or
    /// validated (recorded; nothing from it is applied).
    pub fn reload_config(&self, origin: &'static str, config: Result<Config, String>) {
        let _ = self.0.send(Request::Config(origin, Box::new(config)));
    }
}

pub(crate) fn channel() -> (ReloadHandle, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ReloadHandle(tx), Receiver(rx))
}

pub(crate) struct Receiver(mpsc::UnboundedReceiver<Request>);

/// What one reload did, for the log and the audit record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub applied: Vec<String>,
    /// Changed sections that need a restart.
    pub ignored: Vec<String>,
    pub failed: Vec<String>,
}

impl ReloadReport {
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.applied.is_empty() {
            parts.push(format!("applied: {}", self.applied.join(", ")));
        }
        if !self.ignored.is_empty() {
            parts.push(format!("ignored (restart needed): {}", self.ignored.join(", ")));
        }
        if !self.failed.is_empty() {
            parts.push(format!("failed: {}", self.failed.join("; ")));
        }
        parts.join("; ")
    }
}

/// Sections of `new` that differ from `running`: `(reloadable, ignored)`,
/// as config key names. Compared through `Debug` so that no section needs
/// an equality of its own (and a field added later is compared too).
pub fn changed_sections(running: &Config, new: &Config) -> (Vec<&'static str>, Vec<&'static str>) {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let candidates: [(&'static str, bool); 4] = [
        ("rate_limits", differs(&running.rate_limits, &new.rate_limits)),
        ("auth.jwt", differs(&running.jwt, &new.jwt)),
        ("auth.mtls", differs(&running.mtls_roles, &new.mtls_roles)),
        ("rbac", differs(&running.rbac, &new.rbac)),
    ];
    let reloadable = candidates.iter().filter(|(_, d)| *d).map(|(k, _)| *k).collect();
    let fixed: [(&'static str, bool); 15] = [
        ("home", differs(&running.home, &new.home)),
        ("keys_file", differs(&running.keys_file, &new.keys_file)),
        (
            "inference.listen",
            differs(&running.inference_listen, &new.inference_listen),
        ),
        (
            "inference.max_body_bytes",
            differs(&running.max_body_bytes, &new.max_body_bytes),
        ),
        (
            "inference.public_routes",
            differs(&running.public_routes, &new.public_routes),
        ),
        (
            "inference.allow_cidrs/tls",
            differs(&running.inference_access, &new.inference_access),
        ),
        (
            "metrics.listen",
            differs(&running.metrics_listen, &new.metrics_listen),
        ),
        (
            "metrics.public",
            differs(&running.metrics_public, &new.metrics_public),
        ),
        (
            "metrics.allow_cidrs/tls",
            differs(&running.metrics_access, &new.metrics_access),
        ),
        ("log.requests", differs(&running.request_log, &new.request_log)),
        ("engine", differs(&running.engine, &new.engine)),
        ("models", differs(&running.models, &new.models)),
        ("audit", differs(&running.audit, &new.audit)),
        ("limits", differs(&running.limits, &new.limits)),
        ("tracing", differs(&running.tracing, &new.tracing)),
    ];
    let ignored = fixed.iter().filter(|(_, d)| *d).map(|(k, _)| *k).collect();
    (reloadable, ignored)
}

/// Applies reload requests one at a time.
pub(crate) struct Reloader {
    pub state: Arc<AppState>,
    pub keys: KeyStore,
    pub tls: Vec<(&'static str, Arc<Reloadable>)>,
    /// The configuration in force (its reloadable parts updated).
    pub running: Config,
}

impl Reloader {
    pub fn spawn(mut self, mut rx: Receiver) {
        tokio::spawn(async move {
            while let Some(req) = rx.0.recv().await {
                let (origin, config) = match req {
                    Request::Files => ("reload", None),
                    Request::Config(origin, c) => (origin, Some(*c)),
                };
                let report = self.apply(config).await;
                self.record(origin, &report).await;
            }
        });
    }

    async fn apply(&mut self, config: Option<Result<Config, String>>) -> ReloadReport {
        let mut report = ReloadReport::default();
        match config {
            None => {}
            Some(Err(e)) => report
                .failed
                .push(format!("config: {e} (nothing from it applied)")),
            Some(Ok(new)) => {
                let (reloadable, ignored) = changed_sections(&self.running, &new);
                report.ignored = ignored.iter().map(|s| (*s).to_owned()).collect();
                if reloadable.contains(&"rate_limits") {
                    // Local limiter state starts afresh under the new limits;
                    // Redis-held state is shared and unaffected.
                    // The keys' own limits carry over, so no request ever
                    // sees the new role limits without them.
                    let fresh = crate::ratelimit::RateLimits::new(new.rate_limits.clone());
                    fresh.inherit_key_limits(&self.state.rate.load());
                    self.state.rate.store(Arc::new(fresh));
                    self.running.rate_limits = new.rate_limits.clone();
                    report.applied.push("rate_limits".to_owned());
                }
                if reloadable.contains(&"auth.jwt") {
                    match load_issuers(&new.jwt).await {
                        Ok(jwt) => {
                            self.state.jwt.store(Arc::new(jwt));
                            self.running.jwt = new.jwt.clone();
                            report
                                .applied
                                .push(format!("auth.jwt ({} issuers)", new.jwt.len()));
                        }
                        // `running.jwt` stays: the next reload tries again.
                        Err(e) => report
                            .failed
                            .push(format!("auth.jwt: {e} (previous issuers kept)")),
                    }
                }
                if reloadable.contains(&"auth.mtls") {
                    self.state.mtls_roles.store(Arc::new(new.mtls_roles.clone()));
                    self.running.mtls_roles = new.mtls_roles.clone();
                    report
                        .applied
                        .push(format!("auth.mtls ({} identities)", new.mtls_roles.len()));
                }
                if reloadable.contains(&"rbac") {
                    self.state.rbac.store(Arc::new(new.rbac.clone()));
                    self.running.rbac = new.rbac.clone();
                    report.applied.push("rbac".to_owned());
                }
            }
        }
        match self.keys.records() {
            Ok(records) => {
                report.applied.push(format!("keys ({} keys)", records.len()));
                self.state.set_keys(records);
            }
            Err(e) => report.failed.push(format!(
                "keys file {}: {e} (previous keys kept)",
                self.keys.path().display()
            )),
        }
        for (plane, r) in &self.tls {
            match r.reload_if_changed(true) {
                Ok(_) => report.applied.push(format!("{plane} TLS certificate")),
                Err(e) => report
                    .failed
                    .push(format!("{plane} TLS: {e} (previous certificate kept)")),
            }
        }
        report
    }

    async fn record(&self, origin: &str, report: &ReloadReport) {
        let summary = report.summary();
        if report.failed.is_empty() {
            tracing::info!(%summary, "reloaded");
        } else {
            tracing::error!(%summary, "reload incomplete");
        }
        if !report.ignored.is_empty() {
            tracing::warn!(sections = %report.ignored.join(", "), "configuration changes that need a restart were ignored");
        }
        if let Some(log) = &self.state.audit {
            let outcome = if report.failed.is_empty() {
                Outcome::Ok
            } else {
                Outcome::Error
            };
            let mut rec = AuditRecord::new(action::CONFIG_RELOAD, outcome);
            rec.principal = Some(origin.to_owned());
            rec.reason = Some(summary);
            if let Err(e) = log.append_async(rec).await {
                tracing::error!(error = %e, "audit record of the reload not written");
            }
        }
    }
}

/// Logs a warning naming every working key whose role `rbac` does not
/// define (such a key is refused everything): called whenever the keys or
/// the roles in force change, i.e. at start, on reload and when the keys
/// file is edited.
pub fn warn_undefined_roles(rbac: &moat_guard::Rbac, records: &[moat_guard::keys::KeyRecord]) {
    let orphans = rbac.keys_with_undefined_roles(records, moat_guard::keys::now_unix());
    if orphans.is_empty() {
        return;
    }
    let keys: Vec<String> = orphans.iter().map(|r| format!("{} ({})", r.id, r.role)).collect();
    tracing::warn!(
        keys = %keys.join(", "),
        defined = %rbac.names(),
        "API keys with a role that [rbac] does not define are refused everything; define the role or revoke the keys"
    );
}

/// The issuers of `configs`, keys loaded (blocking I/O, so on a blocking
/// thread); `None` when there are none.
async fn load_issuers(
    configs: &[crate::config::JwtIssuerConfig],
) -> Result<Option<Arc<crate::auth::JwtAuth>>, String> {
    if configs.is_empty() {
        return Ok(None);
    }
    let configs = configs.to_vec();
    tokio::task::spawn_blocking(move || crate::auth::JwtAuth::load(&configs))
        .await
        .map_err(|e| format!("loading the issuers did not finish: {e}"))?
        .map(|j| Some(Arc::new(j)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::config::RawConfig;

    fn config(extra: &str) -> Config {
        let text = format!("home = \"/srv/moat\"\n[[models]]\nname = \"m\"\n{extra}");
        RawConfig::from_toml(&text, std::path::Path::new("moat.toml"))
            .unwrap()
            .validate(None)
            .unwrap()
    }

    #[test]
    fn an_identical_config_changes_nothing() {
        let a = config("[rate_limits]\nrequests_per_minute = 60\n");
        let b = config("[rate_limits]\nrequests_per_minute = 60\n");
        assert_eq!(changed_sections(&a, &b), (vec![], vec![]));
    }

    #[test]
    fn rate_limits_are_reloadable_and_the_rest_is_named_as_ignored() {
        let a = config("[rate_limits]\nrequests_per_minute = 60\n");
        let b = config(
            "[rate_limits]\nrequests_per_minute = 30\n[inference]\nlisten = \"0.0.0.0:9000\"\n\
             [limits]\ndrain_timeout = \"5s\"\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n",
        );
        let (reloadable, ignored) = changed_sections(&a, &b);
        assert_eq!(reloadable, ["rate_limits"]);
        assert_eq!(ignored, ["inference.listen", "limits", "tracing"]);
    }

    #[test]
    fn issuers_the_client_certificate_map_and_roles_are_reloadable() {
        let a = config("");
        let b = config(
            "[[auth.jwt]]\nissuer = \"https://idp\"\naudiences = [\"moat\"]\njwks_file = \"/j.json\"\n\
             [rbac.roles.user]\npermissions = [\"models:read\"]\n",
        );
        let (reloadable, ignored) = changed_sections(&a, &b);
        assert_eq!(reloadable, ["auth.jwt", "rbac"]);
        assert!(ignored.is_empty(), "{ignored:?}");
        // Set directly: a config with `[auth.mtls]` validates only with
        // TLS certificate files in place.
        let mut c = a.clone();
        c.mtls_roles.insert("spiffe://a".into(), moat_guard::Role::user());
        assert_eq!(changed_sections(&a, &c), (vec!["auth.mtls"], vec![]));
    }

    #[test]
    fn the_summary_names_each_part() {
        let r = ReloadReport {
            applied: vec!["rate_limits".into(), "keys (2 keys)".into()],
            ignored: vec!["limits".into()],
            failed: vec!["inference TLS: bad key".into()],
        };
        assert_eq!(
            r.summary(),
            "applied: rate_limits, keys (2 keys); ignored (restart needed): limits; failed: inference TLS: bad key"
        );
        assert_eq!(ReloadReport::default().summary(), "");
    }

    #[test]
    fn a_swapped_value_leaves_holders_of_the_old_one_alone() {
        let s = Swappable::new(1);
        let held = s.load();
        s.store(Arc::new(2));
        assert_eq!((*held, *s.load()), (1, 2));
    }
}
