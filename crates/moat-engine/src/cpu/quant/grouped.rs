//! The load-time layout of Q8_0 and Q4_0 weights: rows in groups of 16,
//! interleaved so that one 512-bit `vpdpbusd` with a broadcast activation
//! word advances the dots of 16 rows at once (each 32-bit lane is one row).
//!
//! Why: with one row per vector, every 32-element block of every row needs
//! its own convert, scale and horizontal sum, three float ops per 32 MACs.
//! With rows in lanes a block of 16 rows costs 8 `vpdpbusd` (512 MACs), one
//! convert, one multiply and one FMA, and the result of 16 rows is stored as
//! one vector. This is the idea of llama.cpp's "repacked" Q4_0_8x8 / Q8_0
//! layouts, arranged for our kernels.
//!
//! Group g, block b is a tile of 32 columns x 16 rows:
//! - Q8_0: 512 bytes; byte `64*k + 4*l + e` is row `16g+l`'s element
//!   `4k+e` of the block, stored as quant + 128 (unsigned for `vpdpbusd`);
//! - Q4_0: 256 bytes; byte `64*(k%4) + 4*l + e` holds element `4k+e` in its
//!   low nibble for k < 4 and in its high nibble for k >= 4, as quant + 8
//!   (ggml's own nibble values).
//!
//! Scales stay f16 (ggml's bits, so [`super::QMatrix::to_ggml`] is exact and
//! the weight stream is no larger than ggml's), 16 per group-block, row
//! order. Rows past the end of the last group are zero quants, zero scale.

use super::blocks::{self, QK};

/// Rows per group: the lanes of a 512-bit vector of i32.
pub(crate) const G: usize = 16;

/// Q8_0 or Q4_0 weights in the grouped layout.
#[derive(Clone, Debug)]
pub(crate) struct Grouped {
    pub q4: bool,
    pub rows: usize,
    /// Blocks per row.
    pub nb: usize,
    pub qs: Vec<u8>,
    /// f16 bits, `(g*nb + b)*16 + l`.
    pub d: Vec<u16>,
}

impl Grouped {
    /// Bytes of one group-block tile of quants.
    pub fn tile_bytes(q4: bool) -> usize {
        if q4 { 256 } else { 512 }
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(G)
    }

    /// Lay out ggml blocks (`rows` rows of `nb` blocks, 34 or 18 bytes each).
    pub fn from_ggml(q4: bool, rows: usize, nb: usize, bytes: &[u8]) -> Grouped {
        let groups = rows.div_ceil(G);
        let tb = Self::tile_bytes(q4);
        let pad = if q4 { 0x88 } else { 0x80 };
        let mut qs = vec![pad; groups * nb * tb];
        let mut d = vec![0u16; groups * nb * G];
        let bb = if q4 { 18 } else { 34 };
        for r in 0..rows {
            let (g, l) = (r / G, r % G);
            for b in 0..nb {
                let blk = &bytes[(r * nb + b) * bb..][..bb];
                d[(g * nb + b) * G + l] = u16::from_le_bytes([blk[0], blk[1]]);
                let tile = &mut qs[(g * nb + b) * tb..][..tb];
                // Words of 4 quants move whole. Q4_0: ggml's byte j holds
                // elements j and j + 16, which is exactly our byte for
                // element j (its high nibble is element 4(k+4)+e = j + 16),
                // so the bytes copy as they are.
                let words = if q4 { 4 } else { 8 };
                for k in 0..words {
                    let src = &blk[2 + 4 * k..][..4];
                    let dst = &mut tile[64 * k + 4 * l..][..4];
                    if q4 {
                        dst.copy_from_slice(src);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(o, &v)| *o = v ^ 0x80);
                    }
                }
            }
        }
        Grouped { q4, rows, nb, qs, d }
    }

    /// Element `i` (0..32) of row `r`'s block `b` as the signed quant.
    #[inline]
    pub fn quant(&self, r: usize, b: usize, i: usize) -> i32 {
        let (g, l) = (r / G, r % G);
        let (k, e) = (i / 4, i % 4);
        let tile = (g * self.nb + b) * Self::tile_bytes(self.q4);
        if self.q4 {
            let byte = self.qs[tile + 64 * (k % 4) + 4 * l + e];
            i32::from((byte >> (4 * (k / 4))) & 0xF) - 8
        } else {
            i32::from((self.qs[tile + 64 * k + 4 * l + e] ^ 0x80) as i8)
        }
    }

    /// Row `r`'s block `b` scale as f16 bits.
    #[inline]
    pub fn scale_bits(&self, r: usize, b: usize) -> u16 {
        self.d[((r / G) * self.nb + b) * G + r % G]
    }

    pub fn scale(&self, r: usize, b: usize) -> f32 {
        blocks::f16_to_f32(self.scale_bits(r, b))
    }

    /// The ggml bytes of every row.
    pub fn to_ggml(&self, out: &mut Vec<u8>) {
        for r in 0..self.rows {
            for b in 0..self.nb {
                out.extend(self.scale_bits(r, b).to_le_bytes());
                if self.q4 {
                    for j in 0..16 {
                        let lo = (self.quant(r, b, j) + 8) as u8;
                        let hi = (self.quant(r, b, j + 16) + 8) as u8;
                        out.push(lo | (hi << 4));
                    }
                } else {
                    out.extend((0..QK).map(|i| self.quant(r, b, i) as i8 as u8));
                }
            }
        }
    }

    /// Append `o`'s rows below ours (same type and width). Exact whole
    /// groups are moved as they are; otherwise the rows are re-laid.
    pub fn append(&mut self, o: Grouped) {
        if self.rows.is_multiple_of(G) {
            self.qs.extend(o.qs);
            self.d.extend(o.d);
            self.rows += o.rows;
        } else {
            let mut bytes = Vec::new();
            self.to_ggml(&mut bytes);
            o.to_ggml(&mut bytes);
            *self = Grouped::from_ggml(self.q4, self.rows + o.rows, self.nb, &bytes);
        }
    }

    /// Row `r` as floats.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let s = self.scale(r, b);
            for (i, v) in o.iter_mut().enumerate() {
                *v = self.quant(r, b, i) as f32 * s;
            }
        }
    }

    /// Row `r` times a Q8_0 token (`xq` its quants, `xd` its block scales):
    /// each block's integer dot exact, then scaled, in block order (the
    /// order the SIMD kernels accumulate each lane in).
    pub fn dot(&self, r: usize, xq: &[i8], xd: &[f32]) -> f32 {
        let mut acc = 0.0f32;
        for b in 0..self.nb {
            let s: i32 = (0..QK)
                .map(|i| self.quant(r, b, i) * i32::from(xq[b * QK + i]))
                .sum();
            acc += s as f32 * (self.scale(r, b) * xd[b]);
        }
        acc
    }
}
