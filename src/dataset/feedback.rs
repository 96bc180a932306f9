//! Feedback export: what users and admins said about the bot's answers becomes data. An admin
//! correction replaces the answer in training (and the original goes to `rejected.jsonl`, since
//! an admin corrected it); otherwise more 👎 than 👍 means rejected, more 👍 than 👎 means the
//! answer joins training; ties teach nothing and are skipped.
//!
//! For preference training the same verdicts become labelled answers ([`labelled`], the lines of
//! `feedback.jsonl`): a correction gives a desirable corrected answer and an undesirable
//! original, a 👍 majority a desirable answer, a 👎 majority an undesirable one.

use serde::Serialize;

use super::pairs::{turn, Conversation};
use crate::store::{FeedbackRow, Turn};

/// A `rejected.jsonl` line: the conversation with the answer users rejected, for preference
/// training or review.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejected {
    pub messages: Vec<Turn>,
    pub answer_id: i64,
    pub adapter_id: Option<String>,
    pub up: u32,
    pub down: u32,
    /// The admin's corrected answer, when there is one.
    pub correction: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Export {
    pub train: Option<Conversation>,
    pub rejected: Option<Rejected>,
}

fn messages(row: &FeedbackRow, answer: &str) -> Vec<Turn> {
    let mut m = row.context.clone();
    m.push(turn("user", &row.question));
    m.push(turn("assistant", answer));
    m
}

/// What the votes and corrections on one answer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An admin corrected it: the correction is good, the original bad.
    Corrected,
    /// More 👍 than 👎.
    Good,
    /// More 👎 than 👍.
    Bad,
    /// As many 👍 as 👎 (or none): nothing to learn.
    Tie,
}

impl Verdict {
    pub fn of(up: u32, down: u32, correction: Option<&str>) -> Self {
        if correction.is_some_and(|c| !c.trim().is_empty()) {
            return Verdict::Corrected;
        }
        match up.cmp(&down) {
            std::cmp::Ordering::Greater => Verdict::Good,
            std::cmp::Ordering::Less => Verdict::Bad,
            std::cmp::Ordering::Equal => Verdict::Tie,
        }
    }
}

/// A `feedback.jsonl` line: a conversation whose final answer is desirable (`label: true`) or
/// undesirable.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Labelled {
    pub messages: Vec<Turn>,
    pub label: bool,
    pub answer_id: i64,
}

/// The labelled answers one stored answer gives (see the module doc).
pub fn labelled(row: &FeedbackRow) -> Vec<Labelled> {
    let line = |answer: &str, label| Labelled { messages: messages(row, answer), label, answer_id: row.id.0 };
    match Verdict::of(row.up, row.down, row.correction.as_deref()) {
        Verdict::Corrected => {
            let fixed = row.correction.as_deref().unwrap_or_default().trim();
            let mut out = vec![line(fixed, true)];
            if fixed != row.answer.trim() {
                out.push(line(&row.answer, false));
            }
            out
        }
        Verdict::Good => vec![line(&row.answer, true)],
        Verdict::Bad => vec![line(&row.answer, false)],
        Verdict::Tie => Vec::new(),
    }
}

pub fn classify(row: &FeedbackRow) -> Export {
    let correction = row.correction.as_deref().map(str::trim).filter(|c| !c.is_empty());
    let rejected = |row: &FeedbackRow| Rejected {
        messages: messages(row, &row.answer),
        answer_id: row.id.0,
        adapter_id: row.adapter_id.clone(),
        up: row.up,
        down: row.down,
        correction: correction.map(str::to_string),
    };
    let train = |answer: &str| Conversation { thread_id: None, answer_id: Some(row.id.0), messages: messages(row, answer) };
    if let Some(c) = correction {
        return Export { train: Some(train(c)), rejected: Some(rejected(row)) };
    }
    match row.up.cmp(&row.down) {
        std::cmp::Ordering::Greater => Export { train: Some(train(&row.answer)), rejected: None },
        std::cmp::Ordering::Less => Export { train: None, rejected: Some(rejected(row)) },
        std::cmp::Ordering::Equal => Export::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AnswerId;

    fn row(up: u32, down: u32, correction: Option<&str>) -> FeedbackRow {
        FeedbackRow {
            id: AnswerId(3),
            question: "How do I butter?".into(),
            context: vec![],
            answer: "Lean back.".into(),
            adapter_id: Some("a1".into()),
            up,
            down,
            correction: correction.map(str::to_string),
        }
    }

    #[test]
    fn votes_and_corrections() {
        assert!(classify(&row(2, 0, None)).train.is_some());
        assert!(classify(&row(2, 0, None)).rejected.is_none());
        let r = classify(&row(0, 1, None));
        assert!(r.train.is_none());
        assert_eq!(r.rejected.unwrap().messages[1].content, "Lean back.");
        assert_eq!(classify(&row(1, 1, None)), Export::default());
        let c = classify(&row(0, 2, Some("Press on the tips and tails, stay centred.")));
        assert_eq!(c.train.unwrap().messages[1].content, "Press on the tips and tails, stay centred.");
        assert_eq!(c.rejected.unwrap().correction.as_deref(), Some("Press on the tips and tails, stay centred."));
    }

    #[test]
    fn labels_follow_the_verdicts() {
        let answers = |r: &FeedbackRow| labelled(r).into_iter().map(|l| (l.messages[1].content.clone(), l.label)).collect::<Vec<_>>();
        assert_eq!(answers(&row(2, 0, None)), vec![("Lean back.".to_string(), true)]);
        assert_eq!(answers(&row(0, 1, None)), vec![("Lean back.".to_string(), false)]);
        assert!(answers(&row(1, 1, None)).is_empty());
        assert_eq!(answers(&row(3, 0, Some(" Stay centred. "))), vec![("Stay centred.".to_string(), true), ("Lean back.".to_string(), false)]);
        assert_eq!(answers(&row(0, 0, Some("Lean back."))), vec![("Lean back.".to_string(), true)], "a correction that changes nothing is not a bad answer");
        assert_eq!(Verdict::of(0, 0, Some("  ")), Verdict::Tie);
    }
}
