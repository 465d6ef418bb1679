//! Re-verification against `moat.lock`, and the [`VerifiedModel`] it yields.
//!
//! Two entry points share one comparison:
//! - [`verify_dir`] streams every file through SHA-256 on all cores (`moat
//!   verify`: nothing kept in memory);
//! - [`load_verified`] reads every file into memory, hashes those bytes and
//!   hands exactly them to the caller. The engine builds its model from the
//!   bytes that were checked, so a file swapped on disk after the check
//!   (time-of-check/time-of-use) can never be what runs.
//!
//! A version folder with a `moat.enc` marker holds encrypted objects
//! (`[store] encrypt`): both entry points then decrypt while hashing (the
//! `_with` variants take the keyring), and the SHA-256 compared with the
//! lock is that of the plaintext. A chunk that fails authentication, or a
//! data key wrapped only by a retired KEK, is a mismatch naming the file
//! and the chunk or KEK version.

use crate::crypto::{self, Keyring, StreamOptions};
use crate::hash::{FileDigest, hash_stream, par_map, sha256_hex};
use crate::lock::{LOCK_FILE, Lock, LockError};
use crate::store::{ENCRYPTED_MARKER, FILES_DIR};
use crate::tree::{EntryKind, walk};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One way a stored file differs from its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Missing {
        path: String,
    },
    Extra {
        path: String,
    },
    NotRegular {
        path: String,
    },
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    Hash {
        path: String,
        expected: String,
        actual: String,
    },
    Unreadable {
        path: String,
        error: String,
    },
    /// An encrypted file that does not decrypt (a corrupted chunk, a
    /// retired or unknown KEK, a replaced key block).
    Undecryptable {
        path: String,
        error: String,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Missing { path } => write!(f, "{path}: missing (listed in the lock)"),
            Mismatch::Extra { path } => write!(f, "{path}: extra file (not in the lock)"),
            Mismatch::NotRegular { path } => write!(f, "{path}: not a regular file"),
            Mismatch::Size {
                path,
                expected,
                actual,
            } => {
                write!(f, "{path}: size {actual} bytes, lock says {expected}")
            }
            Mismatch::Hash {
                path,
                expected,
                actual,
            } => {
                write!(f, "{path}: sha256 {actual}, lock says {expected}")
            }
            Mismatch::Unreadable { path, error } => write!(f, "{path}: cannot read: {error}"),
            Mismatch::Undecryptable { path, error } => write!(f, "{path}: cannot decrypt: {error}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{dir}: {}", .mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Mismatch { dir: PathBuf, mismatches: Vec<Mismatch> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{dir}: the files are encrypted (moat.enc) and no keyring was given; set [encryption] keyring or pass --keyring"
    )]
    NeedsKeyring { dir: PathBuf },
}

impl VerifyError {
    /// True when the files differ from the lock (exit 1), as opposed to the
    /// check itself being impossible (exit 2).
    pub fn is_mismatch(&self) -> bool {
        matches!(self, VerifyError::Mismatch { .. })
    }
}

