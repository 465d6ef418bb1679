//! SIGHUP reload against the real binary (the acceptance test of issue 8):
//! a client holds a keep-alive TLS connection with a stream running; the
//! operator revokes a key, installs a new certificate, edits the config and
//! sends SIGHUP. The revoked key is refused, new connections get the new
//! certificate, the reloadable config section is applied and the others are
//! reported as ignored (log and audit), and the held connection and its
//! stream carry on to `[DONE]` and serve another request afterwards.
//!
//! Then the authentication and authorization sections: a JWT issuer added
//! by SIGHUP (refused before, accepted after; a broken one changes nothing),
//! role permissions changed in `[rbac]`, and a client certificate mapped in
//! `[auth.mtls]`, each named as applied in the `config.reload` record.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration test helpers"
)]

mod common;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use p256::ecdsa::signature::Signer as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn make_cert(issuer: &Issuer<'static, KeyPair>, cn: &str) -> (String, String, Vec<u8>) {
    let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let k = KeyPair::generate().unwrap();
    let cert = p.signed_by(&k, issuer).unwrap();
    (cert.pem(), k.serialize_pem(), cert.der().to_vec())
}

/// Replace a file the way an operator's tooling does: write aside, rename.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> BufReader<Tls> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut conn = rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut tcp = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    BufReader::new(rustls::StreamOwned::new(conn, tcp))
}

fn peer_cert(s: &BufReader<Tls>) -> Vec<u8> {
    s.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
}

fn send_chat(s: &mut BufReader<Tls>, key: &str, stream: bool, max_tokens: u32) {
    let body = format!(
        r#"{{"model":"m","stream":{stream},"max_tokens":{max_tokens},"temperature":1.0,"seed":3,"messages":[{{"role":"user","content":"count"}}]}}"#
    );
    write!(
        s.get_mut(),
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.get_mut().flush().unwrap();
}

/// Status and headers (lower-cased names) of the next response.
fn read_head(s: &mut BufReader<Tls>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        s.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            return (status, headers);
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
    }
}

/// One chunk of a chunked body; `None` at the last (empty) chunk.
fn read_chunk(s: &mut BufReader<Tls>) -> Option<Vec<u8>> {
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    let len = usize::from_str_radix(line.trim(), 16).unwrap();
    let mut data = vec![0; len + 2];
    s.read_exact(&mut data).unwrap();
    data.truncate(len);
    (len > 0).then_some(data)
}

/// A whole response on the held connection: (status, body).
fn read_response(s: &mut BufReader<Tls>) -> (u16, String) {
    let (status, headers) = read_head(s);
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if header("transfer-encoding").as_deref() == Some("chunked") {
        while let Some(c) = read_chunk(s) {
            body.extend(c);
        }
    } else {
        let n: usize = header("content-length").unwrap().parse().unwrap();
        body.resize(n, 0);
        s.read_exact(&mut body).unwrap();
    }
    (status, String::from_utf8(body).unwrap())
}

