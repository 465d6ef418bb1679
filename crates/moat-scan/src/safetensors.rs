//! Strict validation of safetensors headers.
//!
//! Safetensors is the one weight format moat accepts as-is, because loading it
//! only copies bytes. That holds only if every loader agrees on what the
//! header means, so anything a lenient parser might read differently from a
//! strict one is a violation here: duplicate keys, unknown fields, gaps or
//! overlaps between tensors, sizes that do not multiply out, trailing bytes.
//!
//! Layout: `[u64 LE N][N bytes of JSON header, space padded][tensor data]`.
//! Lengths are checked against explicit maxima before anything is allocated,
//! all arithmetic is checked, and only the header is ever read from disk.

mod json;

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crate::report::quote;
use json::{Entry, Field, Kind, Metadata, StrValue, Top, TopValue};

/// Largest header we accept, checked before the header is read.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The reserved top-level key holding string metadata.
pub const METADATA_KEY: &str = "__metadata__";

/// Stable rule ids.
pub mod rule {
    pub const HEADER_LENGTH: &str = "safetensors.header-length";
    pub const HEADER_TOO_LARGE: &str = "safetensors.header-too-large";
    pub const HEADER_JSON: &str = "safetensors.header-json";
    pub const METADATA: &str = "safetensors.metadata";
    pub const DUPLICATE_TENSOR: &str = "safetensors.duplicate-tensor";
    pub const DTYPE: &str = "safetensors.dtype";
    pub const OFFSETS: &str = "safetensors.offsets";
    pub const SIZE_MISMATCH: &str = "safetensors.size-mismatch";
    pub const FILE_LENGTH: &str = "safetensors.file-length";
    pub const IO_READ: &str = "io.read";
}

/// At most this many violations of one rule are listed; the rest are counted
/// in one closing violation, so a hostile header cannot produce a huge report.
const MAX_PER_RULE: usize = 20;

/// One tensor as the header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Offsets into the data section (which starts at `8 + header_len`).
    pub begin: u64,
    pub end: u64,
}

