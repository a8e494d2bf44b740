//! `conveyor list [--state S] [--limit N] [--json]`

use std::process::ExitCode;

use conveyor::config::Config;
use conveyor::model::JobState;
use conveyor::store::Store;

/// List options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only jobs in this state.
    #[arg(long, value_parser = parse_state)]
    state: Option<JobState>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse().map_err(|_| {
        let all: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        format!("expected one of {}", all.join(", "))
    })
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let store = super::store(&config).await?;
    let jobs = store.list_jobs(args.state, args.limit).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:<10} {:>6} {:<20} CREATED",
        "ID", "STATE", "TASKS", "REQUESTOR"
    );
    for j in jobs {
        println!(
            "{:<40} {:<10} {:>6} {:<20} {}",
            j.id,
            j.state.as_str(),
            j.tasks,
            conveyor::text::one_line(&j.requestor),
            super::when::utc(j.created_ms)
        );
    }
    Ok(ExitCode::SUCCESS)
}
