//! The figures of a run: one serialisable [`Report`] (`--json`) and its
//! table ([`Report::to_text`]), with the issue's targets checked where the
//! run is the workload the target is set for (single-task jobs as fast as
//! possible; a fan-out of at least 10,000 tasks; 1,000 jobs/s offered; a
//! worker of concurrency 64 or more; a dispatcher holding at least 100,000
//! jobs in flight). Other runs report the same figures unjudged.
//!
//! **A target is met only by a run in which every job succeeded.** The
//! figures are of the jobs that succeeded: a run where 3% of the jobs
//! stalled has a fine p99 of the other 97%, and a fine rate of work that
//! did not finish. Such a run reports each target it judges as not met,
//! with why ([`TargetCheck::why_not_met`]). The Redis bytes-per-job target
//! is judged only in spawn mode: a live deployment's pruning and other
//! clients move `used_memory` as much as the run does.
//!
//! **Intervals end at the last job's `fin_us`** (the µs its final script
//! read from Redis `TIME`), with the publish moved onto Redis's clock by
//! the measured offset, rather than at the poll that saw it: no poll
//! cycle (up to ~20 ms under a flood) is counted as work. When a job has
//! no `fin_us` (a live deployment older than the field) the poll is used.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use serde::Serialize;

use super::bare::{BareHopReport, BareReport, Yardstick};
use super::load::{HoldSample, LoadResult};
use super::spawn::{ProcessExit, ProcessMemory};
use super::{Options, Shape, Target};
use crate::config::Config;

/// The workloads the issue sets its targets for; see the module docs.
const FANOUT_TARGET_TASKS: usize = 10_000;
const LATENCY_TARGET_RATE: f64 = 1_000.0;
const WORKER_TARGET_CONCURRENCY: usize = 64;
const DISPATCHER_TARGET_IN_FLIGHT: usize = 100_000;

/// The spawned processes, as handed to [`build`].
#[derive(Debug, Clone, Serialize)]
pub struct Processes {
    /// Dispatcher processes.
    pub dispatchers: usize,
    /// Worker processes.
    pub workers: usize,
    /// Concurrency of each worker.
    pub concurrency: usize,
    /// Whether workers take submissions (`worker.accept_submissions`): one
    /// broker hop fewer per job.
    pub workers_take_submissions: bool,
    /// Memory per process, read just before stopping them.
    pub memory: Vec<ProcessMemory>,
    /// How each stopped.
    pub exits: Vec<ProcessExit>,
    /// Their logs, kept when a process did not stop cleanly.
    pub logs_dir: Option<String>,
}

/// The hold of a `--hold-workers` run, as handed to [`build`].
#[derive(Debug, Clone)]
pub struct HoldInput {
    /// The jobs when every one was accepted.
    pub sample: HoldSample,
    /// The processes' memory then (only dispatchers were running).
    pub memory: Vec<ProcessMemory>,
    /// When the workers were started, right after the sample.
    pub workers_started: Instant,
    /// The same moment on the bench's wall clock, in µs since the epoch.
    pub workers_started_unix_us: i64,
}

/// A `--hold-workers` run: every job published and accepted by the
/// dispatcher while no worker ran, memory sampled, then drained.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    /// Jobs recorded in Redis and not terminal when sampled: the jobs in
    /// flight the memory figures are for.
    pub jobs_in_flight_at_sample: usize,
    /// Jobs published and confirmed by the broker.
    pub confirmed: usize,
    /// Jobs by stored state when sampled (`missing`: not recorded).
    pub states: BTreeMap<String, usize>,
    /// Ready messages in `<prefix>.submit` when sampled.
    pub submit_queue_ready: Option<u32>,
    /// Ready messages in `<prefix>.tasks.default` when sampled.
    pub task_queue_ready: Option<u32>,
    /// Start of publishing to the sample, in seconds.
    pub accept_seconds: f64,
    /// Jobs in flight / `accept_seconds`.
    pub accept_jobs_per_s: f64,
    /// Acceptance stopped progressing before every job was accepted.
    pub timed_out: bool,
    /// Memory of each process when sampled.
    pub memory: Vec<ProcessMemory>,
    /// Highest dispatcher RSS when sampled, in MB.
    pub dispatcher_rss_mb: Option<f64>,
    /// Highest dispatcher peak RSS (`VmHWM`) when sampled, in MB.
    pub dispatcher_peak_rss_mb: Option<f64>,
    /// Redis `used_memory` when sampled.
    pub redis_used: Option<u64>,
    /// Its growth since before the first publish / jobs in flight.
    pub redis_bytes_per_job: Option<f64>,
    /// From the moment the bench started the worker processes to the last
    /// succeeded job's `fin_us`, in seconds (the start moved onto Redis's
    /// clock by the measured offset; the last poll that saw a job finished
    /// if one has no `fin_us`). It includes the workers' start-up: exec,
    /// connecting to RabbitMQ and Redis, subscribing.
    pub drain_seconds: f64,
    /// Succeeded jobs / `drain_seconds`.
    pub drain_jobs_per_s: f64,
}

/// Latency percentiles, in ms (nearest rank).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (ms), or `None` if there are none.
    pub fn of(mut samples: Vec<f64>) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let rank = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Percentiles {
            count: n,
            mean: samples.iter().sum::<f64>() / n as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples[n - 1],
        })
    }
}

/// How publishing went.
#[derive(Debug, Clone, Serialize)]
pub struct Publish {
    /// First to last publish, in seconds.
    pub seconds: f64,
    /// Jobs published per second over that time: the gaps between
    /// publishes, one fewer than the jobs, over it (10 jobs at one a
    /// second take 9 s: 1 job/s, not 1.11).
    pub jobs_per_s: f64,
    /// Unconfirmed publishes allowed at once.
    pub confirm_window: usize,
    /// Furthest behind schedule (rate mode), in ms.
    pub max_lag_ms: f64,
    /// Jobs refused by the broker or not sent.
    pub failures: usize,
}

