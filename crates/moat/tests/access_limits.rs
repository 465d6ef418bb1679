//! Access control, second part, against the real binary on loopback:
//! per-key limits set with `moat keys create --rpm …`, the global
//! requests/s cap (local, and shared by two processes through a real
//! `redis-server`), a key's `max_concurrent` shared by two processes the
//! same way, OIDC discovery with key rotation against a local
//! issuer fixture serving real keys, and the accounting of refusals: every
//! refusal (network, TLS, request head, auth, RBAC, limits, rate) is
//! checked in `moat_rejections_total{stage,reason}` and in the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use p256::ecdsa::signature::Signer as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn metrics_text(server: &Server, admin: &str) -> String {
    let (status, _, body) = get_full(&format!("{}/metrics", server.metrics), Some(admin));
    assert_eq!(status, 200, "{body}");
    body.as_str().unwrap().to_owned()
}

/// Waits until the counter reaches `at_least`; panics with the metrics.
fn expect_rejection(server: &Server, admin: &str, stage: &str, reason: &str, at_least: u64) {
    let ok = wait_until(Duration::from_secs(5), || {
        rejections(&metrics_text(server, admin), stage, reason) >= at_least
    });
    assert!(
        ok,
        "moat_rejections_total{{stage={stage:?},reason={reason:?}}} < {at_least}:\n{}",
        metrics_text(server, admin)
    );
}

