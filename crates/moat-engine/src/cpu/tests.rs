//! The forward pass against a plain, cache-free reference written out here
//! line by line, and the batching and caching invariants the scheduler
//! relies on.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use super::model::{Arch, Config, Layer, Model, RopeStyle};
use super::quant::{QMatrix, QType};
use super::{BatchModel, SeqInput};
use crate::sampling::SplitMix64;

fn rand(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// Dense weights of a tiny model, kept as f32 for the reference.
#[derive(Clone)]
struct Dense {
    cfg: Config,
    embed: Vec<f32>,
    head: Vec<f32>,
    norm: Vec<f32>,
    layers: Vec<DenseLayer>,
}

#[derive(Clone)]
struct DenseLayer {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    bq: Vec<f32>,
    bk: Vec<f32>,
    bv: Vec<f32>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

fn config(arch: Arch, style: RopeStyle) -> Config {
    Config {
        arch,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        intermediate: 96,
        vocab: 101,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_style: style,
        rope_freq_factors: Vec::new(),
        context: 64,
        sliding_window: None,
    }
}

fn dense(cfg: Config, seed: u64) -> Dense {
    let mut r = SplitMix64::new(seed);
    let (h, q, kv, i) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
    let bias = cfg.arch == Arch::Qwen2;
    let norm = |r: &mut SplitMix64, n| rand(r, n, 0.2).into_iter().map(|x| 1.0 + x).collect::<Vec<_>>();
    let layers = (0..cfg.layers)
        .map(|_| DenseLayer {
            attn_norm: norm(&mut r, h),
            q: rand(&mut r, q * h, 0.3),
            k: rand(&mut r, kv * h, 0.3),
            v: rand(&mut r, kv * h, 0.3),
            bq: if bias { rand(&mut r, q, 0.1) } else { vec![0.0; q] },
            bk: if bias {
                rand(&mut r, kv, 0.1)
            } else {
                vec![0.0; kv]
            },
            bv: if bias {
                rand(&mut r, kv, 0.1)
            } else {
                vec![0.0; kv]
            },
            o: rand(&mut r, h * q, 0.2),
            ffn_norm: norm(&mut r, h),
            gate: rand(&mut r, i * h, 0.2),
            up: rand(&mut r, i * h, 0.2),
            down: rand(&mut r, h * i, 0.2),
        })
        .collect();
    Dense {
        embed: rand(&mut r, cfg.vocab * h, 1.0),
        head: rand(&mut r, cfg.vocab * h, 0.3),
        norm: norm(&mut r, h),
        layers,
        cfg,
    }
}

fn qm(rows: usize, cols: usize, w: &[f32]) -> QMatrix {
    QMatrix::from_f32(QType::F32, rows, cols, w).unwrap()
}

fn model(d: &Dense) -> Model {
    let c = &d.cfg;
    let (h, q, kv, i) = (c.hidden, c.q_dim(), c.kv_dim(), c.intermediate);
    let bias = |b: &Vec<f32>| (c.arch == Arch::Qwen2).then(|| b.clone());
    let layers = d
        .layers
        .iter()
        .map(|l| Layer {
            attn_norm: l.attn_norm.clone(),
            q: qm(q, h, &l.q),
            k: qm(kv, h, &l.k),
            v: qm(kv, h, &l.v),
            q_bias: bias(&l.bq),
            k_bias: bias(&l.bk),
            v_bias: bias(&l.bv),
            o: qm(h, q, &l.o),
            ffn_norm: l.ffn_norm.clone(),
            gate: qm(i, h, &l.gate),
            up: qm(i, h, &l.up),
            down: qm(h, i, &l.down),
        })
        .collect();
    Model::new(
        c.clone(),
        qm(c.vocab, h, &d.embed),
        layers,
        d.norm.clone(),
        Some(qm(c.vocab, h, &d.head)),
    )
    .unwrap()
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    x.iter().zip(w).map(|(x, w)| x / (ms + eps).sqrt() * w).collect()
}

fn rope(v: &mut [f32], pos: usize, c: &Config) {
    let half = c.head_dim / 2;
    for head in v.chunks_exact_mut(c.head_dim) {
        for i in 0..half {
            let f = c.rope_theta.powf(-2.0 * i as f32 / c.head_dim as f32)
                / c.rope_freq_factors.get(i).copied().unwrap_or(1.0);
            let (s, co) = (pos as f32 * f).sin_cos();
            let (a, b) = match c.rope_style {
                RopeStyle::Halves => (i, i + half),
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
            };
            let (x, y) = (head[a], head[b]);
            head[a] = x * co - y * s;
            head[b] = x * s + y * co;
        }
    }
}

/// The whole sequence recomputed from scratch, no cache: logits of the last
/// token.
fn reference(d: &Dense, tokens: &[u32]) -> Vec<f32> {
    let c = &d.cfg;
    let h = c.hidden;
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| d.embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in &d.layers {
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = rms(x, &l.attn_norm, c.rms_eps);
            let mut q: Vec<f32> = matvec(&l.q, &n).iter().zip(&l.bq).map(|(a, b)| a + b).collect();
            let mut k: Vec<f32> = matvec(&l.k, &n).iter().zip(&l.bk).map(|(a, b)| a + b).collect();
            let v: Vec<f32> = matvec(&l.v, &n).iter().zip(&l.bv).map(|(a, b)| a + b).collect();
            rope(&mut q, pos, c);
            rope(&mut k, pos, c);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f32; c.q_dim()];
            for head in 0..c.heads {
                let kvh = head / (c.heads / c.kv_heads);
                let hd = c.head_dim;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for dd in 0..hd {
                        att[head * hd + dd] += p / z * vs[j][kvh * hd + dd];
                    }
                }
            }
            let o = matvec(&l.o, &att);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n = rms(x, &l.ffn_norm, c.rms_eps);
            let g = matvec(&l.gate, &n);
            let u = matvec(&l.up, &n);
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = matvec(&l.down, &act);
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    let last = xs.last().unwrap();
    matvec(&d.head, &rms(last, &d.norm, c.rms_eps))
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= tol, "max |Δ| {worst} > {tol}");
}

