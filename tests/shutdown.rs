//! Graceful shutdown of a real `conveyor worker` process: SIGTERM stops
//! consuming, lets running handlers finish within the grace period, hands
//! back what did not finish, and exits 0. Nothing is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

use common::{Client, Deployment, eventually};
use conveyor::broker::Broker;
use conveyor::model::JobState;
use serde_json::json;

fn spawn_worker_process(d: &Deployment, grace_s: u64) -> tokio::process::Child {
    spawn_worker_process_with(d, grace_s, 4, &[])
}

fn spawn_worker_process_with(
    d: &Deployment,
    grace_s: u64,
    concurrency: usize,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["worker", "--concurrency", &concurrency.to_string()])
        .envs(env.iter().copied())
        .env("CONVEYOR_PREFIX", &d.config.prefix)
        .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
        .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
        .env("CONVEYOR_GRACE_S", grace_s.to_string())
        .env("CONVEYOR_LEASE_MS", "3000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn conveyor worker")
}

async fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
}

/// SIGTERM, then the worker exits 0 within its grace period and the
/// hand-back.
async fn stop_with_sigterm(child: &mut tokio::process::Child) {
    sigterm(child).await;
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("worker exits within grace + hand-back")
        .expect("wait");
    assert!(exit.success(), "worker exit status {exit:?}");
}

async fn running_tasks(d: &Deployment, ids: &[String]) -> usize {
    let mut n = 0;
    for id in ids {
        if let Some(s) = d.status(id).await {
            n += s
                .tasks
                .values()
                .filter(|t| t.state == conveyor::model::TaskState::Running)
                .count();
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_finishes_or_hands_back_its_tasks_and_nothing_is_lost() {
    let mut d = Deployment::new("sigterm").await;
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    // Short tasks finish within the grace period; long ones are handed back.
    let mut ids = Vec::new();
    for i in 0..12 {
        let ms = if i % 2 == 0 { 300 } else { 4000 };
        let id = format!("term-{i}");
        client
            .submit(&json!({"id": id, "requestor": "r",
                "tasks": [{"name": "nap", "handler": "sleep", "params": {"ms": ms}}]}))
            .await;
        ids.push(id);
    }
    let mut child = spawn_worker_process(&d, 1);
    eventually(
        "the worker process to be running tasks",
        Duration::from_secs(30),
        || async { (running_tasks(&d, &ids).await >= 2).then_some(()) },
    )
    .await;
    stop_with_sigterm(&mut child).await;

    // Another worker picks up whatever was handed back or never started.
    d.start_worker(8).await;
    let mut handed_back = 0;
    for id in &ids {
        let status = d.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        let nap = &status.tasks["nap"];
        assert_eq!(
            nap.attempts, 1,
            "a handed-back attempt does not count: {status:#?}"
        );
        handed_back += status
            .history
            .iter()
            .filter(|h| h.reason.contains("handed back"))
            .count();
        let succeeded = status
            .history
            .iter()
            .filter(|h| h.task.as_deref() == Some("nap") && h.to == "succeeded")
            .count();
        assert_eq!(succeeded, 1);
    }
    assert!(
        handed_back >= 1,
        "a 4 s task running at SIGTERM with 1 s grace must be handed back"
    );
    client.close().await;
    d.shutdown().await;
}

/// A user's worker binary (the custom-worker example) stopped while its
/// handler's blocking work runs hands the task back after its grace period
/// and exits: its runtime (`conveyor::runtime::block_on`) waits at most
/// `RUNTIME_STOP` for the blocking thread, where `#[tokio::main]` would
/// wait for the rest of that work, here an hour. The task is ready again
/// at the same attempt, its message back in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_handler_blocks_a_thread_hands_its_task_back_and_exits() {
    let d = Deployment::new("sigterm-blocking").await;
    let client = Client::connect(&d.config.prefix).await;
    let mut worker = tokio::process::Command::new(common::example_binary("custom_worker"))
        .env("CONVEYOR_PREFIX", &d.config.prefix)
        .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
        .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
        .env("CONVEYOR_GRACE_S", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the custom-worker example");
    // The worker takes the submission itself (it knows `greet`).
    client
        .submit(
            &json!({"id": "stuck", "requestor": "me", "tasks": [{"name": "hi",
            "handler": "greet", "params": {"name": "Ada", "pause_ms": 3_600_000}}]}),
        )
        .await;
    eventually(
        "the greet task to be running",
        Duration::from_secs(30),
        || async { (running_tasks(&d, &["stuck".to_owned()]).await == 1).then_some(()) },
    )
    .await;
    sigterm(&worker).await;
    let stop = conveyor::runtime::RUNTIME_STOP + Duration::from_secs(1 + 20);
    let exit = tokio::time::timeout(stop, worker.wait())
        .await
        .unwrap_or_else(|_| {
            panic!("the worker did not exit within {stop:?}: it waits for its blocking thread")
        })
        .expect("wait");
    assert!(exit.success(), "worker exit status {exit:?}");

    let status = d.status("stuck").await.expect("the job is recorded");
    let hi = &status.tasks["hi"];
    assert_eq!(hi.state, conveyor::model::TaskState::Ready, "{status:#?}");
    assert_eq!(
        hi.attempts, 1,
        "the handed-back attempt is offered again as itself, not counted as failed: {status:#?}"
    );
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason.contains("handed back")),
        "{status:#?}"
    );
    let broker = common::connect_broker(&d.config).await;
    let queued = broker
        .queue_stats(&[d.names.task_queue("default")])
        .await
        .expect("queue stats");
    assert_eq!(
        queued[0].ready, 1,
        "the handed-back task's message is queued"
    );
    client.close().await;
    d.shutdown().await;
}

/// A worker process (grace period a minute, one slot) running job `long`,
/// whose one task sleeps for ten minutes; the client that submitted it.
async fn worker_running_a_long_task(d: &Deployment) -> (Client, tokio::process::Child) {
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "long", "requestor": "r",
            "tasks": [{"name": "nap", "handler": "sleep", "params": {"ms": 600_000}}]}))
        .await;
    let child = spawn_worker_process_with(d, 60, 1, &[("CONVEYOR_ACCEPT_SUBMISSIONS", "true")]);
    let ids = ["long".to_owned()];
    eventually("the task running", WAIT, || async {
        (running_tasks(d, &ids).await == 1).then_some(())
    })
    .await;
    (client, child)
}

