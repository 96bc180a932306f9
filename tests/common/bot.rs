//! The real bot (`bot::run`) started in-process against the fake Discord, and stopped the way
//! Ctrl-C stops it.

use std::sync::Arc;
use std::time::Duration;

use freeski_bot::bot::{self, Token};
use freeski_bot::config::Settings;
use freeski_bot::llm::backend::Backend;
use freeski_bot::llm::engine::Engine;
use freeski_bot::llm::load::LoadedModel;

use super::fake_discord::FakeDiscord;

pub struct Bot {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub engine: Engine,
}

/// Starts an engine on `lm` and the bot on it; returns once the bot's gateway session is up.
pub async fn start(fake: &FakeDiscord, settings: Arc<Settings>, lm: Arc<LoadedModel>) -> Bot {
    let engine = Engine::start(lm, None, settings.engine_config()).unwrap();
    start_with(fake, settings, Backend::local(engine)).await
}

/// The bot on `backend` (e.g. a remote server beside a local engine).
pub async fn start_with(fake: &FakeDiscord, settings: Arc<Settings>, backend: Backend) -> Bot {
    let sessions = fake.identifies() + 1;
    let engine = backend.engine().clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(bot::run(Arc::new(settings.bot_config()), backend, Token::new("test-token"), async move {
        let _ = rx.await;
    }));
    fake.wait_connected(sessions).await;
    Bot { stop: Some(tx), task, engine }
}

impl Bot {
    /// Graceful shutdown; fails the test if the bot does not stop or `bot::run` returned an error.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(120), self.task).await.expect("bot did not stop").unwrap().expect("bot::run failed");
    }
}
