//! A finished run's record: `metrics.json` and `loss.png` (train and held-out loss against
//! steps, like the prototype's chart), both written atomically into the adapter folder.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::{EvalRecord, StepRecord};
use super::data::SplitReport;
use super::kto::{KtoWeights, PrefEval};
use super::settings::TrainSettings;
use crate::llm::lora::AdapterConfig;

pub const METRICS_FILE: &str = "metrics.json";
pub const CHART_FILE: &str = "loss.png";

/// DejaVu Sans (Bitstream Vera license, `assets/fonts/`): compiled in so charts render the same
/// on machines without system fonts.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub id: String,
    pub base_model: String,
    pub dataset_dir: String,
    pub dataset_hash: String,
    pub train_report: SplitReport,
    pub test_report: SplitReport,
    pub settings: TrainSettings,
    pub adapter: AdapterConfig,
    pub trainable_parameters: usize,
    pub steps: usize,
    pub total_steps: usize,
    pub stopped_early: bool,
    pub train_loss: Vec<StepRecord>,
    pub eval_loss: Vec<EvalRecord>,
    /// Held-out loss of the saved weights.
    pub final_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Highest whole-device reading while training, and the reading before it started.
    pub peak_device_memory_bytes: Option<u64>,
    pub device_memory_baseline_bytes: Option<u64>,
    pub peak_host_rss_bytes: Option<u64>,
    pub wall_time_s: f64,
    pub device: String,
    pub activation_dtype: String,
    pub finished_at: i64,
    /// The objective the run used (`train.objective` resolved: sft, kto or sft+kto).
    #[serde(default)]
    pub objective: String,
    /// The preference phase, when there was one.
    #[serde(default)]
    pub kto: Option<KtoSummary>,
    /// The latest `freeski-bot eval` on labelled answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference_eval: Option<super::eval::PreferenceReport>,
}

/// What the KTO phase trained on and how the preference figures moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KtoSummary {
    /// Labelled answers trained on.
    pub desirable: usize,
    pub undesirable: usize,
    pub weights: KtoWeights,
    pub beta: f64,
    /// "base" or the reference adapter's id.
    pub reference: String,
    /// First step of the phase and its number of steps.
    pub from_step: usize,
    pub steps: usize,
    /// Held-out feedback (`feedback_test.jsonl`): the bare base and the saved adapter.
    pub base_preference: Option<PrefEval>,
    pub preference: Option<PrefEval>,
}

impl Metrics {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(METRICS_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

pub fn write(dir: &Path, m: &Metrics) -> Result<()> {
    write_json(dir, m)?;
    let tmp = dir.join(format!(".tmp-{CHART_FILE}"));
    draw_chart(&tmp, &m.train_loss, &m.eval_loss, &m.id).context("drawing the loss chart")?;
    std::fs::rename(&tmp, dir.join(CHART_FILE)).context("moving loss.png into place")?;
    Ok(())
}

/// `metrics.json` alone, atomically (`eval` adds its preference figures this way).
pub fn write_json(dir: &Path, m: &Metrics) -> Result<()> {
    let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(m)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(METRICS_FILE)).context("moving metrics.json into place")?;
    Ok(())
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("could not register the chart font");
        }
    });
}

/// Train loss (thin) and held-out loss (thick, dotted points) against optimizer steps.
pub fn draw_chart(path: &Path, train: &[StepRecord], eval: &[EvalRecord], title: &str) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_step = train.iter().map(|r| r.step).chain(eval.iter().map(|e| e.step)).max().unwrap_or(1).max(1);
    let losses = train.iter().map(|r| r.loss).chain(eval.iter().map(|e| e.loss)).filter(|v| v.is_finite());
    let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Loss: {title}"), ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_step as f64, (lo - pad).max(0.0)..hi + pad)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart.configure_mesh().x_desc("step").y_desc("loss (nats/token)").label_style(("sans-serif", 14)).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    chart
        .draw_series(LineSeries::new(train.iter().map(|r| (r.step as f64, r.loss)), blue.stroke_width(1)))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("train")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().map(|e| (e.step as f64, e.loss)), orange.stroke_width(3)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("held-out")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(3)));
        chart.draw_series(eval.iter().map(|e| Circle::new((e.step as f64, e.loss), 4, orange.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 14)).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
