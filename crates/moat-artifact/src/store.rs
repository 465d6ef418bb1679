//! The trusted store. Layout under the store root:
//!
//! ```text
//! models/NAME/moat.lock       the lock the model was promoted with
//! models/NAME/files/...       the model's files, read-only (0400), folders 0700
//! quarantine/NAME.PID.NANOS/  in-flight pulls, never read by serve
//! ```
//!
//! A model appears in `models/` only by one atomic `rename` of a complete,
//! fsynced quarantine folder (`renameat2` with `RENAME_NOREPLACE`, or
//! `RENAME_EXCHANGE` to replace), so a crash at any point leaves either the
//! old model or the new one, never a mix. Leftover quarantine folders of dead
//! processes are removed by the next pull.

use crate::lock::LOCK_FILE;
use crate::name::ModelName;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const MODELS_DIR: &str = "models";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const FILES_DIR: &str = "files";

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// What happened to a name on promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promoted {
    New,
    Replaced,
}

impl Store {
    /// The store root from `--store`, else `$MOAT_HOME`, else
    /// `$HOME/.local/share/moat`. `env` is injected so tests need not touch
    /// the process environment.
    pub fn default_root(flag: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
        if let Some(p) = flag {
            return Some(p.to_owned());
        }
        if let Some(h) = env("MOAT_HOME").filter(|s| !s.is_empty()) {
            return Some(PathBuf::from(h));
        }
        env("HOME")
            .filter(|s| !s.is_empty())
            .map(|h| Path::new(&h).join(".local/share/moat"))
    }

    /// Open (creating if needed, owner-only) the store at `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for dir in [
            root.to_path_buf(),
            root.join(MODELS_DIR),
            root.join(QUARANTINE_DIR),
        ] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_dir(&self, name: &ModelName) -> PathBuf {
        self.root.join(MODELS_DIR).join(name.as_str())
    }

    /// Names of the models in the store, sorted.
    pub fn models(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(self.root.join(MODELS_DIR))? {
            let e = e?;
            if let Ok(n) = e.file_name().into_string()
                && ModelName::parse(&n).is_ok()
                && e.path().join(LOCK_FILE).is_file()
            {
                names.push(n);
            }
        }
        names.sort();
        Ok(names)
    }

    /// A fresh, empty quarantine folder for one pull.
    pub fn new_quarantine(&self, name: &ModelName) -> io::Result<PathBuf> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = self
            .root
            .join(QUARANTINE_DIR)
            .join(format!("{name}.{}.{nanos}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        fs::DirBuilder::new().mode(0o700).create(dir.join(FILES_DIR))?;
        Ok(dir)
    }

    /// Remove quarantine folders whose owning process is gone (a pull killed
    /// mid-way). Folders of live processes are left alone.
    pub fn clean_stale_quarantine(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(QUARANTINE_DIR)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| p == std::process::id() || process_alive(p));
            if !alive {
                remove_tree(&e.path());
            }
        }
    }

    /// Make `quarantine` (complete, with `moat.lock` and `files/`) the model
    /// `name`, atomically. With `replace`, an existing model is swapped out in
    /// the same rename and then deleted; without, an existing name is an error
    /// (`AlreadyExists`).
    pub fn promote(&self, quarantine: &Path, name: &ModelName, replace: bool) -> io::Result<Promoted> {
        seal(quarantine)?;
        let target = self.model_dir(name);
        let models = self.root.join(MODELS_DIR);
        let promoted = match rename_noreplace(quarantine, &target) {
            Ok(()) => Promoted::New,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && replace => {
                rename_exchange(quarantine, &target)?;
                // `quarantine` now holds the previous model; it is no longer
                // reachable by name, so deleting it can be interrupted safely.
                remove_tree(quarantine);
                Promoted::Replaced
            }
            Err(e) => return Err(e),
        };
        fsync_dir(&models)?;
        Ok(promoted)
    }
}

/// Read-only files, owner-only folders, everything fsynced: after this the
/// quarantine folder is exactly what the store will hold.
fn seal(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let ft = entry.file_type()?;
        if ft.is_dir() {
            seal(&path)?;
        } else if ft.is_file() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o400))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
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

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Without /proc we cannot tell; keep the folder rather than delete
        // a live pull's work.
        true
    }
}

#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
}

#[cfg(target_os = "linux")]
fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    if to.exists() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
}

#[cfg(not(target_os = "linux"))]
fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    // Not atomic: a crash between the renames leaves the name absent (never
    // half-written). Linux, the supported platform, swaps atomically.
    let parked = a.with_extension("old");
    fs::rename(b, &parked)?;
    fs::rename(a, b)?;
    fs::rename(&parked, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_root_precedence() {
        let env = |k: &str| match k {
            "MOAT_HOME" => Some("/m".to_string()),
            "HOME" => Some("/h".to_string()),
            _ => None,
        };
        assert_eq!(Store::default_root(Some(Path::new("/f")), env), Some("/f".into()));
        assert_eq!(Store::default_root(None, env), Some("/m".into()));
        let home_only = |k: &str| (k == "HOME").then(|| "/h".to_string());
        assert_eq!(
            Store::default_root(None, home_only),
            Some("/h/.local/share/moat".into())
        );
        assert_eq!(Store::default_root(None, |_| None), None);
    }

    #[test]
    fn promote_is_atomic_and_refuses_to_clobber() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let name = ModelName::parse("m").unwrap();
        let q = store.new_quarantine(&name).unwrap();
        fs::write(q.join(FILES_DIR).join("a"), b"1").unwrap();
        fs::write(q.join(LOCK_FILE), b"x").unwrap();
        assert_eq!(store.promote(&q, &name, false).unwrap(), Promoted::New);
        let file = store.model_dir(&name).join(FILES_DIR).join("a");
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o400);

        let q2 = store.new_quarantine(&name).unwrap();
        fs::write(q2.join(FILES_DIR).join("a"), b"2").unwrap();
        let err = store.promote(&q2, &name, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&file).unwrap(), b"1");
        assert_eq!(store.promote(&q2, &name, true).unwrap(), Promoted::Replaced);
        assert_eq!(fs::read(&file).unwrap(), b"2");
        assert!(!q2.exists());
    }
}
