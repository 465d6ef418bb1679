//! The model scanner: decides, without executing or importing anything,
//! whether the files of a model may be stored and later loaded.
//!
//! Every file is sniffed by content ([`sniff`]), then judged by the policy
//! for its format: safetensors is validated strictly ([`safetensors`]); JSON
//! and text pass unless a Hugging Face, secret or template rule fires
//! ([`hf`], [`secrets`], [`template`]); pickles go through a non-executing VM
//! judged by an allowlist ([`pickle`]); archives and numpy files are opened
//! as their loaders open them and their members routed by content
//! ([`container`]); GGUF headers are validated strictly and their chat
//! templates checked ([`gguf`]); Keras configs ([`keras`]) and ONNX external
//! data ([`onnx`]) are checked; any unrecognised binary is refused.
//! Deny by default: what cannot be shown safe is unsafe.

pub mod container;
pub mod gguf;
pub mod hf;
pub mod keras;
pub mod onnx;
pub mod pickle;
pub mod report;
pub mod safetensors;
pub mod sarif;
pub mod secrets;
pub mod sniff;
pub mod template;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

pub use report::{FileReport, Finding, Report, Severity, Verdict};
pub use sniff::Format;

/// Stable rule ids owned by this module (format policy and file system).
pub mod rule {
    pub const FORMAT_NOT_ALLOWED: &str = "format.not-allowed";
    pub const IO_READ: &str = "io.read";
    pub const SYMLINK: &str = "fs.symlink";
    pub const NOT_REGULAR: &str = "fs.not-regular";
}

/// Scan files or folders (folders recursively, in sorted path order, NOT
/// following symlinks: a symlink is itself a finding `fs.symlink`).
///
/// Each [`FileReport::path`] is relative to the folder argument when a folder
/// is given (`model.safetensors`, `sub/x.py`), or the path as given for a
/// file argument. Files are scanned on all cores; the report order does not
/// depend on it.
pub fn scan_paths(paths: &[PathBuf]) -> Report {
    let mut jobs = Vec::new();
    for path in paths {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                let mut found = Vec::new();
                walk(path, &mut found);
                found.sort_by(|a, b| a.0.cmp(&b.0));
                jobs.extend(found.into_iter().map(|(_, job)| job));
            }
            Ok(_) => jobs.push(Job::Scan {
                path: path.clone(),
                rel: path.display().to_string(),
            }),
            Err(e) => jobs.push(Job::Failed {
                rel: path.display().to_string(),
                error: e,
            }),
        }
    }
    let mut files = run_jobs(jobs);
    allow_onnx_external_data(&mut files);
    Report::from_files(files)
}

/// The folder-level pass for ONNX external data: a file that a clean ONNX
/// model in the same scan names as external data is raw tensor bytes that
/// onnx reads with `numpy.frombuffer`, never code, so it is allowed even
/// though its bytes have no recognisable format. Nothing else is: the file
/// must have been refused *only* for being unrecognised binary, and the
/// location must have passed the model's own path checks.
fn allow_onnx_external_data(files: &mut [FileReport]) {
    let mut referenced = std::collections::HashSet::new();
    for file in files.iter() {
        if file.format != Format::Onnx || file.verdict != Verdict::Clean {
            continue;
        }
        let dir = file.path.rsplit_once('/').map_or("", |(d, _)| d);
        for loc in &file.external_data {
            let loc = loc.trim_start_matches("./");
            referenced.insert((
                if dir.is_empty() {
                    loc.to_owned()
                } else {
                    format!("{dir}/{loc}")
                },
                file.path.clone(),
            ));
        }
    }
    if referenced.is_empty() {
        return;
    }
    for file in files.iter_mut() {
        let only_unrecognised = file.format == Format::Unknown
            && !file.findings.is_empty()
            && file.findings.iter().all(|f| f.rule == rule::FORMAT_NOT_ALLOWED);
        if !only_unrecognised {
            continue;
        }
        if let Some((_, model)) = referenced.iter().find(|(rel, _)| *rel == file.path) {
            *file = FileReport::new(
                file.path.clone(),
                Format::Unknown,
                vec![Finding::new(
                    onnx::rule::EXTERNAL_FILE,
                    Severity::Low,
                    format!(
                        "raw tensor bytes that the ONNX model {} loads as external data; onnx \
                         reads them as numbers, never as code",
                        report::quote(model)
                    ),
                    "",
                )],
            );
        }
    }
}

