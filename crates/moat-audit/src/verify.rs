//! Checking a log: every record's MAC under its `key_version`, and the
//! chain (`seq` one more than the record before, `prev` its hash) across
//! all the files given, stopping at the first bad record and naming it
//! (file, line, seq, what failed).
//!
//! Files may be given in any order: they are put in chain order by the
//! `seq` of their first record (a file whose first line is not a record
//! cannot be placed, and is reported first). Empty files (a live file just
//! rotated) are accepted. What each tamper looks like:
//!
//! | tamper | reported at | problem |
//! |---|---|---|
//! | a byte edited | that record | mac mismatch, or not a record |
//! | a record deleted | the record after it | seq gap |
//! | two records swapped | the first of them | seq out of order |
//! | file truncated mid-line | the last line | incomplete line |
//! | a rotated file dropped / a file's tail cut | first record of the next file | seq gap |
//! | the oldest file dropped | first record given | chain does not start at seq 1 |
//!
//! Cutting whole records off the end of the newest file leaves a shorter
//! chain that is intact; only a copy of the head kept elsewhere (the
//! `audit checkpoint` log lines, or the records shipped from stdout) shows
//! that. [`VerifySummary::head`] is what to compare it with.

use crate::keys::AuditKeys;
use crate::record::{AuditRecord, GENESIS_PREV, LineProblem, SplitLine, action, hmac, parse_line, sha256};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// Longest line accepted (a record is normally well under 1 KiB).
pub const MAX_LINE: u64 = 16 << 20;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Accept a chain that does not start at seq 1 (its oldest files were
    /// removed by retention); the first record given is trusted as a start.
    pub allow_partial_start: bool,
}

/// One file's part of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    pub path: PathBuf,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// An intact chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifySummary {
    /// In chain order (empty files last).
    pub files: Vec<FileSummary>,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    pub checkpoints: u64,
    pub key_versions: BTreeSet<u32>,
    /// Hex SHA-256 of the last record's canonical bytes: what the next
    /// record's `prev` will be.
    pub head: Option<String>,
}

/// The first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}{}: {problem}", file.display(), seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct ChainError {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: u64,
    /// The seq the record claims, when it could be read.
    pub seq: Option<u64>,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("incomplete last line: the file was truncated, or a write was cut short")]
    PartialLine,
    #[error("line longer than {MAX_LINE} bytes: not an audit record")]
    TooLong,
    #[error("no well-formed mac at the end of the line: the record was edited, or is not an audit record")]
    NoMac,
    #[error("not an audit record ({0}): the record was edited")]
    NotRecord(String),
    #[error("key version {0} is not among the keys given")]
    UnknownKey(u32),
    #[error("mac does not match: the record was edited, or written under another key")]
    BadMac,
    #[error("seq {found} where {expected} was expected: {}", seq_hint(.expected, .found))]
    Seq { expected: u64, found: u64 },
    #[error(
        "prev is not the hash of the record before it: a record before this one was replaced, or the files are not one log"
    )]
    Prev,
    #[error(
        "the chain starts at seq {0}, not 1: its first records or rotated files are missing (allow a log whose oldest files were removed with --partial)"
    )]
    Start(u64),
    #[error("seq 1 with a prev other than 64 zeros")]
    GenesisPrev,
    #[error("checkpoint does not restate its chain position (records = seq - 1, head = prev)")]
    Checkpoint,
    #[error("starts at the same seq as {}: the same file given twice?", .0.display())]
    DuplicateStart(PathBuf),
}

fn seq_hint(&expected: &u64, &found: &u64) -> String {
    if found > expected {
        let missing = if found - 1 == expected {
            format!("record {expected} is")
        } else {
            format!("records {expected}..{} are", found - 1)
        };
        format!("{missing} missing here (deleted, moved, or in a rotated file not given)")
    } else {
        "a record repeated or out of order".to_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no audit files given")]
    NoFiles,
    #[error("audit chain broken at {0}")]
    Broken(ChainError),
}

/// [`verify_with`] with default options (the chain must start at seq 1).
pub fn verify(files: &[PathBuf], keys: &AuditKeys) -> Result<VerifySummary, VerifyError> {
    verify_with(files, keys, &VerifyOptions::default())
}

/// Check `files` (one log: the live file and its rotated files, in any
/// order) against `keys`.
pub fn verify_with(
    files: &[PathBuf],
    keys: &AuditKeys,
    options: &VerifyOptions,
) -> Result<VerifySummary, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError::NoFiles);
    }
    let mut placed: Vec<(u64, &PathBuf)> = Vec::new();
    let mut empty: Vec<&PathBuf> = Vec::new();
    for path in files {
        let mut reader = open(path)?;
        let mut buf = Vec::new();
        match read_line(&mut reader, &mut buf, path, 1)? {
            None => empty.push(path),
            Some(line) => {
                let (rec, _) = parse_line(line).map_err(|p| broken(path, 1, None, p.into()))?;
                placed.push((rec.seq, path));
            }
        }
    }
    placed.sort_by_key(|&(seq, _)| seq);
    for pair in placed.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(broken(
                pair[1].1,
                1,
                Some(pair[1].0),
                Problem::DuplicateStart(pair[0].1.clone()),
            ));
        }
    }

    let mut chain = Chain {
        keys,
        options,
        last: None,
        summary: VerifySummary::default(),
    };
    for (_, path) in placed {
        chain.file(path)?;
    }
    for path in empty {
        chain.summary.files.push(FileSummary {
            path: path.clone(),
            records: 0,
            first_seq: None,
            last_seq: None,
        });
    }
    Ok(chain.summary)
}

