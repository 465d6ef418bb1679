//! Tests of the demo model: the tiny preset is written for real and loaded by
//! the `tokenizers` crate, minijinja and candle; the 1.5B preset is checked
//! only on paper (its tensor list), since writing it takes gigabytes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2;

use super::spec::{Architecture, tensor_specs};
use super::weights::{MAX_SHARD_BYTES, f32_to_bf16, f32_to_f16, plan_shards, tensor_bytes};
use super::*;

fn write_tiny(dir: &Path, seed: u64, dtype: Option<WeightDtype>) -> DemoSummary {
    write_demo_model(
        dir,
        &DemoOptions {
            seed,
            preset: Preset::Tiny,
            dtype,
            gguf: None,
        },
    )
    .expect("tiny demo model is written")
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
}

fn tiny_tokenizer() -> (tempfile::TempDir, tokenizers::Tokenizer) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny(dir.path(), 7, None);
    let tok =
        tokenizers::Tokenizer::from_bytes(read(dir.path(), "tokenizer.json")).expect("tokenizer.json loads");
    (dir, tok)
}

#[test]
fn demo_tiny_writes_the_expected_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = write_tiny(dir.path(), 0, None);
    let names: Vec<&str> = summary.files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for (name, size) in &summary.files {
        let on_disk = std::fs::metadata(dir.path().join(name))
            .expect("file exists")
            .len();
        assert_eq!(on_disk, *size, "{name}");
    }
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 5);
    assert_eq!(summary.parameters, Preset::Tiny.parameters());
    let weights = summary.files.iter().find(|(n, _)| n == "model.safetensors");
    assert!(weights.is_some_and(|(_, size)| *size > summary.parameters * 4));
    eprintln!("tiny files: {:?}", summary.files);
}

#[test]
fn demo_same_seed_same_bytes_other_seed_other_weights() {
    let (a, b, c) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let sa = write_tiny(a.path(), 42, None);
    let sb = write_tiny(b.path(), 42, None);
    let sc = write_tiny(c.path(), 43, None);
    assert_eq!(sa, sb);
    assert_eq!(sa, sc, "sizes do not depend on the seed");
    for (name, _) in &sa.files {
        assert!(
            read(a.path(), name) == read(b.path(), name),
            "{name} differs for one seed"
        );
    }
    assert!(read(a.path(), "model.safetensors") != read(c.path(), "model.safetensors"));
    assert!(read(a.path(), "tokenizer.json") == read(c.path(), "tokenizer.json"));
}

#[test]
fn demo_refuses_a_non_empty_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("keep.txt"), b"mine").expect("write");
    let err = write_demo_model(dir.path(), &DemoOptions::default()).expect_err("refused");
    assert!(matches!(err, DemoError::NotEmpty(_)), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 1);

    let file = dir.path().join("keep.txt");
    let err = write_demo_model(&file, &DemoOptions::default()).expect_err("refused");
    assert!(matches!(err, DemoError::NotEmpty(_)), "{err}");

    // A missing directory (and its parents) is created.
    let nested = dir.path().join("a/b");
    write_demo_model(&nested, &DemoOptions::default()).expect("created");
    assert!(nested.join("config.json").is_file());
}

#[test]
fn demo_parses_presets_and_dtypes() {
    assert_eq!("tiny".parse::<Preset>().ok(), Some(Preset::Tiny));
    assert_eq!(
        "r1-distill-qwen-1.5b".parse::<Preset>().ok(),
        Some(Preset::R1DistillQwen1_5b)
    );
    let err = "huge".parse::<Preset>().expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown demo preset `huge` (valid: tiny, r1-distill-qwen-1.5b)"
    );
    for d in [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16] {
        assert_eq!(d.to_string().parse::<WeightDtype>().ok(), Some(d));
    }
    let err = "fp8".parse::<WeightDtype>().expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown weight dtype `fp8` (valid: f32, f16, bf16)"
    );
    assert_eq!(Preset::Tiny.default_dtype(), WeightDtype::F32);
    assert_eq!(Preset::R1DistillQwen1_5b.default_dtype(), WeightDtype::Bf16);
}

