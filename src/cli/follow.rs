//! Publishing a job file the way any client does, and following the job in
//! the store until it finishes: shared by `submit --wait` and `run` (in
//! process or against a deployment), which differ only in what they print
//! on the way and at the end.

use super::out::note;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use conveyor::broker::{Broker, Outgoing};
use conveyor::config::Config;
use conveyor::names::Names;
use conveyor::store::{JobStatus, Store, StoreError};
use tokio::time::Instant;

use super::stalls::{STARTING_GRACE, Stalls};

/// A job followed to its end that did not end within the time given: the
/// command exits [`NotFinished::EXIT_CODE`], told apart from a job that
/// ended otherwise than succeeded (1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFinished(String);

impl NotFinished {
    /// As `timeout(1)` exits when its command ran out of time.
    pub const EXIT_CODE: u8 = 124;
}

/// Publish `body` to the deployment's submit queue (persistent, through
/// the default exchange) and hand back the broker as the [`Stalls`] that
/// will explain any wait that follows.
pub async fn publish(config: &Config, body: Vec<u8>) -> anyhow::Result<Stalls> {
    let broker = Arc::new(super::broker(config).await?);
    let names = Names::new(&config.prefix);
    // Declared so a job submitted before any dispatcher ever ran waits in
    // its queue. A deployment whose queues were declared with other
    // arguments (another `queue_type` or `delivery_limit` than this
    // command's config) refuses the declare: publish all the same, as any
    // client does (a queue that is truly missing fails the publish).
    if let Err(e) = broker.declare(&[]).await {
        tracing::debug!(error = %e, "cannot declare the queues; publishing to them as they are");
    }
    broker
        .publish(vec![Outgoing::durable(names.submit_queue(), body)])
        .await
        .context("publishing the job")?;
    Ok(Stalls::new(broker, names))
}

const PAUSE_MIN: Duration = Duration::from_millis(20);
const PAUSE_MAX: Duration = Duration::from_millis(250);

