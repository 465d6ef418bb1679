//! Encryption at rest: AES-256-GCM envelopes under versioned key-encryption
//! keys (KEKs) from a local keyring file or AWS KMS.
//!
//! Every object gets a fresh random 256-bit data key (DEK). The DEK encrypts
//! the object; the current KEK wraps the DEK, and the wrapped DEK travels in
//! the object's header. Rotating the KEK therefore never re-encrypts data:
//! [`rewrap`] unwraps the DEK with the old KEK and wraps it with the new one,
//! replacing only the header's key block. Retiring a KEK version makes every
//! object still wrapped only by it undecryptable, with an error that names
//! the version ([`CryptoError::Retired`]).
//!
//! One format serves small objects ([`seal`] / [`open`], e.g. the API-key
//! store and prompt capture) and multi-GB model blobs ([`encrypt_stream`] /
//! [`decrypt_stream`], Read → Write with bounded memory, chunks processed on
//! all cores). It is the STREAM construction (Hoang, Reyhanitabar, Rogaway,
//! Vizár 2015) as used by age and Tink: fixed-size chunks, each its own
//! AES-256-GCM message whose nonce and associated data carry the chunk index
//! and a final-chunk flag, so truncation, reordering, duplication and
//! swapping chunks between objects are all detected, and a corrupted chunk is
//! named by index and byte offset.
//!
//! # Object format (version 1; integers big-endian)
//!
//! ```text
//! offset  size  field
//!  0       7    magic "MOATENC"
//!  7       1    format version = 1
//!  8       1    chunk size exponent e, 12..=24: chunks of 2^e plaintext bytes
//!                (default 20 = 1 MiB)
//!  9       7    nonce prefix P, random per object
//! 16      32    key check: HMAC-SHA256(DEK, "moat-enc v1 key check" ‖ bytes 0..16)
//! ------------- the 48 bytes above are the "content parameters"; every chunk
//!               authenticates them. The key block below is not authenticated
//!               by the chunks (so it can be replaced by a rewrap); it is
//!               protected by its own AEAD (local) or by KMS, and the key check
//!               ties the unwrapped DEK to this object.
//! 48       4    KEK version v (≥ 1)
//! 52       1    wrap scheme: 1 = local AES-256-GCM, 2 = AWS KMS
//! 53       2    wrapped DEK length n, 1..=1024
//! 55       n    wrapped DEK
//!               scheme 1: nonce (12, random) ‖ AES-256-GCM_KEK(DEK) (32) ‖ tag (16),
//!                 associated data "moat-kek-wrap v1" ‖ v ‖ scheme
//!               scheme 2: the KMS CiphertextBlob from GenerateDataKey (or
//!                 Encrypt, after a rewrap), encryption context
//!                 {"moat:purpose": "data-key", "moat:kek-version": "v"}
//! 55+n          chunks 0, 1, …, k-1, each ciphertext ‖ 16-byte GCM tag
//! ```
//!
//! Chunk i holds plaintext bytes [i·2^e, (i+1)·2^e); every chunk but the last
//! is full, the last holds 1..=2^e bytes (0 only for empty input, which is one
//! empty final chunk). Chunk i is AES-256-GCM under the DEK with
//!
//! ```text
//! nonce = P (7) ‖ i as u32 (4) ‖ f (1)        f = 1 for the final chunk, else 0
//! aad   = content parameters (48) ‖ i as u64 (8) ‖ f (1)
//! ```
//!
//! so a stream holds at most 2^32 chunks (4 PiB at 1 MiB). Since the DEK is
//! fresh per object, nonces never repeat under one key.
//!
//! Streaming decryption writes a chunk only after its tag has verified, but a
//! truncation can only be seen at the end: treat output as untrusted until
//! [`decrypt_stream`] returns `Ok` (write to a temporary file, rename after).
//!
//! # Keys
//!
//! The keyring file ([`KeyringFile`]) lists KEK versions; each is a local
//! 256-bit key or a reference to an AWS KMS key. See [`keyring`] and [`kms`].

pub mod keyring;
pub mod kms;
pub(crate) mod sigv4;
mod stream;

pub use keyring::{KekInfo, KekKind, Keyring, KeyringFile, NewKek};
pub use kms::{AwsCredentials, KmsClient, KmsConfig};
pub use stream::{
    DEFAULT_CHUNK_EXP, Header, Rewrapped, StreamOptions, StreamSummary, WrapScheme, decrypt_file,
    decrypt_stream, encrypt_file, encrypt_stream, open, rewrap, rewrap_bytes, rewrap_file, seal,
};

