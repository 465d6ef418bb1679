//! Unit tests of the store: promotion into versions and blobs, dedupe by
//! inode, `current` switching, removal, gc, unsafe revisions, concurrent
//! promotions and a crash between blob linking and the version rename.
// Tests: a failed step must abort loudly (lints relaxed for this module).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::hash::sha256_hex;
use crate::lock::{LOCK_FILE, Lock, LockedFile};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn name(n: &str) -> ModelName {
    ModelName::parse(n).unwrap()
}

fn store() -> (tempfile::TempDir, Store) {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&t.path().join("store")).unwrap();
    (t, s)
}

/// A complete quarantine folder as a pull leaves it: files and a lock whose
/// revision is `revision` (default: the content revision).
fn quarantine(
    store: &Store,
    model: &str,
    source: &str,
    files: &[(&str, &[u8])],
    revision: Option<&str>,
) -> PathBuf {
    let q = store.new_quarantine(&name(model)).unwrap();
    let mut locked = Vec::new();
    for (rel, bytes) in files {
        let p = q.join(FILES_DIR).join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        locked.push(LockedFile {
            path: (*rel).into(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        });
    }
    let rev = revision.map_or_else(|| Lock::content_revision(&locked), str::to_owned);
    let lock = Lock::new(model, source, &rev, locked);
    fs::write(q.join(LOCK_FILE), lock.to_toml()).unwrap();
    q
}

fn promote(store: &Store, model: &str, source: &str, files: &[(&str, &[u8])]) -> Promotion {
    let q = quarantine(store, model, source, files, None);
    let p = store.promote(&q, &name(model), false).unwrap();
    assert!(!q.exists(), "promotion must consume the quarantine folder");
    p
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

fn blob_count(store: &Store) -> usize {
    fs::read_dir(store.blob_dir()).unwrap().count()
}

#[test]
fn default_root_precedence() {
    let env = |k: &str| match k {
        "MOAT_HOME" => Some("/m".to_string()),
        "HOME" => Some("/h".to_string()),
        _ => None,
    };
    assert_eq!(Store::default_root(Some(Path::new("/f")), env), Some("/f".into()));
    assert_eq!(Store::default_root(None, env), Some("/m".into()));
    let home_only = |k: &str| (k == "HOME").then(|| "/h".to_string());
    assert_eq!(
        Store::default_root(None, home_only),
        Some("/h/.local/share/moat".into())
    );
    assert_eq!(Store::default_root(None, |_| None), None);
}

#[test]
fn promotion_links_version_files_to_sealed_blobs() {
    let (_t, store) = store();
    let p = promote(
        &store,
        "m",
        "file:///a",
        &[("a.json", b"{}"), ("sub/w.bin", b"weights")],
    );
    assert_eq!(p.kind, Promoted::New);
    let dir = store.model_dir(&name("m")).unwrap();
    assert_eq!(dir, p.dir);
    assert_eq!(dir, store.root().join("models/m/versions").join(&p.version));
    assert_eq!(
        fs::read_to_string(store.root().join("models/m/current")).unwrap(),
        format!("{}\n", p.version)
    );
    let file = dir.join(FILES_DIR).join("sub/w.bin");
    let blob = store.blob_path(&sha256_hex(b"weights"));
    assert_eq!(
        ino(&file),
        ino(&blob),
        "version file must be a hard link to its blob"
    );
    assert_eq!(fs::metadata(&blob).unwrap().permissions().mode() & 0o777, 0o400);
    assert_eq!(
        fs::metadata(dir.join(LOCK_FILE)).unwrap().permissions().mode() & 0o777,
        0o400
    );
    // The version folder is an ordinary model folder for the verifier.
    crate::verify::verify_dir(&dir).unwrap();
    assert_eq!(store.models().unwrap(), vec!["m".to_string()]);
}

#[test]
fn two_models_share_one_blob() {
    let (_t, store) = store();
    let shared: &[u8] = b"the same tokenizer";
    promote(&store, "a", "file:///a", &[("tok.json", shared), ("w", b"A")]);
    promote(&store, "b", "file:///b", &[("tok.json", shared), ("w", b"B")]);
    let fa = store.model_dir(&name("a")).unwrap().join("files/tok.json");
    let fb = store.model_dir(&name("b")).unwrap().join("files/tok.json");
    assert_eq!(ino(&fa), ino(&fb));
    assert_eq!(blob_count(&store), 3, "tok.json stored once, plus two weights");
    // Blob + two version links; the quarantine copies are gone.
    assert_eq!(fs::metadata(&fa).unwrap().nlink(), 3);
}

#[test]
fn new_revisions_add_versions_and_switch_current() {
    let (_t, store) = store();
    let m = name("m");
    let v1 = promote(&store, "m", "file:///src", &[("w", b"one")]);
    let v2 = promote(&store, "m", "file:///src", &[("w", b"two")]);
    assert_eq!(v2.kind, Promoted::NewVersion);
    assert_ne!(v1.version, v2.version);
    assert_eq!(store.active_version(&m).unwrap(), v2.version);
    assert_eq!(
        fs::read(store.model_dir(&m).unwrap().join("files/w")).unwrap(),
        b"two"
    );
    // The first version is still whole, only inactive.
    crate::verify::verify_dir(&v1.dir).unwrap();

    // Pulling the old content again re-activates it without copying.
    let blobs = blob_count(&store);
    let again = promote(&store, "m", "file:///src", &[("w", b"one")]);
    assert_eq!(again.kind, Promoted::Reactivated);
    assert_eq!(store.active_version(&m).unwrap(), v1.version);
    let same = promote(&store, "m", "file:///src", &[("w", b"one")]);
    assert_eq!(same.kind, Promoted::Unchanged);
    assert_eq!(blob_count(&store), blobs);

    let info = store.model_info(&m).unwrap();
    assert_eq!(info.versions.len(), 2);
    assert_eq!(info.active.as_deref(), Some(v1.version.as_str()));
    assert_eq!(info.source(), Some("file:///src"));
    assert_eq!(info.stored_bytes(), 6);
}

#[test]
fn a_different_source_needs_replace() {
    let (_t, store) = store();
    let m = name("m");
    promote(&store, "m", "file:///one", &[("w", b"1")]);
    promote(&store, "m", "file:///one", &[("w", b"2")]);
    let q = quarantine(&store, "m", "file:///two", &[("w", b"3")], None);
    let err = store.promote(&q, &m, false).unwrap_err();
    assert!(matches!(err, StoreError::DifferentSource { .. }), "{err}");
    assert!(err.to_string().contains("--replace"), "{err}");
    assert!(
        q.exists(),
        "a refused promotion leaves the quarantine to its owner"
    );
    assert_eq!(store.model_info(&m).unwrap().versions.len(), 2);
    let p = store.promote(&q, &m, true).unwrap();
    assert_eq!(p.kind, Promoted::Replaced);
    let info = store.model_info(&m).unwrap();
    assert_eq!(info.versions.len(), 1, "replace swaps the whole model");
    assert_eq!(info.source(), Some("file:///two"));
    assert!(!q.exists());
}

#[test]
fn unsafe_revisions_stay_inside_the_store() {
    let (_t, store) = store();
    let m = name("m");
    for rev in ["../../../../tmp/evil", "/etc/passwd", "..", "a/../../b"] {
        let q = quarantine(&store, "m", "file:///s", &[("w", rev.as_bytes())], Some(rev));
        let p = store.promote(&q, &m, false).unwrap();
        assert!(
            p.dir.starts_with(store.root().join("models/m/versions")),
            "{rev:?} -> {p:?}"
        );
        assert_eq!(p.dir.parent().unwrap(), store.root().join("models/m/versions"));
        assert!(version::check_version_name(&p.version).is_ok());
    }
    assert!(!store.root().join("tmp").exists());
    let q = quarantine(&store, "m", "file:///s", &[("w", b"x")], Some(""));
    assert!(matches!(
        store.promote(&q, &m, false),
        Err(StoreError::Revision(_))
    ));

    // Two revisions that map to the same name are a conflict, never a match.
    let q = quarantine(&store, "m", "file:///s", &[("w", b"c1")], Some("rel:1"));
    store.promote(&q, &m, false).unwrap();
    let q = quarantine(&store, "m", "file:///s", &[("w", b"c2")], Some("rel/1"));
    let err = store.promote(&q, &m, false).unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");

    // A tampered `current` cannot steer a path either.
    fs::write(store.root().join("models/m/current"), "../../x\n").unwrap();
    assert!(matches!(store.model_dir(&m), Err(StoreError::Damaged { .. })));
}

#[test]
fn remove_versions_and_models() {
    let (_t, store) = store();
    let m = name("m");
    let v1 = promote(&store, "m", "file:///s", &[("w", b"1")]);
    let v2 = promote(&store, "m", "file:///s", &[("w", b"2")]);
    let v3 = promote(&store, "m", "file:///s", &[("w", b"3")]);
    // Inactive version: removed, active unchanged. By unique prefix.
    let r = store.remove(&m, Some(&v1.version[..12]), false).unwrap();
    assert_eq!(
        r,
        Removed::Version {
            version: v1.version.clone(),
            activated: None
        }
    );
    assert!(!v1.dir.exists());
    assert_eq!(store.active_version(&m).unwrap(), v3.version);
    // The active one needs --force, and then the newest other becomes active.
    let err = store.remove(&m, Some(&v3.version), false).unwrap_err();
    assert!(matches!(err, StoreError::ActiveVersion { .. }), "{err}");
    assert!(v3.dir.exists());
    let r = store.remove(&m, Some(&v3.version), true).unwrap();
    assert_eq!(
        r,
        Removed::Version {
            version: v3.version.clone(),
            activated: Some(v2.version.clone())
        }
    );
    assert_eq!(
        fs::read(store.model_dir(&m).unwrap().join("files/w")).unwrap(),
        b"2"
    );
    // By revision: the last version takes the model with it.
    let rev = Lock::read(&v2.dir.join(LOCK_FILE)).unwrap().revision;
    assert_eq!(
        store.remove(&m, Some(&rev), true).unwrap(),
        Removed::Model { versions: 1 }
    );
    assert!(store.model_info(&m).unwrap_err().is_not_found());
    assert!(store.remove(&m, None, false).unwrap_err().is_not_found());
    store.gc(false).unwrap();
    assert!(
        !store.root().join("locks/m.lock").exists(),
        "gc drops a removed model's lock file"
    );
    // Nothing half-deleted anywhere.
    assert_eq!(fs::read_dir(store.root().join("trash")).unwrap().count(), 0);

    promote(&store, "m", "file:///s", &[("w", b"1")]);
    assert!(matches!(
        store.remove(&m, Some("nope"), false),
        Err(StoreError::VersionNotFound { .. })
    ));
    assert_eq!(
        store.remove(&m, None, false).unwrap(),
        Removed::Model { versions: 1 }
    );
}

#[test]
fn gc_removes_only_unreferenced_blobs() {
    let (_t, store) = store();
    let m = name("m");
    let shared: &[u8] = b"shared by both versions";
    let v1 = promote(&store, "m", "file:///s", &[("t", shared), ("w", b"old weights")]);
    promote(&store, "m", "file:///s", &[("t", shared), ("w", b"new weights!")]);
    promote(&store, "other", "file:///o", &[("w", b"other")]);
    let nothing = store.gc(false).unwrap();
    assert!(
        nothing.blobs.is_empty() && nothing.freed_bytes == 0,
        "{nothing:?}"
    );

    store.remove(&m, Some(&v1.version), false).unwrap();
    let dry = store.gc(true).unwrap();
    assert_eq!(dry.blobs, vec![(sha256_hex(b"old weights"), 11)]);
    assert_eq!(dry.freed_bytes, 11);
    assert!(
        store.blob_path(&sha256_hex(b"old weights")).exists(),
        "dry run deletes nothing"
    );

    let real = store.gc(false).unwrap();
    assert_eq!(real.blobs, dry.blobs);
    assert_eq!(real.freed_bytes, 11);
    assert!(!store.blob_path(&sha256_hex(b"old weights")).exists());
    for kept in [shared, b"new weights!".as_slice(), b"other".as_slice()] {
        assert!(store.blob_path(&sha256_hex(kept)).exists());
    }
    crate::verify::verify_dir(&store.model_dir(&m).unwrap()).unwrap();
    crate::verify::verify_dir(&store.model_dir(&name("other")).unwrap()).unwrap();
}

#[test]
fn gc_respects_live_and_resumable_quarantine() {
    let (_t, store) = store();
    let qroot = store.root().join(QUARANTINE_DIR);
    // Ours (live PID): kept by both cleanups.
    let live = store.new_quarantine(&name("m")).unwrap();
    // A dead PID's folder (PIDs never reach u32::MAX - 1 on Linux).
    let dead = qroot.join(format!("m.{}.1", u32::MAX - 1));
    fs::create_dir_all(dead.join("files")).unwrap();
    fs::write(dead.join("files/part"), b"12345").unwrap();
    // Resumable: one held by a "live pull" (a lock we hold), one free.
    let held = qroot.join("m.r-aa");
    let free = qroot.join("m.r-bb");
    for d in [&held, &free] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join(quarantine::RESUMABLE_LOCK), b"").unwrap();
        fs::write(d.join("partial"), b"abc").unwrap();
    }
    let _owner =
        fsops::lock_file(&held.join(quarantine::RESUMABLE_LOCK), fsops::LockMode::Exclusive).unwrap();

    // The per-pull cleanup removes dead PIDs only, never resumable folders.
    store.clean_stale_quarantine();
    assert!(!dead.exists() && live.exists() && held.exists() && free.exists());

    fs::create_dir_all(dead.join("files")).unwrap();
    fs::write(dead.join("files/part"), b"12345").unwrap();
    let report = store.gc(false).unwrap();
    assert_eq!(report.quarantine, vec![dead.clone(), free.clone()]);
    assert_eq!(report.quarantine_in_use, 2);
    // The dead pull's part (5 bytes) and the free folder's partial (3).
    assert_eq!(report.freed_bytes, 5 + 3);
    assert!(live.exists() && held.exists() && !free.exists() && !dead.exists());
}

