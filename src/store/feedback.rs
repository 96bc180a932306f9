//! Feedback the Discord bot collects: every answer it sends (keyed by the message ids that carry
//! it, since reaction events name only the message), one vote per user per answer, and admin
//! corrections. `dataset build` exports them (corrected and upvoted answers to training, downvoted ones
//! to the rejected file, and every labelled answer to `feedback.jsonl` for preference training).

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::util::clock::now_secs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AnswerId(pub i64);

/// 👍 or 👎.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    Up,
    Down,
}

impl Vote {
    fn value(self) -> i64 {
        match self {
            Self::Up => 1,
            Self::Down => -1,
        }
    }
}

/// One earlier turn of the conversation an answer continued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// An answer the bot sent.
#[derive(Debug, Clone, Default)]
pub struct NewAnswer {
    pub question: String,
    pub context: Vec<Turn>,
    pub answer: String,
    pub adapter_id: Option<String>,
    pub guild_id: Option<u64>,
    pub channel_id: Option<u64>,
    pub asked_by: Option<u64>,
    /// Generation options and outcome (JSON object; `Null` stores `{}`).
    pub generation: serde_json::Value,
}

/// A stored answer, as the bot reads it back (reply chains, `/flagged`).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnswer {
    pub id: AnswerId,
    pub question: String,
    pub context: Vec<Turn>,
    pub answer: String,
    pub adapter_id: Option<String>,
    pub generation: serde_json::Value,
    pub asked_by: Option<u64>,
}

/// An answer with 👎 votes or a correction, for `/flagged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlaggedAnswer {
    pub id: AnswerId,
    pub question: String,
    pub answer: String,
    pub up: u32,
    pub down: u32,
    /// The latest admin correction.
    pub correction: Option<String>,
}

/// An answer with its vote tally and latest correction, as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackRow {
    pub id: AnswerId,
    pub question: String,
    pub context: Vec<Turn>,
    pub answer: String,
    pub adapter_id: Option<String>,
    pub up: u32,
    pub down: u32,
    pub correction: Option<String>,
}

/// Discord snowflakes are u64 but always below 2^63, so they fit SQLite's INTEGER; anything
/// else is refused instead of wrapping.
fn snowflake(v: u64) -> Result<i64> {
    i64::try_from(v).with_context(|| format!("id {v} is not a Discord snowflake"))
}

