//! `tokenizer_config.json` (with a DeepSeek-R1-style chat template) and
//! `generation_config.json` for the demo model.
//!
//! The template follows DeepSeek-R1-Distill-Qwen's: BOS, then the system
//! prompts joined by blank lines, `<｜User｜>` + content, finished assistant
//! turns as `<｜Assistant｜>` + the answer with its reasoning stripped (the text
//! after the last `</think>`) + `<｜end▁of▁sentence｜>`, and `<｜Assistant｜>`
//! as the generation prompt. Tool calls are left out: the demo vocabulary has
//! no tool tokens. It is rendered by minijinja with pycompat (for `.split`).

use serde_json::{Value, json};

use super::tokenizer::{BOS, EOS, PAD};

/// The chat template stored in `tokenizer_config.json`.
pub const CHAT_TEMPLATE: &str = concat!(
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}",
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}",
    "{%- for message in messages %}",
    "{%- if message['role'] == 'system' %}",
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}",
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}",
    "{%- endif %}",
    "{%- endfor %}",
    "{{ bos_token }}{{ ns.system_prompt }}",
    "{%- for message in messages %}",
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}",
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}",
    "{% set content = message['content'] %}",
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}",
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}",
    "{%- endif %}",
    "{%- endfor %}",
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}",
);

/// Largest context the tokenizer advertises (DeepSeek's value).
const MODEL_MAX_LENGTH: u32 = 16384;

fn added_token(content: &str) -> Value {
    json!({
        "__type": "AddedToken",
        "content": content,
        "lstrip": false,
        "normalized": true,
        "rstrip": false,
        "single_word": false,
    })
}

/// `tokenizer_config.json`, keys in the order of DeepSeek-R1-Distill-Qwen's.
pub(crate) fn tokenizer_config_json() -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": added_token(BOS),
        "clean_up_tokenization_spaces": false,
        "eos_token": added_token(EOS),
        "legacy": true,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": added_token(PAD),
        "sp_model_kwargs": {},
        "unk_token": null,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    })
}

/// `generation_config.json`: DeepSeek's recommended sampling (T = 0.6, top-p 0.95).
pub(crate) fn generation_config_json(bos: u32, eos: u32) -> Value {
    json!({
        "_from_model_config": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "do_sample": true,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": "4.44.0",
    })
}
