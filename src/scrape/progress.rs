//! Progress display for long jobs (crawl, re-parse, dataset build): an indicatif bar when
//! asked for and stderr is a terminal, nothing otherwise (tests, logs, the bot's worker).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    started: Instant,
}

impl Progress {
    /// A bar of `len` units (`unit` names them, e.g. "threads").
    pub fn new(show: bool, len: u64, unit: &str) -> Self {
        let target = if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        let template = format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} (ETA {{eta}}) {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(250));
        Self { bar, started: Instant::now() }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn set_len(&self, len: u64) {
        self.bar.set_length(len);
    }

    /// Show `count` items of a secondary kind with their rate, plus an extra note.
    pub fn note(&self, what: &str, count: u64, extra: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        self.bar.set_message(format!("{what} {count} ({:.1}/s){extra}", count as f64 / secs));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
