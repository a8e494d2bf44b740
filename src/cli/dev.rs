//! `conveyor dev`: a development server — dispatcher, workers with the
//! built-in handlers, in-process broker and store — in one process, with an
//! optional snapshot file so a restart keeps its jobs. Job files given on
//! the command line are submitted at start; the server runs until Ctrl-C
//! and logs every job that finishes.
//!
//! With `--http-addr` it serves `/healthz` and `/readyz` like a dispatcher
//! does; the HTTP API and status page attach to the same listener and
//! `Embedded` value when they land. Until then `dev` is driven by job
//! files.
//!
//! Ctrl-C stops it as it stops a worker: a second one ends the grace period
//! of the embedded workers at once (they hand their running tasks back,
//! into the snapshot), a third exits.
//!
//! Finished jobs are found by looking at the newest jobs every 200 ms
//! ([`FinishedJobs`]); a session that runs for days must not remember
//! every id it ever reported, nor miss a job that finishes after newer ones
//! pushed it out of that look.

use std::collections::{BTreeSet, HashSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use conveyor::config::Config;
use conveyor::embedded::{Embedded, EmbeddedOptions};
use conveyor::http::ProbeServer;
use conveyor::model::JobState;
use conveyor::shutdown::{ShutdownTrigger, on_signals};
use conveyor::store::{Store, StoreError};

/// Dev options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job files to submit at start.
    jobs: Vec<PathBuf>,
    /// Keep the store in this file across restarts.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Workers.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    workers: usize,
    /// Concurrency of each worker [default: `worker.concurrency` of the
    /// configuration, 16 unless set].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Serve `/healthz` and `/readyz` on this address (e.g. 127.0.0.1:8080).
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
}

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(concurrency) = args.concurrency {
        config.worker.concurrency = concurrency;
    }
    config.validate()?;
    // Every file read before anything starts: one that cannot be read
    // stops the command before any job of the others is submitted.
    let mut bodies = Vec::with_capacity(args.jobs.len());
    for file in &args.jobs {
        let body = super::job_file::read_bounded(file, super::job_file::LARGEST_JOB_FILE)?;
        bodies.push((file, body));
    }
    let trigger = ShutdownTrigger::new();
    // A terminal closed under it (SIGHUP) stops it as Ctrl-C does, with
    // its last snapshot.
    on_signals(trigger.clone(), true);
    let started = std::time::Instant::now();
    let probes = ProbeServer::start_if(args.http_addr.or(config.http_addr)).await?;
    let embedded = Embedded::start(
        &config,
        conveyor_builtin_handlers::registry(),
        EmbeddedOptions {
            workers: args.workers,
            concurrency: config.worker.concurrency,
            snapshot: args.snapshot.clone(),
            ..EmbeddedOptions::default()
        },
    )
    .await?;
    if let Some(p) = &probes {
        p.attach(embedded.health());
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        snapshot = ?args.snapshot,
        "conveyor dev running in-process (no RabbitMQ or Redis; production uses both); Ctrl-C stops"
    );
    let mut shutdown = trigger.subscribe();
    for (file, body) in bodies {
        // Stopped (Ctrl-C) while starting or submitting: the files not yet
        // submitted are not, and the stop below saves what was.
        if shutdown.is_triggered() {
            tracing::info!(file = %file.display(), "stopping; not submitted");
            continue;
        }
        if let Err(e) = embedded.submit(body).await {
            // Saved first: the jobs submitted so far are kept.
            embedded.shutdown_now().await?;
            return Err(e);
        }
        tracing::info!(file = %file.display(), "submitted");
    }
    let store = embedded.store();
    // The newest 1,000 jobs each look, and 50 lookups of unfinished jobs
    // older than those (a lookup reads a job's whole status).
    let mut finished_jobs = FinishedJobs::new(1000, 50);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        match finished_jobs.look(&*store).await {
            Ok(finished) => {
                for job in finished {
                    tracing::info!(job = %job.id, state = %job.state, tasks = job.tasks, "job finished");
                }
            }
            // Only the log of finished jobs misses a look: the jobs run on.
            Err(e) => tracing::warn!(error = %e, "cannot list the jobs; trying again"),
        }
    }
    // A second Ctrl-C, now or while the workers wait for running tasks,
    // hurries their stop.
    embedded.shutdown_hurried_by(trigger.subscribe()).await?;
    Ok(ExitCode::SUCCESS)
}

