//! The promotion gate and adapter pruning.
//!
//! Gate: the new adapter must load and validate on the engine's device, and its held-out loss
//! must not be worse than the active adapter's (or the bare base's) by more than
//! `worker.promotion_margin`, both measured on the same (new) dataset's held-out split, since a
//! loss from another dataset does not compare. When there is held-out feedback with questions
//! answered both well and badly, its preference accuracy must also be at least the active
//! model's. A refused adapter stays on disk for `/adapter activate`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::adapters;
use crate::llm::engine::Engine;
use crate::llm::load::LoadedModel;
use crate::llm::lora::LoraAdapter;
use crate::store::Store;
use crate::train::data::Dataset;
use crate::train::dropout::Dropout;
use crate::train::forward::TrainForward;
use crate::train::kto::{preference_eval, PrefEval};
use crate::train::params::LoraView;
use crate::train::trainer::{activation_dtype, evaluate};
use crate::train::TrainSettings;

/// Mean held-out loss of `adapter` (`None`: the bare base) on `data.test`.
pub fn held_out_loss(lm: &LoadedModel, adapter: Option<&LoraAdapter>, data: &Dataset, ts: &TrainSettings) -> Result<f64> {
    let model = &lm.model;
    let fwd = TrainForward::new(model, activation_dtype(ts.precision, model.device()), Dropout::off());
    let view = adapter.map(|a| LoraView::from_adapter(a, model.config().num_layers));
    evaluate(&fwd, view.as_ref(), &data.test, ts.batch_size)
}

/// Preference figures of `adapter` (`None`: the bare base) on the held-out feedback
/// (`data.feedback_test`); `None` when no held-out question has answers of both labels.
pub fn held_out_preference(lm: &LoadedModel, adapter: Option<&LoraAdapter>, data: &Dataset, ts: &TrainSettings) -> Result<Option<PrefEval>> {
    if data.feedback_test.is_empty() {
        return Ok(None);
    }
    let model = &lm.model;
    let fwd = TrainForward::new(model, activation_dtype(ts.precision, model.device()), Dropout::off());
    let view = adapter.map(|a| LoraView::from_adapter(a, model.config().num_layers));
    preference_eval(&fwd, view.as_ref(), &data.feedback_test, ts.batch_size)
}

/// What the gate compares: held-out loss of the active model and the new adapter, and their
/// preference figures on held-out feedback when there are any.
#[derive(Debug, Clone, Copy)]
pub struct Evidence {
    pub old_loss: f64,
    pub new_loss: f64,
    pub margin: f64,
    pub old_preference: Option<PrefEval>,
    pub new_preference: Option<PrefEval>,
}

/// Whether the preference figures allow the swap: the new accuracy is at least the old one
/// (nothing to compare passes; a non-finite figure never does).
pub fn prefers(old: Option<PrefEval>, new: Option<PrefEval>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => n.accuracy.is_finite() && n.margin.is_finite() && (!o.accuracy.is_finite() || n.accuracy >= o.accuracy),
        _ => true,
    }
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Activated; `previous` was active before ("" = bare base).
    Promoted { previous: String },
    /// Kept on disk, not activated, for this reason.
    Kept { reason: String },
}

/// Whether a loss of `new` may replace `old` under `margin`. Non-finite losses never pass.
pub fn passes(old: f64, new: f64, margin: f64) -> bool {
    new.is_finite() && (!old.is_finite() || new <= old + margin)
}

/// Load and validate adapter `id` for the engine, then activate it (hot-swap + persist) if its
/// loss passes. Returns the decision and the loaded adapter (for side-by-side answers).
pub fn gate(engine: &Engine, store: &Store, dir: &Path, id: &str, e: &Evidence) -> Result<(Decision, Arc<LoraAdapter>)> {
    gate_and_publish(engine, None, store, dir, id, e)
}

