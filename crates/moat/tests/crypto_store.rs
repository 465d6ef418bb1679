//! Encryption at rest wired through the real binary:
//! - `[store] encrypt` / `pull --encrypt`: blobs are ciphertext, `verify`
//!   and `serve` decrypt; a flipped byte fails naming the chunk; after
//!   `rotate-kek` old blobs still decrypt; after retiring the old version
//!   they are refused naming it, unless `rewrap --store-blobs` moved them.
//! - `[encryption] encrypt_keys_file`: the API-key file is an envelope the
//!   server opens; `rotate-kek` reseals it.
//! - key and KEK events from the CLI are records on the server's chain,
//!   written directly or spooled while the server holds the log.

// Fixture helpers below abort the test on a failed setup step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn keys(store: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--store", store.to_str().unwrap()]);
    run(&all)
}

fn ok(o: &std::process::Output) {
    assert_eq!(code(o), 0, "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

/// The stored (encrypted) blob of `model.safetensors` of the active version.
fn weights_blob(store: &Path, model: &str) -> PathBuf {
    let current = std::fs::read_to_string(store.join(format!("models/{model}/current"))).unwrap();
    let lock = moat_artifact::Lock::read(
        &store.join(format!("models/{model}/versions/{}/moat.lock", current.trim())),
    )
    .unwrap();
    let file = lock
        .files
        .iter()
        .find(|f| f.path.ends_with(".safetensors"))
        .unwrap();
    store.join(format!("blobs/sha256/{}.enc", file.sha256))
}

fn verify(store: &Path, model: &str) -> std::process::Output {
    run(&["verify", model, "--store", store.to_str().unwrap()])
}

#[test]
fn encrypted_store_flip_rotate_retire() {
    let t = tmp();
    let store = t.path().join("store");
    ok(&keys(&store, &["rotate-kek"]));
    // Different seeds: models of equal bytes would share one blob.
    for (seed, m) in [(1, "one"), (2, "two"), (3, "three")] {
        let src = t.path().join(m);
        demo_model(&src, seed);
        let o = pull_with(&src, m, &store, &["--encrypt"]);
        ok(&o);
        assert!(
            stderr(&o).contains("storing encrypted under KEK version 1"),
            "{}",
            stderr(&o)
        );
    }
    let blob = weights_blob(&store, "one");
    let bytes = std::fs::read(&blob).unwrap();
    assert!(
        bytes.starts_with(b"MOATENC"),
        "the stored blob is an encrypted object"
    );
    let plain = std::fs::read(t.path().join("one/model.safetensors")).unwrap();
    assert!(!bytes.windows(32).any(|w| w == &plain[plain.len() - 32..]));
    ok(&verify(&store, "one"));

    // The server decrypts while verifying and serves the model.
    let (_id, key) = create_key(&store, "user", None);
    let server = Server::start(t.path(), &config(&store, &["one"]));
    let (status, body) = chat(&server.base, &key, "one", serde_json::json!({}));
    assert_eq!(status, 200, "{body}");
    drop(server);

    // One flipped byte in the last chunk of the encrypted weights: verify
    // and serve both refuse, naming the file and the chunk.
    let blob2 = weights_blob(&store, "two");
    let len = std::fs::metadata(&blob2).unwrap().len() as usize;
    flip_byte(&blob2, len - 20);
    let o = verify(&store, "two");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("model.safetensors: cannot decrypt: chunk "), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    let server = Server::start(t.path(), &config(&store, &["one", "two"]));
    let (_, ready) = get(&format!("{}/ready", server.base), Some(&key));
    let reason = ready["refused"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("cannot decrypt: chunk "), "{ready}");
    drop(server);

    // Rotation: old blobs still decrypt. "three" is moved to version 2.
    ok(&keys(&store, &["rotate-kek"]));
    ok(&verify(&store, "one"));
    let o = keys(&store, &["rewrap", "--store-blobs"]);
    ok(&o);
    assert!(
        stdout(&o).contains("rewrapped to KEK version 2"),
        "{}",
        stdout(&o)
    );
    ok(&verify(&store, "three"));
    ok(&keys(&store, &["retire-kek", "1"]));
    ok(&verify(&store, "three"));

    // A fresh store whose blob stays on a retired version is refused.
    let store2 = t.path().join("store2");
    ok(&keys(&store2, &["rotate-kek"]));
    ok(&pull_with(&t.path().join("one"), "old", &store2, &["--encrypt"]));
    ok(&keys(&store2, &["rotate-kek"]));
    ok(&verify(&store2, "old"));
    ok(&keys(&store2, &["retire-kek", "1"]));
    let o = verify(&store2, "old");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("KEK version 1 is retired"), "{}", stderr(&o));
}

fn audit_actions(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn sealed_keys_file_and_cli_events_on_the_audit_chain() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 2);
    pull_ok(&src, "demo", &store);
    let cfg_text = format!(
        "{}[encryption]\nencrypt_keys_file = true\n",
        config(&store, &["demo"])
    );
    let cfg = t.path().join("moat.toml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    let c = cfg.to_str().unwrap();

    // No server: the CLI writes to the log itself.
    ok(&keys(&store, &["rotate-kek", "--config", c]));
    let o = keys(&store, &["create", "--role", "admin", "--config", c]);
    ok(&o);
    let key = stdout(&o).trim().to_owned();
    let id = key.split('_').nth(1).unwrap().to_owned();
    let keys_file = store.join("keys.json");
    let sealed = std::fs::read(&keys_file).unwrap();
    assert!(sealed.starts_with(b"MOATENC"), "the keys file is an envelope");
    assert!(
        !String::from_utf8_lossy(&sealed).contains(&id),
        "key ids are not in clear"
    );

    // The server opens the sealed file.
    let server = Server::start(t.path(), &cfg_text);
    let (status, body) = get(&format!("{}/v1/models", server.base), Some(&key));
    assert_eq!(status, 200, "{body}");

    // With the server holding the log, a revocation is spooled and appended
    // by the server; the revoked key stops working.
    let o = keys(&store, &["revoke", &id, "--config", c]);
    ok(&o);
    assert!(stderr(&o).contains("spooled"), "{}", stderr(&o));
    let audit = store.join("audit/audit.jsonl");
    assert!(
        wait_until(Duration::from_secs(10), || audit_actions(&audit)
            .contains(&"key.revoke".to_owned())),
        "the server did not append the spooled record: {:?}",
        audit_actions(&audit)
    );
    assert!(wait_until(Duration::from_secs(5), || {
        get(&format!("{}/v1/models", server.base), Some(&key)).0 == 401
    }));

    // rotate-kek reseals the keys file under version 2 while the server
    // runs; the server rereads the keyring and follows (a key created
    // after the rotation works without a restart).
    let o = keys(&store, &["rotate-kek", "--config", c]);
    ok(&o);
    assert!(stdout(&o).contains("resealed (1 keys)"), "{}", stdout(&o));
    let o = keys(&store, &["create", "--role", "user", "--config", c]);
    ok(&o);
    let key2 = stdout(&o).trim().to_owned();
    assert!(
        wait_until(Duration::from_secs(10), || {
            get(&format!("{}/v1/models", server.base), Some(&key2)).0 == 200
        }),
        "{}",
        server.log_text()
    );
    assert_eq!(server.stop(), 0);

    // Again with no server: version 3, the keys file still opens.
    let o = keys(&store, &["rotate-kek", "--config", c]);
    ok(&o);
    assert!(stdout(&o).contains("resealed (2 keys)"), "{}", stdout(&o));
    ok(&keys(&store, &["retire-kek", "1", "--config", c]));
    let o = keys(&store, &["list", "--config", c]);
    ok(&o);
    assert!(stdout(&o).contains(&id), "{}", stdout(&o));
    // Without the keyring configured the sealed file is a clear error.
    let o = run(&[
        "keys",
        "list",
        "--keys-file",
        keys_file.to_str().unwrap(),
        "--store",
        t.path().join("elsewhere").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("keyring"), "{}", stderr(&o));

    let actions = audit_actions(&audit);
    for want in [
        "kek.rotate",
        "key.create",
        "server.start",
        "key.revoke",
        "server.stop",
        "kek.retire",
    ] {
        assert!(
            actions.contains(&want.to_owned()),
            "{want} missing from {actions:?}"
        );
    }
    let o = run(&[
        "audit",
        "verify",
        audit.to_str().unwrap(),
        "--keys",
        store.join("audit-keys.json").to_str().unwrap(),
    ]);
    ok(&o);
}

#[test]
fn capture_is_sealed_per_record_and_named_by_the_audit_record() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 4);
    pull_ok(&src, "demo", &store);
    ok(&keys(&store, &["rotate-kek"]));
    let (_id, key) = create_key(&store, "user", None);
    let cfg_text = format!("{}[audit]\ncapture = true\n", config(&store, &["demo"]));
    let cfg = t.path().join("moat.toml");
    std::fs::write(&cfg, &cfg_text).unwrap();

    let server = Server::start(t.path(), &cfg_text);
    let (status, body) = chat(&server.base, &key, "demo", serde_json::json!({}));
    assert_eq!(status, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, sse) = chat(&server.base, &key, "demo", serde_json::json!({"stream": true}));
    assert_eq!(status, 200, "{sse}");
    assert_eq!(server.stop(), 0);

    let audit = store.join("audit/audit.jsonl");
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<String> = recs
        .iter()
        .filter(|r| r["action"] == "inference.chat")
        .map(|r| {
            r["capture"]
                .as_str()
                .expect("a chat record names its capture")
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{recs:?}");
    // Records without a capture keep the line format (no `capture` member).
    assert!(
        recs.iter()
            .filter(|r| r["action"] == "server.start")
            .all(|r| r.get("capture").is_none())
    );

    let dir = store.join("audit/capture");
    for id in &ids {
        let raw = std::fs::read(dir.join(format!("{id}.moatenc"))).unwrap();
        assert!(raw.starts_with(b"MOATENC"));
        assert!(
            !String::from_utf8_lossy(&raw).contains("moats"),
            "prompt in clear on disk"
        );
    }
    let o = run(&[
        "audit",
        "show-capture",
        &ids[0],
        "--config",
        cfg.to_str().unwrap(),
    ]);
    ok(&o);
    let shown: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(shown["prompt"][0][1], "Tell me about moats.");
    assert_eq!(shown["response"], answer.as_str());
    assert_eq!(
        shown["finish"].as_str().map(|f| f == "stop" || f == "length"),
        Some(true),
        "{shown}"
    );
    let o = run(&[
        "audit",
        "show-capture",
        &ids[1],
        "--config",
        cfg.to_str().unwrap(),
    ]);
    ok(&o);
    let streamed: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        streamed["response"],
        answer.as_str(),
        "same greedy answer, streamed"
    );
    let o = run(&[
        "audit",
        "show-capture",
        "../../keys",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));

    // The reads are on the chain, and the chain verifies.
    let actions = audit_actions(&audit);
    assert_eq!(
        actions.iter().filter(|a| *a == "capture.read").count(),
        3,
        "{actions:?}"
    );
    ok(&run(&[
        "audit",
        "verify",
        audit.to_str().unwrap(),
        "--keys",
        store.join("audit-keys.json").to_str().unwrap(),
    ]));
}
