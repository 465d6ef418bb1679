//! Weight formats the CPU engine computes with: plain floats and the ggml
//! block quantisations that GGUF files carry, and the matrix products over
//! them ([`QMatrix::matmul`]) that are almost all of a forward pass's time.
//!
//! - [`blocks`]: ggml's encodings and llama.cpp's reference quantisers, block
//!   by block (the truth every faster path is tested against);
//! - [`kernels`]: the portable scalar kernels and the activation formats;
//! - [`grouped`]: the interleaved load-time layout of Q8_0/Q4_0 weights;
//! - `simd`, `simd_q` (x86_64 only): AVX2 and AVX-512 VNNI kernels, picked
//!   at run time; the only modules allowed `unsafe` (raw loads and
//!   target-feature calls).
//!
//! Weights may be held in a layout of our own (Q8_0 and Q4_0 interleave 16
//! rows and store quants unsigned) because that is what the SIMD kernels
//! want; [`QMatrix::to_ggml`] always gives the exact ggml bytes back.

pub(crate) mod blocks;
mod grouped;
pub(crate) mod kernels;
mod matrix;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd_q;
#[cfg(test)]
mod tests;

pub use kernels::Level;
pub use matrix::{QMatrix, QuantError, scores_f32, weighted_sum_f32};

/// A weight encoding, named and laid out as ggml does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
    Q6K,
}

impl QType {
    pub const ALL: [QType; 7] = [
        QType::F32,
        QType::F16,
        QType::BF16,
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4K,
        QType::Q6K,
    ];

    /// From ggml's type id (as stored in GGUF tensor infos).
    pub fn from_ggml(id: u32) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    pub fn ggml_id(self) -> u32 {
        match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q6K => 14,
            QType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::BF16 => "BF16",
            QType::Q8_0 => "Q8_0",
            QType::Q4_0 => "Q4_0",
            QType::Q4K => "Q4_K",
            QType::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q8_0 | QType::Q4_0 => 32,
            QType::Q4K | QType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4K => 144,
            QType::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` elements; `None` unless `cols` is a whole
    /// number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_elems()) {
            return None;
        }
        (cols / self.block_elems()).checked_mul(self.block_bytes())
    }
}
