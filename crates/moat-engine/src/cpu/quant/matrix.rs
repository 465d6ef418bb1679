//! [`QMatrix`]: a weight matrix in one of the [`QType`] encodings, built from
//! GGUF bytes or quantised from floats, and its product with activations.
//!
//! Q8_0 and Q4_0 are re-laid at load into groups of 16 interleaved rows
//! ([`super::grouped`]) so the SIMD kernels compute 16 rows per vector; the
//! ggml bytes are rebuilt exactly by [`QMatrix::to_ggml`]. The other types
//! keep ggml's layout.

use rayon::prelude::*;

use super::QType;
use super::blocks::{self, QK, QK_K};
use super::grouped::{G, Grouped};
use super::kernels::{self, Act, Level};

/// Bad input to a quant routine. Every message names the type and sizes.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{qtype}: {cols} columns is not a whole number of {block}-element blocks")]
    Cols {
        qtype: &'static str,
        cols: usize,
        block: usize,
    },
    #[error("{what}: expected {expected} {unit}, got {got}")]
    Size {
        what: String,
        expected: usize,
        got: usize,
        unit: &'static str,
    },
    #[error("{what}: {rows} x {cols} overflows memory sizes")]
    TooLarge { what: String, rows: usize, cols: usize },
    #[error("concat_rows: {0}")]
    Concat(String),
    #[error("kernel level {0:?} is not available on this CPU")]
    Unsupported(Level),
}

/// The stored form of a matrix's weights, row after row.
#[derive(Clone, Debug)]
pub(crate) enum Data {
    F32(Vec<f32>),
    /// IEEE half bits.
    F16(Vec<u16>),
    /// bfloat16 bits.
    Bf16(Vec<u16>),
    /// Q8_0 / Q4_0 in groups of 16 interleaved rows (see `grouped`).
    Q8_0(Grouped),
    Q4_0(Grouped),
    /// ggml bytes as they came (Q4_K, Q6_K).
    Raw(Vec<u8>),
}

/// A weight matrix W of `rows` x `cols`; row r holds the weights producing
/// output r. Send + Sync: shared read-only by every worker thread.
#[derive(Clone, Debug)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    pub(crate) data: Data,
}

fn total_bytes(t: QType, rows: usize, cols: usize, what: &str) -> Result<(usize, usize), QuantError> {
    let row = t.row_bytes(cols).ok_or(QuantError::Cols {
        qtype: t.name(),
        cols,
        block: t.block_elems(),
    })?;
    let total = row.checked_mul(rows).ok_or_else(|| QuantError::TooLarge {
        what: what.to_string(),
        rows,
        cols,
    })?;
    Ok((row, total))
}

