//! `moat audit verify`: check the hash chain and MACs of audit log files.
//! Exit codes: 0 intact, 1 tampered (the first bad record is named on
//! stderr), 2 usage or I/O error (unreadable file, bad keys file).
//!
//! `moat audit show-capture ID`: decrypt one prompt/response capture (an
//! admin tool; the read is itself an audit record when the log is
//! configured).

use anyhow::Result;
use clap::{Args, Subcommand};
use moat_audit::{AuditKeys, VerifyError, VerifyOptions, verify_with};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check an audit log (0 intact, 1 tampered, 2 error).
    Verify(VerifyArgs),
    /// Decrypt and print one captured exchange (`[audit] capture`), by the
    /// id in its audit record's `capture` field.
    ShowCapture(ShowCaptureArgs),
}

#[derive(Args)]
pub struct ShowCaptureArgs {
    id: String,
    /// Config file: the capture folder, keyring and audit log.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Capture folder (default: the config's audit.capture_dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keyring (default: the config's [encryption] keyring).
    #[arg(long, value_name = "FILE")]
    keyring: Option<PathBuf>,
    #[command(flatten)]
    store: crate::cli::StoreArg,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The log's files: the live file and its rotated files
    /// (`audit.jsonl audit.jsonl.000001 …`), in any order.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Audit keys file (JSON, mode 0600) holding every key version the log
    /// was written with.
    #[arg(long, value_name = "KEYFILE")]
    keys: PathBuf,
    /// Accept a log whose oldest files were removed (retention): the chain
    /// may start after seq 1.
    #[arg(long)]
    partial: bool,
}

pub fn run(cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(args) => verify(args),
        AuditCommand::ShowCapture(args) => show_capture(args),
    }
}

fn show_capture(args: ShowCaptureArgs) -> Result<ExitCode> {
    let ctx = crate::crypto_cmd::context(args.config.as_deref(), None, &args.store)?;
    let dir = match (args.dir, ctx.audit.as_ref()) {
        (Some(d), _) => d,
        (None, Some(a)) => a
            .capture_dir
            .clone()
            .unwrap_or_else(|| ctx.home.join("audit").join("capture")),
        (None, None) => anyhow::bail!("pass --config (with [audit] capture) or --dir"),
    };
    let keyring_path = args.keyring.unwrap_or_else(|| ctx.encryption.keyring.clone());
    let keyring = moat_artifact::crypto::load_keyring(&keyring_path, |k| std::env::var(k).ok())?;
    let result = moat_server::capture::read(&dir, &keyring, &args.id);
    // Reading a capture is an access to archived prompts: record it, also
    // when it failed (someone tried).
    crate::crypto_cmd::audit(
        &ctx,
        moat_audit::action::CAPTURE_READ,
        args.id.clone(),
        if result.is_ok() {
            moat_audit::Outcome::Ok
        } else {
            moat_audit::Outcome::Error
        },
        result.as_ref().err().cloned(),
    )?;
    match result {
        Ok(rec) => {
            println!("{}", serde_json::to_string_pretty(&rec)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("moat: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let keys = AuditKeys::from_file(&args.keys)?;
    let options = VerifyOptions {
        allow_partial_start: args.partial,
    };
    let s = match verify_with(&args.files, &keys, &options) {
        Ok(s) => s,
        Err(VerifyError::Broken(e)) => {
            eprintln!("moat: audit log tampered: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    let versions: Vec<String> = s.key_versions.iter().map(u32::to_string).collect();
    println!(
        "ok: {} records, seq {}, time {}, {} file(s), {} checkpoint(s), key version(s) {}",
        s.records,
        range(&s.first_seq, &s.last_seq),
        range(&s.first_time, &s.last_time),
        s.files.len(),
        s.checkpoints,
        if versions.is_empty() {
            "-".to_owned()
        } else {
            versions.join(",")
        }
    );
    for f in &s.files {
        println!(
            "  {}: {} records, seq {}",
            f.path.display(),
            f.records,
            range(&f.first_seq, &f.last_seq)
        );
    }
    if let Some(first) = s.first_seq.filter(|&f| f > 1) {
        println!("note: the chain starts at seq {first}; records before it were not given");
    }
    if let Some(head) = &s.head {
        println!("head: {head}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `a..b`, or `-` when there is nothing.
fn range<T: std::fmt::Display>(a: &Option<T>, b: &Option<T>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{a}..{b}"),
        _ => "-".to_owned(),
    }
}
