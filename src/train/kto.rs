//! KTO (Kahneman-Tversky Optimization, arXiv 2402.01306): preference training on unpaired
//! answers, each labelled desirable (👍, an admin's correction) or undesirable (👎, the answer
//! an admin corrected), as TRL's `KTOTrainer` does it.
//!
//! For answer `y` to prompt `x`, `r = log π(y|x) − log π_ref(y|x)` (sums over the answer's
//! tokens). With the KL baseline `z0`, the loss of a desirable answer is
//! `λ_D·(1 − σ(β·(r − z0)))` and of an undesirable one `λ_U·(1 − σ(β·(z0 − r)))`, averaged over
//! the step's answers. `z0` estimates `KL(π‖π_ref)` from mismatched pairs (each prompt with
//! another example's answer), clamped at 0 and not differentiated.
//!
//! The reference costs no second model: it is the same frozen base with the adapter switched
//! off (or another adapter's weights, per forward), and its log-probabilities, of the answers
//! and of the mismatched pairs, are computed once per example before training.
//!
//! The gradient of the loss is `Σ_rows (∂loss/∂nll_row)·∂nll_row/∂θ`, so it runs through the
//! same forward and hand-written backward as SFT with per-row weights
//! ([`RowLoss::Weighted`](super::forward::RowLoss)).

use std::collections::HashMap;

use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::data::{Batch, Example};
use super::forward::{GradAccum, MicroKey, RowLoss, TrainForward};
use super::params::{LoraParams, LoraView};
use super::settings::TrainSettings;
use super::trainer::TrainHooks;

/// One labelled answer: its conversation with the loss only on the final answer's tokens
/// (`ex.target` is false up to `prompt_len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefExample {
    pub ex: Example,
    /// Tokens before the answer: the prompt (system prompt, earlier turns, question, the
    /// assistant header).
    pub prompt_len: usize,
    pub desirable: bool,
}

impl PrefExample {
    pub fn prompt(&self) -> &[u32] {
        &self.ex.ids[..self.prompt_len]
    }
}

/// `prompt`'s prompt followed by `answer`'s answer, the loss on the answer: a mismatched pair of
/// the KL baseline. Cut to `max_len` tokens; `None` when no answer token is left.
pub fn mismatched(prompt: &PrefExample, answer: &PrefExample, max_len: usize) -> Option<Example> {
    let mut ids = prompt.prompt().to_vec();
    let mut target = vec![false; ids.len()];
    ids.extend_from_slice(&answer.ex.ids[answer.prompt_len..]);
    target.extend_from_slice(&answer.ex.target[answer.prompt_len..]);
    ids.truncate(max_len);
    target.truncate(max_len);
    let ex = Example { ids, target };
    (ex.targets() > 0).then_some(ex)
}

/// For every example, the one whose answer it is paired with for the KL baseline: the next in a
/// seeded order with a different prompt (`None` when every example shares one prompt). Fixed for
/// the run, so the reference's log-probability of each pair is computed once.
pub fn partners(examples: &[PrefExample], seed: u64) -> Vec<Option<usize>> {
    let n = examples.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x6B74_6F5F_6B6C));
    let mut out = vec![None; n];
    for (k, &i) in order.iter().enumerate() {
        out[i] = (1..n).map(|d| order[(k + d) % n]).find(|&j| examples[j].prompt() != examples[i].prompt());
    }
    out
}

/// λ_D and λ_U.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KtoWeights {
    pub desirable: f64,
    pub undesirable: f64,
}

