//! `ask` and `chat`: answer from the terminal with the same model, adapter and generation code
//! the bot uses.

use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::Settings;
use crate::llm::chat::Message;
use crate::llm::engine::{AdapterChoice, Engine, EngineConfig, Event, Question};
use crate::llm::generate::{Finish, GenOptions, Generation};
use crate::llm::load;
use crate::llm::lora::{self, LoraAdapter};

/// Options shared by every command that runs the model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a GGUF file, a Hugging Face folder, or hf:OWNER/NAME[/FILE] (default: model.source).
    #[arg(long)]
    pub model: Option<String>,
    /// LoRA adapter: an id under adapter.dir or a folder path ("none" for the bare base).
    #[arg(long)]
    pub adapter: Option<String>,
    /// cpu or cuda:N (default: model.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Seed for reproducible sampling (default: generation.seed, else random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Longest answer in tokens.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question.
    pub question: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The engine with generation options, ready to answer in the terminal.
pub struct Session {
    pub engine: Engine,
    pub opts: GenOptions,
}

impl ModelArgs {
    /// `settings` with this command line's generation overrides (`--seed`, `--temperature`,
    /// `--max-new-tokens`) and `--device` applied. The one place they are applied: `ask`,
    /// `chat` and `run` all answer with the settings this returns.
    pub fn apply(&self, settings: &Settings) -> Result<Settings> {
        let mut settings = settings.clone();
        if let Some(seed) = self.seed {
            settings.generation.seed = Some(seed);
        }
        if let Some(t) = self.temperature {
            settings.generation.temperature = t;
        }
        if let Some(n) = self.max_new_tokens {
            settings.generation.max_new_tokens = n;
        }
        if let Some(d) = &self.device {
            settings.model.device = d.clone();
        }
        settings.generation.validate().context("command-line generation options")?;
        Ok(settings)
    }
}

impl Session {
    /// Load the model and start the engine with `settings` and the overrides in `args`.
    pub fn open(settings: &Settings, args: &ModelArgs) -> Result<Self> {
        Self::open_with(settings, args, settings.engine_config())
    }

    /// [`Session::open`] with the engine's queue and batch from `cfg` (the HTTP server has its own).
    pub fn open_with(settings: &Settings, args: &ModelArgs, cfg: EngineConfig) -> Result<Self> {
        let settings = args.apply(settings)?;
        let device = crate::llm::device::parse_device(&settings.model.device)?;
        let t0 = std::time::Instant::now();
        let mut lm = load::load(&settings.model, args.model.as_deref(), &device)?;
        tracing::info!(model = %lm.name, device = %crate::llm::device::describe(&device), secs = format!("{:.1}", t0.elapsed().as_secs_f64()), "model loaded");
        let spec = args.adapter.clone().unwrap_or_else(|| settings.adapter.active.clone());
        let mut adapter = match spec.as_str() {
            "" | "none" => None,
            spec => {
                let dir = lora::resolve_dir(spec, &settings.adapter.dir)?;
                let a = LoraAdapter::load(&dir, lm.model.config(), &device)?;
                tracing::info!(adapter = %a.id, pairs = a.num_pairs(), r = a.config.r, "adapter loaded");
                Some(a)
            }
        };
        if settings.adapter.merge {
            if let Some(a) = adapter.take() {
                lm.model.merge_adapter(&a).context("merging the adapter into the base")?;
                tracing::info!(adapter = %a.id, "adapter merged into the base weights");
            }
        }
        let opts = GenOptions::from_settings(&settings.generation, settings.model.max_context, lm.model.config());
        let engine = Engine::start(Arc::new(lm), adapter.map(Arc::new), cfg)?;
        Ok(Self { engine, opts })
    }

    /// Answer `question` after `history`, streaming to `out`. Earlier turns are dropped, oldest
    /// first, until the prompt leaves room for a full answer (see `llm::prompt`).
    pub fn answer(&self, history: &[Message], question: &str, out: &mut dyn Write) -> Result<Generation> {
        let q = Question { history: history.to_vec(), question: question.to_string(), opts: self.opts.clone(), adapter: AdapterChoice::Active };
        let mut ticket = self.engine.submit(q)?;
        while let Some(ev) = ticket.blocking_next() {
            match ev {
                Event::Started { .. } => {}
                // An error here drops the ticket, which cancels the generation.
                Event::Text(piece) => out.write_all(piece.as_bytes()).and_then(|_| out.flush()).context("writing the answer")?,
                Event::Finished(gen) => return Ok(gen),
                Event::Failed(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
        anyhow::bail!("the engine stopped before answering")
    }
}

fn report(gen: &Generation) {
    let why = match &gen.finish {
        Finish::Eos => "end of answer".to_string(),
        Finish::Stop(s) => format!("stop string {s:?}"),
        Finish::Length => "max_new_tokens reached".into(),
        Finish::Context => "context window full".into(),
        Finish::Cancelled => "cancelled".into(),
    };
    tracing::info!(
        prompt_tokens = gen.prompt_tokens,
        answer_tokens = gen.tokens.len(),
        ttft_ms = gen.time_to_first_token.as_millis() as u64,
        tok_per_s = format!("{:.1}", gen.decode_tokens_per_sec()),
        "finished: {why}"
    );
}

pub fn ask(settings: &Settings, args: AskArgs) -> Result<()> {
    let session = Session::open(settings, &args.model)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let gen = session.answer(&[], &args.question, &mut out)?;
    writeln!(out)?;
    report(&gen);
    Ok(())
}

pub fn chat(settings: &Settings, args: ChatArgs) -> Result<()> {
    let session = Session::open(settings, &args.model)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut history: Vec<Message> = Vec::new();
    eprintln!("freeski-bot chat: ask away. /reset forgets the conversation, /quit leaves.");
    loop {
        {
            let mut o = stdout.lock();
            write!(o, "\n> ")?;
            o.flush()?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let q = line.trim();
        match q {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let mut o = stdout.lock();
        let gen = session.answer(&history, q, &mut o)?;
        writeln!(o)?;
        report(&gen);
        history.push(Message::user(q));
        history.push(Message::assistant(gen.text.trim()));
    }
    Ok(())
}
