//! Slash commands: their registration (per configured guild, else global) and handlers. Admin
//! commands are registered with `default_member_permissions = 0` so only admins see them, and
//! checked again here: Discord lets server owners override what the registration says.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serenity::all::{
    Command, CommandDataOptionValue, CommandInteraction, CommandOptionType, CreateCommand, CreateCommandOption, CreateInteractionResponse, CreateInteractionResponseMessage,
    EditInteractionResponse, GuildId, Http, Permissions,
};

use super::answer::{self, AnswerJob};
use super::BotState;
use crate::discord::render::{bounded, clip, redact_paths};
use crate::discord::rest::{with_retries, RetryPolicy};
use crate::discord::stream::{no_mentions, Outlet};
use crate::store::{JobCreated, JobKind, NewJob};

const ADMIN_COMMANDS: [&str; 5] = ["rescrape", "retrain", "adapter", "flagged", "cancel"];

fn is_admin_command(name: &str) -> bool {
    ADMIN_COMMANDS.contains(&name)
}

/// Every command the bot offers.
pub fn definitions() -> Vec<CreateCommand> {
    let admin = |name: &str, description: &str| CreateCommand::new(name).description(description).default_member_permissions(Permissions::empty()).dm_permission(false);
    let sub = |name: &str, description: &str| CreateCommandOption::new(CommandOptionType::SubCommand, name, description);
    vec![
        CreateCommand::new("ask")
            .description("Ask the freeski bot a question")
            .add_option(CreateCommandOption::new(CommandOptionType::String, "question", "Your question").required(true).max_length(1500)),
        CreateCommand::new("status").description("Model, adapter and queue (admins also see memory and jobs)"),
        admin("rescrape", "Scrape the forum again for new threads (admin)"),
        admin("retrain", "Train a new adapter on the latest data and feedback (admin)"),
        admin("adapter", "List, activate or roll back LoRA adapters (admin)")
            .add_option(sub("list", "List the adapters"))
            .add_option(sub("activate", "Answer with this adapter from now on").add_sub_option(
                CreateCommandOption::new(CommandOptionType::String, "id", "Adapter id (see /adapter list)").required(true).max_length(crate::adapters::MAX_ID_CHARS as u16),
            ))
            .add_option(sub("rollback", "Go back to the previous adapter")),
        admin("flagged", "What the next retrain learns from: answers voted down or corrected (admin)"),
        admin("cancel", "Cancel the running job (admin)"),
    ]
}

/// Register the commands in each configured guild, or globally when none is configured.
pub async fn register(http: &Http, guild_ids: &[u64]) -> Result<()> {
    if guild_ids.is_empty() {
        Command::set_global_commands(http, definitions()).await.context("registering global slash commands")?;
        tracing::info!("slash commands registered globally");
    }
    for &g in guild_ids {
        GuildId::new(g).set_commands(http, definitions()).await.with_context(|| format!("registering slash commands in guild {g}"))?;
        tracing::info!(guild = g, "slash commands registered");
    }
    Ok(())
}

/// Administrator permission, a configured admin role, or a configured admin user.
pub fn is_admin(bot: &BotState, cmd: &CommandInteraction) -> bool {
    let d = &bot.settings.discord;
    if d.admin_user_ids.contains(&cmd.user.id.get()) {
        return true;
    }
    let Some(member) = &cmd.member else { return false };
    member.permissions.is_some_and(|p| p.contains(Permissions::ADMINISTRATOR)) || member.roles.iter().any(|r| d.admin_role_ids.contains(&r.get()))
}

/// One slash command's response. Discord wants one initial response (a message or a deferral)
/// within 3 seconds, and after a deferral shows "thinking…" until the response is edited; so
/// every way a command ends completes its response ([`Responder::fail`] does it with a short
/// error). Every text goes through [`bounded`], so nothing built from user input can be
/// refused for its length.
struct Responder {
    http: Arc<Http>,
    cmd: CommandInteraction,
    retry: RetryPolicy,
    state: Mutex<Ack>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// Nothing sent yet: the first response must be a message or a deferral.
    Nothing,
    /// Deferred or answered: the response is completed by editing it.
    Sent,
}

