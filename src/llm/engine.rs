//! The answering engine: one worker thread owns generation (one GPU, one model), takes questions
//! from a bounded queue and answers those that share an adapter together with continuous
//! batching (a question joins the running batch at the next step instead of waiting for it to
//! finish), streaming each answer's text back through its own channel. An answer is the same
//! whether it runs alone or beside others (see `generate::DecodeBatch`).
//!
//! - The active LoRA adapter sits behind an `ArcSwapOption`: a batch captures the `Arc` it starts
//!   with and keeps it to the end, so [`Engine::swap_adapter`] never waits for answering and never
//!   changes an answer half-way.
//! - Dropping a [`Ticket`] (or [`Canceller::cancel`], or [`Engine::shutdown`]) cancels its
//!   generation at the next token; a cancelled question still in the queue is skipped.
//! - The frozen base is shared as `Arc<LoadedModel>` so a trainer can borrow it, and
//!   [`Engine::has_waiting`] is one atomic load so training can yield to questions.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use tokio::sync::mpsc;

use super::chat::Message;
use super::generate::{DecodeBatch, GenOptions, Generation, Request};
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
        /// Questions in the batch when this one joined it, this one included.
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
    /// When it was submitted: its time to first token counts from here.
    submitted: Instant,
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
    /// `cfg.max_batch`, capped by the rows the model decodes together without changing any
    /// row's output (`Model::invariant_batch_rows`).
    max_batch: usize,
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
        let max_batch = cfg.max_batch.min(lm.model.invariant_batch_rows()?);
        if max_batch < cfg.max_batch {
            tracing::info!(max_batch, asked = cfg.max_batch, "batch size capped: larger batches would change answers on this device");
        }
        let shared = Arc::new(Shared {
            lm,
            adapter: ArcSwapOption::new(adapter),
            cfg,
            max_batch,
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
        let p = prompt::build(&self.shared.lm, &self.shared.cfg.system_prompt, &q.history, &q.question, q.opts.max_context, q.opts.max_new_tokens).map_err(SubmitError::Prompt)?;
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
        st.queue.push_back(Pending { id, submitted: Instant::now(), prompt: p.ids, opts: q.opts, adapter: q.adapter, tx, cancel: cancel.clone() });
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

/// Questions starting a batch together, and the adapter they share.
type Group = (Option<Arc<LoraAdapter>>, Vec<Pending>);

/// Wait for the oldest live question and take it with every other waiting question answered
/// with the same adapter, up to `room`, keeping queue order. `None` on shutdown.
fn next_group(shared: &Shared, room: usize) -> Option<Group> {
    let mut st = lock(&shared.state);
    loop {
        if let Some(stop) = shutdown_if_asked(shared, &mut st) {
            return stop;
        }
        if !st.queue.is_empty() {
            break;
        }
        st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    let first = st.queue.pop_front()?;
    let adapter = shared.resolve(&first.adapter);
    let mut group = vec![first];
    group.extend(take_same_adapter(shared, &mut st, &adapter, room.saturating_sub(1)));
    Some((adapter, group))
}

/// With the lock held: on shutdown, fail everything queued and answer `Some(None)`.
fn shutdown_if_asked(shared: &Shared, st: &mut State) -> Option<Option<Group>> {
    st.queue.retain(|p| !p.cancel.is_cancelled());
    shared.waiting.store(st.queue.len(), Ordering::SeqCst);
    if !st.shutdown {
        return None;
    }
    for p in st.queue.drain(..) {
        let _ = p.tx.send(Event::Failed("the bot is shutting down".into()));
    }
    shared.waiting.store(0, Ordering::SeqCst);
    Some(None)
}

/// With the lock held: remove and return up to `room` waiting questions answered with
/// `adapter`, in queue order.
fn take_same_adapter(shared: &Shared, st: &mut State, adapter: &Option<Arc<LoraAdapter>>, room: usize) -> Vec<Pending> {
    let same = |a: &Option<Arc<LoraAdapter>>| match (a, adapter) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    };
    let mut taken = Vec::new();
    let mut i = 0;
    while i < st.queue.len() && taken.len() < room {
        if st.queue[i].cancel.is_cancelled() {
            st.queue.remove(i);
        } else if same(&shared.resolve(&st.queue[i].adapter)) {
            taken.extend(st.queue.remove(i));
        } else {
            i += 1;
        }
    }
    taken
}

impl Shared {
    fn resolve(&self, c: &AdapterChoice) -> Option<Arc<LoraAdapter>> {
        match c {
            AdapterChoice::Active => self.adapter.load_full(),
            AdapterChoice::Fixed(a) => a.clone(),
        }
    }
}

/// A question in the running batch: where its events go.
struct Live {
    tx: mpsc::UnboundedSender<Event>,
    cancel: Canceller,
}

/// Continuous batching: a batch starts with the oldest waiting question and every other one
/// that shares its adapter; from then on, questions with that adapter join between decode steps
/// (each prefilled in chunks, so a long prompt stalls the others one chunk at a time) while
/// there is room, and rows leave as they finish. When the batch is empty, the next one may use
/// another adapter.
fn worker_loop(shared: &Shared) {
    let mut run = 0u64;
    while let Some((adapter, group)) = next_group(shared, shared.max_batch) {
        run += 1;
        let adapter_id = adapter.as_ref().map(|a| a.id.clone());
        let mut batch = DecodeBatch::new(&shared.lm, adapter.as_deref());
        let mut live: HashMap<u64, Live> = HashMap::new();
        admit(shared, &mut batch, &mut live, group, &adapter_id, run);
        while !batch.is_empty() {
            // Questions waiting for this adapter join while there is room; cancelled ones
            // still prefilling leave.
            let room = shared.max_batch.saturating_sub(batch.len());
            if room > 0 && shared.waiting.load(Ordering::SeqCst) > 0 {
                let more = {
                    let mut st = lock(&shared.state);
                    let more = if st.shutdown { Vec::new() } else { take_same_adapter(shared, &mut st, &adapter, room) };
                    // `running` still counts the batch, so `has_waiting` never blinks false here.
                    shared.waiting.store(st.queue.len(), Ordering::SeqCst);
                    more
                };
                admit(shared, &mut batch, &mut live, more, &adapter_id, run);
            }
            let stopping = shared.stopping.load(Ordering::SeqCst);
            for id in batch.drop_prefilling(|id| !stopping && live.get(id).is_some_and(|l| !l.cancel.is_cancelled())) {
                if let Some(l) = live.remove(&id) {
                    let _ = l.tx.send(Event::Failed(if stopping { "the bot is shutting down".into() } else { "cancelled".into() }));
                }
            }
            // A panic in a step (a bug, a device error surfacing as a panic) fails this batch
            // only; the engine keeps answering.
            let result = catch_unwind(AssertUnwindSafe(|| batch.step()));
            let failure = match result {
                Ok(Ok(done)) => {
                    // The model is free of these rows before anyone hears they are over.
                    shared.running.store(batch.len(), Ordering::SeqCst);
                    for (id, g) in done {
                        if let Some(l) = live.remove(&id) {
                            let _ = l.tx.send(Event::Finished(g));
                        }
                    }
                    None
                }
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("generation crashed".to_string()),
            };
            if let Some(why) = failure {
                tracing::error!(error = %why, "generation failed");
                shared.running.store(0, Ordering::SeqCst);
                for (_, l) in live.drain() {
                    let _ = l.tx.send(Event::Failed(why.clone()));
                }
                break;
            }
        }
        shared.running.store(0, Ordering::SeqCst);
        tracing::trace!(run, "batch done");
    }
}

/// Add `group` to the running batch: each question hears `Started` with the batch's size once
/// the whole group is in, and its text streams from its row's callback.
fn admit<'a>(shared: &'a Shared, batch: &mut DecodeBatch<'a, u64>, live: &mut HashMap<u64, Live>, group: Vec<Pending>, adapter_id: &Option<String>, run: u64) {
    if group.is_empty() {
        return;
    }
    let size = batch.len() + group.len();
    shared.running.store(size, Ordering::SeqCst);
    tracing::debug!(joining = group.len(), batch = size, adapter = ?adapter_id, "generating");
    for p in group {
        let _ = p.tx.send(Event::Started { adapter_id: adapter_id.clone(), batch: size, run });
        let (tx, cancel, stopping) = (p.tx.clone(), p.cancel.clone(), &shared.stopping);
        let request = Request {
            prompt: p.prompt,
            opts: p.opts,
            on_text: Box::new(move |piece: &str| {
                // A closed channel means nobody reads the answer any more: stop too.
                if cancel.is_cancelled() || stopping.load(Ordering::Relaxed) || tx.send(Event::Text(piece.to_string())).is_err() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }),
        };
        match batch.add(p.id, request, p.submitted) {
            Ok(()) => {
                live.insert(p.id, Live { tx: p.tx, cancel: p.cancel });
            }
            Err(e) => {
                let _ = p.tx.send(Event::Failed(format!("{e:#}")));
            }
        }
    }
}
