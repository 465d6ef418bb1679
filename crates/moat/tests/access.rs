//! Access control against the real binary on loopback: TLS minimum version
//! and mTLS, the CIDR allowlist, JWTs from a local JWKS file, rate limits
//! (local, and shared by two processes through a real `redis-server`), and
//! the slowloris cut-off. Each refusal is also checked in the metrics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use p256::ecdsa::signature::Signer as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The metrics text, read with an admin key.
fn metrics_text(server: &Server, admin: &str) -> String {
    let (status, _, body) = get_full(&format!("{}/metrics", server.metrics), Some(admin));
    assert_eq!(status, 200);
    body.as_str().unwrap().to_owned()
}

/// A store (serving no loaded model: the access checks need none) with an
/// admin and a user key.
fn store() -> (tempfile::TempDir, PathBuf, String, String) {
    let t = tmp();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let (_, admin) = create_key(&store, "admin", None);
    let (_, user) = create_key(&store, "user", None);
    (t, store, admin, user)
}

// ---------------------------------------------------------------- TLS

struct Pki {
    dir: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "moat access test CA");
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        let (cert, key_pem) = {
            let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, "server");
            let k = KeyPair::generate().unwrap();
            let issuer = Issuer::new(params.clone(), KeyPair::from_pem(&key.serialize_pem()).unwrap());
            (p.signed_by(&k, &issuer).unwrap().pem(), k.serialize_pem())
        };
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key_pem).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn client_identity(&self, uri: &str) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "client");
        p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
        let k = KeyPair::generate().unwrap();
        (p.signed_by(&k, &self.issuer).unwrap().pem(), k.serialize_pem())
    }

    fn client(&self, tls12_only: bool, identity: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots);
        Arc::new(match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        })
    }
}

