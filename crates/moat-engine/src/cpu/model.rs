//! The decoder-only transformer that DeepSeek-R1's distills use: Qwen2 and
//! Llama (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP), stepped
//! over a batch of sequences that each bring their own [`KvCache`].
//!
//! A step concatenates every sequence's new tokens into one activation
//! matrix so each weight matrix is read once per step, whatever the batch:
//! that is what makes eight streams cheaper than eight times one. Attention
//! is the only per-sequence part. Only each sequence's last token goes
//! through the (large) output head.
//!
//! Differences from candle-transformers 0.11, on purpose:
//! - Qwen2's sliding window applies only when `use_sliding_window` is true,
//!   and then only from `max_window_layers` on, as in transformers (candle
//!   masked every prefill with it);
//! - Llama-3.1 RoPE scaling (`rope_freqs` in GGUF, `rope_scaling` of type
//!   `llama3` in config.json) divides each frequency by its factor;
//! - the token embedding stays in its file encoding and rows are decoded on
//!   lookup (candle's quantised Qwen2 expanded it to F32: 0.9 GB on 1.5B).

use super::quant::{QMatrix, scores_f32, weighted_sum_f32};
use super::{BatchModel, KvCache, SeqInput, check_batch};
use crate::error::EngineError;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Llama,
}

/// How RoPE pairs a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i with i + d/2 (transformers' `rotate_half`; ggml's NEOX).
    Halves,
    /// Dimension 2i with 2i + 1 (ggml's default; GGUF Llama weights are
    /// permuted by the converter to match).
    Adjacent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Per frequency pair, a divisor (Llama-3.1 scaling); empty for none.
    pub rope_freq_factors: Vec<f32>,
    pub context: usize,
    /// `(window, first layer it applies to)`.
    pub sliding_window: Option<(usize, usize)>,
}

impl Config {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The shape checks the forward pass relies on; the loader calls it
    /// before any weight is read.
    pub fn check(&self) -> Result<(), String> {
        let nonzero = [
            ("hidden size", self.hidden),
            ("layer count", self.layers),
            ("attention heads", self.heads),
            ("KV heads", self.kv_heads),
            ("head size", self.head_dim),
            ("intermediate size", self.intermediate),
            ("vocabulary size", self.vocab),
            ("context length", self.context),
        ];
        if let Some((what, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{what} is 0"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head size {} is odd; RoPE needs pairs", self.head_dim));
        }
        if !self.rope_freq_factors.is_empty() && self.rope_freq_factors.len() != self.head_dim / 2 {
            return Err(format!(
                "rope frequency factors: {} given, {} expected (head size / 2)",
                self.rope_freq_factors.len(),
                self.head_dim / 2
            ));
        }
        let usable = self.rms_eps.is_finite()
            && self.rms_eps >= 0.0
            && self.rope_theta.is_finite()
            && self.rope_theta > 0.0;
        if !usable {
            return Err(format!(
                "rms epsilon {} / rope theta {} are not usable",
                self.rms_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, scaling included.
    fn inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = (self.rope_theta as f64).powf(-2.0 * i as f64 / self.head_dim as f64);
                let factor = self.rope_freq_factors.get(i).copied().unwrap_or(1.0) as f64;
                (f / factor) as f32
            })
            .collect()
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub q: QMatrix,
    pub k: QMatrix,
    pub v: QMatrix,
    /// Qwen2 has biases on q, k and v.
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub o: QMatrix,
    pub ffn_norm: Vec<f32>,
    pub gate: QMatrix,
    pub up: QMatrix,
    pub down: QMatrix,
}

/// Matrices applied to the same input: fused into one matrix when their
/// encodings match (one activation quantisation and one parallel dispatch
/// instead of three), else applied apart. Q4_K_M files mix types (V and
/// down are Q6_K there), hence both.
enum Proj {
    Fused { m: QMatrix, rows: Vec<usize> },
    Apart(Vec<QMatrix>),
}

impl Proj {
    fn new(parts: Vec<QMatrix>) -> Result<Self, String> {
        let same = parts.windows(2).all(|w| w[0].qtype() == w[1].qtype());
        if !same {
            return Ok(Proj::Apart(parts));
        }
        let rows = parts.iter().map(QMatrix::rows).collect();
        let m = QMatrix::concat_rows(parts).map_err(|e| format!("fusing projections: {e}"))?;
        Ok(Proj::Fused { m, rows })
    }

