//! What serves a model: the embedded engine or a pool of upstreams. The
//! server holds one [`Backend`] per model name and drives both the same
//! way: submit a [`ChatRequest`], read [`Event`]s until `Done` or `Error`.
//!
//! An enum rather than a trait object: there are exactly two kinds, the
//! embedded path stays a direct call (validation on the caller's thread,
//! then the worker queue, as before), and the server can still reach
//! kind-specific details (queue gauges, replica health) by matching.

use crate::error::EngineError;
use crate::generate::{Engine, Event};
use crate::request::ChatRequest;
use crate::upstream::UpstreamPool;
use std::sync::Arc;
use tokio::sync::mpsc;

pub enum Backend {
    Embedded(Engine),
    Upstream(Arc<UpstreamPool>),
}

/// An admitted request: its events, and the prompt size when known before
/// generation (the embedded engine tokenizes first; an upstream reports it
/// in its usage at the end).
pub struct Submitted {
    pub events: mpsc::Receiver<Event>,
    pub prompt_tokens: Option<usize>,
}

/// The `revision` of a model served by upstreams: there are no local
/// weights whose digest could be named.
pub const UPSTREAM_REVISION: &str = "upstream";

impl Backend {
    pub fn name(&self) -> &str {
        match self {
            Backend::Embedded(e) => e.name(),
            Backend::Upstream(p) => p.name(),
        }
    }

    /// The weights' digest (embedded) or [`UPSTREAM_REVISION`].
    pub fn revision(&self) -> &str {
        match self {
            Backend::Embedded(e) => e.revision(),
            Backend::Upstream(_) => UPSTREAM_REVISION,
        }
    }

    /// Validate and start `req`. `stream` says whether the client reads a
    /// stream: an upstream is then asked for one too, and this returns at
    /// its first piece of text, so failures before it are retried on another
    /// replica and never seen by the client.
    pub async fn submit(&self, req: ChatRequest, stream: bool) -> Result<Submitted, EngineError> {
        match self {
            Backend::Embedded(e) => {
                let valid = e.validate(req)?;
                let prompt_tokens = valid.prompt_tokens();
                Ok(Submitted {
                    events: e.submit(valid)?,
                    prompt_tokens: Some(prompt_tokens),
                })
            }
            Backend::Upstream(p) => Ok(Submitted {
                events: p.submit(&req, stream).await?,
                prompt_tokens: None,
            }),
        }
    }
}
