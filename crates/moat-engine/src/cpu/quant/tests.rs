//! Tests for the quant formats and kernels: exact ggml round trips, the
//! reference quantisers' known outputs and error bounds, matmul against a
//! double-precision product of the dequantised operands, and every SIMD level
//! against the scalar one across ragged shapes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]

use super::blocks::{self, QK, QK_K};
use super::kernels::Act;
use super::*;

/// Deterministic test numbers (SplitMix64), no dependency needed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uni(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Roughly normal (sum of four uniforms), with an occasional outlier as
    /// real weights have.
    fn weight(&mut self) -> f32 {
        let v = (self.uni() + self.uni() + self.uni() + self.uni()) * 0.5;
        if self.next_u64().is_multiple_of(97) {
            v * 6.0
        } else {
            v
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.weight()).collect()
    }
}

const QTYPES: [QType; 7] = QType::ALL;

fn cols_for(t: QType) -> Vec<usize> {
    if t.block_elems() == QK_K {
        vec![256, 1536]
    } else {
        vec![32, 256, 1536]
    }
}

#[test]
fn qtype_ids_round_trip() {
    for t in QTYPES {
        assert_eq!(QType::from_ggml(t.ggml_id()), Some(t));
    }
    assert_eq!(QType::from_ggml(3), None);
    assert_eq!(QType::Q4K.name(), "Q4_K");
    assert_eq!(QType::Q6K.row_bytes(512), Some(420));
    assert_eq!(QType::Q8_0.row_bytes(48), None);
}

#[test]
fn from_ggml_wrong_length_names_sizes() {
    let err = QMatrix::from_ggml(QType::Q8_0, 3, 64, &[0u8; 200])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q8_0") && err.contains("3 x 64") && err.contains("204") && err.contains("200"),
        "{err}"
    );
    let err = QMatrix::from_ggml(QType::Q4K, 2, 100, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q4_K") && err.contains("100") && err.contains("256"),
        "{err}"
    );
    let err = QMatrix::from_f32(QType::F16, 2, 4, &[0.0; 7])
        .unwrap_err()
        .to_string();
    assert!(err.contains('8') && err.contains('7'), "{err}");
    assert!(QMatrix::from_ggml(QType::F32, usize::MAX / 2, 64, &[]).is_err());
}

/// Random but well-formed ggml bytes: every f16 scale finite.
fn random_ggml(t: QType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..rows * t.row_bytes(cols).unwrap())
        .map(|_| rng.next_u64() as u8)
        .collect();
    let scale = |rng: &mut Rng| blocks::f32_to_f16(rng.uni() * 0.01).to_le_bytes();
    match t {
        QType::F16 => b.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&scale(rng))),
        QType::F32 => b
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&rng.uni().to_le_bytes())),
        QType::Q8_0 | QType::Q4_0 => b
            .chunks_exact_mut(t.block_bytes())
            .for_each(|c| c[..2].copy_from_slice(&scale(rng))),
        QType::Q4K => b.chunks_exact_mut(144).for_each(|c| {
            c[..2].copy_from_slice(&scale(rng));
            c[2..4].copy_from_slice(&scale(rng));
        }),
        QType::Q6K => b
            .chunks_exact_mut(210)
            .for_each(|c| c[208..].copy_from_slice(&scale(rng))),
        QType::BF16 => b.chunks_exact_mut(2).for_each(|c| {
            c.copy_from_slice(&blocks::f32_to_bf16(rng.uni()).to_le_bytes());
        }),
    }
    b
}

#[test]
fn ggml_bytes_round_trip_exactly() {
    let mut rng = Rng(1);
    for t in QTYPES {
        for cols in cols_for(t) {
            for rows in [1, 3, 7] {
                let b = random_ggml(t, rows, cols, &mut rng);
                let m = QMatrix::from_ggml(t, rows, cols, &b).unwrap();
                assert_eq!(m.to_ggml(), b, "{t:?} {rows}x{cols}");
                assert_eq!((m.rows(), m.cols(), m.qtype()), (rows, cols, t));
                assert!(m.size_bytes() >= b.len());
            }
        }
    }
}

#[test]
fn q8_0_reference_bytes() {
    // amax 127 -> d = 1.0 exactly; quants are round-half-away values.
    let mut x = [0f32; QK];
    for (i, v) in x.iter_mut().enumerate() {
        *v = i as f32 * 4.0 - 0.5;
    }
    x[31] = -127.0;
    let m = QMatrix::from_f32(QType::Q8_0, 1, 32, &x).unwrap();
    let b = m.to_ggml();
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x3c00); // f16 1.0
    assert_eq!(b[2] as i8, -1); // -0.5 rounds away from zero
    assert_eq!(b[3] as i8, 4); // 3.5 -> 4
    assert_eq!(b[4] as i8, 8); // 7.5 -> 8
    assert_eq!(b[33] as i8, -127);
}

