//! Re-wrapping the encrypted blobs of the store under the current KEK
//! (`moat keys rewrap --store-blobs`), so an old KEK version can be retired.
//!
//! A blob is one inode with several names: `blobs/sha256/HEX.enc` and a hard
//! link in every version folder that holds the file. `crypto::rewrap_file`
//! replaces a file by rename, which would leave the version links on the old
//! inode (still wrapped by the old KEK). So the rewrapped copy is written
//! once and then renamed over *every* name of the old inode, each rename
//! atomic: at any moment a name holds the old object or the new one, both
//! complete and both decrypting until the old KEK is retired.

use super::fsops::{LockMode, fsync_dir};
use super::{ENCRYPTED_SUFFIX, MODELS_DIR, Store, StoreError, io_at};
use crate::crypto::{self, Keyring};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What [`Store::rewrap_blobs`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewrapReport {
    /// Blobs moved to the current KEK version.
    pub rewrapped: usize,
    /// Blobs already on it.
    pub current: usize,
}

/// Every regular file below `dir`, grouped by inode.
fn files_by_inode(dir: &Path, out: &mut BTreeMap<(u64, u64), Vec<PathBuf>>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            files_by_inode(&path, out)?;
        } else if meta.is_file() {
            out.entry((meta.dev(), meta.ino())).or_default().push(path);
        }
    }
    Ok(())
}

impl Store {
    /// Re-wrap the data key of every encrypted blob under `keyring`'s
    /// current KEK version (only the header changes; no data is
    /// re-encrypted). Holds the store lock exclusively, like gc, so no
    /// promotion links a blob while its names are being replaced.
    pub fn rewrap_blobs(&self, keyring: &Keyring) -> Result<RewrapReport, StoreError> {
        let _store_lock = self.lock_store(LockMode::Exclusive)?;
        let models = self.root.join(MODELS_DIR);
        let mut names = BTreeMap::new();
        files_by_inode(&models, &mut names).map_err(io_at(&models))?;
        let blob_dir = self.blob_dir();
        let mut report = RewrapReport::default();
        let mut entries: Vec<PathBuf> = fs::read_dir(&blob_dir)
            .map_err(io_at(&blob_dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()
            .map_err(io_at(&blob_dir))?;
        entries.sort();
        for blob in entries {
            if !blob.to_string_lossy().ends_with(ENCRYPTED_SUFFIX) {
                continue;
            }
            let meta = fs::symlink_metadata(&blob).map_err(io_at(&blob))?;
            if !meta.is_file() {
                continue;
            }
            let links = names.remove(&(meta.dev(), meta.ino())).unwrap_or_default();
            if self.rewrap_one(&blob, &links, keyring)? {
                report.rewrapped += 1;
            } else {
                report.current += 1;
            }
        }
        Ok(report)
    }

    /// Rewrap one blob and every version link to it; false if it was
    /// already on the current version.
    fn rewrap_one(&self, blob: &Path, links: &[PathBuf], keyring: &Keyring) -> Result<bool, StoreError> {
        let crypt = |source| StoreError::Encrypt {
            path: blob.to_owned(),
            source,
        };
        let mut src = fs::File::open(blob).map_err(io_at(blob))?;
        let header = crypto::Header::read_from(&mut src).map_err(crypt)?;
        let re = crypto::rewrap(&header, keyring).map_err(crypt)?;
        if !re.changed() {
            return Ok(false);
        }
        let tmp = blob.with_extension(format!("enc.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&tmp)?;
            out.write_all(&re.header.to_bytes())?;
            io::copy(&mut src, &mut out)?;
            out.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&tmp)(e));
        }
        // Version links first, the blob name last: until the blob is
        // renamed, a rerun finds it on the old version and redoes all.
        for link in links.iter().filter(|l| l.as_path() != blob) {
            let staged = link.with_file_name(format!(
                ".{}.rewrap.{}",
                link.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                std::process::id()
            ));
            let _ = fs::remove_file(&staged);
            fs::hard_link(&tmp, &staged).map_err(io_at(&staged))?;
            fs::rename(&staged, link).map_err(io_at(link))?;
            if let Some(parent) = link.parent() {
                fsync_dir(parent).map_err(io_at(parent))?;
            }
        }
        fs::rename(&tmp, blob).map_err(io_at(blob))?;
        let dir = self.blob_dir();
        fsync_dir(&dir).map_err(io_at(&dir))?;
        Ok(true)
    }
}
