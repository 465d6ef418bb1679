//! The trusted store: content-addressed blobs shared by every model and
//! version, and per-model version folders made of hard links to them.
//!
//! ```text
//! store.lock                         flock: shared by promote/rm, exclusive by gc
//! blobs/sha256/<64 hex>              file bytes, stored once (0400, fsynced)
//! models/NAME/current                the active version's name (atomic replace)
//! models/NAME/versions/V/moat.lock   the lock version V was promoted with
//! models/NAME/versions/V/files/...   hard links to blobs: an ordinary model folder
//! models/NAME/versions/V/moat.enc    present when the files are encrypted objects
//! blobs/sha256/<64 hex>.enc          encrypted blobs (`[store] encrypt`), 0400
//! locks/NAME.lock                    flock: serialises changes to one model
//! quarantine/NAME.PID.NANOS/         in-flight pulls (NAME.r-HEX/: resumable ones)
//! trash/...                          versions and models being deleted
//! ```
//!
//! Readers (`serve`, `verify`, `models list|show`) take no lock: every
//! visible change is one atomic rename of a complete, fsynced folder or of
//! `current`, so they only ever see whole versions and a `current` naming
//! one. A crash leaves at worst unreferenced blobs, quarantine and trash
//! folders, which `gc` removes. See `docs/operations.md` ("The store").
//!
//! With a keyring ([`Store::with_keyring`]) promotion stores every file as
//! a chunked AES-256-GCM object (see [`crate::crypto`]) in `HEX.enc`, still
//! named by the SHA-256 of the *plaintext*, so the lock and content
//! addressing do not change; the version folder then links to those blobs
//! and carries a `moat.enc` marker, and verification decrypts while hashing
//! ([`crate::verify::verify_dir_with`]). A plain and an encrypted blob of
//! the same bytes are different files, so the two forms never mix in one
//! version folder.

mod fsops;
mod gc;
mod inspect;
mod promote;
mod quarantine;
mod remove;
mod rewrap;
pub mod version;

#[cfg(test)]
mod tests;

pub use fsops::{FileLock, fsync_dir, remove_tree};
pub use gc::GcReport;
pub use inspect::{ModelInfo, VersionInfo};
pub use promote::{Promoted, Promotion};
pub use remove::Removed;
pub use rewrap::RewrapReport;

use crate::lock::LockError;
use crate::name::ModelName;
use fsops::{LockMode, lock_file};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use version::{InvalidRevision, check_version_name};

pub const MODELS_DIR: &str = "models";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const FILES_DIR: &str = "files";
pub const BLOBS_DIR: &str = "blobs";
pub const VERSIONS_DIR: &str = "versions";
pub const CURRENT_FILE: &str = "current";
/// Marker in a version folder whose files are encrypted objects.
pub const ENCRYPTED_MARKER: &str = "moat.enc";
/// What the marker holds (a format name, so a later format can be told apart).
pub(crate) const ENCRYPTED_MARKER_TEXT: &str = "moat-enc v1\n";
/// Suffix of encrypted blob names.
pub(crate) const ENCRYPTED_SUFFIX: &str = ".enc";
const TRASH_DIR: &str = "trash";
const LOCKS_DIR: &str = "locks";
const STORE_LOCK: &str = "store.lock";
/// The one digest algorithm blobs are addressed by (a folder, so another
/// can be added beside it).
const SHA256_DIR: &str = "sha256";

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Set: promotion encrypts new blobs under this keyring's current KEK.
    keyring: Option<std::sync::Arc<crate::crypto::Keyring>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no model named {name:?} in {store}")]
    NotFound { name: String, store: PathBuf },
    #[error("model {name:?} has no version {version:?} (see `moat models show {name}`)")]
    VersionNotFound { name: String, version: String },
    #[error("model {name:?}: {selector:?} matches several versions ({}); give more of it", .matches.join(", "))]
    AmbiguousVersion {
        name: String,
        selector: String,
        matches: Vec<String>,
    },
    #[error(
        "model {name:?} comes from {existing_source} (revision {existing_revision}), not from {incoming_source}; pass --replace to swap it"
    )]
    DifferentSource {
        name: String,
        existing_source: String,
        existing_revision: String,
        incoming_source: String,
    },
    #[error(
        "{path}: version {version:?} already exists with a different lock (revision, files or signature differ); remove it first with `moat models rm {name}@{version} --force`"
    )]
    VersionConflict {
        name: String,
        version: String,
        path: PathBuf,
    },
    #[error(
        "version {version:?} is the active version of {name:?}; pass --force to remove it (the newest remaining version becomes active)"
    )]
    ActiveVersion { name: String, version: String },
    #[error(transparent)]
    Revision(#[from] InvalidRevision),
    #[error("{path}: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("encrypting {path}: {source}")]
    Encrypt {
        path: PathBuf,
        source: crate::crypto::CryptoError,
    },
}

impl StoreError {
    /// The model or version asked for does not exist (exit 1, not 2).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound { .. } | StoreError::VersionNotFound { .. }
        )
    }
}