/// A job to log as finished.
#[derive(Debug, Clone, PartialEq)]
struct FinishedJob {
    id: String,
    state: JobState,
    tasks: u32,
}

/// Which jobs finished since the last look, each told once. Remembers the
/// ids of the last listing of the newest jobs and of the jobs seen
/// unfinished, nothing more: what it holds is bounded by the listing and by
/// the jobs in flight, which the store holds anyway.
///
/// A job is new to a listing if it was not in the previous one and sorts
/// above the oldest job of that listing (or that listing held every job):
/// a job found below it is one pushed out earlier that came back as newer
/// jobs expired, and is told again only if it was seen unfinished. A new
/// job already finished is told at once; an unfinished one is remembered,
/// and told when a look finds it finished, in the listing or, once newer
/// jobs pushed it out, by looking it up (a few per look, in turn). When
/// more jobs were created between two looks than the listing holds, the
/// listing widens until it reaches the jobs seen before.
#[derive(Debug)]
struct FinishedJobs {
    /// Newest jobs listed in a look (more when many were created since).
    window: usize,
    /// Most unfinished jobs outside the listing looked up per look.
    lookups: usize,
    /// Whether the first look (which collects every unfinished job) is
    /// done.
    started: bool,
    /// Ids of the previous listing.
    listed: HashSet<String>,
    /// The creation time and id of the oldest job of the previous listing
    /// if it was full (older jobs were left out of it); `None` if it held
    /// every job.
    listed_down_to: Option<(u64, String)>,
    /// The creation time of the newest job of the previous listing.
    newest_ms: Option<u64>,
    /// Jobs seen unfinished and not yet told.
    unfinished: BTreeSet<String>,
    /// The last of them looked up, where the next look's lookups go on.
    looked_up_to: Option<String>,
}

impl FinishedJobs {
    fn new(window: usize, lookups: usize) -> FinishedJobs {
        FinishedJobs {
            window: window.max(1),
            lookups,
            started: false,
            listed: HashSet::new(),
            listed_down_to: None,
            newest_ms: None,
            unfinished: BTreeSet::new(),
            looked_up_to: None,
        }
    }

    /// The jobs that finished since the last look (on the first, those
    /// among the newest `window` that have finished already).
    async fn look(&mut self, store: &dyn Store) -> Result<Vec<FinishedJob>, StoreError> {
        if !self.started {
            // Jobs of a restored snapshot unfinished beyond the listing.
            for state in [JobState::Pending, JobState::Running] {
                for job in store.list_jobs(Some(state), usize::MAX).await? {
                    self.unfinished.insert(job.id);
                }
            }
            self.started = true;
        }
        let mut limit = self.window;
        let listing = loop {
            let listing = store.list_jobs(None, limit).await?;
            let reached_the_previous_look = match (listing.last(), self.newest_ms) {
                (Some(oldest), Some(newest_ms)) => oldest.created_ms < newest_ms,
                _ => true,
            };
            if listing.len() < limit || reached_the_previous_look {
                break listing;
            }
            limit = limit.saturating_mul(2);
        };
        let mut finished = Vec::new();
        for job in &listing {
            let new = !self.listed.contains(&job.id)
                && self
                    .listed_down_to
                    .as_ref()
                    .is_none_or(|(ms, id)| (job.created_ms, job.id.as_str()) > (*ms, id.as_str()));
            if job.state.is_terminal() {
                if self.unfinished.remove(&job.id) || new {
                    finished.push(FinishedJob {
                        id: job.id.clone(),
                        state: job.state,
                        tasks: job.tasks,
                    });
                }
            } else if new {
                self.unfinished.insert(job.id.clone());
            }
        }
        self.listed = listing.iter().map(|j| j.id.clone()).collect();
        self.listed_down_to = listing
            .last()
            .filter(|_| listing.len() >= limit)
            .map(|oldest| (oldest.created_ms, oldest.id.clone()));
        self.newest_ms = listing.first().map(|newest| newest.created_ms);
        for id in self.next_lookups() {
            match store.job(&id).await? {
                Some(status) if status.state.is_terminal() => {
                    self.unfinished.remove(&id);
                    finished.push(FinishedJob {
                        id,
                        state: status.state,
                        tasks: status.tasks.len() as u32,
                    });
                }
                Some(_) => {}
                // Gone (expired, or never recorded): nothing to tell.
                None => {
                    self.unfinished.remove(&id);
                }
            }
        }
        Ok(finished)
    }

