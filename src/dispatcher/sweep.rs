//! The sweep (the `poke` of LUCI CV): promotes due retries and recovers
//! tasks whose claim's lease lapsed. Safe with many dispatchers at once:
//! every action is a checked store transition, and schedule entries are
//! forgotten only after their messages are confirmed.
//!
//! After the store was unreachable, lapsed leases are left alone for
//! [`RECLAIM_GRACE`] once it answers again: the workers could not renew
//! through the outage either, and a live one renews its claims within
//! about 100 ms of the store's return (see `worker/leases.rs`), so its runs
//! go on instead of being taken over as dead. A dispatcher that has just
//! started waits as long, since it cannot know whether the store was down
//! a moment ago. Due retries are promoted at once.
//!
//! Passes come every `sweep_interval`, and in between when a retry falls
//! due sooner, so a retry starts at the time its status shows rather than
//! up to an interval later: after each pass, and every [`RETRY_PEEK`]
//! while it waits for the next, the loop reads when the earliest retry
//! falls due (`Store::next_retry_in`, one cheap read) and moves the next
//! pass to that moment if it is sooner. Such early passes are at least [`MIN_PASS_GAP`] apart (a burst
//! of retries due at scattered moments is taken in rounds, not one pass
//! each), and each dispatcher wakes a few ms after the due time, by an
//! amount of its own ([`retry_spread`]), so that several dispatchers do
//! not all promote and publish the same retry (which would be harmless,
//! claims dedupe, but wasteful).
//!
//! Entries are handled independently: one whose messages the broker
//! refuses (a queue that cannot be declared, a nack from a queue at its
//! length limit) is logged and moved [`REFUSED_ENTRY_PAUSE`] on
//! (`Store::defer`), and the pass goes on
//! with the others, deferring unasked the later entries bound for the
//! queue that refused. Left due, as until the thirty-second session, it
//! stayed at the head of its schedule and was read first at every pass;
//! and once a batch's worth of such entries had failed in one pass, the
//! entries behind them (other queues' retries and lapsed leases among
//! them) waited for as long as the queue refused. A broker or store that
//! is unreachable ends a pass early (every other call would fail alike),
//! as does a store error on a forget or a whole batch's worth of entries
//! refused; what is left waits for the next pass.

use std::collections::HashSet;

use crate::broker::BrokerError;
use crate::shutdown::Shutdown;
use crate::store::{ScheduleIndex, StoreError, SweepAction};

use super::Dispatcher;

const SWEEP_BATCH: usize = 500;

/// The most batches of one schedule a pass works through: a backlog (a
/// failover's worth of lapsed leases, all due at once) is taken a few
/// thousand entries at a time, each pass starting again with the retries
/// and the next coming at once, so that retries falling due meanwhile are
/// not held up behind it.
const SWEEP_BATCHES_PER_PASS: usize = 10;

/// How long lapsed leases are left to their workers' renewals after the
/// store was unreachable: ten of a worker's retries.
pub const RECLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the loop, waiting for its next pass, reads when the earliest
/// retry falls due (only when the interval is longer).
pub const RETRY_PEEK: std::time::Duration = std::time::Duration::from_millis(50);

/// How long an entry whose messages the broker refused waits before a
/// pass tries it again: long enough that a queue refusing everything costs
/// a publish per entry every few seconds, not at every pass; short enough
/// that a refusal that was a moment's (a leader election) costs little.
pub const REFUSED_ENTRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

/// The least time from one pass's start to the next's when a retry falls
/// due before the next regular pass.
pub const MIN_PASS_GAP: std::time::Duration = std::time::Duration::from_millis(10);

/// The most a dispatcher waits past a retry's due time (see
/// [`retry_spread`]).
const MAX_RETRY_SPREAD: std::time::Duration = std::time::Duration::from_millis(20);

/// How long after a retry's due time the dispatcher `id` wakes for it: a
/// fixed amount per dispatcher in `0..=min(MAX_RETRY_SPREAD, interval/10)`,
/// taken from its id (not at random: simulations replay exactly).
pub fn retry_spread(id: &str, interval: std::time::Duration) -> std::time::Duration {
    use std::hash::{Hash, Hasher};
    let most = MAX_RETRY_SPREAD.min(interval / 10).as_micros() as u64;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    std::time::Duration::from_micros(h.finish() % (most + 1))
}

/// What the sweep loop remembers from one pass to the next.
#[derive(Debug, Default)]
struct SweepLoop {
    /// The store was unreachable at the last pass, or at a look for the
    /// next retry since.
    store_down: bool,
    /// Lapsed leases are not reclaimed before this (after an outage, or
    /// the dispatcher's start).
    reclaim_from: Option<tokio::time::Instant>,
    /// The last pass saw every due retry. When it ended before (a broker
    /// or store failing), a retry due now may be one it left, and does
    /// not bring the next pass forward (it would come every
    /// [`MIN_PASS_GAP`] while the broker is down).
    retries_seen: bool,
    /// The last pass stopped at [`SWEEP_BATCHES_PER_PASS`] with entries
    /// still due: the next comes at once.
    backlog: bool,
}

impl SweepLoop {
    /// The loop of a dispatcher starting now.
    fn starting() -> SweepLoop {
        SweepLoop {
            store_down: false,
            reclaim_from: Some(tokio::time::Instant::now() + RECLAIM_GRACE),
            retries_seen: true,
            backlog: false,
        }
    }
}

