//! One replica's live state: health (from active checks), cooldown (the
//! circuit breaker fed by request failures) and load (peak-EWMA latency
//! times outstanding requests, the cost power-of-two-choices compares).
//!
//! Peak-EWMA as in Finagle and linkerd: a latency above the average replaces
//! it at once (a replica that slows down is avoided immediately), one below
//! decays it with a time-based weight, so an idle period does not leave a
//! stale average behind.

use super::config::UpstreamConfig;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How fast the latency average forgets: weight `exp(-elapsed / DECAY)`.
const DECAY: Duration = Duration::from_secs(10);
/// Assumed latency of a replica never measured: low enough that a new or
/// recovered replica gets traffic, high enough not to swamp it.
const INITIAL_LATENCY: Duration = Duration::from_millis(50);

/// The circuit breaker's settings (from the pool config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Breaker {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
    /// Consecutive uncertain failures that open the breaker.
    pub(crate) threshold: u32,
}

/// Why a replica is cooling down; a rate limit is honoured to its end even
/// when health checks pass meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CooldownCause {
    RateLimited,
    Failure,
}

#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) healthy: bool,
    /// Consecutive check results against the thresholds.
    pub(crate) check_fails: u32,
    pub(crate) check_passes: u32,
    /// Consecutive request failures (grows the cooldown).
    pub(crate) failures: u32,
    pub(crate) cooldown_until: Option<(Instant, CooldownCause)>,
    /// Peak-EWMA latency in seconds, and when it was last updated.
    pub(crate) ewma: f64,
    pub(crate) stamp: Instant,
}

pub(crate) struct Replica {
    pub(crate) config: UpstreamConfig,
    /// The URL as shown in logs and metric labels (no credentials ever).
    pub(crate) label: String,
    pub(crate) chat_uri: hyper::Uri,
    pub(crate) health_uri: hyper::Uri,
    pub(crate) auth: Option<hyper::header::HeaderValue>,
    /// This replica's own client: its connect timeout and, for https, its
    /// own trust roots and client certificate.
    pub(crate) client: super::HttpClient,
    /// Requests sent and not yet finished (a stream counts until its end).
    pub(crate) pending: AtomicUsize,
    pub(crate) live: Mutex<Live>,
}

impl Replica {
    pub(crate) fn new(config: UpstreamConfig) -> Result<Self, String> {
        let chat_uri = config
            .url
            .join(&format!("{}/chat/completions", config.url.path))?;
        let health_uri = config.url.join(&config.health_path)?;
        let auth = match &config.api_key {
            None => None,
            Some(k) => Some(
                k.header_value()
                    .ok_or_else(|| format!("{}: the API key is not a valid header value", config.url))?,
            ),
        };
        let client = client(&config)?;
        Ok(Self {
            client,
            label: config.url.to_string(),
            config,
            chat_uri,
            health_uri,
            auth,
            pending: AtomicUsize::new(0),
            live: Mutex::new(Live {
                healthy: true,
                check_fails: 0,
                check_passes: 0,
                failures: 0,
                cooldown_until: None,
                ewma: INITIAL_LATENCY.as_secs_f64(),
                stamp: Instant::now(),
            }),
        })
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Live) -> R) -> R {
        match self.live.lock() {
            Ok(mut g) => f(&mut g),
            Err(poison) => f(&mut poison.into_inner()),
        }
    }

    /// Healthy and not cooling down at `now`.
    pub(crate) fn available(&self, now: Instant) -> bool {
        self.with(|l| l.healthy && l.cooldown_until.is_none_or(|(until, _)| until <= now))
    }

    /// When this replica can be tried again, if it is cooling down.
    pub(crate) fn cooling_until(&self, now: Instant) -> Option<Instant> {
        self.with(|l| l.cooldown_until.map(|(u, _)| u).filter(|u| *u > now))
    }

    pub(crate) fn healthy(&self) -> bool {
        self.with(|l| l.healthy)
    }

    /// The load-balancing cost: expected latency times the queue it would
    /// join (outstanding requests plus this one).
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        let ewma = self.with(|l| decayed(l.ewma, now.saturating_duration_since(l.stamp)));
        ewma * (pending + 1.0)
    }

    /// A request got its first byte after `rtt`: the replica works.
    pub(crate) fn succeeded(&self, rtt: Duration, now: Instant) {
        self.with(|l| {
            l.ewma = peak_ewma(l.ewma, now.saturating_duration_since(l.stamp), rtt.as_secs_f64());
            l.stamp = now;
            l.failures = 0;
            if matches!(l.cooldown_until, Some((_, CooldownCause::Failure))) {
                l.cooldown_until = None;
            }
        });
    }

    /// A request failed on this replica. The breaker opens at once for a
    /// 429 (for `retry_after`) and for failures that prove the replica
    /// cannot answer anyone (`certain`: connection refused); for the rest
    /// (5xx, timeouts, broken bodies), which one bad request can cause,
    /// only after `b.threshold` in a row. The cooldown doubles with each
    /// further failure, up to `b.max`.
    pub(crate) fn failed(&self, certain: bool, retry_after: Option<Duration>, b: &Breaker, now: Instant) {
        self.with(|l| {
            l.failures = l.failures.saturating_add(1);
            let (wait, cause) = match retry_after {
                Some(d) => (d.min(b.max), CooldownCause::RateLimited),
                None => {
                    let from = if certain { 1 } else { b.threshold.max(1) };
                    if l.failures < from {
                        return;
                    }
                    let doubling = 1u32 << (l.failures - from).min(16);
                    (b.base.saturating_mul(doubling).min(b.max), CooldownCause::Failure)
                }
            };
            let until = now + wait;
            // Never shorten a cooldown already running (a late failure of
            // an older request must not cut a Retry-After short).
            if l.cooldown_until.is_none_or(|(u, _)| u < until) {
                l.cooldown_until = Some((until, cause));
            }
        });
    }

    /// One health-check result; returns the new state when it changed.
    pub(crate) fn checked(&self, ok: bool, fall: u32, rise: u32) -> Option<bool> {
        self.with(|l| {
            if ok {
                l.check_fails = 0;
                l.check_passes = l.check_passes.saturating_add(1);
                if !l.healthy && l.check_passes >= rise {
                    l.healthy = true;
                    // Back from the dead: failures seen while it was down
                    // say nothing about it now. A rate limit still runs out.
                    l.failures = 0;
                    if matches!(l.cooldown_until, Some((_, CooldownCause::Failure))) {
                        l.cooldown_until = None;
                    }
                    return Some(true);
                }
            } else {
                l.check_passes = 0;
                l.check_fails = l.check_fails.saturating_add(1);
                if l.healthy && l.check_fails >= fall {
                    l.healthy = false;
                    return Some(false);
                }
            }
            None
        })
    }
}

