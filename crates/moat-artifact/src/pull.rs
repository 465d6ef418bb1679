//! `moat pull`: fetch → hash → scan → lock → promote.
//!
//! Files are copied (local folders) or downloaded (S3, the Hub, HTTPS) into a
//! quarantine folder and hashed in the same pass; the scanner then looks at
//! the quarantined copy (the bytes that will be stored, not the source, which
//! could change underneath us); only a clean model gets a lock and is
//! promoted by one atomic rename.
//!
//! Every name a remote lists is checked with `lock::check_rel_path` before
//! anything is written (a hostile listing must not write outside the
//! quarantine, Ollama's CVE-2024-37032). `--include`/`--exclude` select
//! files before download; `--locked` holds the pull to a lock: any missing,
//! extra, resized or re-hashed file is refused.
//!
//! Local pulls use a fresh per-process quarantine folder, removed on any
//! failure. Remote pulls use `quarantine/NAME.r-<16 hex>` (a digest of the
//! source URL and the resolved revision) holding a flocked `.lock`, so a
//! pull interrupted by a network failure or `kill -9` resumes where it
//! stopped; that folder is removed only on a refusal (the bytes are bad) or
//! after promotion.

use crate::download::{DownloadError, DownloadOptions, Job, PARTS_DIR, download_all};
use crate::hash::{FileDigest, hash_stream, par_map};
use crate::lock::LockSignature;
use crate::lock::{LOCK_FILE, Lock, LockedFile, check_rel_path};
use crate::name::{InvalidName, ModelName};
use crate::policy::SignaturePolicy;
use crate::source::policy::{Scheme, SourcePolicy};
use crate::source::{Env, Listing, Remote, Source, SourceError};
use crate::store::{FILES_DIR, Promoted, QUARANTINE_DIR, Store, StoreError, fsync_dir, remove_tree};
use crate::tree::{EntryKind, walk};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Folders of a source that are never part of a model (VCS metadata).
const SKIP_DIRS: &[&str] = &[".git"];

#[derive(Debug, Clone, Default)]
pub struct PullRequest {
    pub source: String,
    pub name: String,
    pub revision: Option<String>,
    /// Replace an existing model of the same name (atomically).
    pub replace: bool,
    /// Who must have signed the model; `None` accepts unsigned models.
    pub signature: Option<SignaturePolicy>,
    /// Which sources, hosts and addresses may be reached (`[sources]`).
    pub policy: SourcePolicy,
    /// Where AWS and Hub settings and credentials are read from.
    pub env: Env,
    /// Only files matching one of these globs (all when empty).
    pub include: Vec<String>,
    /// No file matching one of these globs.
    pub exclude: Vec<String>,
    /// Refuse any difference from this lock (`--locked FILE`).
    pub locked: Option<Lock>,
    pub download: DownloadOptions,
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
    Source(SourceError),
    #[error("{0}")]
    Usage(String),
    /// Downloads failed for a reason other than the model (network, I/O);
    /// the partial files are kept and the next pull resumes.
    #[error("download failed: {}", .0.join("; "))]
    Download(Vec<String>),
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

impl From<SourceError> for PullError {
    /// A source's refusal (policy, credentials, gated repo) is a refusal of
    /// the pull (exit 1); anything else stays an error (exit 2).
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Refused {
                subject,
                rule,
                message,
            } => PullError::Refused(vec![Refusal {
                file: subject,
                rule,
                message,
            }]),
            e => PullError::Source(e),
        }
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
    let selector = Selector::new(&req.include, &req.exclude)?;
    // `--locked` on a Hub source without `--revision` pulls the locked commit.
    let revision = match (&req.revision, &req.locked) {
        (None, Some(lock)) if req.source.starts_with("hf://") => Some(lock.revision.clone()),
        (r, _) => r.clone(),
    };
    let source = Source::parse(&req.source, revision.as_deref())?;
    if let Some(lock) = &req.locked
        && lock.source != source.url()
    {
        return Err(PullError::Refused(vec![Refusal {
            file: source.url(),
            rule: "locked.source".into(),
            message: format!("the lock pins source {:?}, not this one", lock.source),
        }]));
    }
    match &source {
        Source::Local(root) => {
            let key = root.display().to_string();
            req.policy
                .check_source(Scheme::File, None, &key)
                .map_err(|r| SourceError::refused(source.url(), "source.policy", r.0))?;
            pull_local(store, req, &name, &source, root, &selector)
        }
        _ => pull_remote(store, req, &name, &source, &selector),
    }
}

