//! AdamW with decoupled weight decay (Loshchilov & Hutter, as `torch.optim.AdamW`), global-norm
//! gradient clipping and the warmup + decay learning-rate schedule.
//!
//! candle-nn has an AdamW, but its moment estimates are private; checkpoints must save and
//! restore them for a resumed run to continue exactly, so the optimizer lives here.

use anyhow::{ensure, Result};
use candle_core::{Tensor, Var};

use super::settings::Schedule;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates done so far (bias correction uses it).
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[&Var]) -> Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { cfg, t: 0, m, v })
    }

    /// Forget the moments and the step count: a new phase of training (another objective)
    /// starts with a fresh optimizer.
    pub fn reset(&mut self) -> Result<()> {
        for t in self.m.iter_mut().chain(self.v.iter_mut()) {
            *t = t.zeros_like()?;
        }
        self.t = 0;
        Ok(())
    }

    /// One update of every variable with its gradient times `grad_scale` (same order as at
    /// construction): on CUDA one kernel a variable, in place.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], grad_scale: f64, lr: f64) -> Result<()> {
        ensure!(vars.len() == grads.len() && vars.len() == self.m.len(), "optimizer: {} variables, {} gradients, {} states", vars.len(), grads.len(), self.m.len());
        self.t += 1;
        let c = self.cfg;
        let k = StepConsts {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            decay: 1.0 - lr * c.weight_decay,
            bc1: 1.0 - c.beta1.powi(self.t as i32),
            bc2: 1.0 - c.beta2.powi(self.t as i32),
            grad_scale,
        };
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            if adamw_in_place(var.as_tensor(), g, &self.m[i], &self.v[i], k)? {
                continue;
            }
            let (p, m, v) = adamw_update_composed(var.as_tensor(), g, &self.m[i], &self.v[i], k)?;
            var.set(&p)?;
            // Detached, so a gradient that carries graph history cannot chain one step's moments
            // to the next (each step would keep the previous one's tensors alive).
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }
}

/// The scalars of one AdamW step.
#[derive(Debug, Clone, Copy)]
pub struct StepConsts {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 − lr · weight_decay`.
    pub decay: f64,
    /// Bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    pub bc1: f64,
    pub bc2: f64,
    /// Factor on the gradient: gradient clipping ([`clip_scale`]).
    pub grad_scale: f64,
}

/// One AdamW update of `p`, `m` and `v` in place by one fused kernel, where one applies (CUDA,
/// all f32, contiguous `p`, `m`, `v`); `false` leaves them as they were for
/// [`adamw_update_composed`].
pub fn adamw_in_place(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: StepConsts) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && [p, g, m, v].iter().all(|t| t.dtype() == candle_core::DType::F32) && [p, m, v].iter().all(|t| t.is_contiguous()) {
        let f = |x: f64| x as f32;
        let args = crate::kernels::AdamWArgs { lr: f(k.lr), beta1: f(k.beta1), beta2: f(k.beta2), eps: f(k.eps), decay: f(k.decay), bc1: f(k.bc1), bc2: f(k.bc2), gscale: f(k.grad_scale) };
        crate::kernels::adamw_in_place(p, &g.detach(), m, v, args)?;
        return Ok(true);
    }
    let _ = (p, g, m, v, k);
    Ok(false)
}

/// `(p', m', v')` of one AdamW update as tensor ops: the CPU path and the fused kernel's
/// reference.
pub fn adamw_update_composed(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: StepConsts) -> Result<(Tensor, Tensor, Tensor)> {
    let g = if k.grad_scale == 1.0 { g.clone() } else { (g * k.grad_scale)? };
    let g = &g;
    let m = ((m * k.beta1)? + (g * (1.0 - k.beta1))?)?;
    let v = ((v * k.beta2)? + (g.sqr()? * (1.0 - k.beta2))?)?;
    let update = ((&m / k.bc1)? / ((&v / k.bc2)?.sqrt()? + k.eps)?)?;
    let p = ((p * k.decay)? - (update * k.lr)?)?;
    Ok((p, m, v))
}

/// The factor that brings gradients of global L2 norm `norm` to at most `max_norm` (0
/// disables clipping): 1 when they are within it.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Learning rate for optimizer step `step` (0-based) of `total`: linear warmup over `warmup`
/// steps (the first step already gets `base/warmup`, not zero), then cosine or linear decay to
/// zero, or constant.
pub fn learning_rate(schedule: Schedule, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Two steps by hand against the formulas of torch.optim.AdamW.
    #[test]
    fn adamw_matches_the_reference_update() -> Result<()> {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?)?;
        let mut opt = AdamW::new(cfg, &[&var])?;
        let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [[0.5f64, -1.0], [0.25, 2.0]].iter().enumerate() {
            let lr = 0.01;
            opt.step(&[&var], &[Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu)?], 1.0, lr)?;
            for i in 0..2 {
                p[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - 0.999f64.powi(t as i32 + 1));
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for i in 0..2 {
            assert!((got[i] - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        Ok(())
    }

    /// A gradient that still carries graph history (here: derived from a variable) must not
    /// link the moments to it: otherwise every step keeps the previous step's tensors alive.
    #[test]
    fn moments_carry_no_graph_history() -> Result<()> {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?)?;
        let mut opt = AdamW::new(cfg, &[&var])?;
        let tracked_grad = (var.as_tensor() * 2.0)?;
        opt.step(&[&var], &[tracked_grad], 1.0, 0.01)?;
        for moment in [&opt.m[0], &opt.v[0]] {
            let grads = moment.sum_all()?.backward()?;
            assert!(grads.get(var.as_tensor()).is_none(), "a moment still depends on the variable");
        }
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        assert!((clip_scale(5.0, 1.0) * 5.0 - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(5.0, 0.0), 1.0, "0 disables clipping");
        assert_eq!(clip_scale(f64::NAN, 1.0), 1.0);
        assert_eq!(clip_scale(f64::INFINITY, 1.0), 1.0);
    }

    /// A step with `grad_scale` is the step on the gradient multiplied by it.
    #[test]
    fn scaled_step_equals_the_step_on_scaled_gradients() -> Result<()> {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let start = [0.5f32, -1.5, 2.0];
        let (a, b) = (Var::from_tensor(&Tensor::new(&start, &Device::Cpu)?)?, Var::from_tensor(&Tensor::new(&start, &Device::Cpu)?)?);
        let (mut oa, mut ob) = (AdamW::new(cfg, &[&a])?, AdamW::new(cfg, &[&b])?);
        for g in [[3.0f32, -4.0, 0.5], [1.0, 2.0, -8.0]] {
            let g = Tensor::new(&g, &Device::Cpu)?;
            oa.step(&[&a], std::slice::from_ref(&g), 0.25, 0.01)?;
            ob.step(&[&b], &[(g * 0.25)?], 1.0, 0.01)?;
        }
        let (pa, pb) = (a.as_tensor().to_vec1::<f32>()?, b.as_tensor().to_vec1::<f32>()?);
        assert!(pa.iter().zip(&pb).all(|(x, y)| (x - y).abs() <= 1e-6), "{pa:?} vs {pb:?}");
        assert!(pa.iter().zip(&start).all(|(x, s)| x != s), "the step changed nothing: {pa:?}");
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lr = |s| learning_rate(Schedule::Cosine, 1.0, s, 10, 110);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.5).abs() < 1e-12);
        assert!(lr(110) < 1e-12);
        assert!((learning_rate(Schedule::Linear, 2.0, 60, 10, 110) - 1.0).abs() < 1e-12);
    }
}
