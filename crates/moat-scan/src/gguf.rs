//! Strict validation of GGUF files (llama.cpp's weight format), headers only.
//!
//! GGUF carries no code, but its header is parsed by C++ (llama.cpp, and
//! everything built on it) where a wrong length or offset has meant heap
//! overflows, and its metadata carries the chat template that a Jinja engine
//! later renders (CVE-2024-34359). So the header is held to every rule
//! llama.cpp's `gguf.cpp` enforces, plus explicit caps, and each chat template
//! goes through [`crate::template`].
//!
//! Layout (v2 and v3, little-endian): magic `GGUF`, u32 version, u64 tensor
//! count, u64 KV count, the KVs (`string key, u32 type, value`), the tensor
//! infos (`string name, u32 n_dims, i64 dims[n_dims], u32 ggml type, u64
//! offset`), padding to `general.alignment`, then the tensor data. Only the
//! header is read: the data section is checked from the file length alone, so
//! the cost does not grow with tensor bytes. Every length is checked against a
//! named cap and against the bytes left in the file before anything is read
//! or allocated; all arithmetic is checked.
//!
//! Trailing bytes: llama.cpp ignores bytes after the last tensor. moat does
//! not: bytes after the padded end of the data could make the file a polyglot
//! (a zip central directory at the end makes `torch.load` see a checkpoint),
//! so they are a finding.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::report::{Finding, Severity, quote};
use crate::template;

/// Stable rule ids.
pub mod rule {
    pub const VERSION: &str = "gguf.version";
    pub const TRUNCATED: &str = "gguf.truncated";
    pub const LIMIT: &str = "gguf.limit";
    pub const KV: &str = "gguf.kv";
    pub const DUPLICATE: &str = "gguf.duplicate";
    pub const ALIGNMENT: &str = "gguf.alignment";
    pub const TENSOR: &str = "gguf.tensor";
    pub const TYPE: &str = "gguf.type";
    pub const DIMS: &str = "gguf.dims";
    pub const OFFSETS: &str = "gguf.offsets";
    pub const FILE_LENGTH: &str = "gguf.file-length";
    pub const TRAILING: &str = "gguf.trailing-data";
    pub const IO_READ: &str = "io.read";
}

/// Most tensors a header may declare (real models have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 17;
/// Most metadata KVs a header may declare (real models have under 100).
pub const MAX_KVS: u64 = 1 << 16;
/// Longest string value (chat templates are kilobytes).
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Longest key; the GGUF spec limits keys to 65535 bytes.
pub const MAX_KEY_LEN: u64 = 65_535;
/// Most elements of one array (vocabularies and merges: a few hundred thousand).
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// llama.cpp's GGML_MAX_NAME (64, NUL included): longer names are refused.
pub const MAX_TENSOR_NAME_LEN: u64 = 63;
/// llama.cpp's GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
/// `general.alignment` when absent (GGUF_DEFAULT_ALIGNMENT).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest accepted `general.alignment`.
pub const MAX_ALIGNMENT: u64 = 1 << 20;

const ALIGNMENT_KEY: &str = "general.alignment";
const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// GGUF value types (`gguf_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Byte size of a fixed-size GGUF value type; `None` for string, array and
/// unknown types.
fn fixed_size(t: u32) -> Option<u64> {
    Some(match t {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        _ => return None,
    })
}

/// One ggml tensor type: its name, elements per block, bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub name: &'static str,
    pub block_size: u64,
    pub type_size: u64,
}

/// ggml's type traits table (ggml.c `type_traits`), for the ids that exist
/// today. Removed ids (4, 5, 31..=33, 36..=38) are unknown, as in llama.cpp.
pub fn ggml_type(id: u32) -> Option<GgmlType> {
    let (name, block_size, type_size) = match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    };
    Some(GgmlType {
        name,
        block_size,
        type_size,
    })
}

