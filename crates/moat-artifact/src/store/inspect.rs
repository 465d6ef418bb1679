//! Reading the store for `moat models list|show`: each model's versions,
//! their locks, which one is active. Lock-free: versions appear and vanish
//! only by atomic renames, so a version seen here is complete; one removed
//! while we read is simply skipped.

use super::version::check_version_name;
use super::{Store, StoreError, VERSIONS_DIR, io_at};
use crate::lock::{LOCK_FILE, Lock};
use crate::name::ModelName;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

/// One stored model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// The active version's name, from `current`.
    pub active: Option<String>,
    /// Versions, oldest first.
    pub versions: Vec<VersionInfo>,
}

/// One stored version of a model.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub version: String,
    pub dir: PathBuf,
    /// The version's lock, or why it cannot be read.
    pub lock: Result<Lock, String>,
    /// When the version was promoted (its lock's modification time).
    pub created: Option<SystemTime>,
    pub active: bool,
}

impl VersionInfo {
    /// Bytes of the version's files, per its lock.
    pub fn size(&self) -> u64 {
        self.lock
            .as_ref()
            .map_or(0, |l| l.files.iter().map(|f| f.size).sum())
    }
}

impl ModelInfo {
    pub fn active_version(&self) -> Option<&VersionInfo> {
        self.versions.iter().find(|v| v.active)
    }

    /// The model's source, from its active version's lock (every version
    /// of a model comes from one source: another needs `--replace`).
    pub fn source(&self) -> Option<&str> {
        self.active_version()
            .or(self.versions.last())
            .and_then(|v| v.lock.as_ref().ok())
            .map(|l| l.source.as_str())
    }

    /// Bytes stored for all versions together, each blob counted once.
    pub fn stored_bytes(&self) -> u64 {
        let mut blobs = BTreeMap::new();
        for v in &self.versions {
            if let Ok(l) = &v.lock {
                for f in &l.files {
                    blobs.insert(f.sha256.as_str(), f.size);
                }
            }
        }
        blobs.values().sum()
    }

    /// Resolve what a user typed after `NAME@` to a stored version: its
    /// exact name, the exact revision, or a unique prefix of the name.
    pub fn resolve_version(&self, selector: &str) -> Result<String, StoreError> {
        if let Some(v) = self.versions.iter().find(|v| v.version == selector) {
            return Ok(v.version.clone());
        }
        if let Some(v) = self
            .versions
            .iter()
            .find(|v| v.lock.as_ref().is_ok_and(|l| l.revision == selector))
        {
            return Ok(v.version.clone());
        }
        let matches: Vec<String> = self
            .versions
            .iter()
            .filter(|v| !selector.is_empty() && v.version.starts_with(selector))
            .map(|v| v.version.clone())
            .collect();
        match matches.len() {
            1 => Ok(matches.into_iter().next().unwrap_or_default()),
            0 => Err(StoreError::VersionNotFound {
                name: self.name.clone(),
                version: selector.to_owned(),
            }),
            _ => Err(StoreError::AmbiguousVersion {
                name: self.name.clone(),
                selector: selector.to_owned(),
                matches,
            }),
        }
    }
}

impl Store {
    /// Every version of `name`, oldest first, and which is active.
    pub fn model_info(&self, name: &ModelName) -> Result<ModelInfo, StoreError> {
        let root = self.model_root(name);
        if !root.is_dir() {
            return Err(StoreError::NotFound {
                name: name.to_string(),
                store: self.root.clone(),
            });
        }
        let active = match self.active_version(name) {
            Ok(v) => Some(v),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let versions_dir = root.join(VERSIONS_DIR);
        let entries = match fs::read_dir(&versions_dir) {
            Ok(e) => e.collect::<io::Result<Vec<_>>>().map_err(io_at(&versions_dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_at(&versions_dir)(e)),
        };
        let mut versions = Vec::new();
        for e in entries {
            let Ok(version) = e.file_name().into_string() else {
                continue;
            };
            // Only names promotion can create; anything else is not ours.
            if check_version_name(&version).is_err() {
                continue;
            }
            let dir = e.path();
            let lock_path = dir.join(LOCK_FILE);
            let created = fs::metadata(&lock_path).and_then(|m| m.modified()).ok();
            let lock = match Lock::read(&lock_path) {
                Ok(l) => Ok(l),
                // Removed while we were reading: not a version any more.
                Err(_) if !dir.exists() => continue,
                Err(e) => Err(e.to_string()),
            };
            versions.push(VersionInfo {
                active: active.as_deref() == Some(version.as_str()),
                version,
                dir,
                lock,
                created,
            });
        }
        versions.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.version.cmp(&b.version)));
        Ok(ModelInfo {
            name: name.to_string(),
            active,
            versions,
        })
    }

    /// [`Store::model_info`] for every model, sorted by name.
    pub fn list(&self) -> Result<Vec<ModelInfo>, StoreError> {
        let models = self.root.join(super::MODELS_DIR);
        let mut out = Vec::new();
        let mut names: Vec<String> = fs::read_dir(&models)
            .map_err(io_at(&models))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for n in names {
            let Ok(name) = ModelName::parse(&n) else { continue };
            match self.model_info(&name) {
                Ok(info) => out.push(info),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
