//! `conveyor bench`: a load generator and a yardstick.
//!
//! One invocation does three things:
//! 1. the *bare broker loop* ([`bare`]): persistent ~100-byte messages
//!    published with pipelined confirms to a scratch durable queue
//!    `<prefix>.bench.bare.<run>` (classic by default), consumed concurrently with prefetch 200 and one
//!    manual ack per message. Its msgs/s is what this machine's RabbitMQ can
//!    do at best, so Conveyor's figures are also given as a ratio of it and
//!    stay comparable across noisy machines. With an offered rate
//!    (`--rate`) it is replaced by the *bare hop* ([`bare::hop_latency`]):
//!    messages at the same rate through one queue of the deployment's type,
//!    timed from publish to delivery, the floor of each of Conveyor's hops;
//! 2. the *load* ([`load`]): N jobs of one [`Shape`] published to
//!    `<prefix>.submit` exactly as a client does (persistent JSON, ids
//!    `b-<run>-<i>`, a window of unconfirmed publishes), at a fixed rate or as
//!    fast as possible, while their state is watched in Redis;
//! 3. the *deployment*: either a live one (its prefix), or one started here
//!    ([`spawn`]): dispatcher and worker processes of the current executable
//!    under a fresh prefix `bench-<run>` (the user's config, but jobs kept
//!    at least [`SPAWNED_MIN_RETENTION_S`]), whose peak resident memory
//!    (`VmHWM`) is read before they are stopped, and whose queues and keys
//!    are deleted afterwards.
//!
//! With `hold_workers` (`--hold-workers`, spawn mode only) the workers are
//! started only after all N jobs were *accepted* by the dispatcher
//! (recorded in Redis, their root tasks in the task queue) and the
//! processes' memory was sampled: the dispatcher's memory with N jobs in
//! flight, rather than with N jobs waiting in `<prefix>.submit`. Then the
//! workers drain them and the run is reported as usual, plus the sample
//! ([`report::Hold`]).
//!
//! How latency is measured (and its error) is described in [`load`]; the
//! figures are put together in [`report`].
//!
//! **No wait on RabbitMQ is unbounded.** A broker in a resource alarm
//! (memory or disk) stops reading from publishing connections: a publish
//! or its confirm is then never answered, and neither may a passive
//! declare. Every such wait gives up after the run's time-out
//! (`--timeout-s`: the same "nothing moved for this long" the watcher
//! applies to unfinished jobs) with an error naming the wait
//! ([`broker_within`]), instead of hanging the bench for ever.
//!
//! **What cannot work is refused before anything starts:** a job of the
//! chosen shape over the deployment's `limits.max_tasks` or over its
//! `max_message_bytes` (it would be dead-lettered at intake, and the bench
//! would wait its whole time-out for jobs that never exist).

pub mod bare;
pub mod load;
pub mod report;
pub mod spawn;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::config::{Config, QueueType};
use crate::names::Names;

pub use report::Report;

/// The shape of every job of a run; all tasks use the `noop` handler on
/// the `default` queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One task.
    Single,
    /// N tasks, each after the previous one.
    Chain(usize),
    /// One root, K children after it, one join after all K (K + 2 tasks).
    Fanout(usize),
}

impl Shape {
    /// Tasks in one job of this shape.
    pub fn tasks(self) -> usize {
        match self {
            Shape::Single => 1,
            Shape::Chain(n) => n,
            Shape::Fanout(k) => k + 2,
        }
    }

