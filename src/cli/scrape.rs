//! `scrape`: crawl the configured subforum into the store. Ctrl-C stops after the pages in
//! flight (everything fetched so far is kept; the next run resumes) and exits with 130, so
//! `scrape && dataset build` never builds from half a crawl; a second Ctrl-C exits at once,
//! which is safe too since every page is committed on its own.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::scrape::{scrape, CrawlOptions};
use crate::store::{Store, StoreSettings};

#[derive(Debug, Args)]
pub struct ScrapeArgs {
    /// Re-check every known thread page with conditional GETs (catches edits to old posts).
    #[arg(long)]
    pub revalidate: bool,
    /// Store file instead of store.path.
    #[arg(long, value_name = "FILE")]
    pub store: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(settings: &Settings, args: ScrapeArgs) -> Result<()> {
    let path = args.store.unwrap_or_else(|| settings.store.path.clone());
    let store = Mutex::new(Store::open_with(&StoreSettings { path: path.clone(), ..settings.store.clone() })?);
    let opts = CrawlOptions { revalidate: args.revalidate, progress: !args.no_progress };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let report = rt.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupted: finishing the pages in flight (Ctrl-C again to stop now)");
                on_signal.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        scrape(&settings.scrape, &store, &opts, &cancel).await
    })?;
    println!("{report}");
    let store = store.into_inner().map_err(|_| anyhow::anyhow!("store lock poisoned"))?;
    let c = store.forum_counts().map_err(|e| store.named(e))?;
    println!(
        "store {}: {} threads ({} done, {} failed, {} gone, {} blocked), {} pages, {} posts, {} parse errors",
        path.display(),
        c.threads,
        c.threads_done,
        c.threads_failed,
        c.threads_gone,
        c.threads_blocked,
        c.pages,
        c.posts,
        c.parse_errors
    );
    if report.cancelled {
        // Not finished: the shell's convention for a run ended by SIGINT (128 + 2).
        eprintln!("interrupted: stopped early; run `freeski-bot scrape` again to continue");
        drop(store);
        drop(rt);
        std::process::exit(130);
    }
    Ok(())
}