/// One tensor as the header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Relative to the start of the data section.
    pub offset: u64,
    /// Bytes, from the dims and the type.
    pub size: u64,
    /// Where this tensor's info starts in the file.
    pub info_offset: u64,
}

/// A chat template found in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub key: String,
    pub source: String,
    /// Where the string value starts in the file.
    pub offset: u64,
}

/// What a header that parsed holds (findings may still apply to it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub version: u32,
    pub kv_count: u64,
    pub alignment: u64,
    pub tensors: Vec<TensorInfo>,
    pub templates: Vec<ChatTemplate>,
    /// Where the data section starts (end of header, aligned).
    pub data_start: u64,
}

/// Why parsing stopped.
#[derive(Debug)]
enum Stop {
    /// The header is malformed; this finding says where.
    Malformed(Finding),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

fn malformed(rule: &'static str, message: impl Into<String>, offset: u64) -> Stop {
    Stop::Malformed(Finding::new(
        rule,
        Severity::Critical,
        message,
        format!("offset {offset}"),
    ))
}

/// A position-tracking reader that refuses to read past the file length, so
/// a declared length can never make it read (or allocate) more than exists.
struct Cursor<R> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Cursor<R> {
    fn need(&self, n: u64, what: &str) -> Result<(), Stop> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(malformed(
                rule::TRUNCATED,
                format!(
                    "{what} needs {n} bytes but the file ends {} bytes later",
                    self.len.saturating_sub(self.pos)
                ),
                self.pos,
            )),
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Stop> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Stop> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Stop> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), Stop> {
        self.need(n, what)?;
        let delta = i64::try_from(n).map_err(|_| malformed(rule::LIMIT, "skip too large", self.pos))?;
        self.inner.seek_relative(delta)?;
        self.pos += n;
        Ok(())
    }

    /// Reads `n` bytes (already capped by the caller).
    fn vec(&mut self, n: u64, what: &str) -> Result<Vec<u8>, Stop> {
        self.need(n, what)?;
        let n_usize = usize::try_from(n).map_err(|_| malformed(rule::LIMIT, "length too large", self.pos))?;
        let mut buf = vec![0u8; n_usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += n;
        Ok(buf)
    }

    /// A GGUF string's u64 length, checked against the cap `max`; returns
    /// the offset of the length field and the length.
    fn string_len(&mut self, max: u64, what: &str) -> Result<(u64, u64), Stop> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > max {
            return Err(malformed(
                rule::LIMIT,
                format!("{what} is {n} bytes long; the limit is {max}"),
                at,
            ));
        }
        Ok((at, n))
    }

    /// A GGUF string: u64 length, then that many bytes; `max` is the cap.
    /// Returns the offset of the length field and the bytes.
    fn string(&mut self, max: u64, what: &str) -> Result<(u64, Vec<u8>), Stop> {
        let (at, n) = self.string_len(max, what)?;
        Ok((at, self.vec(n, what)?))
    }

    /// Skips a GGUF string after checking its length against `max`.
    fn skip_string(&mut self, max: u64, what: &str) -> Result<(), Stop> {
        let (_, n) = self.string_len(max, what)?;
        self.skip(n, what)
    }
}

/// Parses and checks a GGUF stream. `Ok` holds the header (when the
/// structure parsed) and every finding, chat template findings included;
/// `Err` is an I/O error, which means nothing is known about the file.
pub fn check<R: Read + Seek>(mut reader: R) -> io::Result<(Option<Header>, Vec<Finding>)> {
    let len = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(0))?;
    let mut cur = Cursor {
        inner: BufReader::with_capacity(64 * 1024, reader),
        pos: 0,
        len,
    };
    let mut findings = Vec::new();
    let header = match parse(&mut cur) {
        Ok(header) => header,
        Err(Stop::Malformed(f)) => return Ok((None, vec![f])),
        Err(Stop::Io(e)) => return Err(e),
    };
    check_layout(&header, len, &mut findings);
    for t in &header.templates {
        let location = format!("key {} at offset {}", quote(&t.key), t.offset);
        findings.extend(template::check(&t.source, &location));
    }
    Ok((Some(header), findings))
}

