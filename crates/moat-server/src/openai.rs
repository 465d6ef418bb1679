//! OpenAI-compatible routes: `GET /v1/models`, `GET /v1/models/{model}`,
//! `POST /v1/chat/completions` and `POST /v1/completions` (plain and
//! streamed, `n` choices, log-probabilities). Wire types live here; the
//! engine sees only its own [`ChatRequest`].
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
use moat_engine::{Backend, ChatMessage, ChatRequest, Event, FinishReason, Prompt, TokenLogprob, Usage};
use moat_guard::Principal;
use serde::{Deserialize, Serialize};
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
/// rather than silently ignored. `top_k`, `min_p` and `repetition_penalty`
/// (and `ignore_eos`) are vLLM's extensions; `include_reasoning` is
/// OpenRouter's name for the
/// reasoning switch.
#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<WireMessage>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    ignore_eos: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    include_reasoning: Option<bool>,
    tools: Option<Value>,
}

/// An engine request with the sampling fields both APIs share (a macro:
/// the two wire structs are separate so that parse errors name the field,
/// which `#[serde(flatten)]` would lose).
macro_rules! sampling_request {
    ($r:expr) => {
        ChatRequest {
            temperature: $r.temperature,
            top_p: $r.top_p,
            top_k: $r.top_k,
            min_p: $r.min_p,
            repetition_penalty: $r.repetition_penalty,
            presence_penalty: $r.presence_penalty,
            frequency_penalty: $r.frequency_penalty,
            seed: $r.seed.map(|s| s as u64),
            stop: match &$r.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            n: $r.n,
            ignore_eos: $r.ignore_eos.unwrap_or(false),
            ..ChatRequest::default()
        }
    };
}

/// `prompt` of a plain completion: OpenAI also takes a list (a batch);
/// moat serves one prompt per request.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WirePrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: WirePrompt,
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    ignore_eos: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// Alternatives per token (the legacy API's integer form).
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u32>,
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
    // The plain parse first: tracking the path costs on every request, and
    // it is only needed to name the field of a body that is wrong.
    if let Ok(v) = serde_json::from_slice(&bytes) {
        return Ok(v);
    }
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
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::bad_request(
            Some("tools".into()),
            "tools are not supported",
        ));
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::bad_request(
                Some("top_logprobs".into()),
                "top_logprobs needs logprobs: true",
            ));
        }
        _ => None,
    };
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
        logprobs,
        include_reasoning: req.include_reasoning,
        ..sampling_request!(req)
    })
}

fn into_completion_request(req: &CompletionRequest) -> Result<ChatRequest, ApiError> {
    let bad = |param: &str, msg: &str| Err(ApiError::bad_request(Some(param.into()), msg.to_owned()));
    if req.echo == Some(true) {
        return bad("echo", "echo is not supported");
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return bad("suffix", "suffix is not supported");
    }
    if req.best_of.is_some_and(|b| b != req.n.unwrap_or(1)) {
        return bad("best_of", "best_of other than n is not supported");
    }
    let one = "one prompt per request: send a batch as separate requests";
    let prompt = match &req.prompt {
        WirePrompt::Text(t) => Prompt::Text(t.clone()),
        WirePrompt::Texts(v) if v.len() == 1 => Prompt::Text(v[0].clone()),
        WirePrompt::Tokens(v) => Prompt::Tokens(v.clone()),
        WirePrompt::TokenLists(v) if v.len() == 1 => Prompt::Tokens(v[0].clone()),
        WirePrompt::Texts(_) | WirePrompt::TokenLists(_) => return bad("prompt", one),
    };
    Ok(ChatRequest {
        prompt: Some(prompt),
        max_tokens: req.max_tokens,
        logprobs: req.logprobs,
        ..sampling_request!(req)
    })
}

/// Which API a response speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

/// The checks and bookkeeping every generation request goes through, the
/// same for chat and plain completions: model lookup, RBAC scope, the
/// caller's caps, the engine request's own checks, the token budget
/// (`max_tokens × n` reserved now, settled when the response ends), the
/// audit's keyed prompt hash and capture, then submission.
struct Admitted {
    engine: Arc<Backend>,
    events: mpsc::Receiver<Event>,
    token_headers: Option<(u64, u64)>,
}

