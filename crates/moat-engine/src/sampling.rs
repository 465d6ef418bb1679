//! Next-token choice from one step's logits, and the log-probabilities
//! reported to clients.
//!
//! The pipeline, in the order vLLM and llama.cpp apply it:
//! 1. penalties over the tokens *generated so far* in this choice (not the
//!    prompt): `repetition_penalty` with HF / llama.cpp semantics (a seen
//!    token's positive logit is divided by it, a negative one multiplied),
//!    then OpenAI's `presence_penalty` (subtracted once if the token was
//!    seen) and `frequency_penalty` (subtracted once per occurrence);
//! 2. temperature 0 is greedy (argmax of the penalised logits);
//! 3. else softmax at the temperature, then `top_k`, `top_p` (nucleus) and
//!    `min_p` (drop tokens below `min_p` × the most likely one's
//!    probability) filters, and a draw from what is left.
//!
//! The random generator is our own (SplitMix64), so a given seed picks the
//! same tokens across releases of any dependency. Ties are broken by token
//! id so the same logits always give the same order.
//!
//! Log-probabilities ([`logprobs`]) are the log-softmax of the *raw*
//! logits, before penalties, temperature and filters: the model's own
//! distribution, as vLLM reports by default.

use std::collections::HashMap;

/// SplitMix64: tiny, fast, and fully specified, hence stable across versions.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The seed of choice `index` of a request seeded with `seed`: choice 0
/// keeps the request's seed (so `n = 1` and the first of `n = 2` agree),
/// the others get independent streams.
pub fn choice_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        seed
    } else {
        SplitMix64::new(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
    }
}