#[test]
fn q4_0_reference_bytes() {
    // max by magnitude is -16 -> d = 2, id = 0.5; stored = trunc(x/2 + 8.5) capped at 15.
    let mut x = [0f32; QK];
    x[0] = -16.0; // -8 -> 0
    x[1] = 3.0; // 1.5 + 8.5 = 10
    x[16] = 15.9; // 7.95 + 8.5 = 16.45 -> 15
    x[17] = -1.0; // -0.5 + 8.5 = 8
    let b = QMatrix::from_f32(QType::Q4_0, 1, 32, &x).unwrap().to_ggml();
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x4000); // f16 2.0
    assert_eq!(b[2], 15 << 4);
    assert_eq!(b[3], 10 | (8 << 4));
    assert_eq!(b[4], 8 | (8 << 4));
}

#[test]
fn nearest_int_is_round_half_even() {
    assert_eq!(blocks::nearest_int(2.5), 2);
    assert_eq!(blocks::nearest_int(3.5), 4);
    assert_eq!(blocks::nearest_int(-2.5), -2);
    assert_eq!(blocks::nearest_int(-7.49), -7);
    assert_eq!(blocks::nearest_int(0.0), 0);
}

#[test]
fn bf16_rounds_to_nearest_even() {
    assert_eq!(blocks::f32_to_bf16(1.0), 0x3f80);
    assert_eq!(blocks::f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie -> even
    assert_eq!(blocks::f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert!(blocks::bf16_to_f32(blocks::f32_to_bf16(f32::NAN)).is_nan());
}

fn dequant(m: &QMatrix) -> Vec<f32> {
    let mut out = vec![0f32; m.rows() * m.cols()];
    for (r, o) in out.chunks_exact_mut(m.cols()).enumerate() {
        m.dequantize_row(r, o).unwrap();
    }
    out
}

#[test]
fn quantise_dequantise_error_bounds() {
    let mut rng = Rng(2);
    let (rows, cols) = (8, 1536);
    let x = rng.vec(rows * cols);
    for t in QTYPES {
        let m = QMatrix::from_f32(t, rows, cols, &x).unwrap();
        let y = dequant(&m);
        match t {
            QType::F32 => assert_eq!(x, y),
            QType::F16 | QType::BF16 => {
                let rel = if t == QType::F16 {
                    1.0 / 2048.0
                } else {
                    1.0 / 256.0
                };
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() <= a.abs() * rel + 1e-7, "{t:?} {a} {b}");
                }
            }
            QType::Q8_0 | QType::Q4_0 => {
                // Per block: |error| <= d/2 (Q8_0) or d (Q4_0, whose top
                // level is clipped), d = amax/127 or amax/8, plus the f16 scale's
                // rounding times the largest quant (127 or 8).
                let (div, frac) = if t == QType::Q8_0 {
                    (127.0, 0.57)
                } else {
                    (8.0, 1.01)
                };
                for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let bound = amax / div * frac * 1.01 + 1e-7;
                    for (a, b) in xb.iter().zip(yb) {
                        assert!((a - b).abs() <= bound, "{t:?} {a} {b} > {bound}");
                    }
                }
            }
            QType::Q4K | QType::Q6K => {
                let rms = |v: &[f32]| (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
                let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
                let rel = rms(&err) / rms(&x);
                let limit = if t == QType::Q6K { 0.03 } else { 0.12 };
                assert!(rel < limit, "{t:?} relative rms error {rel}");
                assert!(rel > 0.0);
            }
        }
    }
}

#[test]
fn all_zero_blocks_quantise_to_zero() {
    for t in QTYPES {
        let cols = t.block_elems().max(32);
        let m = QMatrix::from_f32(t, 2, cols, &vec![0.0; 2 * cols]).unwrap();
        assert!(dequant(&m).iter().all(|&v| v == 0.0), "{t:?}");
    }
}

