//! `probe`: the embedded engine's forward pass on a model file, for parity
//! tests against llama.cpp (`tests/engine`) and for `bench/engine.sh`.
//!
//! The model still goes through moat's pull and verification (into a
//! temporary store): the engine only ever sees verified bytes.
//!
//! ```text
//! probe --model PATH [--threads N] [--quantize q8_0|q4k] greedy --prompt 1,2,3 --steps 32
//!     → {"tokens":[...], "logits":[[...], ...]}   (logits[i] chose tokens[i])
//! probe --model PATH [--threads N] bench --prompt-tokens 512 --gen-tokens 64 [--reps 3] [--streams 8]
//!     → {"prompt_tok_s":…, "decode_tok_s":…, "streams":…, "aggregate_decode_tok_s":…,
//!        "weight_bytes":…, "rss_bytes":…}
//! ```
//! PATH is a `.gguf` file or a Hugging Face folder (config.json + safetensors).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods,
    reason = "a developer tool: fail loudly, exit 2 on bad usage"
)]

use moat_artifact::Store;
use moat_artifact::name::ModelName;
use moat_artifact::pull::{PullRequest, pull};
use moat_artifact::verify::load_verified;
use moat_engine::cpu::load::{WeightOptions, from_gguf, from_safetensors};
use moat_engine::cpu::quant::QType;
use moat_engine::cpu::{BatchModel, SeqInput};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: probe --model PATH [--threads N] [--quantize q8_0|q4k] \
         (greedy --prompt IDS --steps N | bench --prompt-tokens N --gen-tokens N [--reps N] [--streams N])"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    Some(
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage()),
    )
}

fn load(path: &Path, quantize: Option<QType>) -> Box<dyn BatchModel> {
    let t = tempfile::tempdir().unwrap();
    let src: PathBuf = if path.is_dir() {
        path.to_owned()
    } else {
        let d = t.path().join("src");
        std::fs::create_dir(&d).unwrap();
        let dst = d.join(path.file_name().unwrap());
        if std::fs::hard_link(path, &dst).is_err() {
            std::fs::copy(path, &dst).unwrap();
        }
        d
    };
    let store = Store::open(&t.path().join("store")).unwrap();
    let req = PullRequest {
        source: format!("file://{}", src.canonicalize().unwrap().display()),
        name: "m".into(),
        ..PullRequest::default()
    };
    pull(&store, &req).unwrap();
    let mut model = load_verified(&store.model_dir(&ModelName::parse("m").unwrap()).unwrap()).unwrap();
    let opts = WeightOptions {
        max_context: 1 << 20,
        quantize,
    };
    let names: Vec<String> = model.file_names().map(str::to_owned).collect();
    if let Some(g) = names.iter().find(|n| n.ends_with(".gguf")) {
        let bytes = model.take_file(g).unwrap();
        let (m, _) = from_gguf(&bytes, opts).unwrap_or_else(|e| panic!("{g}: {e}"));
        return Box::new(m);
    }
    let config: serde_json::Value = serde_json::from_slice(model.file("config.json").unwrap()).unwrap();
    let files: Vec<(String, Vec<u8>)> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .map(|n| (n.clone(), model.take_file(n).unwrap()))
        .collect();
    Box::new(from_safetensors(&config, &files, opts).unwrap_or_else(|e| panic!("{e}")))
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn greedy(m: &dyn BatchModel, prompt: &[u32], steps: usize) -> serde_json::Value {
    let mut cache = m.new_cache(prompt.len() + steps);
    let mut input = prompt.to_vec();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let l = m
            .forward(&mut [SeqInput {
                tokens: &input,
                cache: &mut cache,
            }])
            .unwrap()
            .pop()
            .unwrap();
        let t = argmax(&l);
        tokens.push(t);
        logits.push(l);
        input = vec![t];
    }
    serde_json::json!({ "tokens": tokens, "logits": logits })
}

