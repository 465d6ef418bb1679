//! Signing tests: the published golden signatures and signatures made by the
//! tool (model_signing 1.1.1) must verify; moat's own signatures must have
//! the tool's content and layout; every kind of tampering must be refused
//! with its precise reason.

use super::bundle::{Bundle, Material, PAYLOAD_TYPE, pae, pae_compat};
use super::keys::HashChoice;
use super::manifest::{IgnoreSet, Method, hash_model, shard_ranges};
use super::pyjson::{python_bytes_repr, python_float, to_python_pretty};
use super::x509::Anchor;
use super::*;
use crate::lock::LockedFile;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

fn tests_dir() -> PathBuf {
    // The folder at run time (cargo sets it for tests): a test binary reused
    // from a build in another checkout must not read that checkout's files.
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests")
}

fn golden(rel: &str) -> PathBuf {
    tests_dir().join("golden").join(rel)
}

fn fixture(rel: &str) -> PathBuf {
    tests_dir().join("fixtures/signing").join(rel)
}

fn text(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn private(name: &str) -> PrivateKey {
    PrivateKey::from_pem(&text(&fixture(name))).unwrap()
}

fn public(name: &str) -> PublicKey {
    PublicKey::from_pem(&text(&fixture(name))).unwrap()
}

fn roots(names: &[&str]) -> TrustRoots {
    let all: String = names.iter().map(|n| text(&fixture(n))).collect();
    TrustRoots::from_pem(&all).unwrap()
}

fn payload_of(bundle: &[u8]) -> Vec<u8> {
    Bundle::parse(bundle).unwrap().payload
}

/// A small model: nested folder, an empty file, a git file to be ignored.
fn sample_model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("my-model");
    fs::create_dir_all(model.join("weights")).unwrap();
    fs::write(model.join("config.json"), b"{\"hidden\": 8}\n").unwrap();
    let big: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(model.join("weights/model-00001.bin"), &big).unwrap();
    fs::write(model.join("weights/model-00002.bin"), b"tail").unwrap();
    fs::write(model.join("empty"), b"").unwrap();
    fs::write(model.join(".gitattributes"), b"* binary\n").unwrap();
    (tmp, model)
}

fn sign_p256(model: &Path) -> Vec<u8> {
    sign_key(model, &private("p256.key"), &SignOptions::default()).unwrap()
}

