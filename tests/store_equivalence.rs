//! The Lua scripts and the Rust state machine are one specification: the
//! same random operations, applied to the Redis store (real Redis) and to
//! the in-process store, must give the same answers and the same job
//! statuses, step by step. A failure prints the seed to replay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use conveyor::config::Config;
use conveyor::intake::{Intake, JobIntake, PlannedJob, Rejection};
use conveyor::model::{TaskMessage, TaskState};
use conveyor::store::memory::{MemoryStore, SystemClock};
use conveyor::store::{
    Applied, AttemptResult, ClaimOutcome, ClaimRef, Created, JobStatus, ScheduleIndex, Store,
    SweepAction,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// A lease or retry delay that outlasts any run of this test: one that
/// lapsed between the two stores' calls (a slow run passes 60 s) would
/// split their answers without either being wrong.
const LATER_MS: u64 = 3_600_000;

fn normalise(mut s: JobStatus) -> JobStatus {
    s.created_ms = 0;
    s.updated_ms = 0;
    for h in &mut s.history {
        h.at = 0;
    }
    for t in s.tasks.values_mut() {
        t.next_attempt_at_ms = t.next_attempt_at_ms.map(|_| 0);
    }
    s
}

/// The two stores' answers to a claim must be the same but for the fence:
/// a fence is at least the claim's moment (`machine::fence_floor`), and
/// each store reads its own clock. Returns both claims, to go on with.
fn same_claim(a: ClaimOutcome, b: ClaimOutcome, ctx: &str) -> Option<(ClaimRef, ClaimRef)> {
    match (a, b) {
        (ClaimOutcome::Claimed(a), ClaimOutcome::Claimed(b)) => {
            let (fa, fb) = (a.claim.fence, b.claim.fence);
            assert!(
                fa > conveyor::machine::FENCE_FLOOR && fb > conveyor::machine::FENCE_FLOOR,
                "{ctx}: fences {fa} and {fb} under the floor"
            );
            let mut b_as_a = b.clone();
            b_as_a.claim.fence = fa;
            assert_eq!(a, b_as_a, "{ctx}");
            Some((a.claim, b.claim))
        }
        (a, b) => {
            assert_eq!(a, b, "{ctx}");
            None
        }
    }
}

/// Every message the sweep's actions publish, in order.
fn published(actions: &[SweepAction]) -> Vec<TaskMessage> {
    actions.iter().flat_map(|a| a.publish.clone()).collect()
}

fn sorted(mut actions: Vec<SweepAction>) -> Vec<SweepAction> {
    actions.sort_by(|a, b| a.entry.cmp(&b.entry));
    actions
}

/// The Redis store of `config` and a memory store of the same epoch and
/// retention, to drive side by side.
async fn redis_and_memory(
    config: &Config,
) -> (Arc<conveyor::store::redis::RedisStore>, MemoryStore) {
    let redis = common::connect_store(config, "eq").await;
    let epoch = redis.check_epoch().await.unwrap();
    let retention = Duration::from_secs(config.retention_s);
    let memory = MemoryStore::new(Arc::new(SystemClock), retention, epoch, "eq");
    (redis, memory)
}

/// [`redis_and_memory`] as named stores, to run one scenario on each.
async fn side_by_side(config: &Config) -> [(&'static str, Arc<dyn Store>); 2] {
    let (redis, memory) = redis_and_memory(config).await;
    [("redis", redis), ("memory", Arc::new(memory))]
}

/// The members of the sorted set `key` in the Redis of `config`, lowest
/// score first.
async fn members(config: &Config, key: &str) -> Vec<String> {
    let mut conn = common::redis_connection(config).await;
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// `body` as the intake of the built-in handlers plans it; panics unless
/// the job is valid.
fn plan(body: &serde_json::Value) -> PlannedJob {
    let intake = JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry()).unwrap();
    let Intake::Valid(planned) = intake.accept(body.to_string().as_bytes()) else {
        panic!("invalid job: {body}");
    };
    planned
}

fn random_job(rng: &mut StdRng, id: &str) -> serde_json::Value {
    let n = rng.random_range(1..=5);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let after: Vec<String> = (0..i)
                .filter(|_| rng.random_bool(0.4))
                .map(|d| format!("t{d}"))
                .collect();
            json!({"name": format!("t{i}"), "handler": "noop", "after": after,
                "retry": {"max_attempts": rng.random_range(1..=3), "base_ms": 0, "cap_ms": 0}})
        })
        .collect();
    json!({"id": id, "requestor": "eq", "tasks": tasks})
}

/// A whole audit of `store`'s job index: the schedule entries its records
/// call for (index and entry, sorted) and how many were added.
async fn audit_all(store: &dyn Store) -> (Vec<(ScheduleIndex, String)>, usize) {
    let (mut wanted, mut added) = (Vec::new(), 0);
    let mut cursor: Option<String> = None;
    loop {
        let page = store.audit_jobs(cursor.as_deref(), 7).await.unwrap();
        wanted.extend(page.wanted.into_iter().map(|e| (e.index, e.entry)));
        added += page.added;
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    wanted.sort();
    // A walk may meet an entry twice (`ZSCAN` promises at least once).
    wanted.dedup();
    (wanted, added)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_memory_stores_agree_on_every_transition() {
    let config = common::test_config(&common::unique_prefix("equiv"));
    let (redis, memory) = redis_and_memory(&config).await;
    let intake = JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry()).unwrap();
    let seeds = 150u64;
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut jobs: Vec<(String, usize)> = Vec::new();
        // Each claim as Redis and as the memory store handed it out.
        let mut claims: Vec<(ClaimRef, ClaimRef)> = Vec::new();
        for step in 0..40 {
            let ctx = format!("seed {seed} step {step}");
            // When a sweep read its actions, by the clock of the store it read.
            let read_at = |actions: &[SweepAction]| actions.first().map_or(0, |x| x.read_at);
            let op = rng.random_range(0..100);
            if jobs.is_empty() || op < 10 {
                // Create (sometimes a duplicate id).
                let id = if !jobs.is_empty() && rng.random_bool(0.2) {
                    jobs[rng.random_range(0..jobs.len())].0.clone()
                } else {
                    format!("s{seed}-j{}", jobs.len())
                };
                let body = random_job(&mut rng, &id).to_string();
                let Intake::Valid(planned) = intake.accept(body.as_bytes()) else {
                    panic!("{ctx}: generated job invalid");
                };
                if rng.random_bool(0.5) {
                    let a = redis.create_job(&planned).await.unwrap();
                    let b = memory.create_job(&planned).await.unwrap();
                    assert_eq!(a, b, "{ctx}: create");
                } else {
                    // As a worker taking submissions records a job: one
                    // call on Redis, two on the memory store.
                    let root = planned.roots().next().unwrap();
                    let lease = Duration::from_millis(LATER_MS);
                    let (created_a, a) = redis
                        .create_job_and_claim(&planned, root, "w", lease)
                        .await
                        .unwrap();
                    let (created_b, b) = memory
                        .create_job_and_claim(&planned, root, "w", lease)
                        .await
                        .unwrap();
                    assert_eq!(created_a, created_b, "{ctx}: create and claim");
                    claims.extend(same_claim(a, b, &format!("{ctx}: create and claim")));
                }
                if !jobs.iter().any(|(j, _)| *j == id) {
                    jobs.push((id, planned.tasks.len()));
                }
            } else if op < 14 {
                let r = Rejection {
                    id: format!("s{seed}-rej{step}"),
                    requestor: "eq".into(),
                    error: "bad".into(),
                };
                assert_eq!(
                    redis.record_rejected(&r).await.unwrap(),
                    memory.record_rejected(&r).await.unwrap(),
                    "{ctx}: reject"
                );
            } else if op < 40 {
                let (job, n) = jobs[rng.random_range(0..jobs.len())].clone();
                let idx = rng.random_range(0..n as u32);
                let attempt = rng.random_range(0..=3);
                let msg = TaskMessage {
                    job,
                    task: format!("t{idx}"),
                    idx,
                    attempt,
                    queue: "default".into(),
                };
                let lease = Duration::from_millis(if rng.random_bool(0.3) { 0 } else { LATER_MS });
                let a = redis.claim(&msg, "w", lease).await.unwrap();
                let b = memory.claim(&msg, "w", lease).await.unwrap();
                claims.extend(same_claim(a, b, &format!("{ctx}: claim {msg:?}")));
            } else if op < 65 && !claims.is_empty() {
                let (claim, claim_b) = claims[rng.random_range(0..claims.len())].clone();
                let result = match rng.random_range(0..3) {
                    0 => AttemptResult::Succeeded(format!("{{\"v\":{step}}}")),
                    1 => AttemptResult::Retry {
                        error: "flaky".into(),
                        delay: Duration::from_millis(if rng.random_bool(0.5) {
                            0
                        } else {
                            LATER_MS
                        }),
                    },
                    _ => AttemptResult::Failed("broken".into()),
                };
                let a: Applied = redis.complete(&claim, "w", &result).await.unwrap();
                let b = memory.complete(&claim_b, "w", &result).await.unwrap();
                assert_eq!(a, b, "{ctx}: complete {claim:?} {result:?}");
            } else if op < 70 && !claims.is_empty() {
                let lease = Duration::from_millis(if rng.random_bool(0.5) { 0 } else { LATER_MS });
                let (of_redis, of_memory): (Vec<ClaimRef>, Vec<ClaimRef>) =
                    claims.iter().cloned().unzip();
                assert_eq!(
                    redis.renew(&of_redis, lease).await.unwrap(),
                    memory.renew(&of_memory, lease).await.unwrap(),
                    "{ctx}: renew"
                );
            } else if op < 75 && !claims.is_empty() {
                let (claim, claim_b) = claims[rng.random_range(0..claims.len())].clone();
                assert_eq!(
                    redis.release(&claim, "w").await.unwrap(),
                    memory.release(&claim_b, "w").await.unwrap(),
                    "{ctx}: release"
                );
            } else if op < 78 && !claims.is_empty() {
                let (claim, claim_b) = claims[rng.random_range(0..claims.len())].clone();
                redis.recheck(&claim).await.unwrap();
                memory.recheck(&claim_b).await.unwrap();
            } else if op < 85 {
                let a = sorted(redis.due_retries(1000).await.unwrap());
                let b = sorted(memory.due_retries(1000).await.unwrap());
                assert_eq!(a, b, "{ctx}: due retries");
                let entries: Vec<String> = a.iter().map(|x| x.entry.clone()).collect();
                redis.forget_retries(&entries, read_at(&a)).await.unwrap();
                memory.forget_retries(&entries, read_at(&b)).await.unwrap();
            } else if op < 95 {
                let a = sorted(redis.expired_leases(1000, "sweep").await.unwrap());
                let b = sorted(memory.expired_leases(1000, "sweep").await.unwrap());
                assert_eq!(a, b, "{ctx}: expired leases");
                let entries: Vec<String> = a.iter().map(|x| x.entry.clone()).collect();
                redis.forget_leases(&entries, read_at(&a)).await.unwrap();
                memory.forget_leases(&entries, read_at(&b)).await.unwrap();
            } else if op < 98 {
                let (job, n) = jobs[rng.random_range(0..jobs.len())].clone();
                let idx = rng.random_range(0..n as u32);
                let msg = TaskMessage {
                    job,
                    task: format!("t{idx}"),
                    idx,
                    attempt: rng.random_range(0..=2),
                    queue: "default".into(),
                };
                assert_eq!(
                    redis.fail_poisoned(&msg, "poison").await.unwrap(),
                    memory.fail_poisoned(&msg, "poison").await.unwrap(),
                    "{ctx}: poison"
                );
            } else {
                // The two walk the job index in different orders and read
                // their own clocks: the entries called for and the number
                // added are what must agree.
                let (a, added_a) = audit_all(redis.as_ref()).await;
                let (b, added_b) = audit_all(&memory).await;
                assert_eq!(a, b, "{ctx}: audit");
                assert_eq!(added_a, added_b, "{ctx}: audit added");
            }
            for (id, _) in &jobs {
                let a = redis.job(id).await.unwrap().map(normalise);
                let b = memory.job(id).await.unwrap().map(normalise);
                assert_eq!(a, b, "{ctx}: status of {id}");
            }
        }
    }
    common::cleanup(&config).await;
}

/// Claim attempt 1 of task `t` (index 0, queue `default`) of job `id`,
/// for worker `w`; panics unless it is claimed.
async fn claim_first_attempt(store: &dyn Store, id: &str) -> conveyor::store::Claimed {
    claim_first_attempt_of(store, id, 0, "t").await
}

