//! Key rotation as an operator lives it: rotate the KEK (old objects still
//! open), rewrap objects (their data bytes untouched), retire the old
//! version (objects still wrapped only by it are refused, naming the
//! version). And the keyring file itself: 0600, refused when others can
//! read it, never losing a concurrent rotation.

// Test fixtures: a failed setup step must abort the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_artifact::crypto::{self, CryptoError, Header, KekKind, KeyringFile, NewKek, StreamOptions};
use std::os::unix::fs::PermissionsExt;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn rotate_rewrap_retire() {
    let t = tempfile::tempdir().unwrap();
    let file = KeyringFile::new(t.path().join("keyring.json"));
    let v1 = file.rotate(NewKek::Local).unwrap();
    assert_eq!((v1.version, v1.kind, v1.current), (1, KekKind::Local, true));
    let k1 = file.load().unwrap();
    let old = crypto::seal(&k1, b"api keys v1").unwrap();
    let old_file = t.path().join("blob.enc");
    let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let src = t.path().join("blob");
    std::fs::write(&src, &plain).unwrap();
    crypto::encrypt_file(&k1, &src, &old_file, &StreamOptions::default()).unwrap();
    let before = std::fs::read(&old_file).unwrap();

    // Rotate: version 2 is current, version 1 still opens old data.
    let v2 = file.rotate(NewKek::Local).unwrap();
    assert_eq!((v2.version, v2.current), (2, true));
    let k2 = file.load().unwrap();
    assert_eq!(k2.current_version(), 2);
    assert_eq!(crypto::open(&k2, &old).unwrap(), b"api keys v1");
    let new = crypto::seal(&k2, b"api keys v2").unwrap();
    assert_eq!(Header::read_from(&mut &new[..]).unwrap().kek_version(), 2);

    // Rewrap: only the key block changes; the chunks are the same bytes.
    let (rewrapped, re) = crypto::rewrap_bytes(&old, &k2).unwrap();
    assert_eq!((re.from, re.to, re.changed()), (1, 2, true));
    assert_eq!(crypto::open(&k2, &rewrapped).unwrap(), b"api keys v1");
    let re = crypto::rewrap_file(&old_file, &k2).unwrap();
    assert_eq!((re.from, re.to), (1, 2));
    let after = std::fs::read(&old_file).unwrap();
    let (hb, ha) = (
        Header::read_from(&mut &before[..]).unwrap(),
        Header::read_from(&mut &after[..]).unwrap(),
    );
    assert_eq!(ha.kek_version(), 2);
    assert_eq!(before[hb.len()..], after[ha.len()..], "data re-encrypted");
    assert_eq!(mode(&old_file), 0o600, "mode not kept");
    // Rewrapping again is a no-op.
    let again = crypto::rewrap_file(&old_file, &k2).unwrap();
    assert!(!again.changed());
    assert_eq!(std::fs::read(&old_file).unwrap(), after);

    // Retire version 1: the rewrapped objects open, the one left behind is
    // refused with an error that names the version.
    let info = file.retire(1, false).unwrap();
    assert!(info.retired.is_some() && !info.destroyed);
    let k3 = file.load().unwrap();
    let out = t.path().join("out");
    crypto::decrypt_file(&k3, &old_file, &out, &StreamOptions::default()).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), plain);
    assert_eq!(crypto::open(&k3, &rewrapped).unwrap(), b"api keys v1");
    let e = crypto::open(&k3, &old).unwrap_err();
    assert_eq!(e.retired_version(), Some(1), "{e}");
    assert!(e.to_string().contains("KEK version 1 is retired"), "{e}");
    // …and a retired version cannot be the source of a rewrap either.
    let e = crypto::rewrap_bytes(&old, &k3).unwrap_err();
    assert_eq!(e.retired_version(), Some(1), "{e}");
    let e = crypto::rewrap_file(&old_file, &k3);
    assert!(e.is_ok(), "already on version 2: {e:?}");

    // The current version cannot be retired; unknown versions are named.
    let e = file.retire(2, false).unwrap_err();
    assert!(e.to_string().contains("KEK version 2 is current"), "{e}");
    let e = file.retire(9, false).unwrap_err();
    assert!(matches!(e, CryptoError::UnknownKek(9)), "{e}");
}

#[test]
fn destroy_erases_the_key_bytes() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("keyring.json");
    let file = KeyringFile::new(&path);
    file.rotate(NewKek::Local).unwrap();
    let k1 = file.load().unwrap();
    let old = crypto::seal(&k1, b"secret").unwrap();
    file.rotate(NewKek::Local).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let info = file.retire(1, true).unwrap();
    assert!(info.destroyed);
    let after = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert!(v["keks"][0].get("key").is_none(), "{after}");
    assert!(v["keks"][0]["retired"].is_u64(), "{after}");
    assert!(after.len() < text.len());
    let e = crypto::open(&file.load().unwrap(), &old).unwrap_err();
    assert_eq!(e.retired_version(), Some(1), "{e}");
    let list = file.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].destroyed && !list[1].destroyed && list[1].current);
}

