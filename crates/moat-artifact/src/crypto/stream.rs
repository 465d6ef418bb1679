//! The object format (see the module comment of [`crate::crypto`]): header
//! parsing, chunked AES-256-GCM over Read → Write with bounded memory and
//! all cores, the in-memory `seal`/`open`, and rewrapping.
//!
//! Parallelism: chunks are read in batches of two per worker and sealed or
//! opened on scoped threads (each chunk is an independent AEAD message)
//! while the calling thread writes the previous batch and reads the next, so
//! I/O overlaps the crypto. Memory stays at three batches (6 MiB per worker
//! with 1 MiB chunks) whatever the size of the object.

use super::keyring::Keyring;
use super::{ChunkFault, CryptoError, Key32};
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

const MAGIC: &[u8; 7] = b"MOATENC";
const FORMAT_VERSION: u8 = 1;
/// Default chunk size exponent: 1 MiB chunks.
pub const DEFAULT_CHUNK_EXP: u8 = 20;
const MIN_CHUNK_EXP: u8 = 12;
const MAX_CHUNK_EXP: u8 = 24;
/// magic ‖ version ‖ chunk exponent ‖ nonce prefix ‖ key check.
const PARAMS_LEN: usize = 48;
/// KEK version ‖ scheme ‖ wrapped length.
const KEY_BLOCK_FIXED: usize = 7;
const MAX_WRAPPED: usize = 1024;
const TAG_LEN: usize = 16;
const KEY_CHECK_LABEL: &[u8] = b"moat-enc v1 key check";
/// Chunk indices are 32 bits in the nonce.
const MAX_CHUNKS: u64 = 1 << 32;

/// How the data key in a header is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WrapScheme {
    /// AES-256-GCM under a local KEK.
    Local = 1,
    /// An AWS KMS CiphertextBlob.
    AwsKms = 2,
}

/// A data key wrapped by one KEK version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WrappedKey {
    pub kek_version: u32,
    pub scheme: WrapScheme,
    pub bytes: Vec<u8>,
}

/// The header of an encrypted object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    params: [u8; PARAMS_LEN],
    wrapped: WrappedKey,
}

fn format_err(m: impl Into<String>) -> CryptoError {
    CryptoError::Format(m.into())
}

impl Header {
    /// The KEK version that wraps this object's data key.
    pub fn kek_version(&self) -> u32 {
        self.wrapped.kek_version
    }

    pub fn wrap_scheme(&self) -> WrapScheme {
        self.wrapped.scheme
    }

