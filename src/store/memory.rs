//! The in-process store: the [`Store`] trait over plain memory.
//!
//! It exists for the embedded mode (`conveyor dev`, `conveyor run`) and for
//! deterministic simulation. Every job transition is the state machine in
//! [`crate::machine`] — the specification the Lua scripts mirror — and the
//! cross-job indexes behave like the Redis sorted sets (added before, removed
//! after, hints for the sweep), so the dispatcher and worker above it run
//! exactly the code paths they run in production.
//!
//! What it does not promise: durability beyond an optional snapshot file,
//! sharing state between processes, or surviving a crash between snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{
    Applied, AttemptResult, AuditPage, ClaimOutcome, ClaimRef, Created, DEFAULT_MAX_INPUTS_BYTES,
    JobStatus, JobSummary, PENDING_RETRY_RECHECK, Pruned, ScheduleIndex, Store, StoreError,
    SweepAction, WORKER_ENTRY_KEPT_MS, WorkerInfo, entry, parse_entry,
};
use crate::intake::{PlannedJob, Rejection};
use crate::machine::{JobRecord, Promotion, Reclaim};
use crate::model::{JobState, TaskMessage};

/// Where the store reads the time: the wall clock, or tokio's clock (which
/// a simulation pauses and advances).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch (or a simulation's zero).
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        super::redis::unix_ms()
    }
}

/// Tokio's clock, starting at `base_ms`: follows `tokio::time::pause` and
/// `advance`, so a simulation controls lease expiry and retry delays.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base_ms: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `base_ms` now.
    pub fn new(base_ms: u64) -> TokioClock {
        TokioClock {
            base_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }
}

/// Where a simulation lets the runtime switch tasks inside the in-process
/// store's and broker's calls. Their work never waits, so without these a
/// caller runs from one real wait to the next in one go, and a simulated
/// crash (its task aborted) can land only where it really waits. While
/// seeded, every call yields to the runtime after its work, 0 to 2 times
/// (drawn from the seeded generator, so a run on a current-thread runtime
/// replays exactly): other tasks run, and a crash can land, between a
/// call's effect and its caller seeing the answer (as when a process dies
/// with a Redis reply or a publisher confirm in flight), so between any
/// two calls of a caller. (Yielding before the work as well cost the
/// simulation a fifth more time and found nothing more.) Off unless
/// seeded: the embedded mode's calls complete without yielding.
#[derive(Debug, Default)]
pub(crate) struct YieldPoints {
    /// Whether seeded: read first, so unseeded calls take no lock.
    on: std::sync::atomic::AtomicBool,
    rng: Mutex<Option<StdRng>>,
}

impl YieldPoints {
    /// Yield after every call from now on, drawing from `seed`; `None`
    /// turns the yields off.
    pub(crate) fn seed(&self, seed: Option<u64>) {
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) = seed.map(StdRng::seed_from_u64);
        self.on
            .store(seed.is_some(), std::sync::atomic::Ordering::SeqCst);
    }

    /// One yield point: yields 0 to 2 times while seeded, else none.
    pub(crate) async fn point(&self) {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let times = match self.rng.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(rng) => rng.random_range(0..=2),
            None => 0,
        };
        for _ in 0..times {
            tokio::task::yield_now().await;
        }
    }

    /// `work` (which must not wait), then a yield point.
    pub(crate) async fn after<T>(&self, work: impl FnOnce() -> T) -> T {
        let out = work();
        self.point().await;
        out
    }
}

/// A sorted set: members by score, like a Redis ZSET.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ScoredSet {
    scores: BTreeMap<String, u64>,
    #[serde(skip)]
    order: BTreeSet<(u64, String)>,
}

impl ScoredSet {
    fn add(&mut self, member: &str, score: u64) {
        if let Some(old) = self.scores.insert(member.to_owned(), score) {
            self.order.remove(&(old, member.to_owned()));
        }
        self.order.insert((score, member.to_owned()));
    }

    /// Add, or lower the score of a member present (ZADD LT).
    fn add_or_lower(&mut self, member: &str, score: u64) {
        if self.scores.get(member).is_none_or(|&old| score < old) {
            self.add(member, score);
        }
    }

    /// Add unless present (ZADD NX); whether it was added.
    fn add_new(&mut self, member: &str, score: u64) -> bool {
        if self.scores.contains_key(member) {
            return false;
        }
        self.add(member, score);
        true
    }

    /// Add, or raise the score of a present member to `score` if that is
    /// higher (ZADD GT); whether it was added.
    fn add_or_raise(&mut self, member: &str, score: u64) -> bool {
        match self.scores.get(member) {
            None => {
                self.add(member, score);
                true
            }
            Some(&old) => {
                if score > old {
                    self.add(member, score);
                }
                false
            }
        }
    }

