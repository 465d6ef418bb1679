//! An encrypted store whose KEK lives in AWS KMS (moto's KMS on loopback):
//! `rotate-kek --aws-kms-key-id`, `pull --encrypt` (GenerateDataKey per
//! blob) and `verify` (Decrypt) through the real binary, credentials from
//! the `AWS_*` environment; without them the keyring is refused with the
//! missing variable named. moto as in moat-artifact's crypto_kms test
//! (`$MOAT_MOTO_SERVER`, else the scripts/test.sh venv; `MOAT_SKIP_KMS_TESTS=1`
//! skips).

// Test fixtures: a failed setup step must abort the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use moat_artifact::crypto::{KmsClient, KmsConfig};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Moto(Child, String);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> Option<Moto> {
    let bin = std::env::var_os("MOAT_MOTO_SERVER")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?).join(".cache/moat/venv/bin/moto_server");
            p.exists().then_some(p)
        });
    let Some(bin) = bin else {
        if std::env::var("MOAT_SKIP_KMS_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: MOAT_SKIP_KMS_TESTS=1 and no moto_server found");
            return None;
        }
        panic!("moto_server not found: run scripts/test.sh, set MOAT_MOTO_SERVER, or MOAT_SKIP_KMS_TESTS=1");
    };
    for _ in 0..3 {
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
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Moto(child, format!("http://127.0.0.1:{port}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{} did not start", bin.display());
}

fn aws_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "AKIDMOATTEST".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "moat-test-secret".to_owned()),
        ("AWS_ENDPOINT_URL_KMS", url.to_owned()),
    ]
}

#[test]
fn encrypted_store_under_a_kms_kek() {
    let Some(moto) = start_moto() else { return };
    let env = aws_env(&moto.1);
    let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
    let kms = KmsClient::new(KmsConfig::from_env(lookup).unwrap()).unwrap();
    let key_id = kms.create_key("moat store KEK").unwrap();

    let t = tmp();
    let store = t.path().join("store");
    let s = store.to_str().unwrap();
    let src = t.path().join("src");
    demo_model(&src, 5);
    let with_aws = |args: &[&str]| moat().args(args).envs(env.iter().cloned()).output().unwrap();

    let o = with_aws(&["keys", "rotate-kek", "--aws-kms-key-id", &key_id, "--store", s]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("(aws-kms"), "{}", stdout(&o));
    let source = format!("file://{}", src.display());
    let o = with_aws(&["pull", &source, "--name", "m", "--encrypt", "--store", s]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = with_aws(&["verify", "m", "--store", s]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // The data keys are wrapped by KMS: without credentials nothing opens.
    let o = run(&["verify", "m", "--store", s]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("AWS_"), "{}", stderr(&o));
}
