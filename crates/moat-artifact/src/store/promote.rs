//! Promotion: a complete quarantine folder (`moat.lock` + `files/`) becomes
//! a version of a model.
//!
//! Order of the steps, and why each crash point is harmless:
//! 1. every quarantined file is sealed (0400, fsynced) and hard-linked into
//!    `blobs/sha256/HEX` unless that blob exists (`link` refuses to clobber,
//!    so two pulls of the same bytes both succeed, and a blob is never
//!    visible before its bytes are durable). Crash: orphan blobs, for gc.
//! 2. the version folder is built inside the quarantine folder from hard
//!    links to the blobs and fsynced. Crash: a quarantine leftover.
//! 3. one `rename` makes it visible: `versions/V` with `RENAME_NOREPLACE`
//!    for a model that exists, or the whole `models/NAME` (with `current`)
//!    for a new one, or `RENAME_EXCHANGE` of the whole model with
//!    `replace`. Crash after it: a complete, inactive version.
//! 4. `current` is switched by an atomic rename. Crash: old or new name.
//!
//! The store lock is held shared throughout (gc must not delete a blob that
//! step 1 found and step 2 is about to link) and the model's lock exclusive
//! (two promotions of one model must not race on `current`).

use super::fsops::{LockMode, fsync_dir, remove_tree, rename_exchange, rename_noreplace};
use super::version::version_name;
use super::{
    CURRENT_FILE, ENCRYPTED_MARKER, ENCRYPTED_MARKER_TEXT, FILES_DIR, MODELS_DIR, Store, StoreError,
    VERSIONS_DIR, io_at,
};
use crate::lock::{LOCK_FILE, Lock};
use crate::name::ModelName;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a promotion did to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promoted {
    /// A new model, with this as its only version.
    New,
    /// A new version of the same source, now active.
    NewVersion,
    /// This exact version was already stored but not active; it is now.
    Reactivated,
    /// This exact version is already the active one: nothing changed.
    Unchanged,
    /// `replace`: the model (all its versions) was swapped for this one.
    Replaced,
}

/// The outcome of [`Store::promote`].
#[derive(Debug, Clone)]
pub struct Promotion {
    pub kind: Promoted,
    /// The version folder name (derived from the lock's revision).
    pub version: String,
    /// The version folder (`models/NAME/versions/VERSION`).
    pub dir: PathBuf,
}

/// Scratch names inside the quarantine folder being promoted.
const STAGE_VERSION: &str = ".stage-version";
const STAGE_MODEL: &str = ".stage-model";

/// What is stored under the name being promoted.
enum Existing {
    Absent,
    /// The model's source (from its active version's lock) and that
    /// version's name and revision.
    Present {
        active: String,
        source: String,
        revision: String,
    },
}

/// The two locks as they compare for "the same version".
fn same_version(a: &Lock, b: &Lock) -> bool {
    a.revision == b.revision && a.files == b.files && a.signature == b.signature
}