    /// Remove `member` if its score is at most `max_score`.
    fn remove_due(&mut self, member: &str, max_score: u64) {
        if self.scores.get(member).is_some_and(|&s| s <= max_score) {
            self.remove(member);
        }
    }

    /// Move `member` to `score` if its score is at most `max_score`;
    /// whether it moved.
    fn defer_due(&mut self, member: &str, max_score: u64, score: u64) -> bool {
        let due = self.scores.get(member).is_some_and(|&s| s <= max_score);
        if due {
            self.add(member, score);
        }
        due
    }

    fn add_existing(&mut self, member: &str, score: u64) {
        if self.scores.contains_key(member) {
            self.add(member, score);
        }
    }

    fn remove(&mut self, member: &str) {
        if let Some(old) = self.scores.remove(member) {
            self.order.remove(&(old, member.to_owned()));
        }
    }

    fn due(&self, max_score: u64, limit: usize) -> Vec<String> {
        self.order
            .iter()
            .take_while(|(s, _)| *s <= max_score)
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The score of the member after the `skip` lowest, if any.
    fn score_after(&self, skip: usize) -> Option<u64> {
        self.order.iter().nth(skip).map(|(s, _)| *s)
    }

    fn rebuild(&mut self) {
        self.order = self.scores.iter().map(|(m, s)| (*s, m.clone())).collect();
    }

    fn len(&self) -> usize {
        self.scores.len()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    jobs: BTreeMap<String, JobRecord>,
    jobs_index: ScoredSet,
    leases: ScoredSet,
    retries: ScoredSet,
    #[serde(skip)]
    workers: BTreeMap<String, (WorkerInfo, u64)>,
    epoch: u64,
    #[serde(default)]
    queues: BTreeSet<String>,
    /// The store whose audit last completed (`Store::audit_done`): a
    /// restored snapshot names the store that wrote it.
    #[serde(default)]
    audited: Option<String>,
    /// Where the next pruning read of the jobs index starts (a score), as
    /// `RedisStore`'s cursor: live jobs already looked at are stepped over.
    #[serde(skip)]
    prune_from: u64,
    /// Bumped by every call that changed what a snapshot holds (not by
    /// reads, heartbeats or sweeps that found nothing due), so that the
    /// embedded mode writes its snapshot only when there is something new
    /// to write ([`MemoryStore::snapshot_if_changed`]). It may count a
    /// call that changed nothing; it never misses one that did.
    #[serde(skip)]
    changes: u64,
}

impl State {
    /// The audit of the jobs `ids` (see [`Store::audit_jobs`]).
    fn audit<S: AsRef<str>>(&mut self, ids: &[S], now: u64) -> AuditPage {
        let mut page = AuditPage {
            jobs: ids.len(),
            ..AuditPage::default()
        };
        for id in ids {
            if let Some(job) = self.job_mut(id.as_ref(), now) {
                page.wanted.extend(job.schedule_entries(now));
            }
        }
        if !page.wanted.is_empty() {
            self.changed();
        }
        for e in &page.wanted {
            let index = match e.index {
                ScheduleIndex::Leases => &mut self.leases,
                ScheduleIndex::Retries => &mut self.retries,
            };
            if index.add_or_raise(&e.entry, e.at_ms) {
                page.added += 1;
            }
        }
        page
    }

    /// The record of `id`, unless missing or past its retention (a record
    /// found past it is removed, which counts as a change). Past, as Redis
    /// has it: a key expiring at `e` is gone once the clock is beyond `e`,
    /// not at `e`.
    fn job_mut(&mut self, id: &str, now: u64) -> Option<&mut JobRecord> {
        if self.jobs.get(id)?.expires_at().is_some_and(|e| e < now) {
            self.jobs.remove(id);
            self.changed();
            return None;
        }
        self.jobs.get_mut(id)
    }

    /// Note a change to what a snapshot holds.
    fn changed(&mut self) {
        self.changes += 1;
    }
}

/// The store's state as a snapshot file holds it, with the change count
/// it was taken at (see [`MemoryStore::snapshot_if_changed`]).
#[derive(Debug)]
pub struct Snapshot {
    /// [`MemoryStore::changes`] when it was taken.
    pub changes: u64,
    /// The state, as JSON.
    pub bytes: Vec<u8>,
}

/// The in-process implementation of [`Store`].
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    clock: Arc<dyn Clock>,
    retention_ms: u64,
    by: String,
    down: Arc<std::sync::atomic::AtomicBool>,
    /// This store's identity, the counterpart of a Redis server's
    /// `run_id`: a snapshot restored here was written by another, so its
    /// jobs are audited (their ready tasks' messages died with the broker
    /// of the process that wrote it).
    server: Arc<Mutex<String>>,
    /// Off unless a simulation seeds them ([`MemoryStore::yield_after_calls`]).
    yields: Arc<YieldPoints>,
    /// Most bytes of dependency results a claim hands out.
    max_inputs_bytes: u64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish()
    }
}

