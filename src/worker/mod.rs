//! The worker: runs the jobs that `/rescrape` and `/retrain` queue in the store, inside the bot
//! process, while the bot keeps answering.
//!
//! A tokio task polls the store for queued jobs (every `worker.poll_interval_ms`) and starts at
//! most one job per kind, each on its own OS thread: training and dataset building are long
//! blocking work that must never sit on the runtime the gateway and answers use. A job ends as
//! `succeeded`, `failed` (an error or a panic, caught here: its memory is freed when its thread's
//! values drop, and the engine keeps the adapter it had), `cancelled` (`/cancel`, checked at each
//! micro-batch boundary) or `interrupted` (the bot is stopping; `/retrain` resumes it).
//!
//! [`stages`] holds what each job does, [`progress`] its Discord status message and final
//! report, [`promote`] the promotion gate and pruning.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serenity::all::Http;
use tokio::runtime::Handle;

use crate::llm::engine::Engine;
use crate::store::{Job, JobKind, JobOutcome, JobState, Store};

pub mod progress;
pub mod promote;
pub mod settings;
pub mod stages;

pub use settings::{WorkerConfig, WorkerSettings};

/// What a job thread needs from the bot.
#[derive(Clone)]
pub struct WorkerCtx {
    pub settings: Arc<WorkerConfig>,
    pub engine: Engine,
    pub http: Arc<Http>,
    /// With a remote model server: publishes and loads promoted adapters there.
    pub publisher: Option<Arc<crate::adapters::Publisher>>,
    pub rt: Handle,
    /// Set when the bot stops: jobs end at their next step boundary as `interrupted`.
    pub stopping: Arc<AtomicBool>,
}

/// The running worker; [`Worker::shutdown`] stops it.
pub struct Worker {
    stopping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Start polling for jobs on the current runtime.
    pub fn spawn(settings: Arc<WorkerConfig>, engine: Engine, http: Arc<Http>, publisher: Option<Arc<crate::adapters::Publisher>>) -> Result<Self> {
        let store = Store::open_with(&settings.store).context("the worker's store connection")?;
        let stopping = Arc::new(AtomicBool::new(false));
        let cx = WorkerCtx { settings, engine, http, publisher, rt: Handle::current(), stopping: stopping.clone() };
        let task = tokio::spawn(poll_loop(cx, store));
        Ok(Self { stopping, task })
    }

    /// Ask running jobs to stop at their next step boundary and wait for them (at most `grace`;
    /// a job still running after that is marked `interrupted` at the next start).
    pub async fn shutdown(self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!("jobs still running after the grace period; leaving them");
        }
    }
}

async fn poll_loop(cx: WorkerCtx, store: Store) {
    let mut running: HashMap<JobKind, JoinHandle<()>> = HashMap::new();
    let interval = Duration::from_millis(cx.settings.worker.poll_interval_ms);
    while !cx.stopping.load(Ordering::SeqCst) {
        running.retain(|_, h| !h.is_finished());
        match store.active_jobs() {
            Ok(jobs) => {
                for job in jobs.into_iter().filter(|j| j.state == JobState::Queued) {
                    // The command records its response message right after queueing the job:
                    // wait for it (briefly), or progress would have nowhere to go.
                    let awaiting_message = job.interaction_token.is_some() && job.status_message_id.is_none() && crate::util::clock::now_secs() - job.created_at < 10;
                    if running.contains_key(&job.kind) || awaiting_message {
                        continue;
                    }
                    match start(&cx, &store, job.clone()) {
                        Ok(h) => {
                            running.insert(job.kind, h);
                        }
                        Err(e) => tracing::warn!(job = job.id, error = format!("{e:#}"), "job not started"),
                    }
                }
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "reading queued jobs"),
        }
        tokio::time::sleep(interval).await;
    }
    for (_, h) in running {
        // Joining blocks: do it off the runtime threads.
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
}

fn start(cx: &WorkerCtx, store: &Store, job: Job) -> Result<JoinHandle<()>> {
    // Fails if `/cancel` got to the queued job first.
    let job = store.start_job(job.id)?;
    tracing::info!(job = job.id, kind = job.kind.as_str(), "job started");
    let cx = cx.clone();
    std::thread::Builder::new().name(format!("freeski-job-{}", job.id)).spawn(move || run_job(&cx, job)).context("starting the job thread")
}

/// How a job's body ended (errors and panics are handled around it).
pub enum Done {
    Succeeded { headline: String, report: String, chart: Option<std::path::PathBuf> },
    Cancelled { headline: String },
    Interrupted { headline: String },
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

fn run_job(cx: &WorkerCtx, job: Job) {
    let s = &cx.settings;
    let retry = s.discord.retry_policy();
    let reporter = progress::Reporter::start(cx.http.clone(), cx.rt.clone(), &job, Duration::from_millis(s.worker.status_interval_ms), retry);
    let store = match Store::open_with(&s.store) {
        Ok(st) => st,
        Err(e) => {
            tracing::error!(job = job.id, error = format!("{e:#}"), "the job cannot open the store");
            return;
        }
    };
    // Everything the job allocates (a second model copy, LoRA weights, optimizer state,
    // activations) lives inside this call and is freed when it returns or unwinds.
    let result = catch_unwind(AssertUnwindSafe(|| {
        let jc = stages::JobCx { cx, job: &job, store: &store, reporter: &reporter };
        match job.kind {
            JobKind::Rescrape => stages::rescrape(&jc),
            JobKind::Retrain => stages::retrain(&jc),
        }
    }));
    let kind = job.kind.as_str();
    let (outcome, headline, report, chart) = match result {
        Ok(Ok(Done::Succeeded { headline, report, chart })) => (JobOutcome::Succeeded, format!("✅ {kind} job #{}: {headline}", job.id), Some(report), chart),
        Ok(Ok(Done::Cancelled { headline })) => (JobOutcome::Cancelled, format!("🛑 {kind} job #{} cancelled: {headline}", job.id), None, None),
        Ok(Ok(Done::Interrupted { headline })) => (JobOutcome::Interrupted, format!("⏸️ {kind} job #{} interrupted: {headline}", job.id), None, None),
        Ok(Err(e)) => {
            let reason = format!("{e:#}");
            tracing::error!(job = job.id, error = %reason, "job failed");
            (JobOutcome::Failed(reason.clone()), format!("❌ {kind} job #{} failed: {reason}", job.id), None, None)
        }
        Err(p) => {
            let reason = format!("crashed: {}", panic_text(p.as_ref()));
            tracing::error!(job = job.id, error = %reason, "job panicked");
            (JobOutcome::Failed(reason.clone()), format!("❌ {kind} job #{} failed: {reason}", job.id), None, None)
        }
    };
    // Discord first: once the store says the job ended, its messages are final.
    reporter.finish(&headline, report.as_deref(), chart);
    if let Err(e) = store.finish_job(job.id, &outcome) {
        tracing::error!(job = job.id, error = format!("{e:#}"), "recording the job's end");
    }
    tracing::info!(job = job.id, outcome = ?outcome, "job ended");
}
