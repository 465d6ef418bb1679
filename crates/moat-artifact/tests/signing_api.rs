//! The public signing API as another crate uses it: sign a folder, check the
//! signature against a `moat.lock` (no re-hashing) and against the folder.
// Integration-test fixtures: a failed setup step must abort the test, so
// unwrap/expect/panic are the right tools in this file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_artifact::signing::{
    self, Difference, PrivateKey, PublicKey, SignOptions, SignatureError, VerifyOptions,
};
use moat_artifact::{Lock, LockedFile};
use std::path::Path;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        // The folder at run time (cargo sets it for tests): a test binary reused
        // from a build in another checkout must not read that checkout's files.
        std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("tests/fixtures/signing")
        .join(name),
    )
    .unwrap()
}

fn lock_of(dir: &Path) -> Lock {
    let files = moat_artifact::tree::walk(dir, &[])
        .unwrap()
        .into_iter()
        .map(|e| LockedFile {
            sha256: moat_artifact::hash::hash_file(&e.path).unwrap().sha256,
            path: e.rel,
            size: e.size,
        })
        .collect::<Vec<_>>();
    let revision = Lock::content_revision(&files);
    Lock::new("m", "file://x", &revision, files)
}

#[test]
fn sign_then_check_lock_and_folder() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a.safetensors"), vec![7u8; 4096]).unwrap();
    std::fs::write(dir.join("sub/tokenizer.json"), b"{}").unwrap();

    let key = PrivateKey::from_pem(&fixture("p521.key")).unwrap();
    let public = PublicKey::from_pem(&fixture("p521.pub")).unwrap();
    let opts = SignOptions {
        ignore_paths: vec!["model.sig".into()],
        ..SignOptions::default()
    };
    let bundle = signing::sign_key(&dir, &key, &opts).unwrap();
    std::fs::write(dir.join("model.sig"), &bundle).unwrap();

    let lock = lock_of(&dir);
    let signed = signing::open_with_key(&bundle, &public).unwrap();
    assert_eq!(signed.model_name(), "m");
    let verified = signed
        .clone()
        .check_lock(&lock.files, &VerifyOptions::default())
        .unwrap();
    assert_eq!(verified.file_count(), 2);
    signed.clone().check_dir(&dir, &VerifyOptions::default()).unwrap();

    // A lock that disagrees with the signature names the file.
    let mut bad = lock.files.clone();
    for f in &mut bad {
        if f.path == "sub/tokenizer.json" {
            f.sha256 = "0".repeat(64);
        }
    }
    match signed.check_lock(&bad, &VerifyOptions::default()).unwrap_err() {
        SignatureError::Mismatch { differences } => assert_eq!(
            differences,
            vec![Difference::Digest {
                name: "sub/tokenizer.json".into(),
                signed: moat_artifact::hash::sha256_hex(b"{}"),
                actual: "0".repeat(64),
            }]
        ),
        e => panic!("{e:?}"),
    }
}
