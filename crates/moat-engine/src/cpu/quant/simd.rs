//! x86_64 SIMD kernels for float and K-quant weights (AVX2+FMA+F16C, and
//! AVX-512 VL + VNNI), chosen at run time by [`Level`]; Q8_0/Q4_0 have theirs
//! in `simd_q`. One of the two modules allowed `unsafe`: raw
//! loads from slices whose bounds [`rows`] checks once up front, and calls of
//! `#[target_feature]` functions after [`Level::available`] said yes.
//!
//! Shape: a task gets a band of weight rows and every token. It walks token
//! panels (a panel's activations stay in L2), and inside one, tiles of R rows
//! x C tokens: each weight block loaded is used for C tokens and each
//! activation block for R rows (llamafile's tinyBLAS idea). Accumulators are
//! 8-lane f32 vectors; each block's integer dot is exact and scaled once.
#![allow(unsafe_code)]
#![allow(
    clippy::needless_range_loop,
    reason = "tile loops index several register arrays by one row/token index"
)]

use std::arch::x86_64::*;

use super::QType;
use super::kernels::{self, Act, Level};
use super::matrix::{Data, QMatrix};

const QK_K: usize = 256;

/// Products of weight rows `r0..` (as many as `out` holds) with every token,
/// into `out` laid `[row][token]`.
pub(super) fn rows(level: Level, w: &QMatrix, act: &Act, r0: usize, out: &mut [f32]) {
    let (n, cols) = (act.n, act.cols);
    let nr = out.len() / n.max(1);
    // Everything the unsafe loads below rely on, checked once; a failure is
    // a bug in the caller, answered by the (bounds-checked) scalar path.
    let rows_end = r0 + nr;
    let ok = n > 0
        && out.len() == nr * n
        && rows_end <= w.rows()
        && cols == w.cols()
        && match &w.data {
            Data::F32(v) => v.len() >= rows_end * cols && act.f.len() >= n * cols,
            Data::F16(v) | Data::Bf16(v) => v.len() >= rows_end * cols && act.f.len() >= n * cols,
            // Grouped weights have their own kernels (`simd_q`).
            Data::Q8_0(_) | Data::Q4_0(_) => false,
            Data::Raw(v) => {
                let nb = cols / QK_K;
                cols % QK_K == 0
                    && matches!(w.qtype(), QType::Q4K | QType::Q6K)
                    && v.len() >= rows_end * nb * w.qtype().block_bytes()
                    && act.qs.len() >= n * cols
                    && act.d.len() >= n * nb
                    && act.bsums.len() >= n * nb * 16
            }
        };
    if !ok {
        return kernels::scalar_rows(w, act, r0, out);
    }
    let vnni = level == Level::Avx512;
    // Token panel: activations of a panel should sit in L2 (~256 KiB).
    let act_bytes = if matches!(w.qtype(), QType::Q4K | QType::Q6K) {
        cols
    } else {
        4 * cols
    };
    let panel = (262_144 / act_bytes.max(1)).clamp(4, 256) / 4 * 4;
    // 4 tokens per tile where AVX-512 gives the tiles 32 vector registers
    // (the same ymm code, compiled with AVX-512 VL, spills no accumulator);
    // 2 under AVX2's 16.
    let max_c = if vnni { 4 } else { 2 };
    for p0 in (0..n).step_by(panel) {
        let p1 = (p0 + panel).min(n);
        let mut rt = 0;
        while rt < nr {
            let rr = if nr - rt >= 4 { 4 } else { 1 };
            let mut ct = p0;
            while ct < p1 {
                let cc = if p1 - ct >= 4 && max_c >= 4 {
                    4
                } else if p1 - ct >= 2 {
                    2
                } else {
                    1
                };
                let t = Tile {
                    r: r0 + rt,
                    c: ct,
                    cols,
                    n,
                };
                // SAFETY: `available()` confirmed this level's CPU features
                // before matmul_at dispatched here (only Avx2/Avx512 reach
                // this module), and the bounds the tile functions read within
                // (rows r..r+rr <= w.rows(), tokens c..c+cc <= n, slices at
                // least rows*cols / n*cols long) were checked above.
                unsafe {
                    match &w.data {
                        // Not reached: `ok` is false for grouped weights.
                        Data::Q8_0(_) | Data::Q4_0(_) => {}
                        Data::F32(v) => tile_f(vnni, Fw::F32(v), rr, cc, &act.f, &t, out, rt),
                        Data::F16(v) => tile_f(vnni, Fw::F16(v), rr, cc, &act.f, &t, out, rt),
                        Data::Bf16(v) => tile_f(vnni, Fw::Bf16(v), rr, cc, &act.f, &t, out, rt),
                        Data::Raw(v) => tile_k(vnni, w.qtype() == QType::Q4K, rr, cc, v, act, &t, out, rt),
                    }
                }
                ct += cc;
            }
            rt += rr;
        }
    }
}

