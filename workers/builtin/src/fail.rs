//! `fail`: fails on purpose, in the way the params ask.
//!
//! It exists to test everything that happens when a handler does not
//! succeed, without needing a flaky service to provoke it:
//!
//! - `{"times": N}` fails with a transient error while `ctx.attempt <= N`,
//!   then succeeds with `{"attempts": ctx.attempt}` — so `times: 2` checks
//!   that the retry policy retries, backs off, and that attempt 3 is counted
//!   right; `times` at or above `max_attempts` checks that retries run out.
//! - `{"permanent": true, "message": "..."}` fails permanently on every
//!   attempt — checks that permanent errors are not retried and that the
//!   message reaches the job's status.
//! - `{"panic": true}` panics inside `run` — checks that a handler panic
//!   fails its attempt (retried, as a transient error, while attempts
//!   are left) and leaves the worker running.
//!
//! If several are given, `panic` wins over `permanent`, which wins over
//! `times`. Unknown keys are rejected so a typo (`"time": 3`) is not silently
//! a task that succeeds at once; so is a `message` without
//! `"permanent": true`, which no failure would carry (`{"times": 2,
//! "message": "x"}` fails with its own words, not `x`).

use async_trait::async_trait;
use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext, ValidationError, described};
use serde_json::{Value, json};

/// The most planned transient failures `times` accepts.
pub const MAX_TIMES: u32 = 1000;

/// The message of a permanent failure when `params.message` is absent.
pub const DEFAULT_MESSAGE: &str = "fail: permanent failure requested";

const KEYS: [&str; 4] = ["times", "permanent", "message", "panic"];

/// The `fail` handler. See the module documentation for its params.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fail;

#[derive(Debug, Default, PartialEq)]
struct FailParams {
    times: u32,
    permanent: bool,
    message: Option<String>,
    panic: bool,
}

fn parse(params: &Value) -> Result<FailParams, ValidationError> {
    let Some(obj) = params.as_object() else {
        return Err(ValidationError::new(
            "params",
            "must be an object with at least one of times, permanent, panic",
        ));
    };
    crate::reject_unknown_fields(obj, &KEYS)?;
    if !["times", "permanent", "panic"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return Err(ValidationError::new(
            "params",
            "needs at least one of times, permanent, panic",
        ));
    }
    let mut out = FailParams::default();
    if let Some(times) = obj.get("times") {
        out.times = times
            .as_u64()
            .filter(|t| *t <= u64::from(MAX_TIMES))
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| {
                ValidationError::new(
                    "params.times",
                    format!(
                        "must be an integer 0..={MAX_TIMES}, got {}",
                        described(times)
                    ),
                )
            })?;
    }
    for (key, slot) in [("permanent", &mut out.permanent), ("panic", &mut out.panic)] {
        if let Some(v) = obj.get(key) {
            *slot = v.as_bool().ok_or_else(|| {
                ValidationError::new(
                    format!("params.{key}"),
                    format!("must be a boolean, got {}", described(v)),
                )
            })?;
        }
    }
    if let Some(m) = obj.get("message") {
        let m = m.as_str().ok_or_else(|| {
            ValidationError::new(
                "params.message",
                format!("must be a string, got {}", described(m)),
            )
        })?;
        if !out.permanent {
            return Err(ValidationError::new(
                "params.message",
                "is a permanent failure's message: allowed only with \"permanent\": true",
            ));
        }
        out.message = Some(m.to_owned());
    }
    Ok(out)
}

#[async_trait]
impl Handler for Fail {
    fn name(&self) -> &str {
        "fail"
    }

    fn validate(&self, params: &Value) -> Result<(), ValidationError> {
        parse(params).map(|_| ())
    }

