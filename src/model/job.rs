//! A job as clients submit it (`schemas/job.schema.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A submitted job: a DAG of tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Chosen by the client for idempotent submission; generated if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Who asks for this job (a user, a service).
    pub requestor: String,
    /// Free-form labels for filtering and display.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The tasks; `after` edges make them a DAG.
    pub tasks: Vec<TaskSpec>,
}

/// One task of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique inside the job.
    pub name: String,
    /// The registered handler that runs it.
    pub handler: String,
    /// Handler-specific parameters (a JSON object).
    #[serde(default = "empty_object")]
    pub params: Value,
    /// Names of tasks that must succeed first; their results are handed to
    /// this task's handler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// The queue the task runs on (`<prefix>.tasks.<queue>`); default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Retry policy for this task; handler and global defaults fill the gaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Run time-out of one attempt, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// How a task is retried after transient errors: exponential backoff with
/// full jitter, `delay = random(0, min(cap, base * 2^(attempt-1)))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Most attempts including the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Backoff base in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ms: Option<u64>,
    /// Backoff cap in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_ms: Option<u64>,
}
