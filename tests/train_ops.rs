//! Gradient checks for the training ops in `freeski_bot::train::ops`.
//!
//! Dense ops are checked in f64 against central finite differences of a scalar loss
//! `L(x) = Σ op(x) ∘ R` (R fixed random). The quantized op's forward quantizes activations on
//! the cpu (Q8_0/Q8K), so it is piecewise constant in `x` and finite differences of it mean
//! nothing; its backward is checked against `grad · dequant(W)` directly, against autograd of
//! the dense computation on `dequant(W)`, and (through its f64 path) against finite differences.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use freeski_bot::train::ops::{frozen_qmatmul, rms_norm, rope_interleaved, softmax_last_dim};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Deterministic uniform(-1, 1) tensor.
fn rand_t(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Central finite differences of the scalar `f` at `x`, element by element.
fn fd_grad(f: &dyn Fn(&Tensor) -> Result<f64>, x: &Tensor, h: f64) -> Result<Vec<f64>> {
    let base = to_vec(x)?;
    let mut grad = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), &Device::Cpu)?.to_dtype(x.dtype())?)?;
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu)?.to_dtype(x.dtype())?)?;
        grad.push((fp - fm) / (2.0 * h));
    }
    Ok(grad)
}

/// Gradient of the scalar tensor `f(x)` with respect to `x` by candle's backprop.
fn autograd(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<Vec<f64>> {
    let var = Var::from_tensor(x)?;
    let loss = f(var.as_tensor())?;
    let grads = loss.backward()?;
    to_vec(grads.get(var.as_tensor()).context("no gradient reached x")?)
}

/// Max |a − b| relative to max(|b|, floor), so a tolerance reads as a fraction of the gradient's
/// scale.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    freeski_bot::util::compare::max_rel_diff(b, a, 1e-12)
}

fn weighted_sum(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    Ok((y * r)?.sum_all()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Checks `op`'s gradient in f64 against finite differences and returns the relative error.
fn check_f64(op: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, rng: &mut ChaCha8Rng) -> Result<f64> {
    let y = op(x)?;
    let r = rand_t(rng, y.dims(), DType::F64)?;
    let loss = |t: &Tensor| weighted_sum(&op(t)?, &r);
    let g = autograd(&loss, x)?;
    let fd = fd_grad(&|t| scalar(&loss(t)?), x, 1e-5)?;
    Ok(rel_err(&g, &fd))
}

// Tolerances: f64 central differences with h = 1e-5 have truncation error ~h² and rounding error
// ~1e-16/h, so 1e-7 relative leaves a wide margin for smooth ops.
const F64_TOL: f64 = 1e-7;

#[test]
fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = rand_t(&mut rng, &[2, 3, 8], DType::F64)?;
    let w = (rand_t(&mut rng, &[8], DType::F64)? + 1.0)?;
    let err = check_f64(&|t| Ok(rms_norm(t, &w, 1e-5)?), &x, &mut rng)?;
    assert!(err < F64_TOL, "rms_norm f64 grad rel err {err:e}");

    // The f32 path (fused forward) gives the same gradient within f32 precision.
    let r = rand_t(&mut rng, &[2, 3, 8], DType::F64)?;
    let g64 = autograd(&|t| weighted_sum(&rms_norm(t, &w, 1e-5)?, &r), &x)?;
    let (x32, w32, r32) = (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?, r.to_dtype(DType::F32)?);
    let g32 = autograd(&|t| weighted_sum(&rms_norm(t, &w32, 1e-5)?, &r32), &x32)?;
    let err = rel_err(&g32, &g64);
    assert!(err < 1e-5, "rms_norm f32 vs f64 grad rel err {err:e}");

    // Forward equals candle's inference kernel.
    let want = candle_nn::ops::rms_norm(&x32, &w32, 1e-5)?;
    let err = rel_err(&to_vec(&rms_norm(&x32, &w32, 1e-5)?)?, &to_vec(&want)?);
    assert!(err < 1e-6, "rms_norm forward rel err {err:e}");
    Ok(())
}

#[test]
fn softmax_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = (rand_t(&mut rng, &[2, 3, 7], DType::F64)? * 3.0)?;
    let err = check_f64(&|t| Ok(softmax_last_dim(t)?), &x, &mut rng)?;
    assert!(err < F64_TOL, "softmax f64 grad rel err {err:e}");

    let x32 = x.to_dtype(DType::F32)?;
    let err = rel_err(&to_vec(&softmax_last_dim(&x32)?)?, &to_vec(&candle_nn::ops::softmax_last_dim(&x32)?)?);
    assert!(err < 1e-6, "softmax forward rel err {err:e}");
    Ok(())
}

