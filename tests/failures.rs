//! Failure semantics against real RabbitMQ and Redis: retries with
//! backoff, permanent errors, panics, time-outs, handlers that block their
//! thread, lapsed leases with late outcomes, and poison messages.
//!
//! Like tests/faults.rs, each test keeps a record of truth outside Redis
//! (the workers' execution journal, `conveyor::worker::Journal`) and
//! asserts the invariants of docs/ARCHITECTURE.md at the end:
//! - every accepted job is terminal, and accepted = succeeded + failed + cancelled;
//! - no outcome was applied twice;
//! - no task ran under two live claims at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::journal::{assert_jobs_settled, assert_no_overlapping_claims, runs_of};
use common::scratch::Scratch;
use common::{Client, Deployment, eventually};
use conveyor::broker::Broker;
use conveyor::handler::{Handler, HandlerError, Outcome, TaskContext};
use conveyor::model::{JobState, TaskMessage, TaskState};
use conveyor::shutdown::ShutdownTrigger;
use conveyor::store::{Applied, AttemptResult, ClaimOutcome, Store};
use conveyor::worker::{Journal, Worker, WorkerOptions};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

// ------------------------------------------------------ record of truth

/// A fresh journal file for one test; in-process workers started from now
/// on write to it.
fn open_journal(d: &mut Deployment, test: &str) -> Scratch {
    let path = Scratch::file(&format!("failures-{test}.journal"));
    d.journal_to(&path);
    path
}

/// (attempt, how it ended) for each run of one task, by start. How it
/// ended is the worker's word: `retry` for any transient end (a panic, a
/// time-out), even on the last attempt, where the store fails the task.
fn outcomes(path: &Path, job: &str, idx: u32) -> Vec<(u32, String)> {
    runs_of(path, job, idx)
        .into_iter()
        .map(|r| (r.attempt, r.outcome.unwrap_or_else(|| "running".into())))
        .collect()
}

fn ended(runs: &[(u32, &str)]) -> Vec<(u32, String)> {
    runs.iter().map(|(a, o)| (*a, (*o).to_owned())).collect()
}

/// The end-of-test invariants, every worker holding the deployment's lease.
async fn assert_invariants(
    d: &Deployment,
    ids: &[&str],
    journal: &Path,
) -> BTreeMap<JobState, usize> {
    let counts = assert_jobs_settled(d, ids, WAIT).await;
    assert_no_overlapping_claims(journal, |_| d.config.lease());
    common::journal::assert_every_success_was_run(d, ids, journal).await;
    counts
}

// ------------------------------------------------- handlers that block

/// Each blocking call of a handler: its attempt, and when it returned (unix
/// ns; `None` while it blocks).
#[derive(Clone, Default)]
struct BlockingCalls(Arc<Mutex<Vec<BlockingCall>>>);

#[derive(Debug, Clone)]
struct BlockingCall {
    attempt: u32,
    end: Option<u128>,
}

impl BlockingCalls {
    /// Block this thread for `ms`, on the record.
    fn block(&self, attempt: u32, ms: u64) {
        let i = {
            let mut calls = self.0.lock().unwrap();
            calls.push(BlockingCall { attempt, end: None });
            calls.len() - 1
        };
        std::thread::sleep(Duration::from_millis(ms));
        self.0.lock().unwrap()[i].end = Some(now_ns());
    }

    fn all(&self) -> Vec<BlockingCall> {
        self.0.lock().unwrap().clone()
    }
}

fn param_u64(params: &Value, name: &str) -> u64 {
    params.get(name).and_then(Value::as_u64).unwrap_or(0)
}

/// Blocking work done the way README asks of handlers on a one-thread
/// runtime: inside `spawn_blocking`. Params: `ms`, how long to block.
struct BlockInPool(BlockingCalls);

#[async_trait]
impl Handler for BlockInPool {
    fn name(&self) -> &str {
        "block_in_pool"
    }

    async fn run(&self, ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        let (calls, ms) = (self.0.clone(), param_u64(&params, "ms"));
        tokio::task::spawn_blocking(move || calls.block(ctx.attempt, ms))
            .await
            .map_err(|e| HandlerError::transient(e.to_string()))?;
        Ok(Outcome::Done(json!({"blocked_ms": ms})))
    }
}

/// A handler that breaks README's rule: it blocks the thread that polls
/// it. Params: `ms`, how long; `attempts`, on which attempts (1..=n).
struct BlockThread(BlockingCalls);

#[async_trait]
impl Handler for BlockThread {
    fn name(&self) -> &str {
        "block_thread"
    }

    async fn run(&self, ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        if u64::from(ctx.attempt) <= param_u64(&params, "attempts") {
            self.0.block(ctx.attempt, param_u64(&params, "ms"));
        }
        Ok(Outcome::Done(json!({"attempt": ctx.attempt})))
    }
}

/// A worker on a runtime of one thread, as `conveyor worker` runs with the
/// default `runtime_threads = 1`, in an OS thread of its own; its runs go
/// to `journal` under the name "one-thread".
struct OneThreadWorker {
    trigger: ShutdownTrigger,
    thread: std::thread::JoinHandle<()>,
}

