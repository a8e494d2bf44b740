//! Intake: from the raw bytes of a submit message to a planned job, or a
//! clear reason why not.
//!
//! Three outcomes, because the wire contract treats them differently:
//! - not JSON at all, or larger than the limit: the message goes to
//!   `<prefix>.dead` byte for byte with the reason in its headers;
//! - valid JSON but not a valid job (schema, limits, unknown handler, DAG
//!   errors, params the handler rejects): the job is recorded as `rejected`
//!   with the error, and the reply says why;
//! - a valid job: planned (indexes, dependents, retry policy resolved) and
//!   handed to the store.
//!
//! Every error names the field (`tasks[2].params.ms`) and the limit, never
//! echoes a value of unbounded size (schema errors are masked: a 1 MiB
//! string reads as `value`; a name, id or queue, at most
//! `limits.max_name_len` long, is quoted), and is at most
//! [`MAX_ERROR_BYTES`] long. A handler
//! whose `validate` or `retry_defaults` panics rejects the job; the
//! dispatcher goes on.
//!
//! Each retry field of a task (`max_attempts`, `base_ms`, `cap_ms`, and the
//! time-out) is resolved on its own: the task's value, else its handler's
//! default, else the `retry` config.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use conveyor_handler::{Registry, RetryDefaults};
use serde_json::Value;

use crate::broker::{HeaderValue, Properties};
use crate::config::{Config, Limits, MAX_ATTEMPTS, MAX_BACKOFF_MS, MAX_TIMEOUT_S, RetryConfig};
use crate::dag::Dag;
use crate::model::{DeadLetterReason, JobSpec, RetryPolicy, TaskMessage, TaskSpec};
use crate::text::{capped, cut};

/// The longest error text intake records, replies or puts in a header, in
/// bytes; longer ones are cut at a character boundary and end with `…`.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The longest text of one error where a rejection lists several (up to
/// [`MAX_TASK_ERRORS`] task errors), so that all of them fit in
/// [`MAX_ERROR_BYTES`]; the schema's one error is cut to it too.
const MAX_LISTED_ERROR_BYTES: usize = 320;

/// The most task errors one rejection names; the rest are counted.
const MAX_TASK_ERRORS: usize = 3;

/// What intake made of a submit message.
#[derive(Debug)]
pub enum Intake {
    /// Unusable bytes: dead-letter with this reason.
    Dead {
        /// The kind of reason.
        kind: DeadLetterReason,
        /// The human-readable reason.
        reason: String,
    },
    /// Valid JSON, invalid job.
    Rejected(Rejection),
    /// A job ready to be stored.
    Valid(PlannedJob),
}

/// A job that was refused, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The id from the message if it was usable, else a generated one.
    pub id: String,
    /// The requestor from the message if it was a string.
    pub requestor: String,
    /// Names the field and the limit.
    pub error: String,
}

/// A validated job with everything the store needs precomputed.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedJob {
    /// The job's id.
    pub id: String,
    /// Who asked.
    pub requestor: String,
    /// Labels as a JSON object string.
    pub labels_json: String,
    /// Tasks in submission order; a task's index is its position.
    pub tasks: Vec<PlannedTask>,
}

/// One task of a planned job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedTask {
    /// Name in the job.
    pub name: String,
    /// Handler name.
    pub handler: String,
    /// Queue without prefix.
    pub queue: String,
    /// Params as JSON text, stored as-is and parsed once by the worker.
    pub params_json: String,
    /// Indexes this task waits for.
    pub deps: Vec<u32>,
    /// Indexes waiting for this task.
    pub dependents: Vec<u32>,
    /// Most attempts.
    pub max_attempts: u32,
    /// Backoff base.
    pub backoff_base_ms: u64,
    /// Backoff cap.
    pub backoff_cap_ms: u64,
    /// Run time-out of one attempt.
    pub timeout_ms: u64,
}

impl PlannedJob {
    /// Indexes of tasks with no dependencies.
    pub fn roots(&self) -> impl Iterator<Item = u32> + '_ {
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.deps.is_empty())
            .map(|(i, _)| i as u32)
    }

    /// The message that starts attempt 1 of task `idx`.
    pub fn task_message(&self, idx: u32) -> TaskMessage {
        let task = &self.tasks[idx as usize];
        TaskMessage {
            job: self.id.clone(),
            task: task.name.clone(),
            idx,
            attempt: 1,
            queue: task.queue.clone(),
        }
    }
}

/// Turns submit messages into planned jobs. Cheap to share.
#[derive(Clone)]
pub struct JobIntake {
    schema: Arc<jsonschema::Validator>,
    registry: Registry,
    limits: Limits,
    retry: RetryConfig,
    max_message_bytes: usize,
}

/// The job schema, compiled into the binary: the same file clients read.
pub const JOB_SCHEMA: &str = include_str!("../schemas/job.schema.json");

/// The job schema compiled once per process: it is a constant, and
/// compiling it costs more than accepting hundreds of jobs (embedded mode
/// and simulations build an intake per dispatcher they start).
fn compiled_job_schema() -> anyhow::Result<Arc<jsonschema::Validator>> {
    static COMPILED: std::sync::OnceLock<Arc<jsonschema::Validator>> = std::sync::OnceLock::new();
    if let Some(v) = COMPILED.get() {
        return Ok(v.clone());
    }
    let schema: Value = serde_json::from_str(JOB_SCHEMA)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| anyhow::anyhow!("job schema does not compile: {e}"))?;
    Ok(COMPILED.get_or_init(|| Arc::new(validator)).clone())
}

impl JobIntake {
    /// Intake under `config`'s limits, knowing the handlers in `registry`.
    pub fn new(config: &Config, registry: Registry) -> anyhow::Result<JobIntake> {
        Ok(JobIntake {
            schema: compiled_job_schema()?,
            registry,
            limits: config.limits.clone(),
            retry: config.retry.clone(),
            max_message_bytes: config.max_message_bytes,
        })
    }

    /// Classify and plan one submit message body; a job (or a rejection)
    /// whose body names no usable id gets a fresh one.
    pub fn accept(&self, body: &[u8]) -> Intake {
        self.accept_as(body, None).0
    }

    /// [`Self::accept`], but a body that names no usable id takes
    /// `id_if_none` (when given) instead of a fresh one: the id a delivery
    /// of the same submission was recorded under before (see
    /// [`ASSIGNED_ID_HEADER`]). Also returns the id given so (`None` when
    /// the body named its own, or the message is a dead letter).
    pub fn accept_as(&self, body: &[u8], id_if_none: Option<&str>) -> (Intake, Option<String>) {
        let mut assigned = None;
        let verdict = self.judge(body, id_if_none, &mut assigned);
        (verdict, assigned)
    }