use std::fmt;
use std::io;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// Load the keyring at `path`, with an AWS KMS client (configured from
/// `env`: `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …) when any usable version
/// lives in KMS. The one way every consumer (serve, CLI) opens a keyring.
pub fn load_keyring(
    path: &std::path::Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Keyring, CryptoError> {
    let keyring = KeyringFile::new(path).load()?;
    if keyring.needs_kms() {
        let config = KmsConfig::from_env(env)?;
        return Ok(keyring.with_kms(KmsClient::new(config)?));
    }
    Ok(keyring)
}

/// A 256-bit secret key (a KEK or a DEK): wiped on drop, never printed.
#[derive(Clone)]
pub(crate) struct Key32(Zeroizing<[u8; 32]>);

impl Key32 {
    pub(crate) fn random() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        fill_random(k.as_mut())?;
        Ok(Self(k))
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key32(<redacted>)")
    }
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// What is wrong with one chunk of an encrypted stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFault {
    /// The tag did not verify: the chunk was modified, moved (reordered,
    /// duplicated) or comes from another object.
    Corrupted,
    /// The stream ends after this chunk, but it is not the final chunk.
    Truncated,
    /// This is the final chunk, but more data follows it.
    TrailingData,
    /// The data ends inside this chunk, before its tag.
    Incomplete,
}

impl fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkFault::Corrupted => {
                "authentication failed: the chunk was modified, reordered, or comes from another object"
            }
            ChunkFault::Truncated => {
                "the data ends after this chunk, but it is not the final chunk: the object is truncated"
            }
            ChunkFault::TrailingData => {
                "this is the final chunk, but more data follows it: bytes were appended"
            }
            ChunkFault::Incomplete => "the data ends inside this chunk: the object is truncated",
        })
    }
}

/// Errors of the crypto module. Messages name the file, KEK version, chunk
/// index and byte offset; they never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Reading the input or writing the output of a stream failed.
    #[error("{0}")]
    Stream(#[source] io::Error),
    /// An error in one named file (encrypt/decrypt/rewrap of a file).
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: Box<CryptoError>,
    },
    #[error("{path}: invalid keyring: {message}")]
    Keyring { path: PathBuf, message: String },
    #[error(
        "{path}: mode {mode:03o} lets group or others access the keyring; it must be 0600 (chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: no keyring here; create one with `moat keys rotate-kek --keyring {path}`")]
    NoKeyring { path: PathBuf },
    #[error("KEK version {0} is not in the keyring")]
    UnknownKek(u32),
    #[error(
        "KEK version {version} is retired: data whose key is wrapped only by it can no longer be decrypted (rewrap objects with `moat keys rewrap` before retiring a version)"
    )]
    Retired { version: u32 },
    /// The header is not a valid moat encrypted-object header.
    #[error("not a moat encrypted object: {0}")]
    Format(String),
    #[error("cannot unwrap the data key with KEK version {version}: {reason}")]
    Unwrap { version: u32, reason: String },
    #[error(
        "the data key does not belong to this object (its key check does not match): the header's key block was replaced or corrupted"
    )]
    KeyCheck,
    #[error("chunk {index} at byte offset {offset}: {fault}")]
    Chunk {
        index: u64,
        offset: u64,
        fault: ChunkFault,
    },
    #[error("AWS KMS {operation}: {message}")]
    Kms {
        operation: &'static str,
        message: String,
    },
    #[error("cannot get random bytes from the OS: {0}")]
    Random(String),
    #[error("{0}")]
    Invalid(String),
}

impl CryptoError {
    /// The chunk index and byte offset, if this error is about one chunk.
    pub fn chunk(&self) -> Option<(u64, u64, ChunkFault)> {
        match self {
            CryptoError::Chunk { index, offset, fault } => Some((*index, *offset, *fault)),
            CryptoError::File { source, .. } => source.chunk(),
            _ => None,
        }
    }

    /// The retired KEK version this error is about, if any.
    pub fn retired_version(&self) -> Option<u32> {
        match self {
            CryptoError::Retired { version } => Some(*version),
            CryptoError::File { source, .. } => source.retired_version(),
            _ => None,
        }
    }

    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        CryptoError::File {
            path: path.into(),
            source: Box::new(self),
        }
    }
}

/// Whether AES-GCM runs on hardware instructions here: AES (AES-NI, and
/// VAES when present, on x86-64; the AES extension on aarch64) as the `aes`
/// crate reports it, and carry-less multiply for GHASH (PCLMULQDQ + AVX on
/// x86-64, PMULL on aarch64), which `polyval` detects the same way. Both
/// crates pick their backend at run time, so no RUSTFLAGS are needed.
pub fn hardware_acceleration() -> bool {
    #[cfg(target_arch = "x86_64")]
    let clmul =
        std::arch::is_x86_feature_detected!("pclmulqdq") && std::arch::is_x86_feature_detected!("avx");
    #[cfg(target_arch = "aarch64")]
    let clmul = std::arch::is_aarch64_feature_detected!("aes");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let clmul = false;
    aes_gcm::aes::hardware_accelerated() && clmul
}