    /// Plaintext bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        1 << self.params[8]
    }

    /// Encoded length in bytes (the offset of chunk 0).
    pub fn len(&self) -> usize {
        PARAMS_LEN + KEY_BLOCK_FIXED + self.wrapped.bytes.len()
    }

    /// Never true: a header has a fixed part. (For clippy's `len` rule.)
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.params);
        out.extend_from_slice(&self.wrapped.kek_version.to_be_bytes());
        out.push(self.wrapped.scheme as u8);
        // Bounded by MAX_WRAPPED when built or parsed.
        out.extend_from_slice(&(self.wrapped.bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped.bytes);
        out
    }

    /// Read exactly one header from `r`, leaving it at chunk 0.
    pub fn read_from(r: &mut impl Read) -> Result<Self, CryptoError> {
        let mut fixed = [0u8; PARAMS_LEN + KEY_BLOCK_FIXED];
        read_exact_or(r, &mut fixed, "the header is truncated")?;
        let (params, wrapped_len) = Self::parse_fixed(&fixed)?;
        let mut bytes = vec![0u8; wrapped_len];
        read_exact_or(r, &mut bytes, "the header is truncated inside the wrapped key")?;
        Ok(Self {
            params,
            wrapped: WrappedKey {
                kek_version: u32::from_be_bytes([fixed[48], fixed[49], fixed[50], fixed[51]]),
                scheme: if fixed[52] == 1 {
                    WrapScheme::Local
                } else {
                    WrapScheme::AwsKms
                },
                bytes,
            },
        })
    }

    /// Validate the fixed part; returns the parameters and the wrapped-key length.
    fn parse_fixed(
        fixed: &[u8; PARAMS_LEN + KEY_BLOCK_FIXED],
    ) -> Result<([u8; PARAMS_LEN], usize), CryptoError> {
        if &fixed[..7] != MAGIC {
            return Err(format_err("bad magic at byte 0 (expected \"MOATENC\")"));
        }
        if fixed[7] != FORMAT_VERSION {
            return Err(format_err(format!(
                "format version {} at byte 7 is not supported (expected {FORMAT_VERSION})",
                fixed[7]
            )));
        }
        if !(MIN_CHUNK_EXP..=MAX_CHUNK_EXP).contains(&fixed[8]) {
            return Err(format_err(format!(
                "chunk size exponent {} at byte 8 is outside {MIN_CHUNK_EXP}..={MAX_CHUNK_EXP}",
                fixed[8]
            )));
        }
        let version = u32::from_be_bytes([fixed[48], fixed[49], fixed[50], fixed[51]]);
        if version == 0 {
            return Err(format_err("KEK version 0 at byte 48"));
        }
        if !matches!(fixed[52], 1 | 2) {
            return Err(format_err(format!(
                "unknown wrap scheme {} at byte 52",
                fixed[52]
            )));
        }
        let len = usize::from(u16::from_be_bytes([fixed[53], fixed[54]]));
        if len == 0 || len > MAX_WRAPPED {
            return Err(format_err(format!(
                "wrapped key length {len} at byte 53 is outside 1..={MAX_WRAPPED}"
            )));
        }
        let mut params = [0u8; PARAMS_LEN];
        params.copy_from_slice(&fixed[..PARAMS_LEN]);
        Ok((params, len))
    }

    fn nonce(&self, index: u64, last: bool) -> aes_gcm::aead::Nonce<Aes256Gcm> {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(&self.params[9..16]);
        // index < MAX_CHUNKS is checked by the chunk reader.
        n[7..11].copy_from_slice(&(index as u32).to_be_bytes());
        n[11] = u8::from(last);
        Nonce::from(n)
    }

    fn aad(&self, index: u64, last: bool) -> [u8; PARAMS_LEN + 9] {
        let mut a = [0u8; PARAMS_LEN + 9];
        a[..PARAMS_LEN].copy_from_slice(&self.params);
        a[PARAMS_LEN..PARAMS_LEN + 8].copy_from_slice(&index.to_be_bytes());
        a[PARAMS_LEN + 8] = u8::from(last);
        a
    }

    /// Byte offset of chunk `index` in the encrypted object.
    fn chunk_offset(&self, index: u64) -> u64 {
        self.len() as u64 + index * (self.chunk_size() + TAG_LEN) as u64
    }
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), CryptoError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            format_err(what)
        } else {
            CryptoError::Stream(e)
        }
    })
}

fn key_check(dek: &Key32, params_head: &[u8]) -> Result<Hmac<Sha256>, CryptoError> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(dek.bytes())
        .map_err(|_| CryptoError::Invalid("HMAC key".into()))?;
    mac.update(KEY_CHECK_LABEL);
    mac.update(params_head);
    Ok(mac)
}

/// Verify that `dek` is this header's data key (constant time).
fn check_key(header: &Header, dek: &Key32) -> Result<(), CryptoError> {
    key_check(dek, &header.params[..16])?
        .verify_slice(&header.params[16..48])
        .map_err(|_| CryptoError::KeyCheck)
}

/// Tuning for the streaming functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Chunk size exponent for encryption (12..=24; 20 = 1 MiB). Decryption
    /// takes the chunk size from the header.
    pub chunk_exp: u8,
    /// Worker threads; 0 = all cores, 1 = the calling thread only.
    pub threads: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            chunk_exp: DEFAULT_CHUNK_EXP,
            threads: 0,
        }
    }
}

impl StreamOptions {
    pub fn single_threaded() -> Self {
        Self {
            threads: 1,
            ..Self::default()
        }
    }

