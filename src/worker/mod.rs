//! The worker: consumes task queues, claims each task in the store under a
//! lease, runs its handler, and applies the outcome itself.
//!
//! The order of a task's life here is what keeps the invariants:
//! 1. **claim** in the store (a second claim of the same attempt fails);
//! 2. **ack** the delivery: the claim is durable and its lease is indexed,
//!    so from here on a dead worker is the lease sweep's business, and a
//!    long task never holds a delivery near RabbitMQ's `consumer_timeout`;
//! 3. **run** the handler, renewing the lease meanwhile;
//! 4. **complete**: one store transition applies the outcome (checked
//!    against the claim's fencing number, so a late outcome from a lapsed
//!    claim is rejected) and returns the dependents it made ready;
//! 5. **publish** those, confirmed, and only then drop the lease index
//!    entry — a crash before that leaves the sweep to publish them again.
//!
//! A worker may also accept submissions ([`Worker::accepting_submissions`]):
//! it then consumes the submit queue at a higher consumer priority than
//! dispatchers, records each job as a dispatcher would, and claims one of
//! its root tasks itself, so that task skips the task queue (one broker hop
//! fewer per job; see `submission.rs`). From the claim on, that task's life
//! is the one above.

mod execute;
mod journal;
mod leases;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use conveyor_handler::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, Delivery, Subscription};
use crate::consumer::{Consumer, Permits, consume, give_back};
use crate::health::Health;
use crate::intake::JobIntake;
use crate::model::{DeadLetterReason, TaskMessage};
use crate::names::Names;
use crate::outbox::{BROKER_REFUSAL_PAUSE, Outbox};
use crate::panics::{RESTART_PAUSE, restart_on_panic};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::store::redis::unix_ms;
use crate::store::{Applied, AttemptResult, ClaimOutcome, ClaimRef, Claimed, Store, WorkerInfo};
use crate::submission::{RunHere, Submissions};

pub use execute::{AttemptEnd, run_attempt};
pub use journal::Journal;
use leases::{ActiveClaims, ClaimLost};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per process; recorded in claims and history.
    pub id: String,
    /// Queues consumed, without prefix.
    pub queues: Vec<String>,
    /// Handlers run at once.
    pub concurrency: usize,
    /// Lease of a claim; renewed every third of it.
    pub lease: Duration,
    /// How long shutdown waits for running handlers before handing their
    /// tasks back.
    pub grace: Duration,
    /// Registry heartbeat.
    pub heartbeat: Duration,
    /// A task message delivered this many times without reaching a claim
    /// is poison: dead-lettered, and its task failed with the reason.
    pub max_deliveries: u32,
    /// Longest a task delivery waits here for a free slot before the
    /// worker gives back what it holds (see [`Permits::Hold`]).
    pub hold: Duration,
    /// Largest result of one task, in bytes of JSON (`limits.max_result_bytes`).
    pub max_result_bytes: usize,
    /// Where to journal claims, renewals and ends (see [`Journal`]).
    pub journal: Option<Journal>,
}

impl WorkerOptions {
    /// The options `config` sets for a worker named `id`, with no journal.
    pub fn from_config(config: &crate::config::Config, id: impl Into<String>) -> WorkerOptions {
        WorkerOptions {
            id: id.into(),
            queues: config.worker.queues.clone(),
            concurrency: config.worker.concurrency,
            lease: config.lease(),
            grace: Duration::from_secs(config.worker.grace_s),
            heartbeat: Duration::from_millis(config.worker.heartbeat_ms),
            max_deliveries: config.worker.max_deliveries,
            hold: Duration::from_millis(config.worker.hold_ms),
            max_result_bytes: config.limits.max_result_bytes,
            journal: None,
        }
    }
}

/// One worker process's task loop.
#[derive(Clone)]
pub struct Worker {
    store: Arc<dyn Store>,
    outbox: Outbox,
    registry: Registry,
    names: Names,
    options: WorkerOptions,
    active: ActiveClaims,
    health: Health,
    submissions: Option<Submissions>,
    /// Consume, besides `options.queues`, every task queue a job names, as
    /// the store comes to know it, looking this often
    /// ([`Worker::following_new_queues`]).
    follow_queues: Option<Duration>,
    /// Cancels of outside work under way, waited for before `run` ends.
    cancels: execute::Cancels,
}

/// The consumer priority of a worker's submit consumer: above the
/// dispatchers' (0), so submissions go to workers while they have room
/// and to dispatchers only when every worker is full.
pub const SUBMISSION_PRIORITY: i16 = 10;

/// How long a submission waits for a free slot to run its root here before
/// it is handled as a dispatcher would (recorded, root published). Long
/// enough that under a flood of short tasks, where slots free every few
/// milliseconds, submissions still run here; short enough that a worker
/// whose slots are all held by long tasks records new jobs at once.
pub const SUBMISSION_PATIENCE: Duration = Duration::from_millis(50);

/// Longest a worker waits for an aborted handler's run to stop (see
/// `execute::HandlerAlive`) before it hands its task back or applies its
/// end: a handler that blocks its thread may never yield to the abort.
pub const HANDLER_STOP_WAIT: Duration = Duration::from_secs(5);

/// How a running task learns the worker is stopping: `graceful` when it
/// should take on nothing new, `hard` when the grace period is over and
/// its claim goes back.
#[derive(Clone)]
struct Stops {
    graceful: Shutdown,
    hard: Shutdown,
}

/// A claimed task to run in a slot: its claim (renewed from when it was
/// taken), when the claim was asked for, and the signal that it is lost.
struct NextRun {
    claimed: Claimed,
    asked: Instant,
    lost: ClaimLost,
}

/// A delivery handed from a consumer to the run loop.
enum Work {
    Task(Delivery),
    Submission(Delivery),
}

