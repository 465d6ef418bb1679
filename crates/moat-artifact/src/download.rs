//! Parallel, resumable, hashed downloads into a quarantine folder.
//!
//! Each file streams into `parts/<rel>` while SHA-256 runs over the same
//! bytes (no second read), is fsynced, checked against the size and hash
//! the listing (or the lock) promised, and only then renamed to
//! `files/<rel>`. Partial files live in their own tree, not as
//! `files/<rel>.part`, so a listing that also names `x.part` cannot collide
//! with the partial download of `x`.
//!
//! Resuming: a `parts/<rel>` left by an interrupted run (or an earlier
//! attempt of this one) is hashed once and the download continues from its
//! end with a ranged GET; a server that ignores the range (200 instead of
//! 206) restarts the file from byte 0. Retries use exponential backoff with
//! jitter, a bounded number of times, for connection errors, 5xx/429 and
//! truncated bodies; a refusal (policy, credentials, 404, mismatch) is
//! never retried.
//!
//! Progress: bars per file and overall on a terminal (indicatif), otherwise
//! one JSON line per file at most every 500 ms on stderr:
//! `{"event":"progress","file":…,"bytes":…,"total":…}`.

use crate::hash::{CHUNK, FileDigest};
use crate::source::{FetchError, Remote, RemoteFile};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, IsTerminal, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Where finished files go inside the quarantine folder.
pub const FILES_DIR: &str = crate::store::FILES_DIR;
/// Where partial files go inside the quarantine folder.
pub const PARTS_DIR: &str = "parts";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars on a terminal, JSON lines otherwise.
    Auto,
    Bars,
    Json,
    Quiet,
}

#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Files downloaded at the same time.
    pub jobs: usize,
    /// Extra attempts per file after the first.
    pub retries: u32,
    /// First backoff delay; doubled per attempt, capped at 8 s, jittered.
    pub backoff: Duration,
    pub progress: ProgressMode,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            jobs: 4,
            retries: 5,
            backoff: Duration::from_millis(250),
            progress: ProgressMode::Auto,
        }
    }
}

/// One file to download and what it must turn out to be.
#[derive(Debug, Clone)]
pub struct Job {
    /// Checked relative path (see `lock::check_rel_path`).
    pub rel: String,
    pub file: RemoteFile,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// Who promised `sha256` / `size` ("the source", "the lock"), for messages.
    pub promised_by: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadError {
    /// The file broke a promise or a rule: exit 1.
    Refused {
        file: String,
        rule: String,
        message: String,
    },
    /// The download failed (network, I/O): exit 2; the partial file stays
    /// for the next run to resume.
    Failed { file: String, message: String },
    /// Stopped because another file failed.
    Aborted,
}

fn refused(file: &str, rule: &str, message: String) -> DownloadError {
    DownloadError::Refused {
        file: file.to_owned(),
        rule: rule.to_owned(),
        message,
    }
}

fn failed(file: &str, message: String) -> DownloadError {
    DownloadError::Failed {
        file: file.to_owned(),
        message,
    }
}

/// Download every job into `qdir` (`files/` and `parts/` below it); results
/// in job order.
pub fn download_all(
    remote: &dyn Remote,
    jobs: &[Job],
    qdir: &Path,
    opts: &DownloadOptions,
) -> Vec<Result<FileDigest, DownloadError>> {
    let progress = Progress::new(opts.progress, jobs.iter().filter_map(|j| j.size).sum());
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].size.unwrap_or(0)));
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<FileDigest, DownloadError>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, 64).min(jobs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let r = if abort.load(Ordering::Relaxed) {
                        Err(DownloadError::Aborted)
                    } else {
                        download_one(remote, &jobs[i], qdir, opts, &progress, &abort)
                    };
                    if matches!(
                        r,
                        Err(DownloadError::Refused { .. } | DownloadError::Failed { .. })
                    ) {
                        abort.store(true, Ordering::Relaxed);
                    }
                    if let Ok(mut res) = results.lock()
                        && let Some(slot) = res.get_mut(i)
                    {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    progress.finish();
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or(Err(DownloadError::Aborted)))
        .collect()
}

fn mkdirs(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) => fs::DirBuilder::new().recursive(true).mode(0o700).create(p),
        None => Ok(()),
    }
}