/// Record job `id` (one `noop` task `t`) in `store`; the message of its
/// first attempt.
async fn create_noop_job(store: &dyn Store, id: &str) -> TaskMessage {
    store
        .create_job(&plan(&common::noop_job(id)))
        .await
        .unwrap();
    first_message(id)
}

/// The message of attempt 1 of task `t` (index 0) of job `id`.
fn first_message(id: &str) -> TaskMessage {
    TaskMessage {
        job: id.to_owned(),
        task: "t".into(),
        idx: 0,
        attempt: 1,
        queue: "default".into(),
    }
}

/// A Redis store reaching Redis through a forwarder the test can cut
/// (prefix from `name`): the test's config (direct), the forwarder and
/// the store.
async fn store_through_a_cutter(
    name: &str,
) -> (
    Config,
    common::cutter::Cutter,
    Arc<conveyor::store::redis::RedisStore>,
) {
    let config = common::test_config(&common::unique_prefix(name));
    let cutter = common::cutter::Cutter::start(common::port_of(&config.redis_url)).await;
    let through = Config {
        redis_url: cutter.redis_url(),
        ..config.clone()
    };
    let store = common::connect_store(&through, "eq").await;
    (config, cutter, store)
}

/// Claim the root `t` of noop job `id` for worker `w`: by a submission
/// (recording the job and claiming in one call), or by its message (the
/// job recorded before).
async fn claim_root(
    store: &dyn Store,
    id: &str,
    by_submission: bool,
    lease: Duration,
) -> Result<ClaimOutcome, conveyor::store::StoreError> {
    if by_submission {
        let job = plan(&common::noop_job(id));
        store
            .create_job_and_claim(&job, 0, "w", lease)
            .await
            .map(|(_, outcome)| outcome)
    } else {
        store.claim(&first_message(id), "w", lease).await
    }
}

/// Failing a poisoned task is answered the same when the call comes again
/// (sent again after its reply was lost): the task was failed, with that
/// reason, so its message is dead-lettered, not dropped as stale. Another
/// reason, or a task that was not failed as poisoned, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_a_poisoned_task_again_is_answered_as_the_first_time() {
    let config = common::test_config(&common::unique_prefix("poisonagain"));
    for (name, store) in side_by_side(&config).await {
        let message = create_noop_job(store.as_ref(), "p").await;
        let failed = store.fail_poisoned(&message, "delivered 5 times").await;
        assert!(failed.unwrap(), "{name}");
        let again = store.fail_poisoned(&message, "delivered 5 times").await;
        assert!(again.unwrap(), "{name}: the same call again");
        let other = store.fail_poisoned(&message, "another reason").await;
        assert!(!other.unwrap(), "{name}: another reason");
        let status = store.job("p").await.unwrap().unwrap();
        assert_eq!(
            status.tasks["t"].error.as_deref(),
            Some("delivered 5 times")
        );
        assert_eq!(status.version, 2, "{name}: failed once: {status:#?}");
        let message = create_noop_job(store.as_ref(), "never-poisoned").await;
        assert!(
            !store
                .fail_poisoned(
                    &TaskMessage {
                        attempt: 2,
                        ..message
                    },
                    "x"
                )
                .await
                .unwrap()
        );
    }
    common::cleanup(&config).await;
}

/// A completion on a record whose counters are not numbers (corrupt, or
/// written by another version) fails whole, before its first write: the
/// task is left running under its claim, with its lease, and no history
/// written, rather than half settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_on_a_record_it_cannot_use_fails_before_writing_anything() {
    let config = common::test_config(&common::unique_prefix("halfwrite"));
    let store = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    create_noop_job(store.as_ref(), "j").await;
    let claimed = claim_first_attempt(store.as_ref(), "j").await;
    let mut conn = common::redis_connection(&config).await;
    redis::cmd("HSET")
        .arg(names.job_key("j"))
        .arg(&["v", "x"])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // The job's hash and the length of its history.
    let record = redis::pipe()
        .cmd("HGETALL")
        .arg(names.job_key("j"))
        .cmd("LLEN")
        .arg(names.history_key("j"))
        .to_owned();
    let before: (std::collections::HashMap<String, String>, usize) =
        record.query_async(&mut conn).await.unwrap();

    let ok = AttemptResult::Succeeded("{}".into());
    let refused = store.complete(&claimed.claim, "w", &ok).await;

    assert!(
        matches!(&refused, Err(e) if !e.is_retryable()),
        "{refused:?}"
    );
    let after: (std::collections::HashMap<String, String>, usize) =
        record.query_async(&mut conn).await.unwrap();
    assert_eq!(after, before, "nothing written");
    common::cleanup(&config).await;
}

/// A claim whose answer is lost, with Redis out of reach for a moment
/// after (the claim sent again at once on a fresh connection is refused
/// too), is sent again once Redis answers, and answered with the claim it
/// made: told the store was unavailable, its worker would give the
/// message back, the copy's claim would find the task `busy` and be
/// dropped, and the claim made would lapse, an attempt spent for nothing
/// (with `max_attempts` 1, the task failed without ever running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_was_lost_in_a_short_outage_is_answered_with_the_claim_it_made() {
    let (config, cutter, store) = store_through_a_cutter("lostoutage").await;
    for (id, by_submission) in [("by-message", false), ("by-submission", true)] {
        if !by_submission {
            create_noop_job(store.as_ref(), id).await;
        }
        cutter.drop_next_reply_then_cut();
        let started = tokio::time::Instant::now();
        let claiming = tokio::spawn({
            let store = store.clone();
            let id = id.to_owned();
            async move { claim_root(store.as_ref(), &id, by_submission, Duration::from_secs(30)).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cutter.dropped_a_reply() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: no reply dropped"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        cutter.heal();
        let outcome = claiming.await.unwrap();
        assert!(
            matches!(&outcome, Ok(ClaimOutcome::Claimed(c)) if c.claim.attempt == 1),
            "{id}: {outcome:?}"
        );
        // Answered by a sending after the heal, not the first.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{id}: answered after {:?}, before the link healed",
            started.elapsed()
        );
        let status = store.job(id).await.unwrap().unwrap();
        assert_eq!(status.tasks["t"].state, TaskState::Running, "{id}");
    }
    common::cleanup(&config).await;
}

/// The same for every path that fails a task (and may settle its job): a
/// permanent failure, a lapsed lease found by the sweep and a poisoned
/// message each fail whole on a record whose retention is not a number,
/// before their first write, instead of leaving the task failed and the job
/// half settled (state set, no history, no expiry). The sweep sets the
/// lapsed claim's entry aside rather than failing its pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_on_a_record_it_cannot_use_fails_before_writing_anything() {
    let config = common::test_config(&common::unique_prefix("halffail"));
    let store = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    let failing = create_noop_job(store.as_ref(), "failing").await;
    let lease_lapses = create_noop_job(store.as_ref(), "lapsed").await;
    let poisoned = create_noop_job(store.as_ref(), "poisoned").await;
    let claimed = claim_first_attempt(store.as_ref(), &failing.job).await;
    let lapsing = match store
        .claim(&lease_lapses, "w", Duration::from_millis(1))
        .await
    {
        Ok(ClaimOutcome::Claimed(c)) => c,
        other => panic!("claim of lapsed: {other:?}"),
    };
    drop(lapsing);
    let record = |id: &str| {
        redis::pipe()
            .cmd("HGETALL")
            .arg(names.job_key(id))
            .cmd("LLEN")
            .arg(names.history_key(id))
            .cmd("PTTL")
            .arg(names.job_key(id))
            .to_owned()
    };
    type Record = (std::collections::HashMap<String, String>, usize, i64);
    let mut before = Vec::new();
    for id in ["failing", "lapsed", "poisoned"] {
        redis::cmd("HSET")
            .arg(names.job_key(id))
            .arg(&["ret", "a week"])
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let r: Record = record(id).query_async(&mut conn).await.unwrap();
        before.push(r);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;

    let failed = AttemptResult::Failed("boom".into());
    let refused = store.complete(&claimed.claim, "w", &failed).await;
    assert!(
        matches!(&refused, Err(e) if !e.is_retryable()),
        "{refused:?}"
    );
    let swept = store.expired_leases(100, "sweep").await;
    assert_eq!(swept.unwrap(), Vec::new(), "the entry is set aside");
    let poison = store.fail_poisoned(&poisoned, "delivered 5 times").await;
    assert!(matches!(&poison, Err(e) if !e.is_retryable()), "{poison:?}");

    for (id, before) in ["failing", "lapsed", "poisoned"].into_iter().zip(before) {
        let after: Record = record(id).query_async(&mut conn).await.unwrap();
        assert_eq!(after, before, "{id}: nothing written");
    }
    common::cleanup(&config).await;
}

/// A claim whose answer is lost with its connection (Redis ran it; the
/// reply never came) is sent again on a new connection and answered with
/// the claim it made, under the same fence, not `busy`: told `busy`, its
/// worker would drop the message and the claim would lapse, an attempt
/// spent (with `max_attempts` 1, the task failed) and a lease waited for
/// nothing. A claim of the same attempt by another request is still busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sent_again_after_its_reply_was_lost_is_answered_with_the_claim_it_made() {
    let (config, cutter, store) = store_through_a_cutter("lostreply").await;
    let lease = Duration::from_secs(30);
    for (id, by_submission) in [("by-message", false), ("by-submission", true)] {
        let message = first_message(id);
        if !by_submission {
            create_noop_job(store.as_ref(), id).await;
        }
        cutter.drop_next_reply();
        let outcome = claim_root(store.as_ref(), id, by_submission, lease)
            .await
            .unwrap();
        assert!(cutter.dropped_a_reply(), "{id}: no reply was lost");
        let ClaimOutcome::Claimed(claimed) = outcome else {
            panic!("{id}: {outcome:?}");
        };
        let status = store.job(id).await.unwrap().unwrap();
        assert_eq!(status.tasks["t"].state, TaskState::Running, "{id}");
        assert_eq!(status.tasks["t"].attempts, 1, "{id}");
        let claimed_again = store.claim(&message, "w", lease).await.unwrap();
        assert!(
            matches!(claimed_again, ClaimOutcome::Busy),
            "{id}: {claimed_again:?}"
        );
        let ok = AttemptResult::Succeeded("{}".into());
        let applied = store.complete(&claimed.claim, "w", &ok).await.unwrap();
        assert!(
            matches!(
                applied,
                Applied::Done {
                    duplicate: false,
                    ..
                }
            ),
            "{id}: the claim handed out is the one recorded: {applied:?}"
        );
    }
    common::cleanup(&config).await;
}

/// Claims that arrive together go to Redis in one round, one call per
/// job, and are answered as the memory store answers them one by one:
/// each child of a fan-out claimed once, with its dependency's result, a
/// second delivery of the same attempt busy, an old attempt stale, a task
/// of a job that does not exist missing.
#[tokio::test]
async fn claims_that_arrive_together_are_answered_as_one_by_one() {
    let config = common::test_config(&common::unique_prefix("rounds"));
    let (redis, memory) = redis_and_memory(&config).await;
    let children = 40;
    let mut tasks = vec![json!({"name": "root", "handler": "noop", "params": {"n": 7}})];
    tasks.extend(
        (0..children)
            .map(|i| json!({"name": format!("c{i}"), "handler": "noop", "after": ["root"]})),
    );
    let job = plan(&json!({"id": "fan", "requestor": "eq", "tasks": tasks}));
    let lease = Duration::from_millis(LATER_MS);
    let stores: [&dyn Store; 2] = [redis.as_ref(), &memory];
    for store in stores {
        store.create_job(&job).await.unwrap();
        let root = claim_first_attempt_of(store, "fan", 0, "root").await;
        let applied = store
            .complete(
                &root.claim,
                "w",
                &AttemptResult::Succeeded(r#"{"n":7}"#.into()),
            )
            .await
            .unwrap();
        assert!(matches!(applied, Applied::Done { ref ready, .. } if ready.len() == children));
    }
    let message = |idx: u32, attempt: u32| TaskMessage {
        job: "fan".to_owned(),
        task: format!("c{}", idx.saturating_sub(1)),
        idx,
        attempt,
        queue: "default".into(),
    };
    let mut messages: Vec<TaskMessage> = (1..=children as u32).map(|i| message(i, 1)).collect();
    messages.insert(5, message(3, 1));
    messages.push(message(7, 2));
    messages.push(TaskMessage {
        job: "no-such-job".into(),
        ..message(1, 1)
    });

    let rounds_before = redis.claim_rounds_sent();
    let together =
        futures::future::join_all(messages.iter().map(|m| redis.claim(m, "w", lease))).await;
    assert_eq!(
        redis.claim_rounds_sent() - rounds_before,
        1,
        "{} claims made at once went in more than one round",
        messages.len()
    );
    let mut fences = Vec::new();
    for (m, a) in messages.iter().zip(together) {
        let b = memory.claim(m, "w", lease).await.unwrap();
        let ctx = format!("claim of {} attempt {}", m.task, m.attempt);
        let a = a.unwrap();
        if let ClaimOutcome::Claimed(c) = &a {
            assert_eq!(c.deps.get("root"), Some(&json!({"n": 7})), "{ctx}");
            fences.push(c.claim.fence);
        }
        same_claim(a, b, &ctx);
    }
    assert_eq!(fences.len(), children, "each child claimed once");
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences rise: {fences:?}"
    );
    let a = normalise(redis.job("fan").await.unwrap().unwrap());
    let b = normalise(memory.job("fan").await.unwrap().unwrap());
    assert_eq!(a, b);
    common::cleanup(&config).await;
}