/// The audit records (after the server stopped, so all are on disk).
fn audit_records(store: &Path) -> Vec<Value> {
    std::fs::read_to_string(store.join("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn has_audit(recs: &[Value], action: &str, stage: &str, reason: &str) -> bool {
    recs.iter().any(|r| {
        r["action"] == action && r["outcome"] == "denied" && r["stage"] == stage && r["reason"] == reason
    })
}

fn store() -> (tempfile::TempDir, PathBuf, String, String) {
    let t = tmp();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let (_, admin) = create_key(&store, "admin", None);
    let (_, user) = create_key(&store, "user", None);
    (t, store, admin, user)
}

// ---------------------------------------------------------------- per-key limits

#[test]
fn per_key_limits_from_the_cli_tighten_the_role_and_are_enforced() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, plain) = create_key(&store, "user", None);
    let (rc, id, limited, err) = create_key_with(
        &store,
        "user",
        &["--rpm", "60", "--burst", "2", "--max-tokens", "5", "--max-n", "1"],
    );
    assert_eq!(rc, 0, "{err}");
    // Stored with the key, only the fields given.
    let file: Value = serde_json::from_slice(&std::fs::read(store.join("keys.json")).unwrap()).unwrap();
    let rec = file["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(
        rec["limits"],
        json!({"requests_per_minute": 60, "burst": 2, "max_tokens": 5, "max_n": 1})
    );
    // A limit no request could pass is refused before any key is made.
    let before = file["keys"].as_array().unwrap().len();
    let (rc, _, secret, err) = create_key_with(&store, "user", &["--rpm", "0"]);
    assert_ne!(rc, 0);
    assert!(secret.is_empty(), "a key was printed: {secret}");
    assert!(err.contains("requests_per_minute"), "{err}");
    let (rc, _, _, err) = create_key_with(&store, "user", &["--burst", "3"]);
    assert_ne!(rc, 0);
    assert!(err.contains("burst needs requests_per_minute"), "{err}");
    let file: Value = serde_json::from_slice(&std::fs::read(store.join("keys.json")).unwrap()).unwrap();
    assert_eq!(file["keys"].as_array().unwrap().len(), before);
    let list = stdout(&run(&["keys", "list", "--store", store.to_str().unwrap()]));
    let line = list.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(line.ends_with("rpm=60,burst=2,max_tokens=5,max_n=1"), "{list}");

    // The role allows 600/min and max_tokens 50: the key's 60/min burst 2
    // and max_tokens 5 are tighter and win; the plain key gets the role's.
    let config = format!(
        "home = \"{}\"\n[[models]]\nname = \"m\"\n[rate_limits.roles.user]\nrequests_per_minute = 600\nburst = 10\nmax_tokens = 50\n",
        store.display()
    );
    let server = Server::start(t.path(), &config);
    let url = format!("{}/v1/models", server.base);
    let (status, headers, _) = get_full(&url, Some(&limited));
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-ratelimit-limit-requests").unwrap(), "60");
    assert_eq!(get_full(&url, Some(&limited)).0, 200);
    let (status, headers, body) = get_full(&url, Some(&limited));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "requests_per_minute");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    for _ in 0..5 {
        assert_eq!(
            get_full(&url, Some(&plain)).0,
            200,
            "the plain key got the key's limit"
        );
    }
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = chat(&server.base, &limited, "m", json!({"max_tokens": 6}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens limit of 5"),
        "{body}"
    );
    let (status, body) = chat(&server.base, &plain, "m", json!({"max_tokens": 6}));
    assert_eq!(status, 200, "the role allows max_tokens 6: {body}");
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = chat(&server.base, &limited, "m", json!({"max_tokens": 5, "n": 2}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_n limit of 1"),
        "{body}"
    );
    let (status, body) = chat(&server.base, &plain, "m", json!({"max_tokens": 51}));
    assert_eq!(status, 400, "the role's own cap still applies: {body}");
}

// ---------------------------------------------------------------- global cap

#[test]
fn the_global_cap_sheds_every_principal_with_retry_after() {
    let (t, store, admin, user) = store();
    let config = format!(
        "{}[rate_limits]\nglobal_requests_per_second = 5\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    let url = format!("{}/v1/models", server.base);
    let mut statuses = Vec::new();
    let start = Instant::now();
    for i in 0..10 {
        let key = if i % 2 == 0 { &user } else { &admin };
        let (status, headers, body) = get_full(&url, Some(key));
        if status == 429 {
            assert_eq!(body["error"]["code"], "global_cap", "{body}");
            assert_eq!(headers.get("retry-after").unwrap(), "1");
        }
        statuses.push(status);
    }
    let took = start.elapsed();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // A burst of 5, plus one per 200 ms the loop took.
    let allowed = 5 + (took.as_millis() / 200) as usize;
    assert!(ok >= 5 && ok <= allowed && ok < 10, "{statuses:?} in {took:?}");
    assert!(statuses.contains(&429));
    // The cap recovers at its rate.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get_full(&url, Some(&user)).0, 200);
    // The metrics plane is not under the cap: a burst of scrapes while
    // the inference plane sheds load all succeed.
    let shed = (0..20).any(|_| get_full(&url, Some(&user)).0 == 429);
    assert!(shed, "the cap never shed");
    for _ in 0..10 {
        metrics_text(&server, &admin);
    }
    let text = metrics_text(&server, &admin);
    assert!(rejections(&text, "rate_limit", "global_cap") >= 4, "{text}");
}

#[test]
fn the_global_cap_is_one_budget_for_two_replicas_through_redis() {
    let Some(redis) = start_redis() else { return };
    let (t, store, admin, user) = store();
    // 4 per second for the whole service: without sharing, each replica
    // would admit 4 and the pair 8.
    let config = format!(
        "{}[rate_limits]\nglobal_requests_per_second = 4\nredis_url = \"redis://{}\"\nredis_timeout = \"1s\"\n\
         [audit]\nenabled = false\n",
        base_config(&store),
        redis.addr
    );
    let a_dir = t.path().join("a");
    let b_dir = t.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let a = Server::start(&a_dir, &config);
    let b = Server::start(&b_dir, &config);
    // Let the metrics reads above (none yet) and start-up settle, then go.
    std::thread::sleep(Duration::from_millis(1100));
    let start = Instant::now();
    let mut per_replica = [(0, 0), (0, 0)];
    for i in 0..8 {
        let (base, slot) = if i % 2 == 0 { (&a.base, 0) } else { (&b.base, 1) };
        let key = if i % 4 < 2 { &user } else { &admin };
        match get_full(&format!("{base}/v1/models"), Some(key)).0 {
            200 => per_replica[slot].0 += 1,
            429 => per_replica[slot].1 += 1,
            s => panic!("status {s}"),
        }
    }
    let took = start.elapsed();
    let ok = per_replica[0].0 + per_replica[1].0;
    // 4 at once, plus one per 250 ms the loop took.
    let allowed = 4 + (took.as_millis() / 250) as usize;
    assert!(
        ok >= 4 && ok <= allowed && ok < 8,
        "admitted {ok} of 8 in {took:?} across replicas {per_replica:?}"
    );
    assert!(per_replica[0].1 + per_replica[1].1 > 0, "{per_replica:?}");
    let total = rejections(&metrics_text(&a, &admin), "rate_limit", "global_cap")
        + rejections(&metrics_text(&b, &admin), "rate_limit", "global_cap");
    assert!(total >= (8 - ok) as u64, "{total}");

    // Redis gone, on_redis_error defaults to "closed": 503, never a pass.
    drop(redis);
    let (status, _, body) = get_full(&format!("{}/v1/models", a.base), Some(&user));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
}

/// POSTs a streamed chat completion on its own thread; joins to its status
/// once the stream has ended.
fn stream_in_background(base: &str, key: &str, max_tokens: u64) -> std::thread::JoinHandle<u16> {
    let (base, key) = (base.to_owned(), key.to_owned());
    std::thread::spawn(move || {
        chat(
            &base,
            &key,
            "m",
            // Fixed length: the random demo model may emit its EOS early.
            json!({"max_tokens": max_tokens, "stream": true, "ignore_eos": true}),
        )
        .0
    })
}

#[test]
fn max_concurrent_is_one_budget_for_two_replicas_through_redis() {
    let Some(redis) = start_redis() else { return };
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (code, _, key, err) = create_key_with(&store, "user", &["--max-concurrent", "2"]);
    assert_eq!(code, 0, "{err}");
    let config = format!(
        "home = \"{}\"\n[[models]]\nname = \"m\"\n[engine]\nmax_context = 4096\n\
         [rate_limits]\nredis_url = \"redis://{}\"\nredis_timeout = \"1s\"\n[audit]\nenabled = false\n",
        store.display(),
        redis.addr
    );
    let a_dir = t.path().join("a");
    let b_dir = t.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let a = Server::start(&a_dir, &config);
    let b = Server::start(&b_dir, &config);
    // Two streams on replica A hold both of the key's slots: a short one
    // (1500 tokens: over a second even for the batching engine on the tiny
    // demo model) and a long one (4000 tokens, the context's worth).
    let short = stream_in_background(&a.base, &key, 1500);
    std::thread::sleep(Duration::from_millis(100));
    let long = stream_in_background(&a.base, &key, 4000);
    std::thread::sleep(Duration::from_millis(400));
    // The third, on replica B, is refused: without sharing B would admit it.
    assert!(!short.is_finished(), "the short stream ended before the check");
    let (status, body) = chat(&b.base, &key, "m", json!({"max_tokens": 5}));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "concurrency", "{body}");
    let resp = agent()
        .post(format!("{}/v1/chat/completions", b.base))
        .header("Authorization", &format!("Bearer {key}"))
        .header("Content-Type", "application/json")
        .send(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
                .to_string(),
        )
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    // When the short stream ends its slot comes back (released, not left to
    // lapse: the lease TTL is 30 s) and B admits while A's long stream runs.
    assert_eq!(short.join().unwrap(), 200);
    let admitted = wait_until(Duration::from_secs(3), || {
        chat(&b.base, &key, "m", json!({"max_tokens": 5})).0 == 200
    });
    assert!(admitted, "replica B still refuses after a slot was released");
    assert!(!long.is_finished(), "the long stream ended before B was admitted");

    // A client that goes away mid-stream frees its slot too: a stream on B
    // takes the second slot, A refuses, the client hangs up, A admits.
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3000,
        "stream": true,
        "ignore_eos": true,
    })
    .to_string();
    // The slot of B's last short answer is released just after its body
    // ends (asynchronously, by design): retry a 429 for a moment.
    let open = || {
        let mut tcp = TcpStream::connect(b.base.trim_start_matches("http://")).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            tcp,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data:") && !seen.starts_with(b"HTTP/1.1 429") {
            let n = tcp.read(&mut buf).unwrap();
            assert!(n > 0, "stream closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        (tcp, seen)
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let (tcp, seen) = loop {
        let (tcp, seen) = open();
        if !seen.starts_with(b"HTTP/1.1 429") || Instant::now() > deadline {
            break (tcp, seen);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    let (status, body) = chat(&a.base, &key, "m", json!({"max_tokens": 5}));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "concurrency", "{body}");
    drop(tcp);
    let admitted = wait_until(Duration::from_secs(5), || {
        chat(&a.base, &key, "m", json!({"max_tokens": 5})).0 == 200
    });
    assert!(admitted, "replica A still refuses after B's client hung up");
    assert_eq!(long.join().unwrap(), 200);
}

// ---------------------------------------------------------------- OIDC discovery

fn jwk(seed: u8, kid: &str) -> Value {
    let point = es_key(seed).verifying_key().to_sec1_point(false);
    let b = point.as_bytes();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
           "x": URL_SAFE_NO_PAD.encode(&b[1..33]), "y": URL_SAFE_NO_PAD.encode(&b[33..65])})
}

