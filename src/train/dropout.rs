//! LoRA dropout with masks that are a pure function of a key.
//!
//! Gradient checkpointing runs each layer's forward twice; both runs must drop the same inputs,
//! and a resumed run must drop what the uninterrupted one did. So no mask comes from a running
//! RNG: element `i` of the mask for `(run seed, step, micro-batch, layer, projection)` is kept
//! when a counter-based hash of the key and `i` falls below `keep`. The hash is cheap enough to
//! recompute in the backward pass (no mask is stored), and the CPU code below and the CUDA
//! kernel (`src/kernels/dropout.cu`) compute the same masks bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use crate::util::hash::lowbias32;

#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

/// Where in the run a mask is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskKey {
    pub step: u64,
    pub micro: u64,
    pub layer: u64,
    pub proj: u64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    pub fn off() -> Self {
        Self { p: 0.0, seed: 0 }
    }

    fn mask_seed(&self, k: MaskKey) -> u64 {
        [k.step, k.micro, k.layer, k.proj].into_iter().fold(splitmix(self.seed), |h, v| splitmix(h ^ v))
    }

    /// `x` with a fraction `p` of its elements zeroed and the rest scaled by `1/(1-p)`;
    /// `x` itself when dropout is off. Differentiable in `x`.
    pub fn apply(&self, x: &Tensor, key: MaskKey) -> Result<Tensor> {
        match self.op(key)? {
            Some(op) => x.contiguous()?.apply_op1(op),
            None => Ok(x.clone()),
        }
    }

    /// `add + self.apply(x, key)`, in one kernel on CUDA (rounded once there); not
    /// differentiable (the hand-written backward sums its LoRA input gradients with it).
    pub fn apply_add(&self, x: &Tensor, add: &Tensor, key: MaskKey) -> Result<Tensor> {
        let Some(op) = self.op(key)? else { return add + x };
        if let Some(y) = crate::kernels::keyed_dropout_add(x, add, op.k0, op.k1, op.threshold, op.scale)? {
            return Ok(y);
        }
        add + x.contiguous()?.apply_op1(op)?
    }

    /// The mask op for `key`; `None` when dropout is off.
    fn op(&self, key: MaskKey) -> Result<Option<KeyedDropout>> {
        if self.p <= 0.0 {
            return Ok(None);
        }
        if !(0.0..1.0).contains(&self.p) {
            bail!("dropout probability {} is outside [0, 1)", self.p)
        }
        let keep = 1.0 - self.p;
        let seed = self.mask_seed(key);
        Ok(Some(KeyedDropout { k0: seed as u32, k1: (seed >> 32) as u32, threshold: (keep * (1u64 << 24) as f64).round() as u32, scale: (1.0 / keep) as f32 }))
    }
}

/// `y = x ∘ mask / keep`; its backward is the same op on the gradient.
#[derive(Debug, Clone, Copy)]
struct KeyedDropout {
    k0: u32,
    k1: u32,
    threshold: u32,
    scale: f32,
}

impl KeyedDropout {
    fn kept(&self, i: u64) -> bool {
        let h = lowbias32(i as u32 ^ self.k0);
        let h = lowbias32(h ^ self.k1 ^ ((i >> 32) as u32).wrapping_mul(0x9e37_79b9));
        (h >> 8) < self.threshold
    }

    fn map<T: Copy>(&self, x: &[T], zero: T, scaled: impl Fn(T) -> T) -> Vec<T> {
        x.iter().enumerate().map(|(i, &v)| if self.kept(i as u64) { scaled(v) } else { zero }).collect()
    }
}

