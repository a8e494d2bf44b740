//! Running one attempt of a handler: params parsed once, a run time-out,
//! a panic caught and turned into a failed attempt, and the handler's
//! answer mapped to what the store records — within bounds: a result over
//! `limits.max_result_bytes` fails the task, and an error text is cut to
//! [`MAX_ERROR_BYTES`], since both are kept in Redis (an error once per
//! attempt, in the history too) and a result is handed to every dependent.
//! A join whose dependencies' results together pass
//! `limits.max_inputs_bytes` is failed without running (the store's claim
//! did not read them).

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

/// Extra time a handler gets past its time-out to report its own
/// "timed out" error before the worker stops it.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

/// The longest error text kept of an attempt, in bytes: longer ones keep
/// their beginning and end (where a cause and a stderr tail are) with a
/// note of what was cut between.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// `error` cut to [`MAX_ERROR_BYTES`] (at character boundaries), saying
/// how much was cut.
pub fn bounded_error(error: String) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    let keep = (MAX_ERROR_BYTES - 64) / 2;
    let mut head = keep;
    while !error.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = error.len() - keep;
    while !error.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} [... {} bytes cut ...] {}",
        &error[..head],
        tail - head,
        &error[tail..]
    )
}

/// Run `handler` on a claimed task; a result longer than
/// `max_result_bytes` (as JSON) fails the attempt for good, and so does a
/// claim whose dependency results were too large to hand over (the
/// handler is not run). Never panics.
pub async fn run_attempt(
    handler: Arc<dyn Handler>,
    claimed: &Claimed,
    max_result_bytes: usize,
) -> AttemptEnd {
    run_attempt_watched(
        handler,
        claimed,
        max_result_bytes,
        HandlerAlive::unwatched(),
    )
    .await
}

/// Held by a handler's run until its future is dropped (it returned, or
/// its abort took effect): [`HandlerAlive::watch`]'s other half tells
/// when the handler has truly stopped, and can abort it. An abort takes
/// effect only when the run next yields (on a multi-threaded runtime a run
/// mid-poll goes on meanwhile, a `shell` program's group is killed only
/// then): a task handed back or retried before that would run twice at
/// once.
pub struct HandlerAlive {
    /// Never sent on: its drop is the signal.
    held: Option<tokio::sync::oneshot::Sender<()>>,
    run: Arc<RunState>,
    /// Where the run's cancels of outside work are kept, to be waited for.
    cancels: Cancels,
}

/// The cancels of outside work a worker started in the background
/// ([`cancel_in_background`]), so that it waits for them before it exits:
/// one started by a hard stop just before the process ended was dropped
/// with the runtime, perhaps unsent, and the task, handed back, started
/// the work a second time. The default keeps none (each cancel is a task
/// of its own, left to run): a set of tasks aborts them when dropped, as
/// it would be with the last attempt holding it.
#[derive(Clone, Default)]
pub struct Cancels(Option<Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>>);

impl Cancels {
    /// Cancels kept to be waited for, by their owner (a worker), who must
    /// outlive them.
    pub fn tracked() -> Cancels {
        Cancels(Some(Arc::default()))
    }

    fn spawn(&self, cancel: impl Future<Output = ()> + Send + 'static) {
        let Some(set) = &self.0 else {
            tokio::spawn(cancel);
            return;
        };
        let mut set = set.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(cancel);
    }

    /// Wait for the cancels under way, each bounded by [`CANCEL_TIMEOUT`],
    /// at most `within` in all (none, for cancels not kept).
    pub async fn wait(&self, within: Duration) {
        let Some(set) = &self.0 else {
            return;
        };
        let mut set = std::mem::take(&mut *set.lock().unwrap_or_else(|p| p.into_inner()));
        if set.is_empty() {
            return;
        }
        tracing::info!(cancels = set.len(), "waiting for cancels of outside work");
        let all = async { while set.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(within, all).await;
    }
}

/// What both halves share of one handler's run.
#[derive(Default)]
struct RunState {
    /// Aborts the spawned run; set as it is spawned (so also: whether it
    /// was), before the attempt's first poll returns.
    abort: std::sync::OnceLock<tokio::task::AbortHandle>,
    /// The run ended by its abort, before it answered.
    cancelled: std::sync::atomic::AtomicBool,
    /// The run ended (answered, panicked or cancelled) and the attempt saw
    /// it: not the attempt's own time-out with the run still going.
    ended: std::sync::atomic::AtomicBool,
}

/// The watching half of a [`HandlerAlive`].
pub struct HandlerGone {
    rx: tokio::sync::oneshot::Receiver<()>,
    run: Arc<RunState>,
}

impl HandlerAlive {
    /// A pair: the half the run holds, and the half that watches it; the
    /// run's cancels of outside work are kept in `cancels`.
    pub fn watch(cancels: &Cancels) -> (HandlerAlive, HandlerGone) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = Arc::new(RunState::default());
        (
            HandlerAlive {
                held: Some(tx),
                run: run.clone(),
                cancels: cancels.clone(),
            },
            HandlerGone { rx, run },
        )
    }

