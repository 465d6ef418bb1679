//! The embedded CPU inference core: our own transformer forward pass over
//! quantised weights, built for serving rather than for a single stream.
//!
//! It started as a reading of candle-transformers' Qwen2 and quantised Llama
//! models and replaces them: serving needs a forward step over *several*
//! sequences at once, each with its own KV cache (continuous batching), which
//! candle's models (one cache inside the model) cannot do, and the kernels in
//! [`quant`] are where the speed is.
//!
//! - [`BatchModel`]: what the scheduler drives, one step at a time;
//! - [`KvCache`]: one sequence's keys and values, owned by the scheduler.

pub mod gguf;
pub mod load;
pub mod model;
pub mod quant;
pub mod vocab;

use crate::error::EngineError;

/// One sequence's keys and values for every layer. Memory is reserved for
/// `capacity` tokens up front but only touched (and so resident) as tokens
/// are appended.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: `len * kv_dim` floats of keys, then of values.
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    pub(crate) kv_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for `layers` layers of `kv_dim` floats per token (KV heads ×
    /// head size). Zero layers is allowed (a model without attention state,
    /// as test models are).
    pub fn new(layers: usize, kv_dim: usize, capacity: usize) -> Self {
        let floats = kv_dim.saturating_mul(capacity);
        Self {
            k: (0..layers).map(|_| Vec::with_capacity(floats)).collect(),
            v: (0..layers).map(|_| Vec::with_capacity(floats)).collect(),
            kv_dim,
            len: 0,
            capacity,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens it may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Room left, in tokens.
    pub fn room(&self) -> usize {
        self.capacity - self.len
    }

    /// Bytes of keys and values held now.
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.kv_dim * std::mem::size_of::<f32>()
    }

    /// Forget every token (the memory stays reserved).
    pub fn clear(&mut self) {
        for x in self.k.iter_mut().chain(self.v.iter_mut()) {
            x.clear();
        }
        self.len = 0;
    }

    /// Called by the model once every layer has appended `n` tokens.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Back to `len` tokens (a failed step undoing what it appended).
    pub(crate) fn truncate(&mut self, len: usize) {
        let floats = len * self.kv_dim;
        for x in self.k.iter_mut().chain(self.v.iter_mut()) {
            x.truncate(floats);
        }
        self.len = self.len.min(len);
    }
}

/// One sequence's part of a forward step.
#[derive(Debug)]
pub struct SeqInput<'a> {
    /// Tokens to append; positions continue at `cache.len()`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A model the scheduler can step. Implementations are immutable during a
/// step (all state is in the caches), so one model serves every sequence.
pub trait BatchModel: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// Positions the model supports.
    fn context_length(&self) -> usize;
    /// Bytes one token takes in a [`KvCache`].
    fn kv_bytes_per_token(&self) -> usize;
    /// Bytes the weights hold in memory.
    fn weight_bytes(&self) -> usize;
    /// A cache for one sequence of at most `capacity` tokens.
    fn new_cache(&self, capacity: usize) -> KvCache;
    /// One step over several sequences: each appends its tokens and gets
    /// back the logits of its last token (`vocab_size` floats), in batch
    /// order. A sequence whose tokens would not fit its cache, or an empty
    /// token list, is an error, and then no cache is changed.
    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, EngineError>;
}

/// The checks every [`BatchModel::forward`] makes before touching a cache.
pub(crate) fn check_batch(batch: &[SeqInput<'_>], vocab: usize) -> Result<(), EngineError> {
    for (i, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(EngineError::Inference(format!("batch entry {i} has no tokens")));
        }
        if s.tokens.len() > s.cache.room() {
            return Err(EngineError::Inference(format!(
                "batch entry {i}: {} tokens do not fit a cache with room for {}",
                s.tokens.len(),
                s.cache.room()
            )));
        }
        if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Inference(format!(
                "batch entry {i}: token id {t} is outside the vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