/// Plant a job `id` whose record the claim script cannot act on (a ready
/// task with no fence or version: as another version, or a corruption,
/// might leave it), and its task's message.
async fn plant_unusable_job(config: &Config, id: &str) -> TaskMessage {
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(config).await;
    redis::cmd("HSET")
        .arg(names.job_key(id))
        .arg(&[
            "id", id, "st", "pending", "n", "1", "s:0", "ready", "a:0", "1", "x:0", "1",
        ])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    first_message(id)
}

/// A claim on a record the script fails on is refused for good, as its
/// own: the claims that shared its round (one pipeline, whose calls'
/// errors are each their own) are answered as if it had not been there.
/// (A pipeline that failed whole on the one error had every claim of the
/// round refused, though the others were made.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_an_unusable_record_fails_alone_not_the_claims_beside_it() {
    let config = common::test_config(&common::unique_prefix("unusable"));
    let redis = common::connect_store(&config, "eq").await;
    let lease = Duration::from_secs(30);
    // Claims made at once share a round unless the round task wakes
    // between them (a busy machine): tried until one round held them all.
    let mut shared = false;
    for attempt in 0..20 {
        let broken = plant_unusable_job(&config, &format!("broken-{attempt}")).await;
        let mut messages = vec![broken];
        for i in 0..5 {
            let id = format!("fine-{attempt}-{i}");
            messages.push(create_noop_job(redis.as_ref(), &id).await);
        }
        let rounds_before = redis.claim_rounds_sent();
        let together =
            futures::future::join_all(messages.iter().map(|m| redis.claim(m, "w", lease))).await;
        let mut answers = together.into_iter();
        let refused = answers.next().unwrap();
        assert!(
            matches!(&refused, Err(e) if !e.is_retryable()),
            "{refused:?}"
        );
        for (m, a) in messages[1..].iter().zip(answers) {
            assert!(
                matches!(a, Ok(ClaimOutcome::Claimed(_))),
                "{}: {a:?}",
                m.job
            );
        }
        if redis.claim_rounds_sent() - rounds_before == 1 {
            shared = true;
            break;
        }
    }
    assert!(shared, "the claims never shared one round in 20 tries");
    common::cleanup(&config).await;
}

/// A claim of a task whose run spec or max attempts the store cannot read
/// back (corrupt, or another version's) is refused before it is made: the
/// task stays ready, with no claim that would run nowhere (its message
/// dead-lettered as unusable) until its lease lapsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_the_store_could_not_read_is_refused_before_it_is_made() {
    let config = common::test_config(&common::unique_prefix("unreadable"));
    let store = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    for (id, field, value) in [
        ("short-spec", "x:0", Some("1")),
        ("long-handler", "x:0", Some("0,0,0,99,noop{}")),
        ("no-max", "ma:0", None),
        ("odd-max", "ma:0", Some("five")),
    ] {
        let message = create_noop_job(store.as_ref(), id).await;
        let change = match value {
            Some(v) => redis::cmd("HSET")
                .arg(names.job_key(id))
                .arg(field)
                .arg(v)
                .to_owned(),
            None => redis::cmd("HDEL")
                .arg(names.job_key(id))
                .arg(field)
                .to_owned(),
        };
        change.query_async::<()>(&mut conn).await.unwrap();
        let before: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(names.job_key(id))
            .query_async(&mut conn)
            .await
            .unwrap();
        let refused = store.claim(&message, "w", Duration::from_secs(30)).await;
        assert!(
            matches!(&refused, Err(e) if !e.is_retryable()),
            "{id}: {refused:?}"
        );
        let after: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(names.job_key(id))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(after, before, "{id}: nothing written");
    }
    // The refusal is that claim's alone: another task of the same job,
    // claimed in the same round (one call), is claimed, with its history
    // and nothing of the refused one's.
    let two = json!({"id": "two", "requestor": "r", "tasks": [
        {"name": "t", "handler": "noop"}, {"name": "u", "handler": "noop"}]});
    store.create_job(&plan(&two)).await.unwrap();
    redis::cmd("HSET")
        .arg(names.job_key("two"))
        .arg(&["x:1", "1"])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let message = |idx: u32, task: &str| TaskMessage {
        job: "two".into(),
        task: task.into(),
        idx,
        attempt: 1,
        queue: "default".into(),
    };
    let (t, u) = (message(0, "t"), message(1, "u"));
    let lease = Duration::from_secs(30);
    let (t, u) = tokio::join!(store.claim(&t, "w", lease), store.claim(&u, "w", lease));
    assert!(matches!(t, Ok(ClaimOutcome::Claimed(_))), "{t:?}");
    assert!(matches!(&u, Err(e) if !e.is_retryable()), "{u:?}");
    let status = store.job("two").await.unwrap().unwrap();
    assert_eq!(status.tasks["u"].state, TaskState::Ready, "{status:#?}");
    let claims: Vec<_> = status
        .history
        .iter()
        .filter(|h| h.to == "running")
        .collect();
    assert!(
        claims.iter().all(|h| h.task.as_deref() != Some("u")),
        "{status:#?}"
    );
    // A submission taken again whose recorded root cannot be claimed:
    // answered as not claimed, the root still ready to publish, not as an
    // error that would leave the job's ready tasks unpublished.
    let again = store.create_job_and_claim(&plan(&two), 1, "w", lease).await;
    match again {
        Ok((Created::Existing { ready, .. }, ClaimOutcome::Stale)) => {
            assert!(ready.iter().any(|m| m.idx == 1), "{ready:?}")
        }
        other => panic!("{other:?}"),
    }
    common::cleanup(&config).await;
}

/// Claims sent together after Redis lost the function library (a restart
/// without its data, `FUNCTION FLUSH`) load it again and are answered:
/// the round's pipeline comes back whole (each call's error its own), so
/// the store looks for the missing function in its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_sent_after_redis_lost_the_functions_load_them_again() {
    let config = common::test_config(&common::unique_prefix("noflib"));
    let redis = common::connect_store(&config, "eq").await;
    let mut messages = Vec::new();
    for i in 0..3 {
        messages.push(create_noop_job(redis.as_ref(), &format!("j-{i}")).await);
    }
    let mut conn = common::redis_connection(&config).await;
    redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let lease = Duration::from_secs(30);
    let together =
        futures::future::join_all(messages.iter().map(|m| redis.claim(m, "w", lease))).await;
    for (m, a) in messages.iter().zip(together) {
        assert!(
            matches!(a, Ok(ClaimOutcome::Claimed(_))),
            "{}: {a:?}",
            m.job
        );
    }
    common::cleanup(&config).await;
}

/// A join is handed its dependencies' results up to
/// `limits.max_inputs_bytes` of them together. Past it the join is still
/// claimed, with none of them read and what they total (Redis reads them a
/// few dozen at a time and measures the rest, here past its first read);
/// at exactly the limit, all of them. Both stores agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_is_handed_its_inputs_up_to_the_limit_and_none_past_it() {
    let parts = 100;
    // Each part's result is 20 bytes of JSON: 2,000 bytes for the join.
    let result = |i: usize| format!(r#"{{"v":"{i:0>12}"}}"#);
    let mut tasks: Vec<_> = (0..parts)
        .map(|i| json!({"name": format!("p{i}"), "handler": "noop"}))
        .collect();
    let all: Vec<String> = (0..parts).map(|i| format!("p{i}")).collect();
    tasks.push(json!({"name": "join", "handler": "noop", "after": all}));
    tasks.push(json!({"name": "pair", "handler": "noop", "after": ["p0", "p1"]}));
    let job = plan(&json!({"id": "big-join", "requestor": "eq", "tasks": tasks}));
    for (limit, over) in [(1_000u64, true), (2_000, false)] {
        let mut config = common::test_config(&common::unique_prefix("inputs"));
        config.limits.max_result_bytes = 64;
        config.limits.max_inputs_bytes = limit as usize;
        let (redis, memory) = redis_and_memory(&config).await;
        let memory = memory.with_max_inputs_bytes(limit);
        let stores: [&dyn Store; 2] = [redis.as_ref(), &memory];
        let mut claims = Vec::new();
        for store in stores {
            store.create_job(&job).await.unwrap();
            for i in 0..parts {
                let part =
                    claim_first_attempt_of(store, "big-join", i as u32, &format!("p{i}")).await;
                let done = AttemptResult::Succeeded(result(i));
                store.complete(&part.claim, "w", &done).await.unwrap();
            }
            let join = claim_first_attempt_of(store, "big-join", parts as u32, "join").await;
            let pair = claim_first_attempt_of(store, "big-join", parts as u32 + 1, "pair").await;
            claims.push((join, pair));
        }
        let ctx = format!("limit {limit}");
        let (memory_claims, redis_claims) = (claims.pop().unwrap(), claims.pop().unwrap());
        let (join, pair) = &redis_claims;
        if over {
            assert_eq!(
                join.oversized_inputs,
                Some(conveyor::store::OversizedInputs {
                    deps: parts,
                    bytes: 2_000,
                    limit
                }),
                "{ctx}"
            );
            assert!(
                join.deps.is_empty(),
                "{ctx}: read {} results",
                join.deps.len()
            );
        } else {
            assert_eq!(join.oversized_inputs, None, "{ctx}");
            assert_eq!(join.deps.len(), parts, "{ctx}");
            assert_eq!(join.deps["p99"], json!({"v": "000000000099"}), "{ctx}");
        }
        assert_eq!(pair.oversized_inputs, None, "{ctx}");
        assert_eq!(pair.deps["p1"], json!({"v": "000000000001"}), "{ctx}");
        same_claim(
            ClaimOutcome::Claimed(Box::new(redis_claims.0)),
            ClaimOutcome::Claimed(Box::new(memory_claims.0)),
            &format!("{ctx}: join"),
        );
        same_claim(
            ClaimOutcome::Claimed(Box::new(redis_claims.1)),
            ClaimOutcome::Claimed(Box::new(memory_claims.1)),
            &format!("{ctx}: pair"),
        );
        common::cleanup(&config).await;
    }
}

async fn claim_first_attempt_of(
    store: &dyn Store,
    id: &str,
    idx: u32,
    task: &str,
) -> conveyor::store::Claimed {
    let msg = TaskMessage {
        job: id.to_owned(),
        task: task.into(),
        idx,
        attempt: 1,
        queue: "default".into(),
    };
    match store.claim(&msg, "w", Duration::from_secs(60)).await {
        Ok(ClaimOutcome::Claimed(c)) => *c,
        other => panic!("claim of {id} {task}: {other:?}"),
    }
}

