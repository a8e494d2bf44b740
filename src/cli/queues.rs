//! `conveyor queues [--json]`: depth and consumers of every Conveyor queue,
//! read from the broker. Task queues are found from the config, the set of
//! queues accepted jobs have named (`<prefix>:queues`, kept by the store at
//! job creation), and the worker registry: a queue with tasks waiting and no
//! worker reading it shows too. A queue RabbitMQ does not have is left out
//! of the table and named in a note on stderr (a misspelt `--queue`, or a
//! prefix nothing runs under), which says what declares it.

use super::out::{note, out};
use std::collections::BTreeSet;
use std::process::ExitCode;

use conveyor::broker::Broker;
use conveyor::config::Config;
use conveyor::names::Names;
use conveyor::store::Store;

/// Queues options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// More task queues to show (without prefix).
    #[arg(long, value_delimiter = ',')]
    queue: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let names = Names::new(&config.prefix);
    let mut task_queues: BTreeSet<String> = config.worker.queues.iter().cloned().collect();
    // Held to the rules a job's queue follows: a longer name would pass
    // AMQP's 255 bytes with the prefix, and the broker would drop the
    // connection on the malformed frame.
    let refused: Vec<String> = args
        .queue
        .iter()
        .filter(|q| !config.accepts_queue_name(q))
        .map(|q| format!("--queue {q:?}: must be {}", config.queue_name_rule()))
        .collect();
    if !refused.is_empty() {
        return Err(conveyor::config::ConfigError::Invalid { problems: refused }.into());
    }
    task_queues.extend(args.queue);
    match super::store(&config).await {
        Ok(store) => {
            // Every queue a job named, and every queue a live worker reads.
            match store.known_queues().await {
                Ok(known) => task_queues.extend(known),
                Err(e) => note!("warning: cannot read the known task queues from Redis: {e}"),
            }
            for w in store.workers().await.unwrap_or_default() {
                task_queues.extend(w.queues);
            }
        }
        Err(e) => {
            note!("warning: Redis unreachable ({e}); showing only the configured task queues")
        }
    }
    let mut queues = vec![
        names.submit_queue(),
        names.referred_queue(),
        names.dead_queue(),
    ];
    queues.extend(task_queues.iter().map(|q| names.task_queue(q)));
    let broker = super::broker(&config).await?;
    let stats = broker.queue_stats(&queues).await?;
    let absent: Vec<&str> = queues
        .iter()
        .filter(|q| !stats.iter().any(|s| &s.queue == *q))
        .map(String::as_str)
        .collect();
    if !absent.is_empty() {
        let which = if stats.is_empty() {
            "none of these queues"
        } else {
            "no queue"
        };
        note!(
            "note: RabbitMQ has {which} {}; a dispatcher or worker with prefix {:?} declares them (a task queue before its first task)",
            absent.join(", "),
            config.prefix
        );
    }
    if args.json {
        out!("{}", serde_json::to_string_pretty(&stats)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    out!("{:<48} {:>10} {:>10}", "QUEUE", "READY", "CONSUMERS")?;
    for s in stats {
        out!("{:<48} {:>10} {:>10}", s.queue, s.ready, s.consumers)?;
    }
    Ok(ExitCode::SUCCESS)
}
