//! `noop`: finishes at once with its params as the result.
//!
//! It exists to test the plumbing rather than any work: a job made of `noop`
//! tasks shows that submission, queueing, claiming, dependency ordering and
//! result storage work, and measures the system's own overhead per task
//! without a handler's cost mixed in. Because the result is the params, a
//! test can also check that arbitrary JSON survives the round trip intact.

use async_trait::async_trait;
use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext};
use serde_json::Value;

/// The `noop` handler: `Outcome::Done(params)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

#[async_trait]
impl Handler for Noop {
    fn name(&self) -> &str {
        "noop"
    }

    async fn run(&self, _ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        Ok(Outcome::Done(params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ctx;
    use serde_json::json;

    #[tokio::test]
    async fn echoes_params() {
        let params = json!({"a": [1, 2, {"b": null}], "s": "ü"});
        let out = Noop.run(test_ctx(1), params.clone()).await;
        assert_eq!(out, Ok(Outcome::Done(params)));
        assert_eq!(Noop.validate(&json!(null)), Ok(()));
    }
}
