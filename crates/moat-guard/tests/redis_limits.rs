//! The Redis-shared GCRA against a real `redis-server` on loopback: two
//! limiters (two moat replicas) share one principal's budget; the retry
//! delay is exact; refunds; a dead Redis is an error within the timeout;
//! concurrency leases (N held, N+1 refused, release and expiry free a slot,
//! renewal keeps one alive).
//!
//! Needs `redis-server` (Debian package redis-server; scripts/test.sh
//! installs it and sets MOAT_REQUIRE_REDIS=1, which turns its absence into a
//! failure instead of a printed skip).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_guard::ratelimit::redis::{LeaseDecision, RedisLimiter};
use moat_guard::ratelimit::{Decision, Quota};

struct Redis {
    child: Child,
    addr: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let found = Command::new("redis-server").arg("--version").output().is_ok();
    if !found {
        if std::env::var_os("MOAT_REQUIRE_REDIS").is_some() {
            panic!("redis-server not found but MOAT_REQUIRE_REDIS is set");
        }
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Redis { child, addr })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn two_replicas_share_one_budget() {
    let Some(redis) = start_redis() else { return };
    rt().block_on(async {
        let a = RedisLimiter::new(&redis.addr, "moat:rl:", Duration::from_secs(2));
        let b = RedisLimiter::new(&redis.addr, "moat:rl:", Duration::from_secs(2));
        // 6 per minute with a burst of 5: five back-to-back requests, split
        // over both replicas, then a refusal with ~10 s to wait.
        let q = Quota::per_minute(6, 5).unwrap();
        let mut allowed = 0;
        let mut last = None;
        for i in 0..10 {
            let lim = if i % 2 == 0 { &a } else { &b };
            match lim.check("principal:alice", &q, 1).await.unwrap() {
                Decision::Allowed { .. } => allowed += 1,
                d @ Decision::Limited { .. } => last = Some(d),
            }
        }
        assert_eq!(allowed, 5);
        let Some(Decision::Limited { retry_after }) = last else {
            panic!("no refusal")
        };
        assert!(
            retry_after > Duration::from_millis(9_500) && retry_after <= Duration::from_secs(10),
            "{retry_after:?}"
        );
        // Another principal is unaffected.
        assert!(b.check("principal:bob", &q, 1).await.unwrap().is_allowed());
    });
}

#[test]
fn retry_after_is_honest_and_refunds_return_budget() {
    let Some(redis) = start_redis() else { return };
    rt().block_on(async {
        let lim = RedisLimiter::new(&redis.addr, "t:", Duration::from_secs(2));
        let q = Quota::per_second(20, 1).unwrap(); // one per 50 ms
        assert!(lim.check("k", &q, 1).await.unwrap().is_allowed());
        let Decision::Limited { retry_after } = lim.check("k", &q, 1).await.unwrap() else {
            panic!("second request admitted")
        };
        tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        assert!(lim.check("k", &q, 1).await.unwrap().is_allowed());

        let tokens = Quota::per_minute(1000, 1000).unwrap();
        assert!(lim.check("tok", &tokens, 900).await.unwrap().is_allowed());
        assert!(!lim.check("tok", &tokens, 900).await.unwrap().is_allowed());
        lim.refund("tok", &tokens, 850).await.unwrap();
        assert!(lim.check("tok", &tokens, 900).await.unwrap().is_allowed());
    });
}

#[test]
fn a_dead_redis_is_an_error_within_the_timeout() {
    let Some(redis) = start_redis() else { return };
    let addr = redis.addr.clone();
    rt().block_on(async {
        let lim = RedisLimiter::new(&addr, "d:", Duration::from_millis(300));
        let q = Quota::per_second(10, 10).unwrap();
        assert!(lim.check("k", &q, 1).await.is_ok());
        drop(redis);
        let start = Instant::now();
        let err = lim.check("k", &q, 1).await.unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert!(err.contains(&addr), "{err}");
    });
}

#[test]
fn concurrency_leases_are_one_budget_across_replicas() {
    let Some(redis) = start_redis() else { return };
    rt().block_on(async {
        let a = RedisLimiter::new(&redis.addr, "moat:rl:", Duration::from_secs(2));
        let b = RedisLimiter::new(&redis.addr, "moat:rl:", Duration::from_secs(2));
        let ttl = Duration::from_secs(30);
        assert_eq!(
            a.acquire_lease("conc:k", "a1", 2, ttl).await.unwrap(),
            LeaseDecision::Acquired { remaining: 1 }
        );
        assert_eq!(
            b.acquire_lease("conc:k", "b1", 2, ttl).await.unwrap(),
            LeaseDecision::Acquired { remaining: 0 }
        );
        // The third, on either replica, is refused; the wait reported is
        // the time until the oldest lease would lapse.
        let LeaseDecision::Full { expires_in } = b.acquire_lease("conc:k", "b2", 2, ttl).await.unwrap()
        else {
            panic!("third lease granted")
        };
        assert!(
            expires_in > Duration::from_secs(28) && expires_in <= ttl,
            "{expires_in:?}"
        );
        assert!(matches!(
            a.acquire_lease("conc:k", "a2", 2, ttl).await.unwrap(),
            LeaseDecision::Full { .. }
        ));
        // Another principal has its own slots.
        assert!(matches!(
            a.acquire_lease("conc:other", "o1", 2, ttl).await.unwrap(),
            LeaseDecision::Acquired { .. }
        ));
        // Releasing on replica A frees the slot for replica B; releasing
        // twice is harmless and frees nothing more.
        a.release_lease("conc:k", "a1").await.unwrap();
        a.release_lease("conc:k", "a1").await.unwrap();
        assert!(matches!(
            b.acquire_lease("conc:k", "b2", 2, ttl).await.unwrap(),
            LeaseDecision::Acquired { remaining: 0 }
        ));
        assert!(matches!(
            b.acquire_lease("conc:k", "b3", 2, ttl).await.unwrap(),
            LeaseDecision::Full { .. }
        ));
    });
}

#[test]
fn an_expired_lease_is_pruned_and_a_renewed_one_is_kept() {
    let Some(redis) = start_redis() else { return };
    rt().block_on(async {
        let lim = RedisLimiter::new(&redis.addr, "e:", Duration::from_secs(2));
        let short = Duration::from_millis(300);
        // "crashed" is never renewed nor released (its replica died);
        // "alive" is renewed while it runs.
        assert!(matches!(
            lim.acquire_lease("k", "crashed", 2, short).await.unwrap(),
            LeaseDecision::Acquired { .. }
        ));
        assert!(matches!(
            lim.acquire_lease("k", "alive", 2, short).await.unwrap(),
            LeaseDecision::Acquired { .. }
        ));
        assert!(matches!(
            lim.acquire_lease("k", "new", 2, short).await.unwrap(),
            LeaseDecision::Full { .. }
        ));
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(lim.renew_lease("k", "alive", short).await.unwrap());
        }
        // 400 ms on: "crashed" lapsed and is pruned by the next acquire,
        // "alive" still holds its slot.
        assert!(matches!(
            lim.acquire_lease("k", "new", 2, short).await.unwrap(),
            LeaseDecision::Acquired { remaining: 0 }
        ));
        assert!(matches!(
            lim.acquire_lease("k", "late", 2, short).await.unwrap(),
            LeaseDecision::Full { .. }
        ));
        // A lapsed lease is not taken back by a renewal.
        assert!(!lim.renew_lease("k", "crashed", short).await.unwrap());
        // When every lease lapses, every slot comes back.
        tokio::time::sleep(short + Duration::from_millis(100)).await;
        assert!(matches!(
            lim.acquire_lease("k", "after", 1, short).await.unwrap(),
            LeaseDecision::Acquired { remaining: 0 }
        ));
    });
}
