//! The answering engine on a crafted script model: queue order and positions, batching of
//! waiting questions, cancellation, bounded queue, adapters captured when a question starts, and
//! questions of different adapters sharing one batch.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::script_model::{self, End};
use freeski_bot::llm::engine::{AdapterChoice, Engine, EngineConfig, Event, Question, SubmitError, Ticket};
use freeski_bot::llm::generate::{Finish, GenOptions};
use freeski_bot::llm::lora::{AdapterConfig, LoraAdapter};
use freeski_bot::llm::model::Proj;
use freeski_bot::llm::sampling::SamplingParams;

fn opts(max_new_tokens: usize) -> GenOptions {
    GenOptions { sampling: SamplingParams::greedy(), max_new_tokens, stop: vec![], seed: 1, max_context: 8192 }
}

fn question(max_new_tokens: usize) -> Question {
    Question { history: vec![], question: "how do I carve?".into(), opts: opts(max_new_tokens), adapter: AdapterChoice::Active }
}

fn engine(capacity: usize, max_batch: usize) -> (Engine, String) {
    let tok = script_model::tokenizer();
    let script = script_model::words(&tok, 12, &[]);
    let text = script_model::text(&tok, &script);
    let lm = script_model::model(&script, End::Cycle);
    (Engine::start(Arc::new(lm), None, EngineConfig { queue_capacity: capacity, max_batch, system_prompt: String::new() }).unwrap(), text)
}

