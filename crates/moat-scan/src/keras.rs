//! Keras model configs: `config.json` inside a `.keras` zip, and the
//! `model_config` attribute of a legacy HDF5 (`.h5`) model.
//!
//! Weights in either container are inert; the config is not. A `Lambda`
//! layer carries marshalled Python bytecode that Keras runs on load
//! (CVE-2024-3660), and every serialized object names a `module` that Keras
//! imports to find the class, which reached `os`, `builtins` or `subprocess`
//! even in `safe_mode` (CVE-2025-1550). So: Lambda layers and serialized
//! lambdas are critical; modules are an allowlist of Keras/TensorFlow
//! packages, well-known code-running modules outside it are critical, any
//! other module is high; functions from outside the function-bearing Keras
//! modules (activations, losses, ...) are high (`keras.utils.get_file` has
//! been used to write files at load).
//!
//! HDF5: h5py stores `model_config` as a string attribute, usually in a
//! global heap collection far from the attribute's name, so instead of
//! walking HDF5's B-trees the file is scanned for JSON texts: a `{` that does
//! not follow a printable byte (a top-level JSON text in binary surroundings)
//! is handed to serde_json, which stops at the end of one value and rejects
//! random bytes within a few bytes. Every object that parses is checked.
//! HDF5 itself carries no code, so a file without a config (weights only) is
//! clean. Limit: HDF5 can filter (compress) fractal-heap blocks, where a
//! config would not be visible; h5py does not write attributes that way.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::Value;

use crate::report::{Finding, Severity, quote};

/// Stable rule ids.
pub mod rule {
    pub const LAMBDA: &str = "keras.lambda";
    pub const MODULE: &str = "keras.module";
    pub const FUNCTION: &str = "keras.function";
    pub const CONFIG: &str = "keras.config";
    pub const IO_READ: &str = "io.read";
}

/// The HDF5 signature; also found at 512, 1024, 2048... when a user block
/// precedes the superblock.
pub const HDF5_MAGIC: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// Largest JSON config looked at in an HDF5 file.
pub const MAX_CONFIG_LEN: usize = 16 << 20;

/// HDF5 is read in windows of this size (plus [`MAX_CONFIG_LEN`] overlap).
const WINDOW: usize = 32 << 20;

/// At most this many findings per config.
const MAX_FINDINGS: usize = 50;

/// Module prefixes Keras and TensorFlow use for their own objects.
const ALLOWED_MODULES: &[&str] = &[
    "keras",
    "keras.layers",
    "keras.models",
    "keras.optimizers",
    "keras.losses",
    "keras.metrics",
    "keras.initializers",
    "keras.regularizers",
    "keras.constraints",
    "keras.activations",
    "keras.src",
];

/// Modules whose functions appear in real configs (activations, losses...).
const FUNCTION_MODULES: &[&str] = &[
    "activations",
    "losses",
    "metrics",
    "initializers",
    "regularizers",
    "constraints",
    "optimizers",
    "ops",
];

/// Top-level packages that reach code execution, files or the network.
const CODE_MODULES: &[&str] = &[
    "os",
    "posix",
    "nt",
    "builtins",
    "__builtin__",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pickle",
    "marshal",
    "types",
    "code",
    "codeop",
    "pty",
    "ctypes",
    "requests",
    "urllib",
    "webbrowser",
    "pdb",
    "commands",
    "operator",
    "functools",
];

/// Strips `tensorflow.` / `tf_keras` spellings to the `keras...` form.
fn canonical(module: &str) -> String {
    for (prefix, with) in [
        ("tensorflow.python.keras", "keras"),
        ("tensorflow.keras", "keras"),
        ("tf_keras", "keras"),
    ] {
        if let Some(rest) = module.strip_prefix(prefix)
            && (rest.is_empty() || rest.starts_with('.'))
        {
            return format!("{with}{rest}");
        }
    }
    module.to_owned()
}

fn module_allowed(module: &str) -> bool {
    let m = canonical(module);
    ALLOWED_MODULES
        .iter()
        .any(|a| m == *a || (m.starts_with(a) && m.as_bytes().get(a.len()) == Some(&b'.') && *a != "keras"))
}

/// Checks a Keras config (JSON bytes).
pub fn check_config(json: &[u8]) -> Vec<Finding> {
    match serde_json::from_slice::<Value>(json) {
        Ok(value) => check_value(&value),
        Err(e) => vec![Finding::new(
            rule::CONFIG,
            Severity::High,
            format!("the Keras config is not valid JSON ({e}); Keras would fail or read it differently"),
            format!("line {} column {}", e.line(), e.column()),
        )],
    }
}

/// Checks a parsed Keras config.
pub fn check_value(value: &Value) -> Vec<Finding> {
    let mut out = Vec::new();
    walk(value, "", &mut out);
    if out.len() > MAX_FINDINGS {
        let extra = out.len() - MAX_FINDINGS;
        out.truncate(MAX_FINDINGS);
        out.push(Finding::new(
            rule::CONFIG,
            Severity::High,
            format!("{extra} more findings in this config were not listed"),
            "",
        ));
    }
    out
}

