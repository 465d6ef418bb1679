//! ONNX models: a bounds-checked protobuf walker that finds every tensor
//! (initializers, sparse initializers, node attribute tensors, subgraphs,
//! functions) and checks where its external data lives.
//!
//! ONNX tensors may keep their bytes in a file named by
//! `external_data["location"]`; onnx before 1.16 joined that name to the
//! model folder without checking it, so `../../etc/passwd` or an absolute
//! path read (and with `save_model`, wrote) any file (CVE-2024-27318 and its
//! predecessor CVE-2022-25882). Such locations are critical here.
//!
//! The walker reads only protobuf structure: it descends into the messages
//! that can hold tensors and skips every other field by its declared length
//! (tensor `raw_data` included), so the cost does not grow with weight bytes.
//! Every length is checked against its enclosing message, groups and unknown
//! wire types are rejected, and nesting is capped. A file is ONNX only when
//! the whole walk succeeds and it has an `ir_version` and a graph or opset
//! import; anything else is not ONNX (and is then refused as unknown binary).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::report::{Finding, Severity, quote};

/// Stable rule ids.
pub mod rule {
    pub const EXTERNAL_DATA: &str = "onnx.external-data";
    pub const EXTERNAL_MISSING: &str = "onnx.external-data-missing";
    pub const EXTERNAL_FILE: &str = "onnx.external-data-file";
}

/// Deepest message nesting (subgraphs of subgraphs...).
pub const MAX_DEPTH: usize = 32;
/// Longest string read (tensor names, external data keys and values).
pub const MAX_STRING_LEN: u64 = 64 * 1024;
/// At most this many findings per model.
const MAX_FINDINGS: usize = 50;

/// Why the walk failed: the bytes are not a well-formed ONNX model.
#[derive(Debug)]
pub enum NotOnnx {
    Malformed { offset: u64, why: String },
    Io(io::Error),
}

impl From<io::Error> for NotOnnx {
    fn from(e: io::Error) -> Self {
        NotOnnx::Io(e)
    }
}

impl std::fmt::Display for NotOnnx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotOnnx::Malformed { offset, why } => write!(f, "{why} at offset {offset}"),
            NotOnnx::Io(e) => write!(f, "{e}"),
        }
    }
}

fn bad(offset: u64, why: impl Into<String>) -> NotOnnx {
    NotOnnx::Malformed {
        offset,
        why: why.into(),
    }
}

/// The messages the walker descends into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    Graph,
    Node,
    Attribute,
    Tensor,
    SparseTensor,
    Function,
    Entry,
}

/// Which fields of which message are submessages worth visiting.
fn child(kind: Kind, field: u64) -> Option<Kind> {
    use Kind::*;
    Some(match (kind, field) {
        (Model, 7) => Graph,
        (Model, 25) => Function,
        (Graph, 1) => Node,
        (Graph, 5) => Tensor,
        (Graph, 15) => SparseTensor,
        (Node, 5) | (Function, 11) => Attribute,
        (Function, 7) => Node,
        (Attribute, 5) | (Attribute, 10) => Tensor,
        (Attribute, 6) | (Attribute, 11) => Graph,
        (Attribute, 22) | (Attribute, 23) => SparseTensor,
        (SparseTensor, 1) | (SparseTensor, 2) => Tensor,
        (Tensor, 13) => Entry,
        _ => return None,
    })
}

/// What one message yields to its parent.
#[derive(Default)]
struct Fields {
    ir_version: Option<u64>,
    has_graph_or_opset: bool,
    name: Option<String>,
    data_location: u64,
    key: Option<String>,
    value: Option<String>,
    location: Option<String>,
}

struct Walker<R> {
    r: BufReader<R>,
    pos: u64,
    folder: Option<std::path::PathBuf>,
    findings: Vec<Finding>,
    dropped: usize,
    /// Safe external data locations, for the folder-level pass that lets
    /// the referenced raw-bytes files through ([`crate::scan_paths`]).
    external: Vec<String>,
}

/// Most external data references remembered per model.
const MAX_EXTERNAL: usize = 4096;

