//! The continuous-batching scheduler (after TGI's router): one thread per
//! model owns the [`BatchModel`] and every sequence's [`KvCache`], and runs
//! the model one *step* at a time.
//!
//! - **Admission** happens on the caller's thread, before anything is
//!   queued: a bounded number of requests may wait, and every request
//!   reserves its worst case of KV-cache memory (`n × (prompt + max_tokens)`
//!   tokens) against a byte budget. A full queue or budget is refused at
//!   once with [`EngineError::Overloaded`] and a `retry_after`, never by
//!   waiting. The reservation is given back when the request ends.
//! - **A step** is one [`BatchModel::forward`] call holding the next token
//!   of every decoding sequence plus at most one chunk of one prompt
//!   (`prefill_chunk` tokens), so a long prompt is processed over several
//!   steps while the others keep decoding. Requests join between steps (up
//!   to `max_batch` sequences run at once; the rest wait in the queue) and
//!   leave as soon as they finish.
//! - **Cancellation**: before each step, a request whose receiver is gone
//!   (the client disconnected) is removed with its caches, so its compute
//!   stops within one step; it is counted ([`Scheduler::cancelled_total`])
//!   and logged. A request past its deadline ends with an error event.
//! - A request with `n` choices runs `n` sequences, each with its own cache
//!   and its own seed stream ([`crate::sampling::choice_seed`]).
//!
//! Events are sent with `try_send` on a channel sized for the request's
//! worst case, so a slow reader never stalls the batch.

use crate::cpu::{BatchModel, KvCache, SeqInput};
use crate::error::EngineError;
use crate::generate::{Event, FinishReason, KvCacheUsage, TokenLogprob, TopLogprob, Usage};
use crate::request::ValidRequest;
use crate::sampling::{Sampler, choice_seed, logprobs};
use crate::stop::StopMatcher;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Instant;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

/// How the scheduler runs; from `[engine]` in the config.
#[derive(Debug, Clone)]
pub struct SchedOptions {
    /// Requests that may wait to start; beyond this, `Overloaded`.
    pub queue_capacity: usize,
    /// KV-cache bytes all admitted requests may reserve together.
    pub kv_budget_bytes: usize,
    /// Most prompt tokens processed in one step.
    pub prefill_chunk: usize,
    /// Most sequences (choices) running at once.
    pub max_batch: usize,
    /// Threads of the model's rayon pool.
    pub threads: usize,
    /// `Retry-After` seconds sent with an `Overloaded` refusal.
    pub retry_after: u64,
}

impl Default for SchedOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            kv_budget_bytes: 2 << 30,
            prefill_chunk: 256,
            max_batch: 32,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            retry_after: 1,
        }
    }
}

/// What turns tokens into text: the tokenizer, end-of-sequence ids and the
/// DeepSeek-R1 reasoning markers.
pub struct TextSide {
    pub tokenizer: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub think_start: Option<u32>,
    pub think_end: Option<u32>,
}

/// Counters the scheduler thread writes and the server reads at scrape time.
#[derive(Debug, Default)]
struct Stats {
    /// Admitted, not yet started.
    queued: AtomicUsize,
    /// KV bytes reserved by admitted requests.
    reserved_bytes: AtomicUsize,
    /// Tokens held in all running caches.
    kv_tokens: AtomicUsize,
    /// Sequences running.
    running: AtomicUsize,
    /// Requests removed because their client went away.
    cancelled: AtomicU64,
    /// Forward calls made.
    steps: AtomicU64,
}