#[test]
fn concurrent_promotions_of_the_same_blob_both_succeed() {
    let (_t, store) = store();
    let big = vec![7u8; 1 << 20];
    let qs: Vec<(String, PathBuf)> = (0..8)
        .map(|i| {
            let n = format!("m{i}");
            let q = quarantine(
                &store,
                &n,
                &format!("file:///{i}"),
                &[("w", &big), ("x", b"same")],
                None,
            );
            (n, q)
        })
        .collect();
    std::thread::scope(|s| {
        for (n, q) in &qs {
            let store = &store;
            s.spawn(move || store.promote(q, &name(n), false).unwrap());
        }
    });
    let first = ino(&store.model_dir(&name("m0")).unwrap().join("files/w"));
    for (n, _) in &qs {
        let dir = store.model_dir(&name(n)).unwrap();
        assert_eq!(ino(&dir.join("files/w")), first, "{n}");
        crate::verify::verify_dir(&dir).unwrap();
    }
    assert_eq!(blob_count(&store), 2);
}

#[test]
fn crash_between_blob_link_and_version_rename_is_harmless() {
    let (_t, store) = store();
    let m = name("m");
    let v1 = promote(&store, "m", "file:///s", &[("w", b"version one")]);
    // Steps 1-2 of a promotion of a second version, then the process "dies":
    // blobs and a staged version exist, nothing was renamed into models/.
    let q = quarantine(&store, "m", "file:///s", &[("w", b"version two")], None);
    let lock = Lock::read(&q.join(LOCK_FILE)).unwrap();
    store.stage_version(&q, &lock).unwrap();
    let dead = store
        .root()
        .join(QUARANTINE_DIR)
        .join(format!("m.{}.2", u32::MAX - 1));
    fs::rename(&q, &dead).unwrap();
    let orphan = store.blob_path(&sha256_hex(b"version two"));
    assert!(orphan.exists());

    // Readers see exactly the old state.
    assert_eq!(store.active_version(&m).unwrap(), v1.version);
    assert_eq!(store.model_info(&m).unwrap().versions.len(), 1);
    crate::verify::verify_dir(&store.model_dir(&m).unwrap()).unwrap();

    // gc reclaims the dead pull's folder and the blob only it linked.
    let dry = store.gc(true).unwrap();
    assert_eq!(dry.blobs.len(), 1);
    assert_eq!(dry.quarantine, vec![dead.clone()]);
    // The blob's bytes and the dead pull's two copies of its lock.
    let lock_len = fs::metadata(dead.join(LOCK_FILE)).unwrap().len();
    assert_eq!(dry.freed_bytes, 11 + 2 * lock_len);
    // The next pull of the same content still succeeds, reusing the blob.
    let v2 = promote(&store, "m", "file:///s", &[("w", b"version two")]);
    assert_eq!(v2.kind, Promoted::NewVersion);
    assert_eq!(ino(&v2.dir.join("files/w")), ino(&orphan));
    let report = store.gc(false).unwrap();
    assert!(report.blobs.is_empty(), "{report:?}");
    assert_eq!(report.quarantine, vec![dead]);
}

