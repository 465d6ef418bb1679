//! x86_64 kernels for Q8_0/Q4_0 weights in the grouped layout (see
//! `grouped`): 16 rows per vector, one 32-bit lane per row. Allowed
//! `unsafe` for raw loads and stores whose bounds [`grouped_range`] checks
//! once up front, and for calls of `#[target_feature]` functions after
//! [`Level::available`] said yes.
//!
//! Per group-block (16 rows x 32 columns) and token: eight `vpdpbusd`, each
//! taking one 4-byte word of the token's quants broadcast to all lanes
//! (512 MACs), then one convert and one FMA by `d_row * d_token`. The
//! integer accumulator starts at the token block's `-offset * sum(x)`
//! (`Act::corr`), which turns the unsigned-weight dot into the signed one.
//! A tile is one group x up to 8 tokens, so each weight vector loaded serves
//! 8 tokens (a prompt) and the whole group's weights stay in L1/L2 while the
//! task's tokens pass.
//!
//! AVX2 (no VNNI) does the same per 8-row half with `vpmaddubsw`: Q4_0's
//! nibbles directly, Q8_0 by the sign trick (|w| times x with w's sign), as
//! unsigned q+128 would saturate the 16-bit pair sums.
#![allow(unsafe_code)]
#![allow(
    clippy::needless_range_loop,
    reason = "tile loops index several register arrays by one token index"
)]
#![allow(
    clippy::too_many_arguments,
    reason = "a tile takes its weight, activation and output pointers apart"
)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::grouped::{G, Grouped};
use super::kernels::{self, Act, Level};

const QK: usize = 32;

/// Rows `rows` of `g` times tokens `toks` into
/// `out[(j - toks.start) * stride + r - rows.start]`.
pub(super) fn grouped_range(
    level: Level,
    g: &Grouped,
    act: &Act,
    rows: Range<usize>,
    toks: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let nb = g.nb;
    let cols = act.cols;
    let tb = Grouped::tile_bytes(g.q4);
    // Everything the raw loads and stores below rely on, checked once; a
    // failure is a caller's bug, answered by the bounds-checked scalar path.
    let ok = nb > 0
        && rows.start.is_multiple_of(G)
        && rows.start <= rows.end
        && rows.end <= g.rows
        && toks.start <= toks.end
        && toks.end <= act.n
        && cols == nb * QK
        && g.qs.len() >= g.groups() * nb * tb
        && g.d.len() >= g.groups() * nb * G
        && act.qs.len() >= act.n * cols
        && act.d.len() >= act.n * nb
        && act.corr.len() >= act.n * nb
        && stride >= rows.len()
        && (toks.is_empty() || out.len() >= (toks.len() - 1) * stride + rows.len());
    if !ok {
        return kernels::scalar_grouped_range(g, act, rows, toks, out, stride);
    }
    if toks.is_empty() || rows.is_empty() {
        return;
    }
    let vnni = level == Level::Avx512;
    let cmax = if vnni { 8 } else { 4 };
    for gi in rows.start / G..rows.end.div_ceil(G) {
        let valid = (rows.end - gi * G).min(G);
        let ocol = gi * G - rows.start;
        let mut j = toks.start;
        while j < toks.end {
            let left = toks.end - j;
            let c = if left >= cmax {
                cmax
            } else if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            let p = Tile {
                // SAFETY (all four): group gi < groups, token j < n, and the
                // output offset is below out.len() (checked above).
                w: unsafe { g.qs.as_ptr().add(gi * nb * tb) },
                wd: unsafe { g.d.as_ptr().add(gi * nb * G) },
                x: Xs {
                    q: unsafe { act.qs.as_ptr().add(j * cols) },
                    d: unsafe { act.d.as_ptr().add(j * nb) },
                    c: unsafe { act.corr.as_ptr().add(j * nb) },
                },
                nb,
                cols,
                out: out[(j - toks.start) * stride + ocol..].as_mut_ptr(),
                stride,
                valid,
            };
            // SAFETY: this level's features were detected (only Avx2/Avx512
            // dispatch here, after `available()`); the tile reads group
            // gi's nb tiles and scales, tokens j..j+c's quants, scales and
            // corrections, and writes `valid` floats at each of c output
            // rows, all within the lengths checked above.
            unsafe {
                match (vnni, g.q4, c) {
                    (true, false, 8) => vnni_tile::<8, false>(&p),
                    (true, false, 4) => vnni_tile::<4, false>(&p),
                    (true, false, 2) => vnni_tile::<2, false>(&p),
                    (true, false, _) => vnni_tile::<1, false>(&p),
                    (true, true, 8) => vnni_tile::<8, true>(&p),
                    (true, true, 4) => vnni_tile::<4, true>(&p),
                    (true, true, 2) => vnni_tile::<2, true>(&p),
                    (true, true, _) => vnni_tile::<1, true>(&p),
                    (false, false, 4) => avx2_tile::<4, false>(&p),
                    (false, false, 2) => avx2_tile::<2, false>(&p),
                    (false, false, _) => avx2_tile::<1, false>(&p),
                    (false, true, 4) => avx2_tile::<4, true>(&p),
                    (false, true, 2) => avx2_tile::<2, true>(&p),
                    (false, true, _) => avx2_tile::<1, true>(&p),
                }
            }
            j += c;
        }
    }
}

