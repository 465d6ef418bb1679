//! `moat pull` refusals: every strict safetensors rule, remote code
//! (`auto_map`, `.py`), symlinks. Each exits 1, names the file and the rule,
//! and leaves the store byte-for-byte unchanged; and a `kill -9` at any point
//! of a pull leaves the trusted models either as they were or with the new
//! model complete.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// A store holding one good model, and a fresh copy of a demo model folder
/// to corrupt.
fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tmp();
    let store = t.path().join("store");
    let good = t.path().join("good");
    demo_model(&good, 1);
    pull_ok(&good, "existing", &store);
    let bad = t.path().join("bad");
    demo_model(&bad, 2);
    (t, store, bad)
}

fn assert_refused(src: &Path, store: &Path, file: &str, rule: &str) {
    let before = snapshot(store);
    let o = pull(src, "incoming", store);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "expected a refusal for {rule}; stderr:\n{err}");
    let line = err.lines().find(|l| l.contains(rule));
    assert!(line.is_some(), "rule {rule} not named:\n{err}");
    let line = line.unwrap_or_default();
    assert!(line.contains(file), "file {file} not named in {line:?}");
    assert_eq!(snapshot(store), before, "store changed after refusing {rule}");
}

const T: &str = r#""t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}"#;

#[test]
fn every_safetensors_rule_refuses() {
    let (_t, store, bad) = setup();
    let file = bad.join("model.safetensors");
    let mut too_large = 200_000_000u64.to_le_bytes().to_vec();
    too_large.extend_from_slice(b"{}");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("safetensors.header-length", vec![1, 2, 3]),
        ("safetensors.header-length", {
            let mut v = 1000u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        }),
        ("safetensors.header-too-large", too_large),
        ("safetensors.header-json", safetensors("{not json", 0)),
        ("safetensors.header-json", safetensors("[1,2]", 0)),
        (
            "safetensors.metadata",
            safetensors(&format!(r#"{{"__metadata__":{{"format":1}},{T}}}"#), 16),
        ),
        (
            "safetensors.duplicate-tensor",
            safetensors(&format!("{{{T},{T}}}"), 16),
        ),
        (
            "safetensors.dtype",
            safetensors(r#"{"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#, 8),
        ),
        (
            "safetensors.offsets",
            safetensors(r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12),
        ),
        (
            "safetensors.offsets",
            safetensors(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
        ),
        (
            "safetensors.size-mismatch",
            safetensors(r#"{"t":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}}"#, 16),
        ),
        (
            "safetensors.size-mismatch",
            safetensors(
                r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
                16,
            ),
        ),
        ("safetensors.file-length", safetensors(&format!("{{{T}}}"), 17)),
        ("safetensors.file-length", safetensors(&format!("{{{T}}}"), 15)),
    ];
    for (rule, bytes) in cases {
        std::fs::write(&file, &bytes).unwrap();
        assert_refused(&bad, &store, "model.safetensors", rule);
    }
    // The same folder with a valid file is accepted: the refusals above were
    // about the header, not the folder.
    std::fs::write(&file, safetensors(&format!("{{{T}}}"), 16)).unwrap();
    assert_eq!(code(&pull(&bad, "incoming", &store)), 0);
}

#[test]
fn remote_code_is_refused() {
    let (_t, store, bad) = setup();
    let cfg_path = bad.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
    cfg["auto_map"] = serde_json::json!({"AutoModelForCausalLM": "modeling_evil.EvilModel"});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_refused(&bad, &store, "config.json", "hf.remote-code");

    std::fs::write(&cfg_path, original).unwrap();
    std::fs::write(bad.join("modeling_evil.py"), "import os\nos.system('id')\n").unwrap();
    assert_refused(&bad, &store, "modeling_evil.py", "hf.python-file");
}

#[test]
fn symlinks_and_pickles_are_refused() {
    let (_t, store, bad) = setup();
    std::os::unix::fs::symlink("/etc/passwd", bad.join("passwd")).unwrap();
    assert_refused(&bad, &store, "passwd", "fs.symlink");
    std::fs::remove_file(bad.join("passwd")).unwrap();
    // A protocol-2 pickle calling os.system, named like a weights file.
    std::fs::write(
        bad.join("pytorch_model.bin"),
        b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    assert_refused(&bad, &store, "pytorch_model.bin", "pickle.import.critical");
}

#[test]
fn existing_name_needs_replace_and_same_content_is_a_no_op() {
    let (t, store, _bad) = setup();
    let good = t.path().join("good");
    let o = pull(&good, "existing", &store);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("already in the store"));
    let other = t.path().join("other");
    demo_model(&other, 9);
    let before = snapshot(&store);
    let o = pull(&other, "existing", &store);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--replace"));
    assert_eq!(snapshot(&store), before);
    let o = pull_with(&other, "existing", &store, &["--replace"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        code(&run(&["verify", "existing", "--store", store.to_str().unwrap()])),
        0
    );
    let lock = std::fs::read_to_string(active_dir(&store, "existing").join("moat.lock")).unwrap();
    assert!(lock.contains(&other.display().to_string()));
}

/// The trusted part of the store: `models/` (quarantine is scratch space).
fn trusted(store: &Path) -> Snapshot {
    snapshot(&store.join("models"))
}

#[test]
fn kill_9_at_any_point_leaves_the_store_consistent() {
    let t = tmp();
    let store = t.path().join("store");
    let good = t.path().join("good");
    demo_model(&good, 1);
    pull_ok(&good, "existing", &store);
    // A bigger model so the pull takes long enough to be interrupted at many
    // points: the demo files plus a 256 MiB valid safetensors shard.
    let big = t.path().join("big");
    demo_model(&big, 3);
    let n: u64 = 64 * 1024 * 1024;
    let header = format!(
        r#"{{"x":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        n * 4
    );
    std::fs::write(
        big.join("extra.safetensors"),
        safetensors(&header, (n * 4) as usize),
    )
    .unwrap();

    let before = trusted(&store);
    let mut complete = None;
    let mut outcomes = (0, 0);
    for delay_ms in [0u64, 5, 20, 50, 100, 200, 300, 450, 600, 800, 1100, 1500] {
        let mut child = moat()
            .args([
                "pull",
                &format!("file://{}", big.display()),
                "--name",
                "big",
                "--store",
            ])
            .arg(&store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let now = trusted(&store);
        if now == before {
            outcomes.0 += 1;
        } else {
            // Only the new model may have appeared, and completely.
            let extra: Vec<_> = now.keys().filter(|k| !before.contains_key(*k)).cloned().collect();
            assert!(
                extra.iter().all(|k| k.starts_with("big")),
                "unexpected entries {extra:?}"
            );
            for (k, v) in &before {
                assert_eq!(now.get(k), Some(v), "{k} changed");
            }
            let o = run(&["verify", "big", "--store", store.to_str().unwrap()]);
            assert_eq!(
                code(&o),
                0,
                "a partially promoted model after kill at {delay_ms} ms: {}",
                stderr(&o)
            );
            complete.get_or_insert(now.clone());
            assert_eq!(Some(&now), complete.as_ref());
            outcomes.1 += 1;
            // Start over so later kills land in earlier phases again.
            std::fs::remove_dir_all(store.join("models/big")).unwrap();
        }
    }
    eprintln!("kills before promotion: {}, after: {}", outcomes.0, outcomes.1);
    assert!(
        outcomes.0 > 0,
        "no kill landed before promotion; the test proves nothing"
    );
    // The next pull cleans the dead pulls' quarantine and succeeds.
    pull_ok(&big, "big", &store);
    let leftovers: Vec<_> = std::fs::read_dir(store.join("quarantine")).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "stale quarantine folders remain: {leftovers:?}"
    );
    assert_eq!(
        code(&run(&["verify", "big", "--store", store.to_str().unwrap()])),
        0
    );
}
