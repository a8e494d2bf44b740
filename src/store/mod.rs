//! The store: where every job's execution state lives.
//!
//! [`Store`] is the seam between Conveyor's logic (dispatcher, worker, the
//! transitions) and Redis. Each method is one atomic transition of one job
//! (a Lua script over keys that share the job's hash tag) plus, where a
//! cross-job index must follow, separate idempotent commands ordered so that
//! a crash between them leaves something a sweep repairs — never a lost task.
//!
//! Every transition that makes tasks ready returns them (as
//! [`TaskMessage`]s), and returns them *again* when repeated: whoever applies
//! it can crash before the broker confirms those messages, and the repeat
//! (a redelivery, a sweep) re-publishes them. Duplicates are harmless
//! because claims dedupe.

pub mod memory;
pub mod redis;
pub mod sentinel;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::intake::{PlannedJob, Rejection};
use crate::model::{JobState, TaskMessage, TaskState};

/// `job|idx|attempt`: a lease or retry schedule entry (ids cannot hold `|`).
pub(crate) fn entry(job: &str, idx: u32, attempt: u32) -> String {
    format!("{job}|{idx}|{attempt}")
}

/// The parts of a schedule entry, if it is one.
pub(crate) fn parse_entry(entry: &str) -> Option<(&str, u32, u32)> {
    let mut parts = entry.rsplitn(3, '|');
    let attempt = parts.next()?.parse().ok()?;
    let idx = parts.next()?.parse().ok()?;
    let job = parts.next()?;
    Some((job, idx, attempt))
}

/// Why a store operation failed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or timed out; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's access rules deny this user the command (Redis's
    /// `NOPERM`). An operator's to mend, and meanwhile waited out as an
    /// outage is (a verdict would dead-letter every message until then),
    /// but told apart: no restart of the store mends it.
    #[error("store refused the command to this user: {0}")]
    NotAllowed(String),
    /// The store answered something this code does not understand (a
    /// drifted script, corrupt data); retrying will not help.
    #[error("store answered unexpectedly: {0}")]
    Protocol(String),
}

impl StoreError {
    /// What went wrong, without the kind's words (for an error quoted
    /// inside another).
    pub fn detail(&self) -> &str {
        match self {
            StoreError::Unavailable(m) | StoreError::NotAllowed(m) | StoreError::Protocol(m) => m,
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::NotAllowed(_) => true,
            StoreError::Protocol(_) => false,
        }
    }
}

/// The result of recording a new job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The job is new; these tasks are ready.
    New {
        /// To publish.
        ready: Vec<TaskMessage>,
    },
    /// A job with this id exists; nothing changed. Its currently ready
    /// tasks are returned for an idempotent re-publish.
    Existing {
        /// The existing job's state.
        state: JobState,
        /// To publish again (harmless if already queued).
        ready: Vec<TaskMessage>,
    },
}

impl Created {
    /// Without task `idx` among the ready ones if `outcome` claimed it.
    fn without_claimed(mut self, idx: u32, outcome: &ClaimOutcome) -> Created {
        if matches!(outcome, ClaimOutcome::Claimed(_)) {
            let (Created::New { ready } | Created::Existing { ready, .. }) = &mut self;
            ready.retain(|t| t.idx != idx);
        }
        self
    }
}

/// One live claim of one attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// The job.
    pub job: String,
    /// The task's index.
    pub idx: u32,
    /// The attempt.
    pub attempt: u32,
    /// The fencing number the store gave this claim.
    pub fence: u64,
}

/// A successful claim: everything the handler needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// Identifies the claim for renewal, completion, release.
    pub claim: ClaimRef,
    /// The task's name.
    pub task: String,
    /// Handler name.
    pub handler: String,
    /// Params JSON text.
    pub params_json: String,
    /// Most attempts.
    pub max_attempts: u32,
    /// Run time-out of this attempt.
    pub timeout: Duration,
    /// Dependency results by task name (none when `oversized_inputs`).
    pub deps: BTreeMap<String, Value>,
    /// Set when the dependency results together exceed the store's
    /// inputs limit: the claim holds, but none were read, and the attempt
    /// must fail for good (see [`OversizedInputs::error`]).
    pub oversized_inputs: Option<OversizedInputs>,
    /// Backoff base and cap for a transient error.
    pub backoff: (u64, u64),
}