impl OneThreadWorker {
    fn start(d: &Deployment, concurrency: usize, journal: &Path) -> OneThreadWorker {
        let (config, registry, names) = (d.config.clone(), d.registry.clone(), d.names.clone());
        let journal = Journal::open(journal, "one-thread").unwrap();
        let trigger = ShutdownTrigger::new();
        let shutdown = trigger.subscribe();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let id = format!("one-thread-{}", conveyor::worker::new_worker_id());
                let store = common::connect_store(&config, &id).await as Arc<dyn Store>;
                let broker = common::connect_broker(&config).await as Arc<dyn Broker>;
                let worker = Worker::new(
                    store,
                    broker,
                    registry,
                    names,
                    WorkerOptions {
                        concurrency,
                        journal: Some(journal),
                        ..WorkerOptions::from_config(&config, id)
                    },
                );
                worker
                    .run(shutdown)
                    .await
                    .expect("the one-thread worker runs");
            });
            // Blocking calls still going in the pool are not waited for.
            runtime.shutdown_timeout(Duration::ZERO);
        });
        OneThreadWorker { trigger, thread }
    }

    async fn stop(self) {
        self.trigger.trigger();
        let thread = self.thread;
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap();
        assert!(joined.is_ok(), "the one-thread worker panicked");
    }
}

/// Messages in `queue`, ready and unacked together, as RabbitMQ counts
/// them (`None` while it cannot say).
async fn messages_in(queue: &str) -> Option<u64> {
    let out = tokio::process::Command::new("timeout")
        .args(["60", "rabbitmqctl", "list_queues", "-q", "name", "messages"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == queue).then(|| fields.next()?.parse().ok())?
        })
}

/// The next delivery of a test's own lapin consumer.
async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_is_retried_with_backoff_until_it_succeeds() {
    let mut d = Deployment::new("retry").await;
    let journal = open_journal(&mut d, "retry");
    d.start_dispatcher().await;
    d.start_worker(4).await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "flaky", "requestor": "r", "tasks": [
            {"name": "f", "handler": "fail", "params": {"times": 2},
             "retry": {"max_attempts": 5, "base_ms": 200, "cap_ms": 300}}]}))
        .await;
    let status = d.wait_terminal("flaky", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    let f = &status.tasks["f"];
    assert_eq!(f.attempts, 3);
    assert_eq!(f.result, json!({"attempts": 3}));
    // Each failed attempt is in the history with its error and its delay,
    // and the delay is within the policy: full jitter under min(cap, base*2^(n-1)).
    let retries: Vec<_> = status
        .history
        .iter()
        .filter(|h| h.to == "retrying")
        .collect();
    assert_eq!(retries.len(), 2, "{:#?}", status.history);
    for (n, h) in retries.iter().enumerate() {
        assert!(h.reason.contains("planned failures"), "{}", h.reason);
        let ms: u64 = h
            .reason
            .split("due in ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no delay in {:?}", h.reason));
        let ceiling = conveyor::backoff::ceiling(n as u32 + 1, 200, 300);
        assert!(ms <= ceiling, "delay {ms} ms over the ceiling {ceiling} ms");
        // The next attempt was not claimed before its delay elapsed.
        let next_claim = status
            .history
            .iter()
            .find(|c| {
                c.to == "running"
                    && c.task.is_some()
                    && c.at >= h.at
                    && c.reason.ends_with(&format!("attempt {}", n + 2))
            })
            .expect("next attempt claimed");
        assert!(
            next_claim.at >= h.at + ms,
            "attempt {} claimed {} ms after a {ms} ms delay",
            n + 2,
            next_claim.at - h.at
        );
    }
    // The record of truth agrees: three runs, two retried, one succeeded.
    assert_eq!(
        outcomes(&journal, "flaky", 0),
        ended(&[(1, "retry"), (2, "retry"), (3, "succeeded")])
    );
    assert_invariants(&d, &["flaky"], &journal).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_fails_the_task_at_once_with_its_message() {
    let mut d = Deployment::new("permanent").await;
    let journal = open_journal(&mut d, "permanent");
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "doomed", "requestor": "r", "tasks": [
            {"name": "f", "handler": "fail", "params": {"permanent": true, "message": "bad input: no such file"}},
            {"name": "independent", "handler": "noop"}]}))
        .await;
    let status = d.wait_terminal("doomed", WAIT).await;
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.tasks["f"].attempts, 1);
    assert_eq!(
        status.tasks["f"].error.as_deref(),
        Some("bad input: no such file")
    );
    assert_eq!(status.tasks["independent"].state, TaskState::Succeeded);
    assert_eq!(outcomes(&journal, "doomed", 0), ended(&[(1, "failed")]));
    assert_eq!(outcomes(&journal, "doomed", 1), ended(&[(1, "succeeded")]));
    assert_invariants(&d, &["doomed"], &journal).await;
    client.close().await;
    d.shutdown().await;
}