/// A finished job's keys expire after the retention; its entry in the index
/// of recent jobs goes with the next pruning pass, in both stores, while a
/// job still running keeps its entry however old it is. Small batches walk
/// past live entries rather than stopping at them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_forgets_expired_jobs_and_keeps_live_ones() {
    let mut config = common::test_config(&common::unique_prefix("prune"));
    config.retention_s = 1;
    let stores = side_by_side(&config).await;
    for (name, store) in stores {
        // The oldest job stays running; five after it finish.
        let mut ids = vec!["alive".to_owned()];
        ids.extend((0..5).map(|i| format!("done{i}")));
        for id in &ids {
            let body = common::noop_job(id);
            store.create_job(&plan(&body)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for id in &ids[1..] {
            let c = claim_first_attempt(store.as_ref(), id).await;
            let applied = store
                .complete(&c.claim, "w", &AttemptResult::Succeeded("{}".into()))
                .await
                .unwrap();
            assert!(
                matches!(applied, Applied::Done { .. }),
                "{name}: {applied:?}"
            );
        }
        // Nothing is old enough yet.
        assert_eq!(store.prune_expired(2).await.unwrap().removed, 0, "{name}");
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // Two entries a call, the live one's stepped over by the next.
        let first = store.prune_expired(2).await.unwrap();
        assert!(first.more && first.removed <= 2, "{name}: {first:?}");
        let mut removed = first.removed;
        for _ in 0..20 {
            let pruned = store.prune_expired(2).await.unwrap();
            removed += pruned.removed;
            if !pruned.more {
                break;
            }
        }
        assert_eq!(removed, 5, "{name}: the five expired jobs leave the index");
        assert!(store.job("alive").await.unwrap().is_some(), "{name}");
        let listed: Vec<String> = store
            .list_jobs(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(listed, vec!["alive".to_owned()], "{name}");
    }
    // In Redis the index itself holds only the live job now.
    let index = conveyor::names::Names::new(&config.prefix).jobs_index();
    assert_eq!(members(&config, &index).await, vec!["alive".to_owned()]);
    common::cleanup(&config).await;
}

/// A job recorded before a task's run spec was packed into one field
/// (`x:<i>`) holds it in five (`h p bb bc to`); a store of this version
/// claims it and reports it as it reports its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_recorded_in_the_earlier_layout_is_claimed_and_shown_the_same() {
    let config = common::test_config(&common::unique_prefix("layout"));
    let store = common::connect_store(&config, "eq").await;
    let body = json!({"id": "old", "requestor": "r", "tasks": [{"name": "t", "handler": "sleep",
        "params": {"ms": 1}, "timeout_s": 7, "retry": {"base_ms": 11, "cap_ms": 13}}]});
    store.create_job(&plan(&body)).await.unwrap();
    let before = store.job("old").await.unwrap().unwrap();
    // Rewrite the task's run spec as the earlier layout had it.
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = conveyor::names::Names::new(&config.prefix).job_key("old");
    let x: String = redis::cmd("HGET")
        .arg(&key)
        .arg("x:0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(x.starts_with("11,13,7000,5,sleep"), "{x}");
    redis::pipe()
        .cmd("HDEL")
        .arg(&key)
        .arg("x:0")
        .ignore()
        .cmd("HSET")
        .arg(&key)
        .arg(&[
            ("h:0", "sleep"),
            ("p:0", r#"{"ms":1}"#),
            ("bb:0", "11"),
            ("bc:0", "13"),
            ("to:0", "7000"),
        ])
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.job("old").await.unwrap().unwrap(), before);
    let c = claim_first_attempt(store.as_ref(), "old").await;
    assert_eq!(
        (
            c.handler.as_str(),
            c.params_json.as_str(),
            c.timeout,
            c.backoff
        ),
        ("sleep", r#"{"ms":1}"#, Duration::from_secs(7), (11, 13))
    );
    common::cleanup(&config).await;
}

/// A job's hash in Redis as `DUMP` gave it, to put back as Redis would
/// after losing its latest writes (a crash under `appendfsync everysec`,
/// an unplanned failover to a replica that lagged).
struct JobDump {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    before: Vec<u8>,
}

impl JobDump {
    async fn take(
        config: &Config,
        store: &conveyor::store::redis::RedisStore,
        job: &str,
    ) -> JobDump {
        let client = redis::Client::open(config.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let key = store.names().job_key(job);
        let before: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        JobDump { conn, key, before }
    }

    /// Put the hash back as it was, and delete the keys `lost` too (what
    /// else the lost writes took).
    async fn restore(&mut self, lost: &[String]) {
        let mut pipe = redis::pipe();
        pipe.cmd("RESTORE")
            .arg(&self.key)
            .arg(0)
            .arg(&self.before)
            .arg("REPLACE")
            .ignore();
        for key in lost {
            pipe.cmd("DEL").arg(key).ignore();
        }
        pipe.query_async::<()>(&mut self.conn).await.unwrap();
    }
}

/// A one-task job `lost`, its first attempt claimed, and a way to lose
/// that claim as Redis loses its latest writes.
struct LostClaim {
    config: Config,
    store: Arc<conveyor::store::redis::RedisStore>,
    /// The job hash as it was before the claim.
    before: JobDump,
    claimed: conveyor::store::Claimed,
}

impl LostClaim {
    async fn new(test: &str) -> LostClaim {
        let config = common::test_config(&common::unique_prefix(test));
        let store = common::connect_store(&config, "eq").await;
        let body = common::noop_job("lost");
        store.create_job(&plan(&body)).await.unwrap();
        let before = JobDump::take(&config, &store, "lost").await;
        let claimed = claim_first_attempt(store.as_ref(), "lost").await;
        LostClaim {
            config,
            store,
            before,
            claimed,
        }
    }

    /// The sweep's next pass offers the lost claim's attempt again. (A
    /// few ms on: the audit asks for the entry a millisecond past Redis's
    /// now, and the store reads Redis's clock as its own plus an offset
    /// measured to about a millisecond.)
    async fn assert_offered_again(&self) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let actions = self.store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(
            actions[0].publish,
            vec![TaskMessage {
                job: "lost".into(),
                task: "t".into(),
                idx: 0,
                attempt: 1,
                queue: "default".into(),
            }]
        );
    }

    /// Put the job hash back as it was before the claim; with
    /// `with_lease_entry`, the lease index loses the claim's entry too.
    async fn lose(&mut self, with_lease_entry: bool) {
        let leases = self.store.names().leases();
        let lost = if with_lease_entry {
            vec![leases]
        } else {
            vec![]
        };
        self.before.restore(&lost).await;
    }
}

/// Redis may lose its latest writes and keep the rest (a crash under
/// `appendfsync everysec`, an unplanned failover to a replica that lagged).
/// A claim lost that way must never be handed out again under the same
/// fencing number: its worker may still be running, and its outcome must
/// then be refused rather than taken for the new claim's. Here the job's
/// hash is put back as it was before a claim, and the task claimed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_record_redis_lost_is_never_handed_out_again_under_its_fence() {
    let mut lost = LostClaim::new("lostclaim").await;
    lost.lose(false).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let store = lost.store.clone();
    let again = claim_first_attempt(store.as_ref(), "lost").await;
    let first = &lost.claimed.claim;
    assert!(
        again.claim.fence > first.fence,
        "fence {} handed out again after {} was lost",
        again.claim.fence,
        first.fence
    );
    // The lost claim's outcome is refused; the live one's is applied.
    let ok = AttemptResult::Succeeded("{}".into());
    assert_eq!(
        store.complete(first, "w", &ok).await.unwrap(),
        Applied::Stale
    );
    assert!(matches!(
        store.complete(&again.claim, "w", &ok).await.unwrap(),
        Applied::Done {
            duplicate: false,
            ..
        }
    ));
    common::cleanup(&lost.config).await;
}

/// The same loss, taking the claim's lease entry with it (both were among
/// the lost writes): the task is ready at its attempt, its message was
/// acked when it was claimed, and nothing would ever offer it again. The
/// refused outcome has the sweep recheck the attempt, which offers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_claim_and_lease_entry_redis_lost_is_offered_again_once_its_outcome_is_refused()
 {
    let mut lost = LostClaim::new("lostentry").await;
    lost.lose(true).await;
    let store = lost.store.clone();
    // Nothing left that would run the task.
    assert_eq!(
        store.expired_leases(100, "sweep").await.unwrap(),
        Vec::new()
    );
    let claim = &lost.claimed.claim;
    let ok = AttemptResult::Succeeded("{}".into());
    assert_eq!(
        store.complete(claim, "w", &ok).await.unwrap(),
        Applied::Stale
    );
    store.recheck(claim).await.unwrap();
    lost.assert_offered_again().await;
    common::cleanup(&lost.config).await;
}

/// The same loss, and the claim's worker died with it: no outcome will
/// ever be refused, so nothing rechecks the attempt. The lost writes came
/// with a restart or a failover, so the store's server is new to the
/// deployment: the audit that follows puts back the lease entry the ready
/// task calls for, due now, and the sweep offers the task again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_claim_is_lost_with_its_worker_the_audit_of_the_new_server_offers_the_task_again() {
    let mut lost = LostClaim::new("lostaudit").await;
    let store = lost.store.clone();
    // This deployment has not audited this server yet.
    let server = store.audit_due().await.unwrap().expect("an audit is due");
    store.audit_done(&server).await.unwrap();
    assert_eq!(store.audit_due().await.unwrap(), None);
    lost.lose(true).await;
    // As if Redis came back as another process: forget which server the
    // last audit was of (a real restart is `tests/faults.rs`'s).
    redis::cmd("DEL")
        .arg(store.names().audited_key())
        .query_async::<()>(&mut lost.before.conn)
        .await
        .unwrap();
    assert_eq!(
        store.expired_leases(100, "sweep").await.unwrap(),
        Vec::new(),
        "nothing left that would run the task"
    );
    let server = store.audit_due().await.unwrap().expect("an audit is due");
    let page = store.audit_jobs(None, 100).await.unwrap();
    assert_eq!(page.jobs, 1);
    assert_eq!(page.added, 1);
    assert_eq!(page.next, None);
    assert_eq!(
        page.wanted
            .iter()
            .map(|e| (e.index, e.entry.as_str()))
            .collect::<Vec<_>>(),
        vec![(ScheduleIndex::Leases, "lost|0|1")]
    );
    store.audit_done(&server).await.unwrap();
    assert_eq!(store.audit_due().await.unwrap(), None);
    lost.assert_offered_again().await;
    // Claimed again under a higher fence; the lost claim's late outcome,
    // were its worker alive after all, is refused.
    let again = claim_first_attempt(store.as_ref(), "lost").await;
    assert!(again.claim.fence > lost.claimed.claim.fence);
    let ok = AttemptResult::Succeeded("{}".into());
    assert_eq!(
        store.complete(&lost.claimed.claim, "w", &ok).await.unwrap(),
        Applied::Stale
    );
    // A second audit changes nothing: the running task's entry is there.
    let page = store.audit_jobs(None, 100).await.unwrap();
    assert_eq!(page.added, 0, "{page:?}");
    common::cleanup(&lost.config).await;
}

/// The audit skips, and counts, a job whose record it cannot act on (here
/// one whose task's attempt is not a number), and asks for the entries
/// every other job needs; a record whose task count is not a number has no
/// tasks to ask for. One bad record must not end the audit of the whole
/// deployment: until the thirtieth session it failed the page, and the
/// dispatcher's audit loop stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_skips_a_record_it_cannot_act_on_and_audits_the_rest() {
    let config = common::test_config(&common::unique_prefix("auditbad"));
    let redis = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    create_noop_job(redis.as_ref(), "fine-1").await;
    for (id, fields) in [
        ("bad-attempt", ["n", "1", "s:0", "ready", "a:0", "x"]),
        ("bad-count", ["n", "x", "s:0", "ready", "a:0", "1"]),
    ] {
        redis::cmd("HSET")
            .arg(names.job_key(id))
            .arg(&["id", id, "st", "pending"])
            .arg(&fields)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        redis::cmd("ZADD")
            .arg(names.jobs_index())
            .arg(1)
            .arg(id)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    create_noop_job(redis.as_ref(), "fine-2").await;
    // Index members something else wrote: one that is not UTF-8 (removed
    // as not Conveyor's), and one scored with a fraction (no job of that
    // id: pruned as any). Read as text and whole numbers, either failed
    // every page of the audit and every prune read, until the
    // thirty-seventh session.
    let add_foreign = || {
        redis::pipe()
            .cmd("ZADD")
            .arg(names.jobs_index())
            .arg(1)
            .arg(&b"\xff\xfe"[..])
            .ignore()
            .cmd("ZADD")
            .arg(names.jobs_index())
            .arg(1.5)
            .arg("fraction")
            .ignore()
            .clone()
    };
    let foreign_left = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let key = names.jobs_index();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(key)
                .arg(&b"\xff\xfe"[..])
                .query_async(&mut conn)
                .await
                .unwrap();
            score.is_some()
        }
    };
    add_foreign().query_async::<()>(&mut conn).await.unwrap();
    let pruned = redis.prune_expired(100).await.unwrap();
    assert_eq!(pruned.removed, 1, "the fraction's entry, whose job is gone");
    assert!(!foreign_left(&mut conn).await, "removed by the prune");
    add_foreign().query_async::<()>(&mut conn).await.unwrap();

    let page = redis.audit_jobs(None, 100).await.unwrap();
    assert!(!foreign_left(&mut conn).await, "removed by the audit");

    assert_eq!(
        (page.jobs, page.unusable, &page.next),
        (5, 1, &None),
        "{page:?}"
    );
    let mut wanted: Vec<&str> = page.wanted.iter().map(|e| e.entry.as_str()).collect();
    wanted.sort();
    assert_eq!(wanted, ["fine-1|0|1", "fine-2|0|1"]);
    common::cleanup(&config).await;
}

