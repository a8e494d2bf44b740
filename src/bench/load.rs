//! The load: publish jobs like a client, watch them finish in Redis.
//!
//! **Publishing.** One AMQP connection, a confirm-mode channel; each job is
//! published persistent (`delivery_mode 2`), `application/json`,
//! `mandatory`, to `<prefix>.submit` through the default exchange, with id
//! `b-<run>-<i>` and the label `bench=<run>`. Confirms are pipelined: at
//! most `confirm_window` are outstanding, and the oldest is awaited when the
//! window is full. With a rate, job `i` is due at `start + i / rate`; the
//! publisher sleeps until then, and how far it fell behind is reported
//! (`max_lag_ms`) — latency is counted from the *actual* publish, so a
//! publisher falling behind would hide queueing (coordinated omission):
//! check the lag.
//!
//! **Watching.** The watcher, on its own thread with a blocking Redis
//! connection (so it can pause for less than the async timer's 1 ms
//! granularity), keeps the set of jobs published and not yet seen
//! terminal, and polls Redis with one pipeline of `HGET <job key> st` over
//! the oldest `poll_window` of them (jobs finish roughly in publish order,
//! so the oldest are the frontier). The pause between polls is
//! `poll_interval` (default 0.5 ms: a ~0.6 ms cycle when few jobs are
//! outstanding), or `batch / max_poll_rate` when that is longer, so the
//! watcher never sends more than `max_poll_rate` HGETs/s to the Redis it
//! is measuring (under a flood of 512+ outstanding jobs, a ~20 ms cycle).
//!
//! **Three latencies per job** (all reported as percentiles):
//! - `observed` (the headline): publish -> the reply of the poll that first
//!   saw the job terminal, on the bench's monotonic clock. It
//!   *over*-estimates by up to one poll cycle plus one Redis round trip
//!   (the mean and longest cycle are in the report) — and by more for a
//!   job that finished while outside the oldest `poll_window`.
//! - `server publish->finish`: the job hash's `fin_us` (Redis `TIME` in µs,
//!   taken by the script that made the job final) minus the publish time,
//!   converted to Redis's clock with an offset measured before the run
//!   (best of 16 `TIME` round trips). This is the latency itself — publish
//!   to the moment the job *is* `succeeded` — with no poll error; its only
//!   error is the offset's (half the best round trip, printed). The latency
//!   targets are checked on it; `observed` stays as an upper bound.
//! - `server publish->create` and `create->finish`: split at the job hash's
//!   `cr` (ms, truncated, so 0.5 ms is added): queueing in the submit queue
//!   plus intake, and Conveyor's own work after intake.
//!
//! **Redis memory:** `INFO memory` `used_memory` just before the first
//! publish and just after the last job was seen finished, divided (in
//! [`super::report`]) by the jobs that succeeded (noisy if anything else
//! writes to the same Redis).
//!
//! **Holding** (`--hold-workers`, spawn mode): [`start`] publishes while
//! no worker runs; [`Started::hold`] waits until every confirmed job is
//! accepted (submit queue empty, job index and task queue at the job
//! count) and reads every job's state; the caller samples the processes'
//! memory, starts the workers, and [`Started::finish`] watches the jobs
//! drain. Latencies then include the hold.
//!
//! **Bounded waits.** A publish and its confirm are each awaited for at
//! most the run's time-out (a broker in a resource alarm answers neither):
//! the publisher then ends with an error naming the wait, which
//! [`Started::hold`] and [`Started::finish`] return. The publisher task
//! dies with its [`Started`]: dropped on an error path, it is aborted, not
//! left publishing into a deployment being torn down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation, Connection, PublisherConfirm};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use super::{BenchError, Options, amqp_connection, broker_err, broker_within, store_err};
use crate::config::Config;
use crate::names::Names;

/// One job of the run.
#[derive(Debug, Clone, Default)]
pub struct JobRecord {
    /// When it was handed to the channel (bench clock).
    pub published: Option<Instant>,
    /// The same moment on the wall clock, in µs since the epoch.
    pub published_unix_us: i64,
    /// When a poll first saw it terminal.
    pub seen: Option<Instant>,
    /// Its terminal state, as stored.
    pub state: Option<String>,
    /// `cr` of the job hash (ms, Redis clock).
    pub created_ms: Option<i64>,
    /// `fin_us` of the job hash (µs, Redis clock).
    pub finished_us: Option<i64>,
    /// Why publishing it failed, if it did.
    pub publish_error: Option<String>,
}