#[test]
fn demo_config_json_matches_the_qwen2_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny(dir.path(), 1, None);
    let raw: serde_json::Value = serde_json::from_slice(&read(dir.path(), "config.json")).expect("json");
    let keys: Vec<&str> = raw
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "architectures",
            "attention_dropout",
            "bos_token_id",
            "eos_token_id",
            "hidden_act",
            "hidden_size",
            "initializer_range",
            "intermediate_size",
            "max_position_embeddings",
            "max_window_layers",
            "model_type",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "sliding_window",
            "tie_word_embeddings",
            "torch_dtype",
            "transformers_version",
            "use_cache",
            "use_mrope",
            "use_sliding_window",
            "vocab_size"
        ]
    );
    assert_eq!(raw["torch_dtype"], "float32");
    assert_eq!(raw["bos_token_id"], 4091);
    assert_eq!(raw["eos_token_id"], 4088);
    let cfg: qwen2::Config = serde_json::from_value(raw).expect("candle's qwen2 config");
    assert_eq!(cfg.hidden_size, 128);
    assert_eq!(cfg.vocab_size, 4096);
    assert_eq!(cfg.num_key_value_heads, 2);
    assert!(!cfg.tie_word_embeddings);

    let generation: serde_json::Value =
        serde_json::from_slice(&read(dir.path(), "generation_config.json")).expect("json");
    assert_eq!(
        generation,
        serde_json::json!({
            "_from_model_config": true,
            "bos_token_id": 4091,
            "eos_token_id": 4088,
            "do_sample": true,
            "temperature": 0.6,
            "top_p": 0.95,
            "transformers_version": "4.44.0"
        })
    );
}

#[test]
fn demo_tokenizer_loads_and_round_trips() {
    let (_dir, tok) = tiny_tokenizer();
    assert_eq!(tok.get_vocab_size(true), 4096);
    assert_eq!(tok.get_vocab_size(false), 4096);
    let vocab = tok.get_vocab(true);
    let mut ids: Vec<u32> = vocab.values().copied().collect();
    ids.sort_unstable();
    assert!(ids.iter().copied().eq(0..4096), "ids 0..4096 all used once");
    assert_eq!(tok.id_to_token(0).as_deref(), Some("!"));
    assert_eq!(tok.id_to_token(188).as_deref(), Some("Ā"));

    let texts = [
        "Hello, world! The harbour town woke slowly that morning.",
        "  leading spaces, trailing spaces   ",
        "tabs\tand\nnewlines\r\n\n\nand digits 1234567890",
        "emoji 🦀🚀👩‍👩‍👧 and flags 🇫🇷",
        "中文、日本語のテキスト、한국어 텍스트",
        "combining: e\u{301} vs \u{e9}; zero width: a\u{200b}b; NUL: \u{0}; DEL \u{7f}",
        "code: fn main() { println!(\"{}\", 1 + 2); } // done",
        "",
    ];
    for text in texts {
        let enc = tok.encode(text, false).expect("encode");
        let back = tok.decode(enc.get_ids(), false).expect("decode");
        assert_eq!(back, text);
    }

    // English from the corpus style compresses; the merges are in use.
    let enc = tok
        .encode("The weather was cold, and the people walked to the boats.", false)
        .expect("encode");
    assert!(enc.get_ids().len() < 20, "{:?}", enc.get_tokens());
}