/// A request's share of the KV budget, given back when dropped (the request
/// finished, failed, was cancelled or never started).
struct Reservation {
    stats: Arc<Stats>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stats.reserved_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

struct Job {
    req: ValidRequest,
    tx: mpsc::Sender<Event>,
    enqueued: Instant,
    _reservation: Reservation,
}

/// Handle to a running scheduler; dropping every handle stops its thread
/// once the running requests are done.
pub struct Scheduler {
    name: String,
    tx: std_mpsc::Sender<Job>,
    stats: Arc<Stats>,
    opts: SchedOptions,
    kv_bytes_per_token: usize,
    context: usize,
}

impl Scheduler {
    /// Start the scheduler thread for `model`.
    pub fn start(
        name: &str,
        model: Box<dyn BatchModel>,
        text: Arc<TextSide>,
        opts: SchedOptions,
    ) -> Result<Self, EngineError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads.max(1))
            .thread_name({
                let name = name.to_owned();
                move |i| format!("engine-{name}-{i}")
            })
            .build()
            .map_err(|e| EngineError::Load {
                model: name.to_owned(),
                message: format!("cannot start the thread pool: {e}"),
            })?;
        let stats = Arc::new(Stats::default());
        let (tx, rx) = std_mpsc::channel::<Job>();
        let kv_bytes_per_token = model.kv_bytes_per_token();
        let context = model.context_length();
        let mut core = Core {
            name: name.to_owned(),
            model,
            text,
            pool,
            opts: opts.clone(),
            stats: stats.clone(),
            waiting: VecDeque::new(),
            groups: Vec::new(),
            seqs: Vec::new(),
            next_group: 0,
        };
        std::thread::Builder::new()
            .name(format!("sched-{name}"))
            .spawn(move || core.run(&rx))
            .map_err(|e| EngineError::Load {
                model: name.to_owned(),
                message: format!("cannot start the scheduler: {e}"),
            })?;
        Ok(Self {
            name: name.to_owned(),
            tx,
            stats,
            opts,
            kv_bytes_per_token,
            context,
        })
    }

    /// Bytes `req` reserves at admission.
    pub fn reserved_bytes_for(&self, req: &ValidRequest) -> usize {
        req.reserved_tokens().saturating_mul(self.kv_bytes_per_token)
    }

    /// The KV budget in tokens of one sequence (what one request may
    /// reserve at most).
    pub fn budget_tokens(&self) -> usize {
        self.opts.kv_budget_bytes / self.kv_bytes_per_token.max(1)
    }

    /// Admit `req` or refuse it at once; events arrive on the receiver.
    pub fn submit(&self, req: ValidRequest) -> Result<mpsc::Receiver<Event>, EngineError> {
        let bytes = self.reserved_bytes_for(&req);
        if bytes > self.opts.kv_budget_bytes {
            return Err(EngineError::invalid(
                Some("max_tokens"),
                format!(
                    "n × (prompt + max_tokens) = {} tokens exceeds this model's KV-cache budget of {} tokens \
                     (engine.kv_budget_bytes)",
                    req.reserved_tokens(),
                    self.budget_tokens()
                ),
            ));
        }
        let overloaded = |reason: String| EngineError::Overloaded {
            model: self.name.clone(),
            reason,
            retry_after: self.opts.retry_after,
        };
        let cap = self.opts.queue_capacity;
        if self
            .stats
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < cap).then_some(q + 1)
            })
            .is_err()
        {
            return Err(overloaded(format!("{cap} requests queued")));
        }
        let budget = self.opts.kv_budget_bytes;
        if self
            .stats
            .reserved_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(bytes).filter(|&t| t <= budget)
            })
            .is_err()
        {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded(format!(
                "the KV-cache budget of {budget} bytes is reserved by running requests"
            )));
        }
        let reservation = Reservation {
            stats: self.stats.clone(),
            bytes,
        };
        // Every event the request can produce fits, so the scheduler never
        // waits on a slow reader: per choice at most one delta per token,
        // one flush and its end; then start, done or error.
        let capacity = req
            .n
            .saturating_mul(req.max_tokens.saturating_add(3))
            .saturating_add(4);
        let (tx, rx) = mpsc::channel(capacity);
        let job = Job {
            req,
            tx,
            enqueued: Instant::now(),
            _reservation: reservation,
        };
        self.tx.send(job).map(|()| rx).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            EngineError::Inference(format!("model {} scheduler stopped", self.name))
        })
    }

    /// Requests waiting to start.
    pub fn queue_depth(&self) -> usize {
        self.stats.queued.load(Ordering::Relaxed)
    }

    pub fn queue_capacity(&self) -> usize {
        self.opts.queue_capacity
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Relaxed)
    }

    /// Requests removed because the client went away, since start.
    pub fn cancelled_total(&self) -> u64 {
        self.stats.cancelled.load(Ordering::Relaxed)
    }

    /// Forward steps run since start.
    pub fn steps_total(&self) -> u64 {
        self.stats.steps.load(Ordering::Relaxed)
    }

    /// KV bytes reserved by admitted requests now.
    pub fn reserved_bytes(&self) -> usize {
        self.stats.reserved_bytes.load(Ordering::Relaxed)
    }

    /// Tokens held in every running sequence's cache, against the budget.
    pub fn kv_cache(&self) -> KvCacheUsage {
        KvCacheUsage {
            tokens: self.stats.kv_tokens.load(Ordering::Relaxed),
            capacity_tokens: self.budget_tokens(),
            bytes_per_token: self.kv_bytes_per_token,
        }
    }

    pub fn context_length(&self) -> usize {
        self.context
    }
}

/// One choice's output side: sampling, detokenizing, stop strings, the
/// reasoning split and log-probabilities. Shared by the scheduler and the
/// single-request worker.
pub(crate) struct Choice {
    index: u32,
    sampler: Sampler,
    stops: StopMatcher,
    /// Incremental detokenizer state (tokenizers' `DecodeStream`, kept
    /// here so no borrow of the tokenizer lives across steps).
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    reasoning: bool,
    split: bool,
    hide: bool,
    ignore_eos: bool,
    logprobs: Option<usize>,
    pending_lp: Vec<TokenLogprob>,
    generated: usize,
    max_tokens: usize,
    finished: Option<FinishReason>,
}