impl KtoWeights {
    /// The configured weights; a 0 is chosen from the counts so that `λ_D·n_D / (λ_U·n_U)` lies
    /// in `[1, 4/3]` (the paper's recommendation), the other weight staying as configured (1 when
    /// both are 0).
    pub fn choose(desirable: f64, undesirable: f64, n_d: usize, n_u: usize) -> Self {
        let (nd, nu) = (n_d as f64, n_u as f64);
        match (desirable > 0.0, undesirable > 0.0) {
            (true, true) => Self { desirable, undesirable },
            _ if n_d == 0 || n_u == 0 => Self { desirable: if desirable > 0.0 { desirable } else { 1.0 }, undesirable: if undesirable > 0.0 { undesirable } else { 1.0 } },
            (true, false) => {
                let ratio = (desirable * nd / nu).clamp(1.0, 4.0 / 3.0);
                Self { desirable, undesirable: desirable * nd / (nu * ratio) }
            }
            (false, true) => {
                let ratio = (nd / (undesirable * nu)).clamp(1.0, 4.0 / 3.0);
                Self { desirable: ratio * undesirable * nu / nd, undesirable }
            }
            (false, false) => {
                let ratio = nd / nu;
                if ratio < 1.0 {
                    Self { desirable: nu / nd, undesirable: 1.0 }
                } else if ratio > 4.0 / 3.0 {
                    Self { desirable: 1.0, undesirable: nd / (nu * 4.0 / 3.0) }
                } else {
                    Self { desirable: 1.0, undesirable: 1.0 }
                }
            }
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The KL baseline: the mean of `policy − reference` log-probabilities of the mismatched pairs,
/// clamped at 0 (0 without pairs).
pub fn kl_baseline(policy: &[f64], reference: &[f64]) -> f64 {
    if policy.is_empty() {
        return 0.0;
    }
    let mean = policy.iter().zip(reference).map(|(p, r)| p - r).sum::<f64>() / policy.len() as f64;
    mean.max(0.0)
}

/// One group of rows' share of the loss and its derivative by each row's NLL.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoTerms {
    /// `Σ_rows λ·(1 − σ(·)) / n`.
    pub loss: f64,
    /// `∂loss/∂nll_row` (the NLL is minus the log-probability).
    pub coef: Vec<f64>,
}

/// The loss terms of rows with policy log-probabilities `policy`, reference ones `reference`
/// and labels `desirable`, against baseline `z0`, normalised by `n` (the step's answers).
pub fn loss_terms(policy: &[f64], reference: &[f64], desirable: &[bool], w: KtoWeights, beta: f64, z0: f64, n: f64) -> KtoTerms {
    let mut loss = 0.0;
    let mut coef = Vec::with_capacity(policy.len());
    for ((&p, &r), &d) in policy.iter().zip(reference).zip(desirable) {
        let (sign, lambda) = if d { (1.0, w.desirable) } else { (-1.0, w.undesirable) };
        let s = sigmoid(sign * beta * (p - r - z0));
        loss += lambda * (1.0 - s) / n;
        // ∂/∂p of λ(1 − σ(u)) with u = sign·β·(p − r − z0) is −λ·σ(u)(1 − σ(u))·sign·β; p = −nll.
        coef.push(lambda * s * (1.0 - s) * sign * beta / n);
    }
    KtoTerms { loss, coef }
}

/// Log-probabilities of `examples`' target tokens (no dropout, no graph), in batches of `batch`
/// similar lengths. `lora: None` is the bare base.
pub fn logps(fwd: &TrainForward, lora: Option<&LoraView>, examples: &[&Example], batch: usize) -> Result<Vec<f64>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].len());
    let mut out = vec![0.0; examples.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&Example> = chunk.iter().map(|&i| examples[i]).collect();
        for (&i, nll) in chunk.iter().zip(fwd.row_nll(lora, &Batch::new(&rows))?) {
            out[i] = -nll;
        }
    }
    Ok(out)
}

/// The preference figures of a model on labelled answers: over the prompts that have both a
/// desirable and an undesirable answer, the mean per-token log-probability margin (desirable −
/// undesirable, each side averaged over its answers) and the share of prompts where it is > 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefEval {
    /// Prompts with answers of both labels.
    pub questions: usize,
    pub accuracy: f64,
    /// Nats per token.
    pub margin: f64,
}

impl PrefEval {
    pub fn percent(&self) -> String {
        format!("{:.0}%", self.accuracy * 100.0)
    }
}

/// [`PrefEval`] of `lora` (`None`: the bare base) on `examples`; `None` when no prompt has answers
/// of both labels.
pub fn preference_eval(fwd: &TrainForward, lora: Option<&LoraView>, examples: &[PrefExample], batch: usize) -> Result<Option<PrefEval>> {
    let exs: Vec<&Example> = examples.iter().map(|e| &e.ex).collect();
    let lp = logps(fwd, lora, &exs, batch)?;
    // Per prompt: (sum, count) of per-token log-probabilities for desirable and undesirable.
    let mut groups: HashMap<&[u32], [(f64, usize); 2]> = HashMap::new();
    for (e, l) in examples.iter().zip(&lp) {
        let per_token = l / e.ex.targets().max(1) as f64;
        let g = &mut groups.entry(e.prompt()).or_default()[usize::from(!e.desirable)];
        g.0 += per_token;
        g.1 += 1;
    }
    let margins: Vec<f64> = groups.values().filter(|[d, u]| d.1 > 0 && u.1 > 0).map(|[d, u]| d.0 / d.1 as f64 - u.0 / u.1 as f64).collect();
    if margins.is_empty() {
        return Ok(None);
    }
    let n = margins.len() as f64;
    Ok(Some(PrefEval { questions: margins.len(), accuracy: margins.iter().filter(|&&m| m > 0.0).count() as f64 / n, margin: margins.iter().sum::<f64>() / n }))
}

