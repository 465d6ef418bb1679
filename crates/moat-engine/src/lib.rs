//! The engine: turns a [`moat_artifact::VerifiedModel`] into a running model
//! and chat requests into token streams.
//!
//! - [`load`]: weights, tokenizer and chat template, from verified bytes only;
//! - [`template`]: the model's own chat template, rendered in a sandbox;
//! - [`request`]: validation of a chat request into a [`request::ValidRequest`]
//!   (the only thing the generator accepts);
//! - [`generate`]: the engine handle: validation, then a runner per model;
//! - [`sched`]: the continuous-batching scheduler over a [`cpu::BatchModel`]
//!   (admission against a queue and a KV budget, one forward per step,
//!   cancellation within a step);
//! - [`sampling`] and [`stop`]: next-token choice and stop strings.
//!
//! - [`upstream`]: a model served by OpenAI-compatible upstreams instead,
//!   with health checks, load balancing and failover;
//! - [`backend`]: the one handle the server uses for either kind.
//!
//! The engine knows nothing about who is calling; only [`upstream`] speaks
//! HTTP, as a client.

pub mod backend;
pub mod cpu;
pub mod demo;
pub mod error;
pub mod generate;
pub mod load;
pub mod request;
pub mod sampling;
pub mod sched;
pub mod stop;
pub mod template;
pub mod upstream;

pub use backend::{Backend, Submitted};
pub use error::EngineError;
pub use generate::{
    Engine, EngineOptions, Event, FinishReason, KvCacheUsage, TokenLogprob, TopLogprob, Usage,
};
pub use request::{ChatMessage, ChatRequest, Prompt, ValidRequest};
