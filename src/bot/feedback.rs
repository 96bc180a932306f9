//! Reactions on the bot's answers become votes. Reaction events carry only ids and the emoji,
//! so the answer is found through the store by message id: any part of an answer works, also
//! after a restart.

use std::collections::HashMap;
use std::sync::Mutex;

use serenity::all::{Reaction, ReactionType, UserId};

use super::BotState;
use crate::store::Vote;

/// Votes on answers still being written. An answer is stored when it ends, but its messages
/// take reactions from the first visible token: each message is registered here when it is
/// created, votes on it wait here, and [`StreamingVotes::finish`] stores them together with
/// the answer while holding the lock, so a vote lands either here or on the stored answer.
#[derive(Default)]
pub struct StreamingVotes {
    inner: Mutex<Streaming>,
}

#[derive(Default)]
struct Streaming {
    next: u64,
    /// Message id → the streaming answer it carries.
    by_message: HashMap<u64, u64>,
    /// Streaming answer → user → vote.
    votes: HashMap<u64, HashMap<u64, Vote>>,
}

impl StreamingVotes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Streaming> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new answer starts streaming; returns its key.
    pub fn begin(&self) -> u64 {
        let mut s = self.lock();
        s.next += 1;
        let key = s.next;
        s.votes.insert(key, HashMap::new());
        key
    }

    /// Message `message` now shows part of streaming answer `key`.
    pub fn link(&self, key: u64, message: u64) {
        let mut s = self.lock();
        if s.votes.contains_key(&key) {
            s.by_message.insert(message, key);
        }
    }

    /// Apply a vote if `message` carries a streaming answer; false if it does not. Removing a
    /// reaction removes the vote only if it is still that vote (as the store does).
    pub fn record(&self, message: u64, user: u64, vote: Vote, added: bool) -> bool {
        let mut s = self.lock();
        let Some(&key) = s.by_message.get(&message) else { return false };
        let votes = s.votes.entry(key).or_default();
        if added {
            votes.insert(user, vote);
        } else if votes.get(&user) == Some(&vote) {
            votes.remove(&user);
        }
        true
    }

    /// The answer `key` is done: `store` runs with its votes (user, vote) under the lock, then
    /// the answer is forgotten here.
    pub fn finish<R>(&self, key: u64, store: impl FnOnce(&[(u64, Vote)]) -> R) -> R {
        let mut s = self.lock();
        let votes: Vec<(u64, Vote)> = s.votes.get(&key).map(|v| v.iter().map(|(u, v)| (*u, *v)).collect()).unwrap_or_default();
        let r = store(&votes);
        forget(&mut s, key);
        r
    }

    /// Forget answer `key` and its votes (it will not be stored). Idempotent.
    pub fn abandon(&self, key: u64) {
        forget(&mut self.lock(), key);
    }

    /// Answers streaming now (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.lock().votes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn forget(s: &mut Streaming, key: u64) {
    if s.votes.remove(&key).is_some() {
        s.by_message.retain(|_, k| *k != key);
    }
}

/// Which vote `emoji` stands for, if any.
pub fn vote_for(bot: &BotState, emoji: &ReactionType) -> Option<Vote> {
    let ReactionType::Unicode(s) = emoji else { return None };
    let b = &bot.settings.bot;
    // Discord may send an emoji with or without the variation selector (U+FE0F).
    let norm = |e: &str| e.trim_end_matches('\u{FE0F}').to_string();
    if norm(s) == norm(&b.vote_up_emoji) {
        Some(Vote::Up)
    } else if norm(s) == norm(&b.vote_down_emoji) {
        Some(Vote::Down)
    } else {
        None
    }
}

/// Apply a reaction added (`added`) or removed. Reactions by bots, on messages that are not
/// answers, or with other emoji are ignored.
pub fn on_reaction(bot: &BotState, r: &Reaction, me: UserId, added: bool) {
    let Some(user) = r.user_id else { return };
    if user == me || r.member.as_ref().is_some_and(|m| m.user.bot) {
        return;
    }
    let Some(vote) = vote_for(bot, &r.emoji) else { return };
    if bot.streaming.record(r.message_id.get(), user.get(), vote, added) {
        tracing::info!(message = r.message_id.get(), user = user.get(), ?vote, added, "vote on an answer still streaming");
        return;
    }
    let store = bot.store();
    let result = store.answer_for_message(r.message_id.get()).and_then(|answer| {
        let Some(answer) = answer else { return Ok(()) };
        if added {
            store.set_vote(answer, user.get(), vote)?;
        } else {
            store.remove_vote(answer, user.get(), vote)?;
        }
        tracing::info!(answer = answer.0, user = user.get(), ?vote, added, "vote");
        Ok(())
    });
    if let Err(e) = result {
        tracing::error!(error = format!("{e:#}"), "recording a vote");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_votes_follow_the_store_rules_and_end_with_the_answer() {
        let sv = StreamingVotes::default();
        let a = sv.begin();
        assert!(!sv.record(10, 1, Vote::Up, true), "not linked yet");
        sv.link(a, 10);
        sv.link(a, 11);
        assert!(sv.record(10, 1, Vote::Up, true));
        assert!(sv.record(11, 2, Vote::Down, true));
        assert!(sv.record(11, 2, Vote::Up, false), "removing 👍 leaves the 👎");
        assert!(sv.record(10, 3, Vote::Up, true) && sv.record(10, 3, Vote::Up, false));
        let mut got = sv.finish(a, |v| v.to_vec());
        got.sort_by_key(|(u, _)| *u);
        assert_eq!(got, vec![(1, Vote::Up), (2, Vote::Down)]);
        assert!(!sv.record(10, 4, Vote::Up, true), "after finish, votes go to the store");
        let b = sv.begin();
        sv.link(b, 12);
        sv.abandon(b);
        assert!(sv.is_empty() && !sv.record(12, 1, Vote::Up, true));
    }
}