/// What a handler returns is bounded before it reaches Redis: a result
/// over `limits.max_result_bytes` fails its task for good naming the limit
/// (and the task after it, as any failure does), an error text is cut to
/// 8 KiB in the status and the history alike, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_limit_fails_its_task_and_a_long_error_is_cut() {
    let mut config = common::test_config(&common::unique_prefix("bounds"));
    config.limits.max_result_bytes = 1024;
    let mut d = Deployment::with_config(config).await;
    let journal = open_journal(&mut d, "bounds");
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    let big = json!({"blob": "x".repeat(2_000)});
    let loud = format!("disk full: {}", "y".repeat(100_000));
    client
        .submit(&json!({"id": "bounded", "requestor": "r", "tasks": [
            {"name": "big", "handler": "noop", "params": big},
            {"name": "after", "handler": "noop", "after": ["big"]},
            {"name": "loud", "handler": "fail", "params": {"permanent": true, "message": loud}},
            {"name": "small", "handler": "noop", "params": {"n": 1}}]}))
        .await;
    let status = d.wait_terminal("bounded", WAIT).await;
    assert_eq!(status.state, JobState::Failed);

    let task = &status.tasks["big"];
    assert_eq!((task.state, task.attempts), (TaskState::Failed, 1));
    assert_eq!(task.result, Value::Null);
    let expected = format!(
        "result is {} bytes of JSON, over limits.max_result_bytes (1024)",
        big.to_string().len()
    );
    let error = task.error.as_deref().unwrap_or_default();
    assert!(error.starts_with(&expected), "{error}");
    assert_eq!(
        status.tasks["after"].error.as_deref(),
        Some("dependency failed: big")
    );

    let error = status.tasks["loud"].error.clone().unwrap_or_default();
    assert!(error.len() <= 8 * 1024, "{} bytes", error.len());
    assert!(error.starts_with("disk full: yyy"), "{error:.40}");
    assert!(error.contains(" bytes cut ...] "), "{error:.40}");
    let recorded = status
        .history
        .iter()
        .find(|h| h.task.as_deref() == Some("loud") && h.to == "failed")
        .expect("the loud task's failure in the history");
    assert!(
        recorded.reason.len() <= 8 * 1024 + 100,
        "{}",
        recorded.reason.len()
    );

    assert_eq!(status.tasks["small"].state, TaskState::Succeeded);
    assert_eq!(status.tasks["small"].result, json!({"n": 1}));
    assert_eq!(outcomes(&journal, "bounded", 0), ended(&[(1, "failed")]));
    assert_invariants(&d, &["bounded"], &journal).await;

    d.assert_serves(&client, "next", WAIT).await;
    client.close().await;
    d.shutdown().await;
}