/// [`gate`] with a remote model server: a passing adapter is published and loaded there before
/// it becomes active (a server that cannot load it keeps the adapter from being activated, with
/// the reason), and the adapter that is neither active nor the rollback target any more is
/// unloaded there.
pub fn gate_and_publish(engine: &Engine, publisher: Option<&adapters::Publisher>, store: &Store, dir: &Path, id: &str, e: &Evidence) -> Result<(Decision, Arc<LoraAdapter>)> {
    let adapter = adapters::load(engine, dir, id).context("the new adapter does not load")?;
    let (old_loss, new_loss, margin) = (e.old_loss, e.new_loss, e.margin);
    if !passes(old_loss, new_loss, margin) {
        let reason = format!("its held-out loss {new_loss:.4} is worse than the active model's {old_loss:.4} by more than the margin {margin}");
        tracing::warn!(adapter = id, new_loss, old_loss, margin, "adapter not promoted");
        return Ok((Decision::Kept { reason }, adapter));
    }
    if !prefers(e.old_preference, e.new_preference) {
        let (o, n) = (e.old_preference.map_or(f64::NAN, |p| p.accuracy), e.new_preference.map_or(f64::NAN, |p| p.accuracy));
        let reason = format!("its preference accuracy on held-out feedback {:.0}% is below the active model's {:.0}%", n * 100.0, o * 100.0);
        tracing::warn!(adapter = id, new_accuracy = n, old_accuracy = o, "adapter not promoted");
        return Ok((Decision::Kept { reason }, adapter));
    }
    let previous = engine.active_adapter_id().unwrap_or_default();
    let before = [previous.clone(), store.meta_get(adapters::PREVIOUS_KEY)?.unwrap_or_default()];
    // Swap the Arc just loaded (the same weights the gate validated) and persist the choice.
    let swapped = adapters::switch_remote(publisher, dir, id, &before, &previous, false, || adapters::install(engine, store, Some(adapter.clone()), id));
    if let Err(e) = swapped {
        if engine.active_adapter_id().as_deref() != Some(id) {
            let reason = format!("{e:#}");
            tracing::warn!(adapter = id, error = %reason, "adapter not promoted: the model server refused it");
            return Ok((Decision::Kept { reason }, adapter));
        }
        return Err(e);
    }
    tracing::info!(adapter = id, previous = %previous, new_loss, old_loss, "adapter promoted");
    Ok((Decision::Promoted { previous }, adapter))
}

/// Delete finished adapters beyond the `keep` newest (by training time), never the active one,
/// its predecessor or `protect`. Returns the ids removed.
pub fn prune(store: &Store, dir: &Path, keep: usize, protect: &str) -> Result<Vec<String>> {
    let active = store.meta_get(adapters::ACTIVE_KEY)?.unwrap_or_default();
    let previous = store.meta_get(adapters::PREVIOUS_KEY)?.unwrap_or_default();
    let mut all: Vec<(i64, adapters::AdapterInfo)> = adapters::list(dir)?
        .into_iter()
        .map(|a| {
            let finished = crate::train::report::Metrics::read(&a.path).map(|m| m.finished_at).unwrap_or(0);
            (finished, a)
        })
        .collect();
    // Newest first; ties (same second) by id, descending.
    all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.id.cmp(&a.1.id)));
    let mut removed = Vec::new();
    for (_, a) in all.into_iter().skip(keep) {
        if [active.as_str(), previous.as_str(), protect].contains(&a.id.as_str()) {
            continue;
        }
        std::fs::remove_dir_all(&a.path).with_context(|| format!("removing old adapter {}", a.path.display()))?;
        tracing::info!(adapter = %a.id, "old adapter pruned");
        removed.push(a.id);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_rule() {
        assert!(passes(1.0, 1.0, 0.0));
        assert!(passes(1.0, 1.01, 0.02));
        assert!(!passes(1.0, 1.03, 0.02));
        assert!(!passes(1.0, f64::NAN, 0.02));
        assert!(passes(f64::NAN, 5.0, 0.0), "an unmeasurable old loss never blocks");
        let p = |accuracy, margin| Some(PrefEval { questions: 4, accuracy, margin });
        assert!(prefers(p(0.5, 0.1), p(0.5, -0.2)), "equal accuracy passes");
        assert!(prefers(p(0.5, 0.1), p(0.75, 0.3)));
        assert!(!prefers(p(0.75, 0.1), p(0.5, 0.3)));
        assert!(!prefers(p(0.5, 0.1), p(f64::NAN, 0.3)));
        assert!(prefers(None, p(0.25, 0.0)) && prefers(p(0.5, 0.0), None), "nothing to compare passes");
    }

    /// An adapter folder without metrics.json: pruning then orders by id.
    fn fake_adapter(dir: &Path, id: &str) {
        let p = dir.join(id);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(crate::llm::lora::CONFIG_FILE), "{}").unwrap();
    }

    #[test]
    fn prune_keeps_newest_active_and_previous() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("s.db")).unwrap();
        let dir = tmp.path().join("adapters");
        for id in ["a1", "a2", "a3", "a4", "a5"] {
            fake_adapter(&dir, id);
        }
        store.meta_set(adapters::ACTIVE_KEY, "a1").unwrap();
        store.meta_set(adapters::PREVIOUS_KEY, "a2").unwrap();
        let removed = prune(&store, &dir, 2, "a3").unwrap();
        // Newest by id (no metrics): a5, a4 kept; a3 protected; a2, a1 active/previous.
        assert!(removed.is_empty(), "{removed:?}");
        let removed = prune(&store, &dir, 1, "").unwrap();
        assert_eq!(removed, vec!["a4".to_string(), "a3".to_string()]);
        let left: Vec<String> = adapters::list(&dir).unwrap().into_iter().map(|a| a.id).collect();
        assert_eq!(left, vec!["a1", "a2", "a5"]);
    }
}