/// One HTTP/1.1 request over TLS; Err when the handshake or exchange fails.
fn https_get(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    bearer: Option<&str>,
) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // A server that closes without close_notify after a full answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    if out.is_empty() {
        return Err("connection closed without an answer".into());
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn tls_minimum_version_and_client_certificates() {
    let (t, store, _admin, user) = store();
    let pki = Pki::new(t.path());
    let d = pki.dir.display();
    let config = format!(
        "{}[inference.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_auth = \"required\"\n\
         client_ca = \"{d}/ca.pem\"\n[auth.mtls]\nroles = {{ \"spiffe://corp/batch\" = \"user\" }}\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mapped = pki.client_identity("spiffe://corp/batch");

    // TLS 1.2 only: refused under the default minimum of 1.3.
    let err = https_get(&addr, pki.client(true, Some(mapped.clone())), "/health", None).unwrap_err();
    assert!(
        err.to_lowercase().contains("version") || err.contains("alert"),
        "{err}"
    );
    // No client certificate under client_auth = "required": refused.
    let err = https_get(&addr, pki.client(false, None), "/health", None).unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // A mapped client certificate authenticates without any key.
    let ok = https_get(&addr, pki.client(false, Some(mapped.clone())), "/v1/models", None).unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let lower = ok.to_lowercase();
    assert!(
        lower.contains("strict-transport-security: max-age=63072000"),
        "{ok}"
    );
    assert!(lower.contains("x-content-type-options: nosniff"), "{ok}");
    assert!(!lower.contains("\r\nserver:"), "{ok}");
    // A valid certificate nobody mapped authenticates nobody…
    let other = pki.client_identity("spiffe://corp/unknown");
    let resp = https_get(&addr, pki.client(false, Some(other.clone())), "/v1/models", None).unwrap();
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert!(
        resp.contains("spiffe://corp/unknown") && resp.contains("not mapped"),
        "{resp}"
    );
    // …but an API key still works over the same mTLS connection.
    let resp = https_get(&addr, pki.client(false, Some(other)), "/v1/models", Some(&user)).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    assert!(
        wait_until(Duration::from_secs(5), || server
            .log_text()
            .contains("TLS handshake refused")),
        "{}",
        server.log_text()
    );
    assert_eq!(server.stop(), 0);
}

// ---------------------------------------------------------------- CIDR

#[test]
fn connection_from_outside_the_allowlist_is_dropped_and_counted() {
    let (t, store, admin, _) = store();
    let config = format!(
        "{}[inference]\nallow_cidrs = [\"10.0.0.0/8\"]\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    // The loopback client is outside 10.0.0.0/8: the connection is closed
    // before any HTTP, so there is no status at all.
    let r = agent().get(&format!("{}/health", server.base)).call();
    assert!(r.is_err(), "a refused peer got an answer: {r:?}");
    // The metrics plane has no allowlist and counts the refusal.
    let ok = wait_until(Duration::from_secs(5), || {
        rejections(&metrics_text(&server, &admin), "network", "cidr_denied") >= 1
    });
    assert!(ok, "{}", metrics_text(&server, &admin));
    // The log line travels through a pipe; give it a moment.
    wait_until(Duration::from_secs(5), || {
        server.log_text().contains("outside allow_cidrs")
    });
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("outside allow_cidrs"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
}

// ---------------------------------------------------------------- JWT

const ISS: &str = "https://idp.test";

fn jwk(seed: u8, kid: &str) -> Value {
    let point = es_key(seed).verifying_key().to_sec1_point(false);
    let b = point.as_bytes();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
           "x": URL_SAFE_NO_PAD.encode(&b[1..33]), "y": URL_SAFE_NO_PAD.encode(&b[33..65])})
}

fn token(seed: u8, header: Value, claims: Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{h}.{c}");
    let sig: p256::ecdsa::Signature = es_key(seed).sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "sub": "alice", "aud": "moat", "exp": now() + 600, "iat": now(),
                       "groups": ["ml-users"]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn jwt_from_a_local_jwks_file() {
    let (t, store, admin, _) = store();
    let jwks = t.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk(1, "k1")]}).to_string()).unwrap();
    let config = format!(
        "{}[[auth.jwt]]\nissuer = \"{ISS}\"\naudiences = [\"moat\"]\nalgorithms = [\"ES256\"]\n\
         jwks_file = \"{}\"\nleeway = \"5s\"\nrole_claim = \"groups\"\nroles = {{ \"ml-users\" = \"user\" }}\n",
        base_config(&store),
        jwks.display()
    );
    let server = Server::start(t.path(), &config);
    let url = format!("{}/v1/models", server.base);
    let es = |kid: &str| json!({"alg": "ES256", "typ": "JWT", "kid": kid});

    let good = token(1, es("k1"), claims(json!({})));
    let (status, _, body) = get_full(&url, Some(&good));
    assert_eq!(status, 200, "{body}");

    // Flip one character in the middle of the signature.
    let mut tampered = good.clone().into_bytes();
    let i = good.rfind('.').unwrap() + 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            token(1, es("k1"), claims(json!({"exp": now() - 3600}))),
            "token expired at",
        ),
        ("alg none", none, "algorithm \"none\" is never accepted"),
        (
            "wrong aud",
            token(1, es("k1"), claims(json!({"aud": "other"}))),
            "audience does not include \"moat\"",
        ),
        (
            "wrong iss",
            token(1, es("k1"), claims(json!({"iss": "https://evil.test"}))),
            "issuer \"https://evil.test\" is not trusted",
        ),
        (
            "not yet valid",
            token(1, es("k1"), claims(json!({"nbf": now() + 3600}))),
            "not valid before",
        ),
        (
            "unknown kid",
            token(1, es("k9"), claims(json!({}))),
            "key id \"k9\" is not among",
        ),
        ("tampered", tampered, "token signature is invalid"),
        (
            "oversized",
            token(1, es("k1"), claims(json!({"pad": "x".repeat(9000)}))),
            "bytes; at most 8192 are accepted",
        ),
    ];
    for (what, tok, message) in &cases {
        let (status, headers, body) = get_full(&url, Some(tok));
        assert_eq!(status, 401, "{what}: {body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(message), "{what}: {msg}");
        assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer", "{what}");
    }
    // A valid token whose group maps to no role grants nothing.
    let (status, _, body) = get_full(
        &url,
        Some(&token(1, es("k1"), claims(json!({"groups": ["other"]})))),
    );
    assert_eq!(status, 403, "{body}");

    // Key rotation: a token signed by a key added to the file is accepted
    // (the file is re-read on change, or on the unknown kid).
    std::fs::write(&jwks, json!({"keys": [jwk(1, "k1"), jwk(2, "k2")]}).to_string()).unwrap();
    let rotated = token(2, es("k2"), claims(json!({})));
    assert!(wait_until(Duration::from_secs(5), || get_full(
        &url,
        Some(&rotated)
    )
    .0 == 200));

    let text = metrics_text(&server, &admin);
    for reason in [
        "jwt_expired",
        "jwt_alg_none",
        "jwt_wrong_audience",
        "jwt_unknown_kid",
        "jwt_bad_signature",
        "jwt_oversized",
    ] {
        assert!(
            rejections(&text, "auth", reason) >= 1,
            "{reason} not counted:\n{text}"
        );
    }
    assert_eq!(rejections(&text, "rbac", "jwt_role_unmapped"), 1, "{text}");
}

