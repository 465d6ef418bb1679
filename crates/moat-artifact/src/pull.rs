//! `moat pull`: fetch → hash → scan → lock → promote.
//!
//! Files are copied into a quarantine folder and hashed in the same read; the
//! scanner then looks at the quarantined copy (the bytes that will be stored,
//! not the source, which could change underneath us); only a clean model gets
//! a lock and is promoted by one atomic rename. Any refusal or error removes
//! the quarantine folder and leaves the store untouched.

use crate::hash::{FileDigest, hash_stream, par_map};
use crate::lock::LockSignature;
use crate::lock::{LOCK_FILE, Lock, LockedFile, check_rel_path};
use crate::name::{InvalidName, ModelName};
use crate::policy::SignaturePolicy;
use crate::source::{Source, SourceError};
use crate::store::{FILES_DIR, Promoted, Store, StoreError, fsync_dir, remove_tree};
use crate::tree::{EntryKind, walk};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Folders of a source that are never part of a model (VCS metadata).
const SKIP_DIRS: &[&str] = &[".git"];

#[derive(Debug, Clone)]
pub struct PullRequest {
    pub source: String,
    pub name: String,
    pub revision: Option<String>,
    /// Replace an existing model of the same name (atomically).
    pub replace: bool,
    /// Who must have signed the model; `None` accepts unsigned models.
    pub signature: Option<SignaturePolicy>,
}

#[derive(Debug)]
pub enum PullOutcome {
    Promoted {
        lock: Lock,
        dir: PathBuf,
        replaced: bool,
    },
    /// The store already holds this name at this exact revision.
    AlreadyPresent { lock: Lock, dir: PathBuf },
}

