//! `conveyor bench`: load a deployment (a live one, or dispatchers and
//! workers started here with `--spawn`), report throughput, latency,
//! errors and memory, next to the bare broker loop on a scratch queue.
//! See `conveyor::bench` for what is measured and how.

use super::out::out;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use conveyor::bench::{Options, Shape, SpawnOptions, Target};
use conveyor::config::{Config, QueueType};

/// Bench options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job shape: `single`, `chain:N` (N tasks in a row) or `fanout:K`
    /// (one root, K children, one join after all K); every task is `noop`.
    #[arg(long, default_value = "single")]
    shape: Shape,
    /// Jobs to publish.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Offered rate in jobs/s; without it, as fast as confirms allow.
    #[arg(long)]
    rate: Option<f64>,
    /// Start dispatcher and worker processes of this executable under a
    /// fresh prefix `bench-<run>`; stop them and delete their queues and
    /// keys afterwards.
    #[arg(long, conflicts_with = "prefix")]
    spawn: bool,
    /// Prefix of the live deployment to load (default: the config's).
    #[arg(long)]
    prefix: Option<String>,
    /// Dispatcher processes to spawn.
    #[arg(long, default_value_t = 1, requires = "spawn")]
    dispatchers: usize,
    /// Worker processes to spawn.
    #[arg(long, default_value_t = 1, requires = "spawn")]
    workers: usize,
    /// Start the workers only after every job was accepted by the
    /// dispatcher (recorded in Redis, its root task in the task queue);
    /// sample memory then (the dispatcher with all jobs in flight), then
    /// start the workers and drain.
    #[arg(long, requires = "spawn")]
    hold_workers: bool,
    /// Concurrency of each spawned worker.
    #[arg(long, default_value_t = 64, requires = "spawn")]
    concurrency: usize,
    /// Most unconfirmed publishes outstanding.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Least pause between polls of Redis for finished jobs, in ms (the
    /// resolution of the observed latency when few jobs are outstanding).
    #[arg(long, default_value_t = 0.5)]
    poll_ms: f64,
    /// Oldest outstanding jobs asked about per poll.
    #[arg(long, default_value_t = 512)]
    poll_window: usize,
    /// Most HGETs per second sent to Redis while watching.
    #[arg(long, default_value_t = 25_000.0)]
    poll_budget: f64,
    /// Give up on unfinished jobs when none has finished for this many
    /// seconds, and on RabbitMQ when a publish, a confirm or a passive
    /// declare is not answered for as long (a resource alarm).
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Messages of the bare broker loop. With `--rate` the loop is a bare
    /// hop instead: this many messages at most (and no more than `--jobs`),
    /// at the same rate, through a queue of the deployment's type, timed
    /// from publish to delivery.
    #[arg(long, default_value_t = 50_000)]
    bare_messages: usize,
    /// Queue type of the bare throughput loop's scratch queue: `classic` or
    /// `quorum` (the bare hop uses the deployment's own).
    #[arg(long, default_value = "classic", value_parser = parse_queue_type)]
    bare_queue_type: QueueType,
    /// Skip the bare broker loop (or hop).
    #[arg(long)]
    skip_bare: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write one CSV row per job to this file: publish, create and
    /// finish times (µs since the epoch, on the bench's clock), state and
    /// publish-to-finish latency, to see when slow jobs happened.
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    // Checked as the configuration's own prefix is: one that breaks the
    // hash tag or that RabbitMQ reserves is named, not met mid-run.
    if let Some(prefix) = &args.prefix {
        let mut live = config.clone();
        live.prefix = prefix.clone();
        live.validate()?;
    }
    let Some(poll_interval) = (args.poll_ms >= 0.0)
        .then(|| Duration::try_from_secs_f64(args.poll_ms / 1000.0).ok())
        .flatten()
    else {
        anyhow::bail!("--poll-ms must be a number of milliseconds >= 0 (and below 2^64 s)");
    };
    let target = if args.spawn {
        Target::Spawn(SpawnOptions {
            exe: std::env::current_exe().context("cannot find this executable to spawn")?,
            dispatchers: args.dispatchers,
            workers: args.workers,
            concurrency: args.concurrency,
        })
    } else {
        Target::Live {
            prefix: args.prefix.unwrap_or_else(|| config.prefix.clone()),
        }
    };
    let options = Options {
        shape: args.shape,
        jobs: args.jobs,
        rate: args.rate,
        target,
        confirm_window: args.window,
        poll_interval,
        poll_window: args.poll_window,
        max_poll_rate: args.poll_budget,
        timeout: Duration::from_secs(args.timeout_s),
        bare_messages: (!args.skip_bare).then_some(args.bare_messages),
        bare_queue_type: args.bare_queue_type,
        hold_workers: args.hold_workers,
        samples: args.samples,
        ..Options::default()
    };
    let report = conveyor::bench::run(&config, options).await?;
    if args.json {
        out!("{}", serde_json::to_string(&report)?)?;
    } else {
        out!("{}", report.to_text().trim_end_matches('\n'))?;
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    match s {
        "classic" => Ok(QueueType::Classic),
        "quorum" => Ok(QueueType::Quorum),
        _ => Err(format!("expected classic or quorum, got {s:?}")),
    }
}
