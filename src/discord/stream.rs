//! Streaming an answer into Discord: the text so far is rendered into parts (see
//! [`super::render`]) and the messages are brought up to date one write at a time, never two
//! writes of one answer closer than the configured interval (measured from the end of the
//! previous write, so the spacing also holds where Discord receives them).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serenity::all::{
    ChannelId, CommandInteraction, CreateAllowedMentions, CreateInteractionResponseFollowup, CreateMessage, EditInteractionResponse, EditMessage, Http, MessageId,
};
use tokio::time::Instant;

use super::render::{bounded, neutralize_mentions, split, MESSAGE_LIMIT};
use super::rest::{with_retries, RetryPolicy};

/// Nobody is ever pinged by the bot: no parsed mentions, no explicit ids, and replies don't
/// ping the person replied to.
pub fn no_mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new().replied_user(false)
}

/// Where an answer's messages go.
pub enum Outlet {
    /// A reply to the question in its channel; later parts follow as plain messages.
    Reply { http: Arc<Http>, channel: ChannelId, question: MessageId },
    /// The deferred response of a slash command; later parts are follow-ups.
    Interaction { http: Arc<Http>, interaction: Box<CommandInteraction> },
}

impl Outlet {
    async fn post(&self, index: usize, content: &str) -> serenity::Result<MessageId> {
        let content = bounded(content);
        let content = content.as_str();
        match self {
            Self::Reply { http, channel, question } => {
                let mut b = CreateMessage::new().content(content).allowed_mentions(no_mentions());
                if index == 0 {
                    b = b.reference_message((*channel, *question));
                }
                Ok(channel.send_message(http.as_ref(), b).await?.id)
            }
            Self::Interaction { http, interaction } if index == 0 => {
                Ok(interaction.edit_response(http.as_ref(), EditInteractionResponse::new().content(content).allowed_mentions(no_mentions())).await?.id)
            }
            Self::Interaction { http, interaction } => {
                let b = CreateInteractionResponseFollowup::new().content(content).allowed_mentions(no_mentions());
                Ok(interaction.create_followup(http.as_ref(), b).await?.id)
            }
        }
    }

    async fn edit(&self, index: usize, id: MessageId, content: &str) -> serenity::Result<()> {
        let content = bounded(content);
        let content = content.as_str();
        match self {
            Self::Reply { http, channel, .. } => {
                channel.edit_message(http.as_ref(), id, EditMessage::new().content(content).allowed_mentions(no_mentions())).await?;
            }
            Self::Interaction { http, interaction } if index == 0 => {
                interaction.edit_response(http.as_ref(), EditInteractionResponse::new().content(content).allowed_mentions(no_mentions())).await?;
            }
            Self::Interaction { http, interaction } => {
                let b = CreateInteractionResponseFollowup::new().content(content).allowed_mentions(no_mentions());
                interaction.edit_followup(http.as_ref(), id, b).await?;
            }
        }
        Ok(())
    }

    /// Remove a posted part (the question was deleted).
    async fn delete(&self, index: usize, id: MessageId) -> serenity::Result<()> {
        match self {
            Self::Reply { http, channel, .. } => channel.delete_message(http.as_ref(), id).await,
            Self::Interaction { http, interaction } if index == 0 => interaction.delete_response(http.as_ref()).await,
            Self::Interaction { http, interaction } => interaction.delete_followup(http.as_ref(), id).await,
        }
    }
}

/// One answer's messages and the text they should show.
pub struct Streamer {
    outlet: Outlet,
    interval: Duration,
    retry: RetryPolicy,
    /// Raw model text so far.
    text: String,
    /// Appended to the text once known (e.g. a note that the answer was cut short).
    footer: String,
    /// Posted messages and the content each shows now.
    posted: Vec<(MessageId, String)>,
    last_write: Option<Instant>,
    /// Set when a write failed for good: the answer can no longer be shown completely.
    pub failed: Option<String>,
    /// Called with each message's id as soon as it is created.
    on_post: Option<Box<dyn FnMut(MessageId) + Send>>,
}

