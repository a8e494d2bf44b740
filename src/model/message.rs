//! Messages on the wire besides the job itself.

use serde::{Deserialize, Serialize};

use crate::text::capped;

/// A task ready to run, as published to `<prefix>.tasks.<queue>`
/// (`schemas/task.schema.json`). It names the execution, nothing more: the
/// worker's claim loads params and dependency results from the store, so a
/// message can be duplicated or redelivered and the claim decides.
///
/// Decoding ignores unknown fields, so the message can grow without
/// breaking older workers; the schema allows them for the same reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// The job.
    pub job: String,
    /// The task's name in the job.
    pub task: String,
    /// The task's position in the job (its key in the store).
    pub idx: u32,
    /// Which attempt this message starts (1-based). Conveyor never
    /// publishes 0, but any value decodes: the claim succeeds only for the
    /// task's current attempt, so any other (0 included) is dropped as stale.
    pub attempt: u32,
    /// The queue it was published on, without the prefix.
    pub queue: String,
}

/// The dispatcher's answer to a submission that carried `reply_to`
/// (`schemas/submit-reply.schema.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitReply {
    /// The job's id: the submitted one, or a generated one (a job without
    /// an id, or rejected with an unusable one). `None` only for a
    /// dead-lettered submission (too large, not JSON): nothing was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Whether the job was accepted (or already existed as an accepted
    /// job; an id holding a rejected submission stays rejected).
    pub accepted: bool,
    /// Why not, when not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// True when the id existed already and nothing changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
}

/// Why a message went to `<prefix>.dead` (the `x-conveyor-reason-kind` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Larger than the configured limit.
    TooLarge,
    /// Not JSON at all (or nested beyond the parser's limit).
    NotJson,
    /// A task message that does not decode.
    BadTaskMessage,
    /// A task whose job record vanished from the store.
    JobMissing,
    /// Redelivered too often without an outcome.
    Poison,
    /// A task, or a submission, whose job record the store cannot act on
    /// (a script error on it: corrupt, or written by another version); no
    /// retry cures it.
    UnusableRecord,
}

impl DeadLetterReason {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::TooLarge => "too_large",
            DeadLetterReason::NotJson => "not_json",
            DeadLetterReason::BadTaskMessage => "bad_task_message",
            DeadLetterReason::JobMissing => "job_missing",
            DeadLetterReason::Poison => "poison",
            DeadLetterReason::UnusableRecord => "unusable_record",
        }
    }
}

impl TaskMessage {
    /// The JSON bytes published to the task queue.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode a task message, naming what is wrong in at most
    /// [`MAX_DECODE_ERROR_BYTES`] (the error becomes a dead letter's header,
    /// and serde's messages quote the offending value, whatever its size).
    pub fn decode(body: &[u8]) -> Result<TaskMessage, String> {
        serde_json::from_slice(body)
            .map_err(|e| capped(format!("task message: {e}"), MAX_DECODE_ERROR_BYTES))
    }
}

/// The longest error [`TaskMessage::decode`] returns, in bytes (as long as
/// intake's errors may be).
pub const MAX_DECODE_ERROR_BYTES: usize = 1024;

