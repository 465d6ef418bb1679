//! Loading a verified model: `config.json` (Qwen2 architecture), the
//! tokenizer, the chat template and the safetensors weights, all from the
//! bytes in the [`VerifiedModel`]; nothing is read from disk here.

use crate::cpu::BatchModel;
use crate::cpu::gguf::Gguf;
use crate::cpu::load::{WeightOptions, from_gguf, from_safetensors};
use crate::cpu::quant::QType;
use crate::error::EngineError;
use crate::template::ChatTemplate;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2;
use moat_artifact::VerifiedModel;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use tokenizers::Tokenizer;

/// Everything the generator needs, owned.
pub struct Loaded {
    pub model: qwen2::ModelForCausalLM,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub eos_ids: Vec<u32>,
    pub think_start: Option<u32>,
    pub think_end: Option<u32>,
    pub context: usize,
    /// Bytes one token takes in the KV cache: keys and values, every
    /// layer, every KV head, at the F32 the weights are loaded as.
    pub kv_bytes_per_token: usize,
}

const INDEX_FILE: &str = "model.safetensors.index.json";

fn err(model: &VerifiedModel, message: impl Into<String>) -> EngineError {
    EngineError::Load {
        model: model.name().to_owned(),
        message: message.into(),
    }
}

fn json_file(model: &VerifiedModel, rel: &str) -> Result<Option<Value>, EngineError> {
    match model.file(rel) {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|e| err(model, format!("{rel}: invalid JSON: {e}"))),
    }
}

/// A token given as a string or as a `{"content": …}` AddedToken object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

/// The safetensors files holding the weights: those of the index when there
/// is one, else every `*.safetensors` file at the top of the model.
fn weight_files(model: &VerifiedModel) -> Result<Vec<String>, EngineError> {
    if let Some(index) = json_file(model, INDEX_FILE)? {
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| err(model, format!("{INDEX_FILE}: no weight_map object")))?;
        let files: BTreeSet<String> = map
            .values()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        for f in &files {
            if model.file(f).is_none() {
                return Err(err(
                    model,
                    format!("{INDEX_FILE}: names {f:?}, which is not in the model"),
                ));
            }
        }
        return Ok(files.into_iter().collect());
    }
    let files: Vec<String> = model
        .file_names()
        .filter(|n| !n.contains('/') && n.ends_with(".safetensors"))
        .map(str::to_owned)
        .collect();
    if files.is_empty() {
        return Err(err(model, "no .safetensors weights found"));
    }
    Ok(files)
}