    fn workers(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// What a stream function processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    pub plaintext_bytes: u64,
    pub chunks: u64,
    pub kek_version: u32,
}

struct Chunk {
    index: u64,
    last: bool,
    buf: Vec<u8>,
}

/// Splits a reader into chunks of `size` bytes, looking one chunk ahead so
/// the final chunk is known when it is handed out.
struct ChunkReader<R> {
    inner: R,
    size: usize,
    ahead: Option<Vec<u8>>,
    free: Vec<Vec<u8>>,
    next_index: u64,
    finished: bool,
}

impl<R: Read> ChunkReader<R> {
    fn new(inner: R, size: usize) -> Self {
        Self {
            inner,
            size,
            ahead: None,
            free: Vec::new(),
            next_index: 0,
            finished: false,
        }
    }

    fn fill(&mut self) -> Result<Vec<u8>, CryptoError> {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        // Room for the tag appended in place by encryption.
        buf.reserve(self.size + TAG_LEN);
        (&mut self.inner)
            .take(self.size as u64)
            .read_to_end(&mut buf)
            .map_err(CryptoError::Stream)?;
        Ok(buf)
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.free.push(buf);
    }

    fn next(&mut self) -> Result<Option<Chunk>, CryptoError> {
        if self.finished {
            return Ok(None);
        }
        let cur = match self.ahead.take() {
            Some(b) => b,
            None => self.fill()?,
        };
        let last = if cur.len() < self.size {
            true
        } else {
            let next = self.fill()?;
            if next.is_empty() {
                self.recycle(next);
                true
            } else {
                self.ahead = Some(next);
                false
            }
        };
        self.finished = last;
        let index = self.next_index;
        if index >= MAX_CHUNKS {
            return Err(CryptoError::Invalid(format!(
                "more than {MAX_CHUNKS} chunks: use a larger chunk size"
            )));
        }
        self.next_index += 1;
        Ok(Some(Chunk {
            index,
            last,
            buf: cur,
        }))
    }