fn walk(value: &Value, path: &str, out: &mut Vec<Finding>) {
    match value {
        Value::Object(map) => {
            let here = if path.is_empty() {
                "$".to_owned()
            } else {
                path.to_owned()
            };
            let class_name = map.get("class_name").and_then(Value::as_str);
            if class_name == Some("Lambda") {
                out.push(Finding::new(
                    rule::LAMBDA,
                    Severity::Critical,
                    "Lambda layer: its config holds marshalled Python bytecode that Keras runs when \
                     the model is loaded (CVE-2024-3660); rebuild the model without Lambda layers",
                    here.clone(),
                ));
            } else if class_name == Some("__lambda__")
                || map.get("function_type").and_then(Value::as_str) == Some("lambda")
            {
                out.push(Finding::new(
                    rule::LAMBDA,
                    Severity::Critical,
                    "serialized Python lambda: its bytecode runs when the config is deserialized",
                    here.clone(),
                ));
            }
            if let Some(module) = map.get("module").and_then(Value::as_str) {
                check_module(module, class_name, map.get("config"), &here, out);
            }
            if let Some(name) = map.get("registered_name").and_then(Value::as_str)
                && let Some((package, _)) = name.split_once('>')
                && !module_allowed(package)
            {
                out.push(Finding::new(
                    rule::MODULE,
                    Severity::High,
                    format!(
                        "registered object {} comes from package {}, outside Keras: loading it needs \
                         custom code",
                        quote(name),
                        quote(package)
                    ),
                    here.clone(),
                ));
            }
            for (k, child) in map {
                walk(child, &format!("{here}.{}", crate::report::printable(k)), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn check_module(
    module: &str,
    class_name: Option<&str>,
    config: Option<&Value>,
    here: &str,
    out: &mut Vec<Finding>,
) {
    let top = module.split('.').next().unwrap_or(module);
    if CODE_MODULES.contains(&top) {
        out.push(Finding::new(
            rule::MODULE,
            Severity::Critical,
            format!(
                "the config makes Keras import {} (class {}), a module that runs code or touches \
                 files; this bypasses safe_mode (CVE-2025-1550)",
                quote(module),
                quote(class_name.unwrap_or("?"))
            ),
            here,
        ));
        return;
    }
    if !module_allowed(module) {
        out.push(Finding::new(
            rule::MODULE,
            Severity::High,
            format!(
                "the config makes Keras import {}, which is not a Keras or TensorFlow module; \
                 only Keras' own modules are allowed",
                quote(module)
            ),
            here,
        ));
        return;
    }
    if class_name == Some("function") {
        let canon = canonical(module);
        let last = canon.rsplit('.').next().unwrap_or("");
        if !FUNCTION_MODULES.contains(&last) {
            let name = config.and_then(Value::as_str).unwrap_or("?");
            out.push(Finding::new(
                rule::FUNCTION,
                Severity::High,
                format!(
                    "the config calls function {} from {}: only activations, losses, metrics and \
                     similar functions belong in a model config",
                    quote(name),
                    quote(module)
                ),
                here,
            ));
        }
    }
}

/// Whether `head` starts with the HDF5 signature at 0 or at a user-block
/// offset (512, 1024, 2048) that fits in `head`.
pub fn is_hdf5(head: &[u8]) -> bool {
    [0usize, 512, 1024, 2048]
        .iter()
        .any(|&at| head.get(at..at + HDF5_MAGIC.len()) == Some(HDF5_MAGIC.as_slice()))
}

/// Scans an HDF5 stream for JSON configs and checks each.
pub fn check_hdf5<R: Read + Seek>(reader: R) -> io::Result<Vec<Finding>> {
    scan_windows(reader, WINDOW, MAX_CONFIG_LEN)
}

/// [`check_hdf5`] with explicit sizes, so tests can cross window edges.
fn scan_windows<R: Read + Seek>(mut reader: R, window: usize, max_config: usize) -> io::Result<Vec<Finding>> {
    let len = reader.seek(SeekFrom::End(0))?;
    let mut findings = Vec::new();
    let mut start: u64 = 0;
    let mut buf = Vec::new();
    while start < len {
        reader.seek(SeekFrom::Start(start))?;
        buf.clear();
        reader
            .by_ref()
            .take((window + max_config) as u64)
            .read_to_end(&mut buf)?;
        let scan_end = window.min(buf.len());
        let mut p = 0usize;
        while p < scan_end {
            let Some(rel) = buf
                .get(p..scan_end)
                .and_then(|s| s.iter().position(|&b| b == b'{'))
            else {
                break;
            };
            let at = p + rel;
            let prev_printable = at > 0 && buf.get(at - 1).is_some_and(|b| (0x20..0x7f).contains(b));
            if prev_printable && !(start == 0 && at == 0) {
                p = at + 1;
                continue;
            }
            let limit = buf.len().min(at + max_config);
            let slice = buf.get(at..limit).unwrap_or(&[]);
            let mut stream = serde_json::Deserializer::from_slice(slice).into_iter::<Value>();
            match stream.next() {
                Some(Ok(value)) if value.is_object() => {
                    let offset = start + at as u64;
                    findings.extend(check_value(&value).into_iter().map(|mut f| {
                        f.location = format!("offset {offset}, {}", f.location);
                        f
                    }));
                    p = at + stream.byte_offset().max(1);
                }
                _ => p = at + 1,
            }
        }
        start += window as u64;
    }
    Ok(findings)
}

/// Opens and scans an HDF5 file; I/O failures are `Err` with an `io.read`
/// finding.
pub fn check_hdf5_file(path: &Path) -> Result<Vec<Finding>, Vec<Finding>> {
    let io_err = |e: io::Error| {
        vec![Finding::new(
            rule::IO_READ,
            Severity::High,
            format!("cannot read the file: {e}"),
            "",
        )]
    };
    let file = File::open(path).map_err(io_err)?;
    check_hdf5(io::BufReader::new(file)).map_err(io_err)
}

#[cfg(test)]
pub(crate) mod tests;