/// Final states.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// Jobs `succeeded`.
    pub succeeded: usize,
    /// Jobs `failed`.
    pub failed: usize,
    /// Jobs `rejected` at intake.
    pub rejected: usize,
    /// Jobs `cancelled`.
    pub cancelled: usize,
    /// Jobs published but not seen terminal before the time-out.
    pub unfinished: usize,
    /// Jobs whose publish failed.
    pub publish_failed: usize,
    /// Jobs never published: the watcher gave up first (at an offered
    /// rate, nothing finished for the time-out while the publisher waited
    /// for its next slot).
    pub unpublished: usize,
}

/// Completed work per second.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// First publish to the last succeeded job's `fin_us`, in seconds, on
    /// Redis's clock (the publish moved onto it by the measured offset);
    /// to the poll that saw the last one if a job has no `fin_us`.
    pub seconds: f64,
    /// Succeeded jobs per second.
    pub jobs_per_s: f64,
    /// Tasks of succeeded jobs per second.
    pub tasks_per_s: f64,
}

/// The three latencies (see `bench::load`), in ms.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Publish -> seen terminal by a poll (over-estimates by <= one poll
    /// cycle + round trip).
    pub observed: Option<Percentiles>,
    /// Publish -> `fin_us`, on Redis's clock (µs; clock offset error only):
    /// the latency the targets are checked on.
    pub server_publish_to_finish: Option<Percentiles>,
    /// Publish -> `cr` (queueing in `<prefix>.submit` + intake), Redis clock.
    pub server_publish_to_create: Option<Percentiles>,
    /// `cr` -> `fin_us`, Redis clock only (±0.5 ms: `cr` is in ms).
    pub server_create_to_finish: Option<Percentiles>,
}

/// How the measurement was taken, to judge its error.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Least pause between polls, in ms.
    pub poll_interval_ms: f64,
    /// Oldest outstanding jobs asked per poll.
    pub poll_window: usize,
    /// Most HGETs/s sent.
    pub max_poll_rate: f64,
    /// Polls made.
    pub polls: u64,
    /// HGETs sent.
    pub hgets: u64,
    /// Mean time between polls while jobs were outstanding, in ms: the
    /// resolution of `observed`.
    pub mean_poll_cycle_ms: f64,
    /// Longest such time, in ms.
    pub max_poll_cycle_ms: f64,
    /// Mean round trip of one poll, in ms.
    pub mean_poll_rtt_ms: f64,
    /// Failed polls (retried).
    pub poll_errors: u64,
    /// Redis clock minus bench clock, in µs.
    pub clock_offset_us: i64,
    /// Round trip of the clock sample, in µs (offset good to half).
    pub clock_rtt_us: i64,
}

/// Redis memory growth over the run.
#[derive(Debug, Clone, Serialize)]
pub struct RedisMemory {
    /// `used_memory` before the first publish.
    pub used_before: Option<u64>,
    /// `used_memory` after the last job finished.
    pub used_after: Option<u64>,
    /// Growth / jobs succeeded (`null` if none did). Only a run where
    /// every job succeeded measures finished jobs alone.
    pub bytes_per_job: Option<f64>,
    /// Growth / tasks of the jobs succeeded.
    pub bytes_per_task: Option<f64>,
}

/// Conveyor's rates as fractions of the bare broker loop's msgs/s.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Conveyor tasks/s ÷ bare msgs/s.
    pub tasks_per_s: f64,
    /// Conveyor jobs/s ÷ bare msgs/s.
    pub jobs_per_s: f64,
}

/// One target of the issue, checked against this run.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// What is compared.
    pub name: String,
    /// Measured.
    pub value: f64,
    /// `<` or `>=`.
    pub op: &'static str,
    /// The limit.
    pub limit: f64,
    /// Whether it holds: the value is within the limit and every job of
    /// the run succeeded.
    pub met: bool,
    /// Why it is not met whatever the value: jobs that did not succeed
    /// (the figures are then of the others only). `null` otherwise.
    pub why_not_met: Option<String>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The run's id (job ids are `b-<run>-<i>`).
    pub run_id: String,
    /// The deployment's prefix.
    pub prefix: String,
    /// `spawn` or `live`.
    pub mode: &'static str,
    /// Job shape.
    pub shape: String,
    /// Tasks per job.
    pub tasks_per_job: usize,
    /// Jobs asked for.
    pub jobs: usize,
    /// Offered rate in jobs/s (`null`: as fast as possible).
    pub offered_rate: Option<f64>,
    /// Queue type of the deployment's queues.
    pub queue_type: String,
    /// Publishing.
    pub publish: Publish,
    /// Final states.
    pub outcome: Outcome,
    /// Throughput.
    pub throughput: Throughput,
    /// Latencies in ms.
    pub latency_ms: Latency,
    /// Measurement method and its resolution.
    pub measurement: Measurement,
    /// Redis memory.
    pub redis: RedisMemory,
    /// Spawned processes (spawn mode).
    pub processes: Option<Processes>,
    /// The hold (`--hold-workers`): memory with every job accepted and
    /// unfinished.
    pub hold: Option<Hold>,
    /// Highest peak RSS per role, in MB.
    pub peak_rss_mb_by_role: BTreeMap<String, f64>,
    /// The bare broker loop (unless skipped).
    pub bare: Option<BareReport>,
    /// Ratios to the bare loop.
    pub ratios: Option<Ratios>,
    /// The bare hop at the offered rate (rate mode, unless skipped).
    pub bare_hop: Option<BareHopReport>,
    /// The issue's targets that apply to this run.
    pub targets: Vec<TargetCheck>,
    /// What went wrong (empty when nothing did).
    pub errors: Vec<String>,
}