fn token(seed: u8, kid: &str, iss: &str) -> String {
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let claims = json!({"iss": iss, "sub": "alice", "aud": "moat", "exp": now() + 600, "iat": now()});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: p256::ecdsa::Signature = es_key(seed).sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// A local OpenID provider: `/.well-known/openid-configuration` names
/// `/jwks`, which serves the current key set; requests counted per path.
struct Issuer {
    url: String,
    jwks: Arc<Mutex<Value>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Issuer {
    /// `doc_issuer`: the `issuer` the discovery document claims (the real
    /// URL when `None`).
    fn start(keys: Vec<Value>, doc_issuer: Option<&str>) -> Issuer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(json!({ "keys": keys })));
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let (j, h, base) = (jwks.clone(), hits.clone(), url.clone());
        let claimed = doc_issuer.unwrap_or(&url).to_owned();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                *h.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                let (status, body) = match path.as_str() {
                    "/.well-known/openid-configuration" => (
                        "200 OK",
                        json!({"issuer": claimed, "jwks_uri": format!("{base}/jwks"),
                               "id_token_signing_alg_values_supported": ["ES256"]})
                        .to_string(),
                    ),
                    "/jwks" => ("200 OK", j.lock().unwrap().to_string()),
                    _ => ("404 Not Found", "{}".to_owned()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes());
            }
        });
        Issuer { url, jwks, hits }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn serve_keys(&self, keys: Vec<Value>) {
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    fn config(&self, store: &Path, extra: &str) -> String {
        format!(
            "{}[[auth.jwt]]\nissuer = \"{}\"\naudiences = [\"moat\"]\nalgorithms = [\"ES256\"]\n\
             discovery = true\nallow_loopback = true\n{extra}",
            base_config(store),
            self.url
        )
    }
}

