//! joblib dumps: a pickle stream in which each numpy array is a
//! `joblib.numpy_pickle.NumpyArrayWrapper` whose raw bytes follow its BUILD
//! opcode inside the stream (object arrays: a nested pickle instead).
//!
//! The pickle VM follows the wrapper exactly as joblib's unpickler does (see
//! `follow_joblib_array` in `pickle/vm.rs`), so raw float bytes are skipped
//! rather than parsed as opcodes, and nested object-array pickles are walked.
//! Compressed dumps (joblib's zlib default, gzip) are ordinary zlib/gzip
//! streams: [`super::nested`] inflates them under bomb limits and comes back
//! here with the plain stream.

use super::Ctx;
use crate::pickle::{Options, vm};

/// Walks a (possibly joblib) pickle stream.
pub fn scan_pickle(data: &[u8], member: &str, ctx: &mut Ctx) {
    let options = Options {
        max_pickles: None,
        joblib: true,
    };
    vm::walk(data, member, options, &mut ctx.sink);
}