/// What a join is handed is bounded too: a task whose dependencies'
/// results together pass `limits.max_inputs_bytes` fails for good naming
/// the limit and what they total, without its handler running (the claim
/// does not read them out of Redis), and its dependents fail after it; a
/// task over fewer of the same results runs with all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_inputs_pass_the_limit_fails_and_a_smaller_one_runs() {
    let mut config = common::test_config(&common::unique_prefix("inputs"));
    config.limits.max_result_bytes = 1024;
    config.limits.max_inputs_bytes = 2048;
    let mut d = Deployment::with_config(config).await;
    let journal = open_journal(&mut d, "inputs");
    d.start_dispatcher().await;
    d.start_worker(4).await;
    let client = Client::connect(&d.config.prefix).await;
    let part = |n: u32| json!({"n": n, "blob": "x".repeat(900)});
    let each = part(0).to_string().len();
    assert!(2 * each <= 2048 && 3 * each > 2048, "{each} bytes a part");
    client
        .submit(&json!({"id": "joins", "requestor": "r", "tasks": [
            {"name": "p0", "handler": "noop", "params": part(0)},
            {"name": "p1", "handler": "noop", "params": part(1)},
            {"name": "p2", "handler": "noop", "params": part(2)},
            {"name": "all", "handler": "noop", "after": ["p0", "p1", "p2"]},
            {"name": "after-all", "handler": "noop", "after": ["all"]},
            {"name": "two", "handler": "shell", "after": ["p0", "p1"],
             "params": {"command": "python3", "args": ["-c",
                "import json,sys; d=json.load(sys.stdin)['deps']; \
                 print(json.dumps({k: len(v['blob']) for k, v in d.items()}))"]}}]}))
        .await;
    let status = d.wait_terminal("joins", WAIT).await;
    assert_eq!(status.state, JobState::Failed);

    let all = &status.tasks["all"];
    assert_eq!((all.state, all.attempts), (TaskState::Failed, 1));
    let expected = format!(
        "the results of its 3 dependencies total {} bytes of JSON, over \
         limits.max_inputs_bytes (2048)",
        3 * each
    );
    let error = all.error.as_deref().unwrap_or_default();
    assert!(error.starts_with(&expected), "{error}");
    assert_eq!(
        status.tasks["after-all"].error.as_deref(),
        Some("dependency failed: all")
    );
    let two = &status.tasks["two"];
    assert_eq!(two.state, TaskState::Succeeded, "{:?}", two.error);
    assert_eq!(
        two.result,
        json!({"p0": 900, "p1": 900}),
        "both inputs whole"
    );
    assert_eq!(outcomes(&journal, "joins", 5), ended(&[(1, "succeeded")]));
    assert_invariants(&d, &["joins"], &journal).await;

    d.assert_serves(&client, "next", WAIT).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_counts_as_a_failed_attempt_and_the_worker_survives() {
    let mut d = Deployment::new("panic").await;
    let journal = open_journal(&mut d, "panic");
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "boom", "requestor": "r", "tasks": [
            {"name": "p", "handler": "fail", "params": {"panic": true},
             "retry": {"max_attempts": 3, "base_ms": 10, "cap_ms": 20}}]}))
        .await;
    let status = d.wait_terminal("boom", WAIT).await;
    assert_eq!(status.state, JobState::Failed);
    let p = &status.tasks["p"];
    assert_eq!(p.attempts, 3);
    let error = p.error.as_deref().unwrap_or("");
    assert!(
        error.contains("handler panicked") && error.contains("attempts used up"),
        "{error}"
    );
    d.assert_serves(&client, "after-panic", WAIT).await;
    assert_eq!(
        outcomes(&journal, "boom", 0),
        ended(&[(1, "retry"), (2, "retry"), (3, "retry")])
    );
    assert_eq!(
        outcomes(&journal, "after-panic", 0),
        ended(&[(1, "succeeded")])
    );
    assert_invariants(&d, &["boom", "after-panic"], &journal).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs_past_its_timeout_fails_with_the_reason() {
    let mut d = Deployment::new("hang").await;
    let journal = open_journal(&mut d, "hang");
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "hung", "requestor": "r", "tasks": [
            {"name": "h", "handler": "sleep", "params": {"ms": 60000}, "timeout_s": 0.3,
             "retry": {"max_attempts": 1}}]}))
        .await;
    let status = d.wait_terminal("hung", WAIT).await;
    assert_eq!(status.state, JobState::Failed);
    let error = status.tasks["h"].error.clone().unwrap_or_default();
    assert!(error.contains("timed out after 0.3s"), "{error}");
    // The run was stopped at its time-out (plus the worker's margin), not
    // when the handler's 60 s sleep ended.
    let runs = runs_of(&journal, "hung", 0);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let took = Duration::from_nanos((runs[0].end.unwrap() - runs[0].start) as u64);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "the hung run lasted {took:?}"
    );
    assert_eq!(runs[0].outcome.as_deref(), Some("retry"));
    assert_invariants(&d, &["hung"], &journal).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_is_requeued_as_the_next_attempt_and_the_late_outcome_is_rejected() {
    let mut d = Deployment::new("lease").await;
    let journal = open_journal(&mut d, "lease");
    // The ghost worker keeps its journal as a real worker would.
    let ghost_journal = Journal::open(&journal, "ghost").unwrap();
    let ghost_lease = Duration::from_millis(300);
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "orphan", "requestor": "r", "tasks": [{"name": "t", "handler": "noop", "params": {"v": 7}}]}))
        .await;
    eventually("the job recorded", WAIT, || async {
        d.status("orphan").await
    })
    .await;
    // A worker that claims the task and then dies: its lease lapses.
    let msg = TaskMessage {
        job: "orphan".into(),
        task: "t".into(),
        idx: 0,
        attempt: 1,
        queue: "default".into(),
    };
    let ClaimOutcome::Claimed(ghost) = d.store.claim(&msg, "ghost", ghost_lease).await.unwrap()
    else {
        panic!("first claim must succeed");
    };
    ghost_journal.record('S', &ghost.claim, None);
    // A second claim of the same attempt fails while the first is live.
    assert_eq!(
        d.store
            .claim(&msg, "other", Duration::from_secs(5))
            .await
            .unwrap(),
        ClaimOutcome::Busy
    );
    d.start_worker(2).await;
    let status = d.wait_terminal("orphan", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded);
    assert_eq!(status.tasks["t"].attempts, 2);
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason.starts_with("lease expired (worker ghost)")),
        "{:#?}",
        status.history
    );
    // The ghost wakes up and reports: rejected, and nothing changes.
    ghost_journal.record('E', &ghost.claim, Some("succeeded"));
    let late = d
        .store
        .complete(
            &ghost.claim,
            "ghost",
            &AttemptResult::Succeeded("\"ghost result\"".into()),
        )
        .await
        .unwrap();
    assert_eq!(late, Applied::Stale);
    let after = d.status("orphan").await.unwrap();
    assert_eq!(after, status);
    assert_eq!(after.tasks["t"].result, json!({"v": 7}));
    let runs = runs_of(&journal, "orphan", 0);
    let by: Vec<(&str, u32)> = runs
        .iter()
        .map(|r| (r.worker.as_str(), r.attempt))
        .collect();
    assert_eq!(by, [("ghost", 1), ("in-process", 2)], "{runs:?}");
    assert_jobs_settled(&d, &["orphan"], WAIT).await;
    // The ghost's claim stopped being live when its short lease lapsed;
    // the worker's claim came after that.
    assert_no_overlapping_claims(&journal, |w| {
        if w == "ghost" {
            ghost_lease
        } else {
            d.config.lease()
        }
    });
    client.close().await;
    d.shutdown().await;
}