/// A second SIGTERM ends the grace period at once: the worker, told to
/// stop while a task that needs far longer than a minute runs, with a
/// grace period of a minute, hands the task back and exits 0 as soon as
/// it is told again. The task is ready at the same attempt, its message
/// back in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_hands_running_tasks_back_at_once() {
    let d = Deployment::new("sigterm-twice").await;
    let (client, mut child) = worker_running_a_long_task(&d).await;
    let broker = common::connect_broker(&d.config).await;
    let task_queue = d.names.task_queue("default");
    sigterm(&child).await;
    // Told once, it stops consuming and waits for its task.
    eventually("the worker to stop consuming", WAIT, || async {
        let stats = broker
            .queue_stats(std::slice::from_ref(&task_queue))
            .await
            .ok()?;
        (stats[0].consumers == 0).then_some(())
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before its grace period"
    );
    sigterm(&child).await;
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the worker exits at once when told a second time")
        .expect("wait");
    assert!(exit.success(), "worker exit status {exit:?}");
    let status = d.status("long").await.expect("the job is recorded");
    let nap = &status.tasks["nap"];
    assert_eq!(nap.state, conveyor::model::TaskState::Ready, "{status:#?}");
    assert_eq!(nap.attempts, 1, "{status:#?}");
    let queued = broker
        .queue_stats(&[task_queue])
        .await
        .expect("queue stats");
    assert_eq!(
        queued[0].ready, 1,
        "the handed-back task's message is queued"
    );
    client.close().await;
    d.shutdown().await;
}

/// A third SIGTERM ends a worker at once, whatever its hurried stop still
/// waits for: here its link to RabbitMQ went silent, so handing its task
/// back would wait out the broker's bounds (tens of seconds). It exits
/// with status 143 (128 + SIGTERM), and its task, not handed back, is the
/// sweep's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_sigterm_ends_a_worker_at_once_whatever_its_stop_waits_for() {
    let mut d = Deployment::new("sigterm-thrice").await;
    let link = common::cutter::Cutter::start(5672).await;
    d.config.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", link.port);
    let (client, mut child) = worker_running_a_long_task(&d).await;
    link.silence();
    for _ in 0..2 {
        sigterm(&child).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before the third signal"
        );
    }
    sigterm(&child).await;
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the worker exits at once when told a third time")
        .expect("wait");
    assert_eq!(exit.code(), Some(143), "worker exit status {exit:?}");
    link.heal();
    client.close().await;
    d.shutdown().await;
}