impl QMatrix {
    /// From ggml-encoded bytes (a GGUF tensor's data): `rows` rows of
    /// `cols` elements, `bytes.len()` must be `rows * row_bytes(cols)`.
    pub fn from_ggml(t: QType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, QuantError> {
        let what = format!("{} matrix {rows} x {cols}", t.name());
        let (_, total) = total_bytes(t, rows, cols, &what)?;
        if bytes.len() != total {
            return Err(QuantError::Size {
                what,
                expected: total,
                got: bytes.len(),
                unit: "bytes",
            });
        }
        let u16s = || {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()
        };
        let data = match t {
            QType::F32 => Data::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            QType::F16 => Data::F16(u16s()),
            QType::BF16 => Data::Bf16(u16s()),
            QType::Q8_0 => Data::Q8_0(Grouped::from_ggml(false, rows, cols / QK, bytes)),
            QType::Q4_0 => Data::Q4_0(Grouped::from_ggml(true, rows, cols / QK, bytes)),
            QType::Q4K | QType::Q6K => Data::Raw(bytes.to_vec()),
        };
        Ok(Self {
            qtype: t,
            rows,
            cols,
            data,
        })
    }

    /// Quantise `rows` x `cols` floats (row-major) with llama.cpp's reference
    /// quantisers, so the bytes match what llama.cpp would write.
    pub fn from_f32(t: QType, rows: usize, cols: usize, data: &[f32]) -> Result<Self, QuantError> {
        let what = format!("{} matrix {rows} x {cols} from f32", t.name());
        let (_, total) = total_bytes(t, rows, cols, &what)?;
        let elems = rows.checked_mul(cols).ok_or_else(|| QuantError::TooLarge {
            what: what.clone(),
            rows,
            cols,
        })?;
        if data.len() != elems {
            return Err(QuantError::Size {
                what,
                expected: elems,
                got: data.len(),
                unit: "floats",
            });
        }
        let mut out = vec![0u8; total];
        let be = t.block_elems();
        let bb = t.block_bytes();
        for (x, o) in data.chunks_exact(be).zip(out.chunks_exact_mut(bb)) {
            match t {
                QType::F32 => o.copy_from_slice(&x[0].to_le_bytes()),
                QType::F16 => o.copy_from_slice(&blocks::f32_to_f16(x[0]).to_le_bytes()),
                QType::BF16 => o.copy_from_slice(&blocks::f32_to_bf16(x[0]).to_le_bytes()),
                QType::Q8_0 | QType::Q4_0 => {
                    let mut blk = [0f32; QK];
                    blk.copy_from_slice(x);
                    if t == QType::Q8_0 {
                        blocks::quantize_q8_0(&blk, o);
                    } else {
                        blocks::quantize_q4_0(&blk, o);
                    }
                }
                QType::Q4K => blocks::quantize_q4_k(x, o),
                QType::Q6K => blocks::quantize_q6_k(x, o),
            }
        }
        Self::from_ggml(t, rows, cols, &out)
    }

    /// Stack matrices of one type and width (fused QKV, gate+up): rows of the
    /// first, then of the second, and so on.
    pub fn concat_rows(parts: Vec<QMatrix>) -> Result<Self, QuantError> {
        let mut it = parts.into_iter();
        let Some(mut acc) = it.next() else {
            return Err(QuantError::Concat("no matrices given".into()));
        };
        for (i, p) in it.enumerate() {
            if p.qtype != acc.qtype || p.cols != acc.cols {
                return Err(QuantError::Concat(format!(
                    "part {} is {} x {} cols, part 0 is {} x {} cols",
                    i + 1,
                    p.qtype.name(),
                    p.cols,
                    acc.qtype.name(),
                    acc.cols
                )));
            }
            match (&mut acc.data, p.data) {
                (Data::F32(a), Data::F32(b)) => a.extend(b),
                (Data::F16(a), Data::F16(b)) | (Data::Bf16(a), Data::Bf16(b)) => a.extend(b),
                (Data::Q8_0(a), Data::Q8_0(b)) | (Data::Q4_0(a), Data::Q4_0(b)) => a.append(b),
                (Data::Raw(a), Data::Raw(b)) => a.extend(b),
                _ => {
                    return Err(QuantError::Concat(format!(
                        "part {} has a different storage",
                        i + 1
                    )));
                }
            }
            acc.rows += p.rows;
        }
        Ok(acc)
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight memory held.
    pub fn size_bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => 4 * v.len(),
            Data::F16(v) | Data::Bf16(v) => 2 * v.len(),
            Data::Q8_0(g) | Data::Q4_0(g) => g.qs.len() + 2 * g.d.len(),
            Data::Raw(v) => v.len(),
        }
    }

    /// The ggml encoding, byte for byte what [`QMatrix::from_ggml`] was given
    /// (or what llama.cpp would have written for [`QMatrix::from_f32`]).
    pub fn to_ggml(&self) -> Vec<u8> {
        let rb = self.qtype.row_bytes(self.cols).unwrap_or(0);
        let mut out = Vec::with_capacity(rb * self.rows);
        match &self.data {
            Data::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            Data::F16(v) | Data::Bf16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            Data::Q8_0(g) | Data::Q4_0(g) => g.to_ggml(&mut out),
            Data::Raw(v) => out.extend_from_slice(v),
        }
        out
    }

