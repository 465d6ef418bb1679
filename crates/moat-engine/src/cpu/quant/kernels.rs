//! Activation formats and the portable scalar kernels, plus the choice of
//! kernel level.
//!
//! Activations are quantised once per matmul call, the way llama.cpp's
//! `vec_dot` expects them (Q8_0 beside Q8_0/Q4_0 weights, Q8_K beside
//! K-quants), so our products track llama.cpp's. The scalar kernels compute
//! each block's integer dot exactly and then scale in f32, the order the SIMD
//! kernels use too, so the two differ only in float summation order.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::QType;
use super::blocks::{self, QK, QK_K};
use super::grouped::Grouped;
use super::matrix::{Data, QMatrix};

/// Which kernels run. `detect` picks the best this CPU has, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
    /// x86_64 AVX-512 F/BW/VL + VNNI (and AVX2): `vpdpbusd` integer dots.
    Avx512,
}

impl Level {
    /// The fastest level this CPU supports (detected once, then cached).
    pub fn detect() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if Level::Avx512.available() {
                Level::Avx512
            } else if Level::Avx2.available() {
                Level::Avx2
            } else {
                Level::Scalar
            }
        })
    }

    /// Whether this CPU can run the level's kernels.
    pub fn available(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                Level::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU can run, slowest first.
    pub fn all_available() -> Vec<Level> {
        [Level::Scalar, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|l| l.available())
            .collect()
    }
}

/// One token's Q8_0 quants, scales, corrections (to fill) and floats.
type TokenQ8<'a> = ((&'a mut [i8], &'a mut [f32]), (&'a mut [i32], &'a [f32]));

/// One matmul call's activations, converted once for all rows.
pub(crate) struct Act {
    pub n: usize,
    pub cols: usize,
    /// F32 / F16 / BF16 weights: the activations (rounded to the weight's
    /// precision, as llama.cpp converts them).
    pub f: Vec<f32>,
    /// Q8_0 / Q8_K quants, `n * cols`.
    pub qs: Vec<i8>,
    /// Block scales (per 32 for Q8_0, per 256 for Q8_K).
    pub d: Vec<f32>,
    /// Q8_K: sums of each 16 quants.
    pub bsums: Vec<i16>,
    /// Q8_0: one per block, `-offset * sum(quants)`, where offset is what
    /// the weight storage adds to make quants unsigned (128 for Q8_0, 8 for
    /// Q4_0): the starting value of an unsigned-by-signed dot.
    pub corr: Vec<i32>,
}

