//! `moat models list|show|rm|gc`: look after the trusted store's models,
//! versions and blobs. Exit codes: 0 ok, 1 the model or version does not
//! exist, 2 any other error (the store's own, or I/O).

use crate::cli::StoreArg;
use anyhow::{Context, Result};
use clap::Subcommand;
use moat_artifact::Store;
use moat_artifact::name::ModelName;
use moat_artifact::store::{GcReport, ModelInfo, Removed, StoreError, VersionInfo};
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::UNIX_EPOCH;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List stored models: active version, number of versions, size, source.
    List {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show one model: its source and every version (revision, created,
    /// files with size and sha256, signer), marking the active one.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a model, or one version of it with NAME@VERSION (VERSION: the
    /// version name, a unique prefix of it, or the revision). Blobs are
    /// freed by `moat models gc`.
    Rm {
        /// NAME or NAME@VERSION.
        target: String,
        /// Allow removing the active version; the newest remaining version
        /// becomes active (restart `moat serve` to load it).
        #[arg(long)]
        force: bool,
    },
    /// Delete blobs no version uses, quarantine folders no live pull holds,
    /// and leftovers of interrupted deletions; print the bytes freed.
    Gc {
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ModelsCommand, store: &StoreArg) -> Result<ExitCode> {
    let store = Store::open(&store.root()?).context("cannot open the store")?;
    let result = match cmd {
        ModelsCommand::List { json } => list(&store, json),
        ModelsCommand::Show { name, json } => show(&store, &name, json),
        ModelsCommand::Rm { target, force } => rm(&store, &target, force),
        ModelsCommand::Gc { dry_run, json } => gc(&store, dry_run, json),
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is_not_found() => {
            eprintln!("moat: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

fn parse_name(store: &Store, s: &str) -> Result<ModelName, StoreError> {
    // An invalid name cannot be in the store: "not found", with the reason.
    ModelName::parse(s).map_err(|e| StoreError::NotFound {
        name: format!("{s} ({e})"),
        store: store.root().to_owned(),
    })
}

fn created_ms(v: &VersionInfo) -> Option<u128> {
    v.created
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis())
}

fn created_text(v: &VersionInfo) -> String {
    created_ms(v).map_or_else(|| "-".into(), moat_audit::rfc3339_millis)
}

/// `1.2 GB`-style size for the text tables (JSON has exact bytes).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn list(store: &Store, as_json: bool) -> Result<(), StoreError> {
    let models = store.list()?;
    if as_json {
        let rows: Vec<Value> = models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "active": m.active,
                    "versions": m.versions.len(),
                    "size": m.active_version().map(VersionInfo::size),
                    "stored_bytes": m.stored_bytes(),
                    "source": m.source(),
                })
            })
            .collect();
        println!("{}", json!({ "models": rows }));
        return Ok(());
    }
    println!(
        "{:<24}  {:<40}  {:>8}  {:>10}  source",
        "name", "active", "versions", "size"
    );
    for m in &models {
        println!(
            "{:<24}  {:<40}  {:>8}  {:>10}  {}",
            m.name,
            m.active.as_deref().unwrap_or("(none)"),
            m.versions.len(),
            m.active_version().map_or_else(|| "-".into(), |v| human(v.size())),
            m.source().unwrap_or("-")
        );
    }
    Ok(())
}

fn version_json(v: &VersionInfo) -> Value {
    let mut out = json!({
        "version": v.version,
        "active": v.active,
        "created": created_ms(v).map(moat_audit::rfc3339_millis),
        "size": v.size(),
    });
    match &v.lock {
        Ok(lock) => {
            out["revision"] = json!(lock.revision);
            out["signature"] = match &lock.signature {
                Some(s) => json!({"file": s.file, "signer": s.signer}),
                None => Value::Null,
            };
            out["files"] = lock
                .files
                .iter()
                .map(|f| json!({"path": f.path, "size": f.size, "sha256": f.sha256}))
                .collect();
        }
        Err(e) => out["error"] = json!(e),
    }
    out
}

fn show(store: &Store, name: &str, as_json: bool) -> Result<(), StoreError> {
    let info: ModelInfo = store.model_info(&parse_name(store, name)?)?;
    if as_json {
        let versions: Vec<Value> = info.versions.iter().map(version_json).collect();
        println!(
            "{}",
            json!({
                "name": info.name,
                "source": info.source(),
                "active": info.active,
                "stored_bytes": info.stored_bytes(),
                "versions": versions,
            })
        );
        return Ok(());
    }
    println!("model:   {}", info.name);
    println!("source:  {}", info.source().unwrap_or("-"));
    println!("active:  {}", info.active.as_deref().unwrap_or("(none)"));
    println!(
        "stored:  {} in {} version(s), each blob counted once",
        human(info.stored_bytes()),
        info.versions.len()
    );
    for v in &info.versions {
        println!();
        println!(
            "{} version {}  created {}  {}",
            if v.active { "*" } else { " " },
            v.version,
            created_text(v),
            human(v.size())
        );
        match &v.lock {
            Ok(lock) => {
                println!("  revision: {}", lock.revision);
                if let Some(s) = &lock.signature {
                    println!("  signed by: {} ({})", s.signer, s.file);
                }
                for f in &lock.files {
                    println!("  {:>14}  {}  {}", f.size, f.sha256, f.path);
                }
            }
            Err(e) => println!("  unreadable lock: {e}"),
        }
    }
    Ok(())
}

fn rm(store: &Store, target: &str, force: bool) -> Result<(), StoreError> {
    let (name, version) = match target.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (target, None),
    };
    let name = parse_name(store, name)?;
    match store.remove(&name, version, force)? {
        Removed::Model { versions } => {
            println!("removed model {name} ({versions} version(s)); run `moat models gc` to free its blobs")
        }
        Removed::Version { version, activated } => {
            println!("removed {name}@{version}; run `moat models gc` to free its blobs");
            if let Some(a) = activated {
                println!("{name}@{a} is now active (restart `moat serve` to load it)");
            }
        }
    }
    Ok(())
}

fn gc(store: &Store, dry_run: bool, as_json: bool) -> Result<(), StoreError> {
    let r: GcReport = store.gc(dry_run)?;
    if as_json {
        let blobs: Vec<Value> = r
            .blobs
            .iter()
            .map(|(sha, size)| json!({"sha256": sha, "size": size}))
            .collect();
        let paths =
            |v: &[std::path::PathBuf]| -> Vec<String> { v.iter().map(|p| p.display().to_string()).collect() };
        println!(
            "{}",
            json!({
                "dry_run": r.dry_run,
                "blobs": blobs,
                "quarantine": paths(&r.quarantine),
                "quarantine_in_use": r.quarantine_in_use,
                "trash": paths(&r.trash),
                "freed_bytes": r.freed_bytes,
            })
        );
        return Ok(());
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for (sha, size) in &r.blobs {
        println!("{verb} blob sha256:{sha} ({size} bytes)");
    }
    for p in r.quarantine.iter().chain(&r.trash) {
        println!("{verb} {}", p.display());
    }
    println!(
        "{verb} {} blob(s), {} quarantine folder(s), {} leftover(s); {} {} bytes ({}); {} quarantine folder(s) in use kept",
        r.blobs.len(),
        r.quarantine.len(),
        r.trash.len(),
        if dry_run { "would free" } else { "freed" },
        r.freed_bytes,
        human(r.freed_bytes),
        r.quarantine_in_use
    );
    Ok(())
}