    fn judge(
        &self,
        body: &[u8],
        id_if_none: Option<&str>,
        assigned: &mut Option<String>,
    ) -> Intake {
        if body.len() > self.max_message_bytes {
            return Intake::Dead {
                kind: DeadLetterReason::TooLarge,
                reason: capped(
                    format!(
                        "message is {} bytes; the limit (max_message_bytes) is {}",
                        body.len(),
                        self.max_message_bytes
                    ),
                    MAX_ERROR_BYTES,
                ),
            };
        }
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return Intake::Dead {
                    kind: DeadLetterReason::NotJson,
                    reason: capped(not_json(&e), MAX_ERROR_BYTES),
                };
            }
        };
        let id = match usable_id(&value, self.limits.max_name_len) {
            Some(id) => id,
            None => assigned
                .insert(id_if_none.map_or_else(new_job_id, str::to_owned))
                .clone(),
        };
        let requestor = value
            .get("requestor")
            .and_then(Value::as_str)
            .map(|r| cut(r, self.limits.max_name_len).to_owned())
            .unwrap_or_default();
        let reject = |error: String| {
            Intake::Rejected(Rejection {
                id: id.clone(),
                requestor: requestor.clone(),
                error: capped(error, MAX_ERROR_BYTES),
            })
        };
        // The task count before the schema, whose first error would name
        // some task's field rather than the limit.
        if let Some(error) = self.too_many_tasks(value.get("tasks")) {
            return reject(error);
        }
        if let Some(error) = self.schema_error(&value) {
            return reject(error);
        }
        let mut spec: JobSpec = match serde_path_to_error::deserialize(value) {
            Ok(spec) => spec,
            Err(e) => {
                let field = match e.path().to_string() {
                    path if path == "." => "job".to_owned(),
                    path => path,
                };
                return reject(format!("{field}: {}", e.inner()));
            }
        };
        if spec.id.is_none() {
            spec.id = Some(id.clone());
        }
        match self.plan(spec) {
            Ok(job) => Intake::Valid(job),
            Err(error) => reject(error),
        }
    }

    /// The id in a submission's [`ASSIGNED_ID_HEADER`], if it is one a job
    /// can be recorded under.
    pub fn assigned_id<'a>(&self, properties: &'a Properties) -> Option<&'a str> {
        match properties.header(ASSIGNED_ID_HEADER)? {
            HeaderValue::Text(id) if check_job_id(id, self.limits.max_name_len).is_ok() => Some(id),
            _ => None,
        }
    }

    /// The error for more tasks than `limits.max_tasks`, if `tasks` is an
    /// array of that many.
    fn too_many_tasks(&self, tasks: Option<&Value>) -> Option<String> {
        let n = tasks?.as_array()?.len();
        (n > self.limits.max_tasks).then(|| tasks_over_limit(n, self.limits.max_tasks))
    }

    fn schema_error(&self, value: &Value) -> Option<String> {
        // The valid (the common case) answered without collecting errors.
        if self.schema.is_valid(value) {
            return None;
        }
        // The first error only: the validator's list of every error is
        // made whole before the first is read, and a megabyte body of one
        // task whose `after` holds 500,000 numbers makes as many errors,
        // hundreds of megabytes. `validate` stops at the first.
        //
        // Masked: the message names the rule and its limit, with the
        // instance written as `value` (it may be a megabyte of string).
        let e = self.schema.validate(value).err()?;
        let path = pointer_to_field(&e.instance_path().to_string(), value);
        Some(capped(
            format!("{path}: {}", e.masked()),
            MAX_LISTED_ERROR_BYTES,
        ))
    }

    /// Check limits, handlers, params and the DAG; resolve defaults. The
    /// error names the field and the limit, in at most [`MAX_ERROR_BYTES`].
    pub fn plan(&self, spec: JobSpec) -> Result<PlannedJob, String> {
        self.plan_job(spec)
            .map_err(|error| capped(error, MAX_ERROR_BYTES))
    }

    fn plan_job(&self, spec: JobSpec) -> Result<PlannedJob, String> {
        let limits = &self.limits;
        if spec.tasks.len() > limits.max_tasks {
            return Err(tasks_over_limit(spec.tasks.len(), limits.max_tasks));
        }
        if spec.labels.len() > limits.max_labels {
            return Err(format!(
                "labels: {} labels; the limit (limits.max_labels) is {}",
                spec.labels.len(),
                limits.max_labels
            ));
        }
        check_name("requestor", &spec.requestor, limits.max_name_len)?;
        if let Some(id) = &spec.id {
            check_name("id", id, limits.max_name_len)?;
        }
        // Each queue a job names is declared on the broker.
        let mut queues = std::collections::HashSet::new();
        for (i, task) in spec.tasks.iter().enumerate() {
            if queues.insert(task.queue.as_deref().unwrap_or("default"))
                && queues.len() > limits.max_queues_per_job
            {
                return Err(format!(
                    "tasks[{i}].queue: the job names more than {} distinct queues; the \
                     limit (limits.max_queues_per_job) is {}",
                    limits.max_queues_per_job, limits.max_queues_per_job
                ));
            }
        }
        let names: Vec<&str> = spec.tasks.iter().map(|t| t.name.as_str()).collect();
        let after: Vec<Vec<&str>> = spec
            .tasks
            .iter()
            .map(|t| t.after.iter().map(String::as_str).collect())
            .collect();
        // Every task is checked, so one rejection names up to
        // MAX_TASK_ERRORS problems rather than one per round trip: a
        // cycle first (the job's), then each task's first, in task order,
        // its place in the graph (a duplicate name, an unknown `after`)
        // before its own fields.
        let n = spec.tasks.len();
        let (deps, dependents, dag_errors) = match Dag::build(&names, &after) {
            Ok(dag) => (dag.deps, dag.dependents, Vec::new()),
            Err(e) => (vec![Vec::new(); n], vec![Vec::new(); n], e.0),
        };
        let mut errors = Vec::new();
        let mut more_errors = 0usize;
        let mut note = |error: String| {
            if errors.len() < MAX_TASK_ERRORS {
                errors.push(error);
            } else {
                more_errors += 1;
            }
        };
        // The graph's errors come in task order (DagErrors): the job's (a
        // cycle) are noted now, each task's first at its turn below.
        let (job_dag_errors, task_dag_errors): (Vec<_>, Vec<_>) =
            dag_errors.into_iter().partition(|e| e.task().is_none());
        for e in job_dag_errors {
            note(e.to_string());
        }
        let mut task_dag_errors = task_dag_errors.into_iter().peekable();
        let mut tasks = Vec::with_capacity(n);
        for (i, (task, (deps, dependents))) in spec
            .tasks
            .into_iter()
            .zip(deps.into_iter().zip(dependents))
            .enumerate()
        {
            let mut graph_error = None;
            while let Some(e) = task_dag_errors.next_if(|e| e.task() == Some(i)) {
                graph_error.get_or_insert(e);
            }
            if let Some(e) = graph_error {
                note(e.to_string());
                continue;
            }
            match self.plan_task(i, task, deps, dependents) {
                Ok(task) => tasks.push(task),
                Err(error) => note(error),
            }
        }
        if errors.len() == 1 {
            return Err(errors.swap_remove(0));
        }
        if !errors.is_empty() {
            let mut listed: Vec<String> = errors
                .into_iter()
                .map(|e| capped(e, MAX_LISTED_ERROR_BYTES))
                .collect();
            if more_errors > 0 {
                listed.push(format!("and {more_errors} more tasks"));
            }
            return Err(listed.join("; "));
        }
        let labels_json =
            serde_json::to_string(&spec.labels).map_err(|e| format!("labels: {e}"))?;
        Ok(PlannedJob {
            id: spec.id.unwrap_or_else(new_job_id),
            requestor: spec.requestor,
            labels_json,
            tasks,
        })
    }

    /// Check one task (`i` its index) and resolve its defaults.
    fn plan_task(
        &self,
        i: usize,
        task: TaskSpec,
        deps: Vec<u32>,
        dependents: Vec<u32>,
    ) -> Result<PlannedTask, String> {
        let limits = &self.limits;
        check_name(&format!("tasks[{i}].name"), &task.name, limits.max_name_len)?;
        let Some(handler) = self.registry.get(&task.handler) else {
            return Err(format!(
                "tasks[{i}].handler: unknown handler {:?} (known: {})",
                task.handler,
                self.registry.names().join(", ")
            ));
        };
        if !task.params.is_object() {
            return Err(format!("tasks[{i}].params: must be a JSON object"));
        }
        // A panicking handler costs this job, not the dispatcher.
        let panicked = |what: &str, payload: Box<dyn Any + Send>| {
            format!(
                "tasks[{i}] ({}): handler {:?} panicked in {what}: {}",
                task.name,
                task.handler,
                crate::panics::panic_message(payload.as_ref())
            )
        };
        match catch_unwind(AssertUnwindSafe(|| handler.validate(&task.params))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("tasks[{i}] ({}).{e}", task.name)),
            Err(payload) => return Err(panicked("validate", payload)),
        }
        let params_json = task.params.to_string();
        if params_json.len() > limits.max_params_bytes {
            return Err(format!(
                "tasks[{i}].params: {} bytes; the limit (limits.max_params_bytes) is {}",
                params_json.len(),
                limits.max_params_bytes
            ));
        }
        let queue = task.queue.unwrap_or_else(|| "default".to_owned());
        check_name(&format!("tasks[{i}].queue"), &queue, limits.max_name_len)?;
        let defaults = match catch_unwind(AssertUnwindSafe(|| handler.retry_defaults())) {
            Ok(defaults) => defaults,
            Err(payload) => return Err(panicked("retry_defaults", payload)),
        };
        let own = task.retry.unwrap_or_default();
        check_retry_bounds(i, &own, task.timeout_s)?;
        let retry = resolve_retry(own, task.timeout_s, &defaults, &self.retry);
        Ok(PlannedTask {
            name: task.name,
            handler: task.handler,
            queue,
            params_json,
            deps,
            dependents,
            max_attempts: retry.max_attempts,
            backoff_base_ms: retry.backoff_base_ms,
            backoff_cap_ms: retry.backoff_cap_ms,
            timeout_ms: retry.timeout_ms,
        })
    }
}