    /// The `tasks` array of a job of this shape, as JSON text.
    pub fn tasks_json(self) -> String {
        match self {
            Shape::Single => r#"[{"name":"t","handler":"noop"}]"#.to_owned(),
            Shape::Chain(n) => {
                let mut out = String::from("[");
                for i in 0..n {
                    if i > 0 {
                        out.push(',');
                    }
                    if i == 0 {
                        out.push_str(r#"{"name":"t0","handler":"noop"}"#);
                    } else {
                        out.push_str(&format!(
                            r#"{{"name":"t{i}","handler":"noop","after":["t{}"]}}"#,
                            i - 1
                        ));
                    }
                }
                out.push(']');
                out
            }
            Shape::Fanout(k) => {
                let mut out = String::from(r#"[{"name":"root","handler":"noop"}"#);
                for i in 0..k {
                    out.push_str(&format!(
                        r#",{{"name":"c{i}","handler":"noop","after":["root"]}}"#
                    ));
                }
                out.push_str(r#",{"name":"join","handler":"noop","after":["#);
                for i in 0..k {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&format!(r#""c{i}""#));
                }
                out.push_str("]}]");
                out
            }
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Single => write!(f, "single"),
            Shape::Chain(n) => write!(f, "chain:{n}"),
            Shape::Fanout(k) => write!(f, "fanout:{k}"),
        }
    }
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Shape, String> {
        let count = |what: &str, n: &str| -> Result<usize, String> {
            match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("{what}:N needs a whole number N >= 1, got {n:?}")),
            }
        };
        match s.split_once(':') {
            None if s == "single" => Ok(Shape::Single),
            Some(("chain", n)) => Ok(Shape::Chain(count("chain", n)?)),
            Some(("fanout", k)) => Ok(Shape::Fanout(count("fanout", k)?)),
            _ => Err(format!(
                "unknown shape {s:?}: expected single, chain:N or fanout:K"
            )),
        }
    }
}

/// Which deployment the load goes to.
#[derive(Debug, Clone)]
pub enum Target {
    /// A running deployment under this prefix (nothing is started, and
    /// its jobs are left to their retention).
    Live {
        /// The deployment's prefix.
        prefix: String,
    },
    /// Start dispatchers and workers as child processes under a fresh
    /// prefix `bench-<run>`; stop them and delete everything afterwards.
    Spawn(SpawnOptions),
}

/// What to start in spawn mode.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The `conveyor` executable (normally `std::env::current_exe()`).
    pub exe: PathBuf,
    /// Dispatcher processes.
    pub dispatchers: usize,
    /// Worker processes.
    pub workers: usize,
    /// Concurrency of each worker.
    pub concurrency: usize,
}

/// Everything a run needs besides the [`Config`] (URLs, queue type, limits).
#[derive(Debug, Clone)]
pub struct Options {
    /// Shape of every job.
    pub shape: Shape,
    /// Jobs to publish.
    pub jobs: usize,
    /// Offered rate in jobs/s; `None` publishes as fast as confirms allow.
    pub rate: Option<f64>,
    /// Live deployment or spawned processes.
    pub target: Target,
    /// Most unconfirmed publishes outstanding (job load and bare loop).
    pub confirm_window: usize,
    /// Pause between polls of Redis for finished jobs (when few are
    /// outstanding; see `max_poll_rate`).
    pub poll_interval: Duration,
    /// Outstanding jobs asked about per poll, oldest first.
    pub poll_window: usize,
    /// Most `HGET`s per second the watcher sends, so that watching does not
    /// load Redis noticeably: with many jobs outstanding the pause between
    /// polls grows to `poll_window / max_poll_rate`.
    pub max_poll_rate: f64,
    /// Give up on unfinished jobs after this long.
    pub timeout: Duration,
    /// Messages of the bare broker loop; `None` skips it.
    pub bare_messages: Option<usize>,
    /// Body size of a bare-loop message.
    pub bare_message_bytes: usize,
    /// Queue type of the bare loop's scratch queue.
    pub bare_queue_type: QueueType,
    /// Spawn mode: start the workers only once every job is accepted, and
    /// sample memory then.
    pub hold_workers: bool,
    /// Write one CSV row per job (publish, create and finish times) here.
    pub samples: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shape: Shape::Single,
            jobs: 10_000,
            rate: None,
            target: Target::Live {
                prefix: "conveyor".into(),
            },
            confirm_window: 1000,
            poll_interval: Duration::from_micros(500),
            poll_window: 512,
            max_poll_rate: 25_000.0,
            timeout: Duration::from_secs(300),
            bare_messages: Some(50_000),
            bare_message_bytes: 100,
            bare_queue_type: QueueType::Classic,
            hold_workers: false,
            samples: None,
        }
    }
}

/// Why a run could not be made or finished.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options make no sense.
    #[error("invalid options: {0}")]
    Options(String),
    /// RabbitMQ failed or could not be reached.
    #[error("RabbitMQ: {0}")]
    Broker(String),
    /// Redis failed or could not be reached.
    #[error("Redis: {0}")]
    Store(String),
    /// Starting, watching or stopping the spawned processes failed.
    #[error("spawned deployment: {0}")]
    Process(String),
    /// Interrupted (Ctrl-C, SIGTERM, SIGHUP); everything started was cleaned up.
    #[error("interrupted")]
    Interrupted,
}