#[test]
fn demo_special_tokens_are_single_ids_at_the_end() {
    let (dir, tok) = tiny_tokenizer();
    let expected = [
        ("<｜end▁of▁sentence｜>", 4088),
        ("<｜User｜>", 4089),
        ("<｜Assistant｜>", 4090),
        ("<｜begin▁of▁sentence｜>", 4091),
        ("<|EOT|>", 4092),
        ("<think>", 4093),
        ("</think>", 4094),
        ("<｜pad｜>", 4095),
    ];
    for (content, id) in expected {
        assert_eq!(tok.token_to_id(content), Some(id), "{content}");
        let enc = tok.encode(content, false).expect("encode");
        assert_eq!(enc.get_ids(), [id], "{content}");
    }

    let text = "<｜User｜>Hi<｜Assistant｜><think>\nhmm\n</think>\n\nHello<｜end▁of▁sentence｜>";
    let enc = tok.encode(text, false).expect("encode");
    let ids = enc.get_ids();
    assert_eq!(ids[0], 4089);
    assert_eq!(ids[ids.len() - 1], 4088);
    assert!(ids.contains(&4093) && ids.contains(&4094));
    assert_eq!(tok.decode(ids, false).expect("decode"), text);
    // Special tokens are skipped, the reasoning markers are kept.
    assert_eq!(
        tok.decode(ids, true).expect("decode"),
        "Hi<think>\nhmm\n</think>\n\nHello"
    );

    // Like DeepSeek's tokenizer, add_special_tokens = true prepends BOS.
    let enc = tok.encode("Hi", true).expect("encode");
    assert_eq!(enc.get_ids()[0], 4091);
    let enc = tok.encode("Hi", false).expect("encode");
    assert!(!enc.get_ids().contains(&4091));

    // Filler tokens decode to word-like text.
    let filler = tok.decode(&[3000, 3001, 3002, 3003], false).expect("decode");
    assert!(
        filler.chars().all(|c| c == ' ' || c.is_ascii_alphabetic()),
        "{filler:?}"
    );

    let raw: serde_json::Value = serde_json::from_slice(&read(dir.path(), "tokenizer.json")).expect("json");
    let added = raw["added_tokens"].as_array().expect("added_tokens");
    assert_eq!(added.len(), 8);
    for t in added {
        let content = t["content"].as_str().expect("content");
        let thinking = content.contains("think>");
        assert_eq!(t["special"], !thinking, "{content}");
        assert_eq!(t["normalized"], false);
    }
    assert_eq!(raw["model"]["type"], "BPE");
    assert_eq!(raw["model"]["ignore_merges"], false);
    assert_eq!(raw["model"]["byte_fallback"], false);
    assert!(raw["normalizer"].is_null());
    assert_eq!(raw["pre_tokenizer"]["pretokenizers"][0]["behavior"], "Isolated");
    let merges = raw["model"]["merges"].as_array().expect("merges").len();
    assert!((500..=3000).contains(&merges), "{merges} merges");
    eprintln!("tiny tokenizer: {merges} merges");
}

#[test]
fn demo_tokenizer_config_and_chat_template_render() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny(dir.path(), 3, None);
    let raw: serde_json::Value =
        serde_json::from_slice(&read(dir.path(), "tokenizer_config.json")).expect("json");
    assert_eq!(raw["add_bos_token"], true);
    assert_eq!(raw["add_eos_token"], false);
    assert_eq!(raw["bos_token"]["__type"], "AddedToken");
    assert_eq!(raw["bos_token"]["content"], "<｜begin▁of▁sentence｜>");
    assert_eq!(raw["eos_token"]["content"], "<｜end▁of▁sentence｜>");
    assert_eq!(raw["model_max_length"], 16384);
    assert_eq!(raw["tokenizer_class"], "LlamaTokenizerFast");
    let template = raw["chat_template"].as_str().expect("chat_template");
    assert_eq!(template, CHAT_TEMPLATE);

    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template).expect("template parses");
    let tmpl = env.get_template("chat").expect("template");
    let messages = serde_json::json!([
        { "role": "system", "content": "You are terse." },
        { "role": "user", "content": "Hi" },
        { "role": "assistant", "content": "<think>\nThey greet me.\n</think>\n\nHello!" },
        { "role": "user", "content": "2+2?" }
    ]);
    let render = |add_generation_prompt: Option<bool>| {
        let ctx = match add_generation_prompt {
            Some(add) => minijinja::context! {
                messages => minijinja::value::Serde(&messages),
                bos_token => "<｜begin▁of▁sentence｜>",
                eos_token => "<｜end▁of▁sentence｜>",
                add_generation_prompt => add,
            },
            None => minijinja::context! {
                messages => minijinja::value::Serde(&messages),
                bos_token => "<｜begin▁of▁sentence｜>",
                eos_token => "<｜end▁of▁sentence｜>",
            },
        };
        tmpl.render(ctx).expect("renders")
    };
    let base = "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>\n\nHello!\
                <｜end▁of▁sentence｜><｜User｜>2+2?";
    assert_eq!(render(Some(true)), format!("{base}<｜Assistant｜>"));
    assert_eq!(render(Some(false)), base);
    assert_eq!(render(None), base);

    // Two system prompts are joined by a blank line; no system prompt, no text.
    let two = serde_json::json!([
        { "role": "system", "content": "A." },
        { "role": "system", "content": "B." },
        { "role": "user", "content": "x" }
    ]);
    let out = tmpl
        .render(minijinja::context! {
            messages => minijinja::value::Serde(&two), bos_token => "<s>", add_generation_prompt => true
        })
        .expect("renders");
    assert_eq!(out, "<s>A.\n\nB.<｜User｜>x<｜Assistant｜>");
}

