//! OpenAI-compatible routes: `GET /v1/models`, `GET /v1/models/{model}`,
//! `POST /v1/chat/completions` (plain and streamed). Wire types live here;
//! the engine sees only its own [`ChatRequest`].
//!
//! Streaming follows OpenAI exactly: `data: {chunk}\n\n` … `data: [DONE]\n\n`,
//! the same `id` and `created` on every chunk, the role in the first delta,
//! `finish_reason` in the last choice chunk and, with
//! `stream_options.include_usage`, `"usage": null` on every chunk and one
//! final chunk with `"choices": []` and the usage.

use crate::error::ApiError;
use crate::metrics::{Rejection, TokenTimer};
use crate::state::{AppState, RequestContext};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use moat_engine::{Backend, ChatMessage, ChatRequest, Event, FinishReason, Usage};
use moat_guard::Principal;
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The subset of the OpenAI request we honour. Unknown fields are ignored
/// (clients send many); fields we know but cannot honour are refused below
/// rather than silently ignored.
#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<WireMessage>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    logprobs: Option<bool>,
    tools: Option<Value>,
}

fn unix_now() -> u64 {
    moat_guard::keys::now_unix()
}

fn context(req: &axum::http::request::Parts) -> Option<Arc<RequestContext>> {
    req.extensions.get::<Arc<RequestContext>>().cloned()
}

pub async fn list_models(
    State(state): State<Arc<AppState>>,
    principal: axum::Extension<Principal>,
) -> Response {
    let data: Vec<Value> = state
        .engines()
        .keys()
        .filter(|name| principal.may_use_model(name))
        .map(|name| model_object(name, state.loaded_at))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A key used outside its `--models` scope.
const MODEL_SCOPE: Rejection = Rejection::new("rbac", "model_scope");

fn model_object(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "moat"})
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    Path(model): Path<String>,
) -> Response {
    if state.engine(&model).is_none() {
        ApiError::model_not_found(&model).into_response()
    } else if !principal.may_use_model(&model) {
        if let Some(ctx) = context(&parts) {
            ctx.set_rejection(MODEL_SCOPE);
        }
        // As for chat: a known model outside the key's scope is a 403.
        ApiError::forbidden(format!("this API key may not use model `{model}`")).into_response()
    } else {
        Json(model_object(&model, state.loaded_at)).into_response()
    }
}

/// Parse a JSON body, naming the offending field on error.
fn parse_body<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(None, format!("cannot read the request body: {rej}"))
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // "." is the document itself and "?" an unknown position (e.g. the
        // body ended early): neither names a parameter.
        let param = (path != "." && path != "?").then_some(path);
        ApiError::bad_request(
            param.clone(),
            match param {
                Some(p) => format!("invalid request body at `{p}`: {}", e.inner()),
                None => format!("invalid request body: {}", e.inner()),
            },
        )
    })
}

