//! `conveyor list [--state S] [--limit N] [--json]`

use super::out::{note, out};
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
    /// With --state: look at no more than this many of the newest jobs
    /// for those in the state (a state few of millions of retained jobs
    /// are in would otherwise have every job read).
    #[arg(long, default_value_t = 100_000, requires = "state",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    look_at: usize,
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
    // Without --state every job looked at is listed: --limit bounds it.
    let look_at = if args.state.is_some() {
        args.look_at
    } else {
        usize::MAX
    };
    let listing = store
        .list_jobs_within(args.state, args.limit, look_at)
        .await?;
    if listing.cut_short {
        note!(
            "note: looked at about the newest {} jobs only, {} of them {}; older jobs were \
             not looked at (--look-at N looks further)",
            args.look_at,
            listing.jobs.len(),
            args.state.map_or("listed", |s| s.as_str()),
        );
    }
    let jobs = listing.jobs;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&jobs)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "{:<40} {:<10} {:>6} {:<20} CREATED",
        "ID",
        "STATE",
        "TASKS",
        "REQUESTOR"
    )?;
    for j in jobs {
        out!(
            "{:<40} {:<10} {:>6} {:<20} {}",
            j.id,
            j.state.as_str(),
            j.tasks,
            conveyor::text::one_line(&j.requestor),
            super::when::utc(j.created_ms)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
