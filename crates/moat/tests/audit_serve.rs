//! The audit log of a running server: every request decision is a chained
//! record that `moat audit verify` accepts after a clean stop; with
//! `audit.fail_closed = true` a request whose record cannot be written
//! durably gets 503, and serving resumes (chain intact) once it can.

// Fixture helpers (mounting, filling a disk) are not #[test] functions; a
// failed setup must abort loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn setup() -> (tempfile::TempDir, PathBuf, String) {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("m");
    demo_model(&src, 1);
    pull_ok(&src, "m", &store);
    let (_, key) = create_key(&store, "admin", None);
    (t, store, key)
}

fn records(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn verify(file: &Path, keys: &Path) -> std::process::Output {
    run(&["audit", "verify", &path_str(file), "--keys", &path_str(keys)])
}

#[test]
fn every_request_is_audited_and_the_chain_verifies() {
    let (t, store, key) = setup();
    let server = Server::start(t.path(), &config(&store, &["m"]));
    let base = server.base.clone();
    assert_eq!(get(&format!("{base}/v1/models"), Some(&key)).0, 200);
    assert_eq!(get(&format!("{base}/v1/models"), None).0, 401);
    assert_eq!(chat(&base, &key, "m", json!({})).0, 200);
    assert_eq!(chat(&base, &key, "nope", json!({})).0, 404);
    assert_eq!(server.stop(), 0);

    let file = store.join("audit/audit.jsonl");
    let keys = store.join("audit-keys.json");
    let o = verify(&file, &keys);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let recs = records(&file);
    let actions: Vec<&str> = recs.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions.first(), Some(&"server.start"));
    assert_eq!(actions.last(), Some(&"server.stop"));
    assert!(actions.contains(&"model.load"));
    let requests: Vec<_> = recs.iter().filter(|r| r["request_id"].is_string()).collect();
    assert_eq!(requests.len(), 4, "one record per request: {actions:?}");
    let reject = requests.iter().find(|r| r["action"] == "auth.reject").unwrap();
    assert_eq!(
        (reject["outcome"].as_str(), reject["stage"].as_str()),
        (Some("denied"), Some("auth"))
    );
    let chat = requests
        .iter()
        .find(|r| r["action"] == "inference.chat" && r["outcome"] == "allowed")
        .unwrap();
    assert_eq!(chat["model"], "m");
    assert!(chat["model_digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(chat["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(chat["client_addr"], "127.0.0.1");
    let mac = chat["prompt_hmac"].as_str().unwrap();
    assert_eq!(mac.len(), 64, "keyed prompt hash: {mac}");
    assert!(
        !std::fs::read_to_string(&file)
            .unwrap()
            .contains("Tell me about moats"),
        "prompt stored"
    );
    assert!(
        requests
            .iter()
            .all(|r| r["principal"].is_null() || r["principal"].is_string())
    );

    // Tampering is named.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replacen("\"allowed\"", "\"denied\"", 1);
    std::fs::write(&file, text).unwrap();
    let o = verify(&file, &keys);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("audit.jsonl:"), "{}", stderr(&o));
}

/// A 256 KiB tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(dir.to_owned()))
    }

    /// Fill the file system; returns the filler file.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn full_disk_case(fail_closed: bool) {
    let (t, store, key) = setup();
    let Some(fs) = SmallFs::mount(&t.path().join("small")) else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the audit crate's own tests cover write failures"
        );
        return;
    };
    let file = fs.0.join("audit.jsonl");
    let cfg = format!(
        "{}[audit]\nfile = \"{}\"\nfail_closed = {fail_closed}\n",
        config(&store, &["m"]),
        file.display()
    );
    let server = Server::start(t.path(), &cfg);
    let base = server.base.clone();
    assert_eq!(chat(&base, &key, "m", json!({"max_tokens": 4})).0, 200);

    let filler = fs.fill();
    // Appends that still fit in the audit file's last page need no space:
    // keep asking until the full disk shows (bounded).
    let mut answered = 1; // the chat above
    let mut refused = 0;
    for _ in 0..64 {
        let (status, body) = chat(&base, &key, "m", json!({"max_tokens": 4}));
        match status {
            200 => answered += 1,
            503 if fail_closed => {
                assert_eq!(body["error"]["code"], "audit_unavailable", "{body}");
                refused += 1;
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
        if !fail_closed && failures(&server, &key) > 0.0 {
            break;
        }
    }
    if fail_closed {
        assert_eq!(refused, 1, "a full audit disk never refused a request");
        assert_eq!(get(&format!("{base}/v1/models"), Some(&key)).0, 503);
    } else {
        assert!(
            failures(&server, &key) > 0.0,
            "no audit failure counted on a full disk"
        );
    }

    // Space again: requests are served and recorded, and the chain holds
    // (the gap itself is on the chain as audit.write_failed).
    std::fs::remove_file(filler).unwrap();
    assert_eq!(chat(&base, &key, "m", json!({"max_tokens": 4})).0, 200);
    answered += 1;
    assert_eq!(server.stop(), 0);
    let o = verify(&file, &store.join("audit-keys.json"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let recs = records(&file);
    assert!(
        recs.iter().any(|r| r["action"] == "audit.write_failed"),
        "{recs:?}"
    );
    let allowed = recs
        .iter()
        .filter(|r| r["action"] == "inference.chat" && r["outcome"] == "allowed")
        .count();
    if fail_closed {
        // No request was answered 200 without its record.
        assert_eq!(allowed, answered);
    } else {
        assert!(
            allowed < answered,
            "fail-open: some answered requests have no record"
        );
    }
}

fn failures(server: &Server, key: &str) -> f64 {
    let (_, metrics) = get(&format!("{}/metrics", server.metrics), Some(key));
    let text = metrics.as_str().unwrap_or_default().to_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("moat_audit_write_failures_total"))
        .unwrap_or_default();
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn fail_closed_refuses_what_it_cannot_record() {
    full_disk_case(true);
}

#[test]
fn fail_open_serves_and_counts_the_failures() {
    full_disk_case(false);
}