impl Store {
    /// Make the complete quarantine folder `quarantine` (its `moat.lock`
    /// and the `files/` that lock lists) a version of `name`, consuming the
    /// folder on success. A different source under an existing name is
    /// refused unless `replace`, which swaps the whole model atomically.
    /// On error the quarantine folder is left for the caller to remove.
    pub fn promote(
        &self,
        quarantine: &Path,
        name: &ModelName,
        replace: bool,
    ) -> Result<Promotion, StoreError> {
        let lock_path = quarantine.join(LOCK_FILE);
        let lock = Lock::read(&lock_path)?;
        if lock.name != name.as_str() {
            return Err(StoreError::Damaged {
                path: lock_path,
                message: format!("the lock names model {:?}, not {:?}", lock.name, name.as_str()),
            });
        }
        let version = version_name(&lock.revision)?;
        let _store_lock = self.lock_store(LockMode::Shared)?;
        let _model_lock = self.lock_model(name)?;
        let model_root = self.model_root(name);
        let dir = self.version_dir(name, &version);

        let existing = self.existing(name)?;
        let kind = match &existing {
            Existing::Absent => Promoted::New,
            Existing::Present { source, .. } if *source != lock.source => {
                if !replace {
                    return Err(self.different_source(name, &existing, &lock));
                }
                Promoted::Replaced
            }
            Existing::Present { active, .. } => {
                let stored_lock = dir.join(LOCK_FILE);
                match Lock::read(&stored_lock) {
                    Ok(stored) if same_version(&stored, &lock) => {
                        let kind = if *active == version {
                            Promoted::Unchanged
                        } else {
                            self.write_current(&model_root, &version)?;
                            Promoted::Reactivated
                        };
                        remove_tree(quarantine);
                        return Ok(Promotion { kind, version, dir });
                    }
                    Ok(_) => {
                        return Err(StoreError::VersionConflict {
                            name: name.to_string(),
                            version,
                            path: dir,
                        });
                    }
                    Err(_) if dir.exists() => {
                        // A version folder whose lock cannot be read is not
                        // something to overwrite or to call "the same".
                        return Err(StoreError::VersionConflict {
                            name: name.to_string(),
                            version,
                            path: dir,
                        });
                    }
                    Err(_) => Promoted::NewVersion,
                }
            }
        };

        let stage = self.stage_version(quarantine, &lock)?;
        match kind {
            Promoted::NewVersion => {
                rename_noreplace(&stage, &dir).map_err(io_at(&dir))?;
                let versions = model_root.join(VERSIONS_DIR);
                fsync_dir(&versions).map_err(io_at(&versions))?;
                self.write_current(&model_root, &version)?;
            }
            _ => {
                let model_stage = quarantine.join(STAGE_MODEL);
                remove_tree(&model_stage);
                let versions = model_stage.join(VERSIONS_DIR);
                make_dir(&model_stage)?;
                make_dir(&versions)?;
                let staged_version = versions.join(&version);
                fs::rename(&stage, &staged_version).map_err(io_at(&staged_version))?;
                fsync_dir(&versions).map_err(io_at(&versions))?;
                self.write_current(&model_stage, &version)?;
                if kind == Promoted::New {
                    rename_noreplace(&model_stage, &model_root).map_err(io_at(&model_root))?;
                } else {
                    rename_exchange(&model_stage, &model_root).map_err(io_at(&model_root))?;
                }
                let models = self.root.join(MODELS_DIR);
                fsync_dir(&models).map_err(io_at(&models))?;
            }
        }
        // On `Replaced`, the previous model is now inside the quarantine
        // folder: unreachable by name, so this removal may be interrupted.
        remove_tree(quarantine);
        Ok(Promotion { kind, version, dir })
    }

