//! The manifest: every file (or file shard) of a model paired with its
//! SHA-256, keyed and ordered exactly as the `model_signing` tool does, since
//! the order fixes the subject digest that gets signed.
//!
//! Keys compare by path components, then shard start and end (the tool sorts
//! `PurePosixPath`s, which compare component by component, so `a/b` comes
//! before `a.b` even though `.` < `/` bytewise). Hashing reuses the crate's
//! parallel hasher: whole files for `files`, every shard range on its own for
//! `shards`, all spread over the cores largest first.

use super::error::{Difference, SignatureError};
use crate::hash::{hash_file, hash_stream, par_map};
use crate::tree::{EntryKind, walk};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The tool's default shard size (1 GB, decimal).
pub const DEFAULT_SHARD_SIZE: u64 = 1_000_000_000;

/// The git paths the tool leaves out by default (`--ignore-git-paths`).
pub const GIT_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];

/// How a model is cut into signed resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One resource per file (the tool's default).
    Files,
    /// One resource per `shard_size` bytes of every file; empty files have no
    /// shard and so no resource.
    Shards { shard_size: u64 },
}

/// The `predicate.serialization` section: what a verifier needs to re-hash
/// the model the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serialization {
    pub method: Method,
    /// Only `sha256` can be checked by moat.
    pub hash_type: String,
    pub allow_symlinks: bool,
    /// Paths (relative to the model folder) that were left out when signing;
    /// a verifier leaves them out too.
    pub ignore_paths: Vec<String>,
}

impl Serialization {
    /// The `algorithm` string of every resource under this serialization.
    pub fn resource_algorithm(&self) -> String {
        match self.method {
            Method::Files => self.hash_type.clone(),
            Method::Shards { shard_size } => format!("{}-sharded-{shard_size}", self.hash_type),
        }
    }
}

/// One signed resource as it appears in `predicate.resources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// `path` for files, `path:start:end` for shards.
    pub name: String,
    pub algorithm: String,
    /// Lower-case hex.
    pub digest: String,
}

/// Identity of a resource, ordered like the tool orders its manifest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ResourceKey {
    /// Path components; empty for the model itself when it is a single file
    /// (named `.`). A leading `/` is kept as its own component so an absolute
    /// name never equals a relative one.
    pub components: Vec<String>,
    pub range: Option<(u64, u64)>,
}

impl ResourceKey {
    pub fn file(components: Vec<String>) -> Self {
        Self {
            components,
            range: None,
        }
    }

    pub fn path(&self) -> String {
        if self.components.is_empty() {
            ".".to_owned()
        } else if self.components.first().is_some_and(|c| c == "/") {
            format!("/{}", self.components[1..].join("/"))
        } else {
            self.components.join("/")
        }
    }

    /// The resource name the tool writes.
    pub fn name(&self) -> String {
        match self.range {
            None => self.path(),
            Some((start, end)) => format!("{}:{start}:{end}", self.path()),
        }
    }
}

/// Split a POSIX path the way `PurePosixPath` normalises it: empty and `.`
/// components vanish, `..` stays.
pub(crate) fn posix_components(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if name.starts_with('/') {
        out.push("/".to_owned());
    }
    out.extend(
        name.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned),
    );
    out
}

/// A signed resource name parsed into its key.
pub(crate) fn parse_resource_name(name: &str, method: Method) -> Result<ResourceKey, String> {
    match method {
        Method::Files => Ok(ResourceKey::file(posix_components(name))),
        Method::Shards { .. } => {
            let mut parts = name.rsplitn(3, ':');
            let (Some(end), Some(start), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("\"{name}\": a shard name is path:start:end"));
            };
            let num = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| format!("\"{name}\": shard offset \"{s}\" is not a number"))
            };
            Ok(ResourceKey {
                components: posix_components(path),
                range: Some((num(start)?, num(end)?)),
            })
        }
    }
}

/// Paths to leave out, as component prefixes relative to the model folder.
#[derive(Debug, Clone, Default)]
pub(crate) struct IgnoreSet(Vec<Vec<String>>);

