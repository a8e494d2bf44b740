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
    // Its own task, so a panic unwinds there and comes back as a JoinError;
    // aborted if this future is dropped (shutdown hands the task back).
    let mut run = AbortOnDrop(tokio::spawn(async move { handler.run(ctx, params).await }));
    match tokio::time::timeout(timeout + TIMEOUT_MARGIN, &mut run.0).await {
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