/// A token's activations from its first block on.
struct Xs {
    q: *const i8,
    d: *const f32,
    c: *const i32,
}

/// One group x C tokens: weights and scales of the group, the first token's
/// activations (the next ones `cols` quants / `nb` scales further), and the
/// first output row (the next ones `stride` further), `valid` lanes of it.
struct Tile {
    w: *const u8,
    wd: *const u16,
    x: Xs,
    nb: usize,
    cols: usize,
    out: *mut f32,
    stride: usize,
    valid: usize,
}

/// Word `k` (quants 4k..4k+3) of token `j`'s block `b`, as one i32.
///
/// # Safety
/// The token and block exist (tile contract).
#[inline(always)]
unsafe fn xword(p: &Tile, j: usize, b: usize, k: usize) -> i32 {
    // SAFETY: token j's block b lies within act.qs (tile contract); the
    // read is unaligned-safe.
    unsafe {
        p.x.q
            .add(j * p.cols + b * QK + 4 * k)
            .cast::<i32>()
            .read_unaligned()
    }
}

/// Bytes ahead of the current weight tile to prefetch when few tokens share
/// it (decode): the weights then stream from memory once, and the hardware
/// prefetchers stop at every 4 KiB page, so we ask across pages ourselves.
const PF: usize = 4096;

/// Prefetch `len` bytes at `w + at + PF` (into L1/L2; a hint: addresses
/// past the weights are harmless, prefetches never fault).
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch_ahead(w: *const u8, at: usize, len: usize) {
    let mut o = 0;
    while o < len {
        // `wrapping_add` keeps the hint's address computation free of
        // out-of-bounds pointer arithmetic.
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(at + PF + o).cast());
        o += 64;
    }
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI present; the tile lies within the bounds
/// `grouped_range` checked.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn vnni_tile<const C: usize, const Q4: bool>(p: &Tile) {
    let nb = p.nb;
    let m4 = _mm512_set1_epi8(0x0F);
    let tb = Grouped::tile_bytes(Q4);
    let mut acc = [_mm512_setzero_ps(); C];
    for b in 0..nb {
        if C <= 2 {
            prefetch_ahead(p.w, b * tb, tb);
        }
        let mut wv = [_mm512_setzero_si512(); 8];
        // SAFETY: block b's tile and 16 scales lie within the group.
        unsafe {
            if Q4 {
                for k in 0..4 {
                    let v = _mm512_loadu_si512(p.w.add(b * 256 + 64 * k).cast());
                    wv[k] = _mm512_and_si512(v, m4);
                    wv[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
            } else {
                for k in 0..8 {
                    wv[k] = _mm512_loadu_si512(p.w.add(b * 512 + 64 * k).cast());
                }
            }
        }
        // SAFETY: as above.
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.wd.add(b * G).cast()) });
        let mut s = [_mm512_setzero_si512(); C];
        for j in 0..C {
            // SAFETY: token j's block b exists (tile contract).
            s[j] = _mm512_set1_epi32(unsafe { *p.x.c.add(j * nb + b) });
        }
        for k in 0..8 {
            for j in 0..C {
                // SAFETY: as above.
                let xw = unsafe { xword(p, j, b, k) };
                s[j] = _mm512_dpbusd_epi32(s[j], wv[k], _mm512_set1_epi32(xw));
            }
        }
        for j in 0..C {
            // SAFETY: as above.
            let dx = unsafe { *p.x.d.add(j * nb + b) };
            acc[j] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(s[j]),
                _mm512_mul_ps(dw, _mm512_set1_ps(dx)),
                acc[j],
            );
        }
    }
    let mask: __mmask16 = if p.valid >= G {
        0xFFFF
    } else {
        (1u16 << p.valid) - 1
    };
    for j in 0..C {
        // SAFETY: output row j has `valid` floats from p.out + j*stride
        // (tile contract); masked lanes are not touched.
        unsafe { _mm512_mask_storeu_ps(p.out.add(j * p.stride), mask, acc[j]) };
    }
}