impl Choice {
    pub(crate) fn new(req: &ValidRequest, index: usize) -> Self {
        Self {
            index: index as u32,
            sampler: Sampler::new(req.sampling.clone(), choice_seed(req.seed, index)),
            stops: StopMatcher::new(req.stop.clone()),
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
            reasoning: req.split_reasoning && req.starts_in_reasoning,
            split: req.split_reasoning,
            hide: req.hide_reasoning,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            pending_lp: Vec::new(),
            generated: 0,
            max_tokens: req.max_tokens,
            finished: None,
        }
    }

    pub(crate) fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Text (or held log-probabilities) out as a delta.
    fn emit(&mut self, text: String, tokens: usize, out: &mut Vec<Event>) {
        if self.reasoning && self.hide {
            // Hidden reasoning: nothing of it leaves, log-probabilities
            // included.
            self.pending_lp.clear();
            return;
        }
        if text.is_empty() && self.pending_lp.is_empty() {
            return;
        }
        let (content, reasoning) = if self.reasoning {
            (String::new(), text)
        } else {
            (text, String::new())
        };
        out.push(Event::Delta {
            index: self.index,
            content,
            reasoning,
            tokens,
            logprobs: std::mem::take(&mut self.pending_lp),
        });
    }

    fn finish(&mut self, reason: FinishReason, flush: bool, tokens: usize, out: &mut Vec<Event>) {
        let rest = if flush { self.stops.flush() } else { String::new() };
        self.emit(rest, tokens, out);
        self.finished = Some(reason);
        out.push(Event::ChoiceEnd {
            index: self.index,
            finish_reason: reason,
        });
    }

    /// Take one step's logits: sample, turn the token into events, and
    /// return the token to feed next (`None` once the choice ended).
    /// `tokens` is the request's completion-token count, bumped here.
    pub(crate) fn on_logits(
        &mut self,
        logits: &[f32],
        text: &TextSide,
        tokens: &mut usize,
        out: &mut Vec<Event>,
    ) -> Result<Option<u32>, EngineError> {
        let tok = self.sampler.sample(logits);
        self.generated += 1;
        *tokens += 1;
        if let Some(k) = self.logprobs {
            self.pending_lp
                .push(token_logprob(logits, tok, k, &text.tokenizer));
        }
        let eos = text.eos_ids.contains(&tok);
        if eos && !self.ignore_eos {
            self.finish(FinishReason::Stop, true, *tokens, out);
            return Ok(None);
        }
        let switch = if !self.split {
            None
        } else if Some(tok) == text.think_start {
            Some(true)
        } else if Some(tok) == text.think_end {
            Some(false)
        } else {
            None
        };
        if eos {
            // Ignored end-of-sequence: counted, never text.
        } else if let Some(to) = switch {
            // Stop strings do not span the reasoning/answer boundary.
            let rest = self.stops.flush();
            self.emit(rest, *tokens, out);
            self.reasoning = to;
        } else {
            let piece = tokenizers::tokenizer::step_decode_stream(
                &text.tokenizer,
                vec![tok],
                true,
                &mut self.ids,
                &mut self.prefix,
                &mut self.prefix_index,
            )
            .map_err(|e| EngineError::Inference(format!("cannot decode token {tok}: {e}")))?
            .unwrap_or_default();
            let step = self.stops.push(&piece);
            self.emit(step.emit, *tokens, out);
            if step.stopped {
                self.finish(FinishReason::Stop, false, *tokens, out);
                return Ok(None);
            }
        }
        if self.generated >= self.max_tokens {
            self.finish(FinishReason::Length, true, *tokens, out);
            return Ok(None);
        }
        Ok(Some(tok))
    }
}

fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn token_logprob(logits: &[f32], tok: u32, top: usize, tokenizer: &Tokenizer) -> TokenLogprob {
    let (logprob, alts) = logprobs(logits, tok, top);
    TokenLogprob {
        token: token_text(tokenizer, tok),
        logprob,
        top: alts
            .into_iter()
            .map(|(id, logprob)| TopLogprob {
                token: token_text(tokenizer, id),
                logprob,
            })
            .collect(),
    }
}

/// A running request.
struct Group {
    id: u64,
    req: ValidRequest,
    tx: mpsc::Sender<Event>,
    _reservation: Reservation,
    /// Completion tokens over all choices.
    tokens: usize,
    finish: Vec<Option<FinishReason>>,
    /// Removed at the next sweep (cancelled, failed or done).
    gone: bool,
}

impl Group {
    /// Send events; `false` when the client is gone.
    fn send(&self, events: Vec<Event>) -> bool {
        for ev in events {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Cannot happen (the channel holds the worst case);
                    // ending the request beats blocking every other one.
                    tracing::error!(request = self.id, "event channel full; ending the request");
                    return false;
                }
            }
        }
        true
    }
}

/// One running sequence (one choice of a request).
struct Seq {
    group: u64,
    prompt: Arc<[u32]>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The sampled token to feed at the next step.
    next: Option<u32>,
    cache: KvCache,
    choice: Choice,
}

