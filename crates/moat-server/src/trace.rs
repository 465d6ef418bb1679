//! Request tracing, exported to an OpenTelemetry collector over OTLP/HTTP.
//!
//! Each sampled request becomes one trace: a root server span (`POST
//! /v1/chat/completions`, with the request id, route, status and the
//! principal's key id — never a secret) and child spans for the phases an
//! operator asks about when a request was slow: `admission` (authentication
//! and rate limits), `queue` (waiting for the model's worker), `prefill`
//! (the prompt, up to the first generated token) and `decode` (the rest,
//! with the token count). Attribute names follow the OpenTelemetry HTTP and
//! GenAI semantic conventions where they name the thing
//! (`http.route`, `gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...);
//! moat's own are under `moat.`.
//!
//! Phases are timestamped as the request passes them (a few `Instant`s in
//! the request context) and turned into spans once, when the request ends;
//! the spans then go to a background exporter ([`export`]) through a
//! bounded queue that drops, and counts, rather than ever making a request
//! wait on a collector.

pub mod export;
pub mod otlp;

use crate::config::tracing::TracingConfig;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Unset,
    Ok,
    Error,
}

/// One finished span, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanData {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The parent came from the caller's `traceparent`.
    pub parent_is_remote: bool,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub status: StatusCode,
    pub status_message: String,
}

/// A caller's W3C trace context (`traceparent` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    (s.len() == 2 * N
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(())?;
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Parses `traceparent: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`
/// (W3C Trace Context). Anything malformed, all-zero ids or version `ff`
/// yields `None`: the request then starts a trace of its own.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id: TraceId = hex_array(parts.next()?)?;
    let span_id: SpanId = hex_array(parts.next()?)?;
    let flags: [u8; 1] = hex_array(parts.next()?)?;
    let version: [u8; 1] = hex_array(version)?;
    // Version 00 has exactly four fields; later versions may append more.
    if version[0] == 0xff || (version[0] == 0 && parts.next().is_some()) {
        return None;
    }
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
    })
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Ids must be unique, not secret: without OS randomness, mix the clock
    // and a counter rather than refuse the request.
    if getrandom::fill(&mut b).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let seed = unix_nanos(SystemTime::now())
            ^ COUNTER
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .rotate_left(32);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed.rotate_left((i as u32 * 8) % 64) as u8) ^ (i as u8);
        }
    }
    if b.iter().all(|x| *x == 0) {
        b[N - 1] = 1;
    }
    b
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().try_into().unwrap_or(u64::MAX))
}

/// Head sampling on the trace id (its last 8 bytes as a number below
/// `ratio × 2⁶⁴`), so every service seeing the same id decides alike.
pub fn ratio_samples(ratio: f64, trace_id: &TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(tail) as f64) < ratio * 18_446_744_073_709_551_616.0
}

/// The moments a request passed, recorded as it goes; turned into spans by
/// [`RequestTrace::finish`].
#[derive(Debug)]
pub struct RequestTrace {
    trace_id: TraceId,
    root: SpanId,
    parent: Option<SpanId>,
    start: Instant,
    start_unix_nano: u64,
    admitted: Option<Instant>,
    /// When the worker took the request, and how long it had waited.
    engine_started: Option<(Instant, Duration)>,
    first_token: Option<Instant>,
    done: Option<Instant>,
}

/// What the request turned out to be, for the root span's attributes.
pub struct RequestSummary<'a> {
    pub request_id: &'a str,
    pub plane: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub principal: Option<&'a str>,
    pub model: Option<&'a str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub error: Option<&'a str>,
    /// `(stage, reason)` when a layer refused the request.
    pub rejection: Option<(&'a str, &'a str)>,
}

impl RequestTrace {
    pub fn trace_id(&self) -> &TraceId {
        &self.trace_id
    }

    pub fn mark_admitted(&mut self) {
        self.admitted.get_or_insert_with(Instant::now);
    }

    pub fn mark_engine_started(&mut self, queue_wait: Duration) {
        self.engine_started.get_or_insert((Instant::now(), queue_wait));
    }

    pub fn mark_first_token(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }

    pub fn mark_done(&mut self) {
        self.done.get_or_insert_with(Instant::now);
    }

