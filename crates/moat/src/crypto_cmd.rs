//! `moat keys rotate-kek | rewrap | retire-kek | list-keks`: the key-
//! encryption-key lifecycle of encryption at rest (moat-artifact::crypto).
//!
//! Rotation and rewrapping are separate steps on purpose: `rotate-kek` only
//! changes the keyring (new objects use the new version at once, old ones
//! keep opening), `rewrap FILES...` moves existing objects to the current
//! version by replacing their key block (no data is re-encrypted), and
//! `retire-kek` ends a version once nothing needs it. Each step can be
//! repeated safely, and the operator chooses when to pay for the rewrap.
//! The one exception is the API-key file: small and sealed as a whole, it is
//! resealed under the new version by `rotate-kek` itself.
//!
//! With `--config`, the keyring, keys file and audit log are the configured
//! ones and every change is an audit record (see moat_server::audit_cli).

use crate::cli::StoreArg;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use moat_artifact::crypto::{self, KekInfo, Keyring, KeyringFile, KmsClient, KmsConfig, NewKek};
use moat_audit::{AuditRecord, Outcome, action};
use moat_server::audit_cli::Recorded;
use moat_server::config::{CliContext, EncryptionConfig, RawConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where `moat keys …` finds the keys file, keyring and audit log: from
/// `--config` when given, else under the store root (no audit log).
pub fn context(config: Option<&Path>, keys_file: Option<PathBuf>, store: &StoreArg) -> Result<CliContext> {
    let root = store.root()?;
    let mut ctx = match config {
        Some(path) => RawConfig::read(path)?.cli_context(&root)?,
        None => CliContext {
            keys_file: root.join("keys.json"),
            encryption: EncryptionConfig {
                keyring: KeyringFile::default_path(&root),
                encrypt_keys_file: false,
                encrypt_store: false,
            },
            audit: None,
            rbac: None,
            home: root,
        },
    };
    if let Some(k) = keys_file {
        ctx.keys_file = k;
    }
    Ok(ctx)
}

/// Who ran the command, as far as the OS says (`cli:$USER`).
fn cli_principal() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
    )
}

/// Record a CLI event in the configured audit log (or its spool while a
/// server holds the log). Without an audit log (no `--config`, or audit
/// disabled) nothing is recorded, and that is said on stderr.
pub fn audit(
    ctx: &CliContext,
    act: &str,
    resource: String,
    outcome: Outcome,
    reason: Option<String>,
) -> Result<()> {
    let Some(a) = &ctx.audit else {
        eprintln!("moat: note: no audit log configured (pass --config); {act} not recorded");
        return Ok(());
    };
    let mut rec = AuditRecord::new(act, outcome);
    rec.principal = Some(cli_principal());
    rec.resource = Some(resource);
    rec.reason = reason;
    match moat_server::audit_cli::record(a, rec) {
        Ok(Recorded::Logged(p)) => eprintln!("moat: recorded {act} in {}", p.display()),
        Ok(Recorded::Spooled(p)) => eprintln!(
            "moat: the audit log is held by a running server; {act} spooled at {} for it to append",
            p.display()
        ),
        Err(e) => bail!("the change was made but its audit record was not written: {e}"),
    }
    Ok(())
}

#[derive(Args, Clone)]
pub struct KeyringArg {
    /// Keyring file (default: <store>/keyring.json).
    #[arg(long, value_name = "FILE")]
    keyring: Option<PathBuf>,
}

impl KeyringArg {
    fn file(&self, ctx: &CliContext) -> KeyringFile {
        KeyringFile::new(match &self.keyring {
            Some(p) => p.clone(),
            None => ctx.encryption.keyring.clone(),
        })
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
        #[arg(value_name = "FILE", required_unless_present = "store_blobs")]
        files: Vec<PathBuf>,
        /// Also every encrypted blob of the store (`[store] encrypt`), with
        /// all the version folders that link to it.
        #[arg(long)]
        store_blobs: bool,
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

/// Reseal the API-key file under the keyring's current version, if it is
/// sealed (a plain file is left as it is: `moat keys encrypt` seals it).
fn reseal_keys_file(ctx: &CliContext, file: &KeyringFile) -> Result<()> {
    if !moat_guard::keys::is_sealed(&ctx.keys_file)? {
        return Ok(());
    }
    let store = moat_guard::keys::KeyStore::new(&ctx.keys_file).with_codec(
        std::sync::Arc::new(moat_server::at_rest::KeyringCodec::Loaded(Box::new(load(file)?))),
        true,
    );
    let n = store.reseal()?;
    println!(
        "{}: resealed ({n} keys) under the current KEK version",
        ctx.keys_file.display()
    );
    Ok(())
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

pub fn run(cmd: KekCommand, store: &StoreArg, ctx: &CliContext) -> Result<ExitCode> {
    match cmd {
        KekCommand::RotateKek {
            aws_kms_key_id,
            keyring,
        } => {
            let file = keyring.file(ctx);
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
            reseal_keys_file(ctx, &file)?;
            if info.version > 1 {
                eprintln!(
                    "objects wrapped by older versions still decrypt; move them with `moat keys rewrap FILE...` (store blobs: --store-blobs)"
                );
            }
            audit(
                ctx,
                action::KEK_ROTATE,
                format!("{}#{}", file.path().display(), info.version),
                Outcome::Ok,
                Some(describe(&info)),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        KekCommand::Rewrap {
            files,
            store_blobs,
            keyring,
        } => {
            let keyring = load(&keyring.file(ctx))?;
            let mut failed = 0usize;
            let mut moved = 0usize;
            if store_blobs {
                let s = moat_artifact::Store::open(&store.root()?).context("cannot open the store")?;
                let r = s.rewrap_blobs(&keyring)?;
                println!(
                    "store blobs: {} rewrapped to KEK version {}, {} already on it",
                    r.rewrapped,
                    keyring.current_version(),
                    r.current
                );
                moved += r.rewrapped;
            }
            for path in &files {
                match crypto::rewrap_file(path, &keyring) {
                    Ok(r) if r.changed() => {
                        moved += 1;
                        println!(
                            "{}: rewrapped from KEK version {} to {}",
                            path.display(),
                            r.from,
                            r.to
                        )
                    }
                    Ok(r) => println!("{}: already on KEK version {}", path.display(), r.to),
                    Err(e) => {
                        failed += 1;
                        eprintln!("moat: {e}");
                    }
                }
            }
            audit(
                ctx,
                action::KEK_REWRAP,
                format!("KEK version {}", keyring.current_version()),
                if failed > 0 { Outcome::Error } else { Outcome::Ok },
                Some(format!("{moved} object(s) rewrapped, {failed} refused")),
            )?;
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
            let file = keyring.file(ctx);
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
            audit(
                ctx,
                action::KEK_RETIRE,
                format!("{}#{}", file.path().display(), info.version),
                Outcome::Ok,
                Some(format!(
                    "{}{}",
                    describe(&info),
                    if info.destroyed { ", key bytes erased" } else { "" }
                )),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        KekCommand::ListKeks { keyring } => {
            let file = keyring.file(ctx);
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