impl<R: Read + Seek> Walker<R> {
    fn byte(&mut self, end: u64) -> Result<u8, NotOnnx> {
        if self.pos >= end {
            return Err(bad(self.pos, "a varint runs past the end of its message"));
        }
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self, end: u64) -> Result<u64, NotOnnx> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte(end)?;
            if i == 9 && b > 1 {
                return Err(bad(start, "a varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad(start, "a varint is longer than 10 bytes"))
    }

    fn skip(&mut self, n: u64, end: u64) -> Result<(), NotOnnx> {
        match self.pos.checked_add(n) {
            Some(to) if to <= end => {
                let delta = i64::try_from(n).map_err(|_| bad(self.pos, "a length is too large"))?;
                self.r.seek_relative(delta)?;
                self.pos = to;
                Ok(())
            }
            _ => Err(bad(
                self.pos,
                format!("a field of {n} bytes runs past the end of its message"),
            )),
        }
    }

    fn string(&mut self, n: u64, end: u64) -> Result<String, NotOnnx> {
        if n > MAX_STRING_LEN {
            return Err(bad(
                self.pos,
                format!("a string of {n} bytes exceeds {MAX_STRING_LEN}"),
            ));
        }
        if self.pos.saturating_add(n) > end {
            return Err(bad(self.pos, "a string runs past the end of its message"));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf)?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn message(&mut self, kind: Kind, end: u64, depth: usize) -> Result<Fields, NotOnnx> {
        if depth > MAX_DEPTH {
            return Err(bad(self.pos, format!("messages nest deeper than {MAX_DEPTH}")));
        }
        let start = self.pos;
        let mut f = Fields::default();
        while self.pos < end {
            let tag_at = self.pos;
            let tag = self.varint(end)?;
            let field = tag >> 3;
            if field == 0 || field > (1 << 29) - 1 {
                return Err(bad(tag_at, format!("invalid field number {field}")));
            }
            match tag & 7 {
                0 => {
                    let v = self.varint(end)?;
                    match (kind, field) {
                        (Kind::Model, 1) => f.ir_version = Some(v),
                        (Kind::Tensor, 14) => f.data_location = v,
                        _ => {}
                    }
                }
                1 => self.skip(8, end)?,
                5 => self.skip(4, end)?,
                2 => {
                    let n = self.varint(end)?;
                    let body_end = self.pos.checked_add(n).filter(|e| *e <= end).ok_or_else(|| {
                        bad(self.pos, format!("a field of {n} bytes runs past its message"))
                    })?;
                    if kind == Kind::Model && field == 8 {
                        f.has_graph_or_opset = true;
                    }
                    match (kind, field) {
                        (Kind::Tensor, 8) => f.name = Some(self.string(n, end)?),
                        (Kind::Entry, 1) => f.key = Some(self.string(n, end)?),
                        (Kind::Entry, 2) => f.value = Some(self.string(n, end)?),
                        _ => match child(kind, field) {
                            Some(sub) => {
                                if kind == Kind::Model && field == 7 {
                                    f.has_graph_or_opset = true;
                                }
                                let at = self.pos;
                                let got = self.message(sub, body_end, depth + 1)?;
                                if sub == Kind::Entry && got.key.as_deref() == Some("location") {
                                    f.location = got.value.clone();
                                }
                                if sub == Kind::Tensor {
                                    self.tensor(&got, at);
                                }
                            }
                            None => self.skip(n, end)?,
                        },
                    }
                    if self.pos != body_end {
                        return Err(bad(self.pos, "a submessage does not end where its length says"));
                    }
                }
                wt => {
                    return Err(bad(
                        tag_at,
                        format!("wire type {wt} (groups or invalid) in field {field}"),
                    ));
                }
            }
        }
        if self.pos != end {
            return Err(bad(start, "a message runs past its declared end"));
        }
        Ok(f)
    }

    fn push(&mut self, finding: Finding) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(finding);
        } else {
            self.dropped += 1;
        }
    }

    /// Checks one finished tensor's external data reference.
    fn tensor(&mut self, t: &Fields, at: u64) {
        let name = quote(t.name.as_deref().unwrap_or(""));
        let here = format!("offset {at}, tensor {name}");
        match &t.location {
            Some(loc) => {
                if let Some(why) = unsafe_location(loc) {
                    self.push(Finding::new(
                        rule::EXTERNAL_DATA,
                        Severity::Critical,
                        format!(
                            "tensor {name} reads its data from {} which {why}; onnx would open a file \
                             outside the model folder (CVE-2024-27318)",
                            quote(loc)
                        ),
                        here.clone(),
                    ));
                } else if self.external.len() < MAX_EXTERNAL && !self.external.contains(loc) {
                    self.external.push(loc.clone());
                }
                if unsafe_location(loc).is_none()
                    && let Some(folder) = &self.folder
                    && std::fs::symlink_metadata(folder.join(loc)).is_err()
                {
                    self.push(Finding::new(
                        rule::EXTERNAL_MISSING,
                        Severity::Medium,
                        format!(
                            "tensor {name} reads its data from {}, which is not in the folder",
                            quote(loc)
                        ),
                        here,
                    ));
                }
            }
            None if t.data_location == 1 => self.push(Finding::new(
                rule::EXTERNAL_DATA,
                Severity::High,
                format!("tensor {name} says its data is external but names no location"),
                here,
            )),
            None => {}
        }
    }
}

/// Why an external data location may leave the model folder, if it may.
pub fn unsafe_location(loc: &str) -> Option<&'static str> {
    let b = loc.as_bytes();
    if loc.is_empty() {
        return Some("is empty");
    }
    if loc.contains('\0') {
        return Some("contains a NUL byte");
    }
    if loc.starts_with('/') || loc.starts_with('\\') {
        return Some("is an absolute path");
    }
    if loc.contains('\\') {
        return Some("contains a backslash (a Windows path separator)");
    }
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' || loc.contains(':') {
        return Some("contains a drive letter or colon");
    }
    if loc.split('/').any(|c| c == "..") {
        return Some("climbs out with '..'");
    }
    if loc.starts_with('~') {
        return Some("starts with '~' (a home directory)");
    }
    None
}

