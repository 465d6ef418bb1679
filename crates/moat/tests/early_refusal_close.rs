//! Regression test (found by bench/soak): a request refused before its body
//! arrived (401 here) was answered without `Connection: close`, then the
//! connection was closed, so a keep-alive client that reused it at once had
//! its next request fail with "server disconnected". The answer must say
//! `Connection: close`; an answered request keeps the connection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration test helpers"
)]

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const BODY: &str = r#"{"model":"absent","messages":[{"role":"user","content":"hi"}]}"#;

fn head(key: Option<&str>) -> String {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        BODY.len()
    )
}

/// Reads one response (Content-Length bodies only): (head, body).
fn read_one(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before a response head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn a_refusal_sent_before_the_body_arrived_says_connection_close() {
    let t = tmp();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let (_, key) = create_key(&store, "user", None);
    let server = Server::start(
        t.path(),
        &format!("home = \"{}\"\n[[models]]\nname = \"absent\"\n", store.display()),
    );
    let addr = server.base.trim_start_matches("http://").to_owned();

    // No key, and the body held back: the 401 leaves before it.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head(None).as_bytes()).unwrap();
    let (h, _) = read_one(&mut s);
    assert!(h.starts_with("http/1.1 401"), "{h}");
    assert!(h.contains("connection: close"), "{h}");
    s.write_all(BODY.as_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the server closes after the refusal");

    // An authenticated request (404: no such model) keeps the connection.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..2 {
        s.write_all(format!("{}{BODY}", head(Some(&key))).as_bytes())
            .unwrap();
        let (h, b) = read_one(&mut s);
        assert!(h.starts_with("http/1.1 404"), "{h}{b}");
        assert!(!h.contains("connection: close"), "{h}");
    }
    assert_eq!(server.stop(), 0);
}
