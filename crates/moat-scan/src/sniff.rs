//! Format detection by content, never by extension.
//!
//! A file's name says what its author wants us to believe; its bytes say what
//! a loader will actually do with it. Binary formats are recognised by their
//! magic bytes in the first [`HEAD_LEN`] bytes; JSON, text and protocol-0/1
//! pickles (which are plain ASCII) need the content, so files up to
//! [`MAX_CONTENT_LEN`] are read whole. Bigger files are streamed once to
//! decide text versus binary and never held in memory.

mod pickle;

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// How many leading bytes the magic-number checks look at (a tar header is
/// one 512-byte block).
pub const HEAD_LEN: usize = 512;

/// Files up to this size are read whole (JSON parsing, HF config rules);
/// bigger ones are never parsed as JSON.
pub const MAX_CONTENT_LEN: u64 = 64 * 1024 * 1024;

/// How much of an oversized file the pickle recogniser looks at.
const PICKLE_WINDOW: usize = 1024 * 1024;

/// Read size when streaming an oversized file.
const CHUNK: usize = 1024 * 1024;

/// What a file is, judged by its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Safetensors,
    Json,
    Text,
    Pickle,
    Zip,
    Gzip,
    Gguf,
    Numpy,
    Tar,
    Zlib,
    #[serde(rename = "7z")]
    SevenZip,
    #[serde(rename = "torch-legacy")]
    TorchLegacy,
    Unknown,
    /// ONNX protobuf (only after a full successful walk; see [`crate::onnx`]).
    Onnx,
    /// HDF5 (legacy Keras `.h5`).
    Hdf5,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Json => "json",
            Format::Text => "text",
            Format::Pickle => "pickle",
            Format::Zip => "zip",
            Format::Gzip => "gzip",
            Format::Gguf => "gguf",
            Format::Numpy => "numpy",
            Format::Tar => "tar",
            Format::Zlib => "zlib",
            Format::SevenZip => "7z",
            Format::TorchLegacy => "torch-legacy",
            Format::Unknown => "unknown",
            Format::Onnx => "onnx",
            Format::Hdf5 => "hdf5",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Recognises binary formats from the first bytes of a file; `None` means
/// "not a known magic, look at the content".
///
/// Safetensors has no magic: it starts with a little-endian u64 header length
/// followed by `{`. We take "byte 8 is `{` and bytes 5..8 are zero" (so the
/// declared length is below 2^40, which every real header is by far) as the
/// signature. The zero bytes keep ordinary JSON such as `{"cfg": {` from
/// looking like safetensors, and cannot be valid UTF-8 text either way.
/// A file that is both this shape and a pickle cannot do harm: bytes 5..8
/// would be opcode 0x00, which every unpickler rejects before byte 5.
pub fn sniff_magic(head: &[u8]) -> Option<Format> {
    if looks_like_safetensors(head) {
        return Some(Format::Safetensors);
    }
    if crate::container::torch::is_legacy(head) {
        return Some(Format::TorchLegacy);
    }
    match head {
        // PROTO opcode; protocols 2..=5 are what Python writes, 0 and 1 are
        // accepted by unpicklers too, so they are refused the same way.
        [0x80, proto, ..] if *proto <= 5 => Some(Format::Pickle),
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] | [b'P', b'K', 7, 8, ..] => Some(Format::Zip),
        [0x1f, 0x8b, ..] => Some(Format::Gzip),
        [b'G', b'G', b'U', b'F', ..] => Some(Format::Gguf),
        [0x93, b'N', b'U', b'M', b'P', b'Y', ..] => Some(Format::Numpy),
        [b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c, ..] => Some(Format::SevenZip),
        // HDF5 at offset 0; user-block offsets are checked on the content.
        [0x89, b'H', b'D', b'F', b'\r', b'\n', 0x1a, b'\n', ..] => Some(Format::Hdf5),
        _ if crate::container::tar::looks_like_tar(head) => Some(Format::Tar),
        // A candidate only: the scan walks the whole protobuf and treats
        // the file as unknown binary if the walk fails.
        _ if crate::onnx::looks_like_onnx(head) => Some(Format::Onnx),
        _ if crate::container::compress::looks_like_zlib(head) => Some(Format::Zlib),
        _ => None,
    }
}

fn looks_like_safetensors(head: &[u8]) -> bool {
    matches!(head, [_, _, _, _, _, 0, 0, 0, b'{', ..])
}