/// Wait for the ticket's first text (the question is being generated); returns the adapter it
/// started with.
async fn first_text(t: &mut Ticket) -> Option<String> {
    let mut adapter = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), t.next()).await.expect("engine silent") {
            Some(Event::Text(_)) => return adapter,
            Some(Event::Started { adapter_id, .. }) => adapter = adapter_id,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Drain a ticket: (adapter id, batch size, generation).
async fn finish(mut t: Ticket) -> (Option<String>, usize, freeski_bot::llm::generate::Generation) {
    let mut started = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), t.next()).await.expect("engine silent") {
            Some(Event::Started { adapter_id, batch, .. }) => started = Some((adapter_id, batch)),
            Some(Event::Text(_)) => {}
            Some(Event::Finished(g)) => {
                let (a, b) = started.expect("Started comes first");
                return (a, b, g);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn noop_adapter(engine: &Engine, id: &str) -> Arc<LoraAdapter> {
    let cfg = engine.model().model.config().clone();
    let ac = AdapterConfig::new(4, 8.0, 0.0, &[Proj::Q], "script", false);
    Arc::new(LoraAdapter::from_pairs(id.into(), ac, &cfg, (0..cfg.num_layers).map(|_| Default::default()).collect()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_positions_full_queue_and_adapter_capture() {
    // One answer at a time, so the others wait in the queue.
    let (engine, text) = engine(3, 1);
    assert!(!engine.has_waiting());
    // A blocker that runs until dropped.
    let mut blocker = engine.submit(question(1_000_000)).unwrap();
    assert_eq!(blocker.ahead, 0);
    first_text(&mut blocker).await;
    assert!(engine.has_waiting(), "a running answer counts as work");
    assert_eq!((engine.queue_depth(), engine.running()), (0, 1), "a started question no longer waits");
    engine.swap_adapter(Some(noop_adapter(&engine, "a1")));
    let waiting: Vec<Ticket> = (0..3).map(|_| engine.submit(question(30)).unwrap()).collect();
    assert_eq!(waiting.iter().map(|t| t.ahead).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(engine.queue_depth(), 3);
    assert!(matches!(engine.submit(question(30)), Err(SubmitError::QueueFull { waiting: 3 })));
    drop(blocker);
    for t in waiting {
        let (adapter, batch, gen) = finish(t).await;
        // Swapped while the blocker ran: the waiting ones start with the new adapter.
        assert_eq!((adapter.as_deref(), batch), (Some("a1"), 1));
        assert_eq!(gen.finish, Finish::Length);
        assert!(gen.text.starts_with(&text), "{:?} does not follow the script {text:?}", gen.text);
    }
    assert!(!engine.has_waiting());
    engine.shutdown();
    assert!(matches!(engine.submit(question(3)), Err(SubmitError::ShuttingDown)));
}

/// On the CPU the model mixes adapters in one step, so questions answered with different
/// adapters (and the bare base) share the running batch instead of waiting for it to drain,
/// each with its own adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_of_different_adapters_share_the_running_batch() {
    let (engine, text) = engine(8, 8);
    assert!(engine.model().model.mixes_adapters().unwrap());
    let mut blocker = engine.submit(question(1_000_000)).unwrap();
    first_text(&mut blocker).await;
    let (a1, a2) = (noop_adapter(&engine, "a1"), noop_adapter(&engine, "a2"));
    engine.swap_adapter(Some(a2.clone()));
    let with = |adapter: AdapterChoice| Question { adapter, ..question(6) };
    let tickets = vec![
        engine.submit(with(AdapterChoice::Fixed(Some(a1)))).unwrap(),
        engine.submit(with(AdapterChoice::Active)).unwrap(),
        engine.submit(with(AdapterChoice::Fixed(None))).unwrap(),
    ];
    let mut seen = Vec::new();
    for mut t in tickets {
        let mut started = None;
        let gen = loop {
            match tokio::time::timeout(Duration::from_secs(30), t.next()).await.expect("engine silent") {
                Some(Event::Started { adapter_id, run, .. }) => started = Some((adapter_id, run)),
                Some(Event::Text(_)) => {}
                Some(Event::Finished(g)) => break g,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!(gen.text.starts_with(&text) || text.starts_with(gen.text.trim_end()), "{:?} vs script {text:?}", gen.text);
        seen.push(started.expect("Started comes first"));
    }
    let adapters: Vec<Option<&str>> = seen.iter().map(|(a, _)| a.as_deref()).collect();
    assert_eq!(adapters, vec![Some("a1"), Some("a2"), None]);
    // All three joined the blocker's batch (run 1), which kept answering meanwhile.
    assert!(seen.iter().all(|(_, run)| *run == 1), "runs {seen:?}");
    match tokio::time::timeout(Duration::from_secs(30), blocker.next()).await.expect("engine silent") {
        Some(Event::Text(_)) => {}
        other => panic!("the blocker stopped: {other:?}"),
    }
    drop(blocker);
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_answer_keeps_its_adapter_and_shutdown_cancels() {
    let (engine, _) = engine(4, 1);
    engine.swap_adapter(Some(noop_adapter(&engine, "old")));
    let mut running = engine.submit(question(1_000_000)).unwrap();
    assert_eq!(first_text(&mut running).await.as_deref(), Some("old"));
    let previous = engine.swap_adapter(Some(noop_adapter(&engine, "new")));
    assert_eq!(previous.map(|a| a.id.clone()).as_deref(), Some("old"));
    assert_eq!(engine.active_adapter_id().as_deref(), Some("new"));
    let queued = engine.submit(question(5)).unwrap();
    let e = engine.clone();
    let stopper = tokio::task::spawn_blocking(move || e.shutdown());
    let gen = loop {
        match running.next().await {
            Some(Event::Finished(g)) => break g,
            Some(Event::Text(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(gen.finish, Finish::Cancelled);
    let mut queued = queued;
    let mut failed = false;
    while let Some(ev) = queued.next().await {
        failed |= matches!(ev, Event::Failed(ref m) if m.contains("shutting down"));
    }
    assert!(failed, "a queued question is told the engine stops");
    stopper.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_ticket_is_skipped_and_too_long_question_refused() {
    let (engine, _) = engine(4, 1);
    let mut blocker = engine.submit(question(1_000_000)).unwrap();
    first_text(&mut blocker).await;
    let dropped = engine.submit(question(5)).unwrap();
    let kept = engine.submit(question(5)).unwrap();
    assert_eq!((dropped.ahead, kept.ahead), (1, 2));
    drop(dropped);
    drop(blocker);
    let (_, batch, gen) = finish(kept).await;
    assert_eq!((batch, gen.tokens.len()), (1, 5));
    let mut long = question(10);
    long.opts.max_context = 16;
    long.question = "word ".repeat(100);
    assert!(matches!(engine.submit(long), Err(SubmitError::Prompt(_))));
    engine.shutdown();
}

/// Continuous batching: a question sent while a full batch decodes joins that batch at the
/// next step (same run) and streams its answer while the others are still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_joins_the_running_batch() {
    let (engine, text) = engine(16, 9);
    let mut running: Vec<Ticket> = (0..8).map(|_| engine.submit(question(1_000_000)).unwrap()).collect();
    let mut runs = Vec::new();
    for t in running.iter_mut() {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), t.next()).await.expect("engine silent") {
                Some(Event::Started { run, .. }) => runs.push(run),
                Some(Event::Text(_)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let late = engine.submit(question(5)).unwrap();
    let mut late = late;
    let (mut late_run, mut late_text) = (None, String::new());
    let gen = loop {
        match tokio::time::timeout(Duration::from_secs(30), late.next()).await.expect("engine silent") {
            Some(Event::Started { run, .. }) => late_run = Some(run),
            Some(Event::Text(t)) => late_text.push_str(&t),
            Some(Event::Finished(g)) => break g,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(gen.tokens.len(), 5);
    assert!(text.starts_with(late_text.trim_end()) || late_text.starts_with(&text), "{late_text:?} vs script {text:?}");
    // It ran in the batch that was already decoding, not in one started after it.
    assert!(runs.iter().all(|&r| Some(r) == late_run), "runs {runs:?}, late question {late_run:?}");
    // The long answers were still streaming: each yields more text after the late one finished.
    for t in running.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(30), t.next()).await.expect("engine silent") {
            Some(Event::Text(_)) => {}
            other => panic!("a long answer stopped: {other:?}"),
        }
    }
    drop(running);
    engine.shutdown();
}
