//! The adapters folder (`adapter.dir`: one PEFT folder per trained adapter) and which adapter is
//! active. The active id and its predecessor are kept in the store's `meta` table, so a restart
//! (and `/adapter rollback`) finds them; `/adapter activate`, rollback and the worker's promotion
//! all go through [`activate`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::llm::engine::Engine;
use crate::llm::lora::{self, LoraAdapter};
use crate::store::Store;

/// `[adapter]` settings: where adapters live, which one is active at start, and whether it is
/// merged into the base (documented with their defaults in `config/default.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSettings {
    pub dir: PathBuf,
    pub active: String,
    pub merge: bool,
}

/// `meta` key of the active adapter id ("" = bare base).
pub const ACTIVE_KEY: &str = "adapter.active";
/// `meta` key of the adapter active before it (what rollback returns to).
pub const PREVIOUS_KEY: &str = "adapter.previous";

/// An adapter folder as listed by `/adapter list` and `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub id: String,
    pub path: PathBuf,
    /// Held-out loss of the saved weights, from the trainer's `metrics.json`, if recorded.
    pub eval_loss: Option<f64>,
    /// When training finished (from `metrics.json`, else the folder's modification time).
    pub trained_at: Option<String>,
}

/// Adapter folders under `dir` (those holding an `adapter_config.json`), by id.
pub fn list(dir: &Path) -> Result<Vec<AdapterInfo>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing adapters in {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.join(lora::CONFIG_FILE).is_file() {
            out.push(info(&path));
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// What is known about the adapter in `path`.
pub fn info(path: &Path) -> AdapterInfo {
    let id = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let metrics = crate::train::report::Metrics::read(path).ok();
    let eval_loss = metrics.as_ref().and_then(|m| m.final_eval_loss);
    let finished = metrics.as_ref().and_then(|m| u64::try_from(m.finished_at).ok()).map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
    let trained_at = finished.or_else(|| std::fs::metadata(path).and_then(|m| m.modified()).ok()).map(httpdate::fmt_http_date);
    AdapterInfo { id, path: path.to_path_buf(), eval_loss, trained_at }
}

/// Load and validate adapter `id` (an id under `dir` or a path) for the engine's model.
pub fn load(engine: &Engine, dir: &Path, id: &str) -> Result<Arc<LoraAdapter>> {
    let path = lora::resolve_dir(id, dir)?;
    let lm = engine.model();
    let a = LoraAdapter::load(&path, lm.model.config(), lm.model.device()).with_context(|| format!("loading adapter {id}"))?;
    Ok(Arc::new(a))
}

/// Make `id` active ("" = bare base): load and validate it, hot-swap it into the engine and
/// persist it (the one it replaces becomes the rollback target). Returns the previous id.
/// `id` may be a path (the command line's way); Discord goes through [`activate_id`].
pub fn activate(engine: &Engine, store: &Store, dir: &Path, id: &str) -> Result<String> {
    let adapter = match id {
        "" => None,
        id => Some(load(engine, dir, id)?),
    };
    install(engine, store, adapter, id)
}

/// Longest adapter id accepted from Discord.
pub const MAX_ID_CHARS: usize = 100;

/// Check that `id` names a folder directly inside the adapters folder: one plain path
/// component (no separators, no `.`/`..`, not absolute), not hidden (temporary folders start
/// with a dot), no control characters, at most [`MAX_ID_CHARS`] characters. The error never
/// repeats the id (it may be long or hostile).
pub fn validate_id(id: &str) -> Result<()> {
    let one_plain_component = {
        let mut c = Path::new(id).components();
        matches!((c.next(), c.next()), (Some(std::path::Component::Normal(_)), None))
    };
    anyhow::ensure!(
        !id.is_empty() && id.chars().count() <= MAX_ID_CHARS && one_plain_component && !id.starts_with('.') && !id.contains(['/', '\\']) && !id.chars().any(char::is_control),
        "not an adapter id: ids are folder names inside the adapters folder (no paths, at most {MAX_ID_CHARS} characters)"
    );
    Ok(())
}

/// [`activate`] for ids coming from Discord: `id` ("" = bare base) must pass [`validate_id`]
/// and is loaded from `dir/<id>` only, never as a path of its own or from the working folder.
pub fn activate_id(engine: &Engine, store: &Store, dir: &Path, id: &str) -> Result<String> {
    let adapter = match id {
        "" => None,
        id => {
            validate_id(id)?;
            let path = dir.join(id);
            if !path.join(lora::CONFIG_FILE).is_file() {
                let known: Vec<String> = list(dir)?.into_iter().map(|a| a.id).collect();
                anyhow::bail!("no adapter `{id}` in the adapters folder; available: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") });
            }
            let lm = engine.model();
            Some(Arc::new(LoraAdapter::load(&path, lm.model.config(), lm.model.device()).with_context(|| format!("loading adapter {id}"))?))
        }
    };
    install(engine, store, adapter, id)
}

/// [`rollback`] for Discord: the adapter to return to is loaded through [`activate_id`].
pub fn rollback_id(engine: &Engine, store: &Store, dir: &Path) -> Result<String> {
    let previous = store.meta_get(PREVIOUS_KEY)?.context("no earlier adapter to roll back to")?;
    activate_id(engine, store, dir, &previous)?;
    Ok(previous)
}

/// Hot-swap `adapter` (loaded and validated by the caller; `None` = bare base) into the engine
/// and persist `id` as active, the one it replaces as the rollback target. Returns that one.
/// Every activation ends here: [`activate`], [`activate_id`] and the worker's promotion gate.
pub fn install(engine: &Engine, store: &Store, adapter: Option<Arc<LoraAdapter>>, id: &str) -> Result<String> {
    let previous = engine.active_adapter_id().unwrap_or_default();
    engine.swap_adapter(adapter);
    store.meta_set(PREVIOUS_KEY, &previous)?;
    store.meta_set(ACTIVE_KEY, id)?;
    Ok(previous)
}

/// Return to the adapter active before the current one. Returns the id now active.
pub fn rollback(engine: &Engine, store: &Store, dir: &Path) -> Result<String> {
    let previous = store.meta_get(PREVIOUS_KEY)?.context("no earlier adapter to roll back to")?;
    activate(engine, store, dir, &previous)?;
    Ok(previous)
}

/// At start-up: the adapter to activate is the persisted one if any, else `configured`
/// (`adapter.active`). A persisted adapter that no longer loads is reported and skipped.
pub fn restore(engine: &Engine, store: &Store, dir: &Path, configured: &str) -> Result<()> {
    let wanted = store.meta_get(ACTIVE_KEY)?.unwrap_or_else(|| configured.to_string());
    if wanted.is_empty() || engine.active_adapter_id().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    match load(engine, dir, &wanted) {
        Ok(a) => {
            engine.swap_adapter(Some(a));
            Ok(())
        }
        Err(e) => {
            tracing::error!(adapter = %wanted, error = format!("{e:#}"), "the saved active adapter does not load; answering without it");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::validate_id;

    #[test]
    fn only_plain_folder_names_are_ids() {
        for ok in ["lora-job3", "my adapter v2", "a.b"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(5000);
        for bad in ["", "/etc", "../x", "..", ".", "a/b", "a\\b", ".hidden", "x\n", long.as_str()] {
            let e = validate_id(bad).expect_err(bad).to_string();
            assert!(e.chars().count() < 200, "{e}");
        }
    }
}
