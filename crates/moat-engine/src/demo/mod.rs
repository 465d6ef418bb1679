//! `moat demo-model`: writes a random-weight Qwen2-architecture model in
//! Hugging Face layout that candle's `qwen2::ModelForCausalLM` loads and moat
//! can serve, deterministic per seed.
//!
//! Files: `config.json`, `generation_config.json`, `tokenizer.json` (a real
//! byte-level BPE tokenizer with DeepSeek's special tokens),
//! `tokenizer_config.json` (DeepSeek-R1-style chat template), and the weights:
//! `model.safetensors`, or shards `model-0000i-of-0000N.safetensors` plus
//! `model.safetensors.index.json` when they exceed 2 GB. Each file is written
//! under a temporary name and renamed when complete, so a crash never leaves a
//! truncated file under its final name. Same seed → byte-identical files.

mod gguf;
mod rng;
mod spec;
mod template;
mod tokenizer;
mod weights;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value, json};

pub use template::CHAT_TEMPLATE;
pub use tokenizer::SPECIAL_TOKENS;

/// Size and shape of the demo model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// A few MB: hidden 128, 4 layers, vocabulary 4096. For tests and demos.
    #[default]
    Tiny,
    /// DeepSeek-R1-Distill-Qwen-1.5B's exact shapes (1.78·10⁹ parameters),
    /// random weights. For benchmarks.
    R1DistillQwen1_5b,
}

impl Preset {
    const NAMES: [(&'static str, Preset); 2] = [
        ("tiny", Preset::Tiny),
        ("r1-distill-qwen-1.5b", Preset::R1DistillQwen1_5b),
    ];

    /// The name accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::R1DistillQwen1_5b => "r1-distill-qwen-1.5b",
        }
    }

    /// Weight dtype used when [`DemoOptions::dtype`] is `None`.
    pub fn default_dtype(self) -> WeightDtype {
        match self {
            Preset::Tiny => WeightDtype::F32,
            Preset::R1DistillQwen1_5b => WeightDtype::Bf16,
        }
    }

    /// Number of weights the preset's checkpoint holds.
    pub fn parameters(self) -> u64 {
        spec::tensor_specs(&spec::Architecture::for_preset(self))
            .iter()
            .map(spec::TensorSpec::elements)
            .sum()
    }

    /// Vocabulary size (of both the model and `tokenizer.json`).
    pub fn vocab_size(self) -> usize {
        spec::Architecture::for_preset(self).vocab
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = DemoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, preset)| preset)
            .ok_or_else(|| DemoError::UnknownPreset(s.to_owned()))
    }
}

