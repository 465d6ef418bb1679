//! numpy `.npy` files (and `.npz` members): a strict header parser.
//!
//! Layout: `\x93NUMPY`, major/minor version (1.0, 2.0, 3.0), a header length
//! (u16 for v1, u32 after), then a Python dict literal with exactly the keys
//! `descr`, `fortran_order` and `shape`, space-padded and ending in `\n`.
//! A non-object array is raw bytes: only the header is read, and the data
//! length must be `prod(shape) * itemsize` (bytes after that are ignored by
//! numpy and so are a hiding place). An object array (`descr` containing
//! `O`) is a pickle after the header, which `np.load(allow_pickle=True)`
//! runs: it goes through the pickle VM.

use crate::pickle::vm::{self, DtypeSize, descr_itemsize};
use crate::pickle::{Options, Sink};
use crate::report::Severity;

use super::{Ctx, MAX_IN_MEMORY, Source, at_member, at_offset, rule};

/// Largest header accepted (numpy itself caps it at 10 000 bytes unless told
/// otherwise; v2/v3 allow up to 4 GiB, which only an attack needs).
pub const MAX_HEADER: usize = 1 << 20;
/// Deepest nesting of a structured `descr`.
const MAX_NEST: usize = 16;

/// What the header declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Offset of the first data byte.
    pub data_start: u64,
    pub item: DtypeSize,
    /// prod(shape).
    pub count: u64,
}

