//! `run`: the Discord bot. Loads the model, starts the engine and hands both to `bot::run`,
//! which runs until Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::ask::{ModelArgs, Session};
use crate::bot::{self, Token};
use crate::config::{BackendKind, Settings};
use crate::llm::backend::Backend;
use crate::llm::remote::{self, RemoteClient};
use crate::util::secret::Secret;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(settings: &Settings, args: RunArgs) -> Result<()> {
    // Read the token before the (slow) model load, so a missing one fails at once.
    let token = Token::from_env_or_file(std::env::var("DISCORD_TOKEN").ok(), &settings.discord.token_file)?;
    // The bot answers with these settings, so the generation flags apply to every answer.
    let settings = Arc::new(args.model.apply(settings)?);
    let session = Session::open(&settings, &args.model)?;
    tracing::info!(
        max_context = crate::llm::generate::max_context(settings.model.max_context, session.engine.model().model.config()),
        queue = settings.bot.queue_capacity,
        "engine ready"
    );
    let backend = match settings.llm.backend {
        BackendKind::Local => Backend::local(session.engine),
        BackendKind::Openai => {
            let key = Secret::from_env_or_file(std::env::var(remote::API_KEY_ENV).ok(), &settings.llm.api_key_file, "model server API key")?;
            tracing::info!(server = %settings.llm.base_url, model = %settings.llm.model, "answers come from an OpenAI-compatible server; the local model counts tokens and trains");
            Backend::remote(session.engine, RemoteClient::from_settings(&settings.llm, key)?)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(bot::run(Arc::new(settings.bot_config()), backend, token, shutdown_signal()))
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "SIGTERM handler unavailable; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
