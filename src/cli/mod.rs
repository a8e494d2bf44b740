//! One file per subcommand, as the file list is the map of what the binary
//! does. `anyhow` lives here, at the edge, and nowhere in the library.

mod bench;
mod dev;
mod dispatcher;
mod follow;
mod job_file;
mod list;
mod out;
mod queues;
mod run;
mod stalls;
mod status;
mod submit;
mod when;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use conveyor::config::Config;
use out::note;

/// Conveyor: jobs over RabbitMQ, state in Redis.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, about)]
pub struct Cli {
    /// TOML configuration file; `CONVEYOR_*` environment variables override it.
    #[arg(long, global = true, env = "CONVEYOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate submissions, record jobs, publish ready tasks, sweep.
    Dispatcher(dispatcher::Args),
    /// Run tasks from queues through the built-in handlers.
    Worker(worker::Args),
    /// Publish a job file to the submit queue, like any client.
    Submit(submit::Args),
    /// Show a job's state, tasks and history.
    Status(status::Args),
    /// List recent jobs.
    List(list::Args),
    /// Show depth and consumers of Conveyor's queues.
    Queues(queues::Args),
    /// Measure throughput and latency against the bare broker.
    Bench(bench::Args),
    /// Run one job file to completion in this process (or against a deployment).
    Run(run::Args),
    /// A development server: everything in one process, nothing to install.
    Dev(dev::Args),
}

/// Parse arguments, load config, run the command; map errors to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            note!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // One-shot commands print results; their logs are for trouble only,
    // and not lapin's: every broker error reaches the command's own error
    // message, and `queues` asking for a queue that does not exist closes
    // a channel, which lapin logs as an error (RUST_LOG overrides this).
    let level = match cli.command {
        Command::Dispatcher(_) | Command::Worker(_) | Command::Dev(_) => "info",
        _ => "warn,lapin=off",
    };
    conveyor::telemetry::init(config.log_format, level);
    let threads = config.runtime_threads;
    let result = conveyor::runtime::block_on(threads, async move {
        match cli.command {
            Command::Dispatcher(args) => dispatcher::run(config, args).await,
            Command::Worker(args) => worker::run(config, args).await,
            Command::Submit(args) => submit::run(config, args).await,
            Command::Status(args) => status::run(config, args).await,
            Command::List(args) => list::run(config, args).await,
            Command::Queues(args) => queues::run(config, args).await,
            Command::Bench(args) => bench::run(config, args).await,
            Command::Run(args) => run::run(config, args).await,
            Command::Dev(args) => dev::run(config, args).await,
        }
    });
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) if out::is_closed_pipe(&e) => ExitCode::from(out::CLOSED_PIPE_EXIT),
        Ok(Err(e)) => {
            note!("error: {e:#}");
            // A configuration the flags made invalid exits as one the file
            // or the environment made invalid.
            if e.downcast_ref::<conveyor::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else if e.downcast_ref::<follow::NotFinished>().is_some() {
                ExitCode::from(follow::NotFinished::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            note!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connect the store for a one-shot command, which only reads: a Redis
/// user allowed `+@read` alone can run it. An outage says how to start
/// Redis; anything else (an unusable `tls_ca_file`, refused credentials)
/// says only what is wrong, since waiting or starting Redis will not mend
/// it.
async fn store(config: &Config) -> anyhow::Result<conveyor::store::redis::RedisStore> {
    conveyor::runtime::redis_store_read_only(config, "cli")
        .await
        .map_err(|e| {
            let url = conveyor::config::redact_url(&config.redis_url);
            // An ACL refusal waits for an operator like an outage (the
            // services keep their messages through it), but no starting
            // of Redis mends it.
            if matches!(e, conveyor::store::StoreError::NotAllowed(_)) {
                anyhow::anyhow!(
                    "Redis at {url} refused a command to this user: {e}; the reading \
                     commands need `+@read` (and `+@connection`) on the prefix's keys"
                )
            } else if e.is_retryable() {
                anyhow::anyhow!(
                    "cannot reach Redis at {url}: {e}; {}",
                    conveyor::runtime::START_HINT
                )
            } else {
                anyhow::anyhow!("Redis at {url}: {e}")
            }
        })
}

/// Connect the broker for a one-shot command (errors as for [`store`]).
async fn broker(config: &Config) -> anyhow::Result<conveyor::broker::amqp::AmqpBroker> {
    conveyor::runtime::amqp_broker(config).await.map_err(|e| {
        let url = conveyor::config::redact_url(&config.amqp_url);
        if e.is_retryable() {
            anyhow::anyhow!(
                "cannot reach RabbitMQ at {url}: {e}; {}",
                conveyor::runtime::START_HINT
            )
        } else {
            anyhow::anyhow!("RabbitMQ at {url}: {e}")
        }
    })
}
