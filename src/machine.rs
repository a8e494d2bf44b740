//! The job state machine, as plain Rust over an in-memory record.
//!
//! This is the specification of every job transition: each method here has
//! a Lua twin in `store/lua/` that Redis runs atomically, with the same
//! checks, the same effects, the same history reasons and the same replies.
//! The in-process store runs these methods directly (embedded mode,
//! simulation), and `tests/store_equivalence.rs` drives both stores through
//! the same random operations and requires identical answers and statuses,
//! so the Rust and the Lua cannot drift apart unnoticed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::intake::{PlannedJob, PlannedTask, Rejection};
use crate::model::{JobState, TaskMessage, TaskState};
use crate::store::{
    Applied, AttemptResult, ClaimOutcome, ClaimRef, Claimed, HistoryEntry, JobStatus,
    OversizedInputs, ScheduleEntry, ScheduleIndex, TaskStatus, entry,
};

/// One job and all its tasks, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: String,
    /// Job state.
    pub state: JobState,
    /// One per atomic write.
    pub version: u64,
    /// Who asked.
    pub requestor: String,
    /// Labels JSON.
    pub labels_json: String,
    /// Why it was rejected.
    pub error: Option<String>,
    /// Created, ms.
    pub created_ms: u64,
    /// Last change, ms.
    pub updated_ms: u64,
    /// When it became terminal, ms.
    pub finished_ms: Option<u64>,
    /// How long to keep it once terminal, ms.
    pub retention_ms: u64,
    /// Non-terminal tasks.
    pub open: u32,
    /// Failed tasks.
    pub nfail: u32,
    /// Cancelled tasks.
    pub ncanc: u32,
    /// The last fencing number handed out.
    pub fence: u64,
    /// Tasks by index.
    pub tasks: Vec<TaskRecord>,
    /// State changes with reasons.
    pub history: Vec<HistoryEntry>,
}

/// One task of a [`JobRecord`]: its plan, as the job gave it, and where
/// it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// What the job asked for: name, handler, queue, params, dependencies
    /// and retry policy (flattened: the snapshot file keeps one object per
    /// task).
    #[serde(flatten)]
    pub plan: PlannedTask,
    /// Dependencies not yet succeeded.
    pub deps_left: u32,
    /// State.
    pub state: TaskState,
    /// Current attempt (0 while waiting).
    pub attempt: u32,
    /// Result JSON.
    pub result: Option<String>,
    /// Last error.
    pub error: Option<String>,
    /// Worker of the current or last claim.
    pub worker: Option<String>,
    /// Fence of the current or last claim.
    pub fence: Option<u64>,
    /// Fence of the last applied result.
    pub last_fence: Option<u64>,
    /// Lease expiry of the live claim, ms.
    pub lease_expiry: Option<u64>,
    /// When the next attempt is due, ms.
    pub due: Option<u64>,
}

/// What `promote` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// Ready: publish this.
    Ready(TaskMessage),
    /// Not yet due (at this time, ms).
    Later(u64),
    /// The task is still at the attempt before, unfinished: the entry may
    /// be a retry whose outcome is on its way (scheduled first, applied
    /// second), or a refused outcome's. Keep it, to look again later: the
    /// outcome, once applied, moves it to its own due time, and once the
    /// task has moved on it is gone.
    Pending,
    /// Nothing to do: forget the entry.
    Gone,
}

/// What `reclaim` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaim {
    /// The claim is live until this time, ms.
    Alive(u64),
    /// Orphaned and re-queued: publish this.
    Requeued(TaskMessage),
    /// Orphaned with no attempts left: failed.
    Failed,
    /// Already finished: publish its ready dependents (maybe never published).
    Done(Vec<TaskMessage>),
    /// Nothing to do.
    Gone,
}

/// 2^51: above every epoch's fence base (`epoch << 20`, epoch < 2^31).
pub const FENCE_FLOOR: u64 = 1 << 51;