    fn existing(&self, name: &ModelName) -> Result<Existing, StoreError> {
        let model_root = self.model_root(name);
        if !model_root.exists() {
            return Ok(Existing::Absent);
        }
        let active = match self.active_version(name) {
            Ok(v) => v,
            Err(StoreError::NotFound { .. }) => {
                return Err(StoreError::Damaged {
                    path: model_root.join(CURRENT_FILE),
                    message: format!(
                        "missing, so no version is active; remove the model with `moat models rm {name}`"
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        let lock = Lock::read(&self.version_dir(name, &active).join(LOCK_FILE))?;
        Ok(Existing::Present {
            active,
            source: lock.source,
            revision: lock.revision,
        })
    }

    fn different_source(&self, name: &ModelName, existing: &Existing, incoming: &Lock) -> StoreError {
        let (existing_source, existing_revision) = match existing {
            Existing::Present { source, revision, .. } => (source.clone(), revision.clone()),
            Existing::Absent => (String::new(), String::new()),
        };
        StoreError::DifferentSource {
            name: name.to_string(),
            existing_source,
            existing_revision,
            incoming_source: incoming.source.clone(),
        }
    }

    /// Steps 1 and 2: blobs for every file of `lock`, then a complete,
    /// fsynced version folder of hard links to them inside `quarantine`.
    pub(crate) fn stage_version(&self, quarantine: &Path, lock: &Lock) -> Result<PathBuf, StoreError> {
        let files = quarantine.join(FILES_DIR);
        let mut new_blobs = 0usize;
        for f in &lock.files {
            let src = files.join(&f.path);
            let meta = fs::symlink_metadata(&src).map_err(io_at(&src))?;
            if !meta.is_file() || meta.len() != f.size {
                return Err(StoreError::Damaged {
                    path: src,
                    message: format!(
                        "not a regular file of {} bytes as the lock says (found {} bytes)",
                        f.size,
                        meta.len()
                    ),
                });
            }
            let added = match &self.keyring {
                Some(keyring) => self.encrypt_blob(keyring, quarantine, &src, &f.sha256)?,
                None => self.link_blob(&src, &self.blob_path(&f.sha256), f.size)?,
            };
            if added {
                new_blobs += 1;
            }
        }
        if new_blobs > 0 {
            let blobs = self.blob_dir();
            fsync_dir(&blobs).map_err(io_at(&blobs))?;
        }

        let stage = quarantine.join(STAGE_VERSION);
        remove_tree(&stage);
        make_dir(&stage)?;
        let stage_files = stage.join(FILES_DIR);
        make_dir(&stage_files)?;
        for f in &lock.files {
            let dst = stage_files.join(&f.path);
            if let Some(parent) = dst.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(io_at(parent))?;
            }
            let blob = match self.keyring {
                Some(_) => self.encrypted_blob_path(&f.sha256),
                None => self.blob_path(&f.sha256),
            };
            fs::hard_link(&blob, &dst).map_err(io_at(&dst))?;
        }
        if self.keyring.is_some() {
            write_read_only(&stage.join(ENCRYPTED_MARKER), ENCRYPTED_MARKER_TEXT.as_bytes())?;
        }
        let lock_bytes = fs::read(quarantine.join(LOCK_FILE)).map_err(io_at(quarantine))?;
        write_read_only(&stage.join(LOCK_FILE), &lock_bytes)?;
        sync_dirs(&stage).map_err(io_at(&stage))?;
        Ok(stage)
    }

    /// Encrypt `src` into `blobs/sha256/HEX.enc` unless that blob exists;
    /// true when a new blob was added. The ciphertext is written to a
    /// scratch file inside the quarantine folder (0400, fsynced) and then
    /// hard-linked into place, so a blob is never visible half written.
    /// An existing encrypted blob is reused as is: it may be wrapped by an
    /// older KEK, which verification accepts until that KEK is retired.
    fn encrypt_blob(
        &self,
        keyring: &crate::crypto::Keyring,
        quarantine: &Path,
        src: &Path,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        let blob = self.encrypted_blob_path(sha256);
        match fs::symlink_metadata(&blob) {
            Ok(meta) if meta.is_file() => return Ok(false),
            Ok(_) => {
                return Err(StoreError::Damaged {
                    path: blob,
                    message: "not a regular file where an encrypted blob should be".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&blob)(e)),
        }
        let scratch = quarantine.join(format!(".enc-{sha256}"));
        let _ = fs::remove_file(&scratch);
        let input = fs::File::open(src).map_err(io_at(src))?;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&scratch)
            .map_err(io_at(&scratch))?;
        crate::crypto::encrypt_stream(
            keyring,
            io::BufReader::with_capacity(1 << 16, input),
            io::BufWriter::with_capacity(1 << 20, &mut out),
            &crate::crypto::StreamOptions::default(),
        )
        .map_err(|source| StoreError::Encrypt {
            path: src.to_owned(),
            source,
        })?;
        out.sync_all().map_err(io_at(&scratch))?;
        drop(out);
        let added = match fs::hard_link(&scratch, &blob) {
            Ok(()) => true,
            // A concurrent promotion of the same bytes got there first.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_at(&blob)(e)),
        };
        let _ = fs::remove_file(&scratch);
        Ok(added)
    }

    /// Put `src` (complete, `size` bytes) at `blob` unless an intact blob is
    /// there; true when a new blob was added. `link` never replaces, so a
    /// concurrent pull of the same bytes just finds the blob present.
    fn link_blob(&self, src: &Path, blob: &Path, size: u64) -> Result<bool, StoreError> {
        // Seal first: the inode becomes the blob, read-only and durable.
        fs::set_permissions(src, fs::Permissions::from_mode(0o400)).map_err(io_at(src))?;
        fs::File::open(src)
            .and_then(|f| f.sync_all())
            .map_err(io_at(src))?;
        match fs::hard_link(src, blob) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at(blob)(e)),
        }
        let meta = fs::symlink_metadata(blob).map_err(io_at(blob))?;
        if meta.is_file() && meta.len() == size {
            // The pull hashed the new bytes; verify-on-load re-hashes the
            // stored ones, so a same-size corrupt blob is still caught.
            return Ok(false);
        }
        // A damaged blob (wrong size or type): replace it atomically. Versions
        // already linked to the old inode keep it, and fail verification.
        tracing::warn!(blob = %blob.display(), found = meta.len(), expected = size, "replacing a damaged blob");
        if meta.is_dir() {
            return Err(StoreError::Damaged {
                path: blob.to_owned(),
                message: "a folder where a blob should be".into(),
            });
        }
        let tmp = blob.with_extension(format!("tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        fs::hard_link(src, &tmp).map_err(io_at(&tmp))?;
        fs::rename(&tmp, blob).map_err(io_at(blob))?;
        Ok(true)
    }
}

fn make_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new().mode(0o700).create(dir).map_err(io_at(dir))
}

fn write_read_only(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .map_err(io_at(path))?;
    f.write_all(bytes).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

/// fsync `dir` and every folder below it (files are fsynced already).
fn sync_dirs(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_dirs(&e.path())?;
        }
    }
    fsync_dir(dir)
}
