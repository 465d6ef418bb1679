//! The running engine: one worker thread per model that owns the weights and
//! KV cache, fed through a bounded queue. Requests are validated on the
//! caller's thread (template, tokenization, limits) so a bad request never
//! waits in the queue; a full queue is refused at once (`Overloaded`).
//!
//! Output goes out as [`Event`]s on a channel; when the receiver is dropped
//! (the client went away) the worker stops generating for that request.

use crate::error::EngineError;
use crate::load::{Loaded, load};
use crate::request::{ChatRequest, MAX_STOP_BYTES, MAX_STOP_STRINGS, ROLES, ValidRequest};
use crate::sampling::Sampler;
use crate::stop::StopMatcher;
use crate::template::ChatTemplate;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen2;
use moat_artifact::VerifiedModel;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests that may wait for the worker; beyond this, `Overloaded`.
    pub queue_capacity: usize,
    /// Upper bound on prompt + completion tokens (also bounds KV memory).
    pub max_context: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_context: 4096,
            default_max_tokens: 512,
        }
    }
}

/// The KV cache of a model's worker, now. The worker runs one request at a
/// time and empties the cache between requests, so `tokens` is the running
/// request's prompt plus what it has generated so far.
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

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The worker took the request off the queue and starts the prompt;
    /// `queue_wait` is how long it waited there (for queue-wait metrics).
    Started {
        queue_wait: Duration,
    },
    /// Generated text: answer text in `content`, DeepSeek-R1 reasoning (the
    /// text inside `<think>…</think>`) in `reasoning`. One is non-empty.
    /// `tokens` counts the completion tokens generated so far, so work a
    /// client abandons mid-stream is still accounted for.
    Delta {
        content: String,
        reasoning: String,
        tokens: usize,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(String),
}

/// What the caller side shares with the worker.
struct Shared {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    think_start: Option<u32>,
    context: usize,
    kv_bytes_per_token: usize,
}

struct Job {
    req: ValidRequest,
    tx: mpsc::Sender<Event>,
    enqueued: Instant,
}

pub struct Engine {
    name: String,
    revision: String,
    shared: Arc<Shared>,
    queue: SyncSender<Job>,
    /// Requests accepted into the queue and not yet taken by the worker
    /// (the running request is not counted).
    queued: Arc<AtomicUsize>,
    /// Tokens in the worker's KV cache now (the worker writes it).
    kv_tokens: Arc<AtomicUsize>,
    opts: EngineOptions,
}