/// A task's retry policy with every field resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRetry {
    /// Most attempts, at least 1.
    pub max_attempts: u32,
    /// Backoff base in milliseconds.
    pub backoff_base_ms: u64,
    /// Backoff cap in milliseconds.
    pub backoff_cap_ms: u64,
    /// Run time-out of one attempt in milliseconds, at least 1.
    pub timeout_ms: u64,
}

/// Resolve each field on its own: the task's value (`retry.*`,
/// `timeout_s`), else the handler's default, else the `retry` config. A
/// handler's default is held to the bounds a job's own values and the
/// config have (`schemas/job.schema.json`): a handler asking for a
/// million attempts or a year-long time-out gets 100 and a week, as a job
/// asking for them would be refused.
pub fn resolve_retry(
    task: RetryPolicy,
    task_timeout_s: Option<f64>,
    handler: &RetryDefaults,
    config: &RetryConfig,
) -> ResolvedRetry {
    let timeout_ms = match (task_timeout_s, handler.timeout) {
        (Some(s), _) => seconds_to_ms(s),
        (None, Some(d)) => millis(d).min(MAX_TIMEOUT_S as u64 * 1000),
        (None, None) => seconds_to_ms(config.timeout_s),
    };
    ResolvedRetry {
        max_attempts: task
            .max_attempts
            .or(handler.max_attempts.map(|n| n.min(MAX_ATTEMPTS)))
            .unwrap_or(config.max_attempts)
            .max(1),
        backoff_base_ms: task
            .base_ms
            .or(handler.backoff_base.map(|d| millis(d).min(MAX_BACKOFF_MS)))
            .unwrap_or(config.base_ms),
        backoff_cap_ms: task
            .cap_ms
            .or(handler.backoff_cap.map(|d| millis(d).min(MAX_BACKOFF_MS)))
            .unwrap_or(config.cap_ms),
        timeout_ms: timeout_ms.max(1),
    }
}

/// Why a body could not be read as JSON. serde_json stops at 128 levels
/// of nesting, and says only "recursion limit exceeded": the reason names
/// the limit, since the body may be JSON that is merely nested too deep.
fn not_json(e: &serde_json::Error) -> String {
    if e.to_string().starts_with("recursion limit exceeded") {
        format!(
            "message is not JSON Conveyor reads: nested deeper than 128 levels (the parser's limit), at line {} column {}",
            e.line(),
            e.column()
        )
    } else {
        format!("message is not JSON: {e}")
    }
}

