//! The Discord bot: a serenity 0.12 client that answers questions with the engine, takes votes
//! from reactions and runs slash commands. [`run`] is the whole bot; `freeski-bot run` only
//! loads the model, starts the engine and calls it (tests call it with a tiny model).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use serenity::all::{ClientBuilder, GatewayIntents, HttpBuilder, MessageId};
use tokio_util::task::TaskTracker;

use crate::adapters::Publisher;
use crate::discord::Shards;
use crate::llm::backend::Backend;
use crate::llm::engine::{Canceller, Engine};
use crate::store::Store;

pub mod answer;
pub mod commands;
pub mod feedback;
pub mod handler;
pub mod ratelimit;
pub mod redact;
pub mod settings;

pub use settings::{BotConfig, BotSettings};

/// The bot token. Never printed: `Debug` hides it and nothing logs it.
pub struct Token(String);

impl Token {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// From `DISCORD_TOKEN`, else from the file named by `discord.token_file`.
    pub fn from_env_or_file(env_token: Option<String>, token_file: &str) -> Result<Self> {
        if let Some(t) = env_token.filter(|t| !t.trim().is_empty()) {
            return Ok(Self(t.trim().to_string()));
        }
        anyhow::ensure!(!token_file.is_empty(), "no Discord token: set DISCORD_TOKEN or discord.token_file (see README.md)");
        let t = std::fs::read_to_string(Path::new(token_file)).with_context(|| format!("reading the Discord token file {token_file}"))?;
        anyhow::ensure!(!t.trim().is_empty(), "the Discord token file {token_file} is empty");
        Ok(Self(t.trim().to_string()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Message ids already handled, so a gateway replay (resume) never answers twice.
#[derive(Default)]
struct SeenIds {
    set: HashSet<MessageId>,
    order: VecDeque<MessageId>,
}

/// Everything the handlers share.
pub struct BotState {
    pub settings: Arc<BotConfig>,
    /// The local engine: tokenizer, training, the active adapter; answers too unless `backend`
    /// is remote.
    pub engine: Engine,
    /// Where answers come from.
    pub backend: Backend,
    /// With a remote backend: keeps the server's adapters in step with the active one.
    pub publisher: Option<Arc<Publisher>>,
    store: Mutex<Store>,
    pub limiter: ratelimit::UserLimiter,
    /// Questions being answered, by message id: deleting the message cancels its answer.
    pub inflight: Mutex<HashMap<MessageId, Canceller>>,
    pub shutting_down: AtomicBool,
    seen: Mutex<SeenIds>,
    /// Votes on answers whose messages exist but which are not stored yet.
    pub streaming: feedback::StreamingVotes,
    pub tasks: TaskTracker,
}

impl BotState {
    pub fn new(settings: Arc<BotConfig>, backend: Backend, publisher: Option<Arc<Publisher>>, store: Store) -> Self {
        let limiter = ratelimit::UserLimiter::new(settings.bot.user_questions_per_minute, settings.bot.user_burst);
        Self {
            settings,
            engine: backend.engine().clone(),
            backend,
            publisher,
            store: Mutex::new(store),
            limiter,
            inflight: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            seen: Mutex::new(SeenIds::default()),
            streaming: feedback::StreamingVotes::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// The store (calls are short transactions; never hold the guard across an `.await`).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn store_mut(&self) -> MutexGuard<'_, Store> {
        self.store()
    }

    pub fn retry_policy(&self) -> crate::discord::rest::RetryPolicy {
        self.settings.discord.retry_policy()
    }

    /// True the first time a message id is seen.
    pub fn first_sight(&self, id: MessageId) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.set.insert(id) {
            return false;
        }
        seen.order.push_back(id);
        if seen.order.len() > 4096 {
            if let Some(old) = seen.order.pop_front() {
                seen.set.remove(&old);
            }
        }
        true
    }
}

/// Gateway intents: guild and direct messages with their content and reactions.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
        | GatewayIntents::GUILD_MESSAGE_REACTIONS
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::DIRECT_MESSAGE_REACTIONS
}

/// Run the bot until `shutdown` resolves (or the gateway connection ends for good). On
/// shutdown, answers in flight are cancelled and their messages closed with a note (within
/// `bot.shutdown_grace_ms`), then the gateway is closed and the engine stopped.
/// `backend` answers (the local engine, or a remote server with the local engine beside it for
/// tokens and training; see `llm::backend`).
pub async fn run(settings: Arc<BotConfig>, backend: Backend, token: Token, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let engine = backend.engine().clone();
    let store = Store::open_with(&settings.store)?;
    let interrupted = store.interrupt_running_jobs()?;
    if interrupted > 0 {
        tracing::warn!(jobs = interrupted, "jobs left running by the previous run are marked interrupted");
    }
    let publisher =
        backend.remote_client().map(|c| Arc::new(Publisher::new(c.clone(), &settings.llm.publish_dir, &settings.llm.server_publish_dir, tokio::runtime::Handle::current())));
    if let Some(c) = backend.remote_client() {
        tracing::info!(server = c.base_url(), "answering through an OpenAI-compatible server");
    }
    // Loading (and, remote, publishing) an adapter is blocking work.
    let (e, s, p) = (engine.clone(), settings.clone(), publisher.clone());
    let store = tokio::task::spawn_blocking(move || crate::adapters::restore(&e, p.as_deref(), &store, &s.adapter.dir, &s.adapter.active).map(|_| store))
        .await
        .context("restoring the active adapter")??;
    let bot = Arc::new(BotState::new(settings.clone(), backend.clone(), publisher.clone(), store));

    let mut http = HttpBuilder::new(&token.0);
    let api_base = settings.discord.api_base.trim_end_matches('/');
    if !api_base.is_empty() {
        // serenity ignores the proxy while its rate limiter is on (serenity issue 1739); behind
        // a proxy, rate limits are the proxy's job.
        http = http.proxy(api_base).ratelimiter_disabled(true);
        tracing::info!(api_base, "Discord REST goes through the configured API base");
    }
    let mut client = ClientBuilder::new_with_http(http.build(), intents()).event_handler(handler::Handler::new(bot.clone())).await.context("connecting to Discord")?;
    let shards = client.shard_manager.clone();
    // Jobs queued by /rescrape and /retrain run here, beside the bot, on their own threads.
    let worker = crate::worker::Worker::spawn(Arc::new(settings.worker.clone()), engine.clone(), client.http.clone(), publisher)?;
    // One gateway connection per shard: Discord wants about 1,000 guilds per shard and
    // refuses a single connection from 2,500.
    let shard_count = settings.discord.shards;
    tracing::info!(shards = ?shard_count, "connecting to the gateway");
    let mut gateway = tokio::spawn(async move {
        match shard_count {
            Shards::Auto => client.start_autosharded().await,
            Shards::Count(1) => client.start().await,
            Shards::Count(n) => client.start_shards(n).await,
        }
    });

    let ended_by_gateway = tokio::select! {
        r = &mut gateway => Some(r),
        _ = shutdown => None,
    };
    tracing::info!("shutting down");
    bot.shutting_down.store(true, Ordering::SeqCst);
    // A training job stops at its next micro-batch (checkpoint saved) and ends `interrupted`;
    // before the engine stops, so a job's last answers still work.
    worker.shutdown(Duration::from_millis(settings.bot.shutdown_grace_ms)).await;
    // Cancels generations in flight (each answer task then closes its message) and fails the
    // queued ones with a polite note; the same for answers a remote server is generating.
    backend.shutdown();
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await.context("stopping the engine")?;
    bot.tasks.close();
    if tokio::time::timeout(Duration::from_millis(settings.bot.shutdown_grace_ms), bot.tasks.wait()).await.is_err() {
        tracing::warn!("answers still open after the grace period; leaving them");
    }
    shards.shutdown_all().await;
    let result = match ended_by_gateway {
        Some(r) => r,
        None => gateway.await,
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("Discord gateway"),
        Err(e) => Err(e).context("gateway task"),
    }
}