pub fn load(mut model: VerifiedModel, max_context: usize) -> Result<Loaded, EngineError> {
    let config = json_file(&model, "config.json")?.ok_or_else(|| err(&model, "config.json is missing"))?;
    let is_qwen2 = config.get("model_type").and_then(Value::as_str) == Some("qwen2")
        || config
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("Qwen2ForCausalLM")));
    if !is_qwen2 {
        return Err(err(
            &model,
            "config.json: unsupported architecture (supported: qwen2 / Qwen2ForCausalLM)",
        ));
    }
    let cfg: qwen2::Config =
        serde_json::from_value(config.clone()).map_err(|e| err(&model, format!("config.json: {e}")))?;

    let tok_bytes = model
        .file("tokenizer.json")
        .ok_or_else(|| err(&model, "tokenizer.json is missing"))?;
    let tokenizer =
        Tokenizer::from_bytes(tok_bytes).map_err(|e| err(&model, format!("tokenizer.json: {e}")))?;

    let tcfg = json_file(&model, "tokenizer_config.json")?.ok_or_else(|| {
        err(
            &model,
            "tokenizer_config.json is missing (it carries the chat template)",
        )
    })?;
    let source = match tcfg.get("chat_template") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_owned)
            .ok_or_else(|| {
                err(
                    &model,
                    "tokenizer_config.json: chat_template list has no \"default\"",
                )
            })?,
        _ => return Err(err(&model, "tokenizer_config.json: no chat_template")),
    };
    let bos = token_text(tcfg.get("bos_token")).unwrap_or_default();
    let eos = token_text(tcfg.get("eos_token")).unwrap_or_default();
    let template = ChatTemplate::new(source, bos, eos.clone())
        .map_err(|e| err(&model, format!("tokenizer_config.json: {e}")))?;

    let generation = json_file(&model, "generation_config.json")?;
    let mut eos_ids = ids(generation.as_ref().and_then(|g| g.get("eos_token_id")));
    eos_ids.extend(ids(config.get("eos_token_id")));
    eos_ids.extend(tokenizer.token_to_id(&eos));
    eos_ids.sort_unstable();
    eos_ids.dedup();
    if eos_ids.is_empty() {
        return Err(err(
            &model,
            "no end-of-sequence token: set eos_token in tokenizer_config.json",
        ));
    }
    let think_start = tokenizer.token_to_id("<think>");
    let think_end = tokenizer.token_to_id("</think>");

    let device = Device::Cpu;
    let mut tensors = HashMap::new();
    for file in weight_files(&model)? {
        let bytes = model
            .take_file(&file)
            .ok_or_else(|| err(&model, format!("{file}: listed twice")))?;
        let part = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| err(&model, format!("{file}: {e}")))?;
        drop(bytes);
        for (name, t) in part {
            if tensors.insert(name.clone(), t).is_some() {
                return Err(err(
                    &model,
                    format!("{file}: tensor {name:?} also appears in another shard"),
                ));
            }
        }
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
    let lm = qwen2::ModelForCausalLM::new(&cfg, vb)
        .map_err(|e| err(&model, format!("weights do not match config.json: {e}")))?;
    let context = cfg.max_position_embeddings.min(max_context);
    let head_dim = cfg.hidden_size / cfg.num_attention_heads.max(1);
    let kv_bytes_per_token =
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * DType::F32.size_in_bytes();
    Ok(Loaded {
        kv_bytes_per_token,
        model: lm,
        tokenizer,
        template,
        eos_ids,
        think_start,
        think_end,
        context,
    })
}

/// The tokenizer side of a model: tokenizer, chat template, end-of-sequence
/// ids and the R1 reasoning tags.
pub struct TextParts {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub eos_ids: Vec<u32>,
    pub think_start: Option<u32>,
    pub think_end: Option<u32>,
}

/// The chat template source from `tokenizer_config.json` (a string, or a
/// list of named templates of which "default" is used).
fn template_source(model: &VerifiedModel, tcfg: &Value) -> Result<Option<String>, EngineError> {
    Ok(match tcfg.get("chat_template") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => Some(
            list.iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned)
                .ok_or_else(|| {
                    err(
                        model,
                        "tokenizer_config.json: chat_template list has no \"default\"",
                    )
                })?,
        ),
        Some(_) => {
            return Err(err(
                model,
                "tokenizer_config.json: chat_template is not a string or list",
            ));
        }
    })
}