struct Core {
    name: String,
    model: Box<dyn BatchModel>,
    text: Arc<TextSide>,
    pool: rayon::ThreadPool,
    opts: SchedOptions,
    stats: Arc<Stats>,
    waiting: VecDeque<Job>,
    groups: Vec<Group>,
    seqs: Vec<Seq>,
    next_group: u64,
}

impl Core {
    fn run(&mut self, rx: &std_mpsc::Receiver<Job>) {
        loop {
            if self.seqs.is_empty() && self.waiting.is_empty() {
                // Idle: sleep until a request comes (or every handle is gone).
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.sweep();
            self.start_waiting();
            if !self.seqs.is_empty() {
                self.step();
            }
            self.stats
                .kv_tokens
                .store(self.seqs.iter().map(|s| s.cache.len()).sum(), Ordering::Relaxed);
            self.stats.running.store(self.seqs.len(), Ordering::Relaxed);
        }
    }

    fn cancelled(&self, id: u64, where_: &str) {
        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(model = %self.name, request = id, "request cancelled {where_}: the client went away");
    }

    /// Drop requests whose client left or whose deadline passed, waiting
    /// or running, and everything of finished ones.
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(job) = self.waiting.pop_front() {
            if job.tx.is_closed() {
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(model = %self.name, "request dropped while queued: the client went away");
            } else if job.req.deadline.is_some_and(|d| now >= d) {
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                let _ = job.tx.try_send(Event::Error(
                    "the request's deadline passed before it started (engine.request_deadline)".into(),
                ));
            } else {
                kept.push_back(job);
            }
        }
        self.waiting = kept;
        for i in 0..self.groups.len() {
            let g = &self.groups[i];
            if g.gone {
                continue;
            }
            if g.tx.is_closed() {
                let id = g.id;
                self.groups[i].gone = true;
                self.cancelled(id, "while running");
            } else if g.req.deadline.is_some_and(|d| now >= d) {
                let _ = g.tx.try_send(Event::Error(format!(
                    "the request's deadline passed after {} generated tokens (engine.request_deadline)",
                    g.tokens
                )));
                self.groups[i].gone = true;
            }
        }
        let gone: Vec<u64> = self.groups.iter().filter(|g| g.gone).map(|g| g.id).collect();
        if !gone.is_empty() {
            self.seqs.retain(|s| !gone.contains(&s.group));
            self.groups.retain(|g| !g.gone);
        }
    }

