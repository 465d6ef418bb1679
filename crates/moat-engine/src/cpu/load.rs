//! Building a [`Model`] from a GGUF file or from Hugging Face safetensors
//! plus `config.json`, with optional in-situ quantisation of float weights.
//!
//! Both sources go through one [`Tensors`] view so the naming differences
//! (`blk.0.attn_q.weight` against `model.layers.0.self_attn.q_proj.weight`)
//! are the only thing each side spells out. Every error names the tensor or
//! the metadata key.

use super::gguf::{self, Gguf};
use super::model::{Arch, Config, Layer, Model, RopeStyle};
use super::quant::{QMatrix, QType};
use serde_json::Value;
use std::collections::HashMap;

/// How to load weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightOptions {
    /// Positions to support at most (the model's own context caps it).
    pub max_context: usize,
    /// Quantise F32/F16/BF16 matrices to this type at load.
    pub quantize: Option<QType>,
}

/// A named tensor, as raw encoded bytes plus its ggml type and shape in
/// rows × cols (a vector is one row).
struct Raw<'a> {
    t: QType,
    rows: usize,
    cols: usize,
    bytes: &'a [u8],
}

trait Tensors {
    fn raw(&self, name: &str) -> Result<Option<Raw<'_>>, String>;
}

struct GgufTensors<'a> {
    g: &'a Gguf,
    bytes: &'a [u8],
}

impl Tensors for GgufTensors<'_> {
    fn raw(&self, name: &str) -> Result<Option<Raw<'_>>, String> {
        let Some(t) = self.g.tensors.get(name) else {
            return Ok(None);
        };
        let qt = QType::from_ggml(t.ggml_type).ok_or_else(|| format!("{name}: ggml type {}", t.ggml_type))?;
        let (cols, rows) = match t.dims.as_slice() {
            [c] => (*c, 1),
            [c, r] => (*c, *r),
            [c, r, rest @ ..] if rest.iter().all(|&d| d == 1) => (*c, *r),
            d => {
                return Err(format!(
                    "tensor {name}: {} dimensions where at most 2 were expected",
                    d.len()
                ));
            }
        };
        let (rows, cols) = (
            usize::try_from(rows).map_err(|_| format!("tensor {name}: too large"))?,
            usize::try_from(cols).map_err(|_| format!("tensor {name}: too large"))?,
        );
        Ok(Some(Raw {
            t: qt,
            rows,
            cols,
            bytes: &self.bytes[t.range.clone()],
        }))
    }
}

struct StTensors<'a> {
    views: HashMap<String, safetensors::tensor::TensorView<'a>>,
}

impl Tensors for StTensors<'_> {
    fn raw(&self, name: &str) -> Result<Option<Raw<'_>>, String> {
        use safetensors::Dtype;
        let Some(v) = self.views.get(name) else {
            return Ok(None);
        };
        let t = match v.dtype() {
            Dtype::F32 => QType::F32,
            Dtype::F16 => QType::F16,
            Dtype::BF16 => QType::BF16,
            d => return Err(format!("tensor {name}: dtype {d:?} (supported: F32, F16, BF16)")),
        };
        let (rows, cols) = match v.shape() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            s => {
                return Err(format!(
                    "tensor {name}: shape {s:?} where a vector or matrix was expected"
                ));
            }
        };
        Ok(Some(Raw {
            t,
            rows,
            cols,
            bytes: v.data(),
        }))
    }
}