fn broker_err(what: &str) -> impl Fn(lapin::Error) -> BenchError + '_ {
    move |e| BenchError::Broker(format!("{what}: {e}"))
}

/// A raw AMQP connection for the bench (see `tool_connection`).
async fn amqp_connection(config: &Config, what: &str) -> Result<lapin::Connection, BenchError> {
    crate::broker::amqp::tool_connection(config)
        .await
        .map_err(|e| BenchError::Broker(format!("{what}: {e}")))
}

/// `operation` (a wait on RabbitMQ), given up after `within` with an error
/// naming `what` and the likeliest cause: a broker that stopped answering
/// (a memory or disk alarm blocks publishing connections) would otherwise
/// hang the bench for ever.
pub async fn broker_within<T>(
    within: Duration,
    what: &str,
    operation: impl Future<Output = T>,
) -> Result<T, BenchError> {
    tokio::time::timeout(within, operation).await.map_err(|_| {
        BenchError::Broker(format!(
            "{what}: no answer within {within:?} (the run's time-out); \
             is RabbitMQ in a resource alarm? (`rabbitmqctl status`, section alarms)"
        ))
    })
}

fn store_err(what: &str) -> impl Fn(redis::RedisError) -> BenchError + '_ {
    move |e| BenchError::Store(format!("{what}: {e}"))
}

/// A fresh run id: 8 hex digits.
pub fn new_run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The bare loop's scratch queue of run `run_id` under `prefix`: one per
/// run, so that two benches against one deployment at once do not delete
/// (and fill) each other's.
pub fn bare_queue(prefix: &str, run_id: &str) -> String {
    format!("{prefix}.bench.bare.{run_id}")
}

/// Most unconfirmed publishes `--window` allows: far past what any broker
/// pipelines usefully, and each slot is allocated up front.
pub const MAX_CONFIRM_WINDOW: usize = 1_000_000;

/// Most jobs `--poll-window` asks about per poll (one Redis pipeline).
pub const MAX_POLL_WINDOW: usize = 100_000;

/// Smallest `--rate` (jobs/s): one job a minute.
pub const MIN_RATE: f64 = 1.0 / 60.0;

/// Run the bare loop and the load against the chosen deployment; clean up
/// what was started (also on errors and Ctrl-C) and report.
pub async fn run(config: &Config, options: Options) -> Result<Report, BenchError> {
    if options.jobs == 0 {
        return Err(BenchError::Options("--jobs must be at least 1".into()));
    }
    // Below one job a minute, the gaps between publishes (and the bare
    // hop's) would be hours; far below, more than a Duration holds.
    if let Some(rate) = options.rate
        && !(rate.is_finite() && rate >= MIN_RATE)
    {
        return Err(BenchError::Options(format!(
            "--rate must be a number of jobs/s of at least {MIN_RATE:.4} (one job a minute), got {rate}"
        )));
    }
    if options.timeout < Duration::from_secs(1) {
        return Err(BenchError::Options("--timeout-s must be at least 1".into()));
    }
    if options.confirm_window == 0 || options.poll_window == 0 {
        return Err(BenchError::Options(
            "--window and --poll-window must be at least 1".into(),
        ));
    }
    if options.confirm_window > MAX_CONFIRM_WINDOW {
        return Err(BenchError::Options(format!(
            "--window is at most {MAX_CONFIRM_WINDOW}, got {}",
            options.confirm_window
        )));
    }
    if options.poll_window > MAX_POLL_WINDOW {
        return Err(BenchError::Options(format!(
            "--poll-window is at most {MAX_POLL_WINDOW}, got {}",
            options.poll_window
        )));
    }
    // Found unwritable before the run, not after it (with its report);
    // opened without truncating, so a run refused later keeps an earlier
    // run's file as it was.
    if let Some(path) = &options.samples {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| BenchError::Options(format!("--samples {}: {e}", path.display())))?;
    }
    if options.shape.tasks() > config.limits.max_tasks {
        return Err(BenchError::Options(format!(
            "shape {} has {} tasks; the limit (limits.max_tasks) is {}",
            options.shape,
            options.shape.tasks(),
            config.limits.max_tasks
        )));
    }
    let run_id = new_run_id();
    check_job_size(config, &options, &run_id)?;
    if options.hold_workers && !matches!(options.target, Target::Spawn(_)) {
        return Err(BenchError::Options(
            "--hold-workers needs --spawn (the bench must start the workers)".into(),
        ));
    }
    let prefix = match &options.target {
        Target::Live { prefix } => prefix.clone(),
        Target::Spawn(_) => format!("bench-{run_id}"),
    };
    let mut deployment_config = config.clone();
    deployment_config.prefix = prefix.clone();
    // The bench's own probe address is not its children's: each would bind
    // it, and all but the first exit at start-up.
    deployment_config.http_addr = None;

    let work = run_inner(&deployment_config, &options, &run_id);
    tokio::select! {
        result = work => result,
        _ = crate::shutdown::stop_signal(true) => {
            // `run_inner` was dropped mid-way: its children die with it
            // (kill_on_drop); delete what they left.
            if matches!(options.target, Target::Spawn(_)) {
                spawn::cleanup(&deployment_config, &run_id, true).await;
            } else {
                crate::purge::delete_queues(&deployment_config, &[bare_queue(&prefix, &run_id)])
                    .await;
            }
            Err(BenchError::Interrupted)
        }
    }
}