/// What the audit asks of each task, in both stores: a running task its
/// lease entry at the lease's expiry, a retrying one its retry entry at
/// its due time, a ready one a lease entry due now; a waiting task and a
/// finished job nothing. Only what the indexes lack is added: here the
/// ready task's entry (claims and retries index themselves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_asks_each_unfinished_task_for_the_entry_its_state_needs() {
    let config = common::test_config(&common::unique_prefix("auditask"));
    let stores = side_by_side(&config).await;
    for (name, store) in stores {
        let body = json!({"id": "mixed", "requestor": "r", "tasks": [
            {"name": "run", "handler": "noop"},
            {"name": "retry", "handler": "noop"},
            {"name": "ready", "handler": "noop"},
            {"name": "wait", "handler": "noop", "after": ["ready"]}]});
        store.create_job(&plan(&body)).await.unwrap();
        let done = common::noop_job("done");
        store.create_job(&plan(&done)).await.unwrap();
        let c = claim_first_attempt(store.as_ref(), "done").await;
        store
            .complete(&c.claim, "w", &AttemptResult::Succeeded("{}".into()))
            .await
            .unwrap();
        let claim = |idx: u32, task: &str| TaskMessage {
            job: "mixed".into(),
            task: task.into(),
            idx,
            attempt: 1,
            queue: "default".into(),
        };
        let lease = Duration::from_secs(60);
        let start = conveyor::store::redis::unix_ms();
        let ClaimOutcome::Claimed(_) = store.claim(&claim(0, "run"), "w", lease).await.unwrap()
        else {
            panic!("{name}: run not claimed");
        };
        let ClaimOutcome::Claimed(retried) =
            store.claim(&claim(1, "retry"), "w", lease).await.unwrap()
        else {
            panic!("{name}: retry not claimed");
        };
        let retry = AttemptResult::Retry {
            error: "flaky".into(),
            delay: Duration::from_millis(LATER_MS),
        };
        store.complete(&retried.claim, "w", &retry).await.unwrap();
        let page = store.audit_jobs(None, 100).await.unwrap();
        let end = conveyor::store::redis::unix_ms();
        assert_eq!(page.jobs, 2, "{name}");
        assert_eq!(page.next, None, "{name}");
        let mut wanted = page.wanted.clone();
        wanted.sort_by(|a, b| a.entry.cmp(&b.entry));
        let got: Vec<(ScheduleIndex, &str)> =
            wanted.iter().map(|e| (e.index, e.entry.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (ScheduleIndex::Leases, "mixed|0|1"),
                (ScheduleIndex::Retries, "mixed|1|2"),
                (ScheduleIndex::Leases, "mixed|2|1"),
            ],
            "{name}"
        );
        let within = |at: u64, from: u64, to: u64| at >= from && at <= to;
        assert!(
            within(wanted[0].at_ms, start + 60_000, end + 60_000),
            "{name}: {wanted:?}"
        );
        assert!(
            within(wanted[1].at_ms, start + LATER_MS, end + LATER_MS),
            "{name}: {wanted:?}"
        );
        // Due "now": a millisecond past the audit's moment.
        assert!(
            within(wanted[2].at_ms, start + 1, end + 1),
            "{name}: {wanted:?}"
        );
        assert_eq!(
            page.added, 1,
            "{name}: only the ready task lacked its entry"
        );
    }
    common::cleanup(&config).await;
}

/// `redis_wait_timeout_ms` past the 10 s a connection waits for an answer
/// is waited in full: until the thirty-third session the one `WAIT` was cut
/// off at 10 s as a lost connection (and the round's connection dropped).
/// The machine's Redis has no replica, so the wait ends at its time-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_wait_longer_than_a_connections_answer_time_is_waited_in_full() {
    let mut config = common::test_config(&common::unique_prefix("longwait"));
    config.redis_wait_replicas = 1;
    config.redis_wait_timeout_ms = 11_000;
    let store = common::connect_store(&config, "eq").await;

    let created = store.create_job(&plan(&common::noop_job("waits"))).await;

    let Err(e) = created else {
        panic!("a creation no replica acknowledged: {created:?}");
    };
    assert!(e.is_retryable(), "{e}");
    assert!(
        e.to_string()
            .contains("0 of the 1 replicas redis_wait_replicas asks for acknowledged the write within 11000 ms"),
        "{e}"
    );
    common::cleanup(&config).await;
}

/// A job record `list` cannot read (a state another program wrote) is left
/// out of the listing, not the end of it: until the thirty-third session
/// one such record failed every `conveyor list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_list_cannot_read_is_left_out_of_the_list() {
    let config = common::test_config(&common::unique_prefix("listodd"));
    let store = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    for id in ["first", "second"] {
        create_noop_job(store.as_ref(), id).await;
    }
    let mut conn = common::redis_connection(&config).await;
    redis::cmd("HSET")
        .arg(names.job_key("odd"))
        .arg(&["id", "odd", "st", "sideways", "n", "1"])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("ZADD")
        .arg(names.jobs_index())
        .arg(conveyor::store::redis::unix_ms())
        .arg("odd")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let listed = store.list_jobs(None, 10).await.unwrap();

    let mut ids: Vec<String> = listed.into_iter().map(|j| j.id).collect();
    ids.sort();
    assert_eq!(ids, ["first", "second"]);
    common::cleanup(&config).await;
}

/// A retry outcome sent again (its reply lost) is answered as a duplicate
/// and leaves the retry due when the first made it due, not a delay after
/// the resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_outcome_sent_again_does_not_put_its_retry_off() {
    let config = common::test_config(&common::unique_prefix("retryagain"));
    let stores = side_by_side(&config).await;
    for (name, store) in stores {
        create_noop_job(store.as_ref(), "again").await;
        let c = claim_first_attempt(store.as_ref(), "again").await;
        let retry = AttemptResult::Retry {
            error: "flaky".into(),
            delay: Duration::from_secs(60),
        };
        store.complete(&c.claim, "w", &retry).await.unwrap();
        let first = store.next_retry_in(0).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        store.complete(&c.claim, "w", &retry).await.unwrap();

        let after = store.next_retry_in(0).await.unwrap().unwrap();
        assert!(
            after + Duration::from_millis(90) <= first,
            "{name}: due in {after:?} after the resend, {first:?} before"
        );
    }
    common::cleanup(&config).await;
}

/// A process that died without unregistering leaves its entry in the
/// index of workers; a heartbeat drops the entries silent for a day before
/// it (their keys may live on: here a long time to live), so the index
/// does not grow with every crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_drops_the_workers_silent_for_a_day() {
    let config = common::test_config(&common::unique_prefix("workersgone"));
    let stores = side_by_side(&config).await;
    let now = conveyor::store::redis::unix_ms();
    let day = conveyor::store::WORKER_ENTRY_KEPT_MS;
    let info = |id: &str, heartbeat_ms: u64| conveyor::store::WorkerInfo {
        id: id.into(),
        host: "h".into(),
        queues: vec!["default".into()],
        handlers: vec!["noop".into()],
        concurrency: 1,
        started_ms: heartbeat_ms,
        heartbeat_ms,
    };
    let ttl = Duration::from_secs(10 * 24 * 3600);
    for (name, store) in stores {
        store
            .heartbeat(&info("crashed", now - day - 1_000), ttl)
            .await
            .unwrap();
        store
            .heartbeat(&info("quiet", now - day + 60_000), ttl)
            .await
            .unwrap();
        store.heartbeat(&info("live", now), ttl).await.unwrap();
        let ids: Vec<String> = store
            .workers()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.id)
            .collect();
        assert_eq!(ids, ["live", "quiet"], "{name}");
    }
    common::cleanup(&config).await;
}

/// A renewal of many claims, one of whose records the store refuses for
/// good (its job key holds another type), renews the others and counts
/// that one lost: until the thirty-third session the one error failed
/// the whole call, and every claim of the worker went unrenewed, to lapse
/// under its run, for as long as that run went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_renews_every_claim_but_one_whose_record_is_refused() {
    let config = common::test_config(&common::unique_prefix("renewbad"));
    let store = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    for id in ["before", "broken", "after"] {
        create_noop_job(store.as_ref(), id).await;
    }
    let mut claims = Vec::new();
    for id in ["before", "broken", "after"] {
        claims.push(claim_first_attempt(store.as_ref(), id).await.claim);
    }
    let mut conn = common::redis_connection(&config).await;
    redis::cmd("SET")
        .arg(names.job_key("broken"))
        .arg("not a hash")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let held = store.renew(&claims, Duration::from_secs(60)).await;

    assert_eq!(held.unwrap(), vec![true, false, true]);
    common::cleanup(&config).await;
}

/// The audit of one job (a submission of its id that the process taking
/// it cannot record) asks for what its record needs, as a page's audit
/// does: its ready task offered again, once; nothing for a finished job or
/// one that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_of_one_job_has_its_ready_task_offered_again() {
    let config = common::test_config(&common::unique_prefix("auditone"));
    let stores = side_by_side(&config).await;
    for (name, store) in stores {
        let message = create_noop_job(store.as_ref(), "one").await;
        create_noop_job(store.as_ref(), "done").await;
        let c = claim_first_attempt(store.as_ref(), "done").await;
        store
            .complete(&c.claim, "w", &AttemptResult::Succeeded("{}".into()))
            .await
            .unwrap();

        let page = store.audit_job("one").await.unwrap();

        let wanted: Vec<(ScheduleIndex, &str)> = page
            .wanted
            .iter()
            .map(|e| (e.index, e.entry.as_str()))
            .collect();
        assert_eq!(wanted, vec![(ScheduleIndex::Leases, "one|0|1")], "{name}");
        assert_eq!((page.jobs, page.added, page.next), (1, 1, None), "{name}");
        assert_eq!(store.audit_job("one").await.unwrap().added, 0, "{name}");
        for other in ["done", "nobody"] {
            let page = store.audit_job(other).await.unwrap();
            assert!(page.wanted.is_empty(), "{name}: {other}: {page:?}");
        }
        // Due a millisecond after the audit's moment.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let actions = store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(published(&actions), vec![message], "{name}");
    }
    common::cleanup(&config).await;
}

/// The usual refused outcome is a lapsed lease's: the task moved on (here
/// to attempt 2, queued by the sweep). Its recheck leaves the sweep
/// nothing to do, in both stores: no second copy of attempt 2's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_outcome_of_a_task_that_moved_on_gives_the_sweep_nothing_to_offer() {
    let config = common::test_config(&common::unique_prefix("recheckmoved"));
    let stores = side_by_side(&config).await;
    for (name, store) in stores {
        let msg = create_noop_job(store.as_ref(), "moved").await;
        let ClaimOutcome::Claimed(first) = store.claim(&msg, "w", Duration::ZERO).await.unwrap()
        else {
            panic!("{name}: not claimed");
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let swept = store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(swept.len(), 1, "{name}: {swept:?}");
        assert_eq!(swept[0].publish[0].attempt, 2, "{name}: {swept:?}");
        let entries: Vec<String> = swept.iter().map(|a| a.entry.clone()).collect();
        store
            .forget_leases(&entries, swept[0].read_at)
            .await
            .unwrap();
        let late = AttemptResult::Succeeded("{}".into());
        assert_eq!(
            store.complete(&first.claim, "w", &late).await.unwrap(),
            Applied::Stale,
            "{name}"
        );
        store.recheck(&first.claim).await.unwrap();
        assert_eq!(
            store.expired_leases(100, "sweep").await.unwrap(),
            Vec::new(),
            "{name}: attempt 2's message offered twice"
        );
    }
    common::cleanup(&config).await;
}

/// A retry entry the sweep reads while its task is still at the attempt
/// before (here: a refused outcome's, scheduled before it was refused) is
/// kept, not forgotten: the live claim's outcome, applied between the
/// sweep's read and its forget, schedules the same entry, and forgetting
/// it then left the task `retrying` with nothing to wake it (the
/// simulation's seed 182924). It is looked at again a second later, or at
/// the due time the applied outcome gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_entry_read_before_its_outcome_is_applied_is_kept_for_that_outcome() {
    let config = common::test_config(&common::unique_prefix("pendingretry"));
    for (name, store) in side_by_side(&config).await {
        let msg = create_noop_job(store.as_ref(), "pending").await;
        let live = claim_first_attempt(store.as_ref(), "pending").await.claim;
        let retry_now = AttemptResult::Retry {
            error: "transient".into(),
            delay: Duration::ZERO,
        };
        // An older claim's outcome: refused, but its retry entry (attempt
        // 2) was scheduled first, as every retry's is.
        let refused = ClaimRef {
            fence: live.fence - 1,
            ..live.clone()
        };
        assert_eq!(
            store.complete(&refused, "old", &retry_now).await.unwrap(),
            Applied::Stale,
            "{name}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The sweep reads it while attempt 1 still runs: nothing to do yet.
        let early = store.due_retries(100).await.unwrap();
        assert_eq!(early, Vec::new(), "{name}: attempt 1 is still running");
        assert!(
            store.next_retry_in(0).await.unwrap().is_some(),
            "{name}: the entry is kept"
        );
        // The live claim's outcome is applied; then the sweep forgets
        // whatever its read gave it to forget (nothing).
        let applied = store.complete(&live, "w", &retry_now).await.unwrap();
        assert!(
            matches!(
                applied,
                Applied::Done {
                    duplicate: false,
                    ..
                }
            ),
            "{name}: {applied:?}"
        );
        let forget: Vec<String> = early.iter().map(|a| a.entry.clone()).collect();
        let read_at = early.first().map_or(0, |a| a.read_at);
        store.forget_retries(&forget, read_at).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let promoted = store.due_retries(100).await.unwrap();
        assert_eq!(
            published(&promoted),
            vec![TaskMessage { attempt: 2, ..msg }],
            "{name}: attempt 2 is offered at its due time"
        );
    }
    common::cleanup(&config).await;
}