const DISCOVERY: &str = "/.well-known/openid-configuration";

#[test]
fn oidc_discovery_follows_a_key_rotation_and_a_flood_of_unknown_kids_costs_one_fetch() {
    let (t, store, admin, _) = store();
    let idp = Issuer::start(vec![jwk(1, "k1")], None);
    let config = idp.config(&store, "jwks_min_refresh_interval = \"3s\"\n");
    let server = Server::start(t.path(), &config);
    assert_eq!(
        (idp.hits(DISCOVERY), idp.hits("/jwks")),
        (1, 1),
        "fetched once at start"
    );
    let url = format!("{}/v1/models", server.base);
    assert_eq!(get_full(&url, Some(&token(1, "k1", &idp.url))).0, 200);

    // Rotation: the issuer publishes k2 next to k1 and signs with it. The
    // first k2 token makes moat look again (discovery, then the JWKS).
    idp.serve_keys(vec![jwk(1, "k1"), jwk(2, "k2")]);
    let k2 = token(2, "k2", &idp.url);
    let (status, _, body) = get_full(&url, Some(&k2));
    assert_eq!(status, 200, "token with the new kid after refresh: {body}");
    assert_eq!(idp.hits("/jwks"), 2);

    // A flood of made-up kids within the interval: all 401, no fetch.
    for i in 0..20 {
        let (status, _, body) = get_full(&url, Some(&token(3, &format!("bogus-{i}"), &idp.url)));
        assert_eq!(status, 401, "{body}");
        if i == 0 {
            assert!(
                body["error"]["message"].as_str().unwrap().contains("bogus-0"),
                "{body}"
            );
        }
    }
    assert_eq!(idp.hits("/jwks"), 2, "unknown kids caused fetches");
    // After the interval, one more unknown kid may cause exactly one fetch.
    std::thread::sleep(Duration::from_millis(3100));
    for i in 0..10 {
        assert_eq!(
            get_full(&url, Some(&token(3, &format!("later-{i}"), &idp.url))).0,
            401
        );
    }
    assert_eq!(idp.hits("/jwks"), 3, "one fetch per interval");
    // Keys already known keep working without any fetch.
    assert_eq!(get_full(&url, Some(&token(1, "k1", &idp.url))).0, 200);
    assert_eq!(idp.hits("/jwks"), 3);
    expect_rejection(&server, &admin, "auth", "jwt_unknown_kid", 30);
}

