//! The embedded engine's scheduler behind the real binary on loopback:
//! 16 concurrent streams all complete, a client that hangs up mid-stream
//! has its compute stopped (counted in `moat_engine_cancelled_total`, the
//! KV cache drained), a full queue answers 503 with `Retry-After` at once,
//! and `n = 2` gives two choices over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A store with the demo model as "m" and an admin key.
fn setup(dir: &Path) -> (std::path::PathBuf, String) {
    let store = dir.join("store");
    let src = dir.join("src");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, admin) = create_key(&store, "admin", None);
    (store, admin)
}

fn addr(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// A metric's value for model "m" (0 when absent).
fn metric(server: &Server, key: &str, name: &str) -> f64 {
    let (_, _, body) = get_full(&format!("{}/metrics", server.metrics), Some(key));
    let text = body.as_str().unwrap_or_default().to_owned();
    let needle = format!("{name}{{model=\"m\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Open a streaming chat and read until its first content chunk; the
/// connection stays open while the returned stream lives.
fn open_stream(addr: &str, key: &str, max_tokens: u32) -> TcpStream {
    let body = format!(
        r#"{{"model":"m","stream":true,"max_tokens":{max_tokens},"temperature":1.0,"seed":3,"ignore_eos":true,"messages":[{{"role":"user","content":"count"}}]}}"#
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"") || seen.len() < 400 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    s
}

#[test]
fn sixteen_streams_complete_and_a_disconnect_stops_its_compute() {
    let t = tmp();
    let (store, admin) = setup(t.path());
    let server = Server::start(
        t.path(),
        &format!("{}[engine]\nmax_context = 4096\n", config(&store, &["m"])),
    );
    let a = addr(&server);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (a, k) = (a.clone(), admin.clone());
            std::thread::spawn(move || stream_chat(&a, &k, "m", 48))
        })
        .collect();
    for c in clients {
        let out = c.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("\"finish_reason\":\"length\""), "{out}");
        // The last event (the body is chunked: the terminating chunk follows).
        let last = out.rfind("data: ").map(|i| &out[i..]).unwrap_or_default();
        assert!(last.starts_with("data: [DONE]"), "{out}");
    }
    assert_eq!(metric(&server, &admin, "moat_engine_cancelled_total"), 0.0);

    // A long stream, dropped mid-way: the scheduler removes it before its
    // next step, so the cancel is counted and its KV cache is gone.
    let s = open_stream(&a, &admin, 3000);
    // (The gauge is written at the end of each step.)
    assert!(wait_until(Duration::from_secs(5), || {
        metric(&server, &admin, "moat_engine_kv_cache_tokens") > 0.0
    }));
    drop(s);
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric(&server, &admin, "moat_engine_cancelled_total") == 1.0
        }),
        "{}",
        server.log_text()
    );
    assert!(wait_until(Duration::from_secs(5), || {
        metric(&server, &admin, "moat_engine_kv_cache_tokens") == 0.0
    }));
    assert!(server.log_text().contains("the client went away"));
    assert_eq!(server.stop(), 0);
}

#[test]
fn a_full_queue_answers_503_with_retry_after_at_once() {
    let t = tmp();
    let (store, admin) = setup(t.path());
    let server = Server::start(
        t.path(),
        &format!(
            "{}[engine]\nmax_context = 4096\nqueue_capacity = 1\nmax_batch = 1\n",
            config(&store, &["m"])
        ),
    );
    let a = addr(&server);
    // One runs (the batch holds one sequence), one waits: the queue is full.
    let running = open_stream(&a, &admin, 3000);
    let (a2, k2) = (a.clone(), admin.clone());
    let waiting = std::thread::spawn(move || stream_chat(&a2, &k2, "m", 4));
    assert!(wait_until(Duration::from_secs(10), || {
        metric(&server, &admin, "moat_engine_queue_depth") == 1.0
    }));
    let started = Instant::now();
    let mut resp = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .header("Authorization", &format!("Bearer {admin}"))
        .header("Content-Type", "application/json")
        .send(
            json!({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    let body: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    // Hanging up on the running stream lets the waiting one through.
    drop(running);
    let out = waiting.join().unwrap();
    assert!(out.contains("data: [DONE]"), "{out}");
    assert_eq!(server.stop(), 0);
}

#[test]
fn two_choices_and_a_completion_over_http() {
    let t = tmp();
    let (store, admin) = setup(t.path());
    let server = Server::start(t.path(), &config(&store, &["m"]));
    let (status, body) = chat(
        &server.base,
        &admin,
        "m",
        json!({"n": 2, "temperature": 1.0, "seed": 4, "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        (choices[0]["index"].clone(), choices[1]["index"].clone()),
        (json!(0), json!(1))
    );
    assert_ne!(choices[0]["message"]["content"], choices[1]["message"]["content"]);
    let (status, body) = post(
        &format!("{}/v1/completions", server.base),
        Some(&admin),
        &json!({"model": "m", "prompt": "Moats are", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(server.stop(), 0);
}