fn into_engine_request(req: &ChatCompletionRequest) -> Result<ChatRequest, ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(Some("n".into()), "only n = 1 is supported"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::bad_request(
            Some("logprobs".into()),
            "logprobs are not supported",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::bad_request(
            Some("tools".into()),
            "tools are not supported",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(
                                Some(format!("messages[{i}].content[{j}]")),
                                format!("content part of type {:?} is not supported (only text)", p.kind),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
        });
    }
    Ok(ChatRequest {
        messages,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.map(|s| s as u64),
        stop: match &req.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = context(&parts).ok_or_else(|| ApiError::internal("request context missing"))?;
    let req: ChatCompletionRequest = parse_body(body, state.max_body_bytes)?;
    let engine = state
        .engine(&req.model)
        .ok_or_else(|| ApiError::model_not_found(&req.model))?;
    if !principal.may_use_model(&req.model) {
        ctx.set_rejection(MODEL_SCOPE);
        return Err(ApiError::forbidden(format!(
            "this API key may not use model `{}`",
            req.model
        )));
    }
    ctx.set_model(engine.name(), engine.revision());
    // The role's caps, then the token budget: `max_tokens` is the most this
    // request can cost, reserved now and settled when the response ends.
    // One limits version for the whole request, even if SIGHUP swaps them.
    let rate = state.rate.load();
    let limits = rate.limits_for(&principal);
    let asked = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(state.default_max_tokens);
    if let Some(cap) = limits.max_tokens
        && asked > cap
    {
        ctx.set_rejection(Rejection::new("limits", "max_tokens_cap"));
        return Err(ApiError::bad_request(
            Some("max_tokens".into()),
            format!(
                "max_tokens {asked} exceeds the max_tokens limit of {cap} for this caller (role or key limits)"
            ),
        ));
    }
    if let (Some(cap), Some(n)) = (limits.max_n, req.n)
        && n > cap
    {
        ctx.set_rejection(Rejection::new("limits", "n_cap"));
        return Err(ApiError::bad_request(
            Some("n".into()),
            format!("n {n} exceeds the max_n limit of {cap} for this caller (role or key limits)"),
        ));
    }
    let mut token_headers = None;
    match rate.reserve_tokens(&principal, asked).await {
        Ok(Some(r)) => {
            token_headers = Some((r.limit(), r.remaining()));
            ctx.hold_reservation(r);
        }
        Ok(None) => {}
        Err(refused) => {
            ctx.set_rejection(Rejection::new("rate_limit", refused.reason));
            return Ok(crate::middleware::refused_response(refused));
        }
    }
    let chat_request = into_engine_request(&req)?;
    if let Some(audit) = &state.audit {
        // A keyed hash of the prompt (the messages as a JSON array of
        // [role, content] pairs): lets an auditor match a known prompt to
        // its record without the log ever holding prompts.
        let canonical: Vec<[&str; 2]> = chat_request
            .messages
            .iter()
            .map(|m| [m.role.as_str(), m.content.as_str()])
            .collect();
        ctx.set_prompt_hmac(
            audit
                .keys()
                .prompt_hmac(&serde_json::to_string(&canonical).unwrap_or_default()),
        );
        if state.capture.is_some() {
            ctx.set_capture_prompt(
                canonical
                    .iter()
                    .map(|[r, c]| [(*r).to_owned(), (*c).to_owned()])
                    .collect(),
            );
        }
    }
    let stream = req.stream == Some(true);
    // The embedded engine validates and queues at once; an upstream pool
    // returns once a replica produced the first piece of the answer (for a
    // stream) or the whole answer, having retried elsewhere before that.
    let submitted = engine.submit(chat_request, stream).await?;
    let events = submitted.events;
    if let Some(prompt_tokens) = submitted.prompt_tokens {
        // Admitted: the prompt will be processed even if the client leaves.
        ctx.set_tokens(prompt_tokens, 0);
    }
    let id = format!("chatcmpl-{}", ctx.request_id);
    let created = unix_now();
    let mut resp = if stream {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        stream_response(state, engine, events, ctx, id, created, include_usage)
    } else {
        complete_response(&state, engine, events, ctx, id, created).await?
    };
    if let Some((limit, remaining)) = token_headers {
        let h = resp.headers_mut();
        h.insert("x-ratelimit-limit-tokens", limit.into());
        h.insert("x-ratelimit-remaining-tokens", remaining.into());
    }
    Ok(resp)
}

async fn complete_response(
    state: &AppState,
    engine: Arc<Backend>,
    mut events: mpsc::Receiver<Event>,
    ctx: Arc<RequestContext>,
    id: String,
    created: u64,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut timer = TokenTimer::new(ctx.started());
    loop {
        let next = tokio::select! {
            ev = events.recv() => ev,
            () = state.shutdown.deadline_passed() => {
                ctx.set_error("shutting_down");
                return Err(ApiError::shutting_down());
            }
        };
        match next {
            Some(Event::Started { queue_wait }) => {
                ctx.mark_engine_started(queue_wait);
                state.metrics.observe_queue_wait(engine.name(), queue_wait)
            }
            Some(Event::Delta {
                content: c,
                reasoning: r,
                tokens,
            }) => {
                timer.tokens(tokens);
                ctx.set_completion_tokens(tokens);
                content.push_str(&c);
                reasoning.push_str(&r);
            }
            Some(Event::Done { finish_reason, usage }) => {
                ctx.mark_generation_done();
                ctx.set_tokens(usage.prompt_tokens, usage.completion_tokens);
                timer.finish(&state.metrics, engine.name());
                // Sealed and on disk before the response (and its record).
                ctx.write_capture(
                    engine.name(),
                    content.clone(),
                    reasoning.clone(),
                    finish_reason.as_str(),
                )
                .await;
                let mut message = json!({"role": "assistant", "content": content});
                if !reasoning.is_empty() {
                    message["reasoning_content"] = Value::String(reasoning);
                }
                return Ok(Json(json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": engine.name(),
                    "system_fingerprint": fingerprint(&engine),
                    "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason.as_str()}],
                    "usage": usage_json(usage),
                }))
                .into_response());
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(e)),
            None => return Err(ApiError::internal("the engine stopped before finishing")),
        }
    }
}

