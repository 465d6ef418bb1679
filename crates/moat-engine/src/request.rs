//! Requests as the engine sees them, and their validation. Only a
//! [`ValidRequest`] reaches the scheduler: the template is rendered (chat)
//! or the prompt taken as given (completions), the prompt tokenized, and
//! every limit checked (context length, `max_tokens`, `n`, sampling ranges,
//! stop strings, the KV budget) before anything is queued.

use crate::sampling::SamplingParams;
use std::time::Instant;

/// Limits on request fields, named in the errors.
pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;
/// OpenAI's bound on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: u32 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The prompt of a plain completion (`POST /v1/completions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    /// Token ids, used as they are (checked against the vocabulary).
    Tokens(Vec<u32>),
}

/// One request, chat or plain completion. For chat `messages` is filled and
/// `prompt` is `None`; for a completion `prompt` is `Some` and `messages`
/// is empty. Every sampling field is optional: `None` is the default.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Choices to generate (1 when `None`).
    pub n: Option<u32>,
    /// Log-probabilities of each sampled token plus this many alternatives
    /// (0..=20); `None` is off.
    pub logprobs: Option<u32>,
    /// `Some(false)` drops DeepSeek-R1 reasoning from the answer (it is
    /// still generated and counted); `None` follows the engine's config.
    pub include_reasoning: Option<bool>,
    /// Keep generating past end-of-sequence tokens until `max_tokens` or a
    /// stop string (vLLM's `ignore_eos`; for benchmarks and tests).
    pub ignore_eos: bool,
}

impl ChatRequest {
    /// Whether this is a plain completion rather than a chat.
    pub fn is_completion(&self) -> bool {
        self.prompt.is_some()
    }

    /// Choices asked for.
    pub fn choices(&self) -> u32 {
        self.n.unwrap_or(1).max(1)
    }
}

/// A request that passed validation; built only by `Engine::validate`.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) n: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) seed: u64,
    pub(crate) stop: Vec<String>,
    /// Alternatives per token when log-probabilities are asked for.
    pub(crate) logprobs: Option<usize>,
    /// The prompt ends inside an open `<think>` block, so generation starts
    /// in reasoning.
    pub(crate) starts_in_reasoning: bool,
    /// Split `<think>…</think>` into reasoning (chat); a completion gets
    /// the text as generated.
    pub(crate) split_reasoning: bool,
    /// Reasoning is generated but not sent.
    pub(crate) hide_reasoning: bool,
    pub(crate) ignore_eos: bool,
    /// When the request must end (an error event) if still running.
    pub(crate) deadline: Option<Instant>,
}

impl ValidRequest {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_ids.len()
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    pub fn n(&self) -> usize {
        self.n
    }
    /// KV-cache tokens this request may hold at worst: every choice holds
    /// its own copy of the prompt plus up to `max_tokens` generated tokens.
    pub fn reserved_tokens(&self) -> usize {
        self.n
            .saturating_mul(self.prompt_ids.len().saturating_add(self.max_tokens))
    }
}

pub(crate) const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// The checks on `messages` every backend makes: at least one, each with a
/// known role.
pub(crate) fn check_messages(req: &ChatRequest) -> Result<(), crate::EngineError> {
    if req.messages.is_empty() {
        return Err(crate::EngineError::invalid(
            Some("messages"),
            "messages must hold at least one message",
        ));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(crate::EngineError::invalid(
                Some("messages"),
                format!(
                    "messages[{i}].role: {:?} is not one of {}",
                    m.role,
                    ROLES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}
