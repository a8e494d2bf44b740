//! Failure semantics against real RabbitMQ and Redis: retries with
//! backoff, permanent errors, panics, time-outs, lapsed leases with late
//! outcomes, and poison messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, Deployment, eventually};
use conveyor::model::{JobState, TaskMessage, TaskState};
use conveyor::store::{Applied, AttemptResult, ClaimOutcome, Store};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_is_retried_with_backoff_until_it_succeeds() {
    let mut d = Deployment::new("retry").await;
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
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_fails_the_task_at_once_with_its_message() {
    let mut d = Deployment::new("permanent").await;
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
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_counts_as_a_failed_attempt_and_the_worker_survives() {
    let mut d = Deployment::new("panic").await;
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
    client
        .submit(&json!({"id": "after-panic", "requestor": "r", "tasks": [{"name": "t", "handler": "noop"}]}))
        .await;
    assert_eq!(
        d.wait_terminal("after-panic", WAIT).await.state,
        JobState::Succeeded
    );
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs_past_its_timeout_fails_with_the_reason() {
    let mut d = Deployment::new("hang").await;
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
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_is_requeued_as_the_next_attempt_and_the_late_outcome_is_rejected() {
    let mut d = Deployment::new("lease").await;
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
    let ClaimOutcome::Claimed(ghost) = d
        .store
        .claim(&msg, "ghost", Duration::from_millis(300))
        .await
        .unwrap()
    else {
        panic!("first claim must succeed");
    };
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
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_outcome_is_applied_once() {
    let mut d = Deployment::new("once").await;
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
        .claim(&msg, "w", Duration::from_secs(10))
        .await
        .unwrap()
    else {
        panic!("claim");
    };
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
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_its_task_failed_with_the_reason() {
    let mut d = Deployment::new("poison").await;
    d.config.worker.max_deliveries = 3;
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(
            &json!({"id": "toxic", "requestor": "r", "tasks": [{"name": "t", "handler": "noop"}]}),
        )
        .await;
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
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
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
    client.close().await;
    d.shutdown().await;
}