/// What a pass, or its work through one schedule, did.
#[derive(Debug, Default, Clone, Copy)]
struct Swept {
    /// Entries acted on: their messages confirmed, the entries forgotten.
    done: usize,
    /// It saw every due entry (those refused were deferred); not when it
    /// stopped because a batch's worth were refused. Of the retries
    /// schedule, for a whole pass.
    seen_all: bool,
    /// It stopped at [`SWEEP_BATCHES_PER_PASS`] with entries still due.
    capped: bool,
    /// A publish of it waited longer than [`RECLAIM_GRACE`] (a broker slow
    /// to confirm, or a batch published entry by entry), with no call to
    /// the store meanwhile: an outage of the store in that time went
    /// unseen, and the workers may not have been able to renew. The next
    /// read of lapsed leases waits for the grace first, as after an outage
    /// seen (before the thirty-sixth session it came at once). A wait, not
    /// a pass skipped: a broker always that slow still has every lease
    /// taken over in time.
    looked_away: bool,
}

/// What publishing one batch of sweep actions did.
#[derive(Debug, Default)]
struct Published {
    /// Entries whose messages are all confirmed: forget them.
    done: Vec<String>,
    /// Entries whose messages the broker refused: defer them.
    refused: Vec<String>,
    /// Entries with a message for a queue that refused another entry's
    /// earlier in the pass, not tried: defer them too.
    held: Vec<String>,
    /// The broker became unreachable: stop the pass (after forgetting
    /// `done` and deferring `refused`); the entries not tried stay due.
    unavailable: Option<BrokerError>,
}

impl Dispatcher {
    pub(super) async fn sweep_forever(&self, mut shutdown: Shutdown) {
        let mut state = SweepLoop::starting();
        let mut last = tokio::time::Instant::now();
        let mut pass_at = last;
        loop {
            let peek_at = tokio::time::Instant::now() + RETRY_PEEK;
            if pass_at > peek_at {
                if !shutdown.sleep_until(peek_at).await {
                    return;
                }
                pass_at = self.sooner_for_retry(&mut state, last, pass_at).await;
                continue;
            }
            if !shutdown.sleep_until(pass_at).await {
                return;
            }
            last = tokio::time::Instant::now();
            self.sweep_tick(&mut state).await;
            pass_at = last + self.options.sweep_interval;
            if state.backlog {
                pass_at = last + MIN_PASS_GAP;
            }
            pass_at = self.sooner_for_retry(&mut state, last, pass_at).await;
        }
    }

    /// The next pass's time, `pass_at`, moved to when the earliest retry
    /// falls due (plus this dispatcher's [`retry_spread`]) if that is
    /// sooner, but not before [`MIN_PASS_GAP`] after the pass that started
    /// at `last`. When the last pass ended early, a retry due already may
    /// be one it left, and does not bring the pass forward. A store that
    /// cannot be reached here is noted down, as at a pass: an outage that
    /// begins and ends between two passes (a sweep interval near the
    /// lease) starts the [`RECLAIM_GRACE`] too, or the next pass would
    /// take over leases that lapsed only for want of Redis, before their
    /// workers' renewals got through.
    async fn sooner_for_retry(
        &self,
        state: &mut SweepLoop,
        last: tokio::time::Instant,
        pass_at: tokio::time::Instant,
    ) -> tokio::time::Instant {
        if state.store_down {
            return pass_at;
        }
        let due_in = match self.store.next_retry_in(0).await {
            Ok(due_in) => due_in,
            Err(e) => {
                if e.is_retryable() {
                    tracing::warn!(error = %e, "store unreachable; sweep skipped until it answers");
                    state.store_down = true;
                } else {
                    tracing::debug!(error = %e, "cannot read when the next retry is due; sweeping at the regular time");
                }
                return pass_at;
            }
        };
        let Some(due_in) = due_in else {
            return pass_at;
        };
        if due_in.is_zero() && !state.retries_seen {
            return pass_at;
        }
        let now = tokio::time::Instant::now();
        let spread = retry_spread(&self.options.id, self.options.sweep_interval);
        (now + due_in + spread)
            .max(last + MIN_PASS_GAP)
            .min(pass_at)
    }

    /// One tick of the sweep loop: a pass, unless the store is unreachable;
    /// without lapsed leases for [`RECLAIM_GRACE`] after it was (or after
    /// the start).
    async fn sweep_tick(&self, state: &mut SweepLoop) {
        // Also notices a Redis that lost its data (see RedisStore::check_epoch).
        if let Err(e) = self.store.ping().await {
            if !std::mem::replace(&mut state.store_down, true) {
                tracing::warn!(error = %e, "store unreachable; sweep skipped until it answers");
            }
            return;
        }
        let now = tokio::time::Instant::now();
        if std::mem::take(&mut state.store_down) {
            tracing::info!(
                grace_ms = RECLAIM_GRACE.as_millis() as u64,
                "store answers again; lapsed leases are left to their workers' renewals for a moment"
            );
            state.reclaim_from = Some(now + RECLAIM_GRACE);
        }
        let leases = match state.reclaim_from {
            Some(from) if now < from => false,
            _ => {
                state.reclaim_from = None;
                true
            }
        };
        // A pass that ends early may leave retries due.
        state.retries_seen = false;
        state.backlog = false;
        match self.sweep_pass(leases).await {
            Ok(swept) => {
                state.retries_seen = swept.seen_all;
                state.backlog = swept.capped;
                if swept.done > 0 {
                    tracing::debug!(actions = swept.done, "sweep");
                }
            }
            Err(SweepError::Store(e)) if e.is_retryable() => {
                tracing::warn!(error = %e, "sweep failed; will retry");
                state.store_down = true;
            }
            Err(e) => tracing::warn!(error = %e, "sweep failed; will retry"),
        }
    }

    /// One pass: due retries, then lapsed leases. Returns how many schedule
    /// entries were acted on (their messages confirmed and the entries
    /// forgotten). Entries that failed are left for the next pass; an error
    /// means the store or the broker is unreachable, or the store refused
    /// a call for good (a record it cannot use).
    pub async fn sweep_once(&self) -> Result<usize, SweepError> {
        Ok(self.sweep_pass(true).await?.done)
    }

