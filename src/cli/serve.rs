//! `serve`: the OpenAI-compatible HTTP API. Loads the model, starts the engine with the
//! `[serve]` queue and batch, serves the adapters named on the command line and runs
//! `serve::serve` until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::ask::{ModelArgs, Session};
use crate::config::Settings;
use crate::llm::engine::EngineConfig;
use crate::llm::lora::LoraAdapter;
use crate::serve::{self, ServeState, API_KEY_ENV};
use crate::util::secret::Secret;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address and port to listen on (default: serve.listen; port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<String>,
    /// Also serve the adapter in folder PATH under NAME (repeatable); `--adapter` is served
    /// under its id.
    #[arg(long = "lora", value_name = "NAME=PATH")]
    pub loras: Vec<String>,
}

pub fn run(settings: &Settings, args: ServeArgs) -> Result<()> {
    // The key first: a missing or unreadable key file fails before the (slow) model load.
    let key = Secret::from_env_or_file(std::env::var(API_KEY_ENV).ok(), &settings.serve.api_key_file, "API key")?;
    let loras = args.loras.iter().map(|l| parse_lora(l)).collect::<Result<Vec<_>>>()?;
    let listen = args.listen.clone().unwrap_or_else(|| settings.serve.listen.clone());
    let addr: std::net::SocketAddr = listen.parse().with_context(|| format!("--listen {listen:?} is not an address and port like 127.0.0.1:8000"))?;
    let settings = args.model.apply(settings)?;
    let cfg = EngineConfig { queue_capacity: settings.serve.queue_capacity, max_batch: settings.serve.max_batch, system_prompt: settings.generation.system_prompt.clone() };
    let session = Session::open_with(&settings, &args.model, cfg)?;
    let engine = session.engine;
    let base = if settings.serve.model_name.is_empty() { engine.model().name.clone() } else { settings.serve.model_name.clone() };
    let state = ServeState::new(engine.clone(), base, settings.generation.clone(), settings.model.max_context, settings.serve.clone(), key);
    // `--adapter` (or adapter.active) is served under its id; the base stays the base.
    if let Some(a) = engine.swap_adapter(None) {
        let path = crate::llm::lora::resolve_dir(args.model.adapter.as_deref().unwrap_or(&settings.adapter.active), &settings.adapter.dir)?;
        state.add_adapter(&a.id.clone(), a, path)?;
    }
    for (name, path) in loras {
        let lm = engine.model();
        let a = LoraAdapter::load(&path, lm.model.config(), lm.model.device()).with_context(|| format!("loading adapter {name} from {}", path.display()))?;
        state.add_adapter(&name, Arc::new(a), path)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        let bound = listener.local_addr().context("reading the listening address")?;
        tracing::info!(model = state.base_name(), adapters = ?state.adapter_names(), "serving on http://{bound}/v1");
        // On stdout, for scripts (and tests) that start the server on port 0.
        println!("listening on http://{bound}");
        serve::serve(listener, state, super::run::shutdown_signal()).await
    })
}

/// `NAME=PATH`.
fn parse_lora(s: &str) -> Result<(String, PathBuf)> {
    let (name, path) = s.split_once('=').with_context(|| format!("--lora {s:?}: expected NAME=PATH"))?;
    anyhow::ensure!(!name.is_empty() && !path.is_empty(), "--lora {s:?}: expected NAME=PATH");
    Ok((name.to_string(), PathBuf::from(path)))
}
