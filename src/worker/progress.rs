//! A job's face in Discord: the command's response message, edited as the job advances (stage,
//! done/total, train and held-out loss, ETA) at most once per `worker.status_interval_ms`, and
//! the final message (reply to it) with the loss chart attached.
//!
//! The job thread never waits for Discord: [`Reporter::update`] stores the progress and puts the
//! rendered line into a `watch` channel; an async task on the bot's runtime edits the message
//! with whatever is newest when the interval has passed, so bursts of steps cost one edit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serenity::all::{ChannelId, CreateAttachment, CreateMessage, EditMessage, Http, MessageId};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::discord::render::{bounded, split, MESSAGE_LIMIT};
use crate::discord::rest::{with_retries, RetryPolicy};
use crate::discord::stream::no_mentions;
use crate::store::{Job, Store};

/// Where a job's progress is shown.
#[derive(Debug, Clone, Copy)]
pub struct StatusMessage {
    pub channel: ChannelId,
    pub message: MessageId,
}

/// What the job is doing now.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub stage: &'static str,
    pub done: Option<u64>,
    pub total: Option<u64>,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eta: Option<Duration>,
    pub note: Option<String>,
}

impl Status {
    pub fn stage(stage: &'static str) -> Self {
        Self { stage, ..Default::default() }
    }

    /// The short note stored with the job (`/status` shows it): losses and ETA.
    fn note(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(l) = self.loss {
            parts.push(format!("loss {l:.3}"));
        }
        if let Some(e) = self.eval_loss {
            parts.push(format!("eval {e:.3}"));
        }
        if let Some(eta) = self.eta {
            parts.push(format!("ETA {}", human(eta)));
        }
        if let Some(n) = &self.note {
            parts.push(n.clone());
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// `1h 02m`, `3m 05s`, `12s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// One line: `⏳ retrain job #3 · train 12/40 · loss 1.234, eval 1.456, ETA 2m 10s`.
pub fn render(job: &Job, s: &Status) -> String {
    let mut line = format!("⏳ {} job #{} · {}", job.kind.as_str(), job.id, s.stage);
    match (s.done, s.total) {
        (Some(d), Some(t)) => line += &format!(" {d}/{t}"),
        (Some(d), None) => line += &format!(" {d}"),
        _ => {}
    }
    if let Some(n) = s.note() {
        line += &format!(" · {n}");
    }
    line
}

pub struct Reporter {
    job: Job,
    target: Option<StatusMessage>,
    tx: Option<watch::Sender<String>>,
    editor: Option<tokio::task::JoinHandle<()>>,
    http: Arc<Http>,
    rt: Handle,
    retry: RetryPolicy,
}

impl Reporter {
    /// Start the editor task for `job`'s status message (none if the job has no message).
    pub fn start(http: Arc<Http>, rt: Handle, job: &Job, interval: Duration, retry: RetryPolicy) -> Self {
        let target = match (job.channel_id, job.status_message_id) {
            (Some(c), Some(m)) if c != 0 && m != 0 => Some(StatusMessage { channel: ChannelId::new(c), message: MessageId::new(m) }),
            _ => None,
        };
        let (tx, mut rx) = watch::channel(String::new());
        rx.mark_unchanged();
        let editor = target.map(|t| {
            let http = http.clone();
            rt.spawn(async move {
                // The newest text after each pause: intermediate states are skipped, never queued.
                while rx.changed().await.is_ok() {
                    let text = rx.borrow_and_update().clone();
                    edit(&http, t, &text, retry).await;
                    tokio::time::sleep(interval).await;
                }
            })
        });
        Self { job: job.clone(), target, tx: Some(tx), editor, http, rt, retry }
    }

    /// Record progress in the store (for `/status`) and queue an edit of the status message.
    pub fn update(&self, store: &Store, s: &Status) {
        if let Err(e) = store.update_job_progress(self.job.id, s.stage, s.done, s.total, s.note().as_deref()) {
            tracing::warn!(job = self.job.id, error = format!("{e:#}"), "saving job progress");
        }
        if let Some(tx) = &self.tx {
            tx.send_replace(render(&self.job, s));
        }
    }

    /// The last edit of the status message (`headline`), then `report` as a reply to it (split
    /// to Discord's limit) with `attachment` on its first part. Blocks until both are sent.
    pub fn finish(mut self, headline: &str, report: Option<&str>, attachment: Option<PathBuf>) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(headline.to_string());
        }
        if let Some(editor) = self.editor.take() {
            if self.rt.block_on(editor).is_err() {
                tracing::warn!(job = self.job.id, "the status editor stopped abnormally");
            }
        }
        let (Some(t), Some(report)) = (self.target, report) else { return };
        let (http, retry, job) = (self.http.clone(), self.retry, self.job.id);
        let parts = split(report, MESSAGE_LIMIT);
        if let Err(e) = self.rt.block_on(post_report(&http, t, &parts, attachment, retry)) {
            tracing::error!(job, error = format!("{e:#}"), "posting the job's final message");
        }
    }
}

async fn edit(http: &Http, t: StatusMessage, text: &str, retry: RetryPolicy) {
    // A status line can carry an error's text: bounded like every message the bot sends.
    let text = bounded(text);
    let text = text.as_str();
    let r = with_retries(retry, "editing a job status message", || t.channel.edit_message(http, t.message, EditMessage::new().content(text).allowed_mentions(no_mentions()))).await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "job status message not updated");
    }
}

async fn post_report(http: &Http, t: StatusMessage, parts: &[String], attachment: Option<PathBuf>, retry: RetryPolicy) -> Result<()> {
    let file = match attachment {
        Some(p) => Some(CreateAttachment::path(&p).await.with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    for (i, part) in parts.iter().enumerate() {
        let file = if i == 0 { file.clone() } else { None };
        with_retries(retry, "posting a job report", || {
            let mut m = CreateMessage::new().content(part.as_str()).reference_message((t.channel, t.message)).allowed_mentions(no_mentions());
            if let Some(f) = file.clone() {
                m = m.add_file(f);
            }
            t.channel.send_message(http, m)
        })
        .await
        .context("posting the report")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{JobKind, JobState};

    #[test]
    fn renders_stage_progress_losses_and_eta() {
        let job = Job {
            id: 3,
            kind: JobKind::Retrain,
            state: JobState::Running,
            stage: None,
            progress_done: None,
            progress_total: None,
            progress_note: None,
            requested_by: None,
            guild_id: None,
            channel_id: None,
            status_message_id: None,
            application_id: None,
            interaction_token: None,
            created_at: 0,
            started_at: None,
            finished_at: None,
            error: None,
            cancel_requested: false,
        };
        let s = Status { stage: "train", done: Some(12), total: Some(40), loss: Some(1.2345), eval_loss: Some(1.5), eta: Some(Duration::from_secs(130)), note: None };
        assert_eq!(render(&job, &s), "⏳ retrain job #3 · train 12/40 · loss 1.234, eval 1.500, ETA 2m 10s");
        assert_eq!(render(&job, &Status::stage("dataset")), "⏳ retrain job #3 · dataset");
        assert_eq!(human(Duration::from_secs(3725)), "1h 02m");
    }
}