/// cos/sin tables for positions 0..t as a Llama-style model builds them.
fn rope_tables(t: usize, hd: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f64> = (0..hd / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64)).collect();
    let ang: Vec<f64> = (0..t).flat_map(|p| inv.iter().map(move |f| p as f64 * f)).collect();
    let ang = Tensor::from_vec(ang, (t, hd / 2), &Device::Cpu)?;
    Ok((ang.cos()?.to_dtype(dtype)?, ang.sin()?.to_dtype(dtype)?))
}

#[test]
fn rope_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, h, t, hd) = (2, 2, 4, 8);
    let x = rand_t(&mut rng, &[b, h, t, hd], DType::F64)?;
    let (cos, sin) = rope_tables(t, hd, DType::F64)?;
    let err = check_f64(&|x| Ok(rope_interleaved(x, &cos, &sin)?), &x, &mut rng)?;
    assert!(err < F64_TOL, "rope f64 grad rel err {err:e}");

    // Per-batch tables [b, t, hd/2].
    let cos3 = Tensor::stack(&[&cos, &cos.flip(&[0])?], 0)?.contiguous()?;
    let sin3 = Tensor::stack(&[&sin, &sin.flip(&[0])?], 0)?.contiguous()?;
    let err = check_f64(&|x| Ok(rope_interleaved(x, &cos3, &sin3)?), &x, &mut rng)?;
    assert!(err < F64_TOL, "rope [b,t,hd/2] f64 grad rel err {err:e}");

    let x32 = x.to_dtype(DType::F32)?;
    let (c32, s32) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
    let err = rel_err(&to_vec(&rope_interleaved(&x32, &c32, &s32)?)?, &to_vec(&candle_nn::rotary_emb::rope_i(&x32, &c32, &s32)?)?);
    assert!(err < 1e-6, "rope forward rel err {err:e}");
    Ok(())
}

fn quantized(rng: &mut ChaCha8Rng, out_f: usize, in_f: usize, dtype: GgmlDType) -> Result<Arc<QTensor>> {
    let w = rand_t(rng, &[out_f, in_f], DType::F32)?;
    Ok(Arc::new(QTensor::quantize(&w, dtype)?))
}

