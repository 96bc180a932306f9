//! Reactions on the bot's answers become votes. Reaction events carry only ids and the emoji,
//! so the answer is found through the store by message id: any part of an answer works, also
//! after a restart.

use serenity::all::{Reaction, ReactionType, UserId};

use super::BotState;
use crate::store::Vote;

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
