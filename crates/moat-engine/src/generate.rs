//! The running engine: validation of requests on the caller's thread
//! (template, tokenization, every limit) so a bad request never waits in a
//! queue, then the model's [`crate::sched::Scheduler`]: continuous batching
//! over the engine's own CPU core ([`crate::cpu::BatchModel`]).
//!
//! Output goes out as [`Event`]s on a channel; when the receiver is dropped
//! (the client went away) the scheduler stops generating for that request
//! within one step.

use crate::cpu::BatchModel;
use crate::error::EngineError;
use crate::load::{LoadOptions, load_engine};
use crate::request::{ChatRequest, MAX_STOP_BYTES, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, Prompt, ValidRequest};
use crate::sampling::SamplingParams;
use crate::sched::{SchedOptions, Scheduler, TextSide};
use crate::template::ChatTemplate;
use moat_artifact::VerifiedModel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests that may wait to start; beyond this, `Overloaded`.
    pub queue_capacity: usize,
    /// Upper bound on prompt + completion tokens (also bounds KV memory).
    pub max_context: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// Most choices (`n`) one request may ask for.
    pub max_n: u32,
    /// KV-cache bytes all admitted requests of a model may reserve
    /// together (`n × (prompt + max_tokens)` tokens each, at worst).
    pub kv_budget_bytes: usize,
    /// Most prompt tokens processed in one scheduler step.
    pub prefill_chunk: usize,
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// Threads of the model's compute pool.
    pub threads: usize,
    /// A request still running this long after admission ends with an error.
    pub request_deadline: Option<Duration>,
    /// Drop DeepSeek-R1 reasoning from answers unless a request asks for it
    /// (`include_reasoning: true`).
    pub hide_reasoning: bool,
    /// Quantise float weights to this encoding at load (`[[models]]
    /// quantize`); a GGUF's already-quantised tensors stay as they are.
    pub quantize: Option<crate::cpu::quant::QType>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let s = SchedOptions::default();
        Self {
            queue_capacity: s.queue_capacity,
            max_context: 4096,
            default_max_tokens: 512,
            max_n: 4,
            kv_budget_bytes: s.kv_budget_bytes,
            prefill_chunk: s.prefill_chunk,
            max_batch: s.max_batch,
            threads: s.threads,
            request_deadline: Some(Duration::from_secs(600)),
            hide_reasoning: false,
            quantize: None,
        }
    }
}

impl EngineOptions {
    fn sched(&self) -> SchedOptions {
        SchedOptions {
            queue_capacity: self.queue_capacity,
            kv_budget_bytes: self.kv_budget_bytes,
            prefill_chunk: self.prefill_chunk,
            max_batch: self.max_batch,
            threads: self.threads,
            retry_after: 1,
        }
    }
}

/// The KV cache of a model, now: tokens held by every running sequence
/// against what may be held (the KV budget), and the bytes per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheUsage {
    pub tokens: usize,
    pub capacity_tokens: usize,
    pub bytes_per_token: usize,
}