    /// A pass: due retries, then lapsed leases if `leases`. `seen_all` is
    /// of the retries only.
    async fn sweep_pass(&self, leases: bool) -> Result<Swept, SweepError> {
        let retries = self.sweep_schedule(ScheduleIndex::Retries).await?;
        if !leases {
            return Ok(retries);
        }
        if retries.looked_away {
            self.wait_out_the_grace().await?;
        }
        let leases = self.sweep_schedule(ScheduleIndex::Leases).await?;
        Ok(Swept {
            done: retries.done + leases.done,
            seen_all: retries.seen_all,
            capped: retries.capped || leases.capped,
            looked_away: leases.looked_away,
        })
    }

    /// Leave lapsed leases to their workers' renewals after a publish in
    /// which the sweep did not look at the store (see
    /// [`Swept::looked_away`]): until the store has answered, asked every
    /// [`RETRY_PEEK`], for [`RECLAIM_GRACE`]. Not a blind sleep, which is
    /// itself a time of not looking (the simulation found an outage within
    /// one, and the leases read right after it taken over). A store that
    /// does not answer ends the pass as an outage, whose grace the loop
    /// gives once it answers.
    async fn wait_out_the_grace(&self) -> Result<(), StoreError> {
        tracing::debug!(
            grace_ms = RECLAIM_GRACE.as_millis() as u64,
            "a sweep publish waited long; lapsed leases are left to their workers' renewals for a moment"
        );
        let from = tokio::time::Instant::now();
        loop {
            self.store.ping().await?;
            if from.elapsed() >= RECLAIM_GRACE {
                return Ok(());
            }
            tokio::time::sleep(RETRY_PEEK).await;
        }
    }

    async fn due(
        &self,
        schedule: ScheduleIndex,
        limit: usize,
    ) -> Result<Vec<SweepAction>, StoreError> {
        match schedule {
            ScheduleIndex::Retries => self.store.due_retries(limit).await,
            ScheduleIndex::Leases => self.store.expired_leases(limit, &self.options.id).await,
        }
    }

    /// Move `entries`, whose messages the broker refused, out of the way
    /// of the others for [`REFUSED_ENTRY_PAUSE`].
    async fn defer(
        &self,
        schedule: ScheduleIndex,
        entries: &[String],
        read_at: u64,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.store
            .defer(schedule, entries, read_at, REFUSED_ENTRY_PAUSE)
            .await
    }

    async fn forget(
        &self,
        schedule: ScheduleIndex,
        entries: &[String],
        read_at: u64,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        match schedule {
            ScheduleIndex::Retries => self.store.forget_retries(entries, read_at).await,
            ScheduleIndex::Leases => self.store.forget_leases(entries, read_at).await,
        }
    }

    /// Work through one schedule in batches. Entries the broker refused
    /// are deferred (see [`Self::defer`]); one the deferral left due (its
    /// score moved meanwhile) is skipped if it comes back in a later batch
    /// of this pass, and the batch limit grows by the number that came
    /// back in the last read (not by every entry deferred: those moved on
    /// are not read again, and a limit grown by them read up to 27,500
    /// entries in a pass of ten batches), so each batch brings new
    /// entries. Once a whole batch's worth has been refused, the rest
    /// waits for the next pass (the broker is likely refusing everything,
    /// and each refused entry cost a publish). After a publish that waited
    /// longer than [`RECLAIM_GRACE`], the next read of lapsed leases waits
    /// for the grace (see [`Swept::looked_away`]).
    async fn sweep_schedule(&self, schedule: ScheduleIndex) -> Result<Swept, SweepError> {
        let mut failed: HashSet<String> = HashSet::new();
        // Entries the broker refused in this pass, and the queues that
        // refused them.
        let mut refused = 0;
        let mut refusing: HashSet<String> = HashSet::new();
        let mut total = 0;
        let mut seen_all = true;
        let mut capped = false;
        let mut looked_away = false;
        let mut came_back = 0;
        let mut deferred_last = 0;
        for batch in 1.. {
            if looked_away && schedule == ScheduleIndex::Leases {
                looked_away = false;
                self.wait_out_the_grace().await?;
            }
            // Room for the entries that keep coming back, and for those
            // deferred last that may (a deferral that left them due).
            let limit = SWEEP_BATCH + came_back + deferred_last;
            let actions = self.due(schedule, limit).await?;
            // One read: every action of the batch has its time.
            let read_at = actions.iter().map(|a| a.read_at).min().unwrap_or(0);
            let read = actions.len();
            let fresh: Vec<SweepAction> = actions
                .into_iter()
                .filter(|a| !failed.contains(&a.entry))
                .collect();
            came_back = read - fresh.len();
            // The stores leave out of `actions` the entries they moved on
            // (a live lease, a retry not due yet): a batch shorter than
            // the limit may have read a full one. Only a batch with
            // nothing new says the schedule is drained (one more read).
            let more = !fresh.is_empty();
            let publishing = tokio::time::Instant::now();
            let published = self.publish_actions(&fresh, &mut refusing).await;
            looked_away |= publishing.elapsed() > RECLAIM_GRACE;
            self.forget(schedule, &published.done, read_at).await?;
            let deferred = [published.refused.as_slice(), &published.held].concat();
            self.defer(schedule, &deferred, read_at).await?;
            deferred_last = deferred.len();
            total += published.done.len();
            refused += published.refused.len();
            failed.extend(deferred);
            if let Some(e) = published.unavailable {
                return Err(e.into());
            }
            if !more {
                break;
            }
            if batch >= SWEEP_BATCHES_PER_PASS {
                (capped, seen_all) = (true, false);
                break;
            }
            if refused >= SWEEP_BATCH {
                tracing::warn!(
                    ?schedule,
                    refused,
                    "the broker refused many sweep entries' messages; the rest wait for the next sweep"
                );
                seen_all = false;
                break;
            }
        }
        Ok(Swept {
            done: total,
            seen_all,
            capped,
            looked_away,
        })
    }

