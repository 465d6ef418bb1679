//! Times `QMatrix::matmul` on DeepSeek-R1-Distill-Qwen-1.5B's shapes (hidden
//! 1536, kv 256, intermediate 8960, vocab 151936, 28 layers) at one token
//! (decode) and 512 tokens (prompt), on a 2-thread rayon pool, and turns the
//! medians into whole-model estimates: the matmuls are nearly all of a
//! forward pass, so these bound what the engine can reach.
//!
//! `cargo run --release -p moat-engine --example qbench [TYPES] [RUNS] [decode]`,
//! TYPES a comma list of Q8_0,Q4_0,Q4_K,Q6_K,F16 (default all), RUNS per
//! median (default 5); `decode` skips the 512-token runs (for `perf stat`
//! of the decode kernels alone). Weights are random well-formed ggml bytes: speed does
//! not depend on the values, and quantising 1.5B floats would take minutes.

use std::time::Instant;

use moat_engine::cpu::quant::{Level, QMatrix, QType};

const LAYERS: usize = 28;
const PROMPT: usize = 512;

/// (name, rows, cols) of one layer's matmuls, then the head.
const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv", 1536 + 512, 1536),
    ("o", 1536, 1536),
    ("gate_up", 2 * 8960, 1536),
    ("down", 1536, 8960),
];
const HEAD: (&str, usize, usize) = ("head", 151_936, 1536);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Random ggml bytes with small finite f16 scales where the format has them.
fn random_matrix(t: QType, rows: usize, cols: usize, rng: &mut Rng) -> Result<QMatrix, String> {
    let len = rows * t.row_bytes(cols).ok_or("bad cols")?;
    let mut b = Vec::with_capacity(len + 8);
    while b.len() < len {
        b.extend(rng.next().to_le_bytes());
    }
    b.truncate(len);
    let small = 0x2000u16.to_le_bytes(); // f16 ~0.0078
    let bb = t.block_bytes();
    for blk in b.chunks_exact_mut(bb) {
        match t {
            QType::F16 => blk.copy_from_slice(&(0x2000 | (blk[0] as u16 & 0x83ff)).to_le_bytes()),
            QType::Q8_0 | QType::Q4_0 => blk[..2].copy_from_slice(&small),
            QType::Q4K => {
                blk[..2].copy_from_slice(&small);
                blk[2..4].copy_from_slice(&small);
            }
            QType::Q6K => blk[208..].copy_from_slice(&small),
            _ => {}
        }
    }
    QMatrix::from_ggml(t, rows, cols, &b).map_err(|e| e.to_string())
}

/// (median, best) seconds of `runs` calls after one warm-up call. The best
/// is what a quiet machine gives; the median shows contention when the two
/// differ.
fn time_runs(runs: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<(f64, f64), String> {
    f()?; // warm caches and pages
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok((v[v.len() / 2], v[0]))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let types: Vec<QType> = match args.get(1) {
        Some(list) => list
            .split(',')
            .map(|s| {
                QType::ALL
                    .into_iter()
                    .find(|t| t.name().eq_ignore_ascii_case(s))
                    .ok_or(format!("type {s}?"))
            })
            .collect::<Result<_, _>>()?,
        None => vec![QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q6K, QType::F16],
    };
    let runs: usize = args
        .get(2)
        .map(|s| s.parse().map_err(|_| "RUNS?".to_string()))
        .transpose()?
        .unwrap_or(5);
    let decode_only = args.get(3).is_some_and(|s| s == "decode");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .map_err(|e| e.to_string())?;
    println!("kernel level {:?}, 2 threads, median of {runs}", Level::detect());
    println!(
        "{:<6} {:<8} {:>10} {:>8} {:>8} {:>12} {:>10} {:>8}",
        "type", "matrix", "n=1 ms", "best", "GB/s", "n=512 ms", "best", "GMAC/s"
    );
    println!("(GB/s and GMAC/s from the best run; median is what the machine gave under its load)");
    let mut rng = Rng(42);
    let mut summary = Vec::new();
    for t in types {
        // [median, best] estimates.
        let (mut dec, mut pre) = ([0f64; 2], [0f64; 2]);
        for (i, &(name, rows, cols)) in SHAPES.iter().chain([&HEAD]).enumerate() {
            let m = random_matrix(t, rows, cols, &mut rng)?;
            let x1: Vec<f32> = (0..cols)
                .map(|k| ((k * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut y1 = vec![0f32; rows];
            let (t1, b1) =
                pool.install(|| time_runs(runs, || m.matmul(&x1, 1, &mut y1).map_err(|e| e.to_string())))?;
            let gbs = m.size_bytes() as f64 / b1 / 1e9;
            let is_head = i == SHAPES.len();
            let mut line = format!(
                "{:<6} {:<8} {:>10.3} {:>8.3} {:>8.1}",
                t.name(),
                name,
                t1 * 1e3,
                b1 * 1e3,
                gbs
            );
            if is_head {
                // The prompt needs the head for its last token only.
                for (k, v) in [t1, b1].into_iter().enumerate() {
                    dec[k] += v;
                    pre[k] += v;
                }
            } else if decode_only {
                dec[0] += LAYERS as f64 * t1;
                dec[1] += LAYERS as f64 * b1;
            } else {
                dec[0] += LAYERS as f64 * t1;
                dec[1] += LAYERS as f64 * b1;
                let xp: Vec<f32> = (0..PROMPT * cols)
                    .map(|k| ((k * 7919) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                let mut yp = vec![0f32; PROMPT * rows];
                let (tp, bp) = pool.install(|| {
                    time_runs(runs.min(3), || {
                        m.matmul(&xp, PROMPT, &mut yp).map_err(|e| e.to_string())
                    })
                })?;
                pre[0] += LAYERS as f64 * tp;
                pre[1] += LAYERS as f64 * bp;
                let gmac = (rows * cols * PROMPT) as f64 / bp / 1e9;
                line += &format!(" {:>12.2} {:>10.2} {:>8.1}", tp * 1e3, bp * 1e3, gmac);
            }
            println!("{line}");
        }
        summary.push(format!(
            "{:<6} decode ~{:>6.1} tok/s (median {:>5.1})   prompt(512) ~{:>6.1} tok/s (median {:>5.1})   \
             (best runs; matmuls only)",
            t.name(),
            1.0 / dec[1],
            1.0 / dec[0],
            PROMPT as f64 / pre[1],
            PROMPT as f64 / pre[0]
        ));
    }
    println!();
    for s in summary {
        println!("{s}");
    }
    Ok(())
}
