//! `conveyor submit FILE [--wait]`: publishes the file to `<prefix>.submit`
//! through AMQP exactly as any client would, then follows the job in Redis.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use conveyor::broker::{Broker, Outgoing};
use conveyor::config::Config;
use conveyor::model::JobState;
use conveyor::names::Names;
use conveyor::store::Store;

use super::stalls::Stalls;

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
    let file = super::job_file::read(&args.file, &config)?;
    let broker = Arc::new(super::broker(&config).await?);
    let names = Names::new(&config.prefix);
    broker.declare(&[]).await?;
    broker
        .publish(vec![Outgoing::durable(names.submit_queue(), file.body)])
        .await
        .context("publishing the job")?;
    let id = match file.follow {
        Ok(id) => id,
        Err(why) => {
            println!("published, but {why}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("{id}");
    let mut stalls = Stalls::new(broker, names);
    stalls.look(None).await;
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let store = super::store(&config).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    loop {
        let status = store.job(&id).await?;
        stalls.look(status.as_ref()).await;
        if let Some(status) = status
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
