//! LoRA dropout with masks that are a pure function of a key.
//!
//! Gradient checkpointing runs each layer's forward twice; both runs must drop the same inputs,
//! and a resumed run must drop what the uninterrupted one did. So no mask comes from a running
//! RNG: each is drawn from a generator seeded by `(run seed, step, micro-batch, layer,
//! projection)`. On the CPU that is ChaCha8; on CUDA, curand reseeded before the draw.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

    /// Reseed the device generator for one layer's masks (CUDA; a no-op on the CPU, whose masks
    /// are keyed one by one).
    pub fn begin_layer(&self, device: &Device, key: MaskKey) -> Result<()> {
        if self.p > 0.0 && !device.is_cpu() {
            device.set_seed(self.mask_seed(MaskKey { proj: u64::MAX, ..key }))?;
        }
        Ok(())
    }

    /// `x` with a fraction `p` of its elements zeroed and the rest scaled by `1/(1-p)`;
    /// `x` itself when dropout is off. Differentiable in `x`.
    pub fn apply(&self, x: &Tensor, key: MaskKey) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let seed = self.mask_seed(key);
        let uniform = match x.device() {
            Device::Cpu => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let v: Vec<f32> = (0..x.elem_count()).map(|_| rng.random::<f32>()).collect();
                Tensor::from_vec(v, x.shape(), &Device::Cpu)?
            }
            // Drawn from the generator `begin_layer` seeded, in call order.
            dev => Tensor::rand(0f32, 1f32, x.shape(), dev)?,
        };
        let mask = (uniform.lt(keep)?.to_dtype(x.dtype())? * (1.0 / keep))?;
        Ok((x * mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

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
}
