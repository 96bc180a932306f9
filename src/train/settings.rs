//! `[train]` settings: LoRA shape, data handling, optimiser, evaluation and checkpoints.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::llm::model::Proj;

/// Which tokens the loss is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// Only the assistant's answers (and the token that ends them).
    Assistant,
    /// Every token after the first.
    All,
}

/// What to do with a dataset line that is not a usable conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadLines {
    /// Skip it, count it, and report the count.
    Skip,
    /// Stop with an error naming the file and line.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Activation precision of the training forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 on CUDA, f32 on the CPU.
    Auto,
    F32,
    Bf16,
}

/// What a run optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Objective {
    /// `sft+kto` when the dataset has at least `train.kto_min_examples` labelled answers, else
    /// `sft`; `kto` for a folder of labelled answers only.
    #[serde(rename = "auto")]
    Auto,
    /// Supervised fine-tuning on `train.jsonl`.
    #[serde(rename = "sft")]
    Sft,
    /// KTO on the labelled answers of `feedback.jsonl` only.
    #[serde(rename = "kto")]
    Kto,
    /// SFT, then KTO continuing from its weights.
    #[serde(rename = "sft+kto")]
    SftKto,
}

impl Objective {
    /// The objective a run uses on a dataset with (`conversations`) or without training
    /// conversations and `labelled` feedback answers.
    pub fn resolve(self, conversations: bool, labelled: usize, min_examples: usize) -> Objective {
        match self {
            Objective::Auto if !conversations => Objective::Kto,
            Objective::Auto if labelled >= min_examples.max(1) => Objective::SftKto,
            Objective::Auto => Objective::Sft,
            o => o,
        }
    }

    pub fn has_sft(self) -> bool {
        matches!(self, Objective::Sft | Objective::SftKto | Objective::Auto)
    }

    pub fn has_kto(self) -> bool {
        matches!(self, Objective::Kto | Objective::SftKto)
    }

    pub fn name(self) -> &'static str {
        match self {
            Objective::Auto => "auto",
            Objective::Sft => "sft",
            Objective::Kto => "kto",
            Objective::SftKto => "sft+kto",
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Objective::Auto,
            "sft" => Objective::Sft,
            "kto" => Objective::Kto,
            "sft+kto" => Objective::SftKto,
            other => anyhow::bail!("unknown objective `{other}` (expected sft, kto, sft+kto or auto)"),
        })
    }
}

/// The model KTO measures the policy against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoReference {
    /// The frozen base with the adapter switched off.
    Base,
    /// The adapter active when the run starts (the base when none is).
    Active,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    pub max_len: usize,
    pub loss_on: LossOn,
    pub bad_lines: BadLines,
    pub use_system_prompt: bool,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: f64,
    pub max_steps: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub max_grad_norm: f64,
    pub eval_every: usize,
    pub eval_max_conversations: usize,
    pub early_stop_patience: usize,
    pub early_stop_min_delta: f64,
    pub checkpoint_every: usize,
    pub gradient_checkpointing: bool,
    pub precision: Precision,
    pub seed: u64,
    pub device: String,
    pub eval_questions: usize,
    pub objective: Objective,
    pub kto_min_examples: usize,
    pub kto_beta: f64,
    pub kto_desirable_weight: f64,
    pub kto_undesirable_weight: f64,
    pub kto_reference: KtoReference,
    pub kto_learning_rate: f64,
    pub kto_epochs: f64,
    pub kto_max_steps: usize,
}

impl TrainSettings {
    /// Reject values that deserialize fine but make no sense, naming the key.
    pub fn validate(&self) -> Result<()> {
        let t = "train";
        ensure!(self.rank > 0, "{t}.rank must be at least 1");
        ensure!(self.alpha > 0.0 && self.alpha.is_finite(), "{t}.alpha must be > 0, got {}", self.alpha);
        ensure!((0.0..1.0).contains(&self.dropout), "{t}.dropout must be in [0, 1), got {}", self.dropout);
        self.targets().with_context(|| format!("{t}.target_modules"))?;
        ensure!(self.max_len >= 2, "{t}.max_len must be at least 2 tokens");
        ensure!(self.batch_size > 0, "{t}.batch_size must be at least 1");
        ensure!(self.grad_accum > 0, "{t}.grad_accum must be at least 1");
        ensure!(self.epochs > 0.0 && self.epochs.is_finite() || self.max_steps > 0, "{t}.epochs must be > 0 unless {t}.max_steps is set");
        ensure!(self.learning_rate > 0.0 && self.learning_rate.is_finite(), "{t}.learning_rate must be > 0, got {}", self.learning_rate);
        ensure!(self.weight_decay >= 0.0, "{t}.weight_decay must be >= 0");
        ensure!((0.0..1.0).contains(&self.adam_beta1), "{t}.adam_beta1 must be in [0, 1)");
        ensure!((0.0..1.0).contains(&self.adam_beta2), "{t}.adam_beta2 must be in [0, 1)");
        ensure!(self.adam_eps > 0.0, "{t}.adam_eps must be > 0");
        ensure!(self.max_grad_norm >= 0.0, "{t}.max_grad_norm must be >= 0 (0 disables clipping)");
        ensure!(self.early_stop_min_delta >= 0.0, "{t}.early_stop_min_delta must be >= 0");
        ensure!(self.kto_beta > 0.0 && self.kto_beta.is_finite(), "{t}.kto_beta must be > 0, got {}", self.kto_beta);
        for (k, v) in [("kto_desirable_weight", self.kto_desirable_weight), ("kto_undesirable_weight", self.kto_undesirable_weight)] {
            ensure!(v >= 0.0 && v.is_finite(), "{t}.{k} must be >= 0 (0 chooses it from the label counts), got {v}");
        }
        ensure!(self.kto_learning_rate > 0.0 && self.kto_learning_rate.is_finite(), "{t}.kto_learning_rate must be > 0, got {}", self.kto_learning_rate);
        ensure!(self.kto_epochs > 0.0 && self.kto_epochs.is_finite() || self.kto_max_steps > 0, "{t}.kto_epochs must be > 0 unless {t}.kto_max_steps is set");
        Ok(())
    }

    /// The projections LoRA adapts, from PEFT module names.
    pub fn targets(&self) -> Result<Vec<Proj>> {
        ensure!(!self.target_modules.is_empty(), "no target modules given");
        let mut out = Vec::new();
        for name in &self.target_modules {
            let p = Proj::from_hf_name(name).with_context(|| format!("unknown module `{name}` (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)"))?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }
}
