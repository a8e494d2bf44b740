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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number"
    )]
    pub max_attempts: Option<u32>,
    /// Backoff base in milliseconds.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number"
    )]
    pub base_ms: Option<u64>,
    /// Backoff cap in milliseconds.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number"
    )]
    pub cap_ms: Option<u64>,
}

/// A whole number written with or without a fraction: `3` or `3.0` (as
/// Python's `json.dumps` writes a float), which the schema's `integer`
/// accepts too; `3.5` and negatives are refused.
fn whole_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    whole
        .and_then(|n| T::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{number} is not a whole number in range")))
}

/// `schemas/job.schema.json` (the file intake validates with) against
/// these types: the same fields at every level, unknown fields refused by
/// both, and the example job valid.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{Value, json};

    use super::*;
    use crate::intake::JOB_SCHEMA;

    fn schema() -> (Value, jsonschema::Validator) {
        let value: Value = serde_json::from_str(JOB_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&value).unwrap();
        (value, validator)
    }

    fn keys(object: &Value) -> BTreeSet<String> {
        object.as_object().unwrap().keys().cloned().collect()
    }

    fn full() -> JobSpec {
        JobSpec {
            id: Some("job-1".into()),
            requestor: "me".into(),
            labels: BTreeMap::from([("team".into(), "a".into())]),
            tasks: vec![
                TaskSpec {
                    name: "a".into(),
                    handler: "noop".into(),
                    params: json!({"n": 1}),
                    after: Vec::new(),
                    queue: None,
                    retry: None,
                    timeout_s: None,
                },
                TaskSpec {
                    name: "b".into(),
                    handler: "sleep".into(),
                    params: json!({"ms": 5}),
                    after: vec!["a".into()],
                    queue: Some("slow".into()),
                    retry: Some(RetryPolicy {
                        max_attempts: Some(3),
                        base_ms: Some(100),
                        cap_ms: Some(1_000),
                    }),
                    timeout_s: Some(2.5),
                },
            ],
        }
    }

    #[test]
    fn the_schema_has_the_fields_of_the_types_at_every_level() {
        let (schema, validator) = schema();
        let spec = serde_json::to_value(full()).unwrap();
        assert!(validator.is_valid(&spec), "{spec}");
        assert_eq!(
            serde_json::from_value::<JobSpec>(spec.clone()).unwrap(),
            full()
        );
        assert_eq!(keys(&schema["properties"]), keys(&spec));
        let task = &schema["$defs"]["task"];
        assert_eq!(keys(&task["properties"]), keys(&spec["tasks"][1]));
        assert_eq!(
            keys(&task["properties"]["retry"]["properties"]),
            keys(&spec["tasks"][1]["retry"])
        );
        // Required: what has no serde default.
        let required = |v: &Value| -> BTreeSet<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            required(&schema["required"]),
            BTreeSet::from(["requestor".to_owned(), "tasks".to_owned()])
        );
        assert_eq!(
            required(&task["required"]),
            BTreeSet::from(["name".to_owned(), "handler".to_owned()])
        );
        let minimal = json!({"requestor": "me", "tasks": [{"name": "a", "handler": "noop"}]});
        assert!(validator.is_valid(&minimal));
        assert!(serde_json::from_value::<JobSpec>(minimal).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level_by_both() {
        let (_, validator) = schema();
        let spec = serde_json::to_value(full()).unwrap();
        let mut job = spec.clone();
        job["extra"] = json!(1);
        let mut task = spec.clone();
        task["tasks"][0]["extra"] = json!(1);
        let mut retry = spec.clone();
        retry["tasks"][1]["retry"]["extra"] = json!(1);
        for v in [job, task, retry] {
            assert!(!validator.is_valid(&v), "{v}");
            assert!(serde_json::from_value::<JobSpec>(v).is_err());
        }
    }

    #[test]
    fn the_example_job_is_valid() {
        let (_, validator) = schema();
        let example: Value =
            serde_json::from_str(include_str!("../../examples/diamond.json")).unwrap();
        assert!(validator.is_valid(&example));
        let spec: JobSpec = serde_json::from_value(example).unwrap();
        assert_eq!(spec.tasks.len(), 4);
    }
}
