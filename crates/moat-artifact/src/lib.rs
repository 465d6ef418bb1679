//! Model artifacts: where a model's bytes come from, how they are pinned
//! (`moat.lock`), hashed, quarantined and promoted into the trusted store, and
//! how they are re-verified before anything may execute them.
//!
//! The one type the engine accepts, [`VerifiedModel`], can only be built by
//! [`verify::load_verified`], which hashes the very bytes it hands out, so
//! nothing changed on disk after the check can reach the engine.

pub mod crypto;
pub mod download;
pub mod hash;
pub mod lock;
pub mod name;
pub mod policy;
pub mod pull;
pub mod signing;
pub mod source;
pub mod store;
pub mod tree;
pub mod verify;

pub use lock::{Lock, LockedFile};
pub use pull::{PullError, PullOutcome, PullRequest};
pub use store::Store;
pub use verify::{Mismatch, VerifiedModel, VerifyError};