/// Jobs `retried`, whose task failed transiently with a retry due at
/// once, and `lapsed`, whose claim's lease lapsed: their first attempts'
/// messages.
async fn a_due_retry_and_a_lapsed_lease(store: &dyn Store) -> (TaskMessage, TaskMessage) {
    let msg = create_noop_job(store, "retried").await;
    let claim = claim_first_attempt(store, "retried").await.claim;
    let retry_now = AttemptResult::Retry {
        error: "transient".into(),
        delay: Duration::ZERO,
    };
    store.complete(&claim, "w", &retry_now).await.unwrap();
    let lapsing = create_noop_job(store, "lapsed").await;
    assert!(matches!(
        store.claim(&lapsing, "w", Duration::from_millis(1)).await,
        Ok(ClaimOutcome::Claimed(_))
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    (msg, lapsing)
}

/// An entry the sweep could not publish (the broker refused its
/// messages) is deferred: not due for the pause, due again after it, on
/// both stores; and a deferral whose read is older than the entry's time
/// (an outcome, or an earlier deferral, moved it since) leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_entry_is_due_again_after_its_pause_unless_it_moved_since_it_was_read() {
    const PAUSE: Duration = Duration::from_millis(300);
    let config = common::test_config(&common::unique_prefix("defer"));
    for (name, store) in side_by_side(&config).await {
        let (msg, lapsing) = a_due_retry_and_a_lapsed_lease(store.as_ref()).await;
        let retry = TaskMessage { attempt: 2, ..msg };
        let requeued = TaskMessage {
            attempt: 2,
            ..lapsing
        };

        let promoted = store.due_retries(100).await.unwrap();
        assert_eq!(published(&promoted), vec![retry.clone()], "{name}");
        let reclaimed = store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(published(&reclaimed), vec![requeued.clone()], "{name}");
        let entries = |actions: &[SweepAction]| -> Vec<String> {
            actions.iter().map(|a| a.entry.clone()).collect()
        };
        let (retry_read, lease_read) = (promoted[0].read_at, reclaimed[0].read_at);
        store
            .defer(
                ScheduleIndex::Retries,
                &entries(&promoted),
                retry_read,
                PAUSE,
            )
            .await
            .unwrap();
        store
            .defer(
                ScheduleIndex::Leases,
                &entries(&reclaimed),
                lease_read,
                PAUSE,
            )
            .await
            .unwrap();
        assert_eq!(store.due_retries(100).await.unwrap(), Vec::new(), "{name}");
        assert_eq!(
            store.expired_leases(100, "sweep").await.unwrap(),
            Vec::new(),
            "{name}"
        );
        let next = store.next_retry_in(0).await.unwrap();
        assert!(
            next.is_some_and(|n| n > PAUSE / 2 && n <= PAUSE),
            "{name}: {next:?}"
        );

        tokio::time::sleep(PAUSE + Duration::from_millis(20)).await;
        let again = store.due_retries(100).await.unwrap();
        assert_eq!(
            published(&again),
            vec![retry],
            "{name}: due after the pause"
        );
        let again_leases = store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(published(&again_leases), vec![requeued], "{name}");
        // Deferred again with the first read: moved since, left due.
        store
            .defer(ScheduleIndex::Retries, &entries(&again), retry_read, PAUSE)
            .await
            .unwrap();
        store
            .defer(
                ScheduleIndex::Leases,
                &entries(&again_leases),
                lease_read,
                PAUSE,
            )
            .await
            .unwrap();
        assert_eq!(store.due_retries(100).await.unwrap().len(), 1, "{name}");
        assert_eq!(
            store.expired_leases(100, "sweep").await.unwrap().len(),
            1,
            "{name}"
        );
    }
    common::cleanup(&config).await;
}

/// When the next retry falls due is read past the earliest ones the sweep
/// skips (those it could not publish): the `skip`th retry in due order,
/// the same on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_retry_is_read_past_the_earliest_ones_skipped() {
    let config = common::test_config(&common::unique_prefix("nextretry"));
    let stores = side_by_side(&config).await;
    for (name, store) in stores {
        assert_eq!(store.next_retry_in(0).await.unwrap(), None, "{name}");
        let delays = [LATER_MS, 0, LATER_MS / 2];
        for (i, delay) in delays.into_iter().enumerate() {
            let id = format!("r{i}");
            create_noop_job(store.as_ref(), &id).await;
            let claimed = claim_first_attempt(store.as_ref(), &id).await;
            let result = AttemptResult::Retry {
                error: "transient".into(),
                delay: Duration::from_millis(delay),
            };
            store.complete(&claimed.claim, "w", &result).await.unwrap();
        }
        let due_in = |skip| {
            let store = store.clone();
            async move {
                store
                    .next_retry_in(skip)
                    .await
                    .unwrap()
                    .map(|d| d.as_millis() as u64)
            }
        };
        assert_eq!(due_in(0).await, Some(0), "{name}: due now, skip none");
        let second = due_in(1).await.unwrap();
        assert!(
            (LATER_MS / 2 - 60_000..=LATER_MS / 2).contains(&second),
            "{name}: past the one due now, the half-hour one: {second} ms"
        );
        let third = due_in(2).await.unwrap();
        assert!(
            (LATER_MS - 60_000..=LATER_MS).contains(&third),
            "{name}: then the hour one: {third} ms"
        );
        assert_eq!(due_in(3).await, None, "{name}: none past all three");
    }
    common::cleanup(&config).await;
}

/// A job whose one task was claimed and handed back, its lease entry left
/// for the sweep, and the sweep's read of that entry: the task offered
/// again at attempt 1.
async fn offered_again(store: &dyn Store, name: &str) -> (TaskMessage, SweepAction) {
    let msg = create_noop_job(store, "again").await;
    let first = match store.claim(&msg, "w1", Duration::from_millis(1)).await {
        Ok(ClaimOutcome::Claimed(c)) => c.claim,
        other => panic!("{name}: {other:?}"),
    };
    assert!(
        store.release(&first, "w1").await.unwrap().is_some(),
        "{name}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut offered = store.expired_leases(100, "sweep").await.unwrap();
    assert_eq!(published(&offered), vec![msg.clone()], "{name}");
    (msg, offered.remove(0))
}

/// The sweep's next pass finds the lapsed claim of `msg`'s attempt 1 and
/// re-queues the task as attempt 2.
async fn assert_lapsed_claim_requeued(store: &dyn Store, msg: TaskMessage, name: &str) {
    let swept = store.expired_leases(100, "sweep").await.unwrap();
    assert_eq!(
        published(&swept),
        vec![TaskMessage { attempt: 2, ..msg }],
        "{name}: the lapsed claim is found and re-queued as attempt 2"
    );
}

/// A task the sweep offers again at the same attempt (here: handed back,
/// its lease entry left for the sweep) can be claimed between the sweep's
/// read and its forget of the entry. The claim owns the entry then: the
/// forget leaves it, so the sweep still finds the claim once its lease
/// lapses. (Forgotten, it left a running claim no sweep would find: the
/// simulation's seed 21.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_taken_while_the_sweep_offers_its_task_again_keeps_its_lease_entry() {
    let config = common::test_config(&common::unique_prefix("reoffer"));
    for (name, store) in side_by_side(&config).await {
        let (msg, offered) = offered_again(store.as_ref(), name).await;
        // Claimed from a message already queued, before the sweep forgets.
        let lease = Duration::from_millis(300);
        assert!(
            matches!(
                store.claim(&msg, "w2", lease).await,
                Ok(ClaimOutcome::Claimed(_))
            ),
            "{name}"
        );
        store
            .forget_leases(std::slice::from_ref(&offered.entry), offered.read_at)
            .await
            .unwrap();
        // w2 dies: its lease lapses, and the sweep finds the claim.
        tokio::time::sleep(lease + Duration::from_millis(100)).await;
        assert_lapsed_claim_requeued(store.as_ref(), msg, name).await;
    }
    common::cleanup(&config).await;
}

/// A worker whose outcome was applied drops its claim's lease entry, live
/// as its score still is: once the lease has passed, the sweep finds
/// nothing to reclaim (nor a dependent to publish again). Until the
/// twenty-seventh session Redis kept every such entry (its forget compared
/// the entry's score, the claim's expiry, with the worker's now), and the
/// sweep reclaimed each finished attempt a lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_claims_lease_entry_is_dropped_by_its_worker() {
    let config = common::test_config(&common::unique_prefix("forget"));
    for (name, store) in side_by_side(&config).await {
        let id = format!("chain-{name}");
        store
            .create_job(&plan(&json!({"id": id, "requestor": "r", "tasks": [
                {"name": "a", "handler": "noop"},
                {"name": "b", "handler": "noop", "after": ["a"]}]})))
            .await
            .unwrap();
        let msg = TaskMessage {
            job: id.clone(),
            task: "a".into(),
            idx: 0,
            attempt: 1,
            queue: "default".into(),
        };
        let lease = Duration::from_millis(300);
        let Ok(ClaimOutcome::Claimed(claimed)) = store.claim(&msg, "w", lease).await else {
            panic!("{name}: a is claimable");
        };
        let done = AttemptResult::Succeeded("{}".into());
        let applied = store.complete(&claimed.claim, "w", &done).await.unwrap();
        assert!(
            matches!(applied, Applied::Done { .. }),
            "{name}: {applied:?}"
        );
        store.forget_claim(&claimed.claim).await.unwrap();
        tokio::time::sleep(lease + Duration::from_millis(200)).await;
        let due = store.expired_leases(1000, "sweep").await.unwrap();
        assert!(
            due.is_empty(),
            "{name}: the sweep reclaims a finished attempt: {due:?}"
        );
    }
    common::cleanup(&config).await;
}

/// A rejected submission's record and its history expire after the
/// retention, as a finished job's do. (Until the twenty-eighth session the
/// history list had its expiry set before it existed, and the history of
/// every rejected submission stayed in Redis for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_submissions_history_expires_with_its_record() {
    let config = common::test_config(&common::unique_prefix("rejexpire"));
    let store = common::connect_store(&config, "eq").await;
    let rejection = Rejection {
        id: "refused".into(),
        requestor: "eq".into(),
        error: "tasks[0].handler: unknown handler \"nope\"".into(),
    };
    assert!(store.record_rejected(&rejection).await.unwrap());
    let status = store.job("refused").await.unwrap().expect("recorded");
    assert_eq!(status.history.len(), 1, "{status:?}");
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    let retention_ms = (config.retention_s * 1000) as i64;
    for key in [names.job_key("refused"), names.history_key("refused")] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= retention_ms,
            "{key} expires in {ttl} ms; the retention is {retention_ms} ms"
        );
    }
    common::cleanup(&config).await;
}

/// A claim that is refused (its job does not exist, its attempt is not
/// the task's current one) takes back the lease entry it added, so the
/// sweep never has to read it; a second claim of a live attempt (busy)
/// leaves the entry of the claim that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_claim_leaves_no_lease_entry_behind() {
    let config = common::test_config(&common::unique_prefix("refused-entry"));
    let store = common::connect_store(&config, "eq").await;
    let msg = create_noop_job(store.as_ref(), "held").await;
    let lease = Duration::from_secs(60);
    assert!(matches!(
        store.claim(&msg, "w1", lease).await,
        Ok(ClaimOutcome::Claimed(_))
    ));
    let busy = store.claim(&msg, "w2", lease).await;
    assert!(matches!(busy, Ok(ClaimOutcome::Busy)), "{busy:?}");
    let stale = TaskMessage {
        attempt: 0,
        ..msg.clone()
    };
    let refused = store.claim(&stale, "w3", lease).await;
    assert!(matches!(refused, Ok(ClaimOutcome::Stale)), "{refused:?}");
    let nowhere = TaskMessage {
        job: "no-such-job".into(),
        ..msg.clone()
    };
    let refused = store.claim(&nowhere, "w4", lease).await;
    assert!(matches!(refused, Ok(ClaimOutcome::Missing)), "{refused:?}");

    let leases = conveyor::names::Names::new(&config.prefix).leases();
    let entries = members(&config, &leases).await;
    assert_eq!(
        entries.len(),
        1,
        "only the live claim's entry stays: {entries:?}"
    );
    assert!(entries[0].starts_with("held"), "{entries:?}");
    common::cleanup(&config).await;
}