/// Element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    /// The name accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }

    /// `torch_dtype` in `config.json`.
    fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::F16 => "float16",
            WeightDtype::Bf16 => "bfloat16",
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightDtype {
    type Err = DemoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16]
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| DemoError::UnknownDtype(s.to_owned()))
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DemoOptions {
    /// Seed of the weights (the tokenizer is the same for every seed).
    pub seed: u64,
    pub preset: Preset,
    /// `None`: the preset's default (tiny: f32, 1.5B: bf16).
    pub dtype: Option<WeightDtype>,
    /// Write one self-contained `model.gguf` (weights in this encoding,
    /// tokenizer and chat template in its metadata) instead of the Hugging
    /// Face files.
    pub gguf: Option<crate::cpu::quant::QType>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSummary {
    /// File names relative to the model folder, sorted, with their sizes in bytes.
    pub files: Vec<(String, u64)>,
    /// Number of weights in the checkpoint.
    pub parameters: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("unknown demo preset `{0}` (valid: tiny, r1-distill-qwen-1.5b)")]
    UnknownPreset(String),
    #[error("unknown weight dtype `{0}` (valid: f32, f16, bf16)")]
    UnknownDtype(String),
    #[error("{}: exists and is not an empty directory; refusing to write a demo model into it", .0.display())]
    NotEmpty(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the demo tokenizer: {0}")]
    Tokenizer(String),
    #[error("serializing {file}: {source}")]
    Json {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the demo model into `dir`, which is created if missing and must be
/// empty if it exists.
pub fn write_demo_model(dir: &Path, opts: &DemoOptions) -> Result<DemoSummary, DemoError> {
    prepare_dir(dir)?;
    let arch = spec::Architecture::for_preset(opts.preset);
    let dtype = opts.dtype.unwrap_or(opts.preset.default_dtype());
    let special = |content| {
        tokenizer::special_id(arch.vocab, content)
            .ok_or_else(|| DemoError::Tokenizer(format!("no id for special token {content}")))
    };
    let (bos, eos) = (special(tokenizer::BOS)?, special(tokenizer::EOS)?);

    if let Some(qtype) = opts.gguf {
        let specs = spec::tensor_specs(&arch);
        let tokenizer_json = tokenizer::tokenizer_json(arch.vocab)?;
        let file = write_file(dir, "model.gguf", |w| {
            gguf::write_gguf(w, &arch, &specs, &tokenizer_json, qtype, opts.seed)
        })?;
        return Ok(DemoSummary {
            files: vec![file],
            parameters: specs.iter().map(spec::TensorSpec::elements).sum(),
        });
    }

    let mut files = Vec::new();
    for (name, value) in [
        ("config.json", spec::config_json(&arch, dtype, bos, eos)),
        (
            "generation_config.json",
            template::generation_config_json(bos, eos),
        ),
        ("tokenizer_config.json", template::tokenizer_config_json()),
    ] {
        let bytes = json_bytes(name, &value)?;
        files.push(write_file(dir, name, |w| w.write_all(&bytes))?);
    }
    let tokenizer_json = tokenizer::tokenizer_json(arch.vocab)?;
    files.push(write_file(dir, "tokenizer.json", |w| {
        w.write_all(&tokenizer_json)
    })?);

    let specs = spec::tensor_specs(&arch);
    let shards = weights::plan_shards(&specs, dtype, weights::MAX_SHARD_BYTES);
    if let [only] = shards.as_slice() {
        let tensors: Vec<&spec::TensorSpec> = only.iter().map(|&i| &specs[i]).collect();
        files.push(write_file(dir, "model.safetensors", |w| {
            weights::write_safetensors(w, &tensors, dtype, opts.seed)
        })?);
    } else {
        let mut weight_map = Map::new();
        let mut total_size = 0u64;
        for (n, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", n + 1, shards.len());
            let tensors: Vec<&spec::TensorSpec> = shard.iter().map(|&i| &specs[i]).collect();
            for t in &tensors {
                weight_map.insert(t.name.clone(), Value::String(name.clone()));
                total_size += weights::tensor_bytes(t, dtype);
            }
            files.push(write_file(dir, &name, |w| {
                weights::write_safetensors(w, &tensors, dtype, opts.seed)
            })?);
        }
        let name = "model.safetensors.index.json";
        let index = json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let bytes = json_bytes(name, &index)?;
        files.push(write_file(dir, name, |w| w.write_all(&bytes))?);
    }

    files.sort();
    Ok(DemoSummary {
        files,
        parameters: specs.iter().map(spec::TensorSpec::elements).sum(),
    })
}

/// Pretty JSON with a final newline, as Hugging Face writes it.
fn json_bytes(file: &'static str, value: &Value) -> Result<Vec<u8>, DemoError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| DemoError::Json { file, source })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Creates `dir` if missing; refuses a non-directory or a non-empty directory.
fn prepare_dir(dir: &Path) -> Result<(), DemoError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_error(dir))
        }
        Err(e) => Err(io_error(dir)(e)),
        Ok(meta) if !meta.is_dir() => Err(DemoError::NotEmpty(dir.to_path_buf())),
        Ok(_) => match std::fs::read_dir(dir).map_err(io_error(dir))?.next() {
            None => Ok(()),
            Some(Ok(_)) => Err(DemoError::NotEmpty(dir.to_path_buf())),
            Some(Err(e)) => Err(io_error(dir)(e)),
        },
    }
}

/// Writes `dir/name` through a buffered temporary file renamed into place
/// when complete; returns the name and the size written.
fn write_file(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(String, u64), DemoError> {
    let path = dir.join(name);
    let partial = dir.join(format!(".{name}.partial"));
    let result = (|| {
        let file = File::create(&partial)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
        let size = file.metadata()?.len();
        drop(file);
        std::fs::rename(&partial, &path)?;
        Ok(size)
    })();
    match result {
        Ok(size) => Ok((name.to_owned(), size)),
        Err(e) => {
            // Best effort: the error that matters is the one being returned.
            let _ = std::fs::remove_file(&partial);
            Err(io_error(&path)(e))
        }
    }
}