/// Loads `model.safetensors` with candle (no mmap: from bytes).
fn load_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load_buffer(&read(dir, "model.safetensors"), &Device::Cpu)
        .expect("safetensors loads")
}

#[test]
fn demo_tiny_runs_in_candle_and_greedy_decoding_varies() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny(dir.path(), 0, None);
    let bytes = read(dir.path(), "model.safetensors");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    assert_eq!(header_len % 8, 0);
    assert!(bytes[8..].starts_with(br#"{"__metadata__":{"format":"pt"},"model.embed_tokens.weight":"#));

    let tensors = load_tensors(dir.path());
    assert_eq!(tensors.len(), 3 + 12 * 4);
    for (name, t) in &tensors {
        assert_eq!(t.dtype(), DType::F32, "{name}");
    }
    let norm = tensors["model.norm.weight"].to_vec1::<f32>().expect("norm");
    assert!(norm.iter().all(|&v| v == 1.0));
    let q = tensors["model.layers.0.self_attn.q_proj.weight"]
        .flatten_all()
        .expect("flatten")
        .to_vec1::<f32>()
        .expect("q");
    let mean = q.iter().sum::<f32>() / q.len() as f32;
    let std = (q.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / q.len() as f32).sqrt();
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
        "mean {mean} std {std}"
    );

    let cfg: qwen2::Config = serde_json::from_slice(&read(dir.path(), "config.json")).expect("config");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).expect("model builds");

    let tok = tokenizers::Tokenizer::from_bytes(read(dir.path(), "tokenizer.json")).expect("tok");
    let prompt = tok
        .encode("<｜User｜>Why is the sky blue?<｜Assistant｜>", true)
        .expect("encode");
    let prompt: Vec<u32> = prompt.get_ids().to_vec();
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("input");
    let mut logits = model.forward(&input, 0).expect("forward");
    assert_eq!(logits.dims(), [1, 1, 4096]);
    let mut generated = Vec::new();
    for pos in prompt.len()..prompt.len() + 10 {
        let next = logits
            .i((0, 0))
            .and_then(|l| l.argmax(0))
            .and_then(|t| t.to_scalar::<u32>())
            .expect("argmax");
        generated.push(next);
        let input = Tensor::new(&[next], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        logits = model.forward(&input, pos).expect("decode step");
        assert_eq!(logits.dims(), [1, 1, 4096]);
    }
    eprintln!(
        "greedy: {generated:?} = {:?}",
        tok.decode(&generated, false).expect("decode")
    );
    assert!(
        generated.iter().any(|&t| t != generated[0]),
        "degenerate greedy output {generated:?}"
    );
    let distinct: std::collections::BTreeSet<u32> = generated.iter().copied().collect();
    assert!(distinct.len() >= 3, "{generated:?}");
}