/// Where a tile sits: first weight row `r`, first token `c`.
struct Tile {
    r: usize,
    c: usize,
    cols: usize,
    n: usize,
}

enum Fw<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

/// Write a finished R x C tile into `out` ([row][token], row `rt` first).
fn store<const R: usize, const C: usize>(res: [[f32; C]; R], out: &mut [f32], rt: usize, t: &Tile) {
    for (i, row) in res.iter().enumerate() {
        let o = &mut out[(rt + i) * t.n + t.c..][..C];
        o.copy_from_slice(row);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Defines a tile function twice: `$name` with AVX2 (+FMA, F16C) and
/// `$wide` with AVX-512 F/BW/VL as well, where the same ymm code gets 32
/// vector registers (so 4-token tiles keep every accumulator in registers).
/// Both have the contract written above the invocation.
macro_rules! two_levels {
    ($name:ident, $wide:ident, $($rest:tt)*) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name $($rest)*
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
        unsafe fn $wide $($rest)*
    };
}

/// # Safety
/// AVX2+FMA+F16C present; tile within the checked bounds.
#[allow(
    clippy::too_many_arguments,
    reason = "one dispatch point for every tile shape"
)]
unsafe fn tile_f(wide: bool, w: Fw, rr: usize, cc: usize, x: &[f32], t: &Tile, out: &mut [f32], rt: usize) {
    macro_rules! go {
        ($r:literal, $c:literal) => {{
            let (p, k) = match w {
                Fw::F32(v) => (v.as_ptr().cast::<u8>(), 0),
                Fw::F16(v) => (v.as_ptr().cast::<u8>(), 1),
                Fw::Bf16(v) => (v.as_ptr().cast::<u8>(), 2),
            };
            // SAFETY: forwarded from this function's contract (`wide` only
            // at the AVX-512 level).
            let res = unsafe {
                match (wide, k) {
                    (true, 0) => f_tile_w::<$r, $c, 0>(p, x, t),
                    (true, 1) => f_tile_w::<$r, $c, 1>(p, x, t),
                    (true, _) => f_tile_w::<$r, $c, 2>(p, x, t),
                    (false, 0) => f_tile::<$r, $c, 0>(p, x, t),
                    (false, 1) => f_tile::<$r, $c, 1>(p, x, t),
                    (false, _) => f_tile::<$r, $c, 2>(p, x, t),
                }
            };
            store::<$r, $c>(res, out, rt, t)
        }};
    }
    match (rr, cc) {
        (4, 4) => go!(4, 4),
        (4, 2) => go!(4, 2),
        (4, _) => go!(4, 1),
        (_, 4) => go!(1, 4),
        (_, 2) => go!(1, 2),
        _ => go!(1, 1),
    }
}