/// f64 product of the dequantised weights and dequantised activations (what
/// every kernel must compute up to float summation order), and the bound on
/// that order's effect: a few ulps of the sum of |terms|.
fn expected(m: &QMatrix, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let (rows, cols) = (m.rows(), m.cols());
    let w = dequant(m);
    let act = Act::prepare(Level::Scalar, m.qtype(), x, n, cols);
    let xd: Vec<f32> = match m.qtype() {
        QType::F32 | QType::F16 | QType::BF16 => act.f.clone(),
        t => {
            let blk = if matches!(t, QType::Q8_0 | QType::Q4_0) {
                QK
            } else {
                QK_K
            };
            act.qs
                .iter()
                .enumerate()
                .map(|(i, &q)| f32::from(q) * act.d[i / blk])
                .collect()
        }
    };
    let mut y = vec![0f64; n * rows];
    let mut mag = vec![0f64; n * rows];
    for c in 0..n {
        for r in 0..rows {
            for k in 0..cols {
                let p = f64::from(w[r * cols + k]) * f64::from(xd[c * cols + k]);
                y[c * rows + r] += p;
                mag[c * rows + r] += p.abs();
            }
        }
    }
    (y, mag)
}

fn check_close(t: QType, got: &[f32], want: &[f64], mag: &[f64], what: &str) {
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = m * 2e-5 + 1e-6;
        assert!(
            (f64::from(g) - w).abs() <= tol,
            "{what} {t:?} [{i}]: got {g}, want {w} (tol {tol})"
        );
    }
}

#[test]
fn scalar_matmul_matches_dequantised_product() {
    let mut rng = Rng(3);
    for t in QTYPES {
        for cols in cols_for(t) {
            for (rows, n) in [(5, 1), (19, 3), (33, 5)] {
                let m = QMatrix::from_f32(t, rows, cols, &rng.vec(rows * cols)).unwrap();
                let x = rng.vec(n * cols);
                let mut y = vec![f32::NAN; n * rows];
                m.matmul_at(Level::Scalar, &x, n, &mut y).unwrap();
                let (want, mag) = expected(&m, &x, n);
                check_close(t, &y, &want, &mag, &format!("scalar {rows}x{cols} n={n}"));
            }
        }
    }
}

#[test]
fn matmul_tracks_the_float_product() {
    // Against unquantised f32 maths: the quantisation error stays small
    // relative to the output's scale (catches a wrong activation format).
    let mut rng = Rng(4);
    let (rows, cols, n) = (16, 512, 2);
    let w = rng.vec(rows * cols);
    let x = rng.vec(n * cols);
    for t in QTYPES {
        let m = QMatrix::from_f32(t, rows, cols, &w).unwrap();
        let mut y = vec![0f32; n * rows];
        m.matmul(&x, n, &mut y).unwrap();
        let mut err = 0f64;
        let mut norm = 0f64;
        for c in 0..n {
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|k| f64::from(w[r * cols + k]) * f64::from(x[c * cols + k]))
                    .sum();
                err += (exact - f64::from(y[c * rows + r])).powi(2);
                norm += exact * exact;
            }
        }
        let rel = (err / norm).sqrt();
        let limit = match t {
            QType::F32 => 1e-6,
            QType::F16 | QType::BF16 => 1e-2,
            QType::Q8_0 => 0.03,
            // Q8_K activations (one scale per 256) add most of this.
            QType::Q6K => 0.06,
            _ => 0.15,
        };
        assert!(rel < limit, "{t:?}: relative error {rel}");
    }
}

#[test]
fn matmul_shape_errors() {
    let m = QMatrix::from_f32(QType::Q8_0, 4, 64, &[0.5; 256]).unwrap();
    let mut y = vec![0f32; 8];
    let err = m.matmul(&[0.0; 100], 2, &mut y).unwrap_err().to_string();
    assert!(err.contains("128") && err.contains("100"), "{err}");
    let err = m.matmul(&[0.0; 128], 2, &mut [0f32; 7]).unwrap_err().to_string();
    assert!(err.contains('8') && err.contains('7'), "{err}");
    assert!(m.matmul(&[], 0, &mut []).is_ok());
    let mut out = vec![0f32; 64];
    assert!(m.dequantize_row(4, &mut out).is_err());
    assert!(m.dequantize_row(0, &mut out[..63]).is_err());
}

