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
pub fn activate_id(engine: &Engine, publisher: Option<&Publisher>, store: &Store, dir: &Path, id: &str) -> Result<String> {
    activate_id_as(engine, publisher, store, dir, id, false)
}

fn activate_id_as(engine: &Engine, publisher: Option<&Publisher>, store: &Store, dir: &Path, id: &str, rollback: bool) -> Result<String> {
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
    let before = [engine.active_adapter_id().unwrap_or_default(), store.meta_get(PREVIOUS_KEY)?.unwrap_or_default()];
    let previous = before[0].clone();
    switch_remote(publisher, dir, id, &before, &previous, rollback, || install(engine, store, adapter, id))
}

/// [`rollback`] for Discord: the adapter to return to is loaded through [`activate_id`]; with a
/// remote server, the adapter rolled back from is unloaded there.
pub fn rollback_id(engine: &Engine, publisher: Option<&Publisher>, store: &Store, dir: &Path) -> Result<String> {
    let previous = store.meta_get(PREVIOUS_KEY)?.context("no earlier adapter to roll back to")?;
    activate_id_as(engine, publisher, store, dir, &previous, true)?;
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
/// With a remote server (`publisher`), the adapter is also published and loaded there; if the
/// server cannot load it, answers come from its base model until an adapter is activated.
pub fn restore(engine: &Engine, publisher: Option<&Publisher>, store: &Store, dir: &Path, configured: &str) -> Result<()> {
    let wanted = store.meta_get(ACTIVE_KEY)?.unwrap_or_else(|| configured.to_string());
    if wanted.is_empty() {
        return Ok(());
    }
    let loaded = match engine.active_adapter() {
        Some(a) if a.id == wanted => Ok(a),
        _ => load(engine, dir, &wanted),
    };
    match loaded.and_then(|a| switch_remote(publisher, dir, &wanted, &[], "", false, || Ok(a))) {
        Ok(a) => {
            engine.swap_adapter(Some(a));
            Ok(())
        }
        Err(e) => {
            tracing::error!(adapter = %wanted, error = format!("{e:#}"), "the saved active adapter does not load; answering without it");
            if publisher.is_some() {
                // The server would not know the adapter the engine names.
                engine.swap_adapter(None);
            }
            Ok(())
        }
    }
}

/// Keeps a remote model server's adapters in step with the active one (the `openai` backend):
/// an adapter about to become active is published (its folder copied into `llm.publish_dir`,
/// unless the server reads `adapter.dir` itself) and loaded on the server first, so a server
/// that cannot load it leaves the active adapter unchanged; adapters no longer active or the
/// rollback target are unloaded. Blocking: call it from a worker or blocking thread.
pub struct Publisher {
    client: crate::llm::remote::RemoteClient,
    /// Where adapter folders are copied (`None`: the server reads `adapter.dir`).
    publish_dir: Option<PathBuf>,
    /// `publish_dir` (or `adapter.dir`) as the server sees it (`None`: the same path).
    server_dir: Option<String>,
    rt: tokio::runtime::Handle,
}

impl Publisher {
    /// `publish_dir`/`server_dir`: `llm.publish_dir` / `llm.server_publish_dir` ("" = unset).
    pub fn new(client: crate::llm::remote::RemoteClient, publish_dir: &str, server_dir: &str, rt: tokio::runtime::Handle) -> Self {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Self { client, publish_dir: opt(publish_dir).map(PathBuf::from), server_dir: opt(server_dir), rt }
    }

    /// Publish adapter `id` from `dir` and load it on the server.
    pub fn push(&self, dir: &Path, id: &str) -> Result<()> {
        let src = dir.join(id);
        anyhow::ensure!(src.join(lora::CONFIG_FILE).is_file(), "no adapter `{id}` in {}", dir.display());
        let local = match &self.publish_dir {
            Some(p) => {
                publish_copy(&src, p, id).with_context(|| format!("publishing adapter {id} to {}", p.display()))?;
                p.join(id)
            }
            None => std::path::absolute(&src).with_context(|| format!("resolving {}", src.display()))?,
        };
        let server_path = match &self.server_dir {
            Some(d) => format!("{}/{id}", d.trim_end_matches('/')),
            None => local.display().to_string(),
        };
        self.rt.block_on(self.client.load_adapter(id, &server_path))
    }

    /// Unload `id` from the server (one not loaded is fine).
    pub fn unload(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.client.unload_adapter(id))
    }

    /// Unload each of `ids` not in `keep`, logging failures (the switch already happened).
    fn unload_all_but(&self, ids: &[String], keep: &[&str]) {
        for id in ids.iter().filter(|id| !id.is_empty() && !keep.contains(&id.as_str())) {
            if let Err(e) = self.unload(id) {
                tracing::warn!(adapter = %id, error = format!("{e:#}"), "unloading an adapter from the model server");
            }
        }
    }
}

/// Copy the adapter folder `src` to `publish/<id>` through a temporary sibling and a rename, so
/// the server never sees half a folder; an existing copy is replaced.
fn publish_copy(src: &Path, publish: &Path, id: &str) -> Result<()> {
    std::fs::create_dir_all(publish)?;
    let tmp = publish.join(format!(".{id}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        // The PEFT files and the reports beside them; checkpoints (sub-folders) stay behind.
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), tmp.join(entry.file_name()))?;
        }
    }
    let dst = publish.join(id);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst)?;
    Ok(())
}

/// Switch the server to `new` (already loaded into the engine by the caller) around `swap`:
/// publish + load it first (an error leaves everything as it was), run `swap`, then unload what
/// the server no longer needs: the ids in `before` except the new active adapter and, unless
/// `rollback`, the new rollback target (`previous`).
pub fn switch_remote<T>(publisher: Option<&Publisher>, dir: &Path, new: &str, before: &[String], previous: &str, rollback: bool, swap: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(p) = publisher else { return swap() };
    if !new.is_empty() {
        p.push(dir, new).context("the model server could not load the adapter")?;
    }
    let out = swap()?;
    let keep: Vec<&str> = if rollback { vec![new] } else { vec![new, previous] };
    p.unload_all_but(before, &keep);
    Ok(out)
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
