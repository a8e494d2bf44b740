//! `conveyor dev`: a development server — dispatcher, workers with the
//! built-in handlers, in-process broker and store — in one process, with an
//! optional snapshot file so a restart keeps its jobs. Job files given on
//! the command line are submitted at start; the server runs until Ctrl-C
//! and logs every job that finishes.
//!
//! With `--http-addr` it serves `/healthz` and `/readyz` like a dispatcher
//! does; the HTTP API and status page attach to the same listener and
//! `Embedded` value when they land. Until then `dev` is driven by job
//! files.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use conveyor::config::Config;
use conveyor::embedded::{Embedded, EmbeddedOptions};
use conveyor::http::ProbeServer;
use conveyor::shutdown::{ShutdownTrigger, on_signals};

/// Dev options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job files to submit at start.
    jobs: Vec<PathBuf>,
    /// Keep the store in this file across restarts.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Concurrency of each worker [default: `worker.concurrency` of the
    /// configuration, 16 unless set].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Serve `/healthz` and `/readyz` on this address (e.g. 127.0.0.1:8080).
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let trigger = ShutdownTrigger::new();
    on_signals(trigger.clone());
    let started = std::time::Instant::now();
    let probes = ProbeServer::start_if(args.http_addr.or(config.http_addr)).await?;
    let embedded = Embedded::start(
        &config,
        conveyor_builtin_handlers::registry(),
        EmbeddedOptions {
            workers: args.workers,
            concurrency: args.concurrency.unwrap_or(config.worker.concurrency),
            snapshot: args.snapshot.clone(),
            ..EmbeddedOptions::default()
        },
    )
    .await?;
    if let Some(p) = &probes {
        p.attach(embedded.health());
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        snapshot = ?args.snapshot,
        "conveyor dev running in-process (no RabbitMQ or Redis; production uses both); Ctrl-C stops"
    );
    for file in &args.jobs {
        let body =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        embedded.submit(body).await?;
        tracing::info!(file = %file.display(), "submitted");
    }
    let store = embedded.store();
    let mut reported: HashSet<String> = HashSet::new();
    let mut shutdown = trigger.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for job in store.list_jobs(None, 1000).await? {
            if job.state.is_terminal() && reported.insert(job.id.clone()) {
                tracing::info!(job = %job.id, state = %job.state, tasks = job.tasks, "job finished");
            }
        }
    }
    embedded.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}