#[test]
fn concat_rows_stacks_and_checks() {
    let mut rng = Rng(5);
    for t in QTYPES {
        let cols = if t.block_elems() == QK_K { 256 } else { 96 };
        let a = rng.vec(3 * cols);
        let b = rng.vec(2 * cols);
        let ma = QMatrix::from_f32(t, 3, cols, &a).unwrap();
        let mb = QMatrix::from_f32(t, 2, cols, &b).unwrap();
        let mut ab = a.clone();
        ab.extend(&b);
        let whole = QMatrix::from_f32(t, 5, cols, &ab).unwrap();
        let cat = QMatrix::concat_rows(vec![ma.clone(), mb]).unwrap();
        assert_eq!(cat.rows(), 5);
        assert_eq!(cat.to_ggml(), whole.to_ggml(), "{t:?}");
        let x = rng.vec(cols);
        let (mut y1, mut y2) = (vec![0f32; 5], vec![0f32; 5]);
        cat.matmul(&x, 1, &mut y1).unwrap();
        whole.matmul(&x, 1, &mut y2).unwrap();
        assert_eq!(y1, y2);
        let other = QMatrix::from_f32(t, 1, cols * 2, &rng.vec(cols * 2)).unwrap();
        assert!(QMatrix::concat_rows(vec![ma, other]).is_err());
    }
    assert!(QMatrix::concat_rows(vec![]).is_err());
    let a = QMatrix::from_f32(QType::Q8_0, 1, 32, &[1.0; 32]).unwrap();
    let b = QMatrix::from_f32(QType::Q4_0, 1, 32, &[1.0; 32]).unwrap();
    assert!(
        QMatrix::concat_rows(vec![a, b])
            .unwrap_err()
            .to_string()
            .contains("Q4_0")
    );
}

#[test]
fn every_level_matches_scalar() {
    let mut rng = Rng(6);
    let levels = Level::all_available();
    for t in QTYPES {
        for cols in cols_for(t) {
            for n in [1, 2, 3, 5, 17, 64] {
                let rows = if n >= 17 { 37 } else { 53 };
                let m = QMatrix::from_f32(t, rows, cols, &rng.vec(rows * cols)).unwrap();
                let x = rng.vec(n * cols);
                let mut base = vec![0f32; n * rows];
                m.matmul_at(Level::Scalar, &x, n, &mut base).unwrap();
                let (want, mag) = expected(&m, &x, n);
                for &l in &levels {
                    let mut y = vec![f32::NAN; n * rows];
                    m.matmul_at(l, &x, n, &mut y).unwrap();
                    check_close(t, &y, &want, &mag, &format!("{l:?} {rows}x{cols} n={n}"));
                }
            }
        }
    }
}

#[test]
fn unavailable_level_is_an_error() {
    let m = QMatrix::from_f32(QType::F32, 1, 4, &[1.0; 4]).unwrap();
    for l in [Level::Avx2, Level::Avx512] {
        let r = m.matmul_at(l, &[1.0; 4], 1, &mut [0.0]);
        assert_eq!(r.is_ok(), l.available());
    }
    assert_eq!(Level::all_available()[0], Level::Scalar);
    assert!(Level::detect().available());
}

#[test]
fn q8_activation_quantisation_is_the_same_at_every_level() {
    let mut rng = Rng(8);
    let cols = 96;
    let mut x = rng.vec(4 * cols);
    // A block whose scale is exactly 1: quants are x rounded, and the
    // halves must go away from zero as f32::round does.
    for (i, v) in x[..32].iter_mut().enumerate() {
        *v = i as f32 - 15.5;
    }
    x[31] = -127.0;
    // An all-zero block and one of a single tiny value.
    x[32..64].iter_mut().for_each(|v| *v = 0.0);
    x[64..96].iter_mut().for_each(|v| *v = 0.0);
    x[70] = 1e-30;
    for t in [QType::Q8_0, QType::Q4_0] {
        let want = Act::prepare(Level::Scalar, t, &x, 4, cols);
        assert_eq!(
            &want.qs[..31],
            &(0..31)
                .map(|i| {
                    let v = i as f32 - 15.5;
                    v.round() as i8
                })
                .collect::<Vec<_>>()[..]
        );
        for &l in &Level::all_available() {
            let got = Act::prepare(l, t, &x, 4, cols);
            assert_eq!(got.qs, want.qs, "{l:?} {t:?}");
            assert_eq!(got.d, want.d, "{l:?} {t:?}");
            assert_eq!(got.corr, want.corr, "{l:?} {t:?}");
        }
    }
}