/// Opens and checks a file; I/O failures become an `io.read` finding and
/// `Err`, so the caller can give the file the verdict `error`.
pub fn check_file(path: &Path) -> Result<Vec<Finding>, Vec<Finding>> {
    let io_err = |e: io::Error| {
        vec![Finding::new(
            rule::IO_READ,
            Severity::High,
            format!("cannot read the file: {e}"),
            "",
        )]
    };
    let file = File::open(path).map_err(io_err)?;
    check(file).map(|(_, findings)| findings).map_err(io_err)
}

/// Entry point for cargo-fuzz: any byte string, taken as a whole file, must
/// be judged without panicking, overflowing or allocating from an unchecked
/// length.
pub fn fuzz_gguf(data: &[u8]) {
    let _ = check(io::Cursor::new(data));
}

fn parse<R: Read + Seek>(cur: &mut Cursor<R>) -> Result<Header, Stop> {
    let magic = cur.bytes::<4>("the magic")?;
    if &magic != b"GGUF" {
        return Err(malformed(rule::VERSION, "the file does not start with 'GGUF'", 0));
    }
    let version = cur.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(malformed(
                rule::VERSION,
                "GGUF version 1 (32-bit counts) is obsolete and no longer loaded by llama.cpp",
                4,
            ));
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(malformed(
                rule::VERSION,
                "big-endian GGUF: llama.cpp on little-endian hosts misreads every length in it",
                4,
            ));
        }
        v => return Err(malformed(rule::VERSION, format!("unknown GGUF version {v}"), 4)),
    }
    let tensor_count = cur.u64("the tensor count")?;
    if tensor_count > MAX_TENSORS {
        return Err(malformed(
            rule::LIMIT,
            format!("the header declares {tensor_count} tensors; the limit is {MAX_TENSORS}"),
            8,
        ));
    }
    let kv_count = cur.u64("the KV count")?;
    if kv_count > MAX_KVS {
        return Err(malformed(
            rule::LIMIT,
            format!("the header declares {kv_count} metadata keys; the limit is {MAX_KVS}"),
            16,
        ));
    }

    let mut header = Header {
        version,
        kv_count,
        alignment: DEFAULT_ALIGNMENT,
        ..Header::default()
    };
    let mut keys = HashSet::new();
    for _ in 0..kv_count {
        read_kv(cur, &mut keys, &mut header)?;
    }

    let mut names = HashSet::new();
    for _ in 0..tensor_count {
        let info = read_tensor_info(cur)?;
        if !names.insert(info.name.clone()) {
            return Err(malformed(
                rule::DUPLICATE,
                format!(
                    "tensor {} is declared twice; loaders disagree on which one is used",
                    quote(&info.name)
                ),
                info.info_offset,
            ));
        }
        header.tensors.push(info);
    }
    header.data_start = align(cur.pos, header.alignment)
        .ok_or_else(|| malformed(rule::LIMIT, "the data section offset overflows", cur.pos))?;
    Ok(header)
}

