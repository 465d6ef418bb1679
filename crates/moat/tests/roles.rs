//! Custom RBAC roles against the real binary on loopback: roles defined by
//! `[rbac.roles.NAME]` hold exactly their permissions on both planes, keys
//! of a custom role are created by the CLI (checked against `--config`)
//! and by `POST /keys` (within the creator's grants), and a key whose role
//! the config does not define is refused everything, named in the refusal
//! and in a start-up warning, and can still be revoked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// One call with a key: (status, JSON body).
fn call(method: &str, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    common::call(method, url, Some(key), None, body)
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

/// `moat keys create --role ROLE` with extra arguments: (exit code, key, stderr).
fn create(store: &Path, role: &str, extra: &[&str]) -> (i32, String, String) {
    let (code, _, secret, err) = create_key_with(store, role, extra);
    (code, secret, err)
}

fn id_of(secret: &str) -> String {
    secret.split('_').nth(1).unwrap().to_owned()
}

#[test]
fn custom_roles_hold_their_permissions_and_undefined_roles_hold_none() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src-m");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let cfg = format!(
        "{}[management]\nlisten = \"127.0.0.1:0\"\n\
         [rbac.roles.ops]\npermissions = [\"models:read\", \"models:write\"]\n\
         [rbac.roles.auditor]\npermissions = [\"audit:read\"]\n\
         [rbac.roles.keyops]\npermissions = [\"keys:write\", \"models:read\", \"inference\"]\n",
        config(&store, &["m"])
    );
    let cfg_path = t.path().join("roles.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let with_cfg = ["--config", cfg_path.to_str().unwrap()];

    // The CLI: a role the config defines is accepted; one it does not, or
    // a malformed name, creates nothing.
    let (rc, admin, err) = create(&store, "admin", &with_cfg);
    assert_eq!(rc, 0, "{err}");
    let (rc, ops, err) = create(&store, "ops", &with_cfg);
    assert_eq!(rc, 0, "{err}");
    let (rc, auditor, err) = create(&store, "auditor", &with_cfg);
    assert_eq!(rc, 0, "{err}");
    let (rc, keyops, err) = create(&store, "keyops", &with_cfg);
    assert_eq!(rc, 0, "{err}");
    let (rc, out, err) = create(&store, "ghost", &with_cfg);
    assert_ne!(rc, 0);
    assert!(out.is_empty(), "a key was printed: {out}");
    assert!(
        err.contains("role ghost is not defined") && err.contains("[rbac.roles.ghost]"),
        "{err}"
    );
    let (rc, _, err) = create(&store, "Ops", &with_cfg);
    assert_ne!(rc, 0);
    assert!(err.contains("\"Ops\"") && err.contains("lower-case"), "{err}");
    // Without a config the name is only checked for form, and that is said.
    let (rc, ghost, err) = create(&store, "ghost", &[]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("not checked against [rbac]"), "{err}");
    let ghost_id = id_of(&ghost);
    let file = std::fs::read_to_string(store.join("keys.json")).unwrap();
    assert!(
        file.contains("\"role\": \"ops\"") && file.contains("\"role\": \"ghost\""),
        "{file}"
    );
    let list = stdout(&run(&[
        "keys",
        "list",
        "--store",
        store.to_str().unwrap(),
        "--config",
        cfg_path.to_str().unwrap(),
    ]));
    let line = list.lines().find(|l| l.starts_with(&ghost_id)).unwrap();
    assert!(line.contains("ghost") && line.contains("no-role"), "{list}");

    let server = Server::start(t.path(), &cfg);
    let mg = management_url(&server);
    let chat_url = format!("{}/v1/chat/completions", server.base);
    let chat_body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});

    // ops: the model list and its writes' permission, no inference.
    let (s, body) = call("POST", &chat_url, &ops, Some(chat_body.clone()));
    assert_eq!(s, 403, "{body}");
    assert!(
        message(&body).contains("role ops lacks the inference permission"),
        "{body}"
    );
    let (s, body) = call("GET", &format!("{mg}/models"), &ops, None);
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"][0]["id"], "m");
    let (s, body) = call("GET", &format!("{mg}/keys"), &ops, None);
    assert_eq!(s, 403, "{body}");
    assert!(message(&body).contains("role ops lacks the keys:write"), "{body}");

    // auditor: audit:read only, so neither the model list nor inference.
    let (s, body) = call("GET", &format!("{mg}/models"), &auditor, None);
    assert_eq!(s, 403, "{body}");
    assert!(
        message(&body).contains("role auditor lacks the models:read"),
        "{body}"
    );
    let (s, body) = call("POST", &chat_url, &auditor, Some(chat_body.clone()));
    assert_eq!(s, 403, "{body}");

    // keyops: inference is in its set, so the chat is served.
    let (s, body) = call("POST", &chat_url, &keyops, Some(chat_body.clone()));
    assert_eq!(s, 200, "{body}");

    // A key whose role the config does not define authenticates but is
    // refused everything, and the refusal names the role.
    let (s, body) = call("POST", &chat_url, &ghost, Some(chat_body));
    assert_eq!(s, 403, "{body}");
    assert!(message(&body).contains("ghost"), "{body}");
    let (s, body) = call("GET", &format!("{mg}/models"), &ghost, None);
    assert_eq!(s, 403, "{body}");
    assert!(message(&body).contains("role ghost is not defined"), "{body}");
    // ...and the operator was told at start which keys those are.
    assert!(
        wait_until(Duration::from_secs(10), || server.log_text().lines().any(|l| l
            .contains("does not define")
            && l.contains(&format!("{ghost_id} (ghost)")))),
        "no warning naming the ghost key:\n{}",
        server.log_text()
    );

    // POST /keys with custom roles: admin may mint ops, and the new key
    // works at once; an undefined role is a 400 naming it.
    let keys = format!("{mg}/keys");
    let (s, body) = call("POST", &keys, &admin, Some(json!({"role": "ops"})));
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["role"], "ops", "{body}");
    let minted = body["key"].as_str().unwrap().to_owned();
    let (s, body) = call("GET", &format!("{mg}/models"), &minted, None);
    assert_eq!(s, 200, "{body}");
    let (s, body) = call("POST", &keys, &admin, Some(json!({"role": "nosuch"})));
    assert_eq!(s, 400, "{body}");
    assert!(message(&body).contains("role nosuch is not defined"), "{body}");
    // keyops holds keys:write but not models:write: it may not mint ops,
    // nor admin; it may mint user (inference + models:read ⊆ its set).
    for (role, needle) in [("ops", "models:write"), ("admin", "role admin grants")] {
        let (s, body) = call("POST", &keys, &keyops, Some(json!({"role": role})));
        assert_eq!(s, 403, "{role}: {body}");
        assert_eq!(body["error"]["code"], "grant_escalation", "{body}");
        assert!(message(&body).contains(needle), "{role}: {body}");
    }
    let (s, body) = call("POST", &keys, &keyops, Some(json!({"role": "user"})));
    assert_eq!(s, 201, "{body}");

    // A key with an undefined role stays revocable.
    let (s, body) = call("DELETE", &format!("{keys}/{ghost_id}"), &keyops, None);
    assert_eq!(s, 200, "{body}");
    assert_eq!(server.stop(), 0);
}
