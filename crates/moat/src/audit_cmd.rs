//! `moat audit verify`: check the hash chain and MACs of audit log files.
//! Exit codes: 0 intact, 1 tampered (the first bad record is named on
//! stderr), 2 usage or I/O error (unreadable file, bad keys file).

use anyhow::Result;
use clap::{Args, Subcommand};
use moat_audit::{AuditKeys, VerifyError, VerifyOptions, verify_with};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check an audit log (0 intact, 1 tampered, 2 error).
    Verify(VerifyArgs),
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