fn read_kv<R: Read + Seek>(
    cur: &mut Cursor<R>,
    keys: &mut HashSet<String>,
    header: &mut Header,
) -> Result<(), Stop> {
    let (at, raw) = cur.string(MAX_KEY_LEN, "a metadata key")?;
    let key =
        String::from_utf8(raw).map_err(|_| malformed(rule::KV, "a metadata key is not valid UTF-8", at))?;
    if key.is_empty() {
        return Err(malformed(rule::KV, "a metadata key is empty", at));
    }
    if !keys.insert(key.clone()) {
        return Err(malformed(
            rule::DUPLICATE,
            format!(
                "metadata key {} appears twice; llama.cpp refuses such files",
                quote(&key)
            ),
            at,
        ));
    }
    let type_at = cur.pos;
    let t = cur.u32("a metadata value type")?;
    let value_at = cur.pos;
    let what = format!("the value of {}", quote(&key));

    if key == ALIGNMENT_KEY {
        if t != T_U32 {
            return Err(malformed(
                rule::ALIGNMENT,
                format!("{ALIGNMENT_KEY} must be a u32 (type 4), not type {t}"),
                type_at,
            ));
        }
        let a = u64::from(cur.u32(&what)?);
        if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
            return Err(malformed(
                rule::ALIGNMENT,
                format!("{ALIGNMENT_KEY} is {a}; it must be a power of two up to {MAX_ALIGNMENT}"),
                value_at,
            ));
        }
        header.alignment = a;
        return Ok(());
    }

    let is_template = key == TEMPLATE_KEY
        || key
            .strip_prefix(TEMPLATE_KEY)
            .is_some_and(|rest| rest.starts_with('.'));
    if is_template {
        if t != T_STRING {
            return Err(malformed(
                rule::KV,
                format!("{} must be a string (type 8), not type {t}", quote(&key)),
                type_at,
            ));
        }
        let (_, raw) = cur.string(MAX_STRING_LEN, &what)?;
        let source = String::from_utf8(raw)
            .map_err(|_| malformed(rule::KV, format!("{} is not valid UTF-8", quote(&key)), value_at))?;
        header.templates.push(ChatTemplate {
            key,
            source,
            offset: value_at,
        });
        return Ok(());
    }
    skip_value(cur, t, &what, type_at, true)
}

/// Skips one value of type `t`, checking lengths and (for bools) contents.
fn skip_value<R: Read + Seek>(
    cur: &mut Cursor<R>,
    t: u32,
    what: &str,
    type_at: u64,
    top_level: bool,
) -> Result<(), Stop> {
    if t == T_BOOL {
        let at = cur.pos;
        let [b] = cur.bytes::<1>(what)?;
        if b > 1 {
            return Err(malformed(rule::KV, format!("{what} is a bool with byte {b}"), at));
        }
        return Ok(());
    }
    if let Some(size) = fixed_size(t) {
        return cur.skip(size, what);
    }
    match t {
        T_STRING => cur.skip_string(MAX_STRING_LEN, what),
        T_ARRAY if top_level => {
            let elem_at = cur.pos;
            let elem = cur.u32(what)?;
            let n_at = cur.pos;
            let n = cur.u64(what)?;
            if n > MAX_ARRAY_LEN {
                return Err(malformed(
                    rule::LIMIT,
                    format!("{what} is an array of {n} elements; the limit is {MAX_ARRAY_LEN}"),
                    n_at,
                ));
            }
            if elem == T_ARRAY {
                return Err(malformed(
                    rule::KV,
                    format!("{what} is a nested array, which llama.cpp does not accept"),
                    elem_at,
                ));
            }
            if elem != T_BOOL
                && let Some(size) = fixed_size(elem)
            {
                // n ≤ 2^24 and size ≤ 8: no overflow.
                return cur.skip(n * size, what);
            }
            for _ in 0..n {
                skip_value(cur, elem, what, elem_at, false)?;
            }
            Ok(())
        }
        _ => Err(malformed(
            rule::KV,
            format!("{what} has unknown type {t}"),
            type_at,
        )),
    }
}

