//! Byte-exact imitations of the two Python renderings the format depends on.
//!
//! - The in-toto statement is signed as rendered by protobuf's
//!   `MessageToJson`, which is Python's `json.dumps(indent=2)`: `": "` between
//!   key and value, one item per line, non-ASCII escaped as `\uXXXX`, and
//!   whole floats written as `3.0`. A verifier only needs the bytes, but
//!   producing the same layout keeps moat's signatures indistinguishable from
//!   the tool's.
//! - Signatures made by model_signing v0.2 signed `str(payload_bytes)`, i.e.
//!   the Python `repr` of a bytes object (`b'{\n  "_type"…'`). Verifying them
//!   needs that repr exactly.

use serde_json::Value;

/// `json.dumps(value, indent=2, ensure_ascii=True)`.
pub(crate) fn to_python_pretty(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                out.push_str(&python_float(f));
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, v, level + 1);
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// Python's `repr(float)` for the values that occur here (whole numbers such
/// as a shard size): `1000000000.0`, and `1e+16` once Python switches to
/// exponent notation.
pub(crate) fn python_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
            _ => s,
        }
    }
}

/// A JSON string with `ensure_ascii`: everything outside printable ASCII is
/// `\uXXXX` (UTF-16 surrogate pairs above the BMP), with Python's short
/// escapes for the usual control characters.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(ch),
            _ => {
                let mut units = [0u16; 2];
                for u in ch.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(bytes)`: `b'…'` (or `b"…"` when the bytes hold `'` but no
/// `"`), with `\\`, `\t`, `\n`, `\r`, the quote escaped and every other
/// non-printable byte as `\xNN`.
pub(crate) fn python_bytes_repr(bytes: &[u8]) -> String {
    let quote = if bytes.contains(&b'\'') && !bytes.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    let mut out = String::with_capacity(bytes.len() + 3);
    out.push('b');
    out.push(quote as char);
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            _ if b == quote => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push(quote as char);
    out
}