struct Chain<'a> {
    keys: &'a AuditKeys,
    options: &'a VerifyOptions,
    /// seq and canonical hash of the last good record.
    last: Option<(u64, [u8; 32])>,
    summary: VerifySummary,
}

impl Chain<'_> {
    fn file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let mut reader = open(path)?;
        let mut buf = Vec::new();
        let mut fs = FileSummary {
            path: path.to_owned(),
            records: 0,
            first_seq: None,
            last_seq: None,
        };
        let mut line_no = 0u64;
        loop {
            line_no += 1;
            let Some(line) = read_line(&mut reader, &mut buf, path, line_no)? else {
                break;
            };
            let (rec, split) = parse_line(line).map_err(|p| broken(path, line_no, None, p.into()))?;
            let hash = self
                .check(&rec, &split)
                .map_err(|p| broken(path, line_no, Some(rec.seq), p))?;
            self.last = Some((rec.seq, hash));
            fs.records += 1;
            fs.first_seq.get_or_insert(rec.seq);
            fs.last_seq = Some(rec.seq);
            let s = &mut self.summary;
            s.records += 1;
            s.first_seq.get_or_insert(rec.seq);
            s.last_seq = Some(rec.seq);
            if s.first_time.is_none() {
                s.first_time = Some(rec.time.clone());
            }
            s.last_time = Some(rec.time);
            s.key_versions.insert(rec.key_version);
            if rec.checkpoint.is_some() {
                s.checkpoints += 1;
            }
            s.head = Some(hex::encode(hash));
        }
        self.summary.files.push(fs);
        Ok(())
    }

    /// MAC, then chain, then checkpoint; the record's canonical hash.
    fn check(&self, rec: &AuditRecord, split: &SplitLine) -> Result<[u8; 32], Problem> {
        let key = self
            .keys
            .get(rec.key_version)
            .ok_or(Problem::UnknownKey(rec.key_version))?;
        let want = hmac(key, &[&split.canonical]);
        if !bool::from(want.ct_eq(&split.mac)) {
            return Err(Problem::BadMac);
        }
        match self.last {
            None if rec.seq == 1 && rec.prev != GENESIS_PREV => return Err(Problem::GenesisPrev),
            None if rec.seq != 1 && !self.options.allow_partial_start => return Err(Problem::Start(rec.seq)),
            None => {}
            Some((seq, hash)) => {
                let expected = seq.saturating_add(1);
                if rec.seq != expected {
                    return Err(Problem::Seq {
                        expected,
                        found: rec.seq,
                    });
                }
                if rec.prev != hex::encode(hash) {
                    return Err(Problem::Prev);
                }
            }
        }
        let is_checkpoint = rec.action == action::CHECKPOINT;
        match &rec.checkpoint {
            Some(cp) if !is_checkpoint || cp.records != rec.seq.saturating_sub(1) || cp.head != rec.prev => {
                return Err(Problem::Checkpoint);
            }
            None if is_checkpoint => return Err(Problem::Checkpoint),
            _ => {}
        }
        Ok(sha256(&[&split.canonical]))
    }
}

impl From<LineProblem> for Problem {
    fn from(p: LineProblem) -> Self {
        match p {
            LineProblem::NoMac => Problem::NoMac,
            LineProblem::NotRecord(m) => Problem::NotRecord(m),
        }
    }
}

fn broken(path: &Path, line: u64, seq: Option<u64>, problem: Problem) -> VerifyError {
    VerifyError::Broken(ChainError {
        file: path.to_owned(),
        line,
        seq,
        problem,
    })
}

fn open(path: &Path) -> Result<BufReader<File>, VerifyError> {
    File::open(path)
        .map(|f| BufReader::with_capacity(1 << 18, f))
        .map_err(|source| VerifyError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The next line without its `\n`; `None` at the end of the file. An
/// incomplete or overlong line is a chain error.
fn read_line<'b>(
    reader: &mut BufReader<File>,
    buf: &'b mut Vec<u8>,
    path: &Path,
    line_no: u64,
) -> Result<Option<&'b [u8]>, VerifyError> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE + 1)
        .read_until(b'\n', buf)
        .map_err(|source| VerifyError::Io {
            path: path.to_owned(),
            source,
        })?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        let problem = if n as u64 > MAX_LINE {
            Problem::TooLong
        } else {
            Problem::PartialLine
        };
        return Err(broken(path, line_no, None, problem));
    }
    Ok(Some(&buf[..n - 1]))
}
