//! `dataset build`: stored threads → chat-format training data in a versioned folder.
//!
//! Streams one thread at a time from the store: [`pairs`] builds conversations, [`dedup`]
//! drops exact and near duplicates, [`split`] sends each thread to train or test, [`feedback`]
//! adds what Discord users voted on, [`stats`] counts everything, and [`output`] writes and
//! names the folder by content hash.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::scrape::reparse::{self, ReparseReport};
use crate::scrape::CleanOptions;
use crate::store::{Store, Turn};

pub mod dedup;
pub mod feedback;
pub mod filter;
pub mod output;
pub mod pairs;
pub mod split;
pub mod stats;

pub use output::Written;
pub use pairs::Conversation;
pub use stats::Stats;

/// `[dataset]` settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSettings {
    /// Folder that holds one sub-folder per built dataset.
    pub dir: PathBuf,
    /// Share of threads held out for testing.
    pub test_fraction: f64,
    /// Changes which threads are held out.
    pub split_seed: u64,
    /// Also emit conversations where the opening poster's follow-ups are further user turns.
    pub multi_turn: bool,
    /// Single-turn pairs kept per thread, best first; 0 keeps every reply that passes
    /// screening.
    pub max_answers_per_thread: usize,
    /// Replies with fewer words are left out (see [`pairs::word_count`]: tokens with a letter;
    /// URLs, punctuation, bullets and emoji are not words).
    pub min_answer_words: usize,
    pub max_answer_chars: usize,
    pub max_question_chars: usize,
    /// Jaccard similarity (of word 3-shingles, question and answer each) from which two
    /// conversations count as near duplicates; 1.0 keeps only exact deduplication.
    pub near_duplicate_threshold: f64,
    /// Words or phrases; pairs containing any are left out.
    pub blocked_words: Vec<String>,
    /// Optional file with more entries, one a line; "" for none.
    pub blocked_words_file: PathBuf,
    /// Export Discord feedback (👍/corrected → train, 👎 → rejected.jsonl, labelled answers →
    /// feedback.jsonl).
    pub include_feedback: bool,
    /// Share of feedback questions held out (`feedback_test.jsonl`) to check preference training.
    pub feedback_test_fraction: f64,
}

impl Default for DatasetSettings {
    fn default() -> Self {
        Self {
            dir: "data/datasets".into(),
            test_fraction: 0.1,
            split_seed: 0,
            multi_turn: false,
            max_answers_per_thread: 0,
            min_answer_words: 3,
            max_answer_chars: 2000,
            max_question_chars: 4000,
            near_duplicate_threshold: 0.7,
            blocked_words: Vec::new(),
            blocked_words_file: PathBuf::new(),
            include_feedback: true,
            feedback_test_fraction: 0.2,
        }
    }
}

impl DatasetSettings {
    pub fn validate(&self) -> Result<()> {
        let k = "dataset";
        anyhow::ensure!(!self.dir.as_os_str().is_empty(), "{k}.dir must not be empty");
        anyhow::ensure!((0.0..1.0).contains(&self.test_fraction), "{k}.test_fraction must be in [0, 1), got {}", self.test_fraction);
        anyhow::ensure!(self.min_answer_words >= 1, "{k}.min_answer_words must be at least 1");
        anyhow::ensure!(self.max_answer_chars > self.min_answer_words, "{k}.max_answer_chars must be larger than dataset.min_answer_words");
        anyhow::ensure!(self.max_question_chars >= 1, "{k}.max_question_chars must be at least 1");
        anyhow::ensure!(
            self.near_duplicate_threshold > 0.3 && self.near_duplicate_threshold <= 1.0,
            "{k}.near_duplicate_threshold must be in (0.3, 1], got {}",
            self.near_duplicate_threshold
        );
        anyhow::ensure!((0.0..1.0).contains(&self.feedback_test_fraction), "{k}.feedback_test_fraction must be in [0, 1), got {}", self.feedback_test_fraction);
        anyhow::ensure!(self.blocked_words.iter().all(|w| !w.trim().is_empty()), "{k}.blocked_words must not contain empty entries");
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Output folder instead of `dataset.dir`.
    pub out_dir: Option<PathBuf>,
    /// Threads for re-parsing (0 = all cores).
    pub jobs: usize,
    pub progress: bool,
    /// Re-parse every stored page first even if the cleaner did not change.
    pub reparse: bool,
}

#[derive(Debug, Clone)]
pub struct BuildReport {
    pub written: Written,
    pub stats: Stats,
    pub reparse: Option<ReparseReport>,
    pub elapsed: Duration,
}

impl std::fmt::Display for BuildReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = &self.reparse {
            writeln!(f, "re-parsed {} pages ({:.0} pages/s), {} posts, {} parse errors", r.pages, r.pages_per_sec(), r.posts, r.parse_errors)?;
        }
        writeln!(f, "dataset {} ({}) at {}", self.written.name, if self.written.reused { "unchanged, existing folder kept" } else { "new" }, self.written.path.display())?;
        write!(f, "{}", self.stats)
    }
}

/// One JSONL line of train/test.
#[derive(Serialize)]
struct Record<'a> {
    messages: &'a [Turn],
    thread_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer_id: Option<i64>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
    hash: &'a str,
    created_at: i64,
    format: &'static str,
    source_store: String,
    cleaner: String,
    settings: &'a DatasetSettings,
}