/// # Safety
/// AVX2+FMA+F16C present; the tile lies within the bounds `grouped_range`
/// checked.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile<const C: usize, const Q4: bool>(p: &Tile) {
    let nb = p.nb;
    let tb = Grouped::tile_bytes(Q4);
    let ones = _mm256_set1_epi16(1);
    let m4 = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    for h in 0..2 {
        let valid = p.valid.saturating_sub(8 * h).min(8);
        if valid == 0 {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); C];
        for b in 0..nb {
            // Q4_0: nibbles (unsigned). Q8_0: the signed quants.
            let mut wv = [_mm256_setzero_si256(); 8];
            // SAFETY: half h of block b's tile lies within the group.
            unsafe {
                let base = p.w.add(b * tb + 32 * h);
                if Q4 {
                    for k in 0..4 {
                        let v = _mm256_loadu_si256(base.add(64 * k).cast());
                        wv[k] = _mm256_and_si256(v, m4);
                        wv[k + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    }
                } else {
                    for k in 0..8 {
                        wv[k] = _mm256_xor_si256(_mm256_loadu_si256(base.add(64 * k).cast()), flip);
                    }
                }
            }
            // SAFETY: as above (8 scales of half h).
            let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.wd.add(b * G + 8 * h).cast()) });
            for j in 0..C {
                // SAFETY: token j's block b exists (tile contract).
                let mut s = if Q4 {
                    _mm256_set1_epi32(unsafe { *p.x.c.add(j * nb + b) })
                } else {
                    _mm256_setzero_si256()
                };
                for k in 0..8 {
                    // SAFETY: as above.
                    let xw = _mm256_set1_epi32(unsafe { xword(p, j, b, k) });
                    let pr = if Q4 {
                        _mm256_maddubs_epi16(wv[k], xw)
                    } else {
                        _mm256_maddubs_epi16(_mm256_abs_epi8(wv[k]), _mm256_sign_epi8(xw, wv[k]))
                    };
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(pr, ones));
                }
                // SAFETY: as above.
                let dx = unsafe { *p.x.d.add(j * nb + b) };
                acc[j] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(s),
                    _mm256_mul_ps(dw, _mm256_set1_ps(dx)),
                    acc[j],
                );
            }
        }
        for j in 0..C {
            let mut t = [0f32; 8];
            // SAFETY: t is 8 floats.
            unsafe { _mm256_storeu_ps(t.as_mut_ptr(), acc[j]) };
            for (l, &v) in t[..valid].iter().enumerate() {
                // SAFETY: output row j has `valid` (<= p.valid - 8h) floats
                // from p.out + j*stride + 8h (tile contract).
                unsafe { *p.out.add(j * p.stride + 8 * h + l) = v };
            }
        }
    }
}

/// One token's activations `x` as Q8_0 blocks: quants `qs`, scales `d`
/// and corrections `corr` (`-offset * sum(quants)`), the same numbers as
/// `blocks::quantize_q8_0_act` (round half away from zero, as `f32::round`)
/// without a libm `roundf` call per element, which a prompt would pay
/// hundreds of millions of times.
pub(super) fn quantize_q8_0_act(x: &[f32], qs: &mut [i8], d: &mut [f32], corr: &mut [i32], offset: i32) {
    let nb = x.len() / QK;
    if qs.len() < nb * QK || d.len() < nb || corr.len() < nb || !Level::Avx2.available() {
        for (((xb, qb), d), c) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(d).zip(corr) {
            *d = super::blocks::quantize_q8_0_act(xb, qb);
            *c = -offset * qb.iter().map(|&q| i32::from(q)).sum::<i32>();
        }
        return;
    }
    for b in 0..nb {
        // SAFETY: AVX2 was detected just above; block b's 32 floats and 32
        // quants exist (lengths checked above).
        let (scale, sum) = unsafe { quant_block(x.as_ptr().add(b * QK), qs.as_mut_ptr().add(b * QK)) };
        d[b] = scale;
        corr[b] = -offset * sum;
    }
}

/// # Safety
/// AVX2 present; 32 floats at `x`, 32 bytes at `q`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant_block(x: *const f32, q: *mut i8) -> (f32, i32) {
    // SAFETY: 32 floats at x (contract).
    let v = unsafe {
        [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ]
    };
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let mut iv = [_mm256_setzero_si256(); 4];
    for (o, vi) in iv.iter_mut().zip(v) {
        let p = _mm256_mul_ps(vi, id);
        // Half away from zero: truncate, then step away from zero when the
        // dropped fraction (exact in f32) is at least one half.
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
        let step = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half),
            _mm256_or_ps(one, _mm256_and_ps(p, sign)),
        );
        *o = _mm256_cvtps_epi32(_mm256_add_ps(t, step));
    }
    let s = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01)));
    // i32 -> i8 in element order: the packs work per 128-bit lane, the
    // permute puts the four 8-element runs back in sequence.
    let p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: 32 bytes at q (contract).
    unsafe { _mm256_storeu_si256(q.cast(), p) };
    (super::blocks::round_f16(d), sum)
}