impl Engine {
    /// Load `model` and start its worker thread.
    pub fn start(model: VerifiedModel, opts: EngineOptions) -> Result<Self, EngineError> {
        let name = model.name().to_owned();
        let revision = model.revision().to_owned();
        let Loaded {
            model: lm,
            tokenizer,
            template,
            eos_ids,
            think_start,
            think_end,
            context,
            kv_bytes_per_token,
        } = load(model, opts.max_context)?;
        let shared = Arc::new(Shared {
            tokenizer,
            template,
            think_start,
            context,
            kv_bytes_per_token,
        });
        let kv_tokens = Arc::new(AtomicUsize::new(0));
        let (queue, jobs) = sync_channel::<Job>(opts.queue_capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let mut worker = Worker {
            model: lm,
            shared: shared.clone(),
            eos_ids,
            think_start,
            think_end,
            kv_tokens: kv_tokens.clone(),
        };
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                // Ends when every Engine handle (and so the sender) is gone.
                while let Ok(job) = jobs.recv() {
                    taken.fetch_sub(1, Ordering::Relaxed);
                    worker.run(job);
                }
            })
            .map_err(|e| EngineError::Load {
                model: name.clone(),
                message: format!("cannot start worker: {e}"),
            })?;
        Ok(Self {
            name,
            revision,
            shared,
            queue,
            queued,
            kv_tokens,
            opts,
        })
    }

    /// The worker's KV cache: tokens held now against the context it may
    /// grow to, and the bytes per token.
    pub fn kv_cache(&self) -> KvCacheUsage {
        KvCacheUsage {
            tokens: self.kv_tokens.load(Ordering::Relaxed),
            capacity_tokens: self.shared.context,
            bytes_per_token: self.shared.kv_bytes_per_token,
        }
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

    /// Requests waiting for the worker now (not counting the one running).
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// How many requests may wait before new ones are refused.
    pub fn queue_capacity(&self) -> usize {
        self.opts.queue_capacity
    }

    /// Render, tokenize and check a request against every limit.
    pub fn validate(&self, req: ChatRequest) -> Result<ValidRequest, EngineError> {
        if req.messages.is_empty() {
            return Err(EngineError::invalid(
                Some("messages"),
                "messages must hold at least one message",
            ));
        }
        for (i, m) in req.messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(EngineError::invalid(
                    Some("messages"),
                    format!(
                        "messages[{i}].role: {:?} is not one of {}",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
        }
        let (temperature, top_p) = check_sampling(&req)?;
        let messages: Vec<(String, String)> = req
            .messages
            .into_iter()
            .map(|m| {
                (
                    if m.role == "developer" {
                        "system".into()
                    } else {
                        m.role
                    },
                    m.content,
                )
            })
            .collect();
        let prompt = self.shared.template.render(&messages)?;
        let enc = self
            .shared
            .tokenizer
            .encode_fast(prompt.as_str(), false)
            .map_err(|e| {
                EngineError::invalid(Some("messages"), format!("cannot tokenize the prompt: {e}"))
            })?;
        let prompt_ids = enc.get_ids().to_vec();
        let context = self.shared.context;
        if prompt_ids.len() >= context {
            return Err(EngineError::invalid(
                Some("messages"),
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
        // Generation starts inside reasoning only when the prompt itself ends
        // with `<think>` (the R1 generation prompt); an unclosed tag earlier
        // in the conversation is just text.
        let starts_in_reasoning = self.shared.think_start.is_some() && prompt.trim_end().ends_with("<think>");
        Ok(ValidRequest {
            prompt_ids,
            max_tokens,
            temperature,
            top_p,
            seed,
            stop: req.stop,
            starts_in_reasoning,
        })
    }

    /// Queue a validated request; events arrive on the returned channel.
    pub fn submit(&self, req: ValidRequest) -> Result<mpsc::Receiver<Event>, EngineError> {
        let (tx, rx) = mpsc::channel(256);
        // Counted before the send so the worker's decrement can never run
        // first and wrap the counter below zero.
        self.queued.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            req,
            tx,
            enqueued: Instant::now(),
        };
        self.queue.try_send(job).map(|()| rx).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => EngineError::Overloaded {
                    model: self.name.clone(),
                    queued: self.opts.queue_capacity,
                },
                TrySendError::Disconnected(_) => {
                    EngineError::Inference(format!("model {} worker stopped", self.name))
                }
            }
        })
    }
}

/// The checks on sampling fields and stop strings every backend applies
/// (the embedded engine and upstream pools alike); returns the temperature
/// and top_p in force.
pub(crate) fn check_sampling(req: &ChatRequest) -> Result<(f32, f32), EngineError> {
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(EngineError::invalid(
            Some("temperature"),
            format!("temperature {temperature} is not in [0, 2]"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(EngineError::invalid(
            Some("top_p"),
            format!("top_p {top_p} is not in (0, 1]"),
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
    Ok((temperature, top_p))
}

struct Worker {
    model: qwen2::ModelForCausalLM,
    shared: Arc<Shared>,
    eos_ids: Vec<u32>,
    think_start: Option<u32>,
    think_end: Option<u32>,
    kv_tokens: Arc<AtomicUsize>,
}

/// The receiver is gone: the client disconnected.
struct Cancelled;

fn send(tx: &mpsc::Sender<Event>, ev: Event) -> Result<(), Cancelled> {
    tx.blocking_send(ev).map_err(|_| Cancelled)
}

fn send_text(
    tx: &mpsc::Sender<Event>,
    text: String,
    reasoning: bool,
    tokens: usize,
) -> Result<(), Cancelled> {
    if text.is_empty() {
        return Ok(());
    }
    let (content, reasoning) = if reasoning {
        (String::new(), text)
    } else {
        (text, String::new())
    };
    send(
        tx,
        Event::Delta {
            content,
            reasoning,
            tokens,
        },
    )
}

impl Worker {
    fn run(&mut self, job: Job) {
        let queue_wait = job.enqueued.elapsed();
        if send(&job.tx, Event::Started { queue_wait }).is_err() {
            tracing::info!("request dropped while queued: the client went away");
            return;
        }
        let result = self.generate(&job.req, &job.tx);
        // Free the cache between requests (it would otherwise hold the last
        // request's tensors until the next one starts), so the KV-cache
        // gauge reads what is really held.
        self.model.clear_kv_cache();
        self.kv_tokens.store(0, Ordering::Relaxed);
        match result {
            Ok(Ok(())) => {}
            Ok(Err(Cancelled)) => tracing::info!("generation cancelled: the client went away"),
            Err(e) => {
                tracing::error!(error = %e, "generation failed");
                let _ = job.tx.blocking_send(Event::Error(e.to_string()));
            }
        }
    }

    fn logits(&mut self, ids: &[u32], offset: usize) -> Result<Vec<f32>, EngineError> {
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let out = self.model.forward(&input, offset)?;
        Ok(out
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }

    fn generate(
        &mut self,
        req: &ValidRequest,
        tx: &mpsc::Sender<Event>,
    ) -> Result<Result<(), Cancelled>, EngineError> {
        self.model.clear_kv_cache();
        let shared = self.shared.clone();
        let mut decoder = shared.tokenizer.decode_stream(true);
        let mut sampler = Sampler::new(req.temperature, req.top_p, req.seed);
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut reasoning = req.starts_in_reasoning;
        let mut input = req.prompt_ids.clone();
        let mut offset = 0;
        let mut generated = 0;
        let mut finish = FinishReason::Length;
        while generated < req.max_tokens {
            if tx.is_closed() {
                return Ok(Err(Cancelled));
            }
            let logits = self.logits(&input, offset)?;
            offset += input.len();
            self.kv_tokens.store(offset, Ordering::Relaxed);
            let tok = sampler.sample(&logits);
            generated += 1;
            input = vec![tok];
            if self.eos_ids.contains(&tok) {
                finish = FinishReason::Stop;
                break;
            }
            let switch = if Some(tok) == self.think_start {
                Some(true)
            } else if Some(tok) == self.think_end {
                Some(false)
            } else {
                None
            };
            if let Some(to) = switch {
                // Stop strings do not span the reasoning/answer boundary.
                if let Err(c) = send_text(tx, stops.flush(), reasoning, generated) {
                    return Ok(Err(c));
                }
                reasoning = to;
                continue;
            }
            let piece = decoder
                .step(tok)
                .map_err(|e| EngineError::Inference(format!("cannot decode token {tok}: {e}")))?
                .unwrap_or_default();
            let step = stops.push(&piece);
            if let Err(c) = send_text(tx, step.emit, reasoning, generated) {
                return Ok(Err(c));
            }
            if step.stopped {
                finish = FinishReason::Stop;
                break;
            }
        }
        if let Err(c) = send_text(tx, stops.flush(), reasoning, generated) {
            return Ok(Err(c));
        }
        let usage = Usage {
            prompt_tokens: req.prompt_ids.len(),
            completion_tokens: generated,
        };
        Ok(send(
            tx,
            Event::Done {
                finish_reason: finish,
                usage,
            },
        ))
    }
}