/// `--include` / `--exclude` globs over model-relative paths (`*` also
/// matches `/`, as in `huggingface-cli download --include`).
struct Selector {
    include: Option<globset::GlobSet>,
    exclude: Option<globset::GlobSet>,
}

impl Selector {
    fn new(include: &[String], exclude: &[String]) -> Result<Self, PullError> {
        let build = |flag: &str, globs: &[String]| -> Result<Option<globset::GlobSet>, PullError> {
            if globs.is_empty() {
                return Ok(None);
            }
            let mut b = globset::GlobSetBuilder::new();
            for g in globs {
                b.add(globset::Glob::new(g).map_err(|e| PullError::Usage(format!("{flag} {g:?}: {e}")))?);
            }
            b.build()
                .map(Some)
                .map_err(|e| PullError::Usage(format!("{flag}: {e}")))
        };
        Ok(Self {
            include: build("--include", include)?,
            exclude: build("--exclude", exclude)?,
        })
    }

    fn selects(&self, rel: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(rel))
            && self.exclude.as_ref().is_none_or(|g| !g.is_match(rel))
    }
}

/// Compare what is about to be (or was) pulled with the lock: every
/// missing, extra, resized or re-hashed file is one refusal.
fn compare_to_lock(lock: &Lock, files: &[(String, Option<u64>, Option<String>)]) -> Vec<Refusal> {
    let mut out = Vec::new();
    let seen: BTreeMap<&str, (Option<u64>, Option<&String>)> = files
        .iter()
        .map(|(p, s, h)| (p.as_str(), (*s, h.as_ref())))
        .collect();
    for f in &lock.files {
        match seen.get(f.path.as_str()) {
            None => out.push(Refusal {
                file: f.path.clone(),
                rule: "locked.missing".into(),
                message: "pinned by the lock but not in the source (or not selected)".into(),
            }),
            Some((size, sha)) => {
                if let Some(size) = size
                    && *size != f.size
                {
                    out.push(Refusal {
                        file: f.path.clone(),
                        rule: "locked.size".into(),
                        message: format!("the lock pins {} bytes, the source has {size}", f.size),
                    });
                }
                if let Some(sha) = sha
                    && **sha != f.sha256
                {
                    out.push(Refusal {
                        file: f.path.clone(),
                        rule: "locked.sha256".into(),
                        message: format!("the lock pins SHA-256 {}, the source has {sha}", f.sha256),
                    });
                }
            }
        }
    }
    for (p, _, _) in files {
        if lock.file(p).is_none() {
            out.push(Refusal {
                file: p.clone(),
                rule: "locked.extra".into(),
                message: "in the source but not in the lock".into(),
            });
        }
    }
    out
}

fn pull_local(
    store: &Store,
    req: &PullRequest,
    name: &ModelName,
    source: &Source,
    src_root: &Path,
    selector: &Selector,
) -> Result<PullOutcome, PullError> {
    let mut entries = walk(src_root, SKIP_DIRS).map_err(io_err(src_root))?;
    entries.retain(|e| selector.selects(&e.rel));
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
            message: "the source folder holds no (selected) files".into(),
        }]));
    }
    if let Some(lock) = &req.locked {
        let planned: Vec<_> = entries
            .iter()
            .map(|e| (e.rel.clone(), Some(e.size), None))
            .collect();
        let r = compare_to_lock(lock, &planned);
        if !r.is_empty() {
            return Err(PullError::Refused(r));
        }
    }

    store.clean_stale_quarantine();
    let qdir = store.new_quarantine(name).map_err(io_err(store.root()))?;
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
    check_locked(req, &locked)?;
    let revision = Lock::content_revision(&locked);
    let out = finish(store, req, name, &source.url(), &revision, &qdir, locked)?;
    if matches!(out, PullOutcome::Promoted { .. }) {
        // `promote` moved the folder (or swapped and removed the old one).
        guard.0 = None;
    }
    Ok(out)
}

