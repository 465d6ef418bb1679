//! `moat keys rotate-kek | rewrap | retire-kek | list-keks`: the key-
//! encryption-key lifecycle of encryption at rest (moat-artifact::crypto).
//!
//! Rotation and rewrapping are separate steps on purpose: `rotate-kek` only
//! changes the keyring (new objects use the new version at once, old ones
//! keep opening), `rewrap FILES...` moves existing objects to the current
//! version by replacing their key block (no data is re-encrypted), and
//! `retire-kek` ends a version once nothing needs it. Each step can be
//! repeated safely, and the operator chooses when to pay for the rewrap.

use crate::cli::StoreArg;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use moat_artifact::crypto::{self, KekInfo, Keyring, KeyringFile, KmsClient, KmsConfig, NewKek};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct KeyringArg {
    /// Keyring file (default: <store>/keyring.json).
    #[arg(long, value_name = "FILE")]
    keyring: Option<PathBuf>,
}

impl KeyringArg {
    fn file(&self, store: &StoreArg) -> Result<KeyringFile> {
        Ok(KeyringFile::new(match &self.keyring {
            Some(p) => p.clone(),
            None => KeyringFile::default_path(&store.root()?),
        }))
    }
}

#[derive(Subcommand)]
pub enum KekCommand {
    /// Add a key-encryption key version and make it current. Objects wrapped
    /// by older versions still decrypt; move them with `moat keys rewrap`.
    RotateKek {
        /// Use this AWS KMS key (id or ARN) for the new version instead of a
        /// fresh local key. Needs AWS_REGION, AWS_ACCESS_KEY_ID,
        /// AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN,
        /// AWS_ENDPOINT_URL_KMS); the key is checked before it is added.
        #[arg(long, value_name = "KEY_ID")]
        aws_kms_key_id: Option<String>,
        #[command(flatten)]
        keyring: KeyringArg,
    },
    /// Re-wrap the data keys of encrypted files under the current KEK
    /// version, without re-encrypting their data (0 all done, 1 some refused).
    Rewrap {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        keyring: KeyringArg,
    },
    /// Retire a KEK version: objects whose data key is wrapped only by it can
    /// no longer be decrypted. Rewrap them first.
    RetireKek {
        version: u32,
        /// Also erase a local version's key bytes from the keyring file.
        #[arg(long)]
        destroy: bool,
        #[command(flatten)]
        keyring: KeyringArg,
    },
    /// List KEK versions (never key bytes).
    ListKeks {
        #[command(flatten)]
        keyring: KeyringArg,
    },
}

fn kms_from_env() -> Result<KmsClient> {
    let config = KmsConfig::from_env(|k| std::env::var(k).ok())?;
    Ok(KmsClient::new(config)?)
}

/// The keyring, with a KMS client when any usable version lives in KMS.
fn load(file: &KeyringFile) -> Result<Keyring> {
    let keyring = file.load()?;
    if keyring.needs_kms() {
        return Ok(keyring.with_kms(kms_from_env()?));
    }
    Ok(keyring)
}

fn describe(k: &KekInfo) -> String {
    let mut s = format!("KEK version {} ({}", k.version, k.kind);
    if let Some(id) = &k.key_id {
        s.push(' ');
        s.push_str(id);
    }
    s.push(')');
    s
}

pub fn run(cmd: KekCommand, store: &StoreArg) -> Result<ExitCode> {
    match cmd {
        KekCommand::RotateKek {
            aws_kms_key_id,
            keyring,
        } => {
            let file = keyring.file(store)?;
            let new = match aws_kms_key_id {
                Some(key_id) => {
                    kms_from_env()?
                        .check_key(&key_id)
                        .with_context(|| format!("AWS KMS key {key_id} is not usable"))?;
                    NewKek::AwsKms { key_id }
                }
                None => NewKek::Local,
            };
            let info = file.rotate(new)?;
            println!("{} is now current in {}", describe(&info), file.path().display());
            if info.version > 1 {
                eprintln!(
                    "objects wrapped by older versions still decrypt; move them with `moat keys rewrap FILE...`"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KekCommand::Rewrap { files, keyring } => {
            let keyring = load(&keyring.file(store)?)?;
            let mut failed = 0usize;
            for path in &files {
                match crypto::rewrap_file(path, &keyring) {
                    Ok(r) if r.changed() => println!(
                        "{}: rewrapped from KEK version {} to {}",
                        path.display(),
                        r.from,
                        r.to
                    ),
                    Ok(r) => println!("{}: already on KEK version {}", path.display(), r.to),
                    Err(e) => {
                        failed += 1;
                        eprintln!("moat: {e}");
                    }
                }
            }
            if failed > 0 {
                eprintln!("moat: {failed} of {} file(s) not rewrapped", files.len());
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        KekCommand::RetireKek {
            version,
            destroy,
            keyring,
        } => {
            let file = keyring.file(store)?;
            let info = file.retire(version, destroy)?;
            println!(
                "{} is retired{}: data wrapped only by it can no longer be decrypted",
                describe(&info),
                if info.destroyed {
                    " and its key bytes erased"
                } else {
                    ""
                }
            );
            if destroy && info.kind == crypto::KekKind::AwsKms {
                eprintln!(
                    "the key itself lives in AWS KMS: schedule its deletion there if it is no longer needed"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KekCommand::ListKeks { keyring } => {
            let file = keyring.file(store)?;
            let list = file.list()?;
            if list.is_empty() {
                eprintln!(
                    "no keyring at {}; create one with `moat keys rotate-kek`",
                    file.path().display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let when = |t: u64| moat_audit::rfc3339_millis(u128::from(t) * 1000);
            println!(
                "{:<7}  {:<7}  {:<9}  {:<24}  key",
                "version", "kind", "state", "created"
            );
            for k in &list {
                let state = if k.current {
                    "current"
                } else if k.destroyed {
                    "destroyed"
                } else if k.retired.is_some() {
                    "retired"
                } else {
                    "active"
                };
                println!(
                    "{:<7}  {:<7}  {state:<9}  {:<24}  {}",
                    k.version,
                    k.kind.to_string(),
                    when(k.created),
                    k.key_id.as_deref().unwrap_or("(local)")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