/// 8 weights at element `at` as f32: K 0 = f32, 1 = f16, 2 = bf16.
///
/// # Safety
/// AVX2+F16C present; `at + 8` elements of the weight array exist.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn wload<const K: u8>(w: *const u8, at: usize) -> __m256 {
    // SAFETY: at+8 elements exist (caller's contract).
    unsafe {
        match K {
            0 => _mm256_loadu_ps(w.cast::<f32>().add(at)),
            1 => _mm256_cvtph_ps(_mm_loadu_si128(w.cast::<u16>().add(at).cast())),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(w.cast::<u16>().add(at).cast())),
                16,
            )),
        }
    }
}

/// One weight as f32 (the scalar tail of a row).
///
/// # Safety
/// Element `at` exists.
#[inline]
unsafe fn wone<const K: u8>(w: *const u8, at: usize) -> f32 {
    // SAFETY: element `at` exists (caller's contract).
    unsafe {
        match K {
            0 => *w.cast::<f32>().add(at),
            1 => super::blocks::f16_to_f32(*w.cast::<u16>().add(at)),
            _ => super::blocks::bf16_to_f32(*w.cast::<u16>().add(at)),
        }
    }
}

// Float-weight tile: FMA over 8 columns at a time, scalar tail.
//
// # Safety
// AVX2+FMA+F16C present; `w` holds at least (t.r+R)*cols elements and `x`
// (t.c+C)*cols.
two_levels! {
    f_tile, f_tile_w,
<const R: usize, const C: usize, const K: u8>(
    w: *const u8,
    x: &[f32],
    t: &Tile,
) -> [[f32; C]; R] {
    let k = t.cols;
    let k8 = k / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut e = 0;
    while e < k8 {
        let mut wv = [_mm256_setzero_ps(); R];
        for i in 0..R {
            // SAFETY: (t.r+i)*k + e + 8 <= (t.r+R)*k (contract).
            wv[i] = unsafe { wload::<K>(w, (t.r + i) * k + e) };
        }
        for j in 0..C {
            // SAFETY: (t.c+j)*k + e + 8 <= x.len() (contract).
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add((t.c + j) * k + e)) };
            for i in 0..R {
                acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
            }
        }
        e += 8;
    }
    let mut res = [[0f32; C]; R];
    for i in 0..R {
        for j in 0..C {
            let mut s = hsum(acc[i][j]);
            for e in k8..k {
                // SAFETY: e < k, so the element lies within row t.r+i and token t.c+j.
                s += unsafe { wone::<K>(w, (t.r + i) * k + e) * *x.get_unchecked((t.c + j) * k + e) };
            }
            res[i][j] = s;
        }
    }
    res
}
}

/// # Safety
/// AVX2+FMA present; tile within the checked bounds (`cc` <= 2).
#[allow(
    clippy::too_many_arguments,
    reason = "one dispatch point for every tile shape"
)]
unsafe fn tile_k(
    wide: bool,
    q4k: bool,
    rr: usize,
    cc: usize,
    w: &[u8],
    act: &Act,
    t: &Tile,
    out: &mut [f32],
    rt: usize,
) {
    macro_rules! go {
        ($r:literal, $c:literal) => {{
            // SAFETY: forwarded from this function's contract (`wide` only
            // at the AVX-512 level).
            let res = unsafe {
                match (wide, q4k) {
                    (true, true) => q4k_tile_w::<$r, $c>(w, act, t),
                    (true, false) => q6k_tile_w::<$r, $c>(w, act, t),
                    (false, true) => q4k_tile::<$r, $c>(w, act, t),
                    (false, false) => q6k_tile::<$r, $c>(w, act, t),
                }
            };
            store::<$r, $c>(res, out, rt, t)
        }};
    }
    match (rr, cc) {
        (4, 4) => go!(4, 4),
        (4, 2) => go!(4, 2),
        (4, _) => go!(4, 1),
        (_, 4) => go!(1, 4),
        (_, 2) => go!(1, 2),
        _ => go!(1, 1),
    }
}

