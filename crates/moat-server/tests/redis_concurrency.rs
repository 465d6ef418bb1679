//! `max_concurrent` through Redis as the server applies it, against a real
//! `redis-server` on loopback: a held slot outlives several lease TTLs
//! because it is renewed in the background, it is freed at once (not left
//! to lapse) when the request's admission is dropped, and the slot of a
//! replica that died without releasing comes back after one TTL.
//!
//! Needs `redis-server` (Debian package redis-server); with
//! MOAT_REQUIRE_REDIS=1 (set by scripts/test.sh) its absence is a failure
//! instead of a printed skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_guard::{Principal, PrincipalKind, Role};
use moat_server::config::{PrincipalLimits, RateLimitConfig};
use moat_server::ratelimit::{ConcurrencySlot, RateLimits};

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
    if Command::new("redis-server").arg("--version").output().is_err() {
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

const TTL: Duration = Duration::from_millis(300);

fn config(addr: &str) -> RateLimitConfig {
    RateLimitConfig {
        defaults: PrincipalLimits {
            max_concurrent: Some(1),
            ..Default::default()
        },
        redis_addr: Some(addr.to_owned()),
        redis_timeout: Duration::from_secs(1),
        concurrency_lease_ttl: TTL,
        ..RateLimitConfig::default()
    }
}

fn user() -> Principal {
    Principal::new(PrincipalKind::ApiKey, "k1".into(), Role::user(), None)
}

/// Polls `rl` until it admits `user()`; the time that took.
async fn admitted_after(rl: &RateLimits, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match rl.admit(&user(), false).await {
            Ok(_) => return start.elapsed(),
            Err(r) => assert_eq!(r.reason, "concurrency", "{r:?}"),
        }
        assert!(start.elapsed() < limit, "still refused after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_slot_is_renewed_past_its_ttl_and_released_at_once() {
    let Some(redis) = start_redis() else { return };
    let a = RateLimits::new(config(&redis.addr));
    let b = RateLimits::new(config(&redis.addr));
    let held = a.admit(&user(), false).await.ok().unwrap();
    assert!(matches!(held.permit, Some(ConcurrencySlot::Leased(_))));
    // Over three TTLs: only the renewals keep the lease alive.
    tokio::time::sleep(TTL * 3 + TTL / 2).await;
    let r = b.admit(&user(), false).await.err().unwrap();
    assert_eq!(r.reason, "concurrency");
    assert_eq!(r.retry_after, 1);
    assert!(!r.unavailable);
    drop(held);
    // Released, not lapsed: well within one TTL.
    let took = admitted_after(&b, TTL).await;
    assert!(took < TTL / 2, "{took:?}");
}

#[test]
fn a_crashed_replicas_slot_comes_back_after_one_ttl() {
    let Some(redis) = start_redis() else { return };
    let addr = redis.addr.clone();
    // A replica that takes the slot and dies: its runtime (and with it the
    // renewal task) goes away and nothing releases the lease.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let rl = RateLimits::new(config(&addr));
            std::mem::forget(rl.admit(&user(), false).await.ok().unwrap());
        });
    })
    .join()
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = RateLimits::new(config(&redis.addr));
        assert_eq!(b.admit(&user(), false).await.err().unwrap().reason, "concurrency");
        let took = admitted_after(&b, TTL * 3).await;
        assert!(took > TTL / 2, "admitted after {took:?}: the lease was not held");
    });
}