    /// Whether `action` has a message for one of the `refusing` queues
    /// (full names); at once when none has refused.
    fn bound_for(&self, action: &SweepAction, refusing: &HashSet<String>) -> bool {
        !refusing.is_empty()
            && action
                .publish
                .iter()
                .any(|t| refusing.contains(&self.names.task_queue(&t.queue)))
    }

    /// Publish the messages of `actions`: all in one batch (one round of
    /// confirms), and if that fails for a reason other than an unreachable
    /// broker, entry by entry, to tell the entries that can be published
    /// from those that cannot (the ones published twice are harmless
    /// duplicates: claims dedupe). An entry with a message for one of the
    /// `refusing` queues (full names), which refused an entry earlier in
    /// the pass, is held without a publish, and a queue that refuses one
    /// joins them: a queue refusing a backlog of thousands costs a publish
    /// or two a pass, not one per entry, nor the entries behind them
    /// their turn.
    async fn publish_actions(
        &self,
        all: &[SweepAction],
        refusing: &mut HashSet<String>,
    ) -> Published {
        let mut published = Published::default();
        let (held, actions): (Vec<&SweepAction>, Vec<&SweepAction>) =
            all.iter().partition(|a| self.bound_for(a, refusing));
        published.held = held.into_iter().map(|a| a.entry.clone()).collect();
        let tasks: Vec<_> = actions
            .iter()
            .flat_map(|a| a.publish.iter().cloned())
            .collect();
        match self.outbox.publish_tasks(&tasks).await {
            Ok(()) => {
                published.done = actions.iter().map(|a| a.entry.clone()).collect();
                return published;
            }
            Err(e) if e.is_unavailable() => {
                published.unavailable = Some(e);
                return published;
            }
            Err(e) => {
                tracing::debug!(error = %e, entries = actions.len(), "sweep batch failed; publishing entry by entry");
            }
        }
        for action in actions {
            if self.bound_for(action, refusing) {
                published.held.push(action.entry.clone());
                continue;
            }
            match self.outbox.publish_tasks(&action.publish).await {
                Ok(()) => published.done.push(action.entry.clone()),
                Err(e) if e.is_unavailable() => {
                    // This entry and the ones after it stay due, for the
                    // next pass.
                    published.unavailable = Some(e);
                    return published;
                }
                Err(e) => {
                    if let BrokerError::Refused { queue, .. }
                    | BrokerError::Unroutable { queue, .. } = &e
                    {
                        refusing.insert(queue.clone());
                    }
                    for task in &action.publish {
                        tracing::warn!(
                            error = %e,
                            job = %task.job,
                            task = %task.task,
                            attempt = task.attempt,
                            queue = %task.queue,
                            retry_in_s = REFUSED_ENTRY_PAUSE.as_secs_f64(),
                            "sweep cannot publish task; trying again after a pause"
                        );
                    }
                    published.refused.push(action.entry.clone());
                }
            }
        }
        published
    }
}

