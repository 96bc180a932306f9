//! When the bot answers a message, what context the answer gets, and the life of one answer:
//! queue → typing (and a queue notice when others are ahead) → streamed edits → stored with all
//! its message ids.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serenity::all::{ChannelId, GuildId, Message as DiscordMessage, MessageId, UserId};

use super::BotState;
use crate::discord::stream::{Outlet, Streamer};
use crate::llm::chat::{Message, Role};
use crate::llm::engine::{AdapterChoice, Event, Question, SubmitError};
use crate::llm::generate::{Finish, GenOptions, Generation};
use crate::store::{NewAnswer, Turn};

/// Why a message deserves an answer, if it does.
pub fn should_answer(bot: &BotState, msg: &DiscordMessage, me: UserId) -> bool {
    if msg.author.bot || msg.author.id == me {
        return false;
    }
    if msg.guild_id.is_none() {
        return bot.settings.discord.answer_dms;
    }
    msg.mentions.iter().any(|u| u.id == me)
        || msg.referenced_message.as_ref().is_some_and(|r| r.author.id == me)
        || bot.settings.discord.answer_channel_ids.contains(&msg.channel_id.get())
}

/// The question text: the message without mentions of the bot.
pub fn question_text(content: &str, me: UserId) -> String {
    let id = me.get();
    content.replace(&format!("<@{id}>"), "").replace(&format!("<@!{id}>"), "").trim().to_string()
}

/// Conversation before a reply to one of the bot's answers: that answer's own context, its
/// question and its text, newest turns kept first within `bot.context_tokens`. Found through
/// the store (by message id), so it works for any part and after a restart.
pub fn reply_context(bot: &BotState, msg: &DiscordMessage) -> Vec<Message> {
    let Some(parent) = msg.referenced_message.as_ref() else { return Vec::new() };
    let stored = {
        let store = bot.store();
        match store.answer_for_message(parent.id.get()).and_then(|id| id.map(|id| store.answer(id)).transpose()) {
            Ok(Some(Some(a))) => a,
            Ok(_) => return Vec::new(),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "reading the replied-to answer");
                return Vec::new();
            }
        }
    };
    let mut turns: Vec<Message> = stored
        .context
        .iter()
        .filter_map(|t| match t.role.as_str() {
            "user" => Some(Message::user(t.content.clone())),
            "assistant" => Some(Message::assistant(t.content.clone())),
            _ => None,
        })
        .collect();
    turns.push(Message::user(stored.question));
    turns.push(Message::assistant(stored.answer));
    match crate::llm::prompt::newest_within(bot.engine.model(), &turns, bot.settings.bot.context_tokens) {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "trimming reply context");
            Vec::new()
        }
    }
}

/// One question to answer.
pub struct AnswerJob {
    pub asker: UserId,
    pub guild: Option<GuildId>,
    pub channel: ChannelId,
    /// The question's message (replies); deleting it cancels the answer.
    pub question_message: Option<MessageId>,
    pub question: String,
    pub history: Vec<Message>,
    pub outlet: Outlet,
}

fn gen_options(bot: &BotState) -> GenOptions {
    GenOptions::from_settings(&bot.settings.generation, bot.settings.model.max_context, bot.engine.model().model.config())
}

