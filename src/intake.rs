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
//! Every error names the field (`tasks[2].params.ms`) and the limit.

use std::sync::Arc;

use conveyor_handler::Registry;
use serde_json::Value;

use crate::config::{Config, Limits, RetryConfig};
use crate::dag::Dag;
use crate::model::{DeadLetterReason, JobSpec};

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
#[derive(Debug, Clone, PartialEq)]
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

impl JobIntake {
    /// Intake under `config`'s limits, knowing the handlers in `registry`.
    pub fn new(config: &Config, registry: Registry) -> anyhow::Result<JobIntake> {
        let schema: Value = serde_json::from_str(JOB_SCHEMA)?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| anyhow::anyhow!("job schema does not compile: {e}"))?;
        Ok(JobIntake {
            schema: Arc::new(validator),
            registry,
            limits: config.limits.clone(),
            retry: config.retry.clone(),
            max_message_bytes: config.max_message_bytes,
        })
    }

    /// Classify and plan one submit message body.
    pub fn accept(&self, body: &[u8]) -> Intake {
        if body.len() > self.max_message_bytes {
            return Intake::Dead {
                kind: DeadLetterReason::TooLarge,
                reason: format!(
                    "message is {} bytes; the limit (max_message_bytes) is {}",
                    body.len(),
                    self.max_message_bytes
                ),
            };
        }
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return Intake::Dead {
                    kind: DeadLetterReason::NotJson,
                    reason: format!("message is not JSON: {e}"),
                };
            }
        };
        let id = usable_id(&value, self.limits.max_name_len);
        let requestor = value
            .get("requestor")
            .and_then(Value::as_str)
            .map(|r| truncate(r, self.limits.max_name_len))
            .unwrap_or_default();
        let reject = |error: String| {
            Intake::Rejected(Rejection {
                id: id.clone().unwrap_or_else(new_job_id),
                requestor: requestor.clone(),
                error,
            })
        };
        if let Some(error) = self.schema_error(&value) {
            return reject(error);
        }
        let spec: JobSpec = match serde_json::from_value(value) {
            Ok(spec) => spec,
            Err(e) => return reject(format!("job: {e}")),
        };
        match self.plan(spec) {
            Ok(job) => Intake::Valid(job),
            Err(error) => reject(error),
        }
    }

    fn schema_error(&self, value: &Value) -> Option<String> {
        let mut errors = self.schema.iter_errors(value).take(3).map(|e| {
            let path = pointer_to_field(&e.instance_path().to_string());
            format!("{path}: {e}")
        });
        let first = errors.next()?;
        let rest: Vec<String> = errors.collect();
        Some(if rest.is_empty() {
            first
        } else {
            format!("{first}; {}", rest.join("; "))
        })
    }

    /// Check limits, handlers, params and the DAG; resolve defaults.
    pub fn plan(&self, spec: JobSpec) -> Result<PlannedJob, String> {
        let limits = &self.limits;
        if spec.tasks.len() > limits.max_tasks {
            return Err(format!(
                "tasks: {} tasks; the limit (limits.max_tasks) is {}",
                spec.tasks.len(),
                limits.max_tasks
            ));
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
        let names: Vec<&str> = spec.tasks.iter().map(|t| t.name.as_str()).collect();
        let after: Vec<Vec<&str>> = spec
            .tasks
            .iter()
            .map(|t| t.after.iter().map(String::as_str).collect())
            .collect();
        let dag = Dag::build(&names, &after).map_err(|e| e.to_string())?;

        let mut tasks = Vec::with_capacity(spec.tasks.len());
        for (i, (task, (deps, dependents))) in spec
            .tasks
            .into_iter()
            .zip(dag.deps.into_iter().zip(dag.dependents))
            .enumerate()
        {
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
            handler
                .validate(&task.params)
                .map_err(|e| format!("tasks[{i}] ({}).{e}", task.name))?;
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
            let defaults = handler.retry_defaults();
            let policy = task.retry.unwrap_or_default();
            let timeout_ms = match task.timeout_s {
                Some(s) => (s * 1000.0).ceil() as u64,
                None => defaults
                    .timeout
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or((self.retry.timeout_s * 1000.0).ceil() as u64),
            };
            tasks.push(PlannedTask {
                name: task.name,
                handler: task.handler,
                queue,
                params_json,
                deps,
                dependents,
                max_attempts: policy
                    .max_attempts
                    .or(defaults.max_attempts)
                    .unwrap_or(self.retry.max_attempts)
                    .max(1),
                backoff_base_ms: policy.base_ms.unwrap_or(self.retry.base_ms),
                backoff_cap_ms: policy.cap_ms.unwrap_or(self.retry.cap_ms),
                timeout_ms: timeout_ms.max(1),
            });
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
}

/// A fresh job id: a UUIDv7, so ids sort by creation time.
pub fn new_job_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
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
    Ok(())
}

/// The message's id, if it is one we could store a rejection under.
fn usable_id(value: &Value, max: usize) -> Option<String> {
    let id = value.get("id")?.as_str()?;
    check_name("id", id, max).ok()?;
    Some(id.to_owned())
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// `/tasks/0/handler` -> `tasks[0].handler`; empty -> `job`.
fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').filter(|p| !p.is_empty()) {
        if part.chars().all(|c| c.is_ascii_digit()) {
            out.push('[');
            out.push_str(part);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    if out.is_empty() {
        "job".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn intake() -> JobIntake {
        JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn rejected(body: Value) -> String {
        match intake().accept(body.to_string().as_bytes()) {
            Intake::Rejected(r) => r.error,
            other => panic!("expected a rejection, got {other:?}"),
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
    fn schema_errors_name_the_field() {
        let err = rejected(json!({"requestor": "me", "tasks": [{"name": 5, "handler": "noop"}]}));
        assert!(err.starts_with("tasks[0].name"), "{err}");
        let err = rejected(json!({"tasks": []}));
        assert!(err.contains("requestor"), "{err}");
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
}
