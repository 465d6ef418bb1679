//! ggml's block encodings, one block at a time: the reference quantisers
//! (ported from llama.cpp's `quantize_row_*_ref`, op for op, so a matrix we
//! quantise has the bytes llama.cpp would write) and the dequantisers.
//!
//! Everything here is plain scalar code over fixed-size arrays; it is the
//! truth the SIMD kernels are tested against, not the fast path.

/// Elements in a K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Elements in a Q8_0 / Q4_0 block.
pub(crate) const QK: usize = 32;

/// f32 -> IEEE half, round to nearest even (what F16C and ggml do).
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

pub(crate) fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// f32 -> bfloat16 as ggml rounds it: nearest even, NaN kept quiet.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 rounded through f16 (the value a half-precision activation holds).
pub(crate) fn round_f16(x: f32) -> f32 {
    f16_to_f32(f32_to_f16(x))
}

/// f32 rounded through bf16.
pub(crate) fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// ggml's `nearest_int`: round half to even by the 1.5*2^23 trick. Valid for
/// |x| <= 2^22, which every caller guarantees by construction (values are
/// already scaled into a small integer range).
pub(crate) fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    ((v.to_bits() & 0x007f_ffff) as i32) - 0x0040_0000
}

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn wr_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------- Q8_0

/// One Q8_0 block: f16 scale then 32 signed quants (34 bytes).
pub(crate) fn quantize_q8_0(x: &[f32; QK], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    wr_u16(out, 0, f32_to_f16(d));
    for (o, v) in out[2..34].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

/// Activation flavour of Q8_0: scale as the f32 value of its f16, quants out.
pub(crate) fn quantize_q8_0_act(x: &[f32], qs: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in qs.iter_mut().zip(x) {
        *o = (v * id).round() as i8;
    }
    round_f16(d)
}

// ---------------------------------------------------------------- Q4_0

/// One Q4_0 block: f16 scale then 16 bytes; element j in the low nibble of
/// byte j, element j+16 in the high nibble; stored value = q + 8.
pub(crate) fn quantize_q4_0(x: &[f32; QK], out: &mut [u8]) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    wr_u16(out, 0, f32_to_f16(d));
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[j + QK / 2] * id;
        let q0 = ((x0 + 8.5) as i8).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8).min(15) as u8;
        out[2 + j] = q0 | (q1 << 4);
    }
}

// ---------------------------------------------------------------- Q8_K

/// Q8_K activation block: f32 scale, 256 quants, sums of each 16.
pub(crate) fn quantize_q8_k(x: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        qs.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (o, &v) in qs.iter_mut().zip(x) {
        *o = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, chunk) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = chunk.iter().map(|&q| i16::from(q)).sum();
    }
    1.0 / iscale
}

// ---------------------------------------------------------------- Q4_K

/// Q4_K layout: d f16 @0, dmin f16 @2, scales[12] @4, qs[128] @16.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "a faithful port of make_qkx2_quants's signature"
)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l_out: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

pub(crate) fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &weights, 15, &mut l[32 * j..], &mut laux, -1.0, 0.1, 20);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut out[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    wr_u16(out, 0, f32_to_f16(max_scale / 63.0));
    wr_u16(out, 2, f32_to_f16(max_min / 63.0));
    let d_all = f16_to_f32(rd_u16(out, 0));
    let dmin_all = f16_to_f32(rd_u16(out, 2));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &out[4..16]);
        let d = d_all * f32::from(s);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, 15) as u8;
        }
    }
    let q = &mut out[16..144];
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

pub(crate) fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_to_f32(rd_u16(b, 0));
    let min = f16_to_f32(rd_u16(b, 2));
    let sc = &b[4..16];
    let q = &b[16..144];
    for c in 0..4 {
        let (s1, m1) = scale_min_k4(2 * c, sc);
        let (s2, m2) = scale_min_k4(2 * c + 1, sc);
        let (d1, m1) = (d * f32::from(s1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), min * f32::from(m2));
        let qc = &q[32 * c..32 * c + 32];
        for l in 0..32 {
            y[64 * c + l] = d1 * f32::from(qc[l] & 0xF) - m1;
            y[64 * c + 32 + l] = d2 * f32::from(qc[l] >> 4) - m2;
        }
    }
}

// ---------------------------------------------------------------- Q6_K

/// llama.cpp's `make_qx_quants` with `rmse_type` 1 and no importance
/// weights (the only way the Q6_K reference quantiser calls it).
fn make_qx_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l_out[..x.len()].fill(0);
        return 0.0;
    }
    let nm = nmax as f32;
    let mut iscale = -nm / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = v * v;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nm + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            let lf = l as f32;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
                l_out[i] = (nmax + l) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K layout: ql[128] @0, qh[64] @128, scales[16] (i8) @192, d f16 @208.
pub(crate) fn quantize_q6_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..16 {
        let s = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        out[..210].fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    wr_u16(out, 208, f32_to_f16(1.0 / iscale));
    for ib in 0..16 {
        out[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = f16_to_f32(rd_u16(out, 208));
    for j in 0..16 {
        let d = d_all * f32::from(out[192 + j] as i8);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let lv = |k: usize| l[j + i + k] as u8;
            ql[64 * h + i] = (lv(0) & 0xF) | ((lv(64) & 0xF) << 4);
            ql[64 * h + i + 32] = (lv(32) & 0xF) | ((lv(96) & 0xF) << 4);
            qh[32 * h + i] =
                (lv(0) >> 4) | ((lv(32) >> 4) << 2) | ((lv(64) >> 4) << 4) | ((lv(96) >> 4) << 6);
        }
    }
}

/// The 256 signed 6-bit quants (-32..=31) of a Q6_K block, in element order.
pub(crate) fn unpack_q6_k(b: &[u8], q: &mut [i8; QK_K]) {
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let o = 128 * h;
        for l in 0..32 {
            q[o + l] = (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8) - 32;
            q[o + l + 32] = (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8) - 32;
            q[o + l + 64] = (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8) - 32;
            q[o + l + 96] = (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8) - 32;
        }
    }
}

pub(crate) fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_to_f32(rd_u16(b, 208));
    let mut q = [0i8; QK_K];
    unpack_q6_k(b, &mut q);
    for (i, (o, &qv)) in y.iter_mut().zip(q.iter()).enumerate() {
        let sc = b[192 + i / 16] as i8;
        *o = d * f32::from(sc) * f32::from(qv);
    }
}

/// Q4_K's 8 (scale, min) pairs and f16 super-scales, decoded.
pub(crate) struct Q4kHead {
    pub d: f32,
    pub dmin: f32,
    pub scales: [u8; 8],
    pub mins: [u8; 8],
}

pub(crate) fn q4_k_head(b: &[u8]) -> Q4kHead {
    let mut h = Q4kHead {
        d: f16_to_f32(rd_u16(b, 0)),
        dmin: f16_to_f32(rd_u16(b, 2)),
        scales: [0; 8],
        mins: [0; 8],
    };
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &b[4..16]);
        h.scales[j] = s;
        h.mins[j] = m;
    }
    h
}

pub(crate) fn q6_k_d(b: &[u8]) -> f32 {
    f16_to_f32(rd_u16(b, 208))
}