/// The least fence a claim at `now_ms` gets (`claim.lua`): above every
/// epoch base and rising with time, so that fences handed out after the
/// store lost recent writes (a Redis crash under `appendfsync everysec`, an
/// unplanned failover, a snapshot older than the crash) exceed every fence
/// handed out before them, lost or not: a lost claim's worker can never
/// complete under a number handed to another. Below 2^53 (exact in Lua)
/// until the year 2184.
pub fn fence_floor(now_ms: u64) -> u64 {
    FENCE_FLOOR + now_ms.saturating_mul(1000)
}

impl JobRecord {
    /// A new job from its plan (`create.lua`).
    pub fn create(
        job: &PlannedJob,
        now: u64,
        retention_ms: u64,
        fence_base: u64,
        by: &str,
    ) -> JobRecord {
        let tasks = job
            .tasks
            .iter()
            .map(|t| {
                let ready = t.deps.is_empty();
                TaskRecord {
                    plan: t.clone(),
                    deps_left: t.deps.len() as u32,
                    state: if ready {
                        TaskState::Ready
                    } else {
                        TaskState::Waiting
                    },
                    attempt: u32::from(ready),
                    result: None,
                    error: None,
                    worker: None,
                    fence: None,
                    last_fence: None,
                    lease_expiry: None,
                    due: None,
                }
            })
            .collect::<Vec<_>>();
        let mut record = JobRecord {
            id: job.id.clone(),
            state: JobState::Pending,
            version: 1,
            requestor: job.requestor.clone(),
            labels_json: job.labels_json.clone(),
            error: None,
            created_ms: now,
            updated_ms: now,
            finished_ms: None,
            retention_ms,
            open: tasks.len() as u32,
            nfail: 0,
            ncanc: 0,
            fence: fence_base,
            tasks,
            history: Vec::new(),
        };
        record.hist(
            now,
            None,
            None,
            "pending",
            format!("submitted by {}", job.requestor),
            by,
        );
        record
    }

    /// A refused submission (`reject.lua`).
    pub fn rejected(rejection: &Rejection, now: u64, retention_ms: u64, by: &str) -> JobRecord {
        let mut record = JobRecord {
            id: rejection.id.clone(),
            state: JobState::Rejected,
            version: 1,
            requestor: rejection.requestor.clone(),
            labels_json: "{}".into(),
            error: Some(rejection.error.clone()),
            created_ms: now,
            updated_ms: now,
            finished_ms: Some(now),
            retention_ms,
            open: 0,
            nfail: 0,
            ncanc: 0,
            fence: 0,
            tasks: Vec::new(),
            history: Vec::new(),
        };
        record.hist(now, None, None, "rejected", rejection.error.clone(), by);
        record
    }

    /// When this record may be forgotten, if it is terminal.
    pub fn expires_at(&self) -> Option<u64> {
        self.finished_ms.map(|f| f + self.retention_ms)
    }

    fn hist(
        &mut self,
        at: u64,
        task: Option<u32>,
        from: Option<&str>,
        to: &str,
        reason: String,
        by: &str,
    ) {
        let task = task.map(|i| self.tasks[i as usize].plan.name.clone());
        self.history.push(HistoryEntry {
            at,
            task,
            from: from.map(String::from),
            to: to.to_owned(),
            reason,
            by: Some(by.to_owned()),
        });
    }

    fn bump(&mut self, now: u64) {
        self.version += 1;
        self.updated_ms = now;
    }

    fn message(&self, idx: u32) -> TaskMessage {
        let t = &self.tasks[idx as usize];
        TaskMessage {
            job: self.id.clone(),
            task: t.plan.name.clone(),
            idx,
            attempt: t.attempt,
            queue: t.plan.queue.clone(),
        }
    }