// Q4_K x Q8_K tile: per 32 elements `vpmaddubsw` (nibble x q8) then
// `vpmaddwd` by the sub-block scale; mins through the Q8_K block sums.
//
// # Safety
// AVX2+FMA present; rows `t.r..t.r+R` and tokens `t.c..t.c+C` within the
// checked bounds.
two_levels! {
    q4k_tile, q4k_tile_w,
<const R: usize, const C: usize>(w: &[u8], a: &Act, t: &Tile) -> [[f32; C]; R] {
    let nb = t.cols / QK_K;
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        let mut head = [(0f32, 0f32); R];
        let mut sc = [[0i16; 8]; R];
        let mut mins = [_mm256_setzero_si256(); R];
        let mut base = [std::ptr::null::<u8>(); R];
        for i in 0..R {
            let off = ((t.r + i) * nb + b) * 144;
            // SAFETY: the block lies below rows_end*nb*144 <= w.len() (contract).
            let blk = unsafe { w.get_unchecked(off..off + 144) };
            let h = super::blocks::q4_k_head(blk);
            head[i] = (h.d, h.dmin);
            let mut m16 = [0i16; 16];
            for j in 0..8 {
                sc[i][j] = i16::from(h.scales[j]);
                m16[2 * j] = i16::from(h.mins[j]);
                m16[2 * j + 1] = i16::from(h.mins[j]);
            }
            // SAFETY: m16 is 32 bytes.
            mins[i] = unsafe { _mm256_loadu_si256(m16.as_ptr().cast()) };
            base[i] = blk.as_ptr();
            if C == 1 {
                // Decode streams each weight once: fetch this block of the
                // next tile's rows (R rows further) while this one computes,
                // which the hardware prefetchers do not across pages.
                let ahead = blk.as_ptr().wrapping_add(R * nb * 144);
                for o in (0..144).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(o).cast());
                }
            }
        }
        let mut isum = [[_mm256_setzero_si256(); C]; R];
        for k in 0..4 {
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            for i in 0..R {
                // SAFETY: bytes 16+32k..48+32k of the 144-byte block.
                let v = unsafe { _mm256_loadu_si256(base[i].add(16 + 32 * k).cast()) };
                lo[i] = _mm256_and_si256(v, m4);
                hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for j in 0..C {
                let xo = (t.c + j) * t.cols + b * QK_K + 64 * k;
                // SAFETY: xo + 64 <= n*cols <= qs.len() (contract).
                let (xl, xh) = unsafe {
                    (
                        _mm256_loadu_si256(a.qs.as_ptr().add(xo).cast()),
                        _mm256_loadu_si256(a.qs.as_ptr().add(xo + 32).cast()),
                    )
                };
                for i in 0..R {
                    let pl =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo[i], xl), _mm256_set1_epi16(sc[i][2 * k]));
                    let ph = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi[i], xh),
                        _mm256_set1_epi16(sc[i][2 * k + 1]),
                    );
                    isum[i][j] = _mm256_add_epi32(isum[i][j], _mm256_add_epi32(pl, ph));
                }
            }
        }
        for j in 0..C {
            let blk = (t.c + j) * nb + b;
            // SAFETY: blk < n*nb: d has it, bsums has 16*blk+16 entries.
            let (dx, bs) = unsafe {
                (
                    *a.d.get_unchecked(blk),
                    _mm256_loadu_si256(a.bsums.as_ptr().add(16 * blk).cast()),
                )
            };
            for i in 0..R {
                let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins[i]));
                let f = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[i][j]),
                    _mm256_set1_ps(head[i].0 * dx),
                    acc[i][j],
                );
                acc[i][j] = _mm256_fnmadd_ps(msum, _mm256_set1_ps(head[i].1 * dx), f);
            }
        }
    }
    let mut res = [[0f32; C]; R];
    for i in 0..R {
        for j in 0..C {
            res[i][j] = hsum(acc[i][j]);
        }
    }
    res
}
}

