//! Rate limits as the server applies them: a global requests/s cap, then
//! per principal a concurrency cap, a requests/min GCRA and a tokens/min
//! budget, with the limits of the principal's role tightened by the API
//! key's own limits (the smaller of the two, field by field).
//!
//! The arithmetic is `moat_guard::ratelimit`'s; this module chooses where
//! the state lives (this process, or Redis when `redis_url` is set so that
//! replicas share one budget), applies the fail-open/closed policy when
//! Redis does not answer, and turns decisions into 429s with an exact
//! `Retry-After`. With Redis the global cap is one budget for all replicas
//! too (the seed's "throttle above N requests/s" is about the service, not
//! one process); when Redis fails under `on_redis_error = "open"` each
//! process falls back to enforcing the whole cap locally, so a Redis outage
//! never removes the cap altogether. Concurrency (`max_concurrent`) is one
//! budget across replicas too: with Redis a slot is a lease in a sorted set
//! per principal, renewed by a background task every third of
//! `concurrency_lease_ttl` while the request runs and removed when it ends
//! (its last byte, or the client going away), so a crashed replica's slots
//! come back after one TTL. When Redis fails under "open" the slot comes
//! from this process's semaphore instead, as without Redis.
//!
//! Tokens are reserved at admission (the request's `max_tokens`, which is
//! the most it can cost) and what was not generated is given back when the
//! response ends, so a principal cannot overrun its budget with concurrent
//! long generations and is not charged for tokens it never received.

use crate::config::{OnRedisError, PrincipalLimits, RateLimitConfig};
use moat_guard::keys::KeyRecord;
use moat_guard::ratelimit::redis::{LeaseDecision, RedisLimiter};
use moat_guard::ratelimit::{Decision, Limiter, Quota};
use moat_guard::{KeyLimits, Principal, PrincipalKind, Role};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Metrics reason and error code.
    pub reason: &'static str,
    pub message: String,
    /// Whole seconds, rounded up.
    pub retry_after: u64,
    /// The limiter could not decide (Redis down, fail-closed): 503, not 429.
    pub unavailable: bool,
}

/// A concurrency slot, held until the response's last byte; dropping it
/// frees the slot.
pub enum ConcurrencySlot {
    /// This process's semaphore (no Redis, or Redis failed under "open").
    Local(OwnedSemaphorePermit),
    /// A lease in Redis shared by every replica.
    Leased(RedisLease),
}

/// A slot held in Redis: renewed in the background while held, removed on
/// drop.
pub struct RedisLease {
    redis: Arc<RedisLimiter>,
    key: String,
    id: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl RedisLease {
    fn start(redis: Arc<RedisLimiter>, key: String, id: String, ttl: Duration) -> Self {
        let renewal = {
            let (redis, key, id) = (redis.clone(), key.clone(), id.clone());
            tokio::spawn(async move {
                let every = ttl / 3;
                loop {
                    tokio::time::sleep(every).await;
                    match redis.renew_lease(&key, &id, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            // The lease lapsed (Redis unreachable for a whole
                            // TTL, or flushed). Taking it back could exceed
                            // the limit, so the request runs on uncounted.
                            tracing::warn!(lease = %id, "concurrency lease lapsed before the request ended");
                            return;
                        }
                        // Try again next period: the lease survives two
                        // missed renewals.
                        Err(e) => tracing::warn!(error = %e, "concurrency lease renewal failed"),
                    }
                }
            })
        };
        RedisLease {
            redis,
            key,
            id,
            renewal,
        }
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.renewal.abort();
        // Called from a Drop: the release runs on the runtime. Without one
        // (shutdown) the lease lapses after its TTL.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let redis = self.redis.clone();
            let key = std::mem::take(&mut self.key);
            let id = std::mem::take(&mut self.id);
            rt.spawn(async move {
                if let Err(e) = redis.release_lease(&key, &id).await {
                    tracing::warn!(error = %e, "concurrency lease release failed; it lapses after its TTL");
                }
            });
        }
    }
}

/// What admission holds until the response ends, and the headers to send.
pub struct Admission {
    pub permit: Option<ConcurrencySlot>,
    pub headers: Vec<(&'static str, String)>,
}

/// Tokens charged at admission, settled when the response ends.
pub struct TokenReservation {
    limits: Arc<RateLimits>,
    key: String,
    quota: Quota,
    reserved: u64,
    /// Tokens still available right after this reservation.
    remaining: u64,
}

impl TokenReservation {
    /// The tokens/min limit charged.
    pub fn limit(&self) -> u64 {
        self.quota.rate
    }