    /// The schedule entries this job's record calls for (the audit after a
    /// store server change puts back those the indexes lack, and raises
    /// those they hold lower): a running task's lease entry at its lease's
    /// expiry (now if that is past: see `audit.lua`), a retrying task's
    /// retry entry at its due time, a ready
    /// task's lease entry due now (the sweep's reclaim then offers the
    /// attempt again). "Now" is `now` + 1 ms, past any sweep's read before
    /// the audit, even in the same millisecond; a retry past due is due
    /// then too. Mirrored by `audit.lua`. None once the job is finished.
    pub fn schedule_entries(&self, now: u64) -> Vec<ScheduleEntry> {
        if self.state.is_terminal() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let soon = now + 1;
        for (i, t) in self.tasks.iter().enumerate() {
            let (index, at_ms) = match t.state {
                TaskState::Running => (
                    ScheduleIndex::Leases,
                    t.lease_expiry.unwrap_or(soon).max(soon),
                ),
                TaskState::Ready => (ScheduleIndex::Leases, soon),
                TaskState::Retrying => (ScheduleIndex::Retries, t.due.unwrap_or(soon).max(soon)),
                _ => continue,
            };
            out.push(ScheduleEntry {
                index,
                entry: entry(&self.id, i as u32, t.attempt),
                at_ms,
            });
        }
        out
    }

    /// Every task currently ready (for re-publishing on resubmission).
    pub fn ready_tasks(&self) -> Vec<TaskMessage> {
        (0..self.tasks.len() as u32)
            .filter(|&i| self.tasks[i as usize].state == TaskState::Ready)
            .map(|i| self.message(i))
            .collect()
    }

    fn ready_dependents(&self, idx: u32) -> Vec<TaskMessage> {
        self.tasks[idx as usize]
            .plan
            .dependents
            .iter()
            .filter(|&&d| self.tasks[d as usize].state == TaskState::Ready)
            .map(|&d| self.message(d))
            .collect()
    }

    fn release_dependents(&mut self, idx: u32, now: u64, by: &str) -> Vec<TaskMessage> {
        let mut ready = Vec::new();
        for d in self.tasks[idx as usize].plan.dependents.clone() {
            let t = &mut self.tasks[d as usize];
            t.deps_left = t.deps_left.saturating_sub(1);
            if t.deps_left == 0 && t.state == TaskState::Waiting {
                t.state = TaskState::Ready;
                t.attempt = 1;
                self.hist(
                    now,
                    Some(d),
                    Some("waiting"),
                    "ready",
                    "dependencies succeeded".into(),
                    by,
                );
                ready.push(self.message(d));
            }
        }
        ready
    }

    fn fail_dependents(&mut self, idx: u32, now: u64, by: &str) {
        let reason = format!("dependency failed: {}", self.tasks[idx as usize].plan.name);
        let mut queue: Vec<u32> = self.tasks[idx as usize].plan.dependents.clone();
        let mut head = 0;
        while head < queue.len() {
            let d = queue[head];
            head += 1;
            if self.tasks[d as usize].state == TaskState::Waiting {
                let t = &mut self.tasks[d as usize];
                t.state = TaskState::Failed;
                t.error = Some(reason.clone());
                self.hist(now, Some(d), Some("waiting"), "failed", reason.clone(), by);
                self.open -= 1;
                self.nfail += 1;
                queue.extend(self.tasks[d as usize].plan.dependents.iter().copied());
            }
        }
    }

    fn fail_task(&mut self, idx: u32, from: &str, reason: String, now: u64, by: &str) {
        let t = &mut self.tasks[idx as usize];
        t.state = TaskState::Failed;
        t.error = Some(reason.clone());
        t.lease_expiry = None;
        t.due = None;
        self.hist(now, Some(idx), Some(from), "failed", reason, by);
        self.open -= 1;
        self.nfail += 1;
        self.fail_dependents(idx, now, by);
    }

