//! Command-line front end: one binary, one subcommand per job. Each subcommand lives in its own
//! module and only parses arguments and wires parts together; the work is done by the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

pub mod ask;
pub mod bench;
pub mod dataset;
pub mod run;
pub mod scrape;
pub mod serve;
pub mod train;

#[derive(Debug, Parser)]
#[command(name = "freeski-bot", version, about = "Freeskiing Q&A bot on a local QLoRA-tuned LLM")]
pub struct Cli {
    /// Settings file layered over config/default.toml (default: config/local.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer one question in the terminal, streaming tokens as they come.
    Ask(ask::AskArgs),
    /// Interactive chat in the terminal (multi-turn; `/reset` clears, `/quit` leaves).
    Chat(ask::ChatArgs),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Crawl the forum into the store (resumable, incremental, polite).
    Scrape(scrape::ScrapeArgs),
    /// Build training data from the store.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Fine-tune a LoRA adapter on a dataset (resumable; Ctrl-C saves a checkpoint).
    Train(train::TrainArgs),
    /// Held-out loss and sample answers of an adapter against the bare base model.
    Eval(train::EvalArgs),
    /// Run the Discord bot (token from DISCORD_TOKEN or discord.token_file).
    Run(run::RunArgs),
    /// Serve an OpenAI-compatible HTTP API over the engine (key from FREESKI_API_KEY or serve.api_key_file).
    Serve(serve::ServeArgs),
}

/// Entry point of the binary: parse, set up logging, run, and turn errors into exit codes.
pub fn main() -> ExitCode {
    crate::llm::device::settle_cpu_threads();
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line: "loading model: reading X: ...".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Ask(args) => ask::ask(&settings, args),
        Command::Chat(args) => ask::chat(&settings, args),
        Command::Bench(cmd) => bench::run(&settings, cmd),
        Command::Scrape(args) => scrape::run(&settings, args),
        Command::Dataset(cmd) => dataset::run(&settings, cmd),
        Command::Train(args) => train::train(&settings, args),
        Command::Eval(args) => train::eval(&settings, args),
        Command::Run(args) => run::run(&settings, args),
        Command::Serve(args) => serve::run(&settings, args),
    }
}

fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_env("FREESKI_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr so that `ask` output on stdout stays clean for pipes; colours only on a
    // terminal (not in log files); tokens and request bodies are redacted from every line.
    let _ = fmt().with_env_filter(filter).with_writer(crate::bot::redact::RedactingStderr).with_ansi(std::io::stderr().is_terminal()).with_target(false).try_init();
}