/// Pseudo-random token ids (a fixed LCG: the same prompt every run).
fn prompt_ids(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1D_u64 ^ salt;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn bench(
    m: &dyn BatchModel,
    prompt_n: usize,
    gen_n: usize,
    reps: usize,
    streams: usize,
) -> serde_json::Value {
    let vocab = m.vocab_size();
    let (mut pp, mut tg, mut agg) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let prompt = prompt_ids(prompt_n, vocab, rep as u64);
        let mut cache = m.new_cache(prompt_n + gen_n + 1);
        let t = Instant::now();
        let l = m
            .forward(&mut [SeqInput {
                tokens: &prompt,
                cache: &mut cache,
            }])
            .unwrap();
        pp.push(prompt_n as f64 / t.elapsed().as_secs_f64());
        let mut tok = argmax(&l[0]);
        let t = Instant::now();
        for _ in 0..gen_n {
            let l = m
                .forward(&mut [SeqInput {
                    tokens: &[tok],
                    cache: &mut cache,
                }])
                .unwrap();
            tok = argmax(&l[0]);
        }
        tg.push(gen_n as f64 / t.elapsed().as_secs_f64());
        if streams > 1 {
            // `streams` sequences with short prompts, decoded together.
            let mut caches: Vec<_> = (0..streams).map(|_| m.new_cache(16 + gen_n + 1)).collect();
            let prompts: Vec<Vec<u32>> = (0..streams)
                .map(|s| prompt_ids(16, vocab, 100 + s as u64))
                .collect();
            let mut batch: Vec<SeqInput> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, c)| SeqInput { tokens: p, cache: c })
                .collect();
            let mut toks: Vec<u32> = m.forward(&mut batch).unwrap().iter().map(|l| argmax(l)).collect();
            let t = Instant::now();
            for _ in 0..gen_n {
                let inputs: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
                let mut batch: Vec<SeqInput> = inputs
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(p, c)| SeqInput { tokens: p, cache: c })
                    .collect();
                toks = m.forward(&mut batch).unwrap().iter().map(|l| argmax(l)).collect();
            }
            agg.push((streams * gen_n) as f64 / t.elapsed().as_secs_f64());
        }
    }
    serde_json::json!({
        "prompt_tok_s": median(pp),
        "decode_tok_s": median(tg),
        "streams": streams,
        "aggregate_decode_tok_s": if agg.is_empty() { serde_json::Value::Null } else { median(agg).into() },
        "weight_bytes": m.weight_bytes(),
        "rss_bytes": rss_bytes(),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path: PathBuf = arg(&args, "--model").unwrap_or_else(|| usage());
    let threads: usize = arg(&args, "--threads").unwrap_or(0);
    let quantize = match arg::<String>(&args, "--quantize").as_deref() {
        None => None,
        Some("q8_0") => Some(QType::Q8_0),
        Some("q4k") => Some(QType::Q4K),
        Some(_) => usage(),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let m = load(&path, quantize);
    let out = if args.iter().any(|a| a == "greedy") {
        let prompt: String = arg(&args, "--prompt").unwrap_or_else(|| usage());
        let prompt: Vec<u32> = prompt
            .split(',')
            .map(|t| t.trim().parse().unwrap_or_else(|_| usage()))
            .collect();
        let steps = arg(&args, "--steps").unwrap_or(32);
        pool.install(|| greedy(m.as_ref(), &prompt, steps))
    } else if args.iter().any(|a| a == "bench") {
        let p = arg(&args, "--prompt-tokens").unwrap_or(512);
        let g = arg(&args, "--gen-tokens").unwrap_or(64);
        let reps = arg(&args, "--reps").unwrap_or(3);
        let streams = arg(&args, "--streams").unwrap_or(1);
        pool.install(|| bench(m.as_ref(), p, g, reps, streams))
    } else {
        usage()
    };
    println!("{out}");
}