/// A task whose dependencies' results are, together, too many bytes to
/// hand to its handler (`limits.max_inputs_bytes`): a join over thousands
/// of tasks with large results would otherwise be read whole out of the
/// store and into a worker, once per attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OversizedInputs {
    /// How many dependencies the task has.
    pub deps: usize,
    /// Their results' bytes of JSON, together.
    pub bytes: u64,
    /// The limit they exceed.
    pub limit: u64,
}

impl OversizedInputs {
    /// What the failed attempt records.
    pub fn error(&self) -> String {
        format!(
            "the results of its {} dependencies total {} bytes of JSON, over \
             limits.max_inputs_bytes ({}): have the dependencies return where large \
             outputs are kept (a path, an object key) rather than the outputs, or raise \
             the limit",
            self.deps, self.bytes, self.limit
        )
    }
}

/// The default `limits.max_inputs_bytes`, for a store not told otherwise.
pub const DEFAULT_MAX_INPUTS_BYTES: u64 = 64 * 1024 * 1024;

/// How much later the sweep looks again at a due retry entry whose task is
/// still at the attempt before ([`crate::machine::Promotion::Pending`]).
/// Such an entry is rare (a refused outcome's, or one read in the moment
/// between a retry's scheduling and its applying), so looking once a
/// second costs little; the applied outcome moves the entry to its own due
/// time, unless it lands in that moment too, when the retry starts up to
/// this much late.
pub const PENDING_RETRY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the index of workers keeps a process that stopped sending
/// heartbeats without unregistering (killed, crashed): a day, far past
/// any heartbeat's time to live and any clock difference between hosts
/// (each entry is scored with its own host's clock).
pub const WORKER_ENTRY_KEPT_MS: u64 = 24 * 60 * 60 * 1000;

/// What a claim attempt found.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// Ours: run it.
    Claimed(Box<Claimed>),
    /// Another claim of this attempt is live; this message is a duplicate.
    Busy,
    /// This attempt is over (finished, superseded, or the task moved on).
    Stale,
    /// The job is not in the store at all.
    Missing,
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// Success with this result (JSON text).
    Succeeded(String),
    /// A transient error: try again after `delay`.
    Retry {
        /// The error.
        error: String,
        /// Backoff before the next attempt.
        delay: Duration,
    },
    /// A permanent error, or attempts used up.
    Failed(String),
}

/// What applying an attempt's result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied now (`duplicate == false`) or earlier (`duplicate == true`).
    /// Either way `ready` lists the dependents this made ready, to publish.
    Done {
        /// Whether this was a repeat of an already-applied result.
        duplicate: bool,
        /// The task's state after it.
        task_state: TaskState,
        /// The job's state after it.
        job_state: JobState,
        /// Tasks to publish.
        ready: Vec<TaskMessage>,
    },
    /// The claim is no longer live (lease lapsed and the task moved on):
    /// the result is rejected.
    Stale,
    /// The job vanished from the store.
    Missing,
}

/// A cross-job schedule entry the sweep acted on, to forget once its
/// follow-up messages are confirmed.
#[derive(Debug, Clone)]
pub struct SweepAction {
    /// The schedule entry (opaque).
    pub entry: String,
    /// Messages to publish before forgetting the entry.
    pub publish: Vec<TaskMessage>,
    /// When the entry was read as due, by the clock the index is scored
    /// with: forgetting it drops it only if its score is still at most
    /// this, so an entry put back or moved since (by an audit, a recheck,
    /// a claim) stays. Not part of what the action is (equality).
    pub read_at: u64,
}