impl Streamer {
    pub fn new(outlet: Outlet, interval: Duration, retry: RetryPolicy) -> Self {
        Self { outlet, interval, retry, text: String::new(), footer: String::new(), posted: Vec::new(), last_write: None, failed: None, on_post: None }
    }

    /// Call `f` with the id of every message of this answer when it is created (votes count
    /// from the first visible token, long before the answer is stored).
    pub fn on_post(&mut self, f: impl FnMut(MessageId) + Send + 'static) {
        self.on_post = Some(Box::new(f));
    }

    /// Show `content` as the first message before any answer text (the queue notice); the
    /// answer then replaces it.
    pub async fn post_notice(&mut self, content: &str) -> Result<()> {
        self.write(0, content).await
    }

    pub fn push(&mut self, piece: &str) {
        self.text.push_str(piece);
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn set_footer(&mut self, footer: &str) {
        self.footer = footer.to_string();
    }

    /// Ids of the posted messages, in part order.
    pub fn message_ids(&self) -> Vec<MessageId> {
        self.posted.iter().map(|(id, _)| *id).collect()
    }

    fn rendered(&self) -> Vec<String> {
        let mut full = neutralize_mentions(self.text.trim_start());
        if !self.footer.is_empty() {
            full.push_str(&self.footer);
        }
        if full.trim().is_empty() {
            return Vec::new();
        }
        split(&full, MESSAGE_LIMIT)
    }

    /// The next write that would bring the messages up to date: (part index, content).
    fn pending(&self) -> Option<(usize, String)> {
        if self.failed.is_some() {
            return None;
        }
        self.rendered().into_iter().enumerate().find(|(i, part)| self.posted.get(*i).is_none_or(|(_, shown)| shown != part))
    }

    /// Whether the messages lag behind the text.
    pub fn dirty(&self) -> bool {
        self.pending().is_some()
    }

    /// When the next write may start.
    pub fn ready_at(&self) -> Instant {
        self.last_write.map_or_else(Instant::now, |t| t + self.interval)
    }

    /// Do one write if one is due (call at or after [`Streamer::ready_at`]).
    pub async fn flush_one(&mut self) {
        if let Some((i, content)) = self.pending() {
            if let Err(e) = self.write(i, &content).await {
                tracing::error!(error = format!("{e:#}"), "giving up on showing the answer");
                self.failed = Some(format!("{e:#}"));
            }
        }
    }

    /// Write until the messages show everything, keeping the interval.
    pub async fn finish(&mut self) {
        while self.dirty() {
            tokio::time::sleep_until(self.ready_at()).await;
            self.flush_one().await;
        }
    }

    async fn write(&mut self, i: usize, content: &str) -> Result<()> {
        let outlet = &self.outlet;
        let result = match self.posted.get(i) {
            Some((id, _)) => {
                let id = *id;
                with_retries(self.retry, "editing an answer", || outlet.edit(i, id, content)).await.map(|_| id)
            }
            None => with_retries(self.retry, "posting an answer", || outlet.post(i, content)).await,
        };
        self.last_write = Some(Instant::now());
        let id = result.with_context(|| format!("writing part {} of an answer", i + 1))?;
        match self.posted.get_mut(i) {
            Some(slot) => slot.1 = content.to_string(),
            None => {
                self.posted.push((id, content.to_string()));
                if let Some(f) = self.on_post.as_mut() {
                    f(id);
                }
            }
        }
        Ok(())
    }

    /// Delete every posted part (the question is gone, so is its answer).
    pub async fn retract(&mut self) {
        for (i, (id, _)) in self.posted.drain(..).enumerate().collect::<Vec<_>>() {
            if let Err(e) = self.outlet.delete(i, id).await {
                tracing::warn!(error = %e, "could not delete part of a cancelled answer");
            }
        }
    }
}
