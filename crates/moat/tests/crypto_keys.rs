//! `moat keys rotate-kek | rewrap | retire-kek | list-keks` against the real
//! binary: the keyring lands at `<store>/keyring.json` (0600), rewrap moves
//! files to the current version without touching their data, and a file
//! left on a retired version is refused (exit 1) with the version named.

// Fixture helpers below abort the test on a failed setup step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use moat_artifact::crypto::{self, Header, KeyringFile};
use std::os::unix::fs::PermissionsExt;

fn keys(store: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--store", store.to_str().unwrap()]);
    run(&all)
}

#[test]
fn rotate_rewrap_retire_through_the_cli() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let o = keys(&store, &["rotate-kek"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("KEK version 1 (local) is now current"),
        "{}",
        stdout(&o)
    );
    let ring = store.join("keyring.json");
    assert_eq!(
        std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Two objects under version 1.
    let k1 = KeyringFile::new(&ring).load().unwrap();
    let a = t.path().join("a.enc");
    let b = t.path().join("b.enc");
    std::fs::write(&a, crypto::seal(&k1, b"object a").unwrap()).unwrap();
    std::fs::write(&b, crypto::seal(&k1, b"object b").unwrap()).unwrap();

    let o = keys(&store, &["rotate-kek"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("moat keys rewrap"), "{}", stderr(&o));

    let o = keys(&store, &["rewrap", a.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("rewrapped from KEK version 1 to 2"),
        "{}",
        stdout(&o)
    );
    let o = keys(&store, &["rewrap", a.to_str().unwrap()]);
    assert!(stdout(&o).contains("already on KEK version 2"), "{}", stdout(&o));

    let o = keys(&store, &["retire-kek", "1"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = keys(&store, &["list-keks"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let list = stdout(&o);
    assert!(
        list.lines().any(|l| l.starts_with("1 ") && l.contains("retired")),
        "{list}"
    );
    assert!(
        list.lines().any(|l| l.starts_with("2 ") && l.contains("current")),
        "{list}"
    );

    // a moved to version 2 and opens; b was left on version 1 and is refused.
    let k = KeyringFile::new(&ring).load().unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(Header::read_from(&mut &bytes[..]).unwrap().kek_version(), 2);
    assert_eq!(crypto::open(&k, &bytes).unwrap(), b"object a");
    let o = keys(&store, &["rewrap", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("b.enc: KEK version 1 is retired"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("1 of 2 file(s) not rewrapped"),
        "{}",
        stderr(&o)
    );

    // The current version cannot be retired.
    let o = keys(&store, &["retire-kek", "2"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("KEK version 2 is current"), "{}", stderr(&o));
}

#[test]
fn an_explicit_keyring_and_a_kms_key_without_credentials() {
    let t = tempfile::tempdir().unwrap();
    let ring = t.path().join("ring.json");
    let o = run(&["keys", "rotate-kek", "--keyring", ring.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(ring.exists());
    let o = moat()
        .args(["keys", "rotate-kek", "--keyring", ring.to_str().unwrap()])
        .args(["--aws-kms-key-id", "alias/moat"])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("AWS_REGION is not set"), "{}", stderr(&o));
    // Nothing was added.
    assert_eq!(KeyringFile::new(&ring).list().unwrap().len(), 1);
    // A world-readable keyring is refused.
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&["keys", "list-keks", "--keyring", ring.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}