/// How the watcher polled.
#[derive(Debug, Clone, Default)]
pub struct PollStats {
    /// Polls made.
    pub polls: u64,
    /// HGETs sent in all.
    pub hgets: u64,
    /// Sum of the poll round trips.
    pub rtt_total: Duration,
    /// Sum of the times from one poll to the next while jobs were
    /// outstanding (idle waits for the next publish are not cycles).
    pub cycle_total: Duration,
    /// Such poll-to-poll times counted.
    pub cycles: u64,
    /// The longest one.
    pub cycle_max: Duration,
    /// Polls that failed (and were retried).
    pub errors: u64,
}

impl PollStats {
    /// Mean time from one poll to the next while jobs were outstanding, in ms.
    pub fn mean_cycle_ms(&self) -> f64 {
        if self.cycles == 0 {
            return 0.0;
        }
        self.cycle_total.as_secs_f64() * 1000.0 / self.cycles as f64
    }

    /// Mean round trip of one poll, in ms.
    pub fn mean_rtt_ms(&self) -> f64 {
        if self.polls == 0 {
            return 0.0;
        }
        self.rtt_total.as_secs_f64() * 1000.0 / self.polls as f64
    }
}

/// The bench clock against Redis's.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClockSync {
    /// Redis time minus local wall time, in µs.
    pub offset_us: i64,
    /// The round trip of the sample used, in µs (the offset is good to half).
    pub rtt_us: i64,
}

/// Everything the load phase measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Per job, by index.
    pub jobs: Vec<JobRecord>,
    /// The first publish.
    pub first_publish: Option<Instant>,
    /// The last publish.
    pub last_publish: Option<Instant>,
    /// Furthest behind schedule the publisher fell (rate mode), in ms.
    pub max_lag_ms: f64,
    /// True when the watcher gave up on unfinished jobs.
    pub timed_out: bool,
    /// Watcher statistics.
    pub poll: PollStats,
    /// Clock offset used for the server-side latencies.
    pub clock: ClockSync,
    /// `used_memory` before the first publish.
    pub redis_used_before: Option<u64>,
    /// `used_memory` after the last job finished.
    pub redis_used_after: Option<u64>,
}

/// One CSV row per job, in publish order: when it was published (bench
/// wall clock), created and finished (Redis clock moved onto the bench's by
/// the measured offset), all in µs since the epoch, its state, and
/// publish-to-finish in µs. Empty cells for what did not happen.
pub fn samples_csv(load: &LoadResult) -> String {
    let offset = load.clock.offset_us;
    let mut csv = String::from(
        "job,published_unix_us,created_unix_us,finished_unix_us,state,publish_to_finish_us\n",
    );
    let cell = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    for (i, job) in load.jobs.iter().enumerate() {
        let published = job.published.map(|_| job.published_unix_us);
        let created = job.created_ms.map(|ms| ms * 1000 - offset);
        let finished = job.finished_us.map(|us| us - offset);
        let latency = published.zip(finished).map(|(p, f)| f - p);
        let state = job
            .publish_error
            .as_ref()
            .map(|_| "publish failed")
            .or(job.state.as_deref())
            .unwrap_or("unfinished");
        csv.push_str(&format!(
            "{i},{},{},{},{state},{}\n",
            cell(published),
            cell(created),
            cell(finished),
            cell(latency)
        ));
    }
    csv
}

enum Event {
    Published {
        idx: usize,
        at: Instant,
        unix_us: i64,
    },
    Failed {
        idx: usize,
        reason: String,
    },
    /// Publishing stopped at `from`: it and every later job were not sent.
    Abandoned {
        from: usize,
        reason: String,
    },
}

struct PublishSummary {
    max_lag: Duration,
    /// Jobs handed to the channel.
    sent: usize,
    /// Of those, jobs the broker nacked or returned.
    refused: usize,
}

/// A Redis client for the bench (see `tool_client`).
async fn redis_client(config: &Config) -> Result<redis::Client, BenchError> {
    crate::store::redis::tool_client(config)
        .await
        .map_err(|e| BenchError::Store(e.to_string()))
}

/// Wall-clock µs since the epoch.
pub fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The watcher's blocking connection (a 10 s read time-out).
fn watcher_connection(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(conn)
}