/// What a KTO optimizer step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepOut {
    pub loss: f64,
    /// The KL baseline used.
    pub kl: f64,
    /// Real tokens of the step's answers (mismatched pairs not counted).
    pub tokens: usize,
}

/// A KTO run's fixed parts: the labelled answers, their cached reference log-probabilities and
/// KL partners, the weights and β.
pub struct KtoPhase<'a> {
    pub examples: &'a [PrefExample],
    pub weights: KtoWeights,
    pub beta: f64,
    partners: Vec<Option<usize>>,
    /// The answers' mismatched pairs (by example), cut to `max_len`.
    pairs: Vec<Option<Example>>,
    ref_logp: Vec<f64>,
    ref_pair_logp: Vec<f64>,
    batch: usize,
}

impl<'a> KtoPhase<'a> {
    /// Pairs the examples and computes the reference log-probabilities once (`reference`:
    /// `None` for the base with the adapter off).
    pub fn prepare(fwd: &TrainForward, reference: Option<&LoraView>, examples: &'a [PrefExample], s: &TrainSettings) -> Result<Self> {
        ensure!(!examples.is_empty(), "no labelled answers to train on (feedback.jsonl is empty or missing)");
        let n_d = examples.iter().filter(|e| e.desirable).count();
        let weights = KtoWeights::choose(s.kto_desirable_weight, s.kto_undesirable_weight, n_d, examples.len() - n_d);
        let partners = partners(examples, s.seed);
        let pairs: Vec<Option<Example>> = partners.iter().enumerate().map(|(i, p)| p.and_then(|j| mismatched(&examples[i], &examples[j], s.max_len))).collect();
        let exs: Vec<&Example> = examples.iter().map(|e| &e.ex).collect();
        let ref_logp = logps(fwd, reference, &exs, s.batch_size)?;
        let pair_refs: Vec<&Example> = pairs.iter().flatten().collect();
        let mut pair_lp = logps(fwd, reference, &pair_refs, s.batch_size)?.into_iter();
        let ref_pair_logp = pairs.iter().map(|p| if p.is_some() { pair_lp.next().unwrap_or(0.0) } else { 0.0 }).collect();
        if partners.iter().all(Option::is_none) {
            tracing::warn!("every labelled answer shares one prompt: no mismatched pairs, the KL baseline stays 0");
        }
        tracing::info!(
            desirable = n_d,
            undesirable = examples.len() - n_d,
            lambda_d = weights.desirable,
            lambda_u = weights.undesirable,
            beta = s.kto_beta,
            "KTO reference log-probabilities cached"
        );
        Ok(Self { examples, weights, beta: s.kto_beta, partners, pairs, ref_logp, ref_pair_logp, batch: s.batch_size })
    }

    /// The KL baseline for a step on examples `idx`: the policy (`params`, no dropout, no graph)
    /// on their mismatched pairs against the cached reference.
    pub fn kl_baseline(&self, fwd: &TrainForward, params: &LoraParams, idx: &[usize], hooks: &dyn TrainHooks) -> Result<f64> {
        let with_pair: Vec<usize> = idx.iter().copied().filter(|&i| self.pairs[i].is_some()).collect();
        let view = params.view();
        let mut policy = Vec::with_capacity(with_pair.len());
        for chunk in with_pair.chunks(self.batch.max(1)) {
            hooks.before_micro_batch();
            let rows: Vec<&Example> = chunk.iter().filter_map(|&i| self.pairs[i].as_ref()).collect();
            policy.extend(logps(fwd, Some(&view), &rows, rows.len())?);
        }
        let reference: Vec<f64> = with_pair.iter().map(|&i| self.ref_pair_logp[i]).collect();
        Ok(kl_baseline(&policy, &reference))
    }

    /// Forward and backward of one optimizer step made of `micro` batches (indices into the
    /// examples): adds the gradient of the step's mean KTO loss to `accum`.
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate_step(
        &self,
        fwd: &TrainForward,
        params: &LoraParams,
        micro: &[Vec<usize>],
        step: u64,
        checkpointing: bool,
        hooks: &dyn TrainHooks,
        accum: &mut GradAccum,
    ) -> Result<StepOut> {
        let all: Vec<usize> = micro.iter().flatten().copied().collect();
        let z0 = self.kl_baseline(fwd, params, &all, hooks)?;
        let n = all.len() as f64;
        let (mut loss, mut tokens) = (0.0, 0);
        for (m, idx) in micro.iter().enumerate() {
            hooks.before_micro_batch();
            let rows: Vec<&Example> = idx.iter().map(|&i| &self.examples[i].ex).collect();
            let batch = Batch::new(&rows);
            let reference: Vec<f64> = idx.iter().map(|&i| self.ref_logp[i]).collect();
            let labels: Vec<bool> = idx.iter().map(|&i| self.examples[i].desirable).collect();
            let terms = |nll: &[f64]| {
                let policy: Vec<f64> = nll.iter().map(|v| -v).collect();
                loss_terms(&policy, &reference, &labels, self.weights, self.beta, z0, n)
            };
            let coef = |nll: &[f64]| Ok(terms(nll).coef);
            let key = MicroKey { step, micro: m as u64 };
            let nll = fwd.accumulate_rows(params, &batch, key, RowLoss::Weighted(&coef), checkpointing, accum)?;
            loss += terms(&nll).loss;
            tokens += batch.tokens(&rows);
        }
        Ok(StepOut { loss, kl: z0, tokens })
    }