/// Hash an existing file (a finished file from an interrupted run, or the
/// prefix of a partial one) into `hasher`; returns its length.
fn hash_prefix(path: &Path, hasher: &mut Sha256) -> io::Result<u64> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                hasher.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Does a finished `(size, sha256)` keep the job's promises? `Err` names
/// the broken one.
fn check_promises(job: &Job, size: u64, sha256: &str) -> Result<(), DownloadError> {
    if let Some(want) = job.size
        && want != size
    {
        return Err(refused(
            &job.rel,
            "integrity.size",
            format!(
                "size differs from {}: expected {want} bytes, got {size}",
                job.promised_by
            ),
        ));
    }
    if let Some(want) = &job.sha256
        && want != sha256
    {
        return Err(refused(
            &job.rel,
            "integrity.sha256",
            format!(
                "SHA-256 differs from {}: expected {want}, got {sha256}",
                job.promised_by
            ),
        ));
    }
    Ok(())
}

fn backoff(opts: &DownloadOptions, attempt: u32) -> Duration {
    let base = opts
        .backoff
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(8));
    let mut b = [0u8; 2];
    let r = match getrandom::fill(&mut b) {
        Ok(()) => u16::from_le_bytes(b),
        Err(_) => 0x8000,
    };
    // Full jitter in [base/2, base): spreads retries of parallel downloads.
    base / 2 + base.mul_f64(f64::from(r) / 131_072.0)
}

enum Attempt {
    Done(FileDigest),
    /// Retry after a transient failure; `truncated` when the body ended early.
    Again {
        message: String,
        truncated: bool,
    },
}

fn download_one(
    remote: &dyn Remote,
    job: &Job,
    qdir: &Path,
    opts: &DownloadOptions,
    progress: &Progress,
    abort: &AtomicBool,
) -> Result<FileDigest, DownloadError> {
    let io_fail = |p: &Path, e: io::Error| failed(&job.rel, format!("{}: {e}", p.display()));
    let final_path = qdir.join(FILES_DIR).join(&job.rel);
    let part_path = qdir.join(PARTS_DIR).join(&job.rel);
    mkdirs(&final_path).map_err(|e| io_fail(&final_path, e))?;
    mkdirs(&part_path).map_err(|e| io_fail(&part_path, e))?;

    // Finished by an earlier, interrupted run of the same pull?
    if fs::symlink_metadata(&final_path).is_ok_and(|m| m.is_file()) {
        let mut h = Sha256::new();
        let size = hash_prefix(&final_path, &mut h).map_err(|e| io_fail(&final_path, e))?;
        let sha = hex::encode(h.finalize());
        if check_promises(job, size, &sha).is_ok() && (job.size.is_some() || job.sha256.is_some()) {
            let bar = progress.file(&job.rel, Some(size));
            bar.set(size);
            bar.done();
            return Ok(FileDigest { size, sha256: sha });
        }
        fs::remove_file(&final_path).map_err(|e| io_fail(&final_path, e))?;
    }

    let mut part = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&part_path)
        .map_err(|e| io_fail(&part_path, e))?;
    let mut hasher = Sha256::new();
    let mut have = hash_prefix(&part_path, &mut hasher).map_err(|e| io_fail(&part_path, e))?;
    if job.size.is_some_and(|s| have > s) {
        // Longer than promised: start over rather than trust the prefix.
        part.set_len(0).map_err(|e| io_fail(&part_path, e))?;
        hasher = Sha256::new();
        have = 0;
    }
    let bar = progress.file(&job.rel, job.size);
    bar.set(have);

    let mut last = String::new();
    let mut last_truncated = false;
    for attempt in 0..=opts.retries {
        if attempt > 0 {
            std::thread::sleep(backoff(opts, attempt - 1));
        }
        if abort.load(Ordering::Relaxed) {
            return Err(DownloadError::Aborted);
        }
        match fetch_into(
            remote,
            job,
            &mut part,
            &part_path,
            &mut hasher,
            &mut have,
            &bar,
            abort,
        )? {
            Attempt::Done(d) => {
                bar.done();
                check_promises(job, d.size, &d.sha256).inspect_err(|_| {
                    // Wrong bytes: do not resume from them next time.
                    let _ = fs::remove_file(&part_path);
                })?;
                part.sync_all().map_err(|e| io_fail(&part_path, e))?;
                drop(part);
                fs::rename(&part_path, &final_path).map_err(|e| io_fail(&final_path, e))?;
                return Ok(d);
            }
            Attempt::Again { message, truncated } => {
                tracing::warn!(file = %job.rel, attempt = attempt + 1, error = %message, "download interrupted; retrying");
                last = message;
                last_truncated = truncated;
            }
        }
    }
    let attempts = opts.retries + 1;
    let _ = part.sync_all();
    if last_truncated {
        return Err(refused(
            &job.rel,
            "integrity.truncated",
            format!("{last} (gave up after {attempts} attempts)"),
        ));
    }
    Err(failed(
        &job.rel,
        format!("{last} (gave up after {attempts} attempts; the next pull resumes)"),
    ))
}