    /// Tokens the principal could still reserve right after this one.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Gives back what was reserved but not generated.
    pub fn settle(self, used: u64) {
        let unused = self.reserved.saturating_sub(used);
        if unused == 0 {
            return;
        }
        let limits = self.limits.clone();
        match &limits.redis {
            None => limits.local.refund(&self.key, &self.quota, unused, limits.now()),
            Some(_) => {
                // Called from a Drop: the refund runs on the runtime.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let key = self.key;
                    let quota = self.quota;
                    rt.spawn(async move {
                        if let Some(redis) = &limits.redis
                            && let Err(e) = redis.refund(&key, &quota, unused).await
                        {
                            tracing::warn!(error = %e, "token refund to redis failed");
                        }
                    });
                }
            }
        }
    }
}

pub struct RateLimits {
    config: RateLimitConfig,
    local: Limiter,
    global: Option<Quota>,
    redis: Option<Arc<RedisLimiter>>,
    /// Lease ids are this random per-instance prefix and a counter: unique
    /// across replicas without a random draw per request.
    lease_prefix: String,
    lease_counter: AtomicU64,
    concurrency: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// API key id → the key's own limits (only keys that carry some).
    key_limits: RwLock<Arc<HashMap<String, KeyLimits>>>,
    epoch: Instant,
}

/// The Redis key of the global cap (principal keys start `req:`/`tok:`).
const GLOBAL_KEY: &str = "global";

/// Whole seconds, rounded up, at least 1: a client that waits this long
/// is admitted.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_nanos()
        .div_ceil(1_000_000_000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

fn request_quota(l: &PrincipalLimits) -> Option<Quota> {
    let rpm = l.requests_per_minute?;
    Quota::per_minute(rpm, l.burst.unwrap_or((rpm / 60).max(1)))
}

fn token_quota(l: &PrincipalLimits) -> Option<Quota> {
    let tpm = l.tokens_per_minute?;
    Quota::per_minute(tpm, tpm)
}

/// 16 random bytes in hex; if the system's random source fails, the
/// process id and the time, which still differ between replicas.
fn lease_prefix() -> String {
    let mut buf = [0u8; 16];
    match getrandom::fill(&mut buf) {
        Ok(()) => hex::encode(buf),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{}-{nanos}", std::process::id())
        }
    }
}

fn concurrency_refused(max: u32) -> Refused {
    Refused {
        reason: "concurrency",
        message: format!("at most {max} concurrent requests are allowed for this principal"),
        retry_after: 1,
        unavailable: false,
    }
}

impl RateLimits {
    pub fn new(config: RateLimitConfig) -> Self {
        let redis = config
            .redis_addr
            .as_ref()
            .map(|addr| Arc::new(RedisLimiter::new(addr.clone(), "moat:rl:", config.redis_timeout)));
        RateLimits {
            global: config
                .global_requests_per_second
                .and_then(|r| Quota::per_second(r, r)),
            local: Limiter::new(),
            redis,
            lease_prefix: lease_prefix(),
            lease_counter: AtomicU64::new(0),
            concurrency: Mutex::new(HashMap::new()),
            key_limits: RwLock::new(Arc::new(HashMap::new())),
            epoch: Instant::now(),
            config,
        }
    }

    /// The limits that apply to `p`: its role's, tightened by its API
    /// key's own limits when it has any.
    /// The limits a role's principals get before any key's own.
    pub fn role_limits(&self, role: &Role) -> PrincipalLimits {
        *self.config.for_role(role)
    }

    pub fn limits_for(&self, p: &Principal) -> PrincipalLimits {
        let role = *self.config.for_role(&p.role);
        if p.kind != PrincipalKind::ApiKey {
            return role;
        }
        let keys = self.key_limits.read().unwrap_or_else(|e| e.into_inner()).clone();
        match keys.get(&p.key_id) {
            Some(k) => role.tightest(k),
            None => role,
        }
    }

    /// Takes the key limits from the keys file's records (at start and on
    /// every reload of the file).
    pub fn set_key_limits(&self, records: &[KeyRecord]) {
        let map: HashMap<String, KeyLimits> = records
            .iter()
            .filter_map(|r| r.limits.filter(|l| !l.is_empty()).map(|l| (r.id.clone(), l)))
            .collect();
        *self.key_limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
    }