fn weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// The average as it stands `elapsed` after its last update, with no new
/// sample: it drifts back towards the initial guess, so a replica that was
/// slow once gets tried again eventually.
fn decayed(ewma: f64, elapsed: Duration) -> f64 {
    let w = weight(elapsed);
    ewma * w + INITIAL_LATENCY.as_secs_f64() * (1.0 - w)
}

pub(crate) fn peak_ewma(ewma: f64, elapsed: Duration, rtt: f64) -> f64 {
    if rtt > ewma {
        rtt
    } else {
        let w = weight(elapsed);
        ewma * w + rtt * (1.0 - w)
    }
}

/// A keep-alive client for one replica. Every URI it is given is built from
/// the configured base URL, so the configured scheme is the one spoken; an
/// https replica's connector additionally refuses plain http outright.
fn client(config: &UpstreamConfig) -> Result<super::HttpClient, String> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let tls = match &config.tls {
        Some(t) => (**t).clone(),
        None => (*super::config::tls_client_config(None, None)?).clone(),
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let connector = if config.url.is_tls() {
        builder.https_only().enable_http1().wrap_connector(http)
    } else {
        builder.https_or_http().enable_http1().wrap_connector(http)
    };
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::upstream::config::BaseUrl;

    fn replica() -> Replica {
        Replica::new(UpstreamConfig::new(
            BaseUrl::parse("http://127.0.0.1:9/v1").unwrap(),
            "m".into(),
        ))
        .unwrap()
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        assert_eq!(peak_ewma(0.1, Duration::from_secs(1), 0.5), 0.5);
        let after = peak_ewma(0.5, Duration::from_secs(10), 0.1);
        assert!(after < 0.5 && after > 0.1, "{after}");
        // Right after an update, a fast sample barely moves the average.
        let soon = peak_ewma(0.5, Duration::from_millis(1), 0.1);
        assert!(soon > 0.49, "{soon}");
    }

    #[test]
    fn cost_grows_with_pending_requests() {
        let r = replica();
        let now = Instant::now();
        let idle = r.cost(now);
        r.pending.store(3, Ordering::Relaxed);
        assert!((r.cost(now) / idle - 4.0).abs() < 0.01);
    }

    const B: Breaker = Breaker {
        base: Duration::from_secs(1),
        max: Duration::from_secs(3),
        threshold: 2,
    };

    #[test]
    fn cooldown_doubles_and_success_clears_it() {
        let r = replica();
        let now = Instant::now();
        r.failed(true, None, &B, now);
        assert_eq!(r.cooling_until(now), Some(now + B.base));
        r.failed(true, None, &B, now);
        assert_eq!(r.cooling_until(now), Some(now + 2 * B.base));
        r.failed(true, None, &B, now);
        assert_eq!(r.cooling_until(now), Some(now + B.max), "capped");
        assert!(!r.available(now));
        assert!(r.available(now + B.max));
        r.succeeded(Duration::from_millis(5), now);
        assert!(r.available(now));
    }

    #[test]
    fn uncertain_failures_open_the_breaker_only_in_a_row() {
        let r = replica();
        let now = Instant::now();
        r.failed(false, None, &B, now);
        assert!(r.available(now), "one 5xx is not a dead replica");
        r.succeeded(Duration::from_millis(5), now);
        r.failed(false, None, &B, now);
        assert!(r.available(now), "a success in between resets the count");
        r.failed(false, None, &B, now);
        assert_eq!(r.cooling_until(now), Some(now + B.base));
        r.failed(false, None, &B, now);
        assert_eq!(r.cooling_until(now), Some(now + 2 * B.base));
    }

    #[test]
    fn retry_after_survives_a_passing_health_check() {
        let r = replica();
        let now = Instant::now();
        let b = Breaker {
            max: Duration::from_secs(60),
            ..B
        };
        r.failed(false, Some(Duration::from_secs(30)), &b, now);
        assert_eq!(r.checked(false, 1, 1), Some(false));
        assert_eq!(r.checked(true, 1, 1), Some(true));
        assert!(!r.available(now), "Retry-After still runs");
        assert!(r.available(now + Duration::from_secs(30)));
    }

    #[test]
    fn health_thresholds() {
        let r = replica();
        assert_eq!(r.checked(false, 2, 2), None);
        assert_eq!(r.checked(false, 2, 2), Some(false));
        assert_eq!(r.checked(true, 2, 2), None);
        assert_eq!(r.checked(false, 2, 2), None, "a failure resets the rise count");
        assert_eq!(r.checked(true, 2, 2), None);
        assert_eq!(r.checked(true, 2, 2), Some(true));
    }
}
