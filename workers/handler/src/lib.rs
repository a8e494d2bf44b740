//! The handler contract: what a Conveyor task handler implements.
//!
//! A handler is Conveyor's equivalent of a LUCI DM distributor: the piece
//! that knows how to run one kind of task. The contract is deliberately
//! small — a handler must only name itself and `run`; everything else
//! (`validate`, `cancel`, `status`, `info_url`, `handle_notification`,
//! `handle_queue_task`) has a default that either accepts everything or
//! answers [`HandlerError::Unsupported`], so a five-line handler stays five
//! lines and later features can call the optional methods on every handler.
//!
//! Errors say whether trying again can help: [`HandlerError::Transient`] is
//! retried with backoff under the task's retry policy,
//! [`HandlerError::Permanent`] fails the task at once with its message.
//!
//! A user's own worker binary depends on this crate (to implement
//! [`Handler`]) and on the `conveyor` library (to run a worker with a
//! [`Registry`] that holds its handlers).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything a handler knows about the execution it is asked to run.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The job this task belongs to.
    pub job_id: String,
    /// The task's name inside its job.
    pub task: String,
    /// 1 for the first attempt, 2 for the first retry, and so on.
    pub attempt: u32,
    /// The most attempts this task gets before it fails for good.
    pub max_attempts: u32,
    /// The fencing number of this attempt's claim; unique per claim of a job.
    pub fence: u64,
    /// The results of the tasks this one depends on, by task name (as DM
    /// hands `prevResult` to the next execution).
    pub deps: BTreeMap<String, Value>,
    /// How long the handler may run before the worker stops it.
    pub timeout: Duration,
    /// The largest result the worker accepts, in bytes of compact JSON
    /// (`limits.max_result_bytes`); a larger one fails the task for good.
    /// A handler that gathers its result from elsewhere (a program's
    /// output) may stop reading well past it rather than hold it all.
    pub max_result_bytes: usize,
}

/// What a successful `run` produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task is done; this is its result.
    Done(Value),
    /// The handler started work elsewhere that will finish later, reported
    /// by a notification carrying `token` or found by polling `status`.
    /// (Accepted by the contract now; the worker fails such a task with a
    /// clear reason until notifications land, and asks the handler to
    /// [`Handler::cancel`] the work, which nothing would wait for.)
    Started {
        /// Identifies the outside execution to `status`, `cancel`, `info_url`.
        token: ExecutionToken,
        /// When to poll `status` if no notification arrived.
        poll_after: Option<Duration>,
    },
}

/// Identifies one execution of outside work started by a handler.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionToken(pub String);

impl fmt::Display for ExecutionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The state of outside work, as `status` or `handle_notification` see it.
#[derive(Debug, Clone, PartialEq)]
pub enum ExternalStatus {
    /// Still going.
    Running,
    /// Finished with this result.
    Succeeded(Value),
    /// Finished badly; the error says whether a retry can help.
    Failed(HandlerError),
}

/// Why a handler could not run a task, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Something that may go away: a network blip, a busy service. The task
    /// is retried with backoff while attempts remain.
    #[error("{0}")]
    Transient(String),
    /// Something no retry fixes: bad input, a missing file. The task fails.
    #[error("{0}")]
    Permanent(String),
    /// The handler does not implement the optional capability asked for.
    #[error("handler does not support {0}")]
    Unsupported(&'static str),
}

impl HandlerError {
    /// A transient error with this message.
    pub fn transient(msg: impl Into<String>) -> Self {
        HandlerError::Transient(msg.into())
    }

    /// A permanent error with this message.
    pub fn permanent(msg: impl Into<String>) -> Self {
        HandlerError::Permanent(msg.into())
    }

    /// Whether running the same task again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HandlerError::Transient(_) => true,
            HandlerError::Permanent(_) => false,
            HandlerError::Unsupported(_) => false,
        }
    }
}

/// A parameter a handler rejects, named so the submitter can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The path of the offending field inside `params`, e.g. `params.ms`.
    pub field: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `value` as a [`ValidationError`] may quote it after "got": numbers,
/// booleans and `null` as they are, a string, array or object by its kind
/// and size only. Its content may be large, or a secret (an environment
/// variable's value), and rejections are logged, stored and sent back.
pub fn described(value: &Value) -> String {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => value.to_string(),
        Value::String(s) => format!("a string of {} bytes", s.len()),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(o) => format!("an object of {} fields", o.len()),
    }
}