impl IgnoreSet {
    /// The caller's paths, plus the git paths when asked (the default of
    /// both signing and verifying).
    pub fn with(paths: &[String], git: bool) -> Self {
        let mut set = Self::default();
        for p in paths {
            set.add(p);
        }
        if git {
            for g in GIT_PATHS {
                set.add(g);
            }
        }
        set
    }

    /// Add a model-relative path. Paths that leave the model folder (or are
    /// absolute) cannot name anything inside it and are dropped, as the tool
    /// drops them.
    pub fn add(&mut self, rel: &str) {
        if let Some(c) = normalize_relative(rel)
            && !self.0.contains(&c)
        {
            self.0.push(c);
        }
    }

    pub fn matches(&self, components: &[String]) -> bool {
        self.0.iter().any(|p| components.starts_with(p))
    }

    /// The normalised paths, for `predicate.serialization.ignore_paths`.
    pub fn to_strings(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|c| if c.is_empty() { ".".to_owned() } else { c.join("/") })
            .collect()
    }
}

/// Lexically normalise a relative path; `None` when it is absolute or climbs
/// out of its base.
pub(crate) fn normalize_relative(rel: &str) -> Option<Vec<String>> {
    if rel.starts_with('/') {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c.to_owned()),
        }
    }
    Some(out)
}

/// The name the tool gives a model: the last component of its path (or of
/// the resolved path, for `.` and `..`).
pub(crate) fn model_name(model: &Path) -> Result<String, SignatureError> {
    let name = match model.file_name() {
        Some(n) => n.to_owned(),
        None => {
            let abs = std::fs::canonicalize(model).map_err(|e| SignatureError::io(model, e))?;
            abs.file_name().map(ToOwned::to_owned).unwrap_or_default()
        }
    };
    name.into_string().map_err(|raw| {
        SignatureError::io(
            model,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("model folder name is not UTF-8: {raw:?}"),
            ),
        )
    })
}

/// The model's resources and their digests (lower-case hex), in manifest
/// order.
pub(crate) type Hashed = BTreeMap<ResourceKey, String>;

struct FileToHash {
    components: Vec<String>,
    path: PathBuf,
    size: u64,
}

/// Hash a model folder (or a single-file model) as the tool does.
///
/// Symlinks: refused unless `allow_symlinks`; then a link to a file is hashed
/// as that file's content under the link's name, and a link to a folder is
/// skipped (the tool's recursive glob does not descend into linked folders
/// and only hashes files). Sockets, FIFOs and devices are refused. Ignored
/// paths are left out before any other check, so whatever lies under `.git`
/// cannot fail a signature it is not part of.
pub(crate) fn hash_model(
    model: &Path,
    method: Method,
    ignore: &IgnoreSet,
    allow_symlinks: bool,
) -> Result<Hashed, SignatureError> {
    let meta = std::fs::symlink_metadata(model).map_err(|e| SignatureError::io(model, e))?;
    if meta.file_type().is_symlink() && !allow_symlinks {
        return Err(SignatureError::Symlink {
            path: model.display().to_string(),
        });
    }
    let target = std::fs::metadata(model).map_err(|e| SignatureError::io(model, e))?;
    let mut files = Vec::new();
    if target.is_file() {
        if !ignore.matches(&[]) {
            files.push(FileToHash {
                components: Vec::new(),
                path: model.to_path_buf(),
                size: target.len(),
            });
        }
    } else if target.is_dir() {
        let entries = walk(model, &[]).map_err(|e| SignatureError::io(model, e))?;
        for e in entries {
            let components: Vec<String> = e.rel.split('/').map(str::to_owned).collect();
            if ignore.matches(&components) {
                continue;
            }
            match e.kind {
                EntryKind::File => files.push(FileToHash {
                    components,
                    path: e.path,
                    size: e.size,
                }),
                EntryKind::Symlink if !allow_symlinks => {
                    return Err(SignatureError::Symlink { path: e.rel });
                }
                EntryKind::Symlink => {
                    let t = std::fs::metadata(&e.path).map_err(|err| SignatureError::io(&e.path, err))?;
                    if t.is_file() {
                        files.push(FileToHash {
                            components,
                            path: e.path,
                            size: t.len(),
                        });
                    } else if !t.is_dir() {
                        return Err(SignatureError::NotRegular { path: e.rel });
                    }
                }
                EntryKind::Special => return Err(SignatureError::NotRegular { path: e.rel }),
            }
        }
    } else {
        return Err(SignatureError::NotRegular {
            path: model.display().to_string(),
        });
    }
    match method {
        Method::Files => hash_whole_files(files),
        Method::Shards { shard_size } => hash_shards(files, shard_size),
    }
}

