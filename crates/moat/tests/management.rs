//! The management plane against the real binary on loopback: model control
//! `none` (405) and `explicit` (sources policy 403s, a local model pulled,
//! loaded and served, a version switch, a delete that drains an in-flight
//! stream), RBAC (a user role refused, a model outside a key's scope
//! refused), the keys API (grant escalation refused, a created key works,
//! a revoked one stops) and TOTP step-up (missing, wrong, replayed → 403).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn rejections(server: &Server, admin: &str, stage: &str, reason: &str) -> u64 {
    let (status, body) = get(&format!("{}/metrics", server.metrics), Some(admin));
    assert_eq!(status, 200, "{body}");
    let needle = format!("moat_rejections_total{{stage=\"{stage}\",reason=\"{reason}\"}}");
    body.as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// A store holding model `m` (demo seed 1), with an admin and a user key.
fn store_with_model(dir: &Path) -> (std::path::PathBuf, String, String) {
    let store = dir.join("store");
    let src = dir.join("src-m");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, admin) = create_key(&store, "admin", None);
    let (_, user) = create_key(&store, "user", None);
    (store, admin, user)
}

#[test]
fn model_control_none_answers_405_and_user_role_is_refused() {
    let t = tmp();
    let (store, admin, user) = store_with_model(t.path());
    let cfg = format!(
        "{}[management]\nlisten = \"127.0.0.1:0\"\n",
        config(&store, &["m"])
    );
    let server = Server::start(t.path(), &cfg);
    let mg = management_url(&server);

    let (s, body) = call("GET", &format!("{mg}/models"), None, None, None);
    assert_eq!(s, 401, "{body}");
    let (s, body) = call("GET", &format!("{mg}/models"), Some(&admin), None, None);
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"][0]["id"], "m");

    // A user key reaches no management route that needs more than reading.
    let (s, body) = call("GET", &format!("{mg}/keys"), Some(&user), None, None);
    assert_eq!(s, 403, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("keys:write"),
        "{body}"
    );
    let (s, body) = call(
        "POST",
        &format!("{mg}/keys"),
        Some(&user),
        None,
        Some(json!({"role": "user"})),
    );
    assert_eq!(s, 403, "{body}");
    let (s, body) = call("DELETE", &format!("{mg}/models/m"), Some(&user), None, None);
    assert_eq!(s, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("models:write"),
        "{body}"
    );

    // Model control "none": every model write is a 405 naming the setting.
    let src = t.path().join("src-m");
    for (method, path, body) in [
        (
            "POST",
            "/models",
            Some(json!({"source": format!("file://{}", src.display()), "name": "n"})),
        ),
        ("PUT", "/models/m", Some(json!({"version": "x"}))),
        ("DELETE", "/models/m", None),
    ] {
        let (s, resp) = call(method, &format!("{mg}{path}"), Some(&admin), None, body);
        assert_eq!(s, 405, "{method} {path}: {resp}");
        assert_eq!(error_code(&resp), "model_control_disabled", "{resp}");
        assert!(
            resp["error"]["message"]
                .as_str()
                .unwrap()
                .contains("model_control"),
            "{resp}"
        );
    }
    // The model is still served.
    let (s, _) = chat(&server.base, &user, "m", json!({}));
    assert_eq!(s, 200);
    assert_eq!(rejections(&server, &admin, "management", "model_control_none"), 3);
    assert!(rejections(&server, &admin, "rbac", "missing_permission") >= 3);
}

