//! `run`: the Discord bot. Loads the model, starts the engine and hands both to `bot::run`,
//! which runs until Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::ask::{engine_config, ModelArgs, Session};
use crate::bot::{self, Token};
use crate::config::Settings;

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
        queue = engine_config(&settings).queue_capacity,
        "engine ready"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(bot::run(settings, session.engine, token, shutdown_signal()))
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
