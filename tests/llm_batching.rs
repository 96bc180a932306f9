//! Batch invariance: a row's logits do not depend on what it shares a forward pass with.
//!
//! Random prompt lengths, batch sizes and adapters on tiny random models with f32, Q8_0 and
//! Q4_K weights: every row of a left-padded batch (prefill, then decode steps) must equal the
//! same row run alone, contain no NaN or infinity, and the padding must never change a real
//! position, with one adapter for the batch or each row its own (two adapters of different
//! ranks, or none). Quantized weights must be bit-identical; f32 within 1e-5 of the largest
//! logit.

mod common;

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use freeski_bot::bench::random;
use freeski_bot::llm::lora::LoraAdapter;
use freeski_bot::llm::model::{KvCache, Logits, Model};
use freeski_bot::llm::ModelConfig;
use freeski_bot::util::compare::max_rel_diff;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Weights {
    F32,
    Q8_0,
    Q4K,
}

struct Fixture {
    model: Model,
    /// Two adapters of different ranks.
    adapters: [LoraAdapter; 2],
}

/// The tiny GQA model with a sliding window of 8 (shorter than most prompts); Q4_K needs rows
/// that are a multiple of 256 wide, so it gets a wider hidden size.
fn fixture(w: Weights) -> &'static Fixture {
    static F32: OnceLock<Fixture> = OnceLock::new();
    static Q8: OnceLock<Fixture> = OnceLock::new();
    static Q4K: OnceLock<Fixture> = OnceLock::new();
    let (cell, cfg, dtype) = match w {
        Weights::F32 => (&F32, ModelConfig::tiny(), GgmlDType::Q8_0),
        Weights::Q8_0 => (&Q8, ModelConfig::tiny(), GgmlDType::Q8_0),
        Weights::Q4K => (&Q4K, ModelConfig { hidden_size: 256, intermediate_size: 512, head_dim: 64, ..ModelConfig::tiny() }, GgmlDType::Q4K),
    };
    cell.get_or_init(|| {
        let q = random::random_model(&cfg, dtype, 11, &Device::Cpu).unwrap();
        let model = match w {
            Weights::F32 => random::dequantized(&q).unwrap(),
            _ => q,
        };
        Fixture { adapters: [common::lora::random(&cfg, 4, 0.05, 3), common::lora::random(&cfg, 8, 0.05, 5)], model }
    })
}

fn rows_of(logits: &Tensor) -> Vec<Vec<f32>> {
    logits.squeeze(1).unwrap().to_vec2().unwrap()
}

/// Logits after the prompt, then after each of `extra` fed tokens, for one prompt alone.
fn alone(model: &Model, prompt: &[u32], extra: &[u32], adapter: Option<&LoraAdapter>) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(1);
    let ids = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut out = vec![rows_of(&model.forward(&ids, &mut cache, adapter, Logits::Last).unwrap()).remove(0)];
    for &t in extra {
        let ids = Tensor::new(&[[t]], &Device::Cpu).unwrap();
        out.push(rows_of(&model.forward(&ids, &mut cache, adapter, Logits::Last).unwrap()).remove(0));
    }
    out
}

/// The same for every prompt at once, as one left-padded batch (padding token 0), row `i` with
/// `adapters[i]`.
fn batched(model: &Model, prompts: &[Vec<u32>], extra: &[u32], adapters: &[Option<&LoraAdapter>]) -> Vec<Vec<Vec<f32>>> {
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut flat = Vec::new();
    for (p, &pad) in prompts.iter().zip(&pads) {
        flat.extend(std::iter::repeat_n(0u32, pad));
        flat.extend(p);
    }
    let n = prompts.len();
    let mut cache = KvCache::with_padding(pads);
    let ids = Tensor::from_vec(flat, (n, longest), &Device::Cpu).unwrap();
    let mut steps = vec![rows_of(&model.forward_mixed(&ids, &mut cache, adapters, Logits::Last).unwrap())];
    for &t in extra {
        let ids = Tensor::from_vec(vec![t; n], (n, 1), &Device::Cpu).unwrap();
        steps.push(rows_of(&model.forward_mixed(&ids, &mut cache, adapters, Logits::Last).unwrap()));
    }
    // [step][row] → [row][step]
    (0..n).map(|r| steps.iter().map(|s| s[r].clone()).collect()).collect()
}