    fn batch(&mut self, max: usize) -> Result<Vec<Chunk>, CryptoError> {
        let mut out = Vec::with_capacity(max);
        while out.len() < max {
            match self.next()? {
                Some(c) => out.push(c),
                None => break,
            }
        }
        Ok(out)
    }
}

/// Run `f` on every chunk of `chunks` with `helpers` scoped threads plus the
/// calling thread, which first runs `io` (so I/O overlaps the crypto) and
/// then takes chunks too. Chunks are handed out one at a time from a shared
/// queue, so a thread busy with I/O does not hold back the batch. The error
/// of the lowest failing chunk index wins.
fn process_batch<F, T>(
    chunks: &mut [Chunk],
    helpers: usize,
    f: &F,
    io: impl FnOnce() -> T,
) -> (Result<(), CryptoError>, T)
where
    F: Fn(&mut Chunk) -> Result<(), CryptoError> + Sync,
{
    let queue = Mutex::new(chunks.iter_mut());
    let failed: Mutex<Option<(u64, CryptoError)>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let work = || {
        while !stop.load(Ordering::Relaxed) {
            let Some(c) = queue.lock().ok().and_then(|mut q| q.next()) else {
                break;
            };
            if let Err(e) = f(c) {
                stop.store(true, Ordering::Relaxed);
                if let Ok(mut slot) = failed.lock()
                    && slot.as_ref().is_none_or(|(i, _)| c.index < *i)
                {
                    *slot = Some((c.index, e));
                }
            }
        }
    };
    let io_result = std::thread::scope(|s| {
        for _ in 0..helpers {
            s.spawn(work);
        }
        let io_result = io();
        work();
        io_result
    });
    let failed = failed.into_inner().unwrap_or_else(|poison| poison.into_inner());
    (failed.map_or(Ok(()), |(_, e)| Err(e)), io_result)
}

/// Write processed chunks in order and hand their buffers back to the reader.
fn write_chunks<R: Read, W: Write>(
    chunks: Vec<Chunk>,
    writer: &mut W,
    reader: &mut ChunkReader<R>,
    written: &mut impl FnMut(&Chunk),
) -> Result<(), CryptoError> {
    for c in chunks {
        writer.write_all(&c.buf).map_err(CryptoError::Stream)?;
        written(&c);
        reader.recycle(c.buf);
    }
    Ok(())
}

/// Read → `f` on every chunk → write, in order. With several workers it is
/// a three-stage pipeline: while helper threads process batch N, the calling
/// thread writes batch N-1 and reads batch N+1, then helps with batch N.
/// A batch is written only after all of its chunks succeeded.
fn run_chunks<R: Read, W: Write, F>(
    reader: &mut ChunkReader<R>,
    writer: &mut W,
    workers: usize,
    f: F,
    mut written: impl FnMut(&Chunk),
) -> Result<(), CryptoError>
where
    F: Fn(&mut Chunk) -> Result<(), CryptoError> + Sync,
{
    if workers <= 1 {
        while let Some(mut c) = reader.next()? {
            f(&mut c)?;
            write_chunks(vec![c], writer, reader, &mut written)?;
        }
        return Ok(());
    }
    let batch = workers * 2;
    let mut done: Vec<Chunk> = Vec::new();
    let mut cur = reader.batch(batch)?;
    while !cur.is_empty() {
        let to_write = std::mem::take(&mut done);
        let (crypto, next) = process_batch(&mut cur, workers - 1, &f, || {
            write_chunks(to_write, writer, reader, &mut written).and_then(|()| reader.batch(batch))
        });
        crypto?;
        let next = next?;
        done = cur;
        cur = next;
    }
    write_chunks(done, writer, reader, &mut written)
}

/// Encrypt everything `reader` yields into `writer` as one object wrapped
/// by the keyring's current KEK.
pub fn encrypt_stream<R: Read, W: Write>(
    keyring: &Keyring,
    reader: R,
    mut writer: W,
    opts: &StreamOptions,
) -> Result<StreamSummary, CryptoError> {
    if !(MIN_CHUNK_EXP..=MAX_CHUNK_EXP).contains(&opts.chunk_exp) {
        return Err(CryptoError::Invalid(format!(
            "chunk size exponent {} is outside {MIN_CHUNK_EXP}..={MAX_CHUNK_EXP}",
            opts.chunk_exp
        )));
    }
    let (dek, wrapped) = keyring.new_data_key()?;
    let mut params = [0u8; PARAMS_LEN];
    params[..7].copy_from_slice(MAGIC);
    params[7] = FORMAT_VERSION;
    params[8] = opts.chunk_exp;
    super::fill_random(&mut params[9..16])?;
    let check = key_check(&dek, &params[..16])?.finalize().into_bytes();
    params[16..48].copy_from_slice(&check);
    let header = Header { params, wrapped };
    writer
        .write_all(&header.to_bytes())
        .map_err(CryptoError::Stream)?;

    let cipher = Aes256Gcm::new(dek.bytes().into());
    let mut reader = ChunkReader::new(reader, header.chunk_size());
    let mut summary = StreamSummary {
        plaintext_bytes: 0,
        chunks: 0,
        kek_version: header.kek_version(),
    };
    run_chunks(
        &mut reader,
        &mut writer,
        opts.workers(),
        |c| {
            let tag = cipher
                .encrypt_inout_detached(
                    &header.nonce(c.index, c.last),
                    &header.aad(c.index, c.last),
                    c.buf.as_mut_slice().into(),
                )
                .map_err(|_| CryptoError::Invalid("AES-GCM refused a chunk".into()))?;
            c.buf.extend_from_slice(&tag);
            Ok(())
        },
        |c| {
            summary.plaintext_bytes += (c.buf.len() - TAG_LEN) as u64;
            summary.chunks += 1;
        },
    )?;
    writer.flush().map_err(CryptoError::Stream)?;
    Ok(summary)
}

fn open_chunk(cipher: &Aes256Gcm, header: &Header, c: &mut Chunk) -> Result<(), CryptoError> {
    let fault = |fault| CryptoError::Chunk {
        index: c.index,
        offset: header.chunk_offset(c.index),
        fault,
    };
    if c.buf.len() < TAG_LEN {
        return Err(fault(if c.buf.is_empty() {
            ChunkFault::Truncated
        } else {
            ChunkFault::Incomplete
        }));
    }
    let ct_len = c.buf.len() - TAG_LEN;
    let (ct, tag) = c.buf.split_at_mut(ct_len);
    let tag = Tag::try_from(&*tag).map_err(|_| fault(ChunkFault::Corrupted))?;
    let attempt = |ct: &mut [u8], last: bool| {
        cipher
            .decrypt_inout_detached(
                &header.nonce(c.index, last),
                &header.aad(c.index, last),
                ct.into(),
                &tag,
            )
            .is_ok()
    };
    if attempt(ct, c.last) {
        c.buf.truncate(ct_len);
        return Ok(());
    }
    // Diagnose: a chunk that authenticates with the other final flag was
    // cut off after (truncation) or has data appended after it. A failed
    // attempt leaves the buffer untouched (the tag is checked first).
    Err(fault(if attempt(ct, !c.last) {
        if c.last {
            ChunkFault::Truncated
        } else {
            ChunkFault::TrailingData
        }
    } else {
        ChunkFault::Corrupted
    }))
}

/// Decrypt one object from `reader` into `writer`. Each chunk is written only
/// after it authenticated, but the object is complete and authentic only if
/// this returns `Ok`: discard the output otherwise.
pub fn decrypt_stream<R: Read, W: Write>(
    keyring: &Keyring,
    mut reader: R,
    mut writer: W,
    opts: &StreamOptions,
) -> Result<StreamSummary, CryptoError> {
    let header = Header::read_from(&mut reader)?;
    let dek = keyring.unwrap(&header.wrapped)?;
    check_key(&header, &dek)?;
    let cipher = Aes256Gcm::new(dek.bytes().into());
    let mut reader = ChunkReader::new(reader, header.chunk_size() + TAG_LEN);
    let mut summary = StreamSummary {
        plaintext_bytes: 0,
        chunks: 0,
        kek_version: header.kek_version(),
    };
    run_chunks(
        &mut reader,
        &mut writer,
        opts.workers(),
        |c| open_chunk(&cipher, &header, c),
        |c| {
            summary.plaintext_bytes += c.buf.len() as u64;
            summary.chunks += 1;
        },
    )?;
    writer.flush().map_err(CryptoError::Stream)?;
    Ok(summary)
}

/// Encrypt a small object in memory.
pub fn seal(keyring: &Keyring, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(plaintext.len() + 128);
    encrypt_stream(keyring, plaintext, &mut out, &StreamOptions::single_threaded())?;
    Ok(out)
}

/// Decrypt a small object in memory.
pub fn open(keyring: &Keyring, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(sealed.len());
    decrypt_stream(keyring, sealed, &mut out, &StreamOptions::single_threaded())?;
    Ok(out)
}

/// A header after [`rewrap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    pub header: Header,
    /// The KEK version that wrapped the data key before.
    pub from: u32,
    /// The KEK version that wraps it now (the keyring's current version).
    pub to: u32,
}

