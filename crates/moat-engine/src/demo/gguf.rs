//! The demo model as one self-contained GGUF file (`model.gguf`), the way
//! llama.cpp users download models: the weights (quantised or not), the
//! architecture in metadata, and the tokenizer and chat template in
//! `tokenizer.ggml.*` and `tokenizer.chat_template`, so nothing else is
//! needed beside it.
//!
//! Same seed, same values as the safetensors demo (the GGUF F32 of a seed is
//! the safetensors F32 of that seed, re-laid out), so the two can be checked
//! against each other.

use std::io::Write;

use serde_json::Value;

use super::spec::{Architecture, TensorSpec};
use super::template::CHAT_TEMPLATE;
use super::tokenizer::{BOS, EOS, SPECIAL_TOKENS};
use super::weights::tensor_values;
use crate::cpu::quant::{QMatrix, QType};

const ALIGNMENT: u64 = 32;

/// GGUF value type ids.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// ggml token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// `model.embed_tokens.weight` → `token_embd.weight`, and so on.
fn gguf_name(hf: &str) -> String {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_owned();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or(hf);
    let (layer, part) = rest.split_once('.').unwrap_or(("0", rest));
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        other => other,
    };
    format!("blk.{layer}.{part}")
}

/// The encoding a tensor is stored in: matrices in `qtype` when their rows
/// are whole blocks of it (else Q8_0, else F32, as llama-quantize falls
/// back), vectors in F32.
fn storage(spec: &TensorSpec, qtype: QType) -> QType {
    match spec.shape.as_slice() {
        [_, cols] => [qtype, QType::Q8_0, QType::F32]
            .into_iter()
            .find(|t| cols % t.block_elems() == 0)
            .unwrap_or(QType::F32),
        _ => QType::F32,
    }
}

struct Meta(Vec<u8>, u64);

impl Meta {
    fn key(&mut self, k: &str, t: u32) {
        put_str(&mut self.0, k);
        self.0.extend(t.to_le_bytes());
        self.1 += 1;
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, T_U32);
        self.0.extend(v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, T_F32);
        self.0.extend(v.to_le_bytes());
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k, T_STRING);
        put_str(&mut self.0, v);
    }
    fn strs<'a>(&mut self, k: &str, v: impl ExactSizeIterator<Item = &'a str>) {
        self.key(k, T_ARRAY);
        self.0.extend(T_STRING.to_le_bytes());
        self.0.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.0, s);
        }
    }
    fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, T_ARRAY);
        self.0.extend(T_I32.to_le_bytes());
        self.0.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.0.extend(x.to_le_bytes());
        }
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn pad(b: &mut Vec<u8>) {
    while !(b.len() as u64).is_multiple_of(ALIGNMENT) {
        b.push(0);
    }
}

/// Tokens (by id), token types and merges from the demo `tokenizer.json`.
fn vocabulary(tokenizer_json: &[u8]) -> std::io::Result<(Vec<String>, Vec<i32>, Vec<String>)> {
    let bad = |what: &str| std::io::Error::other(format!("demo tokenizer.json: {what}"));
    let doc: Value = serde_json::from_slice(tokenizer_json).map_err(|e| bad(&e.to_string()))?;
    let vocab = doc
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no model.vocab"))?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        let id = id.as_u64().map(|i| i as usize).filter(|&i| i < tokens.len());
        let slot = id.ok_or_else(|| bad("vocab id out of range"))?;
        tokens[slot] = t.clone();
    }
    let types = tokens
        .iter()
        .map(|t| match SPECIAL_TOKENS.iter().find(|(c, _)| c == t) {
            Some((_, true)) => CONTROL,
            Some((_, false)) => USER_DEFINED,
            None => NORMAL,
        })
        .collect();
    let merges = doc
        .pointer("/model/merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no model.merges"))?
        .iter()
        .map(|m| {
            m.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad("a merge is not a string"))
        })
        .collect::<Result<_, _>>()?;
    Ok((tokens, types, merges))
}

/// Write the GGUF file for `arch`'s tensors `specs` to `out`.
pub(crate) fn write_gguf<W: Write>(
    out: &mut W,
    arch: &Architecture,
    specs: &[TensorSpec],
    tokenizer_json: &[u8],
    qtype: QType,
    seed: u64,
) -> std::io::Result<()> {
    let (tokens, types, merges) = vocabulary(tokenizer_json)?;
    let id = |t: &str| tokens.iter().position(|x| x == t).map_or(0, |i| i as u32);
    let mut m = Meta(Vec::new(), 0);
    m.str("general.architecture", "qwen2");
    m.str("general.name", "moat demo (random weights)");
    m.u32("general.alignment", ALIGNMENT as u32);
    m.u32("qwen2.context_length", arch.max_position_embeddings as u32);
    m.u32("qwen2.embedding_length", arch.hidden as u32);
    m.u32("qwen2.block_count", arch.layers as u32);
    m.u32("qwen2.feed_forward_length", arch.intermediate as u32);
    m.u32("qwen2.attention.head_count", arch.heads as u32);
    m.u32("qwen2.attention.head_count_kv", arch.kv_heads as u32);
    m.f32("qwen2.attention.layer_norm_rms_epsilon", 1e-6);
    m.f32("qwen2.rope.freq_base", 10_000.0);
    m.str("tokenizer.ggml.model", "gpt2");
    m.str("tokenizer.ggml.pre", "qwen2");
    m.strs("tokenizer.ggml.tokens", tokens.iter().map(String::as_str));
    m.i32s("tokenizer.ggml.token_type", &types);
    m.strs("tokenizer.ggml.merges", merges.iter().map(String::as_str));
    m.u32("tokenizer.ggml.bos_token_id", id(BOS));
    m.u32("tokenizer.ggml.eos_token_id", id(EOS));
    m.str("tokenizer.chat_template", CHAT_TEMPLATE);

    // Tensor infos need each tensor's encoded size, known from its shape.
    let mut infos = Vec::new();
    let mut offset = 0u64;
    for spec in specs {
        let t = storage(spec, qtype);
        let (rows, cols) = match spec.shape.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            s => return Err(std::io::Error::other(format!("demo tensor shape {s:?}"))),
        };
        let bytes = t.row_bytes(cols).map_or(0, |b| b * rows) as u64;
        put_str(&mut infos, &gguf_name(&spec.name));
        let dims: Vec<u64> = spec.shape.iter().rev().map(|&d| d as u64).collect();
        infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            infos.extend(d.to_le_bytes());
        }
        infos.extend(t.ggml_id().to_le_bytes());
        infos.extend(offset.to_le_bytes());
        offset += bytes.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    let mut head = b"GGUF".to_vec();
    head.extend(3u32.to_le_bytes());
    head.extend((specs.len() as u64).to_le_bytes());
    head.extend(m.1.to_le_bytes());
    head.extend(m.0);
    head.extend(infos);
    pad(&mut head);
    out.write_all(&head)?;
    for spec in specs {
        let values = tensor_values(spec, seed);
        let (rows, cols) = match spec.shape.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            _ => (1, values.len()),
        };
        let q =
            QMatrix::from_f32(storage(spec, qtype), rows, cols, &values).map_err(std::io::Error::other)?;
        let mut data = q.to_ggml();
        pad(&mut data);
        out.write_all(&data)?;
    }
    Ok(())
}
