//! `moat audit verify` against the real binary: 0 and a summary for an
//! untouched, rotated log; 1 naming the first bad record for each tamper
//! the issue lists (an edited byte, a deleted record, a truncated file,
//! swapped records, a dropped rotated file); 2 for usage and I/O errors.

// Fixture helpers below abort the test on a failed setup step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use moat_audit::{AuditKeys, AuditLog, AuditOptions, AuditRecord, FileSink, Outcome, action};
use std::fs;
use std::path::{Path, PathBuf};

struct Log {
    _dir: tempfile::TempDir,
    keys: PathBuf,
    /// Oldest first; the live file last.
    files: Vec<PathBuf>,
}

/// 30 records in rotated files of at most 2,000 bytes.
fn log() -> Log {
    let dir = tempfile::tempdir().unwrap();
    let keys_path = dir.path().join("audit-keys.json");
    let keys = AuditKeys::generate_file(&keys_path).unwrap();
    let live = dir.path().join("audit.jsonl");
    let sink = FileSink::open(&live, Some(2_000)).unwrap();
    let log = AuditLog::open(vec![Box::new(sink)], keys, AuditOptions::default()).unwrap();
    for i in 0..30 {
        let mut r = AuditRecord::new(action::KEY_CREATE, Outcome::Ok);
        r.principal = Some("admin".into());
        r.resource = Some(format!("key-{i}"));
        log.append(r).unwrap();
    }
    log.close().unwrap();
    let mut files: Vec<PathBuf> = moat_audit::rotated_files(&live)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    files.push(live);
    Log {
        _dir: dir,
        keys: keys_path,
        files,
    }
}

fn verify(keys: &Path, files: &[PathBuf]) -> std::process::Output {
    let mut args = vec!["audit".to_owned(), "verify".to_owned()];
    args.extend(files.iter().map(|f| path_str(f)));
    args.extend(["--keys".to_owned(), path_str(keys)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn first_seq(path: &Path) -> u64 {
    let first = lines(path)[0].clone();
    serde_json::from_str::<serde_json::Value>(&first).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// Exit 1, and stderr names `file:line` and the seq.
fn assert_tampered(o: &std::process::Output, file: &Path, line: u64, seq: Option<u64>, what: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 1, "{err}");
    let at = match seq {
        Some(s) => format!("{}:{line} (seq {s}): ", file.display()),
        None => format!("{}:{line}: ", file.display()),
    };
    assert!(err.contains(&format!("moat: audit log tampered: {at}")), "{err}");
    assert!(err.contains(what), "{err}");
}

#[test]
fn an_untouched_log_exits_0_with_a_summary() {
    let l = log();
    let mut shuffled = l.files.clone();
    shuffled.reverse();
    let o = verify(&l.keys, &shuffled);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{}{out}", stderr(&o));
    assert!(out.starts_with("ok: 30 records, seq 1..30, time 20"), "{out}");
    assert!(out.contains(&format!("{} file(s)", l.files.len())), "{out}");
    assert!(out.contains("key version(s) 1"), "{out}");
    assert!(out.contains(&format!("  {}: ", l.files[0].display())), "{out}");
    assert!(out.lines().last().unwrap().starts_with("head: "), "{out}");
}

#[test]
fn an_edited_byte_exits_1_naming_the_record() {
    let l = log();
    let f = &l.files[1];
    let text =
        fs::read_to_string(f)
            .unwrap()
            .replacen("\"principal\":\"admin\"", "\"principal\":\"admim\"", 2);
    fs::write(f, text).unwrap();
    let first = lines(&l.files[0]).len() as u64;
    let o = verify(&l.keys, &l.files);
    assert_tampered(&o, f, 1, Some(first + 1), "mac does not match");
}

#[test]
fn a_deleted_record_exits_1_naming_the_next() {
    let l = log();
    let f = &l.files[0];
    let mut ls = lines(f);
    ls.remove(1);
    write_lines(f, &ls);
    let o = verify(&l.keys, &l.files);
    assert_tampered(
        &o,
        f,
        2,
        Some(3),
        "seq 3 where 2 was expected: record 2 is missing",
    );
}

#[test]
fn a_truncated_file_exits_1() {
    let l = log();
    let f = l.files.last().unwrap();
    let len = fs::metadata(f).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(f)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let o = verify(&l.keys, &l.files);
    assert_tampered(&o, f, lines(f).len() as u64, None, "incomplete last line");
}

#[test]
fn swapped_records_exit_1_naming_the_first() {
    let l = log();
    let f = &l.files[0];
    let mut ls = lines(f);
    ls.swap(1, 2);
    write_lines(f, &ls);
    let o = verify(&l.keys, &l.files);
    assert_tampered(&o, f, 2, Some(3), "seq 3 where 2 was expected");
}

#[test]
fn a_dropped_rotated_file_exits_1() {
    let l = log();
    let mut files = l.files.clone();
    files.remove(1);
    let o = verify(&l.keys, &files);
    assert_tampered(&o, &l.files[2], 1, Some(first_seq(&l.files[2])), "missing here");
    // The oldest file gone: refused, unless retention is declared.
    let o = verify(&l.keys, &l.files[1..]);
    let seq = first_seq(&l.files[1]);
    assert_tampered(
        &o,
        &l.files[1],
        1,
        Some(seq),
        &format!("the chain starts at seq {seq}, not 1"),
    );
    let mut args = vec!["audit", "verify", "--partial", "--keys"];
    let keys = path_str(&l.keys);
    args.push(&keys);
    let rest: Vec<String> = l.files[1..].iter().map(|f| path_str(f)).collect();
    args.extend(rest.iter().map(String::as_str));
    let o = run(&args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("note: the chain starts at seq"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn usage_and_io_errors_exit_2() {
    let l = log();
    // No files.
    let o = run(&["audit", "verify", "--keys", &path_str(&l.keys)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // A file that is not there.
    let o = verify(&l.keys, &[l.files[0].with_extension("missing")]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // A keys file others can read.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&l.keys, fs::Permissions::from_mode(0o644)).unwrap();
    let o = verify(&l.keys, &l.files);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}
