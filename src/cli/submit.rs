//! `conveyor submit FILE [--wait]`: publishes the file to `<prefix>.submit`
//! through AMQP exactly as any client would, then follows the job in Redis.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use conveyor::broker::{Broker, Outgoing};
use conveyor::config::Config;
use conveyor::model::JobState;
use conveyor::names::Names;
use conveyor::store::Store;
use serde_json::Value;

/// Submit options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A job file (JSON, schemas/job.schema.json).
    file: PathBuf,
    /// Wait until the job finishes and print its status; exit 1 unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print the final status as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let text = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    // Give the job an id if the file has none, so it can be followed.
    let mut body = text.clone();
    let mut id = None;
    if let Ok(Value::Object(mut job)) = serde_json::from_slice::<Value>(&text) {
        match job.get("id").and_then(Value::as_str) {
            Some(existing) => id = Some(existing.to_owned()),
            None => {
                let new = conveyor::intake::new_job_id();
                job.insert("id".into(), Value::String(new.clone()));
                id = Some(new);
                body = serde_json::to_vec(&job)?;
            }
        }
    }
    let broker = super::broker(&config).await?;
    let names = Names::new(&config.prefix);
    broker.declare(&[]).await?;
    broker
        .publish(vec![Outgoing::durable(names.submit_queue(), body)])
        .await
        .context("publishing the job")?;
    let Some(id) = id else {
        println!(
            "published; the file is not a JSON object, so it will be dead-lettered to {}",
            names.dead_queue()
        );
        return Ok(ExitCode::FAILURE);
    };
    println!("{id}");
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let store = super::store(&config).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    loop {
        if let Some(status) = store.job(&id).await?
            && status.state.is_terminal()
        {
            super::status::print(&status, args.json)?;
            return Ok(if status.state == JobState::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "job {id} did not finish within {}s (is a dispatcher and a worker running?)",
                args.timeout_s
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