    /// Move waiting requests into the batch while there is room.
    fn start_waiting(&mut self) {
        while let Some(front) = self.waiting.front() {
            let n = front.req.n;
            if !self.seqs.is_empty() && self.seqs.len() + n > self.opts.max_batch {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            let id = self.next_group;
            self.next_group += 1;
            if job
                .tx
                .try_send(Event::Started {
                    queue_wait: job.enqueued.elapsed(),
                })
                .is_err()
            {
                self.cancelled(id, "before starting");
                continue;
            }
            let prompt: Arc<[u32]> = job.req.prompt_ids.clone().into();
            let cap = prompt.len() + job.req.max_tokens;
            for i in 0..n {
                self.seqs.push(Seq {
                    group: id,
                    prompt: prompt.clone(),
                    prefilled: 0,
                    next: None,
                    cache: self.model.new_cache(cap),
                    choice: Choice::new(&job.req, i),
                });
            }
            self.groups.push(Group {
                id,
                finish: vec![None; n],
                req: job.req,
                tx: job.tx,
                _reservation: job._reservation,
                tokens: 0,
                gone: false,
            });
        }
    }

    /// One forward call: every decoding sequence's next token plus one
    /// prompt chunk, then sampling and events for each.
    fn step(&mut self) {
        let chunk = self.opts.prefill_chunk.max(1);
        let prefill = self.seqs.iter().position(|s| s.next.is_none());
        // (sequence, prompt position reached) per batch entry; `None` for
        // a decode entry.
        let mut plan: Vec<(usize, Option<usize>)> = Vec::with_capacity(self.seqs.len());
        let mut batch: Vec<SeqInput<'_>> = Vec::with_capacity(self.seqs.len());
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if let Some(t) = s.next.as_ref() {
                batch.push(SeqInput {
                    tokens: std::slice::from_ref(t),
                    cache: &mut s.cache,
                });
                plan.push((i, None));
            } else if Some(i) == prefill {
                let end = (s.prefilled + chunk).min(s.prompt.len());
                batch.push(SeqInput {
                    tokens: &s.prompt[s.prefilled..end],
                    cache: &mut s.cache,
                });
                plan.push((i, Some(end)));
            }
        }
        if batch.is_empty() {
            return;
        }
        let model = &self.model;
        let result = self.pool.install(|| model.forward(&mut batch));
        drop(batch);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) if l.len() == plan.len() => l,
            Ok(l) => {
                let e = EngineError::Inference(format!(
                    "the model returned {} logit rows for a batch of {}",
                    l.len(),
                    plan.len()
                ));
                self.fail_batch(&plan, &e);
                return;
            }
            Err(e) => {
                self.fail_batch(&plan, &e);
                return;
            }
        };
        for ((i, reached), row) in plan.into_iter().zip(logits) {
            let seq = &mut self.seqs[i];
            if let Some(end) = reached {
                seq.prefilled = end;
                if end < seq.prompt.len() {
                    continue;
                }
            }
            let Some(g) = self.groups.iter_mut().find(|g| g.id == seq.group) else {
                continue;
            };
            let mut events = Vec::new();
            match seq.choice.on_logits(&row, &self.text, &mut g.tokens, &mut events) {
                Ok(next) => seq.next = next,
                Err(e) => {
                    tracing::error!(model = %self.name, error = %e, "generation failed");
                    let _ = g.tx.try_send(Event::Error(e.to_string()));
                    g.gone = true;
                    continue;
                }
            }
            if let Some(reason) = seq.choice.finished() {
                g.finish[seq.choice.index as usize] = Some(reason);
            }
            if g.finish.iter().all(Option::is_some) {
                events.push(Event::Done {
                    finish_reason: g.finish[0].unwrap_or(FinishReason::Stop),
                    usage: Usage {
                        prompt_tokens: g.req.prompt_ids.len(),
                        completion_tokens: g.tokens,
                    },
                });
                g.gone = true;
            }
            if !g.send(events) && !g.gone {
                g.gone = true;
                let id = g.id;
                self.cancelled(id, "while running");
            }
        }
        // Finished choices leave the batch now; finished, failed and
        // cancelled requests too.
        let groups = &self.groups;
        self.seqs
            .retain(|s| s.choice.finished().is_none() && groups.iter().any(|g| g.id == s.group && !g.gone));
        self.groups.retain(|g| !g.gone);
    }

    /// A failed step: every request in it gets the error and ends (their
    /// caches may be inconsistent).
    fn fail_batch(&mut self, plan: &[(usize, Option<usize>)], e: &EngineError) {
        tracing::error!(model = %self.name, error = %e, "forward step failed");
        for &(i, _) in plan {
            let id = self.seqs[i].group;
            if let Some(g) = self.groups.iter_mut().find(|g| g.id == id && !g.gone) {
                let _ = g.tx.try_send(Event::Error(e.to_string()));
                g.gone = true;
            }
        }
        let groups = &self.groups;
        self.seqs
            .retain(|s| groups.iter().any(|g| g.id == s.group && !g.gone));
        self.groups.retain(|g| !g.gone);
    }
}

#[cfg(test)]
mod tests {
    // Test fixtures: a failed setup must abort loudly.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::sampling::SamplingParams;
    use std::str::FromStr;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz .";
    const EOS: u32 = 0;
    const THINK: u32 = 1;
    const END_THINK: u32 = 2;

    fn tok(c: char) -> u32 {
        3 + ALPHABET.find(c).unwrap() as u32
    }

    fn toks(s: &str) -> Vec<u32> {
        s.chars().map(tok).collect()
    }

    fn vocab() -> usize {
        3 + ALPHABET.len()
    }

    /// One token per character, joined without spaces on decode.
    fn text_side() -> Arc<TextSide> {
        let mut v = serde_json::Map::new();
        v.insert("<eos>".into(), 0.into());
        v.insert("<think>".into(), 1.into());
        v.insert("</think>".into(), 2.into());
        for (i, c) in ALPHABET.chars().enumerate() {
            v.insert(c.to_string(), (3 + i).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": v, "unk_token": "<eos>"},
        });
        Arc::new(TextSide {
            tokenizer: Tokenizer::from_str(&json.to_string()).unwrap(),
            eos_ids: vec![EOS],
            think_start: Some(THINK),
            think_end: Some(END_THINK),
        })
    }

    /// A model whose most likely next token is `script[position %
    /// len]` (position = tokens in the cache after the step), the others
    /// pseudo-random but deterministic in (position, last token). Records
    /// the token count of every batch entry of every call, and can hold
    /// its first calls at a gate.
    struct Fake {
        script: Vec<u32>,
        calls: Arc<Mutex<Vec<Vec<usize>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
        delay: Duration,
    }