/// One GET from `*have` on: append to the part file while hashing.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the state is the download's"
)]
fn fetch_into(
    remote: &dyn Remote,
    job: &Job,
    part: &mut fs::File,
    part_path: &Path,
    hasher: &mut Sha256,
    have: &mut u64,
    bar: &FileBar<'_>,
    abort: &AtomicBool,
) -> Result<Attempt, DownloadError> {
    let io_fail = |e: io::Error| failed(&job.rel, format!("{}: {e}", part_path.display()));
    if job.size.is_some_and(|s| s == *have) && *have > 0 {
        // Complete already (the previous run died before the rename).
        return Ok(Attempt::Done(FileDigest {
            size: *have,
            sha256: hex::encode(hasher.clone().finalize()),
        }));
    }
    let opened = match remote.open(&job.file, *have) {
        Ok(o) => o,
        Err(FetchError::Retry(m)) => {
            return Ok(Attempt::Again {
                message: m,
                truncated: false,
            });
        }
        Err(FetchError::NotFound(m)) => {
            return Err(refused(
                &job.rel,
                "integrity.missing",
                format!("listed by the source but not downloadable: {m}"),
            ));
        }
        Err(FetchError::Refused { rule, message }) => return Err(refused(&job.rel, &rule, message)),
        Err(FetchError::Fatal(m)) => return Err(failed(&job.rel, m)),
    };
    if opened.start != *have {
        // The server ignored the range: start the file over.
        part.set_len(0).map_err(io_fail)?;
        part.seek(io::SeekFrom::End(0)).map_err(io_fail)?;
        *hasher = Sha256::new();
        *have = 0;
        bar.set(0);
    }
    let expected = job.size.or(opened.total);
    if bar.total.is_none()
        && let Some(t) = expected
    {
        bar.set_total(t);
    }
    // Read at most one byte more than promised: enough to prove "too long".
    let limit = job.size.map(|s| s + 1 - (*have).min(s + 1));
    let mut reader = opened.reader;
    let mut buf = vec![0u8; CHUNK];
    let mut out = io::BufWriter::with_capacity(CHUNK, &mut *part);
    let mut read_this_time = 0u64;
    let err = loop {
        if abort.load(Ordering::Relaxed) {
            let _ = out.flush();
            return Err(DownloadError::Aborted);
        }
        let want = match limit {
            Some(l) => (l - read_this_time).min(CHUNK as u64) as usize,
            None => CHUNK,
        };
        if want == 0 {
            break None;
        }
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(e.to_string()),
        };
        out.write_all(&buf[..n]).map_err(io_fail)?;
        hasher.update(&buf[..n]);
        *have += n as u64;
        read_this_time += n as u64;
        bar.set(*have);
    };
    out.flush().map_err(io_fail)?;
    drop(out);
    if let Some(s) = job.size
        && *have > s
    {
        let _ = part.set_len(0);
        return Err(refused(
            &job.rel,
            "integrity.size",
            format!(
                "size differs from {}: expected {s} bytes, the server sent more",
                job.promised_by
            ),
        ));
    }
    if let Some(e) = err {
        // The body stopped short of the size the file must have: a
        // truncated download (refused once retries run out), whether the
        // peer closed cleanly or reset.
        return Ok(Attempt::Again {
            message: match expected {
                Some(t) => format!("truncated: got {have} of {t} bytes ({e})", have = *have),
                None => format!("connection lost after {have} bytes: {e}", have = *have),
            },
            truncated: expected.is_some(),
        });
    }
    if let Some(t) = expected
        && *have < t
    {
        return Ok(Attempt::Again {
            message: format!("truncated: got {have} of {t} bytes", have = *have),
            truncated: true,
        });
    }
    Ok(Attempt::Done(FileDigest {
        size: *have,
        sha256: hex::encode(hasher.clone().finalize()),
    }))
}