/// A worker whose claim is lost while its handler runs (its lease lapsed
/// and the task moved on, after a partition or a pause; or the store lost
/// it) stops that run at its next renewal rather than finish it beside the
/// new claim's run: here a `shell` task, its whole process group killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_claim_is_lost_is_stopped_at_the_next_renewal() {
    let mut d = Deployment::new("lostrun").await;
    // Renewed every third of it.
    d.config.worker.lease_ms = 900;
    let journal = open_journal(&mut d, "lostrun");
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let dir = Scratch::dir("lostrun");
    let beat = dir.join("beat");
    // A child in the background that touches a file every 50 ms, and a
    // long sleep in front.
    let script = format!(
        "(while true; do touch {}; sleep 0.05; done) & sleep 30",
        beat.display()
    );
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "moved", "requestor": "r", "tasks": [
            {"name": "t", "handler": "shell", "timeout_s": 60, "retry": {"max_attempts": 1},
             "params": {"command": "sh", "args": ["-c", script]}}]}))
        .await;
    eventually("the shell task beating", WAIT, || async {
        beat.exists().then_some(())
    })
    .await;
    // Another claim takes the task over (its fence replaces this one's),
    // as the sweep and a second worker would after a lapsed lease.
    let mut conn = common::redis_connection(&d.config).await;
    let taken_over = std::time::Instant::now();
    redis::cmd("HSET")
        .arg(d.names.job_key("moved"))
        .arg("f:0")
        .arg("1")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let run = eventually("the run stopped", WAIT, || async {
        runs_of(&journal, "moved", 0)
            .into_iter()
            .find(|r| r.end.is_some())
    })
    .await;
    let stopped_after = taken_over.elapsed();
    assert!(
        stopped_after < Duration::from_secs(5),
        "stopped {stopped_after:?} after the claim moved on: it ran to its end"
    );
    assert_eq!(run.outcome.as_deref(), Some("retry"), "{run:?}");
    // The whole process group is gone: the background child beats no more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = std::fs::metadata(&beat).unwrap().modified().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::metadata(&beat).unwrap().modified().unwrap(),
        last,
        "the shell task's background child outlived its stopped run"
    );
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_outcome_is_applied_once() {
    let mut d = Deployment::new("once").await;
    let journal = open_journal(&mut d, "once");
    let test_journal = Journal::open(&journal, "test").unwrap();
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "dup", "requestor": "r", "tasks": [
            {"name": "a", "handler": "noop"}, {"name": "b", "handler": "noop", "after": ["a"]}]}))
        .await;
    eventually("the job recorded", WAIT, || async { d.status("dup").await }).await;
    let msg = TaskMessage {
        job: "dup".into(),
        task: "a".into(),
        idx: 0,
        attempt: 1,
        queue: "default".into(),
    };
    let ClaimOutcome::Claimed(c) = d
        .store
        .claim(&msg, "w", Duration::from_secs(2))
        .await
        .unwrap()
    else {
        panic!("claim");
    };
    test_journal.record('S', &c.claim, None);
    test_journal.record('E', &c.claim, Some("succeeded"));
    let result = AttemptResult::Succeeded("1".into());
    let first = d.store.complete(&c.claim, "w", &result).await.unwrap();
    let second = d.store.complete(&c.claim, "w", &result).await.unwrap();
    let (
        Applied::Done {
            duplicate: false,
            ready: r1,
            ..
        },
        Applied::Done {
            duplicate: true,
            ready: r2,
            ..
        },
    ) = (&first, &second)
    else {
        panic!("{first:?} {second:?}");
    };
    // The repeat re-offers the same ready set, so follow-ups are never lost.
    assert_eq!(r1, r2);
    assert_eq!(r1.len(), 1);
    let status = d.status("dup").await.unwrap();
    let applied = status
        .history
        .iter()
        .filter(|h| h.task.as_deref() == Some("a") && h.to == "succeeded")
        .count();
    assert_eq!(applied, 1);
    // This "worker" never published the task its outcome made ready, as if
    // it crashed right after applying it: when its lease lapses the sweep
    // re-publishes b, and a worker finishes the job.
    d.start_worker(2).await;
    assert_eq!(
        d.wait_terminal("dup", WAIT).await.state,
        JobState::Succeeded
    );
    assert_eq!(outcomes(&journal, "dup", 1), ended(&[(1, "succeeded")]));
    assert_invariants(&d, &["dup"], &journal).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_its_task_failed_with_the_reason() {
    let mut d = Deployment::new("poison").await;
    d.config.worker.max_deliveries = 3;
    let journal = open_journal(&mut d, "poison");
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("toxic")).await;
    eventually("the job recorded", WAIT, || async {
        d.status("toxic").await
    })
    .await;
    // A consumer that crashes on the message before any outcome: it comes
    // back again and again.
    let conn = lapin::Connection::connect(common::AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            format!("{}.tasks.default", d.config.prefix).as_str().into(),
            "crasher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let delivery = next_delivery(&mut consumer).await;
        delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await
            .unwrap();
    }
    let _ = conn.close(200, "crashed".into()).await;
    d.start_worker(2).await;
    let status = d.wait_terminal("toxic", WAIT).await;
    assert_eq!(status.state, JobState::Failed);
    let error = status.tasks["t"].error.clone().unwrap_or_default();
    assert!(
        error.starts_with("poison message: delivered ") && error.contains("(limit 3)"),
        "{error}"
    );
    let (headers, body) = eventually("the dead letter", WAIT, || client.take_dead()).await;
    assert_eq!(headers["x-conveyor-reason-kind"], "poison");
    assert_eq!(
        serde_json::from_slice::<TaskMessage>(&body).unwrap().job,
        "toxic"
    );
    // Failed without ever being run.
    assert!(runs_of(&journal, "toxic", 0).is_empty());
    assert_invariants(&d, &["toxic"], &journal).await;
    client.close().await;
    d.shutdown().await;
}

/// A first delivery is no redelivery, whatever its headers say: a task
/// message carrying an `x-delivery-count` from an earlier life (one that
/// RabbitMQ's own delivery limit dead-lettered, published again as it
/// was) runs, rather than failing its task as poison before it ever ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_delivery_carrying_an_old_delivery_count_runs_and_is_not_poison() {
    let mut d = Deployment::new("count-header").await;
    d.config.worker.max_deliveries = 1;
    let journal = open_journal(&mut d, "count-header");
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("reborn")).await;
    // The dispatcher's task message taken off its queue, as a delivery
    // limit would, and published again with the count it carried then.
    let queue = d.names.task_queue("default");
    let conn = lapin::Connection::connect(common::AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let original = eventually("the task message", WAIT, || async {
        ch.basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    })
    .await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        lapin::types::AMQPValue::LongLongInt(5),
    );
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        &original.delivery.data,
        lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    d.start_worker(2).await;
    let status = d.wait_terminal("reborn", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(runs_of(&journal, "reborn", 0).len(), 1);
    assert!(client.take_dead().await.is_none(), "nothing dead-lettered");
    let _ = conn.close(200, "done".into()).await;
    client.close().await;
    d.shutdown().await;
}

