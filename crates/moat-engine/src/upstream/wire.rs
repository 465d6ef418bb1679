//! The OpenAI wire format as spoken to upstreams: the request body we send
//! (only the fields moat validated, never the client's raw JSON), the
//! server-sent-events framing of a streamed answer, and the pieces of a
//! chunk or a whole completion we turn into engine [`Event`]s.
//!
//! Chunks are parsed into small borrowed-where-possible structs rather than
//! `serde_json::Value`, and SSE framing works on one reusable buffer, so the
//! proxy path allocates little per chunk.

use crate::generate::{Event, FinishReason, Usage};
use crate::request::ChatRequest;
use serde::{Deserialize, Serialize};

/// An SSE event larger than this is refused: no honest chunk is near it,
/// and it bounds what a broken upstream can make us hold.
pub(crate) const MAX_EVENT_BYTES: usize = 1 << 20;
/// A whole non-streamed answer larger than this is refused.
pub(crate) const MAX_BODY_BYTES: usize = 16 << 20;

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Outgoing<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    // Not OpenAI's own, but vLLM, llama.cpp, TGI and Ollama's
    // OpenAI-compatible servers take them; sent only when the client did.
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repetition_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

/// The body sent to one upstream; usage is always asked for in streams so
/// token accounting and rate limits see the real counts.
pub(crate) fn request_body(model: &str, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, String> {
    let out = Outgoing {
        model,
        messages: req
            .messages
            .iter()
            .map(|m| OutMessage {
                role: &m.role,
                content: &m.content,
            })
            .collect(),
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        stop: &req.stop,
        stream,
        stream_options: stream.then_some(StreamOptions { include_usage: true }),
    };
    serde_json::to_vec(&out).map_err(|e| format!("cannot encode the upstream request: {e}"))
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: usize,
    #[serde(default)]
    completion_tokens: usize,
}

#[derive(Deserialize, Default)]
struct Text {
    content: Option<String>,
    /// DeepSeek and SGLang's name; vLLM's reasoning parser uses `reasoning`.
    reasoning_content: Option<String>,
    reasoning: Option<String>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Text,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    message: Option<String>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<WireUsage>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    message: Text,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    usage: Option<WireUsage>,
}

fn finish_reason(s: Option<&str>) -> FinishReason {
    match s {
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

fn usage(u: WireUsage) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
    }
}

/// Turns a stream of chunks into events. Upstreams differ in when they send
/// `finish_reason` and usage (usage comes in its own last chunk when asked
/// for), so `Done` is only emitted at `[DONE]` or the end of the body.
#[derive(Default)]
pub(crate) struct StreamState {
    /// Text pieces seen: the completion-token count when usage is absent
    /// (each chunk of vLLM, TGI, llama.cpp and Ollama carries one token).
    pieces: usize,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    pub(crate) done: bool,
}

impl StreamState {
    /// One SSE `data:` payload; pushes the events it stands for.
    pub(crate) fn data(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        if data == b"[DONE]" {
            out.push(self.finish());
            return Ok(());
        }
        let chunk: Chunk =
            serde_json::from_slice(data).map_err(|e| format!("upstream sent a malformed chunk: {e}"))?;
        if let Some(err) = chunk.error {
            return Err(format!(
                "upstream error: {}",
                clip(err.message.as_deref().unwrap_or("(no message)"))
            ));
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(usage(u));
        }
        // moat asks for one choice; anything else is not ours to relay.
        for c in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let reasoning = c
                .delta
                .reasoning_content
                .or(c.delta.reasoning)
                .unwrap_or_default();
            if !reasoning.is_empty() {
                self.pieces += 1;
                out.push(Event::Delta {
                    index: 0,
                    logprobs: Vec::new(),
                    content: String::new(),
                    reasoning,
                    tokens: self.pieces,
                });
            }
            let content = c.delta.content.unwrap_or_default();
            if !content.is_empty() {
                self.pieces += 1;
                out.push(Event::Delta {
                    index: 0,
                    logprobs: Vec::new(),
                    content,
                    reasoning: String::new(),
                    tokens: self.pieces,
                });
            }
            if let Some(f) = c.finish_reason {
                self.finish = Some(finish_reason(Some(&f)));
            }
        }
        Ok(())
    }

    /// The closing event (also when an upstream ends its body without
    /// `[DONE]` after a finish reason, as some servers do).
    pub(crate) fn finish(&mut self) -> Event {
        self.done = true;
        Event::Done {
            finish_reason: self.finish.unwrap_or(FinishReason::Stop),
            usage: self.usage.unwrap_or(Usage {
                prompt_tokens: 0,
                completion_tokens: self.pieces,
            }),
        }
    }

    pub(crate) fn saw_finish(&self) -> bool {
        self.finish.is_some()
    }
}

/// Server-sent-events framing over arbitrary body pieces: events end at a
/// blank line (`\n\n` or `\r\n\r\n`); only `data:` lines matter here.
#[derive(Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    /// Where the next search for an event end starts.
    scanned: usize,
    /// One event's joined `data:` lines; kept to reuse its allocation.
    data: Vec<u8>,
}