/// Tokenizer, template and special tokens from the Hugging Face files, with
/// the GGUF metadata (when the weights are a GGUF file) filling what they lack.
fn text_parts(
    model: &VerifiedModel,
    config: Option<&Value>,
    gguf: Option<&Gguf>,
) -> Result<TextParts, EngineError> {
    let tokenizer = match (model.file("tokenizer.json"), gguf) {
        (Some(bytes), _) => {
            Tokenizer::from_bytes(bytes).map_err(|e| err(model, format!("tokenizer.json: {e}")))?
        }
        (None, Some(g)) => {
            crate::cpu::vocab::tokenizer(g).map_err(|e| err(model, format!("GGUF vocabulary: {e}")))?
        }
        (None, None) => return Err(err(model, "tokenizer.json is missing")),
    };
    let tcfg = json_file(model, "tokenizer_config.json")?.unwrap_or(Value::Null);
    let gguf_str = |key: &str| {
        gguf.and_then(|g| g.get(key))
            .and_then(crate::cpu::gguf::Value::as_str)
    };
    let gguf_token = |key: &str| {
        gguf.and_then(|g| g.get(key))
            .and_then(crate::cpu::gguf::Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
    };
    let source = match template_source(model, &tcfg)? {
        Some(s) => s,
        None => gguf_str("tokenizer.chat_template").map(str::to_owned).ok_or_else(|| {
            err(
                model,
                "no chat template: neither tokenizer_config.json nor the GGUF metadata (tokenizer.chat_template) has one",
            )
        })?,
    };
    let id_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let bos = token_text(tcfg.get("bos_token"))
        .or_else(|| id_text(gguf_token("tokenizer.ggml.bos_token_id")))
        .unwrap_or_default();
    let eos = token_text(tcfg.get("eos_token"))
        .or_else(|| id_text(gguf_token("tokenizer.ggml.eos_token_id")))
        .unwrap_or_default();
    let template =
        ChatTemplate::new(source, bos, eos.clone()).map_err(|e| err(model, format!("chat template: {e}")))?;

    let generation = json_file(model, "generation_config.json")?;
    let mut eos_ids = ids(generation.as_ref().and_then(|g| g.get("eos_token_id")));
    eos_ids.extend(ids(config.and_then(|c| c.get("eos_token_id"))));
    eos_ids.extend(gguf_token("tokenizer.ggml.eos_token_id"));
    eos_ids.extend(gguf_token("tokenizer.ggml.eot_token_id"));
    eos_ids.extend(tokenizer.token_to_id(&eos));
    eos_ids.sort_unstable();
    eos_ids.dedup();
    if eos_ids.is_empty() {
        return Err(err(
            model,
            "no end-of-sequence token: set eos_token in tokenizer_config.json",
        ));
    }
    Ok(TextParts {
        think_start: tokenizer.token_to_id("<think>"),
        think_end: tokenizer.token_to_id("</think>"),
        tokenizer,
        template,
        eos_ids,
    })
}

/// Options for [`load_engine`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub max_context: usize,
    /// Quantise float weights at load (`[models] quantize`).
    pub quantize: Option<QType>,
}

/// A loaded model for the CPU engine: weights, and the text side.
pub struct EngineModel {
    pub model: Box<dyn BatchModel>,
    pub text: TextParts,
}

/// Load weights (a GGUF file, or safetensors with config.json) and the
/// tokenizer side. Parsing runs under `catch_unwind`: a bug in a parser must
/// fail this one load, never the server.
pub fn load_engine(model: VerifiedModel, opts: LoadOptions) -> Result<EngineModel, EngineError> {
    let name = model.name().to_owned();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        load_engine_inner(model, opts)
    }))
    .unwrap_or_else(|_| {
        Err(EngineError::Load {
            model: name,
            message: "the loader panicked on this model's files; the model is refused".into(),
        })
    })
}

fn load_engine_inner(mut model: VerifiedModel, opts: LoadOptions) -> Result<EngineModel, EngineError> {
    let weights = WeightOptions {
        max_context: opts.max_context,
        quantize: opts.quantize,
    };
    let ggufs: Vec<String> = model
        .file_names()
        .filter(|n| !n.contains('/') && n.ends_with(".gguf"))
        .map(str::to_owned)
        .collect();
    match ggufs.as_slice() {
        [one] => {
            let bytes = model
                .take_file(one)
                .ok_or_else(|| err(&model, format!("{one}: listed twice")))?;
            let (m, g) = from_gguf(&bytes, weights).map_err(|e| err(&model, format!("{one}: {e}")))?;
            drop(bytes);
            let config = json_file(&model, "config.json")?;
            let text = text_parts(&model, config.as_ref(), Some(&g))?;
            Ok(EngineModel {
                model: Box::new(m),
                text,
            })
        }
        [] => {
            let config =
                json_file(&model, "config.json")?.ok_or_else(|| err(&model, "config.json is missing"))?;
            let text = text_parts(&model, Some(&config), None)?;
            let mut files = Vec::new();
            for f in weight_files(&model)? {
                let bytes = model
                    .take_file(&f)
                    .ok_or_else(|| err(&model, format!("{f}: listed twice")))?;
                files.push((f, bytes));
            }
            let m = from_safetensors(&config, &files, weights).map_err(|e| err(&model, e))?;
            Ok(EngineModel {
                model: Box::new(m),
                text,
            })
        }
        many => Err(err(
            &model,
            format!(
                "{} GGUF files ({}); serve one model per name",
                many.len(),
                many.join(", ")
            ),
        )),
    }
}