/// A task message a worker received but had no slot for when it was told
/// to stop goes back to the queue as a new message, not with the closing
/// channel: each such requeue would count a delivery against it, and a
/// message caught by a few rolling restarts would be failed as poison
/// without ever having run. Here one counted delivery is already poison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_in_a_stopped_workers_hand_goes_back_uncounted() {
    let mut d = Deployment::new("sigterm-held").await;
    d.config.worker.max_deliveries = 1;
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    let mut child = spawn_worker_process_with(
        &d,
        1,
        1,
        &[
            ("CONVEYOR_MAX_DELIVERIES", "1"),
            ("CONVEYOR_HOLD_MS", "600000"),
        ],
    );
    d.start_long_task(&client, "busy", 4000).await;
    // The worker acked the long task's message after claiming it, so it
    // has room under its prefetch for the next message, and no slot.
    client.submit(&common::noop_job("waiting")).await;
    d.wait_until_held("waiting").await;
    stop_with_sigterm(&mut child).await;

    d.start_worker(2).await;
    for id in ["waiting", "busy"] {
        let status = d.wait_terminal(id, WAIT).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        assert_eq!(status.tasks["t"].attempts, 1, "{status:#?}");
    }
    assert!(
        client.take_dead().await.is_none(),
        "nothing is dead-lettered"
    );
    client.close().await;
    d.shutdown().await;
}

/// A worker process registers itself in Redis (id, host, queues,
/// handlers, concurrency, start, heartbeat) and keeps its heartbeat fresh;
/// one stopped with SIGTERM takes itself out of the registry, and one
/// killed outright drops out once its entry's time to live (three
/// heartbeats) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_with_heartbeats_and_leave_the_registry_when_they_stop_or_die() {
    use conveyor::store::{Store, WorkerInfo};
    let d = Deployment::new("registry").await;
    let fast = [("CONVEYOR_HEARTBEAT_MS", "200")];
    let mut stopped = spawn_worker_process_with(&d, 1, 3, &fast);
    let mut killed = spawn_worker_process_with(&d, 1, 5, &fast);
    let store = d.store.clone();
    let registered = move |n: usize| {
        let store = store.clone();
        async move {
            let workers = store.workers().await.ok()?;
            (workers.len() == n).then_some(workers)
        }
    };
    let first: Vec<WorkerInfo> =
        eventually("both workers registered", WAIT, || registered(2)).await;
    for w in &first {
        assert_eq!(w.queues, vec!["default"], "{w:?}");
        for handler in ["fail", "noop", "shell", "sleep"] {
            assert!(w.handlers.iter().any(|h| h == handler), "{w:?}");
        }
        assert!(!w.host.is_empty() && !w.id.is_empty(), "{w:?}");
        assert!(w.started_ms <= w.heartbeat_ms, "{w:?}");
    }
    let mut concurrency: Vec<usize> = first.iter().map(|w| w.concurrency).collect();
    concurrency.sort_unstable();
    assert_eq!(concurrency, vec![3, 5]);
    eventually("heartbeats move on", WAIT, || async {
        let now = d.store.workers().await.ok()?;
        now.iter()
            .all(|w| {
                first
                    .iter()
                    .any(|f| f.id == w.id && f.heartbeat_ms < w.heartbeat_ms)
            })
            .then_some(())
    })
    .await;

    stop_with_sigterm(&mut stopped).await;
    let left = d.store.workers().await.unwrap();
    assert_eq!(
        left.len(),
        1,
        "unregistered at once on a clean stop: {left:?}"
    );
    assert_eq!(left[0].concurrency, 5);

    killed.start_kill().expect("kill -9");
    let _ = killed.wait().await;
    eventually("the killed worker's entry lapses", WAIT, || registered(0)).await;
    d.shutdown().await;
}