fn matrix(src: &dyn Tensors, name: &str, quantize: Option<QType>) -> Result<QMatrix, String> {
    let raw = src
        .raw(name)?
        .ok_or_else(|| format!("tensor {name} is missing"))?;
    let m = QMatrix::from_ggml(raw.t, raw.rows, raw.cols, raw.bytes)
        .map_err(|e| format!("tensor {name}: {e}"))?;
    let Some(target) = quantize else {
        return Ok(m);
    };
    if !matches!(raw.t, QType::F32 | QType::F16 | QType::BF16) {
        return Ok(m);
    }
    // A type whose blocks do not divide the row falls back to Q8_0 (as
    // llama-quantize does), and to the file's own type if even that fails.
    let target = [target, QType::Q8_0]
        .into_iter()
        .find(|t| raw.cols % t.block_elems() == 0)
        .unwrap_or(raw.t);
    if target == raw.t {
        return Ok(m);
    }
    let mut f = vec![0f32; raw.rows * raw.cols];
    for (r, row) in f.chunks_exact_mut(raw.cols).enumerate() {
        m.dequantize_row(r, row)
            .map_err(|e| format!("tensor {name}: {e}"))?;
    }
    drop(m);
    QMatrix::from_f32(target, raw.rows, raw.cols, &f).map_err(|e| format!("tensor {name}: quantising: {e}"))
}

fn vector(src: &dyn Tensors, name: &str) -> Result<Vec<f32>, String> {
    let raw = src
        .raw(name)?
        .ok_or_else(|| format!("tensor {name} is missing"))?;
    let n = raw.rows * raw.cols;
    let m = QMatrix::from_ggml(raw.t, 1, n, raw.bytes).map_err(|e| format!("tensor {name}: {e}"))?;
    let mut out = vec![0f32; n];
    m.dequantize_row(0, &mut out)
        .map_err(|e| format!("tensor {name}: {e}"))?;
    Ok(out)
}

fn opt_vector(src: &dyn Tensors, name: &str) -> Result<Option<Vec<f32>>, String> {
    if src.raw(name)?.is_none() {
        return Ok(None);
    }
    vector(src, name).map(Some)
}

/// Tensor names of one layout.
struct Names {
    embed: &'static str,
    norm: &'static str,
    head: &'static str,
    layer: fn(usize, &str) -> String,
}

const GGUF_NAMES: Names = Names {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    head: "output.weight",
    layer: |i, part| {
        let p = match part {
            "q" => "attn_q.weight",
            "k" => "attn_k.weight",
            "v" => "attn_v.weight",
            "q_bias" => "attn_q.bias",
            "k_bias" => "attn_k.bias",
            "v_bias" => "attn_v.bias",
            "o" => "attn_output.weight",
            "attn_norm" => "attn_norm.weight",
            "ffn_norm" => "ffn_norm.weight",
            "gate" => "ffn_gate.weight",
            "up" => "ffn_up.weight",
            _ => "ffn_down.weight",
        };
        format!("blk.{i}.{p}")
    },
};

const HF_NAMES: Names = Names {
    embed: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    head: "lm_head.weight",
    layer: |i, part| {
        let p = match part {
            "q" => "self_attn.q_proj.weight",
            "k" => "self_attn.k_proj.weight",
            "v" => "self_attn.v_proj.weight",
            "q_bias" => "self_attn.q_proj.bias",
            "k_bias" => "self_attn.k_proj.bias",
            "v_bias" => "self_attn.v_proj.bias",
            "o" => "self_attn.o_proj.weight",
            "attn_norm" => "input_layernorm.weight",
            "ffn_norm" => "post_attention_layernorm.weight",
            "gate" => "mlp.gate_proj.weight",
            "up" => "mlp.up_proj.weight",
            _ => "mlp.down_proj.weight",
        };
        format!("model.layers.{i}.{p}")
    },
};