fn audit_records(store: &Path) -> Vec<Value> {
    std::fs::read_to_string(store.join("audit/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn sighup_revokes_a_key_and_swaps_the_certificate_without_dropping_a_stream() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("m");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, keep) = create_key(&store, "user", None);
    let (revoked_id, revoked) = create_key(&store, "user", None);

    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "moat reload test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let (cert1, key1, der1) = make_cert(&issuer, "server-1");
    let pem_path = t.path().join("server.pem");
    let key_path = t.path().join("server.key");
    std::fs::write(&pem_path, cert1).unwrap();
    std::fs::write(&key_path, key1).unwrap();
    let config_v1 = format!(
        "{}[inference.tls]\ncert = \"{}\"\nkey = \"{}\"\n[rate_limits.roles.user]\nrequests_per_minute = 600\n\
         [limits]\ndrain_timeout = \"5s\"\n",
        config(&store, &["m"]),
        pem_path.display(),
        key_path.display()
    );
    let server = Server::start(t.path(), &config_v1);
    let config_path = t.path().join(format!("moat-{}.toml", std::process::id()));
    assert!(config_path.exists());
    let addr = server.base.trim_start_matches("http://").to_owned();
    let tls = client(&ca_pem);

    // The held connection: one request answered, then a long stream started.
    let mut held = connect(&addr, tls.clone());
    assert_eq!(peer_cert(&held), der1);
    send_chat(&mut held, &revoked, false, 2);
    assert_eq!(read_response(&mut held).0, 200, "the key works before the reload");
    send_chat(&mut held, &keep, true, 1000);
    let (status, _) = read_head(&mut held);
    assert_eq!(status, 200);
    let first = read_chunk(&mut held).unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));

    // The operator's change: revoke a key, new certificate, edited config
    // (a reloadable section and one that needs a restart), SIGHUP.
    let o = run(&["keys", "revoke", &revoked_id, "--store", store.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let (cert2, key2, der2) = make_cert(&issuer, "server-2");
    replace(&key_path, &key2);
    replace(&pem_path, &cert2);
    let config_v2 = config_v1
        .replace("requests_per_minute = 600", "requests_per_minute = 300")
        .replace("drain_timeout = \"5s\"", "drain_timeout = \"7s\"");
    replace(&config_path, &config_v2);
    let reloads_before = audit_records(&store)
        .iter()
        .filter(|r| r["action"] == "config.reload")
        .count();
    assert_eq!(reloads_before, 0);
    Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    let mut reload = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            if let Some(r) = audit_records(&store)
                .into_iter()
                .find(|r| r["action"] == "config.reload")
            {
                reload = r;
            }
            !reload.is_null()
        }),
        "no config.reload audit record; log:\n{}",
        server.log_text()
    );
    assert_eq!(reload["outcome"], "ok", "{reload}");
    assert_eq!(reload["principal"], "signal:SIGHUP");
    let reason = reload["reason"].as_str().unwrap();
    assert!(reason.contains("rate_limits"), "{reason}");
    assert!(reason.contains("keys (2 keys)"), "{reason}");
    assert!(reason.contains("inference TLS certificate"), "{reason}");
    assert!(reason.contains("ignored (restart needed): limits"), "{reason}");
    assert!(server.log_text().contains("need a restart were ignored"));

    // The record is written after the swap: from here the reload is in force.
    let mut fresh = connect(&addr, tls.clone());
    assert_eq!(peer_cert(&fresh), der2, "new connections see the new certificate");
    send_chat(&mut fresh, &revoked, false, 2);
    let (status, body) = read_response(&mut fresh);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    // A refusal closes its connection (Connection: close); a new one.
    let mut fresh = connect(&addr, tls.clone());
    assert_eq!(peer_cert(&fresh), der2);
    send_chat(&mut fresh, &keep, false, 2);
    let (status, _) = read_response(&mut fresh);
    assert_eq!(status, 200);
    // The new requests/min limit is the one announced.
    send_chat(&mut fresh, &keep, false, 2);
    let (head_status, headers) = read_head(&mut fresh);
    assert_eq!(head_status, 200);
    let limit = headers
        .iter()
        .find(|(k, _)| k == "x-ratelimit-limit-requests")
        .map(|(_, v)| v.clone());
    assert_eq!(limit.as_deref(), Some("300"), "{headers:?}");

    // The held connection: same certificate, the stream runs to [DONE],
    // then the connection serves another request.
    assert_eq!(peer_cert(&held), der1);
    let mut rest = Vec::new();
    while let Some(c) = read_chunk(&mut held) {
        rest.extend(c);
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(!rest.contains("\"error\""), "{rest}");
    send_chat(&mut held, &keep, false, 2);
    assert_eq!(read_response(&mut held).0, 200);
    drop(held);
    drop(fresh);
    assert_eq!(server.stop(), 0);
}

#[test]
fn a_config_that_does_not_validate_changes_nothing_and_is_audited_as_an_error() {
    let t = tmp();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let (_, key) = create_key(&store, "user", None);
    let cfg = format!(
        "home = \"{}\"\n[[models]]\nname = \"absent\"\n[rate_limits.roles.user]\nrequests_per_minute = 600\n",
        store.display()
    );
    let server = Server::start(t.path(), &cfg);
    let config_path = t.path().join(format!("moat-{}.toml", std::process::id()));
    replace(
        &config_path,
        &cfg.replace("requests_per_minute = 600", "requests_per_minute = \"lots\""),
    );
    Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    let mut reload = Value::Null;
    assert!(wait_until(Duration::from_secs(10), || {
        if let Some(r) = audit_records(&store)
            .into_iter()
            .find(|r| r["action"] == "config.reload")
        {
            reload = r;
        }
        !reload.is_null()
    }));
    assert_eq!(reload["outcome"], "error", "{reload}");
    let reason = reload["reason"].as_str().unwrap();
    assert!(reason.contains("nothing from it applied"), "{reason}");
    assert!(reason.contains("keys (1 keys)"), "{reason}");
    // The old limit still holds.
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let resp = agent
        .get(format!("{}/v1/models", server.base))
        .header("Authorization", format!("Bearer {key}"))
        .call()
        .unwrap();
    assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "600");
    assert_eq!(server.stop(), 0);
}

