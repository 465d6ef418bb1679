//! SARIF 2.1.0 output (`moat scan --format sarif`), so code-scanning
//! dashboards and CI annotators can show scanner findings beside code
//! findings.
//!
//! Mapping: one run, tool `moat`; one rule per rule id seen, with a short
//! description of its family and help text; one result per finding with
//! level error (critical, high), warning (medium) or note (low); the file is
//! the artifact location (relative paths stay relative, percent-encoded), a
//! byte offset (`offset N`) becomes `region.byteOffset`, a `line L column C`
//! becomes a line/column region, and any other location a logical location.
//! Files that could not be analysed make `executionSuccessful` false and are
//! listed as tool execution notifications too, because "no result" must not
//! read as "clean". Validated against the official schema in
//! `tests/scanner/test_sarif_schema.py`.

use serde_json::{Value, json};

use crate::report::{Report, Severity, Verdict};

/// The schema URI SARIF consumers expect for 2.1.0.
pub const SCHEMA_URI: &str = "https://json.schemastore.org/sarif-2.1.0.json";

fn level(s: Severity) -> &'static str {
    match s {
        Severity::Critical | Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low => "note",
    }
}

/// A one-line description and help text for a rule id, by family.
fn describe(rule: &str) -> (&'static str, &'static str) {
    let family = rule.split('.').next().unwrap_or("");
    match family {
        "safetensors" => (
            "Safetensors header is not strictly valid",
            "Loaders may read different tensors from an ambiguous header. Re-export the weights with the reference safetensors library.",
        ),
        "gguf" => (
            "GGUF header is malformed or exceeds a limit",
            "A malformed GGUF header can exploit C++ loaders or hide data. Re-convert the model with llama.cpp's official tools.",
        ),
        "template" => (
            "Chat template can escape a Jinja sandbox",
            "Chat templates are code for a Jinja renderer (CVE-2024-34359). Replace the template with a reviewed one that uses no Python internals.",
        ),
        "keras" => (
            "Keras config runs code or imports foreign modules",
            "Lambda layers and module references execute code on load (CVE-2024-3660, CVE-2025-1550). Rebuild the model from Keras' own layers.",
        ),
        "onnx" => (
            "ONNX external data leaves the model folder",
            "External data locations must be plain relative paths inside the model folder (CVE-2024-27318).",
        ),
        "secrets" => (
            "Leaked credential",
            "A model must not ship a live credential. Revoke it, then remove it from the file and its history.",
        ),
        "hf" => (
            "Hugging Face folder asks to run code",
            "transformers would import Python from the model folder (trust_remote_code). Use a model that needs no remote code.",
        ),
        "fs" => (
            "File system entry that is not a plain file",
            "A model folder holds only regular files; links and special files are refused.",
        ),
        "io" => (
            "File could not be read or analysed",
            "Nothing is known about a file that could not be read; fix access and scan again.",
        ),
        "format" => (
            "Format that can carry executable payloads",
            "This format can run code when loaded and is not analysed; convert the weights to safetensors or exclude the file.",
        ),
        _ => (
            "Scanner finding",
            "See the finding message for the risk and what to do.",
        ),
    }
}

/// Percent-encodes a path for a URI reference; absolute paths become
/// `file://` URIs.
fn uri(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.starts_with('/') {
        format!("file://{out}")
    } else {
        out
    }
}

/// The location string as a region, when it names a byte offset or a line.
fn region(location: &str) -> Option<Value> {
    let mut words = location.split([' ', ',']).filter(|w| !w.is_empty());
    match (words.next(), words.next()) {
        (Some("offset"), Some(n)) => n.parse::<u64>().ok().map(|n| json!({ "byteOffset": n })),
        (Some("line"), Some(l)) => {
            let line = l.parse::<u64>().ok().filter(|l| *l >= 1)?;
            let column = match (words.next(), words.next()) {
                (Some("column"), Some(c)) => c.parse::<u64>().ok().filter(|c| *c >= 1),
                _ => None,
            };
            Some(match column {
                Some(c) => json!({ "startLine": line, "startColumn": c }),
                None => json!({ "startLine": line }),
            })
        }
        _ => None,
    }
}

impl Report {
    /// The report as a SARIF 2.1.0 log, on one line.
    pub fn to_sarif(&self) -> String {
        let value = self.to_sarif_value();
        serde_json::to_string(&value).unwrap_or_else(|e| {
            format!(
                "{{\"error\":{}}}",
                Value::String(format!("SARIF serialization failed: {e}"))
            )
        })
    }

    /// The report as a SARIF 2.1.0 JSON value.
    pub fn to_sarif_value(&self) -> Value {
        let mut rule_ids: Vec<&str> = Vec::new();
        let mut rules = Vec::new();
        let mut results = Vec::new();
        let mut notifications = Vec::new();
        for file in &self.files {
            let artifact = json!({ "uri": uri(&file.path) });
            for f in &file.findings {
                let index = match rule_ids.iter().position(|r| *r == f.rule) {
                    Some(i) => i,
                    None => {
                        let (short, help) = describe(&f.rule);
                        rule_ids.push(&f.rule);
                        rules.push(json!({
                            "id": f.rule,
                            "shortDescription": { "text": short },
                            "help": { "text": help },
                            "defaultConfiguration": { "level": level(f.severity) },
                        }));
                        rule_ids.len() - 1
                    }
                };
                let mut physical = json!({ "artifactLocation": artifact.clone() });
                if let Some(r) = region(&f.location) {
                    physical["region"] = r;
                }
                let mut location = json!({ "physicalLocation": physical });
                if !f.location.is_empty() {
                    location["logicalLocations"] = json!([{ "fullyQualifiedName": f.location }]);
                }
                results.push(json!({
                    "ruleId": f.rule,
                    "ruleIndex": index,
                    "level": level(f.severity),
                    "message": { "text": f.message },
                    "locations": [location],
                    "properties": { "severity": f.severity.as_str() },
                }));
            }
            if file.verdict == Verdict::Error {
                let why = file
                    .findings
                    .first()
                    .map(|f| f.message.as_str())
                    .unwrap_or("the file could not be analysed");
                notifications.push(json!({
                    "level": "error",
                    "message": { "text": format!("{}: {why}", file.path) },
                    "locations": [{ "physicalLocation": { "artifactLocation": artifact } }],
                }));
            }
        }
        let mut invocation = json!({ "executionSuccessful": self.summary.errors == 0 });
        if !notifications.is_empty() {
            invocation["toolExecutionNotifications"] = Value::Array(notifications);
        }
        json!({
            "$schema": SCHEMA_URI,
            "version": "2.1.0",
            "runs": [{
                "tool": { "driver": {
                    "name": "moat",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rules,
                }},
                "invocations": [invocation],
                "results": results,
            }],
        })
    }
}

#[cfg(test)]
mod tests;