    /// Row `r` as floats into `out` (`cols` long): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let what = || {
            format!(
                "dequantize_row of {} matrix {} x {}",
                self.qtype.name(),
                self.rows,
                self.cols
            )
        };
        if r >= self.rows {
            return Err(QuantError::Size {
                what: what(),
                expected: self.rows,
                got: r,
                unit: "rows (index)",
            });
        }
        if out.len() != self.cols {
            return Err(QuantError::Size {
                what: what(),
                expected: self.cols,
                got: out.len(),
                unit: "floats",
            });
        }
        let c = self.cols;
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            Data::F16(v) => out
                .iter_mut()
                .zip(&v[r * c..])
                .for_each(|(o, &h)| *o = blocks::f16_to_f32(h)),
            Data::Bf16(v) => out
                .iter_mut()
                .zip(&v[r * c..])
                .for_each(|(o, &h)| *o = blocks::bf16_to_f32(h)),
            Data::Q8_0(g) | Data::Q4_0(g) => g.dequantize_row(r, out),
            Data::Raw(v) => {
                let rb = self.qtype.row_bytes(c).unwrap_or(0);
                let row = &v[r * rb..(r + 1) * rb];
                let bb = self.qtype.block_bytes();
                for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK_K)) {
                    match self.qtype {
                        QType::Q4K => blocks::dequantize_q4_k(blk, o),
                        _ => blocks::dequantize_q6_k(blk, o),
                    }
                }
            }
        }
        Ok(())
    }

    /// `y[i*rows + j] = sum_k x[i*cols + k] * W[j][k]` for the `n` tokens
    /// (rows of `x`). Activations are quantised as llama.cpp does (Q8_0 for
    /// Q8_0/Q4_0, Q8_K for K-quants, rounded to F16/BF16 for those, F32 as
    /// is). Runs on the current rayon pool with the fastest kernels the CPU
    /// has.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), QuantError> {
        self.matmul_at(Level::detect(), x, n, y)
    }

    /// [`QMatrix::matmul`] with a chosen kernel level (tests and benches
    /// compare levels); a level this CPU lacks is an error.
    pub fn matmul_at(&self, level: Level, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), QuantError> {
        if !level.available() {
            return Err(QuantError::Unsupported(level));
        }
        let what = || {
            format!(
                "matmul of {} matrix {} x {} by {n} tokens",
                self.qtype.name(),
                self.rows,
                self.cols
            )
        };
        let (xn, yn) = match (n.checked_mul(self.cols), n.checked_mul(self.rows)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(QuantError::TooLarge {
                    what: what(),
                    rows: self.rows,
                    cols: self.cols,
                });
            }
        };
        if x.len() != xn {
            return Err(QuantError::Size {
                what: what() + " (x)",
                expected: xn,
                got: x.len(),
                unit: "floats",
            });
        }
        if y.len() != yn {
            return Err(QuantError::Size {
                what: what() + " (y)",
                expected: yn,
                got: y.len(),
                unit: "floats",
            });
        }
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        let act = Act::prepare(level, self.qtype, x, n, self.cols);
        if let Data::Q8_0(g) | Data::Q4_0(g) = &self.data {
            grouped_matmul(level, g, &act, n, y);
            return Ok(());
        }
        // Row chunks, a few per thread so an uneven split evens out, each a
        // whole number of row tiles; never one task per row.
        let tasks = rayon::current_num_threads().max(1) * 4;
        let chunk = self.rows.div_ceil(tasks).next_multiple_of(16).max(16);
        if n == 1 {
            y.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, ys)| kernels::rows(level, self, &act, i * chunk, ys));
        } else {
            // Kernels write [row][token]; y is [token][row].
            let mut t = vec![0f32; yn];
            t.par_chunks_mut(chunk * n)
                .enumerate()
                .for_each(|(i, ts)| kernels::rows(level, self, &act, i * chunk, ts));
            for (r, tr) in t.chunks_exact(n).enumerate() {
                for (c, &v) in tr.iter().enumerate() {
                    y[c * self.rows + r] = v;
                }
            }
        }
        Ok(())
    }
}