impl Responder {
    fn acked(&self) -> Ack {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_sent(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Ack::Sent;
    }

    async fn reply(&self, text: &str, ephemeral: bool) -> Result<()> {
        let content = bounded(text);
        with_retries(self.retry, "answering a command", || {
            let msg = CreateInteractionResponseMessage::new().content(content.clone()).ephemeral(ephemeral).allowed_mentions(no_mentions());
            self.cmd.create_response(self.http.as_ref(), CreateInteractionResponse::Message(msg))
        })
        .await
        .context("answering a command")?;
        self.set_sent();
        Ok(())
    }

    async fn defer(&self, ephemeral: bool) -> Result<()> {
        let r = if ephemeral { self.cmd.defer_ephemeral(self.http.as_ref()).await } else { self.cmd.defer(self.http.as_ref()).await };
        r.with_context(|| format!("deferring /{}", self.cmd.data.name))?;
        self.set_sent();
        Ok(())
    }

    async fn edit(&self, text: &str) -> Result<serenity::all::Message> {
        let content = bounded(text);
        with_retries(self.retry, "editing a command response", || {
            self.cmd.edit_response(self.http.as_ref(), EditInteractionResponse::new().content(content.clone()).allowed_mentions(no_mentions()))
        })
        .await
        .context("editing a command response")
    }

    /// Complete the response after `e`: a short ephemeral message, or the deferral edited. Only
    /// the outermost context of `e` is shown (its causes may carry URLs with tokens, or paths).
    async fn fail(&self, e: &anyhow::Error) {
        let text = format!("Sorry, that didn't work ({}). The details are in the bot's log.", redact_paths(&clip(&e.to_string(), 200)));
        let sent = match self.acked() {
            Ack::Nothing => self.reply(&text, true).await,
            Ack::Sent => self.edit(&text).await.map(|_| ()),
        };
        if let Err(e) = sent {
            tracing::error!(command = %self.cmd.data.name, error = format!("{e:#}"), "could not complete a command's response");
        }
    }
}

fn string_option(cmd: &CommandInteraction, name: &str) -> Option<String> {
    cmd.data.options.iter().find(|o| o.name == name).and_then(|o| o.value.as_str()).map(str::to_string)
}

/// Handle one slash command. Whatever happens, the interaction gets a response.
pub async fn handle(bot: Arc<BotState>, http: Arc<Http>, cmd: CommandInteraction) -> Result<()> {
    let r = Responder { http, cmd, retry: bot.retry_policy(), state: Mutex::new(Ack::Nothing) };
    let result = dispatch(bot, &r).await;
    if let Err(e) = &result {
        r.fail(e).await;
    }
    result
}

async fn dispatch(bot: Arc<BotState>, r: &Responder) -> Result<()> {
    let cmd = &r.cmd;
    let name = cmd.data.name.as_str();
    if is_admin_command(name) && !is_admin(&bot, cmd) {
        tracing::info!(user = cmd.user.id.get(), command = name, "admin command refused");
        return r.reply("Sorry, only admins can use this command.", true).await;
    }
    match name {
        "ask" => ask(bot, r).await,
        "status" => r.reply(&status_text(&bot, is_admin(&bot, cmd)), true).await,
        "rescrape" => request_job(&bot, r, JobKind::Rescrape).await,
        "retrain" => request_job(&bot, r, JobKind::Retrain).await,
        "adapter" => adapter(bot, r).await,
        "flagged" => r.reply(&flagged_text(&bot)?, true).await,
        "cancel" => {
            let hit = bot.store_mut().request_cancel(None)?;
            let text = if hit.is_empty() {
                "No job is queued or running.".to_string()
            } else {
                hit.iter().map(|j| format!("Cancel requested: {}", j.summary())).collect::<Vec<_>>().join("\n")
            };
            r.reply(&text, true).await
        }
        other => r.reply(&format!("Unknown command `/{}`.", clip(other, 50)), true).await,
    }
}

async fn ask(bot: Arc<BotState>, r: &Responder) -> Result<()> {
    let cmd = &r.cmd;
    let question = string_option(cmd, "question").unwrap_or_default();
    if question.trim().is_empty() {
        return r.reply("Ask me something, e.g. `/ask question: how do I learn switch?`", true).await;
    }
    if !bot.limiter.allow(cmd.user.id.get()) {
        return r.reply("You're asking faster than I can keep up. Please wait a minute.", true).await;
    }
    // Defer first: the answer may wait in the queue far longer than Discord's 3 seconds.
    r.defer(false).await?;
    let job = AnswerJob {
        asker: cmd.user.id,
        guild: cmd.guild_id,
        channel: cmd.channel_id,
        question_message: None,
        question,
        history: Vec::new(),
        outlet: Outlet::Interaction { http: r.http.clone(), interaction: Box::new(cmd.clone()) },
    };
    answer::run(bot, job).await;
    Ok(())
}

/// `/status`: model, adapter and queue for everyone; host and device memory and job details
/// only for admins (`admin`).
fn status_text(bot: &BotState, admin: bool) -> String {
    let lm = bot.engine.model();
    let device = lm.model.device();
    let mut lines = vec![format!("**Model:** {} on {}", if lm.name.is_empty() { "(unnamed)" } else { &lm.name }, crate::llm::device::describe(device))];
    lines.push(match bot.engine.active_adapter_id() {
        Some(id) => {
            let info = crate::adapters::info(&bot.settings.adapter.dir.join(&id));
            let loss = info.eval_loss.map_or("eval loss unknown".to_string(), |l| format!("eval loss {l:.4}"));
            format!("**Adapter:** {id} ({loss}, trained {})", info.trained_at.as_deref().unwrap_or("at an unknown time"))
        }
        None => "**Adapter:** none (base model)".to_string(),
    });
    lines.push(format!("**Queue:** {}", bot.backend.describe()));
    if let (true, Some(r)) = (admin, bot.backend.remote_client()) {
        lines.push(format!("**Model server:** {} (model `{}`)", r.base_url(), r.model_for(bot.engine.active_adapter_id().as_deref())));
    }
    if !admin {
        let jobs = bot.store().active_jobs().map(|j| j.len()).unwrap_or(0);
        lines.push(match jobs {
            0 => "**Jobs:** none running".to_string(),
            n => format!("**Jobs:** {n} queued or running"),
        });
        return lines.join("\n");
    }
    let mut mem = Vec::new();
    if let Some(rss) = crate::llm::device::rss_bytes() {
        mem.push(format!("host {:.2} GiB", crate::llm::device::gib(rss)));
    }
    if let Some((used, total)) = crate::llm::device::device_memory(device) {
        mem.push(format!("device {:.2}/{:.2} GiB", crate::llm::device::gib(used), crate::llm::device::gib(total)));
    }
    if !mem.is_empty() {
        lines.push(format!("**Memory:** {}", mem.join(", ")));
    }
    match bot.store().active_jobs() {
        Ok(jobs) if jobs.is_empty() => lines.push("**Jobs:** none running".into()),
        Ok(jobs) => lines.extend(jobs.iter().map(|j| format!("**Job:** {}", j.summary()))),
        Err(e) => lines.push(format!("**Jobs:** unavailable ({})", redact_paths(&format!("{e:#}")))),
    }
    lines.join("\n")
}

async fn request_job(bot: &BotState, r: &Responder, kind: JobKind) -> Result<()> {
    let cmd = &r.cmd;
    r.defer(false).await?;
    let who = NewJob {
        requested_by: Some(cmd.user.id.get()),
        guild_id: cmd.guild_id.map(|g| g.get()),
        channel_id: Some(cmd.channel_id.get()),
        application_id: Some(cmd.application_id.get()),
        interaction_token: Some(cmd.token.clone()),
    };
    let created = bot.store_mut().create_job(kind, &who)?;
    match created {
        JobCreated::Created(job) => {
            let msg = r.edit(&format!("Queued {}. Progress will show in this message.", job.summary())).await?;
            bot.store().set_job_status_message(job.id, cmd.channel_id.get(), msg.id.get())?;
        }
        JobCreated::AlreadyActive(job) => {
            r.edit(&format!("Already on it: {}. Use /cancel to stop it.", job.summary())).await?;
        }
    }
    Ok(())
}

async fn adapter(bot: Arc<BotState>, r: &Responder) -> Result<()> {
    let usage = "Use /adapter list, activate or rollback.";
    let Some(sub) = r.cmd.data.options.first() else { return r.reply(usage, true).await };
    let CommandDataOptionValue::SubCommand(args) = &sub.value else { return r.reply(usage, true).await };
    let dir = bot.settings.adapter.dir.clone();
    match sub.name.as_str() {
        "list" => {
            let active = bot.engine.active_adapter_id();
            let list = crate::adapters::list(&dir).context("listing the adapters folder")?;
            let text = if list.is_empty() {
                "No adapters in the adapters folder yet.".to_string()
            } else {
                list.iter()
                    .map(|a| {
                        let mark = if Some(&a.id) == active.as_ref() { " ← active" } else { "" };
                        let loss = a.eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}"));
                        format!("`{}`{loss}{mark}", a.id)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            r.reply(&text, true).await
        }
        "activate" | "rollback" => {
            // Loading an adapter can take longer than the 3 seconds Discord waits.
            r.defer(true).await?;
            let id = args.iter().find(|o| o.name == "id").and_then(|o| o.value.as_str()).unwrap_or_default().to_string();
            let rollback = sub.name == "rollback";
            let b = bot.clone();
            // From Discord an adapter is an id inside the adapters folder, never a path.
            let result = tokio::task::spawn_blocking(move || {
                let store = b.store();
                if rollback {
                    crate::adapters::rollback_id(&b.engine, b.publisher.as_deref(), &store, &dir)
                } else {
                    crate::adapters::activate_id(&b.engine, b.publisher.as_deref(), &store, &dir, &id).map(|_| id)
                }
            })
            .await
            .context("adapter task")?;
            let text = match result {
                Ok(id) if id.is_empty() => "Now answering with the base model (no adapter).".to_string(),
                Ok(id) => format!("Now answering with adapter `{id}`."),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "adapter not changed");
                    format!("Adapter unchanged: {}", redact_paths(&format!("{e:#}")))
                }
            };
            r.edit(&text).await.map(|_| ())
        }
        other => r.reply(&format!("Unknown subcommand `{}`.", clip(other, 50)), true).await,
    }
}

/// What the next `/retrain` learns from the votes: counts of labelled answers, then the newest
/// voted-down or corrected answers with what each teaches.
fn flagged_text(bot: &BotState) -> Result<String> {
    use crate::dataset::feedback::{labelled, Verdict};
    let store = bot.store();
    let rows = store.flagged_answers(bot.settings.bot.flagged_limit)?;
    let (good, bad) = store.feedback_rows()?.iter().flat_map(labelled).fold((0, 0), |(g, b), l| if l.label { (g + 1, b) } else { (g, b + 1) });
    drop(store);
    if rows.is_empty() && good + bad == 0 {
        return Ok("No answers have been voted on or corrected yet: the next /retrain has no feedback to learn from.".into());
    }
    let clip = |s: &str, n: usize| if s.chars().count() > n { format!("{}…", s.chars().take(n).collect::<String>()) } else { s.to_string() };
    let mut out = format!(
        "The next /retrain learns from **{}** labelled answers: **{good}** good (👍 or an admin's correction) and **{bad}** bad (👎 or the answer an admin corrected); a share is held out to check that the new adapter prefers the good ones.\n\n",
        good + bad
    );
    for r in rows {
        let teaches = match Verdict::of(r.up, r.down, r.correction.as_deref()) {
            Verdict::Corrected => format!("learns the correction as good and this answer as bad: {}", clip(r.correction.as_deref().unwrap_or_default(), 150)),
            Verdict::Bad => "learns this answer as bad".to_string(),
            Verdict::Good => "learns this answer as good".to_string(),
            Verdict::Tie => "votes tied: not used".to_string(),
        };
        let entry = format!("**#{}** 👎{} 👍{}\nQ: {}\nA: {}\n→ {teaches}\n\n", r.id.0, r.down, r.up, clip(&r.question, 150), clip(&r.answer, 200));
        if out.chars().count() + entry.chars().count() > crate::discord::render::MESSAGE_LIMIT {
            break;
        }
        out.push_str(&entry);
    }
    Ok(crate::discord::render::neutralize_mentions(out.trim_end()))
}