#[test]
fn explicit_control_pulls_switches_and_drains() {
    let t = tmp();
    let (store, admin, _) = store_with_model(t.path());
    // A second version of `m` from the same folder: v2 becomes active.
    let v1 = std::fs::read_to_string(store.join("models/m/current")).unwrap();
    let src = t.path().join("src-m");
    std::fs::remove_dir_all(&src).unwrap();
    demo_model(&src, 2);
    pull_ok(&src, "m", &store);
    let v2 = std::fs::read_to_string(store.join("models/m/current")).unwrap();
    assert_ne!(v1, v2);
    let (_, scoped) = create_key(&store, "user", Some("m"));
    let cfg = format!(
        "{}[engine]\nqueue_capacity = 16\n[management]\nlisten = \"127.0.0.1:0\"\nmodel_control = \"explicit\"\n",
        config(&store, &["m"])
    );
    let server = Server::start(t.path(), &cfg);
    let mg = management_url(&server);
    let post_model = |source: &str, name: &str| {
        call(
            "POST",
            &format!("{mg}/models"),
            Some(&admin),
            None,
            Some(json!({"source": source, "name": name})),
        )
    };

    // The sources policy refuses cloud metadata and loopback before any
    // connection is made.
    for url in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://169.254.169.254/model.safetensors",
        "https://127.0.0.1:9/model.safetensors",
        "https://[::1]/manifest.json",
    ] {
        let (s, body) = post_model(url, "evil");
        assert_eq!(s, 403, "{url}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("sources policy"),
            "{body}"
        );
    }
    assert_eq!(rejections(&server, &admin, "sources", "source_policy"), 4);

    // A local folder the policy allows: pulled, scanned, loaded, served.
    let src2 = t.path().join("src-m2");
    demo_model(&src2, 3);
    let (s, body) = post_model(&format!("file://{}", src2.display()), "m2");
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["id"], "m2");
    let (s, body) = chat(&server.base, &admin, "m2", json!({}));
    assert_eq!(s, 200, "{body}");
    // A key scoped to `m` may not use the new model.
    let (s, body) = chat(&server.base, &scoped, "m2", json!({}));
    assert_eq!(s, 403, "{body}");
    let (s, body) = call("GET", &format!("{mg}/models/m2"), Some(&scoped), None, None);
    assert_eq!(s, 403, "{body}");

    // PUT switches the active version (and `current` on disk).
    let (s, body) = call("GET", &format!("{mg}/models/m"), Some(&admin), None, None);
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["active_version"], v2.trim());
    let before = body["revision"].clone();
    let (s, body) = call(
        "PUT",
        &format!("{mg}/models/m"),
        Some(&admin),
        None,
        Some(json!({"version": v1.trim()})),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["version"], v1.trim());
    assert_eq!(body["previous_revision"], before);
    assert_ne!(body["revision"], before);
    let (_, body) = call("GET", &format!("{mg}/models/m"), Some(&admin), None, None);
    assert_eq!(body["active_version"], v1.trim());
    assert_eq!(
        std::fs::read_to_string(store.join("models/m/current"))
            .unwrap()
            .trim(),
        v1.trim()
    );
    let (s, _) = chat(&server.base, &scoped, "m", json!({}));
    assert_eq!(s, 200);
    let (s, body) = call(
        "PUT",
        &format!("{mg}/models/m"),
        Some(&admin),
        None,
        Some(json!({"version": v2.trim(), "workers": 4})),
    );
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("worker"),
        "{body}"
    );
    let (s, body) = call(
        "PUT",
        &format!("{mg}/models/m"),
        Some(&admin),
        None,
        Some(json!({"version": "nope"})),
    );
    assert_eq!(s, 404, "{body}");

    // DELETE while a stream runs: the stream completes, then 404.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let key = admin.clone();
    // More decoding than the DELETE takes to arrive (see drain.rs).
    let streaming = std::thread::spawn(move || {
        let body = stream_chat(&addr, &key, "m", 4000);
        (body, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let delete_sent = Instant::now();
    let (s, body) = call("DELETE", &format!("{mg}/models/m"), Some(&admin), None, None);
    let delete_done = Instant::now();
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["drained"], true, "{body}");
    let (streamed, stream_end) = streaming.join().unwrap();
    // The stream was still running when the DELETE came, and the DELETE
    // answered only once it had ended (the last byte, then the close).
    assert!(
        stream_end > delete_sent,
        "the stream ended before the DELETE: not a drain test"
    );
    assert!(
        delete_done + Duration::from_millis(200) >= stream_end,
        "DELETE answered {:?} before the stream ended",
        stream_end - delete_done
    );
    assert!(streamed.starts_with("HTTP/1.1 200"), "{streamed:.300}");
    let data: Vec<&str> = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{streamed:.2000}");
    assert!(
        data.iter()
            .any(|d| d.contains(r#""finish_reason":"length""#) || d.contains(r#""finish_reason":"stop""#)),
        "the stream did not finish: {streamed:.2000}"
    );
    let (s, body) = chat(&server.base, &admin, "m", json!({}));
    assert_eq!(s, 404, "{body}");
    let (s, body) = call("DELETE", &format!("{mg}/models/m"), Some(&admin), None, None);
    assert_eq!(s, 404, "{body}");
    // The other model is untouched.
    let (s, _) = chat(&server.base, &admin, "m2", json!({}));
    assert_eq!(s, 200);
}

/// The base32 secret of an `otpauth://` URI.
fn uri_secret(uri: &str) -> Vec<u8> {
    let q = uri.split_once('?').unwrap().1;
    let s = q.split('&').find_map(|kv| kv.strip_prefix("secret=")).unwrap();
    moat_guard::totp::base32_decode(s).unwrap()
}

#[test]
fn keys_api_refuses_escalation_and_totp_step_up_holds() {
    let t = tmp();
    let (store, admin, _) = store_with_model(t.path());
    let admin_id = admin.split('_').nth(1).unwrap().to_owned();
    // A user key with keys:write, scoped to `m` and limited to 600
    // requests/min: it may hand out user keys for `m` only, no looser.
    let o = run(&[
        "keys",
        "create",
        "--role",
        "user",
        "--models",
        "m",
        "--rpm",
        "600",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let delegate = stdout(&o).trim().to_owned();
    let o = run(&[
        "keys",
        "totp",
        "enroll",
        "--key",
        &admin_id,
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let uri = stdout(&o)
        .lines()
        .find(|l| l.starts_with("otpauth://"))
        .unwrap()
        .to_owned();
    let secret = uri_secret(&uri);
    let o = run(&[
        "keys",
        "totp",
        "enroll",
        "--key",
        "0000000000000000",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2, "unknown key ids are refused: {}", stderr(&o));

    let cfg = format!(
        "{}[management]\nlisten = \"127.0.0.1:0\"\n\
         [rbac.roles.admin]\ntotp_required = true\n\
         [rbac.roles.user]\npermissions = [\"inference\", \"models:read\", \"keys:write\"]\n",
        config(&store, &["m"])
    );
    let server = Server::start(t.path(), &cfg);
    let mg = management_url(&server);
    let keys = format!("{mg}/keys");
    let new_user = json!({"role": "user", "models": ["m"], "expires_in": "1h"});
    // The admin needs a code to write; a user key here may write keys
    // without one, so the admin may not mint it (step-up laundering).
    let new_admin = json!({"role": "admin", "models": ["m"], "expires_in": "1h"});

    // TOTP: reads need none; writes need a fresh code, once.
    let (s, body) = call("GET", &keys, Some(&admin), None, None);
    assert_eq!(s, 200, "{body}");
    let (s, body) = call("POST", &keys, Some(&admin), None, Some(new_admin.clone()));
    assert_eq!(s, 403, "{body}");
    assert_eq!(error_code(&body), "totp_missing", "{body}");
    let now = moat_guard::keys::now_unix();
    let good = moat_guard::totp::code_at(&secret, now);
    let wrong = if good == "123456" { "654321" } else { "123456" };
    let (s, body) = call("POST", &keys, Some(&admin), Some(wrong), Some(new_admin.clone()));
    assert_eq!(s, 403, "{body}");
    assert_eq!(error_code(&body), "totp_wrong", "{body}");
    let (s, body) = call("POST", &keys, Some(&admin), Some(&good), Some(new_admin.clone()));
    assert_eq!(s, 201, "{body}");
    let (s, body) = call("POST", &keys, Some(&admin), Some(&good), Some(new_admin.clone()));
    assert_eq!(s, 403, "{body}");
    assert_eq!(error_code(&body), "totp_replayed", "{body}");
    assert_eq!(rejections(&server, &admin, "totp", "totp_replayed"), 1);
    // Past the step-up, the grant rule: no user key that writes code-free.
    let next = moat_guard::totp::code_at(&secret, now + 30);
    let (s, body) = call("POST", &keys, Some(&admin), Some(&next), Some(new_user.clone()));
    assert_eq!(s, 403, "{body}");
    assert_eq!(error_code(&body), "grant_escalation", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("TOTP"),
        "{body}"
    );

    // Grant escalation: a user-role creator cannot mint an admin key, a key
    // for another model, an unscoped key, or one outliving nothing less.
    for (req, needle) in [
        (json!({"role": "admin", "models": ["m"]}), "models:write"),
        (json!({"role": "user", "models": ["other"]}), "\"other\""),
        (json!({"role": "user"}), "every model"),
        // Limits: none (unlimited) or a larger one than the creator's.
        (json!({"role": "user", "models": ["m"]}), "looser"),
        (
            json!({"role": "user", "models": ["m"], "limits": {"requests_per_minute": 601}}),
            "rpm=601",
        ),
    ] {
        let (s, body) = call("POST", &keys, Some(&delegate), None, Some(req.clone()));
        assert_eq!(s, 403, "{req}: {body}");
        assert_eq!(error_code(&body), "grant_escalation", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
    // Within its grants: created, works at once, revoked over the API.
    let mut limited_user = new_user.clone();
    limited_user["limits"] = json!({"requests_per_minute": 60});
    let (s, body) = call("POST", &keys, Some(&delegate), None, Some(limited_user));
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["limits"]["requests_per_minute"], 60, "{body}");
    let (new_key, new_id) = (
        body["key"].as_str().unwrap().to_owned(),
        body["id"].as_str().unwrap().to_owned(),
    );
    assert!(body["expires"].as_u64().unwrap() > now);
    let (s, body) = chat(&server.base, &new_key, "m", json!({}));
    assert_eq!(s, 200, "{body}");
    // The delegate may not revoke the admin's key (more than it holds).
    let (s, body) = call(
        "DELETE",
        &format!("{keys}/{admin_id}"),
        Some(&delegate),
        None,
        None,
    );
    assert_eq!(s, 403, "{body}");
    let (s, body) = call("DELETE", &format!("{keys}/{new_id}"), Some(&delegate), None, None);
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["state"], "revoked");
    let (s, body) = chat(&server.base, &new_key, "m", json!({}));
    assert_eq!(s, 401, "{body}");
    let (s, body) = call("GET", &keys, Some(&admin), None, None);
    assert_eq!(s, 200);
    let listed = body["data"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|k| k["id"] == new_id.as_str() && k["state"] == "revoked")
    );
    assert!(
        !body.to_string().contains("secret_sha256"),
        "hashes are never listed"
    );
    assert!(rejections(&server, &admin, "rbac", "grant_model") >= 2);
    assert_eq!(rejections(&server, &admin, "rbac", "grant_limits"), 2);

    // Every management call is in the audit chain: the refused step-ups and
    // escalations as denials, the creation and revocation as changes.
    let audit = store.join("audit/audit.jsonl");
    let records = || -> Vec<Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let count = |recs: &[Value], act: &str, outcome: &str| {
        recs.iter()
            .filter(|r| r["action"] == act && r["outcome"] == outcome)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            let r = records();
            count(&r, "key.revoke", "ok") == 1 && count(&r, "key.revoke", "allowed") == 1
        }),
        "audit records missing"
    );
    let recs = records();
    // Missing, wrong, replayed code; the laundering admin; five escalations.
    assert_eq!(count(&recs, "key.create", "denied"), 9, "{recs:#?}");
    assert_eq!(count(&recs, "key.create", "allowed"), 2);
    assert_eq!(count(&recs, "key.create", "ok"), 2);
    assert!(recs.iter().any(|r| r["action"] == "key.create"
        && r["outcome"] == "denied"
        && r["principal"] == admin_id.as_str()
        && r["reason"] == "totp_replayed"));
    server.stop();
    let o = run(&[
        "audit",
        "verify",
        &path_str(&audit),
        "--keys",
        &path_str(&store.join("audit-keys.json")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