fn build(
    cfg: Config,
    src: &dyn Tensors,
    names: &Names,
    tied: bool,
    quantize: Option<QType>,
) -> Result<Model, String> {
    cfg.check()?;
    let layer = |i: usize| -> Result<Layer, String> {
        let n = |p: &str| (names.layer)(i, p);
        Ok(Layer {
            attn_norm: vector(src, &n("attn_norm"))?,
            q: matrix(src, &n("q"), quantize)?,
            k: matrix(src, &n("k"), quantize)?,
            v: matrix(src, &n("v"), quantize)?,
            q_bias: opt_vector(src, &n("q_bias"))?,
            k_bias: opt_vector(src, &n("k_bias"))?,
            v_bias: opt_vector(src, &n("v_bias"))?,
            o: matrix(src, &n("o"), quantize)?,
            ffn_norm: vector(src, &n("ffn_norm"))?,
            gate: matrix(src, &n("gate"), quantize)?,
            up: matrix(src, &n("up"), quantize)?,
            down: matrix(src, &n("down"), quantize)?,
        })
    };
    let layers = (0..cfg.layers).map(layer).collect::<Result<Vec<_>, _>>()?;
    // The embedding is only ever read a row at a time; it is quantised too
    // when asked, which is what saves most memory on small models.
    let embed = matrix(src, names.embed, quantize)?;
    let head = match src.raw(names.head)? {
        Some(_) => Some(matrix(src, names.head, quantize)?),
        None if tied => None,
        None => {
            return Err(format!(
                "tensor {} is missing (and embeddings are not tied)",
                names.head
            ));
        }
    };
    let norm = vector(src, names.norm)?;
    Model::new(cfg, embed, layers, norm, head)
}

fn meta_u(g: &Gguf, key: &str) -> Result<usize, String> {
    g.get(key)
        .and_then(gguf::Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("metadata {key} is missing or not an unsigned integer"))
}

/// A model from the bytes of one GGUF file.
pub fn from_gguf(bytes: &[u8], opts: WeightOptions) -> Result<(Model, Gguf), String> {
    let g = gguf::parse(bytes)?;
    let arch_name = g
        .get("general.architecture")
        .and_then(gguf::Value::as_str)
        .ok_or("metadata general.architecture is missing")?;
    let (arch, rope_style) = match arch_name {
        "qwen2" => (Arch::Qwen2, RopeStyle::Halves),
        "llama" => (Arch::Llama, RopeStyle::Adjacent),
        other => {
            return Err(format!(
                "general.architecture is {other:?}; supported: qwen2, llama"
            ));
        }
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden = meta_u(&g, &k("embedding_length"))?;
    let heads = meta_u(&g, &k("attention.head_count"))?;
    let kv_heads = match g.get(&k("attention.head_count_kv")) {
        None => heads,
        Some(_) => meta_u(&g, &k("attention.head_count_kv"))?,
    };
    let head_dim = match g.get(&k("attention.key_length")) {
        None => hidden / heads.max(1),
        Some(_) => meta_u(&g, &k("attention.key_length"))?,
    };
    let vocab = g
        .tensors
        .get("token_embd.weight")
        .and_then(|t| t.dims.get(1))
        .and_then(|&v| usize::try_from(v).ok())
        .ok_or("tensor token_embd.weight is missing or not a matrix")?;
    let rope_freq_factors = match g.tensors.get("rope_freqs.weight") {
        None => Vec::new(),
        Some(_) => vector(&GgufTensors { g: &g, bytes }, "rope_freqs.weight")?,
    };
    let cfg = Config {
        arch,
        hidden,
        layers: meta_u(&g, &k("block_count"))?,
        heads,
        kv_heads,
        head_dim,
        intermediate: meta_u(&g, &k("feed_forward_length"))?,
        vocab,
        rms_eps: g
            .get(&k("attention.layer_norm_rms_epsilon"))
            .and_then(gguf::Value::as_f64)
            .ok_or_else(|| format!("metadata {} is missing", k("attention.layer_norm_rms_epsilon")))?
            as f32,
        rope_theta: g
            .get(&k("rope.freq_base"))
            .and_then(gguf::Value::as_f64)
            .unwrap_or(10_000.0) as f32,
        rope_style,
        rope_freq_factors,
        context: meta_u(&g, &k("context_length"))?.min(opts.max_context),
        sliding_window: None,
    };
    let model = build(
        cfg,
        &GgufTensors { g: &g, bytes },
        &GGUF_NAMES,
        true,
        opts.quantize,
    )?;
    Ok((model, g))
}

fn cfg_u(c: &Value, key: &str) -> Result<usize, String> {
    c.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("config.json: {key} is missing or not an unsigned integer"))
}

fn cfg_f(c: &Value, key: &str, default: f64) -> Result<f64, String> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("config.json: {key} is not a number")),
    }
}