/// The largest job of the run (the last one: the longest id) must fit the
/// deployment's `max_message_bytes`: intake dead-letters a larger body
/// unread, so no job would ever be recorded and the bench would wait out
/// its time-out for nothing.
fn check_job_size(config: &Config, options: &Options, run_id: &str) -> Result<(), BenchError> {
    let last_id = format!("b-{run_id}-{}", options.jobs.saturating_sub(1));
    let bytes = load::job_body(&last_id, run_id, &options.shape.tasks_json()).len();
    if bytes > config.max_message_bytes {
        return Err(BenchError::Options(format!(
            "a job of shape {} is {bytes} bytes; the limit (max_message_bytes) is {}: \
             intake would dead-letter every one",
            options.shape, config.max_message_bytes
        )));
    }
    Ok(())
}

/// Least `retention_s` of a spawned deployment: a job's keys must outlive
/// the run, or a job finished early expires before the bench reads its
/// timestamps (and its memory leaves the Redis figure). The bench deletes
/// the keys itself when it is done, so a long retention costs nothing.
pub const SPAWNED_MIN_RETENTION_S: u64 = 3600;

/// The config the spawned processes run with: the user's (URLs, queue
/// type, limits), with the bench's queue and concurrency, and a retention
/// of at least [`SPAWNED_MIN_RETENTION_S`].
fn spawned_config(config: &Config, spawn_options: &SpawnOptions) -> Config {
    let mut spawned = config.clone();
    spawned.worker.queues = vec!["default".into()];
    spawned.worker.concurrency = spawn_options.concurrency;
    spawned.retention_s = spawned.retention_s.max(SPAWNED_MIN_RETENTION_S);
    spawned
}