/// A task's own retry policy and time-out within the bounds the schema
/// sets (`schemas/job.schema.json`), checked again here for a [`JobSpec`]
/// built in code and planned without the schema: NaN or an infinite
/// time-out, a million attempts or a delay past what a score in Redis can
/// hold would otherwise be planned as they are.
fn check_retry_bounds(i: usize, own: &RetryPolicy, timeout_s: Option<f64>) -> Result<(), String> {
    if let Some(n) = own.max_attempts
        && !(1..=MAX_ATTEMPTS).contains(&n)
    {
        return Err(format!(
            "tasks[{i}].retry.max_attempts: {n}; must be 1 to {MAX_ATTEMPTS}"
        ));
    }
    for (field, ms) in [("base_ms", own.base_ms), ("cap_ms", own.cap_ms)] {
        if let Some(ms) = ms
            && ms > MAX_BACKOFF_MS
        {
            return Err(format!(
                "tasks[{i}].retry.{field}: {ms}; the limit is {MAX_BACKOFF_MS} (a day)"
            ));
        }
    }
    if let Some(s) = timeout_s
        && !(s > 0.0 && s <= MAX_TIMEOUT_S)
    {
        return Err(format!(
            "tasks[{i}].timeout_s: {s}; must be more than 0 and at most {MAX_TIMEOUT_S} (a week)"
        ));
    }
    Ok(())
}

/// Whole milliseconds of `d`, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Seconds to milliseconds, rounded up (saturating; NaN is 0).
fn seconds_to_ms(s: f64) -> u64 {
    (s * 1000.0).ceil() as u64
}

/// The header in which Conveyor writes, on a submission it gives back to
/// its queue (to take again later), the id it recorded an id-less job (or
/// its rejection) under, so that taken again it finds that job instead of
/// recording a second one under a fresh id.
pub const ASSIGNED_ID_HEADER: &str = "x-conveyor-job-id";

/// A fresh job id: a UUIDv7, so ids sort by creation time.
pub fn new_job_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether `c` may be part of a job's id or a task's name or queue.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Whether `id` is one a job can be recorded under (at most `max_name_len`
/// bytes of letters, digits, '.', '_', ':' and '-', starting with a letter
/// or a digit); the error says why not.
pub fn check_job_id(id: &str, max_name_len: usize) -> Result<(), String> {
    check_name("id", id, max_name_len)
}

/// Whether `queue` is one a job's task can name (the rules of `check_job_id`).
pub(crate) fn check_queue_name(queue: &str, max_name_len: usize) -> Result<(), String> {
    check_name("queue", queue, max_name_len)
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    if value.len() > max {
        return Err(format!(
            "{field}: {} bytes; the limit (limits.max_name_len) is {max}",
            value.len()
        ));
    }
    if field != "requestor" && !value.chars().all(is_name_char) {
        return Err(format!(
            "{field}: {value:?} may only contain letters, digits, '.', '_', ':' and '-'"
        ));
    }
    // As the schema's pattern: no name reads as a command-line flag (`-x`)
    // or a hidden file (`.x`).
    if field != "requestor" && !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "{field}: {value:?} must start with a letter or a digit"
        ));
    }
    Ok(())
}

/// The message's id, if it is one we could store a rejection under.
fn usable_id(value: &Value, max: usize) -> Option<String> {
    let id = value.get("id")?.as_str()?;
    check_name("id", id, max).ok()?;
    Some(id.to_owned())
}

/// `/tasks/0/handler` of `instance` -> `tasks[0].handler`; the root ->
/// `job`. A segment is an index only where its parent is an array (a label
/// named `0` is `labels.0`), and its `~1`/`~0` escapes are undone (a label
/// named `a/b` is `labels.a/b`).
fn pointer_to_field(pointer: &str, instance: &Value) -> String {
    let mut out = String::new();
    let mut at = Some(instance);
    for part in pointer.split('/').skip(1) {
        let key = part.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(items)) => {
                out.push('[');
                out.push_str(&key);
                out.push(']');
                at = key.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            parent => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key);
                at = parent.and_then(|v| v.get(key.as_str()));
            }
        }
    }
    if out.is_empty() {
        "job".to_owned()
    } else {
        out
    }
}