    fn settle(&mut self, now: u64, by: &str) -> JobState {
        if self.open > 0 {
            return self.state;
        }
        let to = if self.nfail > 0 {
            JobState::Failed
        } else if self.ncanc > 0 {
            JobState::Cancelled
        } else {
            JobState::Succeeded
        };
        let from = self.state;
        self.state = to;
        self.finished_ms = Some(now);
        self.hist(
            now,
            None,
            Some(from.as_str()),
            to.as_str(),
            "all tasks finished".into(),
            by,
        );
        to
    }

    fn task(&self, idx: u32) -> Option<&TaskRecord> {
        self.tasks.get(idx as usize)
    }

    /// `claim.lua`: dependency results are handed out up to
    /// `max_inputs_bytes` of them together, none past it.
    pub fn claim(
        &mut self,
        idx: u32,
        attempt: u32,
        worker: &str,
        lease_ms: u64,
        max_inputs_bytes: u64,
        now: u64,
    ) -> ClaimOutcome {
        let Some(t) = self.task(idx) else {
            return ClaimOutcome::Missing;
        };
        if t.attempt != attempt {
            return ClaimOutcome::Stale;
        }
        match t.state {
            TaskState::Running => return ClaimOutcome::Busy,
            TaskState::Ready => {}
            _ => return ClaimOutcome::Stale,
        }
        self.fence = (self.fence + 1).max(fence_floor(now));
        let fence = self.fence;
        let t = &mut self.tasks[idx as usize];
        t.state = TaskState::Running;
        t.worker = Some(worker.to_owned());
        t.fence = Some(fence);
        t.lease_expiry = Some(now + lease_ms);
        self.hist(
            now,
            Some(idx),
            Some("ready"),
            "running",
            format!("claimed, attempt {attempt}"),
            worker,
        );
        if self.state == JobState::Pending {
            self.state = JobState::Running;
            self.hist(
                now,
                None,
                Some("pending"),
                "running",
                "first task claimed".into(),
                worker,
            );
        }
        self.bump(now);
        let t = &self.tasks[idx as usize];
        let inputs_bytes: u64 = t
            .plan
            .deps
            .iter()
            .map(|&d| {
                self.tasks[d as usize]
                    .result
                    .as_ref()
                    .map_or(4, |r| r.len() as u64)
            })
            .sum();
        let oversized_inputs = (inputs_bytes > max_inputs_bytes).then_some(OversizedInputs {
            deps: t.plan.deps.len(),
            bytes: inputs_bytes,
            limit: max_inputs_bytes,
        });
        // Past the limit none are read, as in `claim.lua`.
        let deps = if oversized_inputs.is_some() {
            BTreeMap::new()
        } else {
            t.plan
                .deps
                .iter()
                .map(|&d| {
                    let dep = &self.tasks[d as usize];
                    let value = dep
                        .result
                        .as_deref()
                        .and_then(|r| serde_json::from_str(r).ok())
                        .unwrap_or(Value::Null);
                    (dep.plan.name.clone(), value)
                })
                .collect()
        };
        ClaimOutcome::Claimed(Box::new(Claimed {
            claim: ClaimRef {
                job: self.id.clone(),
                idx,
                attempt,
                fence,
            },
            task: t.plan.name.clone(),
            handler: t.plan.handler.clone(),
            params_json: t.plan.params_json.clone(),
            max_attempts: t.plan.max_attempts,
            timeout: std::time::Duration::from_millis(t.plan.timeout_ms),
            deps,
            oversized_inputs,
            backoff: (t.plan.backoff_base_ms, t.plan.backoff_cap_ms),
        }))
    }

    /// `renew.lua`: the new expiry, or `None` if the claim is not held.
    pub fn renew(&mut self, idx: u32, fence: u64, lease_ms: u64, now: u64) -> Option<u64> {
        let t = self.tasks.get_mut(idx as usize)?;
        if t.state != TaskState::Running || t.fence != Some(fence) {
            return None;
        }
        t.lease_expiry = Some(now + lease_ms);
        t.lease_expiry
    }