/// Check a remote listing's names before anything is written: plain
/// relative paths only, no duplicates, no file that is also a folder.
fn check_listing(listing: &Listing, subject: &str) -> Result<(), PullError> {
    let mut refusals = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &listing.files {
        if let Err(m) = check_rel_path(&f.path) {
            refusals.push(Refusal {
                file: f.path.clone(),
                rule: "fs.path".into(),
                message: format!("{subject} lists a path that cannot be stored safely: {m}"),
            });
        } else if !seen.insert(f.path.as_str()) {
            refusals.push(Refusal {
                file: f.path.clone(),
                rule: "fs.duplicate".into(),
                message: format!("{subject} lists this path twice"),
            });
        }
        if let Some(h) = &f.sha256
            && (h.len() != 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        {
            refusals.push(Refusal {
                file: f.path.clone(),
                rule: "source.sha256".into(),
                message: format!("{subject} gives {h:?}, not a SHA-256"),
            });
        }
    }
    for p in &seen {
        let mut prefix = String::new();
        for part in p.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if seen.contains(prefix.as_str()) {
                refusals.push(Refusal {
                    file: (*p).to_owned(),
                    rule: "fs.path".into(),
                    message: format!("{prefix:?} is listed both as a file and as a folder"),
                });
            }
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(PullError::Refused(refusals))
    }
}

fn open_remote(source: &Source, req: &PullRequest) -> Result<Box<dyn Remote>, PullError> {
    let policy = Arc::new(req.policy.clone());
    Ok(match source {
        Source::S3 { bucket, prefix } => Box::new(crate::source::s3::S3Remote::new(
            bucket, prefix, &req.env, policy,
        )?),
        Source::Hf { repo, revision } => Box::new(crate::source::hf::HfRemote::new(
            repo, revision, &req.env, policy,
        )?),
        Source::Https { url } => Box::new(crate::source::https::HttpsRemote::new(url, policy)?),
        Source::Local(p) => {
            return Err(PullError::Usage(format!("{} is a local folder", p.display())));
        }
    })
}

/// The resumable quarantine folder of one (source, revision) pull.
fn resumable_dir(store: &Store, name: &ModelName, source_url: &str, revision: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(source_url.as_bytes());
    h.update([0]);
    h.update(revision.as_bytes());
    let digest = hex::encode(h.finalize());
    store
        .root()
        .join(QUARANTINE_DIR)
        .join(format!("{name}.r-{}", &digest[..16]))
}

/// Name of the flocked file inside a resumable quarantine folder.
pub const RESUME_LOCK: &str = ".lock";

fn pull_remote(
    store: &Store,
    req: &PullRequest,
    name: &ModelName,
    source: &Source,
    selector: &Selector,
) -> Result<PullOutcome, PullError> {
    let url = source.url();
    let remote = open_remote(source, req)?;
    let listing = remote.list()?;
    check_listing(&listing, &url)?;
    let mut files: Vec<_> = listing
        .files
        .iter()
        .filter(|f| selector.selects(&f.path))
        .cloned()
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if files.is_empty() {
        return Err(PullError::Refused(vec![Refusal {
            file: url,
            rule: "fs.empty".into(),
            message: format!(
                "the source lists {} files at {}, none selected",
                listing.files.len(),
                listing.revision
            ),
        }]));
    }
    if let Some(lock) = &req.locked {
        let planned: Vec<_> = files
            .iter()
            .map(|f| (f.path.clone(), f.size, f.sha256.clone()))
            .collect();
        let mut r = compare_to_lock(lock, &planned);
        if matches!(source, Source::Hf { .. }) && lock.revision != listing.revision {
            r.push(Refusal {
                file: url.clone(),
                rule: "locked.revision".into(),
                message: format!(
                    "the lock pins commit {}, the Hub resolved {}",
                    lock.revision, listing.revision
                ),
            });
        }
        if !r.is_empty() {
            return Err(PullError::Refused(r));
        }
    }

    store.clean_stale_quarantine();
    let qdir = resumable_dir(store, name, &url, &listing.revision);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(qdir.join(FILES_DIR))
        .map_err(io_err(&qdir))?;
    let lock_path = qdir.join(RESUME_LOCK);
    let lock_file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    if let Err(e) = rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        return Err(PullError::Usage(format!(
            "another pull of {name} from {url} is running (it holds {}): {e}",
            lock_path.display()
        )));
    }

    let result = download_and_finish(store, req, name, source, &listing, files, remote.as_ref(), &qdir);
    match &result {
        // Promoted: the folder is gone. Refused: its bytes are bad, drop it.
        Ok(_) | Err(PullError::Refused(_)) => remove_tree(&qdir),
        // Anything else (network, I/O, already exists): keep it to resume.
        Err(_) => {}
    }
    drop(lock_file);
    result
}