#[test]
fn a_damaged_blob_is_replaced_not_reused() {
    let (_t, store) = store();
    let blob = store.blob_path(&sha256_hex(b"good bytes"));
    fs::write(&blob, b"short").unwrap();
    let p = promote(&store, "m", "file:///s", &[("w", b"good bytes")]);
    assert_eq!(fs::read(p.dir.join("files/w")).unwrap(), b"good bytes");
    assert_eq!(fs::read(&blob).unwrap(), b"good bytes");
    let leftovers: Vec<_> = fs::read_dir(store.blob_dir()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn a_quarantine_that_disagrees_with_its_lock_is_refused() {
    let (_t, store) = store();
    let q = quarantine(&store, "m", "file:///s", &[("w", b"1234")], None);
    fs::write(q.join("files/w"), b"12345").unwrap();
    let err = store.promote(&q, &name("m"), false).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("files/w"), "{err}");
    assert!(store.models().unwrap().is_empty());
}

/// A store that encrypts, with a fresh local keyring file beside it.
fn encrypting_store() -> (tempfile::TempDir, Store, crate::crypto::KeyringFile) {
    let t = tempfile::tempdir().unwrap();
    let file = crate::crypto::KeyringFile::new(t.path().join("keyring.json"));
    file.rotate(crate::crypto::NewKek::Local).unwrap();
    let s = Store::open(&t.path().join("store"))
        .unwrap()
        .with_keyring(file.load().unwrap());
    (t, s, file)
}

/// Flip one byte of a (0400) file in place.
fn flip_byte(path: &Path, offset: u64) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    bytes[usize::try_from(offset).unwrap()] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn encrypted_promotion_stores_ciphertext_named_by_the_plaintext_digest() {
    let (_t, store, file) = encrypting_store();
    let weights: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let p = promote(
        &store,
        "m",
        "file:///src",
        &[("w.bin", &weights), ("tok.json", b"{}")],
    );
    let digest = sha256_hex(&weights);
    let blob = store.encrypted_blob_path(&digest);
    assert!(
        blob.is_file(),
        "the encrypted blob is named by the plaintext digest"
    );
    assert!(!store.blob_path(&digest).exists(), "no plaintext blob");
    let stored = fs::read(&blob).unwrap();
    assert!(stored.starts_with(b"MOATENC"));
    assert!(
        !stored.windows(64).any(|w| w == &weights[..64]),
        "plaintext must not appear in the blob"
    );
    assert_eq!(fs::metadata(&blob).unwrap().permissions().mode() & 0o777, 0o400);
    assert_eq!(ino(&blob), ino(&p.dir.join(FILES_DIR).join("w.bin")));
    assert!(p.dir.join(ENCRYPTED_MARKER).is_file());

    let keyring = file.load().unwrap();
    // Without a keyring the check is impossible, not a mismatch.
    let err = crate::verify::verify_dir(&p.dir).unwrap_err();
    assert!(matches!(err, crate::VerifyError::NeedsKeyring { .. }), "{err}");
    crate::verify::verify_dir_with(&p.dir, Some(&keyring)).unwrap();
    let m = crate::verify::load_verified_with(&p.dir, Some(&keyring)).unwrap();
    assert_eq!(
        m.file("w.bin"),
        Some(weights.as_slice()),
        "load hands over the plaintext"
    );

    // The lock is the plain one: same revision as an unencrypted promotion.
    let (_t2, plain) = self::store();
    let q = promote(
        &plain,
        "m",
        "file:///src",
        &[("w.bin", &weights), ("tok.json", b"{}")],
    );
    assert_eq!(q.version, p.version);

    // Unreferenced encrypted blobs are collected by gc.
    store.remove(&name("m"), None, true).unwrap();
    let report = store.gc(false).unwrap();
    assert!(
        report.blobs.iter().any(|(n, _)| *n == format!("{digest}.enc")),
        "{report:?}"
    );
    assert!(!blob.exists());
}

#[test]
fn flipped_byte_in_an_encrypted_blob_fails_naming_the_chunk() {
    let (_t, store, file) = encrypting_store();
    let weights: Vec<u8> = (0..2_500_000u32).map(|i| (i % 253) as u8).collect();
    let p = promote(&store, "m", "file:///src", &[("w.bin", &weights)]);
    let blob = store.encrypted_blob_path(&sha256_hex(&weights));
    let len = fs::metadata(&blob).unwrap().len();
    // The last of three 1 MiB chunks.
    flip_byte(&blob, len - 10);
    let keyring = file.load().unwrap();
    for err in [
        crate::verify::verify_dir_with(&p.dir, Some(&keyring)).unwrap_err(),
        crate::verify::load_verified_with(&p.dir, Some(&keyring)).unwrap_err(),
    ] {
        assert!(err.is_mismatch(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("w.bin: cannot decrypt: chunk 2 at byte offset"),
            "{text}"
        );
        assert!(text.contains("authentication failed"), "{text}");
    }
}

#[test]
fn encrypted_blobs_survive_rotation_and_are_refused_after_retirement() {
    let (_t, store, file) = encrypting_store();
    let p = promote(&store, "m", "file:///src", &[("w.bin", b"weights under KEK 1")]);
    file.rotate(crate::crypto::NewKek::Local).unwrap();
    let rotated = file.load().unwrap();
    assert_eq!(rotated.current_version(), 2);
    crate::verify::verify_dir_with(&p.dir, Some(&rotated)).unwrap();

    // A second model promoted after rotation is wrapped by version 2.
    let store2 = Store::open(store.root()).unwrap().with_keyring(rotated);
    let p2 = promote(&store2, "n", "file:///n", &[("w.bin", b"weights under KEK 2")]);

    file.retire(1, false).unwrap();
    let retired = file.load().unwrap();
    let err = crate::verify::verify_dir_with(&p.dir, Some(&retired)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("KEK version 1 is retired"), "{text}");
    crate::verify::verify_dir_with(&p2.dir, Some(&retired)).unwrap();
}

#[test]
fn rewrapped_encrypted_blob_still_verifies_after_retirement() {
    let (_t, store, file) = encrypting_store();
    let p = promote(&store, "m", "file:///src", &[("w.bin", b"to be rewrapped")]);
    file.rotate(crate::crypto::NewKek::Local).unwrap();
    let rotated = file.load().unwrap();
    let blob = store.encrypted_blob_path(&sha256_hex(b"to be rewrapped"));
    // Every name of the blob (here the version's hard link) must move to
    // the rewrapped inode, or the version would still need KEK 1.
    let report = store.rewrap_blobs(&rotated).unwrap();
    assert_eq!(report.rewrapped, 1);
    assert_eq!(ino(&blob), ino(&p.dir.join(FILES_DIR).join("w.bin")));
    file.retire(1, false).unwrap();
    crate::verify::verify_dir_with(&p.dir, Some(&file.load().unwrap())).unwrap();
}

#[test]
fn encrypted_blob_longer_than_the_lock_is_a_size_mismatch_without_reading_it_all() {
    let (_t, store, file) = encrypting_store();
    let p = promote(&store, "m", "file:///src", &[("w.bin", b"short")]);
    let keyring = file.load().unwrap();
    // Replace the blob by a valid encrypted object of other, longer bytes.
    let blob = store.encrypted_blob_path(&sha256_hex(b"short"));
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&blob, crate::crypto::seal(&keyring, &vec![7u8; 3 << 20]).unwrap()).unwrap();
    for err in [
        crate::verify::verify_dir_with(&p.dir, Some(&keyring)).unwrap_err(),
        crate::verify::load_verified_with(&p.dir, Some(&keyring)).unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(text.contains("w.bin: size"), "{text}");
        assert!(text.contains("lock says 5"), "{text}");
    }
}