    /// `complete.lua`.
    pub fn complete(
        &mut self,
        claim: &ClaimRef,
        result: &AttemptResult,
        worker: &str,
        now: u64,
    ) -> Applied {
        let idx = claim.idx;
        let Some(t) = self.task(idx) else {
            return Applied::Missing;
        };
        if t.last_fence == Some(claim.fence) {
            return Applied::Done {
                duplicate: true,
                task_state: t.state,
                job_state: self.state,
                ready: self.ready_dependents(idx),
            };
        }
        if t.state != TaskState::Running
            || t.attempt != claim.attempt
            || t.fence != Some(claim.fence)
        {
            return Applied::Stale;
        }
        let max_attempts = t.plan.max_attempts;
        let t = &mut self.tasks[idx as usize];
        t.last_fence = Some(claim.fence);
        t.lease_expiry = None;
        let mut ready = Vec::new();
        let task_state = match result {
            AttemptResult::Succeeded(json) => {
                t.state = TaskState::Succeeded;
                t.result = Some(json.clone());
                t.error = None;
                self.hist(
                    now,
                    Some(idx),
                    Some("running"),
                    "succeeded",
                    format!("succeeded on attempt {}", claim.attempt),
                    worker,
                );
                self.open -= 1;
                ready = self.release_dependents(idx, now, worker);
                TaskState::Succeeded
            }
            AttemptResult::Retry { error, delay } if claim.attempt < max_attempts => {
                let delay_ms = delay.as_millis() as u64;
                let next = claim.attempt + 1;
                t.state = TaskState::Retrying;
                t.attempt = next;
                t.error = Some(error.clone());
                t.due = Some(now + delay_ms);
                self.hist(
                    now,
                    Some(idx),
                    Some("running"),
                    "retrying",
                    format!(
                        "attempt {} failed: {error}; attempt {next} due in {delay_ms} ms",
                        claim.attempt
                    ),
                    worker,
                );
                TaskState::Retrying
            }
            AttemptResult::Retry { error, .. } => {
                let reason = format!(
                    "{error} (attempts used up: {} of {max_attempts})",
                    claim.attempt
                );
                self.fail_task(idx, "running", reason, now, worker);
                TaskState::Failed
            }
            AttemptResult::Failed(error) => {
                self.fail_task(idx, "running", error.clone(), now, worker);
                TaskState::Failed
            }
        };
        self.bump(now);
        let job_state = self.settle(now, worker);
        Applied::Done {
            duplicate: false,
            task_state,
            job_state,
            ready,
        }
    }

    /// `promote.lua`.
    pub fn promote(&mut self, idx: u32, attempt: u32, now: u64, by: &str) -> Promotion {
        let Some(t) = self.task(idx) else {
            return Promotion::Gone;
        };
        if t.attempt + 1 == attempt && !t.state.is_terminal() {
            return Promotion::Pending;
        }
        if t.attempt != attempt {
            return Promotion::Gone;
        }
        match t.state {
            TaskState::Ready => return Promotion::Ready(self.message(idx)),
            TaskState::Retrying => {}
            _ => return Promotion::Gone,
        }
        let due = t.due.unwrap_or(0);
        if due > now {
            return Promotion::Later(due);
        }
        let t = &mut self.tasks[idx as usize];
        t.state = TaskState::Ready;
        t.due = None;
        self.hist(
            now,
            Some(idx),
            Some("retrying"),
            "ready",
            format!("retry due, attempt {attempt}"),
            by,
        );
        self.bump(now);
        Promotion::Ready(self.message(idx))
    }