/// A header that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// N, the declared header length (padding included).
    pub header_len: u64,
    /// Sorted by `begin` (then `end`, so empty tensors come first).
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__` entries in file order.
    pub metadata: Vec<(String, String)>,
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub message: String,
    pub location: String,
}

impl Violation {
    fn new(rule: &'static str, message: impl Into<String>, location: impl Into<String>) -> Self {
        Violation {
            rule,
            message: message.into(),
            location: location.into(),
        }
    }
}

/// Byte size of one element of a known dtype.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// Parse from the first bytes of the file (8 + N bytes are enough) and the
/// total file length.
pub fn check_header(prefix: &[u8], file_len: u64) -> Result<Header, Vec<Violation>> {
    let header_len = declared_len(prefix, file_len).map_err(|v| vec![v])?;
    let header = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .and_then(|end| prefix.get(8..end));
    let Some(header) = header else {
        return Err(vec![Violation::new(
            rule::HEADER_LENGTH,
            format!(
                "the header is {header_len} bytes but only {} bytes after the length prefix \
                 were available",
                prefix.len().saturating_sub(8)
            ),
            "offset 8",
        )]);
    };
    check_header_bytes(header, header_len, file_len)
}

/// Open the file, read ONLY 8 + N bytes (never the tensor data), and check.
pub fn check_file(path: &Path) -> Result<Header, Vec<Violation>> {
    let io_err = |what: &str, e: io::Error| {
        vec![Violation::new(
            rule::IO_READ,
            format!("cannot {what} {}: {e}", path.display()),
            "",
        )]
    };
    let file = File::open(path).map_err(|e| io_err("open", e))?;
    let file_len = file.metadata().map_err(|e| io_err("stat", e))?.len();
    let mut reader = file.take(8);
    let mut prefix = Vec::with_capacity(8);
    reader.read_to_end(&mut prefix).map_err(|e| io_err("read", e))?;
    let header_len = declared_len(&prefix, file_len).map_err(|v| vec![v])?;
    // `declared_len` capped N at MAX_HEADER_LEN and at the file length, so
    // this allocation is bounded by both.
    let capacity = usize::try_from(header_len).unwrap_or(0).saturating_add(8);
    prefix.reserve_exact(capacity.saturating_sub(prefix.len()));
    let mut reader = reader.into_inner().take(header_len);
    reader.read_to_end(&mut prefix).map_err(|e| io_err("read", e))?;
    check_header(&prefix, file_len)
}

/// Entry point for cargo-fuzz: must never panic on any input.
pub fn fuzz(data: &[u8]) {
    let len = data.len() as u64;
    let _ = check_header(data, len);
    // Also the "file is longer than what we were given" path.
    let _ = check_header(data, len.saturating_mul(2).saturating_add(8));
}

/// Reads and bounds-checks N.
fn declared_len(prefix: &[u8], file_len: u64) -> Result<u64, Violation> {
    if file_len < 8 {
        return Err(Violation::new(
            rule::HEADER_LENGTH,
            format!(
                "the file is {file_len} bytes long; a safetensors file starts with an 8-byte \
                 header length"
            ),
            "offset 0",
        ));
    }
    let Some(first) = prefix.first_chunk::<8>() else {
        return Err(Violation::new(
            rule::HEADER_LENGTH,
            format!(
                "only {} bytes could be read; the 8-byte header length is incomplete",
                prefix.len()
            ),
            "offset 0",
        ));
    };
    let n = u64::from_le_bytes(*first);
    if n > MAX_HEADER_LEN {
        return Err(Violation::new(
            rule::HEADER_TOO_LARGE,
            format!("the header declares {n} bytes; the limit is {MAX_HEADER_LEN} bytes"),
            "offset 0",
        ));
    }
    match n.checked_add(8) {
        Some(end) if end <= file_len => Ok(n),
        _ => Err(Violation::new(
            rule::HEADER_LENGTH,
            format!(
                "the header declares {n} bytes but the file has only {} bytes after the \
                 8-byte length",
                file_len - 8
            ),
            "offset 0",
        )),
    }
}

/// Collects violations, keeping at most [`MAX_PER_RULE`] of each rule.
#[derive(Default)]
struct Violations {
    list: Vec<Violation>,
    counts: Vec<(&'static str, usize)>,
}

impl Violations {
    fn push(&mut self, rule: &'static str, message: String, location: String) {
        let count = match self.counts.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, c)) => c,
            None => {
                self.counts.push((rule, 0));
                match self.counts.last_mut() {
                    Some((_, c)) => c,
                    None => return,
                }
            }
        };
        *count += 1;
        if *count <= MAX_PER_RULE {
            self.list.push(Violation {
                rule,
                message,
                location,
            });
        }
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    fn finish(mut self) -> Vec<Violation> {
        for (rule, count) in &self.counts {
            if *count > MAX_PER_RULE {
                self.list.push(Violation::new(
                    rule,
                    format!(
                        "{} more violations of this rule are not listed",
                        count - MAX_PER_RULE
                    ),
                    "header",
                ));
            }
        }
        self.list
    }
}

fn tensor_location(name: &str) -> String {
    format!("tensor {}", quote(name))
}

/// Checks the N header bytes.
fn check_header_bytes(bytes: &[u8], header_len: u64, file_len: u64) -> Result<Header, Vec<Violation>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        vec![Violation::new(
            rule::HEADER_JSON,
            format!(
                "the header is not valid UTF-8 (at header byte {})",
                e.valid_up_to()
            ),
            format!("offset {}", 8 + e.valid_up_to()),
        )]
    })?;
    // The format allows right-padding with spaces (0x20) only, and the header
    // must begin with `{`; serde_json alone would accept any whitespace.
    let json_text = text.trim_end_matches(' ');
    if !json_text.starts_with('{') {
        return Err(vec![Violation::new(
            rule::HEADER_JSON,
            "the header must begin with '{' (a JSON object)",
            "offset 8",
        )]);
    }
    let entries = match json::parse(json_text) {
        Ok(Top::Object(entries)) => entries,
        Ok(Top::Other(kind)) => {
            return Err(vec![Violation::new(
                rule::HEADER_JSON,
                format!("the header must be a JSON object, found {}", kind.as_str()),
                "header",
            )]);
        }
        Err(e) => {
            return Err(vec![Violation::new(
                rule::HEADER_JSON,
                format!("the header is not valid JSON: {e}"),
                format!("header line {} column {}", e.line(), e.column()),
            )]);
        }
    };
    // serde_json accepts trailing whitespace of any kind; the format only
    // allows spaces, which were trimmed above.
    if !json_text.ends_with('}') {
        return Err(vec![Violation::new(
            rule::HEADER_JSON,
            "the header must be one JSON object followed only by space (0x20) padding",
            format!("offset {}", 8 + json_text.len().saturating_sub(1)),
        )]);
    }

    let mut out = Violations::default();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut tensors = Vec::new();
    let mut metadata = None;
    // Cross-tensor checks (contiguity, file length) only make sense when
    // every entry's offsets are known and ordered; otherwise they would
    // report consequences of a violation already listed.
    let mut offsets_known = true;

    for (key, value) in &entries {
        let count = seen.entry(key.as_str()).or_insert(0);
        *count += 1;
        if *count == 2 {
            let location = if key == METADATA_KEY {
                format!("key {METADATA_KEY}")
            } else {
                tensor_location(key)
            };
            out.push(
                rule::DUPLICATE_TENSOR,
                format!(
                    "key {} appears more than once in the header; loaders disagree on which \
                     entry wins",
                    quote(key)
                ),
                location,
            );
        }
        match value {
            TopValue::Metadata(m) => {
                let checked = check_metadata(m, &mut out);
                if metadata.is_none() {
                    metadata = Some(checked);
                }
            }
            TopValue::Tensor(entry) => match check_entry(key, entry, &mut out) {
                Some(t) => {
                    offsets_known &= t.begin <= t.end;
                    tensors.push(t);
                }
                None => offsets_known = false,
            },
        }
    }

    tensors.sort_by_key(|t| (t.begin, t.end));
    if offsets_known {
        check_contiguous(&tensors, &mut out);
        check_file_length(&tensors, header_len, file_len, &mut out);
    }

    if out.is_empty() {
        Ok(Header {
            header_len,
            tensors,
            metadata: metadata.unwrap_or_default(),
        })
    } else {
        Err(out.finish())
    }
}

fn check_metadata(m: &Metadata, out: &mut Violations) -> Vec<(String, String)> {
    let location = format!("key {METADATA_KEY}");
    let entries = match m {
        Metadata::Object(entries) => entries,
        Metadata::Other(kind) => {
            out.push(
                rule::METADATA,
                format!(
                    "{METADATA_KEY} must be an object of strings to strings, found {}",
                    kind.as_str()
                ),
                location,
            );
            return Vec::new();
        }
    };
    let mut result = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    for (key, value) in entries {
        let at = format!("key {METADATA_KEY}.{}", crate::report::printable(key));
        if !seen.insert(key.as_str()) {
            out.push(
                rule::METADATA,
                format!("{METADATA_KEY} key {} appears more than once", quote(key)),
                at.clone(),
            );
        }
        match value {
            StrValue::Str(s) => result.push((key.clone(), s.clone())),
            StrValue::Other(kind) => out.push(
                rule::METADATA,
                format!(
                    "{METADATA_KEY} key {} has {} value; only strings are allowed",
                    quote(key),
                    kind.as_str()
                ),
                at,
            ),
        }
    }
    result
}

/// Validates one tensor entry. Returns it when its structure is sound (even
/// if dtype, offsets or size are wrong, which are reported here), so that
/// later tensors and cross-tensor rules can still be checked.
fn check_entry(name: &str, entry: &Entry, out: &mut Violations) -> Option<TensorInfo> {
    let location = tensor_location(name);
    let structure = |out: &mut Violations, problem: String| {
        out.push(
            rule::HEADER_JSON,
            format!("tensor {}: {problem}", quote(name)),
            location.clone(),
        );
    };
    let fields = match entry {
        Entry::Object(fields) => fields,
        Entry::Other(kind) => {
            structure(
                out,
                format!(
                    "entry must be an object with dtype, shape and data_offsets, found {}",
                    kind.as_str()
                ),
            );
            return None;
        }
    };

    let mut dtype = None;
    let mut shape = None;
    let mut offsets = None;
    for (field, value) in fields {
        let slot = match field.as_str() {
            "dtype" => &mut dtype,
            "shape" => &mut shape,
            "data_offsets" => &mut offsets,
            _ => {
                structure(
                    out,
                    format!(
                        "unknown field {}; only dtype, shape and data_offsets are allowed",
                        quote(field)
                    ),
                );
                return None;
            }
        };
        if slot.is_some() {
            structure(out, format!("field {} appears more than once", quote(field)));
            return None;
        }
        *slot = value.as_ref();
    }

    let dtype = match dtype {
        Some(Field::Str(s)) => s,
        Some(other) => {
            structure(
                out,
                format!("dtype must be a string, found {}", field_kind(other)),
            );
            return None;
        }
        None => {
            structure(out, "missing field dtype".into());
            return None;
        }
    };
    let shape = match shape {
        Some(Field::Uints(v)) => v,
        Some(other) => {
            structure(
                out,
                format!(
                    "shape must be an array of non-negative integers, {}",
                    array_problem(other)
                ),
            );
            return None;
        }
        None => {
            structure(out, "missing field shape".into());
            return None;
        }
    };
    let (begin, end) = match offsets {
        Some(Field::Uints(v)) => match v.as_slice() {
            [begin, end] => (*begin, *end),
            _ => {
                structure(
                    out,
                    format!("data_offsets must have exactly 2 elements, found {}", v.len()),
                );
                return None;
            }
        },
        Some(other) => {
            structure(
                out,
                format!(
                    "data_offsets must be an array of 2 non-negative integers, {}",
                    array_problem(other)
                ),
            );
            return None;
        }
        None => {
            structure(out, "missing field data_offsets".into());
            return None;
        }
    };

    let size = dtype_size(dtype);
    if size.is_none() {
        out.push(
            rule::DTYPE,
            format!(
                "tensor {}: unknown dtype {}; known dtypes are BOOL, U8, I8, F8_E5M2, F8_E4M3, \
                 I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64",
                quote(name),
                quote(dtype)
            ),
            location.clone(),
        );
    }
    if begin > end {
        out.push(
            rule::OFFSETS,
            format!(
                "tensor {}: data_offsets [{begin}, {end}] begin after they end",
                quote(name)
            ),
            location.clone(),
        );
    } else if let Some(size) = size {
        check_size(name, dtype, shape, size, begin, end, &location, out);
    }

    Some(TensorInfo {
        name: name.to_owned(),
        dtype: dtype.clone(),
        shape: shape.clone(),
        begin,
        end,
    })
}

#[allow(clippy::too_many_arguments)]
fn check_size(
    name: &str,
    dtype: &str,
    shape: &[u64],
    size: u64,
    begin: u64,
    end: u64,
    location: &str,
    out: &mut Violations,
) {
    let span = end - begin;
    // A zero dimension makes the tensor empty whatever the other dimensions
    // are, even if multiplying them first would overflow.
    let bytes = if shape.contains(&0) {
        Some(0)
    } else {
        shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|elements| elements.checked_mul(size))
    };
    match bytes {
        Some(bytes) if bytes == span => {}
        Some(bytes) => out.push(
            rule::SIZE_MISMATCH,
            format!(
                "tensor {}: shape {} of {dtype} needs {bytes} bytes but data_offsets \
                 [{begin}, {end}] span {span} bytes",
                quote(name),
                show_shape(shape)
            ),
            location.to_owned(),
        ),
        None => out.push(
            rule::SIZE_MISMATCH,
            format!(
                "tensor {}: shape {} of {dtype} overflows 64-bit arithmetic (element count \
                 times {size} bytes), so it cannot match the {span} bytes of data_offsets \
                 [{begin}, {end}]",
                quote(name),
                show_shape(shape)
            ),
            location.to_owned(),
        ),
    }
}

/// Tensors sorted by (begin, end) must tile `[0, last_end)` exactly.
fn check_contiguous(tensors: &[TensorInfo], out: &mut Violations) {
    let mut expected = 0u64;
    let mut previous: Option<&TensorInfo> = None;
    for t in tensors {
        if t.begin != expected {
            let message = match previous {
                None => format!(
                    "tensor {} is the first in the data section but begins at offset {}; data \
                     must start at offset 0",
                    quote(&t.name),
                    t.begin
                ),
                Some(p) if t.begin < expected => format!(
                    "tensor {} data_offsets [{}, {}] overlap tensor {} which ends at {}",
                    quote(&t.name),
                    t.begin,
                    t.end,
                    quote(&p.name),
                    expected
                ),
                Some(p) => format!(
                    "gap of {} bytes between tensor {} (ends at {}) and tensor {} (begins at \
                     {})",
                    t.begin - expected,
                    quote(&p.name),
                    expected,
                    quote(&t.name),
                    t.begin
                ),
            };
            out.push(rule::OFFSETS, message, tensor_location(&t.name));
        }
        expected = expected.max(t.end);
        previous = Some(t);
    }
}

fn check_file_length(tensors: &[TensorInfo], header_len: u64, file_len: u64, out: &mut Violations) {
    let data_end = tensors.iter().map(|t| t.end).max().unwrap_or(0);
    let expected = u128::from(header_len) + 8 + u128::from(data_end);
    let actual = u128::from(file_len);
    if expected == actual {
        return;
    }
    let detail = if actual > expected {
        format!("{} trailing bytes after the last tensor", actual - expected)
    } else {
        format!("{} bytes of tensor data missing", expected - actual)
    };
    out.push(
        rule::FILE_LENGTH,
        format!(
            "the file is {file_len} bytes but 8 + header {header_len} + data {data_end} = \
             {expected} bytes: {detail}"
        ),
        format!("offset {}", expected.min(actual)),
    );
}

fn field_kind(f: &Field) -> &'static str {
    match f {
        Field::Str(_) => Kind::String.as_str(),
        Field::Uints(_) | Field::BadArray { .. } => Kind::Array.as_str(),
        Field::Other(kind) => kind.as_str(),
    }
}

fn array_problem(f: &Field) -> String {
    match f {
        Field::BadArray { index, kind } => {
            format!("element {index} is {}", kind.as_str())
        }
        other => format!("found {}", field_kind(other)),
    }
}

/// `[a, b, c]`, shortened for absurd ranks.
fn show_shape(shape: &[u64]) -> String {
    const MAX_DIMS: usize = 8;
    let shown: Vec<String> = shape.iter().take(MAX_DIMS).map(u64::to_string).collect();
    if shape.len() > MAX_DIMS {
        format!("[{}, … ({} dims)]", shown.join(", "), shape.len())
    } else {
        format!("[{}]", shown.join(", "))
    }
}

#[cfg(test)]
pub(crate) mod tests;
