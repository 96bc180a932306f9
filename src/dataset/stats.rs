//! Dataset statistics: counts, reasons for everything left out, and length percentiles (words,
//! and tokens estimated as characters / 4 so the builder does not depend on a tokenizer).

use std::collections::BTreeMap;

use serde::Serialize;

/// Lengths seen, summarised as percentiles. Holds one u32 per pair: 8,000 threads make a few
/// tens of thousands of pairs, a few hundred KB.
#[derive(Debug, Clone, Default)]
pub struct Lengths(Vec<u32>);

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

impl Lengths {
    pub fn push(&mut self, v: usize) {
        self.0.push(u32::try_from(v).unwrap_or(u32::MAX));
    }

    pub fn summary(&self) -> Percentiles {
        if self.0.is_empty() {
            return Percentiles::default();
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        // Nearest-rank percentile.
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            count: v.len(),
            mean: (v.iter().map(|x| u64::from(*x)).sum::<u64>() as f64 / v.len() as f64 * 10.0).round() / 10.0,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

/// Coverage of the forum's signal: replies whose text passed screening (whoever wrote them),
/// how many are in a written conversation, and why the others are not.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Coverage {
    pub seen: u64,
    pub used: u64,
    pub dropped: BTreeMap<String, u64>,
}

impl Coverage {
    pub fn drop(&mut self, reason: &str, n: u64) {
        if n > 0 {
            *self.dropped.entry(reason.to_string()).or_default() += n;
        }
    }

    /// Share of substantive replies used (1 when there were none).
    pub fn recall(&self) -> f64 {
        if self.seen == 0 {
            1.0
        } else {
            self.used as f64 / self.seen as f64
        }
    }
}

/// Labelled answers written to `feedback.jsonl` (desirable, undesirable) and held out in
/// `feedback_test.jsonl`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct FeedbackCounts {
    pub desirable: u64,
    pub undesirable: u64,
    pub held_out_desirable: u64,
    pub held_out_undesirable: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Collector {
    pub threads: u64,
    pub threads_with_pairs: u64,
    pub train: u64,
    pub test: u64,
    pub multi_turn: u64,
    pub feedback_train: u64,
    pub rejected: u64,
    pub feedback: FeedbackCounts,
    pub dropped: BTreeMap<String, u64>,
    pub substantive: Coverage,
    pub question_words: Lengths,
    pub answer_words: Lengths,
    pub conversation_tokens: Lengths,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub threads: u64,
    pub threads_with_pairs: u64,
    pub train: u64,
    pub test: u64,
    pub multi_turn: u64,
    pub feedback_train: u64,
    pub rejected: u64,
    /// Labelled answers for preference training.
    pub feedback: FeedbackCounts,
    pub dropped: BTreeMap<String, u64>,
    /// Substantive replies seen, used, and left out by reason.
    pub substantive_replies: Coverage,
    pub question_words: Percentiles,
    pub answer_words: Percentiles,
    /// Whole conversation, tokens estimated as characters / 4.
    pub conversation_tokens_est: Percentiles,
}

impl Collector {
    pub fn drop(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    pub fn finish(&self) -> Stats {
        Stats {
            threads: self.threads,
            threads_with_pairs: self.threads_with_pairs,
            train: self.train,
            test: self.test,
            multi_turn: self.multi_turn,
            feedback_train: self.feedback_train,
            rejected: self.rejected,
            feedback: self.feedback,
            dropped: self.dropped.clone(),
            substantive_replies: self.substantive.clone(),
            question_words: self.question_words.summary(),
            answer_words: self.answer_words.summary(),
            conversation_tokens_est: self.conversation_tokens.summary(),
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "threads: {} ({} gave pairs)", self.threads, self.threads_with_pairs)?;
        writeln!(f, "pairs:   {} train, {} test ({} multi-turn), feedback: {} to train, {} rejected", self.train, self.test, self.multi_turn, self.feedback_train, self.rejected)?;
        let fb = &self.feedback;
        writeln!(f, "labelled answers: {} good, {} bad to feedback.jsonl; {} good, {} bad held out", fb.desirable, fb.undesirable, fb.held_out_desirable, fb.held_out_undesirable)?;
        let c = &self.substantive_replies;
        writeln!(f, "substantive replies: {} seen, {} used ({:.0}%)", c.seen, c.used, c.recall() * 100.0)?;
        for (reason, n) in &c.dropped {
            writeln!(f, "  not used: {reason:<22} {n}")?;
        }
        writeln!(f, "dropped:")?;
        for (reason, n) in &self.dropped {
            writeln!(f, "  {reason:<22} {n}")?;
        }
        for (name, p) in [("question words", &self.question_words), ("answer words", &self.answer_words), ("tokens (est.)", &self.conversation_tokens_est)] {
            writeln!(f, "{name:<15} p50 {:>5}  p90 {:>5}  p99 {:>5}  max {:>6}  mean {:>7.1}", p.p50, p.p90, p.p99, p.max, p.mean)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Lengths::default();
        for v in 1..=100 {
            l.push(v);
        }
        let p = l.summary();
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.count), (50, 90, 99, 100, 100));
        assert_eq!(p.mean, 50.5);
        assert_eq!(Lengths::default().summary().count, 0);
        assert_eq!(estimate_tokens("abcde"), 2);
    }
}