#[test]
fn demo_half_precision_files_hold_the_rounded_f32_weights() {
    let (a, b, c) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let full = write_tiny(a.path(), 5, None);
    let bf16 = write_tiny(b.path(), 5, Some(WeightDtype::Bf16));
    let f16 = write_tiny(c.path(), 5, Some(WeightDtype::F16));
    let size = |s: &DemoSummary| {
        s.files
            .iter()
            .find(|(n, _)| n == "model.safetensors")
            .map(|(_, size)| *size)
            .unwrap_or(0)
    };
    // Same data, headers differ by the dtype names ("BF16" vs "F16").
    assert!(size(&bf16) < size(&full) / 2 + 8192);
    assert!(size(&f16) < size(&full) / 2 + 8192);
    let config: serde_json::Value = serde_json::from_slice(&read(b.path(), "config.json")).expect("json");
    assert_eq!(config["torch_dtype"], "bfloat16");

    let full = load_tensors(a.path());
    for (dir, dtype) in [(b.path(), DType::BF16), (c.path(), DType::F16)] {
        let half = load_tensors(dir);
        assert_eq!(half.len(), full.len());
        for (name, t) in &full {
            let ours = &half[name];
            assert_eq!(ours.dtype(), dtype, "{name}");
            // candle converts with the `half` crate: round to nearest, ties to even.
            let expected = t
                .to_dtype(dtype)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("expected");
            let got = ours
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("got");
            assert!(expected == got, "{name} as {dtype:?}");
        }
    }
}

/// Exact decoding of IEEE half bits, for checking the encoder.
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1F);
    let man = f32::from(h & 0x3FF);
    match exp {
        0 => sign * man * 2f32.powi(-24),
        0x1F if man == 0.0 => sign * f32::INFINITY,
        0x1F => f32::NAN,
        _ => sign * (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
    }
}

#[test]
fn demo_f16_and_bf16_conversions_round_to_nearest_even() {
    let mut values = vec![
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        0.1,
        65504.0,
        65519.99,
        65520.0,
        1e9,
        -1e9,
        6.1e-5,
        6.0e-5,
        5.96e-8,
        2.98e-8,
        2.99e-8,
        1e-10,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
    ];
    let mut rng = super::rng::Xoshiro256::from_seed(9);
    for _ in 0..20_000 {
        values.push(f32::from_bits(rng.next_u64() as u32));
        values.push(rng.normalish() * 0.02);
        values.push(rng.normalish() * 1e-5);
    }
    values.retain(|v| !v.is_nan());
    let tensor = Tensor::new(values.as_slice(), &Device::Cpu).expect("tensor");
    let as_f16 = tensor
        .to_dtype(DType::F16)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f16");
    let as_bf16 = tensor
        .to_dtype(DType::BF16)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("bf16");
    for (i, &v) in values.iter().enumerate() {
        let ours = f16_to_f32(f32_to_f16(v));
        assert_eq!(ours.to_bits(), as_f16[i].to_bits(), "f16 of {v:e}");
        let ours = f32::from_bits(u32::from(f32_to_bf16(v)) << 16);
        assert_eq!(ours.to_bits(), as_bf16[i].to_bits(), "bf16 of {v:e}");
    }
    assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    assert!(f32::from_bits(u32::from(f32_to_bf16(f32::NAN)) << 16).is_nan());
}

#[test]
fn demo_r1_distill_layout_on_paper() {
    let arch = Architecture::for_preset(Preset::R1DistillQwen1_5b);
    let specs = tensor_specs(&arch);
    assert_eq!(specs.len(), 3 + 12 * 28);
    let params: u64 = specs.iter().map(|s| s.elements()).sum();
    assert_eq!(params, 1_777_088_000);
    assert_eq!(Preset::R1DistillQwen1_5b.parameters(), params);
    assert_eq!(Preset::R1DistillQwen1_5b.vocab_size(), 151_936);

    let shape = |name: &str| {
        specs
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.shape.clone())
            .unwrap_or_else(|| panic!("no tensor {name}"))
    };
    assert_eq!(shape("model.embed_tokens.weight"), [151_936, 1536]);
    assert_eq!(shape("lm_head.weight"), [151_936, 1536]);
    assert_eq!(shape("model.layers.27.self_attn.q_proj.weight"), [1536, 1536]);
    assert_eq!(shape("model.layers.27.self_attn.k_proj.weight"), [256, 1536]);
    assert_eq!(shape("model.layers.27.self_attn.v_proj.bias"), [256]);
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [1536, 8960]);
    assert_eq!(shape("model.norm.weight"), [1536]);
    assert!(!specs.iter().any(|s| s.name.contains("o_proj.bias")));

    for (dtype, shards) in [
        (WeightDtype::Bf16, 2),
        (WeightDtype::F16, 2),
        (WeightDtype::F32, 4),
    ] {
        let plan = plan_shards(&specs, dtype, MAX_SHARD_BYTES);
        assert_eq!(plan.len(), shards, "{dtype}");
        let flat: Vec<usize> = plan.iter().flatten().copied().collect();
        assert!(flat.iter().copied().eq(0..specs.len()), "order kept");
        for shard in &plan {
            let bytes: u64 = shard.iter().map(|&i| tensor_bytes(&specs[i], dtype)).sum();
            assert!(bytes <= MAX_SHARD_BYTES, "{dtype}: {bytes}");
        }
    }

    let config = spec::config_json(&arch, WeightDtype::Bf16, 151_931, 151_928);
    let cfg: qwen2::Config = serde_json::from_value(config.clone()).expect("candle config");
    assert_eq!(cfg.max_window_layers, 21);
    assert_eq!(cfg.max_position_embeddings, 131_072);
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["rope_theta"], 10000);
}

