//! `conveyor queues [--json]`: depth and consumers of every Conveyor queue,
//! read from the broker (task queues found from the config and the worker
//! registry).

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
    task_queues.extend(args.queue);
    if let Ok(store) = super::store(&config).await {
        for w in store.workers().await.unwrap_or_default() {
            task_queues.extend(w.queues);
        }
    }
    let mut queues = vec![names.submit_queue(), names.dead_queue()];
    queues.extend(task_queues.iter().map(|q| names.task_queue(q)));
    let broker = super::broker(&config).await?;
    let stats = broker.queue_stats(&queues).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<48} {:>10} {:>10}", "QUEUE", "READY", "CONSUMERS");
    for s in stats {
        println!("{:<48} {:>10} {:>10}", s.queue, s.ready, s.consumers);
    }
    Ok(ExitCode::SUCCESS)
}