/// Build a dataset from everything in `store`.
pub fn build(store: &mut Store, settings: &DatasetSettings, clean: &CleanOptions, opts: &BuildOptions) -> Result<BuildReport> {
    settings.validate()?;
    let started = Instant::now();
    let reparse = if opts.reparse {
        Some(reparse::reparse_all(store, clean, opts.jobs, opts.progress).map_err(|e| store.named(e))?)
    } else {
        reparse::ensure_current(store, clean, opts.jobs, opts.progress).map_err(|e| store.named(e))?
    };
    let word_filter = filter::WordFilter::from_settings(settings)?;
    let root = opts.out_dir.clone().unwrap_or_else(|| settings.dir.clone());
    let mut writer = output::DatasetWriter::create(&root)?;
    let mut dedup = dedup::Deduper::new(settings.near_duplicate_threshold);
    let mut st = stats::Collector::default();
    // Keys of the held-out forum questions: feedback on one of them is held out too, so no
    // test-split question is ever trained on.
    let mut test_questions = std::collections::HashSet::new();

    store.for_each_thread(|thread| {
        st.threads += 1;
        let outcome = pairs::build_thread(&thread, settings, &word_filter, clean.keep_urls);
        for reason in &outcome.dropped {
            st.drop(reason);
        }
        st.substantive.seen += outcome.substantive as u64;
        for reason in &outcome.substantive_dropped {
            st.substantive.drop(reason, 1);
        }
        let test = split::is_test(thread.id, settings.split_seed, settings.test_fraction);
        let mut kept = 0;
        for conv in &outcome.conversations {
            // Every turn after the question is one substantive reply of the thread.
            let replies = conv.messages.len().saturating_sub(1) as u64;
            match dedup.check(conv) {
                dedup::Verdict::Exact => {
                    st.drop("exact_duplicate");
                    st.substantive.drop("exact_duplicate", replies);
                }
                dedup::Verdict::Near => {
                    st.drop("near_duplicate");
                    st.substantive.drop("near_duplicate", replies);
                }
                dedup::Verdict::Unique => {
                    kept += 1;
                    st.substantive.used += replies;
                    record_lengths(&mut st, conv);
                    if conv.messages.len() > 2 {
                        st.multi_turn += 1;
                    }
                    if test {
                        if let Some(q) = conv.messages.first() {
                            test_questions.insert(split::question_key(&q.content));
                        }
                    }
                    let part = if test { output::Part::Test } else { output::Part::Train };
                    writer.write(part, &Record { messages: &conv.messages, thread_id: conv.thread_id, answer_id: None })?;
                    if test {
                        st.test += 1;
                    } else {
                        st.train += 1;
                    }
                }
            }
        }
        if kept > 0 {
            st.threads_with_pairs += 1;
        }
        Ok(())
    })?;

    if settings.include_feedback {
        for row in store.feedback_rows().map_err(|e| store.named(e))? {
            let export = feedback::classify(&row);
            if let Some(r) = &export.rejected {
                writer.write(output::Part::Rejected, r)?;
                st.rejected += 1;
            }
            let key = split::question_key(&row.question);
            let held_out = test_questions.contains(&key) || split::is_test(key, settings.split_seed, settings.feedback_test_fraction);
            for line in feedback::labelled(&row) {
                let answer = line.messages.last().map_or("", |m| m.content.as_str());
                if word_filter.matches(&row.question) || (line.label && word_filter.matches(answer)) {
                    st.drop("feedback_word_filter");
                    continue;
                }
                let counts = &mut st.feedback;
                let (part, n) = match (held_out, line.label) {
                    (false, true) => (output::Part::Feedback, &mut counts.desirable),
                    (false, false) => (output::Part::Feedback, &mut counts.undesirable),
                    (true, true) => (output::Part::FeedbackTest, &mut counts.held_out_desirable),
                    (true, false) => (output::Part::FeedbackTest, &mut counts.held_out_undesirable),
                };
                *n += 1;
                writer.write(part, &line)?;
            }
            // A held-out question is evaluated on, never trained on (by either objective).
            let Some(conv) = export.train.filter(|_| !held_out) else { continue };
            if word_filter.matches(&conv.user_text()) || word_filter.matches(&conv.assistant_text()) {
                st.drop("feedback_word_filter");
                continue;
            }
            if dedup.check(&conv) != dedup::Verdict::Unique {
                st.drop("feedback_duplicate");
                continue;
            }
            // Feedback trains only: the test split stays forum data so evaluations compare.
            record_lengths(&mut st, &conv);
            writer.write(output::Part::Train, &Record { messages: &conv.messages, thread_id: None, answer_id: conv.answer_id })?;
            st.feedback_train += 1;
        }
    }

    let stats = st.finish();
    let source_store = store.path().display().to_string();
    let written = writer.finish(|name, hash| {
        let meta = Metadata { name, hash, created_at: crate::util::clock::now_secs(), format: "chat-messages-jsonl-v1", source_store, cleaner: clean.fingerprint(), settings };
        Ok(vec![("stats.json", serde_json::to_value(&stats)?), ("metadata.json", serde_json::to_value(&meta)?)])
    })?;
    tracing::info!(dataset = %written.name, train = stats.train, test = stats.test, "dataset built");
    Ok(BuildReport { written, stats, reparse, elapsed: started.elapsed() })
}

fn record_lengths(st: &mut stats::Collector, conv: &Conversation) {
    let words = pairs::word_count;
    st.question_words.push(conv.messages.first().map_or(0, |m| words(&m.content)));
    for m in conv.messages.iter().filter(|m| m.role == "assistant") {
        st.answer_words.push(words(&m.content));
    }
    st.conversation_tokens.push(conv.messages.iter().map(|m| stats::estimate_tokens(&m.content)).sum());
}
