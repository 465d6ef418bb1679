//! Deterministic pseudo-random numbers for the demo model.
//!
//! Written here rather than taken from `rand` so that a seed means the same
//! bytes forever, whatever versions end up in `Cargo.lock`: SplitMix64 expands
//! a seed into xoshiro256** state, and "normal" samples are an Irwin–Hall sum of
//! four 16-bit uniforms. That sum needs only integer adds and one float
//! multiply, so it is bit-identical on every platform (no libm `ln`/`cos`, whose
//! last bit may differ between C libraries) and costs one generator step per
//! sample, which keeps writing a 1.5B-parameter file I/O-bound. Its tails stop
//! at ±3.46σ, which is harmless for random weights.

/// SplitMix64 (the sampler's, so there is one implementation): used here
/// only to expand seeds (its outputs are well mixed even for seeds 0, 1, 2, …).
pub(crate) use crate::sampling::SplitMix64;

/// xoshiro256** (Blackman & Vigna, 2018).
pub(crate) struct Xoshiro256 {
    s: [u64; 4],
}

/// Mean of the sum of four uniform integers in `0..=65535`.
const IRWIN_HALL_MEAN: f32 = 131_070.0;
/// `1 / sqrt((2^32 - 1) / 3)`: one over the standard deviation of that sum.
const IRWIN_HALL_INV_STD: f32 = 2.642_899_8e-5;

impl Xoshiro256 {
    pub(crate) fn from_seed(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        Self {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    /// A generator for one named stream (the tokenizer's filler), so that
    /// its values do not depend on which others were drawn before it.
    pub(crate) fn for_stream(seed: u64, stream: &str) -> Self {
        Self::from_seed(stream_key(seed, stream))
    }

    /// A generator for chunk `index` of a named stream (a tensor), so that
    /// chunks can be drawn on any thread, in any order, with the same result.
    pub(crate) fn for_chunk(seed: u64, stream: &str, index: u64) -> Self {
        let mut mix = SplitMix64::new(stream_key(seed, stream) ^ index);
        Self::from_seed(mix.next_u64())
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A value in `0..n` (multiply-shift; the bias is below 2^-32 for the
    /// small `n` used here). `n` must be non-zero.
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }

    /// An approximately standard-normal sample (mean 0, variance 1).
    #[inline]
    pub(crate) fn normalish(&mut self) -> f32 {
        let x = self.next_u64();
        let sum = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        // `sum` < 2^18, so the conversion and subtraction are exact.
        (sum as f32 - IRWIN_HALL_MEAN) * IRWIN_HALL_INV_STD
    }
}

fn stream_key(seed: u64, stream: &str) -> u64 {
    SplitMix64::new(seed).next_u64() ^ fnv1a64(stream.as_bytes())
}

/// FNV-1a, 64-bit: a fixed, dependency-free hash for naming streams.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}