    fn at(&self, t: Instant) -> u64 {
        let offset: u64 = t
            .saturating_duration_since(self.start)
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX);
        self.start_unix_nano.saturating_add(offset)
    }

    fn child(&self, name: &str, from: Instant, to: Instant, request_id: &str) -> SpanData {
        SpanData {
            trace_id: self.trace_id,
            span_id: random(),
            parent_span_id: Some(self.root),
            parent_is_remote: false,
            name: name.to_owned(),
            kind: SpanKind::Internal,
            start_unix_nano: self.at(from),
            end_unix_nano: self.at(to),
            attributes: vec![("moat.request_id", AttrValue::Str(request_id.to_owned()))],
            status: StatusCode::Unset,
            status_message: String::new(),
        }
    }

    /// The spans of a request that ended at `end`: the root first.
    pub fn finish(self, end: Instant, s: &RequestSummary<'_>) -> Vec<SpanData> {
        let str_attr = |v: &str| AttrValue::Str(v.to_owned());
        let mut attrs = vec![
            ("moat.request_id", str_attr(s.request_id)),
            ("moat.plane", str_attr(s.plane)),
            ("http.request.method", str_attr(s.method)),
            ("http.route", str_attr(s.route)),
            ("http.response.status_code", AttrValue::Int(i64::from(s.status))),
        ];
        if let Some(p) = s.principal {
            attrs.push(("moat.principal.id", str_attr(p)));
        }
        if let Some(m) = s.model {
            attrs.push(("gen_ai.operation.name", str_attr("chat")));
            attrs.push(("gen_ai.request.model", str_attr(m)));
            attrs.push(("gen_ai.response.model", str_attr(m)));
            attrs.push((
                "gen_ai.response.id",
                str_attr(&format!("chatcmpl-{}", s.request_id)),
            ));
            attrs.push((
                "gen_ai.usage.input_tokens",
                AttrValue::Int(s.prompt_tokens as i64),
            ));
            attrs.push((
                "gen_ai.usage.output_tokens",
                AttrValue::Int(s.completion_tokens as i64),
            ));
        }
        if let Some(e) = s.error {
            attrs.push(("error.type", str_attr(e)));
        } else if s.status >= 500 {
            attrs.push(("error.type", str_attr(&s.status.to_string())));
        }
        // HTTP conventions: a server span is an error for 5xx only; a 4xx is
        // the client's mistake and leaves the status unset.
        let (status, status_message) = if s.status >= 500 {
            (StatusCode::Error, s.error.unwrap_or("server error").to_owned())
        } else {
            (StatusCode::Unset, String::new())
        };
        let mut spans = vec![SpanData {
            trace_id: self.trace_id,
            span_id: self.root,
            parent_span_id: self.parent,
            parent_is_remote: self.parent.is_some(),
            name: format!("{} {}", s.method, s.route),
            kind: SpanKind::Server,
            start_unix_nano: self.start_unix_nano,
            end_unix_nano: self.at(end),
            attributes: attrs,
            status,
            status_message,
        }];
        // Admission: from arrival to the rate limiter's yes; a request a
        // layer refused ends its admission with the refusal.
        let admission_end = self.admitted.or(s.rejection.map(|_| end));
        if let Some(to) = admission_end {
            let mut a = self.child("admission", self.start, to, s.request_id);
            match s.rejection {
                Some((stage, reason)) => {
                    a.attributes.push(("moat.admission.outcome", str_attr("denied")));
                    a.attributes.push(("moat.rejection.stage", str_attr(stage)));
                    a.attributes.push(("moat.rejection.reason", str_attr(reason)));
                }
                None => a.attributes.push(("moat.admission.outcome", str_attr("allowed"))),
            }
            if let Some(p) = s.principal {
                a.attributes.push(("moat.principal.id", str_attr(p)));
            }
            spans.push(a);
        }
        if let Some((started, waited)) = self.engine_started {
            let queued = started.checked_sub(waited).unwrap_or(started);
            let mut q = self.child("queue", queued, started, s.request_id);
            if let Some(m) = s.model {
                q.attributes.push(("gen_ai.request.model", str_attr(m)));
            }
            spans.push(q);
            // Prefill runs until the first token leaves the worker; a
            // request that ended before one (error, client gone) ends it
            // then.
            let prefill_end = self.first_token.or(self.done).unwrap_or(end);
            let mut p = self.child("prefill", started, prefill_end, s.request_id);
            p.attributes.push((
                "gen_ai.usage.input_tokens",
                AttrValue::Int(s.prompt_tokens as i64),
            ));
            spans.push(p);
            if let Some(first) = self.first_token {
                let mut d = self.child("decode", first, self.done.unwrap_or(end), s.request_id);
                d.attributes.push((
                    "gen_ai.usage.output_tokens",
                    AttrValue::Int(s.completion_tokens as i64),
                ));
                if self.done.is_none() {
                    d.status = StatusCode::Error;
                    d.status_message = s.error.unwrap_or("generation did not finish").to_owned();
                }
                spans.push(d);
            }
        }
        spans
    }
}

