//! The Redis-shared GCRA against a real `redis-server` on loopback: two
//! limiters (two moat replicas) share one principal's budget; the retry
//! delay is exact; refunds; a dead Redis is an error within the timeout.
//!
//! Needs `redis-server` (Debian package redis-server; scripts/test.sh
//! installs it and sets MOAT_REQUIRE_REDIS=1, which turns its absence into a
//! failure instead of a printed skip).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_guard::ratelimit::redis::RedisLimiter;
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