#[allow(clippy::too_many_arguments)] // one call site per API; a struct would only rename them
async fn admit(
    state: &Arc<AppState>,
    principal: &Principal,
    ctx: &Arc<RequestContext>,
    model: &str,
    engine_request: Result<ChatRequest, ApiError>,
    prompt_for_audit: impl FnOnce(&ChatRequest) -> Vec<[String; 2]>,
    stream: bool,
) -> Result<Result<Admitted, Response>, ApiError> {
    let engine = state
        .engine(model)
        .ok_or_else(|| ApiError::model_not_found(model))?;
    if !principal.may_use_model(model) {
        ctx.set_rejection(MODEL_SCOPE);
        return Err(ApiError::forbidden(format!(
            "this API key may not use model `{model}`"
        )));
    }
    ctx.set_model(engine.name(), engine.revision());
    let engine_request = engine_request?;
    // The role's caps, then the token budget: `max_tokens` per choice is
    // the most this request can cost, reserved now and settled when the
    // response ends. One limits version for the whole request, even if
    // SIGHUP swaps them.
    let rate = state.rate.load();
    let limits = rate.limits_for(principal);
    let asked = engine_request.max_tokens.unwrap_or(state.default_max_tokens);
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
    if let (Some(cap), Some(n)) = (limits.max_n, engine_request.n)
        && n > cap
    {
        ctx.set_rejection(Rejection::new("limits", "n_cap"));
        return Err(ApiError::bad_request(
            Some("n".into()),
            format!("n {n} exceeds the max_n limit of {cap} for this caller (role or key limits)"),
        ));
    }
    let mut token_headers = None;
    let reserve = asked.saturating_mul(u64::from(engine_request.choices()));
    match rate.reserve_tokens(principal, reserve).await {
        Ok(Some(r)) => {
            token_headers = Some((r.limit(), r.remaining()));
            ctx.hold_reservation(r);
        }
        Ok(None) => {}
        Err(refused) => {
            ctx.set_rejection(Rejection::new("rate_limit", refused.reason));
            return Ok(Err(crate::middleware::refused_response(refused)));
        }
    }
    if let Some(audit) = &state.audit {
        // A keyed hash of the prompt (chat: the messages as a JSON array of
        // [role, content] pairs; completion: [["prompt", text]]): lets an
        // auditor match a known prompt to its record without the log ever
        // holding prompts.
        let canonical = prompt_for_audit(&engine_request);
        ctx.set_prompt_hmac(
            audit
                .keys()
                .prompt_hmac(&serde_json::to_string(&canonical).unwrap_or_default()),
        );
        if state.capture.is_some() {
            ctx.set_capture_prompt(canonical);
        }
    }
    // The embedded engine validates and queues at once; an upstream pool
    // returns once a replica produced the first piece of the answer (for a
    // stream) or the whole answer, having retried elsewhere before that.
    let submitted = engine.submit(engine_request, stream).await?;
    if let Some(prompt_tokens) = submitted.prompt_tokens {
        // Admitted: the prompt will be processed even if the client leaves.
        ctx.set_tokens(prompt_tokens, 0);
    }
    Ok(Ok(Admitted {
        engine,
        events: submitted.events,
        token_headers,
    }))
}

fn with_token_headers(mut resp: Response, headers: Option<(u64, u64)>) -> Response {
    if let Some((limit, remaining)) = headers {
        let h = resp.headers_mut();
        h.insert("x-ratelimit-limit-tokens", limit.into());
        h.insert("x-ratelimit-remaining-tokens", remaining.into());
    }
    resp
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = context(&parts).ok_or_else(|| ApiError::internal("request context missing"))?;
    let req: ChatCompletionRequest = parse_body(body, state.max_body_bytes)?;
    let stream = req.stream == Some(true);
    let admitted = admit(
        &state,
        &principal,
        &ctx,
        &req.model,
        into_engine_request(&req),
        |r| {
            r.messages
                .iter()
                .map(|m| [m.role.clone(), m.content.clone()])
                .collect()
        },
        stream,
    )
    .await?;
    let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let n = req.n.unwrap_or(1).max(1) as usize;
    respond(state, admitted, ctx, Api::Chat, include_usage, n, stream).await
}

/// `POST /v1/completions`: a plain completion of one prompt (text or token
/// ids), plain or streamed, with the same checks, limits and audit as chat.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    principal: axum::Extension<Principal>,
    parts: axum::http::request::Parts,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = context(&parts).ok_or_else(|| ApiError::internal("request context missing"))?;
    let req: CompletionRequest = parse_body(body, state.max_body_bytes)?;
    let stream = req.stream == Some(true);
    let admitted = admit(
        &state,
        &principal,
        &ctx,
        &req.model,
        into_completion_request(&req),
        |r| match &r.prompt {
            Some(Prompt::Text(t)) => vec![["prompt".to_owned(), t.clone()]],
            Some(Prompt::Tokens(ids)) => vec![[
                "prompt_tokens".to_owned(),
                serde_json::to_string(ids).unwrap_or_default(),
            ]],
            None => Vec::new(),
        },
        stream,
    )
    .await?;
    let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let n = req.n.unwrap_or(1).max(1) as usize;
    respond(state, admitted, ctx, Api::Completion, include_usage, n, stream).await
}