impl Worker {
    /// A worker; nothing runs until [`Worker::run`].
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        registry: Registry,
        names: Names,
        options: WorkerOptions,
    ) -> Worker {
        Worker {
            health: Health::new(store.clone(), broker.clone()),
            store,
            outbox: Outbox::new(broker, names.clone()),
            registry,
            names,
            active: ActiveClaims::new(options.journal.clone()),
            options,
            submissions: None,
            follow_queues: None,
            cancels: execute::Cancels::tracked(),
        }
    }

    /// This worker also consumes the submit queue and records jobs as a
    /// dispatcher does, validating them with `intake`, and runs one root
    /// task of each new job itself instead of publishing it. What `intake`
    /// would refuse (a job naming a handler it lacks, bad input of any
    /// kind) is not judged here: it is referred, unchanged, to
    /// `<prefix>.submit.referred`, for the dispatchers to record or
    /// dead-letter with their own registry. A dispatcher is still needed
    /// for those, for the sweep (retries, lapsed leases), and takes
    /// submissions when every worker is full.
    pub fn accepting_submissions(mut self, intake: JobIntake) -> Worker {
        self.submissions = Some(Submissions {
            store: self.store.clone(),
            outbox: self.outbox.clone(),
            intake,
            health: self.health.clone(),
            refer_refusals: true,
        });
        self
    }

    /// Consume, besides its configured queues, every task queue a job names
    /// ([`Store::known_queues`]), starting within `every` of the store
    /// knowing it. For a worker that is the only one of its deployment
    /// (`conveyor dev`), where a job naming a queue no worker consumes
    /// would wait for ever: a deployment of many workers gives each the
    /// queues its handlers and machines are for.
    pub fn following_new_queues(mut self, every: Duration) -> Worker {
        self.follow_queues = Some(every);
        self
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.options.id
    }

    /// Whether the worker can take work (store and broker reachable).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Consume and run tasks until `shutdown` fires; then stop consuming,
    /// wait up to the grace period (or until shutdown is hurried) for
    /// running handlers, and hand back what did not finish. Broker and store outages are waited out.
    ///
    /// Everything the worker runs is owned by this future: dropping it (a
    /// simulated crash) stops every consumer, handler and renewal at once,
    /// and the broker takes back the unacked deliveries.
    pub async fn run(&self, shutdown: Shutdown) -> Result<(), BrokerError> {
        // One of its queues that exists with other arguments is consumed
        // as it is.
        self.outbox.declare_topology(&self.options.queues).await?;

        let hard_stop = ShutdownTrigger::new();
        let permits = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        // Each started again if it panics (see `panics.rs`): without
        // renewals every claim would lapse under its running task.
        let mut background = JoinSet::new();
        {
            let this = self.clone();
            background.spawn(restart_on_panic("heartbeat", RESTART_PAUSE, move || {
                let this = this.clone();
                async move { this.heartbeat_forever().await }
            }));
        }
        {
            let this = self.clone();
            // Sooner than the others: the shortest lease is 300 ms.
            background.spawn(restart_on_panic(
                "lease renewals",
                leases::RENEW_RETRY,
                move || {
                    let this = this.clone();
                    async move {
                        this.active
                            .renew_forever(
                                this.store.clone(),
                                this.options.lease,
                                Some(this.health.clone()),
                            )
                            .await
                    }
                },
            ));
        }
        // Consumers hand deliveries (with their permit) to this loop, which
        // owns every running task. Unbounded, because what is in it is
        // bounded already: one item per permit, plus submissions handed on
        // without one (at most the submit consumer's prefetch per channel);
        // a send then fails only when the run loop is gone.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut consumers = JoinSet::new();
        let task_queues = self
            .options
            .queues
            .iter()
            .map(|q| (self.names.task_queue(q), false));
        let submit_queue = self
            .submissions
            .is_some()
            .then(|| (self.names.submit_queue(), true));
        for (queue, submissions) in task_queues.chain(submit_queue) {
            let this = self.clone();
            let shutdown = shutdown.clone();
            let permits = permits.clone();
            let tx = tx.clone();
            consumers.spawn(async move {
                this.consume(queue, submissions, permits, shutdown, tx)
                    .await
            });
        }
        if let Some(every) = self.follow_queues {
            let this = self.clone();
            let shutdown = shutdown.clone();
            let permits = permits.clone();
            let tx = tx.clone();
            consumers
                .spawn(async move { this.consume_new_queues(every, permits, shutdown, tx).await });
        }
        drop(tx);
        tracing::info!(worker = %self.options.id, queues = ?self.options.queues, concurrency = self.options.concurrency,
            submissions = self.submissions.is_some(), "worker consuming");
        let mut running = JoinSet::new();
        // The grace period runs from the signal, not from when the
        // consumers are done stopping (the work channel closes only then):
        // their cancels and give-backs wait on the broker (up to 5 s and
        // 30 s), and a supervisor that kills the process `grace_s` after
        // SIGTERM would find the handlers still running, their tasks not
        // handed back, their leases to lapse. A task of its own keeps the
        // time, so receiving work costs nothing more; in the background
        // set, so that it goes with `run`'s future if that is dropped (a
        // simulated crash).
        let grace_timer = {
            let (this, mut shutdown) = (self.clone(), shutdown.clone());
            let hard_stop = hard_stop.clone();
            background.spawn(async move {
                shutdown.wait().await;
                let deadline = tokio::time::Instant::now() + this.options.grace;
                let hurried = tokio::select! {
                    biased;
                    () = shutdown.hurried() => true,
                    () = tokio::time::sleep_until(deadline) => false,
                };
                let running = this.active.len();
                if !hurried && running > 0 {
                    tracing::warn!(running, "grace period over; handing back unfinished tasks");
                }
                hard_stop.trigger();
            })
        };
        while let Some((work, permit)) = rx.recv().await {
            let this = self.clone();
            let stops = Stops {
                graceful: shutdown.clone(),
                hard: hard_stop.subscribe(),
            };
            running.spawn(async move {
                match work {
                    Work::Task(delivery) => this.process(delivery, stops).await,
                    Work::Submission(delivery) => {
                        this.accept(delivery, permit.is_some(), stops).await;
                    }
                }
                drop(permit);
            });
            while let Some(done) = running.try_join_next() {
                crate::consumer::log_if_panicked(done);
            }
        }
        // Shutdown: consumers have cancelled their subscriptions (kept
        // until the end, so unfinished deliveries are not handed back early).
        let mut subscriptions = Vec::new();
        while let Some(done) = consumers.join_next().await {
            if let Ok(s) = done {
                subscriptions.extend(s);
            }
        }
        // Running tasks finish, or are handed back once the grace timer
        // stops them hard (bounded then: a hand-back waits at most on its
        // publish).
        let mut stopped_hard = hard_stop.subscribe();
        {
            let drain = async {
                while let Some(done) = running.join_next().await {
                    crate::consumer::log_if_panicked(done);
                }
            };
            tokio::pin!(drain);
            let drained = tokio::select! {
                biased;
                () = &mut drain => true,
                () = stopped_hard.wait() => false,
            };
            if !drained {
                let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
            }
        }
        // What the drain gave up on is dropped now, before the cancels are
        // waited for: a run dropped with an unread `Started` asks for its
        // cancel as it goes.
        running.shutdown().await;
        grace_timer.abort();
        // A hand-back may have asked a handler to cancel outside work: sent
        // before the process ends, or the task, run again, starts it twice
        // (up to 11 s more, past the grace period: a supervisor that kills
        // at `grace_s` cuts it short).
        self.cancels.wait(execute::CANCEL_WAIT).await;
        crate::broker::close_all(subscriptions).await;
        background.abort_all();
        if let Err(e) = self.store.unregister(&self.options.id).await {
            tracing::warn!(error = %e, "could not unregister worker");
        }
        tracing::info!(worker = %self.options.id, "worker stopped");
        Ok(())
    }

    /// Looks at the store's known queues every `every` and consumes each
    /// that no consumer of this worker takes yet, as [`Self::consume`] does
    /// its configured ones. Returns every subscription it made, cancelled,
    /// at shutdown.
    async fn consume_new_queues(
        &self,
        every: Duration,
        permits: Arc<Semaphore>,
        mut shutdown: Shutdown,
        tx: mpsc::UnboundedSender<(Work, Option<OwnedSemaphorePermit>)>,
    ) -> Vec<Box<dyn Subscription>> {
        let mut consumed: HashSet<String> = self.options.queues.iter().cloned().collect();
        let mut consumers = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.wait() => break,
                () = tokio::time::sleep(every) => {}
            }
            let known = match self.store.known_queues().await {
                Ok(known) => known,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list the known queues; trying again");
                    continue;
                }
            };
            for queue in known {
                if consumed.contains(&queue) {
                    continue;
                }
                if let Err(e) = self
                    .outbox
                    .declare_task_queues(std::iter::once(queue.as_str()))
                    .await
                {
                    tracing::warn!(queue, error = %e, "cannot declare a queue a job named; trying again");
                    continue;
                }
                tracing::info!(worker = %self.options.id, queue, "consuming a queue a job named");
                consumed.insert(queue.clone());
                let this = self.clone();
                let (shutdown, permits, tx) = (shutdown.clone(), permits.clone(), tx.clone());
                let queue = self.names.task_queue(&queue);
                consumers
                    .spawn(async move { this.consume(queue, false, permits, shutdown, tx).await });
            }
        }
        drop(tx);
        let mut subscriptions = Vec::new();
        while let Some(done) = consumers.join_next().await {
            if let Ok(s) = done {
                subscriptions.extend(s);
            }
        }
        subscriptions
    }

    /// One queue's consumer: passes deliveries (with their permit) to the
    /// run loop. Returns its cancelled subscriptions at shutdown. Task
    /// deliveries wait for a permit; `submissions` (the submit queue, ahead
    /// of dispatchers) wait at most [`SUBMISSION_PATIENCE`], and are then
    /// handled as a dispatcher would, so a worker busy with long tasks
    /// never sits on jobs it has not recorded.
    async fn consume(
        &self,
        queue: String,
        submissions: bool,
        permits: Arc<Semaphore>,
        mut shutdown: Shutdown,
        tx: mpsc::UnboundedSender<(Work, Option<OwnedSemaphorePermit>)>,
    ) -> Vec<Box<dyn Subscription>> {
        let prefetch = u16::try_from(self.options.concurrency)
            .unwrap_or(u16::MAX)
            .max(1);
        let (priority, permits, work): (i16, Permits<'_>, fn(Delivery) -> Work) = if submissions {
            (
                SUBMISSION_PRIORITY,
                Permits::Within(&permits, SUBMISSION_PATIENCE),
                Work::Submission,
            )
        } else {
            (0, Permits::Hold(&permits, self.options.hold), Work::Task)
        };
        consume(
            self.outbox.broker().as_ref(),
            Consumer {
                queue: &queue,
                owner: &self.options.id,
                prefetch,
                priority,
                permits,
                store_down_give_back: crate::consumer::STORE_DOWN_GIVE_BACK
                    .min(self.options.lease / 2),
            },
            &self.health,
            &mut shutdown,
            |delivery, permit| tx.send((work(delivery), permit)).is_ok(),
        )
        .await
    }

    /// Handle one submission; with a permit (`run_here`), run the root task
    /// it claimed, if any.
    async fn accept(&self, delivery: Delivery, run_here: bool, stops: Stops) {
        let Some(submissions) = &self.submissions else {
            // Not consumed without submissions; give it back regardless.
            let _ = delivery.acker.requeue().await;
            return;
        };
        let asked = Instant::now();
        // Renewed from its claim on, while the submission's other ready
        // tasks are published and its reply sent (a broker that blocks
        // publishers holds those up for longer than a lease).
        let registered: std::sync::Mutex<Option<(ClaimRef, ClaimLost)>> = Default::default();
        let register = |claim: &ClaimRef| {
            let lost = self.active.insert(claim.clone(), asked);
            *registered.lock().unwrap_or_else(|p| p.into_inner()) = Some((claim.clone(), lost));
        };
        let here = run_here.then(|| RunHere {
            queues: &self.options.queues,
            worker: &self.options.id,
            lease: self.options.lease,
            claimed: &register,
        });
        let claimed = submissions
            .handle(delivery, here, Some(&stops.graceful))
            .await;
        let registered = registered.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (claimed, registered) {
            (Some(claimed), Some((claim, lost))) if claim == claimed.claim => {
                self.run_from(*claimed, asked, lost, stops).await;
            }
            (Some(claimed), _) => self.run_claimed(*claimed, asked, stops).await,
            // A claim made and not handed over to run (no path does so
            // today) is not renewed for ever: the sweep takes it back.
            (None, Some((claim, _))) => self.active.remove(&claim),
            (None, None) => {}
        }
    }

    /// Handle one delivery from claim to confirmed follow-ups.
    async fn process(&self, delivery: Delivery, stops: Stops) {
        let task = match TaskMessage::decode(&delivery.body) {
            Ok(t) => t,
            Err(reason) => {
                return self
                    .dead_letter(delivery, DeadLetterReason::BadTaskMessage, &reason)
                    .await;
            }
        };
        let delivery = if delivery.delivery_count >= self.options.max_deliveries {
            match self.poisoned(delivery, &task).await {
                Some(delivery) => delivery,
                None => return,
            }
        } else {
            delivery
        };
        let asked = Instant::now();
        let claimed = match self
            .store
            .claim(&task, &self.options.id, self.options.lease)
            .await
        {
            Ok(ClaimOutcome::Claimed(claimed)) => claimed,
            Ok(ClaimOutcome::Busy | ClaimOutcome::Stale) => {
                tracing::debug!(job = %task.job, task = %task.task, attempt = task.attempt, "duplicate or stale task message; dropped");
                return ack(delivery).await;
            }
            Ok(ClaimOutcome::Missing) => {
                let reason = format!(
                    "job {} has no record in the store (expired, or the store lost its data)",
                    task.job
                );
                return self
                    .dead_letter(delivery, DeadLetterReason::JobMissing, &reason)
                    .await;
            }
            Err(e) => {
                // Redis is unreachable: take nothing, lose nothing. The
                // message goes back as a new one (an outage is not a
                // failed delivery: requeued, it would count towards
                // poison) and consumption pauses until Redis answers.
                if e.is_retryable() {
                    tracing::warn!(error = %e, "store unavailable; giving the task message back");
                    self.health.mark_store_down();
                    give_back(self.outbox.broker().as_ref(), vec![delivery]).await;
                    return;
                }
                // A claim the store refuses for good (a script error on a
                // corrupt record, or one another version wrote): no retry
                // cures it, and requeued it would loop (for ever on a
                // classic queue, which counts no deliveries). Dead-lettered
                // with the error, to publish again once the record is
                // mended; the task stays as its record is.
                let reason = format!(
                    "the store cannot claim task {} of job {}: {e}",
                    task.task, task.job
                );
                tracing::error!(job = %task.job, task = %task.task, error = %e, "claim refused for good; task message dead-lettered");
                return self
                    .dead_letter(delivery, DeadLetterReason::UnusableRecord, &reason)
                    .await;
            }
        };
        ack(delivery).await;
        self.run_claimed(*claimed, asked, stops).await;
    }

    /// Run a claimed task (its delivery, if any, acked; the claim asked
    /// for at `asked`) to its outcome, then, in the same slot, each task its
    /// completion made ready and this worker took on (see
    /// [`Worker::finish`]): a chain runs here without a broker hop per step.
    async fn run_claimed(&self, claimed: Claimed, asked: Instant, stops: Stops) {
        let lost = self.active.insert(claimed.claim.clone(), asked);
        self.run_from(claimed, asked, lost, stops).await;
    }

    /// [`Self::run_claimed`] of a claim renewed already, `lost` its signal.
    async fn run_from(&self, claimed: Claimed, asked: Instant, lost: ClaimLost, stops: Stops) {
        let mut next = Some(NextRun {
            claimed,
            asked,
            lost,
        });
        while let Some(run) = next {
            next = self.run_one(run, &stops).await;
        }
    }

    /// Whether a claim asked for at `asked` may have lapsed before its run
    /// starts and been taken over, so that running it now would run the
    /// task beside the claim that took it over. Its lease runs down from
    /// its claim, or from its last renewal the store confirmed (a claim
    /// taken to run next is renewed while the worker publishes what its
    /// previous run made ready), normally for milliseconds before the run,
    /// but a process paused or starved past a renewal period (a third of
    /// the lease) renews it first. False when it is still held. When the
    /// store cannot say: false while the last confirmation is less than a
    /// lease old (the claim is live; the renewals stop the run if it turns
    /// out lost); past that a sweep may have handed the task to another
    /// claim, so the run waits for the renewals to reach the store and say
    /// (`lost`, or a fresh confirmation), and is not run on a hard stop.
    async fn lapsed_before_its_run(
        &self,
        claim: &ClaimRef,
        asked: Instant,
        lost: &ClaimLost,
        stops: &Stops,
    ) -> bool {
        let lease = self.options.lease;
        // The claim itself is fresh: the usual case, with no lookup.
        if asked.elapsed() < lease / 3 {
            return false;
        }
        let confirmed = self.active.confirmed(claim).unwrap_or(asked);
        if confirmed.elapsed() < lease / 3 {
            return false;
        }
        let renewing = Instant::now();
        let e = match self.store.renew(std::slice::from_ref(claim), lease).await {
            Ok(held) if held.first() == Some(&false) => {
                tracing::warn!(job = %claim.job, idx = claim.idx, fence = claim.fence,
                    stalled_ms = confirmed.elapsed().as_millis() as u64,
                    "claim lost before its run started (this worker stalled past its lease); not running it");
                return true;
            }
            Ok(_) => {
                self.active.confirm(claim, renewing);
                return false;
            }
            Err(e) if confirmed.elapsed() < lease => {
                tracing::debug!(error = %e, "cannot renew a stalled claim before its run; it is live still: running it");
                return false;
            }
            Err(e) => e,
        };
        tracing::warn!(job = %claim.job, idx = claim.idx, fence = claim.fence, error = %e,
            unconfirmed_ms = confirmed.elapsed().as_millis() as u64,
            "a claim unconfirmed for longer than its lease may have been taken over; waiting for the store to say before running it");
        let mut hard_stop = stops.hard.clone();
        loop {
            tokio::select! {
                biased;
                _ = hard_stop.wait() => return true,
                () = lost.wait() => return true,
                () = tokio::time::sleep(leases::RENEW_RETRY) => {
                    if self.active.confirmed(claim).is_some_and(|c| c.elapsed() < lease) {
                        return false;
                    }
                }
            }
        }
    }

    /// Run one claimed task to its outcome; returns the task to run next
    /// here, if its completion made one ready that this worker claimed.
    async fn run_one(&self, run: NextRun, stops: &Stops) -> Option<NextRun> {
        let NextRun {
            claimed,
            asked,
            lost,
        } = run;
        if self
            .lapsed_before_its_run(&claimed.claim, asked, &lost, stops)
            .await
        {
            self.active.remove(&claimed.claim);
            return None;
        }
        if let Some(j) = &self.options.journal {
            j.record('S', &claimed.claim, None);
        }
        let Some(handler) = self.registry.get(&claimed.handler).cloned() else {
            let end = AttemptEnd::Permanent(format!(
                "no handler {:?} on worker {} (it has: {})",
                claimed.handler,
                self.options.id,
                self.registry.names().join(", ")
            ));
            return self.finish(&claimed, end, stops).await;
        };
        let mut hard_stop = stops.hard.clone();
        let (alive, gone) = execute::HandlerAlive::watch(&self.cancels);
        let mut attempt = Box::pin(execute::run_attempt_watched(
            handler,
            &claimed,
            self.options.max_result_bytes,
            alive,
        ));
        // The stops first: a run already stopped (a hard stop reached while
        // the slot published, a claim found lost or replaced before its run
        // started) never starts its handler, which on a multi-threaded
        // runtime could start at once (a shell task fork its program)
        // before the abort reached it.
        let end = tokio::select! {
            biased;
            _ = hard_stop.wait() => {
                if !gone.started() {
                    // Never started (not polled yet: polling would start it).
                    drop(attempt);
                    self.hand_back(&claimed).await;
                    return None;
                }
                // Aborted, and awaited: the attempt ends once the run is
                // dropped, or with its answer if it answered first (while
                // the stop came, or mid-poll on another thread). An answer
                // stands: its work is done, and handed back it would be
                // done again.
                gone.abort();
                let ended = tokio::time::timeout(HANDLER_STOP_WAIT, attempt.as_mut()).await;
                match ended {
                    Ok(end) if gone.ended() && !gone.cancelled() => end,
                    // Cancelled, or the attempt's own time-out came first
                    // with the run still going (a handler blocking its
                    // thread): handed back once the run has stopped.
                    _ => {
                        drop(attempt);
                        if gone.cancelled() || gone.within(HANDLER_STOP_WAIT).await {
                            self.hand_back(&claimed).await;
                        } else {
                            // Handed back, it would run elsewhere beside
                            // this one: its lease lapses instead, after
                            // this process is gone.
                            tracing::error!(job = %claimed.claim.job, task = %claimed.task,
                                wait_s = HANDLER_STOP_WAIT.as_secs(),
                                "the handler did not stop after its abort; not handing its task back");
                        }
                        return None;
                    }
                }
            }
            // Another claim may be running the task now: stop this run (its
            // handler task is aborted; a shell task's process group killed).
            // Its outcome is then refused like any late one.
            _ = lost.wait() => AttemptEnd::Transient(
                "claim lost (lease lapsed and the task moved on, or the store lost it): run stopped".into(),
            ),
            end = &mut attempt => end,
        };
        drop(attempt);
        // Stopped before its outcome is applied: a retry (a time-out's, a
        // lost claim's next attempt) must not start beside the run still
        // being aborted. A run that returned has stopped already.
        if !gone.ended() && !gone.within(HANDLER_STOP_WAIT).await {
            tracing::warn!(job = %claimed.claim.job, task = %claimed.task,
                wait_s = HANDLER_STOP_WAIT.as_secs(),
                "the handler did not stop within the wait after its abort; applying its end anyway");
        }
        self.finish(&claimed, end, stops).await
    }

    /// Apply an attempt's end and publish what it made ready — except one
    /// task on a queue this worker consumes, which it claims and returns to
    /// run next in the same slot (unless it is stopping). The claim and the
    /// publishes come before this attempt's lease entry is dropped: a crash
    /// in between leaves the sweep to publish every ready dependent again
    /// (a copy of the claimed one is dropped at its claim), and the claimed
    /// one, if never run, is the sweep's when its lease lapses.
    ///
    /// The claimed one's lease is renewed from its claim on, not from its
    /// run: the publishes may wait on the broker (a queue at its length
    /// limit refuses them until it has room) for longer than a lease, and
    /// a task whose worker is alive must not be taken over as a dead
    /// worker's. A hard stop ends that wait: the claimed task is handed
    /// back, and this attempt's lease entry, kept, has the sweep publish
    /// the rest.
    async fn finish(&self, claimed: &Claimed, end: AttemptEnd, stops: &Stops) -> Option<NextRun> {
        let claim = &claimed.claim;
        let result: AttemptResult = end.into_result(claimed);
        if let Some(j) = &self.options.journal {
            let kind = match &result {
                AttemptResult::Succeeded(_) => "succeeded",
                AttemptResult::Retry { .. } => "retry",
                AttemptResult::Failed(_) => "failed",
            };
            j.record('E', claim, Some(kind));
        }
        let applied = loop {
            match self.store.complete(claim, &self.options.id, &result).await {
                Ok(applied) => break applied,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, job = %claim.job, "cannot apply outcome yet; retrying");
                    self.health.mark_store_down();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, job = %claim.job, "outcome cannot be applied; the lease sweep will retry the task");
                    self.active.remove(claim);
                    return None;
                }
            }
        };
        self.active.remove(claim);
        let mut next = None;
        match applied {
            Applied::Done {
                mut ready,
                duplicate,
                task_state,
                job_state,
            } => {
                tracing::debug!(job = %claim.job, task = %claimed.task, %task_state, %job_state, duplicate, "outcome applied");
                // One ready task this worker can run goes on in this slot:
                // claimed first; if the store will not have it, published
                // with the rest.
                let position = ready
                    .iter()
                    .position(|t| self.options.queues.contains(&t.queue));
                if let Some(i) = position.filter(|_| !stops.graceful.is_triggered()) {
                    let task = ready.swap_remove(i);
                    let asked = Instant::now();
                    match self
                        .store
                        .claim(&task, &self.options.id, self.options.lease)
                        .await
                    {
                        Ok(ClaimOutcome::Claimed(claimed)) => {
                            let lost = self.active.insert(claimed.claim.clone(), asked);
                            next = Some(NextRun {
                                claimed: *claimed,
                                asked,
                                lost,
                            });
                        }
                        Ok(other) => {
                            tracing::debug!(job = %task.job, task = %task.task, ?other, "ready task not claimable here");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, job = %task.job, "cannot claim a ready task here; publishing it");
                            ready.push(task);
                        }
                    }
                }
                let mut hard_stop = stops.hard.clone();
                // A stop that came before (the run answered as it came)
                // ends the publish at its first wait too: the dependents
                // wait for the sweep. Given a bound of its own (thirty-sixth
                // session, reverted), the stopping worker lived on past a
                // claim it had handed back and could not release, and the
                // simulation found that lease lapsing under a live worker.
                let published = tokio::select! {
                    biased;
                    published = self.outbox.publish_tasks_until_confirmed(&ready) => published,
                    _ = hard_stop.wait() => {
                        // This attempt's lease entry stays: the sweep
                        // publishes them.
                        tracing::warn!(job = %claim.job, "stopped while publishing ready tasks; the lease sweep will");
                        if let Some(run) = next {
                            self.hand_back(&run.claimed).await;
                        }
                        return None;
                    }
                };
                if let Err(e) = published {
                    // This attempt's lease entry stays: the sweep publishes
                    // them. The task claimed here is ours to run.
                    tracing::error!(error = %e, job = %claim.job, "cannot publish ready tasks; the lease sweep will");
                    return next;
                }
            }
            Applied::Stale => {
                // The lease entry of this attempt belongs to the sweep now:
                // not forgotten, and put back if gone. Usually the task moved
                // on (the lease lapsed) and the sweep just drops it; but if
                // the store lost this claim with its latest writes, the task
                // is ready at this attempt with no message left, and the
                // sweep offers it again.
                tracing::warn!(job = %claim.job, task = %claimed.task, attempt = claim.attempt, fence = claim.fence,
                    "late outcome rejected: this claim is no longer the task's live claim");
                if let Err(e) = self.store.recheck(claim).await {
                    tracing::warn!(error = %e, job = %claim.job, "cannot have the sweep recheck a refused claim");
                }
                return None;
            }
            Applied::Missing => {
                tracing::warn!(job = %claim.job, "job vanished before its outcome was applied");
                return None;
            }
        }
        if let Err(e) = self.store.forget_claim(claim).await {
            tracing::debug!(error = %e, "lease entry left for the sweep to drop");
        }
        next
    }

    /// Shutdown overran the grace period: give the claim back. The lease
    /// entry stays: the attempt is ready again, and a claim of it taken
    /// from the message published here may already own the entry
    /// (forgetting it would leave that claim unfindable by the sweep).
    /// Once due, the sweep offers the task again if it still waits (a
    /// harmless duplicate) and drops the entry if it is still due.
    ///
    /// A store that cannot be reached is asked again every
    /// [`leases::RENEW_RETRY`], the claim renewed meanwhile, until the
    /// lease from its last confirmed renewal runs out: a worker that gave
    /// up at once, and lived on to finish its other tasks, let a lease
    /// lapse that it could have released a moment later, which costs the
    /// task an attempt and a lease's wait (the simulation's seed 242835).
    async fn hand_back(&self, claimed: &Claimed) {
        let claim = &claimed.claim;
        if let Some(j) = &self.options.journal {
            j.record('E', claim, Some("handed_back"));
        }
        let lease_ends = self.active.confirmed(claim).map(|c| c + self.options.lease);
        let released = loop {
            // Out of the renewals while the release is asked: a renewal
            // after it would find the claim gone and call it lost.
            let confirmed = self.active.confirmed(claim);
            self.active.remove(claim);
            match self.store.release(claim, &self.options.id).await {
                Err(e)
                    if e.is_retryable()
                        && lease_ends
                            .is_some_and(|end| Instant::now() + leases::RENEW_RETRY < end) =>
                {
                    tracing::debug!(error = %e, job = %claim.job, "cannot release claim yet; asking again");
                    self.health.mark_store_down();
                    if let Some(confirmed) = confirmed {
                        self.active.put_back(claim, confirmed);
                    }
                    tokio::time::sleep(leases::RENEW_RETRY).await;
                }
                released => break released,
            }
        };
        match released {
            Ok(Some(msg)) => match self.outbox.publish_tasks(&[msg]).await {
                Ok(()) => {
                    tracing::info!(job = %claim.job, task = %claimed.task, "task handed back");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-publish handed-back task; the lease sweep will");
                }
            },
            // Not held (any more): whoever holds it now, or the sweep,
            // takes care of the task.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release claim; its lease will lapse");
            }
        }
    }

    /// A message delivered too often without an outcome: fail its task (so
    /// the job finishes instead of waiting forever) and dead-letter it, if
    /// the task still waits for this attempt. Otherwise the message is no
    /// task's last hope (a duplicate of an attempt that ran or runs, or of
    /// a job that has no record) and is handed back, for the claim to
    /// settle as it settles any such message.
    async fn poisoned(&self, delivery: Delivery, task: &TaskMessage) -> Option<Delivery> {
        let reason = format!(
            "poison message: delivered {} times without an outcome (limit {})",
            delivery.delivery_count, self.options.max_deliveries
        );
        match self.store.fail_poisoned(task, &reason).await {
            Ok(true) => {
                tracing::warn!(job = %task.job, task = %task.task, "{reason}");
                self.dead_letter(delivery, DeadLetterReason::Poison, &reason)
                    .await;
                None
            }
            Ok(false) => Some(delivery),
            Err(e) if e.is_retryable() => {
                // Given back as a new message, as a claim is in an outage:
                // requeued, it would count one more delivery, and past the
                // queue's own delivery limit RabbitMQ would drop it (or
                // dead-letter it without a reason) while its task waits.
                tracing::warn!(error = %e, "store unavailable; giving the task message back");
                self.health.mark_store_down();
                give_back(self.outbox.broker().as_ref(), vec![delivery]).await;
                None
            }
            Err(e) => {
                // The store refuses for good to fail the task (its record
                // is corrupt or of another version): the message still
                // must not loop, so it goes to the dead-letter queue with
                // both reasons, and the task stays as its record is.
                let reason = format!("{reason}; the store refused to fail the task: {e}");
                tracing::error!(job = %task.job, task = %task.task, "{reason}");
                self.dead_letter(delivery, DeadLetterReason::UnusableRecord, &reason)
                    .await;
                None
            }
        }
    }

    async fn dead_letter(&self, delivery: Delivery, kind: DeadLetterReason, reason: &str) {
        tracing::warn!(kind = kind.as_str(), reason, "task message dead-lettered");
        match self
            .outbox
            .dead_letter(
                delivery.body.clone(),
                &delivery.properties,
                &delivery.queue,
                kind,
                reason,
            )
            .await
        {
            Ok(()) => ack(delivery).await,
            // The connection is gone: the delivery comes back with it.
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "cannot dead-letter; requeueing");
                let _ = delivery.acker.requeue().await;
            }
            // The dead queue refuses (at its length limit, a quorum queue
            // without a leader) or was missing (declared again by now):
            // requeued, the message would come straight back and loop at
            // the broker's pace, so it is given back as a copy after a
            // pause, as a submission is.
            Err(e) => {
                tracing::warn!(error = %e, pause = ?BROKER_REFUSAL_PAUSE, "cannot dead-letter; giving the message back after a pause");
                tokio::time::sleep(BROKER_REFUSAL_PAUSE).await;
                give_back(self.outbox.broker().as_ref(), vec![delivery]).await;
            }
        }
    }

    /// Register this worker every heartbeat until `run` ends (aborted
    /// with the other background tasks, then unregistered): through the
    /// grace of a shutdown too, while it still runs and renews claims
    /// (until the thirty-sixth session it stopped at the signal, and
    /// `queues` showed a worker gone that held claims for half a minute).
    async fn heartbeat_forever(&self) {
        let started_ms = unix_ms();
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut tick = tokio::time::interval(self.options.heartbeat);
        loop {
            tick.tick().await;
            let info = WorkerInfo {
                id: self.options.id.clone(),
                host: host.clone(),
                queues: self.options.queues.clone(),
                handlers: self.registry.names(),
                concurrency: self.options.concurrency,
                started_ms,
                heartbeat_ms: unix_ms(),
            };
            if let Err(e) = self
                .store
                .heartbeat(&info, self.options.heartbeat * 3)
                .await
            {
                tracing::warn!(error = %e, "worker heartbeat failed");
            }
        }
    }
}