/// Starts request traces and hands finished spans to the exporter.
pub struct Tracer {
    sample_ratio: f64,
    exporter: export::Exporter,
}

impl Tracer {
    /// Starts the background exporter thread.
    pub fn start(config: &TracingConfig, counters: export::Counters) -> std::io::Result<Self> {
        Ok(Self {
            sample_ratio: config.sample_ratio,
            exporter: export::Exporter::start(config, counters)?,
        })
    }

    /// A trace for a request that arrived at `start`, continuing the
    /// caller's trace when `traceparent` is valid; `None` when not sampled.
    pub fn begin(&self, start: Instant, traceparent: Option<&str>) -> Option<RequestTrace> {
        let parent = traceparent.and_then(parse_traceparent);
        let (trace_id, sampled) = match parent {
            Some(p) => (p.trace_id, p.sampled),
            None => {
                let id = random();
                (id, ratio_samples(self.sample_ratio, &id))
            }
        };
        if !sampled {
            return None;
        }
        let now = SystemTime::now();
        let start_wall = now.checked_sub(start.elapsed()).unwrap_or(now);
        Some(RequestTrace {
            trace_id,
            root: random(),
            parent: parent.map(|p| p.span_id),
            start,
            start_unix_nano: unix_nanos(start_wall),
            admitted: None,
            engine_started: None,
            first_token: None,
            done: None,
        })
    }

    /// Queues spans for export; never waits.
    pub fn export(&self, spans: Vec<SpanData>) {
        self.exporter.offer(spans);
    }

    /// Sends what is queued, waiting at most `timeout` (at shutdown).
    pub fn shutdown(&self, timeout: Duration) {
        self.exporter.shutdown(timeout);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let p = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex::encode(p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        let p = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!p.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn ratio_sampling_keeps_about_the_ratio() {
        assert!(ratio_samples(1.0, &[0xff; 16]));
        assert!(!ratio_samples(0.0, &[0; 16]));
        let kept = (0..10_000).filter(|_| ratio_samples(0.25, &random())).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
    }

    fn summary(status: u16, rejection: Option<(&'static str, &'static str)>) -> RequestSummary<'static> {
        RequestSummary {
            request_id: "abc",
            plane: "inference",
            method: "POST",
            route: "/v1/chat/completions",
            status,
            principal: Some("key1"),
            model: Some("m"),
            prompt_tokens: 7,
            completion_tokens: 3,
            error: None,
            rejection,
        }
    }

    fn trace() -> RequestTrace {
        RequestTrace {
            trace_id: [1; 16],
            root: [2; 8],
            parent: None,
            start: Instant::now(),
            start_unix_nano: 1_000,
            admitted: None,
            engine_started: None,
            first_token: None,
            done: None,
        }
    }

    #[test]
    fn a_completed_chat_has_every_phase_in_order_under_the_root() {
        let mut t = trace();
        t.mark_admitted();
        std::thread::sleep(Duration::from_millis(2));
        t.mark_engine_started(Duration::from_millis(1));
        t.mark_first_token();
        t.mark_done();
        let spans = t.finish(Instant::now(), &summary(200, None));
        let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "POST /v1/chat/completions",
                "admission",
                "queue",
                "prefill",
                "decode"
            ]
        );
        let root = &spans[0];
        assert_eq!(root.parent_span_id, None);
        assert_eq!(root.kind, SpanKind::Server);
        for s in &spans[1..] {
            assert_eq!(s.parent_span_id, Some(root.span_id), "{}", s.name);
            assert_eq!(s.trace_id, root.trace_id);
            assert!(s.start_unix_nano >= root.start_unix_nano && s.end_unix_nano <= root.end_unix_nano);
        }
        // Queue ends where prefill starts; prefill where decode starts.
        assert_eq!(spans[2].end_unix_nano, spans[3].start_unix_nano);
        assert_eq!(spans[3].end_unix_nano, spans[4].start_unix_nano);
        assert!(
            root.attributes
                .contains(&("gen_ai.usage.output_tokens", AttrValue::Int(3)))
        );
    }

    #[test]
    fn a_refused_request_has_a_denied_admission_and_no_engine_spans() {
        let spans = trace().finish(
            Instant::now(),
            &summary(429, Some(("rate_limit", "requests_per_minute"))),
        );
        assert_eq!(spans.len(), 2);
        assert!(
            spans[1]
                .attributes
                .contains(&("moat.admission.outcome", AttrValue::Str("denied".into())))
        );
        assert_eq!(spans[0].status, StatusCode::Unset);
        let spans = trace().finish(Instant::now(), &summary(503, None));
        assert_eq!(spans[0].status, StatusCode::Error);
    }
}