impl MemoryStore {
    /// An empty store on `clock`, with epoch `epoch` (fences start at
    /// `epoch << 20`, as in Redis).
    pub fn new(
        clock: Arc<dyn Clock>,
        retention: Duration,
        epoch: u64,
        by: impl Into<String>,
    ) -> MemoryStore {
        MemoryStore {
            state: Arc::new(Mutex::new(State {
                epoch,
                ..State::default()
            })),
            clock,
            retention_ms: retention.as_millis() as u64,
            by: by.into(),
            down: Arc::default(),
            server: Arc::new(Mutex::new(new_server_identity())),
            yields: Arc::default(),
            max_inputs_bytes: DEFAULT_MAX_INPUTS_BYTES,
        }
    }

    /// Hand out at most `bytes` of dependency results per claimed task, as
    /// [`RedisStore::with_max_inputs_bytes`](super::redis::RedisStore::with_max_inputs_bytes).
    pub fn with_max_inputs_bytes(self, bytes: u64) -> MemoryStore {
        MemoryStore {
            max_inputs_bytes: bytes,
            ..self
        }
    }

    /// For simulations: from now on every [`Store`] call yields to the
    /// runtime after its work, a number of times drawn from a generator
    /// seeded with `seed` (`None`: never, the default), so that a crash can
    /// land between a call's effect and its caller seeing the answer, and
    /// so between any two calls of a caller (see `YieldPoints`).
    pub fn yield_after_calls(&self, seed: Option<u64>) {
        self.yields.seed(seed);
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("simulated store outage".into()));
        }
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Simulate the store's server restarting with all its data: it is a
    /// new server to the deployment, so the next sweep audits every
    /// unfinished job (as after a Redis restart).
    pub fn restart(&self) {
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = new_server_identity();
    }

    /// Simulate Redis losing a claim with its latest writes (a crash under
    /// `appendfsync everysec`, an unplanned failover) and coming back as a
    /// server new to the deployment: task `idx` of `job`, if running, is
    /// ready again at the claim's attempt, the claim's lease entry is gone,
    /// and an audit is due. Returns the claim lost. For simulations.
    pub fn lose_claim(&self, job: &str, idx: u32) -> Option<ClaimRef> {
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let record = state.job_mut(job, now)?;
        let task = record.tasks.get_mut(idx as usize)?;
        if task.state != crate::model::TaskState::Running {
            return None;
        }
        let lost = ClaimRef {
            job: job.to_owned(),
            idx,
            attempt: task.attempt,
            fence: task.fence?,
        };
        task.state = crate::model::TaskState::Ready;
        task.fence = None;
        task.lease_expiry = None;
        record.version += 1;
        state.leases.remove(&entry(job, idx, lost.attempt));
        state.changed();
        drop(state);
        self.restart();
        Some(lost)
    }

    /// Simulate Redis losing a retry's promotion with its latest writes
    /// (and what followed it on the task: a claim of the promoted attempt,
    /// the sweep's forget of the retry entry) and coming back as a server
    /// new to the deployment: task `idx` of `job`, if its attempt started
    /// with a promotion at most `within_ms` ago and has not ended, is
    /// `retrying` again at that attempt, due when it was promoted, with its
    /// retry entry and without a lease entry; an audit is due. The promoted
    /// attempt's message, published already, finds the task `retrying` and
    /// is refused as stale. Returns the attempt and the claim lost, if the
    /// task was running. For simulations.
    pub fn lose_promotion(
        &self,
        job: &str,
        idx: u32,
        within_ms: u64,
    ) -> Option<(u32, Option<ClaimRef>)> {
        use crate::model::TaskState;
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let record = state.job_mut(job, now)?;
        let task = record.tasks.get(idx as usize)?;
        if !matches!(task.state, TaskState::Ready | TaskState::Running) {
            return None;
        }
        let attempt = task.attempt;
        let promoted = format!("retry due, attempt {attempt}");
        let promoted_at = record
            .history
            .iter()
            .rev()
            .find(|h| {
                h.task.as_deref() == Some(task.plan.name.as_str())
                    && h.from.as_deref() == Some("retrying")
            })
            .filter(|h| h.reason == promoted && h.at + within_ms >= now)?
            .at;
        let lost = match (task.state, task.fence) {
            (TaskState::Running, Some(fence)) => Some(ClaimRef {
                job: job.to_owned(),
                idx,
                attempt,
                fence,
            }),
            _ => None,
        };
        let task = &mut record.tasks[idx as usize];
        task.state = TaskState::Retrying;
        task.due = Some(promoted_at);
        task.fence = None;
        task.lease_expiry = None;
        record.version += 1;
        let e = entry(job, idx, attempt);
        state.leases.remove(&e);
        state.retries.add_new(&e, promoted_at);
        state.changed();
        drop(state);
        self.restart();
        Some((attempt, lost))
    }

    /// Whether the store's server has not been audited yet (an outage
    /// aside, [`Store::audit_due`] would name it). Until it is, the indexes
    /// may lack entries that lost writes took with them. For simulations.
    pub fn audit_pending(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.audited.as_deref() != Some(self.server().as_str())
    }

    fn server(&self) -> String {
        self.server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Simulate an outage: every call fails as unavailable while `down`.
    pub fn set_outage(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every job record (for simulations to check invariants).
    pub fn records(&self) -> Vec<JobRecord> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.jobs.values().cloned().collect()
    }

    /// Look at every job record in place, without copying them (for
    /// simulations that check invariants after every step). The store is
    /// locked while `inspect` runs: it must not call the store.
    pub fn inspect_records<R>(
        &self,
        inspect: impl FnOnce(&mut dyn Iterator<Item = &JobRecord>) -> R,
    ) -> R {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        inspect(&mut state.jobs.values())
    }

    /// The score (lease expiry, ms) of the lease schedule's entry for
    /// `attempt` of task `idx` of `job`, if it has one, as `ZSCORE` reads
    /// it (for simulations: a running claim without its entry is one no
    /// sweep would find if its worker died).
    pub fn lease_entry(&self, job: &str, idx: u32, attempt: u32) -> Option<u64> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.leases.scores.get(&entry(job, idx, attempt)).copied()
    }

    /// The score (due time, ms) of the retry schedule's entry for `attempt`
    /// of task `idx` of `job`, if it has one (for simulations: a retrying
    /// task without its entry is one no sweep would ever promote).
    pub fn retry_entry(&self, job: &str, idx: u32, attempt: u32) -> Option<u64> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.retries.scores.get(&entry(job, idx, attempt)).copied()
    }

    /// Sizes of the lease and retry schedules.
    pub fn schedule_sizes(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.leases.len(), state.retries.len())
    }

    /// The whole state as JSON bytes (the embedded mode's snapshot file).
    pub fn snapshot(&self) -> Result<Vec<u8>, StoreError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_vec(&*state).map_err(|e| StoreError::Protocol(format!("snapshot: {e}")))
    }

    /// How many changes the store has had (a count that only grows; see
    /// [`MemoryStore::snapshot_if_changed`]).
    pub fn changes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).changes
    }

    /// The whole state, as [`MemoryStore::snapshot`], unless the store has
    /// not changed since the snapshot taken at change count `written`
    /// (`None`: none was taken). Serializing the whole store holds its
    /// lock, so an idle deployment should not do it every few seconds for
    /// nothing.
    pub fn snapshot_if_changed(
        &self,
        written: Option<u64>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if written == Some(state.changes) {
            return Ok(None);
        }
        let bytes = serde_json::to_vec(&*state)
            .map_err(|e| StoreError::Protocol(format!("snapshot: {e}")))?;
        Ok(Some(Snapshot {
            changes: state.changes,
            bytes,
        }))
    }

    /// Replace the state with a snapshot taken by [`MemoryStore::snapshot`]
    /// (a change: the count goes on from where it was).
    pub fn restore(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let mut restored: State = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Protocol(format!("snapshot: {e}")))?;
        restored.jobs_index.rebuild();
        restored.leases.rebuild();
        restored.retries.rebuild();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        restored.changes = state.changes + 1;
        *state = restored;
        Ok(())
    }
}