impl KvCacheUsage {
    pub fn bytes(&self) -> usize {
        self.tokens.saturating_mul(self.bytes_per_token)
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_tokens.saturating_mul(self.bytes_per_token)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    /// Only from upstreams that filter output.
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// One alternative in a token's log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
}

/// A sampled token's log-probability (log-softmax of the raw logits) and
/// the most likely alternatives, most likely first. `token` is the token's
/// own text; a token holding part of a UTF-8 character shows U+FFFD.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The runner took the request off the queue and starts the prompt;
    /// `queue_wait` is how long it waited there (for queue-wait metrics).
    Started {
        queue_wait: Duration,
    },
    /// Generated text of choice `index`: answer text in `content`,
    /// DeepSeek-R1 reasoning (the text inside `<think>…</think>`) in
    /// `reasoning`; at most one is non-empty. `logprobs` holds the tokens
    /// sampled since the previous delta of this choice when asked for (so
    /// text may be empty while they are not). `tokens` counts the
    /// completion tokens generated so far over all choices, so work a
    /// client abandons mid-stream is still accounted for.
    Delta {
        index: u32,
        content: String,
        reasoning: String,
        tokens: usize,
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` ended (the embedded engine sends one per choice,
    /// before `Done`; upstreams send none and `Done` ends choice 0).
    ChoiceEnd {
        index: u32,
        finish_reason: FinishReason,
    },
    /// The request ended; `finish_reason` is choice 0's and `usage` counts
    /// every choice.
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(String),
}

/// What validation needs, shared with the runner.
struct Shared {
    text: Arc<TextSide>,
    template: ChatTemplate,
    context: usize,
    vocab: usize,
}

pub struct Engine {
    name: String,
    revision: String,
    shared: Arc<Shared>,
    // Boxed: keeps `Engine` (and `Backend`) small.
    sched: Box<Scheduler>,
    opts: EngineOptions,
}

impl Engine {
    /// Load `model` (GGUF, or safetensors with `config.json`) into the CPU
    /// core and start its scheduler.
    pub fn start(model: VerifiedModel, opts: EngineOptions) -> Result<Self, EngineError> {
        let name = model.name().to_owned();
        let revision = model.revision().to_owned();
        let loaded = load_engine(
            model,
            LoadOptions {
                max_context: opts.max_context,
                quantize: opts.quantize,
            },
        )?;
        let t = loaded.text;
        let text = TextSide {
            tokenizer: t.tokenizer,
            eos_ids: t.eos_ids,
            think_start: t.think_start,
            think_end: t.think_end,
        };
        Self::from_batch_model(&name, &revision, loaded.model, text, t.template, opts)
    }

    /// An engine over a [`BatchModel`], run by the continuous-batching
    /// scheduler. The effective context is the smaller of the model's and
    /// `opts.max_context`.
    pub fn from_batch_model(
        name: &str,
        revision: &str,
        model: Box<dyn BatchModel>,
        text: TextSide,
        template: ChatTemplate,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let context = model.context_length().min(opts.max_context);
        let vocab = model.vocab_size();
        let text = Arc::new(text);
        let sched = Scheduler::start(name, model, text.clone(), opts.sched())?;
        Ok(Self {
            name: name.to_owned(),
            revision: revision.to_owned(),
            shared: Arc::new(Shared {
                text,
                template,
                context,
                vocab,
            }),
            sched: Box::new(sched),
            opts,
        })
    }

    /// The KV cache: tokens held by every running sequence against the
    /// budget, and the bytes per token.
    pub fn kv_cache(&self) -> KvCacheUsage {
        self.sched.kv_cache()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    pub fn context_length(&self) -> usize {
        self.shared.context
    }

    /// Requests waiting to start now (not counting running ones).
    pub fn queue_depth(&self) -> usize {
        self.sched.queue_depth()
    }

    /// How many requests may wait before new ones are refused.
    pub fn queue_capacity(&self) -> usize {
        self.opts.queue_capacity
    }

    /// Requests whose client went away before they finished, since start
    /// (the scheduler removes them within one step).
    pub fn cancelled_total(&self) -> u64 {
        self.sched.cancelled_total()
    }

    /// The model's scheduler (queue, budget and step counters).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Render (chat) or take (completion) the prompt, tokenize it and check
    /// the request against every limit.
    pub fn validate(&self, req: ChatRequest) -> Result<ValidRequest, EngineError> {
        let sampling = check_sampling(&req)?;
        let n = req.n.unwrap_or(1);
        if n == 0 || n > self.opts.max_n {
            return Err(EngineError::invalid(
                Some("n"),
                format!("n {n} is not between 1 and {} (engine.max_n)", self.opts.max_n),
            ));
        }
        let (prompt_ids, starts_in_reasoning, split_reasoning) = match &req.prompt {
            Some(p) => {
                if !req.messages.is_empty() {
                    return Err(EngineError::invalid(
                        Some("messages"),
                        "a completion takes a prompt, not messages",
                    ));
                }
                (self.completion_prompt(p)?, false, false)
            }
            None => {
                let (ids, starts) = self.chat_prompt(&req)?;
                (ids, starts, true)
            }
        };
        let param = if req.is_completion() { "prompt" } else { "messages" };
        if prompt_ids.is_empty() {
            return Err(EngineError::invalid(Some(param), "the prompt is empty"));
        }
        let context = self.shared.context;
        if prompt_ids.len() >= context {
            return Err(EngineError::invalid(
                Some(param),
                format!(
                    "the prompt is {} tokens; this model's context is {context} tokens",
                    prompt_ids.len()
                ),
            ));
        }
        let room = context - prompt_ids.len();
        let max_tokens = match req.max_tokens {
            Some(0) => {
                return Err(EngineError::invalid(
                    Some("max_tokens"),
                    "max_tokens must be at least 1",
                ));
            }
            Some(n) if n > room as u64 => {
                return Err(EngineError::invalid(
                    Some("max_tokens"),
                    format!(
                        "max_tokens {n} + prompt {} tokens exceeds this model's context of {context} tokens",
                        prompt_ids.len()
                    ),
                ));
            }
            Some(n) => n as usize,
            None => self.opts.default_max_tokens.min(room),
        };
        let seed = match req.seed {
            Some(s) => s,
            None => {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b)
                    .map_err(|e| EngineError::Inference(format!("no OS randomness: {e}")))?;
                u64::from_le_bytes(b)
            }
        };
        let valid = ValidRequest {
            prompt_ids,
            max_tokens,
            n: n as usize,
            sampling,
            seed,
            stop: req.stop,
            logprobs: req.logprobs.map(|k| k as usize),
            starts_in_reasoning,
            split_reasoning,
            hide_reasoning: !req.include_reasoning.unwrap_or(!self.opts.hide_reasoning),
            ignore_eos: req.ignore_eos,
            deadline: self.opts.request_deadline.map(|d| Instant::now() + d),
        };
        let s = &self.sched;
        if valid.reserved_tokens() > s.budget_tokens() {
            return Err(EngineError::invalid(
                Some("max_tokens"),
                format!(
                    "n × (prompt + max_tokens) = {} tokens exceeds this model's KV-cache budget of {} tokens \
                     (engine.kv_budget_bytes)",
                    valid.reserved_tokens(),
                    s.budget_tokens()
                ),
            ));
        }
        Ok(valid)
    }

    fn chat_prompt(&self, req: &ChatRequest) -> Result<(Vec<u32>, bool), EngineError> {
        crate::request::check_messages(req)?;
        let messages: Vec<(String, String)> = req
            .messages
            .iter()
            .map(|m| {
                (
                    if m.role == "developer" {
                        "system".into()
                    } else {
                        m.role.clone()
                    },
                    m.content.clone(),
                )
            })
            .collect();
        let prompt = self.shared.template.render(&messages)?;
        let enc = self
            .shared
            .text
            .tokenizer
            .encode_fast(prompt.as_str(), false)
            .map_err(|e| {
                EngineError::invalid(Some("messages"), format!("cannot tokenize the prompt: {e}"))
            })?;
        // Generation starts inside reasoning only when the prompt itself ends
        // with `<think>` (the R1 generation prompt); an unclosed tag earlier
        // in the conversation is just text.
        let starts = self.shared.text.think_start.is_some() && prompt.trim_end().ends_with("<think>");
        Ok((enc.get_ids().to_vec(), starts))
    }

    fn completion_prompt(&self, p: &Prompt) -> Result<Vec<u32>, EngineError> {
        match p {
            Prompt::Text(t) => {
                let enc = self
                    .shared
                    .text
                    .tokenizer
                    .encode_fast(t.as_str(), false)
                    .map_err(|e| {
                        EngineError::invalid(Some("prompt"), format!("cannot tokenize the prompt: {e}"))
                    })?;
                Ok(enc.get_ids().to_vec())
            }
            Prompt::Tokens(ids) => {
                let vocab = self.shared.vocab;
                if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
                    return Err(EngineError::invalid(
                        Some("prompt"),
                        format!("prompt[{i}]: token id {t} is outside the vocabulary of {vocab}"),
                    ));
                }
                Ok(ids.clone())
            }
        }
    }

    /// Admit a validated request (or refuse it at once with
    /// `Overloaded`); events arrive on the returned channel.
    pub fn submit(&self, req: ValidRequest) -> Result<mpsc::Receiver<Event>, EngineError> {
        self.sched.submit(req)
    }
}

fn range_check(
    param: &str,
    v: Option<f32>,
    ok: impl Fn(f32) -> bool,
    range: &str,
) -> Result<(), EngineError> {
    match v {
        Some(x) if !ok(x) => Err(EngineError::invalid(
            Some(param),
            format!("{param} {x} is not in {range}"),
        )),
        _ => Ok(()),
    }
}

/// The checks on sampling fields and stop strings every backend applies
/// (the embedded engine and upstream pools alike); returns the sampling in
/// force. `n` is checked by each backend against its own limit.
pub(crate) fn check_sampling(req: &ChatRequest) -> Result<SamplingParams, EngineError> {
    range_check(
        "temperature",
        req.temperature,
        |x| (0.0..=2.0).contains(&x),
        "[0, 2]",
    )?;
    range_check("top_p", req.top_p, |x| x > 0.0 && x <= 1.0, "(0, 1]")?;
    range_check("min_p", req.min_p, |x| (0.0..=1.0).contains(&x), "[0, 1]")?;
    range_check(
        "repetition_penalty",
        req.repetition_penalty,
        |x| x > 0.0 && x <= 10.0,
        "(0, 10]",
    )?;
    range_check(
        "presence_penalty",
        req.presence_penalty,
        |x| (-2.0..=2.0).contains(&x),
        "[-2, 2]",
    )?;
    range_check(
        "frequency_penalty",
        req.frequency_penalty,
        |x| (-2.0..=2.0).contains(&x),
        "[-2, 2]",
    )?;
    if let Some(k) = req.logprobs
        && k > MAX_TOP_LOGPROBS
    {
        return Err(EngineError::invalid(
            Some("top_logprobs"),
            format!("top_logprobs {k} is not between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(EngineError::invalid(
            Some("stop"),
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        ));
    }
    if let Some(s) = req.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(EngineError::invalid(
            Some("stop"),
            format!("stop string of {} bytes exceeds {MAX_STOP_BYTES}", s.len()),
        ));
    }
    let d = SamplingParams::default();
    Ok(SamplingParams {
        temperature: req.temperature.unwrap_or(d.temperature),
        top_p: req.top_p.unwrap_or(d.top_p),
        top_k: req.top_k.map_or(d.top_k, |k| k as usize),
        min_p: req.min_p.unwrap_or(d.min_p),
        repetition_penalty: req.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: req.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: req.frequency_penalty.unwrap_or(d.frequency_penalty),
    })
}
