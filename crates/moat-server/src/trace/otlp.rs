//! The OTLP trace request (`ExportTraceServiceRequest`) in protobuf wire
//! format, written by hand.
//!
//! Why not `opentelemetry-otlp` or `prost`: we send one fixed message shape
//! (resource, one scope, spans with string/int/bool/double attributes), and
//! its encoding is a few dozen lines of varints and length prefixes. The
//! official crates would add an SDK, an async HTTP client and code
//! generation to a server whose request path must never wait on them. The
//! field numbers below are those of `opentelemetry/proto/trace/v1/trace.proto`
//! and `common/v1/common.proto`; the test suite decodes our bytes with the
//! official Python bindings (`opentelemetry-proto`), so a wrong number
//! fails a test rather than a collector.

use super::{AttrValue, SpanData, SpanKind, StatusCode};

/// Protobuf wire types used here.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn new() -> Self {
        Self { buf: Vec::new() }
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, LEN);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        self.tag(field, FIXED32);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn uint(&mut self, field: u32, v: u64) {
        self.tag(field, VARINT);
        self.varint(v);
    }

    /// An embedded message: written into its own buffer, then
    /// length-prefixed (protobuf needs the length before the bytes).
    fn message(&mut self, field: u32, f: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::new();
        f(&mut inner);
        self.bytes(field, &inner.buf);
    }
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue` a oneof of
/// `string_value = 1`, `bool_value = 2`, `int_value = 3`, `double_value = 4`.
fn key_value(w: &mut Writer, field: u32, key: &str, value: &AttrValue) {
    w.message(field, |kv| {
        kv.string(1, key);
        kv.message(2, |any| match value {
            AttrValue::Str(s) => any.string(1, s),
            AttrValue::Bool(b) => any.uint(2, u64::from(*b)),
            AttrValue::Int(i) => any.uint(3, *i as u64),
            AttrValue::Double(d) => any.fixed64(4, d.to_bits()),
        });
    });
}

fn span(w: &mut Writer, s: &SpanData) {
    w.bytes(1, &s.trace_id);
    w.bytes(2, &s.span_id);
    if let Some(parent) = &s.parent_span_id {
        w.bytes(4, parent);
    }
    w.string(5, &s.name);
    let kind = match s.kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
    };
    w.uint(6, kind);
    w.fixed64(7, s.start_unix_nano);
    w.fixed64(8, s.end_unix_nano.max(s.start_unix_nano));
    for (k, v) in &s.attributes {
        key_value(w, 9, k, v);
    }
    // Status { message = 2; code = 3 } (field 1 is deprecated).
    if s.status != StatusCode::Unset {
        w.message(15, |st| {
            if !s.status_message.is_empty() {
                st.string(2, &s.status_message);
            }
            st.uint(3, if s.status == StatusCode::Ok { 1 } else { 2 });
        });
    }
    // Flags: the W3C trace flags (sampled), and "parent is remote" known.
    let remote = if s.parent_is_remote { 0x300 } else { 0x100 };
    w.fixed32(16, 0x01 | remote);
}

/// Encodes `ExportTraceServiceRequest { repeated ResourceSpans = 1 }` with
/// one `ResourceSpans { Resource = 1; repeated ScopeSpans = 2 }` and one
/// `ScopeSpans { InstrumentationScope = 1; repeated Span = 2 }`.
pub fn encode_request(service_name: &str, spans: &[SpanData]) -> Vec<u8> {
    let mut w = Writer::new();
    w.message(1, |rs| {
        rs.message(1, |res| {
            key_value(res, 1, "service.name", &AttrValue::Str(service_name.to_owned()));
            key_value(
                res,
                1,
                "service.version",
                &AttrValue::Str(env!("CARGO_PKG_VERSION").to_owned()),
            );
            key_value(res, 1, "telemetry.sdk.name", &AttrValue::Str("moat".to_owned()));
            key_value(
                res,
                1,
                "telemetry.sdk.language",
                &AttrValue::Str("rust".to_owned()),
            );
        });
        rs.message(2, |ss| {
            ss.message(1, |scope| {
                scope.string(1, "moat-server");
                scope.string(2, env!("CARGO_PKG_VERSION"));
            });
            for s in spans {
                ss.message(2, |w| span(w, s));
            }
        });
    });
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_examples() {
        // From the protobuf encoding guide: 1 → 01, 150 → 96 01, 300 → ac 02.
        for (v, want) in [
            (1u64, vec![0x01]),
            (150, vec![0x96, 0x01]),
            (300, vec![0xac, 0x02]),
        ] {
            let mut w = Writer::new();
            w.varint(v);
            assert_eq!(w.buf, want, "{v}");
        }
        let mut w = Writer::new();
        w.varint(u64::MAX);
        assert_eq!(w.buf.len(), 10);
        assert_eq!(w.buf[9], 0x01);
    }

    #[test]
    fn a_negative_int_attribute_is_ten_bytes_of_twos_complement() {
        let mut w = Writer::new();
        key_value(&mut w, 9, "k", &AttrValue::Int(-1));
        // 9<<3|2, len, [1<<3|2, 1, 'k'], [2<<3|2, 11, [3<<3|0, ff×9 01]]
        assert_eq!(w.buf[..5], [0x4a, 16, 0x0a, 1, b'k']);
        assert_eq!(w.buf[5..8], [0x12, 11, 0x18]);
        assert_eq!(w.buf[8..17], [0xff; 9]);
        assert_eq!(w.buf[17], 0x01);
    }
}