impl SweepAction {
    /// An entry with nothing to publish: forget it.
    pub fn forget(entry: String, read_at: u64) -> SweepAction {
        SweepAction {
            entry,
            publish: Vec::new(),
            read_at,
        }
    }
}

impl PartialEq for SweepAction {
    fn eq(&self, other: &SweepAction) -> bool {
        self.entry == other.entry && self.publish == other.publish
    }
}

impl Eq for SweepAction {}

/// The schedule index an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScheduleIndex {
    /// `<p>:leases`: claims to look at once their lease lapses (and ready
    /// tasks to offer again, due at once).
    Leases,
    /// `<p>:retries`: retries to promote when due.
    Retries,
}

/// An entry a job's record calls for in a schedule index: what an audit
/// puts back when the index lacks it ([`Store::audit_jobs`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScheduleEntry {
    /// The index.
    pub index: ScheduleIndex,
    /// `job|idx|attempt`.
    pub entry: String,
    /// When it is due, Unix ms.
    pub at_ms: u64,
}

/// What one page of an audit found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    /// Job index entries looked at (finished and expired jobs included).
    pub jobs: usize,
    /// The schedule entries the unfinished ones call for.
    pub wanted: Vec<ScheduleEntry>,
    /// How many of those the indexes lacked and were given.
    pub added: usize,
    /// Jobs whose records the store could not act on (a script error on
    /// one: corrupt, or written by another version), skipped and logged.
    pub unusable: usize,
    /// Where the next page starts; `None` once the job index is walked.
    pub next: Option<String>,
}

/// A job as `conveyor status` shows it (`schemas/status.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Id.
    pub id: String,
    /// State.
    pub state: JobState,
    /// Bumped by every transition.
    pub version: u64,
    /// Who asked.
    pub requestor: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Why it was rejected, for rejected jobs.
    #[serde(default)]
    pub error: Option<String>,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// Tasks by name.
    pub tasks: BTreeMap<String, TaskStatus>,
    /// Every transition with its reason.
    pub history: Vec<HistoryEntry>,
}

/// One task in a [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// State.
    pub state: TaskState,
    /// The number of the task's current attempt: 0 while waiting, the one
    /// its queued message starts when ready, the one running, the next one
    /// when retrying, the last one once finished (see README, status).
    pub attempts: u32,
    /// Result, once succeeded.
    pub result: Value,
    /// Last error.
    pub error: Option<String>,
    /// Worker of the current or last claim.
    pub worker: Option<String>,
    /// Handler.
    pub handler: String,
    /// Queue.
    pub queue: String,
    /// Most attempts.
    pub max_attempts: u32,
    /// When the next attempt is due, while retrying.
    pub next_attempt_at_ms: Option<u64>,
}

/// One transition in a job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix ms (the store's clock).
    pub at: u64,
    /// Task name, or null for the job itself.
    pub task: Option<String>,
    /// Previous state.
    pub from: Option<String>,
    /// New state.
    pub to: String,
    /// Why.
    pub reason: String,
    /// Which process made the change.
    #[serde(default)]
    pub by: Option<String>,
}

/// What one [`Store::prune_expired`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Index entries removed: their jobs' records had expired.
    pub removed: usize,
    /// Whether older entries may remain unexamined (call again).
    pub more: bool,
}

/// A store's replicas against the number a job's creation waits for
/// (`redis_wait_replicas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicas {
    /// How many replicas each creation waits for.
    pub wanted: u32,
    /// How many the primary has connected now.
    pub connected: u32,
}

impl Replicas {
    /// Enough replicas are connected for creations to complete.
    pub fn enough(&self) -> bool {
        self.connected >= self.wanted
    }
}

/// What [`Store::list_jobs_within`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct JobListing {
    /// The jobs, newest first.
    pub jobs: Vec<JobSummary>,
    /// It stopped at its bound with fewer than the jobs asked for and
    /// older jobs not looked at.
    pub cut_short: bool,
}