/// Scan one file; `rel` is the name used in the report and for name-based
/// rules. Never panics: I/O errors become a report with verdict `error`.
pub fn scan_file(path: &Path, rel: &str) -> FileReport {
    let mut findings = hf::check_name(rel);

    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => return io_failure(rel, Format::Unknown, findings, "stat", &e),
    };
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        let target = fs::read_link(path)
            .map(|t| format!(" to {}", report::quote(&t.display().to_string())))
            .unwrap_or_default();
        findings.push(Finding::new(
            rule::SYMLINK,
            Severity::High,
            format!(
                "symbolic link{target}: moat does not follow links out of a model folder; \
                 replace it with the file itself"
            ),
            "",
        ));
        return FileReport::new(rel, Format::Unknown, findings);
    }
    if file_type.is_dir() {
        findings.push(Finding::new(
            rule::IO_READ,
            Severity::High,
            "is a directory; scan it as a folder",
            "",
        ));
        return FileReport::failed(rel, Format::Unknown, findings);
    }
    if !file_type.is_file() {
        // Opening a FIFO would block, and a device or socket is never part of
        // a model, so these are refused without being opened.
        findings.push(Finding::new(
            rule::NOT_REGULAR,
            Severity::High,
            "not a regular file (device, FIFO or socket); a model folder holds only files",
            "",
        ));
        return FileReport::new(rel, Format::Unknown, findings);
    }

    // The name is only a hint in one direction: a file that claims to be
    // safetensors is held to that claim, whatever its bytes look like.
    let claims_safetensors = rel.to_ascii_lowercase().ends_with(".safetensors");
    let mut external_data = Vec::new();
    let (mut format, content) = if claims_safetensors {
        (Format::Safetensors, None)
    } else {
        let sniffed = File::open(path).and_then(|mut f| sniff::sniff_reader(&mut f));
        match sniffed {
            Ok(s) => (s.format, s.content),
            Err(e) => return io_failure(rel, Format::Unknown, findings, "read", &e),
        }
    };

    match format {
        Format::Safetensors => {
            if let Err(violations) = safetensors::check_file(path) {
                let failed = violations.iter().any(|v| v.rule == safetensors::rule::IO_READ);
                findings.extend(violations.into_iter().map(|v| {
                    let severity = if v.rule == safetensors::rule::IO_READ {
                        Severity::High
                    } else {
                        Severity::Critical
                    };
                    Finding::new(v.rule, severity, v.message, v.location)
                }));
                if failed {
                    return FileReport::failed(rel, format, findings);
                }
            }
        }
        Format::Json | Format::Text => {
            // Oversized text (content None) is not searched for secrets.
            if let Some(content) = &content {
                findings.extend(secrets::scan_text(content));
            }
            if hf::is_template_file(rel) {
                findings.extend(hf::check_template_file(content.as_deref()));
            }
        }
        Format::Gguf => match gguf::check_file(path) {
            Ok(found) => findings.extend(found),
            Err(found) => {
                findings.extend(found);
                return FileReport::failed(rel, format, findings);
            }
        },
        Format::Onnx => match onnx::check_file_with_references(path) {
            Ok((found, references)) => {
                findings.extend(found);
                external_data = references;
            }
            Err(onnx::NotOnnx::Io(e)) => return io_failure(rel, format, findings, "read", &e),
            Err(not_onnx) => {
                // It only looked like ONNX: judge it as the binary it is.
                format = Format::Unknown;
                findings.push(Finding::new(
                    rule::FORMAT_NOT_ALLOWED,
                    Severity::High,
                    format!(
                        "{} (it is not a well-formed ONNX model: {not_onnx})",
                        not_allowed_message(format)
                    ),
                    "",
                ));
            }
        },
        Format::Hdf5 => match keras::check_hdf5_file(path) {
            Ok(found) => findings.extend(found),
            Err(found) => {
                findings.extend(found);
                return FileReport::failed(rel, format, findings);
            }
        },
        Format::Pickle
        | Format::Zip
        | Format::Gzip
        | Format::Numpy
        | Format::Tar
        | Format::Zlib
        | Format::SevenZip
        | Format::TorchLegacy => match container::scan_path(path, format) {
            Ok(found) => findings.extend(found),
            Err(e) => return io_failure(rel, format, findings, "read", &e),
        },
        Format::Unknown => {
            findings.push(Finding::new(
                rule::FORMAT_NOT_ALLOWED,
                Severity::High,
                not_allowed_message(format),
                "",
            ));
        }
    }

    if hf::is_config_file(rel) {
        match (&content, format) {
            // Text or unknown without content: too large to have been read.
            (Some(_), _) | (None, Format::Text | Format::Unknown) => {
                findings.extend(hf::check_config(rel, content.as_deref()));
            }
            (None, _) => findings.push(hf::config_not_json(rel, format)),
        }
    }
    let mut report = FileReport::new(rel, format, findings);
    report.external_data = external_data;
    report
}

