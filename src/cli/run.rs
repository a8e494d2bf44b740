//! `conveyor run JOB.json`: run one job to completion in this process and
//! print its results; the exit code says whether it succeeded.
//!
//! Embedded by default (in-process broker and store, nothing to install);
//! with `--amqp-url`/`--redis-url` it submits to a real deployment instead,
//! exactly like `conveyor submit --wait`, and follows the job in Redis.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use conveyor::broker::{Broker, Outgoing};
use conveyor::config::Config;
use conveyor::embedded::{Embedded, EmbeddedOptions};
use conveyor::model::JobState;
use conveyor::names::Names;
use conveyor::store::Store;

use super::stalls::Stalls;
use super::when;

/// Run options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A job file (JSON, schemas/job.schema.json).
    file: PathBuf,
    /// Run against this RabbitMQ instead of in-process (needs --redis-url too).
    #[arg(long)]
    amqp_url: Option<String>,
    /// Run against this Redis instead of in-process (needs --amqp-url too).
    #[arg(long)]
    redis_url: Option<String>,
    /// Print the final status as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Embedded worker concurrency.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let file = super::job_file::read(&args.file, &config)?;
    let id = file
        .follow
        .map_err(|why| anyhow::anyhow!("cannot run {}: {why}", args.file.display()))?;
    let body = file.body;
    let deadline = Duration::from_secs(args.timeout_s);
    match (args.amqp_url, args.redis_url) {
        (None, None) => {
            eprintln!(
                "running {} in-process (embedded broker and store; production uses RabbitMQ and Redis)",
                args.file.display()
            );
            let embedded = Embedded::start(
                &config,
                conveyor_builtin_handlers::registry(),
                EmbeddedOptions {
                    concurrency: args.concurrency,
                    ..EmbeddedOptions::default()
                },
            )
            .await?;
            embedded.submit(body).await?;
            let result = follow(embedded.store(), None, &id, deadline, args.json).await;
            embedded.shutdown().await?;
            result
        }
        (Some(amqp), Some(redis)) => {
            config.amqp_url = amqp;
            config.redis_url = redis;
            let broker = Arc::new(super::broker(&config).await?);
            let names = Names::new(&config.prefix);
            broker.declare(&[]).await?;
            broker
                .publish(vec![Outgoing::durable(names.submit_queue(), body)])
                .await
                .context("publishing the job")?;
            let store = Arc::new(super::store(&config).await?);
            let stalls = Stalls::new(broker, names);
            follow(store, Some(stalls), &id, deadline, args.json).await
        }
        _ => {
            anyhow::bail!("--amqp-url and --redis-url go together (or neither, to run in-process)")
        }
    }
}

const FOLLOW_PAUSE_MIN: Duration = Duration::from_millis(20);
const FOLLOW_PAUSE_MAX: Duration = Duration::from_millis(250);

/// Print history as it happens until the job is terminal; then the result.
/// With `stalls` (a deployment), note queues the job waits in that nothing
/// consumes.
async fn follow(
    store: Arc<dyn Store>,
    mut stalls: Option<Stalls>,
    id: &str,
    within: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut seen = 0;
    // Each look reads the whole status: look often while the job moves,
    // less often (up to 4 times a second) while it does not, so a long
    // task of a big job is not re-read 50 times a second.
    let mut pause = FOLLOW_PAUSE_MIN;
    loop {
        let status = store.job(id).await?;
        if let Some(stalls) = stalls.as_mut() {
            stalls.look(status.as_ref()).await;
        }
        if let Some(status) = status {
            for h in status.history.iter().skip(seen) {
                // The transition's own time, as `status` shows it: the
                // moment this loop saw it would bunch a poll's worth
                // together.
                eprintln!(
                    "[{:>9}] {:<16} {:>10} -> {:<10} {}",
                    when::offset(h.at, status.created_ms),
                    h.task.as_deref().unwrap_or("(job)"),
                    h.from.as_deref().unwrap_or("-"),
                    h.to,
                    h.reason
                );
            }
            pause = if status.history.len() > seen {
                FOLLOW_PAUSE_MIN
            } else {
                (pause * 2).min(FOLLOW_PAUSE_MAX)
            };
            seen = status.history.len();
            if status.state.is_terminal() {
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    println!();
                    println!("job {} {}", status.id, status.state);
                    if let Some(e) = &status.error {
                        println!("error: {e}");
                    }
                    for (name, t) in &status.tasks {
                        match (&t.state, &t.error) {
                            (conveyor::model::TaskState::Succeeded, _) => {
                                println!("  {name}: {}", t.result)
                            }
                            (state, Some(e)) => println!("  {name}: {state}: {e}"),
                            (state, None) => println!("  {name}: {state}"),
                        }
                    }
                }
                return Ok(if status.state == JobState::Succeeded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
        }
        if started.elapsed() > within {
            anyhow::bail!("job {id} did not finish within {}s", within.as_secs());
        }
        tokio::time::sleep(pause).await;
    }
}