impl Act {
    /// `level` picks SIMD or scalar quantisation of the activations (the
    /// same numbers either way).
    pub fn prepare(level: Level, t: QType, x: &[f32], n: usize, cols: usize) -> Act {
        let mut a = Act {
            n,
            cols,
            f: Vec::new(),
            qs: Vec::new(),
            d: Vec::new(),
            bsums: Vec::new(),
            corr: Vec::new(),
        };
        match t {
            QType::F32 => a.f = x.to_vec(),
            QType::F16 => a.f = x.iter().map(|&v| blocks::round_f16(v)).collect(),
            QType::BF16 => a.f = x.iter().map(|&v| blocks::round_bf16(v)).collect(),
            QType::Q8_0 | QType::Q4_0 => {
                let offset = if t == QType::Q8_0 { 128 } else { 8 };
                let nb = cols / QK;
                a.qs = vec![0; x.len()];
                a.d = vec![0.0; n * nb];
                a.corr = vec![0; n * nb];
                let one = |((qt, dt), (ct, xt)): TokenQ8<'_>| {
                    #[cfg(target_arch = "x86_64")]
                    if level != Level::Scalar {
                        return super::simd_q::quantize_q8_0_act(xt, qt, dt, ct, offset);
                    }
                    for (((xb, qb), d), c) in xt
                        .chunks_exact(QK)
                        .zip(qt.chunks_exact_mut(QK))
                        .zip(dt.iter_mut())
                        .zip(ct.iter_mut())
                    {
                        *d = blocks::quantize_q8_0_act(xb, qb);
                        *c = -offset * qb.iter().map(|&q| i32::from(q)).sum::<i32>();
                    }
                };
                let (c, nb1) = (cols.max(1), nb.max(1));
                // Many tokens (a prompt): quantise them on every thread.
                if n >= 8 {
                    a.qs.par_chunks_mut(c)
                        .zip(a.d.par_chunks_mut(nb1))
                        .zip(a.corr.par_chunks_mut(nb1).zip(x.par_chunks(c)))
                        .for_each(one);
                } else {
                    a.qs.chunks_mut(c)
                        .zip(a.d.chunks_mut(nb1))
                        .zip(a.corr.chunks_mut(nb1).zip(x.chunks(c)))
                        .for_each(one);
                }
            }
            QType::Q4K | QType::Q6K => {
                a.qs = vec![0; x.len()];
                a.bsums = vec![0; x.len() / 16];
                a.d = Vec::with_capacity(x.len() / QK_K);
                for ((xb, qb), sb) in x
                    .chunks_exact(QK_K)
                    .zip(a.qs.chunks_exact_mut(QK_K))
                    .zip(a.bsums.chunks_exact_mut(16))
                {
                    a.d.push(blocks::quantize_q8_k(xb, qb, sb));
                }
            }
        }
        a
    }
}

/// Fill `out` (`[row][token]`, rows `r0..`) with the products of those
/// weight rows and every token.
pub(crate) fn rows(level: Level, w: &QMatrix, act: &Act, r0: usize, out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => super::simd::rows(level, w, act, r0, out),
        _ => scalar_rows(w, act, r0, out),
    }
}

/// Grouped Q8_0/Q4_0 weights (see `grouped`) times tokens `toks`, rows
/// `rows` (`rows.start` a multiple of 16): `out[(j - toks.start) * stride +
/// r - rows.start]`.
pub(crate) fn grouped_range(
    level: Level,
    g: &Grouped,
    act: &Act,
    rows: std::ops::Range<usize>,
    toks: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => super::simd_q::grouped_range(level, g, act, rows, toks, out, stride),
        _ => scalar_grouped_range(g, act, rows, toks, out, stride),
    }
}

pub(crate) fn scalar_grouped_range(
    g: &Grouped,
    act: &Act,
    rows: std::ops::Range<usize>,
    toks: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let (k, nb) = (act.cols, act.cols / QK);
    for (jo, j) in toks.enumerate() {
        let (xq, xd) = (&act.qs[j * k..(j + 1) * k], &act.d[j * nb..(j + 1) * nb]);
        for r in rows.clone() {
            out[jo * stride + r - rows.start] = g.dot(r, xq, xd);
        }
    }
}

pub(crate) fn scalar_rows(w: &QMatrix, act: &Act, r0: usize, out: &mut [f32]) {
    for (ri, o) in out.chunks_exact_mut(act.n).enumerate() {
        for (c, v) in o.iter_mut().enumerate() {
            *v = scalar_dot(w, act, r0 + ri, c);
        }
    }
}

