//! `conveyor run JOB.json`: run one job to completion in this process and
//! print its results; the exit code says whether it succeeded.
//!
//! Embedded by default (in-process broker and store, nothing to install);
//! with `--amqp-url`/`--redis-url` it submits to a real deployment instead,
//! exactly like `conveyor submit --wait`, and follows the job in Redis.
//!
//! The embedded worker consumes the job's own task queues besides
//! `worker.queues`: a task on `gpu` would otherwise wait, unseen, for a
//! worker this process never starts. The flags are checked as the
//! configuration is (`Config::validate`), and refused as it is (exit 2).

use super::out::{note, out};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use conveyor::config::Config;
use conveyor::embedded::{Embedded, EmbeddedOptions};
use conveyor::model::{JobState, TaskState};
use conveyor::store::Store;
use conveyor::text::one_line;

use super::stalls::Stalls;
use super::{follow, status, when};

/// Run options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A job file (JSON, schemas/job.schema.json).
    file: PathBuf,
    /// Run against this RabbitMQ instead of in-process (needs --redis-url too).
    #[arg(long, requires = "redis_url")]
    amqp_url: Option<String>,
    /// Run against this Redis instead of in-process (needs --amqp-url too).
    #[arg(long, requires = "amqp_url")]
    redis_url: Option<String>,
    /// Print the final status as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Embedded worker concurrency [default: `worker.concurrency` of the
    /// configuration, 16 unless set]; in-process only.
    #[arg(long, conflicts_with_all = ["amqp_url", "redis_url"])]
    concurrency: Option<usize>,
}

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    let file = super::job_file::read(&args.file, &config)?;
    let id = file
        .follow
        .map_err(|e| anyhow::anyhow!("cannot run {}: {}", args.file.display(), e.why))?;
    let body = file.body;
    let within = Duration::from_secs(args.timeout_s);
    match (args.amqp_url, args.redis_url) {
        (None, None) => {
            if let Some(concurrency) = args.concurrency {
                config.worker.concurrency = concurrency;
            }
            for queue in job_queues(&body, &config) {
                if !config.worker.queues.contains(&queue) {
                    config.worker.queues.push(queue);
                }
            }
            config.validate()?;
            note!(
                "running {} in-process (embedded broker and store; production uses RabbitMQ and Redis)",
                args.file.display()
            );
            let embedded = Embedded::start(
                &config,
                conveyor_builtin_handlers::registry(),
                EmbeddedOptions {
                    concurrency: config.worker.concurrency,
                    ..EmbeddedOptions::default()
                },
            )
            .await?;
            embedded.submit(body).await?;
            let result =
                show_until_finished(&*embedded.store(), None, &id, within, args.json).await;
            // Not the workers' grace period: a job given up on at the
            // time-out would hold the command for it (30 s by default).
            let stopped = embedded.shutdown_now().await;
            // The job's outcome (or the time-out) first: it decides the
            // exit code.
            let code = result?;
            stopped?;
            Ok(code)
        }
        (Some(amqp), Some(redis)) => {
            config.amqp_url = amqp;
            config.redis_url = redis;
            // Checked as if they came from the file: a URL the parser
            // refuses is named here (redacted), not by the connect.
            config.validate()?;
            // Redis first: one that cannot be reached fails the command
            // before the job is published.
            let store = super::store(&config).await?;
            let stalls = follow::publish(&config, body).await?;
            show_until_finished(&store, Some(stalls), &id, within, args.json).await
        }
        _ => {
            anyhow::bail!("--amqp-url and --redis-url go together (or neither, to run in-process)")
        }
    }
}

/// The task queues the job in `body` names (`default` for a task that
/// names none), each once, in the order of its tasks: what an embedded
/// worker must consume for the job to run. Left out: names a job may not
/// use, and every queue of a job naming more than
/// `limits.max_queues_per_job` (intake rejects such a job, saying why, so
/// nothing of it waits).
fn job_queues(body: &[u8], config: &Config) -> Vec<String> {
    let Ok(job) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let Some(tasks) = job.get("tasks").and_then(serde_json::Value::as_array) else {
        return Vec::new();
    };
    let mut queues: Vec<String> = Vec::new();
    for task in tasks {
        let queue = match task.get("queue") {
            None => "default",
            Some(queue) => match queue.as_str() {
                Some(queue) => queue,
                None => continue,
            },
        };
        if config.accepts_queue_name(queue) && !queues.iter().any(|q| q == queue) {
            queues.push(queue.to_owned());
            if queues.len() > config.limits.max_queues_per_job {
                return Vec::new();
            }
        }
    }
    queues
}

/// Print each transition as it happens (on stderr, stdout being the
/// result's) until the job is finished; then its result.
async fn show_until_finished(
    store: &dyn Store,
    stalls: Option<Stalls>,
    id: &str,
    within: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let status = follow::until_finished(store, stalls, id, within, |status, seen| {
        for h in status.history.iter().skip(seen) {
            // The transition's own time, as `status` shows it: the moment
            // a read saw it would bunch a poll's worth together.
            note!(
                "[{:>9}] {}",
                when::offset(h.at, status.created_ms),
                status::transition(h)
            );
        }
    })
    .await?;
    if json {
        out!("{}", serde_json::to_string_pretty(&status)?)?;
    } else {
        out!()?;
        out!("job {} {}", status.id, status.state)?;
        // A task's error may end with its program's stderr: its control
        // characters are shown, not sent to the terminal.
        if let Some(e) = &status.error {
            out!("error: {}", one_line(e))?;
        }
        for (name, t) in &status.tasks {
            match (&t.state, &t.error) {
                (TaskState::Succeeded, _) => out!("  {name}: {}", t.result),
                (state, Some(e)) => out!("  {name}: {state}: {}", one_line(e)),
                (state, None) => out!("  {name}: {state}"),
            }?;
        }
    }
    Ok(if status.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queues_of(job: serde_json::Value, config: &Config) -> Vec<String> {
        job_queues(&serde_json::to_vec(&job).unwrap(), config)
    }

    #[test]
    fn a_jobs_queues_are_each_named_once_in_task_order_with_default_for_none() {
        let job = json!({"requestor": "r", "tasks": [
            {"name": "a", "handler": "noop", "queue": "gpu"},
            {"name": "b", "handler": "noop"},
            {"name": "c", "handler": "noop", "queue": "gpu"},
            {"name": "d", "handler": "noop", "queue": "io"}]});
        assert_eq!(queues_of(job, &Config::default()), ["gpu", "default", "io"]);
    }

    #[test]
    fn queues_intake_would_refuse_are_left_to_its_rejection() {
        let job = json!({"requestor": "r", "tasks": [
            {"name": "a", "handler": "noop", "queue": "has space"},
            {"name": "b", "handler": "noop", "queue": 7},
            {"name": "c", "handler": "noop", "queue": "ok"}]});
        assert_eq!(queues_of(job, &Config::default()), ["ok"]);
        let mut config = Config::default();
        config.limits.max_queues_per_job = 2;
        let job = json!({"requestor": "r", "tasks": [
            {"name": "a", "handler": "noop", "queue": "q1"},
            {"name": "b", "handler": "noop", "queue": "q2"},
            {"name": "c", "handler": "noop", "queue": "q3"}]});
        assert!(queues_of(job, &config).is_empty());
        assert!(job_queues(b"not json", &config).is_empty());
    }
}