    /// Takes over another instance's key limits (when SIGHUP replaces the
    /// role limits, the keys' own stay in force).
    pub fn inherit_key_limits(&self, from: &RateLimits) {
        let theirs = from.key_limits.read().unwrap_or_else(|e| e.into_inner()).clone();
        *self.key_limits.write().unwrap_or_else(|e| e.into_inner()) = theirs;
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// One GCRA step, local or in Redis, with the fail-open/closed policy.
    async fn charge(&self, key: &str, quota: &Quota, cost: u64) -> Result<Decision, Refused> {
        let Some(redis) = &self.redis else {
            return Ok(self.local.check(key, quota, cost, self.now()));
        };
        match redis.check(key, quota, cost).await {
            Ok(d) => Ok(d),
            Err(e) => match self.config.on_redis_error {
                OnRedisError::Open => {
                    tracing::warn!(error = %e, "rate limiter unavailable; admitting (on_redis_error = \"open\")");
                    Ok(Decision::Allowed { remaining: 0 })
                }
                OnRedisError::Closed => {
                    tracing::error!(error = %e, "rate limiter unavailable; refusing (on_redis_error = \"closed\")");
                    Err(Refused {
                        reason: "limiter_unavailable",
                        message: "the rate limiter is unavailable; try again shortly".into(),
                        retry_after: 1,
                        unavailable: true,
                    })
                }
            },
        }
    }

    /// The global requests/s cap: one budget in Redis for every replica
    /// when Redis is configured, else (or when Redis fails and the policy
    /// is "open") this process's own.
    async fn check_global(&self, q: &Quota) -> Result<(), Refused> {
        let decision = match &self.redis {
            None => self.local.check("\u{0}global", q, 1, self.now()),
            Some(redis) => match redis.check(GLOBAL_KEY, q, 1).await {
                Ok(d) => d,
                Err(e) => match self.config.on_redis_error {
                    OnRedisError::Open => {
                        tracing::warn!(error = %e, "global cap: redis unavailable; enforcing it in this process alone (on_redis_error = \"open\")");
                        self.local.check("\u{0}global", q, 1, self.now())
                    }
                    OnRedisError::Closed => {
                        tracing::error!(error = %e, "global cap: redis unavailable; refusing (on_redis_error = \"closed\")");
                        return Err(Refused {
                            reason: "limiter_unavailable",
                            message: "the rate limiter is unavailable; try again shortly".into(),
                            retry_after: 1,
                            unavailable: true,
                        });
                    }
                },
            },
        };
        match decision {
            Decision::Allowed { .. } => Ok(()),
            Decision::Limited { retry_after } => Err(Refused {
                reason: "global_cap",
                message: format!(
                    "the server is at its global limit of {} requests per second; retry after {:.1} s",
                    q.rate,
                    retry_after.as_secs_f64()
                ),
                retry_after: retry_after_secs(retry_after),
                unavailable: false,
            }),
        }
    }

    /// Admits one request of `p`: the global cap (when `global`: requests
    /// of the inference plane), concurrency, requests/min.
    pub async fn admit(&self, p: &Principal, global: bool) -> Result<Admission, Refused> {
        if global && let Some(q) = &self.global {
            self.check_global(q).await?;
        }
        let limits = self.limits_for(p);
        let permit = match limits.max_concurrent {
            None => None,
            Some(max) => Some(self.take_slot(p, max).await?),
        };
        let mut headers = Vec::new();
        if let Some(q) = request_quota(&limits) {
            match self.charge(&format!("req:{}", p.key_id), &q, 1).await? {
                Decision::Allowed { remaining } => {
                    headers.push(("x-ratelimit-limit-requests", q.rate.to_string()));
                    headers.push(("x-ratelimit-remaining-requests", remaining.to_string()));
                }
                Decision::Limited { retry_after } => {
                    return Err(Refused {
                        reason: "requests_per_minute",
                        message: format!(
                            "rate limit of {} requests per minute reached; retry after {:.1} s",
                            q.rate,
                            retry_after.as_secs_f64()
                        ),
                        retry_after: retry_after_secs(retry_after),
                        unavailable: false,
                    });
                }
            }
        }
        Ok(Admission { permit, headers })
    }

    /// One of `max` concurrency slots of `p`: a lease in Redis shared by
    /// every replica when Redis is configured, else (or when Redis fails
    /// under "open") a permit of this process's semaphore.
    async fn take_slot(&self, p: &Principal, max: u32) -> Result<ConcurrencySlot, Refused> {
        if let Some(redis) = &self.redis {
            let key = format!("conc:{}", p.key_id);
            let n = self.lease_counter.fetch_add(1, Ordering::Relaxed);
            let id = format!("{}:{n}", self.lease_prefix);
            let ttl = self.config.concurrency_lease_ttl;
            match redis.acquire_lease(&key, &id, u64::from(max), ttl).await {
                Ok(LeaseDecision::Acquired { .. }) => {
                    return Ok(ConcurrencySlot::Leased(RedisLease::start(
                        redis.clone(),
                        key,
                        id,
                        ttl,
                    )));
                }
                Ok(LeaseDecision::Full { .. }) => return Err(concurrency_refused(max)),
                Err(e) => match self.config.on_redis_error {
                    OnRedisError::Open => {
                        tracing::warn!(error = %e, "concurrency: redis unavailable; counting in this process alone (on_redis_error = \"open\")");
                    }
                    OnRedisError::Closed => {
                        tracing::error!(error = %e, "concurrency: redis unavailable; refusing (on_redis_error = \"closed\")");
                        return Err(Refused {
                            reason: "limiter_unavailable",
                            message: "the rate limiter is unavailable; try again shortly".into(),
                            retry_after: 1,
                            unavailable: true,
                        });
                    }
                },
            }
        }
        let sem = {
            let mut map = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
            // Keyed with the limit too: a key whose limit was changed in
            // the keys file gets a semaphore of the new size (the old one
            // empties and is swept).
            map.entry(format!("{}\u{0}{max}", p.key_id))
                .or_insert_with(|| Arc::new(Semaphore::new(max as usize)))
                .clone()
        };
        sem.try_acquire_owned()
            .map(ConcurrencySlot::Local)
            .map_err(|_| concurrency_refused(max))
    }

    /// Reserves `max_tokens` of `p`'s tokens/min budget.
    pub async fn reserve_tokens(
        self: &Arc<Self>,
        p: &Principal,
        max_tokens: u64,
    ) -> Result<Option<TokenReservation>, Refused> {
        let Some(q) = token_quota(&self.limits_for(p)) else {
            return Ok(None);
        };
        let key = format!("tok:{}", p.key_id);
        match self.charge(&key, &q, max_tokens).await? {
            Decision::Allowed { remaining } => Ok(Some(TokenReservation {
                limits: self.clone(),
                key,
                quota: q,
                reserved: max_tokens,
                remaining,
            })),
            Decision::Limited { retry_after } => Err(Refused {
                reason: "tokens_per_minute",
                message: format!(
                    "token limit of {} per minute reached (this request reserves max_tokens = {max_tokens}); retry after {:.1} s",
                    q.rate,
                    retry_after.as_secs_f64()
                ),
                retry_after: retry_after_secs(retry_after),
                unavailable: false,
            }),
        }
    }

    /// Drops state that no longer limits anyone (called periodically).
    pub fn sweep(&self) {
        self.local.sweep(self.now());
        let mut map = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| Arc::strong_count(s) > 1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use moat_guard::{PrincipalKind, Role};

    fn user() -> Principal {
        Principal::new(PrincipalKind::Jwt, "jwt:i#u".into(), Role::user(), None)
    }

    fn limits(l: PrincipalLimits) -> Arc<RateLimits> {
        Arc::new(RateLimits::new(RateLimitConfig {
            defaults: l,
            ..RateLimitConfig::default()
        }))
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[tokio::test]
    async fn burst_then_limited_with_retry_after() {
        let rl = limits(PrincipalLimits {
            requests_per_minute: Some(60),
            burst: Some(3),
            ..Default::default()
        });
        for _ in 0..3 {
            assert!(rl.admit(&user(), true).await.is_ok());
        }
        let r = rl.admit(&user(), true).await.err().unwrap();
        assert_eq!(r.reason, "requests_per_minute");
        assert_eq!(r.retry_after, 1);
    }

    #[tokio::test]
    async fn concurrency_permit_is_released() {
        let rl = limits(PrincipalLimits {
            max_concurrent: Some(1),
            ..Default::default()
        });
        let a = rl.admit(&user(), true).await.ok().unwrap();
        assert_eq!(rl.admit(&user(), true).await.err().unwrap().reason, "concurrency");
        drop(a);
        assert!(rl.admit(&user(), true).await.is_ok());
    }

    fn keyed(id: &str) -> Principal {
        Principal::new(PrincipalKind::ApiKey, id.into(), Role::user(), None)
    }

    fn record(id: &str, limits: Option<KeyLimits>) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            role: Role::user(),
            models: Vec::new(),
            created: 0,
            expires: None,
            revoked: None,
            secret_sha256: String::new(),
            limits,
        }
    }

    #[tokio::test]
    async fn a_keys_own_limits_tighten_its_roles_and_never_loosen_them() {
        let rl = limits(PrincipalLimits {
            requests_per_minute: Some(600),
            burst: Some(5),
            max_tokens: Some(100),
            ..Default::default()
        });
        rl.set_key_limits(&[
            record(
                "tight",
                Some(KeyLimits {
                    requests_per_minute: Some(60),
                    burst: Some(2),
                    max_tokens: Some(1000),
                    ..Default::default()
                }),
            ),
            record("plain", None),
        ]);
        let eff = rl.limits_for(&keyed("tight"));
        assert_eq!(eff.requests_per_minute, Some(60));
        assert_eq!(eff.burst, Some(2));
        // The key asks for more than its role allows: the role wins.
        assert_eq!(eff.max_tokens, Some(100));
        assert_eq!(rl.limits_for(&keyed("plain")).requests_per_minute, Some(600));
        // Enforced, not just computed: a burst of 2, then 429.
        assert!(rl.admit(&keyed("tight"), true).await.is_ok());
        assert!(rl.admit(&keyed("tight"), true).await.is_ok());
        assert_eq!(
            rl.admit(&keyed("tight"), true).await.err().unwrap().reason,
            "requests_per_minute"
        );
        for _ in 0..5 {
            assert!(rl.admit(&keyed("plain"), true).await.is_ok());
        }
        // A JWT principal whose subject happens to equal a key id gets no
        // key limits.
        let jwt = Principal::new(PrincipalKind::Jwt, "tight".into(), Role::user(), None);
        assert_eq!(rl.limits_for(&jwt).requests_per_minute, Some(600));
    }

    #[tokio::test]
    async fn the_global_cap_sheds_with_retry_after() {
        let rl = Arc::new(RateLimits::new(RateLimitConfig {
            global_requests_per_second: Some(3),
            ..RateLimitConfig::default()
        }));
        for _ in 0..3 {
            assert!(rl.admit(&user(), true).await.is_ok());
        }
        let r = rl.admit(&keyed("other"), true).await.err().unwrap();
        assert_eq!(r.reason, "global_cap");
        assert_eq!(r.retry_after, 1);
        assert!(!r.unavailable);
        assert!(r.message.contains("3 requests per second"), "{}", r.message);
        // Requests of other planes (metrics, management) are not shed.
        assert!(rl.admit(&user(), false).await.is_ok());
    }

    #[tokio::test]
    async fn global_cap_with_redis_down_follows_on_redis_error() {
        // Nothing listens on port 1 of loopback: every Redis call fails.
        let cfg = |on| RateLimitConfig {
            global_requests_per_second: Some(2),
            redis_addr: Some("127.0.0.1:1".into()),
            on_redis_error: on,
            ..RateLimitConfig::default()
        };
        let closed = RateLimits::new(cfg(OnRedisError::Closed));
        let r = closed.admit(&user(), true).await.err().unwrap();
        assert!(r.unavailable && r.reason == "limiter_unavailable", "{r:?}");
        // Open: the cap still holds, per process.
        let open = RateLimits::new(cfg(OnRedisError::Open));
        assert!(open.admit(&user(), true).await.is_ok());
        assert!(open.admit(&user(), true).await.is_ok());
        assert_eq!(
            open.admit(&user(), true).await.err().unwrap().reason,
            "global_cap"
        );
    }

    #[tokio::test]
    async fn concurrency_with_redis_down_follows_on_redis_error() {
        let cfg = |on| RateLimitConfig {
            defaults: PrincipalLimits {
                max_concurrent: Some(1),
                ..Default::default()
            },
            redis_addr: Some("127.0.0.1:1".into()),
            on_redis_error: on,
            ..RateLimitConfig::default()
        };
        let closed = RateLimits::new(cfg(OnRedisError::Closed));
        let r = closed.admit(&user(), false).await.err().unwrap();
        assert!(r.unavailable && r.reason == "limiter_unavailable", "{r:?}");
        // Open: the limit still holds, counted in this process.
        let open = RateLimits::new(cfg(OnRedisError::Open));
        let a = open.admit(&user(), false).await.ok().unwrap();
        assert!(matches!(a.permit, Some(ConcurrencySlot::Local(_))));
        assert_eq!(
            open.admit(&user(), false).await.err().unwrap().reason,
            "concurrency"
        );
        drop(a);
        assert!(open.admit(&user(), false).await.is_ok());
    }

    #[tokio::test]
    async fn unused_tokens_are_refunded() {
        let rl = limits(PrincipalLimits {
            tokens_per_minute: Some(100),
            ..Default::default()
        });
        let r = rl.reserve_tokens(&user(), 80).await.unwrap().unwrap();
        assert!(rl.reserve_tokens(&user(), 80).await.is_err());
        r.settle(10);
        // 70 came back: 10 used + 80 fits in 100.
        assert!(rl.reserve_tokens(&user(), 80).await.unwrap().is_some());
    }
}
