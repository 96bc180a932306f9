//! Training checkpoints: one `checkpoint.safetensors` per run folder holding the LoRA weights,
//! the AdamW moments, the best weights so far, and (in the safetensors metadata) the JSON
//! [`TrainState`]: step, data position, histories. One file written to a temporary name and
//! renamed over the old one, so a kill at any moment leaves either the previous checkpoint or
//! the new one, never a torn file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const STATE_KEY: &str = "freeski_train_state";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    /// KTO steps: the KL baseline the step used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: usize,
    pub loss: f64,
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next micro-batch and its index in that epoch's plan.
    pub epoch: u64,
    pub cursor: usize,
    pub adam_t: u64,
    /// Tokens processed (padding excluded) and target tokens.
    pub tokens: u64,
    pub elapsed_s: f64,
    pub history: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub best: Option<EvalRecord>,
    pub evals_without_improvement: usize,
    pub dataset_hash: String,
    /// The settings that decide the result (JSON of `TrainSettings` and the adapter config):
    /// resuming under different ones is refused.
    pub fingerprint: String,
    pub base_model: String,
    /// The step at which the KTO phase started (`None`: still in SFT, or no KTO).
    #[serde(default)]
    pub kto_from: Option<usize>,
}

pub struct Checkpoint {
    pub state: TrainState,
    pub tensors: HashMap<String, Tensor>,
}

pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT_FILE)
}

/// Write `tensors` and `state` atomically into `run_dir`.
pub fn save(run_dir: &Path, state: &TrainState, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let cpu: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    let final_path = path(run_dir);
    let tmp = crate::util::tmp_path::beside(&final_path);
    safetensors::serialize_to_file(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    // The data must be on disk before the rename makes it the checkpoint.
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &final_path).with_context(|| format!("moving {} into place", final_path.display()))?;
    Ok(())
}

/// Read the checkpoint in `run_dir`, if there is one.
pub fn load(run_dir: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let p = path(run_dir);
    if !p.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{} is corrupt", p.display()))?;
    let state = meta.metadata().as_ref().and_then(|m| m.get(STATE_KEY)).with_context(|| format!("{} has no training state", p.display()))?;
    let state: TrainState = serde_json::from_str(state).with_context(|| format!("{}: bad training state", p.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).with_context(|| format!("{} is corrupt or truncated", p.display()))?;
    for (name, t) in &tensors {
        let finite = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
        ensure!(finite, "{}: tensor `{name}` is not finite", p.display());
    }
    Ok(Some(Checkpoint { state, tensors }))
}

pub fn remove(run_dir: &Path) -> Result<()> {
    let p = path(run_dir);
    if p.exists() {
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}
