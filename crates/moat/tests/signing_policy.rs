//! Signature policy end to end: `moat pull` refuses a model not signed by the
//! configured signer (and records the verified signer in the lock), `moat
//! serve` re-checks it on every load.

mod common;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    // The folder at run time (cargo sets it for tests): a test binary reused
    // from a build in another checkout must not read that checkout's files.
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../moat-artifact/tests/fixtures/signing")
    .join(name)
}

fn sign(dir: &Path, key: &str) {
    let o = run(&[
        "sign",
        "key",
        &path_str(dir),
        "--private-key",
        &path_str(&fixture(key)),
    ]);
    assert_eq!(code(&o), 0, "sign: {}", stderr(&o));
    assert!(dir.join("model.sig").is_file());
}

fn pull_with_key(src: &Path, name: &str, store: &Path) -> std::process::Output {
    pull_with(
        src,
        name,
        store,
        &["--public-key", &path_str(&fixture("p256.pub"))],
    )
}

fn assert_refused(o: &std::process::Output, rule: &str, words: &[&str]) {
    let err = stderr(o);
    assert_eq!(code(o), 1, "{err}");
    let line = err.lines().find(|l| l.contains(rule)).unwrap_or_default();
    assert!(
        line.contains("model.sig"),
        "rule {rule} not reported for model.sig:\n{err}"
    );
    for w in words {
        assert!(line.contains(w), "{w:?} missing in {line:?}");
    }
}

#[test]
fn pull_enforces_the_signer_and_records_it() {
    let t = tmp();
    let store = t.path().join("store");
    let good = t.path().join("good");
    demo_model(&good, 1);
    sign(&good, "p256.key");
    let o = pull_with_key(&good, "good", &store);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lock = std::fs::read_to_string(active_dir(&store, "good").join("moat.lock")).unwrap();
    assert!(
        lock.contains("[signature]") && lock.contains("signer = \"key sha256:"),
        "{lock}"
    );
    let before = snapshot(&store);

    // Signed by another key.
    let other = t.path().join("other");
    demo_model(&other, 2);
    sign(&other, "p521.key");
    assert_refused(&pull_with_key(&other, "other", &store), "signature.invalid", &[]);

    // Not signed at all.
    let unsigned = t.path().join("unsigned");
    demo_model(&unsigned, 3);
    assert_refused(
        &pull_with_key(&unsigned, "unsigned", &store),
        "signature.missing",
        &[],
    );

    // Signed, then a file changed.
    let changed = t.path().join("changed");
    demo_model(&changed, 4);
    sign(&changed, "p256.key");
    let cfg = changed.join("generation_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("0.6", "0.7");
    std::fs::write(&cfg, text).unwrap();
    assert_refused(
        &pull_with_key(&changed, "changed", &store),
        "signature.invalid",
        &["generation_config.json"],
    );

    // Signed, then an unsigned file added.
    let added = t.path().join("added");
    demo_model(&added, 5);
    sign(&added, "p256.key");
    std::fs::write(added.join("extra.json"), "{}").unwrap();
    assert_refused(
        &pull_with_key(&added, "added", &store),
        "signature.invalid",
        &["extra.json"],
    );

    assert_eq!(snapshot(&store), before, "a refused pull changed the store");
}

#[test]
fn policy_from_config_at_pull_and_on_every_load() {
    let t = tmp();
    let store = t.path().join("store");
    for (name, seed, signed) in [("signed", 1, true), ("plain", 2, false)] {
        let src = t.path().join(name);
        demo_model(&src, seed);
        if signed {
            sign(&src, "p256.key");
        }
        // Pulled without a policy: both are accepted into the store.
        pull_ok(&src, name, &store);
    }
    let policy = format!(
        "[models.signature]\npublic_key = \"{}\"\n",
        fixture("p256.pub").display()
    );
    let cfg = format!(
        "home = \"{}\"\n[[models]]\nname = \"signed\"\n{policy}[[models]]\nname = \"plain\"\n{policy}",
        store.display()
    );
    let cfg_path = t.path().join("moat.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    assert_eq!(
        code(&run(&["serve", "--config", &path_str(&cfg_path), "--check"])),
        0
    );

    // The same policy applied by `pull --config`.
    let o = run(&[
        "pull",
        &format!("file://{}", t.path().join("plain").display()),
        "--name",
        "plain",
        "--store",
        &path_str(&store),
        "--config",
        &path_str(&cfg_path),
    ]);
    assert_refused(&o, "signature.missing", &[]);

    // On load: the unsigned model is refused, the signed one served.
    let (_, key) = create_key(&store, "admin", None);
    let server = Server::start(t.path(), &cfg);
    let log = server.log_text();
    let refusal = log
        .lines()
        .find(|l| l.contains("refusing model"))
        .unwrap_or_default();
    assert!(
        refusal.contains("model=plain") && refusal.contains("signature.missing"),
        "{log}"
    );
    assert!(
        log.contains("signature verified") && log.contains("model=signed"),
        "{log}"
    );
    assert_eq!(chat(&server.base, &key, "signed", json!({})).0, 200);
    assert_eq!(chat(&server.base, &key, "plain", json!({})).0, 404);
    assert_eq!(server.stop(), 0);
}

#[test]
fn bad_policy_config_names_the_key() {
    let t = tmp();
    let cfg = t.path().join("moat.toml");
    std::fs::write(
        &cfg,
        "home = \"/tmp/x\"\n[[models]]\nname = \"m\"\n[models.signature]\npublic_key = \"/nonexistent.pub\"\n",
    )
    .unwrap();
    let o = run(&["serve", "--config", &path_str(&cfg), "--check"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("models[0].signature.public_key"),
        "{}",
        stderr(&o)
    );
    std::fs::write(
        &cfg,
        "home = \"/tmp/x\"\n[[models]]\nname = \"m\"\n[models.signature]\nfile = \"model.sig\"\n",
    )
    .unwrap();
    let o = run(&["serve", "--config", &path_str(&cfg), "--check"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("models[0].signature"), "{}", stderr(&o));
}

#[test]
fn verify_checks_the_signature_policy_too() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("m");
    demo_model(&src, 1);
    sign(&src, "p256.key");
    pull_ok(&src, "m", &store);
    let s = path_str(&store);
    let o = run(&[
        "verify",
        "m",
        "--store",
        &s,
        "--public-key",
        &path_str(&fixture("p256.pub")),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("signed by key sha256:"), "{}", stdout(&o));
    let o = run(&[
        "verify",
        "m",
        "--store",
        &s,
        "--public-key",
        &path_str(&fixture("p521.pub")),
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("signature.invalid") && stderr(&o).contains("wrong key"),
        "{}",
        stderr(&o)
    );
}