#[test]
fn oidc_periodic_refresh_drops_a_retired_key() {
    let (t, store, _, _) = store();
    let idp = Issuer::start(vec![jwk(1, "k1"), jwk(2, "k2")], None);
    let server = Server::start(t.path(), &idp.config(&store, "jwks_refresh_interval = \"1s\"\n"));
    let url = format!("{}/v1/models", server.base);
    let k1 = token(1, "k1", &idp.url);
    assert_eq!(get_full(&url, Some(&k1)).0, 200);
    // The issuer retires k1; no token asks, yet moat notices.
    idp.serve_keys(vec![jwk(2, "k2")]);
    assert!(
        wait_until(Duration::from_secs(6), || get_full(&url, Some(&k1)).0 == 401),
        "k1 still accepted after the periodic refresh; jwks fetched {} times",
        idp.hits("/jwks")
    );
    assert!(idp.hits("/jwks") >= 2);
    assert_eq!(get_full(&url, Some(&token(2, "k2", &idp.url))).0, 200);
}

#[test]
fn oidc_discovery_refuses_a_document_for_another_issuer_and_internal_addresses() {
    let (t, store, _, _) = store();
    // The document claims to be someone else: keys of another provider
    // must not become this issuer's.
    let idp = Issuer::start(vec![jwk(1, "k1")], Some("https://evil.example"));
    let path = t.path().join("other.toml");
    std::fs::write(&path, idp.config(&store, "")).unwrap();
    let serve = |p: &Path| {
        run(&[
            "serve",
            "--config",
            p.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
    };
    let o = serve(&path);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("auth.jwt[0]") && stderr(&o).contains("evil.example"),
        "{}",
        stderr(&o)
    );
    assert_eq!(idp.hits("/jwks"), 0);

    // A loopback issuer without the opt-in: refused before any request.
    let idp = Issuer::start(vec![jwk(1, "k1")], None);
    let config = idp.config(&store, "").replace("allow_loopback = true\n", "");
    std::fs::write(&path, config).unwrap();
    let o = serve(&path);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("allow_loopback"), "{}", stderr(&o));
    assert_eq!(idp.hits(DISCOVERY), 0);

    // Discovery together with jwks_url is a config error naming the key.
    let config = format!("{}jwks_url = \"https://idp.test/jwks\"\n", idp.config(&store, ""));
    std::fs::write(&path, config).unwrap();
    let o = serve(&path);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("auth.jwt[0].discovery"), "{}", stderr(&o));
}

// ---------------------------------------------------------------- every refusal