fn differences(err: SignatureError) -> Vec<Difference> {
    match err {
        SignatureError::Mismatch { differences } => differences,
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

// ---------------------------------------------------------------- goldens

#[test]
fn golden_v1_0_0_elliptic_key_single_file_model() {
    let key = PublicKey::from_pem(&text(&golden("keys/signing-key-pub.pem"))).unwrap();
    let bundle = fs::read(golden("v1.0.0-elliptic-key/model.sig")).unwrap();
    let v = verify_key(
        &golden("v1.0.0-elliptic-key/signme-1"),
        &bundle,
        &key,
        &VerifyOptions::default(),
    )
    .unwrap();
    assert_eq!(v.model_name, "signme-1");
    assert_eq!(v.resources.len(), 1);
    assert_eq!(v.resources[0].name, ".");
    assert_eq!(
        v.signer,
        Signer::Key {
            fingerprint: "e8450dec4eb99dae995da9af1bc2cc9f76ed669ee2e744f57abba763df3e3f8e".into()
        }
    );
    assert!(!v.legacy);
}

/// v0.3.1: a single-file model, no key hint (raw key bytes instead).
#[test]
fn golden_v0_3_1_elliptic_key() {
    let key = PublicKey::from_pem(&text(&golden("keys/signing-key-pub.pem"))).unwrap();
    let bundle = fs::read(golden("v0.3.1-elliptic-key/model.sig")).unwrap();
    let v = verify_key(
        &golden("v0.3.1-elliptic-key/signme-1"),
        &bundle,
        &key,
        &VerifyOptions::default(),
    )
    .unwrap();
    assert_eq!(v.model_name, "signme-1");
}

/// The v0.2 certificate golden signed the buggy PAE (`DSSEV1` + the Python
/// bytes repr) with SHA-256; a key signature over that PAE with the curve's
/// hash is accepted too, as the tool accepts it.
#[test]
fn compat_pae_is_accepted_for_keys_and_certificates() {
    let b = Bundle::parse(&fs::read(golden("v0.2.0-certificate/model.sig")).unwrap()).unwrap();
    let Material::Chain(chain) = &b.material else {
        panic!()
    };
    let leaf = super::x509::Cert::from_der(&chain[0])
        .unwrap()
        .public_key()
        .unwrap();
    assert!(!leaf.verify(&pae(&b.payload), &b.signature, HashChoice::Curve));
    assert!(leaf.verify(&pae_compat(&b.payload), &b.signature, HashChoice::Sha256));

    let (_tmp, model) = sample_model();
    let good = payload_of(&sign_p256(&model));
    let key = private("p256.key");
    let compat = Bundle {
        material: Material::Key {
            hint: Some(key.public_key().hint()),
        },
        payload_type: PAYLOAD_TYPE.into(),
        signature: key.sign(&pae_compat(&good)),
        payload: good,
    }
    .to_json()
    .unwrap();
    verify_key(&model, &compat, &public("p256.pub"), &VerifyOptions::default()).unwrap();
}

#[test]
fn golden_v1_1_0_elliptic_key_folder_with_signed_ignores() {
    let key = PublicKey::from_pem(&text(&golden("keys/signing-key-pub.pem"))).unwrap();
    let bundle = fs::read(golden("v1.1.0-elliptic-key/model.sig")).unwrap();
    let v = verify_key(
        &golden("v1.1.0-elliptic-key"),
        &bundle,
        &key,
        &VerifyOptions::default(),
    )
    .unwrap();
    assert_eq!(v.model_name, "v1.1.0-elliptic-key");
    assert_eq!(v.file_count(), 2);
    assert!(v.serialization.ignore_paths.contains(&"ignore-me".to_owned()));
}

#[test]
fn golden_key_hint_matches_the_published_key() {
    let key = PublicKey::from_pem(&text(&golden("keys/signing-key-pub.pem"))).unwrap();
    assert_eq!(key.curve(), Curve::P384);
    assert_eq!(key.to_pem(), text(&golden("keys/signing-key-pub.pem")));
}

fn golden_certificate(dir: &str) -> VerifiedSignature {
    let bundle = fs::read(golden(&format!("{dir}/model.sig"))).unwrap();
    let trust = TrustRoots::from_pem(&text(&golden("keys/intermediate-ca.pem"))).unwrap();
    let opts = VerifyOptions {
        ignore_paths: vec!["model.sig".into()],
        ..VerifyOptions::default()
    };
    open_with_certificates_anchored(&bundle, &trust, Anchor::AnyTrusted)
        .unwrap()
        .check_dir(&golden(dir), &opts)
        .unwrap()
}

#[test]
fn golden_v1_0_0_certificate() {
    let v = golden_certificate("v1.0.0-certificate");
    assert_eq!(v.model_name, "v1.0.0-certificate");
    assert_eq!(v.file_count(), 2);
    let Signer::Certificate(id) = &v.signer else {
        panic!("not a certificate signer")
    };
    assert_eq!(id.subject, "CN=intermediate-ca");
    assert_eq!(id.issuer, "CN=intermediate-ca");
}

#[test]
fn golden_v1_1_0_certificate() {
    let v = golden_certificate("v1.1.0-certificate");
    assert_eq!(v.model_name, "v1.1.0-certificate");
    assert_eq!(v.file_count(), 2);
}

#[test]
fn golden_v0_2_0_certificate_legacy_predicate_and_pae() {
    let v = golden_certificate("v0.2.0-certificate");
    assert!(v.legacy);
    assert_eq!(v.model_name, COMPAT_MODEL_NAME);
    assert_eq!(v.file_count(), 2);
}

#[test]
fn golden_certificate_needs_the_root_like_the_tool() {
    // The tool's OpenSSL store accepts no partial chain: an intermediate
    // alone is not a trust anchor.
    let bundle = fs::read(golden("v1.1.0-certificate/model.sig")).unwrap();
    let trust = TrustRoots::from_pem(&text(&golden("keys/intermediate-ca.pem"))).unwrap();
    let err = open_with_certificates(&bundle, &trust).unwrap_err();
    match err {
        SignatureError::Certificate(m) => assert!(m.contains("CN=root-ca"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn golden_tampered_file_is_named_with_both_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1.1.0-elliptic-key");
    fs::create_dir(&dir).unwrap();
    for f in ["model.sig", "signme-1", "signme-2"] {
        fs::copy(golden(&format!("v1.1.0-elliptic-key/{f}")), dir.join(f)).unwrap();
    }
    fs::write(dir.join("signme-2"), b"signme-X").unwrap();
    let key = PublicKey::from_pem(&text(&golden("keys/signing-key-pub.pem"))).unwrap();
    let err = verify_key(
        &dir,
        &fs::read(dir.join("model.sig")).unwrap(),
        &key,
        &VerifyOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        differences(err),
        vec![Difference::Digest {
            name: "signme-2".into(),
            signed: "32dcb1f8e1ae52d5963e56a6ba06ab58b424c15ed2a6b70d2feca1d089370028".into(),
            actual: crate::hash::sha256_hex(b"signme-X"),
        }]
    );
}

// ------------------------------------------------ signatures by the tool

fn tool_sig(name: &str) -> Vec<u8> {
    fs::read(fixture(&format!("tool-sigs/{name}"))).unwrap()
}

#[test]
fn tool_key_signatures_verify_on_every_curve() {
    let model = fixture("tool-model");
    for (sig, key) in [
        ("key-p256.sig", "p256.pub"),
        ("key-p384-sec1.sig", "p384.pub"),
        ("key-p521.sig", "p521.pub"),
        ("key-p256-shards-1024.sig", "p256.pub"),
    ] {
        let v = verify_key(&model, &tool_sig(sig), &public(key), &VerifyOptions::default())
            .unwrap_or_else(|e| panic!("{sig}: {e}"));
        assert_eq!(v.model_name, "tool-model", "{sig}");
        // Shards skip the empty file.
        let files = if sig.contains("shards") { 6 } else { 7 };
        assert_eq!(v.file_count(), files, "{sig}");
    }
}

#[test]
fn tool_certificate_signatures_verify_ec_and_rsa_chains() {
    let model = fixture("tool-model");
    let v = verify_certificate(
        &model,
        &tool_sig("cert-p256.sig"),
        &roots(&["root.pem"]),
        &VerifyOptions::default(),
    )
    .unwrap();
    let Signer::Certificate(id) = v.signer else {
        panic!()
    };
    // RFC 4514 order (last RDN first).
    assert_eq!(id.subject, "O=moat,CN=model signer");
    assert_eq!(id.san, vec!["email:signer@example.com".to_owned()]);
    assert_eq!(id.issuer, "O=moat,CN=moat test intermediate");

    verify_certificate(
        &model,
        &tool_sig("cert-p521-rsa.sig"),
        &roots(&["rsa-root.pem"]),
        &VerifyOptions::default(),
    )
    .unwrap();
}

#[test]
fn tool_shard_signature_lists_shards_and_skips_empty_files() {
    let signed = open_with_key(&tool_sig("key-p256-shards-1024.sig"), &public("p256.pub")).unwrap();
    assert_eq!(signed.serialization().method, Method::Shards { shard_size: 1024 });
    let names: Vec<&str> = signed.resources().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"weights/part-1.bin:2048:3000"));
    assert!(!names.iter().any(|n| n.starts_with("empty")));
}

/// Re-render the tool's own payload (keeping its key order) and get its exact
/// bytes back: indentation, separators, `\u00e9`, `1024.0`.
#[test]
fn python_layout_reproduces_the_tools_payload_bytes() {
    for sig in [
        "key-p256.sig",
        "key-p521.sig",
        "cert-p256.sig",
        "key-p256-shards-1024.sig",
    ] {
        let payload = payload_of(&tool_sig(sig));
        let value: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(to_python_pretty(&value).as_bytes(), &payload[..], "{sig}");
    }
    let golden_payload = payload_of(&fs::read(golden("v1.0.0-certificate/model.sig")).unwrap());
    let value: Value = serde_json::from_slice(&golden_payload).unwrap();
    assert_eq!(to_python_pretty(&value).as_bytes(), &golden_payload[..]);
}

fn normalized(payload: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(payload).unwrap();
    if let Some(list) = v["predicate"]["serialization"]["ignore_paths"].as_array_mut() {
        list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    v
}

#[test]
fn moat_payload_has_the_tools_content() {
    let model = fixture("tool-model");
    let ours = sign_key(&model, &private("p256.key"), &SignOptions::default()).unwrap();
    assert_eq!(
        normalized(&payload_of(&ours)),
        normalized(&payload_of(&tool_sig("key-p256.sig")))
    );
    let shards = SignOptions {
        method: Method::Shards { shard_size: 1024 },
        ..SignOptions::default()
    };
    let ours = sign_key(&model, &private("p256.key"), &shards).unwrap();
    assert_eq!(
        normalized(&payload_of(&ours)),
        normalized(&payload_of(&tool_sig("key-p256-shards-1024.sig")))
    );
}

#[test]
fn moat_bundle_has_the_tools_layout() {
    let model = fixture("tool-model");
    let ours = sign_key(&model, &private("p256.key"), &SignOptions::default()).unwrap();
    let tool = tool_sig("key-p256.sig");
    // Same key hint, same envelope fields in the same order; only the
    // payload (key order) and the signature bytes may differ.
    let strip = |b: &[u8]| {
        let mut v: Value = serde_json::from_slice(b).unwrap();
        v["dsseEnvelope"]["payload"] = Value::Null;
        v["dsseEnvelope"]["signatures"][0]["sig"] = Value::Null;
        serde_json::to_vec(&v).unwrap()
    };
    assert_eq!(strip(&ours), strip(&tool));
    assert!(ours.starts_with(b"{\"mediaType\":\"application/vnd.dev.sigstore.bundle.v0.3+json\",\"verificationMaterial\":{\"publicKey\":{\"hint\":\""));
    assert!(!ours.ends_with(b"\n"));

    let signer = CertificateSigner::new(
        private("p256.key"),
        &text(&fixture("leaf.pem")),
        &text(&fixture("intermediate.pem")),
    )
    .unwrap();
    let ours = sign_certificate(&model, &signer, &SignOptions::default()).unwrap();
    assert_eq!(strip(&ours), strip(&tool_sig("cert-p256.sig")));
}

// ------------------------------------------------------------ round trips

#[test]
fn round_trip_every_curve_and_method() {
    let (_tmp, model) = sample_model();
    for (key, public_key) in [
        ("p256.key", "p256.pub"),
        ("p384.sec1.key", "p384.pub"),
        ("p521.key", "p521.pub"),
    ] {
        for method in [
            Method::Files,
            Method::Shards { shard_size: 1000 },
            Method::Shards {
                shard_size: DEFAULT_SHARD_SIZE,
            },
        ] {
            let opts = SignOptions {
                method,
                ..SignOptions::default()
            };
            let bundle = sign_key(&model, &private(key), &opts).unwrap();
            let v = verify_key(&model, &bundle, &public(public_key), &VerifyOptions::default())
                .unwrap_or_else(|e| panic!("{key} {method:?}: {e}"));
            assert_eq!(v.model_name, "my-model");
            assert_eq!(v.serialization.method, method);
            let expected_files = if method == Method::Files { 4 } else { 3 };
            assert_eq!(v.file_count(), expected_files, "{key} {method:?}");
            if method == (Method::Shards { shard_size: 1000 }) {
                assert_eq!(v.resources.len(), 5 + 1 + 1);
            }
        }
    }
}

#[test]
fn round_trip_certificate_ec_and_rsa() {
    let (_tmp, model) = sample_model();
    let signer = CertificateSigner::new(
        private("p256.key"),
        &text(&fixture("leaf.pem")),
        &text(&fixture("intermediate.pem")),
    )
    .unwrap();
    let bundle = sign_certificate(&model, &signer, &SignOptions::default()).unwrap();
    verify_certificate(&model, &bundle, &roots(&["root.pem"]), &VerifyOptions::default()).unwrap();
    // The root may also be given together with unrelated certificates.
    verify_certificate(
        &model,
        &bundle,
        &roots(&["other-root.pem", "root.pem"]),
        &VerifyOptions::default(),
    )
    .unwrap();

    let signer =
        CertificateSigner::new(private("p521.key"), &text(&fixture("leaf-p521-rsa.pem")), "").unwrap();
    let bundle = sign_certificate(&model, &signer, &SignOptions::default()).unwrap();
    verify_certificate(
        &model,
        &bundle,
        &roots(&["rsa-root.pem"]),
        &VerifyOptions::default(),
    )
    .unwrap();
}

#[test]
fn empty_model_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("nothing");
    fs::create_dir(&model).unwrap();
    let bundle = sign_p256(&model);
    let v = verify_key(&model, &bundle, &public("p256.pub"), &VerifyOptions::default()).unwrap();
    assert!(v.resources.is_empty());
    let payload = String::from_utf8(payload_of(&bundle)).unwrap();
    assert!(payload.contains("\"resources\": []"), "{payload}");
}

#[test]
fn signature_inside_the_model_is_ignored_and_recorded() {
    let (_tmp, model) = sample_model();
    let opts = SignOptions {
        ignore_paths: vec!["model.sig".into()],
        ..SignOptions::default()
    };
    let bundle = sign_key(&model, &private("p256.key"), &opts).unwrap();
    fs::write(model.join("model.sig"), &bundle).unwrap();
    let v = verify_key(&model, &bundle, &public("p256.pub"), &VerifyOptions::default()).unwrap();
    assert_eq!(
        v.serialization.ignore_paths,
        vec!["model.sig", ".git", ".gitattributes", ".github", ".gitignore"]
    );
}

#[test]
fn git_paths_are_signed_when_asked() {
    let (_tmp, model) = sample_model();
    let opts = SignOptions {
        ignore_git_paths: false,
        ..SignOptions::default()
    };
    let bundle = sign_key(&model, &private("p256.key"), &opts).unwrap();
    let signed = open_with_key(&bundle, &public("p256.pub")).unwrap();
    assert!(signed.resources().any(|r| r.name == ".gitattributes"));
    assert!(signed.serialization().ignore_paths.is_empty());
    // A verifier that ignores git paths now misses a signed file.
    let err = signed.check_dir(&model, &VerifyOptions::default()).unwrap_err();
    assert_eq!(
        differences(err),
        vec![Difference::Missing {
            name: ".gitattributes".into()
        }]
    );
}

// ------------------------------------------------------------- tampering

#[test]
fn flipped_byte_names_file_and_digests() {
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let path = model.join("weights/model-00001.bin");
    let mut bytes = fs::read(&path).unwrap();
    let before = crate::hash::sha256_hex(&bytes);
    bytes[1234] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = verify_key(&model, &bundle, &public("p256.pub"), &VerifyOptions::default()).unwrap_err();
    assert!(err.is_invalid());
    assert_eq!(
        differences(err),
        vec![Difference::Digest {
            name: "weights/model-00001.bin".into(),
            signed: before,
            actual: crate::hash::sha256_hex(&bytes),
        }]
    );
}

#[test]
fn flipped_byte_in_shard_names_the_shard() {
    let (_tmp, model) = sample_model();
    let opts = SignOptions {
        method: Method::Shards { shard_size: 1000 },
        ..SignOptions::default()
    };
    let bundle = sign_key(&model, &private("p256.key"), &opts).unwrap();
    let path = model.join("weights/model-00001.bin");
    let mut bytes = fs::read(&path).unwrap();
    bytes[2500] ^= 0x80;
    fs::write(&path, &bytes).unwrap();
    let err = verify_key(&model, &bundle, &public("p256.pub"), &VerifyOptions::default()).unwrap_err();
    let d = differences(err);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].name(), "weights/model-00001.bin:2000:3000");
}

#[test]
fn renamed_added_removed_files() {
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let key = public("p256.pub");
    let opts = VerifyOptions::default();

    fs::rename(model.join("config.json"), model.join("config.yaml")).unwrap();
    assert_eq!(
        differences(verify_key(&model, &bundle, &key, &opts).unwrap_err()),
        vec![
            Difference::Missing {
                name: "config.json".into()
            },
            Difference::Unsigned {
                name: "config.yaml".into()
            },
        ]
    );
    fs::rename(model.join("config.yaml"), model.join("config.json")).unwrap();

    fs::write(model.join("weights/extra.pkl"), b"payload").unwrap();
    assert_eq!(
        differences(verify_key(&model, &bundle, &key, &opts).unwrap_err()),
        vec![Difference::Unsigned {
            name: "weights/extra.pkl".into()
        }]
    );
    fs::remove_file(model.join("weights/extra.pkl")).unwrap();

    fs::remove_file(model.join("empty")).unwrap();
    assert_eq!(
        differences(verify_key(&model, &bundle, &key, &opts).unwrap_err()),
        vec![Difference::Missing { name: "empty".into() }]
    );
}

#[test]
fn wrong_key_is_named() {
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let other = public("p384.pub");
    match verify_key(&model, &bundle, &other, &VerifyOptions::default()).unwrap_err() {
        SignatureError::WrongKey { signed, given } => {
            assert_eq!(signed, public("p256.pub").hint());
            assert_eq!(given, other.hint());
        }
        e => panic!("{e:?}"),
    }
    // Without a hint (pre-1.1 bundles) the signature check itself refuses.
    let mut b = Bundle::parse(&bundle).unwrap();
    b.material = Material::Key { hint: None };
    let no_hint = b.to_json().unwrap();
    let mut v: Value = serde_json::from_slice(&no_hint).unwrap();
    v["verificationMaterial"]["publicKey"] = serde_json::json!({});
    let no_hint = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        verify_key(&model, &no_hint, &other, &VerifyOptions::default()).unwrap_err(),
        SignatureError::BadSignature
    ));
    verify_key(&model, &no_hint, &public("p256.pub"), &VerifyOptions::default()).unwrap();
}

