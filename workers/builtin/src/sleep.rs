//! `sleep`: waits `params.ms` milliseconds, then returns `{"slept_ms": ms}`.
//!
//! It exists to make tasks that take a known amount of time without using
//! CPU: for testing run time-outs (a `sleep` longer than the task's time-out
//! must be stopped by the worker), cancellation, lease renewal on long
//! tasks, and concurrency limits under load. The duration is capped at one
//! day so a typo cannot park a worker slot for weeks.

use std::time::Duration;

use async_trait::async_trait;
use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext, ValidationError, described};
use serde_json::{Value, json};

/// The longest sleep accepted: one day, in milliseconds.
pub const MAX_MS: u64 = 86_400_000;

/// The `sleep` handler. Params: `{"ms": <integer 0..=86400000>}` and
/// nothing else (an unknown field is an error, as in `fail` and `shell`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

fn parse_ms(params: &Value) -> Result<u64, ValidationError> {
    let Some(obj) = params.as_object() else {
        return Err(ValidationError::new(
            "params",
            "must be an object like {\"ms\": 1000}",
        ));
    };
    crate::reject_unknown_fields(obj, &["ms"])?;
    let Some(ms) = obj.get("ms") else {
        return Err(ValidationError::new(
            "params.ms",
            format!("is required: an integer number of milliseconds, 0..={MAX_MS}"),
        ));
    };
    match ms.as_u64() {
        Some(ms) if ms <= MAX_MS => Ok(ms),
        _ => Err(ValidationError::new(
            "params.ms",
            format!(
                "must be an integer 0..={MAX_MS} (milliseconds), got {}",
                described(ms)
            ),
        )),
    }
}

#[async_trait]
impl Handler for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }

    fn validate(&self, params: &Value) -> Result<(), ValidationError> {
        parse_ms(params).map(|_| ())
    }

    async fn run(&self, _ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        let ms = parse_ms(&params).map_err(|e| HandlerError::permanent(format!("sleep: {e}")))?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Outcome::Done(json!({ "slept_ms": ms })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ctx;

    #[test]
    fn validate_accepts_range_and_rejects_the_rest() {
        assert_eq!(Sleep.validate(&json!({"ms": 0})), Ok(()));
        assert_eq!(Sleep.validate(&json!({"ms": MAX_MS})), Ok(()));
        for bad in [
            json!({"ms": -1}),
            json!({"ms": "10"}),
            json!({"ms": 1.5}),
            json!({"ms": MAX_MS + 1}),
            json!({}),
        ] {
            let err = Sleep.validate(&bad);
            assert!(
                matches!(&err, Err(e) if e.field == "params.ms" && e.message.contains("86400000")),
                "{bad}: {err:?}"
            );
        }
        assert!(matches!(Sleep.validate(&json!(5)), Err(e) if e.field == "params"));
        // A misspelt field is named, not ignored: `{"ms": 5, "msx": 60000}`
        // must not quietly sleep 5 ms.
        assert!(
            matches!(Sleep.validate(&json!({"ms": 5, "msx": 60000})), Err(e) if e.field == "params.msx" && e.message.contains("unknown field"))
        );
    }

    #[tokio::test]
    async fn sleeps_and_reports() {
        let start = std::time::Instant::now();
        let out = Sleep.run(test_ctx(1), json!({"ms": 50})).await;
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(out, Ok(Outcome::Done(json!({"slept_ms": 50}))));
    }

    #[tokio::test]
    async fn run_rejects_bad_params_permanently() {
        let out = Sleep.run(test_ctx(1), json!({"ms": -5})).await;
        assert!(matches!(out, Err(HandlerError::Permanent(m)) if m.contains("params.ms")));
    }
}