fn hash_whole_files(files: Vec<FileToHash>) -> Result<Hashed, SignatureError> {
    let results = par_map(&files, |f| f.size, |f| hash_file(&f.path));
    let mut out = Hashed::new();
    for (f, r) in files.into_iter().zip(results) {
        let d = r.map_err(|e| SignatureError::io(&f.path, e))?;
        out.insert(ResourceKey::file(f.components), d.sha256);
    }
    Ok(out)
}

/// The shard ranges of a file of `size` bytes: `[0, s), [s, 2s), …` with the
/// last one ending at `size`; none for an empty file.
pub(crate) fn shard_ranges(size: u64, shard_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < size {
        let end = start.saturating_add(shard_size).min(size);
        out.push((start, end));
        start = end;
    }
    out
}

fn hash_shards(files: Vec<FileToHash>, shard_size: u64) -> Result<Hashed, SignatureError> {
    if shard_size == 0 {
        return Err(SignatureError::Unsupported("a shard size of 0".to_owned()));
    }
    let jobs: Vec<(usize, u64, u64)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            shard_ranges(f.size, shard_size)
                .into_iter()
                .map(move |(s, e)| (i, s, e))
        })
        .collect();
    let results = par_map(
        &jobs,
        |&(_, s, e)| e - s,
        |&(i, start, end)| hash_range(&files[i].path, start, end),
    );
    let mut out = Hashed::new();
    for (&(i, start, end), r) in jobs.iter().zip(results) {
        let f = &files[i];
        let digest = r.map_err(|e| SignatureError::io(&f.path, e))?;
        out.insert(
            ResourceKey {
                components: f.components.clone(),
                range: Some((start, end)),
            },
            digest,
        );
    }
    Ok(out)
}

fn hash_range(path: &Path, start: u64, end: u64) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(start))?;
    let d = hash_stream(file.take(end - start), None)?;
    if d.size != end - start {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("file shrank while hashing bytes {start}..{end}"),
        ));
    }
    Ok(d.sha256)
}

/// SHA-256 over the raw digests in the given order: the subject digest.
pub(crate) fn root_digest<'a>(hex_digests: impl Iterator<Item = &'a str>) -> Result<String, String> {
    let mut h = Sha256::new();
    for d in hex_digests {
        h.update(hex::decode(d).map_err(|e| format!("digest \"{d}\": {e}"))?);
    }
    Ok(hex::encode(h.finalize()))
}

/// Compare what was signed with what is there; `expected` holds the signed
/// algorithm and digest per key, `actual` the same for the model.
pub(crate) fn compare(
    expected: &BTreeMap<ResourceKey, (String, String)>,
    actual: &BTreeMap<ResourceKey, (String, String)>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    for (k, (alg, digest)) in expected {
        match actual.get(k) {
            None => out.push(Difference::Missing { name: k.name() }),
            Some((a_alg, a_digest)) if a_alg != alg || a_digest != digest => {
                let show = |a: &str, d: &str| {
                    if a_alg == alg {
                        d.to_owned()
                    } else {
                        format!("{a}:{d}")
                    }
                };
                out.push(Difference::Digest {
                    name: k.name(),
                    signed: show(alg, digest),
                    actual: show(a_alg, a_digest),
                });
            }
            Some(_) => {}
        }
    }
    for k in actual.keys() {
        if !expected.contains_key(k) {
            out.push(Difference::Unsigned { name: k.name() });
        }
    }
    out
}
