//! `moat models list|show|rm|gc` on the real binary: two revisions of one
//! source become two versions sharing unchanged blobs, removal and gc free
//! exactly the orphaned bytes, `serve` loads the active version; and the
//! on-disk state a crash between blob linking and the version rename leaves
//! reads consistently and is completed by the next pull.
// Test helpers: a failed step must abort the test loudly (lints relaxed for
// this file only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::{Value, json};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn models(store: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["models"];
    all.extend_from_slice(args);
    all.extend(["--store", store.to_str().unwrap()]);
    run(&all)
}

fn models_json(store: &Path, args: &[&str]) -> Value {
    let o = models(store, args);
    assert_eq!(code(&o), 0, "models {args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// A fresh demo model (seed `seed`) at `src`, replacing what was there, so
/// the same source URL gets new content.
fn rewrite_source(src: &Path, seed: u64) {
    if src.exists() {
        std::fs::remove_dir_all(src).unwrap();
    }
    demo_model(src, seed);
}

#[test]
fn versions_list_show_rm_gc_and_serve() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    rewrite_source(&src, 1);
    pull_ok(&src, "m", &store);
    let v1 = active_dir(&store, "m");
    let old_weights = sha256_file(&v1.join("files/model.safetensors"));
    let old_size = std::fs::metadata(v1.join("files/model.safetensors"))
        .unwrap()
        .len();
    rewrite_source(&src, 2);
    let o = pull(&src, "m", &store);
    assert_eq!(code(&o), 0, "a new revision of the same source: {}", stderr(&o));
    let v2 = active_dir(&store, "m");
    assert_ne!(v1, v2);
    // Unchanged files are stored once: both versions link the same inode.
    assert_eq!(
        ino(&v1.join("files/tokenizer.json")),
        ino(&v2.join("files/tokenizer.json"))
    );
    assert_ne!(
        ino(&v1.join("files/model.safetensors")),
        ino(&v2.join("files/model.safetensors"))
    );

    let list = models_json(&store, &["list", "--json"]);
    let row = &list["models"][0];
    let v1_name = v1.file_name().unwrap().to_str().unwrap();
    let v2_name = v2.file_name().unwrap().to_str().unwrap();
    assert_eq!(row["name"], "m");
    assert_eq!(row["versions"], 2);
    assert_eq!(row["active"], v2_name);
    assert_eq!(row["source"], format!("file://{}", src.display()));
    assert!(row["stored_bytes"].as_u64().unwrap() > row["size"].as_u64().unwrap());
    // The same listing through $MOAT_HOME.
    let o = moat()
        .args(["models", "list"])
        .env("MOAT_HOME", &store)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains(v2_name), "{}", stdout(&o));

    let show = models_json(&store, &["show", "m", "--json"]);
    let versions = show["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["version"], v1_name, "oldest first");
    assert_eq!(versions[0]["active"], false);
    assert_eq!(versions[1]["active"], true);
    let lock = std::fs::read_to_string(v2.join("moat.lock")).unwrap();
    let revision = versions[1]["revision"].as_str().unwrap();
    assert!(lock.contains(revision));
    let weights = versions[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "model.safetensors")
        .unwrap();
    assert_eq!(weights["sha256"], old_weights.as_str());
    assert_eq!(weights["size"], old_size);
    assert!(versions[0]["created"].as_str().unwrap().ends_with('Z'));

    // Not found: exit 1; the active version needs --force: exit 2.
    assert_eq!(code(&models(&store, &["show", "nope"])), 1);
    assert_eq!(code(&models(&store, &["rm", "nope"])), 1);
    assert_eq!(code(&models(&store, &["rm", "m@nope"])), 1);
    let o = models(&store, &["rm", &format!("m@{v2_name}")]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));

    // Remove the old version (by a unique prefix of its name), then gc frees
    // exactly its weights: the tokenizer blob is still used by v2.
    let o = models(&store, &["rm", &format!("m@{}", &v1_name[..16])]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!v1.exists());
    let blob = store.join("blobs/sha256").join(&old_weights);
    assert!(blob.exists(), "rm leaves blobs to gc");
    let dry = models_json(&store, &["gc", "--dry-run", "--json"]);
    assert_eq!(dry["blobs"], json!([{"sha256": old_weights, "size": old_size}]));
    assert!(blob.exists());
    let gc = models_json(&store, &["gc", "--json"]);
    assert_eq!(gc["blobs"], dry["blobs"]);
    assert_eq!(gc["freed_bytes"], old_size);
    assert!(!blob.exists());
    let again = models_json(&store, &["gc", "--json"]);
    assert_eq!(again["freed_bytes"], 0);
    let o = models(&store, &["gc"]);
    assert!(stdout(&o).contains("freed 0 bytes"), "{}", stdout(&o));

    assert_eq!(code(&run(&["verify", "m", "--store", &path_str(&store)])), 0);
    let (_, key) = create_key(&store, "admin", None);
    let server = Server::start(t.path(), &config(&store, &["m"]));
    assert_eq!(chat(&server.base, &key, "m", json!({})).0, 200);
    let log = server.log_text();
    assert!(
        log.contains(revision),
        "serve must load the active version:\n{log}"
    );
    assert_eq!(server.stop(), 0);

    // Removing the model removes every version; its blobs become garbage.
    assert_eq!(code(&models(&store, &["rm", "m"])), 0);
    assert_eq!(models_json(&store, &["list", "--json"])["models"], json!([]));
    let gc = models_json(&store, &["gc", "--json"]);
    assert_eq!(gc["blobs"].as_array().unwrap().len(), 5);
    assert_eq!(std::fs::read_dir(store.join("blobs/sha256")).unwrap().count(), 0);
}