/// Weight row `r` times token `c`, the reference way.
pub(crate) fn scalar_dot(w: &QMatrix, act: &Act, r: usize, c: usize) -> f32 {
    let k = act.cols;
    match &w.data {
        Data::F32(v) => dot_plain(&v[r * k..(r + 1) * k], &act.f[c * k..(c + 1) * k]),
        Data::F16(v) => v[r * k..(r + 1) * k]
            .iter()
            .zip(&act.f[c * k..])
            .map(|(&h, &x)| blocks::f16_to_f32(h) * x)
            .sum(),
        Data::Bf16(v) => v[r * k..(r + 1) * k]
            .iter()
            .zip(&act.f[c * k..])
            .map(|(&h, &x)| blocks::bf16_to_f32(h) * x)
            .sum(),
        Data::Q8_0(g) | Data::Q4_0(g) => {
            let nb = k / QK;
            g.dot(r, &act.qs[c * k..(c + 1) * k], &act.d[c * nb..(c + 1) * nb])
        }
        Data::Raw(v) => {
            let nb = k / QK_K;
            let bb = w.qtype().block_bytes();
            let row = &v[r * nb * bb..(r + 1) * nb * bb];
            let mut acc = 0.0f32;
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let xq = &act.qs[c * k + b * QK_K..][..QK_K];
                let bs = &act.bsums[(c * nb + b) * 16..][..16];
                let dx = act.d[c * nb + b];
                if w.qtype() == QType::Q4K {
                    let (isum, msum) = q4k_block_dot(blk, xq, bs);
                    let h = blocks::q4_k_head(blk);
                    acc += h.d * dx * isum as f32;
                    acc -= h.dmin * dx * msum as f32;
                } else {
                    acc += blocks::q6_k_d(blk) * dx * q6k_block_dot(blk, xq) as f32;
                }
            }
            acc
        }
    }
}

fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A Q4_K block against Q8_K quants: (sum of scale * dot per 32, sum of
/// min * bsum per 16), both exact integers.
pub(crate) fn q4k_block_dot(blk: &[u8], xq: &[i8], bsums: &[i16]) -> (i32, i32) {
    let h = blocks::q4_k_head(blk);
    let q = &blk[16..144];
    let mut isum = 0i32;
    for c in 0..4 {
        let qc = &q[32 * c..32 * c + 32];
        let lo: i32 = qc
            .iter()
            .zip(&xq[64 * c..])
            .map(|(&p, &x)| i32::from(p & 0xF) * i32::from(x))
            .sum();
        let hi: i32 = qc
            .iter()
            .zip(&xq[64 * c + 32..])
            .map(|(&p, &x)| i32::from(p >> 4) * i32::from(x))
            .sum();
        isum += i32::from(h.scales[2 * c]) * lo + i32::from(h.scales[2 * c + 1]) * hi;
    }
    let msum: i32 = bsums
        .iter()
        .enumerate()
        .map(|(j, &s)| i32::from(s) * i32::from(h.mins[j / 2]))
        .sum();
    (isum, msum)
}

/// A Q6_K block against Q8_K quants: sum of scale * dot per 16 (exact).
pub(crate) fn q6k_block_dot(blk: &[u8], xq: &[i8]) -> i32 {
    let mut q = [0i8; QK_K];
    blocks::unpack_q6_k(blk, &mut q);
    let mut isum = 0i32;
    for g in 0..16 {
        let s: i32 = q[16 * g..16 * g + 16]
            .iter()
            .zip(&xq[16 * g..])
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        isum += i32::from(blk[192 + g] as i8) * s;
    }
    isum
}

/// See `matrix::scores_f32` (bounds already checked).
pub(crate) fn scores_f32(
    level: Level,
    q: &[f32],
    keys: &[f32],
    stride: usize,
    off: usize,
    scale: f32,
    out: &mut [f32],
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => super::simd::scores_f32(q, keys, stride, off, scale, out),
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = dot_plain(q, &keys[j * stride + off..][..q.len()]) * scale;
            }
        }
    }
}

/// See `matrix::weighted_sum_f32` (bounds already checked).
pub(crate) fn weighted_sum_f32(
    level: Level,
    p: &[f32],
    values: &[f32],
    stride: usize,
    off: usize,
    out: &mut [f32],
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 => super::simd::weighted_sum_f32(p, values, stride, off, out),
        _ => {
            let d = out.len();
            for (j, &pj) in p.iter().enumerate() {
                let v = &values[j * stride + off..][..d];
                out.iter_mut().zip(v).for_each(|(o, &v)| *o += pj * v);
            }
        }
    }
}
