//! AWS KMS as a KEK provider, against moto's KMS (`moto_server`, from PyPI
//! `moto[server]`) on loopback: the requests our SigV4 client sends are the
//! ones the real service takes. moto is found through `$MOAT_MOTO_SERVER`,
//! else `$HOME/.cache/moat/venv/bin/moto_server` (the venv scripts/test.sh
//! builds). Without it the test fails with instructions, unless
//! `MOAT_SKIP_KMS_TESTS=1` says to skip.

// Test fixtures: a failed setup step must abort the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_artifact::crypto::{
    self, Header, KeyringFile, KmsClient, KmsConfig, NewKek, StreamOptions, WrapScheme,
};
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOAT_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(std::env::var_os("HOME")?).join(".cache/moat/venv/bin/moto_server");
    p.exists().then_some(p)
}

/// Start `moto_server` on a free loopback port, or `None` to skip.
fn start_moto() -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        if std::env::var("MOAT_SKIP_KMS_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: MOAT_SKIP_KMS_TESTS=1 and no moto_server found");
            return None;
        }
        panic!(
            "moto_server not found: run scripts/test.sh (it installs moto[server] into \
             ~/.cache/moat/venv), or set MOAT_MOTO_SERVER=/path/to/moto_server, or \
             MOAT_SKIP_KMS_TESTS=1 to skip"
        );
    };
    for _attempt in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break; // exited: port taken? try another
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Moto {
                    child,
                    url: format!("http://127.0.0.1:{port}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{} did not start", bin.display());
}

fn client(url: &str, region: &str) -> KmsClient {
    let env: HashMap<&str, String> = [
        ("AWS_REGION", region.to_owned()),
        ("AWS_ACCESS_KEY_ID", "AKIDMOATTEST".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "moat-test-secret".to_owned()),
        ("AWS_SESSION_TOKEN", "moat-test-session".to_owned()),
        ("AWS_ENDPOINT_URL_KMS", url.to_owned()),
    ]
    .into_iter()
    .collect();
    KmsClient::new(KmsConfig::from_env(|k| env.get(k).cloned()).unwrap()).unwrap()
}

#[test]
fn kms_round_trip_rotation_and_retirement() {
    let Some(moto) = start_moto() else { return };
    let kms = client(&moto.url, "us-east-1");
    let key_a = kms.create_key("moat test KEK a").unwrap();
    let key_b = kms.create_key("moat test KEK b").unwrap();
    assert!(key_a.starts_with("arn:aws:kms:us-east-1:"), "{key_a}");

    let t = tempfile::tempdir().unwrap();
    let file = KeyringFile::new(t.path().join("keyring.json"));
    file.rotate(NewKek::AwsKms {
        key_id: key_a.clone(),
    })
    .unwrap();
    let k1 = file.load().unwrap().with_kms(kms.clone());

    // GenerateDataKey wraps, Decrypt unwraps: small and chunked objects.
    let small = crypto::seal(&k1, b"prompt capture").unwrap();
    let h = Header::read_from(&mut &small[..]).unwrap();
    assert_eq!((h.kek_version(), h.wrap_scheme()), (1, WrapScheme::AwsKms));
    assert_eq!(crypto::open(&k1, &small).unwrap(), b"prompt capture");
    let plain: Vec<u8> = (0..(5 << 20) + 3).map(|i: u32| (i % 241) as u8).collect();
    let mut big = Vec::new();
    crypto::encrypt_stream(&k1, &plain[..], &mut big, &StreamOptions::default()).unwrap();
    let mut out = Vec::new();
    crypto::decrypt_stream(&k1, &big[..], &mut out, &StreamOptions::default()).unwrap();
    assert_eq!(out, plain);

    // The encryption context binds the KEK version: relabelling the header
    // as another version that names the same KMS key is refused by KMS.
    file.rotate(NewKek::AwsKms {
        key_id: key_a.clone(),
    })
    .unwrap();
    let k2 = file.load().unwrap().with_kms(kms.clone());
    let mut relabelled = small.clone();
    relabelled[48..52].copy_from_slice(&2u32.to_be_bytes());
    let e = crypto::open(&k2, &relabelled).unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot unwrap the data key with KEK version 2"),
        "{e}"
    );
    assert!(e.to_string().contains("AWS KMS Decrypt"), "{e}");

    // KMS → local: rotate to a local KEK, rewrap (Decrypt under KMS, wrap
    // locally), data bytes unchanged.
    file.rotate(NewKek::Local).unwrap();
    let k3 = file.load().unwrap().with_kms(kms.clone());
    let (local, re) = crypto::rewrap_bytes(&big, &k3).unwrap();
    assert_eq!((re.from, re.to), (1, 3));
    assert_eq!(re.header.wrap_scheme(), WrapScheme::Local);
    let old_h = Header::read_from(&mut &big[..]).unwrap();
    assert_eq!(big[old_h.len()..], local[re.header.len()..]);

    // local → KMS key b: rewrap uses KMS Encrypt.
    file.rotate(NewKek::AwsKms { key_id: key_b }).unwrap();
    let k4 = file.load().unwrap().with_kms(kms.clone());
    let (on_b, re) = crypto::rewrap_bytes(&local, &k4).unwrap();
    assert_eq!(
        (re.from, re.to, re.header.wrap_scheme()),
        (3, 4, WrapScheme::AwsKms)
    );
    let mut out = Vec::new();
    crypto::decrypt_stream(&k4, &on_b[..], &mut out, &StreamOptions::default()).unwrap();
    assert_eq!(out, plain);

    // Retire version 1: the small object, still wrapped only by it, is
    // refused by name without asking KMS.
    file.retire(1, false).unwrap();
    let k5 = file.load().unwrap().with_kms(kms.clone());
    let e = crypto::open(&k5, &small).unwrap_err();
    assert_eq!(e.retired_version(), Some(1), "{e}");
    assert_eq!(
        crypto::open(&k5, &crypto::seal(&k5, b"new").unwrap()).unwrap(),
        b"new"
    );

    // KMS errors come back named: an unknown key.
    let e = file.rotate(NewKek::AwsKms {
        key_id: "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000".into(),
    });
    assert!(e.is_ok());
    let k6 = file.load().unwrap().with_kms(kms);
    let e = crypto::seal(&k6, b"x").unwrap_err();
    assert!(
        e.to_string()
            .contains("AWS KMS GenerateDataKey: NotFoundException"),
        "{e}"
    );
}
