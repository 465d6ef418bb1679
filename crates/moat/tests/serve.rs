//! `moat verify` and `moat serve` against the real binary: tampering is
//! named and refused per model, keys are stored hashed and revocation works
//! without a restart, and temperature-0 / seeded output is the same across
//! restarts.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

/// A store with models `a` and `b` (different seeds).
fn two_models() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tmp();
    let store = t.path().join("store");
    for (name, seed) in [("a", 1), ("b", 2)] {
        let src = t.path().join(name);
        demo_model(&src, seed);
        pull_ok(&src, name, &store);
    }
    (t, store)
}

#[test]
fn flipped_byte_is_named_by_verify_and_refused_by_serve() {
    let (t, store) = two_models();
    let s = path_str(&store);
    assert_eq!(code(&run(&["verify", "a", "--store", &s])), 0);
    flip_byte(&model_file(&store, "a", "model.safetensors"), 5000);
    let o = run(&["verify", "a", "--store", &s]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("model.safetensors"), "{}", stderr(&o));
    assert!(stderr(&o).contains("sha256"), "{}", stderr(&o));
    // Verify by path too.
    let o = run(&["verify", &path_str(&active_dir(&store, "a"))]);
    assert_eq!(code(&o), 1);
    assert_eq!(code(&run(&["verify", "b", "--store", &s])), 0);

    let (_, key) = create_key(&store, "admin", None);
    let server = Server::start(t.path(), &config(&store, &["a", "b"]));
    let (status, models) = get(&format!("{}/v1/models", server.base), Some(&key));
    assert_eq!(status, 200);
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["b"]);
    let log = server.log_text();
    let refusal = log.lines().find(|l| l.contains("refusing model")).expect(&log);
    assert!(
        refusal.contains("model=a") && refusal.contains("model.safetensors"),
        "{refusal}"
    );
    assert_eq!(chat(&server.base, &key, "a", json!({})).0, 404);
    assert_eq!(chat(&server.base, &key, "b", json!({})).0, 200);
    let (status, ready) = get(&format!("{}/ready", server.base), Some(&key));
    assert_eq!(status, 200);
    assert_eq!(ready["refused"][0]["model"], "a");
    assert_eq!(server.stop(), 0);
}

#[test]
fn extra_and_missing_files_are_named() {
    let (_t, store) = two_models();
    let s = path_str(&store);
    let files = active_dir(&store, "a").join("files");
    std::fs::write(files.join("smuggled.json"), "{}").unwrap();
    let o = run(&["verify", "a", "--store", &s]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("smuggled.json: extra file"), "{}", stderr(&o));
    std::fs::remove_file(files.join("smuggled.json")).unwrap();
    std::fs::remove_file(files.join("tokenizer.json")).unwrap();
    let o = run(&["verify", "a", "--store", &s]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("tokenizer.json: missing"), "{}", stderr(&o));
}