/// A worker taking submissions claims the root it chose by the
/// submission's queue. When the id is taken by a recorded job whose task
/// at that index is ready on another queue (the id used again for other
/// tasks), that task is not claimed (it is for its own queue's workers)
/// and comes back with the ready tasks to publish; the same submission
/// again claims its own recorded root, as any message of it would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_does_not_claim_a_recorded_task_of_another_queue_under_its_id() {
    let config = common::test_config(&common::unique_prefix("reused-id"));
    let names = conveyor::names::Names::new(&config.prefix);
    let one_task = |queue: &str| {
        plan(&json!({"id": "reused", "requestor": "eq", "tasks": [
            {"name": "t", "handler": "noop", "params": {}, "queue": queue}]}))
    };
    let lease = Duration::from_secs(60);
    for (which, store) in side_by_side(&config).await {
        assert!(matches!(
            store.create_job(&one_task("gpu")).await,
            Ok(Created::New { .. })
        ));
        let (created, outcome) = store
            .create_job_and_claim(&one_task("default"), 0, "w", lease)
            .await
            .unwrap();
        assert!(
            matches!(outcome, ClaimOutcome::Stale),
            "{which}: {outcome:?}"
        );
        let Created::Existing { ready, .. } = created else {
            panic!("{which}: {created:?}");
        };
        assert_eq!(
            ready.iter().map(|t| t.queue.as_str()).collect::<Vec<_>>(),
            ["gpu"],
            "{which}"
        );
        let status = store.job("reused").await.unwrap().unwrap();
        assert_eq!(status.tasks["t"].state, TaskState::Ready, "{which}");

        let (created, outcome) = store
            .create_job_and_claim(&one_task("gpu"), 0, "w", lease)
            .await
            .unwrap();
        assert!(
            matches!(outcome, ClaimOutcome::Claimed(_)),
            "{which}: {outcome:?}"
        );
        assert!(
            matches!(&created, Created::Existing { ready, .. } if ready.is_empty()),
            "{which}: {created:?}"
        );
        if which == "redis" {
            // The refused claim left no lease entry; the claim has one.
            let entries = members(&config, &names.leases()).await;
            assert_eq!(entries.len(), 1, "{entries:?}");
        }
    }
    common::cleanup(&config).await;
}

/// The sweep forgets an entry only if it is still as it read it: one put
/// back or moved since stays, even when it is due again by the time of
/// the forget (a slow sweep, a claim whose lease already lapsed). Until
/// the twenty-fourth session the forget dropped every entry due at its own
/// moment, so an entry the audit put back after a store lost a claim,
/// between a slow dispatcher's read and its forget, went with it, and the
/// task stayed ready with no message (the simulation's seeds 151837 and
/// 154336 of 240,000, with store calls slowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_moved_after_the_sweep_read_it_is_kept_by_its_forget_even_when_due_again() {
    let config = common::test_config(&common::unique_prefix("moved-due"));
    for (name, store) in side_by_side(&config).await {
        let (msg, offered) = offered_again(store.as_ref(), name).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Claimed from the message already queued; its lease lapses (its
        // worker died) before the slow sweep forgets what it read.
        assert!(
            matches!(
                store.claim(&msg, "w2", Duration::from_millis(1)).await,
                Ok(ClaimOutcome::Claimed(_))
            ),
            "{name}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        store
            .forget_leases(std::slice::from_ref(&offered.entry), offered.read_at)
            .await
            .unwrap();
        assert_lapsed_claim_requeued(store.as_ref(), msg, name).await;
    }
    common::cleanup(&config).await;
}

/// A store's way back to how it was before its latest writes, as a new
/// server the deployment has not audited.
enum Snapshot {
    /// The job's hash, and the key naming the server last audited.
    Redis(JobDump, String),
    Memory(MemoryStore, Vec<u8>),
}

impl Snapshot {
    /// Job `job` of store `name` (one of [`lost_writes_stores`]) as it is
    /// now.
    async fn take(
        name: &str,
        config: &Config,
        redis: &conveyor::store::redis::RedisStore,
        memory: &MemoryStore,
        job: &str,
    ) -> Snapshot {
        match name {
            "redis" => Snapshot::Redis(
                JobDump::take(config, redis, job).await,
                redis.names().audited_key(),
            ),
            _ => Snapshot::Memory(memory.clone(), memory.snapshot().unwrap()),
        }
    }

    /// Lose every write since the snapshot; the server is new to the
    /// deployment, so an audit is due.
    async fn lose_later_writes(self) {
        match self {
            // As if Redis came back as another process (a real restart is
            // `tests/faults.rs`'s): the server last audited is forgotten.
            Snapshot::Redis(mut job, audited_key) => job.restore(&[audited_key]).await,
            Snapshot::Memory(store, before) => {
                store.restore(&before).unwrap();
                store.restart();
            }
        }
    }
}

/// Both stores, each with the audit of its server done (the deployment
/// has seen it), named for [`Snapshot::take`].
async fn lost_writes_stores(
    config: &Config,
) -> (
    Arc<conveyor::store::redis::RedisStore>,
    MemoryStore,
    [(&'static str, Arc<dyn Store>); 2],
) {
    let (redis, memory) = redis_and_memory(config).await;
    let stores: [(&str, Arc<dyn Store>); 2] = [
        ("redis", redis.clone()),
        ("memory", Arc::new(memory.clone())),
    ];
    for (_, store) in &stores {
        let server = store.audit_due().await.unwrap().expect("an audit is due");
        store.audit_done(&server).await.unwrap();
    }
    (redis, memory, stores)
}

/// The audit of a server new to the deployment (after
/// [`Snapshot::lose_later_writes`]), done in one page; what it found.
async fn audit_new_server(store: &dyn Store) -> conveyor::store::AuditPage {
    let server = store.audit_due().await.unwrap().expect("an audit is due");
    let page = store.audit_jobs(None, 100).await.unwrap();
    assert_eq!(page.next, None);
    store.audit_done(&server).await.unwrap();
    page
}

/// After a sweep's act on `swept` entries of `index` was lost with the
/// store's latest writes: the message it published (`sent`) is refused as
/// stale, the audit of the new server finds the entry there, the sweep
/// forgets what it read, and its next pass of that index publishes what.
async fn swept_again_after_the_audit(
    store: &dyn Store,
    name: &str,
    sent: &TaskMessage,
    index: ScheduleIndex,
    swept: &[SweepAction],
) -> Vec<TaskMessage> {
    assert!(
        matches!(
            store.claim(sent, "w2", Duration::from_secs(30)).await,
            Ok(ClaimOutcome::Stale)
        ),
        "{name}: the message published before the loss is refused"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let page = audit_new_server(store).await;
    assert_eq!(page.added, 0, "{name}: the entry is there: {page:?}");
    let entries: Vec<String> = swept.iter().map(|a| a.entry.clone()).collect();
    let read_at = swept[0].read_at;
    match index {
        ScheduleIndex::Retries => store.forget_retries(&entries, read_at).await,
        ScheduleIndex::Leases => store.forget_leases(&entries, read_at).await,
    }
    .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = match index {
        ScheduleIndex::Retries => store.due_retries(100).await,
        ScheduleIndex::Leases => store.expired_leases(100, "sweep").await,
    };
    published(&again.unwrap())
}

/// A retry's promotion can be among the writes a store loses: the sweep
/// read the entry, promoted the task and published its message, and the
/// store comes back with the task `retrying` again. The message is refused
/// as stale, so only the entry can wake the task. The audit of the new
/// server raises the entry to now, and the sweep's forget (of entries
/// still as it read them) then keeps it, so the retry is promoted again.
/// Until the twenty-fifth session the audit left a present entry as it
/// was and the forget dropped it whatever its score: the task stayed
/// `retrying` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_promotion_the_store_lost_is_promoted_again_after_the_audit() {
    let config = common::test_config(&common::unique_prefix("lostpromo"));
    let (redis, memory, stores) = lost_writes_stores(&config).await;
    for (name, store) in stores {
        let msg = create_noop_job(store.as_ref(), "promo").await;
        let claim = claim_first_attempt(store.as_ref(), "promo").await.claim;
        let retry_now = AttemptResult::Retry {
            error: "transient".into(),
            delay: Duration::ZERO,
        };
        let applied = store.complete(&claim, "w", &retry_now).await.unwrap();
        assert!(
            matches!(applied, Applied::Done { .. }),
            "{name}: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let snapshot = Snapshot::take(name, &config, &redis, &memory, "promo").await;
        let second = TaskMessage { attempt: 2, ..msg };
        let promoted = store.due_retries(100).await.unwrap();
        assert_eq!(published(&promoted), vec![second.clone()], "{name}");
        snapshot.lose_later_writes().await;
        // The message published for the promotion finds the task
        // `retrying`: refused, and acked by its worker.
        let again = swept_again_after_the_audit(
            store.as_ref(),
            name,
            &second,
            ScheduleIndex::Retries,
            &promoted,
        )
        .await;
        assert_eq!(again, vec![second], "{name}: the retry is promoted again");
    }
    common::cleanup(&config).await;
}

/// A sweep's reclaim of a lapsed lease can be among the writes a store
/// loses: the sweep read the entry, re-queued the task as its next
/// attempt and published that message, and the store comes back with the
/// task running at the old attempt, its lease long lapsed. The message is
/// refused as stale, so only the entry can wake the task. The audit of
/// the new server raises the entry to now (not to the lapsed expiry, which
/// is before the sweep's read), so the sweep's forget keeps it and the
/// task is re-queued again. Until the twenty-eighth session the audit
/// asked for the entry at the lapsed expiry, the forget dropped it, and
/// the task stayed running with nothing to find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_the_store_lost_is_made_again_after_the_audit() {
    let config = common::test_config(&common::unique_prefix("lostreclaim"));
    let (redis, memory, stores) = lost_writes_stores(&config).await;
    for (name, store) in stores {
        let msg = create_noop_job(store.as_ref(), "reclaimed").await;
        let lapsing = store.claim(&msg, "w1", Duration::from_millis(1)).await;
        assert!(
            matches!(lapsing, Ok(ClaimOutcome::Claimed(_))),
            "{name}: {lapsing:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let snapshot = Snapshot::take(name, &config, &redis, &memory, "reclaimed").await;
        let second = TaskMessage {
            attempt: 2,
            ..msg.clone()
        };
        let reclaimed = store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(published(&reclaimed), vec![second.clone()], "{name}");
        snapshot.lose_later_writes().await;
        // The re-queued attempt's message finds the task at attempt 1.
        let again = swept_again_after_the_audit(
            store.as_ref(),
            name,
            &second,
            ScheduleIndex::Leases,
            &reclaimed,
        )
        .await;
        assert_eq!(
            again,
            vec![second],
            "{name}: the lapsed claim is reclaimed again"
        );
    }
    common::cleanup(&config).await;
}

/// A completion can be among the writes a store loses, after its worker
/// was told it was applied: the store comes back with the task running
/// under the finished claim, whose worker has moved on and will never
/// renew it. The lease entry (kept or put back by the audit) is the
/// sweep's only way to the task, so the worker's forget of its finished
/// claim leaves it, and the task is re-queued once the lease lapses.
/// (Until the twenty-eighth session the forget dropped the entry whatever
/// the record said, and the task stayed running for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_claims_lease_entry_stays_if_the_store_lost_its_outcome() {
    let config = common::test_config(&common::unique_prefix("lostdone"));
    let (redis, memory, stores) = lost_writes_stores(&config).await;
    for (name, store) in stores {
        let msg = create_noop_job(store.as_ref(), "undone").await;
        let claimed = match store.claim(&msg, "w1", Duration::from_millis(50)).await {
            Ok(ClaimOutcome::Claimed(c)) => c,
            other => panic!("{name}: {other:?}"),
        };
        let snapshot = Snapshot::take(name, &config, &redis, &memory, "undone").await;
        let done = AttemptResult::Succeeded("{}".into());
        let applied = store.complete(&claimed.claim, "w1", &done).await.unwrap();
        assert!(
            matches!(applied, Applied::Done { .. }),
            "{name}: {applied:?}"
        );
        snapshot.lose_later_writes().await;
        audit_new_server(store.as_ref()).await;
        store.forget_claim(&claimed.claim).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let swept = store.expired_leases(100, "sweep").await.unwrap();
        assert_eq!(
            published(&swept),
            vec![TaskMessage { attempt: 2, ..msg }],
            "{name}: the lapsed claim whose outcome was lost is found and re-queued"
        );
    }
    common::cleanup(&config).await;
}

/// A schedule entry whose job record the store cannot act on (written by
/// another version, or corrupt: here a retrying task with no due time,
/// which the promote script fails on) is set aside for a while, and the
/// due entries beside it are acted on, as is an entry whose job key holds
/// another type of value. Until the twenty-eighth session the
/// error ended the whole read, and as the earliest due entry it ended
/// every later pass too: no retry was promoted and, the sweep's pass
/// ending there, no lapsed lease reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_entry_the_store_cannot_act_on_is_set_aside_and_the_rest_are_swept() {
    let config = common::test_config(&common::unique_prefix("broken-entry"));
    let store = common::connect_store(&config, "eq").await;
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    redis::pipe()
        .cmd("HSET")
        .arg(names.job_key("broken"))
        .arg(&[
            "id", "broken", "st", "running", "n", "1", "s:0", "retrying", "a:0", "2",
        ])
        .ignore()
        .cmd("ZADD")
        .arg(names.retries())
        .arg(0)
        .arg("broken|0|2")
        .ignore()
        .cmd("ZADD")
        .arg(names.leases())
        .arg(0)
        .arg("broken|0|2")
        .ignore()
        // A due time the script reads as a number and the store cannot (a
        // reply the store cannot read is set aside too).
        .cmd("HSET")
        .arg(names.job_key("broken-due"))
        .arg(&[
            "id",
            "broken-due",
            "st",
            "running",
            "n",
            "1",
            "s:0",
            "retrying",
            "a:0",
            "2",
            "due:0",
            "9e15",
        ])
        .ignore()
        .cmd("ZADD")
        .arg(names.retries())
        .arg(0)
        .arg("broken-due|0|2")
        .ignore()
        // A task name that is not UTF-8: the promote script answers it,
        // and the store cannot read the answer (until the thirty-seventh
        // session that was taken for a garbled stream, an outage, which
        // ended every pass).
        .cmd("HSET")
        .arg(names.job_key("bad-name"))
        .arg("id")
        .arg("bad-name")
        .arg("st")
        .arg("running")
        .arg("n")
        .arg("1")
        .arg("s:0")
        .arg("ready")
        .arg("a:0")
        .arg("2")
        .arg("nm:0")
        .arg(&b"\xff\xfe"[..])
        .arg("q:0")
        .arg("default")
        .ignore()
        .cmd("ZADD")
        .arg(names.retries())
        .arg(0)
        .arg("bad-name|0|2")
        .ignore()
        // A job key another program wrote as a string: every script on it
        // fails with WRONGTYPE, a code redis-rs does not know (taken for an
        // outage until the thirty-second session, it ended every pass).
        .cmd("SET")
        .arg(names.job_key("wrong-type"))
        .arg("not a hash")
        .ignore()
        .cmd("ZADD")
        .arg(names.retries())
        .arg(0)
        .arg("wrong-type|0|2")
        .ignore()
        .cmd("ZADD")
        .arg(names.leases())
        .arg(0)
        .arg("wrong-type|0|1")
        .ignore()
        // Members that are not even UTF-8: read as strings, they failed
        // every pass's read as an outage until the thirty-fourth session.
        .cmd("ZADD")
        .arg(names.retries())
        .arg(0)
        .arg(&b"\xff\xfe|0|1"[..])
        .ignore()
        .cmd("ZADD")
        .arg(names.leases())
        .arg(0)
        .arg(&b"\xff\xfe|0|1"[..])
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // Beside them, a retry due now and a lapsed lease.
    let (msg, lapsing) = a_due_retry_and_a_lapsed_lease(store.as_ref()).await;

    let promoted = store
        .due_retries(100)
        .await
        .expect("the other retries are read");
    assert_eq!(
        published(&promoted),
        vec![TaskMessage { attempt: 2, ..msg }]
    );
    let reclaimed = store
        .expired_leases(100, "sweep")
        .await
        .expect("the other leases are read");
    let requeued: Vec<TaskMessage> = published(&reclaimed)
        .into_iter()
        .filter(|m| m.job == "lapsed")
        .collect();
    assert_eq!(
        requeued,
        vec![TaskMessage {
            attempt: 2,
            ..lapsing
        }]
    );
    // Set aside for a while, not dropped: a fixed record is acted on.
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    for (index, entry) in [
        (names.retries(), "broken|0|2"),
        (names.retries(), "broken-due|0|2"),
        (names.retries(), "bad-name|0|2"),
        (names.retries(), "wrong-type|0|2"),
        (names.leases(), "wrong-type|0|1"),
    ] {
        let score: f64 = redis::cmd("ZSCORE")
            .arg(index)
            .arg(entry)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            score as u64 > secs * 1000 + 30_000 && score < 9e15,
            "the broken entry {entry} is due again at {score}, now is {secs} s"
        );
    }
    // The entries that are no text are gone.
    for index in [names.retries(), names.leases()] {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&index)
            .arg(&b"\xff\xfe|0|1"[..])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(score, None, "{index}");
    }
    // Once the sweep forgets what it promoted, nothing is due.
    let entries: Vec<String> = promoted.iter().map(|a| a.entry.clone()).collect();
    store
        .forget_retries(&entries, promoted[0].read_at)
        .await
        .unwrap();
    assert_eq!(store.due_retries(100).await.unwrap(), Vec::new());
    // One not yet due, first in the schedule: the sweep's look for the
    // next retry reads its time (it failed as an outage, at every look).
    redis::cmd("ZADD")
        .arg(names.retries())
        .arg(secs * 1000 + 10_000)
        .arg(&b"\xff\xfd|0|1"[..])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let next = store.next_retry_in(0).await.expect("read, not an outage");
    assert!(
        next.is_some_and(|d| d > Duration::from_secs(5) && d <= Duration::from_secs(11)),
        "{next:?}"
    );
    common::cleanup(&config).await;
}

