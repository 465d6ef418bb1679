//! Loading a verified model into the CPU engine ([`crate::cpu`]): the
//! weights (one GGUF file, or `config.json` with safetensors), the tokenizer,
//! the chat template and the special tokens, all from the bytes in the
//! [`VerifiedModel`]; nothing is read from disk here.

use crate::cpu::BatchModel;
use crate::cpu::gguf::Gguf;
use crate::cpu::load::{WeightOptions, from_gguf, from_safetensors};
use crate::cpu::quant::QType;
use crate::error::EngineError;
use crate::template::ChatTemplate;
use moat_artifact::VerifiedModel;
use serde_json::Value;
use std::collections::BTreeSet;
use tokenizers::Tokenizer;

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