/// One reason a model was refused: the file, the rule it broke, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub file: String,
    pub rule: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The model broke a rule (integrity, format, policy): exit code 1.
    #[error("refused: {}", describe(.0))]
    Refused(Vec<Refusal>),
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(
        "model {name:?} already exists at revision {existing}; the source is at {incoming}; pass --replace to swap it"
    )]
    Exists {
        name: String,
        existing: String,
        incoming: String,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PullError {
    /// True when the model itself was refused (exit 1) rather than the pull
    /// failing for another reason (exit 2).
    pub fn is_refusal(&self) -> bool {
        matches!(self, PullError::Refused(_))
    }
}

fn describe(r: &[Refusal]) -> String {
    r.iter()
        .map(|r| format!("{}: {}: {}", r.file, r.rule, r.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Removes the quarantine folder on every exit path except success.
struct QuarantineGuard(Option<PathBuf>);

impl Drop for QuarantineGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_tree(&dir);
        }
    }
}

pub fn pull(store: &Store, req: &PullRequest) -> Result<PullOutcome, PullError> {
    let name = ModelName::parse(&req.name)?;
    let source = Source::parse(&req.source, req.revision.as_deref())?;
    let Source::Local(src_root) = &source;

    let entries = walk(src_root, SKIP_DIRS).map_err(io_err(src_root))?;
    let mut refusals = Vec::new();
    for e in &entries {
        let rule = match e.kind {
            EntryKind::File => match check_rel_path(&e.rel) {
                Ok(()) => continue,
                Err(_) => "fs.path",
            },
            EntryKind::Symlink => "fs.symlink",
            EntryKind::Special => "fs.special-file",
        };
        refusals.push(Refusal {
            file: e.rel.clone(),
            rule: rule.into(),
            message: match rule {
                "fs.symlink" => "symlinks can point outside the model; copy the target instead".into(),
                "fs.special-file" => "not a regular file".into(),
                _ => "path cannot be stored safely".into(),
            },
        });
    }
    if !refusals.is_empty() {
        return Err(PullError::Refused(refusals));
    }
    if entries.is_empty() {
        return Err(PullError::Refused(vec![Refusal {
            file: src_root.display().to_string(),
            rule: "fs.empty".into(),
            message: "the source folder holds no files".into(),
        }]));
    }

    store.clean_stale_quarantine();
    let qdir = store.new_quarantine(&name).map_err(io_err(store.root()))?;
    let mut guard = QuarantineGuard(Some(qdir.clone()));
    let files_dir = qdir.join(FILES_DIR);

    // Copy + hash, one read per file, files spread over all cores.
    let digests = par_map(&entries, |e| e.size, |e| copy_hashed(&e.path, &files_dir, &e.rel));
    let mut locked = Vec::with_capacity(entries.len());
    for (e, d) in entries.iter().zip(digests) {
        let d = d?;
        locked.push(LockedFile {
            path: e.rel.clone(),
            size: d.size,
            sha256: d.sha256,
        });
    }
    sync_tree_dirs(&files_dir).map_err(io_err(&files_dir))?;

    // Signature: checked against the digests just computed (no second read).
    let signed_by = match &req.signature {
        None => None,
        Some(policy) => {
            let bundle = match locked.iter().any(|f| f.path == policy.file) {
                true => {
                    let path = files_dir.join(&policy.file);
                    Some(fs::read(&path).map_err(io_err(&path))?)
                }
                false => None,
            };
            match policy.check(bundle.as_deref(), &locked) {
                Ok(v) => Some(LockSignature {
                    file: policy.file.clone(),
                    signer: v.signer.to_string(),
                }),
                Err(e) => {
                    return Err(PullError::Refused(vec![Refusal {
                        file: policy.file.clone(),
                        rule: e.rule().into(),
                        message: e.to_string(),
                    }]));
                }
            }
        }
    };

    // Scan exactly the bytes that would be stored.
    let report = moat_scan::scan_paths(std::slice::from_ref(&files_dir));
    let refusals: Vec<Refusal> = report
        .files
        .iter()
        .filter(|f| f.verdict != moat_scan::Verdict::Clean)
        .flat_map(|f| {
            f.findings.iter().map(move |x| Refusal {
                file: f.path.clone(),
                rule: x.rule.clone(),
                message: if x.location.is_empty() {
                    x.message.clone()
                } else {
                    format!("{} ({})", x.message, x.location)
                },
            })
        })
        .collect();
    if !refusals.is_empty() {
        return Err(PullError::Refused(refusals));
    }

    let revision = Lock::content_revision(&locked);
    let mut lock = Lock::new(name.as_str(), &source.url(), &revision, locked);
    lock.signature = signed_by;
    write_new_file(&qdir.join(LOCK_FILE), lock.to_toml().as_bytes())?;

    // The store decides: a new model, a new version of the same source, the
    // same version again (no-op), or a different source (needs --replace).
    let promotion = store.promote(&qdir, &name, req.replace).map_err(|e| match e {
        StoreError::DifferentSource {
            existing_source,
            existing_revision,
            incoming_source,
            ..
        } => PullError::Exists {
            name: name.to_string(),
            existing: format!("{existing_revision} from {existing_source}"),
            incoming: format!("{} from {incoming_source}", lock.revision),
        },
        other => PullError::Store(other),
    })?;
    // `promote` consumed the quarantine folder.
    guard.0 = None;
    Ok(match promotion.kind {
        Promoted::Unchanged => PullOutcome::AlreadyPresent {
            lock,
            dir: promotion.dir,
        },
        kind => PullOutcome::Promoted {
            lock,
            dir: promotion.dir,
            replaced: kind == Promoted::Replaced,
        },
    })
}

/// Copy `src` to `dst_root/rel`, hashing while copying, and fsync the copy.
fn copy_hashed(src: &Path, dst_root: &Path, rel: &str) -> Result<FileDigest, PullError> {
    let dst = dst_root.join(rel);
    if let Some(parent) = dst.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err(parent))?;
    }
    // The walk saw a regular file, but the source may change under us: open
    // without following a symlink swapped in since, and re-check the type of
    // what was actually opened.
    let input = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(src)
        .map_err(io_err(src))?;
    if !input.metadata().map_err(io_err(src))?.is_file() {
        return Err(PullError::Refused(vec![Refusal {
            file: rel.to_owned(),
            rule: "fs.special-file".into(),
            message: "changed into something other than a regular file during the pull".into(),
        }]));
    }
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&dst)
        .map_err(io_err(&dst))?;
    let digest = {
        let mut w = io::BufWriter::with_capacity(crate::hash::CHUNK, &mut out);
        let d = hash_stream(input, Some(&mut w)).map_err(io_err(src))?;
        w.flush().map_err(io_err(&dst))?;
        d
    };
    out.sync_all().map_err(io_err(&dst))?;
    Ok(digest)
}

fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), PullError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// fsync every folder below `dir` (files were fsynced as they were written),
/// so the directory entries are durable before the promoting rename.
fn sync_tree_dirs(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree_dirs(&e.path())?;
        }
    }
    fsync_dir(dir)
}