fn step(m: &Model, cache: &mut super::KvCache, tokens: &[u32]) -> Vec<f32> {
    m.forward(&mut [SeqInput { tokens, cache }])
        .unwrap()
        .pop()
        .unwrap()
}

#[test]
fn matches_the_reference_for_both_architectures_and_rope_styles() {
    for (arch, style) in [
        (Arch::Qwen2, RopeStyle::Halves),
        (Arch::Llama, RopeStyle::Halves),
        (Arch::Llama, RopeStyle::Adjacent),
    ] {
        let d = dense(config(arch, style), 7);
        let m = model(&d);
        let tokens = [3u32, 17, 99, 42, 0, 64, 5];
        // Prefill in one go, then token by token: both against the reference.
        let mut cache = m.new_cache(32);
        close(
            &step(&m, &mut cache, &tokens[..4]),
            &reference(&d, &tokens[..4]),
            1e-4,
        );
        for n in 5..=tokens.len() {
            close(
                &step(&m, &mut cache, &tokens[n - 1..n]),
                &reference(&d, &tokens[..n]),
                1e-4,
            );
        }
        assert_eq!(cache.len(), tokens.len());
    }
}

#[test]
fn llama3_rope_factors_divide_the_frequencies() {
    let mut cfg = config(Arch::Llama, RopeStyle::Halves);
    cfg.rope_freq_factors = (0..cfg.head_dim / 2).map(|i| 1.0 + i as f32).collect();
    let d = dense(cfg, 9);
    let m = model(&d);
    let tokens = [1u32, 2, 3, 4, 5, 6];
    let mut cache = m.new_cache(8);
    close(&step(&m, &mut cache, &tokens), &reference(&d, &tokens), 1e-4);
}