/// Parses the preamble and header dict from the first bytes of the file;
/// `Err((message, offset))` says what is wrong and where.
pub fn parse_header(data: &[u8]) -> Result<Header, (String, u64)> {
    let Some(rest) = data.strip_prefix(b"\x93NUMPY") else {
        return Err(("bad magic".into(), 0));
    };
    let (major, minor) = match rest {
        [a, b, ..] => (*a, *b),
        _ => return Err(("truncated version".into(), 6)),
    };
    let (len_bytes, text_utf8) = match (major, minor) {
        (1, 0) => (2usize, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => return Err((format!("unsupported version {major}.{minor}"), 6)),
    };
    let len_field = data
        .get(8..8 + len_bytes)
        .ok_or(("truncated header length".to_owned(), 8))?;
    let header_len = len_field
        .iter()
        .enumerate()
        .fold(0usize, |acc, (i, b)| acc | (usize::from(*b) << (8 * i)));
    if header_len > MAX_HEADER {
        return Err((
            format!("the header declares {header_len} bytes; the limit is {MAX_HEADER}"),
            8,
        ));
    }
    let start = 8 + len_bytes;
    let Some(header) = data.get(start..start + header_len) else {
        return Err((
            format!("the header declares {header_len} bytes but the data ends first"),
            start as u64,
        ));
    };
    let text = if text_utf8 {
        std::str::from_utf8(header)
            .map_err(|_| ("the header is not UTF-8".to_owned(), start as u64))?
            .to_owned()
    } else {
        header.iter().map(|&b| char::from(b)).collect()
    };
    let body = text
        .strip_suffix('\n')
        .ok_or(("the header does not end in a newline".to_owned(), start as u64))?;
    let mut p = Lit {
        s: body.as_bytes(),
        pos: 0,
    };
    let value = p
        .value(0)
        .map_err(|e| (format!("the header dict does not parse: {e}"), start as u64))?;
    p.ws();
    if p.pos != p.s.len() {
        return Err(("text follows the header dict".into(), start as u64 + p.pos as u64));
    }
    let Val::Dict(entries) = value else {
        return Err(("the header is not a dict".into(), start as u64));
    };
    let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if keys != ["descr", "fortran_order", "shape"] {
        return Err((
            format!("the header keys are {keys:?}; numpy requires exactly descr, fortran_order, shape"),
            start as u64,
        ));
    }
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    if !matches!(get("fortran_order"), Some(Val::Bool(_))) {
        return Err(("fortran_order is not a boolean".into(), start as u64));
    }
    let Some(Val::Tuple(dims)) = get("shape") else {
        return Err(("shape is not a tuple".into(), start as u64));
    };
    let mut count: u64 = 1;
    for d in dims {
        let Val::Int(n) = d else {
            return Err(("shape holds a non-integer".into(), start as u64));
        };
        count = count
            .checked_mul(*n)
            .ok_or(("prod(shape) overflows".to_owned(), start as u64))?;
    }
    let item = get("descr")
        .and_then(|d| itemsize(d, 0))
        .ok_or(("descr is not a dtype moat understands".to_owned(), start as u64))?;
    Ok(Header {
        data_start: (start + header_len) as u64,
        item,
        count,
    })
}

/// Element size of a descr: a type string or a list of (name, type[, shape]).
fn itemsize(v: &Val, nest: usize) -> Option<DtypeSize> {
    if nest > MAX_NEST {
        return None;
    }
    match v {
        Val::Str(s) => descr_itemsize(s),
        Val::List(fields) => {
            let mut total: u64 = 0;
            for f in fields {
                let Val::Tuple(parts) = f else { return None };
                let (ty, shape) = match parts.as_slice() {
                    [_, ty] => (ty, None),
                    [_, ty, shape] => (ty, Some(shape)),
                    _ => return None,
                };
                let mut n: u64 = 1;
                match shape {
                    Some(Val::Tuple(dims)) => {
                        for d in dims {
                            let Val::Int(x) = d else { return None };
                            n = n.checked_mul(*x)?;
                        }
                    }
                    Some(Val::Int(x)) => n = *x,
                    Some(_) => return None,
                    None => {}
                }
                match itemsize(ty, nest + 1)? {
                    DtypeSize::Object => return Some(DtypeSize::Object),
                    DtypeSize::Bytes(b) => total = total.checked_add(b.checked_mul(n)?)?,
                }
            }
            Some(DtypeSize::Bytes(total))
        }
        _ => None,
    }
}

/// Checks a `.npy` whose first bytes are `head` and whose length is `total`.
pub fn check(
    member: &str,
    head: &[u8],
    total: u64,
    ctx: &mut Ctx,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) {
    let mut buf = head.to_vec();
    // The header may be longer than the bytes sniffed: read what it declares.
    let declared = match buf.get(6..8) {
        Some([1, _]) => buf
            .get(8..10)
            .map(|b| 10 + usize::from(u16::from_le_bytes([b[0], b[1]]))),
        Some([2 | 3, _]) => buf
            .get(8..12)
            .map(|b| 12 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
        _ => None,
    };
    if let Some(want) = declared
        && want > buf.len()
        && want <= MAX_HEADER + 12
        && (want as u64) <= total
        && let Some(more) = read(want as u64)
    {
        buf = more;
    }
    let header = match parse_header(&buf) {
        Ok(h) => h,
        Err((why, offset)) => {
            ctx.push(
                rule::NUMPY_HEADER,
                Severity::High,
                format!("the numpy header is invalid: {why}; numpy would refuse or misread the file"),
                at_offset(member, offset),
            );
            return;
        }
    };
    match header.item {
        DtypeSize::Bytes(size) => {
            let expected = header
                .count
                .checked_mul(size)
                .and_then(|n| n.checked_add(header.data_start));
            if expected != Some(total) {
                ctx.push(
                    rule::NUMPY_LENGTH,
                    Severity::High,
                    format!(
                        "the header declares {} data bytes but the file holds {}: a truncated \
                         array, or bytes numpy never reads (a hiding place)",
                        header.count.saturating_mul(size),
                        total.saturating_sub(header.data_start)
                    ),
                    at_member(member),
                );
            }
        }
        DtypeSize::Object => {
            if total > MAX_IN_MEMORY {
                ctx.push(
                    rule::TOO_LARGE,
                    Severity::High,
                    format!("an object array of {total} bytes is too large to analyse"),
                    at_member(member),
                );
                return;
            }
            let Some(all) = read(u64::MAX) else { return };
            let payload = all.get(header.data_start as usize..).unwrap_or(&[]);
            let mut sink = Sink::new();
            vm::walk(payload, member, Options::default(), &mut sink);
            // Offsets in the VM's locations are relative to the payload.
            ctx.sink.extend(sink.finish().into_iter().map(|mut f| {
                f.location = format!(
                    "{} (pickle after the header at byte {})",
                    f.location, header.data_start
                );
                f
            }));
        }
    }
}

/// A whole `.npy` file (or member) available by random access.
pub fn scan(src: &dyn Source, member: &str, ctx: &mut Ctx) -> std::io::Result<()> {
    let total = src.len();
    let head = src.read_at(0, total.min(4096) as usize)?;
    check(member, &head, total, ctx, &mut |want| {
        src.read_at(0, want.min(total) as usize).ok()
    });
    Ok(())
}

/// A Python literal as found in npy headers.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Str(String),
    Int(u64),
    Bool(bool),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(String, Val)>),
}