/// How far past Redis's own now, ms, the one entry of schedule index
/// `key` is due.
async fn due_in_by_redis_clock(config: &Config, key: String) -> i64 {
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut redis).await.unwrap();
    let index: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(index.len(), 1, "{key}: {index:?}");
    index[0].1 as i64 - (secs * 1000 + micros / 1000) as i64
}

/// Hosts whose clocks are hours apart still agree on when a lease lapsed
/// and when a retry is due: the schedule indexes are scored by Redis's
/// clock, which each store reads as its own plus an offset measured
/// against `TIME`. (Scored by the local clock, a worker an hour ahead
/// would hide its lapsed lease and its due retry from a sweep an hour
/// behind for two hours.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_whose_clocks_are_hours_apart_agree_on_lapsed_leases_and_due_retries() {
    const HOUR_MS: i64 = 3_600_000;
    let config = common::test_config(&common::unique_prefix("clocks"));
    let names = conveyor::names::Names::new(&config.prefix);
    let with_skew = |by: &'static str, skew_ms: i64| {
        let config = config.clone();
        async move {
            conveyor::runtime::redis_store(&config, by, 2)
                .await
                .unwrap_or_else(|e| panic!("cannot reach Redis: {e}. {}", common::HOW_TO_START))
                .with_clock_skew(skew_ms)
                .await
                .unwrap()
        }
    };
    let worker = with_skew("worker", HOUR_MS).await;
    let sweep = with_skew("sweep", -HOUR_MS).await;

    // A claim by the worker an hour ahead: its lease entry is due a lease
    // from now by Redis's clock.
    let lease = Duration::from_millis(300);
    let held = create_noop_job(&worker, "held").await;
    assert!(matches!(
        worker.claim(&held, "w", lease).await,
        Ok(ClaimOutcome::Claimed(_))
    ));
    let due_in = due_in_by_redis_clock(&config, names.leases()).await;
    assert!(
        (0..=2_000).contains(&due_in),
        "the lease entry is due {due_in} ms from Redis's now, not {} ms",
        lease.as_millis()
    );

    // The worker dies; the sweep an hour behind finds the lapsed lease.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let swept = sweep.expired_leases(100, "sweep").await.unwrap();
    assert_eq!(
        published(&swept),
        vec![TaskMessage { attempt: 2, ..held }],
        "the lapsed claim is offered again as attempt 2"
    );

    // A transient failure reported by the worker an hour ahead: its retry
    // is due after the delay by Redis's clock, and the sweep an hour
    // behind promotes it then.
    let failing = create_noop_job(&worker, "failing").await;
    let claim = match worker
        .claim(&failing, "w", Duration::from_millis(LATER_MS))
        .await
    {
        Ok(ClaimOutcome::Claimed(c)) => c.claim,
        other => panic!("{other:?}"),
    };
    let delay = Duration::from_millis(200);
    let result = AttemptResult::Retry {
        error: "try again".into(),
        delay,
    };
    worker.complete(&claim, "w", &result).await.unwrap();
    let due_in = due_in_by_redis_clock(&config, names.retries()).await;
    assert!(
        (0..=2_000).contains(&due_in),
        "the retry is due {due_in} ms from Redis's now, not {} ms",
        delay.as_millis()
    );
    // The sweep an hour behind reads when it falls due by Redis's clock
    // too (to wake for it rather than at its next pass).
    let next = sweep.next_retry_in(0).await.unwrap();
    assert!(
        next.is_some_and(|n| !n.is_zero() && n <= delay + Duration::from_millis(50)),
        "the retry is due in {next:?} by the sweep's reading, not about {delay:?}"
    );
    tokio::time::sleep(delay + Duration::from_millis(200)).await;
    assert_eq!(
        sweep.next_retry_in(0).await.unwrap(),
        Some(Duration::ZERO),
        "past due"
    );
    let promoted = sweep.due_retries(100).await.unwrap();
    assert_eq!(
        published(&promoted),
        vec![TaskMessage {
            attempt: 2,
            ..failing
        }],
        "the retry is promoted once due"
    );
    let read_at = promoted.first().map_or(0, |a| a.read_at);
    let entries: Vec<String> = promoted.into_iter().map(|a| a.entry).collect();
    sweep.forget_retries(&entries, read_at).await.unwrap();
    assert_eq!(sweep.next_retry_in(0).await.unwrap(), None, "none left");
    common::cleanup(&config).await;
}

/// `list --state S` looks at a bounded number of the newest jobs and says
/// when older ones were left unread, rather than reading every retained
/// job for a state few are in (a page of 200 at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_by_state_looks_at_a_bounded_number_of_jobs_and_says_so() {
    let config = common::test_config(&common::unique_prefix("list-within"));
    let store = common::connect_store(&config, "eq").await;
    let rejection = Rejection {
        id: "oldest-rejected".into(),
        requestor: "r".into(),
        error: "bad".into(),
    };
    assert!(store.record_rejected(&rejection).await.unwrap());
    // Created after it, so newer: a page and a half of pending jobs.
    for i in 0..300 {
        store
            .create_job(&plan(&common::noop_job(format!("newer-{i:03}"))))
            .await
            .unwrap();
    }
    let within = store
        .list_jobs_within(Some(conveyor::model::JobState::Rejected), 10, 200)
        .await
        .unwrap();
    assert_eq!(within.jobs, Vec::new());
    assert!(within.cut_short);
    let further = store
        .list_jobs_within(Some(conveyor::model::JobState::Rejected), 10, 400)
        .await
        .unwrap();
    assert_eq!(
        further
            .jobs
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        ["oldest-rejected"]
    );
    assert!(!further.cut_short, "every job was looked at");
    // Enough found within the bound: not cut short.
    let pending = store
        .list_jobs_within(Some(conveyor::model::JobState::Pending), 5, 200)
        .await
        .unwrap();
    assert_eq!(pending.jobs.len(), 5);
    assert!(!pending.cut_short);
    // A job's state and error alone, as the full status has them.
    for id in ["oldest-rejected", "newer-000", "no-such-job"] {
        let full = store.job(id).await.unwrap().map(|s| (s.state, s.error));
        assert_eq!(store.job_state(id).await.unwrap(), full, "{id}");
    }
    assert_eq!(
        store.job_state("oldest-rejected").await.unwrap(),
        Some((conveyor::model::JobState::Rejected, Some("bad".into())))
    );
    // A record without its state (another program's) is refused, as the
    // full status refuses it, not taken for a job that is gone.
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    redis::cmd("HSET")
        .arg(names.job_key("stateless"))
        .arg("id")
        .arg("stateless")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(store.job_state("stateless").await.is_err());
    assert!(store.job("stateless").await.is_err());
    common::cleanup(&config).await;
}