    async fn run(&self, ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        let p = parse(&params).map_err(|e| HandlerError::permanent(format!("fail: {e}")))?;
        if p.panic {
            panic!("fail: panic requested (attempt {})", ctx.attempt);
        }
        if p.permanent {
            return Err(HandlerError::Permanent(
                p.message.unwrap_or_else(|| DEFAULT_MESSAGE.to_owned()),
            ));
        }
        if ctx.attempt <= p.times {
            return Err(HandlerError::Transient(format!(
                "fail: attempt {} of {} planned failures",
                ctx.attempt, p.times
            )));
        }
        Ok(Outcome::Done(json!({ "attempts": ctx.attempt })))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::test_ctx;

    #[tokio::test]
    async fn transient_twice_then_succeeds_on_attempt_three() {
        let params = json!({"times": 2});
        for attempt in 1..=2 {
            let out = Fail.run(test_ctx(attempt), params.clone()).await;
            assert_eq!(
                out,
                Err(HandlerError::Transient(format!(
                    "fail: attempt {attempt} of 2 planned failures"
                )))
            );
        }
        let out = Fail.run(test_ctx(3), params).await;
        assert_eq!(out, Ok(Outcome::Done(json!({"attempts": 3}))));
    }

    #[tokio::test]
    async fn permanent_with_and_without_message() {
        let out = Fail.run(test_ctx(1), json!({"permanent": true})).await;
        assert_eq!(
            out,
            Err(HandlerError::Permanent(DEFAULT_MESSAGE.to_owned()))
        );
        let out = Fail
            .run(
                test_ctx(4),
                json!({"permanent": true, "message": "boom", "times": 1}),
            )
            .await;
        assert_eq!(out, Err(HandlerError::Permanent("boom".to_owned())));
    }

    /// Only a permanent failure carries `message`: given without
    /// `"permanent": true` it would be silently ignored.
    #[test]
    fn a_message_without_permanent_is_refused() {
        for params in [
            json!({"times": 2, "message": "x"}),
            json!({"permanent": false, "message": "x"}),
            json!({"panic": true, "message": "x"}),
        ] {
            let e = Fail.validate(&params).unwrap_err();
            assert_eq!(e.field, "params.message", "{params}");
            assert!(e.message.contains("\"permanent\": true"), "{e}");
        }
        assert_eq!(
            Fail.validate(&json!({"panic": true, "permanent": true, "message": "x"})),
            Ok(())
        );
    }

    #[tokio::test]
    async fn panic_panics() {
        let task = tokio::spawn(async { Fail.run(test_ctx(1), json!({"panic": true})).await });
        let joined = task.await;
        assert!(joined.is_err_and(|e| e.is_panic()));
    }

    #[test]
    fn validate_names_the_field() {
        assert_eq!(Fail.validate(&json!({"times": 0})), Ok(()));
        assert_eq!(
            Fail.validate(&json!({"times": 1000, "panic": false})),
            Ok(())
        );
        let field = |v: Value| Fail.validate(&v).err().map(|e| e.field);
        assert_eq!(field(json!({"time": 3})).as_deref(), Some("params.time"));
        assert_eq!(
            field(json!({"times": 1001})).as_deref(),
            Some("params.times")
        );
        assert_eq!(field(json!({"times": -1})).as_deref(), Some("params.times"));
        assert_eq!(
            field(json!({"times": "2"})).as_deref(),
            Some("params.times")
        );
        assert_eq!(
            field(json!({"permanent": 1})).as_deref(),
            Some("params.permanent")
        );
        assert_eq!(
            field(json!({"permanent": true, "message": 7})).as_deref(),
            Some("params.message")
        );
        assert_eq!(field(json!({})).as_deref(), Some("params"));
        assert_eq!(field(json!({"message": "x"})).as_deref(), Some("params"));
        assert_eq!(field(json!([])).as_deref(), Some("params"));
        let msg = Fail
            .validate(&json!({"times": 5000}))
            .err()
            .map(|e| e.message);
        assert!(msg.is_some_and(|m| m.contains("1000")));
    }
}