impl Rewrapped {
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

/// Re-wrap an object's data key under the keyring's current KEK. Only the
/// key block changes; the chunks stay valid because they authenticate the
/// content parameters, not the key block. A header already on the current
/// version is returned unchanged (no KMS call).
pub fn rewrap(header: &Header, keyring: &Keyring) -> Result<Rewrapped, CryptoError> {
    let from = header.kek_version();
    let to = keyring.current_version();
    if from == to {
        return Ok(Rewrapped {
            header: header.clone(),
            from,
            to,
        });
    }
    let dek = keyring.unwrap(&header.wrapped)?;
    check_key(header, &dek)?;
    let wrapped = keyring.wrap(&dek)?;
    if wrapped.bytes.len() > MAX_WRAPPED {
        return Err(CryptoError::Invalid(format!(
            "the new wrapped key is {} bytes (at most {MAX_WRAPPED})",
            wrapped.bytes.len()
        )));
    }
    Ok(Rewrapped {
        header: Header {
            params: header.params,
            wrapped,
        },
        from,
        to,
    })
}

/// [`rewrap`] for an object held in memory (e.g. a sealed store file).
pub fn rewrap_bytes(sealed: &[u8], keyring: &Keyring) -> Result<(Vec<u8>, Rewrapped), CryptoError> {
    let mut r = sealed;
    let header = Header::read_from(&mut r)?;
    let re = rewrap(&header, keyring)?;
    let mut out = re.header.to_bytes();
    out.extend_from_slice(r);
    Ok((out, re))
}

/// Temporary sibling of `path` for an atomic replace.
fn temp_beside(path: &Path, what: &str) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}.{}", std::process::id()))
}