#[test]
fn model_name_is_checked_only_when_required() {
    let (tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let renamed = tmp.path().join("renamed-model");
    fs::rename(&model, &renamed).unwrap();
    // As the tool: a renamed folder still verifies.
    verify_key(&renamed, &bundle, &public("p256.pub"), &VerifyOptions::default()).unwrap();
    let opts = VerifyOptions {
        expected_model_name: Some("renamed-model".into()),
        ..VerifyOptions::default()
    };
    match verify_key(&renamed, &bundle, &public("p256.pub"), &opts).unwrap_err() {
        SignatureError::ModelName { signed, expected } => {
            assert_eq!(signed, "my-model");
            assert_eq!(expected, "renamed-model");
        }
        e => panic!("{e:?}"),
    }
}

fn replace_payload(bundle: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(bundle).unwrap();
    let payload = payload_of(bundle);
    let edited = edit(std::str::from_utf8(&payload).unwrap());
    v["dsseEnvelope"]["payload"] = Value::String(STANDARD.encode(edited));
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn modified_payload_with_old_signature_is_refused() {
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let forged = replace_payload(&bundle, |p| p.replace("\"my-model\"", "\"evil-model\""));
    assert!(matches!(
        verify_key(&model, &forged, &public("p256.pub"), &VerifyOptions::default()).unwrap_err(),
        SignatureError::PayloadModified
    ));
    // The same for a certificate bundle.
    let signer = CertificateSigner::new(
        private("p256.key"),
        &text(&fixture("leaf.pem")),
        &text(&fixture("intermediate.pem")),
    )
    .unwrap();
    let bundle = sign_certificate(&model, &signer, &SignOptions::default()).unwrap();
    let forged = replace_payload(&bundle, |p| p.replacen("\"digest\": \"", "\"digest\": \"00", 1));
    assert!(matches!(
        open_with_certificates(&forged, &roots(&["root.pem"])).unwrap_err(),
        SignatureError::PayloadModified
    ));
}

#[test]
fn symlinks_refused_unless_allowed() {
    let (_tmp, model) = sample_model();
    std::os::unix::fs::symlink("config.json", model.join("alias.json")).unwrap();
    match sign_key(&model, &private("p256.key"), &SignOptions::default()).unwrap_err() {
        SignError::Model(SignatureError::Symlink { path }) => assert_eq!(path, "alias.json"),
        e => panic!("{e:?}"),
    }
    let opts = SignOptions {
        allow_symlinks: true,
        ..SignOptions::default()
    };
    let bundle = sign_key(&model, &private("p256.key"), &opts).unwrap();
    let signed = open_with_key(&bundle, &public("p256.pub")).unwrap();
    let alias = signed
        .resources()
        .find(|r| r.name == "alias.json")
        .unwrap()
        .clone();
    assert_eq!(alias.digest, crate::hash::sha256_hex(b"{\"hidden\": 8}\n"));
    // The verifier decides: without --allow-symlinks the same model fails.
    match signed
        .clone()
        .check_dir(&model, &VerifyOptions::default())
        .unwrap_err()
    {
        SignatureError::Symlink { path } => assert_eq!(path, "alias.json"),
        e => panic!("{e:?}"),
    }
    let allow = VerifyOptions {
        allow_symlinks: true,
        ..VerifyOptions::default()
    };
    signed.check_dir(&model, &allow).unwrap();
}

#[test]
fn linked_folders_are_skipped_like_the_tool() {
    let (tmp, model) = sample_model();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("x"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, model.join("linked")).unwrap();
    let hashed = hash_model(&model, Method::Files, &IgnoreSet::default(), true).unwrap();
    assert!(
        hashed
            .keys()
            .all(|k| k.components.first().is_none_or(|c| c != "linked"))
    );
}

#[test]
fn special_files_are_refused() {
    let (_tmp, model) = sample_model();
    let sock = model.join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    match sign_key(&model, &private("p256.key"), &SignOptions::default()).unwrap_err() {
        SignError::Model(SignatureError::NotRegular { path }) => assert_eq!(path, "s.sock"),
        e => panic!("{e:?}"),
    }
}

// ------------------------------------------------------- bundle shapes

#[test]
fn malformed_bundles_name_the_field() {
    let key = public("p256.pub");
    let field_of = |b: &[u8]| match open_with_key(b, &key).unwrap_err() {
        SignatureError::Malformed { field, .. } => field,
        e => panic!("{e:?}"),
    };
    assert_eq!(field_of(b"not json"), "(bundle)");
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let mut v: Value = serde_json::from_slice(&bundle).unwrap();
    v.as_object_mut().unwrap().remove("dsseEnvelope");
    assert_eq!(field_of(&serde_json::to_vec(&v).unwrap()), "dsseEnvelope");
    let mut v: Value = serde_json::from_slice(&bundle).unwrap();
    v["dsseEnvelope"]["signatures"] = serde_json::json!([]);
    assert_eq!(
        field_of(&serde_json::to_vec(&v).unwrap()),
        "dsseEnvelope.signatures"
    );
    let mut v: Value = serde_json::from_slice(&bundle).unwrap();
    v["dsseEnvelope"]["payload"] = Value::String("%%%".into());
    assert_eq!(field_of(&serde_json::to_vec(&v).unwrap()), "dsseEnvelope.payload");
    // A certificate bundle given to the key verifier, and the reverse.
    assert_eq!(
        field_of(&tool_sig("cert-p256.sig")),
        "verificationMaterial.publicKey"
    );
    assert!(matches!(
        open_with_certificates(&bundle, &roots(&["root.pem"])).unwrap_err(),
        SignatureError::Malformed { field, .. } if field == "verificationMaterial.x509CertificateChain"
    ));
}

#[test]
fn media_and_payload_types_are_checked() {
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let mut v: Value = serde_json::from_slice(&bundle).unwrap();
    v["mediaType"] = Value::String("application/vnd.dev.sigstore.bundle+json;version=0.2".into());
    assert!(matches!(
        open_with_key(&serde_json::to_vec(&v).unwrap(), &public("p256.pub")).unwrap_err(),
        SignatureError::UnsupportedMediaType(_)
    ));
    // payloadType is not part of the PAE the tool signs (it uses the constant),
    // so a changed one keeps the signature valid and is refused by type.
    let mut v: Value = serde_json::from_slice(&bundle).unwrap();
    v["dsseEnvelope"]["payloadType"] = Value::String("text/plain".into());
    assert!(matches!(
        open_with_key(&serde_json::to_vec(&v).unwrap(), &public("p256.pub")).unwrap_err(),
        SignatureError::UnsupportedPayloadType(t) if t == "text/plain"
    ));
}

/// A bundle over an arbitrary payload, validly signed by the p256 key.
fn signed_payload(payload: &str) -> Vec<u8> {
    let key = private("p256.key");
    Bundle {
        material: Material::Key {
            hint: Some(key.public_key().hint()),
        },
        payload_type: PAYLOAD_TYPE.into(),
        payload: payload.as_bytes().to_vec(),
        signature: key.sign(&pae(payload.as_bytes())),
    }
    .to_json()
    .unwrap()
}

#[test]
fn signed_but_inconsistent_or_unknown_statements_are_refused() {
    let (_tmp, model) = sample_model();
    let good = String::from_utf8(payload_of(&sign_p256(&model))).unwrap();
    let key = public("p256.pub");

    let inconsistent = good.replacen("\"digest\": \"", "\"digest\": \"00", 1);
    assert!(matches!(
        open_with_key(&signed_payload(&inconsistent), &key).unwrap_err(),
        SignatureError::InconsistentManifest { .. }
    ));
    let other = good.replace("https://model_signing/signature/v1.0", "https://example.com/p");
    assert!(matches!(
        open_with_key(&signed_payload(&other), &key).unwrap_err(),
        SignatureError::UnsupportedPredicate(p) if p == "https://example.com/p"
    ));
    let other = good.replace(
        "https://in-toto.io/Statement/v1",
        "https://in-toto.io/Statement/v0.1",
    );
    assert!(matches!(
        open_with_key(&signed_payload(&other), &key).unwrap_err(),
        SignatureError::UnsupportedStatement(_)
    ));
    let blake = good.replace("\"hash_type\": \"sha256\"", "\"hash_type\": \"blake3\"");
    let signed = open_with_key(&signed_payload(&blake), &key).unwrap();
    assert!(matches!(
        signed.check_dir(&model, &VerifyOptions::default()).unwrap_err(),
        SignatureError::Unsupported(_)
    ));
    let two = good.replace(
        "\"subject\": [",
        "\"subject\": [{\"name\": \"x\", \"digest\": {\"sha256\": \"00\"}},",
    );
    match open_with_key(&signed_payload(&two), &key).unwrap_err() {
        SignatureError::Malformed { field, reason } => {
            assert_eq!(field, "payload subject");
            assert!(reason.contains("exactly one"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
}

// ------------------------------------------------------- certificates

#[test]
fn certificate_chain_failures() {
    let (_tmp, model) = sample_model();
    let sign = |leaf: &str, chain: &str| {
        let signer =
            CertificateSigner::new(private("p256.key"), &text(&fixture(leaf)), &text(&fixture(chain)))
                .unwrap();
        sign_certificate(&model, &signer, &SignOptions::default()).unwrap()
    };
    let cert_err =
        |bundle: &[u8], trust: &[&str]| match open_with_certificates(bundle, &roots(trust)).unwrap_err() {
            SignatureError::Certificate(m) => m,
            e => panic!("{e:?}"),
        };
    let good = sign("leaf.pem", "intermediate.pem");
    let m = cert_err(&good, &["other-root.pem"]);
    assert!(m.contains("moat test root"), "{m}");
    // The intermediate alone is not an anchor (no partial chains).
    let m = cert_err(&good, &["intermediate.pem"]);
    assert!(m.contains("moat test root"), "{m}");
    let nosign = sign("leaf-nosign.pem", "intermediate.pem");
    let m = cert_err(&nosign, &["root.pem"]);
    assert!(m.contains("cannot be used for signing"), "{m}");
    // Without the intermediate in the bundle or the trust set, no path.
    let signer = CertificateSigner::new(private("p256.key"), &text(&fixture("leaf.pem")), "").unwrap();
    let lone = sign_certificate(&model, &signer, &SignOptions::default()).unwrap();
    let m = cert_err(&lone, &["root.pem"]);
    assert!(m.contains("no issuer certificate"), "{m}");
    // ... but a verifier holding the intermediate as well completes it.
    open_with_certificates(&lone, &roots(&["root.pem", "intermediate.pem"])).unwrap();
}

#[test]
fn certificate_must_match_the_private_key() {
    let err = CertificateSigner::new(private("p521.key"), &text(&fixture("leaf.pem")), "").unwrap_err();
    assert_eq!(err, KeyError::CertificateKeyMismatch);
}

// --------------------------------------------------------------- locks

#[test]
fn lock_check_without_rehashing() {
    let (_tmp, model) = sample_model();
    let bundle = sign_p256(&model);
    let mut files: Vec<LockedFile> = crate::tree::walk(&model, &[])
        .unwrap()
        .into_iter()
        .map(|e| LockedFile {
            sha256: crate::hash::hash_file(&e.path).unwrap().sha256,
            path: e.rel,
            size: e.size,
        })
        .collect();
    files.push(LockedFile {
        path: "model.sig".into(),
        size: 1,
        sha256: "00".repeat(32),
    });
    let opts = VerifyOptions {
        ignore_paths: vec!["model.sig".into()],
        ..VerifyOptions::default()
    };
    let signed = open_with_key(&bundle, &public("p256.pub")).unwrap();
    let v = signed.clone().check_lock(&files, &opts).unwrap();
    assert_eq!(v.file_count(), 4);

    let bad = files
        .iter()
        .cloned()
        .map(|mut f| {
            if f.path == "config.json" {
                f.sha256 = "ab".repeat(32);
            }
            f
        })
        .collect::<Vec<_>>();
    let d = differences(signed.clone().check_lock(&bad, &opts).unwrap_err());
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].name(), "config.json");

    // Shards: exact while every file fits in one shard.
    let sharded = |size| {
        let opts = SignOptions {
            method: Method::Shards { shard_size: size },
            ..SignOptions::default()
        };
        open_with_key(
            &sign_key(&model, &private("p256.key"), &opts).unwrap(),
            &public("p256.pub"),
        )
        .unwrap()
    };
    sharded(DEFAULT_SHARD_SIZE).check_lock(&files, &opts).unwrap();
    assert!(matches!(
        sharded(1000).check_lock(&files, &opts).unwrap_err(),
        SignatureError::Unsupported(m) if m.contains("weights/model-00001.bin")
    ));
}

// ---------------------------------------------------------- small parts

#[test]
fn pae_and_python_reprs() {
    assert_eq!(
        pae(b"{}"),
        b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec()
    );
    assert_eq!(
        python_bytes_repr(b"{\"a\": \"it's\"}\n\t\r\\ \x00\x7f\xc3\xa9"),
        r#"b'{"a": "it\'s"}\n\t\r\\ \x00\x7f\xc3\xa9'"#
    );
    assert_eq!(python_bytes_repr(b"it's"), "b\"it's\"");
    assert_eq!(
        pae_compat(b"{\n}"),
        b"DSSEV1 28 application/vnd.in-toto+json 3 b'{\\n}'".to_vec()
    );
    assert_eq!(python_float(1e9), "1000000000.0");
    assert_eq!(python_float(1e16), "1e+16");
    assert_eq!(python_float(1.5e17), "1.5e+17");
    let v = serde_json::json!({"k": "caf\u{e9} \u{1F600} \u{7f} \u{1} \"q\" \\"});
    assert_eq!(
        to_python_pretty(&v),
        "{\n  \"k\": \"caf\\u00e9 \\ud83d\\ude00 \\u007f \\u0001 \\\"q\\\" \\\\\"\n}"
    );
}

#[test]
fn shard_ranges_match_the_tool() {
    assert_eq!(shard_ranges(0, 3), vec![]);
    assert_eq!(shard_ranges(5, 3), vec![(0, 3), (3, 5)]);
    assert_eq!(shard_ranges(6, 3), vec![(0, 3), (3, 6)]);
    assert_eq!(shard_ranges(2, 3), vec![(0, 2)]);
}

#[test]
fn private_key_formats() {
    // openssl ecparam -genkey without -noout: EC PARAMETERS, then the key.
    let sec1 = text(&fixture("p384.sec1.key"));
    let with_params =
        format!("-----BEGIN EC PARAMETERS-----\nBgUrgQQAIg==\n-----END EC PARAMETERS-----\n{sec1}");
    assert_eq!(PrivateKey::from_pem(&with_params).unwrap().curve(), Curve::P384);
    assert_eq!(
        PrivateKey::from_pem(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
        )
        .unwrap_err(),
        KeyError::Encrypted
    );
    assert!(matches!(
        PrivateKey::from_pem("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
            .unwrap_err(),
        KeyError::Unsupported(_)
    ));
    assert!(matches!(
        PublicKey::from_pem("hello").unwrap_err(),
        KeyError::Pem(_)
    ));
    assert!(matches!(
        PublicKey::from_pem(&text(&fixture("p256.key"))).unwrap_err(),
        KeyError::Label { .. }
    ));
    // The public half of each private key is the published public key.
    for (k, p) in [
        ("p256.key", "p256.pub"),
        ("p384.sec1.key", "p384.pub"),
        ("p521.key", "p521.pub"),
    ] {
        assert_eq!(private(k).public_key(), public(p));
        assert_eq!(private(k).public_key().to_pem(), text(&fixture(p)));
    }
}

#[test]
fn ignore_paths_resolve_like_the_tool() {
    let (tmp, model) = sample_model();
    let rel = |p: &str, cwd: &Path| model_relative_path(&model, Path::new(p), cwd).unwrap();
    assert_eq!(rel("my-model/model.sig", tmp.path()), Some("model.sig".into()));
    assert_eq!(rel("weights/../config.json", &model), Some("config.json".into()));
    assert_eq!(rel("elsewhere.sig", tmp.path()), None);
    assert_eq!(rel("../x", &model), None);
}