#[allow(clippy::too_many_arguments, reason = "the pull's state, passed once")]
fn download_and_finish(
    store: &Store,
    req: &PullRequest,
    name: &ModelName,
    source: &Source,
    listing: &Listing,
    files: Vec<crate::source::RemoteFile>,
    remote: &dyn Remote,
    qdir: &Path,
) -> Result<PullOutcome, PullError> {
    let jobs: Vec<Job> = files
        .into_iter()
        .map(|f| {
            let pinned = req.locked.as_ref().and_then(|l| l.file(&f.path));
            let (sha256, size, by) = match (&f.sha256, pinned) {
                (Some(h), _) => (Some(h.clone()), f.size, "the source"),
                (None, Some(p)) => (Some(p.sha256.clone()), Some(p.size), "the lock"),
                (None, None) => (None, f.size, "the source"),
            };
            Job {
                rel: f.path.clone(),
                size,
                sha256,
                promised_by: by,
                file: f,
            }
        })
        .collect();
    let results = download_all(remote, &jobs, qdir, &req.download);
    let mut refusals = Vec::new();
    let mut failures = Vec::new();
    let mut locked = Vec::with_capacity(jobs.len());
    for (job, r) in jobs.iter().zip(results) {
        match r {
            Ok(FileDigest { size, sha256 }) => locked.push(LockedFile {
                path: job.rel.clone(),
                size,
                sha256,
            }),
            Err(DownloadError::Refused { file, rule, message }) => {
                refusals.push(Refusal { file, rule, message })
            }
            Err(DownloadError::Failed { file, message }) => failures.push(format!("{file}: {message}")),
            Err(DownloadError::Aborted) => {}
        }
    }
    if !refusals.is_empty() {
        return Err(PullError::Refused(refusals));
    }
    if !failures.is_empty() {
        return Err(PullError::Download(failures));
    }
    check_locked(req, &locked)?;
    // Only the selected files may be promoted: drop leftovers of an earlier
    // run of this folder with other globs, and the partial-file tree.
    let files_dir = qdir.join(FILES_DIR);
    let keep: BTreeSet<&str> = locked.iter().map(|f| f.path.as_str()).collect();
    for e in walk(&files_dir, &[]).map_err(io_err(&files_dir))? {
        if !keep.contains(e.rel.as_str()) {
            fs::remove_file(&e.path).map_err(io_err(&e.path))?;
        }
    }
    remove_tree(&qdir.join(PARTS_DIR));
    // A single URL has no revision before its content is known.
    let revision = if listing.revision.starts_with("url-sha256:") {
        Lock::content_revision(&locked)
    } else {
        listing.revision.clone()
    };
    finish(store, req, name, &source.url(), &revision, qdir, locked)
}

/// Signature, scan, lock, promote: the common end of every pull. `qdir`
/// holds exactly the model's files under `files/`.
/// With `--locked`: the files just hashed must be exactly the lock's.
fn check_locked(req: &PullRequest, locked: &[LockedFile]) -> Result<(), PullError> {
    let Some(lock) = &req.locked else { return Ok(()) };
    let got: Vec<_> = locked
        .iter()
        .map(|f| (f.path.clone(), Some(f.size), Some(f.sha256.clone())))
        .collect();
    let r = compare_to_lock(lock, &got);
    if r.is_empty() {
        Ok(())
    } else {
        Err(PullError::Refused(r))
    }
}

fn finish(
    store: &Store,
    req: &PullRequest,
    name: &ModelName,
    source_url: &str,
    revision: &str,
    qdir: &Path,
    locked: Vec<LockedFile>,
) -> Result<PullOutcome, PullError> {
    let files_dir = qdir.join(FILES_DIR);
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

    let mut lock = Lock::new(name.as_str(), source_url, revision, locked);
    lock.signature = signed_by;
    // A crashed earlier run may have left its lock; the store promotes
    // `moat.lock` and the `files/` it lists and ignores anything else (the
    // resumable folder's `.lock`, the empty `parts/`).
    let stale = qdir.join(LOCK_FILE);
    if let Err(e) = fs::remove_file(&stale)
        && e.kind() != io::ErrorKind::NotFound
    {
        return Err(PullError::Io {
            path: stale,
            source: e,
        });
    }
    write_new_file(&qdir.join(LOCK_FILE), lock.to_toml().as_bytes())?;

    // The store decides: a new model, a new version of the same source, the
    // same version again (no-op), or a different source (needs --replace).
    let promotion = store.promote(qdir, name, req.replace).map_err(|e| match e {
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