async fn run_inner(config: &Config, options: &Options, run_id: &str) -> Result<Report, BenchError> {
    let names = Names::new(&config.prefix);
    let scratch = bare_queue(&config.prefix, run_id);
    let yardstick = match (options.bare_messages, options.rate) {
        // At an offered rate the yardstick is a hop's latency at that
        // rate, through a queue of the deployment's own type.
        (Some(n), Some(rate)) if n > 0 => {
            let load = bare::BareLoad {
                queue_type: config.queue_type,
                messages: n.min(options.jobs.max(1)),
                message_bytes: options.bare_message_bytes,
                confirm_window: options.confirm_window,
                timeout: options.timeout,
            };
            let result = bare::hop_latency(config, &scratch, load, rate).await;
            crate::purge::delete_queues(config, std::slice::from_ref(&scratch)).await;
            Some(bare::Yardstick::Hop(result?))
        }
        (Some(n), None) if n > 0 => {
            let load = bare::BareLoad {
                queue_type: options.bare_queue_type,
                messages: n,
                message_bytes: options.bare_message_bytes,
                confirm_window: options.confirm_window,
                timeout: options.timeout,
            };
            let result = bare::run(config, &scratch, load).await;
            // The scratch queue goes, whatever happened.
            crate::purge::delete_queues(config, std::slice::from_ref(&scratch)).await;
            Some(bare::Yardstick::Throughput(result?))
        }
        _ => None,
    };

    match &options.target {
        Target::Live { .. } => {
            spawn::check_live(config, &names, &config.worker.queues, options.timeout).await?;
            let load = load::run(config, options, run_id).await?;
            let unwritten = write_samples(options, &load);
            let mut report = report::build(config, options, run_id, load, yardstick, None, None);
            report.errors.extend(unwritten);
            Ok(report)
        }
        Target::Spawn(spawn_options) => {
            let deployment_config = spawned_config(config, spawn_options);
            let mut deployment = match spawn::Deployment::start(
                &deployment_config,
                spawn_options,
                run_id,
                !options.hold_workers,
            )
            .await
            {
                Ok(d) => d,
                Err(e) => {
                    spawn::cleanup(&deployment_config, run_id, true).await;
                    return Err(e);
                }
            };
            let result = async {
                deployment.wait_ready(&deployment_config).await?;
                if !options.hold_workers {
                    let load = load::run(&deployment_config, options, run_id).await?;
                    return Ok((load, None));
                }
                let mut started = load::start(&deployment_config, options, run_id).await?;
                let sample = started.hold(&deployment_config, options.timeout).await?;
                let memory = deployment.memory();
                deployment.start_workers()?;
                let workers_started = std::time::Instant::now();
                let workers_started_unix_us = load::unix_us();
                deployment.wait_ready(&deployment_config).await?;
                let load = started.finish(options).await?;
                Ok((
                    load,
                    Some(report::HoldInput {
                        sample,
                        memory,
                        workers_started,
                        workers_started_unix_us,
                    }),
                ))
            }
            .await;
            let memory = deployment.memory();
            let stopped = deployment.stop(result.is_err()).await;
            spawn::cleanup(&deployment_config, run_id, true).await;
            let (load, hold) = result?;
            let unwritten = write_samples(options, &load);
            let processes = report::Processes {
                dispatchers: spawn_options.dispatchers,
                workers: spawn_options.workers,
                concurrency: spawn_options.concurrency,
                workers_take_submissions: deployment_config.worker.accept_submissions,
                memory,
                exits: stopped.exits,
                logs_dir: stopped.logs_dir,
            };
            let mut report = report::build(
                &deployment_config,
                options,
                run_id,
                load,
                yardstick,
                Some(processes),
                hold,
            );
            report.errors.extend(unwritten);
            Ok(report)
        }
    }
}

