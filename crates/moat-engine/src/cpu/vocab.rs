//! A tokenizer from a GGUF file's own vocabulary (`tokenizer.ggml.*`), for
//! models shipped as a lone `.gguf` with no `tokenizer.json` beside it.
//!
//! Only the byte-level BPE that Qwen2 and Llama-3 (and so every DeepSeek-R1
//! distill) use is built: `tokenizer.ggml.model = "gpt2"`, with the
//! pre-tokenizer regex chosen by `tokenizer.ggml.pre` the way llama.cpp's
//! `llama-vocab.cpp` does. Anything else is refused by name rather than
//! tokenised wrongly.

use super::gguf::{Gguf, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's split (also DeepSeek-R1-Distill-Qwen's `deepseek-r1-qwen`).
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's split: digits in groups of up to three.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ggml token types (`llama_token_type`): 3 is control, 4 user-defined.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>, String> {
    g.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{key} is missing"))?
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_str().ok_or_else(|| format!("{key}[{i}] is not a string")))
        .collect()
}

pub fn tokenizer(g: &Gguf) -> Result<Tokenizer, String> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model {model:?} is not supported without a tokenizer.json (gpt2 byte-level BPE only)"
        ));
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let regex = match pre {
        "qwen2" | "deepseek-r1-qwen" => QWEN2,
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => LLAMA3,
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} is not supported without a tokenizer.json (qwen2, deepseek-r1-qwen, llama-bpe)"
            ));
        }
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        None => Vec::new(),
        Some(a) => a
            .iter()
            .map(|v| match v {
                Value::Int(x) => *x,
                Value::Uint(x) => *x as i64,
                _ => 1,
            })
            .collect(),
    };
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        let id = u32::try_from(i).map_err(|_| "vocabulary too large".to_owned())?;
        if vocab.insert((*t).to_owned(), id).is_some() {
            return Err(format!("tokenizer.ggml.tokens[{i}] {t:?} appears twice"));
        }
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("tokenizer.ggml.merges[{i}] {m:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| format!("pre-tokenizer: {e}"))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Control and user-defined tokens match whole, before BPE, as
    // tokenizer.json's added tokens do; control ones are special (skipped
    // when decoding).
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .map(|(s, t)| AddedToken::from((*s).to_owned(), *t == CONTROL))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| format!("special tokens: {e}"))?;
    Ok(tok)
}