#[test]
fn keys_are_hashed_scoped_and_revocable_without_restart() {
    let (t, store) = two_models();
    let (admin_id, admin) = create_key(&store, "admin", None);
    let (user_id, user) = create_key(&store, "user", Some("b"));
    let keys_text = std::fs::read_to_string(store.join("keys.json")).unwrap();
    for secret in [&admin, &user] {
        let secret_part = secret.rsplit('_').next().unwrap();
        assert!(!keys_text.contains(secret_part), "plaintext secret in keys.json");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(store.join("keys.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let server = Server::start(t.path(), &config(&store, &["a", "b"]));
    let models = |key: &str| get(&format!("{}/v1/models", server.base), Some(key));
    assert_eq!(
        models(&user).1["data"].as_array().unwrap().len(),
        1,
        "scoped key sees only b"
    );
    assert_eq!(chat(&server.base, &user, "b", json!({})).0, 200);
    let (status, body) = chat(&server.base, &user, "a", json!({}));
    assert_eq!(status, 403, "{body}");
    // Metrics need an admin key.
    assert_eq!(get(&format!("{}/metrics", server.metrics), Some(&user)).0, 403);
    assert_eq!(get(&format!("{}/metrics", server.metrics), Some(&admin)).0, 200);

    let o = run(&["keys", "revoke", &user_id, "--store", &path_str(&store)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let revoked = wait_until(Duration::from_secs(10), || models(&user).0 == 401);
    assert!(revoked, "revoked key still accepted after 10 s");
    let (_, body) = models(&user);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    assert_eq!(models(&admin).0, 200, "other keys unaffected");

    let list = stdout(&run(&["keys", "list", "--store", &path_str(&store)]));
    let line = list.lines().find(|l| l.starts_with(&user_id)).unwrap();
    assert!(line.contains("revoked"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with(&admin_id) && l.contains("active")),
        "{list}"
    );
    assert_eq!(server.stop(), 0);
}

#[test]
fn same_seed_same_text_across_restarts() {
    let (t, store) = two_models();
    let (_, key) = create_key(&store, "admin", None);
    let cfg = config(&store, &["a"]);
    let ask = |server: &Server| {
        let greedy = chat(&server.base, &key, "a", json!({"max_tokens": 24}));
        let seeded = chat(
            &server.base,
            &key,
            "a",
            json!({"max_tokens": 24, "temperature": 0.8, "seed": 7}),
        );
        assert_eq!(greedy.0, 200, "{}", greedy.1);
        assert_eq!(seeded.0, 200, "{}", seeded.1);
        let text = |v: &serde_json::Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
        (text(&greedy.1), text(&seeded.1))
    };
    let server = Server::start(t.path(), &cfg);
    let first = ask(&server);
    assert_eq!(ask(&server), first, "differs within one run");
    assert_eq!(server.stop(), 0);
    let server = Server::start(t.path(), &cfg);
    assert_eq!(ask(&server), first, "differs across restarts");
    assert!(!first.0.is_empty());
    assert_eq!(server.stop(), 0);
}

#[test]
fn config_check_names_the_bad_key() {
    let t = tmp();
    let path = t.path().join("bad.toml");
    std::fs::write(
        &path,
        "[inference]\nlisten = \"not an address\"\n[[models]]\nname = \"a\"\n",
    )
    .unwrap();
    let o = run(&["serve", "--config", &path_str(&path), "--check"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("inference.listen"), "{}", stderr(&o));
    std::fs::write(&path, "[[models]]\nname = \"a\"\n[typo]\n").unwrap();
    let o = run(&["serve", "--config", &path_str(&path), "--check"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("typo"), "{}", stderr(&o));
    std::fs::write(&path, "home = \"/tmp/x\"\n[[models]]\nname = \"a\"\n").unwrap();
    assert_eq!(code(&run(&["serve", "--config", &path_str(&path), "--check"])), 0);
}

#[test]
fn serve_rescans_on_load() {
    // A stored model whose lock matches its files but which breaks the
    // current rules (as if pulled by an older, laxer moat): verify passes,
    // serve refuses it by name and rule and serves the other model.
    let (t, store) = two_models();
    let files = active_dir(&store, "a").join("files");
    let evil = b"import os\nos.system('id')\n";
    std::fs::write(files.join("modeling_evil.py"), evil).unwrap();
    let lock_path = active_dir(&store, "a").join("moat.lock");
    let mut lock = std::fs::read_to_string(&lock_path).unwrap();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(evil))
    };
    lock.push_str(&format!(
        "\n[[file]]\npath = \"modeling_evil.py\"\nsize = {}\nsha256 = \"{digest}\"\n",
        evil.len()
    ));
    std::fs::write(&lock_path, lock).unwrap();
    assert_eq!(code(&run(&["verify", "a", "--store", &path_str(&store)])), 0);

    let (_, key) = create_key(&store, "admin", None);
    let server = Server::start(t.path(), &config(&store, &["a", "b"]));
    let log = server.log_text();
    let refusal = log.lines().find(|l| l.contains("refusing model")).expect(&log);
    assert!(
        refusal.contains("model=a") && refusal.contains("modeling_evil.py"),
        "{refusal}"
    );
    assert!(refusal.contains("hf.python-file"), "{refusal}");
    assert_eq!(chat(&server.base, &key, "a", json!({})).0, 404);
    assert_eq!(chat(&server.base, &key, "b", json!({})).0, 200);
    assert_eq!(server.stop(), 0);
}