/// The answer to an admitted request, streamed or whole, in `api`'s shape
/// (the id prefix follows OpenAI's: `chatcmpl-` or `cmpl-`).
async fn respond(
    state: Arc<AppState>,
    admitted: Result<Admitted, Response>,
    ctx: Arc<RequestContext>,
    api: Api,
    include_usage: bool,
    n: usize,
    stream: bool,
) -> Result<Response, ApiError> {
    let a = match admitted {
        Ok(a) => a,
        Err(refused) => return Ok(refused),
    };
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completion => "cmpl",
    };
    let shape = Shape {
        api,
        id: format!("{prefix}-{}", ctx.request_id),
        created: unix_now(),
        model: a.engine.name().to_owned(),
        fingerprint: fingerprint(&a.engine),
        include_usage,
        n,
    };
    let resp = if stream {
        stream_response(state, a.engine, a.events, ctx, shape)
    } else {
        complete_response(&state, a.engine, a.events, ctx, shape).await?
    };
    Ok(with_token_headers(resp, a.token_headers))
}

/// The identity of one response and what its JSON looks like.
struct Shape {
    api: Api,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    include_usage: bool,
    n: usize,
}

fn bytes_of(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes,
/// top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`.
fn chat_logprobs(lp: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lp
        .iter()
        .map(|t| {
            json!({
                "token": t.token, "logprob": t.logprob, "bytes": bytes_of(&t.token),
                "top_logprobs": t.top.iter().map(|a| json!({
                    "token": a.token, "logprob": a.logprob, "bytes": bytes_of(&a.token),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions `logprobs` object: parallel lists of tokens,
/// their log-probabilities, `{token: logprob}` maps of the alternatives, and
/// each token's character offset in the text (from `offset` on).
fn completion_logprobs(lp: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(lp.len());
    for t in lp {
        offsets.push(at);
        at += t.token.chars().count();
    }
    json!({
        "tokens": lp.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lp.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lp.iter().map(|t| {
            t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// What one choice gathered (whole answers) or sent (streams).
#[derive(Default)]
struct ChoiceText {
    content: String,
    reasoning: String,
    logprobs: Vec<TokenLogprob>,
    /// Characters of text so far (completions' `text_offset`).
    chars: usize,
    finish: Option<FinishReason>,
}

async fn complete_response(
    state: &AppState,
    engine: Arc<Backend>,
    mut events: mpsc::Receiver<Event>,
    ctx: Arc<RequestContext>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let mut choices: Vec<ChoiceText> = (0..shape.n).map(|_| ChoiceText::default()).collect();
    let mut wants_logprobs = false;
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
                index,
                content,
                reasoning,
                tokens,
                logprobs,
            }) => {
                timer.tokens(tokens);
                ctx.set_completion_tokens(tokens);
                if let Some(c) = choices.get_mut(index as usize) {
                    c.content.push_str(&content);
                    c.reasoning.push_str(&reasoning);
                    wants_logprobs |= !logprobs.is_empty();
                    c.logprobs.extend(logprobs);
                }
            }
            Some(Event::ChoiceEnd { index, finish_reason }) => {
                if let Some(c) = choices.get_mut(index as usize) {
                    c.finish = Some(finish_reason);
                }
            }
            Some(Event::Done { finish_reason, usage }) => {
                ctx.mark_generation_done();
                ctx.set_tokens(usage.prompt_tokens, usage.completion_tokens);
                timer.finish(&state.metrics, engine.name());
                for c in &mut choices {
                    c.finish.get_or_insert(finish_reason);
                }
                // Sealed and on disk before the response (and its record);
                // the capture holds choice 0.
                if let Some(c) = choices.first() {
                    ctx.write_capture(
                        engine.name(),
                        c.content.clone(),
                        c.reasoning.clone(),
                        c.finish.unwrap_or(finish_reason).as_str(),
                    )
                    .await;
                }
                let object = match shape.api {
                    Api::Chat => "chat.completion",
                    Api::Completion => "text_completion",
                };
                let list: Vec<WholeChoice<'_>> = choices
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let finish_reason = c.finish.unwrap_or(finish_reason).as_str();
                        let logprobs = wants_logprobs.then(|| match shape.api {
                            Api::Chat => chat_logprobs(&c.logprobs),
                            Api::Completion => completion_logprobs(&c.logprobs, 0),
                        });
                        let (message, text) = match shape.api {
                            Api::Chat => (
                                Some(Message {
                                    role: "assistant",
                                    content: &c.content,
                                    reasoning_content: (!c.reasoning.is_empty())
                                        .then_some(c.reasoning.as_str()),
                                }),
                                None,
                            ),
                            Api::Completion => (None, Some(c.content.as_str())),
                        };
                        WholeChoice {
                            index: i,
                            message,
                            text,
                            logprobs,
                            finish_reason,
                        }
                    })
                    .collect();
                return Ok(Json(Whole {
                    id: &shape.id,
                    object,
                    created: shape.created,
                    model: &shape.model,
                    system_fingerprint: &shape.fingerprint,
                    choices: list,
                    usage: WireUsage::of(usage),
                })
                .into_response());
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(e)),
            None => return Err(ApiError::internal("the engine stopped before finishing")),
        }
    }
}

/// The OpenAI `usage` object.
#[derive(Serialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl WireUsage {
    fn of(u: Usage) -> Self {
        let (p, c) = (u.prompt_tokens as u64, u.completion_tokens as u64);
        WireUsage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
        }
    }
}

// The response bodies as typed structs rather than `json!` trees: they are
// built for every answer and every streamed token, and a typed struct
// serialises straight to bytes with no map allocated or hashed.

/// A whole (non-streamed) answer.
#[derive(Serialize)]
struct Whole<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<WholeChoice<'a>>,
    usage: WireUsage,
}

/// One choice of a whole answer: `message` (chat) or `text` (completions).
#[derive(Serialize)]
struct WholeChoice<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    logprobs: Option<Value>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
}

/// One streamed chunk. `usage` is `null` on every chunk but the last when
/// the client asked for usage (`stream_options.include_usage`), and absent
/// otherwise, as OpenAI does.
#[derive(Serialize)]
struct Chunk<'a, C: Serialize> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: C,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    usage: UsageField,
}

enum UsageField {
    Absent,
    Null,
    Counts(WireUsage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Counts(u) => u.serialize(s),
            UsageField::Absent | UsageField::Null => s.serialize_unit(),
        }
    }
}

/// A chunk's one choice.
#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    logprobs: Option<Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
}

fn to_json(v: &impl Serialize) -> String {
    // Serialising these structs cannot fail (string keys, no maps of
    // non-string keys, finite floats are written by serde_json as numbers).
    serde_json::to_string(v).unwrap_or_default()
}

/// Identifies the exact weights that answered (the lock's revision).
fn fingerprint(engine: &Backend) -> String {
    let rev = engine.revision();
    let short = rev.strip_prefix("sha256:").unwrap_or(rev);
    format!("moat-{}", &short[..short.len().min(16)])
}

impl Shape {
    fn object(&self) -> &'static str {
        match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        }
    }

    /// One chunk with one choice, as JSON text.
    fn chunk(&self, choice: ChunkChoice<'_>) -> String {
        let usage = if self.include_usage {
            UsageField::Null
        } else {
            UsageField::Absent
        };
        self.chunk_of([choice], usage)
    }

    fn chunk_of<C: Serialize>(&self, choices: C, usage: UsageField) -> String {
        to_json(&Chunk {
            id: &self.id,
            object: self.object(),
            created: self.created,
            model: &self.model,
            system_fingerprint: &self.fingerprint,
            choices,
            usage,
        })
    }

    fn role(&self, index: usize) -> String {
        self.chunk(ChunkChoice {
            index,
            delta: Some(Delta {
                role: Some("assistant"),
                content: Some(""),
                reasoning_content: None,
            }),
            text: None,
            logprobs: None,
            finish_reason: None,
        })
    }

    fn text(
        &self,
        index: usize,
        content: &str,
        reasoning: &str,
        lp: &[TokenLogprob],
        offset: usize,
    ) -> String {
        match self.api {
            Api::Chat => {
                let delta = if reasoning.is_empty() {
                    Delta {
                        content: Some(content),
                        ..Delta::default()
                    }
                } else {
                    Delta {
                        reasoning_content: Some(reasoning),
                        ..Delta::default()
                    }
                };
                self.chunk(ChunkChoice {
                    index,
                    delta: Some(delta),
                    text: None,
                    logprobs: (!lp.is_empty()).then(|| chat_logprobs(lp)),
                    finish_reason: None,
                })
            }
            Api::Completion => self.chunk(ChunkChoice {
                index,
                delta: None,
                text: Some(content),
                logprobs: (!lp.is_empty()).then(|| completion_logprobs(lp, offset)),
                finish_reason: None,
            }),
        }
    }

    fn finish(&self, index: usize, reason: FinishReason) -> String {
        let (delta, text) = match self.api {
            Api::Chat => (Some(Delta::default()), None),
            Api::Completion => (None, Some("")),
        };
        self.chunk(ChunkChoice {
            index,
            delta,
            text,
            logprobs: None,
            finish_reason: Some(reason.as_str()),
        })
    }

    /// The last chunk when usage was asked for: no choices, the counts.
    fn usage(&self, usage: Usage) -> String {
        self.chunk_of([(); 0], UsageField::Counts(WireUsage::of(usage)))
    }
}