    fn size_bytes(&self) -> usize {
        match self {
            Proj::Fused { m, .. } => m.size_bytes(),
            Proj::Apart(v) => v.iter().map(QMatrix::size_bytes).sum(),
        }
    }

    /// `outs[i]` (n × rows of part i) = part i applied to `x` (n rows).
    fn run(&self, x: &[f32], n: usize, outs: &mut [&mut Vec<f32>]) -> Result<(), EngineError> {
        match self {
            Proj::Apart(parts) => {
                for (m, out) in parts.iter().zip(outs.iter_mut()) {
                    mm(m, x, n, out)?;
                }
            }
            Proj::Fused { m, rows } => {
                let total = m.rows();
                let mut tmp = vec![0f32; n * total];
                mm(m, x, n, &mut tmp)?;
                let mut off = 0;
                for (&r, out) in rows.iter().zip(outs.iter_mut()) {
                    for (t, dst) in out.chunks_exact_mut(r).enumerate().take(n) {
                        dst.copy_from_slice(&tmp[t * total + off..t * total + off + r]);
                    }
                    off += r;
                }
            }
        }
        Ok(())
    }
}

/// A layer as the forward pass holds it.
struct Block {
    attn_norm: Vec<f32>,
    qkv: Proj,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    o: QMatrix,
    ffn_norm: Vec<f32>,
    gate_up: Proj,
    down: QMatrix,
}

impl Block {
    fn new(l: Layer) -> Result<Self, String> {
        Ok(Block {
            attn_norm: l.attn_norm,
            qkv: Proj::new(vec![l.q, l.k, l.v])?,
            q_bias: l.q_bias,
            k_bias: l.k_bias,
            v_bias: l.v_bias,
            o: l.o,
            ffn_norm: l.ffn_norm,
            gate_up: Proj::new(vec![l.gate, l.up])?,
            down: l.down,
        })
    }
}

pub struct Model {
    pub cfg: Config,
    embed: QMatrix,
    layers: Vec<Block>,
    norm: Vec<f32>,
    /// `None`: the head is the embedding (tied).
    head: Option<QMatrix>,
    inv_freq: Vec<f32>,
}

fn shape_err(what: &str, want: (usize, usize), got: &QMatrix) -> String {
    format!(
        "{what}: shape {}x{} where {}x{} was expected",
        got.rows(),
        got.cols(),
        want.0,
        want.1
    )
}

impl Model {
    /// Assemble and check shapes; every mismatch names the tensor.
    pub fn new(
        cfg: Config,
        embed: QMatrix,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        head: Option<QMatrix>,
    ) -> Result<Self, String> {
        cfg.check()?;
        let (h, q, kv, i, voc) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate, cfg.vocab);
        let mat = |what: String, m: &QMatrix, want: (usize, usize)| {
            if (m.rows(), m.cols()) == want {
                Ok(())
            } else {
                Err(shape_err(&what, want, m))
            }
        };
        let vec = |what: String, v: &[f32], want: usize| {
            if v.len() == want {
                Ok(())
            } else {
                Err(format!("{what}: {} values where {want} were expected", v.len()))
            }
        };
        mat("token embedding".into(), &embed, (voc, h))?;
        if let Some(head) = &head {
            mat("output head".into(), head, (voc, h))?;
        }
        vec("final norm".into(), &norm, h)?;
        if layers.len() != cfg.layers {
            return Err(format!("{} layers found, {} expected", layers.len(), cfg.layers));
        }
        for (n, l) in layers.iter().enumerate() {
            vec(format!("layer {n} attention norm"), &l.attn_norm, h)?;
            vec(format!("layer {n} MLP norm"), &l.ffn_norm, h)?;
            mat(format!("layer {n} q"), &l.q, (q, h))?;
            mat(format!("layer {n} k"), &l.k, (kv, h))?;
            mat(format!("layer {n} v"), &l.v, (kv, h))?;
            mat(format!("layer {n} o"), &l.o, (h, q))?;
            mat(format!("layer {n} gate"), &l.gate, (i, h))?;
            mat(format!("layer {n} up"), &l.up, (i, h))?;
            mat(format!("layer {n} down"), &l.down, (h, i))?;
            for (what, b, want) in [("q", &l.q_bias, q), ("k", &l.k_bias, kv), ("v", &l.v_bias, kv)] {
                if let Some(b) = b {
                    vec(format!("layer {n} {what} bias"), b, want)?;
                }
            }
        }
        let inv_freq = cfg.inv_freq();
        let layers = layers
            .into_iter()
            .map(Block::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            head,
            inv_freq,
        })
    }

    fn head(&self) -> &QMatrix {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    fn run(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = &self.cfg;
        let (h, qd, kvd, hd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        // Token t of the step: which sequence, at which position.
        let mut where_: Vec<(usize, usize)> = Vec::new();
        for (s, seq) in batch.iter().enumerate() {
            let start = seq.cache.len();
            where_.extend((0..seq.tokens.len()).map(|i| (s, start + i)));
        }
        let n = where_.len();
        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();

        let mut x = vec![0f32; n * h];
        x.par_chunks_mut(h)
            .zip(tokens.par_iter())
            .try_for_each(|(row, &t)| self.embed.dequantize_row(t as usize, row))
            .map_err(|e| EngineError::Inference(format!("embedding: {e}")))?;

        // cos/sin per token and frequency pair, shared by every layer.
        let half = hd / 2;
        let mut rope = vec![(0f32, 0f32); n * half];
        for (t, &(_, pos)) in where_.iter().enumerate() {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos as f32 * f).sin_cos();
                rope[t * half + i] = (c, s);
            }
        }

        let mut xn = vec![0f32; n * h];
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * h];
        let mut gate = vec![0f32; n * cfg.intermediate];
        let mut up = vec![0f32; n * cfg.intermediate];
        let scale = 1.0 / (hd as f32).sqrt();
        let group = cfg.heads / cfg.kv_heads;

        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, cfg.rms_eps, &mut xn);
            layer.qkv.run(&xn, n, &mut [&mut q, &mut k, &mut v])?;
            for (buf, bias) in [
                (&mut q, &layer.q_bias),
                (&mut k, &layer.k_bias),
                (&mut v, &layer.v_bias),
            ] {
                if let Some(b) = bias {
                    buf.par_chunks_mut(b.len()).for_each(|row| {
                        row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    });
                }
            }
            let rope_rows = |buf: &mut [f32], width: usize| {
                buf.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
                    let cs = &rope[t * half..(t + 1) * half];
                    for head in row.chunks_exact_mut(hd) {
                        apply_rope(head, cs, cfg.rope_style);
                    }
                });
            };
            rope_rows(&mut q, qd);
            rope_rows(&mut k, kvd);

            // Append this layer's keys and values to each sequence's cache.
            let mut t0 = 0;
            for seq in batch.iter_mut() {
                let m = seq.tokens.len();
                seq.cache.k[li].extend_from_slice(&k[t0 * kvd..(t0 + m) * kvd]);
                seq.cache.v[li].extend_from_slice(&v[t0 * kvd..(t0 + m) * kvd]);
                t0 += m;
            }
            let caches: Vec<(&[f32], &[f32])> = batch
                .iter()
                .map(|s| (s.cache.k[li].as_slice(), s.cache.v[li].as_slice()))
                .collect();
            let window = cfg.sliding_window.filter(|&(_, from)| li >= from).map(|(w, _)| w);

            // One task per (token, head): scores over the cache, softmax,
            // weighted sum of values.
            att.par_chunks_mut(hd)
                .enumerate()
                .try_for_each(|(idx, out)| {
                    let (t, head) = (idx / cfg.heads, idx % cfg.heads);
                    let (s, pos) = where_[t];
                    let (ks, vs) = caches[s];
                    let kvh = head / group;
                    let qh = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let mut scores = vec![0f32; pos + 1 - first];
                    scores_f32(qh, &ks[first * kvd..], kvd, kvh * hd, scale, &mut scores)?;
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    scores.iter_mut().for_each(|s| *s /= sum);
                    out.fill(0.0);
                    weighted_sum_f32(&scores, &vs[first * kvd..], kvd, kvh * hd, out)
                })
                .map_err(|e| EngineError::Inference(format!("attention: {e}")))?;
            mm(&layer.o, &att, n, &mut proj)?;
            add_into(&mut x, &proj);

            rms_norm_rows(&x, &layer.ffn_norm, cfg.rms_eps, &mut xn);
            layer.gate_up.run(&xn, n, &mut [&mut gate, &mut up])?;
            gate.par_iter_mut().zip(up.par_iter()).for_each(|(g, u)| {
                *g = *g / (1.0 + (-*g).exp()) * u;
            });
            mm(&layer.down, &gate, n, &mut proj)?;
            add_into(&mut x, &proj);
        }
        for seq in batch.iter_mut() {
            let m = seq.tokens.len();
            seq.cache.advance(m);
        }

        // The head runs for each sequence's last token only.
        let mut last = Vec::with_capacity(batch.len() * h);
        let mut t0 = 0;
        for seq in batch.iter() {
            t0 += seq.tokens.len();
            last.extend_from_slice(&x[(t0 - 1) * h..t0 * h]);
        }
        let b = batch.len();
        let mut lastn = vec![0f32; b * h];
        rms_norm_rows(&last, &self.norm, cfg.rms_eps, &mut lastn);
        let mut logits = vec![0f32; b * cfg.vocab];
        mm(self.head(), &lastn, b, &mut logits)?;
        Ok(logits.chunks_exact(cfg.vocab).map(<[f32]>::to_vec).collect())
    }
}