/// A Redis connection for the bench (10 s response time-out, for big
/// pipelines).
pub async fn redis_connection(config: &Config) -> Result<MultiplexedConnection, BenchError> {
    let client = redis_client(config).await?;
    client
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_connection_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .map_err(store_err("cannot connect"))
}

/// `used_memory` from `INFO memory`.
pub async fn used_memory(conn: &mut MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn clock_sync(conn: &mut MultiplexedConnection) -> Result<ClockSync, BenchError> {
    let mut best: Option<ClockSync> = None;
    for _ in 0..16 {
        let before = unix_us();
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(conn)
            .await
            .map_err(store_err("TIME"))?;
        let after = unix_us();
        let sample = ClockSync {
            offset_us: secs * 1_000_000 + micros - (before + after) / 2,
            rtt_us: after - before,
        };
        if best.is_none_or(|b| sample.rtt_us < b.rtt_us) {
            best = Some(sample);
        }
    }
    Ok(best.unwrap_or_default())
}

/// Publish the jobs, watch them to a terminal state, fetch their
/// timestamps.
pub async fn run(
    config: &Config,
    options: &Options,
    run_id: &str,
) -> Result<LoadResult, BenchError> {
    start(config, options, run_id).await?.finish(options).await
}

/// The load once publishing has begun and before it is watched: what
/// [`Started::finish`] needs, and what [`Started::hold`] inspects meanwhile.
pub struct Started {
    names: Names,
    keys: Vec<String>,
    conn: MultiplexedConnection,
    watch_conn: redis::Connection,
    /// Where the watcher makes its connection again after a failure.
    watch_client: redis::Client,
    amqp: Connection,
    clock: ClockSync,
    rx: std::sync::mpsc::Receiver<Event>,
    publisher: Publisher,
    redis_used_before: Option<u64>,
    began: Instant,
}

enum Publisher {
    Running(PublisherTask),
    Done(PublishSummary),
}

/// The publishing task, aborted when dropped: a [`Started`] given up on an
/// error path (a failed hold, an interrupted run) must not leave it
/// publishing. Aborting a task that already ended does nothing.
struct PublisherTask(tokio::task::JoinHandle<Result<PublishSummary, BenchError>>);

impl PublisherTask {
    /// Wait for the task to end (the handle stays, so Drop still aborts it
    /// if this wait is itself dropped).
    async fn join(&mut self) -> Result<Result<PublishSummary, BenchError>, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for PublisherTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The body of job `id` of run `run_id`, as a client would publish it.
pub fn job_body(id: &str, run_id: &str, tasks_json: &str) -> String {
    format!(
        r#"{{"id":"{id}","requestor":"conveyor-bench","labels":{{"bench":"{run_id}"}},"tasks":{tasks_json}}}"#
    )
}

/// Connect, then start publishing the jobs (in a task of its own).
pub async fn start(
    config: &Config,
    options: &Options,
    run_id: &str,
) -> Result<Started, BenchError> {
    let names = Names::new(&config.prefix);
    let ids: Arc<Vec<String>> = Arc::new(
        (0..options.jobs)
            .map(|i| format!("b-{run_id}-{i}"))
            .collect(),
    );
    let keys: Vec<String> = ids.iter().map(|id| names.job_key(id)).collect();
    let mut conn = redis_connection(config).await?;
    let clock = clock_sync(&mut conn).await?;
    // The watcher runs on its own thread with a blocking connection, so it
    // can pause for less than the async timer's 1 ms granularity.
    let watch_client = redis_client(config).await?;
    let watch_conn =
        watcher_connection(&watch_client).map_err(store_err("cannot connect (watcher)"))?;

    // Connect before the clock starts.
    let amqp = amqp_connection(config, "cannot connect (publisher)").await?;
    let channel = amqp.create_channel().await.map_err(broker_err("channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(broker_err("confirm.select"))?;

    let redis_used_before = used_memory(&mut conn).await;
    let (tx, rx) = std::sync::mpsc::channel();
    let began = Instant::now();
    let publisher = tokio::spawn(publish_all(
        channel,
        names.submit_queue(),
        ids,
        options.shape.tasks_json(),
        run_id.to_owned(),
        options.rate,
        options.confirm_window,
        options.timeout,
        tx,
    ));
    Ok(Started {
        names,
        keys,
        conn,
        watch_conn,
        watch_client,
        amqp,
        clock,
        rx,
        publisher: Publisher::Running(PublisherTask(publisher)),
        redis_used_before,
        began,
    })
}

/// The held jobs at the moment they were sampled (see [`Started::hold`]).
#[derive(Debug, Clone)]
pub struct HoldSample {
    /// Jobs the broker confirmed (refused ones never reach the dispatcher).
    pub confirmed: usize,
    /// Jobs recorded in Redis and not terminal: the jobs in flight.
    pub in_flight: usize,
    /// Jobs by stored state; `missing` for jobs not recorded.
    pub states: BTreeMap<String, usize>,
    /// Ready messages in `<prefix>.submit` (`None`: not readable).
    pub submit_ready: Option<u32>,
    /// Ready messages in `<prefix>.tasks.default`.
    pub task_ready: Option<u32>,
    /// From the start of publishing to the sample.
    pub accept_time: Duration,
    /// Acceptance stopped progressing for the run's time-out before all
    /// confirmed jobs were accepted.
    pub timed_out: bool,
    /// Redis `used_memory` at the sample.
    pub redis_used: Option<u64>,
}

impl Started {
    /// Wait for the publisher to finish (every publish confirmed).
    async fn published(&mut self) -> Result<&PublishSummary, BenchError> {
        if let Publisher::Running(task) = &mut self.publisher {
            let summary = match task.join().await {
                Ok(result) => result?,
                Err(join) => return Err(BenchError::Broker(format!("publisher: {join}"))),
            };
            self.publisher = Publisher::Done(summary);
        }
        match &self.publisher {
            Publisher::Done(summary) => Ok(summary),
            Publisher::Running(_) => Err(BenchError::Broker("publisher still running".into())),
        }
    }

    /// With no worker running: wait until every job is published and
    /// *accepted* by the dispatcher — `<prefix>.submit` empty, one entry
    /// per job in the job index, one root task per job (every shape has
    /// one) ready in `<prefix>.tasks.default` — or until that stops
    /// progressing for `timeout`; then read every job's state.
    pub async fn hold(
        &mut self,
        config: &Config,
        timeout: Duration,
    ) -> Result<HoldSample, BenchError> {
        let confirmed = {
            let summary = self.published().await?;
            summary.sent - summary.refused
        };
        let submit_queue = self.names.submit_queue();
        let task_queue = self.names.task_queue("default");
        let amqp = amqp_connection(config, "cannot connect (hold)").await?;
        let mut last = (0u64, 0u32);
        let mut last_progress = Instant::now();
        let mut timed_out = false;
        loop {
            let recorded: u64 = redis::cmd("ZCARD")
                .arg(self.names.jobs_index())
                .query_async(&mut self.conn)
                .await
                .map_err(store_err("ZCARD of the job index"))?;
            let submit = super::spawn::queue_depth(&amqp, &submit_queue, timeout).await?;
            let tasks = super::spawn::queue_depth(&amqp, &task_queue, timeout).await?;
            let task_ready = tasks.map_or(0, |(ready, _)| ready);
            if recorded >= confirmed as u64
                && submit.is_some_and(|(ready, _)| ready == 0)
                && task_ready as usize >= confirmed
            {
                break;
            }
            if (recorded, task_ready) != last {
                last = (recorded, task_ready);
                last_progress = Instant::now();
            } else if last_progress.elapsed() > timeout {
                timed_out = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let accept_time = self.began.elapsed();
        let submit_ready = super::spawn::queue_depth(&amqp, &submit_queue, timeout)
            .await?
            .map(|(ready, _)| ready);
        let task_ready = super::spawn::queue_depth(&amqp, &task_queue, timeout)
            .await?
            .map(|(ready, _)| ready);
        let _ = broker_within(
            timeout,
            "closing the hold's connection",
            amqp.close(200, "held".into()),
        )
        .await;

        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for chunk in self.keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HGET").arg(key).arg("st");
            }
            let rows: Vec<Option<String>> = pipe
                .query_async(&mut self.conn)
                .await
                .map_err(store_err("reading job states"))?;
            for st in rows {
                *states
                    .entry(st.unwrap_or_else(|| "missing".into()))
                    .or_default() += 1;
            }
        }
        let in_flight = states
            .iter()
            .filter(|(st, _)| *st != "missing" && !is_terminal(st))
            .map(|(_, n)| n)
            .sum();
        Ok(HoldSample {
            confirmed,
            in_flight,
            states,
            submit_ready,
            task_ready,
            accept_time,
            timed_out,
            redis_used: used_memory(&mut self.conn).await,
        })
    }

    /// Watch every job to a terminal state (or the time-out), then fetch
    /// their timestamps.
    pub async fn finish(self, options: &Options) -> Result<LoadResult, BenchError> {
        let Started {
            keys,
            mut conn,
            watch_conn,
            watch_client,
            amqp,
            clock,
            rx,
            publisher,
            redis_used_before,
            ..
        } = self;
        let watch_options = WatchOptions {
            poll_window: options.poll_window,
            poll_interval: options.poll_interval,
            max_poll_rate: options.max_poll_rate,
            timeout: options.timeout,
        };
        let jobs = options.jobs;
        let watcher = tokio::task::spawn_blocking(move || {
            watch(watch_conn, &watch_client, rx, keys, jobs, watch_options)
        });
        let abort = |publisher: &Publisher| {
            if let Publisher::Running(task) = publisher {
                task.0.abort();
            }
        };
        let (mut result, keys) = match watcher.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                abort(&publisher);
                return Err(e);
            }
            Err(join) => {
                abort(&publisher);
                return Err(BenchError::Store(format!("watcher: {join}")));
            }
        };
        result.clock = clock;
        result.redis_used_before = redis_used_before;
        result.redis_used_after = used_memory(&mut conn).await;
        if result.timed_out {
            abort(&publisher);
        }
        match publisher {
            Publisher::Done(summary) => result.max_lag_ms = summary.max_lag.as_secs_f64() * 1000.0,
            Publisher::Running(mut task) => match task.join().await {
                Ok(Ok(summary)) => result.max_lag_ms = summary.max_lag.as_secs_f64() * 1000.0,
                Ok(Err(e)) => return Err(e),
                Err(join) if join.is_cancelled() => {}
                Err(join) => return Err(BenchError::Broker(format!("publisher: {join}"))),
            },
        }
        // The publishing connection is the one an alarm blocks.
        let _ = broker_within(
            options.timeout,
            "closing the publisher's connection",
            amqp.close(200, "bench done".into()),
        )
        .await;

        fetch_timestamps(&mut conn, &keys, &mut result.jobs).await?;
        Ok(result)
    }
}

struct WatchOptions {
    poll_window: usize,
    poll_interval: Duration,
    max_poll_rate: f64,
    timeout: Duration,
}

fn handle(event: Event, result: &mut LoadResult, outstanding: &mut BTreeSet<usize>) {
    match event {
        Event::Published { idx, at, unix_us } => {
            let job = &mut result.jobs[idx];
            job.published = Some(at);
            job.published_unix_us = unix_us;
            result.first_publish.get_or_insert(at);
            result.last_publish = Some(at);
            outstanding.insert(idx);
        }
        Event::Failed { idx, reason } => {
            result.jobs[idx].publish_error = Some(reason);
            // A refused message never reaches the dispatcher.
            outstanding.remove(&idx);
        }
        Event::Abandoned { from, reason } => {
            for job in &mut result.jobs[from..] {
                job.publish_error = Some(format!("not published: {reason}"));
            }
        }
    }
}

/// The watcher loop (on a blocking thread): take publish events, poll the
/// oldest outstanding jobs, until every published job is terminal and the
/// publisher is done, or nothing finished for `timeout`.
fn watch(
    mut conn: redis::Connection,
    client: &redis::Client,
    rx: std::sync::mpsc::Receiver<Event>,
    keys: Vec<String>,
    jobs: usize,
    options: WatchOptions,
) -> Result<(LoadResult, Vec<String>), BenchError> {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    let mut result = LoadResult {
        jobs: vec![JobRecord::default(); jobs],
        ..LoadResult::default()
    };
    let mut outstanding: BTreeSet<usize> = BTreeSet::new();
    let mut publisher_done = false;
    let mut last_progress = Instant::now();
    // The last poll, if it left jobs outstanding (so the next one ends a cycle).
    let mut cycle_start: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(event) => handle(event, &mut result, &mut outstanding),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    publisher_done = true;
                    break;
                }
            }
        }
        if outstanding.is_empty() {
            if publisher_done {
                break;
            }
            match rx.recv_timeout(options.timeout) {
                Ok(event) => handle(event, &mut result, &mut outstanding),
                Err(RecvTimeoutError::Disconnected) => publisher_done = true,
                Err(RecvTimeoutError::Timeout) => {
                    result.timed_out = true;
                    break;
                }
            }
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > options.timeout {
            result.timed_out = true;
            break;
        }
        let batch: Vec<usize> = outstanding
            .iter()
            .take(options.poll_window)
            .copied()
            .collect();
        let mut pipe = redis::pipe();
        for &i in &batch {
            pipe.cmd("HGET").arg(&keys[i]).arg("st");
        }
        let sent = Instant::now();
        if let Some(start) = cycle_start {
            let cycle = sent - start;
            result.poll.cycle_total += cycle;
            result.poll.cycles += 1;
            result.poll.cycle_max = result.poll.cycle_max.max(cycle);
        }
        let states: Result<Vec<Option<String>>, _> = pipe.query(&mut conn);
        let got = Instant::now();
        match states {
            Ok(states) => {
                result.poll.polls += 1;
                result.poll.hgets += batch.len() as u64;
                result.poll.rtt_total += got - sent;
                for (&i, st) in batch.iter().zip(states) {
                    if let Some(st) = st
                        && is_terminal(&st)
                    {
                        let job = &mut result.jobs[i];
                        job.seen = Some(got);
                        job.state = Some(st);
                        outstanding.remove(&i);
                        last_progress = got;
                    }
                }
            }
            Err(e) => {
                // A connection that failed is not used again: redis-rs
                // shuts one for good at its peer's end of file (a Redis
                // restarted), and one whose read timed out mid-pipeline
                // would wait out each reply left. A new one is made, until
                // the run's time-out passes with no job finishing.
                result.poll.errors += 1;
                // An answer no new connection changes (an ACL, a key of
                // another type) ends the run at once.
                let connection_lost = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                    );
                if !connection_lost || last_progress.elapsed() > options.timeout {
                    return Err(BenchError::Store(format!(
                        "polling job states: {e} (nothing finished for {:?})",
                        options.timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
                match watcher_connection(client) {
                    Ok(fresh) => conn = fresh,
                    Err(e) => tracing::debug!(error = %e, "bench: watcher cannot reconnect yet"),
                }
            }
        }
        cycle_start = (!outstanding.is_empty()).then_some(sent);
        let pause = options.poll_interval.max(Duration::from_secs_f64(
            batch.len() as f64 / options.max_poll_rate.max(1.0),
        ));
        let wake = sent + pause;
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
    Ok((result, keys))
}

fn is_terminal(st: &str) -> bool {
    matches!(st, "succeeded" | "failed" | "rejected" | "cancelled")
}

/// `cr` and `fin_us` of every job seen finished, in pipelines of 1000.
async fn fetch_timestamps(
    conn: &mut MultiplexedConnection,
    keys: &[String],
    jobs: &mut [JobRecord],
) -> Result<(), BenchError> {
    let finished: Vec<usize> = (0..jobs.len())
        .filter(|&i| jobs[i].state.is_some())
        .collect();
    for chunk in finished.chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("HMGET").arg(&keys[i]).arg("cr").arg("fin_us");
        }
        let rows: Vec<(Option<i64>, Option<i64>)> = pipe
            .query_async(conn)
            .await
            .map_err(store_err("reading job timestamps"))?;
        for (&i, (cr, fin)) in chunk.iter().zip(rows) {
            jobs[i].created_ms = cr;
            jobs[i].finished_us = fin;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn publish_all(
    channel: lapin::Channel,
    queue: String,
    ids: Arc<Vec<String>>,
    tasks_json: String,
    run_id: String,
    rate: Option<f64>,
    window: usize,
    timeout: Duration,
    tx: std::sync::mpsc::Sender<Event>,
) -> Result<PublishSummary, BenchError> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let mut pending: VecDeque<(usize, PublisherConfirm)> =
        VecDeque::with_capacity(window.min(ids.len()));
    let mut max_lag = Duration::ZERO;
    let start = Instant::now();
    let (mut sent, mut refused) = (0usize, 0usize);
    // Reports a refused publish; true if it was one.
    let settle = |idx: usize, confirm: Result<Confirmation, lapin::Error>| {
        let reason = match confirm {
            Ok(Confirmation::Ack(None)) => return false,
            Ok(Confirmation::Ack(Some(ret))) => {
                format!("returned: {} {}", ret.reply_code, ret.reply_text)
            }
            Ok(Confirmation::Nack(_)) => "nacked".to_owned(),
            Ok(Confirmation::NotRequested) => "confirms not enabled".to_owned(),
            Err(e) => format!("confirm: {e}"),
        };
        let _ = tx.send(Event::Failed { idx, reason });
        true
    };
    for (i, id) in ids.iter().enumerate() {
        let due = rate.map(|rate| start + Duration::from_secs_f64(i as f64 / rate));
        if let Some(due) = due
            && Instant::now() < due
        {
            tokio::time::sleep_until(due.into()).await;
        }
        while pending.len() >= window {
            if let Some((idx, confirm)) = pending.pop_front() {
                let confirm = broker_within(timeout, &confirm_wait(idx), confirm).await?;
                refused += usize::from(settle(idx, confirm));
            }
        }
        let body = job_body(id, &run_id, &tasks_json);
        let at = Instant::now();
        let unix = unix_us();
        // Measured at the publish itself: the timer's lateness and a full
        // confirm window count as falling behind, as they are.
        if let Some(due) = due {
            max_lag = max_lag.max(at.saturating_duration_since(due));
        }
        let publish = channel.basic_publish(
            ShortString::from(""),
            ShortString::from(queue.as_str()),
            options,
            body.as_bytes(),
            properties.clone(),
        );
        match broker_within(timeout, &format!("basic.publish of job {i}"), publish).await? {
            Ok(confirm) => {
                let _ = tx.send(Event::Published {
                    idx: i,
                    at,
                    unix_us: unix,
                });
                pending.push_back((i, confirm));
                sent += 1;
            }
            Err(e) => {
                let _ = tx.send(Event::Abandoned {
                    from: i,
                    reason: format!("basic.publish: {e}"),
                });
                break;
            }
        }
    }
    for (idx, confirm) in pending {
        let confirm = broker_within(timeout, &confirm_wait(idx), confirm).await?;
        refused += usize::from(settle(idx, confirm));
    }
    Ok(PublishSummary {
        max_lag,
        sent,
        refused,
    })
}

/// What a publisher waiting for job `idx`'s confirm waits for.
fn confirm_wait(idx: usize) -> String {
    format!("the publisher confirm of job {idx}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_publisher_task_dropped_before_it_ends_is_aborted() {
        let (_never_sent, never) = tokio::sync::oneshot::channel::<()>();
        let (held, dropped_with_the_task) = tokio::sync::oneshot::channel::<()>();
        let task = PublisherTask(tokio::spawn(async move {
            let _held = held;
            let _ = never.await;
            Err(BenchError::Broker(
                "unreachable: the task never ends".into(),
            ))
        }));
        drop(task);
        // The task's state (`held`) is dropped only when it is aborted.
        let ended = tokio::time::timeout(Duration::from_secs(5), dropped_with_the_task).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the publisher ran on after its Started was dropped"
        );
    }

    #[test]
    fn samples_put_every_job_on_the_bench_clock_with_empty_cells_for_what_did_not_happen() {
        let now = Instant::now();
        let load = LoadResult {
            jobs: vec![
                JobRecord {
                    published: Some(now),
                    published_unix_us: 1_000_000,
                    state: Some("succeeded".into()),
                    created_ms: Some(1_001),
                    finished_us: Some(1_002_500),
                    ..JobRecord::default()
                },
                JobRecord {
                    published: Some(now),
                    published_unix_us: 1_000_100,
                    ..JobRecord::default()
                },
                JobRecord {
                    publish_error: Some("nacked".into()),
                    ..JobRecord::default()
                },
            ],
            // Redis runs 500 µs ahead of the bench.
            clock: ClockSync {
                offset_us: 500,
                rtt_us: 20,
            },
            ..LoadResult::default()
        };
        assert_eq!(
            samples_csv(&load),
            "job,published_unix_us,created_unix_us,finished_unix_us,state,publish_to_finish_us\n\
             0,1000000,1000500,1002000,succeeded,2000\n\
             1,1000100,,,unfinished,\n\
             2,,,,publish failed,\n"
        );
    }
}