#[test]
fn keyring_file_permissions() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("home");
    let path = dir.join("keyring.json");
    assert_eq!(KeyringFile::default_path(&dir), path);
    let file = KeyringFile::new(&path);
    // No file yet: a clear error that says how to create one.
    let e = file.load().unwrap_err();
    assert!(matches!(e, CryptoError::NoKeyring { .. }), "{e}");
    assert!(e.to_string().contains("moat keys rotate-kek"), "{e}");
    assert!(file.list().unwrap().is_empty());

    file.rotate(NewKek::Local).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir), 0o700);
    for bad in [0o640, 0o604, 0o660, 0o620] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
        let e = file.load().unwrap_err();
        assert!(matches!(e, CryptoError::Permissions { .. }), "{bad:o}: {e}");
        assert!(e.to_string().contains(&format!("{bad:03o}")), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        // Rotation refuses too rather than silently fixing it.
        assert!(file.rotate(NewKek::Local).is_err());
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    file.load().unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The rewrite keeps 0600 and leaves no temporary files.
    file.rotate(NewKek::Local).unwrap();
    assert_eq!(mode(&path), 0o600);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n == "keyring.json" || n == "keyring.lock"),
        "{names:?}"
    );
}

#[test]
fn invalid_keyring_files_name_the_entry() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("keyring.json");
    let file = KeyringFile::new(&path);
    let key = "00".repeat(32);
    let cases = [
        (
            r#"{"format":1,"current":1,"keks":[{"version":1,"kind":"local","created":0,"key":"abc"}]}"#
                .to_owned(),
            "keks[0].key: expected 64 hex digits",
        ),
        (
            format!(
                r#"{{"format":1,"current":2,"keks":[{{"version":1,"kind":"local","created":0,"key":"{key}"}}]}}"#
            ),
            "current: version 2 is not in keks",
        ),
        (
            format!(
                r#"{{"format":1,"current":1,"keks":[{{"version":1,"kind":"local","created":0,"retired":5,"key":"{key}"}}]}}"#
            ),
            "current: version 1 is retired",
        ),
        (
            r#"{"format":1,"current":1,"keks":[{"version":1,"kind":"aws-kms","created":0}]}"#.to_owned(),
            "keks[0].key_id: missing",
        ),
        (
            format!(
                r#"{{"format":1,"current":1,"keks":[{{"version":1,"kind":"local","created":0,"key":"{key}"}},{{"version":1,"kind":"local","created":0,"key":"{key}"}}]}}"#
            ),
            "keks[1].version: 1 is zero or used twice",
        ),
        (
            format!(
                r#"{{"format":1,"current":1,"keks":[{{"version":1,"kind":"local","created":0,"key":"{key}","extra":1}}]}}"#
            ),
            "unknown field `extra`",
        ),
        (
            r#"{"format":2,"current":1,"keks":[]}"#.to_owned(),
            "format 2 is not supported",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, &text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = file.load().unwrap_err();
        assert!(matches!(e, CryptoError::Keyring { .. }), "{e}");
        assert!(e.to_string().contains(needle), "{e}: wanted {needle:?}");
    }
}

#[test]
fn concurrent_rotations_are_not_lost() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("keyring.json");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..5 {
                    KeyringFile::new(&path).rotate(NewKek::Local).unwrap();
                }
            });
        }
    });
    let list = KeyringFile::new(&path).list().unwrap();
    assert_eq!(
        list.iter().map(|k| k.version).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert!(list.last().unwrap().current);
}

#[test]
fn a_kms_version_without_a_client_says_what_to_configure() {
    let t = tempfile::tempdir().unwrap();
    let file = KeyringFile::new(t.path().join("keyring.json"));
    file.rotate(NewKek::Local).unwrap();
    let k1 = file.load().unwrap();
    let old = crypto::seal(&k1, b"x").unwrap();
    let info = file
        .rotate(NewKek::AwsKms {
            key_id: "arn:aws:kms:us-east-1:111122223333:key/example".into(),
        })
        .unwrap();
    assert_eq!(info.kind, KekKind::AwsKms);
    assert_eq!(
        info.key_id.as_deref(),
        Some("arn:aws:kms:us-east-1:111122223333:key/example")
    );
    let k = file.load().unwrap();
    assert!(k.needs_kms());
    // Old local data still opens without KMS.
    assert_eq!(crypto::open(&k, &old).unwrap(), b"x");
    let e = crypto::seal(&k, b"y").unwrap_err();
    assert!(e.to_string().contains("AWS_REGION"), "{e}");
    assert!(e.to_string().contains("KEK version 2"), "{e}");
}