/// Every schema in `schemas/` but the job's (`model/job.rs` has that one)
/// against the Rust types that write or read its messages: its properties
/// are the fields the type writes, the required ones those it always
/// writes, its enums the type's spellings, and for a message Conveyor
/// consumes, what the schema accepts is what decoding accepts.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::config::Config;
    use crate::intake::{Intake, JobIntake, Rejection};
    use crate::machine::{JobRecord, Promotion};
    use crate::model::{JobState, TaskState};
    use crate::store::{AttemptResult, ClaimOutcome, ClaimRef, JobStatus};

    const TASK: &str = include_str!("../../schemas/task.schema.json");
    const REPLY: &str = include_str!("../../schemas/submit-reply.schema.json");
    const DEAD: &str = include_str!("../../schemas/dead-letter.schema.json");
    const STATUS: &str = include_str!("../../schemas/status.schema.json");

    fn schema(text: &str) -> (Value, jsonschema::Validator) {
        let value: Value = serde_json::from_str(text).unwrap();
        let validator = jsonschema::validator_for(&value).unwrap();
        (value, validator)
    }

    fn assert_valid(validator: &jsonschema::Validator, instance: &Value) {
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{instance}: {errors:?}");
    }

    fn keys(object: &Value) -> BTreeSet<String> {
        object.as_object().unwrap().keys().cloned().collect()
    }

    fn strings(array: &Value) -> BTreeSet<String> {
        array
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    }

    fn message() -> TaskMessage {
        TaskMessage {
            job: "0198c2f4-6a1e-7b3c-9d2e-4f5a6b7c8d9e".into(),
            task: "resize".into(),
            idx: 3,
            attempt: 2,
            queue: "default".into(),
        }
    }

    #[test]
    fn the_task_schema_names_every_field_and_requires_them_all() {
        let (schema, validator) = schema(TASK);
        let encoded: Value = serde_json::from_slice(&message().encode()).unwrap();
        assert_valid(&validator, &encoded);
        assert_eq!(keys(&schema["properties"]), keys(&encoded));
        assert_eq!(strings(&schema["required"]), keys(&encoded));
    }

    #[test]
    fn the_task_schema_accepts_what_a_worker_decodes() {
        let (_, validator) = schema(TASK);
        let base = serde_json::to_value(message()).unwrap();
        let with = |field: &str, value: Value| {
            let mut m = base.clone();
            m[field] = value;
            m
        };
        let without = |field: &str| {
            let mut m = base.clone();
            m.as_object_mut().unwrap().remove(field);
            m
        };
        let decoded = [
            base.clone(),
            // Unknown fields are ignored: the message may grow.
            with("added_later", json!({"any": ["thing"]})),
            // Conveyor never publishes attempt 0; it decodes, and the claim
            // drops it as stale.
            with("attempt", json!(0)),
            with("attempt", json!(u32::MAX)),
            with("idx", json!(0)),
            with("idx", json!(u32::MAX)),
            with("job", json!("")),
            with("task", json!("x".repeat(300))),
        ];
        let refused = [
            without("job"),
            without("task"),
            without("idx"),
            without("attempt"),
            without("queue"),
            with("idx", json!(-1)),
            with("idx", json!(u64::from(u32::MAX) + 1)),
            with("attempt", json!(-1)),
            with("attempt", json!(u64::from(u32::MAX) + 1)),
            with("attempt", json!("1")),
            with("attempt", Value::Null),
            with("job", json!(7)),
            with("queue", Value::Null),
            json!([base.clone()]),
            json!("task"),
        ];
        for m in decoded {
            let body = serde_json::to_vec(&m).unwrap();
            assert!(TaskMessage::decode(&body).is_ok(), "decode {m}");
            assert_valid(&validator, &m);
        }
        for m in refused {
            let body = serde_json::to_vec(&m).unwrap();
            assert!(TaskMessage::decode(&body).is_err(), "decode {m}");
            assert!(!validator.is_valid(&m), "schema {m}");
        }
    }

    #[test]
    fn a_decode_error_is_cut_however_large_the_value_it_quotes() {
        let mut m = serde_json::to_value(message()).unwrap();
        m["idx"] = json!("é".repeat(100_000));
        let err = TaskMessage::decode(&serde_json::to_vec(&m).unwrap()).unwrap_err();
        assert!(
            err.starts_with("task message: invalid type: string"),
            "{err}"
        );
        assert!(err.len() <= MAX_DECODE_ERROR_BYTES, "{} bytes", err.len());
        assert!(err.ends_with('…'), "{err}");

        let err = TaskMessage::decode(br#"{"job": "j"}"#).unwrap_err();
        assert_eq!(
            err,
            "task message: missing field `task` at line 1 column 12"
        );
    }

    #[test]
    fn every_submit_reply_matches_the_schema() {
        let (schema, validator) = schema(REPLY);
        let replies = [
            // Accepted; existing; rejected; dead-lettered.
            SubmitReply {
                job_id: Some("j-1".into()),
                accepted: true,
                error: None,
                existing: false,
            },
            SubmitReply {
                job_id: Some("j-1".into()),
                accepted: true,
                error: None,
                existing: true,
            },
            SubmitReply {
                job_id: Some("j-2".into()),
                accepted: false,
                error: Some("tasks[0].handler: unknown handler".into()),
                existing: false,
            },
            SubmitReply {
                job_id: None,
                accepted: false,
                error: Some("message is not JSON".into()),
                existing: false,
            },
        ];
        let mut written = BTreeSet::new();
        for reply in &replies {
            let value = serde_json::to_value(reply).unwrap();
            assert_valid(&validator, &value);
            assert_eq!(
                serde_json::from_value::<SubmitReply>(value.clone()).unwrap(),
                *reply
            );
            written.extend(keys(&value));
        }
        assert_eq!(keys(&schema["properties"]), written);
        assert_eq!(
            strings(&schema["required"]),
            BTreeSet::from(["accepted".to_owned()])
        );
        // Readers ignore fields they do not know.
        let later = json!({"accepted": true, "job_id": "j", "added_later": 1});
        assert_valid(&validator, &later);
        assert!(serde_json::from_value::<SubmitReply>(later).is_ok());
    }

    #[test]
    fn the_dead_letter_kinds_are_the_reasons() {
        let (schema, _) = schema(DEAD);
        let kinds = strings(&schema["properties"]["x-conveyor-reason-kind"]["enum"]);
        let reasons = [
            DeadLetterReason::TooLarge,
            DeadLetterReason::NotJson,
            DeadLetterReason::BadTaskMessage,
            DeadLetterReason::JobMissing,
            DeadLetterReason::Poison,
            DeadLetterReason::UnusableRecord,
        ];
        for r in reasons {
            assert_eq!(serde_json::to_value(r).unwrap(), json!(r.as_str()));
        }
        let spelled: BTreeSet<String> = reasons.iter().map(|r| r.as_str().to_owned()).collect();
        assert_eq!(kinds, spelled);
    }

    /// Checks a status against the schema, field for field.
    fn check_status(validator: &jsonschema::Validator, schema: &Value, status: &JobStatus) {
        let value = serde_json::to_value(status).unwrap();
        assert_valid(validator, &value);
        assert_eq!(keys(&schema["properties"]), keys(&value));
        assert_eq!(strings(&schema["required"]), keys(&value));
        let task_schema = &schema["properties"]["tasks"]["additionalProperties"];
        for task in value["tasks"].as_object().unwrap().values() {
            assert_eq!(keys(&task_schema["properties"]), keys(task));
            assert_eq!(strings(&task_schema["required"]), keys(task));
        }
        let entry_schema = &schema["properties"]["history"]["items"];
        for entry in value["history"].as_array().unwrap() {
            assert_eq!(keys(&entry_schema["properties"]), keys(entry));
            assert_eq!(strings(&entry_schema["required"]), keys(entry));
        }
    }

    fn claim(record: &mut JobRecord, idx: u32, now: u64) -> ClaimRef {
        let attempt = record.tasks[idx as usize].attempt;
        match record.claim(idx, attempt, "w-1", 10_000, u64::MAX, now) {
            ClaimOutcome::Claimed(c) => c.claim,
            other => panic!("claim of {idx}: {other:?}"),
        }
    }

    /// How each value is spelt on the wire (its serde name).
    fn wire_names<T: serde::Serialize>(all: &[T]) -> BTreeSet<String> {
        all.iter()
            .map(|s| {
                serde_json::to_value(s)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    /// The status in every task state the machine reaches, and what
    /// `attempts` holds in each (as the README and the schema say).
    #[test]
    fn every_status_matches_the_schema() {
        let (schema, validator) = schema(STATUS);
        let job_states = wire_names(&JobState::ALL);
        assert_eq!(strings(&schema["properties"]["state"]["enum"]), job_states);
        let task_states = wire_names(&TaskState::ALL);
        assert_eq!(
            strings(
                &schema["properties"]["tasks"]["additionalProperties"]["properties"]["state"]["enum"]
            ),
            task_states
        );

        let intake =
            JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry()).unwrap();
        let body = json!({"id": "s-1", "requestor": "me", "labels": {"team": "a"}, "tasks": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "after": ["a"]},
            {"name": "c", "handler": "noop", "retry": {"max_attempts": 2}},
            {"name": "d", "handler": "noop", "after": ["c"]}
        ]});
        let Intake::Valid(job) = intake.accept(body.to_string().as_bytes()) else {
            panic!("not valid");
        };
        let attempts = |r: &JobRecord| -> Vec<(TaskState, u32)> {
            let status = r.status();
            ["a", "b", "c", "d"]
                .iter()
                .map(|n| (status.tasks[*n].state, status.tasks[*n].attempts))
                .collect()
        };
        use TaskState::{Failed, Ready, Retrying, Running, Succeeded, Waiting};
        let mut now = 1_000;
        let mut r = JobRecord::create(&job, now, 60_000, 1 << 20, "d-1");
        check_status(&validator, &schema, &r.status());
        // Ready and never claimed: 1. Waiting: 0.
        assert_eq!(
            attempts(&r),
            [(Ready, 1), (Waiting, 0), (Ready, 1), (Waiting, 0)]
        );

        let a = claim(&mut r, 0, now);
        let c = claim(&mut r, 2, now);
        check_status(&validator, &schema, &r.status());
        now += 10;
        let retry = AttemptResult::Retry {
            error: "flaky".into(),
            delay: Duration::from_millis(500),
        };
        r.complete(&c, &retry, "w-1", now);
        r.complete(
            &a,
            &AttemptResult::Succeeded("{\"n\":1}".into()),
            "w-1",
            now,
        );
        check_status(&validator, &schema, &r.status());
        // Retrying: the next attempt's number, already counted.
        assert_eq!(
            attempts(&r),
            [(Succeeded, 1), (Ready, 1), (Retrying, 2), (Waiting, 0)]
        );
        assert_eq!(r.status().tasks["c"].next_attempt_at_ms, Some(now + 500));

        now += 500;
        assert!(matches!(r.promote(2, 2, now, "d-1"), Promotion::Ready(_)));
        let c = claim(&mut r, 2, now);
        let b = claim(&mut r, 1, now);
        assert_eq!(
            attempts(&r),
            [(Succeeded, 1), (Running, 1), (Running, 2), (Waiting, 0)]
        );
        r.complete(&c, &AttemptResult::Failed("broken".into()), "w-1", now);
        r.complete(&b, &AttemptResult::Succeeded("null".into()), "w-1", now);
        check_status(&validator, &schema, &r.status());
        // Failed because its dependency failed, never ready: 0.
        assert_eq!(
            attempts(&r),
            [(Succeeded, 1), (Succeeded, 1), (Failed, 2), (Failed, 0)]
        );
        assert_eq!(r.status().state, JobState::Failed);

        let rejected = JobRecord::rejected(
            &Rejection {
                id: "s-2".into(),
                requestor: "me".into(),
                error: "tasks: required".into(),
            },
            now,
            60_000,
            "d-1",
        );
        check_status(&validator, &schema, &rejected.status());
    }
}