async fn ack(delivery: Delivery) {
    if let Err(e) = delivery.acker.ack().await {
        tracing::debug!(error = %e, "ack failed; a redelivery will be deduplicated");
    }
}

/// Make a unique worker id: host, pid and a random suffix.
pub fn new_worker_id() -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "worker".into());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext};
    use serde_json::{Value, json};

    use super::*;
    use crate::broker::Outgoing;
    use crate::broker::memory::{FaultPlan, MemoryBroker, PublishHook, WithPublish};
    use crate::config::Config;
    use crate::dispatcher::{Dispatcher, DispatcherOptions};
    use crate::model::JobState;
    use crate::store::memory::{MemoryStore, TokioClock};

    const LEASE: Duration = Duration::from_millis(600);

    /// An empty in-process store on the (paused) tokio clock.
    fn memory_store() -> Arc<MemoryStore> {
        let clock = Arc::new(TokioClock::new(1_800_000_000_000));
        Arc::new(MemoryStore::new(
            clock,
            Duration::from_secs(3600),
            1,
            "test",
        ))
    }

    /// The status of job `id` once it is finished. Bounded: a job that
    /// never finishes fails the test (the clock is paused, so an unbounded
    /// wait would spin for ever).
    async fn finished_within_100_leases(store: &dyn Store, id: &str) -> crate::store::JobStatus {
        for _ in 0..(LEASE * 100).as_millis() / 50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(s) = store.job(id).await.unwrap()
                && s.state.is_terminal()
            {
                return s;
            }
        }
        panic!("job {id} not finished within 100 leases");
    }

    /// Records every run as (task, attempt). Task `t0` also takes the
    /// broker away for ten leases when it runs.
    struct Recorder {
        runs: Arc<Mutex<Vec<(String, u32)>>>,
        broker: Arc<MemoryBroker>,
    }

    #[async_trait]
    impl Handler for Recorder {
        fn name(&self) -> &str {
            "record"
        }

        async fn run(&self, ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            self.runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((ctx.task.clone(), ctx.attempt));
            if ctx.task == "t0" {
                self.broker.set_outage(true);
                let broker = self.broker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(LEASE * 10).await;
                    broker.set_outage(false);
                });
            }
            Ok(Outcome::Done(json!({})))
        }
    }

    /// A dispatcher for queue `default` that sweeps every 50 ms.
    fn sweeping_dispatcher(
        store: Arc<MemoryStore>,
        broker: Arc<dyn Broker>,
        registry: &Registry,
        names: &Names,
    ) -> Dispatcher {
        let intake = JobIntake::new(&Config::default(), registry.clone()).unwrap();
        Dispatcher::new(
            store,
            broker,
            intake,
            names.clone(),
            DispatcherOptions {
                id: "d".into(),
                prefetch: 8,
                sweep_interval: Duration::from_millis(50),
                task_queues: vec!["default".to_owned()],
            },
        )
    }

    /// A worker with one slot on queue `default`, its leases [`LEASE`].
    fn one_slot_worker(
        store: Arc<MemoryStore>,
        broker: Arc<dyn Broker>,
        registry: Registry,
        names: &Names,
    ) -> Worker {
        Worker::new(
            store,
            broker,
            registry,
            names.clone(),
            WorkerOptions {
                lease: LEASE,
                concurrency: 1,
                queues: vec!["default".to_owned()],
                ..WorkerOptions::from_config(&Config::default(), "w")
            },
        )
    }

    /// Publish `job` to the submit queue, as a client does.
    async fn submit(broker: &dyn Broker, names: &Names, job: &Value) {
        broker
            .publish(vec![Outgoing::durable(
                names.submit_queue(),
                job.to_string().into_bytes(),
            )])
            .await
            .unwrap();
    }

    /// Publishes slowly once told to (a broker that has become slow).
    struct SlowOnceTold(Arc<std::sync::atomic::AtomicBool>);

    #[async_trait]
    impl PublishHook for SlowOnceTold {
        async fn publish(
            &self,
            inner: &MemoryBroker,
            batch: Vec<crate::broker::Outgoing>,
        ) -> Result<(), BrokerError> {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
            inner.publish(batch).await
        }
    }

    /// Runs until aborted.
    struct Endless;

    #[async_trait]
    impl Handler for Endless {
        fn name(&self) -> &str {
            "endless"
        }

        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Outcome::Done(json!({})))
        }
    }

    /// A sweeping dispatcher and a one-slot worker (its grace `grace`) on
    /// `broker`, running, with two endless jobs `a` and `b` submitted: one
    /// runs, the other's task waits in the worker for the slot.
    struct TwoEndlessJobs {
        stop_dispatcher: ShutdownTrigger,
        dispatcher: tokio::task::JoinHandle<Result<(), crate::dispatcher::DispatcherError>>,
        stop_worker: ShutdownTrigger,
        worker: tokio::task::JoinHandle<Result<(), BrokerError>>,
    }

    impl TwoEndlessJobs {
        async fn start(
            store: &Arc<MemoryStore>,
            broker: &Arc<dyn Broker>,
            names: &Names,
            grace: Option<Duration>,
        ) -> TwoEndlessJobs {
            let registry = Registry::new().with(Endless);
            broker.declare(&["default".to_owned()]).await.unwrap();
            let dispatcher = sweeping_dispatcher(store.clone(), broker.clone(), &registry, names);
            let mut worker = one_slot_worker(store.clone(), broker.clone(), registry, names);
            if let Some(grace) = grace {
                worker.options.grace = grace;
            }
            let (stop_dispatcher, stop_worker) = (ShutdownTrigger::new(), ShutdownTrigger::new());
            let d = stop_dispatcher.subscribe();
            let dispatcher = tokio::spawn(async move { dispatcher.run(d).await });
            let w = stop_worker.subscribe();
            let worker = tokio::spawn(async move { worker.run(w).await });
            for id in ["a", "b"] {
                let job = json!({"id": id, "requestor": "me",
                    "tasks": [{"name": "t", "handler": "endless"}]});
                submit(broker.as_ref(), names, &job).await;
            }
            TwoEndlessJobs {
                stop_dispatcher,
                dispatcher,
                stop_worker,
                worker,
            }
        }

        async fn stop(self) {
            self.stop_worker.trigger();
            let _ = self.worker.await;
            self.stop_dispatcher.trigger();
            let _ = self.dispatcher.await;
        }
    }

    /// A worker whose slots are all busy claims nothing, so only its lease
    /// renewals can tell it the store is gone: they mark it down, and the
    /// worker gives back what it holds within half a lease, for workers
    /// that reach the store to run (it held the messages for its whole
    /// hold, 10 s by default, until the thirty-seventh session).
    #[tokio::test(start_paused = true)]
    async fn a_busy_worker_cut_off_from_the_store_gives_back_what_it_holds_within_half_a_lease() {
        let names = Names::new("busycut");
        let store = memory_store();
        let broker = Arc::new(MemoryBroker::reliable(names.clone()));
        let as_broker: Arc<dyn Broker> = broker.clone();
        let hold = WorkerOptions::from_config(&Config::default(), "w").hold;
        assert!(hold > LEASE * 10, "{hold:?}");
        let running = TwoEndlessJobs::start(&store, &as_broker, &names, None).await;
        // One runs, the other's message waits in the worker for the slot.
        let queue = names.task_queue("default");
        tokio::time::sleep(LEASE).await;
        assert_eq!(broker.unacked_len(&queue).await, 1, "held for the slot");

        store.set_outage(true);
        tokio::time::sleep(LEASE).await;
        assert_eq!(broker.unacked_len(&queue).await, 0, "given back");
        assert_eq!(broker.ready_len(&queue).await, 1);

        store.set_outage(false);
        running.stop().await;
    }

    /// The grace period runs from the signal: a worker whose consumers are
    /// slow to stop (the give-back of a delivery held for a slot waits on
    /// a slow broker) hands its running task back when the grace is over,
    /// not only once they have stopped (a supervisor killing the process
    /// `grace_s` after the signal found it still running, until the
    /// thirty-fourth session).
    #[tokio::test(start_paused = true)]
    async fn the_grace_period_runs_from_the_signal_not_from_the_consumers_stop() {
        let names = Names::new("grace");
        let store = memory_store();
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let inner = Arc::new(MemoryBroker::new(names.clone(), 0, FaultPlan::default()));
        let broker: Arc<dyn Broker> = Arc::new(WithPublish {
            inner: inner.clone(),
            hook: SlowOnceTold(slow.clone()),
        });
        let TwoEndlessJobs {
            stop_dispatcher,
            dispatcher,
            stop_worker,
            worker,
        } = TwoEndlessJobs::start(&store, &broker, &names, Some(Duration::from_millis(300))).await;
        let running = |store: Arc<MemoryStore>| async move {
            let mut running = Vec::new();
            for id in ["a", "b"] {
                let status = store.job(id).await.unwrap();
                if status.is_some_and(|s| s.tasks["t"].state == crate::model::TaskState::Running) {
                    running.push(id);
                }
            }
            running
        };
        // One runs, the other waits in the worker for the slot.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(running(store.clone()).await.len(), 1);

        slow.store(true, std::sync::atomic::Ordering::SeqCst);
        stop_worker.trigger();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !worker.is_finished(),
            "the consumers are still giving back what they held"
        );
        assert_eq!(
            running(store.clone()).await,
            Vec::<&str>::new(),
            "handed back at the end of the grace"
        );
        slow.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = worker.await;
        stop_dispatcher.trigger();
        let _ = dispatcher.await;
    }

    /// A worker that claims its next task and then cannot start it for
    /// longer than a lease (publishing the task's sibling waits out a
    /// broker outage) keeps the claim renewed meanwhile: the task runs
    /// once, under that claim, rather than being taken over as a dead
    /// worker's and run again as attempt 2.
    #[tokio::test(start_paused = true)]
    async fn a_claim_taken_to_run_next_is_renewed_while_its_sibling_waits_for_the_broker() {
        let names = Names::new("stall");
        let store = memory_store();
        let broker = Arc::new(MemoryBroker::new(names.clone(), 0, FaultPlan::default()));
        let runs = Arc::new(Mutex::new(Vec::new()));
        let registry = Registry::new().with(Recorder {
            runs: runs.clone(),
            broker: broker.clone(),
        });
        broker.declare(&["default".to_owned()]).await.unwrap();
        let dispatcher = sweeping_dispatcher(store.clone(), broker.clone(), &registry, &names);
        let worker = one_slot_worker(store.clone(), broker.clone(), registry, &names);
        let stop = ShutdownTrigger::new();
        let (d, w) = (stop.subscribe(), stop.subscribe());
        let dispatcher = tokio::spawn(async move { dispatcher.run(d).await });
        let worker = tokio::spawn(async move { worker.run(w).await });
        let job = json!({"id": "j", "requestor": "me", "tasks": [
            {"name": "t0", "handler": "record"},
            {"name": "t1", "handler": "record", "after": ["t0"]},
            {"name": "t2", "handler": "record", "after": ["t0"]}]});
        submit(broker.as_ref(), &names, &job).await;

        let status = finished_within_100_leases(store.as_ref(), "j").await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        let mut runs = runs.lock().unwrap().clone();
        runs.sort();
        // t0 made t1 ready, which the worker claimed to run next, and t2,
        // whose publish waited out the outage of ten leases; t1's claim
        // was renewed all along.
        assert_eq!(status.tasks["t1"].attempts, 1, "{status:#?}");
        assert!(
            status.history.iter().all(|h| !h.reason.contains("lease")),
            "{status:#?}"
        );
        assert_eq!(
            runs,
            vec![("t0".into(), 1), ("t1".into(), 1), ("t2".into(), 1)],
            "{status:#?}"
        );
        stop.trigger();
        let _ = tokio::join!(dispatcher, worker);
    }

    /// A message to dead-letter while the dead-letter queue refuses every
    /// publish (at its length limit) is given back once a pause
    /// ([`BROKER_REFUSAL_PAUSE`]), not requeued to come straight back: no
    /// loop at the broker's pace, and nothing lost; once the queue takes
    /// messages again, it is dead-lettered.
    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_the_dead_queue_refuses_is_tried_again_after_a_pause_not_in_a_loop() {
        let names = Names::new("refusing-dead");
        let store = memory_store();
        let broker = Arc::new(MemoryBroker::new(names.clone(), 0, FaultPlan::default()));
        broker.declare(&["default".to_owned()]).await.unwrap();
        broker.set_full(&names.dead_queue(), true);
        let registry = conveyor_builtin_handlers::registry();
        let worker = one_slot_worker(store, broker.clone(), registry, &names);
        let stop = ShutdownTrigger::new();
        let w = stop.subscribe();
        let worker = tokio::spawn(async move { worker.run(w).await });
        let task_queue = names.task_queue("default");
        broker
            .publish(vec![Outgoing::durable(&task_queue, b"not a task".to_vec())])
            .await
            .unwrap();
        while broker.refused() == 0 {
            tokio::task::yield_now().await;
        }
        // The clock stands still while this task keeps running: a requeue
        // loop would be refused again and again meanwhile.
        for _ in 0..10_000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(broker.refused(), 1, "refused again without a pause");
        tokio::time::sleep(BROKER_REFUSAL_PAUSE * 10).await;
        let refused = broker.refused();
        assert!(
            (9..=11).contains(&refused),
            "{refused} refusals in 10 pauses"
        );
        broker.set_full(&names.dead_queue(), false);
        tokio::time::sleep(BROKER_REFUSAL_PAUSE * 2).await;
        assert_eq!(
            broker.take_all(&names.dead_queue()).await,
            vec![b"not a task".to_vec()]
        );
        assert_eq!(broker.ready_len(&task_queue).await, 0);
        stop.trigger();
        let _ = worker.await;
    }

    /// A worker, its store, and two claims of one-task jobs taken at the
    /// same moment, neither in the worker's books yet.
    async fn worker_with_two_claims() -> (Worker, Arc<MemoryStore>, Vec<(ClaimRef, Instant)>) {
        let names = Names::new("stall");
        let store = memory_store();
        let broker = Arc::new(MemoryBroker::new(names.clone(), 0, FaultPlan::default()));
        let config = Config::default();
        let registry = conveyor_builtin_handlers::registry();
        let intake = JobIntake::new(&config, registry.clone()).unwrap();
        let worker = Worker::new(
            store.clone(),
            broker,
            registry,
            names,
            WorkerOptions {
                lease: LEASE,
                ..WorkerOptions::from_config(&config, "w")
            },
        );
        let mut claims = Vec::new();
        for id in ["lapsed", "held"] {
            let body = json!({"id": id, "requestor": "me",
                "tasks": [{"name": "t", "handler": "noop"}]});
            let crate::intake::Intake::Valid(job) = intake.accept(body.to_string().as_bytes())
            else {
                panic!("{id} is valid");
            };
            let crate::store::Created::New { ready } = store.create_job(&job).await.unwrap() else {
                panic!("{id} is new");
            };
            let ClaimOutcome::Claimed(claimed) = store.claim(&ready[0], "w", LEASE).await.unwrap()
            else {
                panic!("{id} is claimable");
            };
            claims.push((claimed.claim, Instant::now()));
        }
        (worker, store, claims)
    }

    fn stops() -> (ShutdownTrigger, Stops) {
        let trigger = ShutdownTrigger::new();
        let stops = Stops {
            graceful: trigger.subscribe(),
            hard: trigger.subscribe(),
        };
        (trigger, stops)
    }

    /// A worker of `registry` (prefix `prefix`), with its store and broker,
    /// and the run of job `id`'s one task `t` (handler `handler`), claimed.
    async fn a_claimed_run(
        prefix: &str,
        registry: Registry,
        id: &str,
        handler: &str,
    ) -> (Worker, Arc<MemoryStore>, Arc<MemoryBroker>, NextRun) {
        let names = Names::new(prefix);
        let store = memory_store();
        let broker = Arc::new(MemoryBroker::new(names.clone(), 0, FaultPlan::default()));
        let config = Config::default();
        let intake = JobIntake::new(&config, registry.clone()).unwrap();
        let worker = Worker::new(
            store.clone(),
            broker.clone(),
            registry,
            names,
            WorkerOptions {
                lease: LEASE,
                ..WorkerOptions::from_config(&config, "w")
            },
        );
        let body = json!({"id": id, "requestor": "me",
            "tasks": [{"name": "t", "handler": handler}]});
        let crate::intake::Intake::Valid(job) = intake.accept(body.to_string().as_bytes()) else {
            panic!("valid");
        };
        let crate::store::Created::New { ready } = store.create_job(&job).await.unwrap() else {
            panic!("new");
        };
        let ClaimOutcome::Claimed(claimed) = store.claim(&ready[0], "w", LEASE).await.unwrap()
        else {
            panic!("claimable");
        };
        let lost = worker.active.insert(claimed.claim.clone(), Instant::now());
        let run = NextRun {
            claimed: *claimed,
            asked: Instant::now(),
            lost,
        };
        (worker, store, broker, run)
    }

    /// Blocks its thread for a while (never yielding to an abort), then
    /// notes when it let go.
    struct HoldsItsThread {
        started: Arc<tokio::sync::Notify>,
        let_go: Arc<Mutex<Option<std::time::Instant>>>,
        /// Answers when it lets go; else awaits (where an abort stops it).
        then_answers: bool,
    }

    #[async_trait]
    impl Handler for HoldsItsThread {
        fn name(&self) -> &str {
            "holds"
        }

        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            self.started.notify_one();
            std::thread::sleep(Duration::from_millis(400));
            *self.let_go.lock().unwrap() = Some(std::time::Instant::now());
            if !self.then_answers {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(Outcome::Done(json!({"held": true})))
        }
    }

    /// Run the `holds` handler's task and stop the worker hard while the
    /// handler blocks its thread: (the worker's store, how many messages
    /// the task queue holds after, when the handler let go, when the run
    /// ended).
    async fn hard_stop_while_its_thread_is_held(
        then_answers: bool,
    ) -> (
        Arc<MemoryStore>,
        usize,
        std::time::Instant,
        std::time::Instant,
    ) {
        let let_go = Arc::new(Mutex::new(None));
        let started = Arc::new(tokio::sync::Notify::new());
        let registry = Registry::new().with(HoldsItsThread {
            started: started.clone(),
            let_go: let_go.clone(),
            then_answers,
        });
        let (worker, store, broker, run) =
            a_claimed_run("handback", registry, "held", "holds").await;
        let (trigger, stops) = stops();
        let ran = {
            let worker = &worker;
            let stops = &stops;
            async move { worker.run_one(run, stops).await }
        };
        let stop_soon = async {
            // The handler is blocking its thread by then.
            started.notified().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            trigger.trigger();
        };
        let (next, ()) = tokio::join!(ran, stop_soon);
        assert!(next.is_none());
        let ended = std::time::Instant::now();
        let let_go = let_go
            .lock()
            .unwrap()
            .expect("the handler let go of its thread");
        let queued = broker
            .ready_len(&Names::new("handback").task_queue("default"))
            .await;
        (store, queued, let_go, ended)
    }

    /// A hard stop hands a running task back only once its handler has
    /// stopped: the abort takes effect when the run next yields, and a
    /// handler mid-poll on another thread ran on meanwhile (a `shell`
    /// program's group killed only then) while the task, handed back at
    /// once, could start elsewhere. Until the thirty-fourth session it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hard_stop_hands_a_task_back_only_once_its_handler_has_stopped() {
        let (_store, queued, let_go, ended) = hard_stop_while_its_thread_is_held(false).await;
        assert!(let_go <= ended);
        assert_eq!(queued, 1, "handed back once its handler stopped");
    }

    /// A handler that answers while its abort waits for it to yield has
    /// done its work: the answer is applied, not thrown away for a
    /// hand-back that would do it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_given_while_the_abort_waits_is_applied() {
        let (store, queued, _, _) = hard_stop_while_its_thread_is_held(true).await;
        assert_eq!(queued, 0, "not handed back");
        let status = store.job("held").await.unwrap().unwrap();
        assert_eq!(status.state, crate::model::JobState::Succeeded);
        assert_eq!(status.tasks["t"].result, json!({"held": true}));
    }

    /// Stops its worker hard as it answers.
    struct StopsAsItAnswers(ShutdownTrigger);

    #[async_trait]
    impl Handler for StopsAsItAnswers {
        fn name(&self) -> &str {
            "stops"
        }

        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            self.0.trigger();
            Ok(Outcome::Done(json!({"done": true})))
        }
    }

    /// An answer that is there as the hard stop comes stands: the task's
    /// work is done, and handed back it would be done again. (The stop,
    /// checked first, used to win: the answer was thrown away.)
    #[tokio::test]
    async fn an_answer_there_as_a_hard_stop_comes_is_applied_not_handed_back() {
        let (trigger, stops) = stops();
        let registry = Registry::new().with(StopsAsItAnswers(trigger.clone()));
        let (worker, store, broker, run) =
            a_claimed_run("answered", registry, "answered", "stops").await;
        assert!(worker.run_one(run, &stops).await.is_none());
        let status = store.job("answered").await.unwrap().unwrap();
        assert_eq!(status.state, crate::model::JobState::Succeeded);
        assert_eq!(status.tasks["t"].result, json!({"done": true}));
        let names = Names::new("answered");
        assert_eq!(broker.ready_len(&names.task_queue("default")).await, 0);
    }

    /// A worker that could not start a claimed task for longer than its
    /// lease (a process paused by SIGSTOP, whose renewals stopped too)
    /// asks the store before running it: a claim the sweep took over is
    /// not run; one still held is.
    #[tokio::test(start_paused = true)]
    async fn a_claim_that_lapsed_before_its_run_started_is_not_run() {
        let (worker, store, claims) = worker_with_two_claims().await;
        let (_trigger, stops) = stops();
        let lost: Vec<ClaimLost> = claims
            .iter()
            .map(|(claim, asked)| worker.active.insert(claim.clone(), *asked))
            .collect();
        tokio::time::advance(LEASE * 2).await;
        // The sweep takes the first claim over; the second is renewed (by
        // its worker, late) before the sweep gets to it.
        store.renew(&[claims[1].0.clone()], LEASE).await.unwrap();
        let taken = store.expired_leases(10, "sweep").await.unwrap();
        assert_eq!(taken.len(), 1, "{taken:?}");
        let (lapsed, held) = (&claims[0], &claims[1]);
        assert!(
            worker
                .lapsed_before_its_run(&lapsed.0, lapsed.1, &lost[0], &stops)
                .await
        );
        assert!(
            !worker
                .lapsed_before_its_run(&held.0, held.1, &lost[1], &stops)
                .await
        );
    }

    /// The same while the store cannot be reached: a claim unconfirmed for
    /// longer than its lease may have been taken over (a sweep of another
    /// dispatcher, before this worker lost the store), so its run waits
    /// for the renewals to reach the store. When they do, the claim taken
    /// over is not run and the one still held is. (Run at once, the first
    /// would have run beside the claim that took it over.)
    #[tokio::test(start_paused = true)]
    async fn a_stale_claim_is_not_run_while_the_store_cannot_say_whether_it_is_held() {
        let (worker, store, claims) = worker_with_two_claims().await;
        let (_trigger, stops) = stops();
        let mut checks = Vec::new();
        tokio::time::advance(LEASE * 2).await;
        store.set_outage(true);
        for (claim, asked) in &claims {
            let lost = worker.active.insert(claim.clone(), *asked);
            let (worker, claim, asked, stops) =
                (worker.clone(), claim.clone(), *asked, stops.clone());
            checks.push(tokio::spawn(async move {
                worker
                    .lapsed_before_its_run(&claim, asked, &lost, &stops)
                    .await
            }));
        }
        let renewals = tokio::spawn({
            let (active, store) = (worker.active.clone(), store.clone());
            async move { active.renew_forever(store, LEASE, None).await }
        });
        tokio::time::sleep(LEASE * 3).await;
        assert!(
            checks.iter().all(|c| !c.is_finished()),
            "neither runs nor gives up while the store is out"
        );

        // Back: the second claim's renewal gets there before the sweep,
        // which takes the first over; then the worker's renewals run.
        store.set_outage(false);
        store.renew(&[claims[1].0.clone()], LEASE).await.unwrap();
        let taken = store.expired_leases(10, "sweep").await.unwrap();
        assert_eq!(taken.len(), 1, "{taken:?}");
        let mut verdicts = Vec::new();
        for check in checks {
            verdicts.push(check.await.unwrap());
        }
        assert_eq!(
            verdicts,
            [true, false],
            "the taken-over claim is not run; the held one is"
        );
        renewals.abort();
    }

    /// Holds the first publish to a task queue up for three leases before
    /// letting it through (RabbitMQ blocking publishers for a memory
    /// alarm, say); counts the publishes it held up.
    struct FirstTaskPublishStalls {
        tasks_prefix: String,
        stalled: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl PublishHook for FirstTaskPublishStalls {
        async fn publish(
            &self,
            inner: &MemoryBroker,
            batch: Vec<crate::broker::Outgoing>,
        ) -> Result<(), BrokerError> {
            use std::sync::atomic::Ordering;
            if batch
                .iter()
                .any(|m| m.queue.starts_with(&self.tasks_prefix))
                && self.stalled.fetch_add(1, Ordering::SeqCst) == 0
            {
                tokio::time::sleep(LEASE * 3).await;
            }
            inner.publish(batch).await
        }
    }

    /// A worker that claims a submitted job's root to run here, and then
    /// waits on the broker for longer than a lease to publish the job's
    /// other root, keeps the claim renewed from the moment it was made: the
    /// root runs once, under that claim. (Until the twenty-eighth session
    /// the claim was renewed only from its run, and the sweep took it over
    /// as a dead worker's: the root's attempt 1 was lost, or the task
    /// failed with one attempt allowed.)
    #[tokio::test(start_paused = true)]
    async fn a_root_claimed_from_a_submission_is_renewed_while_its_siblings_are_published() {
        let names = Names::new("slowroots");
        let store = memory_store();
        let inner = Arc::new(MemoryBroker::reliable(names.clone()));
        let broker = Arc::new(WithPublish {
            inner: inner.clone(),
            hook: FirstTaskPublishStalls {
                tasks_prefix: names.task_queue(""),
                stalled: Default::default(),
            },
        });
        let runs = Arc::new(Mutex::new(Vec::new()));
        let registry = Registry::new().with(Recorder {
            runs: runs.clone(),
            broker: inner.clone(),
        });
        inner.declare(&["default".to_owned()]).await.unwrap();
        let dispatcher = sweeping_dispatcher(store.clone(), inner.clone(), &registry, &names);
        let worker = one_slot_worker(store.clone(), broker.clone(), registry.clone(), &names)
            .accepting_submissions(JobIntake::new(&Config::default(), registry).unwrap());
        let stop = ShutdownTrigger::new();
        let (d, w) = (stop.subscribe(), stop.subscribe());
        let worker = tokio::spawn(async move { worker.run(w).await });
        // The worker consumes before the dispatcher starts, so the
        // submission is its own.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let dispatcher = tokio::spawn(async move { dispatcher.run(d).await });
        let job = json!({"id": "j", "requestor": "me", "tasks": [
            {"name": "a", "handler": "record", "retry": {"max_attempts": 1}},
            {"name": "b", "handler": "record", "retry": {"max_attempts": 1}}]});
        inner
            .publish(vec![crate::broker::Outgoing::durable(
                names.submit_queue(),
                job.to_string().into_bytes(),
            )])
            .await
            .unwrap();

        let status = finished_within_100_leases(store.as_ref(), "j").await;
        assert_eq!(
            broker
                .hook
                .stalled
                .load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the worker took the submission and published the other root"
        );
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        assert!(
            status.history.iter().all(|h| !h.reason.contains("lease")),
            "{status:#?}"
        );
        let mut runs = runs.lock().unwrap().clone();
        runs.sort();
        assert_eq!(runs, vec![("a".into(), 1), ("b".into(), 1)]);
        stop.trigger();
        let _ = tokio::join!(dispatcher, worker);
    }
}