/// Publish to `queue`, as a dispatcher would, the message of attempt 1
/// of task `t` (index 0) of job `job`; the message.
async fn publish_first_attempt(d: &Deployment, queue: &str, job: &str) -> TaskMessage {
    let message = TaskMessage {
        job: job.into(),
        task: "t".into(),
        idx: 0,
        attempt: 1,
        queue: "default".into(),
    };
    let broker = common::connect_broker(&d.config).await;
    broker
        .publish(vec![conveyor::broker::Outgoing::durable(
            queue,
            message.encode(),
        )])
        .await
        .unwrap();
    message
}

/// Write job `broken`'s record as the `fields` given, as a corruption (or
/// a version of Conveyor that wrote records otherwise) might leave it.
async fn write_broken_record(d: &Deployment, fields: &[&str]) {
    let mut redis = common::redis_connection(&d.config).await;
    redis::cmd("HSET")
        .arg(d.names.job_key("broken"))
        .arg(fields)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
}

/// A task whose job record the store cannot act on (here a ready task
/// with no fence or version, as a corruption or another version might
/// leave it) is dead-lettered at its first delivery with the store's
/// error, instead of going back to its queue to loop (for ever on a
/// classic queue, which counts no deliveries); the worker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_record_the_store_cannot_act_on_is_dead_lettered_with_the_error() {
    let mut d = Deployment::new("unusable").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    write_broken_record(
        &d,
        &[
            "id", "broken", "st", "pending", "n", "1", "s:0", "ready", "a:0", "1", "x:0", "1",
        ],
    )
    .await;
    broken_jobs_task_is_dead_lettered(d, "cannot claim task t of job broken").await;
}

/// A task whose job key holds another type of value (a string another
/// program wrote under the prefix) is dead-lettered the same way: Redis
/// answers such a script `WRONGTYPE`, a code redis-rs does not know, and
/// until the thirty-second session it was taken for an outage, so the
/// message went back to its queue for as long as the key stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_job_key_holds_another_type_is_dead_lettered_with_the_error() {
    let mut d = Deployment::new("wrong-type").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let mut redis = common::redis_connection(&d.config).await;
    redis::cmd("SET")
        .arg(d.names.job_key("broken"))
        .arg("not a hash")
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    broken_jobs_task_is_dead_lettered(d, "WRONGTYPE").await;
}

/// Publish the first attempt of job `broken`'s task and expect it
/// dead-lettered as `unusable_record`, with a reason that contains
/// `reason`, by the deployment `d`, which goes on serving.
async fn broken_jobs_task_is_dead_lettered(d: Deployment, reason: &str) {
    let message = publish_first_attempt(&d, &d.names.task_queue("default"), "broken").await;
    let client = Client::connect(&d.config.prefix).await;
    let (headers, body) = eventually("the dead letter", WAIT, || client.take_dead()).await;
    assert_eq!(
        headers["x-conveyor-reason-kind"], "unusable_record",
        "{headers:?}"
    );
    let given = headers["x-conveyor-reason"].clone();
    assert!(given.contains(reason), "{given}");
    assert_eq!(
        serde_json::from_slice::<TaskMessage>(&body).unwrap(),
        message
    );
    d.assert_serves(&client, "after-broken", WAIT).await;
    client.close().await;
    d.shutdown().await;
}

/// A submission under an id whose record the store cannot act on (here a
/// job hash whose task count is not a number) is dead-lettered at once as
/// `unusable_record` with the store's error, and its client is told why,
/// instead of being requeued to loop; the dispatcher goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_record_the_store_cannot_act_on_is_dead_lettered_and_refused() {
    let mut d = Deployment::new("unusable-submit").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    write_broken_record(&d, &["id", "broken", "st", "pending", "n", "x"]).await;
    let mut client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("broken")).await;
    let (correlation, reply) = client.reply().await;
    assert_eq!(correlation, "broken");
    assert_eq!(reply["accepted"], false, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot record job broken"), "{reply}");
    let (headers, body) = eventually("the dead letter", WAIT, || client.take_dead()).await;
    assert_eq!(
        headers["x-conveyor-reason-kind"], "unusable_record",
        "{headers:?}"
    );
    assert_eq!(headers["x-conveyor-source-queue"], d.names.submit_queue());
    assert_eq!(body, common::noop_job("broken").to_string().into_bytes());
    d.assert_serves(&client, "after-unusable-submit", WAIT)
        .await;
    client.close().await;
    d.shutdown().await;
}