#[test]
fn two_names_for_the_same_bytes_share_every_blob() {
    let t = tmp();
    let store = t.path().join("store");
    let a = t.path().join("a");
    demo_model(&a, 4);
    let b = t.path().join("b");
    demo_model(&b, 4);
    pull_ok(&a, "a", &store);
    pull_ok(&b, "b", &store);
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert_eq!(
            ino(&model_file(&store, "a", f)),
            ino(&model_file(&store, "b", f)),
            "{f}"
        );
    }
    assert_eq!(std::fs::read_dir(store.join("blobs/sha256")).unwrap().count(), 5);
    // A different source under an existing name still needs --replace.
    let o = pull(&b, "a", &store);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--replace"), "{}", stderr(&o));
}

/// The state `kill -9` leaves between promotion's blob linking and its
/// version rename, built by hand: the new weights' blob (its only links in
/// the dead pull's quarantine folder), a half-deleted version in trash and a
/// temp file of `current`.
#[test]
fn crash_between_blob_link_and_version_rename() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    rewrite_source(&src, 1);
    pull_ok(&src, "m", &store);
    let v1 = active_dir(&store, "m");
    rewrite_source(&src, 5);

    let dead = u32::MAX - 1; // never a live PID on Linux
    let weights = src.join("model.safetensors");
    let digest = sha256_file(&weights);
    let blob = store.join("blobs/sha256").join(&digest);
    let q = store.join(format!("quarantine/m.{dead}.1"));
    std::fs::create_dir_all(q.join(".stage-version/files")).unwrap();
    std::fs::create_dir_all(q.join("files")).unwrap();
    std::fs::copy(&weights, q.join("files/model.safetensors")).unwrap();
    std::fs::hard_link(q.join("files/model.safetensors"), &blob).unwrap();
    std::fs::hard_link(&blob, q.join(".stage-version/files/model.safetensors")).unwrap();
    let trash = store.join(format!("trash/m@old.{dead}.1"));
    std::fs::create_dir_all(trash.join("files")).unwrap();
    std::fs::write(trash.join("files/x"), b"half deleted").unwrap();
    std::fs::write(store.join(format!("models/m/current.tmp.{dead}")), "garbage").unwrap();

    // Readers see the store as it was before the crash.
    let list = models_json(&store, &["list", "--json"]);
    assert_eq!(list["models"][0]["versions"], 1);
    assert_eq!(active_dir(&store, "m"), v1);
    assert_eq!(code(&run(&["verify", "m", "--store", &path_str(&store)])), 0);
    let dry = models_json(&store, &["gc", "--dry-run", "--json"]);
    assert_eq!(dry["blobs"][0]["sha256"], digest.as_str());
    assert_eq!(dry["quarantine"].as_array().unwrap().len(), 1);
    assert_eq!(dry["trash"].as_array().unwrap().len(), 2);

    // The next pull succeeds, reusing the blob the dead pull left, and
    // removes the dead pull's quarantine folder.
    pull_ok(&src, "m", &store);
    let v2 = active_dir(&store, "m");
    assert_ne!(v2, v1);
    assert_eq!(ino(&v2.join("files/model.safetensors")), ino(&blob));
    assert!(!q.exists());
    assert_eq!(code(&run(&["verify", "m", "--store", &path_str(&store)])), 0);
    let gc = models_json(&store, &["gc", "--json"]);
    assert_eq!(gc["blobs"], json!([]), "the reused blob is referenced now");
    assert_eq!(gc["trash"].as_array().unwrap().len(), 2);
    assert_eq!(gc["freed_bytes"], 12 + 7);
    assert!(!trash.exists());
    assert!(!store.join(format!("models/m/current.tmp.{dead}")).exists());
    assert_eq!(
        models_json(&store, &["show", "m", "--json"])["versions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