    /// Up to `lookups` unfinished jobs outside the listing, going on after
    /// the last looked up (and round to the first), so that each is looked
    /// up in turn however many there are.
    fn next_lookups(&mut self) -> Vec<String> {
        let after = match &self.looked_up_to {
            Some(id) => Bound::Excluded(id.as_str()),
            None => Bound::Unbounded,
        };
        let up_to = match &self.looked_up_to {
            Some(id) => Bound::Included(id.as_str()),
            None => Bound::Excluded(""),
        };
        let next: Vec<String> = self
            .unfinished
            .range::<str, _>((after, Bound::Unbounded))
            .chain(self.unfinished.range::<str, _>((Bound::Unbounded, up_to)))
            .filter(|id| !self.listed.contains(*id))
            .take(self.lookups)
            .cloned()
            .collect();
        if let Some(last) = next.last() {
            self.looked_up_to = Some(last.clone());
        }
        next
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use conveyor::intake::{Intake, JobIntake};
    use conveyor::store::memory::{MemoryStore, TokioClock};
    use conveyor::store::{AttemptResult, ClaimOutcome, ClaimRef, Created};

    use super::*;

    const RETENTION: Duration = Duration::from_secs(60);

    struct Jobs {
        store: MemoryStore,
        intake: JobIntake,
    }

    impl Jobs {
        fn new() -> Jobs {
            Jobs {
                store: MemoryStore::new(Arc::new(TokioClock::new(1_000_000)), RETENTION, 1, "t"),
                intake: JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry())
                    .unwrap(),
            }
        }

        /// A one-task job `id`, created a millisecond after the one
        /// before, its task claimed.
        async fn running(&self, id: &str) -> ClaimRef {
            tokio::time::advance(Duration::from_millis(1)).await;
            let body = serde_json::json!({"id": id, "requestor": "r",
                "tasks": [{"name": "t", "handler": "noop"}]});
            let Intake::Valid(job) = self.intake.accept(body.to_string().as_bytes()) else {
                panic!("{id} is not valid");
            };
            let Created::New { ready } = self.store.create_job(&job).await.unwrap() else {
                panic!("{id} exists");
            };
            match self
                .store
                .claim(&ready[0], "w", Duration::from_secs(3600))
                .await
                .unwrap()
            {
                ClaimOutcome::Claimed(claimed) => claimed.claim,
                other => panic!("claim of {id}: {other:?}"),
            }
        }

        async fn finish(&self, claim: &ClaimRef) {
            self.store
                .complete(claim, "w", &AttemptResult::Succeeded("{}".into()))
                .await
                .unwrap();
        }

        async fn finished(&self, id: &str) {
            let claim = self.running(id).await;
            self.finish(&claim).await;
        }
    }

