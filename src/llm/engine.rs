//! The answering engine: one worker thread owns generation (one GPU, one model), takes questions
//! from a bounded queue, runs those that share an adapter as one batch, and streams each answer's
//! text back through its own channel.
//!
//! - The active LoRA adapter sits behind an `ArcSwapOption`: a batch captures the `Arc` it starts
//!   with and keeps it to the end, so [`Engine::swap_adapter`] never waits for answering and never
//!   changes an answer half-way.
//! - Dropping a [`Ticket`] (or [`Canceller::cancel`], or [`Engine::shutdown`]) cancels its
//!   generation at the next token; a cancelled question still in the queue is skipped.
//! - The frozen base is shared as `Arc<LoadedModel>` so a trainer can borrow it, and
//!   [`Engine::has_waiting`] is one atomic load so training can yield to questions.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use tokio::sync::mpsc;

use super::chat::Message;
use super::generate::{generate_batch, GenOptions, Generation, Request};
use super::load::LoadedModel;
use super::lora::LoraAdapter;
use super::prompt;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Questions allowed to wait (not counting those being answered); more are refused.
    pub queue_capacity: usize,
    /// Most questions answered together in one batch.
    pub max_batch: usize,
    /// System prompt put before every conversation.
    pub system_prompt: String,
}

/// Which adapter a question is answered with.
#[derive(Clone, Default)]
pub enum AdapterChoice {
    /// Whatever is active when its batch starts.
    #[default]
    Active,
    /// This one (or the bare base with `None`), e.g. to compare an old and a new adapter.
    Fixed(Option<Arc<LoraAdapter>>),
}

/// One question for the engine.
#[derive(Clone)]
pub struct Question {
    /// Earlier turns, oldest first; trimmed from the front when the prompt would not fit.
    pub history: Vec<Message>,
    pub question: String,
    pub opts: GenOptions,
    pub adapter: AdapterChoice,
}

/// What a ticket receives, in this order: `Started`, any number of `Text`, then `Finished` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    Started {
        /// Adapter the answer is generated with (`None`: bare base).
        adapter_id: Option<String>,
        /// Questions answered in the same batch, this one included.
        batch: usize,
        /// The batch's number in the engine's run order (1 = its first batch): questions are
        /// answered in the order these increase.
        run: u64,
    },
    Text(String),
    Finished(Generation),
    Failed(String),
}

/// Why a question was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({waiting} questions waiting)")]
    QueueFull { waiting: usize },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("{0:#}")]
    Prompt(anyhow::Error),
}

/// Cancels one question from anywhere (e.g. when its Discord message is deleted).
#[derive(Clone, Debug)]
pub struct Canceller(Arc<AtomicBool>);

impl Canceller {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A queued question: its events arrive here. Dropping it cancels the question.
pub struct Ticket {
    pub id: u64,
    /// Questions that will be answered before this one starts (waiting or being answered).
    pub ahead: usize,
    /// History turns kept after trimming to the context (index into `Question::history`).
    pub history_kept_from: usize,
    pub prompt_tokens: usize,
    events: mpsc::UnboundedReceiver<Event>,
    cancel: Canceller,
}

impl Ticket {
    /// Next event; `None` once the answer is over (after `Finished`/`Failed`).
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// [`Ticket::next`] for threads outside an async runtime (the terminal `ask`).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    pub fn canceller(&self) -> Canceller {
        self.cancel.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Pending {
    id: u64,
    prompt: Vec<u32>,
    opts: GenOptions,
    adapter: AdapterChoice,
    tx: mpsc::UnboundedSender<Event>,
    cancel: Canceller,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    shutdown: bool,
    next_id: u64,
}

struct Shared {
    lm: Arc<LoadedModel>,
    adapter: ArcSwapOption<LoraAdapter>,
    cfg: EngineConfig,
    state: Mutex<State>,
    wake: Condvar,
    /// Mirrors of the queue length and the batch size, readable without the lock.
    waiting: AtomicUsize,
    running: AtomicUsize,
    stopping: AtomicBool,
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// Handle to the engine; cheap to clone. The worker stops on [`Engine::shutdown`].
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Start the worker thread on `lm` with `adapter` active.
    pub fn start(lm: Arc<LoadedModel>, adapter: Option<Arc<LoraAdapter>>, cfg: EngineConfig) -> Result<Self> {
        anyhow::ensure!(cfg.max_batch >= 1, "the engine needs a batch size of at least 1");
        let shared = Arc::new(Shared {
            lm,
            adapter: ArcSwapOption::new(adapter),
            cfg,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            worker: Mutex::new(None),
        });
        let worker = std::thread::Builder::new()
            .name("freeski-engine".into())
            .spawn({
                let shared = shared.clone();
                move || worker_loop(&shared)
            })
            .context("starting the engine thread")?;
        *lock(&shared.worker) = Some(worker);
        Ok(Self { shared })
    }

