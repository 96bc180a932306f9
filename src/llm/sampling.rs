//! Choosing the next token from logits: repetition penalty, a no-repeat n-gram guard (the fix for
//! the prototype's loops), temperature, top-k, top-p, and a seeded RNG for reproducible output.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::settings::GenerationSettings;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    /// 1.0 = off. HF semantics: positive logits are divided, negative ones multiplied.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at (0 = all).
    pub repetition_window: usize,
    /// Forbid repeating any n-gram of this size within the answer (0 = off).
    pub no_repeat_ngram: usize,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, repetition_window: 0, no_repeat_ngram: 0 }
    }
}

impl From<&GenerationSettings> for SamplingParams {
    fn from(g: &GenerationSettings) -> Self {
        Self {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            repetition_penalty: g.repetition_penalty,
            repetition_window: g.repetition_window,
            no_repeat_ngram: g.no_repeat_ngram,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token. `context` is everything the model has seen (prompt + answer so
    /// far, for the repetition penalty); `answer` is the generated part (for the n-gram guard).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], answer: &[u32]) -> u32 {
        let p = &self.params;
        let window = if p.repetition_window == 0 { context } else { &context[context.len().saturating_sub(p.repetition_window)..] };
        apply_repetition_penalty(logits, window, p.repetition_penalty);
        ban_repeated_ngrams(logits, answer, p.no_repeat_ngram);
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let temperature = p.temperature as f32;
        let mut cands: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l / temperature)).collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(p.top_k);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                mass += pr;
                if mass >= p.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= total);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, &pr) in probs.iter().enumerate() {
            acc += pr;
            if r < acc {
                return cands[i].0;
            }
        }
        cands[probs.len() - 1].0
    }
}

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

/// HF/CTRL repetition penalty: each distinct token seen in `window` is made less likely once.
pub fn apply_repetition_penalty(logits: &mut [f32], window: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(window.len());
    for &t in window {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Set to -inf every token that would complete an `n`-gram already present in `answer`.
pub fn ban_repeated_ngrams(logits: &mut [f32], answer: &[u32], n: usize) {
    if n < 2 || answer.len() < n {
        return;
    }
    let prefix = &answer[answer.len() - (n - 1)..];
    for w in answer.windows(n) {
        if &w[..n - 1] == prefix {
            if let Some(l) = logits.get_mut(w[n - 1] as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_follows_hf_semantics() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn ngram_guard_bans_only_completions() {
        // answer "a b c a b" with n=3: "a b" was followed by "c" → "c" banned, others free.
        let mut l = vec![0.0; 4];
        ban_repeated_ngrams(&mut l, &[0, 1, 2, 0, 1], 3);
        assert_eq!(l, vec![0.0, 0.0, f32::NEG_INFINITY, 0.0]);
        let mut l = vec![0.0; 4];
        ban_repeated_ngrams(&mut l, &[0, 1, 2, 3], 3);
        assert!(l.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn greedy_ignores_rng_and_seeds_reproduce() {
        let logits = vec![0.1, 3.0, 0.5, 2.9];
        let mut g = Sampler::new(SamplingParams::greedy(), 1);
        assert_eq!(g.sample(&mut logits.clone(), &[], &[]), 1);
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, repetition_window: 0, no_repeat_ngram: 0 };
        let draw = |seed| {
            let mut s = Sampler::new(params.clone(), seed);
            (0..50).map(|_| s.sample(&mut logits.clone(), &[], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let logits = vec![5.0, 4.9, 0.0, -1.0, -2.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, repetition_penalty: 1.0, repetition_window: 0, no_repeat_ngram: 0 }, 3);
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &[], &[]) < 2);
        }
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.3, repetition_penalty: 1.0, repetition_window: 0, no_repeat_ngram: 0 }, 3);
        for _ in 0..200 {
            assert_eq!(s.sample(&mut logits.clone(), &[], &[]), 0);
        }
    }

    #[test]
    fn sampling_matches_softmax_frequencies() {
        // Two tokens with logits ln(3) and 0 → probabilities 0.75 / 0.25.
        let logits = vec![3f32.ln(), 0.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, repetition_window: 0, no_repeat_ngram: 0 }, 11);
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&mut logits.clone(), &[], &[]) == 0).count();
        let freq = zeros as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.015, "{freq}");
    }
}