/// Walks a whole stream as an ONNX ModelProto. `Ok` means it is ONNX (with
/// its findings); `Err` means it is not (or could not be read).
pub fn check<R: Read + Seek>(reader: R, folder: Option<&Path>) -> Result<Vec<Finding>, NotOnnx> {
    check_with_references(reader, folder).map(|(findings, _)| findings)
}

/// [`check`], also returning the model's external data locations that stay
/// inside its folder (the files the loader will read as raw tensor bytes).
pub fn check_with_references<R: Read + Seek>(
    mut reader: R,
    folder: Option<&Path>,
) -> Result<(Vec<Finding>, Vec<String>), NotOnnx> {
    let len = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(0))?;
    let mut w = Walker {
        r: BufReader::with_capacity(64 * 1024, reader),
        pos: 0,
        folder: folder.map(Path::to_path_buf),
        findings: Vec::new(),
        dropped: 0,
        external: Vec::new(),
    };
    let top = w.message(Kind::Model, len, 0)?;
    if top.ir_version.is_none() || !top.has_graph_or_opset {
        return Err(bad(0, "no ir_version, or neither a graph nor an opset import"));
    }
    if w.dropped > 0 {
        let n = w.dropped;
        w.findings.push(Finding::new(
            rule::EXTERNAL_DATA,
            Severity::Critical,
            format!("{n} more findings in this model were not listed"),
            "",
        ));
    }
    Ok((w.findings, w.external))
}

/// [`check`] on a file, with its folder for the existence check.
pub fn check_file(path: &Path) -> Result<Vec<Finding>, NotOnnx> {
    check_file_with_references(path).map(|(findings, _)| findings)
}

/// [`check_with_references`] on a file, with its folder.
pub fn check_file_with_references(path: &Path) -> Result<(Vec<Finding>, Vec<String>), NotOnnx> {
    let file = File::open(path)?;
    check_with_references(file, path.parent())
}

/// Cheap first look for sniffing: field 1 (ir_version) as a varint between
/// 1 and 127, followed by a tag of a ModelProto field. Only a full [`check`]
/// decides.
pub fn looks_like_onnx(head: &[u8]) -> bool {
    matches!(head, [0x08, 1..=0x7f, next, ..] if matches!(next, 0x12 | 0x1a | 0x22 | 0x28 | 0x32 | 0x3a | 0x42 | 0x72 | 0xca))
}

/// Entry point for cargo-fuzz and tests: must never panic.
pub fn fuzz_onnx(data: &[u8]) {
    let _ = check(io::Cursor::new(data), None);
}

#[cfg(test)]
pub(crate) mod tests;