/// Read the job `id` until it is finished, and return its final status.
/// `moved` sees each status read whose history grew, with how many of its
/// entries it saw before. With `stalls` (a deployment), queues the job
/// waits in that nothing consumes are noted on stderr, from
/// [`STARTING_GRACE`] on. Gives up after `within`. A store that fails
/// for a while (Redis restarting, a failover) is warned of once on stderr
/// and read again until then; only an error that waiting cannot mend ends
/// the wait at once.
pub async fn until_finished(
    store: &dyn Store,
    mut stalls: Option<Stalls>,
    id: &str,
    within: Duration,
    mut moved: impl FnMut(&JobStatus, usize),
) -> anyhow::Result<JobStatus> {
    // A "forever" of u64::MAX seconds is a deadline far off, not a panic.
    let deadline = Instant::now()
        .checked_add(within)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
    if let Some(stalls) = stalls.as_mut() {
        stalls.first_look_after(STARTING_GRACE);
    }
    let mut seen = 0;
    // Each look reads the whole status: look often while the job moves,
    // less often (up to 4 times a second) while it does not, so a long
    // task of a big job is not re-read 50 times a second.
    let mut pause = PAUSE_MIN;
    let mut warned = false;
    // Whether a read ever found the job recorded.
    let mut recorded = false;
    loop {
        // The status read, or the error of a read that may succeed later
        // (kept for the give-up).
        let read = store.job(id).await;
        let (status, failing): (Option<Option<JobStatus>>, Option<StoreError>) = match read {
            Ok(status) => (Some(status), None),
            Err(e) if e.is_retryable() => {
                if !warned {
                    note!(
                        "warning: cannot read job {id} now ({e}); trying again until the time-out"
                    );
                    warned = true;
                }
                (None, Some(e))
            }
            Err(e) => return Err(e.into()),
        };
        // Not looked at without a read: `None` there means "not recorded yet".
        if let (Some(stalls), Some(status)) = (stalls.as_mut(), status.as_ref()) {
            stalls.look(status.as_ref(), Some(store)).await;
        }
        let status = status.flatten();
        pause = (pause * 2).min(PAUSE_MAX);
        if let Some(status) = status {
            recorded = true;
            if status.history.len() > seen {
                moved(&status, seen);
                seen = status.history.len();
                pause = PAUSE_MIN;
            }
            if status.state.is_terminal() {
                return Ok(status);
            }
        }
        if Instant::now() >= deadline {
            let hint = match (&failing, recorded, stalls.is_some()) {
                (Some(e), _, _) => format!(" (the last read of it failed: {e})"),
                // Checked against this command's limits, the job was sent
                // as one a dispatcher records under its id; a deployment
                // whose limits differ may have refused it.
                (None, false, _) => " and was never recorded (no dispatcher took it yet, or one \
                     with other limits than this command's dead-lettered it, or rejected it \
                     under another id: see `conveyor queues`, the dead-letter queue, and \
                     `conveyor list --state rejected`)"
                    .into(),
                (None, true, true) => {
                    " (`conveyor queues` shows which queues have consumers)".into()
                }
                (None, true, false) => String::new(),
            };
            return Err(NotFinished(format!(
                "job {id} did not finish within {}s{hint}",
                within.as_secs()
            ))
            .into());
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use conveyor::embedded::{Embedded, EmbeddedOptions};
    use conveyor::intake::Rejection;
    use conveyor::model::JobState;
    use conveyor::store::HistoryEntry;
    use conveyor::store::memory::{MemoryStore, SystemClock};
    use serde_json::json;

    /// A whole Conveyor in this process, with the built-in handlers.
    async fn embedded() -> Embedded {
        Embedded::start(
            &Config::default(),
            conveyor_builtin_handlers::registry(),
            EmbeddedOptions::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_job_is_returned_and_each_transition_is_seen_once_in_order() {
        let embedded = embedded().await;
        let job = json!({"id": "chain", "requestor": "r", "tasks": [
            {"name": "first", "handler": "sleep", "params": {"ms": 50}},
            {"name": "second", "handler": "noop", "after": ["first"]}]});
        embedded
            .submit(serde_json::to_vec(&job).unwrap())
            .await
            .unwrap();
        let mut shown: Vec<HistoryEntry> = Vec::new();
        let status = until_finished(
            &*embedded.store(),
            None,
            "chain",
            Duration::from_secs(30),
            |status, seen| shown.extend(status.history[seen..].iter().cloned()),
        )
        .await
        .unwrap();
        assert_eq!(status.state, JobState::Succeeded);
        assert_eq!(shown, status.history);
        embedded.shutdown().await.unwrap();
    }

    /// Until the thirty-second session the first failed read of the job
    /// ended `submit --wait` and `run --redis-url` with that error, though
    /// a Redis restarting or failing over answers again in moments and the
    /// job goes on without the command.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_failing_for_a_while_is_read_again_until_the_job_is_seen_finished() {
        let store = MemoryStore::new(Arc::new(SystemClock), Duration::from_secs(60), 1, "test");
        let rejection = Rejection {
            id: "bad".into(),
            requestor: "r".into(),
            error: "tasks: required".into(),
        };
        assert!(store.record_rejected(&rejection).await.unwrap());
        store.set_outage(true);
        let back = store.clone();
        let outage = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            back.set_outage(false);
        });
        let status = until_finished(&store, None, "bad", Duration::from_secs(30), |_, _| {})
            .await
            .unwrap();
        assert_eq!(status.state, JobState::Rejected);
        outage.await.unwrap();

        // Failing to the end: the time-out says what the reads met.
        store.set_outage(true);
        let err = until_finished(&store, None, "bad", Duration::from_millis(200), |_, _| {})
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "job bad did not finish within 0s (the last read of it failed: store unavailable: \
             simulated store outage)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_does_not_finish_is_given_up_naming_it() {
        let embedded = embedded().await;
        let err = until_finished(
            &*embedded.store(),
            None,
            "never-submitted",
            Duration::from_millis(100),
            |_, _| panic!("a job never submitted has no history"),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "job never-submitted did not finish within 0s and was never recorded (no dispatcher \
             took it yet, or one with other limits than this command's dead-lettered it, or \
             rejected it under another id: see `conveyor queues`, the dead-letter queue, and \
             `conveyor list --state rejected`)"
        );
        assert!(err.downcast_ref::<NotFinished>().is_some(), "{err:?}");
        embedded.shutdown().await.unwrap();
    }
}
