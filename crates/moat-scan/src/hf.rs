//! Hugging Face folder rules: the ways a model folder makes `transformers`
//! run code.
//!
//! `trust_remote_code=True` makes transformers import Python files shipped
//! with the model, found through `auto_map` in `config.json` or
//! `tokenizer_config.json`. moat never enables remote code, but a folder that
//! asks for it is refused anyway: it will not behave as its author intended,
//! and someone downstream may load it with a less careful tool.
//!
//! Chat templates (`chat_template` in `tokenizer_config.json`, `*.jinja`
//! files) are code for a Jinja renderer and go through [`crate::template`].

use serde_json::Value;

use crate::report::{Finding, Severity, printable};
use crate::template;

/// Stable rule ids.
pub mod rule {
    pub const PYTHON_FILE: &str = "hf.python-file";
    pub const REMOTE_CODE: &str = "hf.remote-code";
    pub const CONFIG_JSON: &str = "hf.config-json";
}

/// The key transformers follows to import classes from files in the folder.
const AUTO_MAP: &str = "auto_map";

/// The key transformers reads the chat template from.
const CHAT_TEMPLATE: &str = "chat_template";

/// The file name part of a `/`-separated relative path.
fn base_name(rel: &str) -> &str {
    rel.rsplit(['/', '\\']).next().unwrap_or(rel)
}

/// Rules decided by the name alone.
pub fn check_name(rel: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    if base_name(rel).to_ascii_lowercase().ends_with(".py") {
        findings.push(Finding::new(
            rule::PYTHON_FILE,
            Severity::Critical,
            "Python file in a model folder: transformers would import it with \
             trust_remote_code; moat refuses remote code",
            "",
        ));
    }
    findings
}

/// Whether `rel` names a config file whose `auto_map` transformers follows
/// (`config.json` or `tokenizer_config.json`, at any depth, any case, since
/// case-insensitive file systems would serve it under the canonical name).
pub fn is_config_file(rel: &str) -> bool {
    let name = base_name(rel).to_ascii_lowercase();
    name == "config.json" || name == "tokenizer_config.json"
}

/// Content rules for a config file. `content` is `None` when the file was too
/// large to read whole, which is itself a finding: a config cannot be that big.
pub fn check_config(rel: &str, content: Option<&[u8]>) -> Vec<Finding> {
    let name = printable(base_name(rel)).into_owned();
    let Some(content) = content else {
        return vec![Finding::new(
            rule::CONFIG_JSON,
            Severity::High,
            format!(
                "{name} is larger than {} MiB and was not parsed",
                crate::sniff::MAX_CONTENT_LEN / (1024 * 1024)
            ),
            "",
        )];
    };
    let value: Value = match serde_json::from_slice(content) {
        Ok(v) => v,
        Err(e) => {
            return vec![Finding::new(
                rule::CONFIG_JSON,
                Severity::High,
                format!("{name} is not valid JSON: {e}"),
                format!("line {} column {}", e.line(), e.column()),
            )];
        }
    };
    let mut paths = Vec::new();
    find_auto_map(&value, "", &mut paths);
    let mut findings = chat_templates(rel, &value);
    findings.extend(paths.into_iter().map(|path| {
        Finding::new(
            rule::REMOTE_CODE,
            Severity::Critical,
            format!(
                "{name} sets {AUTO_MAP}: transformers would import code from the model \
                     folder (trust_remote_code); moat refuses remote code"
            ),
            format!("key {path}"),
        )
    }));
    findings
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of
/// `{"name", "template"}` (named templates such as `tool_use`). Each goes
/// through the template check; any other shape is a finding, since
/// transformers would fail or pick something unchecked.
fn chat_templates(rel: &str, value: &Value) -> Vec<Finding> {
    if !base_name(rel).eq_ignore_ascii_case("tokenizer_config.json") {
        return Vec::new();
    }
    let Some(t) = value.get(CHAT_TEMPLATE) else {
        return Vec::new();
    };
    let bad_shape = |location: String| {
        vec![Finding::new(
            rule::CONFIG_JSON,
            Severity::High,
            format!("{CHAT_TEMPLATE} must be a string or a list of {{name, template}} objects"),
            location,
        )]
    };
    match t {
        Value::Null => Vec::new(),
        Value::String(s) => template::check(s, &format!("key {CHAT_TEMPLATE}")),
        Value::Array(items) => {
            let mut findings = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str).unwrap_or("");
                match item.get("template") {
                    Some(Value::String(s)) => findings.extend(template::check(
                        s,
                        &format!("key {CHAT_TEMPLATE}[{i}] ({})", crate::report::quote(name)),
                    )),
                    _ => findings.extend(bad_shape(format!("key {CHAT_TEMPLATE}[{i}]"))),
                }
            }
            findings
        }
        _ => bad_shape(format!("key {CHAT_TEMPLATE}")),
    }
}

/// A standalone Jinja template file (`chat_template.jinja`, which
/// transformers reads beside `tokenizer_config.json`).
pub fn is_template_file(rel: &str) -> bool {
    base_name(rel).to_ascii_lowercase().ends_with(".jinja")
}

/// Checks a template file's content (`None`: too large to have been read).
pub fn check_template_file(content: Option<&[u8]>) -> Vec<Finding> {
    match content.map(std::str::from_utf8) {
        Some(Ok(s)) => template::check(s, "template"),
        _ => vec![Finding::new(
            template::rule::PARSE,
            Severity::High,
            "the template file is not UTF-8 text small enough to check",
            "",
        )],
    }
}

/// A config file whose bytes are some other format entirely (a pickle named
/// `config.json`, say): transformers would fail on it, or worse.
pub fn config_not_json(rel: &str, format: crate::sniff::Format) -> Finding {
    Finding::new(
        rule::CONFIG_JSON,
        Severity::High,
        format!("{} holds {format} data, not JSON", printable(base_name(rel))),
        "",
    )
}

/// Collects the JSON path of every `auto_map` key, at any depth.
/// serde_json's recursion limit bounds the depth of `value`.
fn find_auto_map(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    printable(key).into_owned()
                } else {
                    format!("{prefix}.{}", printable(key))
                };
                if key == AUTO_MAP {
                    out.push(path.clone());
                }
                find_auto_map(child, &path, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                find_auto_map(child, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
