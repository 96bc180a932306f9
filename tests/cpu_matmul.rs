//! The CPU kernels (`kernels::cpu`): the matmul for Q4_0, Q4_1 and Q8_0 weights, on every
//! instruction set this CPU runs, against an f64 sum over the weights candle dequantizes (error
//! within the int8 rounding of the activations), a token's output bit-identical alone and in any
//! batch, NaN reaching the output, bad shapes refused; the LoRA low-rank product against f64 and
//! batch-invariant.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use freeski_bot::kernels::cpu;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TYPES: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

/// A random `[n, k]` weight quantized by candle, its packed bytes and its dequantized values.
fn weight(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Some rows with an offset, so Q4_1's minimum matters.
    let w: Vec<f32> = (0..n * k).map(|i| rng.random_range(-1.0f32..1.0) + if (i / k).is_multiple_of(3) { 0.7 } else { 0.0 }).collect();
    let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (q.data().unwrap().into_owned(), deq)
}

fn activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Outliers, as real hidden states have.
    (0..m * k).map(|_| if rng.random_bool(0.01) { rng.random_range(-40.0f32..40.0) } else { rng.random_range(-2.0f32..2.0) }).collect()
}

fn run(isa: cpu::Isa, dtype: GgmlDType, w: &[u8], n: usize, x: &[f32], k: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / k * n];
    cpu::matmul_on(isa, dtype, w, n, x, k, &mut out).unwrap();
    out
}

#[test]
fn matches_an_f64_reference_within_the_activation_rounding() {
    if !cpu::available(GgmlDType::Q4_1) {
        eprintln!("this CPU has no AVX2/FMA/F16C: the kernel is off and candle's path runs (nothing to check)");
        return;
    }
    for isa in cpu::Isa::supported() {
        for (i, dtype) in TYPES.into_iter().enumerate() {
            // n not a multiple of the 4-row tile or of a work item; m not a multiple of the token
            // tiles; an odd block count (the AVX-512 path's single last block).
            for (m, n, k) in [(1, 37, 64), (5, 96, 576), (3, 16, 1536), (17, 130, 96), (7, 9, 160)] {
                let (w, deq) = weight(dtype, n, k, 7 + i as u64);
                let x = activations(m, k, 11);
                let y = run(isa, dtype, &w, n, &x, k);
                for t in 0..m {
                    for r in 0..n {
                        let (xs, ws) = (&x[t * k..(t + 1) * k], &deq[r * k..(r + 1) * k]);
                        let exact: f64 = xs.iter().zip(ws).map(|(&a, &b)| a as f64 * b as f64).sum();
                        // Each activation is off by at most half a step of its block's scale.
                        let bound: f64 = xs
                            .chunks(32)
                            .zip(ws.chunks(32))
                            .map(|(a, b)| {
                                let step = a.iter().fold(0f64, |s, v| s.max(v.abs() as f64)) / 127.0;
                                0.5 * step * b.iter().map(|v| v.abs() as f64).sum::<f64>()
                            })
                            .sum::<f64>()
                            * 1.01
                            + 1e-4;
                        let err = (y[t * n + r] as f64 - exact).abs();
                        // `!(err <= bound)` also fails on NaN.
                        assert!(err <= bound, "{isa:?} {dtype:?} m={m} n={n} k={k} token {t} row {r}: {} vs {exact} (error {err:e}, bound {bound:e})", y[t * n + r]);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// A token's outputs are the same bits alone as in a batch of any size, at any position,
    /// on every instruction set (prompts of more than 8 tokens share rows differently).
    #[test]
    fn a_token_alone_equals_the_token_in_a_batch(ty in 0usize..3, m in 1usize..13, n in 1usize..70, kb in 1usize..12, seed in any::<u64>()) {
        let dtype = TYPES[ty];
        prop_assume!(cpu::available(dtype));
        let k = kb * 32;
        let (w, _) = weight(dtype, n, k, seed);
        let x = activations(m, k, seed ^ 1);
        for isa in cpu::Isa::supported() {
            let batch = run(isa, dtype, &w, n, &x, k);
            for t in 0..m {
                let alone = run(isa, dtype, &w, n, &x[t * k..(t + 1) * k], k);
                prop_assert_eq!(alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), batch[t * n..(t + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{:?}: token {} of {}", isa, t, m);
            }
        }
    }
}

#[test]
fn nan_reaches_its_token_only_and_bad_shapes_are_refused() {
    let dtype = GgmlDType::Q4_1;
    if !cpu::available(dtype) {
        return;
    }
    let (n, k) = (8, 64);
    let (w, _) = weight(dtype, n, k, 3);
    let mut x = activations(2, k, 4);
    x[k + 5] = f32::NAN;
    for isa in cpu::Isa::supported() {
        let y = run(isa, dtype, &w, n, &x, k);
        assert!(y[..n].iter().all(|v| v.is_finite()), "{isa:?}: token 0 is clean: {:?}", &y[..n]);
        assert!(y[n..].iter().all(|v| v.is_nan()), "{isa:?}: token 1 carries its NaN: {:?}", &y[n..]);
    }

    let mut out = vec![0f32; 2 * n];
    let e = cpu::matmul(dtype, &w, n, &x, 48, &mut out).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    let e = cpu::matmul(dtype, &w[..w.len() - 1], n, &x, k, &mut out).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    let e = cpu::matmul(dtype, &w, n, &x, k, &mut out[..n]).unwrap_err();
    assert!(e.to_string().contains("output"), "{e}");
    let e = cpu::matmul(GgmlDType::Q4K, &w, n, &x, k, &mut out).unwrap_err();
    assert!(e.to_string().contains("no CPU kernel"), "{e}");
}

/// The LoRA path `Bᵀs·(A·x)` per row.
fn low_rank(x: &[f32], k: usize, a: &[f32], r: usize, bt: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / k * n];
    cpu::low_rank(x, k, a, r, bt, n, &mut out).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Within f32 rounding of an f64 sum, and a row alone equals the row in a batch (16 rows and
    /// more are shared among workers).
    #[test]
    fn low_rank_matches_f64_and_a_row_alone_equals_the_row_in_a_batch(m in 1usize..40, k in 1usize..300, r in 1usize..20, n in 1usize..90, seed in any::<u64>()) {
        let x = activations(m, k, seed);
        let a = activations(r, k, seed ^ 2);
        let bt = activations(r, n, seed ^ 3);
        let batch = low_rank(&x, k, &a, r, &bt, n);
        for t in 0..m {
            let xs = &x[t * k..(t + 1) * k];
            let alone = low_rank(xs, k, &a, r, &bt, n);
            prop_assert_eq!(alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), batch[t * n..(t + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "row {} of {}", t, m);
            let u: Vec<f64> = a.chunks(k).map(|aj| aj.iter().zip(xs).map(|(&p, &q)| p as f64 * q as f64).sum()).collect();
            let mag: Vec<f64> = a.chunks(k).map(|aj| aj.iter().zip(xs).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum()).collect();
            for o in 0..n {
                let exact: f64 = (0..r).map(|j| u[j] * bt[j * n + o] as f64).sum();
                let bound: f64 = (0..r).map(|j| mag[j] * (bt[j * n + o] as f64).abs()).sum::<f64>() * 1e-5 + 1e-6;
                let err = (alone[o] as f64 - exact).abs();
                prop_assert!(err <= bound, "row {} out {}: {} vs {} (bound {:e})", t, o, alone[o], exact, bound);
            }
        }
    }
}