// ---------------------------------------------------------------- rate limits

#[test]
fn requests_per_minute_holds_its_rate_with_an_exact_retry_after() {
    let (t, store, admin, user) = store();
    // Users: 600/min (one every 100 ms), no burst. Admins: 30/min (one
    // every 2 s), so the Retry-After of an immediate second request is 2.
    let config = format!(
        "{}[rate_limits.roles.user]\nrequests_per_minute = 600\nburst = 1\n\
         [rate_limits.roles.admin]\nrequests_per_minute = 30\nburst = 1\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    let url = format!("{}/v1/models", server.base);

    let (status, headers, _) = get_full(&url, Some(&admin));
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-ratelimit-limit-requests").unwrap(), "30");
    let (status, headers, body) = get_full(&url, Some(&admin));
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers.get("retry-after").unwrap(), "2");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(get_full(&url, Some(&admin)).0, 200, "Retry-After was too short");

    // As fast as the client can go for 3 s: 1 + 3 s × 10/s = 31 admitted.
    let window = Duration::from_secs(3);
    let start = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while start.elapsed() < window {
        match get_full(&url, Some(&user)).0 {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    let expected = 1.0 + window.as_secs_f64() * 10.0;
    let got = f64::from(ok);
    assert!(
        (got - expected).abs() <= expected * 0.10,
        "admitted {ok} in {window:?} (expected {expected} ± 10%), {limited} limited"
    );
    assert!(limited > 0);
    let text = metrics_text(&server, &admin);
    assert!(
        rejections(&text, "rate_limit", "requests_per_minute") >= u64::from(limited),
        "{text}"
    );
}

#[test]
fn two_processes_share_one_principals_limit_through_redis() {
    let Some(redis) = start_redis() else { return };
    let (t, store, _, user) = store();
    // 6 per minute with a burst of 4: four requests in total, whichever
    // replica they reach, then 429 from both.
    let config = format!(
        "{}[rate_limits]\nrequests_per_minute = 6\nburst = 4\nredis_url = \"redis://{}\"\nredis_timeout = \"1s\"\n\
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
    let mut statuses = Vec::new();
    for i in 0..8 {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let (status, headers, _) = get_full(&format!("{base}/v1/models"), Some(&user));
        if status == 429 {
            let secs: u64 = headers
                .get("retry-after")
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=10).contains(&secs), "Retry-After {secs}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        vec![200, 200, 200, 200, 429, 429, 429, 429],
        "{statuses:?}"
    );

    // Redis gone with the default on_redis_error = "closed": 503, not a
    // silent pass.
    drop(redis);
    let (status, headers, body) = get_full(&format!("{}/v1/models", a.base), Some(&user));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    assert!(headers.get("retry-after").is_some());
}

// ---------------------------------------------------------------- slowloris

#[test]
fn a_slowloris_client_is_cut_at_the_header_timeout() {
    let (t, store, _, _) = store();
    let config = format!("{}[limits]\nheader_read_timeout = \"1s\"\n", base_config(&store));
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();

    // A normal client is unaffected.
    assert_eq!(get_full(&format!("{}/health", server.base), None).0, 200);

    let mut tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let head =
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let start = Instant::now();
    let mut cut_at = None;
    'outer: for byte in head {
        if tcp.write_all(&[*byte]).is_err() {
            cut_at = Some(start.elapsed());
            break;
        }
        // One byte every 200 ms: the whole head would take about 16 s.
        let pause_end = Instant::now() + Duration::from_millis(200);
        while Instant::now() < pause_end {
            let mut buf = [0u8; 256];
            match tcp.read(&mut buf) {
                Ok(0) => {
                    cut_at = Some(start.elapsed());
                    break 'outer;
                }
                Ok(_) => {
                    // hyper may answer 408 before closing; that is a cut too.
                    cut_at = Some(start.elapsed());
                    break 'outer;
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    cut_at = Some(start.elapsed());
                    break 'outer;
                }
            }
        }
    }
    let cut = cut_at.expect("the slow client was never cut");
    assert!(
        cut >= Duration::from_millis(900) && cut <= Duration::from_millis(2500),
        "cut after {cut:?}, expected about 1 s"
    );
}

// ---------------------------------------------------------------- idle timeout

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let (t, store, _, _) = store();
    let config = format!("{}[limits]\nidle_timeout = \"1s\"\n", base_config(&store));
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = tcp.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Nothing more is sent: the server closes the connection after about 1 s.
    let start = Instant::now();
    let closed = loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break start.elapsed(),
            Ok(_) => {}
        }
    };
    assert!(
        closed >= Duration::from_millis(700) && closed <= Duration::from_millis(3000),
        "closed after {closed:?}"
    );
}