    /// The frozen base model (a trainer borrows it: one copy in memory).
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.shared.lm
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// Queue a question. Its prompt is built (and trimmed) here, so a question that can never
    /// fit is refused at once instead of failing a batch later.
    pub fn submit(&self, q: Question) -> Result<Ticket, SubmitError> {
        let p = prompt::build(&self.shared.lm, &self.shared.cfg.system_prompt, &q.history, &q.question, q.opts.max_context, q.opts.max_new_tokens)
            .map_err(SubmitError::Prompt)?;
        let (tx, events) = mpsc::unbounded_channel();
        let cancel = Canceller(Arc::new(AtomicBool::new(false)));
        let mut st = lock(&self.shared.state);
        if st.shutdown {
            return Err(SubmitError::ShuttingDown);
        }
        st.queue.retain(|p| !p.cancel.is_cancelled());
        if st.queue.len() >= self.shared.cfg.queue_capacity {
            return Err(SubmitError::QueueFull { waiting: st.queue.len() });
        }
        st.next_id += 1;
        let id = st.next_id;
        let ahead = st.queue.len() + self.shared.running.load(Ordering::SeqCst);
        let prompt_tokens = p.ids.len();
        st.queue.push_back(Pending { id, prompt: p.ids, opts: q.opts, adapter: q.adapter, tx, cancel: cancel.clone() });
        self.shared.waiting.store(st.queue.len(), Ordering::SeqCst);
        drop(st);
        self.shared.wake.notify_one();
        Ok(Ticket { id, ahead, history_kept_from: p.kept_from, prompt_tokens, events, cancel })
    }