impl Report {
    /// True when every job succeeded and nothing else went wrong.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

fn ms_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// Put the figures together.
pub fn build(
    config: &Config,
    options: &Options,
    run_id: &str,
    load: LoadResult,
    yardstick: Option<Yardstick>,
    processes: Option<Processes>,
    hold: Option<HoldInput>,
) -> Report {
    let (bare, bare_hop) = match yardstick {
        Some(Yardstick::Throughput(b)) => (Some(b), None),
        Some(Yardstick::Hop(h)) => (None, Some(h)),
        None => (None, None),
    };
    let tasks_per_job = options.shape.tasks();
    let mut outcome = Outcome::default();
    let mut publish_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed_ids = Vec::new();
    let mut observed = Vec::new();
    let mut pub_fin = Vec::new();
    let mut pub_cr = Vec::new();
    let mut cr_fin = Vec::new();
    let mut last_seen: Option<Instant> = None;
    // The latest `fin_us` of a succeeded job, while every one has it.
    let mut last_finish_us: Option<i64> = None;
    let mut every_success_has_fin_us = true;
    let mut successes_without_fin_us = 0usize;
    let offset = load.clock.offset_us;
    for (i, job) in load.jobs.iter().enumerate() {
        if let Some(reason) = &job.publish_error {
            outcome.publish_failed += 1;
            *publish_reasons.entry(reason.clone()).or_default() += 1;
            continue;
        }
        match job.state.as_deref() {
            Some("succeeded") => outcome.succeeded += 1,
            Some("failed") => outcome.failed += 1,
            Some("rejected") => outcome.rejected += 1,
            Some("cancelled") => outcome.cancelled += 1,
            _ => {
                if job.published.is_some() {
                    outcome.unfinished += 1;
                } else {
                    outcome.unpublished += 1;
                }
                continue;
            }
        }
        if job.state.as_deref() != Some("succeeded") {
            if failed_ids.len() < 5 {
                failed_ids.push(format!("b-{run_id}-{i}"));
            }
            continue;
        }
        if let (Some(p), Some(s)) = (job.published, job.seen) {
            observed.push(ms_between(p, s));
            last_seen = Some(last_seen.map_or(s, |l| l.max(s)));
        }
        let published_server_us = job.published_unix_us + offset;
        if let Some(fin) = job.finished_us {
            pub_fin.push((fin - published_server_us) as f64 / 1000.0);
            last_finish_us = Some(last_finish_us.map_or(fin, |l| l.max(fin)));
        } else {
            every_success_has_fin_us = false;
            successes_without_fin_us += 1;
        }
        if let Some(cr) = job.created_ms {
            pub_cr.push(((cr * 1000 + 500) - published_server_us) as f64 / 1000.0);
        }
        if let (Some(cr), Some(fin)) = (job.created_ms, job.finished_us) {
            cr_fin.push((fin - (cr * 1000 + 500)) as f64 / 1000.0);
        }
    }

    let publish_seconds = match (load.first_publish, load.last_publish) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let published = load.jobs.iter().filter(|j| j.published.is_some()).count();
    let last_finish_us = last_finish_us.filter(|_| every_success_has_fin_us);
    // Seconds from a moment on the bench's wall clock (µs) to the last
    // finish, on Redis's clock; `None` without `fin_us` of every success.
    let to_last_finish = |from_unix_us: i64| {
        last_finish_us.map(|fin| (fin - (from_unix_us + offset)).max(0) as f64 / 1e6)
    };
    let first_publish_unix_us = load
        .jobs
        .iter()
        .filter(|j| j.published.is_some())
        .map(|j| j.published_unix_us)
        .min();
    let seconds = match (
        first_publish_unix_us.and_then(to_last_finish),
        load.first_publish,
        last_seen,
    ) {
        (Some(seconds), _, _) => seconds,
        (None, Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let per_s = |n: usize| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    let throughput = Throughput {
        seconds,
        jobs_per_s: per_s(outcome.succeeded),
        tasks_per_s: per_s(outcome.succeeded * tasks_per_job),
    };
    let succeeded = outcome.succeeded;
    let growth = match (load.redis_used_before, load.redis_used_after) {
        (Some(a), Some(b)) if succeeded > 0 => Some(b as f64 - a as f64),
        _ => None,
    };
    let redis = RedisMemory {
        used_before: load.redis_used_before,
        used_after: load.redis_used_after,
        bytes_per_job: growth.map(|g| g / succeeded as f64),
        bytes_per_task: growth.map(|g| g / (succeeded * tasks_per_job) as f64),
    };
    let ratios = bare.as_ref().map(|b| Ratios {
        tasks_per_s: throughput.tasks_per_s / b.msgs_per_s.max(1e-9),
        jobs_per_s: throughput.jobs_per_s / b.msgs_per_s.max(1e-9),
    });
    let mut peak_rss_mb_by_role: BTreeMap<String, f64> = BTreeMap::new();
    if let Some(p) = &processes {
        for m in &p.memory {
            if let Some(peak) = m.peak_rss_mb {
                let e = peak_rss_mb_by_role.entry(m.role.to_owned()).or_insert(0.0);
                *e = e.max(peak);
            }
        }
    }
    let hold = hold.map(|h| {
        let max_of = |f: fn(&ProcessMemory) -> Option<f64>| {
            h.memory
                .iter()
                .filter(|m| m.role == "dispatcher")
                .filter_map(f)
                .reduce(f64::max)
        };
        let s = &h.sample;
        let accept_seconds = s.accept_time.as_secs_f64();
        let drain_seconds = to_last_finish(h.workers_started_unix_us).unwrap_or_else(|| {
            last_seen.map_or(0.0, |l| {
                l.saturating_duration_since(h.workers_started).as_secs_f64()
            })
        });
        Hold {
            jobs_in_flight_at_sample: s.in_flight,
            confirmed: s.confirmed,
            states: s.states.clone(),
            submit_queue_ready: s.submit_ready,
            task_queue_ready: s.task_ready,
            accept_seconds,
            accept_jobs_per_s: if accept_seconds > 0.0 {
                s.in_flight as f64 / accept_seconds
            } else {
                0.0
            },
            timed_out: s.timed_out,
            dispatcher_rss_mb: max_of(|m| m.rss_mb),
            dispatcher_peak_rss_mb: max_of(|m| m.peak_rss_mb),
            memory: h.memory,
            redis_used: s.redis_used,
            redis_bytes_per_job: match (load.redis_used_before, s.redis_used) {
                (Some(a), Some(b)) if s.in_flight > 0 => {
                    Some((b as f64 - a as f64) / s.in_flight as f64)
                }
                _ => None,
            },
            drain_seconds,
            drain_jobs_per_s: if drain_seconds > 0.0 {
                outcome.succeeded as f64 / drain_seconds
            } else {
                0.0
            },
        }
    });
    let latency = Latency {
        observed: Percentiles::of(observed),
        server_publish_to_finish: Percentiles::of(pub_fin),
        server_publish_to_create: Percentiles::of(pub_cr),
        server_create_to_finish: Percentiles::of(cr_fin),
    };

    let mut errors = Vec::new();
    for (reason, n) in &publish_reasons {
        errors.push(format!("{n} job(s) not published: {reason}"));
    }
    let bad = outcome.failed + outcome.rejected + outcome.cancelled;
    if bad > 0 {
        errors.push(format!(
            "{} failed, {} rejected, {} cancelled (e.g. {})",
            outcome.failed,
            outcome.rejected,
            outcome.cancelled,
            failed_ids.join(", ")
        ));
    }
    if outcome.unfinished > 0 {
        errors.push(format!(
            "{} job(s) not finished when the watcher gave up (no job finished for {:?})",
            outcome.unfinished, options.timeout
        ));
    }
    if successes_without_fin_us > 0 {
        // Read at the end of the run: a live deployment whose retention is
        // shorter than the run expired the early jobs' records meanwhile.
        errors.push(format!(
            "{successes_without_fin_us} succeeded job(s) had no finish time when read \
             (records expired? a retention shorter than the run): the server latencies \
             leave them out and throughput is timed by the polls"
        ));
    }
    if outcome.unpublished > 0 {
        errors.push(format!(
            "{} job(s) never published: the watcher gave up first (no job finished for {:?})",
            outcome.unpublished, options.timeout
        ));
    }
    if let Some(h) = &hold
        && (h.timed_out || h.jobs_in_flight_at_sample < h.confirmed)
    {
        errors.push(format!(
            "hold: {} of {} confirmed jobs accepted and unfinished when sampled{}",
            h.jobs_in_flight_at_sample,
            h.confirmed,
            if h.timed_out {
                " (acceptance stopped progressing)"
            } else {
                ""
            }
        ));
    }
    if let Some(p) = &processes {
        for e in p.exits.iter().filter(|e| !e.clean) {
            errors.push(format!(
                "{} {} did not stop cleanly: {}",
                e.role, e.pid, e.status
            ));
        }
        if let Some(dir) = &p.logs_dir {
            errors.push(format!("logs of the spawned processes kept in {dir}"));
        }
    }

    let not_succeeded = options.jobs - outcome.succeeded.min(options.jobs);
    let mut why_not: Vec<String> = Vec::new();
    if not_succeeded > 0 {
        why_not.push(format!(
            "{not_succeeded} of {} jobs did not succeed; the figures are of the others",
            options.jobs
        ));
    }
    // A process that died during the run (no memory to read: a zombie's
    // status has none) or did not stop cleanly: the figures are of the
    // survivors, a memory target most of all.
    if let Some(p) = &processes {
        let unread: Vec<String> = (p.memory.iter())
            .filter(|m| m.peak_rss_mb.is_none())
            .map(|m| format!("{} {}", m.role, m.pid))
            .collect();
        if !unread.is_empty() {
            why_not.push(format!(
                "no memory reading of {} (exited during the run?)",
                unread.join(", ")
            ));
        }
        if p.exits.iter().any(|e| !e.clean) {
            why_not.push("a spawned process did not stop cleanly".to_owned());
        }
    }
    let why_not_met = (!why_not.is_empty()).then(|| why_not.join("; "));
    let mut targets = Vec::new();
    let mut check = |name: String, value: f64, op: &'static str, limit: f64| {
        let within = match op {
            "<" => value < limit,
            _ => value >= limit,
        };
        targets.push(TargetCheck {
            name,
            value,
            op,
            limit,
            met: within && why_not_met.is_none(),
            why_not_met: why_not_met.clone(),
        });
    };
    // A held run's throughput and latencies include the hold.
    if let Some(r) = ratios.as_ref().filter(|_| hold.is_none()) {
        if options.shape == Shape::Single && options.rate.is_none() {
            check(
                "single-task jobs/s ÷ bare msgs/s".into(),
                r.jobs_per_s,
                ">=",
                1.0 / 3.0,
            );
        }
        if let Shape::Fanout(k) = options.shape
            && k >= FANOUT_TARGET_TASKS
        {
            check(
                format!("fan-out/fan-in of {k} tasks: tasks/s ÷ bare msgs/s"),
                r.tasks_per_s,
                ">=",
                0.5,
            );
        }
    }
    // Publish -> succeeded as Redis recorded it (µs): the latency itself.
    // `observed` adds the watcher's own poll delay and is only a bound.
    if let (Some(rate), Some(fin), None) = (options.rate, &latency.server_publish_to_finish, &hold)
        && (rate - LATENCY_TARGET_RATE).abs() < 0.5
    {
        check(
            format!("p50 ms publish->succeeded at {rate} jobs/s offered"),
            fin.p50,
            "<",
            2.0,
        );
        check(
            format!("p99 ms publish->succeeded at {rate} jobs/s offered"),
            fin.p99,
            "<",
            10.0,
        );
    }
    if let Some(p) = &processes {
        if let Some(&w) = peak_rss_mb_by_role
            .get("worker")
            .filter(|_| p.concurrency >= WORKER_TARGET_CONCURRENCY)
        {
            check(
                format!("worker peak RSS MB (concurrency {})", p.concurrency),
                w,
                "<",
                50.0,
            );
        }
        if let Some(h) = hold
            .as_ref()
            .filter(|h| h.jobs_in_flight_at_sample >= DISPATCHER_TARGET_IN_FLIGHT)
            && let Some(d) = h.dispatcher_peak_rss_mb
        {
            check(
                format!(
                    "dispatcher peak RSS MB ({} accepted, unfinished)",
                    h.jobs_in_flight_at_sample
                ),
                d,
                "<",
                150.0,
            );
        }
    }
    // Live: pruning and other clients move `used_memory` too (growth can
    // even be negative).
    if options.shape == Shape::Single
        && matches!(options.target, Target::Spawn(_))
        && let Some(b) = redis.bytes_per_job
    {
        check(
            "Redis bytes per finished single-task job".into(),
            b,
            "<",
            2048.0,
        );
    }

    Report {
        run_id: run_id.to_owned(),
        prefix: config.prefix.clone(),
        mode: match options.target {
            Target::Live { .. } => "live",
            Target::Spawn(_) => "spawn",
        },
        shape: options.shape.to_string(),
        tasks_per_job,
        jobs: options.jobs,
        offered_rate: options.rate,
        queue_type: format!("{:?}", config.queue_type).to_lowercase(),
        publish: Publish {
            seconds: publish_seconds,
            jobs_per_s: if publish_seconds > 0.0 {
                published.saturating_sub(1) as f64 / publish_seconds
            } else {
                0.0
            },
            confirm_window: options.confirm_window,
            max_lag_ms: load.max_lag_ms,
            failures: outcome.publish_failed,
        },
        outcome,
        throughput,
        latency_ms: latency,
        measurement: Measurement {
            poll_interval_ms: options.poll_interval.as_secs_f64() * 1000.0,
            poll_window: options.poll_window,
            max_poll_rate: options.max_poll_rate,
            polls: load.poll.polls,
            hgets: load.poll.hgets,
            mean_poll_cycle_ms: load.poll.mean_cycle_ms(),
            max_poll_cycle_ms: load.poll.cycle_max.as_secs_f64() * 1000.0,
            mean_poll_rtt_ms: load.poll.mean_rtt_ms(),
            poll_errors: load.poll.errors,
            clock_offset_us: load.clock.offset_us,
            clock_rtt_us: load.clock.rtt_us,
        },
        redis,
        processes,
        hold,
        peak_rss_mb_by_role,
        bare,
        ratios,
        bare_hop,
        targets,
        errors,
    }
}

fn pct_row(out: &mut String, name: &str, p: &Option<Percentiles>) {
    let _ = match p {
        Some(p) => writeln!(
            out,
            "  {name:<24} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
            p.p50, p.p90, p.p99, p.max, p.mean, p.count
        ),
        None => writeln!(out, "  {name:<24} {:>9}", "-"),
    };
}

impl Report {
    /// A readable table.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let rate = self
            .offered_rate
            .map_or("as fast as possible".to_owned(), |r| format!("{r} jobs/s"));
        let _ = writeln!(
            o,
            "conveyor bench {}: {} x {} ({} task(s) each), {rate}, {} deployment {} ({} queues)",
            self.run_id,
            self.jobs,
            self.shape,
            self.tasks_per_job,
            self.mode,
            self.prefix,
            self.queue_type
        );
        if let Some(p) = &self.processes {
            let _ = writeln!(
                o,
                "  spawned: {} dispatcher(s), {} worker(s) at concurrency {}{}",
                p.dispatchers,
                p.workers,
                p.concurrency,
                if p.workers_take_submissions {
                    ", workers take submissions"
                } else {
                    ""
                }
            );
        }
        if let Some(h) = &self.hold {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "hold (workers started only after every job was accepted)"
            );
            let states: Vec<String> = h.states.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let _ = writeln!(
                o,
                "  jobs in flight at sample: {} of {} confirmed (accepted, not finished; states: {})",
                h.jobs_in_flight_at_sample,
                h.confirmed,
                states.join(", ")
            );
            let ready = |n: Option<u32>| n.map_or("?".to_owned(), |n| n.to_string());
            let _ = writeln!(
                o,
                "  ready messages: submit queue {}, task queue {}; accepted {:.3} s after publishing began ({} jobs/s)",
                ready(h.submit_queue_ready),
                ready(h.task_queue_ready),
                h.accept_seconds,
                per_s(h.accept_jobs_per_s)
            );
            for mem in &h.memory {
                let _ = writeln!(
                    o,
                    "  {:<10} pid {:<8} RSS {:>7.1} MB, peak RSS {:.1} MB at sample",
                    mem.role,
                    mem.pid,
                    mem.rss_mb.unwrap_or(f64::NAN),
                    mem.peak_rss_mb.unwrap_or(f64::NAN)
                );
            }
            if let (Some(used), Some(per_job)) = (h.redis_used, h.redis_bytes_per_job) {
                let _ = writeln!(
                    o,
                    "  Redis used_memory at sample {used} B: {per_job:.0} B per job in flight"
                );
            }
            let _ = writeln!(
                o,
                "  drained in {:.3} s from starting the workers (their start-up included) to the last finish ({} jobs/s); throughput and latencies below include the hold",
                h.drain_seconds,
                per_s(h.drain_jobs_per_s)
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "throughput");
        let _ = writeln!(
            o,
            "  {} jobs/s, {} tasks/s  ({} jobs succeeded in {:.3} s, first publish to last finish)",
            per_s(self.throughput.jobs_per_s),
            per_s(self.throughput.tasks_per_s),
            self.outcome.succeeded,
            self.throughput.seconds
        );
        let _ = writeln!(
            o,
            "  published in {:.3} s ({} jobs/s, confirm window {}, max lag behind schedule {:.2} ms)",
            self.publish.seconds,
            per_s(self.publish.jobs_per_s),
            self.publish.confirm_window,
            self.publish.max_lag_ms
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "latency ms                     p50       p90       p99       max      mean    count"
        );
        pct_row(
            &mut o,
            "observed (publish->seen)",
            &self.latency_ms.observed,
        );
        pct_row(
            &mut o,
            "server publish->fin",
            &self.latency_ms.server_publish_to_finish,
        );
        pct_row(
            &mut o,
            "server publish->cr",
            &self.latency_ms.server_publish_to_create,
        );
        pct_row(
            &mut o,
            "server cr->fin",
            &self.latency_ms.server_create_to_finish,
        );
        let m = &self.measurement;
        let _ = writeln!(
            o,
            "  observed over-estimates by <= one poll cycle (mean {:.2} ms, max {:.1} ms) + round trip (mean {:.3} ms);",
            m.mean_poll_cycle_ms, m.max_poll_cycle_ms, m.mean_poll_rtt_ms
        );
        let _ = writeln!(
            o,
            "  {} polls, {} HGETs (window {}, <= {:.0}/s); server clock offset {} us (+-{} us); fin in us, cr in ms",
            m.polls,
            m.hgets,
            m.poll_window,
            m.max_poll_rate,
            m.clock_offset_us,
            m.clock_rtt_us / 2
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "outcome");
        let oc = &self.outcome;
        let _ = writeln!(
            o,
            "  succeeded {}  failed {}  rejected {}  cancelled {}  unfinished {}  publish failed {}  unpublished {}",
            oc.succeeded,
            oc.failed,
            oc.rejected,
            oc.cancelled,
            oc.unfinished,
            oc.publish_failed,
            oc.unpublished
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "memory");
        if let Some(p) = &self.processes {
            for mem in &p.memory {
                let _ = writeln!(
                    o,
                    "  {:<10} pid {:<8} peak RSS {:>7.1} MB  (RSS at end {:.1} MB)",
                    mem.role,
                    mem.pid,
                    mem.peak_rss_mb.unwrap_or(f64::NAN),
                    mem.rss_mb.unwrap_or(f64::NAN)
                );
            }
        }
        match (self.redis.bytes_per_job, self.redis.bytes_per_task) {
            (Some(j), Some(t)) => {
                let _ = writeln!(
                    o,
                    "  Redis used_memory {} -> {} B: {:.0} B/job, {:.0} B/task",
                    self.redis.used_before.unwrap_or(0),
                    self.redis.used_after.unwrap_or(0),
                    j,
                    t
                );
            }
            _ => {
                let _ = writeln!(o, "  Redis used_memory: not available");
            }
        }
        let _ = writeln!(o);
        match (&self.bare, &self.ratios) {
            (Some(b), Some(r)) => {
                let _ = writeln!(
                    o,
                    "bare broker loop ({} queue, {} x {} B persistent, confirm window {}, prefetch {}, {})",
                    b.queue_type,
                    b.messages,
                    b.message_bytes,
                    b.confirm_window,
                    b.prefetch,
                    b.ack_mode
                );
                let _ = writeln!(
                    o,
                    "  {:.0} msgs/s ({:.3} s first publish to last ack; publishing took {:.3} s)",
                    b.msgs_per_s, b.seconds, b.publish_s
                );
                let _ = writeln!(
                    o,
                    "  Conveyor / bare: tasks/s {:.3}, jobs/s {:.3}{}",
                    r.tasks_per_s,
                    r.jobs_per_s,
                    if self.offered_rate.is_some() {
                        "  (bounded by the offered rate)"
                    } else {
                        ""
                    }
                );
            }
            _ => match &self.bare_hop {
                Some(h) => {
                    let _ = writeln!(
                        o,
                        "bare hop ({} queue, {} x {} B persistent at {} msgs/s, publish -> delivery)",
                        h.queue_type, h.messages, h.message_bytes, h.offered_rate
                    );
                    let mut rows = String::new();
                    pct_row(&mut rows, "bare hop", &h.latency_ms);
                    let _ = write!(o, "{rows}");
                    if let (Some(hop), Some(fin)) =
                        (&h.latency_ms, &self.latency_ms.server_publish_to_finish)
                    {
                        let one_hop = self
                            .processes
                            .as_ref()
                            .is_some_and(|p| p.workers_take_submissions);
                        let _ = writeln!(
                            o,
                            "  Conveyor publish->succeeded / bare hop: p50 {:.2}, p99 {:.2} hops (a job is {})",
                            fin.p50 / hop.p50.max(1e-9),
                            fin.p99 / hop.p99.max(1e-9),
                            if one_hop {
                                "1 hop + 2 Redis round trips when a worker takes its submission"
                            } else {
                                "2 hops + 3 Redis round trips"
                            }
                        );
                    }
                }
                None => {
                    let _ = writeln!(o, "bare broker loop: skipped");
                }
            },
        }
        if !self.targets.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "targets");
            for t in &self.targets {
                let _ = writeln!(
                    o,
                    "  [{}] {:<52} {:>10.3} {} {}{}",
                    if t.met { "met" } else { "MISSED" },
                    t.name,
                    t.value,
                    t.op,
                    format_limit(t.limit),
                    t.why_not_met
                        .as_ref()
                        .map_or(String::new(), |why| format!("  (not met: {why})"))
                );
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "errors");
            for e in &self.errors {
                let _ = writeln!(o, "  {e}");
            }
        }
        o
    }
}