#[test]
fn demo_sharded_layout_is_written_with_an_index() {
    // The sharding path, exercised on the tiny preset with a small shard limit.
    let arch = Architecture::for_preset(Preset::Tiny);
    let specs = tensor_specs(&arch);
    let plan = plan_shards(&specs, WeightDtype::F32, 1 << 20);
    assert!(plan.len() >= 3);
    // The embedding alone (2 MiB) exceeds the limit and gets its own shard.
    assert_eq!(plan[0], [0]);
    let mut buf = Vec::new();
    let tensors: Vec<&spec::TensorSpec> = plan[1].iter().map(|&i| &specs[i]).collect();
    weights::write_safetensors(&mut buf, &tensors, WeightDtype::F32, 1).expect("written");
    let loaded = candle_core::safetensors::load_buffer(&buf, &Device::Cpu).expect("loads");
    assert_eq!(loaded.len(), tensors.len());
}

#[test]
fn demo_weights_do_not_depend_on_the_thread_count() {
    let arch = Architecture::for_preset(Preset::Tiny);
    let specs = tensor_specs(&arch);
    let tensors: Vec<&spec::TensorSpec> = specs.iter().collect();
    let mut one = Vec::new();
    weights::write_safetensors_with(&mut one, &tensors, WeightDtype::Bf16, 11, 1).expect("1");
    for workers in [2, 3, 64] {
        let mut many = Vec::new();
        weights::write_safetensors_with(&mut many, &tensors, WeightDtype::Bf16, 11, workers).expect("n");
        assert!(one == many, "{workers} workers");
    }
}

#[test]
fn demo_write_errors_stop_the_generators() {
    struct FailAfter(usize);
    impl std::io::Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 < buf.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let arch = Architecture::for_preset(Preset::Tiny);
    let specs = tensor_specs(&arch);
    let tensors: Vec<&spec::TensorSpec> = specs.iter().collect();
    let err = weights::write_safetensors_with(&mut FailAfter(3 << 20), &tensors, WeightDtype::F32, 0, 3)
        .expect_err("fails");
    assert_eq!(err.to_string(), "disk full");
}

#[test]
fn demo_r1_distill_tokenizer_fills_the_full_vocabulary() {
    let json = tokenizer::tokenizer_json(Preset::R1DistillQwen1_5b.vocab_size()).expect("built");
    let tok = tokenizers::Tokenizer::from_bytes(&json).expect("loads");
    assert_eq!(tok.get_vocab_size(true), 151_936);
    assert_eq!(tok.token_to_id("<｜end▁of▁sentence｜>"), Some(151_928));
    assert_eq!(tok.token_to_id("<｜begin▁of▁sentence｜>"), Some(151_931));
    assert_eq!(tok.token_to_id("<think>"), Some(151_933));
    assert_eq!(tok.token_to_id("<｜pad｜>"), Some(151_935));
    let text = "Same merges as tiny: 🦀 ok";
    let ids = tok.encode(text, false).expect("encode");
    assert_eq!(tok.decode(ids.get_ids(), false).expect("decode"), text);
}
