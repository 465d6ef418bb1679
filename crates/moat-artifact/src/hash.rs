//! SHA-256 at disk speed: one streaming read per file, files spread over all
//! cores (largest first, so one big shard does not end up last on a busy
//! core). A single file is inherently sequential for SHA-256; parallelism
//! comes from multi-file models, which is how large models are shipped.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Read size for streaming hashes and copies: large enough to amortise
/// syscalls, small enough to stay in L2/L3 between read and hash.
pub const CHUNK: usize = 1 << 20;

/// Size and SHA-256 (lower-case hex) of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Stream `reader` through SHA-256, optionally copying every byte to `sink`
/// (so a copy and its hash cost one read).
pub fn hash_stream<R: Read>(mut reader: R, mut sink: Option<&mut dyn Write>) -> io::Result<FileDigest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        if let Some(w) = sink.as_deref_mut() {
            w.write_all(chunk)?;
        }
        size += n as u64;
    }
    Ok(FileDigest {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Hash one file by streaming it.
pub fn hash_file(path: &Path) -> io::Result<FileDigest> {
    hash_stream(File::open(path)?, None)
}

/// Number of worker threads to use for `jobs` independent files.
pub fn workers_for(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(jobs).max(1)
}

/// Run `work` over `items` on all cores, largest `weight` first; results come
/// back in the input order.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    weight: impl Fn(&T) -> u64,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weight(&items[i])));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers_for(items.len()) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let r = work(&items[i]);
                    if let Ok(mut slots) = results.lock() {
                        slots[i] = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|poison| poison.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

/// Hash many files in parallel; results are in the order of `paths`.
pub fn hash_files(paths: &[PathBuf]) -> Vec<io::Result<FileDigest>> {
    par_map(
        paths,
        |p| std::fs::metadata(p).map_or(0, |m| m.len()),
        |p| hash_file(p),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let d = hash_stream(&b""[..], None).unwrap();
        assert_eq!(d.size, 0);
        assert_eq!(
            d.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn copy_and_hash_in_one_pass() {
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 31 % 251) as u8).collect();
        let mut out = Vec::new();
        let d = hash_stream(&data[..], Some(&mut out)).unwrap();
        assert_eq!(out, data);
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(d.sha256, sha256_hex(&data));
    }

    #[test]
    fn par_map_keeps_input_order() {
        let items: Vec<u64> = (0..100).collect();
        let out = par_map(&items, |&x| x % 7, |&x| x * 2);
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
    }
}