// Q6_K x Q8_K tile: 6-bit quants rebuilt unsigned (q+32) from ql/qh, then
// `vpmaddubsw` and `vpmaddwd` by [scale of 16 | next scale]; the +32 comes
// off through the Q8_K block sums.
//
// # Safety
// AVX2+FMA present; tile within the checked bounds.
two_levels! {
    q6k_tile, q6k_tile_w,
<const R: usize, const C: usize>(w: &[u8], a: &Act, t: &Tile) -> [[f32; C]; R] {
    let nb = t.cols / QK_K;
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        let mut d = [0f32; R];
        let mut sc = [[0i16; 16]; R];
        let mut sc16 = [_mm256_setzero_si256(); R];
        let mut base = [std::ptr::null::<u8>(); R];
        for i in 0..R {
            let off = ((t.r + i) * nb + b) * 210;
            // SAFETY: the block lies below rows_end*nb*210 <= w.len() (contract).
            let blk = unsafe { w.get_unchecked(off..off + 210) };
            d[i] = super::blocks::q6_k_d(blk);
            for g in 0..16 {
                sc[i][g] = i16::from(blk[192 + g] as i8);
            }
            // SAFETY: sc[i] is 32 bytes.
            sc16[i] = unsafe { _mm256_loadu_si256(sc[i].as_ptr().cast()) };
            base[i] = blk.as_ptr();
            if C == 1 {
                // Decode streams each weight once: fetch this block of the
                // next tile's rows (R rows further) while this one computes,
                // which the hardware prefetchers do not across pages.
                let ahead = blk.as_ptr().wrapping_add(R * nb * 210);
                for o in (0..210).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(o).cast());
                }
            }
        }
        let mut isum = [[_mm256_setzero_si256(); C]; R];
        for h in 0..2 {
            for m in 0..4 {
                let g = 8 * h + 2 * m;
                // Unpack just this 32-element chunk per row: holding all
                // four chunks of four rows would spill AVX2's 16 registers.
                let mut q = [_mm256_setzero_si256(); R];
                let mut scv = [_mm256_setzero_si256(); R];
                for i in 0..R {
                    // SAFETY: ql at 64h+32(m%2)..+32 and qh at 128+32h..+32
                    // lie within the 210-byte block.
                    let (l, qh) = unsafe {
                        (
                            _mm256_loadu_si256(base[i].add(64 * h + 32 * (m % 2)).cast()),
                            _mm256_loadu_si256(base[i].add(128 + 32 * h).cast()),
                        )
                    };
                    let qh = if m % 2 == 1 { _mm256_srli_epi16(qh, 2) } else { qh };
                    q[i] = if m < 2 {
                        _mm256_or_si256(
                            _mm256_and_si256(l, m4),
                            _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                        )
                    } else {
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(l, 4), m4),
                            _mm256_and_si256(qh, m30),
                        )
                    };
                    scv[i] = _mm256_set_m128i(_mm_set1_epi16(sc[i][g + 1]), _mm_set1_epi16(sc[i][g]));
                }
                for j in 0..C {
                    let xo = (t.c + j) * t.cols + b * QK_K + 128 * h + 32 * m;
                    // SAFETY: xo + 32 <= n*cols <= qs.len() (contract).
                    let xv = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(xo).cast()) };
                    for i in 0..R {
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[i], xv), scv[i]);
                        isum[i][j] = _mm256_add_epi32(isum[i][j], p);
                    }
                }
            }
        }
        for j in 0..C {
            let blk = (t.c + j) * nb + b;
            // SAFETY: blk < n*nb: d has it, bsums has 16*blk+16 entries.
            let (dx, bs) = unsafe {
                (
                    *a.d.get_unchecked(blk),
                    _mm256_loadu_si256(a.bsums.as_ptr().add(16 * blk).cast()),
                )
            };
            for i in 0..R {
                let corr = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16[i]), 5);
                let tot = _mm256_sub_epi32(isum[i][j], corr);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_set1_ps(d[i] * dx), acc[i][j]);
            }
        }
    }
    let mut res = [[0f32; C]; R];
    for i in 0..R {
        for j in 0..C {
            res[i][j] = hsum(acc[i][j]);
        }
    }
    res
}
}