// ---------------------------------------------------------------- JWKS over HTTP

/// Serves `body` to every request on a loopback port; counts requests.
fn jwks_server(body: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    (url, hits)
}

#[test]
fn jwks_url_is_fetched_refreshed_on_unknown_kid_at_most_once_and_loopback_needs_opt_in() {
    let (t, store, _, _) = store();
    let (url, hits) = jwks_server(json!({"keys": [jwk(1, "k1")]}).to_string());
    let issuer = |allow: bool| {
        format!(
            "{}[[auth.jwt]]\nissuer = \"{ISS}\"\naudiences = [\"moat\"]\nalgorithms = [\"ES256\"]\n\
             jwks_url = \"{url}\"\nallow_loopback = {allow}\n",
            base_config(&store)
        )
    };
    // Without the opt-in, a loopback issuer URL stops the start (SSRF).
    let path = t.path().join("no-loopback.toml");
    std::fs::write(&path, issuer(false)).unwrap();
    let o = run(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("auth.jwt[0]") && stderr(&o).contains("loopback"),
        "{}",
        stderr(&o)
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    let server = Server::start(t.path(), &issuer(true));
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "fetched once at start"
    );
    let url_models = format!("{}/v1/models", server.base);
    let good = token(1, json!({"alg": "ES256", "kid": "k1"}), claims(json!({})));
    assert_eq!(get_full(&url_models, Some(&good)).0, 200);
    // Unknown kids: one refresh, then no more for a while (rate-limited).
    for kid in ["x1", "x2", "x3"] {
        let tok = token(1, json!({"alg": "ES256", "kid": kid}), claims(json!({})));
        assert_eq!(get_full(&url_models, Some(&tok)).0, 401);
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one refresh for three unknown kids"
    );
}

// ---------------------------------------------------------------- token budget and caps