impl CustomOp1 for KeyedDropout {
    fn name(&self) -> &'static str {
        "keyed-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("keyed dropout: input must be contiguous, got {l:?}") };
        let scale = self.scale;
        // Half types: product in f32, rounded once (what the kernel does).
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.map(&x[a..b], 0.0, |v| v * scale)),
            CpuStorage::F64(x) => CpuStorage::F64(self.map(&x[a..b], 0.0, |v| v * scale as f64)),
            CpuStorage::BF16(x) => CpuStorage::BF16(self.map(&x[a..b], bf16::ZERO, |v| bf16::from_f32(v.to_f32() * scale))),
            CpuStorage::F16(x) => CpuStorage::F16(self.map(&x[a..b], f16::ZERO, |v| f16::from_f32(v.to_f32() * scale))),
            other => bail!("keyed dropout: {:?} is not a float type", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            let out = crate::kernels::keyed_dropout(s, l, self.k0, self.k1, self.threshold, self.scale)?;
            Ok((out, l.shape().clone()))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s, l);
            bail!("keyed dropout: this binary was built without CUDA")
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(*self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn masks_repeat_per_key_and_keep_the_expected_share() -> Result<()> {
        let d = Dropout { p: 0.25, seed: 3 };
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu)?;
        let k = MaskKey { step: 1, micro: 0, layer: 2, proj: 3 };
        let a = d.apply(&x, k)?;
        assert_eq!(a.to_vec2::<f32>()?, d.apply(&x, k)?.to_vec2::<f32>()?);
        let b = d.apply(&x, MaskKey { layer: 3, ..k })?;
        assert_ne!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        // E[mask] = 1: kept values are scaled by 1/(1-p).
        let mean = a.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        let zeros = a.eq(0f32)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        assert!((zeros - 0.25).abs() < 0.03, "dropped share {zeros}");
        Ok(())
    }

    #[test]
    fn a_dropped_term_summed_into_a_total_is_the_total_plus_the_dropout() -> Result<()> {
        let k = MaskKey { step: 4, micro: 0, layer: 1, proj: 2 };
        let x = Tensor::randn(0f32, 1.0, (9, 33), &Device::Cpu)?;
        let total = Tensor::randn(0f32, 1.0, (9, 33), &Device::Cpu)?;
        for p in [0.0, 0.2] {
            let d = Dropout { p, seed: 8 };
            let want = (&total + d.apply(&x, k)?)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(d.apply_add(&x, &total, k)?.flatten_all()?.to_vec1::<f32>()?, want, "p = {p}");
        }
        assert!(Dropout { p: 1.5, seed: 8 }.apply_add(&x, &total, k).is_err(), "a probability outside [0, 1) is refused");
        Ok(())
    }

    #[test]
    fn neighbouring_elements_and_keys_are_uncorrelated() -> Result<()> {
        // A weak hash shows up as correlation between adjacent elements or adjacent keys.
        let d = Dropout { p: 0.5, seed: 11 };
        let n = 1 << 16;
        let x = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        let k = MaskKey { step: 0, micro: 0, layer: 0, proj: 0 };
        let m: Vec<f32> = d.apply(&x, k)?.to_vec1()?;
        let m2: Vec<f32> = d.apply(&x, MaskKey { proj: 1, ..k })?.to_vec1()?;
        let corr = |a: &[f32], b: &[f32]| -> f64 {
            let c: Vec<(f64, f64)> = a.iter().zip(b).map(|(&p, &q)| (p as f64 - 1.0, q as f64 - 1.0)).collect();
            c.iter().map(|(p, q)| p * q).sum::<f64>() / c.len() as f64
        };
        assert!(corr(&m[..n - 1], &m[1..]).abs() < 0.02, "adjacent elements correlate");
        assert!(corr(&m, &m2).abs() < 0.02, "adjacent keys correlate");
        Ok(())
    }

    #[test]
    fn backward_applies_the_forward_mask_and_half_types_round_once() -> Result<()> {
        let d = Dropout { p: 0.3, seed: 5 };
        let k = MaskKey { step: 2, micro: 1, layer: 0, proj: 6 };
        let x = Var::from_tensor(&Tensor::arange(1f32, 257.0, &Device::Cpu)?)?;
        let y = d.apply(x.as_tensor(), k)?;
        let g = y.sum_all()?.backward()?;
        let gx: Vec<f32> = g.get(x.as_tensor()).expect("gradient").to_vec1()?;
        let yv: Vec<f32> = y.to_vec1()?;
        for (i, (&gi, &yi)) in gx.iter().zip(&yv).enumerate() {
            // dy/dx is the mask scaled by 1/keep: zero exactly where y is zero.
            assert_eq!(gi == 0.0, yi == 0.0, "element {i}");
            if gi != 0.0 {
                assert!((gi - 1.0 / 0.7).abs() < 1e-6);
            }
        }
        let xb = x.as_tensor().to_dtype(DType::BF16)?;
        let yb: Vec<f32> = d.apply(&xb, k)?.to_dtype(DType::F32)?.to_vec1()?;
        for (i, (&b, &f)) in yb.iter().zip(&yv).enumerate() {
            assert_eq!(b, bf16::from_f32(f).to_f32(), "element {i}");
        }
        Ok(())
    }
}