struct Lit<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.s.get(self.pos).is_some_and(|b| *b == b' ') {
            self.pos += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        if self.s.get(self.pos) == Some(&b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, nest: usize) -> Result<Val, String> {
        if nest > MAX_NEST {
            return Err("nested too deeply".into());
        }
        self.ws();
        match self.s.get(self.pos) {
            Some(b'\'' | b'"') => self.string().map(Val::Str),
            Some(b'0'..=b'9') => {
                let start = self.pos;
                while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
                    self.pos += 1;
                }
                std::str::from_utf8(self.s.get(start..self.pos).unwrap_or(&[]))
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .map(Val::Int)
                    .ok_or_else(|| "integer out of range".into())
            }
            Some(b'T') if self.s.get(self.pos..self.pos + 4) == Some(b"True") => {
                self.pos += 4;
                Ok(Val::Bool(true))
            }
            Some(b'F') if self.s.get(self.pos..self.pos + 5) == Some(b"False") => {
                self.pos += 5;
                Ok(Val::Bool(false))
            }
            Some(b'(') => {
                self.pos += 1;
                self.seq(b')', nest).map(Val::Tuple)
            }
            Some(b'[') => {
                self.pos += 1;
                self.seq(b']', nest).map(Val::List)
            }
            Some(b'{') => {
                self.pos += 1;
                let mut out = Vec::new();
                loop {
                    if self.eat(b'}') {
                        return Ok(Val::Dict(out));
                    }
                    self.ws();
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return Err("expected ':'".into());
                    }
                    let v = self.value(nest + 1)?;
                    if out.iter().any(|(k, _)| *k == key) {
                        return Err(format!("duplicate key {key:?}"));
                    }
                    out.push((key, v));
                    if !self.eat(b',') {
                        if self.eat(b'}') {
                            return Ok(Val::Dict(out));
                        }
                        return Err("expected ',' or '}'".into());
                    }
                }
            }
            _ => Err(format!("unexpected input at byte {}", self.pos)),
        }
    }

    fn seq(&mut self, close: u8, nest: usize) -> Result<Vec<Val>, String> {
        let mut out = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(out);
            }
            out.push(self.value(nest + 1)?);
            if !self.eat(b',') {
                if self.eat(close) {
                    return Ok(out);
                }
                return Err("expected ',' or a closing bracket".into());
            }
        }
    }

    /// A quoted string without escapes (numpy writes none).
    fn string(&mut self) -> Result<String, String> {
        let Some(&q) = self.s.get(self.pos).filter(|b| **b == b'\'' || **b == b'"') else {
            return Err("expected a string".into());
        };
        let start = self.pos + 1;
        let len = self
            .s
            .get(start..)
            .and_then(|r| r.iter().position(|&b| b == q))
            .ok_or("unterminated string")?;
        let raw = self.s.get(start..start + len).unwrap_or(&[]);
        if raw.contains(&b'\\') {
            return Err("escapes in a header string".into());
        }
        self.pos = start + len + 1;
        Ok(String::from_utf8_lossy(raw).into_owned())
    }
}