impl Store {
    pub fn record_answer(&self, a: &NewAnswer) -> Result<AnswerId> {
        let context = serde_json::to_string(&a.context)?;
        let generation = match &a.generation {
            serde_json::Value::Null => "{}".to_string(),
            g => g.to_string(),
        };
        self.conn()
            .execute(
                "INSERT INTO answers(question, context, answer, adapter_id, guild_id, channel_id, asked_by, created_at, generation) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    a.question,
                    context,
                    a.answer,
                    a.adapter_id,
                    a.guild_id.map(snowflake).transpose()?,
                    a.channel_id.map(snowflake).transpose()?,
                    a.asked_by.map(snowflake).transpose()?,
                    now_secs(),
                    generation
                ],
            )
            .context("recording answer")?;
        Ok(AnswerId(self.conn().last_insert_rowid()))
    }

    /// Remember that Discord message `message_id` carries part `part` of `answer`.
    pub fn link_message(&self, answer: AnswerId, message_id: u64, part: u32) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO answer_messages(message_id, answer_id, part) VALUES (?1, ?2, ?3)
                 ON CONFLICT(message_id) DO UPDATE SET answer_id = excluded.answer_id, part = excluded.part",
                params![snowflake(message_id)?, answer.0, part],
            )
            .with_context(|| format!("linking message {message_id} to answer {}", answer.0))?;
        Ok(())
    }

    pub fn answer_for_message(&self, message_id: u64) -> Result<Option<AnswerId>> {
        Ok(self.conn().query_row("SELECT answer_id FROM answer_messages WHERE message_id = ?1", [snowflake(message_id)?], |r| r.get(0)).optional()?.map(AnswerId))
    }

    pub fn answer(&self, id: AnswerId) -> Result<Option<StoredAnswer>> {
        let row = self
            .conn()
            .query_row("SELECT question, context, answer, adapter_id, generation, asked_by FROM answers WHERE id = ?1", [id.0], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, Option<String>>(3)?, r.get::<_, String>(4)?, r.get::<_, Option<i64>>(5)?))
            })
            .optional()?;
        let Some((question, context, answer, adapter_id, generation, asked_by)) = row else { return Ok(None) };
        Ok(Some(StoredAnswer {
            id,
            question,
            context: serde_json::from_str(&context).with_context(|| format!("answer {}: stored context is not JSON turns", id.0))?,
            answer,
            adapter_id,
            generation: serde_json::from_str(&generation).with_context(|| format!("answer {}: stored generation is not JSON", id.0))?,
            asked_by: asked_by.map(|v| v as u64),
        }))
    }

    /// Message ids carrying `answer`, in part order.
    pub fn answer_messages(&self, answer: AnswerId) -> Result<Vec<u64>> {
        let mut st = self.conn().prepare("SELECT message_id FROM answer_messages WHERE answer_id = ?1 ORDER BY part")?;
        let rows = st.query_map([answer.0], |r| r.get::<_, i64>(0))?;
        Ok(rows.map(|r| r.map(|v| v as u64)).collect::<rusqlite::Result<_>>()?)
    }

    /// Answers with at least one 👎 or a correction, newest first.
    pub fn flagged_answers(&self, limit: usize) -> Result<Vec<FlaggedAnswer>> {
        let mut st = self.conn().prepare(
            "SELECT a.id, a.question, a.answer,
                    (SELECT COUNT(*) FROM votes v WHERE v.answer_id = a.id AND v.value > 0),
                    (SELECT COUNT(*) FROM votes v WHERE v.answer_id = a.id AND v.value < 0) AS down,
                    (SELECT text FROM corrections c WHERE c.answer_id = a.id ORDER BY c.id DESC LIMIT 1)
             FROM answers a
             WHERE EXISTS (SELECT 1 FROM votes v WHERE v.answer_id = a.id AND v.value < 0) OR EXISTS (SELECT 1 FROM corrections c WHERE c.answer_id = a.id)
             ORDER BY a.id DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(FlaggedAnswer {
                id: AnswerId(r.get(0)?),
                question: r.get(1)?,
                answer: r.get(2)?,
                up: r.get::<_, i64>(3)? as u32,
                down: r.get::<_, i64>(4)? as u32,
                correction: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Set `user`'s vote on `answer`; a later vote replaces the earlier one (one per user).
    pub fn set_vote(&self, answer: AnswerId, user: u64, vote: Vote) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO votes(answer_id, user_id, value, voted_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(answer_id, user_id) DO UPDATE SET value = excluded.value, voted_at = excluded.voted_at",
                params![answer.0, snowflake(user)?, vote.value(), now_secs()],
            )
            .with_context(|| format!("voting on answer {}", answer.0))?;
        Ok(())
    }

    /// A removed reaction removes the vote, but only if it is still that vote (removing 👍
    /// after switching to 👎 must not erase the 👎). Returns whether a vote was removed.
    pub fn remove_vote(&self, answer: AnswerId, user: u64, vote: Vote) -> Result<bool> {
        let n = self.conn().execute("DELETE FROM votes WHERE answer_id = ?1 AND user_id = ?2 AND value = ?3", params![answer.0, snowflake(user)?, vote.value()])?;
        Ok(n > 0)
    }

    pub fn add_correction(&self, answer: AnswerId, admin: u64, text: &str) -> Result<()> {
        anyhow::ensure!(!text.trim().is_empty(), "a correction needs text");
        self.conn()
            .execute("INSERT INTO corrections(answer_id, admin_id, text, created_at) VALUES (?1, ?2, ?3, ?4)", params![answer.0, snowflake(admin)?, text, now_secs()])
            .with_context(|| format!("correcting answer {}", answer.0))?;
        Ok(())
    }

    /// (👍, 👎) counts.
    pub fn vote_tally(&self, answer: AnswerId) -> Result<(u32, u32)> {
        Ok(self.conn().query_row("SELECT COALESCE(SUM(value > 0), 0), COALESCE(SUM(value < 0), 0) FROM votes WHERE answer_id = ?1", [answer.0], |r| {
            Ok((r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u32))
        })?)
    }

    /// Every answer with votes or a correction, oldest first.
    pub fn feedback_rows(&self) -> Result<Vec<FeedbackRow>> {
        let mut st = self.conn().prepare(
            "SELECT a.id, a.question, a.context, a.answer, a.adapter_id,
                    (SELECT COUNT(*) FROM votes v WHERE v.answer_id = a.id AND v.value > 0),
                    (SELECT COUNT(*) FROM votes v WHERE v.answer_id = a.id AND v.value < 0),
                    (SELECT text FROM corrections c WHERE c.answer_id = a.id ORDER BY c.id DESC LIMIT 1)
             FROM answers a
             WHERE EXISTS (SELECT 1 FROM votes v WHERE v.answer_id = a.id) OR EXISTS (SELECT 1 FROM corrections c WHERE c.answer_id = a.id)
             ORDER BY a.id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, question, context, answer, adapter_id, up, down, correction) = row?;
            let context = serde_json::from_str(&context).with_context(|| format!("answer {id}: stored context is not JSON turns"))?;
            out.push(FeedbackRow { id: AnswerId(id), question, context, answer, adapter_id, up: up as u32, down: down as u32, correction });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vote_per_user_and_removal_only_of_that_vote() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        let a = s.record_answer(&NewAnswer { question: "q".into(), answer: "a".into(), ..Default::default() }).unwrap();
        s.link_message(a, 1_234_567_890_123_456_789, 0).unwrap();
        assert_eq!(s.answer_for_message(1_234_567_890_123_456_789).unwrap(), Some(a));
        assert_eq!(s.answer_for_message(5).unwrap(), None);
        s.set_vote(a, 10, Vote::Up).unwrap();
        s.set_vote(a, 10, Vote::Up).unwrap();
        s.set_vote(a, 11, Vote::Up).unwrap();
        assert_eq!(s.vote_tally(a).unwrap(), (2, 0));
        s.set_vote(a, 10, Vote::Down).unwrap();
        assert_eq!(s.vote_tally(a).unwrap(), (1, 1));
        assert!(!s.remove_vote(a, 10, Vote::Up).unwrap());
        assert_eq!(s.vote_tally(a).unwrap(), (1, 1));
        assert!(s.remove_vote(a, 10, Vote::Down).unwrap());
        assert_eq!(s.vote_tally(a).unwrap(), (1, 0));
        assert!(s.link_message(a, u64::MAX, 0).is_err());
        assert!(s.add_correction(a, 1, "  ").is_err());
        s.add_correction(a, 1, "first").unwrap();
        s.add_correction(a, 1, "better").unwrap();
        let rows = s.feedback_rows().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].correction.as_deref(), Some("better"));
        assert_eq!((rows[0].up, rows[0].down), (1, 0));
        let flagged = s.flagged_answers(5).unwrap();
        assert_eq!((flagged[0].id, flagged[0].down, flagged[0].correction.as_deref()), (a, 0, Some("better")), "a corrected answer is flagged");
        let b = s.record_answer(&NewAnswer { question: "q2".into(), answer: "a2".into(), ..Default::default() }).unwrap();
        s.set_vote(b, 10, Vote::Up).unwrap();
        assert_eq!(s.flagged_answers(5).unwrap().len(), 1, "an answer with only 👍 is not flagged");
        s.set_vote(b, 12, Vote::Down).unwrap();
        let flagged = s.flagged_answers(5).unwrap();
        assert_eq!((flagged[0].id, flagged[0].up, flagged[0].down, flagged[0].correction.clone()), (b, 1, 1, None));
        let stored = s.answer(a).unwrap().unwrap();
        assert_eq!((stored.question.as_str(), stored.generation.clone()), ("q", serde_json::json!({})));
        assert_eq!(s.answer_messages(a).unwrap(), vec![1_234_567_890_123_456_789]);
    }
}