impl SseParser {
    /// Add body bytes and hand every complete event's data to `each`.
    pub(crate) fn push(
        &mut self,
        bytes: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let data = &mut self.data;
        while let Some((end, next)) = event_end(&self.buf, start.max(self.scanned)) {
            data.clear();
            for line in self.buf[start..end].split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(v) = line.strip_prefix(b"data:") {
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
                }
            }
            if !data.is_empty() {
                each(data)?;
            }
            start = next;
            self.scanned = next;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len().saturating_sub(3);
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(format!("upstream sent an event over {MAX_EVENT_BYTES} bytes"));
        }
        Ok(())
    }
}

/// The end of the first event at or after `from`: (end of its text, start
/// of the next event).
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// A whole non-streamed completion as events.
pub(crate) fn completion_events(body: &[u8]) -> Result<Vec<Event>, String> {
    let c: Completion =
        serde_json::from_slice(body).map_err(|e| format!("upstream sent a malformed completion: {e}"))?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or("upstream sent a completion without choices")?;
    let content = choice.message.content.unwrap_or_default();
    let reasoning = choice
        .message
        .reasoning_content
        .or(choice.message.reasoning)
        .unwrap_or_default();
    let usage = c.usage.map(usage).unwrap_or_default();
    let mut out = Vec::with_capacity(3);
    if !reasoning.is_empty() {
        out.push(Event::Delta {
            index: 0,
            logprobs: Vec::new(),
            content: String::new(),
            reasoning,
            tokens: usage.completion_tokens,
        });
    }
    if !content.is_empty() {
        out.push(Event::Delta {
            index: 0,
            logprobs: Vec::new(),
            content,
            reasoning: String::new(),
            tokens: usage.completion_tokens,
        });
    }
    out.push(Event::Done {
        finish_reason: finish_reason(choice.finish_reason.as_deref()),
        usage,
    });
    Ok(out)
}

/// The message of an upstream's OpenAI-shaped error body, clipped, for a
/// 400 relayed to the client (the upstream judged the request, not us).
pub(crate) fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Wrapper {
        error: WireErrorAny,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum WireErrorAny {
        Object { message: String },
        Text(String),
    }
    let w: Wrapper = serde_json::from_slice(body).ok()?;
    Some(clip(match &w.error {
        WireErrorAny::Object { message } => message,
        WireErrorAny::Text(t) => t,
    }))
}

/// Upstream text placed in our errors is bounded and printable.
fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(300).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn parse_all(pieces: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for piece in pieces {
            p.push(piece, |d| {
                got.push(d.to_vec());
                Ok(())
            })
            .unwrap();
        }
        got
    }

    #[test]
    fn sse_events_split_anywhere() {
        let whole: &[u8] = b"data: {\"a\":1}\n\n: comment\n\ndata: [DONE]\r\n\r\n";
        for cut in 0..whole.len() {
            let got = parse_all(&[&whole[..cut], &whole[cut..]]);
            assert_eq!(
                got,
                vec![b"{\"a\":1}".to_vec(), b"[DONE]".to_vec()],
                "cut at {cut}"
            );
        }
        // Byte by byte.
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(parse_all(&bytes).len(), 2);
    }

    #[test]
    fn oversized_event_is_refused() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.push(&big, |_| Ok(())).is_err());
    }

    #[test]
    fn chunks_become_events_with_usage() {
        let mut s = StreamState::default();
        let mut ev = Vec::new();
        for d in [
            &br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#[..],
            br#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}"#,
            br#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"length"}]}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#,
            b"[DONE]",
        ] {
            s.data(d, &mut ev).unwrap();
        }
        assert_eq!(ev.len(), 3);
        assert!(matches!(&ev[0], Event::Delta { reasoning, .. } if reasoning == "hm"));
        assert!(matches!(&ev[1], Event::Delta { content, tokens: 2, .. } if content == "Hi"));
        assert_eq!(
            ev[2],
            Event::Done {
                finish_reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                }
            }
        );
    }

    #[test]
    fn error_chunk_is_an_error() {
        let mut s = StreamState::default();
        let err = s
            .data(br#"{"error":{"message":"boom\nx"}}"#, &mut Vec::new())
            .unwrap_err();
        assert_eq!(err, "upstream error: boomx");
    }

    #[test]
    fn request_body_carries_only_validated_fields() {
        let req = ChatRequest {
            messages: vec![crate::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: Some(5),
            stop: vec!["x".into()],
            ..ChatRequest::default()
        };
        let v: serde_json::Value =
            serde_json::from_slice(&request_body("up-model", &req, true).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model":"up-model","messages":[{"role":"user","content":"hi"}],
                "max_tokens":5,"stop":["x"],"stream":true,"stream_options":{"include_usage":true}})
        );
    }

    #[test]
    fn completion_and_error_bodies() {
        let ev = completion_events(
            br#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],
                 "usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        )
        .unwrap();
        assert_eq!(ev.len(), 2);
        assert!(completion_events(b"{\"choices\":[]}").is_err());
        assert_eq!(
            error_message(br#"{"error":{"message":"too long","type":"x"}}"#).as_deref(),
            Some("too long")
        );
        assert_eq!(error_message(br#"{"error":"plain"}"#).as_deref(), Some("plain"));
        assert_eq!(error_message(b"<html>"), None);
    }
}
