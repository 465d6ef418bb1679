//! Audit records of CLI events (`moat keys create|revoke|encrypt`,
//! `rotate-kek`, `retire-kek`, `rewrap`) on the server's chain.
//!
//! The live audit file is locked by whichever process writes its chain, so
//! two writers can never fork it. The CLI therefore takes one of two paths:
//! - no server holds the log: it opens the log itself (same keys, same
//!   chain), appends any records still spooled and then its own, durably,
//!   and closes it;
//! - a server holds it: the record is spooled, one fsynced file per record
//!   in `<audit dir>/spool/` (0600, written under a temporary name and
//!   renamed), and the server appends spooled records to its chain within
//!   about a second ([`drain_spool`]) and at start.
//!
//! Either way the command reports which happened; a spooled record is on
//! the chain only once a server has drained it (docs/operations.md).

use crate::config::AuditConfig;
use moat_audit::{AuditKeys, AuditLog, AuditOptions, AuditRecord, FileSink};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where a CLI record went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Appended to the audit log's chain.
    Logged(PathBuf),
    /// A server holds the log: spooled here for it to append.
    Spooled(PathBuf),
}

/// `<folder of the audit file>/spool`.
pub fn spool_dir(a: &AuditConfig) -> PathBuf {
    a.file
        .parent()
        .map_or_else(|| PathBuf::from("spool"), |d| d.join("spool"))
}

fn load_keys(a: &AuditConfig) -> Result<AuditKeys, String> {
    if a.keys_file.exists() {
        AuditKeys::from_file(&a.keys_file)
    } else {
        AuditKeys::generate_file(&a.keys_file)
    }
    .map_err(|e| format!("{}: {e}", a.keys_file.display()))
}

fn make_private_dir(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Record one CLI event (see the module comment).
pub fn record(a: &AuditConfig, rec: AuditRecord) -> Result<Recorded, String> {
    if let Some(dir) = a.file.parent().filter(|d| !d.as_os_str().is_empty()) {
        make_private_dir(dir)?;
    }
    let sink = match FileSink::open(a.file.clone(), Some(a.max_bytes)).map(|s| s.with_max_age(a.rotate_every))
    {
        Ok(sink) => sink,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return spool(a, &rec).map(Recorded::Spooled),
        Err(e) => return Err(format!("{}: {e}", a.file.display())),
    };
    let options = AuditOptions {
        durable: true,
        checkpoint_every: a.checkpoint_every,
        ..AuditOptions::default()
    };
    let log = AuditLog::open(vec![Box::new(sink)], load_keys(a)?, options)
        .map_err(|e| format!("{}: {e}", a.file.display()))?;
    // Records spooled for a server that then stopped go first, in order.
    let drained = drain_spool(&log, a);
    let appended = drained.and_then(|_| log.append(rec).map_err(|e| e.to_string()));
    let closed = log.close();
    appended
        .and(closed.map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", a.file.display()))?;
    Ok(Recorded::Logged(a.file.clone()))
}

/// Write `rec` as one spool file, durably.
fn spool(a: &AuditConfig, rec: &AuditRecord) -> Result<PathBuf, String> {
    let dir = spool_dir(a);
    make_private_dir(&dir)?;
    let mut rec = rec.clone();
    if rec.time.is_empty() {
        // The event's time, not the time a server gets to append it.
        rec.time = moat_audit::now_rfc3339();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("{nanos:024}-{}.json", std::process::id());
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let body = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
    let io_err = |e: io::Error| format!("{}: {e}", tmp.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err)?;
    f.write_all(&body).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err)?;
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(path)
}

/// Append every spooled record to `log` (oldest first) and remove each
/// spool file once its record is durably on the chain. A file that does not
/// parse is renamed `*.bad` and reported, never silently dropped. Returns
/// how many records were appended. Blocking.
pub fn drain_spool(log: &AuditLog, a: &AuditConfig) -> Result<usize, String> {
    let dir = spool_dir(a);
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    files.sort();
    let mut done = 0;
    for path in files {
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<AuditRecord>(&b).map_err(|e| e.to_string()));
        let rec = match parsed {
            Ok(rec) => rec,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "spooled audit record cannot be read; renamed *.bad");
                let _ = fs::rename(&path, path.with_extension("bad"));
                continue;
            }
        };
        log.append(rec)
            .map_err(|e| format!("appending {}: {e}", path.display()))?;
        fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        done += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    // Tests: a failed step must abort loudly.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use moat_audit::{Outcome, VerifyOptions, verify_with};

    fn config(dir: &Path) -> AuditConfig {
        AuditConfig {
            file: dir.join("audit/audit.jsonl"),
            keys_file: dir.join("audit-keys.json"),
            max_bytes: 1 << 20,
            rotate_every: None,
            stdout: false,
            durable: true,
            fail_closed: false,
            checkpoint_every: 0,
            capture_dir: None,
        }
    }

    fn actions(a: &AuditConfig) -> Vec<String> {
        fs::read_to_string(&a.file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().action)
            .collect()
    }

    #[test]
    fn logged_when_free_spooled_when_held_and_spool_drained_in_order() {
        let t = tempfile::tempdir().unwrap();
        let a = config(t.path());
        let r = record(&a, AuditRecord::new("key.create", Outcome::Ok)).unwrap();
        assert_eq!(r, Recorded::Logged(a.file.clone()));

        // Another holder of the log (a server): records are spooled.
        let holder = FileSink::open(a.file.clone(), None).unwrap();
        let Recorded::Spooled(p1) = record(&a, AuditRecord::new("key.revoke", Outcome::Ok)).unwrap() else {
            panic!("not spooled while the log is held")
        };
        let Recorded::Spooled(_) = record(&a, AuditRecord::new("kek.rotate", Outcome::Ok)).unwrap() else {
            panic!("not spooled while the log is held")
        };
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&p1).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(spool_dir(&a).join("0-bad.json"), b"not json").unwrap();
        drop(holder);

        // The next CLI event with the log free appends the spool first.
        record(&a, AuditRecord::new("kek.retire", Outcome::Ok)).unwrap();
        assert_eq!(
            actions(&a),
            ["key.create", "key.revoke", "kek.rotate", "kek.retire"]
        );
        let left: Vec<_> = fs::read_dir(spool_dir(&a))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from("0-bad.bad")],
            "a bad file is kept aside, not dropped"
        );
        let keys = AuditKeys::from_file(&a.keys_file).unwrap();
        verify_with(std::slice::from_ref(&a.file), &keys, &VerifyOptions::default()).unwrap();
    }
}