#[test]
fn frozen_qmatmul_backward_is_grad_times_dequantized_weight() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // Q4K blocks span 256 columns.
    let (out_f, in_f) = (24, 256);
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K] {
        // The source weight is a Var so we can show no gradient reaches it.
        let w_src = Var::from_tensor(&rand_t(&mut rng, &[out_f, in_f], DType::F32)?)?;
        let wq = Arc::new(QTensor::quantize(w_src.as_tensor(), dtype)?);
        let deq = wq.dequantize(&Device::Cpu)?;
        let x = rand_t(&mut rng, &[2, 3, in_f], DType::F32)?;
        let r = rand_t(&mut rng, &[2, 3, out_f], DType::F32)?;

        // Forward: identical to the inference op, close to the dense product (the cpu kernel
        // quantizes activations to 8 bits, hence the loose bound).
        let y = frozen_qmatmul(&x, &wq)?;
        let y_inf = QMatMul::from_arc(wq.clone())?.forward(&x)?;
        assert_eq!(rel_err(&to_vec(&y)?, &to_vec(&y_inf)?), 0.0, "{dtype:?} forward != QMatMul");
        let y_dense = x.broadcast_matmul(&deq.t()?)?;
        let err = rel_err(&to_vec(&y)?, &to_vec(&y_dense)?);
        assert!(err < 2e-2, "{dtype:?} forward vs dense rel err {err:e}");

        // Backward: grad_x = R · dequant(W), and nothing for the weight.
        let xv = Var::from_tensor(&x)?;
        let loss = weighted_sum(&frozen_qmatmul(xv.as_tensor(), &wq)?, &r)?;
        let grads = loss.backward()?;
        assert!(grads.get(w_src.as_tensor()).is_none(), "{dtype:?}: weight got a gradient");
        let gx = to_vec(grads.get(xv.as_tensor()).context("no grad for x")?)?;
        let want = to_vec(&r.broadcast_matmul(&deq)?)?;
        let err = rel_err(&gx, &want);
        assert!(err < 1e-6, "{dtype:?} grad_x rel err {err:e}");

        // Same against autograd of the dense computation on dequant(W) in f64.
        let (x64, r64, deq64) = (x.to_dtype(DType::F64)?, r.to_dtype(DType::F64)?, deq.to_dtype(DType::F64)?);
        let dense = autograd(&|t| weighted_sum(&t.broadcast_matmul(&deq64.t()?)?, &r64), &x64)?;
        let err = rel_err(&gx, &dense);
        assert!(err < 1e-5, "{dtype:?} grad_x vs dense f64 autograd rel err {err:e}");

        // The f64 path runs the same custom backward; check it against finite differences.
        let xs = rand_t(&mut rng, &[2, in_f], DType::F64)?;
        let err = check_f64(&|t| Ok(frozen_qmatmul(t, &wq)?), &xs, &mut rng)?;
        assert!(err < F64_TOL, "{dtype:?} f64 grad vs finite differences rel err {err:e}");
    }
    Ok(())
}

/// PEFT-style LoRA on a frozen quantized base: `base(x) + (x·Aᵀ)·Bᵀ·s`.
fn lora(x: &Tensor, w: &Arc<QTensor>, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    let base = frozen_qmatmul(x, w)?;
    let delta = (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * s)?;
    Ok((base + delta)?)
}

/// Gradient of `loss(params)` with respect to `params[which]`, by finite differences.
fn fd_param(loss: &dyn Fn(&[Tensor]) -> Result<f64>, params: &[Tensor], which: usize, h: f64) -> Result<Vec<f64>> {
    fd_grad(
        &|t| {
            let mut p = params.to_vec();
            p[which] = t.clone();
            loss(&p)
        },
        &params[which],
        h,
    )
}

#[test]
fn lora_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (d_in, d_out, rank, s) = (64, 16, 2, 16.0 / 2.0);
    let w = quantized(&mut rng, d_out, d_in, GgmlDType::Q4_0)?;
    let x = rand_t(&mut rng, &[2, 3, d_in], DType::F32)?;
    let r = rand_t(&mut rng, &[2, 3, d_out], DType::F32)?;
    // B is non-zero here (PEFT starts it at zero) so both gradients are informative.
    let a = Var::from_tensor(&(rand_t(&mut rng, &[rank, d_in], DType::F32)? * 0.1)?)?;
    let b = Var::from_tensor(&(rand_t(&mut rng, &[d_out, rank], DType::F32)? * 0.1)?)?;

    let loss = weighted_sum(&lora(&x, &w, a.as_tensor(), b.as_tensor(), s)?, &r)?;
    let grads = loss.backward()?;
    let ga = to_vec(grads.get(a.as_tensor()).context("no grad for A")?)?;
    let gb = to_vec(grads.get(b.as_tensor()).context("no grad for B")?)?;

    // The loss is linear in A for fixed B and vice versa, and the quantized base term does not
    // depend on either, so f32 central differences are exact up to rounding (~1e-4 here).
    let f = |p: &[Tensor]| scalar(&weighted_sum(&lora(&x, &w, &p[0], &p[1], s)?, &r)?);
    let params = [a.as_tensor().detach(), b.as_tensor().detach()];
    let err_a = rel_err(&ga, &fd_param(&f, &params, 0, 1e-2)?);
    let err_b = rel_err(&gb, &fd_param(&f, &params, 1, 1e-2)?);
    assert!(err_a < 1e-3 && err_b < 1e-3, "lora grad rel err A {err_a:e} B {err_b:e}");
    Ok(())
}