#[test]
fn grouped_rows_and_token_runs_at_every_level() {
    // Rows around the 16-row group, tokens around the 8-token tile and the
    // 16-token switch from row bands to token runs, on pools of 1 and 3
    // threads (bands and runs of uneven sizes).
    let mut rng = Rng(9);
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for t in [QType::Q8_0, QType::Q4_0] {
            for rows in [1, 15, 16, 17, 48, 67] {
                let cols = 96;
                let m = QMatrix::from_f32(t, rows, cols, &rng.vec(rows * cols)).unwrap();
                for n in [1, 7, 8, 9, 15, 16, 24, 33] {
                    let x = rng.vec(n * cols);
                    let (want, mag) = expected(&m, &x, n);
                    for &l in &Level::all_available() {
                        let mut y = vec![f32::NAN; n * rows];
                        pool.install(|| m.matmul_at(l, &x, n, &mut y)).unwrap();
                        check_close(
                            t,
                            &y,
                            &want,
                            &mag,
                            &format!("{l:?} {rows}x{cols} n={n} threads={threads}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn concat_rows_of_whole_and_partial_groups() {
    let mut rng = Rng(10);
    for t in [QType::Q8_0, QType::Q4_0] {
        let cols = 64;
        let parts: Vec<Vec<f32>> = [16, 5, 16, 32].iter().map(|&r| rng.vec(r * cols)).collect();
        let mats: Vec<QMatrix> = parts
            .iter()
            .map(|p| QMatrix::from_f32(t, p.len() / cols, cols, p).unwrap())
            .collect();
        let all: Vec<f32> = parts.concat();
        let whole = QMatrix::from_f32(t, 69, cols, &all).unwrap();
        let cat = QMatrix::concat_rows(mats).unwrap();
        assert_eq!(cat.rows(), 69);
        assert_eq!(cat.to_ggml(), whole.to_ggml(), "{t:?}");
        let x = rng.vec(3 * cols);
        let (mut y1, mut y2) = (vec![0f32; 3 * 69], vec![0f32; 3 * 69]);
        cat.matmul(&x, 3, &mut y1).unwrap();
        whole.matmul(&x, 3, &mut y2).unwrap();
        assert_eq!(y1, y2, "{t:?}");
        let mut row = vec![0f32; cols];
        cat.dequantize_row(20, &mut row).unwrap();
        let mut row2 = vec![0f32; cols];
        whole.dequantize_row(20, &mut row2).unwrap();
        assert_eq!(row, row2);
    }
}

#[test]
fn attention_scores_and_weighted_sums() {
    let mut rng = Rng(11);
    for d in [1, 7, 8, 64, 128, 130] {
        for keys in [0, 1, 3, 4, 5, 9, 33] {
            let (stride, off) = (3 * d + 5, d + 2);
            let cache = rng.vec(keys * stride + 1);
            let q = rng.vec(d);
            let mut s = vec![f32::NAN; keys];
            // Exactly as long as the last key needs.
            let end = if keys == 0 {
                0
            } else {
                (keys - 1) * stride + off + d
            };
            scores_f32(&q, &cache[..end], stride, off, 0.5, &mut s).unwrap();
            for j in 0..keys {
                let k = &cache[j * stride + off..][..d];
                let want: f64 = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * 0.5;
                let mag: f64 = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                    .sum();
                assert!(
                    (f64::from(s[j]) - want).abs() <= mag * 1e-6 + 1e-7,
                    "d {d} keys {keys} [{j}]"
                );
            }
            let p = rng.vec(keys);
            let mut out = rng.vec(d);
            let mut want: Vec<f64> = out.iter().map(|&v| f64::from(v)).collect();
            for (j, &pj) in p.iter().enumerate() {
                for c in 0..d {
                    want[c] += f64::from(pj) * f64::from(cache[j * stride + off + c]);
                }
            }
            for &l in &Level::all_available() {
                let mut sl = vec![f32::NAN; keys];
                super::kernels::scores_f32(l, &q, &cache, stride, off, 0.5, &mut sl);
                for j in 0..keys {
                    assert!(
                        (sl[j] - s[j]).abs() <= 1e-5 * (1.0 + s[j].abs()),
                        "{l:?} d {d} [{j}]"
                    );
                }
                let mut ol = out.clone();
                super::kernels::weighted_sum_f32(l, &p, &cache, stride, off, &mut ol);
                for c in 0..d {
                    assert!(
                        (f64::from(ol[c]) - want[c]).abs() <= 1e-4,
                        "{l:?} d {d} keys {keys} [{c}]"
                    );
                }
            }
            weighted_sum_f32(&p, &cache, stride, off, &mut out).unwrap();
            for c in 0..d {
                assert!(
                    (f64::from(out[c]) - want[c]).abs() <= 1e-4,
                    "d {d} keys {keys} [{c}]"
                );
            }
        }
    }
    // A key or value row past the end is an error naming the sizes.
    let e = scores_f32(&[1.0; 4], &[0.0; 10], 4, 3, 1.0, &mut [0.0; 2]).unwrap_err();
    assert!(e.to_string().contains("expected 11"), "{e}");
    assert!(weighted_sum_f32(&[1.0; 2], &[0.0; 10], 4, 3, &mut [0.0; 4]).is_err());
    assert!(weighted_sum_f32(&[], &[], 4, 3, &mut [0.0; 4]).is_ok());
}
