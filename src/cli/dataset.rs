//! `dataset build`: turn the store into a versioned chat-format dataset folder.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::config::Settings;
use crate::dataset::{build, BuildOptions};
use crate::store::{Store, StoreSettings};

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Build train.jsonl / test.jsonl / rejected.jsonl from scraped threads and bot feedback.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Folder for the dataset folders instead of dataset.dir.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Store file instead of store.path.
    #[arg(long, value_name = "FILE")]
    pub store: Option<PathBuf>,
    /// Re-parse all stored pages first, even if the cleaner did not change.
    #[arg(long)]
    pub reparse: bool,
    /// Threads for parsing (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub jobs: usize,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(settings: &Settings, cmd: DatasetCommand) -> Result<()> {
    match cmd {
        DatasetCommand::Build(args) => {
            let path = args.store.unwrap_or_else(|| settings.store.path.clone());
            anyhow::ensure!(path.is_file(), "store {} does not exist: run `freeski-bot scrape` first", path.display());
            let mut store = Store::open_with(&StoreSettings { path: path.clone(), ..settings.store.clone() })?;
            let opts = BuildOptions { out_dir: args.out, jobs: args.jobs, progress: !args.no_progress, reparse: args.reparse };
            let report = build(&mut store, &settings.dataset, &settings.scrape.clean_options(), &opts)?;
            println!("{report}");
            Ok(())
        }
    }
}
