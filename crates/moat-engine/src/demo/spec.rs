//! Shapes of the demo presets: the Qwen2 hyper-parameters, the `config.json`
//! written for them, and the ordered list of tensors with their initialisers.
//!
//! The tensor list is a plain function of the preset so that tests can check
//! the 1.5B layout (names, shapes, parameter count) without writing 3.6 GB.

use serde_json::{Value, json};

use super::{Preset, WeightDtype};

/// Standard deviation of every projection matrix and bias.
pub(crate) const MATRIX_STD: f32 = 0.02;
/// Standard deviation of `model.embed_tokens.weight`.
///
/// Larger than `MATRIX_STD` on purpose: with 0.02 everywhere, the residual
/// stream of a random 4-layer model is dominated by attention output that
/// mixes all positions alike, and greedy decoding tends to settle on one token
/// forever. Unit-variance embeddings keep each position's token visible through
/// the layers, so greedy output varies (the RMSNorms make the scale otherwise
/// irrelevant).
pub(crate) const EMBEDDING_STD: f32 = 1.0;
/// Standard deviation of `lm_head.weight`: gives logits with a standard
/// deviation of about `0.02 * sqrt(hidden)` (0.23 for tiny, 0.78 for 1.5B),
/// so sampled output is varied rather than peaked.
pub(crate) const LM_HEAD_STD: f32 = 0.02;

/// Qwen2 hyper-parameters of one preset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Architecture {
    pub(crate) hidden: usize,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) intermediate: usize,
    pub(crate) vocab: usize,
    pub(crate) max_position_embeddings: usize,
    pub(crate) sliding_window: usize,
    pub(crate) max_window_layers: usize,
}

impl Architecture {
    pub(crate) fn for_preset(preset: Preset) -> Self {
        match preset {
            Preset::Tiny => Self {
                hidden: 128,
                layers: 4,
                heads: 4,
                kv_heads: 2,
                intermediate: 352,
                vocab: 4096,
                max_position_embeddings: 4096,
                sliding_window: 4096,
                max_window_layers: 4,
            },
            // Values of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B's config.json.
            Preset::R1DistillQwen1_5b => Self {
                hidden: 1536,
                layers: 28,
                heads: 12,
                kv_heads: 2,
                intermediate: 8960,
                vocab: 151_936,
                max_position_embeddings: 131_072,
                sliding_window: 4096,
                max_window_layers: 21,
            },
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Init {
    /// Approximately normal, mean 0, this standard deviation.
    Normal(f32),
    /// Every element 1.0 (RMSNorm weights).
    Ones,
}

/// One tensor of the checkpoint, in the order it is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorSpec {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) init: Init,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize], init: Init) -> Self {
        Self {
            name,
            shape: shape.to_vec(),
            init,
        }
    }

    pub(crate) fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Every tensor of a Qwen2ForCausalLM checkpoint (untied `lm_head`, biases on
/// q/k/v only), in model order: embeddings, layers 0.., final norm, head.
pub(crate) fn tensor_specs(arch: &Architecture) -> Vec<TensorSpec> {
    let (h, kv) = (arch.hidden, arch.kv_heads * arch.head_dim());
    let mut specs = Vec::with_capacity(3 + 12 * arch.layers);
    specs.push(TensorSpec::new(
        "model.embed_tokens.weight".into(),
        &[arch.vocab, h],
        Init::Normal(EMBEDDING_STD),
    ));
    for i in 0..arch.layers {
        let p = format!("model.layers.{i}");
        let m = Init::Normal(MATRIX_STD);
        specs.extend([
            TensorSpec::new(format!("{p}.self_attn.q_proj.weight"), &[h, h], m),
            TensorSpec::new(format!("{p}.self_attn.q_proj.bias"), &[h], m),
            TensorSpec::new(format!("{p}.self_attn.k_proj.weight"), &[kv, h], m),
            TensorSpec::new(format!("{p}.self_attn.k_proj.bias"), &[kv], m),
            TensorSpec::new(format!("{p}.self_attn.v_proj.weight"), &[kv, h], m),
            TensorSpec::new(format!("{p}.self_attn.v_proj.bias"), &[kv], m),
            TensorSpec::new(format!("{p}.self_attn.o_proj.weight"), &[h, h], m),
            TensorSpec::new(format!("{p}.mlp.gate_proj.weight"), &[arch.intermediate, h], m),
            TensorSpec::new(format!("{p}.mlp.up_proj.weight"), &[arch.intermediate, h], m),
            TensorSpec::new(format!("{p}.mlp.down_proj.weight"), &[h, arch.intermediate], m),
            TensorSpec::new(format!("{p}.input_layernorm.weight"), &[h], Init::Ones),
            TensorSpec::new(format!("{p}.post_attention_layernorm.weight"), &[h], Init::Ones),
        ]);
    }
    specs.push(TensorSpec::new("model.norm.weight".into(), &[h], Init::Ones));
    specs.push(TensorSpec::new(
        "lm_head.weight".into(),
        &[arch.vocab, h],
        Init::Normal(LM_HEAD_STD),
    ));
    specs
}

/// `config.json`, with the key set (and order) of DeepSeek-R1-Distill-Qwen's.
pub(crate) fn config_json(arch: &Architecture, dtype: WeightDtype, bos: u32, eos: u32) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": arch.hidden,
        "initializer_range": 0.02,
        "intermediate_size": arch.intermediate,
        "max_position_embeddings": arch.max_position_embeddings,
        "max_window_layers": arch.max_window_layers,
        "model_type": "qwen2",
        "num_attention_heads": arch.heads,
        "num_hidden_layers": arch.layers,
        "num_key_value_heads": arch.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "sliding_window": arch.sliding_window,
        "tie_word_embeddings": false,
        "torch_dtype": dtype.torch_name(),
        "transformers_version": "4.44.0",
        "use_cache": true,
        "use_mrope": false,
        "use_sliding_window": false,
        "vocab_size": arch.vocab,
    })
}
