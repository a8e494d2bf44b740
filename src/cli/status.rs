//! `conveyor status JOB_ID [--json]`

use super::out::{note, out};
use std::process::ExitCode;

use conveyor::config::Config;
use conveyor::store::{HistoryEntry, JobStatus, Store};
use conveyor::text::one_line;

use super::when;

/// Status options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The job's id.
    id: String,
    /// Print JSON (schemas/status.schema.json).
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let store = super::store(&config).await?;
    match store.job(&args.id).await? {
        Some(status) => {
            print(&status, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            note!(
                "no job {:?} (unknown, or expired after the retention period)",
                args.id
            );
            Ok(ExitCode::from(3))
        }
    }
}

/// Print a status as JSON or as a readable table.
pub fn print(status: &JobStatus, json: bool) -> anyhow::Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(status)?)?;
        return Ok(());
    }
    out!(
        "job {}  state {}  version {}  requestor {}",
        status.id,
        status.state,
        status.version,
        one_line(&status.requestor)
    )?;
    out!(
        "created {}  updated {} ({})",
        when::utc(status.created_ms),
        when::utc(status.updated_ms),
        when::offset(status.updated_ms, status.created_ms)
    )?;
    if !status.labels.is_empty() {
        let labels: Vec<String> = status
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", one_line(k), one_line(v)))
            .collect();
        out!("labels {}", labels.join(" "))?;
    }
    if let Some(e) = &status.error {
        out!("error {}", one_line(e))?;
    }
    out!()?;
    out!(
        "{:<24} {:<10} {:>8}  {:<24} RESULT / ERROR",
        "TASK",
        "STATE",
        "ATTEMPTS",
        "WORKER"
    )?;
    for (name, t) in &status.tasks {
        let detail = match (&t.error, &t.result) {
            (Some(e), _) if t.state != conveyor::model::TaskState::Succeeded => e.clone(),
            (_, r) if !r.is_null() => r.to_string(),
            _ => String::new(),
        };
        let mut detail: String = one_line(&detail).chars().take(80).collect();
        if let Some(due) = t.next_attempt_at_ms {
            detail = format!("next attempt at {}; {detail}", when::utc(due));
        }
        out!(
            "{:<24} {:<10} {:>8}  {:<24} {}",
            name,
            t.state.as_str(),
            format!("{}/{}", t.attempts, t.max_attempts),
            one_line(t.worker.as_deref().unwrap_or("-")),
            detail
        )?;
    }
    out!()?;
    out!("history (time since created):")?;
    for h in &status.history {
        out!(
            "  {:>10}  {}",
            when::offset(h.at, status.created_ms),
            transition(h)
        )?;
    }
    Ok(())
}

/// One history entry without its time: task, from, to and reason in
/// columns (the job's own entries name no task).
pub fn transition(h: &HistoryEntry) -> String {
    format!(
        "{:<16} {:>10} -> {:<10} {}",
        h.task.as_deref().unwrap_or("(job)"),
        h.from.as_deref().unwrap_or("-"),
        h.to,
        one_line(&h.reason)
    )
}
