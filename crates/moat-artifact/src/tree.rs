//! Walking a model folder without following symlinks. Both the pull (source
//! folder) and verification (stored folder) need the same answer to "which
//! files are here", including the entries that must never be there.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Symlink,
    /// Sockets, FIFOs, devices: never part of a model.
    Special,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// Relative path with `/` separators.
    pub rel: String,
    pub path: PathBuf,
    pub kind: EntryKind,
    pub size: u64,
}

/// Every non-directory entry under `root`, sorted by relative path. Folders
/// named in `skip_dirs` (at any depth) are not entered. Names that are not
/// valid UTF-8 are an error: they cannot be written to a lock faithfully.
pub fn walk(root: &Path, skip_dirs: &[&str]) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name().into_string().map_err(|raw| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: file name is not UTF-8: {raw:?}", dir.display()),
                )
            })?;
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let meta = std::fs::symlink_metadata(item.path())?;
            let ft = meta.file_type();
            if ft.is_dir() {
                if !skip_dirs.contains(&name.as_str()) {
                    stack.push((item.path(), rel));
                }
                continue;
            }
            let kind = if ft.is_file() {
                EntryKind::File
            } else if ft.is_symlink() {
                EntryKind::Symlink
            } else {
                EntryKind::Special
            };
            out.push(Entry {
                rel,
                path: item.path(),
                kind,
                size: meta.len(),
            });
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}