/// A stored model whose every byte matched its lock when read. Only
/// [`load_verified`] constructs one.
pub struct VerifiedModel {
    lock: Lock,
    dir: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for VerifiedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedModel")
            .field("name", &self.lock.name)
            .field("revision", &self.lock.revision)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl VerifiedModel {
    pub fn name(&self) -> &str {
        &self.lock.name
    }
    pub fn revision(&self) -> &str {
        &self.lock.revision
    }
    pub fn lock(&self) -> &Lock {
        &self.lock
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Relative paths of the files still held.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }
    /// The verified bytes of one file.
    pub fn file(&self, rel: &str) -> Option<&[u8]> {
        self.files.get(rel).map(Vec::as_slice)
    }
    /// Take the verified bytes of one file out (to free them once consumed).
    pub fn take_file(&mut self, rel: &str) -> Option<Vec<u8>> {
        self.files.remove(rel)
    }
    /// Total bytes verified.
    pub fn total_size(&self) -> u64 {
        self.lock.files.iter().map(|f| f.size).sum()
    }
}

/// Compare the file set on disk with the lock: missing, extra and
/// non-regular entries, as mismatches (empty when the sets agree).
fn check_file_set(dir: &Path, lock: &Lock) -> Result<Vec<Mismatch>, VerifyError> {
    let files_dir = dir.join(FILES_DIR);
    let on_disk = walk(&files_dir, &[]).map_err(|source| VerifyError::Io {
        path: files_dir.clone(),
        source,
    })?;
    let mut mismatches = Vec::new();
    let present: BTreeMap<&str, &EntryKind> = on_disk.iter().map(|e| (e.rel.as_str(), &e.kind)).collect();
    for f in &lock.files {
        match present.get(f.path.as_str()) {
            None => mismatches.push(Mismatch::Missing { path: f.path.clone() }),
            Some(EntryKind::File) => {}
            Some(_) => mismatches.push(Mismatch::NotRegular { path: f.path.clone() }),
        }
    }
    for e in &on_disk {
        if lock.file(&e.rel).is_none() {
            mismatches.push(Mismatch::Extra { path: e.rel.clone() });
        }
    }
    Ok(mismatches)
}

fn compare(rel: &str, expected: &crate::LockedFile, got: &FileDigest) -> Option<Mismatch> {
    if got.size != expected.size {
        Some(Mismatch::Size {
            path: rel.to_owned(),
            expected: expected.size,
            actual: got.size,
        })
    } else if got.sha256 != expected.sha256 {
        Some(Mismatch::Hash {
            path: rel.to_owned(),
            expected: expected.sha256.clone(),
            actual: got.sha256.clone(),
        })
    } else {
        None
    }
}

fn read_lock(dir: &Path) -> Result<Lock, VerifyError> {
    Ok(Lock::read(&dir.join(LOCK_FILE))?)
}

/// A `Write` that hashes and counts what it is given (the plaintext of a
/// decrypted file) and keeps nothing.
struct HashSink {
    hasher: sha2::Sha256,
    size: u64,
}

impl std::io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(&mut self.hasher, buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `Vec` writer that refuses to grow past `limit` bytes (it keeps the
/// first `limit`, then fails the stream).
struct Capped<'a> {
    buf: &'a mut Vec<u8>,
    limit: u64,
}

impl std::io::Write for Capped<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.limit.saturating_sub(self.buf.len() as u64);
        if room == 0 {
            return Err(std::io::Error::other("longer than the lock says"));
        }
        let n = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The keyring for `dir` if its files are encrypted; `Ok(None)` if plain.
fn keyring_for<'k>(dir: &Path, keyring: Option<&'k Keyring>) -> Result<Option<&'k Keyring>, VerifyError> {
    if !dir.join(ENCRYPTED_MARKER).exists() {
        return Ok(None);
    }
    keyring
        .map(Some)
        .ok_or_else(|| VerifyError::NeedsKeyring { dir: dir.to_owned() })
}