/// A name no other memory store of this or an earlier process has had.
fn new_server_identity() -> String {
    static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "memory-{}-{}-{n}",
        std::process::id(),
        super::redis::unix_ms()
    )
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_job(&self, job: &PlannedJob) -> Result<Created, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                if let Some(existing) = state.job_mut(&job.id, now) {
                    return Ok(Created::Existing {
                        state: existing.state,
                        ready: existing.ready_tasks(),
                    });
                }
                let record =
                    JobRecord::create(job, now, self.retention_ms, state.epoch << 20, &self.by);
                let ready = record.ready_tasks();
                state.jobs.insert(job.id.clone(), record);
                state.jobs_index.add(&job.id, now);
                state.changed();
                for t in &job.tasks {
                    if !state.queues.contains(&t.queue) {
                        state.queues.insert(t.queue.clone());
                    }
                }
                Ok(Created::New { ready })
            })
            .await
    }

    async fn record_rejected(&self, rejection: &Rejection) -> Result<bool, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                if state.job_mut(&rejection.id, now).is_some() {
                    return Ok(false);
                }
                let record = JobRecord::rejected(rejection, now, self.retention_ms, &self.by);
                state.jobs.insert(rejection.id.clone(), record);
                state.jobs_index.add(&rejection.id, now);
                state.changed();
                Ok(true)
            })
            .await
    }

    async fn claim(
        &self,
        task: &TaskMessage,
        worker: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let lease_ms = lease.as_millis() as u64;
                let member = entry(&task.job, task.idx, task.attempt);
                let mut state = self.lock()?;
                state.changed();
                let added = state.leases.add_or_raise(&member, now + lease_ms);
                let outcome = match state.job_mut(&task.job, now) {
                    Some(job) => job.claim(
                        task.idx,
                        task.attempt,
                        worker,
                        lease_ms,
                        self.max_inputs_bytes,
                        now,
                    ),
                    None => ClaimOutcome::Missing,
                };
                if added && !matches!(outcome, ClaimOutcome::Claimed(_) | ClaimOutcome::Busy) {
                    state.leases.remove(&member);
                }
                Ok(outcome)
            })
            .await
    }

    async fn renew(&self, claims: &[ClaimRef], lease: Duration) -> Result<Vec<bool>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let lease_ms = lease.as_millis() as u64;
                let mut state = self.lock()?;
                if !claims.is_empty() {
                    state.changed();
                }
                let mut held = Vec::with_capacity(claims.len());
                for c in claims {
                    let renewed = state
                        .job_mut(&c.job, now)
                        .and_then(|j| j.renew(c.idx, c.fence, lease_ms, now));
                    state
                        .leases
                        .add_existing(&entry(&c.job, c.idx, c.attempt), now + lease_ms);
                    held.push(renewed.is_some());
                }
                Ok(held)
            })
            .await
    }

    async fn complete(
        &self,
        claim: &ClaimRef,
        worker: &str,
        result: &AttemptResult,
    ) -> Result<Applied, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                state.changed();
                if let AttemptResult::Retry { delay, .. } = result {
                    let due = now + delay.as_millis() as u64;
                    state
                        .retries
                        .add_or_lower(&entry(&claim.job, claim.idx, claim.attempt + 1), due);
                }
                Ok(match state.job_mut(&claim.job, now) {
                    Some(job) => job.complete(claim, result, worker, now),
                    None => Applied::Missing,
                })
            })
            .await
    }

    async fn release(
        &self,
        claim: &ClaimRef,
        worker: &str,
    ) -> Result<Option<TaskMessage>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                state.changed();
                Ok(state
                    .job_mut(&claim.job, now)
                    .and_then(|j| j.release(claim.idx, claim.fence, worker, now)))
            })
            .await
    }

    async fn forget_claim(&self, claim: &ClaimRef) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                // Only once the record shows the attempt over: see
                // `RedisStore::forget_finished_claims`.
                let open = state.job_mut(&claim.job, now).is_some_and(|j| {
                    j.tasks.get(claim.idx as usize).is_some_and(|t| {
                        matches!(
                            t.state,
                            crate::model::TaskState::Running | crate::model::TaskState::Ready
                        ) && t.attempt == claim.attempt
                    })
                });
                if !open {
                    state
                        .leases
                        .remove(&entry(&claim.job, claim.idx, claim.attempt));
                    state.changed();
                }
                Ok(())
            })
            .await
    }

    async fn recheck(&self, claim: &ClaimRef) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                let ready_again = state.job_mut(&claim.job, now).is_some_and(|j| {
                    j.tasks.get(claim.idx as usize).is_some_and(|t| {
                        t.state == crate::model::TaskState::Ready && t.attempt == claim.attempt
                    })
                });
                if ready_again {
                    state
                        .leases
                        .add_new(&entry(&claim.job, claim.idx, claim.attempt), now);
                    state.changed();
                }
                Ok(())
            })
            .await
    }

    async fn due_retries(&self, limit: usize) -> Result<Vec<SweepAction>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                let mut actions = Vec::new();
                let due = state.retries.due(now, limit);
                if !due.is_empty() {
                    state.changed();
                }
                for e in due {
                    let promotion = match parse_entry(&e) {
                        Some((job, idx, attempt)) => match state.job_mut(job, now) {
                            Some(j) => j.promote(idx, attempt, now, &self.by),
                            None => Promotion::Gone,
                        },
                        None => Promotion::Gone,
                    };
                    match promotion {
                        Promotion::Ready(msg) => actions.push(SweepAction {
                            entry: e,
                            publish: vec![msg],
                            read_at: now,
                        }),
                        Promotion::Later(due) => state.retries.add_existing(&e, due),
                        Promotion::Pending => state
                            .retries
                            .add_existing(&e, now + PENDING_RETRY_RECHECK.as_millis() as u64),
                        Promotion::Gone => actions.push(SweepAction::forget(e, now)),
                    }
                }
                Ok(actions)
            })
            .await
    }

    async fn next_retry_in(&self, skip: usize) -> Result<Option<Duration>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let state = self.lock()?;
                Ok(state
                    .retries
                    .score_after(skip)
                    .map(|due| Duration::from_millis(due.saturating_sub(now))))
            })
            .await
    }

    async fn forget_retries(&self, entries: &[String], read_at: u64) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let mut state = self.lock()?;
                if !entries.is_empty() {
                    state.changed();
                }
                for e in entries {
                    state.retries.remove_due(e, read_at);
                }
                Ok(())
            })
            .await
    }

    async fn expired_leases(&self, limit: usize, by: &str) -> Result<Vec<SweepAction>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                let mut actions = Vec::new();
                let due = state.leases.due(now, limit);
                if !due.is_empty() {
                    state.changed();
                }
                for e in due {
                    let reclaim = match parse_entry(&e) {
                        Some((job, idx, attempt)) => match state.job_mut(job, now) {
                            Some(j) => j.reclaim(idx, attempt, now, by),
                            None => Reclaim::Gone,
                        },
                        None => Reclaim::Gone,
                    };
                    match reclaim {
                        Reclaim::Alive(le) => state.leases.add_existing(&e, le),
                        Reclaim::Requeued(msg) => actions.push(SweepAction {
                            entry: e,
                            publish: vec![msg],
                            read_at: now,
                        }),
                        Reclaim::Done(ready) => actions.push(SweepAction {
                            entry: e,
                            publish: ready,
                            read_at: now,
                        }),
                        Reclaim::Failed | Reclaim::Gone => {
                            actions.push(SweepAction::forget(e, now))
                        }
                    }
                }
                Ok(actions)
            })
            .await
    }

    async fn forget_leases(&self, entries: &[String], read_at: u64) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let mut state = self.lock()?;
                if !entries.is_empty() {
                    state.changed();
                }
                for e in entries {
                    state.leases.remove_due(e, read_at);
                }
                Ok(())
            })
            .await
    }

    async fn defer(
        &self,
        index: ScheduleIndex,
        entries: &[String],
        read_at: u64,
        pause: Duration,
    ) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let to = self.clock.now_ms() + pause.as_millis() as u64;
                let mut state = self.lock()?;
                let set = match index {
                    ScheduleIndex::Retries => &mut state.retries,
                    ScheduleIndex::Leases => &mut state.leases,
                };
                let mut moved = false;
                for e in entries {
                    moved |= set.defer_due(e, read_at, to);
                }
                if moved {
                    state.changed();
                }
                Ok(())
            })
            .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobStatus>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                Ok(state.job_mut(id, now).map(|j| j.status()))
            })
            .await
    }

    async fn list_jobs(
        &self,
        filter: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobSummary>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                let mut out = Vec::new();
                // Newest first, one entry at a time: only the entries
                // looked at are copied (the walk stops at `limit`), and an
                // expired one can be removed from the index on the way.
                let mut above: Option<(u64, String)> = None;
                while out.len() < limit {
                    let next = match &above {
                        None => state.jobs_index.order.last(),
                        Some(above) => state.jobs_index.order.range(..above).next_back(),
                    };
                    let Some(next) = next.cloned() else {
                        break;
                    };
                    let id = &above.insert(next).1;
                    let Some(job) = state.job_mut(id, now) else {
                        state.jobs_index.remove(id);
                        state.changed();
                        continue;
                    };
                    if filter.is_some_and(|s| s != job.state) {
                        continue;
                    }
                    out.push(JobSummary {
                        id: job.id.clone(),
                        state: job.state,
                        requestor: job.requestor.clone(),
                        tasks: job.tasks.len() as u32,
                        created_ms: job.created_ms,
                        updated_ms: job.updated_ms,
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn prune_expired(&self, limit: usize) -> Result<Pruned, StoreError> {
        self.yields
            .after(|| {
                // As `RedisStore::prune_expired`: at most `limit` entries
                // old enough to have expired, from the cursor on.
                let now = self.clock.now_ms();
                let cutoff = now.saturating_sub(self.retention_ms);
                let mut state = self.lock()?;
                let from = state.prune_from;
                let old: Vec<(u64, String)> = state
                    .jobs_index
                    .order
                    .range((from, String::new())..)
                    .take_while(|(score, _)| *score <= cutoff)
                    .take(limit)
                    .cloned()
                    .collect();
                let more = old.len() >= limit;
                state.prune_from = match old.last() {
                    // Several entries may share the last score: start at it again.
                    Some((score, _)) if more && *score > from => *score,
                    Some((score, _)) if more => score + 1,
                    _ => 0,
                };
                let mut removed = 0;
                for (_, id) in old {
                    if state.job_mut(&id, now).is_none() {
                        state.jobs_index.remove(&id);
                        removed += 1;
                    }
                }
                if removed > 0 {
                    state.changed();
                }
                Ok(Pruned { removed, more })
            })
            .await
    }

    async fn known_queues(&self) -> Result<Vec<String>, StoreError> {
        self.yields
            .after(|| Ok(self.lock()?.queues.iter().cloned().collect()))
            .await
    }

    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                state.workers.insert(
                    worker.id.clone(),
                    (worker.clone(), now + ttl.as_millis() as u64),
                );
                let silent_since = worker.heartbeat_ms.saturating_sub(WORKER_ENTRY_KEPT_MS);
                state
                    .workers
                    .retain(|_, (w, _)| w.heartbeat_ms >= silent_since);
                Ok(())
            })
            .await
    }

    async fn unregister(&self, worker_id: &str) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let mut state = self.lock()?;
                state.workers.remove(worker_id);
                Ok(())
            })
            .await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                state.workers.retain(|_, (_, expires)| *expires >= now);
                Ok(state.workers.values().map(|(w, _)| w.clone()).collect())
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.yields.after(|| self.lock().map(|_| ())).await
    }

    async fn audit_due(&self) -> Result<Option<String>, StoreError> {
        self.yields
            .after(|| {
                let state = self.lock()?;
                let server = self.server();
                Ok((state.audited.as_deref() != Some(server.as_str())).then_some(server))
            })
            .await
    }

    async fn audit_jobs(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<AuditPage, StoreError> {
        self.yields
            .after(|| {
                use std::ops::Bound;
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                let from = cursor.map_or(Bound::Unbounded, Bound::Excluded);
                let mut ids: Vec<String> = state
                    .jobs_index
                    .scores
                    .range::<str, _>((from, Bound::Unbounded))
                    .take(limit.max(1) + 1)
                    .map(|(id, _)| id.clone())
                    .collect();
                let more = ids.len() > limit.max(1);
                ids.truncate(limit.max(1));
                let mut page = state.audit(&ids, now);
                page.next = if more { ids.last().cloned() } else { None };
                Ok(page)
            })
            .await
    }

    async fn audit_job(&self, id: &str) -> Result<AuditPage, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                Ok(self.lock()?.audit(&[id], now))
            })
            .await
    }

    async fn audit_done(&self, server: &str) -> Result<(), StoreError> {
        self.yields
            .after(|| {
                let mut state = self.lock()?;
                state.audited = Some(server.to_owned());
                state.changed();
                Ok(())
            })
            .await
    }

    async fn fail_poisoned(&self, task: &TaskMessage, reason: &str) -> Result<bool, StoreError> {
        self.yields
            .after(|| {
                let now = self.clock.now_ms();
                let mut state = self.lock()?;
                let poisoned = state
                    .job_mut(&task.job, now)
                    .is_some_and(|j| j.poison(task.idx, task.attempt, reason, now, &self.by));
                if poisoned {
                    state.changed();
                }
                Ok(poisoned)
            })
            .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::intake::{Intake, JobIntake};
    use crate::store::ClaimOutcome;

    const HOUR: Duration = Duration::from_secs(3600);

    fn store(retention: Duration) -> MemoryStore {
        MemoryStore::new(Arc::new(TokioClock::new(1_000_000)), retention, 1, "test")
    }

    /// A one-task job named `id`, planned as intake plans it.
    fn planned(id: &str) -> PlannedJob {
        let intake = JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry())
            .expect("the default intake");
        let body = serde_json::json!({"id": id, "requestor": "r",
            "tasks": [{"name": "t", "handler": "noop"}]});
        match intake.accept(body.to_string().as_bytes()) {
            Intake::Valid(job) => job,
            other => panic!("job {id} is not valid: {other:?}"),
        }
    }

    fn rejection(id: &str) -> Rejection {
        Rejection {
            id: id.into(),
            requestor: "r".into(),
            error: "not a job".into(),
        }
    }

    /// Create `id` and claim its one task.
    async fn claimed(store: &MemoryStore, id: &str) -> ClaimRef {
        let Created::New { ready } = store.create_job(&planned(id)).await.unwrap() else {
            panic!("{id} exists");
        };
        match store.claim(&ready[0], "w", HOUR).await.unwrap() {
            ClaimOutcome::Claimed(c) => c.claim,
            other => panic!("claim of {id}: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_is_offered_only_when_the_store_changed_since_the_last_one() {
        let store = store(HOUR);
        let first = store
            .snapshot_if_changed(None)
            .unwrap()
            .expect("none written yet");
        assert!(
            store
                .snapshot_if_changed(Some(first.changes))
                .unwrap()
                .is_none(),
            "nothing changed since"
        );
        store.create_job(&planned("a")).await.unwrap();
        let second = store
            .snapshot_if_changed(Some(first.changes))
            .unwrap()
            .expect("a job was created since");
        assert!(second.changes > first.changes);
        assert_eq!(second.bytes, store.snapshot().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn reads_heartbeats_and_sweeps_that_find_nothing_due_are_not_changes() {
        let store = store(HOUR);
        claimed(&store, "a").await;
        let before = store.changes();
        store.job("a").await.unwrap();
        store.list_jobs(None, 10).await.unwrap();
        store.known_queues().await.unwrap();
        store.ping().await.unwrap();
        store.audit_due().await.unwrap();
        store.next_retry_in(0).await.unwrap();
        assert!(store.due_retries(10).await.unwrap().is_empty());
        assert!(store.expired_leases(10, "d").await.unwrap().is_empty());
        store.forget_retries(&[], 0).await.unwrap();
        store.forget_leases(&[], 0).await.unwrap();
        store.renew(&[], HOUR).await.unwrap();
        assert_eq!(store.prune_expired(10).await.unwrap().removed, 0);
        let worker = WorkerInfo {
            id: "w".into(),
            host: "h".into(),
            queues: vec!["default".into()],
            handlers: vec!["noop".into()],
            concurrency: 1,
            started_ms: 0,
            heartbeat_ms: 0,
        };
        store.heartbeat(&worker, HOUR).await.unwrap();
        store.workers().await.unwrap();
        store.unregister("w").await.unwrap();
        assert_eq!(store.changes(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn every_transition_and_every_expired_record_removed_is_a_change() {
        let store = store(Duration::from_secs(10));
        let mut last = store.changes();
        let mut moved = |what: &str| {
            let now = store.changes();
            assert!(now > last, "{what} is a change");
            last = now;
        };
        store.record_rejected(&rejection("r")).await.unwrap();
        moved("a rejection recorded");
        store.create_job(&planned("a")).await.unwrap();
        moved("a job created");
        let claim = claimed(&store, "b").await;
        moved("a claim");
        store
            .renew(std::slice::from_ref(&claim), HOUR)
            .await
            .unwrap();
        moved("a renewal");
        store
            .complete(&claim, "w", &AttemptResult::Succeeded("{}".into()))
            .await
            .unwrap();
        moved("a completion");
        store.forget_claim(&claim).await.unwrap();
        moved("a finished claim's lease entry forgotten");
        tokio::time::advance(Duration::from_secs(11)).await;
        store.list_jobs(None, 10).await.unwrap();
        moved("expired records removed by a listing");
        store.audit_done("server").await.unwrap();
        moved("an audit done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_snapshot_is_a_change() {
        let store = store(HOUR);
        store.create_job(&planned("a")).await.unwrap();
        let snapshot = store.snapshot_if_changed(None).unwrap().unwrap();
        let other = self::store(HOUR);
        other.create_job(&planned("b")).await.unwrap();
        other.create_job(&planned("c")).await.unwrap();
        let before = other.changes();
        other.restore(&snapshot.bytes).unwrap();
        assert!(
            other.changes() > before,
            "the count goes on, so a snapshot taken at an earlier count is not mistaken for this one"
        );
        assert!(other.job("a").await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn listing_walks_newest_first_skips_and_unindexes_expired_jobs_and_stops_at_its_limit() {
        let store = store(Duration::from_secs(10));
        store.record_rejected(&rejection("expires")).await.unwrap();
        for id in ["a", "b", "c", "d"] {
            tokio::time::advance(Duration::from_secs(3)).await;
            store.create_job(&planned(id)).await.unwrap();
        }
        // "expires" was rejected 12 s ago: past its 10 s retention.
        let ids = |jobs: Vec<JobSummary>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(store.list_jobs(None, 2).await.unwrap()), ["d", "c"]);
        assert_eq!(
            ids(store.list_jobs(None, 10).await.unwrap()),
            ["d", "c", "b", "a"]
        );
        assert!(
            !store
                .state
                .lock()
                .unwrap()
                .jobs_index
                .scores
                .contains_key("expires"),
            "the expired job's index entry is removed on the way"
        );
        assert_eq!(
            ids(store.list_jobs(Some(JobState::Rejected), 10).await.unwrap()),
            Vec::<String>::new()
        );
    }
}