    /// How many examples have a KL partner.
    pub fn paired(&self) -> usize {
        self.partners.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_put_the_ratio_in_range() {
        let ratio = |w: KtoWeights, d: usize, u: usize| w.desirable * d as f64 / (w.undesirable * u as f64);
        for (d, u) in [(1, 10), (10, 1), (5, 5), (6, 5), (3, 40), (40, 3), (7, 6)] {
            for (wd, wu) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (2.0, 0.0)] {
                let w = KtoWeights::choose(wd, wu, d, u);
                let r = ratio(w, d, u);
                assert!((1.0 - 1e-9..=4.0 / 3.0 + 1e-9).contains(&r), "{d}/{u} with ({wd}, {wu}): {w:?} gives {r}");
                if wd > 0.0 {
                    assert_eq!(w.desirable, wd);
                }
                if wu > 0.0 {
                    assert_eq!(w.undesirable, wu);
                }
            }
        }
        assert_eq!(KtoWeights::choose(2.0, 3.0, 1, 10), KtoWeights { desirable: 2.0, undesirable: 3.0 }, "both given: kept");
        assert_eq!(KtoWeights::choose(0.0, 0.0, 0, 10), KtoWeights { desirable: 1.0, undesirable: 1.0 }, "one-sided data");
    }

    #[test]
    fn loss_terms_match_their_derivative() {
        let (reference, labels) = ([-3.0, -5.0, -2.0], [true, false, true]);
        let w = KtoWeights { desirable: 1.3, undesirable: 0.7 };
        let policy = [-2.5, -5.5, -2.4];
        let t = loss_terms(&policy, &reference, &labels, w, 0.4, 0.2, 3.0);
        for i in 0..3 {
            let h = 1e-6;
            let mut up = policy;
            up[i] += h;
            let mut down = policy;
            down[i] -= h;
            let fd = (loss_terms(&up, &reference, &labels, w, 0.4, 0.2, 3.0).loss - loss_terms(&down, &reference, &labels, w, 0.4, 0.2, 3.0).loss) / (2.0 * h);
            // coef is ∂/∂nll = −∂/∂logp.
            assert!((fd + t.coef[i]).abs() < 1e-8, "row {i}: fd {fd}, coef {}", t.coef[i]);
        }
        // A desirable answer more likely than under the reference costs less than one less likely.
        let better = loss_terms(&[-1.0], &[-3.0], &[true], w, 0.4, 0.0, 1.0).loss;
        let worse = loss_terms(&[-5.0], &[-3.0], &[true], w, 0.4, 0.0, 1.0).loss;
        assert!(better < worse);
    }

    #[test]
    fn kl_baseline_is_a_clamped_mean() {
        assert_eq!(kl_baseline(&[-1.0, -2.0], &[-2.0, -2.5]), 0.75);
        assert_eq!(kl_baseline(&[-3.0], &[-2.0]), 0.0);
        assert_eq!(kl_baseline(&[], &[]), 0.0);
    }

    #[test]
    fn partners_have_other_prompts() {
        let ex = |p: u32, d| PrefExample { ex: Example { ids: vec![p, p, 9, 9], target: vec![false, false, true, true] }, prompt_len: 2, desirable: d };
        let exs = vec![ex(1, true), ex(1, false), ex(2, true), ex(3, false)];
        let p = partners(&exs, 3);
        for (i, j) in p.iter().enumerate() {
            let j = j.expect("a partner");
            assert_ne!(exs[i].prompt(), exs[j].prompt());
        }
        assert!(partners(&exs[..2], 3).iter().all(Option::is_none));
        let m = mismatched(&exs[0], &exs[2], 10).unwrap();
        assert_eq!((m.ids, m.target), (vec![1, 1, 9, 9], vec![false, false, true, true]));
        assert!(mismatched(&exs[0], &exs[2], 2).is_none());
    }
}