    fn unwatched() -> HandlerAlive {
        HandlerAlive {
            held: None,
            run: Arc::default(),
            cancels: Cancels::default(),
        }
    }
}

impl HandlerGone {
    /// Whether the handler's run was started (spawned): an attempt never
    /// polled has not, and polling it now would start it.
    pub fn started(&self) -> bool {
        self.run.abort.get().is_some()
    }

    /// Whether the run ended by its abort before it answered (its attempt
    /// then ends as a transient "cancelled").
    pub fn cancelled(&self) -> bool {
        self.run
            .cancelled
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the attempt ended because the run did (its answer, a
    /// panic, its cancellation), not by its own time-out.
    pub fn ended(&self) -> bool {
        self.run.ended.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Abort the run; its attempt, still polled, ends with its answer if
    /// it answered first, or as cancelled once the run is dropped.
    pub fn abort(&self) {
        if let Some(abort) = self.run.abort.get() {
            abort.abort();
        }
    }

    /// Wait until the run has stopped, at most `within`; whether it has.
    /// (Never sent on: the receiver ends, with an error, when the sender
    /// is dropped.)
    pub async fn within(self, within: Duration) -> bool {
        tokio::time::timeout(within, self.rx).await.is_ok()
    }
}

/// [`run_attempt`], its handler's run holding `alive` until it stops.
pub async fn run_attempt_watched(
    handler: Arc<dyn Handler>,
    claimed: &Claimed,
    max_result_bytes: usize,
    alive: HandlerAlive,
) -> AttemptEnd {
    if let Some(oversized) = &claimed.oversized_inputs {
        return AttemptEnd::Permanent(oversized.error());
    }
    match answer_of(handler, claimed, max_result_bytes, alive).await {
        AttemptEnd::Succeeded(json) if json.len() > max_result_bytes => {
            AttemptEnd::Permanent(format!(
                "result is {} bytes of JSON, over limits.max_result_bytes ({max_result_bytes}): \
                 keep large outputs elsewhere (a file, an object store) and return where they are",
                json.len()
            ))
        }
        AttemptEnd::Succeeded(json) => AttemptEnd::Succeeded(json),
        AttemptEnd::Transient(e) => AttemptEnd::Transient(bounded_error(e)),
        AttemptEnd::Permanent(e) => AttemptEnd::Permanent(bounded_error(e)),
    }
}

/// What the handler answered, as an attempt's end.
async fn answer_of(
    handler: Arc<dyn Handler>,
    claimed: &Claimed,
    max_result_bytes: usize,
    alive: HandlerAlive,
) -> AttemptEnd {
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
        max_result_bytes,
    };
    let timeout = claimed.timeout;
    let started = tokio::time::Instant::now();
    let canceller = handler.clone();
    // Its own task, so a panic unwinds there and comes back as a JoinError;
    // aborted if this future is dropped (shutdown hands the task back).
    let HandlerAlive {
        held,
        run: state,
        cancels,
    } = alive;
    let mut run = RunningHandler {
        task: tokio::spawn(async move {
            let _held = held;
            let answer = handler.run(ctx, params).await;
            (answer, tokio::time::Instant::now())
        }),
        unread: Some((
            canceller.clone(),
            claimed.claim.job.clone(),
            claimed.task.clone(),
        )),
        cancels: cancels.clone(),
    };
    // No await since the spawn: set before this attempt's poll returns.
    let _ = state.abort.set(run.task.abort_handle());
    let answer = tokio::time::timeout(timeout + TIMEOUT_MARGIN, &mut run.task).await;
    if answer.is_ok() {
        state
            .ended
            .store(true, std::sync::atomic::Ordering::Release);
        // Read: the answer is handled below.
        run.unread = None;
    }
    // A handler that blocks its thread (against the contract: blocking work
    // belongs in `spawn_blocking`) also blocks the timer that would have
    // stopped it; when it returns at last, its answer is late all the same.
    // Late by when the handler answered, not by when this future saw the
    // answer: another task blocking the thread in between delays only that.
    if let Ok(Ok((late, answered))) = &answer {
        let ran = answered.duration_since(started);
        if ran > timeout + TIMEOUT_MARGIN {
            if let Ok(Outcome::Started { token, .. }) = late {
                cancel_in_background(&cancels, canceller, token.clone(), claimed);
            }
            return AttemptEnd::Transient(format!(
                "timed out after {:.1}s (timeout_s): the handler blocked its thread and \
                 answered only after {:.1}s; its answer was discarded",
                timeout.as_secs_f64(),
                ran.as_secs_f64()
            ));
        }
    }
    match answer.map(|joined| joined.map(|(answer, _)| answer)) {
        Ok(Ok(Ok(Outcome::Done(value)))) => AttemptEnd::Succeeded(value.to_string()),
        Ok(Ok(Ok(Outcome::Started { token, .. }))) => {
            let error = format!(
                "handler started outside work (token {token}), but this version of Conveyor \
                 cannot wait for notifications yet; the handler is asked to cancel it"
            );
            cancel_in_background(&cancels, canceller, token, claimed);
            AttemptEnd::Permanent(error)
        }
        Ok(Ok(Err(HandlerError::Transient(e)))) => AttemptEnd::Transient(e),
        Ok(Ok(Err(e @ (HandlerError::Permanent(_) | HandlerError::Unsupported(_))))) => {
            AttemptEnd::Permanent(e.to_string())
        }
        Ok(Err(join)) if join.is_panic() => AttemptEnd::Transient(format!(
            "handler panicked: {}",
            crate::panics::panic_message(join.into_panic().as_ref())
        )),
        Ok(Err(join)) => {
            state
                .cancelled
                .store(true, std::sync::atomic::Ordering::Release);
            AttemptEnd::Transient(format!("handler task was cancelled: {join}"))
        }
        Err(_) => {
            run.task.abort();
            AttemptEnd::Transient(format!(
                "timed out after {:.1}s (timeout_s)",
                timeout.as_secs_f64()
            ))
        }
    }
}

/// How long the handler's `cancel` of outside work the worker cannot wait
/// for may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping worker waits for the cancels under way: each is
/// bounded by [`CANCEL_TIMEOUT`], and they run at once.
pub(super) const CANCEL_WAIT: Duration = Duration::from_secs(11);

/// Have `handler` cancel the outside work `token` names, in a task of its
/// own, logging how it went: awaited here, the cancel would hold the
/// attempt open, and a hard stop or a lost claim meanwhile would drop it
/// (perhaps unsent) and hand the task back to start the work again.
fn cancel_in_background(
    cancels: &Cancels,
    handler: Arc<dyn Handler>,
    token: conveyor_handler::ExecutionToken,
    claimed: &Claimed,
) {
    cancel_in_background_of(
        cancels,
        handler,
        token,
        claimed.claim.job.clone(),
        claimed.task.clone(),
    );
}

/// [`cancel_in_background`] for task `task` of job `job`.
fn cancel_in_background_of(
    cancels: &Cancels,
    handler: Arc<dyn Handler>,
    token: conveyor_handler::ExecutionToken,
    job: String,
    task: String,
) {
    cancels.spawn(async move {
        let how = cancel_started(handler, &token).await;
        tracing::warn!(%job, %task, token = %token, "outside work the task cannot wait for: {how}");
    });
}

/// Ask `handler` to stop the outside work `token` names, which the task
/// will not wait for: failed, the task may run again (a retry of the job,
/// a resubmission) and start it a second time beside the first. Says how
/// it went, for the task's error.
async fn cancel_started(
    handler: Arc<dyn Handler>,
    token: &conveyor_handler::ExecutionToken,
) -> String {
    use futures::FutureExt;
    let cancel = std::panic::AssertUnwindSafe(handler.cancel(token)).catch_unwind();
    match tokio::time::timeout(CANCEL_TIMEOUT, cancel).await {
        Ok(Ok(Ok(()))) => "the handler cancelled it".to_owned(),
        Ok(Ok(Err(HandlerError::Unsupported(_)))) => {
            "the handler cannot cancel it (no cancel): it goes on".to_owned()
        }
        Ok(Ok(Err(e))) => format!("cancelling it failed: {e}"),
        Ok(Err(panic)) => format!(
            "cancelling it panicked: {}",
            crate::panics::panic_message(panic.as_ref())
        ),
        Err(_) => format!(
            "cancelling it did not finish within {}s",
            CANCEL_TIMEOUT.as_secs()
        ),
    }
}

/// A handler's run in its own task: aborted when dropped (a hard stop
/// hands the task back, a lost claim stops its run). A run that answered
/// `Started` before anyone read its answer (the hard stop or the lost claim
/// was seen first) has its outside work cancelled then, as any `Started`
/// is ([`cancel_in_background`]): dropped unread, the work went on, and
/// the task, handed back, started it again.
struct RunningHandler {
    task: tokio::task::JoinHandle<(Result<Outcome, HandlerError>, tokio::time::Instant)>,
    /// Until its answer is read: the handler, the job and the task.
    unread: Option<(Arc<dyn Handler>, String, String)>,
    /// Where a cancel of its unread `Started` goes.
    cancels: Cancels,
}

impl Drop for RunningHandler {
    fn drop(&mut self) {
        use futures::FutureExt;
        self.task.abort();
        let Some((handler, job, task)) = self.unread.take() else {
            return;
        };
        // Finished and never read: its answer is there to take at once
        // (an aborted run answers a cancelled `JoinError`).
        if self.task.is_finished()
            && let Some(Ok((Ok(Outcome::Started { token, .. }), _))) =
                (&mut self.task).now_or_never()
        {
            cancel_in_background_of(&self.cancels, handler, token, job, task);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::store::{ClaimRef, OversizedInputs};
    use async_trait::async_trait;
    use serde_json::Value;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
            oversized_inputs: None,
            backoff: (0, 0),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_after_the_time_out_is_a_time_out_even_when_the_timer_could_not_fire() {
        let handler = Arc::new(BlocksItsThread(TIMEOUT_MARGIN + Duration::from_millis(300)));
        let end = run_attempt(handler, &claimed(Duration::from_millis(50)), 64).await;
        match end {
            AttemptEnd::Transient(e) => assert!(e.starts_with("timed out after 0.1s"), "{e}"),
            other => panic!("a late answer was taken: {other:?}"),
        }
    }

    /// Answers at once, waking a neighbour that blocks the thread before
    /// the attempt sees the answer.
    struct WakesABlocker(Arc<tokio::sync::Notify>);

    #[async_trait]
    impl Handler for WakesABlocker {
        fn name(&self) -> &str {
            "wakes"
        }
        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            self.0.notify_one();
            Ok(Outcome::Done(Value::Null))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_in_time_is_taken_though_another_task_blocked_the_thread_after_it() {
        let wake = Arc::new(tokio::sync::Notify::new());
        let blocker = tokio::spawn({
            let wake = wake.clone();
            async move {
                wake.notified().await;
                std::thread::sleep(
                    Duration::from_secs(1) + TIMEOUT_MARGIN + Duration::from_millis(300),
                );
            }
        });
        let handler = Arc::new(WakesABlocker(wake));
        let attempt = tokio::spawn(async move {
            run_attempt(handler, &claimed(Duration::from_secs(1)), 64).await
        });
        assert_eq!(attempt.await.unwrap(), AttemptEnd::Succeeded("null".into()));
        blocker.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_in_time_is_taken() {
        let handler = Arc::new(BlocksItsThread(Duration::from_millis(10)));
        let end = run_attempt(handler, &claimed(Duration::from_secs(5)), 64).await;
        assert_eq!(end, AttemptEnd::Succeeded("null".into()));
    }

    /// Answers with what it was built with, counting its runs.
    struct Answers(Result<Value, HandlerError>, AtomicUsize);

    impl Answers {
        fn new(answer: Result<Value, HandlerError>) -> Answers {
            Answers(answer, AtomicUsize::new(0))
        }

        fn runs(&self) -> usize {
            self.1.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Handler for Answers {
        fn name(&self) -> &str {
            "answers"
        }
        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.clone().map(Outcome::Done)
        }
    }

    /// Starts outside work (token `ext-1`); cancels it if `cancels`,
    /// noting each token it is asked to cancel.
    struct StartsOutsideWork {
        cancels: bool,
        cancelled: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Handler for StartsOutsideWork {
        fn name(&self) -> &str {
            "starts"
        }
        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            Ok(Outcome::Started {
                token: conveyor_handler::ExecutionToken("ext-1".into()),
                poll_after: None,
            })
        }
        async fn cancel(
            &self,
            token: &conveyor_handler::ExecutionToken,
        ) -> Result<(), HandlerError> {
            self.cancelled.lock().unwrap().push(token.0.clone());
            if self.cancels {
                Ok(())
            } else {
                Err(HandlerError::Unsupported("cancel"))
            }
        }
    }

    /// Until notifications land a task whose handler started outside work
    /// fails; until the thirty-second session that work was left running,
    /// unknown to anyone, and a retry of the job started it again beside it.
    #[tokio::test(flavor = "current_thread")]
    async fn outside_work_the_worker_cannot_wait_for_is_cancelled_and_the_task_fails() {
        let handler = Arc::new(StartsOutsideWork {
            cancels: true,
            cancelled: Default::default(),
        });
        let end = run_attempt(handler.clone(), &claimed(Duration::from_secs(5)), 64).await;
        let AttemptEnd::Permanent(error) = end else {
            panic!("{end:?}");
        };
        assert!(error.contains("token ext-1"), "{error}");
        assert!(
            error.ends_with("the handler is asked to cancel it"),
            "{error}"
        );
        // In a task of its own, which no stop of the attempt drops.
        for _ in 0..100 {
            if !handler.cancelled.lock().unwrap().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*handler.cancelled.lock().unwrap(), vec!["ext-1".to_owned()]);
    }

    /// A run that started outside work and was dropped before its answer
    /// was read (a hard stop or a lost claim seen first) has that work
    /// cancelled too: dropped unread, it went on, and the task, handed
    /// back, started it again.
    #[tokio::test(flavor = "current_thread")]
    async fn outside_work_started_by_a_run_dropped_unread_is_cancelled() {
        let handler = Arc::new(StartsOutsideWork {
            cancels: true,
            cancelled: Default::default(),
        });
        let claimed = claimed(Duration::from_secs(5));
        {
            let attempt = run_attempt(handler.clone(), &claimed, 64);
            tokio::pin!(attempt);
            // Its handler's task spawned, not run yet (one thread)…
            assert!(futures::poll!(attempt.as_mut()).is_pending());
            // …it answers; the attempt never reads it, and is dropped.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        for _ in 0..100 {
            if !handler.cancelled.lock().unwrap().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*handler.cancelled.lock().unwrap(), vec!["ext-1".to_owned()]);
    }

    /// The cancel of an unread `Started` is kept where the worker looks
    /// before it exits: waiting there finds it done, with no polling; and
    /// the wait is bounded by what it is given, a cancel that hangs
    /// notwithstanding.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_stopping_worker_can_wait_for_the_cancels_its_runs_started() {
        let handler = Arc::new(StartsOutsideWork {
            cancels: true,
            cancelled: Default::default(),
        });
        let claimed = claimed(Duration::from_secs(5));
        let cancels = Cancels::tracked();
        {
            let (alive, _gone) = HandlerAlive::watch(&cancels);
            let attempt = run_attempt_watched(handler.clone(), &claimed, 64, alive);
            tokio::pin!(attempt);
            assert!(futures::poll!(attempt.as_mut()).is_pending());
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        cancels.wait(Duration::from_secs(1)).await;
        assert_eq!(*handler.cancelled.lock().unwrap(), vec!["ext-1".to_owned()]);

        cancels.spawn(std::future::pending());
        let waited = tokio::time::Instant::now();
        cancels.wait(Duration::from_secs(3)).await;
        let waited = waited.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
    }

    /// Blocks its thread past the time-out, then starts outside work.
    struct StartsLate(std::sync::Mutex<Vec<String>>);

    #[async_trait]
    impl Handler for StartsLate {
        fn name(&self) -> &str {
            "starts-late"
        }
        async fn run(&self, _ctx: TaskContext, _params: Value) -> Result<Outcome, HandlerError> {
            std::thread::sleep(TIMEOUT_MARGIN + Duration::from_millis(100));
            Ok(Outcome::Started {
                token: conveyor_handler::ExecutionToken("late-1".into()),
                poll_after: None,
            })
        }
        async fn cancel(
            &self,
            token: &conveyor_handler::ExecutionToken,
        ) -> Result<(), HandlerError> {
            self.0.lock().unwrap().push(token.0.clone());
            Ok(())
        }
    }

    /// A start answered after the time-out is a timed-out attempt, retried:
    /// the work it started is cancelled too, or the retry would start it
    /// again beside it.
    #[tokio::test(flavor = "current_thread")]
    async fn outside_work_started_too_late_is_cancelled_too() {
        let handler = Arc::new(StartsLate(Default::default()));
        let end = run_attempt(handler.clone(), &claimed(Duration::from_millis(10)), 64).await;
        assert!(
            matches!(&end, AttemptEnd::Transient(e) if e.contains("timed out")),
            "{end:?}"
        );
        for _ in 0..100 {
            if !handler.0.lock().unwrap().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*handler.0.lock().unwrap(), vec!["late-1".to_owned()]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn how_a_cancel_went_is_told() {
        let token = conveyor_handler::ExecutionToken("ext-1".into());
        for (cancels, said) in [
            (true, "the handler cancelled it"),
            (
                false,
                "the handler cannot cancel it (no cancel): it goes on",
            ),
        ] {
            let handler = Arc::new(StartsOutsideWork {
                cancels,
                cancelled: Default::default(),
            });
            assert_eq!(cancel_started(handler, &token).await, said);
        }
    }

    async fn end_of(answer: Result<Value, HandlerError>, max_result_bytes: usize) -> AttemptEnd {
        let handler = Arc::new(Answers::new(answer));
        run_attempt(handler, &claimed(Duration::from_secs(5)), max_result_bytes).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_result_over_the_limit_fails_the_task_naming_the_limit() {
        let result = Value::String("x".repeat(100));
        assert_eq!(
            end_of(Ok(result.clone()), 102).await,
            AttemptEnd::Succeeded(result.to_string()),
            "102 bytes with the quotes: at the limit"
        );
        match end_of(Ok(result), 101).await {
            AttemptEnd::Permanent(e) => assert!(
                e.starts_with("result is 102 bytes of JSON, over limits.max_result_bytes (101)"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_claim_whose_inputs_were_too_large_fails_for_good_without_running_the_handler() {
        let handler = Arc::new(Answers::new(Ok(Value::Null)));
        let mut claim = claimed(Duration::from_secs(5));
        claim.oversized_inputs = Some(OversizedInputs {
            deps: 3,
            bytes: 3_000,
            limit: 2_048,
        });
        match run_attempt(handler.clone(), &claim, 64).await {
            AttemptEnd::Permanent(e) => assert!(
                e.starts_with(
                    "the results of its 3 dependencies total 3000 bytes of JSON, \
                     over limits.max_inputs_bytes (2048)"
                ),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(handler.runs(), 0, "the handler ran");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_long_error_keeps_its_beginning_and_end_and_says_what_was_cut() {
        let long = format!(
            "cause: disk full\n{}\nlast line of stderr",
            "é".repeat(10_000)
        );
        let kept = match end_of(Err(HandlerError::Transient(long.clone())), 64).await {
            AttemptEnd::Transient(e) => e,
            other => panic!("{other:?}"),
        };
        assert!(kept.len() <= MAX_ERROR_BYTES, "{} bytes", kept.len());
        assert!(kept.starts_with("cause: disk full\n"), "{kept:.40}");
        assert!(kept.ends_with("\nlast line of stderr"));
        // What was kept and what was cut add up to the whole.
        let (head, rest) = kept.split_once(" [... ").unwrap();
        let (cut, tail) = rest.split_once(" bytes cut ...] ").unwrap();
        let cut: usize = cut.parse().unwrap();
        assert_eq!(head.len() + cut + tail.len(), long.len());
        assert!(long.starts_with(head) && long.ends_with(tail));
        let short = "a short error".to_owned();
        assert_eq!(
            end_of(Err(HandlerError::Permanent(short.clone())), 64).await,
            AttemptEnd::Permanent(HandlerError::Permanent(short).to_string())
        );
    }
}