fn stream_response(
    state: Arc<AppState>,
    engine: Arc<Backend>,
    mut events: mpsc::Receiver<Event>,
    ctx: Arc<RequestContext>,
    shape: Shape,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let model = shape.model.clone();
    tokio::spawn(async move {
        // The stream holds its engine to the end: `DELETE /models/{name}`
        // waits for every holder before it reports the model drained.
        let _engine = engine;
        let send = |data: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(data))).await.is_ok() }
        };
        // What each choice was sent: choice 0's text for the capture (when
        // on), every choice's end and text offset.
        let capturing = state.capture.is_some();
        let mut choices: Vec<ChoiceText> = (0..shape.n).map(|_| ChoiceText::default()).collect();
        let mut finish = "incomplete";
        // `false` when the client went away; dropping `events` then stops
        // the engine's work for this request.
        let delivered = 'stream: {
            if shape.api == Api::Chat {
                for i in 0..shape.n {
                    if !send(shape.role(i)).await {
                        break 'stream false;
                    }
                }
            }
            let mut timer = TokenTimer::new(ctx.started());
            loop {
                let next = tokio::select! {
                    ev = events.recv() => ev,
                    // Past the drain deadline the stream ends with an error
                    // chunk and `[DONE]`; dropping `events` stops the engine.
                    () = state.shutdown.deadline_passed() => {
                        ctx.set_error("shutting_down");
                        let _ = send(ApiError::shutting_down().body().to_string()).await;
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
                        index,
                        content,
                        reasoning,
                        tokens,
                        logprobs,
                    } => {
                        timer.tokens(tokens);
                        ctx.set_completion_tokens(tokens);
                        let i = index as usize;
                        let Some(c) = choices.get_mut(i) else { continue };
                        if capturing && i == 0 {
                            c.content.push_str(&content);
                            c.reasoning.push_str(&reasoning);
                        }
                        let offset = c.chars;
                        c.chars += content.chars().count();
                        if !send(shape.text(i, &content, &reasoning, &logprobs, offset)).await {
                            break 'stream false;
                        }
                    }
                    Event::ChoiceEnd { index, finish_reason } => {
                        let i = index as usize;
                        if let Some(c) = choices.get_mut(i)
                            && c.finish.is_none()
                        {
                            c.finish = Some(finish_reason);
                            if !send(shape.finish(i, finish_reason)).await {
                                break 'stream false;
                            }
                        }
                    }
                    Event::Done { finish_reason, usage } => {
                        ctx.mark_generation_done();
                        ctx.set_tokens(usage.prompt_tokens, usage.completion_tokens);
                        timer.finish(&state.metrics, &model);
                        // Upstreams send no per-choice end: `Done` ends them.
                        for (i, c) in choices.iter_mut().enumerate() {
                            if c.finish.is_none() {
                                c.finish = Some(finish_reason);
                                if !send(shape.finish(i, finish_reason)).await {
                                    break 'stream false;
                                }
                            }
                        }
                        finish = choices
                            .first()
                            .and_then(|c| c.finish)
                            .unwrap_or(finish_reason)
                            .as_str();
                        if shape.include_usage && !send(shape.usage(usage)).await {
                            break 'stream false;
                        }
                        break;
                    }
                    Event::Error(e) => {
                        ctx.set_error("inference_error");
                        finish = "error";
                        let _ = send(ApiError::internal(e).body().to_string()).await;
                        break;
                    }
                }
            }
            true
        };
        if !delivered {
            finish = "client_disconnected";
        }
        let (sent_content, sent_reasoning) = choices
            .into_iter()
            .next()
            .map(|c| (c.content, c.reasoning))
            .unwrap_or_default();
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