/// Two LoRA layers with the norm, RoPE and softmax between them, so the first layer's gradient
/// has to pass back through every custom op.
fn two_layer(x: &Tensor, w: &[Arc<QTensor>; 2], p: &[Tensor], norm_w: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let (heads, hd) = (2, d / 2);
    let h = rms_norm(x, norm_w, 1e-6)?;
    let q = lora(&h, &w[0], &p[0], &p[1], 4.0)?;
    let q = q.reshape((b, t, heads, hd))?.transpose(1, 2)?;
    let q = rope_interleaved(&q, &rope.0, &rope.1)?;
    let q = q.transpose(1, 2)?.reshape((b, t, d))?;
    let a = softmax_last_dim(&q)?;
    lora(&a, &w[1], &p[2], &p[3], 4.0)
}

#[test]
fn gradients_reach_earlier_lora_through_all_ops() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (d, rank) = (32, 2);
    let w = [quantized(&mut rng, d, d, GgmlDType::Q8_0)?, quantized(&mut rng, d, d, GgmlDType::Q4_0)?];
    let x = rand_t(&mut rng, &[1, 3, d], DType::F64)?;
    let norm_w = rand_t(&mut rng, &[d], DType::F64)?.affine(0.1, 1.0)?;
    let rope = rope_tables(3, d / 2, DType::F64)?;
    let mut params = Vec::new();
    for shape in [[rank, d], [d, rank], [rank, d], [d, rank]] {
        params.push((rand_t(&mut rng, &shape, DType::F64)? * 0.2)?);
    }
    let r = rand_t(&mut rng, &[1, 3, d], DType::F64)?;

    // Reference: f64 throughout (the quantized layers run densely on dequant(W)).
    let f = |p: &[Tensor]| scalar(&weighted_sum(&two_layer(&x, &w, p, &norm_w, &rope)?, &r)?);
    let vars = params.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = weighted_sum(&two_layer(&x, &w, &tracked, &norm_w, &rope)?, &r)?.backward()?;

    // The same model on the real path: f32 activations through candle's quantized kernels.
    let cast = |t: &Tensor| t.to_dtype(DType::F32);
    let vars32 = params.iter().map(|p| Var::from_tensor(&cast(p)?)).collect::<candle_core::Result<Vec<_>>>()?;
    let tracked32: Vec<Tensor> = vars32.iter().map(|v| v.as_tensor().clone()).collect();
    let rope32 = (cast(&rope.0)?, cast(&rope.1)?);
    let y32 = two_layer(&cast(&x)?, &w, &tracked32, &cast(&norm_w)?, &rope32)?;
    let grads32 = weighted_sum(&y32, &cast(&r)?)?.backward()?;

    for (i, (v, v32)) in vars.iter().zip(&vars32).enumerate() {
        let g = to_vec(grads.get(v.as_tensor()).with_context(|| format!("no grad for param {i}"))?)?;
        let fd = fd_param(&f, &params, i, 1e-5)?;
        let err = rel_err(&g, &fd);
        assert!(err < 1e-6, "param {i}: f64 grad vs finite differences rel err {err:e}");
        // Loose: the real path quantizes activations to 8 bits in both quantized matmuls.
        let g32 = to_vec(grads32.get(v32.as_tensor()).with_context(|| format!("no f32 grad for param {i}"))?)?;
        let err = rel_err(&g32, &g);
        assert!(err < 5e-2, "param {i}: f32 quantized-path grad vs f64 reference rel err {err:e}");
    }
    Ok(())
}

