//! Quarantine folders: where pulls write before promotion, never read by
//! `serve`. Two kinds exist, told apart by name:
//!
//! - `NAME.PID.NANOS/`: one pull's folder; it belongs to the live process
//!   `PID`, and is garbage once that process is gone.
//! - `NAME.r-HEX/`: a resumable download's folder. It outlives the process
//!   on purpose (the next pull resumes from it); its owner holds a `flock`
//!   on `.lock` inside it while working. The automatic cleanup run by each
//!   pull never touches these; only `moat models gc` removes them, and only
//!   when no one holds the lock.

use super::fsops::{FileLock, process_alive, remove_tree, scratch_name, try_lock_existing};
use super::{FILES_DIR, QUARANTINE_DIR, Store};
use crate::name::ModelName;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The lock file a resumable quarantine folder's owner holds.
pub const RESUMABLE_LOCK: &str = ".lock";

/// What a quarantine folder's name says about its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// `NAME.PID.NANOS`.
    Process(u32),
    /// `NAME.r-HEX`.
    Resumable,
    /// Anything else (not written by this version of moat).
    Unknown,
}

pub(crate) fn owner_of(folder_name: &str) -> Owner {
    let mut parts = folder_name.rsplit('.');
    let last = parts.next().unwrap_or_default();
    if last.starts_with("r-") && last.len() > 2 {
        return Owner::Resumable;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match parts.next() {
        Some(pid) if digits(last) && digits(pid) => pid.parse().map_or(Owner::Unknown, Owner::Process),
        _ => Owner::Unknown,
    }
}

/// Whether the quarantine folder `dir` is still in use. For a resumable
/// folder whose lock is free, the lock is returned so the caller can remove
/// the folder while holding it.
pub(crate) enum InUse {
    Yes,
    No(Option<FileLock>),
}

pub(crate) fn in_use(dir: &Path) -> io::Result<InUse> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A lock file decides for every kind of folder that has one.
    match try_lock_existing(&dir.join(RESUMABLE_LOCK)) {
        Ok(Some(lock)) => return Ok(InUse::No(Some(lock))),
        Ok(None) => return Ok(InUse::Yes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(match owner_of(&name) {
        Owner::Process(pid) if process_alive(pid) => InUse::Yes,
        // A resumable folder without its lock file is being created right now
        // (the owner makes the folder, then the lock): leave it.
        Owner::Resumable => InUse::Yes,
        Owner::Process(_) | Owner::Unknown => InUse::No(None),
    })
}

impl Store {
    /// A fresh, empty quarantine folder (`NAME.PID.NANOS/` with `files/`)
    /// for one pull.
    pub fn new_quarantine(&self, name: &ModelName) -> io::Result<PathBuf> {
        let dir = self.root.join(QUARANTINE_DIR).join(scratch_name(name.as_str()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        fs::DirBuilder::new().mode(0o700).create(dir.join(FILES_DIR))?;
        Ok(dir)
    }

    /// Remove `NAME.PID.NANOS` quarantine folders whose process is gone (a
    /// pull killed mid-way). Folders of live processes, resumable `.r-`
    /// folders (kept for the next pull to resume) and unknown names are left
    /// alone; `moat models gc` handles those.
    pub fn clean_stale_quarantine(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(QUARANTINE_DIR)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Owner::Process(pid) = owner_of(&name)
                && !process_alive(pid)
            {
                remove_tree(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_say_who_owns_them() {
        assert_eq!(owner_of("demo.123.456"), Owner::Process(123));
        assert_eq!(owner_of("r1-distill-qwen-1.5b.42.9"), Owner::Process(42));
        assert_eq!(owner_of("demo.r-00ff"), Owner::Resumable);
        assert_eq!(owner_of("x.r-1.r-abc"), Owner::Resumable);
        assert_eq!(owner_of("demo.r-"), Owner::Unknown);
        assert_eq!(owner_of("demo"), Owner::Unknown);
        assert_eq!(owner_of("demo.x.1"), Owner::Unknown);
    }
}