/// The rejection of a job of `n` tasks, more than `limit`.
fn tasks_over_limit(n: usize, limit: usize) -> String {
    format!("tasks: {n} tasks; the limit (limits.max_tasks) is {limit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext, ValidationError};
    use serde_json::json;

    fn intake() -> JobIntake {
        JobIntake::new(&Config::default(), test_registry()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rejected(body: Value) -> String {
        match intake().accept(body.to_string().as_bytes()) {
            Intake::Rejected(r) => r.error,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    /// The built-in handlers plus the misbehaving and tuned ones below.
    fn test_registry() -> Registry {
        conveyor_builtin_handlers::registry()
            .with(TestHandler::PanicsInValidate)
            .with(TestHandler::PanicsInRetryDefaults)
            .with(TestHandler::LongError)
            .with(TestHandler::Tuned)
            .with(TestHandler::CapOnly)
    }

    enum TestHandler {
        /// `validate` panics with a message.
        PanicsInValidate,
        /// `retry_defaults` panics with a formatted (String) message.
        PanicsInRetryDefaults,
        /// `validate` rejects with a 100 KB message of two-byte characters.
        LongError,
        /// Sets every retry default.
        Tuned,
        /// Sets only the backoff cap.
        CapOnly,
    }

    #[async_trait]
    impl Handler for TestHandler {
        fn name(&self) -> &str {
            match self {
                TestHandler::PanicsInValidate => "panics-in-validate",
                TestHandler::PanicsInRetryDefaults => "panics-in-retry-defaults",
                TestHandler::LongError => "long-error",
                TestHandler::Tuned => "tuned",
                TestHandler::CapOnly => "cap-only",
            }
        }

        fn validate(&self, _params: &Value) -> Result<(), ValidationError> {
            match self {
                TestHandler::PanicsInValidate => panic!("validate exploded"),
                TestHandler::LongError => Err(ValidationError::new("params.x", "é".repeat(50_000))),
                _ => Ok(()),
            }
        }

        fn retry_defaults(&self) -> RetryDefaults {
            match self {
                TestHandler::PanicsInRetryDefaults => panic!("no defaults for {}", 42),
                TestHandler::Tuned => RetryDefaults {
                    max_attempts: Some(7),
                    timeout: Some(Duration::from_secs(2)),
                    backoff_base: Some(Duration::from_millis(10)),
                    backoff_cap: Some(Duration::from_millis(20)),
                },
                TestHandler::CapOnly => RetryDefaults {
                    backoff_cap: Some(Duration::from_millis(5_000)),
                    ..RetryDefaults::default()
                },
                _ => RetryDefaults::default(),
            }
        }

        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            Ok(Outcome::Done(Value::Null))
        }
    }

    #[test]
    fn a_valid_diamond_is_planned_with_one_root() {
        let body = json!({"id": "j1", "requestor": "me", "tasks": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "after": ["a"]},
            {"name": "c", "handler": "noop", "after": ["a"], "queue": "other"},
            {"name": "d", "handler": "noop", "after": ["b", "c"]}
        ]});
        match intake().accept(body.to_string().as_bytes()) {
            Intake::Valid(job) => {
                assert_eq!(job.id, "j1");
                assert_eq!(job.roots().collect::<Vec<_>>(), vec![0]);
                assert_eq!(job.tasks[2].queue, "other");
                assert_eq!(job.tasks[3].deps, vec![1, 2]);
                assert_eq!(job.tasks[0].max_attempts, 5);
            }
            other => panic!("expected valid, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_handler_is_named_with_its_task() {
        let err = rejected(json!({"requestor": "me", "tasks": [{"name": "a", "handler": "nope"}]}));
        assert!(
            err.starts_with("tasks[0].handler: unknown handler \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn params_the_handler_rejects_name_task_and_field() {
        let err = rejected(
            json!({"requestor": "me", "tasks": [{"name": "s", "handler": "sleep", "params": {"ms": "soon"}}]}),
        );
        assert!(
            err.contains("tasks[0]") && err.contains("params.ms"),
            "{err}"
        );
    }

    #[test]
    fn every_task_is_checked_and_up_to_three_errors_are_named() {
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "sleep", "params": {"ms": -5}},
            {"name": "b", "handler": "noop"},
            {"name": "c", "handler": "nope"},
            {"name": "d", "handler": "sleep", "params": {"ms": "soon"}},
            {"name": "e", "handler": "nope"},
            {"name": "f", "handler": "nope"}
        ]}));
        let listed: Vec<&str> = err.split("; ").collect();
        assert_eq!(listed.len(), 4, "{err}");
        assert!(listed[0].starts_with("tasks[0] (a).params.ms: "), "{err}");
        assert!(
            listed[1].starts_with("tasks[2].handler: unknown handler \"nope\""),
            "{err}"
        );
        assert!(listed[2].starts_with("tasks[3] (d).params.ms: "), "{err}");
        assert_eq!(listed[3], "and 2 more tasks", "{err}");

        // Several long errors are each cut so that all fit.
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "long-error"},
            {"name": "b", "handler": "long-error"}
        ]}));
        assert!(err.len() <= MAX_ERROR_BYTES, "{} bytes", err.len());
        assert!(err.contains("; tasks[1] (b).params.x: éé"), "{err}");
    }

    /// 2^64 written as a float is past `u64::MAX`: refused, not read as
    /// `u64::MAX` (a cast saturates).
    #[test]
    fn a_whole_number_just_past_the_largest_is_refused() {
        let task = json!({"name": "a", "handler": "noop",
            "retry": {"base_ms": 18_446_744_073_709_551_616.0_f64}});
        let read = serde_json::from_value::<TaskSpec>(task);
        assert!(read.is_err(), "{read:?}");
    }

    /// A job spec built in code and planned without the schema meets the
    /// schema's bounds all the same, each refusal naming field and limit.
    #[test]
    fn a_spec_planned_without_the_schema_is_held_to_its_bounds() {
        let spec = |retry: RetryPolicy, timeout_s: Option<f64>| JobSpec {
            id: Some("j".into()),
            requestor: "me".into(),
            labels: Default::default(),
            tasks: vec![TaskSpec {
                name: "a".into(),
                handler: "noop".into(),
                params: json!({}),
                after: vec![],
                queue: None,
                retry: Some(retry),
                timeout_s,
            }],
        };
        let refused = |retry: RetryPolicy, timeout_s: Option<f64>| match intake()
            .plan(spec(retry, timeout_s))
        {
            Ok(job) => panic!("planned: {job:?}"),
            Err(e) => e,
        };
        let attempts = RetryPolicy {
            max_attempts: Some(u32::MAX),
            ..RetryPolicy::default()
        };
        assert_eq!(
            refused(attempts, None),
            "tasks[0].retry.max_attempts: 4294967295; must be 1 to 100"
        );
        let cap = RetryPolicy {
            cap_ms: Some(u64::MAX),
            ..RetryPolicy::default()
        };
        assert!(
            refused(cap, None)
                .starts_with("tasks[0].retry.cap_ms: 18446744073709551615; the limit is 86400000"),
        );
        for bad in [f64::NAN, f64::INFINITY, 0.0, -1.0, 604_801.0] {
            let e = refused(RetryPolicy::default(), Some(bad));
            assert!(e.starts_with("tasks[0].timeout_s: "), "{e}");
            assert!(e.contains("at most 604800"), "{e}");
        }
        assert!(
            intake()
                .plan(spec(RetryPolicy::default(), Some(604_800.0)))
                .is_ok()
        );
    }

    /// JSON nested deeper than the parser reads is dead-lettered with a
    /// reason that names the limit, not a bare "recursion limit".
    #[test]
    fn a_body_nested_past_the_parsers_limit_is_dead_lettered_naming_the_limit() {
        let deep = format!(
            r#"{{"requestor": "me", "tasks": [{{"name": "a", "handler": "noop", "params": {{"x": {}1{}}}}}]}}"#,
            "[".repeat(130),
            "]".repeat(130)
        );
        match intake().accept(deep.as_bytes()) {
            Intake::Dead { kind, reason } => {
                assert_eq!(kind, DeadLetterReason::NotJson);
                assert!(reason.contains("nested deeper than 128 levels"), "{reason}");
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn a_whole_number_written_with_a_fraction_is_taken_as_that_number() {
        let body = json!({"requestor": "me", "tasks": [{"name": "a", "handler": "noop",
            "retry": {"max_attempts": 3.0, "base_ms": 1e3, "cap_ms": 2000}}]});
        match intake().accept(body.to_string().as_bytes()) {
            Intake::Valid(job) => {
                assert_eq!(job.tasks[0].max_attempts, 3);
                assert_eq!(job.tasks[0].backoff_base_ms, 1000);
                assert_eq!(job.tasks[0].backoff_cap_ms, 2000);
            }
            other => panic!("expected valid, got {other:?}"),
        }
        let err = rejected(
            json!({"requestor": "me", "tasks": [{"name": "a", "handler": "noop",
            "retry": {"max_attempts": 2.5}}]}),
        );
        assert!(err.starts_with("tasks[0].retry.max_attempts"), "{err}");
    }

    #[test]
    fn schema_errors_name_the_field() {
        let err = rejected(json!({"requestor": "me", "tasks": [{"name": 5, "handler": "noop"}]}));
        assert!(err.starts_with("tasks[0].name"), "{err}");
        let err = rejected(json!({"tasks": []}));
        assert!(err.contains("requestor"), "{err}");
    }

    #[test]
    fn a_label_is_named_by_its_key_whatever_the_key() {
        for (key, named) in [
            ("0", "labels.0"),
            ("a/b", "labels.a/b"),
            ("t~x", "labels.t~x"),
        ] {
            let err = rejected(json!({"requestor": "me", "labels": {key: 5},
                "tasks": [{"name": "a", "handler": "noop"}]}));
            assert!(err.starts_with(&format!("{named}: ")), "{key}: {err}");
        }
    }

    #[test]
    fn a_body_breaking_the_schema_many_times_over_is_rejected_at_its_first_error() {
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "noop", "after": vec![1; 300_000]}]}));
        assert!(err.starts_with("tasks[0].after[0]: "), "{err}");
        assert!(!err.contains("after[1]"), "{err}");
    }

    #[test]
    fn graph_errors_and_field_errors_are_named_together_in_task_order() {
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "nope"},
            {"name": "b", "handler": "noop", "after": ["ghost"]},
            {"name": "a", "handler": "noop"},
            {"name": "d", "handler": "noop", "after": ["phantom"]}
        ]}));
        let listed: Vec<&str> = err.split("; ").collect();
        assert_eq!(listed.len(), 4, "{err}");
        assert!(
            listed[0].starts_with("tasks[0].handler: unknown handler \"nope\""),
            "{err}"
        );
        assert_eq!(
            listed[1..],
            [
                "tasks[1].after[0]: unknown task \"ghost\"",
                "tasks[2].name: duplicate task name \"a\"",
                "and 1 more tasks"
            ]
        );
        // A task's first graph error stands for all of its own.
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "noop", "after": ["x", "y"]},
            {"name": "b", "handler": "sleep", "params": {"ms": -1}}
        ]}));
        let listed: Vec<&str> = err.split("; ").collect();
        assert_eq!(listed.len(), 2, "{err}");
        assert_eq!(listed[0], "tasks[0].after[0]: unknown task \"x\"");
        assert!(listed[1].starts_with("tasks[1] (b).params.ms: "), "{err}");
        // A cycle is the job's: named first, with the tasks' own errors.
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "noop", "after": ["b"]},
            {"name": "b", "handler": "sleep", "params": {"ms": -1}, "after": ["a"]}
        ]}));
        let listed: Vec<&str> = err.split("; ").collect();
        assert_eq!(listed.len(), 2, "{err}");
        assert!(listed[0].starts_with("tasks: dependency cycle "), "{err}");
        assert!(listed[1].starts_with("tasks[1] (b).params.ms: "), "{err}");
    }

    #[test]
    fn a_job_naming_more_queues_than_the_limit_is_rejected_at_the_first_past_it() {
        let tasks: Vec<Value> = (0..17)
            .map(|i| json!({"name": format!("t{i}"), "handler": "noop", "queue": format!("q{i}")}))
            .collect();
        let err = rejected(json!({"requestor": "me", "tasks": tasks}));
        assert_eq!(
            err,
            "tasks[16].queue: the job names more than 16 distinct queues; the limit \
             (limits.max_queues_per_job) is 16"
        );
        // Many tasks on a few queues are fine.
        let tasks: Vec<Value> = (0..40)
            .map(|i| json!({"name": format!("t{i}"), "handler": "noop", "queue": format!("q{}", i % 16)}))
            .collect();
        let body = json!({"requestor": "me", "tasks": tasks});
        assert!(matches!(
            intake().accept(body.to_string().as_bytes()),
            Intake::Valid(_)
        ));
    }

    #[test]
    fn a_cycle_is_rejected() {
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "noop", "after": ["b"]},
            {"name": "b", "handler": "noop", "after": ["a"]}
        ]}));
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn a_name_must_start_with_a_letter_or_a_digit_as_the_schema_says() {
        assert!(check_job_id("-x", 128).is_err_and(|e| e.contains("must start")));
        assert!(check_job_id(".x", 128).is_err());
        assert!(check_job_id("x-.", 128).is_ok());
        // An id the schema refuses is not one to record the rejection under.
        match intake().accept(br#"{"id": "-x", "requestor": "r", "tasks": []}"#) {
            Intake::Rejected(r) => assert_ne!(r.id, "-x"),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_rejection_keeps_a_usable_id() {
        match intake().accept(br#"{"id": "mine", "requestor": "r", "tasks": 3}"#) {
            Intake::Rejected(r) => {
                assert_eq!(r.id, "mine");
                assert_eq!(r.requestor, "r");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_oversized_messages_are_dead_letters() {
        assert!(matches!(
            intake().accept(b"{not json"),
            Intake::Dead {
                kind: DeadLetterReason::NotJson,
                ..
            }
        ));
        let big = vec![b' '; 2 * 1024 * 1024];
        assert!(matches!(
            intake().accept(&big),
            Intake::Dead {
                kind: DeadLetterReason::TooLarge,
                ..
            }
        ));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            intake().accept(deep.as_bytes()),
            Intake::Dead {
                kind: DeadLetterReason::NotJson,
                ..
            }
        ));
    }

    /// A body of more tasks than the limit is refused for that, before the
    /// schema (which would list an error per invalid task, collecting
    /// them all first: hundreds of megabytes for a megabyte of `{}`).
    #[test]
    fn too_many_tasks_are_refused_by_count_before_each_is_checked() {
        let intake = JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry())
            .unwrap_or_else(|e| panic!("{e}"));
        let tasks = vec![json!({}); 300_000];
        match intake.accept(
            json!({"requestor": "me", "tasks": tasks})
                .to_string()
                .as_bytes(),
        ) {
            Intake::Rejected(r) => assert_eq!(
                r.error,
                "tasks: 300000 tasks; the limit (limits.max_tasks) is 20000"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_task_limit_is_named() {
        let mut config = Config::default();
        config.limits.max_tasks = 2;
        let intake = JobIntake::new(&config, conveyor_builtin_handlers::registry())
            .unwrap_or_else(|e| panic!("{e}"));
        let tasks: Vec<Value> = (0..3)
            .map(|i| json!({"name": format!("t{i}"), "handler": "noop"}))
            .collect();
        match intake.accept(
            json!({"requestor": "me", "tasks": tasks})
                .to_string()
                .as_bytes(),
        ) {
            Intake::Rejected(r) => assert!(r.error.contains("limits.max_tasks"), "{}", r.error),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_huge_value_is_named_by_field_and_limit_not_echoed() {
        let huge = "x".repeat(100 * 1024);
        let err = rejected(json!({"requestor": "me", "labels": {"note": huge},
            "tasks": [{"name": "a", "handler": "noop"}]}));
        assert!(err.starts_with("labels.note: "), "{err}");
        assert!(err.contains("longer than 1024 characters"), "{err}");
        assert!(err.len() < 100, "{} bytes: {err}", err.len());
        assert!(!err.contains("xxxx"), "{err}");

        let err = rejected(json!({"requestor": huge, "tasks": [{"name": "a", "handler": "noop"}]}));
        assert!(
            err.starts_with("requestor: ") && err.contains("longer than 128 characters"),
            "{err}"
        );
        assert!(err.len() < 100, "{} bytes: {err}", err.len());
    }

    #[test]
    fn a_long_error_is_cut_to_the_limit_at_a_character_boundary() {
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "a", "handler": "long-error"}
        ]}));
        assert!(err.starts_with("tasks[0] (a).params.x: éé"), "{err}");
        assert!(err.len() <= MAX_ERROR_BYTES, "{} bytes", err.len());
        assert!(err.len() > MAX_ERROR_BYTES - 8, "{} bytes", err.len());
        assert!(err.ends_with("é…"), "{err}");
    }

    #[test]
    fn a_handler_whose_validate_panics_rejects_only_that_job() {
        let intake = intake();
        let body = json!({"requestor": "me", "tasks": [
            {"name": "ok", "handler": "noop"},
            {"name": "bad", "handler": "panics-in-validate"}
        ]});
        match intake.accept(body.to_string().as_bytes()) {
            Intake::Rejected(r) => assert_eq!(
                r.error,
                "tasks[1] (bad): handler \"panics-in-validate\" panicked in validate: validate exploded"
            ),
            other => panic!("expected a rejection, got {other:?}"),
        }
        let err = rejected(json!({"requestor": "me", "tasks": [
            {"name": "d", "handler": "panics-in-retry-defaults"}
        ]}));
        assert_eq!(
            err,
            "tasks[0] (d): handler \"panics-in-retry-defaults\" panicked in retry_defaults: no defaults for 42"
        );
        // The same intake goes on accepting jobs.
        let ok = json!({"requestor": "me", "tasks": [{"name": "a", "handler": "noop"}]});
        assert!(matches!(
            intake.accept(ok.to_string().as_bytes()),
            Intake::Valid(_)
        ));
    }

    #[test]
    fn each_retry_field_comes_from_the_task_then_the_handler_then_the_config() {
        let config = Config {
            retry: RetryConfig {
                max_attempts: 4,
                base_ms: 1_000,
                cap_ms: 60_000,
                timeout_s: 300.0,
            },
            ..Config::default()
        };
        let intake = JobIntake::new(&config, test_registry()).unwrap_or_else(|e| panic!("{e}"));
        let body = json!({"requestor": "me", "tasks": [
            // Nothing set: the handler's defaults.
            {"name": "handler", "handler": "tuned"},
            // Set by the task: its values win, field by field.
            {"name": "task", "handler": "tuned", "timeout_s": 0.5,
             "retry": {"max_attempts": 2, "base_ms": 100}},
            // A handler without defaults: the config.
            {"name": "config", "handler": "noop"},
            // A handler with only a cap: task, handler and config mixed.
            {"name": "mixed", "handler": "cap-only", "retry": {"base_ms": 1}}
        ]});
        let job = match intake.accept(body.to_string().as_bytes()) {
            Intake::Valid(job) => job,
            other => panic!("expected valid, got {other:?}"),
        };
        let policy = |t: &PlannedTask| {
            (
                t.max_attempts,
                t.backoff_base_ms,
                t.backoff_cap_ms,
                t.timeout_ms,
            )
        };
        let policies: Vec<_> = job.tasks.iter().map(policy).collect();
        assert_eq!(
            policies,
            vec![
                (7, 10, 20, 2_000),
                (2, 100, 20, 500),
                (4, 1_000, 60_000, 300_000),
                (4, 1, 5_000, 300_000),
            ]
        );
    }

    /// Until the thirty-second session a handler's defaults went through
    /// unbounded: a million attempts, a time-out of `Duration::MAX`.
    #[test]
    fn a_handlers_retry_defaults_are_held_to_the_bounds_a_job_has() {
        let greedy = RetryDefaults {
            max_attempts: Some(1_000_000),
            backoff_base: Some(Duration::MAX),
            backoff_cap: Some(Duration::from_secs(365 * 86_400)),
            timeout: Some(Duration::MAX),
        };
        let resolved = resolve_retry(
            RetryPolicy::default(),
            None,
            &greedy,
            &Config::default().retry,
        );
        assert_eq!(
            resolved,
            ResolvedRetry {
                max_attempts: MAX_ATTEMPTS,
                backoff_base_ms: MAX_BACKOFF_MS,
                backoff_cap_ms: MAX_BACKOFF_MS,
                timeout_ms: 604_800_000,
            }
        );
    }

    /// Whatever arrives, intake answers without panicking, and each answer
    /// keeps its promises: a dead letter or a rejection says why in at
    /// most [`MAX_ERROR_BYTES`], a rejection is recorded under an id a job
    /// can have, and a planned job is a sound DAG of known handlers.
    mod properties {
        use std::collections::BTreeMap;

        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::{intake, test_registry};
        use crate::config::Config;
        use crate::intake::{Intake, MAX_ERROR_BYTES, PlannedJob, check_job_id};
        use crate::model::DeadLetterReason;

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..6).prop_map(Value::Array),
                    btree_map(".{0,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Something that is not a usable name: empty or odd characters,
        /// too long, or not a string at all.
        fn bad_name() -> impl Strategy<Value = Value> {
            prop_oneof![
                ".{0,6}".prop_map(Value::from),
                Just(Value::from("n".repeat(200))),
                any_json(),
            ]
        }

        /// A task waits for an earlier one (always a sound DAG) or, now
        /// and then, for any index: a later task (perhaps a cycle), itself,
        /// or one that does not exist.
        fn after() -> impl Strategy<Value = Vec<(prop::sample::Index, Option<usize>)>> {
            let any_index = proptest::option::weighted(0.05, 0usize..7);
            vec((any::<prop::sample::Index>(), any_index), 0..3)
        }

        /// One task: its name if not `t<index>`, the object without its
        /// name and `after`, and what it waits for (see [`after`]).
        type TaskParts = (
            Option<Value>,
            Value,
            Vec<(prop::sample::Index, Option<usize>)>,
        );

        fn task() -> impl Strategy<Value = TaskParts> {
            // Mostly handlers that take these params; now and then one
            // that refuses them, panics, is unknown, or is not a string.
            let handler = prop_oneof![
                80 => Just(json!("noop")),
                10 => Just(json!("tuned")),
                1 => Just(json!("sleep")),
                1 => Just(json!("fail")),
                1 => Just(json!("shell")),
                1 => Just(json!("long-error")),
                1 => Just(json!("panics-in-validate")),
                1 => Just(json!("nope")),
                1 => any_json(),
            ];
            let params = prop_oneof![
                30 => Just(json!({"x": 1})),
                1 => (0i64..10_000).prop_map(|ms| json!({"ms": ms})),
                1 => any_json(),
            ];
            let retry = prop_oneof![
                7 => (1u32..10, 0u64..1000, 0u64..100_000).prop_map(|(a, b, c)| {
                    json!({"max_attempts": a, "base_ms": b, "cap_ms": c})
                }),
                1 => any_json(),
            ];
            let queue = prop_oneof![3 => "[a-z]{1,5}".prop_map(Value::from), 1 => bad_name()];
            (
                proptest::option::weighted(0.01, bad_name()),
                handler,
                proptest::option::weighted(0.8, params),
                proptest::option::weighted(0.1, queue),
                proptest::option::weighted(0.2, retry),
                after(),
            )
                .prop_map(|(name, handler, params, queue, retry, after)| {
                    let mut t = json!({"handler": handler});
                    for (key, value) in [("params", params), ("queue", queue), ("retry", retry)] {
                        if let Some(v) = value {
                            t[key] = v;
                        }
                    }
                    (name, t, after)
                })
        }

        /// The task list: `t0`, `t1`, ... each waiting as [`after`] says.
        fn tasks() -> impl Strategy<Value = Value> {
            let count = prop_oneof![1 => Just(0usize), 20 => 1usize..6];
            count.prop_flat_map(|n| vec(task(), n)).prop_map(|tasks| {
                let tasks = tasks
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, mut t, after))| {
                        t["name"] = name.unwrap_or_else(|| json!(format!("t{i}")));
                        let after: Vec<String> = after
                            .into_iter()
                            .filter_map(|(earlier, any)| any.or((i > 0).then(|| earlier.index(i))))
                            .map(|j| format!("t{j}"))
                            .collect();
                        if !after.is_empty() {
                            t["after"] = json!(after);
                        }
                        t
                    });
                Value::Array(tasks.collect())
            })
        }

        /// Mostly a valid job, with each field now and then wrong or
        /// missing (about half the cases are planned).
        fn job() -> impl Strategy<Value = Value> {
            let id = prop_oneof![10 => "[a-z0-9-]{1,12}".prop_map(Value::from), 1 => bad_name()];
            let labels = prop_oneof![
                10 => btree_map("[a-z]{1,4}", ".{0,6}", 0..4)
                    .prop_map(|m: BTreeMap<String, String>| json!(m)),
                1 => any_json(),
            ];
            (
                proptest::option::weighted(0.5, id),
                prop_oneof![20 => "[a-z ]{1,10}".prop_map(Value::from), 1 => any_json()],
                proptest::option::weighted(0.5, labels),
                prop_oneof![30 => tasks(), 1 => any_json()],
                proptest::option::weighted(0.03, any_json()),
            )
                .prop_map(|(id, requestor, labels, tasks, extra)| {
                    let mut j = json!({"requestor": requestor, "tasks": tasks});
                    for (key, value) in [("id", id), ("labels", labels), ("extra", extra)] {
                        if let Some(v) = value {
                            j[key] = v;
                        }
                    }
                    j
                })
        }

        /// A planned job: unique names, known handlers, object params,
        /// dependencies that point at other tasks and are mirrored by
        /// dependents, and an order in which every task's deps come first.
        fn check_planned(job: &PlannedJob) -> Result<(), TestCaseError> {
            let n = job.tasks.len();
            prop_assert!(n > 0);
            prop_assert!(check_job_id(&job.id, Config::default().limits.max_name_len).is_ok());
            let registry = test_registry();
            let mut names = std::collections::HashSet::new();
            for (i, t) in job.tasks.iter().enumerate() {
                prop_assert!(names.insert(t.name.as_str()), "duplicate name {}", t.name);
                prop_assert!(registry.get(&t.handler).is_some(), "handler {}", t.handler);
                let params: Value = serde_json::from_str(&t.params_json)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(params.is_object());
                prop_assert!(t.max_attempts >= 1 && t.timeout_ms >= 1);
                for &d in &t.deps {
                    prop_assert!((d as usize) < n && d as usize != i);
                    prop_assert!(job.tasks[d as usize].dependents.contains(&(i as u32)));
                }
                for &d in &t.dependents {
                    prop_assert!(job.tasks[d as usize].deps.contains(&(i as u32)));
                }
            }
            // Kahn: every task is reached from the roots.
            let mut waiting: Vec<usize> = job.tasks.iter().map(|t| t.deps.len()).collect();
            let mut ready: Vec<u32> = job.roots().collect();
            let mut done = 0;
            while let Some(i) = ready.pop() {
                done += 1;
                for &d in &job.tasks[i as usize].dependents {
                    waiting[d as usize] -= 1;
                    if waiting[d as usize] == 0 {
                        ready.push(d);
                    }
                }
            }
            prop_assert_eq!(done, n, "a cycle was planned");
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn every_job_shaped_message_gets_a_sound_plan_or_a_recorded_reason(job in job()) {
                let body = job.to_string();
                match intake().accept(body.as_bytes()) {
                    Intake::Dead { kind, reason } => {
                        prop_assert!(false, "valid JSON dead-lettered as {kind:?}: {reason}");
                    }
                    Intake::Rejected(r) => {
                        prop_assert!(!r.error.is_empty() && r.error.len() <= MAX_ERROR_BYTES);
                        prop_assert!(r.error.contains(": "), "no field named: {}", r.error);
                        let max = Config::default().limits.max_name_len;
                        prop_assert!(check_job_id(&r.id, max).is_ok(), "id {:?}", r.id);
                        prop_assert!(r.requestor.len() <= max);
                        if let Some(id) = job.get("id").and_then(Value::as_str)
                            && check_job_id(id, max).is_ok()
                        {
                            prop_assert_eq!(&r.id, id);
                        }
                    }
                    Intake::Valid(planned) => check_planned(&planned)?,
                }
            }

            #[test]
            fn bytes_that_are_not_json_are_dead_letters_with_a_reason(
                job in job(),
                cut in any::<prop::sample::Index>(),
                noise in vec(any::<u8>(), 0..32),
            ) {
                let text = job.to_string();
                let mut body = text.as_bytes()[..cut.index(text.len())].to_vec();
                body.extend(noise);
                let outcome = intake().accept(&body);
                if serde_json::from_slice::<Value>(&body).is_ok() {
                    let dead = matches!(outcome, Intake::Dead { .. });
                    prop_assert!(!dead, "JSON dead-lettered");
                } else {
                    match outcome {
                        Intake::Dead { kind: DeadLetterReason::NotJson, reason } => {
                            prop_assert!(reason.starts_with("message is not JSON"));
                            prop_assert!(reason.len() <= MAX_ERROR_BYTES);
                        }
                        other => prop_assert!(false, "not JSON, yet {other:?}"),
                    }
                }
            }
        }
    }
}