/// `map_err` helper naming the path an I/O error happened on.
pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
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
        let store = Self {
            root: root.to_owned(),
            keyring: None,
        };
        for dir in [
            root.to_path_buf(),
            root.join(MODELS_DIR),
            root.join(QUARANTINE_DIR),
            store.blob_dir(),
            root.join(TRASH_DIR),
            root.join(LOCKS_DIR),
        ] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Encrypt blobs of future promotions under `keyring`'s current KEK
    /// (`[store] encrypt = true`). Versions already stored keep their form.
    pub fn with_keyring(mut self, keyring: crate::crypto::Keyring) -> Self {
        self.keyring = Some(std::sync::Arc::new(keyring));
        self
    }

    /// Whether promotions encrypt (a keyring was given).
    pub fn encrypts(&self) -> bool {
        self.keyring.is_some()
    }

    /// `models/NAME`: the model's versions and `current`.
    pub fn model_root(&self, name: &ModelName) -> PathBuf {
        self.root.join(MODELS_DIR).join(name.as_str())
    }

    /// `models/NAME/versions/VERSION` (`version` must be checked already).
    pub fn version_dir(&self, name: &ModelName, version: &str) -> PathBuf {
        self.model_root(name).join(VERSIONS_DIR).join(version)
    }

    /// The folder of the active version of `name` (an ordinary model folder:
    /// `moat.lock` and `files/`), as named by `models/NAME/current`.
    pub fn model_dir(&self, name: &ModelName) -> Result<PathBuf, StoreError> {
        let version = self.active_version(name)?;
        let dir = self.version_dir(name, &version);
        if !dir.is_dir() {
            return Err(StoreError::Damaged {
                path: self.model_root(name).join(CURRENT_FILE),
                message: format!("names version {version:?}, which is not in versions/"),
            });
        }
        Ok(dir)
    }

    /// The name of the active version of `name`, from `current`.
    pub fn active_version(&self, name: &ModelName) -> Result<String, StoreError> {
        let path = self.model_root(name).join(CURRENT_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    name: name.to_string(),
                    store: self.root.clone(),
                });
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let version = text.trim_end_matches('\n');
        // `current` is read back from disk: it must never steer a path.
        check_version_name(version).map_err(|e| StoreError::Damaged {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(version.to_owned())
    }

    /// Make the stored `version` of `name` the active one (`current` is
    /// replaced atomically under the model's lock); the other versions stay
    /// for rollback. The management API's `PUT /models/{name}` uses it.
    pub fn set_active(&self, name: &ModelName, version: &str) -> Result<(), StoreError> {
        let not_found = || StoreError::VersionNotFound {
            name: name.to_string(),
            version: version.to_owned(),
        };
        check_version_name(version).map_err(|_| not_found())?;
        let _model_lock = self.lock_model(name)?;
        if !self.version_dir(name, version).is_dir() {
            return Err(not_found());
        }
        self.write_current(&self.model_root(name), version)
    }

    /// Names of the models in the store (those with a `current`), sorted.
    pub fn models(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(self.root.join(MODELS_DIR))? {
            let e = e?;
            if let Ok(n) = e.file_name().into_string()
                && ModelName::parse(&n).is_ok()
                && e.path().join(CURRENT_FILE).is_file()
            {
                names.push(n);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Point `current` at `version`: a fsynced temp file renamed over it,
    /// then the folder fsynced, so a crash leaves the old or the new name.
    fn write_current(&self, model_root: &Path, version: &str) -> Result<(), StoreError> {
        let path = model_root.join(CURRENT_FILE);
        moat_fs::write_atomic(&path, format!("{version}\n").as_bytes()).map_err(io_at(&path))
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join(BLOBS_DIR).join(SHA256_DIR)
    }

    /// `blobs/sha256/HEX` (`sha256` must be 64 lower-case hex digits, as
    /// [`crate::Lock::parse`] guarantees).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blob_dir().join(sha256)
    }

    /// `blobs/sha256/HEX.enc`: the encrypted blob of the plaintext `sha256`.
    pub fn encrypted_blob_path(&self, sha256: &str) -> PathBuf {
        self.blob_dir().join(format!("{sha256}{ENCRYPTED_SUFFIX}"))
    }

    fn trash_path(&self, what: &str) -> PathBuf {
        self.root.join(TRASH_DIR).join(fsops::scratch_name(what))
    }

    /// Promotion and removal hold this shared; gc holds it exclusive, so it
    /// never sees a blob between "exists, will link it" and "linked".
    fn lock_store(&self, mode: LockMode) -> Result<FileLock, StoreError> {
        let path = self.root.join(STORE_LOCK);
        lock_file(&path, mode).map_err(io_at(&path))
    }

    /// Serialises changes (promote, rm) to one model's versions and `current`.
    fn lock_model(&self, name: &ModelName) -> Result<FileLock, StoreError> {
        let path = self.root.join(LOCKS_DIR).join(format!("{name}.lock"));
        lock_file(&path, LockMode::Exclusive).map_err(io_at(&path))
    }
}