/// Answer `job` to the end: queue it, stream it, store it.
pub async fn run(bot: Arc<BotState>, job: AnswerJob) {
    let opts = gen_options(&bot);
    let interval = Duration::from_millis(bot.settings.discord.edit_interval_ms);
    let typing = match (&job.outlet, job.question_message) {
        (Outlet::Reply { http, channel, .. }, Some(_)) => Some(channel.start_typing(http)),
        _ => None,
    };
    let mut streamer = Streamer::new(job.outlet, interval, bot.retry_policy());
    // Each message is linked to this answer when it is created, so votes on an answer still
    // streaming are kept (and stored with it); the guard forgets them if it is never stored.
    let streaming = StreamingGuard { bot: bot.clone(), key: bot.streaming.begin() };
    let key = streaming.key;
    let b = bot.clone();
    streamer.on_post(move |id| b.streaming.link(key, id.get()));
    if let Some(refusal) = too_long(&bot, &job.question) {
        drop(typing);
        streamer.push(&refusal);
        streamer.finish().await;
        return;
    }
    let q = Question { history: job.history.clone(), question: job.question.clone(), opts: opts.clone(), adapter: AdapterChoice::Active };
    let mut ticket = match bot.backend.submit(q) {
        Ok(t) => t,
        Err(e) => {
            let text = match e {
                SubmitError::QueueFull { waiting } => format!("I'm swamped right now ({waiting} questions waiting). Please ask again in a few minutes."),
                SubmitError::ShuttingDown => "I'm restarting right now; please ask again in a minute.".to_string(),
                SubmitError::Prompt(e) => format!("I can't answer that: {e:#}."),
            };
            drop(typing);
            streamer.push(&text);
            streamer.finish().await;
            return;
        }
    };
    let cancel = ticket.canceller();
    if let Some(id) = job.question_message {
        bot.inflight.lock().unwrap_or_else(|e| e.into_inner()).insert(id, cancel.clone());
    }
    if ticket.ahead > 0 {
        let n = ticket.ahead;
        let notice = format!("⏳ Busy right now: {n} question{} ahead of yours. I'll answer here as soon as it's your turn.", if n == 1 { "" } else { "s" });
        if let Err(e) = streamer.post_notice(&notice).await {
            tracing::warn!(error = format!("{e:#}"), "posting the queue notice");
        }
    }

    let mut adapter_id = None;
    let (mut batch, mut run) = (1, 0);
    let outcome: Result<Generation, String> = loop {
        tokio::select! {
            ev = ticket.next() => match ev {
                Some(Event::Started { adapter_id: a, batch: b, run: r }) => { adapter_id = a; batch = b; run = r; }
                Some(Event::Text(piece)) => streamer.push(&piece),
                Some(Event::Finished(g)) => break Ok(g),
                Some(Event::Failed(e)) => break Err(e),
                None => break Err("the engine stopped".into()),
            },
            _ = tokio::time::sleep_until(streamer.ready_at()), if streamer.dirty() => streamer.flush_one().await,
        }
    };
    if let Some(id) = job.question_message {
        bot.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
    drop(typing);

    let gen = match outcome {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "answer failed");
            streamer.set_footer(&format!("{}Sorry, something went wrong while answering.", if streamer.text().is_empty() { "" } else { "\n\n" }));
            streamer.finish().await;
            return;
        }
    };
    if gen.finish == Finish::Cancelled {
        if bot.shutting_down.load(Ordering::SeqCst) {
            streamer.set_footer("\n\n*(cut short: the bot is restarting)*");
        } else {
            // The question was deleted: its answer goes too, and nothing is stored.
            tracing::info!("question deleted; answer cancelled");
            streamer.retract().await;
            return;
        }
    } else if streamer.text().trim().is_empty() {
        streamer.set_footer("(I have no answer to that.)");
    }
    streamer.finish().await;

    let record = NewAnswer {
        question: job.question,
        context: job.history.iter().map(|m| Turn { role: role_name(m.role).into(), content: m.content.clone() }).collect(),
        answer: gen.text.clone(),
        adapter_id: adapter_id.clone(),
        guild_id: job.guild.map(|g| g.get()),
        channel_id: Some(job.channel.get()),
        asked_by: Some(job.asker.get()),
        generation: generation_record(&opts, &gen, ticket.history_kept_from, (batch, run), streamer.failed.as_deref(), bot.backend.remote_client().is_some()),
    };
    let ids = streamer.message_ids();
    let stored = bot.streaming.finish(key, |votes| {
        let store = bot.store();
        let a = store.record_answer(&record)?;
        for (part, id) in ids.iter().enumerate() {
            store.link_message(a, id.get(), part as u32)?;
        }
        for &(user, vote) in votes {
            store.set_vote(a, user, vote)?;
        }
        anyhow::Ok((a, votes.len()))
    });
    match stored {
        Ok((a, votes)) => tracing::info!(answer = a.0, parts = ids.len(), votes, adapter = ?adapter_id, tokens = gen.tokens.len(), "answer stored"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "storing an answer"),
    }
    drop(streaming);
}

/// Forgets a streaming answer's votes when the answer ends without being stored.
struct StreamingGuard {
    bot: Arc<BotState>,
    key: u64,
}

impl Drop for StreamingGuard {
    fn drop(&mut self) {
        self.bot.streaming.abandon(self.key);
    }
}

/// The reply to a question over `bot.max_question_tokens` (counted with the model's
/// tokenizer), or `None` when it may be asked.
fn too_long(bot: &BotState, question: &str) -> Option<String> {
    let max = bot.settings.bot.max_question_tokens;
    let tokens = match bot.engine.model().tokenizer.encode(question, false) {
        Ok(e) => e.len(),
        Err(e) => {
            tracing::warn!(error = %e, "counting a question's tokens; using its length in characters");
            question.chars().count()
        }
    };
    (tokens > max).then(|| format!("Your question is too long for me ({tokens} tokens; the limit is {max}). Please shorten it and ask again."))
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// What is stored with an answer about how it was generated. `(batch, run)`: the size of the
/// engine batch it ran in and that batch's number in the engine's run order. A `remote` answer
/// (an OpenAI-compatible server) has no token ids, batch or run here.
fn generation_record(opts: &GenOptions, gen: &Generation, history_kept_from: usize, (batch, run): (usize, u64), delivery_error: Option<&str>, remote: bool) -> serde_json::Value {
    let s = &opts.sampling;
    serde_json::json!({
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "repetition_penalty": s.repetition_penalty,
        "repetition_window": s.repetition_window,
        "no_repeat_ngram": s.no_repeat_ngram,
        "max_new_tokens": opts.max_new_tokens,
        "max_context": opts.max_context,
        "seed": opts.seed,
        "finish": format!("{:?}", gen.finish),
        "prompt_tokens": gen.prompt_tokens,
        "answer_tokens": (!remote).then_some(gen.tokens.len()),
        "backend": if remote { "openai" } else { "local" },
        "history_kept_from": history_kept_from,
        "batch": batch,
        "engine_run": run,
        "delivery_error": delivery_error,
    })
}
