//! [`QMatrix`]: a weight matrix in one of the [`QType`] encodings, built from
//! GGUF bytes or quantised from floats, and its product with activations.
//!
//! Q8_0 and Q4_0 are re-laid at load (scales apart as f32, quants unsigned,
//! Q4_0 nibbles of two blocks sharing bytes) so the SIMD kernels do no
//! per-block unpacking of scales or signs; the ggml bytes are rebuilt exactly
//! by [`QMatrix::to_ggml`]. The other types keep ggml's layout.

use rayon::prelude::*;

use super::QType;
use super::blocks::{self, QK, QK_K};
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
    /// `qs[r*cols + k]` = quant + 128 (unsigned, for `vpdpbusd`);
    /// `d[r*nb + b]` = the block's f16 scale as f32.
    Q8_0 {
        qs: Vec<u8>,
        d: Vec<f32>,
    },
    /// Blocks paired: row r's pair p is 32 bytes at `r*stride + 32*p`; byte j
    /// holds element j of block 2p (quant + 8) in its low nibble and element j
    /// of block 2p+1 in its high nibble (zero past an odd row end).
    Q4_0 {
        qs: Vec<u8>,
        d: Vec<f32>,
        stride: usize,
    },
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
        let (row_bytes, total) = total_bytes(t, rows, cols, &what)?;
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
            QType::Q8_0 => {
                let mut qs = Vec::with_capacity(rows * cols);
                let mut d = Vec::with_capacity(rows * cols / QK);
                for b in bytes.chunks_exact(34) {
                    d.push(blocks::q_d(b));
                    qs.extend(b[2..34].iter().map(|&q| q ^ 0x80));
                }
                Data::Q8_0 { qs, d }
            }
            QType::Q4_0 => {
                let nb = cols / QK;
                let stride = nb.div_ceil(2) * 32;
                let mut qs = vec![0u8; rows * stride];
                let mut d = Vec::with_capacity(rows * nb);
                for (r, row) in bytes.chunks_exact(row_bytes.max(1)).enumerate() {
                    for (b, blk) in row.chunks_exact(18).enumerate() {
                        d.push(blocks::q_d(blk));
                        let pair = &mut qs[r * stride + 32 * (b / 2)..][..32];
                        let shift = 4 * (b % 2);
                        for j in 0..16 {
                            pair[j] |= (blk[2 + j] & 0xF) << shift;
                            pair[j + 16] |= (blk[2 + j] >> 4) << shift;
                        }
                    }
                }
                Data::Q4_0 { qs, d, stride }
            }
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
                (Data::Q8_0 { qs, d }, Data::Q8_0 { qs: q2, d: d2 }) => {
                    qs.extend(q2);
                    d.extend(d2);
                }
                (Data::Q4_0 { qs, d, .. }, Data::Q4_0 { qs: q2, d: d2, .. }) => {
                    qs.extend(q2);
                    d.extend(d2);
                }
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
            Data::Q8_0 { qs, d } | Data::Q4_0 { qs, d, .. } => qs.len() + 4 * d.len(),
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
            Data::Q8_0 { qs, d } => {
                for (q, &s) in qs.chunks_exact(QK).zip(d) {
                    out.extend(blocks::f32_to_f16(s).to_le_bytes());
                    out.extend(q.iter().map(|&v| v ^ 0x80));
                }
            }
            Data::Q4_0 { qs, d, stride } => {
                let nb = self.cols / QK;
                for r in 0..self.rows {
                    for b in 0..nb {
                        out.extend(blocks::f32_to_f16(d[r * nb + b]).to_le_bytes());
                        let pair = &qs[r * stride + 32 * (b / 2)..][..32];
                        let shift = 4 * (b % 2);
                        for j in 0..16 {
                            out.push(((pair[j] >> shift) & 0xF) | (((pair[j + 16] >> shift) & 0xF) << 4));
                        }
                    }
                }
            }
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
            Data::Q8_0 { qs, d } => {
                let nb = c / QK;
                for (b, o) in out.chunks_exact_mut(QK).enumerate() {
                    let s = d[r * nb + b];
                    let q = &qs[r * c + b * QK..][..QK];
                    o.iter_mut()
                        .zip(q)
                        .for_each(|(o, &q)| *o = f32::from((q ^ 0x80) as i8) * s);
                }
            }
            Data::Q4_0 { qs, d, stride } => {
                let nb = c / QK;
                for (b, o) in out.chunks_exact_mut(QK).enumerate() {
                    let s = d[r * nb + b];
                    let pair = &qs[r * stride + 32 * (b / 2)..][..32];
                    let shift = 4 * (b % 2);
                    for (o, &p) in o.iter_mut().zip(pair) {
                        *o = f32::from(((p >> shift) & 0xF) as i8 - 8) * s;
                    }
                }
            }
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
        let act = Act::prepare(self.qtype, x, n, self.cols);
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

/// `sum a[i]*b[i]` over the shorter length, SIMD where the CPU has it
/// (attention scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    kernels::dot_f32(Level::detect(), a, b)
}

/// `y[i] += a * x[i]` over the shorter length (attention's value sum).
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    kernels::axpy_f32(Level::detect(), a, x, y)
}