/// Write `fill`'s output to a temporary sibling of `dst` with `mode`, fsync,
/// rename over `dst`, fsync the folder. On error nothing is left behind.
fn replace_atomically<T>(
    dst: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> Result<T, CryptoError>,
) -> Result<T, CryptoError> {
    let tmp = temp_beside(dst, "tmp");
    let io_err = |source| CryptoError::Io {
        path: dst.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err)?;
        let out = fill(&mut f)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        fs::rename(&tmp, dst).map_err(io_err)?;
        if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err)?;
        }
        Ok(out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Rewrap an encrypted file in place: a new header followed by the very
/// same chunk bytes (copied by the kernel, `copy_file_range`, not
/// re-encrypted), replacing the file atomically with its mode kept.
pub fn rewrap_file(path: &Path, keyring: &Keyring) -> Result<Rewrapped, CryptoError> {
    let inner = || {
        let io_err = |source| CryptoError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut src = fs::File::open(path).map_err(io_err)?;
        let mode = src.metadata().map_err(io_err)?.permissions().mode() & 0o7777;
        let header = Header::read_from(&mut src)?;
        let re = rewrap(&header, keyring)?;
        if !re.changed() {
            return Ok(re);
        }
        replace_atomically(path, mode, |dst| {
            dst.write_all(&re.header.to_bytes()).map_err(io_err)?;
            io::copy(&mut src, dst).map_err(io_err)?;
            Ok(())
        })?;
        Ok(re)
    };
    inner().map_err(|e: CryptoError| match e {
        e @ CryptoError::Io { .. } => e,
        e => e.in_file(path),
    })
}

/// Encrypt the file `src` into `dst` (mode 0600), atomically.
pub fn encrypt_file(
    keyring: &Keyring,
    src: &Path,
    dst: &Path,
    opts: &StreamOptions,
) -> Result<StreamSummary, CryptoError> {
    let input = fs::File::open(src).map_err(|source| CryptoError::Io {
        path: src.to_path_buf(),
        source,
    })?;
    replace_atomically(dst, 0o600, |out| {
        encrypt_stream(keyring, io::BufReader::with_capacity(1 << 16, input), out, opts)
    })
    .map_err(|e| match e {
        e @ CryptoError::Io { .. } => e,
        e => e.in_file(src),
    })
}

/// Decrypt the file `src` into `dst` (mode 0600), atomically: `dst`
/// appears only if the whole object authenticated.
pub fn decrypt_file(
    keyring: &Keyring,
    src: &Path,
    dst: &Path,
    opts: &StreamOptions,
) -> Result<StreamSummary, CryptoError> {
    let input = fs::File::open(src).map_err(|source| CryptoError::Io {
        path: src.to_path_buf(),
        source,
    })?;
    replace_atomically(dst, 0o600, |out| {
        decrypt_stream(keyring, io::BufReader::with_capacity(1 << 16, input), out, opts)
    })
    .map_err(|e| match e {
        e @ CryptoError::Io { .. } => e,
        e => e.in_file(src),
    })
}
