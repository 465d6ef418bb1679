//! `moat sign` / `moat verify-signature` against the real binary: the exit
//! code contract (0 valid, 1 invalid with `moat: signature invalid: …`, 2
//! usage or I/O), the default signature path inside the model, and that a
//! signature the tool wrote verifies. Interoperability in both directions
//! with the Python tool itself is in `tests/signing/` at the repository root.

// Fixture helpers below abort the test on a failed setup step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    // The folder at run time (cargo sets it for tests): a test binary reused
    // from a build in another checkout must not read that checkout's files.
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../moat-artifact/tests/fixtures/signing")
}

fn fx(name: &str) -> String {
    path_str(&fixtures().join(name))
}

/// A copy of the tool-signed fixture model.
fn model(t: &tempfile::TempDir) -> PathBuf {
    let dst = t.path().join("model");
    let src = fixtures().join("tool-model");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::create_dir_all(&dst).unwrap();
            std::fs::copy(e.path(), to).unwrap();
        }
    }
    dst
}

#[test]
fn sign_then_verify_key_with_default_signature_path() {
    let t = tmp();
    let m = model(&t);
    let ms = path_str(&m);
    let o = run(&["sign", "key", &ms, "--private-key", &fx("p384.sec1.key")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(m.join("model.sig").is_file());
    let sig = path_str(&m.join("model.sig"));
    let o = run(&[
        "verify-signature",
        "key",
        &ms,
        "--signature",
        &sig,
        "--public-key",
        &fx("p384.pub"),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let line = stdout(&o);
    assert!(
        line.starts_with("verified \"model\": signed by key sha256:"),
        "{line}"
    );
    assert!(line.contains("7 files"), "{line}");

    flip_byte(&m.join("weights/part-1.bin"), 10);
    let o = run(&[
        "verify-signature",
        "key",
        &ms,
        "--signature",
        &sig,
        "--public-key",
        &fx("p384.pub"),
    ]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(
        err.starts_with("moat: signature invalid: the model does not match its signature: weights/part-1.bin: digest differs"),
        "{err}"
    );

    let o = run(&[
        "verify-signature",
        "key",
        &ms,
        "--signature",
        &sig,
        "--public-key",
        &fx("p256.pub"),
    ]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("wrong key"), "{}", stderr(&o));
}

#[test]
fn tool_signatures_verify_and_certificates_need_the_root() {
    let t = tmp();
    let m = model(&t);
    let ms = path_str(&m);
    let o = run(&[
        "verify-signature",
        "certificate",
        &ms,
        "--signature",
        &fx("tool-sigs/cert-p256.sig"),
        "--certificate-chain",
        &fx("root.pem"),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("certificate \"O=moat,CN=model signer\""),
        "{}",
        stdout(&o)
    );
    let o = run(&[
        "verify-signature",
        "certificate",
        &ms,
        "--signature",
        &fx("tool-sigs/cert-p256.sig"),
        "--certificate-chain",
        &fx("other-root.pem"),
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("certificate chain rejected"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_and_io_errors_exit_2() {
    let t = tmp();
    let m = model(&t);
    let ms = path_str(&m);
    let o = run(&["verify-signature", "key", &ms, "--public-key", &fx("p256.pub")]);
    assert_eq!(code(&o), 2, "missing --signature");
    let o = run(&[
        "verify-signature",
        "key",
        &ms,
        "--signature",
        &path_str(&t.path().join("absent.sig")),
        "--public-key",
        &fx("p256.pub"),
    ]);
    assert_eq!(code(&o), 2);
    let o = run(&["sign", "key", &ms, "--private-key", &fx("root.pem")]);
    assert_eq!(code(&o), 2, "a certificate is not a private key: {}", stderr(&o));
}