/// Why a sweep pass stopped early (the next pass repeats it).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker is unreachable.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::broker::memory::{MemoryBroker, PublishHook, WithPublish};
    use crate::broker::{Broker, Outgoing};
    use crate::config::Config;
    use crate::dispatcher::DispatcherOptions;
    use crate::intake::{Intake, JobIntake};
    use crate::model::TaskMessage;
    use crate::names::Names;
    use crate::store::memory::{MemoryStore, TokioClock};
    use crate::store::{AttemptResult, ClaimOutcome, Created, Store};

    /// Nacks every message to one queue while told to (as RabbitMQ does
    /// for a queue that rejects publishes), publishing the rest.
    #[derive(Default)]
    struct Nacking {
        nack: Mutex<Option<String>>,
        /// How long each publish waits for its confirms.
        delay: Mutex<Duration>,
        /// When each publish began.
        started: Mutex<Vec<tokio::time::Instant>>,
        /// Batches nacked so far.
        nacked: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl PublishHook for Nacking {
        async fn publish(
            &self,
            inner: &MemoryBroker,
            batch: Vec<Outgoing>,
        ) -> Result<(), BrokerError> {
            let nack = self.nack.lock().unwrap().clone();
            self.started
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            let delay = *self.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let (nacked, rest): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|m| Some(&m.queue) == nack.as_ref());
            inner.publish(rest).await?;
            match nacked.first() {
                Some(m) => {
                    self.nacked
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Err(BrokerError::Refused {
                        queue: m.queue.clone(),
                        reason: "nacked".into(),
                    })
                }
                None => Ok(()),
            }
        }
    }

    struct Setup {
        store: Arc<MemoryStore>,
        broker: Arc<WithPublish<Nacking>>,
        dispatcher: Dispatcher,
        intake: JobIntake,
    }

    fn setup() -> Setup {
        let names = Names::new("t");
        let store = Arc::new(MemoryStore::new(
            Arc::new(TokioClock::new(1_000_000)),
            Duration::from_secs(3600),
            1,
            "test",
        ));
        let broker = Arc::new(WithPublish {
            inner: Arc::new(MemoryBroker::reliable(names.clone())),
            hook: Nacking::default(),
        });
        let config = Config::default();
        let intake = JobIntake::new(&config, conveyor_builtin_handlers::registry()).unwrap();
        let dispatcher = Dispatcher::new(
            store.clone(),
            broker.clone(),
            intake.clone(),
            names,
            DispatcherOptions {
                id: "sweeper".into(),
                prefetch: 1,
                sweep_interval: Duration::from_secs(1),
                task_queues: vec!["default".into()],
            },
        );
        Setup {
            store,
            broker,
            dispatcher,
            intake,
        }
    }

    impl Setup {
        /// Create a one-task job on `queue` and claim its task.
        async fn claimed(&self, job: &str, queue: &str) -> crate::store::Claimed {
            let body = serde_json::json!({"id": job, "requestor": "r",
                "tasks": [{"name": "t", "handler": "noop", "queue": queue}]});
            let Intake::Valid(planned) = self.intake.accept(body.to_string().as_bytes()) else {
                panic!("job {job} is not valid");
            };
            let Created::New { ready } = self.store.create_job(&planned).await.unwrap() else {
                panic!("job {job} exists");
            };
            match self
                .store
                .claim(&ready[0], "w", Duration::from_secs(1))
                .await
                .unwrap()
            {
                ClaimOutcome::Claimed(c) => *c,
                other => panic!("claim of {job}: {other:?}"),
            }
        }

        /// A job on `queue` whose claim's lease will lapse.
        async fn lapsing(&self, job: &str, queue: &str) {
            self.claimed(job, queue).await;
        }

        /// A job on `queue` with a retry due soon.
        async fn retrying(&self, job: &str, queue: &str) {
            self.retrying_in(job, queue, Duration::from_millis(10))
                .await;
        }

        /// A job on `queue` with a retry due in `delay`.
        async fn retrying_in(&self, job: &str, queue: &str, delay: Duration) {
            let claimed = self.claimed(job, queue).await;
            let result = AttemptResult::Retry {
                error: "transient".into(),
                delay,
            };
            self.store
                .complete(&claimed.claim, "w", &result)
                .await
                .unwrap();
            self.store.forget_claim(&claimed.claim).await.unwrap();
        }

        /// The jobs of the task messages queued in `queue`, each once.
        async fn queued_jobs(&self, queue: &str) -> Vec<String> {
            let mut jobs: Vec<String> = self
                .broker
                .inner
                .take_all(&format!("t.tasks.{queue}"))
                .await
                .iter()
                .map(|b| TaskMessage::decode(b).unwrap().job)
                .collect();
            jobs.sort();
            jobs.dedup();
            jobs
        }
    }

    /// Run the sweep loop of `s` until `until` (paused clock) and return
    /// when (since the start) each job's task message was queued.
    async fn sweep_until(s: &Setup, until: Duration, queue: &str) -> Vec<(Duration, String)> {
        let sweeping = Sweeping::start(s);
        let seen = sweeping.watch(s, until, queue).await;
        sweeping.stop().await;
        seen
    }

    /// A sweep loop running in the background.
    struct Sweeping {
        trigger: crate::shutdown::ShutdownTrigger,
        task: tokio::task::JoinHandle<()>,
        start: tokio::time::Instant,
    }

    impl Sweeping {
        fn start(s: &Setup) -> Sweeping {
            let trigger = crate::shutdown::ShutdownTrigger::new();
            let (dispatcher, stop) = (s.dispatcher.clone(), trigger.subscribe());
            Sweeping {
                trigger,
                task: tokio::spawn(async move { dispatcher.sweep_forever(stop).await }),
                start: tokio::time::Instant::now(),
            }
        }

        /// When (since the loop started) each job's task message was
        /// queued in `queue`, watched until `until` after the start.
        async fn watch(&self, s: &Setup, until: Duration, queue: &str) -> Vec<(Duration, String)> {
            let mut seen = Vec::new();
            while self.start.elapsed() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
                for job in s.queued_jobs(queue).await {
                    seen.push((self.start.elapsed(), job));
                }
            }
            seen
        }

        async fn stop(self) {
            self.trigger.trigger();
            self.task.await.unwrap();
        }
    }

    /// When the tests below schedule their retry: after the loop's first
    /// pass, which it makes at once.
    const AFTER_FIRST_PASS: Duration = Duration::from_millis(5);

    /// Start the sweep loop of `s`, schedule a retry due in `delay`
    /// [`AFTER_FIRST_PASS`], and return when (since the loop started) its
    /// task message was queued.
    async fn promoted_when_scheduled_after_a_pass(s: &Setup, delay: Duration) -> Duration {
        let sweeping = Sweeping::start(s);
        tokio::time::sleep(AFTER_FIRST_PASS).await;
        s.retrying_in("r", "default", delay).await;
        let interval = s.dispatcher.options.sweep_interval;
        let seen = sweeping.watch(s, 2 * interval, "default").await;
        sweeping.stop().await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        seen[0].0
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_scheduled_after_a_pass_is_promoted_when_due_not_at_the_next_pass() {
        let s = setup();
        let interval = s.dispatcher.options.sweep_interval;
        assert!(interval > 4 * RETRY_PEEK);
        let at = promoted_when_scheduled_after_a_pass(&s, interval / 5).await;
        let due = AFTER_FIRST_PASS + interval / 5;
        let spread = retry_spread(&s.dispatcher.options.id, interval);
        assert!(
            at >= due + spread && at <= due + spread + Duration::from_millis(2),
            "promoted at {at:?}, due at {due:?} (+{spread:?})"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_due_at_once_is_promoted_at_the_next_look_not_the_next_pass() {
        let s = setup();
        let at = promoted_when_scheduled_after_a_pass(&s, Duration::ZERO).await;
        let spread = retry_spread(
            &s.dispatcher.options.id,
            s.dispatcher.options.sweep_interval,
        );
        assert!(
            at <= RETRY_PEEK + spread + Duration::from_millis(2),
            "promoted at {at:?}"
        );
    }

    fn nacked(s: &Setup) -> usize {
        s.broker
            .hook
            .nacked
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_the_broker_refuses_is_tried_again_after_a_pause_not_at_every_pass() {
        let s = setup();
        let interval = s.dispatcher.options.sweep_interval;
        assert_eq!(REFUSED_ENTRY_PAUSE, 2 * interval);
        s.retrying_in("stuck", "stuck", Duration::from_millis(10))
            .await;
        tokio::time::advance(Duration::from_millis(20)).await;
        *s.broker.hook.nack.lock().unwrap() = Some("t.tasks.stuck".into());
        let sweeping = Sweeping::start(&s);
        sweeping
            .watch(&s, 3 * interval - Duration::from_millis(1), "stuck")
            .await;
        // Tried at the passes at 0 and at 2 intervals (the pause), each
        // time the batch and then the entry alone; not at the pass at 1.
        assert_eq!(nacked(&s), 4, "two tries, a pause apart");
        // Once it can be published, it is at the next try.
        *s.broker.hook.nack.lock().unwrap() = None;
        let seen = sweeping.watch(&s, 5 * interval, "stuck").await;
        sweeping.stop().await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        let next_try = 2 * REFUSED_ENTRY_PAUSE;
        assert!(
            seen[0].0 >= next_try && seen[0].0 <= next_try + Duration::from_millis(2),
            "{seen:?}"
        );
    }

    /// Run the sweep loop of `s` for three intervals and check that the
    /// retry of job "r", due `due` after the start, is promoted once, when
    /// due (plus the spread): not at the regular pass after.
    async fn promoted_when_due(s: &Setup, due: Duration) {
        let interval = s.dispatcher.options.sweep_interval;
        let spread = retry_spread(&s.dispatcher.options.id, interval);
        assert!(spread <= MAX_RETRY_SPREAD.min(interval / 10));
        let seen = sweep_until(s, 3 * interval, "default").await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        let (at, job) = &seen[0];
        assert_eq!(job, "r");
        assert!(
            *at >= due + spread && *at <= due + spread + Duration::from_millis(2),
            "promoted at {at:?}, due at {due:?} (+{spread:?}); the regular pass was at {:?}",
            2 * interval
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_cannot_be_published_does_not_hold_back_the_others() {
        let s = setup();
        let interval = s.dispatcher.options.sweep_interval;
        s.retrying_in("stuck", "stuck", Duration::ZERO).await;
        *s.broker.hook.nack.lock().unwrap() = Some("t.tasks.stuck".into());
        // Due 1.3 intervals from now, behind the stuck one.
        let due = interval * 13 / 10;
        s.retrying_in("r", "default", due).await;
        promoted_when_due(&s, due).await;
        // Tried at the passes at 0 and 2 intervals (the pause), each time
        // its batch and then the entry alone; not at the one for "r".
        assert_eq!(nacked(&s), 4, "two tries");
        assert!(s.queued_jobs("stuck").await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_falling_due_between_passes_is_promoted_when_due_not_at_the_next_pass() {
        let s = setup();
        let interval = s.dispatcher.options.sweep_interval;
        // Due 1.3 intervals from now: the pass at 1 interval sees it.
        let due = interval * 13 / 10;
        s.retrying_in("r", "default", due).await;
        promoted_when_due(&s, due).await;
    }

    #[tokio::test(start_paused = true)]
    async fn retries_due_in_a_burst_are_promoted_in_passes_at_least_a_gap_apart() {
        let s = setup();
        let interval = s.dispatcher.options.sweep_interval;
        // Due 1 ms apart, from 1.5 intervals on.
        for i in 0..30u32 {
            let due = interval * 3 / 2 + Duration::from_millis(u64::from(i));
            s.retrying_in(&format!("r{i:02}"), "default", due).await;
        }
        let seen = sweep_until(&s, 3 * interval, "default").await;
        assert_eq!(seen.len(), 30, "{seen:?}");
        let mut passes: Vec<Duration> = seen.iter().map(|(at, _)| *at).collect();
        passes.dedup();
        // 30 ms of due times in passes at least 10 ms apart: four at most,
        // the last within a gap (and the spread) of the last due time.
        assert!(passes.len() > 1 && passes.len() <= 4, "{passes:?}");
        for pair in passes.windows(2) {
            assert!(pair[1] - pair[0] >= MIN_PASS_GAP, "{passes:?}");
        }
        let last_due = interval * 3 / 2 + Duration::from_millis(29);
        let spread = retry_spread(&s.dispatcher.options.id, interval);
        assert!(
            passes[passes.len() - 1] <= last_due + spread + MIN_PASS_GAP,
            "{passes:?}"
        );
    }

    #[test]
    fn dispatchers_wake_for_a_retry_at_moments_of_their_own_within_the_bound() {
        let interval = Duration::from_millis(500);
        let spreads: std::collections::HashSet<Duration> = (0..20)
            .map(|i| retry_spread(&format!("dispatcher-{i}"), interval))
            .collect();
        assert!(spreads.len() > 10, "ids spread out: {spreads:?}");
        assert!(spreads.iter().all(|s| *s <= MAX_RETRY_SPREAD));
        assert_eq!(
            retry_spread("d", interval),
            retry_spread("d", interval),
            "the same id, the same moment"
        );
        assert!(retry_spread("d", Duration::from_millis(10)) <= Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_that_cannot_be_published_does_not_stop_the_others() {
        let s = setup();
        // Retries come first in a pass: the failing entry is among them.
        s.retrying("stuck-retry", "stuck").await;
        s.retrying("good-retry", "default").await;
        s.lapsing("good-lease", "default").await;
        s.lapsing("stuck-lease", "stuck").await;
        // The cache says declared, the broker has no such queue: the
        // publish comes back returned, and the queue is declared again.
        s.dispatcher.outbox.mark_declared(&["deleted".to_owned()]);
        s.lapsing("deleted-lease", "deleted").await;
        tokio::time::advance(Duration::from_secs(2)).await;
        *s.broker.hook.nack.lock().unwrap() = Some("t.tasks.stuck".into());

        let done = s.dispatcher.sweep_once().await.unwrap();
        assert_eq!(done, 3, "every entry but the two nacked ones");
        assert_eq!(
            s.queued_jobs("default").await,
            vec!["good-lease", "good-retry"]
        );
        assert_eq!(s.queued_jobs("deleted").await, vec!["deleted-lease"]);
        assert!(s.queued_jobs("stuck").await.is_empty());
        assert_eq!(
            s.store.schedule_sizes(),
            (1, 1),
            "the failed lease and retry entries are kept"
        );
        // Deferred: a pass at once does not try them again.
        let tried = nacked(&s);
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), 0);
        assert_eq!(nacked(&s), tried);

        // The first pass after the pause publishes what was left.
        *s.broker.hook.nack.lock().unwrap() = None;
        tokio::time::advance(REFUSED_ENTRY_PAUSE).await;
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), 2);
        assert_eq!(
            s.queued_jobs("stuck").await,
            vec!["stuck-lease", "stuck-retry"]
        );
        assert_eq!(s.store.schedule_sizes(), (0, 0));
    }

    /// Until the thirty-second session refused entries stayed due at the
    /// head of their schedule: once a batch's worth had been refused in a
    /// pass, every pass stopped at them, and a retry behind them (another
    /// queue's) waited for as long as the queue refused.
    #[tokio::test(start_paused = true)]
    async fn more_refused_entries_than_a_batch_do_not_hold_back_a_retry_behind_them() {
        let s = setup();
        for i in 0..SWEEP_BATCH + 100 {
            s.retrying_in(&format!("stuck-{i:04}"), "stuck", Duration::ZERO)
                .await;
        }
        s.retrying_in("behind", "default", Duration::from_millis(1))
            .await;
        tokio::time::advance(Duration::from_millis(10)).await;
        *s.broker.hook.nack.lock().unwrap() = Some("t.tasks.stuck".into());
        // The first pass reads past them to the retry behind them.
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), 1);
        assert_eq!(s.queued_jobs("default").await, vec!["behind"]);
        assert!(s.queued_jobs("stuck").await.is_empty());
        assert_eq!(
            s.store.schedule_sizes().1,
            SWEEP_BATCH + 100,
            "every refused retry is kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_broker_ends_the_pass_and_keeps_the_entries() {
        let s = setup();
        s.retrying("r", "default").await;
        s.lapsing("l", "default").await;
        tokio::time::advance(Duration::from_secs(2)).await;
        s.broker.inner.set_outage(true);
        let err = s.dispatcher.sweep_once().await.unwrap_err();
        assert!(
            matches!(err, SweepError::Broker(BrokerError::Unavailable(_))),
            "{err:?}"
        );
        assert_eq!(s.store.schedule_sizes(), (1, 1));
        s.broker.inner.set_outage(false);
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), 2);
        assert_eq!(s.queued_jobs("default").await, vec!["l", "r"]);
        assert_eq!(s.store.schedule_sizes(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_store_outage_lapsed_leases_are_left_to_their_workers_for_a_moment() {
        let s = setup();
        let mut state = SweepLoop::default();
        s.retrying("r", "default").await;
        s.lapsing("l", "default").await;
        s.store.set_outage(true);
        tokio::time::advance(Duration::from_secs(2)).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.store.schedule_sizes(), (1, 1), "nothing swept while down");

        // Back: the due retry is promoted at once, the lapsed lease kept.
        s.store.set_outage(false);
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["r"]);
        assert_eq!(s.store.schedule_sizes(), (1, 0));
        tokio::time::advance(RECLAIM_GRACE - Duration::from_millis(1)).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.store.schedule_sizes(), (1, 0), "still within the grace");

        // Its worker did not renew it within the grace: reclaimed.
        tokio::time::advance(Duration::from_millis(1)).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["l"]);
        assert_eq!(s.store.schedule_sizes(), (0, 0));
    }

    /// An outage that begins and ends between two passes, seen only by a
    /// look for the next retry, starts the grace too: the leases that
    /// lapsed for want of the store are left to their workers' renewals.
    #[tokio::test(start_paused = true)]
    async fn an_outage_seen_only_between_passes_starts_the_grace_too() {
        let s = setup();
        let mut state = SweepLoop::default();
        s.lapsing("l", "default").await;
        s.store.set_outage(true);
        let now = tokio::time::Instant::now();
        s.dispatcher
            .sooner_for_retry(&mut state, now, now + Duration::from_secs(1))
            .await;
        s.store.set_outage(false);
        tokio::time::advance(Duration::from_secs(2)).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.store.schedule_sizes(), (1, 0), "left for the grace");
        tokio::time::advance(RECLAIM_GRACE).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["l"]);
    }

    /// A due retry `r` and a lapsed lease `l` on `default`, and a broker
    /// whose every publish takes twice the grace (returned).
    async fn a_retry_and_a_lease_due_behind_a_slow_broker() -> (Setup, SweepLoop, Duration) {
        let s = setup();
        s.retrying("r", "default").await;
        s.lapsing("l", "default").await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let slow = RECLAIM_GRACE * 2;
        *s.broker.hook.delay.lock().unwrap() = slow;
        (s, SweepLoop::default(), slow)
    }

    /// A publish that waited past the grace (a broker slow to confirm) is
    /// time in which the sweep did not look at the store: an outage then
    /// went unseen, so the next read of lapsed leases waits for the grace,
    /// as after an outage seen. A wait in the pass, not a pass skipped: a
    /// broker that slow for good still has the lease taken over.
    #[tokio::test(start_paused = true)]
    async fn a_publish_that_waited_past_the_grace_delays_the_next_lease_read_by_it() {
        let (s, mut state, slow) = a_retry_and_a_lease_due_behind_a_slow_broker().await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["l", "r"]);
        let started = s.broker.hook.started.lock().unwrap().clone();
        assert_eq!(started.len(), 2, "the retry's publish, then the lease's");
        assert!(
            started[1] - started[0] >= slow + RECLAIM_GRACE,
            "the lease was read {:?} after the retry's publish began",
            started[1] - started[0]
        );
    }

    /// The wait after such a publish looks at the store: an outage within
    /// it ends the pass, and the leases wait for the grace after the store
    /// answers again (a blind sleep was itself a time of not looking: the
    /// simulation found leases taken over right after one).
    #[tokio::test(start_paused = true)]
    async fn an_outage_within_the_wait_after_a_slow_publish_is_seen() {
        let (s, mut state, slow) = a_retry_and_a_lease_due_behind_a_slow_broker().await;
        // Down for 300 ms, half a grace after the retry's publish.
        let store = s.store.clone();
        let outage = tokio::spawn(async move {
            tokio::time::sleep(slow + RECLAIM_GRACE / 2).await;
            store.set_outage(true);
            tokio::time::sleep(Duration::from_millis(300)).await;
            store.set_outage(false);
        });
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["r"]);
        assert_eq!(s.store.schedule_sizes(), (1, 0), "the lease left");
        outage.await.unwrap();
        *s.broker.hook.delay.lock().unwrap() = Duration::ZERO;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(
            s.store.schedule_sizes(),
            (1, 0),
            "within the grace after it"
        );
        tokio::time::advance(RECLAIM_GRACE).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["l"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_renewed_within_the_grace_after_an_outage_is_not_reclaimed() {
        let s = setup();
        let mut state = SweepLoop::default();
        let claimed = s.claimed("kept", "default").await;
        s.store.set_outage(true);
        tokio::time::advance(Duration::from_secs(2)).await;
        s.dispatcher.sweep_tick(&mut state).await;
        s.store.set_outage(false);
        s.dispatcher.sweep_tick(&mut state).await;
        // The worker renews its lapsed lease as soon as the store answers.
        let held = s
            .store
            .renew(std::slice::from_ref(&claimed.claim), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(held, vec![true]);
        tokio::time::advance(RECLAIM_GRACE).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert!(s.queued_jobs("default").await.is_empty());
        let running = s.store.inspect_records(|records| {
            let mut states = Vec::new();
            for r in records {
                states.push((r.tasks[0].state, r.tasks[0].attempt));
            }
            states
        });
        assert_eq!(running, vec![(crate::model::TaskState::Running, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dispatcher_just_started_leaves_lapsed_leases_for_a_moment() {
        let s = setup();
        s.lapsing("l", "default").await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let mut state = SweepLoop::starting();
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.store.schedule_sizes(), (1, 0));
        tokio::time::advance(RECLAIM_GRACE).await;
        s.dispatcher.sweep_tick(&mut state).await;
        assert_eq!(s.queued_jobs("default").await, vec!["l"]);
        assert_eq!(s.store.schedule_sizes(), (0, 0));
    }

    /// A backlog of lapsed leases (a failover's worth, all due at once) is
    /// taken [`SWEEP_BATCHES_PER_PASS`] batches a pass, and the next pass
    /// comes at once, not a sweep interval later, starting with the
    /// retries: one falling due meanwhile waits for one pass's worth of the
    /// backlog at most, not for all of it.
    #[tokio::test(start_paused = true)]
    async fn a_backlog_of_lapsed_leases_is_taken_a_pass_at_a_time_without_waiting_between() {
        let s = setup();
        let cap = SWEEP_BATCH * SWEEP_BATCHES_PER_PASS;
        for i in 0..cap + 1 {
            s.lapsing(&format!("lapsed-{i:05}"), "backlog").await;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), cap);
        assert_eq!(s.store.schedule_sizes(), (1, 0));

        s.lapsing("late", "backlog").await;
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 0..cap {
            s.lapsing(&format!("more-{i:05}"), "backlog").await;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        s.retrying("retry", "default").await;
        tokio::time::advance(Duration::from_millis(20)).await;
        let mut state = SweepLoop::default();
        s.dispatcher.sweep_tick(&mut state).await;
        assert!(state.backlog, "a capped pass asks for the next at once");
        assert_eq!(s.queued_jobs("default").await, vec!["retry"]);
        // More than a pass's worth again. A loop just started leaves
        // lapsed leases alone for its grace, then takes the backlog in
        // passes one after the other.
        for i in 0..cap {
            s.lapsing(&format!("again-{i:05}"), "backlog").await;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(s.store.schedule_sizes().0 > cap);
        let sweeping = Sweeping::start(&s);
        let interval = s.dispatcher.options.sweep_interval;
        tokio::time::sleep(RECLAIM_GRACE.max(interval) + interval / 2).await;
        sweeping.stop().await;
        assert_eq!(
            s.store.schedule_sizes(),
            (0, 0),
            "the rest of the backlog within half a sweep interval of the first pass"
        );
    }

    /// A queue refusing a backlog is asked once a pass (its first entry's
    /// batch, then the entry alone); its other entries are deferred with
    /// it unasked.
    #[tokio::test(start_paused = true)]
    async fn a_queue_refusing_a_backlog_costs_a_publish_or_two_a_pass_not_one_per_entry() {
        let s = setup();
        for i in 0..SWEEP_BATCH + 5 {
            s.lapsing(&format!("stuck-{i:04}"), "stuck").await;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        *s.broker.hook.nack.lock().unwrap() = Some("t.tasks.stuck".into());
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), 0);
        assert_eq!(nacked(&s), 2, "one batch, one entry");
        assert_eq!(s.store.schedule_sizes(), (SWEEP_BATCH + 5, 0));
        *s.broker.hook.nack.lock().unwrap() = None;
        // All deferred: tried again after the pause, not at once.
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), 0);
        tokio::time::advance(REFUSED_ENTRY_PAUSE).await;
        assert_eq!(s.dispatcher.sweep_once().await.unwrap(), SWEEP_BATCH + 5);
        assert_eq!(s.store.schedule_sizes(), (0, 0));
    }
}
