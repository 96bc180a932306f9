//! Fetching models from the Hugging Face Hub through `hf-hub` (cached in the standard HF cache,
//! with an offline switch that never touches the network).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::llm::settings::ModelSettings;

/// Files of an HF model folder that the loader reads (shards come from the index).
const FOLDER_FILES: [&str; 2] = ["config.json", "tokenizer.json"];

/// Download (or find in the cache) `file` of `repo`, or the whole HF folder when `file` is None.
/// Returns the local path of the file, or of the folder.
pub fn fetch(repo: &str, file: Option<&str>, settings: &ModelSettings) -> Result<PathBuf> {
    let repo = repo.to_string();
    let file = file.map(str::to_string);
    let settings = settings.clone();
    // hf-hub's blocking client runs its own runtime; a plain thread keeps that legal even when
    // the caller is inside tokio (the bot loads models from async code).
    let handle = std::thread::spawn(move || fetch_blocking(&repo, file.as_deref(), &settings));
    handle.join().map_err(|_| anyhow::anyhow!("model download thread panicked"))?
}

fn fetch_blocking(repo: &str, file: Option<&str>, settings: &ModelSettings) -> Result<PathBuf> {
    let (owner, name) = repo.split_once('/').with_context(|| format!("bad repo id `{repo}`"))?;
    let mut builder = hf_hub::HFClientBuilder::new().user_agent(concat!("freeski-bot/", env!("CARGO_PKG_VERSION")));
    if !settings.hub_cache_dir.is_empty() {
        builder = builder.cache_dir(&settings.hub_cache_dir);
    }
    let client = builder.build_sync().context("creating the Hugging Face Hub client")?;
    let handle = client.model(owner, name);
    let get = |f: &str| -> Result<PathBuf> {
        tracing::info!(repo, file = f, offline = settings.offline, "fetching from the Hugging Face Hub");
        handle
            .download_file()
            .filename(f)
            .revision(settings.revision.clone())
            .local_files_only(settings.offline)
            .progress(hf_hub::progress::Progress::new(DownloadBar::new(f)))
            .send()
            .map_err(|e| explain(repo, f, settings.offline, e))
    };
    match file {
        Some(f) => get(f),
        None => {
            let mut dir = None;
            for f in FOLDER_FILES {
                dir = get(f)?.parent().map(|p| p.to_path_buf());
            }
            let dir = dir.context("hub returned a path without a parent folder")?;
            let shards = match get("model.safetensors.index.json") {
                Ok(index) => {
                    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
                    let names: std::collections::BTreeSet<String> =
                        v["weight_map"].as_object().map(|m| m.values().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
                    names.into_iter().collect::<Vec<_>>()
                }
                Err(_) => vec!["model.safetensors".to_string()],
            };
            for s in &shards {
                get(s)?;
            }
            Ok(dir)
        }
    }
}

/// indicatif bar for one file's download (hidden until bytes actually flow, so cache hits
/// print nothing).
struct DownloadBar {
    bar: indicatif::ProgressBar,
    done: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl DownloadBar {
    fn new(file: &str) -> Self {
        let bar = indicatif::ProgressBar::hidden();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(file.to_string());
        Self { bar, done: Default::default() }
    }

    fn show(&self, total: u64) {
        if self.bar.is_hidden() && total > 0 {
            self.bar.set_length(total);
            self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }
}

impl hf_hub::progress::ProgressHandler for DownloadBar {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent, ProgressEvent};
        let ProgressEvent::Download(ev) = event else { return };
        match ev {
            DownloadEvent::Start { total_bytes, .. } => self.show(*total_bytes),
            DownloadEvent::Progress { files } => {
                // Deltas per file: keep each file's latest count and show the sum.
                if let Ok(mut done) = self.done.lock() {
                    for f in files {
                        done.insert(f.filename.clone(), f.bytes_completed);
                    }
                    self.bar.set_position(done.values().sum());
                }
            }
            DownloadEvent::AggregateProgress { bytes_completed, total_bytes, .. } => {
                self.show(*total_bytes);
                self.bar.set_position(*bytes_completed);
            }
            DownloadEvent::Complete => self.bar.finish_and_clear(),
        }
    }
}

/// Turn a hub failure into an error that says how to run without the network.
fn explain(repo: &str, file: &str, offline: bool, e: hf_hub::HFError) -> anyhow::Error {
    let how = "To use a model file you already have, set `source = \"/path/to/model.gguf\"` (or a Hugging Face folder) \
               under [model] in config/local.toml, or pass --model /path/to/model.gguf, or set FREESKI__MODEL__SOURCE=/path/to/model.gguf";
    if offline {
        anyhow::anyhow!("{file} of {repo} is not in the local Hugging Face cache and model.offline = true forbids downloading it ({e}). {how}")
    } else {
        anyhow::anyhow!("could not fetch {file} of {repo} from the Hugging Face Hub ({e}). No network? {how}")
    }
}