/// Grouped Q8_0/Q4_0 weights times `n` tokens into `y` (`[token][row]`).
///
/// Few tokens (decode): each task streams a contiguous band of row groups
/// (weights are read once, and the threads' streams do not interleave).
/// Many tokens (a prompt): each task takes a run of tokens and every row
/// group, so each task writes whole `y` rows; a group's weights (16 x cols
/// bytes) stay in L2 while the task's tokens pass over them.
fn grouped_matmul(level: Level, g: &Grouped, act: &Act, n: usize, y: &mut [f32]) {
    let threads = rayon::current_num_threads().max(1);
    let rows = g.rows;
    let groups = g.groups();
    if n >= 16 {
        // A few runs per thread so a busy core does not hold up the call;
        // runs are multiples of 8 tokens (the kernel's tile).
        let run = n.div_ceil(threads * 4).next_multiple_of(8);
        y.par_chunks_mut(run * rows).enumerate().for_each(|(i, ys)| {
            let t0 = i * run;
            kernels::grouped_range(level, g, act, 0..rows, t0..t0 + ys.len() / rows, ys, rows);
        });
        return;
    }
    let tasks = (threads * 2).min(groups).max(1);
    let band = groups.div_ceil(tasks) * G;
    if n == 1 {
        y.par_chunks_mut(band).enumerate().for_each(|(i, ys)| {
            let r0 = i * band;
            let len = ys.len();
            kernels::grouped_range(level, g, act, r0..r0 + len, 0..1, ys, len);
        });
        return;
    }
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(band))
        .into_par_iter()
        .map(|i| {
            let r0 = i * band;
            let len = band.min(rows - r0);
            let mut t = vec![0f32; n * len];
            kernels::grouped_range(level, g, act, r0..r0 + len, 0..n, &mut t, len);
            t
        })
        .collect();
    for (i, t) in parts.iter().enumerate() {
        let len = t.len() / n;
        for (j, tj) in t.chunks_exact(len.max(1)).enumerate() {
            y[j * rows + i * band..][..len].copy_from_slice(tj);
        }
    }
}

/// Whether rows `0..n` of width `w` at `j*stride + off` lie within `len`.
fn rows_fit(n: usize, w: usize, stride: usize, off: usize, len: usize) -> bool {
    n == 0
        || (n - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(off))
            .and_then(|v| v.checked_add(w))
            .is_some_and(|end| end <= len)
}

/// Attention scores of one query against `out.len()` cached keys:
/// `out[j] = scale * (q . keys[j*stride + off..][..q.len()])` (keys of one
/// KV head inside rows of `stride` floats). One call per (token, head)
/// instead of one per key: the query stays in registers across four keys
/// at a time.
pub fn scores_f32(
    q: &[f32],
    keys: &[f32],
    stride: usize,
    off: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), QuantError> {
    if !rows_fit(out.len(), q.len(), stride, off, keys.len()) {
        return Err(QuantError::Size {
            what: format!(
                "attention scores: {} keys of {} at stride {stride} offset {off}",
                out.len(),
                q.len()
            ),
            expected: out.len().saturating_sub(1) * stride + off + q.len(),
            got: keys.len(),
            unit: "floats",
        });
    }
    kernels::scores_f32(Level::detect(), q, keys, stride, off, scale, out);
    Ok(())
}

/// Attention's weighted sum of values: `out += sum_j p[j] *
/// values[j*stride + off..][..out.len()]`. One call per (token, head): the
/// output stays in registers while every value row passes.
pub fn weighted_sum_f32(
    p: &[f32],
    values: &[f32],
    stride: usize,
    off: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    if !rows_fit(p.len(), out.len(), stride, off, values.len()) {
        return Err(QuantError::Size {
            what: format!(
                "attention values: {} rows of {} at stride {stride} offset {off}",
                p.len(),
                out.len()
            ),
            expected: p.len().saturating_sub(1) * stride + off + out.len(),
            got: values.len(),
            unit: "floats",
        });
    }
    kernels::weighted_sum_f32(Level::detect(), p, values, stride, off, out);
    Ok(())
}