/// Retry defaults a handler may ask for. Each field is resolved on its own:
/// the task's own value if it sets one, else this default if the handler
/// sets one, else the global `retry` config. `None` (the default) defers to
/// the config, so `RetryDefaults::default()` asks for nothing.
///
/// Backoff is full jitter: attempt *n* that fails transiently is retried
/// after a random delay in `[0, min(backoff_cap, backoff_base × 2^(n-1))]`.
///
/// Values past the bounds a job's own `retry` and `timeout_s` have (100
/// attempts, a day of backoff, a week of run time) are held to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryDefaults {
    /// Most attempts, including the first.
    pub max_attempts: Option<u32>,
    /// Run time-out of one attempt.
    pub timeout: Option<Duration>,
    /// Backoff base: the longest delay after the first failed attempt
    /// (millisecond precision; a task's `retry.base_ms` overrides it).
    pub backoff_base: Option<Duration>,
    /// Backoff cap: the longest delay after any failed attempt (millisecond
    /// precision; a task's `retry.cap_ms` overrides it).
    pub backoff_cap: Option<Duration>,
}

/// One kind of task.
///
/// Only `name` and `run` are required. The optional capabilities have
/// defaults that accept everything (`validate`) or answer
/// [`HandlerError::Unsupported`].
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The name jobs use in `tasks[].handler`. A wire name: never derived
    /// from a Rust type name.
    fn name(&self) -> &str;

    /// Check a task's params before the job is accepted. The error names the
    /// field (as `params.<field>`) and the limit. Runs where the job is
    /// accepted (a dispatcher, or a worker taking submissions), so the
    /// dispatchers' binary must know the handler too.
    fn validate(&self, _params: &Value) -> Result<(), ValidationError> {
        Ok(())
    }

    /// Retry and time-out defaults for tasks of this handler. Read where
    /// the job is accepted and written into its record: a change reaches
    /// jobs accepted after it, by processes that run the new code.
    fn retry_defaults(&self) -> RetryDefaults {
        RetryDefaults::default()
    }

    /// Run one attempt of a task.
    async fn run(&self, ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError>;

    /// Stop outside work started by `run`. Called, in a task of its own and
    /// bounded by 10 s, when the worker will not wait for that work (an
    /// answer of `Outcome::Started` until notifications are delivered, or
    /// one the attempt never read). The default cannot cancel: the outside
    /// work goes on, and a task run again may start it a second time.
    async fn cancel(&self, _token: &ExecutionToken) -> Result<(), HandlerError> {
        Err(HandlerError::Unsupported("cancel"))
    }

    /// Ask for the state of outside work started by `run`.
    async fn status(&self, _token: &ExecutionToken) -> Result<ExternalStatus, HandlerError> {
        Err(HandlerError::Unsupported("status"))
    }

    /// A link where a human can watch the outside work.
    fn info_url(&self, _token: &ExecutionToken) -> Option<String> {
        None
    }

    /// Interpret a notification about outside work.
    async fn handle_notification(
        &self,
        _token: &ExecutionToken,
        _body: &[u8],
    ) -> Result<ExternalStatus, HandlerError> {
        Err(HandlerError::Unsupported("notifications"))
    }

    /// Run a handler-private queue task (DM's `HandleTaskQueueTask`).
    async fn handle_queue_task(&self, _payload: &[u8]) -> Result<(), HandlerError> {
        Err(HandlerError::Unsupported("queue tasks"))
    }
}

/// The handlers a process knows, by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("handlers", &self.names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a handler under its own name, replacing one of the same name.
    pub fn register(&mut self, handler: impl Handler) -> &mut Self {
        self.handlers
            .insert(handler.name().to_owned(), Arc::new(handler));
        self
    }

    /// Add a handler, builder style.
    pub fn with(mut self, handler: impl Handler) -> Self {
        self.register(handler);
        self
    }

    /// The handler called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(name)
    }

    /// Every handler name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;

    #[async_trait]
    impl Handler for Plain {
        fn name(&self) -> &str {
            "plain"
        }

        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            Ok(Outcome::Done(Value::Null))
        }
    }

    #[test]
    fn a_handler_that_sets_no_retry_defaults_asks_for_nothing() {
        assert_eq!(
            Plain.retry_defaults(),
            RetryDefaults {
                max_attempts: None,
                timeout: None,
                backoff_base: None,
                backoff_cap: None,
            }
        );
    }

    #[test]
    fn retry_defaults_without_backoff_fields_still_deserialize() {
        let old: Result<RetryDefaults, _> =
            serde_json::from_str(r#"{"max_attempts": 3, "timeout": {"secs": 2, "nanos": 0}}"#);
        assert_eq!(
            old.ok(),
            Some(RetryDefaults {
                max_attempts: Some(3),
                timeout: Some(Duration::from_secs(2)),
                ..RetryDefaults::default()
            })
        );
    }
}