/// Classifies a whole file held in memory.
pub fn sniff_bytes(data: &[u8]) -> Format {
    if let Some(format) = sniff_magic(data) {
        return format;
    }
    if crate::keras::is_hdf5(data) {
        return Format::Hdf5;
    }
    if data.len() as u64 <= MAX_CONTENT_LEN && is_json(data) {
        return Format::Json;
    }
    if pickle::looks_like_pickle(data, true) {
        return Format::Pickle;
    }
    if is_text(data) {
        return Format::Text;
    }
    Format::Unknown
}

/// The result of [`sniff_reader`]: the format and, for files small enough to
/// be read whole (and not recognised by magic), their content, so callers can
/// apply content rules without reading the file twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sniffed {
    pub format: Format,
    pub content: Option<Vec<u8>>,
}

/// Classifies a file from a reader positioned at its start.
///
/// Reads at most [`HEAD_LEN`] bytes for binary formats; otherwise reads up to
/// [`MAX_CONTENT_LEN`] into memory, and streams anything bigger in chunks.
pub fn sniff_reader<R: Read>(reader: &mut R) -> io::Result<Sniffed> {
    let mut head = Vec::with_capacity(HEAD_LEN);
    reader.by_ref().take(HEAD_LEN as u64).read_to_end(&mut head)?;
    if let Some(format) = sniff_magic(&head) {
        return Ok(Sniffed {
            format,
            content: None,
        });
    }

    let mut content = head;
    reader
        .by_ref()
        .take(MAX_CONTENT_LEN + 1 - content.len() as u64)
        .read_to_end(&mut content)?;
    if content.len() as u64 <= MAX_CONTENT_LEN {
        let format = sniff_bytes(&content);
        return Ok(Sniffed {
            format,
            content: Some(content),
        });
    }

    if crate::keras::is_hdf5(&content) {
        return Ok(Sniffed {
            format: Format::Hdf5,
            content: None,
        });
    }
    // Oversized: never JSON. A pickle is recognised from its first opcodes;
    // text must be valid UTF-8 without NUL all the way to the end.
    let window = content.get(..PICKLE_WINDOW).unwrap_or(&content);
    if pickle::looks_like_pickle(window, false) {
        return Ok(Sniffed {
            format: Format::Pickle,
            content: None,
        });
    }
    let mut text = TextCheck::default();
    text.feed(&content);
    drop(content);
    let mut chunk = vec![0u8; CHUNK];
    while text.ok {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        text.feed(chunk.get(..n).unwrap_or(&[]));
    }
    let format = if text.finish() {
        Format::Text
    } else {
        Format::Unknown
    };
    Ok(Sniffed {
        format,
        content: None,
    })
}

/// First non-whitespace byte opens an object or array, and the whole input
/// parses as JSON (without building a tree).
fn is_json(data: &[u8]) -> bool {
    let first = data.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    matches!(first, Some(b'{' | b'[')) && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

/// Valid UTF-8 without NUL bytes.
pub fn is_text(data: &[u8]) -> bool {
    !data.contains(&0) && std::str::from_utf8(data).is_ok()
}

/// Incremental [`is_text`] for data that arrives in chunks: a multi-byte
/// character split across two chunks is carried over, not rejected.
#[derive(Debug)]
struct TextCheck {
    ok: bool,
    carry: Vec<u8>,
}

impl Default for TextCheck {
    fn default() -> Self {
        TextCheck {
            ok: true,
            carry: Vec::new(),
        }
    }
}

impl TextCheck {
    fn feed(&mut self, chunk: &[u8]) {
        if !self.ok {
            return;
        }
        if chunk.contains(&0) {
            self.ok = false;
            return;
        }
        // Complete the character left over from the previous chunk (at most
        // 3 bytes), then validate the rest of this chunk in place.
        let mut rest = chunk;
        if !self.carry.is_empty() {
            let take = rest.len().min(4 - self.carry.len().min(4));
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(rest.get(..take).unwrap_or(&[]));
            match std::str::from_utf8(&joined) {
                Ok(_) => rest = rest.get(take..).unwrap_or(&[]),
                Err(e) if e.error_len().is_some() => {
                    self.ok = false;
                    return;
                }
                Err(e) if e.valid_up_to() == 0 => {
                    // Still incomplete: this chunk was tiny.
                    self.carry = joined;
                    return;
                }
                Err(e) => {
                    // The carried character completed; continue right after it.
                    let used = e.valid_up_to() - (joined.len() - take);
                    rest = rest.get(used..).unwrap_or(&[]);
                }
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => {
                self.carry = rest.get(e.valid_up_to()..).unwrap_or(&[]).to_vec();
            }
            Err(_) => self.ok = false,
        }
    }

    fn finish(self) -> bool {
        self.ok && self.carry.is_empty()
    }
}

#[cfg(test)]
mod tests;
