//! The few file-system operations the store's crash safety rests on: atomic
//! renames that refuse to clobber (`RENAME_NOREPLACE`) or swap two names
//! (`RENAME_EXCHANGE`), folder fsyncs (a rename is durable only once its
//! folder is), advisory `flock`s, and removal of read-only trees. Kept in one
//! place so every step of promotion, removal and gc uses the same primitives.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// fsync a folder, making renames and links inside it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Best-effort recursive removal of a folder whose files may be read-only.
pub fn remove_tree(dir: &Path) {
    // Files are 0400 but removal needs only write permission on the folder.
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %dir.display(), error = %e, "could not remove folder");
    }
}

/// An advisory `flock`, released when dropped (or when the process dies,
/// which is what makes it safe against `kill -9`).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// How to take a [`FileLock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Take `mode` on `path` (created 0600 if missing), waiting for it.
pub fn lock_file(path: &Path, mode: LockMode) -> io::Result<FileLock> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let op = match mode {
        LockMode::Shared => rustix::fs::FlockOperation::LockShared,
        LockMode::Exclusive => rustix::fs::FlockOperation::LockExclusive,
    };
    rustix::fs::flock(&file, op)?;
    Ok(FileLock { _file: file })
}

/// Try to take an exclusive lock on an existing `path` without waiting:
/// `Ok(None)` when another process holds it.
pub fn try_lock_existing(path: &Path) -> io::Result<Option<FileLock>> {
    let file = OpenOptions::new().read(true).open(path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(FileLock { _file: file })),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(target_os = "linux")]
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
}

#[cfg(target_os = "linux")]
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    if to.exists() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
}

#[cfg(not(target_os = "linux"))]
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    // Not atomic: a crash between the renames leaves the name absent (never
    // half-written). Linux, the supported platform, swaps atomically.
    let parked = a.with_extension("old");
    fs::rename(b, &parked)?;
    fs::rename(a, b)?;
    fs::rename(&parked, a)
}

/// A name for a scratch entry that no other process will pick:
/// `PREFIX.PID.NANOS`. The PID lets cleanup tell a dead writer's leftovers
/// from a live one's.
pub fn scratch_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}.{}.{nanos}", std::process::id())
}

/// Whether process `pid` is alive. Without `/proc` we cannot tell, and
/// answer "alive" so that a live writer's work is never deleted.
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}