struct Pki {
    dir: PathBuf,
    ca_pem: String,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "moat test CA");
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "server");
        let k = KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        std::fs::write(dir.join("server.pem"), p.signed_by(&k, &issuer).unwrap().pem()).unwrap();
        std::fs::write(dir.join("server.key"), k.serialize_pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca_pem,
        }
    }

    /// A client without a certificate, TLS 1.2 only or 1.3 only.
    fn client(&self, tls12_only: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// Runs a TLS handshake and one request; `Err` when the server refuses.
fn tls_request(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn tls_and_network_refusals_are_logged_counted_and_audited() {
    let (t, store, admin, _) = store();
    let pki = Pki::new(t.path());
    let d = pki.dir.display();
    let config = format!(
        "{}[inference.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_auth = \"required\"\n\
         client_ca = \"{d}/ca.pem\"\n[limits]\nheader_read_timeout = \"1s\"\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();
    assert!(tls_request(&addr, pki.client(true)).is_err(), "TLS 1.2 accepted");
    assert!(
        tls_request(&addr, pki.client(false)).is_err(),
        "no client cert accepted"
    );
    // A client that connects and never says hello.
    let mut silent = TcpStream::connect(&addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let _ = silent.read(&mut [0u8; 16]);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the handshake was never cut"
    );
    expect_rejection(&server, &admin, "tls", "protocol_version", 1);
    expect_rejection(&server, &admin, "tls", "no_client_cert", 1);
    expect_rejection(&server, &admin, "tls", "handshake_timeout", 1);
    assert!(wait_until(Duration::from_secs(5), || {
        let log = server.log_text();
        log.contains("reason=\"protocol_version\"") || log.contains("reason=protocol_version")
    }));
    assert_eq!(server.stop(), 0);
    let recs = audit_records(&store);
    assert!(
        has_audit(&recs, "connection.reject", "tls", "protocol_version"),
        "{recs:#?}"
    );
    assert!(
        has_audit(&recs, "connection.reject", "tls", "no_client_cert"),
        "{recs:#?}"
    );
    assert!(
        has_audit(&recs, "connection.reject", "tls", "handshake_timeout"),
        "{recs:#?}"
    );
    let r = recs.iter().find(|r| r["action"] == "connection.reject").unwrap();
    assert_eq!(r["client_addr"], "127.0.0.1");

    // The network allowlist, on a second server.
    let (t, store, admin, _) = self::store();
    let config = format!(
        "{}[inference]\nallow_cidrs = [\"10.0.0.0/8\"]\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    assert!(agent().get(&format!("{}/health", server.base)).call().is_err());
    expect_rejection(&server, &admin, "network", "cidr_denied", 1);
    assert_eq!(server.stop(), 0);
    let recs = audit_records(&store);
    assert!(
        has_audit(&recs, "connection.reject", "network", "cidr_denied"),
        "{recs:#?}"
    );
    // The chain still verifies with the new records in it.
    let o = run(&[
        "audit",
        "verify",
        &path_str(&store.join("audit/audit.jsonl")),
        "--keys",
        &path_str(&store.join("audit-keys.json")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// Writes `bytes` on a fresh connection and reads until the server closes.
fn raw(addr: &str, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = tcp.write_all(bytes);
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn request_refusals_at_every_stage_are_counted_and_audited_with_their_reason() {
    let (t, store, admin, user) = store();
    let (_, revoked_id, revoked, _) = create_key_with(&store, "user", &[]);
    let o = run(&["keys", "revoke", &revoked_id, "--store", store.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let config = format!(
        "{}[inference]\nmax_body_bytes = 1024\n[limits]\nheader_read_timeout = \"1s\"\nmax_header_bytes = 8192\n\
         [rate_limits.roles.user]\nrequests_per_minute = 60\nburst = 1\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let models = format!("{}/v1/models", server.base);

    // Request head: too large (431), malformed, and too slow.
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert!(raw(&addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
    raw(&addr, b"NOT HTTP AT ALL\r\n\r\n");
    {
        let mut slow = TcpStream::connect(&addr).unwrap();
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = slow.read_to_end(&mut buf);
    }
    // An idle keep-alive connection that times out is not a refusal.
    {
        let mut idle = TcpStream::connect(&addr).unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        idle.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        let mut buf = [0u8; 1024];
        let _ = idle.read(&mut buf);
        let _ = idle.read(&mut buf);
    }
    // Authentication, RBAC, body size, rate limit.
    assert_eq!(get_full(&models, None).0, 401);
    assert_eq!(get_full(&models, Some("moat_nope_nope")).0, 401);
    assert_eq!(get_full(&models, Some(&revoked)).0, 401);
    assert_eq!(
        get_full(&format!("{}/metrics", server.metrics), Some(&user)).0,
        403
    );
    let (status, _) = post(
        &format!("{}/v1/chat/completions", server.base),
        Some(&admin),
        &json!({"model": "absent", "messages": [{"role": "user", "content": "x".repeat(4096)}]}),
    );
    assert_eq!(status, 413);
    assert_eq!(get_full(&models, Some(&user)).0, 200);
    assert_eq!(get_full(&models, Some(&user)).0, 429);

    for (stage, reason) in [
        ("limits", "header_too_large"),
        ("protocol", "bad_request_head"),
        ("limits", "header_timeout"),
        ("auth", "missing_key"),
        ("auth", "invalid_key"),
        ("auth", "revoked_key"),
        ("rbac", "admin_required"),
        ("limits", "body_too_large"),
        ("rate_limit", "requests_per_minute"),
    ] {
        expect_rejection(&server, &admin, stage, reason, 1);
    }
    let text = metrics_text(&server, &admin);
    assert_eq!(
        rejections(&text, "limits", "header_timeout"),
        1,
        "the idle keep-alive was counted as a slowloris: {text}"
    );
    let log = server.log_text();
    for needle in [
        "limits.max_header_bytes",
        "limits.header_read_timeout",
        "malformed HTTP",
    ] {
        assert!(log.contains(needle), "no log line with {needle:?}:\n{log}");
    }
    assert_eq!(server.stop(), 0);

    let recs = audit_records(&store);
    for (action, stage, reason) in [
        ("connection.reject", "limits", "header_too_large"),
        ("connection.reject", "protocol", "bad_request_head"),
        ("connection.reject", "limits", "header_timeout"),
        ("auth.reject", "auth", "missing_key"),
        ("auth.reject", "auth", "invalid_key"),
        ("auth.reject", "auth", "revoked_key"),
        ("metrics.read", "rbac", "admin_required"),
        ("inference.chat", "limits", "body_too_large"),
        ("inference.models", "rate_limit", "requests_per_minute"),
    ] {
        assert!(
            has_audit(&recs, action, stage, reason),
            "no audit record {action} {stage}/{reason}:\n{}",
            recs.iter()
                .filter(|r| r["outcome"] == "denied")
                .map(|r| format!("{} {} {}", r["action"], r["stage"], r["reason"]))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let o = run(&[
        "audit",
        "verify",
        &path_str(&store.join("audit/audit.jsonl")),
        "--keys",
        &path_str(&store.join("audit-keys.json")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// POSTs a chat completion on its own thread; joins to (status, body).
fn chat_in_background(base: &str, key: &str, max_tokens: u64) -> std::thread::JoinHandle<(u16, Value)> {
    let (base, key) = (base.to_owned(), key.to_owned());
    std::thread::spawn(move || {
        chat(
            &base,
            &key,
            "m",
            json!({"max_tokens": max_tokens, "ignore_eos": true}),
        )
    })
}

#[test]
fn overload_and_request_timeout_are_counted_and_audited() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, admin) = create_key(&store, "admin", None);
    let (_, user) = create_key(&store, "user", None);
    // One request generating (a batch of one), one waiting: a third finds
    // the queue full. 3000 tokens of the demo model take over a second.
    let config = format!(
        "home = \"{}\"\n[[models]]\nname = \"m\"\n[engine]\nqueue_capacity = 1\nmax_batch = 1\nmax_context = 4096\n",
        store.display()
    );
    let server = Server::start(t.path(), &config);
    let a = chat_in_background(&server.base, &user, 3000);
    std::thread::sleep(Duration::from_millis(150));
    let b = chat_in_background(&server.base, &user, 3000);
    std::thread::sleep(Duration::from_millis(150));
    let (status, body) = chat(&server.base, &user, "m", json!({"max_tokens": 5}));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(a.join().unwrap().0, 200);
    assert_eq!(b.join().unwrap().0, 200);
    expect_rejection(&server, &admin, "overload", "queue_full", 1);
    assert_eq!(server.stop(), 0);
    let recs = audit_records(&store);
    assert!(
        has_audit(&recs, "inference.chat", "overload", "queue_full"),
        "{recs:#?}"
    );

    // The response head must come within limits.request_timeout: 504.
    let config = format!(
        "home = \"{}\"\n[[models]]\nname = \"m\"\n[engine]\nmax_context = 4096\n[limits]\nrequest_timeout = \"300ms\"\n",
        store.display()
    );
    let server = Server::start(t.path(), &config);
    let (status, body) = chat(
        &server.base,
        &user,
        "m",
        json!({"max_tokens": 3000, "ignore_eos": true}),
    );
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "request_timeout");
    expect_rejection(&server, &admin, "limits", "request_timeout", 1);
    assert_eq!(server.stop(), 0);
    let recs = audit_records(&store);
    assert!(
        has_audit(&recs, "inference.chat", "limits", "request_timeout"),
        "{recs:#?}"
    );
}