/// The per-pair divisors of Llama-3.1's RoPE scaling (transformers'
/// `_compute_llama3_parameters`), as llama.cpp's converter writes them into
/// `rope_freqs`.
fn llama3_factors(scaling: &Value, theta: f64, head_dim: usize) -> Result<Vec<f32>, String> {
    let f = |k: &str| {
        scaling
            .get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("config.json: rope_scaling.{k} is missing"))
    };
    let (factor, low, high, old) = (
        f("factor")?,
        f("low_freq_factor")?,
        f("high_freq_factor")?,
        f("original_max_position_embeddings")?,
    );
    if !(factor > 0.0 && high > low && old > 0.0) {
        return Err("config.json: rope_scaling values are not usable".into());
    }
    let (low_wl, high_wl) = (old / low, old / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let inv = theta.powf(-2.0 * i as f64 / head_dim as f64);
            let wl = 2.0 * std::f64::consts::PI / inv;
            let scaled = if wl < high_wl {
                inv
            } else if wl > low_wl {
                inv / factor
            } else {
                let smooth = (old / wl - low) / (high - low);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            (inv / scaled) as f32
        })
        .collect())
}

/// A model from `config.json` and its safetensors files.
pub fn from_safetensors(
    config: &Value,
    files: &[(String, Vec<u8>)],
    opts: WeightOptions,
) -> Result<Model, String> {
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let arch = if model_type == "qwen2" || archs.contains(&"Qwen2ForCausalLM") {
        Arch::Qwen2
    } else if model_type == "llama" || archs.contains(&"LlamaForCausalLM") {
        Arch::Llama
    } else {
        return Err(format!(
            "config.json: model_type {model_type:?} / architectures {archs:?} are not supported (qwen2, llama)"
        ));
    };
    let hidden = cfg_u(config, "hidden_size")?;
    let heads = cfg_u(config, "num_attention_heads")?;
    let head_dim = match config.get("head_dim") {
        None | Some(Value::Null) => hidden / heads.max(1),
        Some(_) => cfg_u(config, "head_dim")?,
    };
    let theta = cfg_f(config, "rope_theta", 10_000.0)?;
    let rope_freq_factors = match config.get("rope_scaling") {
        None | Some(Value::Null) => Vec::new(),
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str);
            match kind {
                Some("llama3") => llama3_factors(s, theta, head_dim)?,
                Some("default") => Vec::new(),
                other => {
                    return Err(format!(
                        "config.json: rope_scaling type {other:?} is not supported (llama3)"
                    ));
                }
            }
        }
    };
    let sliding_window =
        if arch == Arch::Qwen2 && config.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            let layers = cfg_u(config, "num_hidden_layers")?;
            let from = config
                .get("max_window_layers")
                .and_then(Value::as_u64)
                .map_or(layers, |v| v as usize);
            Some((cfg_u(config, "sliding_window")?, from))
        } else {
            None
        };
    let cfg = Config {
        arch,
        hidden,
        layers: cfg_u(config, "num_hidden_layers")?,
        heads,
        kv_heads: match config.get("num_key_value_heads") {
            None | Some(Value::Null) => heads,
            Some(_) => cfg_u(config, "num_key_value_heads")?,
        },
        head_dim,
        intermediate: cfg_u(config, "intermediate_size")?,
        vocab: cfg_u(config, "vocab_size")?,
        rms_eps: cfg_f(config, "rms_norm_eps", 1e-6)? as f32,
        rope_theta: theta as f32,
        rope_style: RopeStyle::Halves,
        rope_freq_factors,
        context: cfg_u(config, "max_position_embeddings")?.min(opts.max_context),
        sliding_window,
    };
    let tied = config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut views = HashMap::new();
    for (file, bytes) in files {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("{file}: {e}"))?;
        for (name, view) in st.tensors() {
            if views.insert(name.clone(), view).is_some() {
                return Err(format!("{file}: tensor {name:?} also appears in another file"));
            }
        }
    }
    build(cfg, &StTensors { views }, &HF_NAMES, tied, opts.quantize)
}