/// The per-job CSV of `--samples`, if asked for. Its path was found
/// writable before the run; a write that fails now (a full disk) is an
/// error of the report, which is still printed.
fn write_samples(options: &Options, load: &load::LoadResult) -> Option<String> {
    let path = options.samples.as_ref()?;
    std::fs::write(path, load::samples_csv(load))
        .err()
        .map(|e| format!("--samples {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_print() {
        for s in ["single", "chain:5", "fanout:10000"] {
            assert_eq!(s.parse::<Shape>().map(|s| s.to_string()), Ok(s.to_owned()));
        }
        assert!("chain:0".parse::<Shape>().is_err());
        assert!("fanout".parse::<Shape>().is_err());
        assert!("star:3".parse::<Shape>().is_err());
    }

    #[test]
    fn shapes_make_valid_jobs() {
        let intake = crate::intake::JobIntake::new(
            &Config::default(),
            conveyor_builtin_handlers::registry(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for (shape, roots) in [
            (Shape::Single, 1),
            (Shape::Chain(4), 1),
            (Shape::Fanout(3), 1),
        ] {
            let body = format!(
                r#"{{"id":"b-x-1","requestor":"bench","tasks":{}}}"#,
                shape.tasks_json()
            );
            match intake.accept(body.as_bytes()) {
                crate::intake::Intake::Valid(job) => {
                    assert_eq!(job.tasks.len(), shape.tasks(), "{shape}");
                    assert_eq!(job.roots().count(), roots, "{shape}");
                }
                other => panic!("{shape}: {other:?}"),
            }
        }
    }

    /// A config whose RabbitMQ nothing answers: a run that got past its
    /// checks fails at once instead of loading anything.
    fn config_without_a_broker() -> Config {
        Config {
            amqp_url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn a_job_over_max_message_bytes_is_refused_before_anything_starts() {
        let config = Config {
            max_message_bytes: 1024,
            ..config_without_a_broker()
        };
        let options = Options {
            shape: Shape::Fanout(20),
            jobs: 1,
            bare_messages: None,
            ..Options::default()
        };
        let size = load::job_body("b-00000000-0", "00000000", &options.shape.tasks_json()).len();
        assert!(size > 1024, "the test's job must be too large: {size} B");
        match run(&config, options).await {
            Err(BenchError::Options(message)) => assert_eq!(
                message,
                format!(
                    "a job of shape fanout:20 is {size} bytes; the limit (max_message_bytes) \
                     is 1024: intake would dead-letter every one"
                )
            ),
            other => panic!("expected the size to be refused, got {other:?}"),
        }
    }

    /// Each refused before anything runs (the broker is unreachable): a
    /// window too large to allocate, and a samples file that cannot be
    /// written, found only once a long run's report was at hand before.
    #[tokio::test]
    async fn windows_past_their_limit_and_an_unwritable_samples_file_are_refused_at_once() {
        let refused = |options: Options| async {
            match run(&config_without_a_broker(), options).await {
                Err(BenchError::Options(message)) => message,
                other => panic!("expected the options to be refused, got {other:?}"),
            }
        };
        let message = refused(Options {
            confirm_window: MAX_CONFIRM_WINDOW + 1,
            ..Options::default()
        })
        .await;
        assert_eq!(message, "--window is at most 1000000, got 1000001");
        let message = refused(Options {
            poll_window: MAX_POLL_WINDOW + 1,
            ..Options::default()
        })
        .await;
        assert_eq!(message, "--poll-window is at most 100000, got 100001");
        let message = refused(Options {
            samples: Some("/nonexistent-dir/samples.csv".into()),
            ..Options::default()
        })
        .await;
        assert!(
            message.starts_with("--samples /nonexistent-dir/samples.csv: "),
            "{message}"
        );
    }

    #[test]
    fn the_largest_job_of_a_run_is_the_one_measured_against_the_limit() {
        let options = |jobs| Options {
            shape: Shape::Single,
            jobs,
            ..Options::default()
        };
        // One byte more per digit of the last job's index.
        let one_job = load::job_body("b-00000000-0", "00000000", &Shape::Single.tasks_json());
        let config = Config {
            max_message_bytes: one_job.len(),
            ..Config::default()
        };
        assert!(check_job_size(&config, &options(10), "00000000").is_ok());
        assert!(check_job_size(&config, &options(11), "00000000").is_err());
    }

    #[test]
    fn a_spawned_deployment_keeps_jobs_at_least_an_hour_and_longer_if_the_user_does() {
        let spawn_options = SpawnOptions {
            exe: "conveyor".into(),
            dispatchers: 1,
            workers: 1,
            concurrency: 8,
        };
        let short = Config {
            retention_s: 1,
            ..Config::default()
        };
        assert_eq!(spawned_config(&short, &spawn_options).retention_s, 3600);
        let week = Config {
            retention_s: 7 * 24 * 3600,
            ..Config::default()
        };
        assert_eq!(
            spawned_config(&week, &spawn_options).retention_s,
            7 * 24 * 3600
        );
        let spawned = spawned_config(&short, &spawn_options);
        assert_eq!(spawned.worker.queues, vec!["default".to_owned()]);
        assert_eq!(spawned.worker.concurrency, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_wait_that_is_never_answered_ends_in_an_error_naming_it() {
        let wait = broker_within(
            Duration::from_secs(120),
            "the publisher confirm of job 7",
            std::future::pending::<()>(),
        );
        // (The clock is paused: time jumps to the next timer.)
        match tokio::time::timeout(Duration::from_secs(600), wait).await {
            Ok(Err(BenchError::Broker(message))) => {
                assert!(
                    message.starts_with("the publisher confirm of job 7: no answer within 120s"),
                    "{message}"
                );
                assert!(message.contains("resource alarm"), "{message}");
            }
            other => panic!("expected the wait to give up after 120 s, got {other:?}"),
        }
    }
}