#[test]
fn ops_accept_rank_one_and_strided_inputs() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let w = quantized(&mut rng, 8, 32, GgmlDType::Q8_0)?;
    let x = rand_t(&mut rng, &[32], DType::F32)?;
    assert_eq!(frozen_qmatmul(&x, &w)?.dims(), &[8]);
    // A transposed (strided) input still gets a gradient of the right shape.
    let xt = Var::from_tensor(&rand_t(&mut rng, &[32, 4], DType::F32)?)?;
    let y = frozen_qmatmul(&xt.as_tensor().t()?, &w)?;
    let grads = y.sum_all()?.backward()?;
    let g = grads.get(xt.as_tensor()).context("no grad for strided x")?;
    assert_eq!(g.dims(), &[32, 4]);
    let want = w.dequantize(&Device::Cpu)?.sum_keepdim(0)?.t()?.broadcast_as((32, 4))?;
    let err = rel_err(&to_vec(g)?, &to_vec(&want.contiguous()?)?);
    assert!(err < 1e-6, "strided grad rel err {err:e}");
    // softmax over a last dim reached through a transpose.
    let s = softmax_last_dim(&xt.as_tensor().t()?)?;
    let sums = to_vec(&s.sum(D::Minus1)?)?;
    assert!(sums.iter().all(|v| (v - 1.0).abs() < 1e-6));
    Ok(())
}

/// The ops on a CUDA device: the quantized op's gradient is exactly `grad · dequant(W)` there
/// too, and the dense ops' forward and gradient agree with the cpu. Runs only in
/// `--features cuda` builds on a machine with a GPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (b, t, d) = (2, 4, 256);
    let x = rand_t(&mut rng, &[b, t, d], DType::F32)?;
    let r = rand_t(&mut rng, &[b, t, d], DType::F32)?;
    let w_dense = rand_t(&mut rng, &[d, d], DType::F32)?;
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K] {
        let wq = Arc::new(QTensor::quantize(&w_dense.to_device(&gpu)?, dtype)?);
        let deq = wq.dequantize(&gpu)?;
        let xv = Var::from_tensor(&x.to_device(&gpu)?)?;
        let rg = r.to_device(&gpu)?;
        let y = frozen_qmatmul(xv.as_tensor(), &wq)?;
        let y_inf = QMatMul::from_arc(wq.clone())?.forward(xv.as_tensor())?;
        let y_dense = xv.as_tensor().broadcast_matmul(&deq.t()?)?;
        let grads = weighted_sum(&y, &rg)?.backward()?;
        let g = to_vec(grads.get(xv.as_tensor()).context("no grad for x")?)?;
        let want = to_vec(&rg.broadcast_matmul(&deq)?)?;
        let (e_inf, e_dense, e_grad) = (rel_err(&to_vec(&y)?, &to_vec(&y_inf)?), rel_err(&to_vec(&y)?, &to_vec(&y_dense)?), rel_err(&g, &want));
        eprintln!("cuda {dtype:?}: forward vs QMatMul {e_inf:e}, vs dense {e_dense:e}; grad {e_grad:e}");
        assert!(e_inf == 0.0 && e_dense < 2e-2 && e_grad < 1e-5, "cuda {dtype:?} frozen_qmatmul");
    }

    let norm_w = rand_t(&mut rng, &[d], DType::F32)?.affine(0.1, 1.0)?;
    let (cos, sin) = rope_tables(t, d / 2, DType::F32)?;
    type Op<'a> = Box<dyn Fn(&Tensor, &Device) -> Result<Tensor> + 'a>;
    let ops: Vec<(&str, Op)> = vec![
        ("rms_norm", Box::new(|x, dev| Ok(rms_norm(x, &norm_w.to_device(dev)?, 1e-6)?))),
        ("softmax", Box::new(|x, _| Ok(softmax_last_dim(x)?))),
        (
            "rope",
            Box::new(|x, dev| {
                let q = x.reshape((b, t, 2, d / 2))?.transpose(1, 2)?;
                let q = rope_interleaved(&q, &cos.to_device(dev)?, &sin.to_device(dev)?)?;
                Ok(q.transpose(1, 2)?.reshape((b, t, d))?)
            }),
        ),
    ];
    for (name, op) in &ops {
        let run = |dev: &Device| -> Result<(Vec<f64>, Vec<f64>)> {
            let xv = Var::from_tensor(&x.to_device(dev)?)?;
            let y = op(xv.as_tensor(), dev)?;
            let grads = weighted_sum(&y, &r.to_device(dev)?)?.backward()?;
            let g = grads.get(xv.as_tensor()).context("no grad for x")?;
            Ok((to_vec(&y)?, to_vec(g)?))
        };
        let ((y_cpu, g_cpu), (y_gpu, g_gpu)) = (run(&Device::Cpu)?, run(&gpu)?);
        let (ey, eg) = (rel_err(&y_gpu, &y_cpu), rel_err(&g_gpu, &g_cpu));
        eprintln!("cuda {name}: vs cpu forward {ey:e} grad {eg:e}");
        assert!(ey < 1e-5 && eg < 1e-5, "cuda {name}: forward {ey:e} grad {eg:e}");
    }
    Ok(())
}