/// The `n`th (1-based) `config.reload` audit record, waiting for it.
fn nth_reload(server: &Server, store: &Path, n: usize) -> Value {
    let mut found = Value::Null;
    let ok = wait_until(Duration::from_secs(15), || {
        if let Some(r) = audit_records(store)
            .into_iter()
            .filter(|r| r["action"] == "config.reload")
            .nth(n - 1)
        {
            found = r;
        }
        !found.is_null()
    });
    assert!(ok, "no config.reload record #{n}; log:\n{}", server.log_text());
    found
}

fn sighup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn es_key(seed: u8) -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap()
}

/// A JWKS holding the public half of `es_key(seed)` as `kid`.
fn jwks(seed: u8, kid: &str) -> String {
    let point = es_key(seed).verifying_key().to_sec1_point(false);
    let b = point.as_bytes();
    json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
           "x": URL_SAFE_NO_PAD.encode(&b[1..33]), "y": URL_SAFE_NO_PAD.encode(&b[33..65])}]})
    .to_string()
}

/// An ES256 token from `iss` (key `es_key(seed)`, id `kid`) for audience
/// `moat`, valid for ten minutes.
fn token(seed: u8, kid: &str, iss: &str, groups: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let claims = json!({"iss": iss, "sub": "alice", "aud": "moat", "exp": now + 600, "iat": now,
                        "groups": groups});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: p256::ecdsa::Signature = es_key(seed).sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

#[test]
fn sighup_adds_a_jwt_issuer_only_when_it_loads_and_changes_role_permissions() {
    let t = tmp();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let (_, user_key) = create_key(&store, "user", None);
    let jwks_a = t.path().join("jwks-a.json");
    let jwks_b = t.path().join("jwks-b.json");
    std::fs::write(&jwks_a, jwks(1, "a1")).unwrap();
    std::fs::write(&jwks_b, jwks(2, "b1")).unwrap();
    let issuer = |iss: &str, file: &Path, roles: &str| {
        format!(
            "[[auth.jwt]]\nissuer = \"{iss}\"\naudiences = [\"moat\"]\nalgorithms = [\"ES256\"]\n\
             jwks_file = \"{}\"\n{roles}",
            file.display()
        )
    };
    let cfg_v1 = format!(
        "home = \"{}\"\n[[models]]\nname = \"absent\"\n{}",
        store.display(),
        issuer("https://idp-a.test", &jwks_a, "")
    );
    let server = Server::start(t.path(), &cfg_v1);
    let config_path = t.path().join(format!("moat-{}.toml", std::process::id()));
    let url = format!("{}/v1/models", server.base);
    // Issuer A's tokens map to `user` (no role claim); issuer B's `ops`
    // group to `admin`.
    let tok_a = token(1, "a1", "https://idp-a.test", &[]);
    let tok_b = token(2, "b1", "https://idp-b.test", &["ops"]);
    let b_roles = "role_claim = \"groups\"\nroles = { \"ops\" = \"admin\" }\n";

    assert_eq!(get(&url, Some(&tok_a)).0, 200);
    let (status, body) = get(&url, Some(&tok_b));
    assert_eq!(status, 401, "{body}");
    assert!(body.to_string().contains("not trusted"), "{body}");
    assert_eq!(get(&url, Some(&user_key)).0, 200);

    // A second issuer whose JWKS file is missing: reported as failed, and
    // the issuers in force stay as they were.
    let missing = t.path().join("nowhere.json");
    replace(
        &config_path,
        &format!("{cfg_v1}{}", issuer("https://idp-b.test", &missing, b_roles)),
    );
    sighup(&server);
    let r1 = nth_reload(&server, &store, 1);
    assert_eq!(r1["outcome"], "error", "{r1}");
    let reason = r1["reason"].as_str().unwrap();
    assert!(
        reason.contains("failed: auth.jwt: auth.jwt[1] (https://idp-b.test)")
            && reason.contains("previous issuers kept"),
        "{reason}"
    );
    assert!(!reason.contains("applied: auth.jwt"), "{reason}");
    assert_eq!(get(&url, Some(&tok_a)).0, 200, "issuer A still accepted");
    assert_eq!(get(&url, Some(&tok_b)).0, 401, "issuer B still refused");

    // The issuer fixed, and `user` loses `inference`.
    replace(
        &config_path,
        &format!(
            "{cfg_v1}{}[rbac.roles.user]\npermissions = [\"models:read\"]\n",
            issuer("https://idp-b.test", &jwks_b, b_roles)
        ),
    );
    sighup(&server);
    let r2 = nth_reload(&server, &store, 2);
    assert_eq!(r2["outcome"], "ok", "{r2}");
    assert_eq!(r2["principal"], "signal:SIGHUP");
    let reason = r2["reason"].as_str().unwrap();
    assert!(reason.contains("auth.jwt (2 issuers)"), "{reason}");
    assert!(reason.contains("rbac"), "{reason}");
    assert!(!reason.contains("ignored"), "{reason}");

    // Issuer B's admin token is accepted now; every `user` is refused the
    // inference routes, whichever way it authenticated.
    let (status, body) = get(&url, Some(&tok_b));
    assert_eq!(status, 200, "{body}");
    for (what, cred) in [("api key", &user_key), ("issuer A token", &tok_a)] {
        let (status, body) = get(&url, Some(cred));
        assert_eq!(status, 403, "{what}: {body}");
        assert!(
            body.to_string().contains("lacks the inference permission"),
            "{what}: {body}"
        );
    }
    assert_eq!(server.stop(), 0);
}

/// One `GET path` over TLS with a client certificate; the status line.
fn mtls_get(addr: &str, ca_pem: &str, identity: &(String, String), path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(identity.0.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(identity.1.as_bytes()).unwrap(),
            )
            .unwrap(),
    );
    let mut s = connect(addr, config);
    write!(
        s.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.get_mut().flush().unwrap();
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

#[test]
fn sighup_applies_a_new_client_certificate_role_map() {
    let t = tmp();
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "moat mtls reload CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let (cert, key, _) = make_cert(&issuer, "server");
    let d = t.path();
    std::fs::write(d.join("server.pem"), cert).unwrap();
    std::fs::write(d.join("server.key"), key).unwrap();
    std::fs::write(d.join("ca.pem"), &ca_pem).unwrap();
    let client_identity = |uri: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "client");
        p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
        let k = KeyPair::generate().unwrap();
        (p.signed_by(&k, &issuer).unwrap().pem(), k.serialize_pem())
    };
    let cfg = |roles: &str| {
        format!(
            "home = \"{}\"\n[[models]]\nname = \"absent\"\n[inference.tls]\ncert = \"{d}/server.pem\"\n\
             key = \"{d}/server.key\"\nclient_auth = \"required\"\nclient_ca = \"{d}/ca.pem\"\n\
             [auth.mtls]\nroles = {{ {roles} }}\n",
            store.display(),
            d = d.display()
        )
    };
    let server = Server::start(t.path(), &cfg("\"spiffe://corp/a\" = \"user\""));
    let config_path = t.path().join(format!("moat-{}.toml", std::process::id()));
    let addr = server.base.trim_start_matches("http://").to_owned();
    let a = client_identity("spiffe://corp/a");
    let b = client_identity("spiffe://corp/b");
    assert!(mtls_get(&addr, &ca_pem, &a, "/v1/models").contains(" 200"));
    assert!(mtls_get(&addr, &ca_pem, &b, "/v1/models").contains(" 401"));

    // `a` unmapped, `b` mapped.
    replace(&config_path, &cfg("\"spiffe://corp/b\" = \"user\""));
    sighup(&server);
    let r = nth_reload(&server, &store, 1);
    assert_eq!(r["outcome"], "ok", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("auth.mtls (1 identities)"), "{reason}");
    assert!(!reason.contains("ignored"), "{reason}");
    let status_a = mtls_get(&addr, &ca_pem, &a, "/v1/models");
    assert!(status_a.contains(" 401"), "{status_a}");
    let status_b = mtls_get(&addr, &ca_pem, &b, "/v1/models");
    assert!(status_b.contains(" 200"), "{status_b}");
    assert_eq!(server.stop(), 0);
}