fn read_tensor_info<R: Read + Seek>(cur: &mut Cursor<R>) -> Result<TensorInfo, Stop> {
    let info_offset = cur.pos;
    let (_, raw) = cur.string(MAX_TENSOR_NAME_LEN, "a tensor name")?;
    let name = String::from_utf8(raw)
        .map_err(|_| malformed(rule::TENSOR, "a tensor name is not valid UTF-8", info_offset))?;
    let what = format!("tensor {}", quote(&name));
    let dims_at = cur.pos;
    let n_dims = cur.u32(&what)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(malformed(
            rule::DIMS,
            format!("{what} has {n_dims} dimensions; 1 to {MAX_DIMS} are allowed"),
            dims_at,
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    let mut elements: u64 = 1;
    for _ in 0..n_dims {
        let at = cur.pos;
        let d = cur.u64(&what)?;
        // Stored as int64: a value above i64::MAX is negative to llama.cpp.
        if d == 0 || d > i64::MAX as u64 {
            return Err(malformed(
                rule::DIMS,
                format!("{what} has dimension {} ; each must be positive", d as i64),
                at,
            ));
        }
        elements = elements
            .checked_mul(d)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| malformed(rule::DIMS, format!("{what}: the element count overflows"), at))?;
        dims.push(d);
    }
    let type_at = cur.pos;
    let ggml_type = cur.u32(&what)?;
    let Some(gt) = self::ggml_type(ggml_type) else {
        return Err(malformed(
            rule::TYPE,
            format!("{what} has unknown ggml type {ggml_type}"),
            type_at,
        ));
    };
    let first = dims.first().copied().unwrap_or(1);
    if first % gt.block_size != 0 {
        return Err(malformed(
            rule::DIMS,
            format!(
                "{what}: its first dimension {first} is not a multiple of the {} block size {}",
                gt.name, gt.block_size
            ),
            dims_at,
        ));
    }
    let size = (elements / gt.block_size)
        .checked_mul(gt.type_size)
        .ok_or_else(|| malformed(rule::DIMS, format!("{what}: the byte size overflows"), dims_at))?;
    let offset = cur.u64(&what)?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        size,
        info_offset,
    })
}

fn align(x: u64, alignment: u64) -> Option<u64> {
    let rem = x % alignment;
    if rem == 0 {
        Some(x)
    } else {
        x.checked_add(alignment - rem)
    }
}

/// Offsets, bounds and trailing data, from the header and the file length.
/// llama.cpp requires every tensor at exactly the next aligned offset after
/// the previous one (in header order), which rules out gaps and overlaps.
fn check_layout(header: &Header, file_len: u64, findings: &mut Vec<Finding>) {
    let a = header.alignment;
    let mut expected: u64 = 0;
    for t in &header.tensors {
        let name = quote(&t.name);
        let at = format!("offset {}", t.info_offset);
        if t.offset % a != 0 {
            findings.push(Finding::new(
                rule::ALIGNMENT,
                Severity::Critical,
                format!(
                    "tensor {name} starts at data offset {} which is not a multiple of {a}",
                    t.offset
                ),
                at,
            ));
            return;
        }
        if t.offset != expected {
            findings.push(Finding::new(
                rule::OFFSETS,
                Severity::Critical,
                format!(
                    "tensor {name} starts at data offset {} but the previous tensors end at {expected}; \
                     gaps and overlaps let loaders read different bytes",
                    t.offset
                ),
                at,
            ));
            return;
        }
        let end = t.offset.checked_add(t.size);
        let file_end = end.and_then(|e| e.checked_add(header.data_start));
        match file_end {
            Some(fe) if fe <= file_len => {}
            _ => {
                findings.push(Finding::new(
                    rule::FILE_LENGTH,
                    Severity::Critical,
                    format!(
                        "tensor {name} ({} bytes at data offset {}) ends past the end of the file \
                         ({file_len} bytes, data section at {})",
                        t.size, t.offset, header.data_start
                    ),
                    at,
                ));
                return;
            }
        }
        match end.and_then(|e| align(e, a)) {
            Some(next) => expected = next,
            None => return,
        }
    }
    // The writer pads after the last tensor; a file without tensors may also
    // end right after the header, unpadded (file_len >= header end always).
    let max_end = header.data_start.saturating_add(expected);
    if file_len > max_end {
        findings.push(Finding::new(
            rule::TRAILING,
            Severity::High,
            format!(
                "{} bytes follow the tensor data; they are never read by llama.cpp but could \
                 make the file a polyglot (e.g. a zip for torch.load)",
                file_len - max_end
            ),
            format!("offset {max_end}"),
        ));
    }
}

#[cfg(test)]
pub(crate) mod tests;