/// README: with `runtime_threads = 1` (the default) handlers must not block
/// their thread and should use `spawn_blocking`. A handler that does, and
/// blocks past its time-out, on a worker with one runtime thread: each
/// attempt is timed out at its time-out (not when the blocking call
/// returns), the retry policy applies, and the worker keeps serving other
/// tasks while the blocking call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_in_spawn_blocking_past_its_timeout_is_timed_out_and_its_worker_keeps_serving()
 {
    const BLOCK_MS: u64 = 6_000;
    let mut d = Deployment::new("blockpool").await;
    let calls = BlockingCalls::default();
    d.registry.register(BlockInPool(calls.clone()));
    let journal = open_journal(&mut d, "blockpool");
    d.start_dispatcher().await;
    let worker = OneThreadWorker::start(&d, 4, &journal);
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "blocked", "requestor": "r", "tasks": [
            {"name": "b", "handler": "block_in_pool", "params": {"ms": BLOCK_MS}, "timeout_s": 0.3,
             "retry": {"max_attempts": 2, "base_ms": 50, "cap_ms": 100}}]}))
        .await;
    eventually("the first blocking call under way", WAIT, || async {
        (!calls.all().is_empty()).then_some(())
    })
    .await;
    let served: Vec<String> = (0..10).map(|i| format!("served-{i}")).collect();
    for id in &served {
        client.submit(&common::noop_job(id)).await;
    }
    for id in &served {
        assert_eq!(d.wait_terminal(id, WAIT).await.state, JobState::Succeeded);
    }
    let first = calls.all()[0].clone();
    assert!(
        first.attempt == 1 && first.end.is_none(),
        "the other jobs must have been served while the first call blocked: {first:?}"
    );
    let status = d.wait_terminal("blocked", WAIT).await;
    assert_eq!(status.state, JobState::Failed, "{status:#?}");
    let b = &status.tasks["b"];
    assert_eq!(b.attempts, 2);
    let error = b.error.clone().unwrap_or_default();
    assert!(
        error.contains("timed out after 0.3s") && error.contains("attempts used up"),
        "{error}"
    );
    // Each attempt ended at its time-out (0.3 s plus the worker's margin),
    // long before its blocking call returned.
    let runs = runs_of(&journal, "blocked", 0);
    assert_eq!(
        outcomes(&journal, "blocked", 0),
        ended(&[(1, "retry"), (2, "retry")])
    );
    for r in &runs {
        assert_eq!(r.worker, "one-thread");
        let took = Duration::from_nanos((r.end.unwrap() - r.start) as u64);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(BLOCK_MS / 2),
            "attempt {} lasted {took:?}",
            r.attempt
        );
    }
    for id in &served {
        assert_eq!(runs_of(&journal, id, 0)[0].worker, "one-thread");
    }
    let mut ids: Vec<&str> = served.iter().map(String::as_str).collect();
    ids.push("blocked");
    let counts = assert_invariants(&d, &ids, &journal).await;
    assert_eq!(counts.get(&JobState::Succeeded), Some(&served.len()));
    worker.stop().await;
    client.close().await;
    d.shutdown().await;
}

/// A handler that breaks README's rule and blocks the only thread of its
/// worker's runtime, for longer than its lease: the worker can neither
/// renew the lease nor enforce the time-out meanwhile (it discards the late
/// answer as a time-out afterwards). What still holds is what fencing
/// promises: the lease lapses, the task is re-queued and runs again, the
/// blocked run's late outcome is rejected, nothing is applied twice and no
/// two live claims overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_workers_only_thread_past_its_lease_is_run_again_and_its_late_outcome_rejected()
 {
    let mut d = Deployment::new("blockthread").await;
    d.config.worker.lease_ms = 1_000;
    let calls = BlockingCalls::default();
    d.registry.register(BlockThread(calls.clone()));
    let journal = open_journal(&mut d, "blockthread");
    d.start_dispatcher().await;
    let worker = OneThreadWorker::start(&d, 4, &journal);
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "blocked", "requestor": "r", "tasks": [
            {"name": "b", "handler": "block_thread", "params": {"ms": 2500, "attempts": 1},
             "timeout_s": 0.3, "retry": {"max_attempts": 3, "base_ms": 50, "cap_ms": 100}}]}))
        .await;
    eventually("the blocking call under way", WAIT, || async {
        (!calls.all().is_empty()).then_some(())
    })
    .await;
    // Another worker, free to take the task once the lease lapses.
    d.start_worker(2).await;
    let status = d.wait_terminal("blocked", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    let b = &status.tasks["b"];
    assert_eq!(b.attempts, 2);
    assert_eq!(b.result, json!({"attempt": 2}));
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason.starts_with("lease expired (worker one-thread-")),
        "{:#?}",
        status.history
    );
    // The blocked run did finish and report: its outcome was refused.
    let first = eventually("the blocked run's end", WAIT, || async {
        let runs = runs_of(&journal, "blocked", 0);
        runs.into_iter().find(|r| r.attempt == 1 && r.end.is_some())
    })
    .await;
    assert_eq!(first.worker, "one-thread");
    // It answered long past its time-out: a time-out (transient), not the
    // success it returned; and that outcome too was refused (stale claim).
    assert_eq!(first.outcome.as_deref(), Some("retry"));
    assert_eq!(d.status("blocked").await.unwrap(), status);
    assert_invariants(&d, &["blocked"], &journal).await;
    worker.stop().await;
    client.close().await;
    d.shutdown().await;
}

/// A duplicate of a task message that has run, delivered past the limit,
/// is no task's last hope: it is dropped as any stale duplicate is, not
/// dead-lettered as poison (its task was never failed, and an operator
/// reading the dead-letter queue would look for a failure that is not
/// there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_duplicate_delivered_past_the_limit_is_dropped_not_dead_lettered() {
    let mut d = Deployment::new("stale-poison").await;
    d.config.worker.max_deliveries = 1;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("ran")).await;
    let done = d.wait_terminal("ran", WAIT).await;
    assert_eq!(done.state, JobState::Succeeded);

    // A consumer ahead of the worker (higher priority) takes the duplicate
    // first, stops consuming and gives it back counted: the worker gets
    // it with one delivery behind it, the limit.
    let conn = lapin::Connection::connect(common::AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let queue = d.names.task_queue("default");
    let mut ahead = FieldTable::default();
    ahead.insert("x-priority".into(), lapin::types::AMQPValue::LongInt(1000));
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "ahead".into(),
            BasicConsumeOptions::default(),
            ahead,
        )
        .await
        .unwrap();
    publish_first_attempt(&d, &queue, "ran").await;
    let delivery = next_delivery(&mut consumer).await;
    ch.basic_cancel(
        "ahead".into(),
        lapin::options::BasicCancelOptions::default(),
    )
    .await
    .unwrap();
    delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    eventually("the worker settles the duplicate", WAIT, || async {
        (messages_in(&queue).await? == 0).then_some(())
    })
    .await;
    assert!(
        client.take_dead().await.is_none(),
        "a stale duplicate is not poison"
    );
    assert_eq!(d.status("ran").await.unwrap(), done, "nothing changed");
    let _ = conn.close(200, "done".into()).await;
    client.close().await;
    d.shutdown().await;
}