/// Every sampling knob of one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps everything.
    pub top_p: f32,
    /// 0 keeps everything.
    pub top_k: usize,
    /// In [0, 1]; 0 keeps everything.
    pub min_p: f32,
    /// > 0; 1 is off.
    pub repetition_penalty: f32,
    /// In [-2, 2]; 0 is off.
    pub presence_penalty: f32,
    /// In [-2, 2]; 0 is off.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    fn penalised(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Occurrences of each token generated so far (for the penalties).
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: SplitMix64::new(seed),
            counts: HashMap::new(),
        }
    }

    /// Pick the next token from raw logits and remember it for the
    /// penalties. NaN logits are treated as -inf.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let tok = if self.params.penalised() && !self.counts.is_empty() {
            let mut l = logits.to_vec();
            self.apply_penalties(&mut l);
            self.choose(&l)
        } else {
            self.choose(logits)
        };
        *self.counts.entry(tok).or_insert(0) += 1;
        tok
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for (&tok, &count) in &self.counts {
            let Some(l) = logits.get_mut(tok as usize) else {
                continue;
            };
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            *l -= p.presence_penalty + p.frequency_penalty * count as f32;
        }
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let weight = |l: f32| {
            if l.is_nan() {
                0.0
            } else {
                ((l - max) * inv_t).exp()
            }
        };
        let filtered = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if !filtered {
            // Nothing to cut: draw straight from the whole distribution in
            // id order, no sort (the common case costs one pass).
            let total: f32 = logits.iter().map(|&l| weight(l)).sum();
            let r = self.rng.next_f64() as f32 * total;
            let mut acc = 0.0;
            let mut last = 0;
            for (i, &l) in logits.iter().enumerate() {
                let w = weight(l);
                if w > 0.0 {
                    last = i;
                    acc += w;
                    if r < acc {
                        return i as u32;
                    }
                }
            }
            return last as u32;
        }
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, weight(l)))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Only the head of the distribution is ever kept: sort a prefix
        // (top_k, or a guess widened until it holds the nucleus).
        let mut head = if p.top_k > 0 { p.top_k } else { 64 };
        loop {
            head = head.min(probs.len());
            if head < probs.len() {
                probs.select_nth_unstable_by(head, by_prob);
            }
            probs[..head].sort_by(by_prob);
            let mass: f32 = probs[..head].iter().map(|p| p.1).sum();
            if p.top_k > 0 || head == probs.len() || mass >= p.top_p * total {
                break;
            }
            head *= 8;
        }
        probs.truncate(head.max(1));
        // Nucleus: the smallest prefix whose mass reaches top_p of the whole.
        if p.top_p < 1.0 {
            let cutoff = p.top_p * total;
            let mut mass = 0.0;
            let mut kept = 0;
            for q in &probs {
                kept += 1;
                mass += q.1;
                if mass >= cutoff {
                    break;
                }
            }
            probs.truncate(kept.max(1));
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p;
            probs.retain(|q| q.1 >= floor);
        }
        let mass: f32 = probs.iter().map(|q| q.1).sum();
        let r = self.rng.next_f64() as f32 * mass;
        let mut acc = 0.0;
        for q in &probs {
            acc += q.1;
            if r < acc {
                return q.0;
            }
        }
        probs.last().map_or(argmax(logits), |q| q.0)
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// The log-probability of `token` and the `top` most likely tokens (most
/// likely first, ties by id), from the log-softmax of the raw `logits`.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_z = max + sum.ln() as f32;
    let lp = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l - log_z };
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    if top == 0 {
        return (chosen, Vec::new());
    }
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, lp(l)))
        .collect();
    let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = top.min(all.len());
    if k < all.len() {
        all.select_nth_unstable_by(k, by);
    }
    all.truncate(k);
    all.sort_by(by);
    (chosen, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        edit(&mut p);
        p
    }

    /// How often each token is drawn in `runs` single draws (fresh sampler
    /// each time, so no penalties carry over).
    fn histogram(p: &SamplingParams, logits: &[f32], runs: u64) -> Vec<u32> {
        let mut h = vec![0u32; logits.len()];
        for seed in 0..runs {
            let mut s = Sampler::new(p.clone(), seed);
            h[s.sample(logits) as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(params(|p| p.temperature = 0.0), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 / 3.0).collect();
        for p in [
            params(|p| p.temperature = 0.8),
            params(|p| {
                p.temperature = 0.8;
                p.top_p = 0.9;
                p.top_k = 20;
                p.min_p = 0.01;
            }),
        ] {
            let run = |seed| {
                let mut s = Sampler::new(p.clone(), seed);
                (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
            };
            assert_eq!(run(7), run(7));
            assert_ne!(run(7), run(8));
        }
    }

    #[test]
    fn choice_seeds_differ_and_choice_zero_keeps_the_seed() {
        assert_eq!(choice_seed(42, 0), 42);
        assert_ne!(choice_seed(42, 1), 42);
        assert_ne!(choice_seed(42, 1), choice_seed(42, 2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.5, 0.25, 0.125, 0.125]: top_p 0.7 keeps the
        // first two only, and draws both.
        let logits = [2.0f32.ln() * 2.0, 2.0f32.ln(), 0.0, 0.0];
        let h = histogram(&params(|p| p.top_p = 0.7), &logits, 400);
        assert_eq!(h[2] + h[3], 0, "{h:?}");
        assert!(h[0] > 0 && h[1] > 0, "{h:?}");
        // Without the filter all four are drawn.
        let h = histogram(&params(|_| {}), &logits, 400);
        assert!(h.iter().all(|&c| c > 0), "{h:?}");
    }

    #[test]
    fn top_p_nucleus_wider_than_the_first_guess() {
        // 200 equally likely tokens: the nucleus at 0.9 is 180 of them, more
        // than the 64 sorted first, so the prefix must be widened.
        let logits = vec![0.0f32; 200];
        let h = histogram(&params(|p| p.top_p = 0.9), &logits, 4000);
        let drawn = h.iter().filter(|&&c| c > 0).count();
        assert!(drawn > 150 && drawn <= 180, "{drawn}");
        assert!(h[180..].iter().all(|&c| c == 0));
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = [1.0f32, 5.0, 4.0, 3.0, 2.0];
        let h = histogram(&params(|p| p.top_k = 2), &logits, 400);
        assert_eq!(h[0] + h[3] + h[4], 0, "{h:?}");
        assert!(h[1] > 0 && h[2] > 0, "{h:?}");
        let h = histogram(&params(|p| p.top_k = 1), &logits, 50);
        assert_eq!(h[1], 50);
    }

    #[test]
    fn min_p_drops_the_unlikely() {
        // p ∝ [1, 0.5, 0.05]: min_p 0.1 drops the third (0.05 < 0.1 × 1).
        let logits = [0.0f32, 0.5f32.ln(), 0.05f32.ln()];
        let h = histogram(&params(|p| p.min_p = 0.1), &logits, 2000);
        assert_eq!(h[2], 0, "{h:?}");
        assert!(h[0] > 0 && h[1] > 0);
        let h = histogram(&params(|_| {}), &logits, 2000);
        assert!(h[2] > 0, "{h:?}");
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0f32, 0.0];
        let cold = histogram(&params(|p| p.temperature = 0.1), &logits, 1000);
        let hot = histogram(&params(|p| p.temperature = 2.0), &logits, 1000);
        // At 0.1 token 1 has p ≈ e^-10; at 2.0 p ≈ 0.38.
        assert!(cold[1] < 5, "{cold:?}");
        assert!(hot[1] > 250, "{hot:?}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0), 0);
        s.counts.insert(0, 1);
        s.counts.insert(1, 1);
        let mut l = vec![4.0f32, -1.0, 3.0];
        s.apply_penalties(&mut l);
        assert_eq!(l, vec![2.0, -2.0, 3.0]);
        // Greedy: token 0 wins once, then the penalty hands it to token 2.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 2.0;
            }),
            0,
        );
        let logits = [4.0f32, -1.0, 3.0];
        assert_eq!((s.sample(&logits), s.sample(&logits)), (0, 2));
    }

    #[test]
    fn presence_and_frequency_follow_openai() {
        let mut s = Sampler::new(
            params(|p| {
                p.presence_penalty = 0.5;
                p.frequency_penalty = 0.25;
            }),
            0,
        );
        s.counts.insert(0, 3);
        s.counts.insert(2, 1);
        let mut l = vec![1.0f32, 1.0, 1.0];
        s.apply_penalties(&mut l);
        // logit - count * frequency - (count > 0) * presence
        assert_eq!(l, vec![1.0 - 0.75 - 0.5, 1.0, 1.0 - 0.25 - 0.5]);
        // Greedy with a frequency penalty walks through the tied tokens.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 1.0;
            }),
            0,
        );
        let logits = [1.0f32, 1.0, 1.0];
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [2.0f32, 1.0, 0.0, 1.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let (lp, top) = logprobs(&logits, 2, 3);
        assert!((lp - (0.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1, 3]);
        assert!((top[0].1 - (2.0 - z.ln())).abs() < 1e-5);
        let total: f32 = logits.iter().map(|&l| (l - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(logprobs(&logits, 0, 0).1.is_empty());
    }
}