/// Timings at a Mistral-7B MLP shape (tokens 2×512, 4096 → 14336, Q4K) on the GPU. Not a check:
/// run with `--ignored --nocapture` on a GPU machine to see what a training step pays.
#[cfg(feature = "cuda")]
#[test]
#[ignore]
fn cuda_timing() -> Result<()> {
    use std::time::Instant;
    let gpu = Device::new_cuda(0)?;
    let (m, k, n) = (1024, 4096, 14336);
    let w = Tensor::randn(0f32, 0.02, (n, k), &gpu)?;
    let wq = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K)?);
    drop(w);
    let x = Tensor::randn(0f32, 1.0, (m, k), &gpu)?;
    let r = Tensor::randn(0f32, 1.0, (m, n), &gpu)?;
    let qmm = QMatMul::from_arc(wq.clone())?;
    let time = |name: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
        f()?;
        gpu.synchronize()?;
        let iters = 10;
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        eprintln!("{name}: {:.3} ms", t0.elapsed().as_secs_f64() * 1e3 / iters as f64);
        Ok(())
    };
    time("QMatMul::forward (inference)", &|| {
        qmm.forward(&x)?;
        Ok(())
    })?;
    time("frozen_qmatmul forward", &|| {
        frozen_qmatmul(&x, &wq)?;
        Ok(())
    })?;
    time("dequantize W (Q4K → f32)", &|| {
        wq.dequantize(&gpu)?;
        Ok(())
    })?;
    time("frozen_qmatmul forward + backward", &|| {
        let xv = Var::from_tensor(&x)?;
        weighted_sum(&frozen_qmatmul(xv.as_tensor(), &wq)?, &r)?.backward()?;
        Ok(())
    })?;
    let h = Tensor::randn(0f32, 1.0, (m, k), &gpu)?;
    let nw = Tensor::ones(k, DType::F32, &gpu)?;
    time("candle_nn rms_norm (fused, no grad)", &|| {
        candle_nn::ops::rms_norm(&h, &nw, 1e-5)?;
        Ok(())
    })?;
    time("train rms_norm forward", &|| {
        rms_norm(&h, &nw, 1e-5)?;
        Ok(())
    })?;
    time("candle_nn softmax_last_dim (fused)", &|| {
        candle_nn::ops::softmax_last_dim(&h)?;
        Ok(())
    })?;
    time("train softmax_last_dim forward", &|| {
        softmax_last_dim(&h)?;
        Ok(())
    })?;
    Ok(())
}