    /// `reclaim.lua`.
    pub fn reclaim(&mut self, idx: u32, attempt: u32, now: u64, by: &str) -> Reclaim {
        let Some(t) = self.task(idx) else {
            return Reclaim::Gone;
        };
        if t.state == TaskState::Running && t.attempt == attempt {
            let le = t.lease_expiry.unwrap_or(0);
            if le > now {
                return Reclaim::Alive(le);
            }
            let reason = format!(
                "lease expired (worker {})",
                t.worker.as_deref().unwrap_or("?")
            );
            if t.attempt < t.plan.max_attempts {
                let t = &mut self.tasks[idx as usize];
                t.state = TaskState::Ready;
                t.attempt += 1;
                t.error = Some(reason.clone());
                t.lease_expiry = None;
                let next = t.attempt;
                self.hist(
                    now,
                    Some(idx),
                    Some("running"),
                    "ready",
                    format!("{reason}; attempt {next} queued"),
                    by,
                );
                self.bump(now);
                return Reclaim::Requeued(self.message(idx));
            }
            let reason = format!(
                "{reason}; attempts used up ({} of {})",
                t.attempt, t.plan.max_attempts
            );
            self.fail_task(idx, "running", reason, now, by);
            self.bump(now);
            self.settle(now, by);
            return Reclaim::Failed;
        }
        if t.state == TaskState::Ready && (t.attempt == attempt + 1 || t.attempt == attempt) {
            return Reclaim::Requeued(self.message(idx));
        }
        if t.state == TaskState::Succeeded && t.attempt == attempt {
            return Reclaim::Done(self.ready_dependents(idx));
        }
        Reclaim::Gone
    }

    /// `release.lua`: the message to publish, if the claim was held.
    pub fn release(&mut self, idx: u32, fence: u64, worker: &str, now: u64) -> Option<TaskMessage> {
        let t = self.tasks.get_mut(idx as usize)?;
        if t.state != TaskState::Running || t.fence != Some(fence) {
            return None;
        }
        t.state = TaskState::Ready;
        t.lease_expiry = None;
        self.hist(
            now,
            Some(idx),
            Some("running"),
            "ready",
            "handed back by worker at shutdown".into(),
            worker,
        );
        self.bump(now);
        Some(self.message(idx))
    }

    /// `poison.lua`: whether the task was failed (by this call, or by the
    /// same call before, sent again: failed at this attempt with this
    /// reason).
    pub fn poison(&mut self, idx: u32, attempt: u32, reason: &str, now: u64, by: &str) -> bool {
        let Some(t) = self.task(idx) else {
            return false;
        };
        if t.state == TaskState::Failed
            && t.attempt == attempt
            && t.error.as_deref() == Some(reason)
        {
            return true;
        }
        if t.state != TaskState::Ready || t.attempt != attempt {
            return false;
        }
        self.fail_task(idx, "ready", reason.to_owned(), now, by);
        self.bump(now);
        self.settle(now, by);
        true
    }

    /// The status `conveyor status` shows.
    pub fn status(&self) -> JobStatus {
        JobStatus {
            id: self.id.clone(),
            state: self.state,
            version: self.version,
            requestor: self.requestor.clone(),
            labels: serde_json::from_str(&self.labels_json).unwrap_or_default(),
            error: self.error.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            tasks: self
                .tasks
                .iter()
                .map(|t| {
                    (
                        t.plan.name.clone(),
                        TaskStatus {
                            state: t.state,
                            attempts: t.attempt,
                            result: t
                                .result
                                .as_deref()
                                .and_then(|r| serde_json::from_str(r).ok())
                                .unwrap_or(Value::Null),
                            error: t.error.clone(),
                            worker: t.worker.clone(),
                            handler: t.plan.handler.clone(),
                            queue: t.plan.queue.clone(),
                            max_attempts: t.plan.max_attempts,
                            next_attempt_at_ms: if t.state == TaskState::Retrying {
                                t.due
                            } else {
                                None
                            },
                        },
                    )
                })
                .collect(),
            history: self.history.clone(),
        }
    }
}
