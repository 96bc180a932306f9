//! `bench …`: parses the benchmark's arguments and runs it (the benchmarks live in `crate::bench`).

use anyhow::Result;
use clap::Subcommand;

use crate::bench;
use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode speed, time to first token and peak memory of the model.
    Generate(bench::generate::GenerateBench),
    /// Forum page parsing speed and peak memory of `dataset build` on a generated store.
    Parse(bench::parse::ParseBench),
    /// Tokens/s and peak device memory of a QLoRA training step.
    Train(bench::train::TrainBench),
    /// Answer latency idle vs while training on the same base, and peak memory of both.
    ServeTrain(bench::serve_train::ServeTrainBench),
    /// Questions of different lengths through the engine, alone and all at once with an
    /// adapter active: every answer must be the same both ways (fails otherwise).
    Batching(bench::batching::BatchingBench),
}

pub fn run(settings: &Settings, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(args) => bench::generate::run(settings, args),
        BenchCommand::Parse(args) => bench::parse::run(args),
        BenchCommand::Train(args) => bench::train::run(settings, args),
        BenchCommand::ServeTrain(args) => bench::serve_train::run(settings, args),
        BenchCommand::Batching(args) => bench::batching::run(settings, args),
    }
}