/// Progress output: bars, JSON lines or nothing.
enum Progress {
    Bars {
        multi: indicatif::MultiProgress,
        overall: indicatif::ProgressBar,
    },
    Json,
    Quiet,
}

impl Progress {
    fn new(mode: ProgressMode, total: u64) -> Self {
        let mode = match mode {
            ProgressMode::Auto if io::stderr().is_terminal() => ProgressMode::Bars,
            ProgressMode::Auto => ProgressMode::Json,
            m => m,
        };
        match mode {
            ProgressMode::Bars => {
                let multi = indicatif::MultiProgress::new();
                let overall = multi.add(indicatif::ProgressBar::new(total));
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                ) {
                    overall.set_style(style.progress_chars("=> "));
                }
                overall.set_prefix("total");
                Progress::Bars { multi, overall }
            }
            ProgressMode::Json => Progress::Json,
            _ => Progress::Quiet,
        }
    }

    fn file(&self, rel: &str, total: Option<u64>) -> FileBar<'_> {
        let bar = match self {
            Progress::Bars { multi, .. } => {
                let b = multi.add(indicatif::ProgressBar::new(total.unwrap_or(0)));
                if let Ok(style) =
                    indicatif::ProgressStyle::with_template("{prefix:>24} [{bar:30}] {bytes}/{total_bytes}")
                {
                    b.set_style(style.progress_chars("=> "));
                }
                let short: String = rel
                    .chars()
                    .rev()
                    .take(24)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                b.set_prefix(short);
                Some(b)
            }
            _ => None,
        };
        FileBar {
            progress: self,
            rel: rel.to_owned(),
            total,
            total_cell: Mutex::new(total),
            bar,
            last: Mutex::new((None, 0)),
        }
    }

    fn finish(&self) {
        if let Progress::Bars { overall, .. } = self {
            overall.finish();
        }
    }
}

struct FileBar<'a> {
    progress: &'a Progress,
    rel: String,
    total: Option<u64>,
    total_cell: Mutex<Option<u64>>,
    bar: Option<indicatif::ProgressBar>,
    /// (last JSON line time, last byte count reported to the overall bar).
    last: Mutex<(Option<Instant>, u64)>,
}

impl FileBar<'_> {
    fn set_total(&self, t: u64) {
        if let Ok(mut c) = self.total_cell.lock() {
            *c = Some(t);
        }
        if let Some(b) = &self.bar {
            b.set_length(t);
        }
        if let Progress::Bars { overall, .. } = self.progress {
            overall.inc_length(t);
        }
    }

    fn set(&self, bytes: u64) {
        let Ok(mut last) = self.last.lock() else { return };
        let (when, reported) = *last;
        match self.progress {
            Progress::Bars { overall, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(bytes);
                }
                if bytes >= reported {
                    overall.inc(bytes - reported);
                } else {
                    overall.set_position(overall.position().saturating_sub(reported - bytes));
                }
                *last = (when, bytes);
            }
            Progress::Json => {
                let now = Instant::now();
                if when.is_none_or(|w| now.duration_since(w) >= Duration::from_millis(500)) {
                    self.json(bytes);
                    *last = (Some(now), bytes);
                } else {
                    *last = (when, bytes);
                }
            }
            Progress::Quiet => {}
        }
    }

    fn json(&self, bytes: u64) {
        let total = self.total_cell.lock().ok().and_then(|t| *t);
        let line = serde_json::json!({"event": "progress", "file": self.rel, "bytes": bytes, "total": total});
        eprintln!("{line}");
    }

    fn done(&self) {
        match self.progress {
            Progress::Bars { .. } => {
                if let Some(b) = &self.bar {
                    b.finish();
                }
            }
            Progress::Json => {
                let bytes = self.last.lock().map(|l| l.1).unwrap_or(0);
                self.json(bytes);
            }
            Progress::Quiet => {}
        }
    }
}
