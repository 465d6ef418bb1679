//! Chat requests as the engine sees them, and their validation. Only a
//! [`ValidRequest`] reaches the generator: the template is rendered, the
//! prompt tokenized, and every limit checked (context length, `max_tokens`,
//! sampling ranges, stop strings) before anything is queued.

/// Limits on request fields, named in the errors.
pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// A request that passed validation; built only by `Engine::validate`.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) seed: u64,
    pub(crate) stop: Vec<String>,
    /// The prompt ends inside an open `<think>` block, so generation starts
    /// in reasoning.
    pub(crate) starts_in_reasoning: bool,
}

impl ValidRequest {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_ids.len()
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

pub(crate) const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