fn mm(w: &QMatrix, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), EngineError> {
    w.matmul(x, n, y)
        .map_err(|e| EngineError::Inference(format!("matmul: {e}")))
}

fn add_into(x: &mut [f32], d: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(d.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// `out[r] = x[r] / rms(x[r]) * w` for each row of `w.len()` values.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.par_chunks_mut(w.len())
        .zip(x.par_chunks(w.len()))
        .for_each(|(o, r)| {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            o.iter_mut()
                .zip(r)
                .zip(w)
                .for_each(|((o, r), w)| *o = r * inv * w);
        });
}

fn apply_rope(head: &mut [f32], cs: &[(f32, f32)], style: RopeStyle) {
    let half = head.len() / 2;
    match style {
        RopeStyle::Halves => {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = a * s + b * c;
            }
        }
        RopeStyle::Adjacent => {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = a * s + b * c;
            }
        }
    }
}

impl BatchModel for Model {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab
    }

    fn context_length(&self) -> usize {
        self.cfg.context
    }

    fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.layers * self.cfg.kv_dim() * std::mem::size_of::<f32>()
    }

    fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.size_bytes()
                    + l.gate_up.size_bytes()
                    + l.o.size_bytes()
                    + l.down.size_bytes()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        l + self.embed.size_bytes() + self.head.as_ref().map_or(0, QMatrix::size_bytes) + 4 * self.norm.len()
    }

    fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.cfg.layers, self.cfg.kv_dim(), capacity.min(self.cfg.context))
    }

    fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        check_batch(batch, self.cfg.vocab)?;
        for (i, s) in batch.iter().enumerate() {
            if s.cache.k.len() != self.cfg.layers || s.cache.kv_dim != self.cfg.kv_dim() {
                return Err(EngineError::Inference(format!(
                    "batch entry {i}: the cache was made for another model"
                )));
            }
        }
        let lens: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        let out = self.run(batch);
        if out.is_err() {
            // Undo what the failed step appended, so no cache changes.
            for (s, &len) in batch.iter_mut().zip(&lens) {
                s.cache.truncate(len);
            }
        }
        out
    }
}
