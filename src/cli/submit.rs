//! `conveyor submit FILE [--wait]`: publishes the file to `<prefix>.submit`
//! through AMQP exactly as any client would, then follows the job in Redis.

use super::out::{note, out};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use conveyor::config::Config;
use conveyor::model::JobState;

use super::follow;

/// Submit options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A job file (JSON, schemas/job.schema.json).
    file: PathBuf,
    /// Wait until the job finishes and print its status; exit 1 unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 600, requires = "wait")]
    timeout_s: u64,
    /// Print the final status as JSON.
    #[arg(long, requires = "wait")]
    json: bool,
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let file = super::job_file::read(&args.file, &config)?;
    // Redis first when the job is to be followed: a store that cannot be
    // reached fails the command before anything is published (a retry of a
    // file with no id would otherwise submit the job again).
    let store = if args.wait {
        Some(super::store(&config).await?)
    } else {
        None
    };
    let mut stalls = follow::publish(&config, file.body).await?;
    // With `--json`, stdout holds the final status alone (the id is in
    // it), for a reader such as `jq`; the lines before it go to stderr.
    let say = |line: String| -> anyhow::Result<()> {
        if args.json {
            note!("{line}");
            Ok(())
        } else {
            out!("{line}")
        }
    };
    let id = match file.follow {
        Ok(id) => id,
        Err(why) => {
            say(format!("published, but {why}"))?;
            return Ok(ExitCode::FAILURE);
        }
    };
    say(id.clone())?;
    let Some(store) = store else {
        // Not waiting: the one chance to say that nothing will take the job.
        stalls.look(None, None).await;
        return Ok(ExitCode::SUCCESS);
    };
    let within = Duration::from_secs(args.timeout_s);
    let status = follow::until_finished(&store, Some(stalls), &id, within, |_, _| {}).await?;
    super::status::print(&status, args.json)?;
    Ok(if status.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