    /// Questions waiting to start (cheap: one atomic load; a trainer polls it between steps).
    pub fn queue_depth(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Questions being answered right now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Whether any question waits or is being answered: training should yield.
    pub fn has_waiting(&self) -> bool {
        self.queue_depth() + self.running() > 0
    }

    /// The adapter new batches start with.
    pub fn active_adapter(&self) -> Option<Arc<LoraAdapter>> {
        self.shared.adapter.load_full()
    }

    pub fn active_adapter_id(&self) -> Option<String> {
        self.shared.adapter.load().as_ref().map(|a| a.id.clone())
    }

    /// Make `adapter` active for batches that start from now on; answers in flight keep theirs.
    /// Returns the previous one. Never waits for generation.
    pub fn swap_adapter(&self, adapter: Option<Arc<LoraAdapter>>) -> Option<Arc<LoraAdapter>> {
        if let Some(a) = &adapter {
            tracing::info!(adapter = %a.id, "adapter activated");
        } else {
            tracing::info!("adapter removed: answering with the bare base");
        }
        self.shared.adapter.swap(adapter)
    }

    /// Stop: questions still queued fail with "shutting down", answers in flight are cancelled
    /// at their next token (their tickets get `Finished` with `Finish::Cancelled` and the text
    /// so far). Waits for the worker thread. Idempotent.
    pub fn shutdown(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.shutdown = true;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        let handle = lock(&self.shared.worker).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the engine thread panicked while stopping");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside generation is caught below; a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Take the next batch: the oldest live question, then later ones answered with the same
/// adapter, up to `max_batch`, keeping queue order. `None` on shutdown.
fn next_batch(shared: &Shared) -> Option<(Option<Arc<LoraAdapter>>, Vec<Pending>)> {
    let mut st = lock(&shared.state);
    loop {
        st.queue.retain(|p| !p.cancel.is_cancelled());
        shared.waiting.store(st.queue.len(), Ordering::SeqCst);
        if st.shutdown {
            for p in st.queue.drain(..) {
                let _ = p.tx.send(Event::Failed("the bot is shutting down".into()));
            }
            shared.waiting.store(0, Ordering::SeqCst);
            return None;
        }
        if !st.queue.is_empty() {
            break;
        }
        st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    let resolve = |c: &AdapterChoice| match c {
        AdapterChoice::Active => shared.adapter.load_full(),
        AdapterChoice::Fixed(a) => a.clone(),
    };
    let first = st.queue.pop_front()?;
    let adapter = resolve(&first.adapter);
    let same = |a: &Option<Arc<LoraAdapter>>| match (a, &adapter) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    };
    let mut batch = vec![first];
    let mut i = 0;
    while i < st.queue.len() && batch.len() < shared.cfg.max_batch {
        if same(&resolve(&st.queue[i].adapter)) {
            if let Some(p) = st.queue.remove(i) {
                batch.push(p);
            }
        } else {
            i += 1;
        }
    }
    // Set `running` before `waiting` drops, so `has_waiting` never blinks false in between.
    shared.running.store(batch.len(), Ordering::SeqCst);
    shared.waiting.store(st.queue.len(), Ordering::SeqCst);
    Some((adapter, batch))
}

fn worker_loop(shared: &Shared) {
    let mut run = 0u64;
    while let Some((adapter, batch)) = next_batch(shared) {
        run += 1;
        let n = batch.len();
        let adapter_id = adapter.as_ref().map(|a| a.id.clone());
        tracing::debug!(batch = n, adapter = ?adapter_id, "generating");
        let mut requests = Vec::with_capacity(n);
        for p in &batch {
            let _ = p.tx.send(Event::Started { adapter_id: adapter_id.clone(), batch: n, run });
            let (tx, cancel, stopping) = (p.tx.clone(), p.cancel.clone(), &shared.stopping);
            requests.push(Request {
                prompt: p.prompt.clone(),
                opts: p.opts.clone(),
                on_text: Box::new(move |piece: &str| {
                    // A closed channel means nobody reads the answer any more: stop too.
                    if cancel.is_cancelled() || stopping.load(Ordering::Relaxed) || tx.send(Event::Text(piece.to_string())).is_err() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                }),
            });
        }
        // A panic in one batch (a bug, a device error surfacing as a panic) fails that batch
        // only; the engine keeps answering.
        let result = catch_unwind(AssertUnwindSafe(|| generate_batch(&shared.lm, adapter.as_deref(), requests)));
        // The model is free before anyone hears the batch is over.
        shared.running.store(0, Ordering::SeqCst);
        match result {
            Ok(Ok(gens)) => {
                for (p, g) in batch.iter().zip(gens) {
                    let _ = p.tx.send(Event::Finished(g));
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = format!("{e:#}"), "generation failed");
                for p in &batch {
                    let _ = p.tx.send(Event::Failed(format!("{e:#}")));
                }
            }
            Err(_) => {
                tracing::error!("generation panicked");
                for p in &batch {
                    let _ = p.tx.send(Event::Failed("generation crashed".into()));
                }
            }
        }
        tracing::trace!(ids = ?batch.iter().map(|p| p.id).collect::<Vec<_>>(), "batch done");
    }
}