#[test]
fn token_budget_is_reserved_and_refunded_and_role_caps_answer_400() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, user) = create_key(&store, "user", None);
    let config = format!(
        "home = \"{}\"\n[[models]]\nname = \"m\"\n[rate_limits.roles.user]\ntokens_per_minute = 100\nmax_tokens = 80\nmax_n = 1\n",
        store.display()
    );
    let server = Server::start(t.path(), &config);
    let (status, body) = chat(&server.base, &user, "m", json!({"max_tokens": 81}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens");

    // Temperature 0 is deterministic: learn the start of the answer…
    let (status, probe) = chat(&server.base, &user, "m", json!({"max_tokens": 20}));
    assert_eq!(status, 200, "{probe}");
    let (_, headers, _) = {
        // The budget headers, on a response of the same shape.
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0});
        let mut resp = agent()
            .post(&format!("{}/v1/chat/completions", server.base))
            .header("Authorization", &format!("Bearer {user}"))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let h = resp.headers().clone();
        (
            resp.status().as_u16(),
            h,
            resp.body_mut().read_to_string().unwrap(),
        )
    };
    assert_eq!(headers.get("x-ratelimit-limit-tokens").unwrap(), "100");
    assert!(headers.get("x-ratelimit-remaining-tokens").is_some());
    let message = &probe["choices"][0]["message"];
    let text = format!(
        "{}{}",
        message["reasoning_content"].as_str().unwrap_or_default(),
        message["content"].as_str().unwrap_or_default()
    );
    let stop: String = text.chars().skip(1).take(3).collect();
    assert!(!stop.trim().is_empty(), "no text to stop on: {probe}");
    // …so that this request reserves 60 tokens but stops after a few.
    let (status, early) = chat(
        &server.base,
        &user,
        "m",
        json!({"max_tokens": 60, "stop": [stop]}),
    );
    assert_eq!(status, 200, "{early}");
    let used = early["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used < 20, "the stop sequence did not end it early: {early}");
    // 100 - 20 (probe) - 1 - `used` are left only if the unused 60 - `used`
    // came back; without the refund only 19 would be.
    let (status, body) = chat(&server.base, &user, "m", json!({"max_tokens": 60}));
    assert_eq!(status, 200, "unused tokens were not refunded: {body}");
    // The budget is now spent: a full-size request must wait.
    let (status, body) = chat(&server.base, &user, "m", json!({"max_tokens": 80}));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "tokens_per_minute");
}

// ---------------------------------------------------------------- reload, header size

/// The DER of the certificate the server presents.
fn served_cert(addr: &str, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let mut conn = rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn certificate_is_reloaded_on_sighup_without_a_restart() {
    let (t, store, _, _) = store();
    let pki = Pki::new(t.path());
    let d = pki.dir.display();
    let config = format!(
        "{}[inference.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\n",
        base_config(&store)
    );
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let before = served_cert(&addr, pki.client(false, None));
    // A new certificate and key from the same CA, then SIGHUP.
    let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "server-2");
    let k = KeyPair::generate().unwrap();
    let cert = p.signed_by(&k, &pki.issuer).unwrap();
    std::fs::write(pki.dir.join("server.key.new"), k.serialize_pem()).unwrap();
    std::fs::write(pki.dir.join("server.pem.new"), cert.pem()).unwrap();
    std::fs::rename(pki.dir.join("server.key.new"), pki.dir.join("server.key")).unwrap();
    std::fs::rename(pki.dir.join("server.pem.new"), pki.dir.join("server.pem")).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status();
    assert!(wait_until(Duration::from_secs(5), || served_cert(
        &addr,
        pki.client(false, None)
    ) != before));
    assert_eq!(served_cert(&addr, pki.client(false, None)), cert.der().to_vec());
    assert!(
        wait_until(Duration::from_secs(2), || server.log_text().contains("SIGHUP")),
        "{}",
        server.log_text()
    );
    // Still serving HTTP over the new certificate.
    let ok = https_get(&addr, pki.client(false, None), "/health", None).unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(server.stop(), 0);
}

#[test]
fn an_oversized_request_head_is_refused() {
    let (t, store, _, _) = store();
    let config = format!("{}[limits]\nmax_header_bytes = 8192\n", base_config(&store));
    let server = Server::start(t.path(), &config);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    // hyper answers 431 once its buffer is full, then closes; the write
    // may fail part-way, which is fine.
    let _ = tcp.write_all(head.as_bytes());
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    // A head within the limit is served.
    assert_eq!(get_full(&format!("{}/health", server.base), None).0, 200);
}