/// Decrypt one encrypted file, handing the plaintext to `out`.
fn decrypt_into(keyring: &Keyring, path: &Path, out: impl std::io::Write) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    crypto::decrypt_stream(
        keyring,
        std::io::BufReader::with_capacity(1 << 20, file),
        out,
        &StreamOptions::default(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Stream-verify a stored model folder (`models/NAME`) against its lock.
pub fn verify_dir(dir: &Path) -> Result<Lock, VerifyError> {
    verify_dir_with(dir, None)
}

/// [`verify_dir`], decrypting an encrypted version folder with `keyring`.
pub fn verify_dir_with(dir: &Path, keyring: Option<&Keyring>) -> Result<Lock, VerifyError> {
    let keyring = keyring_for(dir, keyring)?;
    let lock = read_lock(dir)?;
    let mut mismatches = check_file_set(dir, &lock)?;
    let files_dir = dir.join(FILES_DIR);
    let todo: Vec<&crate::LockedFile> = lock
        .files
        .iter()
        .filter(|f| !mismatches.iter().any(|m| matches!(m, Mismatch::Missing { path } | Mismatch::NotRegular { path } if *path == f.path)))
        .collect();
    let results = par_map(
        &todo,
        |f| f.size,
        |f| {
            let path = files_dir.join(&f.path);
            if let Some(keyring) = keyring {
                let mut sink = HashSink {
                    hasher: sha2::Sha256::default(),
                    size: 0,
                };
                return decrypt_into(keyring, &path, &mut sink)
                    .map(|()| FileDigest {
                        size: sink.size,
                        sha256: hex::encode(sha2::Digest::finalize(sink.hasher)),
                    })
                    .map_err(|error| Mismatch::Undecryptable {
                        path: f.path.clone(),
                        error,
                    });
            }
            // Read at most one byte more than promised: a grown file is a size
            // mismatch, and a huge one cannot stall the check.
            std::fs::File::open(path)
                .and_then(|file| hash_stream(file.take(f.size + 1), None))
                .map_err(|e| Mismatch::Unreadable {
                    path: f.path.clone(),
                    error: e.to_string(),
                })
        },
    );
    for (f, r) in todo.iter().zip(results) {
        match r {
            Ok(d) => mismatches.extend(compare(&f.path, f, &d)),
            Err(m) => mismatches.push(m),
        }
    }
    finish(dir, lock, mismatches)
}

fn finish(dir: &Path, lock: Lock, mismatches: Vec<Mismatch>) -> Result<Lock, VerifyError> {
    if mismatches.is_empty() {
        Ok(lock)
    } else {
        Err(mismatch_error(dir, mismatches))
    }
}

fn mismatch_error(dir: &Path, mut mismatches: Vec<Mismatch>) -> VerifyError {
    mismatches.sort_by_key(|m| m.to_string());
    VerifyError::Mismatch {
        dir: dir.to_owned(),
        mismatches,
    }
}

/// Read, hash and check every file of a stored model (one read per file, all
/// cores); on success the model's bytes are returned as a [`VerifiedModel`].
pub fn load_verified(dir: &Path) -> Result<VerifiedModel, VerifyError> {
    load_verified_with(dir, None)
}

/// [`load_verified`], decrypting an encrypted version folder with
/// `keyring`: the bytes handed over are the authenticated plaintext.
pub fn load_verified_with(dir: &Path, keyring: Option<&Keyring>) -> Result<VerifiedModel, VerifyError> {
    let keyring = keyring_for(dir, keyring)?;
    let lock = read_lock(dir)?;
    let mut mismatches = check_file_set(dir, &lock)?;
    if !mismatches.is_empty() {
        return Err(mismatch_error(dir, mismatches));
    }
    let files_dir = dir.join(FILES_DIR);
    let results = par_map(
        &lock.files,
        |f| f.size,
        |f| {
            let path = files_dir.join(&f.path);
            let mut buf = Vec::new();
            let read = match keyring {
                Some(keyring) => {
                    buf.reserve(usize::try_from(f.size).unwrap_or(0));
                    // Like `take(size + 1)` for plain files: a plaintext
                    // longer than the lock says is a mismatch, and a huge
                    // one cannot exhaust memory.
                    let capped = Capped {
                        buf: &mut buf,
                        limit: f.size + 1,
                    };
                    match decrypt_into(keyring, &path, capped) {
                        Err(_) if buf.len() as u64 > f.size => Ok(()),
                        r => r.map_err(|error| Mismatch::Undecryptable {
                            path: f.path.clone(),
                            error,
                        }),
                    }
                }
                None => std::fs::File::open(&path)
                    .and_then(|file| file.take(f.size + 1).read_to_end(&mut buf))
                    .map(|_| ())
                    .map_err(|e| Mismatch::Unreadable {
                        path: f.path.clone(),
                        error: e.to_string(),
                    }),
            };
            read.map(|()| {
                let d = FileDigest {
                    size: buf.len() as u64,
                    sha256: sha256_hex(&buf),
                };
                (buf, d)
            })
        },
    );
    let mut files = BTreeMap::new();
    for (f, r) in lock.files.iter().zip(results) {
        match r {
            Ok((buf, d)) => match compare(&f.path, f, &d) {
                Some(m) => mismatches.push(m),
                None => {
                    files.insert(f.path.clone(), buf);
                }
            },
            Err(m) => mismatches.push(m),
        }
    }
    let lock = finish(dir, lock, mismatches)?;
    Ok(VerifiedModel {
        lock,
        dir: dir.to_owned(),
        files,
    })
}
