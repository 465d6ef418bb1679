//! `moat models gc`: delete what no version needs.
//!
//! - blobs whose only link is the blob itself (no version folder, and no
//!   live quarantine folder, links the inode);
//! - quarantine folders no live pull holds (dead PID, or a free `.lock`);
//! - `trash/` (deletions a crash interrupted) and temp files of dead
//!   processes (`current.tmp.PID`, `HEX.tmp.PID`);
//! - `locks/NAME.lock` of models that no longer exist (not reported).
//!
//! gc holds the store lock exclusively: promotion (which decides "this blob
//! exists, link it" and then links) and removal hold it shared, so the link
//! counts gc reads cannot change under it. The plan (what to delete, bytes
//! freed) is computed before anything is deleted, so `--dry-run` reports
//! exactly what a real run would do: an inode is freed when every one of its
//! links is among the entries to delete.

use super::fsops::{FileLock, LockMode, process_alive};
use super::quarantine::{InUse, in_use};
use super::{LOCKS_DIR, MODELS_DIR, QUARANTINE_DIR, Store, StoreError, TRASH_DIR, io_at};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What gc removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Unreferenced blobs: (sha256, size).
    pub blobs: Vec<(String, u64)>,
    /// Quarantine folders of dead or finished pulls.
    pub quarantine: Vec<PathBuf>,
    /// Quarantine folders kept because a live pull holds them.
    pub quarantine_in_use: usize,
    /// Leftovers of interrupted deletions and temp files.
    pub trash: Vec<PathBuf>,
    /// Bytes of file data released (inodes whose every link was removed).
    pub freed_bytes: u64,
    pub dry_run: bool,
}

/// Per inode: how many of its links the plan removes, its link count, size.
#[derive(Default)]
struct Inodes(BTreeMap<(u64, u64), (u64, u64, u64)>);

impl Inodes {
    fn add(&mut self, meta: &fs::Metadata) {
        let e = self
            .0
            .entry((meta.dev(), meta.ino()))
            .or_insert((0, meta.nlink(), meta.len()));
        e.0 += 1;
    }

    fn removed_links(&self, meta: &fs::Metadata) -> u64 {
        self.0.get(&(meta.dev(), meta.ino())).map_or(0, |e| e.0)
    }

    /// Count every file below `dir` (not following symlinks).
    fn add_tree(&mut self, dir: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            self.add(&meta);
            return Ok(());
        }
        for e in fs::read_dir(dir)? {
            self.add_tree(&e?.path())?;
        }
        Ok(())
    }

    fn freed_bytes(&self) -> u64 {
        self.0
            .values()
            .filter(|(removed, nlink, _)| removed >= nlink)
            .map(|(_, _, size)| size)
            .sum()
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A `*.tmp.PID` file left by a process that is gone.
fn dead_temp(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    match (parts.next(), parts.next()) {
        (Some(pid), Some("tmp")) => pid.parse::<u32>().is_ok_and(|p| !process_alive(p)),
        _ => false,
    }
}

fn read_dir_paths(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .map_err(io_at(dir))?;
    out.sort();
    Ok(out)
}

fn remove_entry(path: &Path) -> Result<(), StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(path)(e)),
    };
    let r = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(path)(e)),
        _ => Ok(()),
    }
}

impl Store {
    /// Delete `locks/NAME.lock` of models that no longer exist. Safe only
    /// under the exclusive store lock: every model lock is taken while
    /// holding the store lock shared, so no one holds or is opening one.
    fn remove_unused_model_locks(&self) -> Result<(), StoreError> {
        let models = self.root.join(MODELS_DIR);
        for path in read_dir_paths(&self.root.join(LOCKS_DIR))? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(model) = name.strip_suffix(".lock")
                && !model.is_empty()
                && !models.join(model).exists()
            {
                remove_entry(&path)?;
            }
        }
        Ok(())
    }

    /// Remove unreferenced blobs, abandoned quarantine folders and trash;
    /// with `dry_run`, only report them.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, StoreError> {
        let _store_lock = self.lock_store(LockMode::Exclusive)?;
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let mut inodes = Inodes::default();
        // Held until the deletions are done, so no resumable pull starts
        // using a folder we are deleting.
        let mut held: Vec<FileLock> = Vec::new();

        report.trash = read_dir_paths(&self.root.join(TRASH_DIR))?;
        for dir in read_dir_paths(&self.root.join(QUARANTINE_DIR))? {
            match in_use(&dir).map_err(io_at(&dir))? {
                InUse::Yes => report.quarantine_in_use += 1,
                InUse::No(lock) => {
                    held.extend(lock);
                    report.quarantine.push(dir);
                }
            }
        }
        let models = self.root.join(MODELS_DIR);
        for model in read_dir_paths(&models)? {
            if !model.is_dir() {
                continue;
            }
            for entry in read_dir_paths(&model)? {
                let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
                if name.as_deref().is_some_and(dead_temp) {
                    report.trash.push(entry);
                }
            }
        }
        for path in report.trash.iter().chain(&report.quarantine) {
            inodes.add_tree(path).map_err(io_at(path))?;
        }

        let blob_dir = self.blob_dir();
        let mut orphan_blobs = BTreeSet::new();
        for path in read_dir_paths(&blob_dir)? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let meta = fs::symlink_metadata(&path).map_err(io_at(&path))?;
            let digest = name.strip_suffix(super::ENCRYPTED_SUFFIX).unwrap_or(&name);
            if is_sha256_hex(digest) && meta.is_file() {
                // Links that remain once the planned removals are done.
                if meta.nlink().saturating_sub(inodes.removed_links(&meta)) <= 1 {
                    inodes.add(&meta);
                    report.blobs.push((name, meta.len()));
                    orphan_blobs.insert(path);
                }
            } else if dead_temp(&name) {
                inodes.add(&meta);
                report.trash.push(path);
            }
        }
        report.freed_bytes = inodes.freed_bytes();
        if dry_run {
            return Ok(report);
        }
        for path in report.trash.iter().chain(&report.quarantine).chain(&orphan_blobs) {
            remove_entry(path)?;
        }
        drop(held);
        self.remove_unused_model_locks()?;
        if !orphan_blobs.is_empty() {
            super::fsync_dir(&blob_dir).map_err(io_at(&blob_dir))?;
        }
        Ok(report)
    }
}
