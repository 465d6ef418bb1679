//! `moat models rm NAME[@VERSION]`. Removal is a rename into `trash/`
//! (atomic: the version or model is either fully visible or gone) followed
//! by deletion, so a crash never leaves a half-deleted visible version; gc
//! finishes any interrupted deletion. Blobs are not touched here: a blob
//! no version links any more is gc's to remove.
//!
//! Removing the active version needs `force`: it silently changes what
//! `serve` loads next (a rollback to an older version), which should be a
//! decision. With `force` the newest remaining version becomes active first,
//! then the old one is moved out; removing the last version removes the
//! model.

use super::fsops::{LockMode, fsync_dir, remove_tree};
use super::{Store, StoreError, VERSIONS_DIR, io_at};
use crate::name::ModelName;
use std::fs;

/// What [`Store::remove`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// The whole model, with this many versions.
    Model { versions: usize },
    /// One version; `activated` is the version made active in its place
    /// (when the active one was removed).
    Version {
        version: String,
        activated: Option<String>,
    },
}

impl Store {
    /// Remove model `name`, or only its version matching `version` (see
    /// [`super::ModelInfo::resolve_version`]).
    pub fn remove(
        &self,
        name: &ModelName,
        version: Option<&str>,
        force: bool,
    ) -> Result<Removed, StoreError> {
        let _store_lock = self.lock_store(LockMode::Shared)?;
        let _model_lock = self.lock_model(name)?;
        let info = self.model_info(name)?;
        let Some(selector) = version else {
            self.trash_model(name)?;
            return Ok(Removed::Model {
                versions: info.versions.len(),
            });
        };
        let version = info.resolve_version(selector)?;
        let is_active = info.active.as_deref() == Some(version.as_str());
        let newest_other = info
            .versions
            .iter()
            .rev()
            .find(|v| v.version != version && v.lock.is_ok())
            .map(|v| v.version.clone());
        if is_active && !force {
            return Err(StoreError::ActiveVersion {
                name: name.to_string(),
                version,
            });
        }
        let activated = match (is_active, newest_other) {
            (true, Some(other)) => {
                self.write_current(&self.model_root(name), &other)?;
                Some(other)
            }
            (true, None) => {
                // The last version: removing it removes the model.
                self.trash_model(name)?;
                return Ok(Removed::Model {
                    versions: info.versions.len(),
                });
            }
            (false, _) => None,
        };
        let dir = self.version_dir(name, &version);
        let trash = self.trash_path(&format!("{name}@{version}"));
        fs::rename(&dir, &trash).map_err(io_at(&dir))?;
        let versions = self.model_root(name).join(VERSIONS_DIR);
        fsync_dir(&versions).map_err(io_at(&versions))?;
        remove_tree(&trash);
        Ok(Removed::Version { version, activated })
    }

    fn trash_model(&self, name: &ModelName) -> Result<(), StoreError> {
        let root = self.model_root(name);
        let trash = self.trash_path(name.as_str());
        fs::rename(&root, &trash).map_err(io_at(&root))?;
        let models = self.root.join(super::MODELS_DIR);
        fsync_dir(&models).map_err(io_at(&models))?;
        remove_tree(&trash);
        Ok(())
    }
}