/// A worker whose slots are all busy with long tasks gives back what it
/// holds and, when one slot frees, takes one queued task to run and at
/// most one more to wait for the next slot: not a whole prefetch (its
/// concurrency) to keep from other workers and then send to the back of
/// the queue. Nothing is counted as redelivered, and every task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_worker_whose_slot_frees_takes_one_queued_task_not_a_prefetch_of_them() {
    let mut d = Deployment::new("narrow").await;
    d.config.worker.hold_ms = 300;
    d.config.worker.max_deliveries = 1;
    let journal = open_journal(&mut d, "narrow");
    d.start_dispatcher().await;
    d.start_worker_without_submissions(4).await;
    let client = Client::connect(&d.config.prefix).await;
    d.start_long_task(&client, "first", 2_500).await;
    for i in 0..3 {
        d.start_long_task(&client, &format!("long-{i}"), 6_000)
            .await;
    }
    let queued: Vec<String> = (0..6).map(|i| format!("queued-{i}")).collect();
    for id in &queued {
        client
            .submit(&json!({"id": id, "requestor": "r",
                "tasks": [{"name": "t", "handler": "sleep", "params": {"ms": 3_000}}]}))
            .await;
    }
    let broker = common::connect_broker(&d.config).await;
    let queue = d.names.task_queue("default");
    let ready = || async {
        broker
            .queue_stats(std::slice::from_ref(&queue))
            .await
            .ok()
            .and_then(|stats| stats.first().map(|s| s.ready))
    };
    eventually("the queued tasks are given back", WAIT, || async {
        (ready().await? == 6).then_some(())
    })
    .await;

    // The short task ends and frees a slot: one queued task runs in it;
    // watch the queue while the worker is full again.
    let first = d.wait_terminal("first", WAIT).await;
    assert_eq!(first.state, JobState::Succeeded, "{first:#?}");
    let mut fewest = u32::MAX;
    let watch_until = tokio::time::Instant::now() + Duration::from_millis(1_200);
    while tokio::time::Instant::now() < watch_until {
        if let Some(n) = ready().await {
            fewest = fewest.min(n);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fewest >= 6 - 2,
        "with one slot free the worker took {} of the queued tasks out of \
         the queue at once (one to run, one to wait for a slot at most)",
        6 - fewest
    );
    let running = eventually("one queued task runs", WAIT, || async {
        let mut running = Vec::new();
        for id in &queued {
            if d.status(id).await?.tasks["t"].state == TaskState::Running {
                running.push(id.clone());
            }
        }
        (!running.is_empty()).then_some(running)
    })
    .await;
    assert_eq!(running.len(), 1, "{running:?}");

    let ids: Vec<&str> = ["first", "long-0", "long-1", "long-2"]
        .into_iter()
        .chain(queued.iter().map(String::as_str))
        .collect();
    for id in &ids {
        let status = d.wait_terminal(id, WAIT).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        assert_eq!(status.tasks["t"].attempts, 1, "{status:#?}");
    }
    assert_invariants(&d, &ids, &journal).await;
    assert!(client.take_dead().await.is_none(), "nothing turned poison");
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_every_slot_busy_gives_held_tasks_back_for_an_idle_worker_uncounted() {
    let mut d = Deployment::new("hold").await;
    d.config.worker.hold_ms = 500;
    // A redelivery would be poison: the given-back task must come back as
    // a new message, not as a requeued (counted) one.
    d.config.worker.max_deliveries = 1;
    let journal = open_journal(&mut d, "hold");
    d.start_dispatcher().await;
    let busy = d.start_worker(1).await;
    let client = Client::connect(&d.config.prefix).await;
    d.start_long_task(&client, "long", 8000).await;
    // The busy worker acked the long task's delivery after its claim, so
    // it has room under its prefetch and takes the next task message too,
    // with no slot to run it in.
    client.submit(&common::noop_job("short")).await;
    d.wait_until_held("short").await;
    let idle = d.start_worker(1).await;
    let short = d.wait_terminal("short", Duration::from_secs(6)).await;
    assert_eq!(short.state, JobState::Succeeded, "{short:#?}");
    assert_eq!(short.tasks["t"].worker.as_deref(), Some(idle.as_str()));
    assert_eq!(short.tasks["t"].attempts, 1);
    let long = d.status("long").await.unwrap();
    assert_eq!(
        (long.tasks["t"].state, long.tasks["t"].worker.as_deref()),
        (TaskState::Running, Some(busy.as_str())),
        "the short task waited for the long one"
    );
    assert_eq!(outcomes(&journal, "short", 0), ended(&[(1, "succeeded")]));
    assert_invariants(&d, &["long", "short"], &journal).await;
    client.close().await;
    d.shutdown().await;
}