#[test]
fn a_batch_gives_what_each_sequence_gives_alone() {
    let d = dense(config(Arch::Qwen2, RopeStyle::Halves), 11);
    let m = model(&d);
    let (a, b, c) = ([5u32, 6, 7], [80u32], [1u32, 2, 3, 4, 5, 6, 7, 8]);
    let alone: Vec<Vec<f32>> = [&a[..], &b[..], &c[..]]
        .iter()
        .map(|t| step(&m, &mut m.new_cache(16), t))
        .collect();
    let (mut ca, mut cb, mut cc) = (m.new_cache(16), m.new_cache(16), m.new_cache(16));
    let together = m
        .forward(&mut [
            SeqInput {
                tokens: &a,
                cache: &mut ca,
            },
            SeqInput {
                tokens: &b,
                cache: &mut cb,
            },
            SeqInput {
                tokens: &c,
                cache: &mut cc,
            },
        ])
        .unwrap();
    for (x, y) in alone.iter().zip(&together) {
        close(x, y, 1e-5);
    }
    // And a decode step of all three at once continues each correctly.
    let next = m
        .forward(&mut [
            SeqInput {
                tokens: &[9],
                cache: &mut ca,
            },
            SeqInput {
                tokens: &[9],
                cache: &mut cb,
            },
            SeqInput {
                tokens: &[9],
                cache: &mut cc,
            },
        ])
        .unwrap();
    close(&next[0], &reference(&d, &[5, 6, 7, 9]), 1e-4);
    close(&next[1], &reference(&d, &[80, 9]), 1e-4);
    close(&next[2], &reference(&d, &[1, 2, 3, 4, 5, 6, 7, 8, 9]), 1e-4);
}

#[test]
fn a_refused_step_changes_no_cache() {
    let d = dense(config(Arch::Qwen2, RopeStyle::Halves), 13);
    let m = model(&d);
    let mut ok = m.new_cache(8);
    let mut small = m.new_cache(2);
    step(&m, &mut ok, &[1, 2]);
    for bad in [&[1u32, 2, 3][..], &[500][..], &[][..]] {
        let e = m.forward(&mut [
            SeqInput {
                tokens: &[4],
                cache: &mut ok,
            },
            SeqInput {
                tokens: bad,
                cache: &mut small,
            },
        ]);
        assert!(e.is_err());
        assert_eq!((ok.len(), small.len()), (2, 0));
    }
    close(&step(&m, &mut ok, &[4]), &reference(&d, &[1, 2, 4]), 1e-4);
}