    impl BatchModel for Fake {
        fn vocab_size(&self) -> usize {
            vocab()
        }
        fn context_length(&self) -> usize {
            4096
        }
        fn kv_bytes_per_token(&self) -> usize {
            16
        }
        fn weight_bytes(&self) -> usize {
            0
        }
        fn new_cache(&self, capacity: usize) -> KvCache {
            KvCache::new(0, 0, capacity)
        }
        fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
            crate::cpu::check_batch(batch, vocab())?;
            self.calls
                .lock()
                .unwrap()
                .push(batch.iter().map(|s| s.tokens.len()).collect());
            let (open, cv) = &*self.gate;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            drop(g);
            std::thread::sleep(self.delay);
            Ok(batch
                .iter_mut()
                .map(|s| {
                    s.cache.advance(s.tokens.len());
                    let pos = s.cache.len();
                    let last = *s.tokens.last().unwrap() as usize;
                    let mut rng = crate::sampling::SplitMix64::new((pos * 1000 + last) as u64);
                    let mut l: Vec<f32> = (0..vocab()).map(|_| rng.next_f64() as f32 * 2.0).collect();
                    l[EOS as usize] = -10.0;
                    l[self.script[pos % self.script.len()] as usize] = 3.0;
                    l
                })
                .collect())
        }
    }

    struct Rig {
        sched: Scheduler,
        calls: Arc<Mutex<Vec<Vec<usize>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Rig {
        fn new(script: Vec<u32>, opts: SchedOptions, gate_open: bool, delay: Duration) -> Self {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let gate = Arc::new((Mutex::new(gate_open), Condvar::new()));
            let fake = Fake {
                script,
                calls: calls.clone(),
                gate: gate.clone(),
                delay,
            };
            let sched = Scheduler::start("fake", Box::new(fake), text_side(), opts).unwrap();
            Self { sched, calls, gate }
        }
        fn open(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
        fn calls(&self) -> Vec<Vec<usize>> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn opts() -> SchedOptions {
        SchedOptions {
            threads: 1,
            ..SchedOptions::default()
        }
    }

    fn hello() -> Vec<u32> {
        toks("hello world. ")
    }

    fn req(prompt: &[u32], max_tokens: usize) -> ValidRequest {
        ValidRequest {
            prompt_ids: prompt.to_vec(),
            max_tokens,
            n: 1,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            seed: 7,
            stop: Vec::new(),
            logprobs: None,
            starts_in_reasoning: false,
            split_reasoning: true,
            hide_reasoning: false,
            ignore_eos: false,
            deadline: None,
        }
    }

    #[derive(Debug, Default)]
    struct Out {
        content: Vec<String>,
        reasoning: Vec<String>,
        finish: Vec<Option<FinishReason>>,
        logprobs: Vec<Vec<TokenLogprob>>,
        usage: Option<Usage>,
        error: Option<String>,
    }

    fn collect(mut rx: mpsc::Receiver<Event>, n: usize) -> Out {
        let mut o = Out {
            content: vec![String::new(); n],
            reasoning: vec![String::new(); n],
            finish: vec![None; n],
            logprobs: vec![Vec::new(); n],
            ..Out::default()
        };
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Started { .. } => {}
                Event::Delta {
                    index,
                    content,
                    reasoning,
                    logprobs,
                    ..
                } => {
                    o.content[index as usize] += &content;
                    o.reasoning[index as usize] += &reasoning;
                    o.logprobs[index as usize].extend(logprobs);
                }
                Event::ChoiceEnd { index, finish_reason } => o.finish[index as usize] = Some(finish_reason),
                Event::Done { usage, .. } => {
                    o.usage = Some(usage);
                    break;
                }
                Event::Error(e) => {
                    o.error = Some(e);
                    break;
                }
            }
        }
        o
    }

    /// The script's text from position `from` for `count` tokens.
    fn script_text(from: usize, count: usize) -> String {
        let s: Vec<char> = "hello world. ".chars().collect();
        (from..from + count).map(|p| s[p % s.len()]).collect()
    }

    #[test]
    fn sequences_share_steps_and_join_and_leave_between_them() {
        let rig = Rig::new(hello(), opts(), false, Duration::ZERO);
        let a = rig.sched.submit(req(&toks("ab"), 3)).unwrap();
        let b = rig.sched.submit(req(&toks("cd"), 5)).unwrap();
        rig.open();
        let (a, b) = (collect(a, 1), collect(b, 1));
        // step 1: a's prompt; 2: a decodes while b's prompt joins; 3: both
        // decode; a is done (3 tokens) and leaves; 4–6: b alone.
        assert_eq!(
            rig.calls(),
            vec![vec![2], vec![1, 2], vec![1, 1], vec![1], vec![1], vec![1]]
        );
        assert_eq!(a.content[0], script_text(2, 3));
        assert_eq!(b.content[0], script_text(2, 5));
        assert_eq!(a.finish[0], Some(FinishReason::Length));
        assert_eq!(
            b.usage,
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 5
            })
        );
        assert_eq!(rig.sched.steps_total(), 6);
    }

    #[test]
    fn a_long_prompt_is_chunked_between_decode_steps() {
        let rig = Rig::new(
            hello(),
            SchedOptions {
                prefill_chunk: 4,
                ..opts()
            },
            false,
            Duration::ZERO,
        );
        let a = rig.sched.submit(req(&toks("ab"), 6)).unwrap();
        let b = rig.sched.submit(req(&toks("abcdefghij"), 2)).unwrap();
        rig.open();
        let (a, b) = (collect(a, 1), collect(b, 1));
        // b's 10-token prompt goes in chunks of 4, 4, 2, each beside a's decode.
        assert_eq!(
            rig.calls(),
            vec![vec![2], vec![1, 4], vec![1, 4], vec![1, 2], vec![1, 1], vec![1]]
        );
        assert_eq!(a.content[0], script_text(2, 6));
        assert_eq!(b.content[0], script_text(10, 2));
    }

    #[test]
    fn a_disconnect_stops_compute_within_one_step() {
        let rig = Rig::new(hello(), opts(), true, Duration::from_millis(2));
        let mut a = rig.sched.submit(req(&toks("ab"), 1000)).unwrap();
        let b = rig.sched.submit(req(&toks("cd"), 1000)).unwrap();
        // Wait until both decode together, then hang up on a.
        let mut deltas = 0;
        while deltas < 5 {
            if let Some(Event::Delta { .. }) = a.blocking_recv() {
                deltas += 1;
            }
        }
        while !rig.calls().iter().any(|c| c == &vec![1, 1]) {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(a);
        let at_drop = rig.calls().len();
        let t = Instant::now();
        while rig.sched.cancelled_total() == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "not cancelled");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(30));
        let after: Vec<Vec<usize>> = rig.calls()[at_drop..].to_vec();
        // At most the step being planned when the receiver went away still
        // holds a; every later step is b alone.
        let with_a = after.iter().filter(|c| c.len() == 2).count();
        assert!(with_a <= 1, "{after:?}");
        assert!(after.len() > 5 && after[after.len() - 5..].iter().all(|c| c == &vec![1]));
        assert_eq!(rig.sched.cancelled_total(), 1);
        drop(b);
    }

    #[test]
    fn full_queue_and_full_budget_are_refused_at_once() {
        let rig = Rig::new(
            hello(),
            SchedOptions {
                queue_capacity: 1,
                max_batch: 1,
                kv_budget_bytes: 16 * 100,
                ..opts()
            },
            false,
            Duration::ZERO,
        );
        // Larger than the whole budget: a 400 naming max_tokens.
        match rig.sched.submit(req(&toks("ab"), 99)) {
            Err(EngineError::InvalidRequest { param, .. }) => {
                assert_eq!(param.as_deref(), Some("max_tokens"))
            }
            other => panic!("{other:?}"),
        }
        let a = rig.sched.submit(req(&toks("ab"), 28)).unwrap(); // 30 tokens
        while rig.sched.queue_depth() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // a runs (held at the gate); b waits (max_batch 1); c finds the
        // queue full.
        let b = rig.sched.submit(req(&toks("ab"), 28)).unwrap();
        let t = Instant::now();
        match rig.sched.submit(req(&toks("ab"), 8)) {
            Err(EngineError::Overloaded {
                reason, retry_after, ..
            }) => {
                assert!(reason.contains("1 requests queued"), "{reason}");
                assert_eq!(retry_after, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(100));
        assert_eq!(rig.sched.reserved_bytes(), 16 * 60);
        rig.open();
        let (a, b) = (collect(a, 1), collect(b, 1));
        assert!(a.error.is_none() && b.error.is_none());
        // Everything given back; the budget now refuses by bytes.
        while rig.sched.reserved_bytes() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let rig2 = Rig::new(
            hello(),
            SchedOptions {
                kv_budget_bytes: 16 * 100,
                ..opts()
            },
            false,
            Duration::ZERO,
        );
        let _x = rig2.sched.submit(req(&toks("ab"), 58)).unwrap(); // 60
        match rig2.sched.submit(req(&toks("ab"), 48)) {
            Err(EngineError::Overloaded { reason, .. }) => assert!(reason.contains("budget"), "{reason}"),
            other => panic!("{other:?}"),
        }
        rig2.open();
    }

    fn sampled(temperature: f32, seed: u64, n: usize) -> Out {
        let rig = Rig::new(hello(), opts(), true, Duration::ZERO);
        let mut r = req(&toks("ab"), 24);
        r.sampling.temperature = temperature;
        r.seed = seed;
        r.n = n;
        collect(rig.sched.submit(r).unwrap(), n)
    }

    #[test]
    fn n_choices_each_with_their_own_seed_stream() {
        let two = sampled(1.0, 11, 2);
        assert_eq!(two.finish, vec![Some(FinishReason::Length); 2]);
        assert_eq!(two.usage.unwrap().completion_tokens, 48);
        assert_ne!(two.content[0], two.content[1]);
        // Choice 0 is what n = 1 gives with the same seed.
        assert_eq!(two.content[0], sampled(1.0, 11, 1).content[0]);
        // Greedy choices agree.
        let g = sampled(0.0, 11, 2);
        assert_eq!(g.content[0], g.content[1]);
    }

    #[test]
    fn same_seed_same_text() {
        assert_eq!(sampled(1.0, 5, 1).content, sampled(1.0, 5, 1).content);
        assert_ne!(sampled(1.0, 5, 1).content, sampled(1.0, 6, 1).content);
    }

    #[test]
    fn stop_strings_across_tokens() {
        let rig = Rig::new(hello(), opts(), true, Duration::ZERO);
        let mut r = req(&toks("ab"), 50);
        r.stop = vec!["lo w".into()];
        let o = collect(rig.sched.submit(r).unwrap(), 1);
        assert_eq!(o.content[0], "l"); // script from position 2: "llo world"
        assert_eq!(o.finish[0], Some(FinishReason::Stop));
        assert_eq!(o.usage.unwrap().completion_tokens, 5); // l l o ␠ w
    }

    #[test]
    fn reasoning_is_split_and_can_be_hidden() {
        let mut script = vec![THINK];
        script.extend(toks("hm"));
        script.push(END_THINK);
        script.extend(toks("ok."));
        let run = |hide: bool| {
            // Prompt of 7 tokens: the first generated position is 7 ≡ 0.
            let rig = Rig::new(script.clone(), opts(), true, Duration::ZERO);
            let mut r = req(&toks("abcdefg"), 7);
            r.hide_reasoning = hide;
            collect(rig.sched.submit(r).unwrap(), 1)
        };
        let shown = run(false);
        assert_eq!(
            (shown.reasoning[0].as_str(), shown.content[0].as_str()),
            ("hm", "ok.")
        );
        let hidden = run(true);
        assert_eq!(
            (hidden.reasoning[0].as_str(), hidden.content[0].as_str()),
            ("", "ok.")
        );
        assert_eq!(hidden.usage.unwrap().completion_tokens, 7);
    }

    #[test]
    fn eos_ends_a_choice_unless_ignored() {
        let script = vec![tok('a'), EOS, tok('b')];
        let run = |ignore: bool| {
            let rig = Rig::new(script.clone(), opts(), true, Duration::ZERO);
            // Prompt of 3: generated positions 3, 4, … ≡ 0, 1, 2, …
            let mut r = req(&toks("abc"), 6);
            r.ignore_eos = ignore;
            collect(rig.sched.submit(r).unwrap(), 1)
        };
        let stopped = run(false);
        assert_eq!(
            (stopped.content[0].as_str(), stopped.finish[0]),
            ("a", Some(FinishReason::Stop))
        );
        let kept = run(true);
        // EOS is special: sampled and counted, but not text.
        assert_eq!(
            (kept.content[0].as_str(), kept.finish[0]),
            ("abab", Some(FinishReason::Length))
        );
        assert_eq!(kept.usage.unwrap().completion_tokens, 6);
    }

    #[test]
    fn logprobs_follow_the_tokens() {
        let rig = Rig::new(hello(), opts(), true, Duration::ZERO);
        let mut r = req(&toks("ab"), 5);
        r.logprobs = Some(2);
        let o = collect(rig.sched.submit(r).unwrap(), 1);
        let lp = &o.logprobs[0];
        assert_eq!(lp.len(), 5);
        assert_eq!(
            lp.iter().map(|t| t.token.as_str()).collect::<String>(),
            o.content[0]
        );
        for t in lp {
            assert_eq!(t.top.len(), 2);
            // Greedy: the sampled token is the most likely one.
            assert_eq!(t.top[0].token, t.token);
            assert_eq!(t.top[0].logprob, t.logprob);
            assert!(t.logprob < 0.0 && t.top[1].logprob <= t.logprob);
        }
    }

    #[test]
    fn a_passed_deadline_ends_with_an_error() {
        let rig = Rig::new(hello(), opts(), true, Duration::from_millis(5));
        let mut r = req(&toks("ab"), 1000);
        r.deadline = Some(Instant::now() + Duration::from_millis(50));
        let o = collect(rig.sched.submit(r).unwrap(), 1);
        assert!(o.error.unwrap().contains("deadline"));
        assert!(rig.calls().len() < 100);
    }

    #[test]
    fn kv_gauge_sums_running_sequences() {
        let rig = Rig::new(hello(), opts(), true, Duration::from_millis(3));
        let mut a = rig.sched.submit(req(&toks("abc"), 1000)).unwrap();
        let mut b = rig.sched.submit(req(&toks("abcd"), 1000)).unwrap();
        for rx in [&mut a, &mut b] {
            while !matches!(rx.blocking_recv(), Some(Event::Delta { .. })) {}
        }
        // Both prompts are in (the gauge is written after each step).
        let t = Instant::now();
        while rig.sched.kv_cache().tokens < 7 {
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", rig.sched.kv_cache());
            std::thread::sleep(Duration::from_millis(1));
        }
        let kv = rig.sched.kv_cache();
        assert_eq!(kv.bytes_per_token, 16);
        assert_eq!(kv.capacity_tokens, (2 << 30) / 16);
        assert_eq!(rig.sched.reserved_bytes(), 16 * (1003 + 1004));
        drop((a, b));
    }
}
