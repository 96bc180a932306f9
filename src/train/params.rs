//! The trainable LoRA weights: one `A` (`[r, in]`) and `B` (`[out, r]`) per adapted projection,
//! initialised as PEFT does (A Kaiming-uniform with a = √5, so U(−1/√in, 1/√in); B zero), kept
//! in f32 in the model's (GGUF) row order, and turned into a [`LoraAdapter`] for saving.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::llm::lora::{AdapterConfig, LoraAdapter, LoraPair};
use crate::llm::model::Proj;
use crate::llm::ModelConfig;

pub struct LoraVars {
    pub a: Var,
    pub b: Var,
}

pub struct LoraParams {
    pub config: AdapterConfig,
    pub scale: f64,
    model: ModelConfig,
    slots: Vec<[Option<LoraVars>; 7]>,
}

/// A layer's LoRA tensors `(A, B)` for one forward: tracked (the `Var`s themselves) or
/// detached tensors sharing their storage (no autograd graph is built).
pub type LayerLora = [Option<(Tensor, Tensor)>; 7];

/// Untracked LoRA weights of every layer with their scale: what evaluation applies, from the
/// weights being trained or from an adapter loaded from disk.
pub struct LoraView {
    pub scale: f64,
    pub layers: Vec<LayerLora>,
}

impl LoraView {
    pub fn from_adapter(adapter: &LoraAdapter, num_layers: usize) -> Self {
        let layers = (0..num_layers)
            .map(|i| {
                let mut row: LayerLora = Default::default();
                for p in Proj::ALL {
                    row[p.index()] = adapter.pair(i, p).map(|pair| (pair.a.clone(), pair.b.clone()));
                }
                row
            })
            .collect();
        Self { scale: adapter.config.scale(), layers }
    }
}

impl LoraParams {
    pub fn init(model: &ModelConfig, config: AdapterConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = config.r;
        let scale = config.scale();
        let mut slots = Vec::with_capacity(model.num_layers);
        for _ in 0..model.num_layers {
            let mut row: [Option<LoraVars>; 7] = Default::default();
            for p in Proj::ALL {
                if !config.targets(p) {
                    continue;
                }
                let (fan_in, fan_out) = p.shape(model);
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a: Vec<f32> = (0..r * fan_in).map(|_| rng.random_range(-bound..bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, fan_in), device)?)?;
                let b = Var::zeros((fan_out, r), DType::F32, device)?;
                row[p.index()] = Some(LoraVars { a, b });
            }
            slots.push(row);
        }
        Ok(Self { config, scale, model: model.clone(), slots })
    }

    /// Every variable with a stable name, in a fixed order (optimizer state and checkpoints
    /// are matched by it).
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, row) in self.slots.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(v) = &row[p.index()] {
                    out.push((format!("layers.{i}.{}.lora_A", p.hf_name()), &v.a));
                    out.push((format!("layers.{i}.{}.lora_B", p.hf_name()), &v.b));
                }
            }
        }
        out
    }

    /// The `(A, B)` variables of projection `p` in layer `layer`, if it is adapted.
    pub fn pair(&self, layer: usize, p: Proj) -> Option<(&Var, &Var)> {
        self.slots[layer][p.index()].as_ref().map(|v| (&v.a, &v.b))
    }

    pub fn num_parameters(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn view(&self) -> LoraView {
        LoraView { scale: self.scale, layers: (0..self.slots.len()).map(|i| self.layer(i, false)).collect() }
    }

    pub fn layer(&self, layer: usize, tracked: bool) -> LayerLora {
        let pick = |t: &Var| if tracked { t.as_tensor().clone() } else { t.as_tensor().detach() };
        let mut out: LayerLora = Default::default();
        for (slot, v) in out.iter_mut().zip(&self.slots[layer]) {
            *slot = v.as_ref().map(|v| (pick(&v.a), pick(&v.b)));
        }
        out
    }

    /// Overwrite the values (checkpoint restore), checking names and shapes.
    pub fn load_values(&self, get: impl Fn(&str) -> Option<Tensor>) -> Result<()> {
        for (name, var) in self.named_vars() {
            let t = get(&name).with_context(|| format!("checkpoint lacks `{name}`"))?;
            anyhow::ensure!(t.dims() == var.dims(), "checkpoint `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// A snapshot of the current values as an adapter the LLM core can apply and save.
    pub fn to_adapter(&self, id: &str) -> Result<LoraAdapter> {
        let mut pairs: Vec<[Option<LoraPair>; 7]> = Vec::with_capacity(self.slots.len());
        for row in &self.slots {
            let mut out: [Option<LoraPair>; 7] = Default::default();
            for (slot, v) in out.iter_mut().zip(row) {
                if let Some(v) = v {
                    *slot = Some(LoraPair::new(v.a.as_tensor().copy()?, v.b.as_tensor().copy()?, self.scale)?);
                }
            }
            pairs.push(out);
        }
        LoraAdapter::from_pairs(id.to_string(), self.config.clone(), &self.model, pairs)
    }
}