/// A row of `conveyor list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Id.
    pub id: String,
    /// State.
    pub state: JobState,
    /// Who asked.
    pub requestor: String,
    /// Number of tasks.
    pub tasks: u32,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
}

/// A worker as the registry shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique per process.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Queues consumed.
    pub queues: Vec<String>,
    /// Handlers known.
    pub handlers: Vec<String>,
    /// Concurrency limit.
    pub concurrency: usize,
    /// Start time, Unix ms.
    pub started_ms: u64,
    /// Last heartbeat, Unix ms.
    pub heartbeat_ms: u64,
}

/// The state of every job. One implementation talks to Redis; an
/// in-process one serves the embedded mode and simulations.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Record a planned job unless its id exists.
    async fn create_job(&self, job: &PlannedJob) -> Result<Created, StoreError>;

    /// [`Store::create_job`], then [`Store::claim`] of attempt 1 of root
    /// task `root` for `worker` (whether the job is new or existed: the
    /// claim checks the task is ready at that attempt), in one round trip
    /// where the store allows. The claimed root, if claimed, is taken out
    /// of the ready tasks returned. A worker taking submissions runs the
    /// root it claims this way without publishing it. Not claimed
    /// ([`ClaimOutcome::Stale`]) when the job existed with another task
    /// ready at `root`'s index on another queue (its id used again for
    /// other tasks): the worker chose the root by the submission's queue,
    /// and that task is for the workers of its own.
    async fn create_job_and_claim(
        &self,
        job: &PlannedJob,
        root: u32,
        worker: &str,
        lease: Duration,
    ) -> Result<(Created, ClaimOutcome), StoreError> {
        let created = self.create_job(job).await?;
        let task = job.task_message(root);
        if let Created::Existing { ready, .. } = &created
            && ready.iter().any(|t| t.idx == root && t.queue != task.queue)
        {
            return Ok((created, ClaimOutcome::Stale));
        }
        let outcome = self.claim(&task, worker, lease).await?;
        Ok((created.without_claimed(root, &outcome), outcome))
    }

    /// Record a rejected submission unless its id exists. Returns whether
    /// it was recorded.
    async fn record_rejected(&self, rejection: &Rejection) -> Result<bool, StoreError>;

    /// Claim the attempt a task message names, for `worker`, under `lease`.
    async fn claim(
        &self,
        task: &TaskMessage,
        worker: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Extend live claims; returns, per claim, whether it is still held.
    async fn renew(&self, claims: &[ClaimRef], lease: Duration) -> Result<Vec<bool>, StoreError>;

    /// Apply the result of a claimed attempt, exactly once per claim.
    async fn complete(
        &self,
        claim: &ClaimRef,
        worker: &str,
        result: &AttemptResult,
    ) -> Result<Applied, StoreError>;

    /// Hand a claim back unfinished (shutdown): the same attempt becomes
    /// ready again. Returns the message to publish, if the claim was held.
    async fn release(
        &self,
        claim: &ClaimRef,
        worker: &str,
    ) -> Result<Option<TaskMessage>, StoreError>;

    /// Forget the lease index entry of a claim whose follow-ups are
    /// confirmed, whatever its score. Only for an attempt whose outcome was
    /// applied: no later claim can take it, so none can own the entry by
    /// then. Kept if the job's record shows the attempt still running or
    /// ready: the store lost the outcome since (a failover), and the entry
    /// is the sweep's way to the task. (A refused claim's entry may be the
    /// sweep's last way to the task: see [`Store::recheck`].)
    async fn forget_claim(&self, claim: &ClaimRef) -> Result<(), StoreError>;

    /// For a claim whose outcome was refused as stale: if the task is ready
    /// at this very attempt, the store lost the claim (a crash or failover
    /// that lost its latest writes, lease entry and all) and its message
    /// was acked, so have the sweep offer it again: add the attempt's lease
    /// entry, due now, unless one is there. In every other case (the usual
    /// one: the lease lapsed and the task moved on) do nothing.
    async fn recheck(&self, claim: &ClaimRef) -> Result<(), StoreError>;

    /// Promote retries that are due; publish, then `forget_retries`. An
    /// entry of a task still at the attempt before (its retry's outcome
    /// perhaps not applied yet) gives no action: it is kept and looked at
    /// again [`PENDING_RETRY_RECHECK`] later, unless an outcome moved it
    /// meanwhile. Forgetting it lost the retry of an outcome applied between
    /// the read and the forget: the task stayed `retrying` with nothing to
    /// wake it (the simulation's seed 182924).
    async fn due_retries(&self, limit: usize) -> Result<Vec<SweepAction>, StoreError>;

    /// Forget retry entries whose messages are confirmed, each only if its
    /// score is still at most `read_at` (when they were read as due): the
    /// store may have lost the promotion with its latest writes, and the
    /// audit raised the entry (see [`Store::audit_jobs`]) for the retry to
    /// be promoted again; dropping it would leave the task `retrying` with
    /// nothing to wake it (its message, already published, is refused as
    /// stale).
    async fn forget_retries(&self, entries: &[String], read_at: u64) -> Result<(), StoreError>;

    /// How long until the earliest scheduled retry after the `skip`
    /// earliest is due, by the clock the schedule is scored with (zero
    /// when it is due already); `None` when there is no such retry. The
    /// sweep wakes for it rather than at its next pass, so a retry starts
    /// when its status says it will. (The sweep passes 0: a retry whose
    /// queue refused it is deferred in the schedule, and one due already
    /// after a pass that ended early does not bring the next forward.)
    async fn next_retry_in(&self, skip: usize) -> Result<Option<Duration>, StoreError>;

    /// Re-queue (or fail) tasks whose lease lapsed, and re-offer dependents
    /// of finished tasks whose follow-ups may not have been published.
    async fn expired_leases(&self, limit: usize, by: &str) -> Result<Vec<SweepAction>, StoreError>;

    /// Forget lease entries whose follow-ups are confirmed, each only if its
    /// score is still at most `read_at` (when they were read as due): a
    /// task the sweep offered again at the same attempt may have been
    /// claimed since, and the claim (which keeps an existing entry, moved
    /// to its own expiry) owns the entry now; or the claim was lost with a
    /// store's latest writes and the audit (or a recheck) put the entry
    /// back, due at once, for the task to be offered again.
    async fn forget_leases(&self, entries: &[String], read_at: u64) -> Result<(), StoreError>;

    /// Move entries of schedule `index` whose messages the broker refused
    /// (a queue at its length limit, a nack) `pause` later, each only if
    /// its score is still at most `read_at`, as [`Store::forget_retries`]
    /// checks: left due, they would stay at the head of the schedule and be
    /// read first at every pass, ahead of the entries behind them.
    async fn defer(
        &self,
        index: ScheduleIndex,
        entries: &[String],
        read_at: u64,
        pause: Duration,
    ) -> Result<(), StoreError>;

    /// The store's server, if it is not the one the last complete audit
    /// was of (Redis: its `run_id` and `master_replid`, so a restart, a
    /// failover to another node, or a failback to a process that took the
    /// other's data meanwhile). Such a server may have come back without its latest writes
    /// (a crash under `appendfsync everysec`, a replica that lagged): a
    /// claim whose lease entry went with it, its message acked and its
    /// worker gone, would wait forever. An audit finds it.
    async fn audit_due(&self) -> Result<Option<String>, StoreError>;

    /// One page of the audit: up to about `limit` entries of the job index
    /// from `cursor` (`None`: the start). For every unfinished job, the
    /// schedule entries its record calls for are added where the indexes
    /// lack them, or raised to the wanted time where they hold them lower
    /// (never lowered: a later time there is the better hint): a running
    /// task's lease entry at its lease's expiry, a retrying task's retry
    /// entry at its due time (now, if that is past), and a ready task's
    /// lease entry due now, which has the sweep offer the attempt again (a
    /// duplicate of a message still queued is harmless: claims dedupe).
    /// Raised, because an entry left as it was may be one a sweep read as
    /// due before the store lost its latest writes: that sweep's forget
    /// (of entries still as it read them) would drop what the audit meant
    /// to keep. `added` counts only entries that were missing. Idempotent;
    /// jobs created or changed while the walk goes on need nothing from it.
    async fn audit_jobs(&self, cursor: Option<&str>, limit: usize)
    -> Result<AuditPage, StoreError>;

    /// The audit of one job, as [`Store::audit_jobs`] does each of a
    /// page's: for a job recorded by a process that may not have published
    /// its ready tasks (a submission of its id, given back, that this
    /// process cannot record as its own; see `submission.rs`), so the
    /// sweep offers them again.
    async fn audit_job(&self, id: &str) -> Result<AuditPage, StoreError>;

    /// Record that the audit of `server` (from [`Store::audit_due`]) is
    /// complete.
    async fn audit_done(&self, server: &str) -> Result<(), StoreError>;

    /// A job's full status.
    async fn job(&self, id: &str) -> Result<Option<JobStatus>, StoreError>;

    /// A job's state and error alone (`None`: no such job): what the
    /// answer to a submission under a taken id needs, without reading
    /// every task's result and the whole history as [`Store::job`] does —
    /// a small invalid message naming a big job's id would cost its size.
    async fn job_state(&self, id: &str) -> Result<Option<(JobState, Option<String>)>, StoreError> {
        Ok(self.job(id).await?.map(|s| (s.state, s.error)))
    }

    /// Recent jobs, newest first, optionally only those in `state`.
    async fn list_jobs(
        &self,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobSummary>, StoreError>;

    /// [`Store::list_jobs`], looking at no more than about `look_at` of
    /// the newest jobs for those in `state` (a state few retained jobs
    /// are in would otherwise have every job read). The default looks at
    /// them all (the in-process store holds them in memory anyway).
    async fn list_jobs_within(
        &self,
        state: Option<JobState>,
        limit: usize,
        look_at: usize,
    ) -> Result<JobListing, StoreError> {
        let _ = look_at;
        Ok(JobListing {
            jobs: self.list_jobs(state, limit).await?,
            cut_short: false,
        })
    }

    /// Forget expired jobs from the index of recent jobs (a job's own keys
    /// expire by themselves, its index entry does not), oldest first,
    /// looking at no more than `limit` entries older than the retention.
    async fn prune_expired(&self, limit: usize) -> Result<Pruned, StoreError>;

    /// Every task queue named by a job this store accepted (without the
    /// prefix), sorted.
    async fn known_queues(&self) -> Result<Vec<String>, StoreError>;

    /// Register or refresh a worker; it drops out after `ttl` without
    /// refresh. Entries of processes silent for [`WORKER_ENTRY_KEPT_MS`]
    /// before this one's heartbeat are dropped from the index.
    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), StoreError>;

    /// Remove a worker from the registry (clean shutdown).
    async fn unregister(&self, worker_id: &str) -> Result<(), StoreError>;

    /// Registered, live workers, by id.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError>;

    /// Whether the store answers (and, for Redis, whether it still holds
    /// the data it held: see `RedisStore::check_epoch`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The replicas a job's creation waits for and how many the store has
    /// connected now; `None` when creations wait for none (the default, and
    /// always the case for a store without replicas). Fewer connected than
    /// wanted means every creation waits, so readiness reports it.
    async fn replicas(&self) -> Result<Option<Replicas>, StoreError> {
        Ok(None)
    }

    /// Fail a task whose message was delivered too often without an
    /// outcome (a poison message), if it is still waiting at that attempt.
    /// Returns whether the task was failed: also when the same call failed
    /// it before (failed at that attempt with that reason), so that a call
    /// sent again after its reply was lost is answered as the first.
    async fn fail_poisoned(&self, task: &TaskMessage, reason: &str) -> Result<bool, StoreError>;
}