fn not_allowed_message(format: Format) -> String {
    format!(
        "{} data cannot be proven safe, so it is refused; convert the weights to safetensors or \
         exclude the file",
        if format == Format::Unknown {
            "unrecognised binary"
        } else {
            format.as_str()
        }
    )
}

fn io_failure(
    rel: &str,
    format: Format,
    mut findings: Vec<Finding>,
    what: &str,
    error: &io::Error,
) -> FileReport {
    findings.push(Finding::new(
        rule::IO_READ,
        Severity::High,
        format!("cannot {what} the file: {error}"),
        "",
    ));
    FileReport::failed(rel, format, findings)
}

/// One unit of work for [`run_jobs`].
#[derive(Debug)]
enum Job {
    Scan { path: PathBuf, rel: String },
    Failed { rel: String, error: io::Error },
}

impl Job {
    fn rel(&self) -> &str {
        match self {
            Job::Scan { rel, .. } | Job::Failed { rel, .. } => rel,
        }
    }

    fn run(self) -> FileReport {
        match self {
            Job::Scan { path, rel } => scan_file(&path, &rel),
            Job::Failed { rel, error } => io_failure(&rel, Format::Unknown, Vec::new(), "read", &error),
        }
    }
}

/// Collects everything under `root` as (relative path, job), without
/// following symlinks. An explicit stack keeps deep trees off the call stack.
fn walk(root: &Path, out: &mut Vec<(String, Job)>) {
    let mut pending: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) => {
                let rel = if prefix.is_empty() { ".".to_owned() } else { prefix };
                out.push((rel.clone(), Job::Failed { rel, error }));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    let rel = if prefix.is_empty() {
                        ".".to_owned()
                    } else {
                        prefix.clone()
                    };
                    out.push((rel.clone(), Job::Failed { rel, error }));
                    continue;
                }
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = entry.path();
            // DirEntry::file_type does not follow symlinks.
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push((path, rel)),
                Ok(_) => out.push((rel.clone(), Job::Scan { path, rel })),
                Err(error) => out.push((rel.clone(), Job::Failed { rel, error })),
            }
        }
    }
}

/// Runs the jobs on all cores and returns their reports in job order.
fn run_jobs(jobs: Vec<Job>) -> Vec<FileReport> {
    use std::sync::Mutex;

    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(jobs.len());
    if workers <= 1 {
        return jobs.into_iter().map(Job::run).collect();
    }
    let names: Vec<String> = jobs.iter().map(|j| j.rel().to_owned()).collect();
    let queue = Mutex::new(jobs.into_iter().enumerate());
    let mut slots: Vec<Option<FileReport>> = names.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        // The lock is held only to take the next job.
                        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let Some((i, job)) = next else { break };
                        mine.push((i, job.run()));
                    }
                    mine
                })
            })
            .collect();
        for handle in handles {
            for (i, report) in handle.join().unwrap_or_default() {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = Some(report);
                }
            }
        }
    });
    // A file whose scan did not finish must never be reported as missing
    // (which would read as "nothing wrong"): it is an error.
    slots
        .into_iter()
        .zip(names)
        .map(|(slot, rel)| {
            slot.unwrap_or_else(|| {
                FileReport::failed(
                    rel,
                    Format::Unknown,
                    vec![Finding::new(
                        rule::IO_READ,
                        Severity::High,
                        "internal error: the scan of this file did not complete",
                        "",
                    )],
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
