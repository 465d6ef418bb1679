//! Rate limits: GCRA (the generic cell rate algorithm) per key.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT) of the
//! next request, so it costs O(1) memory and time, has no window edges to
//! game (a fixed window allows 2× the rate across its boundary), and gives
//! an exact `Retry-After`. The same arithmetic runs in Redis as one atomic
//! script when limits are shared between replicas; this module is the local
//! implementation and the reference for that script.
//!
//! A quota of `rate` per `period` with `burst` means: requests are spaced
//! by the emission interval `T = period / rate` on average, and up to
//! `burst` may arrive back to back. A request of cost `c` (a request counts
//! 1; a token budget counts its tokens) moves the TAT by `c·T`; it is
//! refused when that would put the TAT more than `burst·T` ahead of now.

pub mod redis;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// A rate: `rate` units per `period`, with bursts of up to `burst` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub rate: u64,
    pub period: Duration,
    pub burst: u64,
}

impl Quota {
    /// `rate` per minute with a burst of `burst` (≥ 1).
    pub fn per_minute(rate: u64, burst: u64) -> Option<Self> {
        Self::new(rate, Duration::from_secs(60), burst)
    }

    /// `rate` per second with a burst of `burst` (≥ 1).
    pub fn per_second(rate: u64, burst: u64) -> Option<Self> {
        Self::new(rate, Duration::from_secs(1), burst)
    }

    /// `None` when the rate or burst is zero or the interval rounds to zero
    /// nanoseconds (a rate above 10⁹ per second).
    pub fn new(rate: u64, period: Duration, burst: u64) -> Option<Self> {
        let q = Quota { rate, period, burst };
        (rate > 0 && burst > 0 && q.interval_nanos() > 0).then_some(q)
    }

    /// The emission interval T, in nanoseconds.
    pub fn interval_nanos(&self) -> u64 {
        let period = u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX);
        period.checked_div(self.rate).unwrap_or(0)
    }
}

/// The outcome of [`Limiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `remaining` more units could be admitted right now.
    Allowed { remaining: u64 },
    /// Refused; the same request would be admitted after `retry_after`.
    Limited { retry_after: Duration },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

/// One GCRA step over a stored TAT (nanoseconds on the caller's clock).
/// Returns the decision and the new TAT to store (unchanged when limited).
pub fn gcra(tat: Option<u64>, now: u64, quota: &Quota, cost: u64) -> (Decision, Option<u64>) {
    let t = quota.interval_nanos();
    let tau = t.saturating_mul(quota.burst);
    let tat = tat.map_or(now, |x| x.max(now));
    let new_tat = tat.saturating_add(t.saturating_mul(cost));
    let allow_at = new_tat.saturating_sub(tau);
    if now < allow_at {
        let retry_after = Duration::from_nanos(allow_at - now);
        return (Decision::Limited { retry_after }, None);
    }
    // Units still admissible now: how far the new TAT is from the limit.
    let headroom = now.saturating_add(tau).saturating_sub(new_tat);
    let remaining = headroom.checked_div(t).unwrap_or(0);
    (Decision::Allowed { remaining }, Some(new_tat))
}

/// GCRA state for many keys in this process.
///
/// Keys whose TAT has fallen behind the clock carry no information (a fresh
/// key behaves the same), so [`Limiter::sweep`] drops them; memory stays
/// bounded by the number of keys active within one burst window.
#[derive(Debug, Default)]
pub struct Limiter {
    tats: Mutex<HashMap<String, u64>>,
}

impl Limiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Charges `cost` units to `key` at `now` (nanoseconds, monotonic).
    pub fn check(&self, key: &str, quota: &Quota, cost: u64, now: u64) -> Decision {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let (decision, new_tat) = gcra(tats.get(key).copied(), now, quota, cost);
        if let Some(tat) = new_tat {
            tats.insert(key.to_owned(), tat);
        }
        decision
    }

    /// Gives back `units` previously charged (a token reservation that was
    /// not used), never moving the TAT behind `now`.
    pub fn refund(&self, key: &str, quota: &Quota, units: u64, now: u64) {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tat) = tats.get_mut(key) {
            let back = quota.interval_nanos().saturating_mul(units);
            *tat = tat.saturating_sub(back).max(now);
        }
    }

    /// Forgets keys whose TAT is in the past.
    pub fn sweep(&self, now: u64) {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        tats.retain(|_, tat| *tat > now);
    }

    pub fn len(&self) -> usize {
        self.tats.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