/// # Safety
/// AVX2+FMA present; `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i+16 <= n elements in both.
        unsafe {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
        }
        i += 16;
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    for k in i..n {
        s += a[k] * b[k];
    }
    s
}

/// `out[j] = scale * (q . keys[j*stride + off..][..q.len()])`; the caller
/// checked that every key lies within `keys`.
pub(super) fn scores_f32(q: &[f32], keys: &[f32], stride: usize, off: usize, scale: f32, out: &mut [f32]) {
    // SAFETY: kernels::scores_f32 dispatches here only for a SIMD level
    // whose features (AVX2+FMA) were detected, after checking the bounds.
    unsafe { scores_avx2(q, keys, stride, off, scale, out) }
}

/// # Safety
/// AVX2+FMA present; `(out.len()-1)*stride + off + q.len() <= keys.len()`.
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], keys: &[f32], stride: usize, off: usize, scale: f32, out: &mut [f32]) {
    let d = q.len();
    let d8 = d / 8 * 8;
    let kp = keys.as_ptr();
    let mut j = 0;
    // Four keys at a time: the query vector loaded once serves four dots.
    while j + 4 <= out.len() {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut e = 0;
        while e < d8 {
            // SAFETY: e + 8 <= d elements of q and of each key (contract).
            let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(e)) };
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: key j+i < out.len() lies within keys (contract).
                let kv = unsafe { _mm256_loadu_ps(kp.add((j + i) * stride + off + e)) };
                *a = _mm256_fmadd_ps(qv, kv, *a);
            }
            e += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            let mut s = hsum(*a);
            for e in d8..d {
                s += q[e] * keys[(j + i) * stride + off + e];
            }
            out[j + i] = s * scale;
        }
        j += 4;
    }
    while j < out.len() {
        // SAFETY: key j lies within keys (contract).
        let k = unsafe { std::slice::from_raw_parts(kp.add(j * stride + off), d) };
        // SAFETY: AVX2+FMA present (this function's contract); equal lengths.
        out[j] = unsafe { dot_avx2(q, k) } * scale;
        j += 1;
    }
}

/// `out += sum_j p[j] * values[j*stride + off..][..out.len()]`; the caller
/// checked that every value row lies within `values`.
pub(super) fn weighted_sum_f32(p: &[f32], values: &[f32], stride: usize, off: usize, out: &mut [f32]) {
    // SAFETY: dispatched only for a detected SIMD level (AVX2+FMA), after
    // the bounds check.
    unsafe { weighted_sum_avx2(p, values, stride, off, out) }
}

/// # Safety
/// AVX2+FMA present; `(p.len()-1)*stride + off + out.len() <= values.len()`.
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(p: &[f32], values: &[f32], stride: usize, off: usize, out: &mut [f32]) {
    const W: usize = 8; // 8 vectors = 64 floats held in registers
    let d = out.len();
    let vp = values.as_ptr();
    let mut c0 = 0;
    // Columns in slabs of 64: the slab of `out` stays in registers while
    // every value row passes, and is stored once.
    while c0 + 8 <= d {
        let nv = ((d - c0) / 8).min(W);
        let mut acc = [_mm256_setzero_ps(); W];
        for (i, a) in acc.iter_mut().enumerate().take(nv) {
            // SAFETY: c0 + 8i + 8 <= d.
            *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(c0 + 8 * i)) };
        }
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            let row = j * stride + off + c0;
            for (i, a) in acc.iter_mut().enumerate().take(nv) {
                // SAFETY: row + 8i + 8 <= j*stride + off + d (contract).
                *a = _mm256_fmadd_ps(pv, unsafe { _mm256_loadu_ps(vp.add(row + 8 * i)) }, *a);
            }
        }
        for (i, a) in acc.iter().enumerate().take(nv) {
            // SAFETY: as for the loads from out.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * i), *a) };
        }
        c0 += 8 * nv;
    }
    for c in c0..d {
        for (j, &pj) in p.iter().enumerate() {
            out[c] += pj * values[j * stride + off + c];
        }
    }
}
