//! SIGTERM with 20 streams in flight: every stream ends with `[DONE]`, either
//! finished or after a `shutting_down` error once `limits.drain_timeout`
//! has passed; the process exits 0 and the audit chain verifies (its last
//! record is `server.stop`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration test helpers"
)]

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const STREAMS: usize = 20;

#[test]
fn sigterm_drains_streams_to_done_or_the_deadline_error() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("m");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, key) = create_key(&store, "user", None);
    let cfg = format!(
        "{}[engine]\nqueue_capacity = 64\n[limits]\ndrain_timeout = \"1s\"\n",
        config(&store, &["m"])
    );
    let server = Server::start(t.path(), &cfg);
    let addr = server.base.trim_start_matches("http://").to_owned();

    // Far more work than one second of decoding: most streams are still
    // running or queued when the deadline passes.
    let clients: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (addr, key) = (addr.clone(), key.clone());
            std::thread::spawn(move || stream_chat(&addr, &key, "m", 1000))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));

    let (status, ready) = get(&format!("{}/ready", server.base), Some(&key));
    assert_eq!(status, 200, "{ready}");
    let pid = server.pid();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let bodies: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let drained_in = started.elapsed();
    let log = server.log_text();
    assert_eq!(server.stop(), 0, "exit code after SIGTERM; log:\n{log}");

    let mut finished = 0;
    let mut cut = 0;
    for (i, body) in bodies.iter().enumerate() {
        assert!(body.starts_with("HTTP/1.1 200"), "stream {i}: {body:.300}");
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(
            data.last(),
            Some(&"[DONE]"),
            "stream {i} did not end with [DONE]: {body:.2000}"
        );
        if data.iter().any(|d| d.contains(r#""code":"shutting_down""#)) {
            cut += 1;
        } else {
            assert!(
                data.iter()
                    .any(|d| d.contains(r#""finish_reason":"length""#)
                        || d.contains(r#""finish_reason":"stop""#)),
                "stream {i} ended without a finish reason or the deadline error: {body:.2000}"
            );
            finished += 1;
        }
    }
    assert_eq!(finished + cut, STREAMS);
    assert!(
        cut > 0,
        "no stream reached the drain deadline; the test did not exercise it"
    );
    assert!(
        drained_in < Duration::from_secs(15),
        "draining took {drained_in:?} with a 1 s deadline"
    );
    assert!(log.contains("drain deadline passed"), "{log}");

    let file = store.join("audit/audit.jsonl");
    let o = run(&[
        "audit",
        "verify",
        &path_str(&file),
        "--keys",
        &path_str(&store.join("audit-keys.json")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let last = std::fs::read_to_string(&file).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert_eq!(last["action"], "server.stop");
}
