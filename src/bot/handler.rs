//! Gateway events → the bot's parts: messages to answer, deleted questions, reactions, slash
//! commands. Each piece of work runs on the bot's task tracker so shutdown can wait for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use serenity::all::{ChannelId, Context, CreateMessage, EventHandler, GuildId, Interaction, Message, MessageId, Reaction, Ready, ResumedEvent, UserId};
use serenity::async_trait;

use super::answer::{self, AnswerJob};
use super::ratelimit::Verdict;
use super::{commands, feedback, BotState};
use crate::discord::render::bounded;
use crate::discord::stream::{no_mentions, Outlet};

pub struct Handler {
    pub bot: Arc<BotState>,
    me: OnceLock<UserId>,
    registered: AtomicBool,
}

impl Handler {
    pub fn new(bot: Arc<BotState>) -> Self {
        Self { bot, me: OnceLock::new(), registered: AtomicBool::new(false) }
    }
}

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        let _ = self.me.set(ready.user.id);
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "connected to Discord");
        // READY comes again after every new session; commands need registering once.
        if !self.registered.swap(true, Ordering::SeqCst) {
            if let Err(e) = commands::register(&ctx.http, &self.bot.settings.discord.guild_ids).await {
                tracing::error!(error = format!("{e:#}"), "slash commands not registered");
                self.registered.store(false, Ordering::SeqCst);
            }
        }
    }

    async fn resume(&self, _ctx: Context, _: ResumedEvent) {
        tracing::info!("gateway session resumed");
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let Some(&me) = self.me.get() else { return };
        let bot = &self.bot;
        if bot.shutting_down.load(Ordering::SeqCst) || !answer::should_answer(bot, &msg, me) || !bot.first_sight(msg.id) {
            return;
        }
        let question = answer::question_text(&msg.content, me);
        if question.is_empty() {
            return;
        }
        match bot.limiter.check(msg.author.id.get()) {
            Verdict::Allowed => {}
            Verdict::Refused { notify: false } => {
                tracing::debug!(user = msg.author.id.get(), "rate limited (already told)");
                return;
            }
            Verdict::Refused { notify: true } => {
                tracing::info!(user = msg.author.id.get(), "rate limited");
                let b = CreateMessage::new()
                    .content(bounded("You're asking faster than I can keep up. Please wait a minute; I'll skip your questions until then."))
                    .reference_message(&msg)
                    .allowed_mentions(no_mentions());
                let http = ctx.http.clone();
                let channel = msg.channel_id;
                bot.tasks.spawn(async move {
                    if let Err(e) = channel.send_message(&http, b).await {
                        tracing::warn!(error = %e, "sending a rate-limit notice");
                    }
                });
                return;
            }
        }
        let history = answer::reply_context(bot, &msg);
        let job = AnswerJob {
            asker: msg.author.id,
            guild: msg.guild_id,
            channel: msg.channel_id,
            question_message: Some(msg.id),
            question,
            history,
            outlet: Outlet::Reply { http: ctx.http.clone(), channel: msg.channel_id, question: msg.id },
        };
        bot.tasks.spawn(answer::run(bot.clone(), job));
    }

    async fn message_delete(&self, _ctx: Context, _channel: ChannelId, deleted: MessageId, _guild: Option<GuildId>) {
        if let Some(c) = self.bot.inflight.lock().unwrap_or_else(|e| e.into_inner()).get(&deleted) {
            c.cancel();
        }
    }

    async fn reaction_add(&self, _ctx: Context, r: Reaction) {
        if let Some(&me) = self.me.get() {
            feedback::on_reaction(&self.bot, &r, me, true);
        }
    }

    async fn reaction_remove(&self, _ctx: Context, r: Reaction) {
        if let Some(&me) = self.me.get() {
            feedback::on_reaction(&self.bot, &r, me, false);
        }
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        let Interaction::Command(cmd) = interaction else { return };
        if self.bot.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let (bot, http) = (self.bot.clone(), ctx.http.clone());
        self.bot.tasks.spawn(async move {
            let name = cmd.data.name.clone();
            if let Err(e) = commands::handle(bot, http, cmd).await {
                tracing::error!(command = %name, error = format!("{e:#}"), "slash command failed");
            }
        });
    }
}