fn usage_json(u: Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.prompt_tokens + u.completion_tokens})
}

/// Identifies the exact weights that answered (the lock's revision).
fn fingerprint(engine: &Backend) -> String {
    let rev = engine.revision();
    let short = rev.strip_prefix("sha256:").unwrap_or(rev);
    format!("moat-{}", &short[..short.len().min(16)])
}

fn stream_response(
    state: Arc<AppState>,
    engine: Arc<Backend>,
    mut events: mpsc::Receiver<Event>,
    ctx: Arc<RequestContext>,
    id: String,
    created: u64,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let model = engine.name().to_owned();
    let fp = fingerprint(&engine);
    tokio::spawn(async move {
        // The stream holds its engine to the end: `DELETE /models/{name}`
        // waits for every holder before it reports the model drained.
        let _engine = engine;
        let chunk = |delta: Value, finish: Option<FinishReason>| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(FinishReason::as_str)}],
            });
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        // `false` when the client went away; dropping `events` then stops
        // the worker for this request.
        // What the client was sent, for the capture (when on).
        let capturing = state.capture.is_some();
        let mut sent_content = String::new();
        let mut sent_reasoning = String::new();
        let mut finish = "incomplete";
        let delivered = 'stream: {
            if !send(chunk(json!({"role": "assistant", "content": ""}), None)).await {
                break 'stream false;
            }
            let mut timer = TokenTimer::new(ctx.started());
            loop {
                let next = tokio::select! {
                    ev = events.recv() => ev,
                    // Past the drain deadline the stream ends with an error
                    // chunk and `[DONE]`; dropping `events` stops the worker.
                    () = state.shutdown.deadline_passed() => {
                        ctx.set_error("shutting_down");
                        let _ = send(ApiError::shutting_down().body()).await;
                        break;
                    }
                };
                let Some(ev) = next else { break };
                match ev {
                    Event::Started { queue_wait } => {
                        ctx.mark_engine_started(queue_wait);
                        state.metrics.observe_queue_wait(&model, queue_wait)
                    }
                    Event::Delta {
                        content,
                        reasoning,
                        tokens,
                    } => {
                        timer.tokens(tokens);
                        ctx.set_completion_tokens(tokens);
                        if capturing {
                            sent_content.push_str(&content);
                            sent_reasoning.push_str(&reasoning);
                        }
                        let delta = if reasoning.is_empty() {
                            json!({"content": content})
                        } else {
                            json!({"reasoning_content": reasoning})
                        };
                        if !send(chunk(delta, None)).await {
                            break 'stream false;
                        }
                    }
                    Event::Done { finish_reason, usage } => {
                        ctx.mark_generation_done();
                        ctx.set_tokens(usage.prompt_tokens, usage.completion_tokens);
                        timer.finish(&state.metrics, &model);
                        finish = finish_reason.as_str();
                        if !send(chunk(json!({}), Some(finish_reason))).await {
                            break 'stream false;
                        }
                        if include_usage {
                            let mut last = chunk(json!({}), None);
                            last["choices"] = json!([]);
                            last["usage"] = usage_json(usage);
                            if !send(last).await {
                                break 'stream false;
                            }
                        }
                        break;
                    }
                    Event::Error(e) => {
                        ctx.set_error("inference_error");
                        finish = "error";
                        let _ = send(ApiError::internal(e).body()).await;
                        break;
                    }
                }
            }
            true
        };
        if !delivered {
            finish = "client_disconnected";
        }
        ctx.write_capture(&model, sent_content, sent_reasoning, finish)
            .await;
        if !delivered {
            ctx.set_error("client_disconnected");
            return;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        // `ctx` drops here, after the last byte was handed to the body: the
        // record carries the stream's full duration and token counts.
        drop(ctx);
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}