    async fn told(finished_jobs: &mut FinishedJobs, jobs: &Jobs) -> Vec<String> {
        let mut ids: Vec<String> = finished_jobs
            .look(&jobs.store)
            .await
            .unwrap()
            .into_iter()
            .map(|job| job.id)
            .collect();
        ids.sort();
        ids
    }

    /// What it remembers: the last listing and the jobs in flight.
    fn remembered(finished_jobs: &FinishedJobs) -> usize {
        finished_jobs.listed.len() + finished_jobs.unfinished.len()
    }

    #[tokio::test(start_paused = true)]
    async fn every_job_is_told_once_even_when_more_than_a_listing_finish_between_two_looks() {
        let jobs = Jobs::new();
        let mut finished_jobs = FinishedJobs::new(2, 10);
        jobs.finished("a").await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["a"]);
        for id in ["b", "c", "d", "e", "f"] {
            jobs.finished(id).await;
        }
        assert_eq!(
            told(&mut finished_jobs, &jobs).await,
            ["b", "c", "d", "e", "f"]
        );
        assert!(told(&mut finished_jobs, &jobs).await.is_empty());
        assert!(remembered(&finished_jobs) <= 2, "back to a listing of two");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_finishes_after_newer_jobs_pushed_it_out_of_the_listing_is_told() {
        let jobs = Jobs::new();
        let mut finished_jobs = FinishedJobs::new(2, 10);
        let long = jobs.running("long").await;
        assert!(told(&mut finished_jobs, &jobs).await.is_empty());
        for id in ["a", "b", "c"] {
            jobs.finished(id).await;
        }
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["a", "b", "c"]);
        jobs.finish(&long).await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["long"]);
        assert!(told(&mut finished_jobs, &jobs).await.is_empty());
        assert_eq!(remembered(&finished_jobs), 2, "the listing only");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_told_finished_is_not_told_again_when_it_comes_back_into_the_listing() {
        let jobs = Jobs::new();
        let mut finished_jobs = FinishedJobs::new(2, 10);
        let long = jobs.running("long").await;
        jobs.finished("a").await;
        jobs.finished("b").await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["a", "b"]);
        tokio::time::advance(RETENTION / 2).await;
        jobs.finish(&long).await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["long"]);
        // "a" and "b" expire; "long", which finished later, is the newest
        // job again.
        tokio::time::advance(RETENTION / 2 + Duration::from_secs(1)).await;
        assert!(told(&mut finished_jobs, &jobs).await.is_empty());
        jobs.finished("c").await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn unfinished_jobs_beyond_the_first_listing_are_told_when_they_finish() {
        let jobs = Jobs::new();
        let old = jobs.running("old").await;
        for id in ["a", "b", "c"] {
            jobs.finished(id).await;
        }
        let mut finished_jobs = FinishedJobs::new(2, 10);
        assert_eq!(
            told(&mut finished_jobs, &jobs).await,
            ["b", "c"],
            "a start tells the newest jobs that finished"
        );
        jobs.finish(&old).await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["old"]);
    }

    #[tokio::test(start_paused = true)]
    async fn unfinished_jobs_outside_the_listing_are_looked_up_a_few_at_a_time_in_turn() {
        let jobs = Jobs::new();
        let mut finished_jobs = FinishedJobs::new(2, 2);
        let mut claims = Vec::new();
        for id in ["u1", "u2", "u3", "u4", "u5"] {
            claims.push(jobs.running(id).await);
        }
        jobs.finished("newer").await;
        jobs.finished("newest").await;
        assert_eq!(told(&mut finished_jobs, &jobs).await, ["newer", "newest"]);
        for claim in &claims {
            jobs.finish(claim).await;
        }
        let mut all = Vec::new();
        for _ in 0..3 {
            let ids = told(&mut finished_jobs, &jobs).await;
            assert!(ids.len() <= 2, "two lookups a look at most: {ids:?}");
            all.extend(ids);
        }
        all.sort();
        assert_eq!(all, ["u1", "u2", "u3", "u4", "u5"]);
    }
}