/// Rows of lengths `lens`, row `i` answered with adapter `pick(i)` (0: none, 1 or 2: the
/// fixture's first or second), batched against each row alone.
fn check(w: Weights, lens: &[usize], pick: impl Fn(usize) -> u8, salt: u32) -> Result<(), TestCaseError> {
    let f = fixture(w);
    let vocab = f.model.config().vocab_size as u32;
    let adapters: Vec<Option<&LoraAdapter>> = (0..lens.len()).map(|i| pick(i).checked_sub(1).map(|a| &f.adapters[a as usize % 2])).collect();
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| (0..n as u32).map(|j| (j * 7919 + (i as u32 + salt) * 104_729) % vocab).collect()).collect();
    let extra = [5u32 % vocab, 77 % vocab, 301 % vocab];
    let together = batched(&f.model, &prompts, &extra, &adapters);
    for (row, p) in prompts.iter().enumerate() {
        let want = alone(&f.model, p, &extra, adapters[row]);
        for (step, (got, want)) in together[row].iter().zip(&want).enumerate() {
            prop_assert!(got.iter().all(|x| x.is_finite()), "{w:?}: row {row} step {step} has NaN or infinity");
            match w {
                Weights::F32 => {
                    let rel = max_rel_diff(want, got, 1e-6);
                    prop_assert!(rel <= 1e-5, "{w:?}: row {row} (of lengths {lens:?}) step {step}: relative difference {rel}");
                }
                _ => prop_assert!(got == want, "{w:?}: row {row} (of lengths {lens:?}) step {step} differs from the row alone"),
            }
        }
    }
    Ok(())
}

fn lengths() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..=64, 1..=8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn f32_rows_equal_alone(lens in lengths(), with_adapter: bool, salt in 0u32..1000) {
        check(Weights::F32, &lens, |_| with_adapter as u8, salt)?;
    }

    #[test]
    fn q8_0_rows_are_bit_identical_to_alone(lens in lengths(), with_adapter: bool, salt in 0u32..1000) {
        check(Weights::Q8_0, &lens, |_| with_adapter as u8, salt)?;
    }

    #[test]
    fn q4k_rows_are_bit_identical_to_alone(lens in lengths(), with_adapter: bool, salt in 0u32..1000) {
        check(Weights::Q4K, &lens, |_| with_adapter as u8, salt)?;
    }

    /// Each row with its own adapter (two ranks, or none) in one batch, prefill and decode.
    #[test]
    fn rows_of_different_adapters_are_bit_identical_to_alone(lens in lengths(), picks in proptest::collection::vec(0u8..3, 8), q4k: bool, salt in 0u32..1000) {
        check(if q4k { Weights::Q4K } else { Weights::Q8_0 }, &lens, |i| picks[i], salt)?;
    }
}

/// The case that used to give NaN (f32) and all-zero logits (quantized + LoRA): a short prompt
/// padded against a longer one, on every weight type, with the adapter.
#[test]
fn short_prompt_padded_against_a_long_one() {
    for w in [Weights::F32, Weights::Q8_0, Weights::Q4K] {
        check(w, &[3, 40], |_| 1, 1).unwrap();
        check(w, &[3, 40, 17], |i| i as u8, 1).unwrap();
    }
}

/// A padded batch's caches merged from rows prefilled alone decode like each row alone (the
/// engine's path: rows join a running batch after their own prefill).
#[test]
fn merged_caches_decode_like_each_row_alone() {
    for w in [Weights::Q8_0, Weights::Q4K] {
        let f = fixture(w);
        let a = Some(&f.adapters[0]);
        let prompts = [vec![1u32, 2, 3], (0..30).collect::<Vec<u32>>(), vec![9u32; 12]];
        let extra = [4u32, 8, 15, 16];
        let mut caches = Vec::new();
        let mut firsts = Vec::new();
        for p in &prompts {
            let mut c = KvCache::new(1);
            let ids = Tensor::new(p.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            firsts.push(rows_of(&f.model.forward(&ids, &mut c, a, Logits::Last).unwrap()).remove(0));
            caches.push(c);
        }
        let mut cache = KvCache::merge(caches).unwrap();
        assert_eq!(cache.padding(), &[27, 0, 18]);
        let mut steps = Vec::new();
        for &t in &extra {
            let ids = Tensor::from_vec(vec![t; 3], (3, 1), &Device::Cpu).unwrap();
            steps.push(rows_of(&f.model.forward(&ids, &mut cache, a, Logits::Last).unwrap()));
        }
        for (row, p) in prompts.iter().enumerate() {
            let want = alone(&f.model, p, &extra, a);
            assert_eq!(want[0], firsts[row]);
            for (i, s) in steps.iter().enumerate() {
                assert_eq!(s[row], want[i + 1], "{w:?} row {row} step {i}");
            }
        }
    }
}

/// A step given the wrong number of adapters is refused, not guessed.
#[test]
fn adapters_must_match_the_rows() {
    let f = fixture(Weights::Q8_0);
    let mut cache = KvCache::new(2);
    let ids = Tensor::from_vec(vec![1u32, 2], (2, 1), &Device::Cpu).unwrap();
    let e = f.model.forward_mixed(&ids, &mut cache, &[Some(&f.adapters[0])], Logits::Last).unwrap_err();
    assert!(e.to_string().contains("1 adapters for 2 rows"), "{e}");
}