#[test]
fn sliding_window_limits_attention_only_from_its_first_layer() {
    let mut cfg = config(Arch::Qwen2, RopeStyle::Halves);
    let d = dense(cfg.clone(), 17);
    let tokens: Vec<u32> = (0..10).collect();
    let full = step(&model(&d), &mut model(&d).new_cache(16), &tokens);
    // A window that starts past the last layer changes nothing…
    cfg.sliding_window = Some((3, 2));
    let mut d2 = d.clone();
    d2.cfg = cfg.clone();
    close(
        &step(&model(&d2), &mut model(&d2).new_cache(16), &tokens),
        &full,
        1e-6,
    );
    // …one that applies does.
    cfg.sliding_window = Some((3, 0));
    d2.cfg = cfg;
    let windowed = step(&model(&d2), &mut model(&d2).new_cache(16), &tokens);
    assert!(windowed.iter().zip(&full).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn mixed_encodings_in_one_projection_are_applied_apart() {
    // Q4_K_M files store V (and some down projections) as Q6_K beside Q4_K
    // Q and K: the fused path must not be taken, and the result still holds.
    let d = dense(config(Arch::Qwen2, RopeStyle::Halves), 19);
    let c = &d.cfg;
    let (h, q, kv, i) = (c.hidden, c.q_dim(), c.kv_dim(), c.intermediate);
    let layers = d
        .layers
        .iter()
        .map(|l| Layer {
            attn_norm: l.attn_norm.clone(),
            q: qm(q, h, &l.q),
            k: qm(kv, h, &l.k),
            v: QMatrix::from_f32(QType::F16, kv, h, &l.v).unwrap(),
            q_bias: Some(l.bq.clone()),
            k_bias: Some(l.bk.clone()),
            v_bias: Some(l.bv.clone()),
            o: qm(h, q, &l.o),
            ffn_norm: l.ffn_norm.clone(),
            gate: qm(i, h, &l.gate),
            up: QMatrix::from_f32(QType::F16, i, h, &l.up).unwrap(),
            down: qm(h, i, &l.down),
        })
        .collect();
    let m = Model::new(
        c.clone(),
        qm(c.vocab, h, &d.embed),
        layers,
        d.norm.clone(),
        Some(qm(c.vocab, h, &d.head)),
    )
    .unwrap();
    let tokens = [4u32, 8, 15, 16, 23, 42];
    close(
        &step(&m, &mut m.new_cache(8), &tokens),
        &reference(&d, &tokens),
        2e-2,
    );
}

/// The GGUF demo (weights, vocabulary and template in one file) is the
/// safetensors demo of the same seed: same logits at F32, close at Q8_0,
/// and its vocabulary tokenizes like the demo's tokenizer.json.
#[test]
fn gguf_demo_matches_the_safetensors_demo() {
    use super::load::{WeightOptions, from_gguf, from_safetensors};
    use crate::demo::{DemoOptions, write_demo_model};
    let t = tempfile::tempdir().unwrap();
    let opts = WeightOptions {
        max_context: 64,
        quantize: None,
    };
    write_demo_model(&t.path().join("st"), &DemoOptions::default()).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("st/config.json")).unwrap()).unwrap();
    let st = std::fs::read(t.path().join("st/model.safetensors")).unwrap();
    let reference = from_safetensors(&config, &[("model.safetensors".into(), st)], opts).unwrap();
    let tokens = [10u32, 200, 3000, 7];
    let want = step(&reference, &mut reference.new_cache(8), &tokens);
    // In-situ quantisation of the same float weights: a quarter of the
    // bytes, logits close.
    let st = std::fs::read(t.path().join("st/model.safetensors")).unwrap();
    let q8 = from_safetensors(
        &config,
        &[("model.safetensors".into(), st)],
        WeightOptions {
            quantize: Some(QType::Q8_0),
            ..opts
        },
    )
    .unwrap();
    assert!(q8.weight_bytes() * 3 < reference.weight_bytes());
    close(&step(&q8, &mut q8.new_cache(8), &tokens), &want, 0.1);
    for (q, tol) in [(QType::F32, 1e-5), (QType::Q8_0, 0.1)] {
        let dir = t.path().join(q.name());
        let d = DemoOptions {
            gguf: Some(q),
            ..DemoOptions::default()
        };
        write_demo_model(&dir, &d).unwrap();
        let bytes = std::fs::read(dir.join("model.gguf")).unwrap();
        let (m, g) = from_gguf(&bytes, opts).unwrap();
        close(&step(&m, &mut m.new_cache(8), &tokens), &want, tol);
        let from_vocab = super::vocab::tokenizer(&g).unwrap();
        let from_json = tokenizers::Tokenizer::from_file(t.path().join("st/tokenizer.json")).unwrap();
        for text in [
            "Why is the sky blue?",
            "<｜User｜>12345 héllo\n\n<think>a</think>",
        ] {
            assert_eq!(
                from_vocab.encode(text, false).unwrap().get_ids(),
                from_json.encode(text, false).unwrap().get_ids(),
                "{text:?}"
            );
        }
    }
}