/// A rate: whole numbers from 100 up, three significant-ish digits below.
fn per_s(rate: f64) -> String {
    if rate >= 100.0 || rate == 0.0 {
        format!("{rate:.0}")
    } else if rate >= 1.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate:.3}")
    }
}

fn format_limit(limit: f64) -> String {
    if (limit - 1.0 / 3.0).abs() < 1e-9 {
        "1/3".to_owned()
    } else {
        format!("{limit}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::SpawnOptions;
    use crate::bench::load::{ClockSync, JobRecord};

    /// The bench's wall clock at the first publish of these runs, in µs.
    const T0_US: i64 = 1_700_000_000_000_000;

    /// A job published `at_us` after [`T0_US`] (bench wall clock) that
    /// Redis recorded `succeeded` `latency_us` later, and that a poll saw
    /// finished one second after its publish.
    fn succeeded(start: Instant, at_us: i64, latency_us: i64) -> JobRecord {
        let published = start + Duration::from_micros(at_us as u64);
        let published_unix_us = T0_US + at_us;
        JobRecord {
            published: Some(published),
            published_unix_us,
            seen: Some(published + Duration::from_secs(1)),
            state: Some("succeeded".into()),
            created_ms: Some(published_unix_us / 1000),
            finished_us: Some(published_unix_us + latency_us),
            publish_error: None,
        }
    }

    /// A job published `at_us` after [`T0_US`] and never seen terminal.
    fn unfinished(start: Instant, at_us: i64) -> JobRecord {
        JobRecord {
            published: Some(start + Duration::from_micros(at_us as u64)),
            published_unix_us: T0_US + at_us,
            ..JobRecord::default()
        }
    }

    /// The load of these jobs, on a Redis clock equal to the bench's.
    /// `ok` jobs that succeeded 1.5 ms after their publish, then
    /// `unfinished` that never finished; published a millisecond apart.
    fn some_unfinished(ok: i64, unfinished_too: i64) -> Vec<JobRecord> {
        let start = Instant::now();
        (0..ok + unfinished_too)
            .map(|i| {
                if i < ok {
                    succeeded(start, i * 1000, 1500)
                } else {
                    unfinished(start, i * 1000)
                }
            })
            .collect()
    }

    fn load_of(jobs: Vec<JobRecord>) -> LoadResult {
        LoadResult {
            first_publish: jobs.iter().filter_map(|j| j.published).min(),
            last_publish: jobs.iter().filter_map(|j| j.published).max(),
            jobs,
            clock: ClockSync {
                offset_us: 0,
                rtt_us: 20,
            },
            ..LoadResult::default()
        }
    }

    fn spawned() -> Target {
        Target::Spawn(SpawnOptions {
            exe: "conveyor".into(),
            dispatchers: 1,
            workers: 1,
            concurrency: 64,
        })
    }

    /// Options of a run of `jobs` single-task jobs at 1,000 jobs/s (the
    /// latency targets' workload).
    fn at_the_latency_targets_rate(jobs: usize, target: Target) -> Options {
        Options {
            jobs,
            rate: Some(1000.0),
            target,
            ..Options::default()
        }
    }

    fn target<'a>(report: &'a Report, name_starts: &str) -> Option<&'a TargetCheck> {
        report
            .targets
            .iter()
            .find(|t| t.name.starts_with(name_starts))
    }

    fn report_of(options: &Options, load: LoadResult) -> Report {
        build(&Config::default(), options, "r1", load, None, None, None)
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect())
            .unwrap_or_else(|| panic!("samples"));
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        let one = Percentiles::of(vec![3.0]).unwrap_or_else(|| panic!("one sample"));
        assert_eq!((one.p50, one.p99, one.max), (3.0, 3.0, 3.0));
        assert!(Percentiles::of(Vec::new()).is_none());
    }

    #[test]
    fn latency_targets_are_met_by_a_run_in_which_every_job_succeeded() {
        let start = Instant::now();
        let jobs = (0..100).map(|i| succeeded(start, i * 1000, 1500)).collect();
        let report = report_of(&at_the_latency_targets_rate(100, spawned()), load_of(jobs));
        let p99 = target(&report, "p99 ms publish->succeeded").unwrap_or_else(|| panic!("p99"));
        assert!(p99.met && p99.why_not_met.is_none(), "{p99:?}");
    }

    #[test]
    fn latency_targets_are_not_met_when_some_jobs_did_not_succeed_however_fast_the_others_were() {
        // 97 fast jobs; 3 stalled and never finished.
        let jobs = some_unfinished(97, 3);
        let report = report_of(&at_the_latency_targets_rate(100, spawned()), load_of(jobs));
        for name in ["p50 ms publish->succeeded", "p99 ms publish->succeeded"] {
            let t = target(&report, name).unwrap_or_else(|| panic!("{name}"));
            assert!(
                t.value < t.limit,
                "the others' figure alone is within: {t:?}"
            );
            assert!(!t.met, "{t:?}");
            assert_eq!(
                t.why_not_met.as_deref(),
                Some("3 of 100 jobs did not succeed; the figures are of the others")
            );
        }
        assert!(
            report
                .to_text()
                .contains("(not met: 3 of 100 jobs did not succeed")
        );
    }

    /// A worker that died during the run has no memory to read: the
    /// worker memory target is not met on the survivor's figure alone.
    #[test]
    fn a_memory_target_is_not_met_when_a_process_died_during_the_run() {
        let start = Instant::now();
        let worker = |pid, peak| ProcessMemory {
            role: "worker",
            pid,
            peak_rss_mb: peak,
            rss_mb: peak,
        };
        let processes = |memory| Processes {
            dispatchers: 1,
            workers: 2,
            concurrency: 64,
            workers_take_submissions: true,
            memory,
            exits: Vec::new(),
            logs_dir: None,
        };
        let options = Options {
            jobs: 10,
            target: spawned(),
            ..Options::default()
        };
        let build_with = |memory| {
            build(
                &Config::default(),
                &options,
                "r1",
                load_of((0..10).map(|i| succeeded(start, i * 1000, 1500)).collect()),
                None,
                Some(processes(memory)),
                None,
            )
        };
        let both = build_with(vec![worker(10, Some(20.0)), worker(11, Some(21.0))]);
        let t = target(&both, "worker peak RSS").unwrap_or_else(|| panic!("worker target"));
        assert!(t.met, "{t:?}");
        let one_died = build_with(vec![worker(10, Some(20.0)), worker(11, None)]);
        let t = target(&one_died, "worker peak RSS").unwrap_or_else(|| panic!("worker target"));
        assert_eq!(t.value, 20.0);
        assert!(!t.met, "{t:?}");
        assert_eq!(
            t.why_not_met.as_deref(),
            Some("no memory reading of worker 11 (exited during the run?)")
        );
    }

    #[test]
    fn redis_bytes_per_job_divide_the_growth_by_the_jobs_that_succeeded() {
        // 10 published: 5 succeeded, 5 never finished; 10,000 B grown.
        let jobs = some_unfinished(5, 5);
        let load = LoadResult {
            redis_used_before: Some(1_000_000),
            redis_used_after: Some(1_010_000),
            ..load_of(jobs)
        };
        let options = Options {
            jobs: 10,
            target: spawned(),
            ..Options::default()
        };
        let report = report_of(&options, load);
        assert_eq!(report.redis.bytes_per_job, Some(2000.0));
        assert_eq!(report.redis.bytes_per_task, Some(2000.0));
        let t = target(&report, "Redis bytes per").unwrap_or_else(|| panic!("Redis target"));
        assert!(!t.met && t.why_not_met.is_some(), "{t:?}");
    }

    #[test]
    fn the_redis_target_is_judged_in_spawn_mode_only() {
        let start = Instant::now();
        let run = |target: Target| {
            let jobs = (0..10).map(|i| succeeded(start, i * 1000, 1500)).collect();
            let load = LoadResult {
                redis_used_before: Some(1_000_000),
                redis_used_after: Some(1_010_000),
                ..load_of(jobs)
            };
            let options = Options {
                jobs: 10,
                target,
                ..Options::default()
            };
            report_of(&options, load)
        };
        let spawn = run(spawned());
        let t = target(&spawn, "Redis bytes per").unwrap_or_else(|| panic!("Redis target"));
        assert!(t.met, "{t:?}");
        // A live deployment prunes and serves others while the bench runs.
        let live = run(Target::Live {
            prefix: "conveyor".into(),
        });
        assert_eq!(live.redis.bytes_per_job, Some(1000.0), "still reported");
        assert!(
            target(&live, "Redis bytes per").is_none(),
            "{:?}",
            live.targets
        );
    }

    #[test]
    fn throughput_ends_at_the_last_finish_not_at_the_poll_that_saw_it() {
        let start = Instant::now();
        // Published over 0.4 s, each finished 0.1 s later (the last at
        // 0.5 s); the polls saw each a second after its publish.
        let jobs = (0..5)
            .map(|i| succeeded(start, i * 100_000, 100_000))
            .collect();
        let options = Options {
            jobs: 5,
            target: spawned(),
            ..Options::default()
        };
        let report = report_of(&options, load_of(jobs));
        assert!(
            (report.throughput.seconds - 0.5).abs() < 1e-9,
            "{:?}",
            report.throughput
        );
        assert!((report.throughput.jobs_per_s - 10.0).abs() < 1e-9);
    }

    #[test]
    fn succeeded_jobs_whose_finish_time_is_gone_are_reported() {
        let start = Instant::now();
        let mut jobs: Vec<JobRecord> = (0..3).map(|i| succeeded(start, i * 1000, 1500)).collect();
        jobs[0].finished_us = None;
        let options = Options {
            jobs: 3,
            target: spawned(),
            ..Options::default()
        };
        let report = report_of(&options, load_of(jobs));
        assert_eq!(report.outcome.succeeded, 3);
        assert!(
            report
                .errors
                .iter()
                .any(|e| e.starts_with("1 succeeded job(s) had no finish time")),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn the_publish_rate_counts_the_gaps_between_publishes() {
        let start = Instant::now();
        // Ten jobs a second apart: nine seconds, one job a second.
        let jobs = (0..10)
            .map(|i| succeeded(start, i * 1_000_000, 1_000))
            .collect();
        let options = Options {
            jobs: 10,
            rate: Some(1.0),
            target: spawned(),
            ..Options::default()
        };
        let report = report_of(&options, load_of(jobs));
        assert!((report.publish.seconds - 9.0).abs() < 1e-9);
        assert!(
            (report.publish.jobs_per_s - 1.0).abs() < 1e-9,
            "{:?}",
            report.publish
        );
    }

    #[test]
    fn a_held_runs_drain_ends_at_the_last_finish() {
        let start = Instant::now();
        // Workers started 1 s after the first publish; the last job
        // finished 0.25 s after that, and was seen 0.75 s later still.
        let jobs = (0..4)
            .map(|i| succeeded(start, i * 1000, 1_250_000 - i * 1000))
            .collect();
        let hold = HoldInput {
            sample: HoldSample {
                confirmed: 4,
                in_flight: 4,
                states: BTreeMap::from([("pending".to_owned(), 4)]),
                submit_ready: Some(0),
                task_ready: Some(4),
                accept_time: Duration::from_millis(900),
                timed_out: false,
                redis_used: None,
            },
            memory: Vec::new(),
            workers_started: start + Duration::from_secs(1),
            workers_started_unix_us: T0_US + 1_000_000,
        };
        let options = Options {
            jobs: 4,
            target: spawned(),
            hold_workers: true,
            ..Options::default()
        };
        let report = build(
            &Config::default(),
            &options,
            "r1",
            load_of(jobs),
            None,
            None,
            Some(hold),
        );
        let drain = report.hold.unwrap_or_else(|| panic!("hold"));
        assert!((drain.drain_seconds - 0.25).abs() < 1e-9, "{drain:?}");
        assert!((drain.drain_jobs_per_s - 16.0).abs() < 1e-9);
    }
}
