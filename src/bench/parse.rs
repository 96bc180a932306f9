//! `bench parse`: parsing throughput and peak memory of the dataset build at the prototype's
//! scale (8,000 threads × 10 pages), on a generated store so it runs anywhere.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::forum as synth;
use crate::dataset::{build, BuildOptions, DatasetSettings};
use crate::scrape::CleanOptions;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct ParseBench {
    /// Forum threads to generate (scale down for a quick run).
    #[arg(long, default_value_t = 8000)]
    pub threads: u32,
    #[arg(long, default_value_t = 10)]
    pub pages_per_thread: u32,
    #[arg(long, default_value_t = 10)]
    pub posts_per_page: u32,
    /// Parse threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub jobs: usize,
    /// Keep the generated store and dataset in this folder (default: a temporary one, removed).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Also write the numbers as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Peak resident set size in MiB (Linux VmHWM).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: ParseBench) -> Result<()> {
    anyhow::ensure!(args.threads > 0 && args.pages_per_thread > 0 && args.posts_per_page > 0, "--threads, --pages-per-thread and --posts-per-page must be at least 1");
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("freeski-bench-parse-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure(&args, &dir);
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn measure(args: &ParseBench, dir: &std::path::Path) -> Result<()> {
    let db = dir.join("bench.sqlite");
    anyhow::ensure!(!db.exists(), "{} already exists; use an empty --dir", db.display());
    let mut store = Store::open(&db)?;
    let base = url::Url::parse("https://www.newschoolers.com").context("base URL")?;
    println!("generating {} threads x {} pages x {} posts ...", args.threads, args.pages_per_thread, args.posts_per_page);
    let gen = synth::populate(&store, &base, args.threads, args.pages_per_thread, args.posts_per_page, 2024)?;
    let rss_gen = peak_rss_mib();
    println!("generated {} pages, {:.0} MiB of HTML in {:.1}s", gen.pages, gen.html_bytes as f64 / 1048576.0, gen.secs);

    let started = Instant::now();
    let settings = DatasetSettings { dir: dir.join("datasets"), ..DatasetSettings::default() };
    let opts = BuildOptions { out_dir: None, jobs: args.jobs, progress: true, reparse: true };
    let report = build(&mut store, &settings, &CleanOptions::default(), &opts)?;
    let total = started.elapsed().as_secs_f64();
    let reparse = report.reparse.clone().context("the build re-parses every page")?;
    let parse_secs = reparse.elapsed.as_secs_f64();
    let peak = peak_rss_mib();
    let jobs = if args.jobs == 0 { rayon::current_num_threads() } else { args.jobs };

    println!(
        "parse:   {} pages in {parse_secs:.1}s = {:.0} pages/s ({:.1} MiB/s of HTML), {} posts, {} parse errors, {jobs} threads",
        reparse.pages,
        reparse.pages_per_sec(),
        reparse.html_bytes as f64 / 1048576.0 / parse_secs,
        reparse.posts,
        reparse.parse_errors
    );
    println!("build:   {total:.1}s in all (parse + pairs + dedup + write): {} train, {} test pairs", report.stats.train, report.stats.test);
    println!("peak RSS: {} (after generating: {})", fmt_mib(peak), fmt_mib(rss_gen));
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "threads": args.threads, "pages": reparse.pages, "html_bytes": reparse.html_bytes,
            "parse_secs": parse_secs, "pages_per_sec": reparse.pages_per_sec(), "posts": reparse.posts,
            "build_secs": total, "train": report.stats.train, "test": report.stats.test,
            "peak_rss_mib": peak, "jobs": jobs,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "unknown (no /proc/self/status)".into())
}
