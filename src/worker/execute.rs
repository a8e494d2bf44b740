//! Running one attempt of a handler: params parsed once, a run time-out,
//! a panic caught and turned into a failed attempt, and the handler's
//! answer mapped to what the store records.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext};

use crate::backoff;
use crate::store::{AttemptResult, Claimed};

/// How one attempt ended, before retry policy is applied.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    /// The handler returned a result (JSON text).
    Succeeded(String),
    /// Worth another attempt: a transient error, a panic, a time-out.
    Transient(String),
    /// Not worth another attempt.
    Permanent(String),
}

impl AttemptEnd {
    /// What the store should record, given the claim's retry policy.
    pub fn into_result(self, claimed: &Claimed) -> AttemptResult {
        match self {
            AttemptEnd::Succeeded(json) => AttemptResult::Succeeded(json),
            AttemptEnd::Permanent(error) => AttemptResult::Failed(error),
            AttemptEnd::Transient(error) => {
                let (base, cap) = claimed.backoff;
                // Jitter seeded by the claim itself: spread like random
                // jitter, yet the same claim always waits the same (so a
                // simulation replays exactly).
                let mut rng = backoff::claim_rng(&claimed.claim);
                let delay = backoff::retry_delay(claimed.claim.attempt, base, cap, &mut rng);
                AttemptResult::Retry { error, delay }
            }
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Extra time a handler gets past its time-out to report its own
/// "timed out" error before the worker stops it.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

/// Run `handler` on a claimed task. Never panics.
pub async fn run_attempt(handler: Arc<dyn Handler>, claimed: &Claimed) -> AttemptEnd {
    let params = match serde_json::from_str(&claimed.params_json) {
        Ok(p) => p,
        Err(e) => return AttemptEnd::Permanent(format!("stored params are not JSON: {e}")),
    };
    let ctx = TaskContext {
        job_id: claimed.claim.job.clone(),
        task: claimed.task.clone(),
        attempt: claimed.claim.attempt,
        max_attempts: claimed.max_attempts,
        fence: claimed.claim.fence,
        deps: claimed.deps.clone(),
        timeout: claimed.timeout,
    };
    let timeout = claimed.timeout;
    let started = tokio::time::Instant::now();
    // Its own task, so a panic unwinds there and comes back as a JoinError;
    // aborted if this future is dropped (shutdown hands the task back).
    let mut run = AbortOnDrop(tokio::spawn(async move { handler.run(ctx, params).await }));
    let answer = tokio::time::timeout(timeout + TIMEOUT_MARGIN, &mut run.0).await;
    // A handler that blocks its thread (against the contract: blocking work
    // belongs in `spawn_blocking`) also blocks the timer that would have
    // stopped it; when it returns at last, its answer is late all the same.
    let ran = started.elapsed();
    if answer.is_ok() && ran > timeout + TIMEOUT_MARGIN {
        return AttemptEnd::Transient(format!(
            "timed out after {:.1}s (timeout_s): the handler blocked its thread and \
             answered only after {:.1}s; its answer was discarded",
            timeout.as_secs_f64(),
            ran.as_secs_f64()
        ));
    }
    match answer {
        Ok(Ok(Ok(Outcome::Done(value)))) => AttemptEnd::Succeeded(value.to_string()),
        Ok(Ok(Ok(Outcome::Started { token, .. }))) => AttemptEnd::Permanent(format!(
            "handler started outside work (token {token}), but this version of Conveyor \
             cannot wait for notifications yet"
        )),
        Ok(Ok(Err(HandlerError::Transient(e)))) => AttemptEnd::Transient(e),
        Ok(Ok(Err(e @ (HandlerError::Permanent(_) | HandlerError::Unsupported(_))))) => {
            AttemptEnd::Permanent(e.to_string())
        }
        Ok(Err(join)) if join.is_panic() => AttemptEnd::Transient(format!(
            "handler panicked: {}",
            panic_message(join.into_panic().as_ref())
        )),
        Ok(Err(join)) => AttemptEnd::Transient(format!("handler task was cancelled: {join}")),
        Err(_) => {
            run.0.abort();
            AttemptEnd::Transient(format!(
                "timed out after {:.1}s (timeout_s)",
                timeout.as_secs_f64()
            ))
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::store::ClaimRef;
    use async_trait::async_trait;
    use serde_json::Value;

    /// Sleeps on its thread instead of awaiting: what a handler must not do.
    struct BlocksItsThread(Duration);

    #[async_trait]
    impl Handler for BlocksItsThread {
        fn name(&self) -> &str {
            "blocks"
        }
        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            std::thread::sleep(self.0);
            Ok(Outcome::Done(Value::Null))
        }
    }

    fn claimed(timeout: Duration) -> Claimed {
        Claimed {
            claim: ClaimRef {
                job: "j".into(),
                idx: 0,
                attempt: 1,
                fence: 1,
            },
            task: "t".into(),
            handler: "blocks".into(),
            params_json: "{}".into(),
            max_attempts: 3,
            timeout,
            deps: Default::default(),
            backoff: (0, 0),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_after_the_time_out_is_a_time_out_even_when_the_timer_could_not_fire() {
        let handler = Arc::new(BlocksItsThread(TIMEOUT_MARGIN + Duration::from_millis(300)));
        let end = run_attempt(handler, &claimed(Duration::from_millis(50))).await;
        match end {
            AttemptEnd::Transient(e) => assert!(e.starts_with("timed out after 0.1s"), "{e}"),
            other => panic!("a late answer was taken: {other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_in_time_is_taken() {
        let handler = Arc::new(BlocksItsThread(Duration::from_millis(10)));
        let end = run_attempt(handler, &claimed(Duration::from_secs(5))).await;
        assert_eq!(end, AttemptEnd::Succeeded("null".into()));
    }
}
