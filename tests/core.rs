//! The core contract, against real RabbitMQ and Redis: jobs published by a
//! plain AMQP client run to completion, with their state in Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, Deployment, eventually};
use conveyor::broker::Broker;
use conveyor::model::{JobState, TaskState};
use conveyor::store::Store;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_task_job_succeeds_with_its_result_and_history() {
    let mut d = Deployment::new("single").await;
    d.start_dispatcher().await;
    let worker = d.start_worker(4).await;
    let mut client = Client::connect(&d.config.prefix).await;

    client
        .submit(
            &json!({"id": "job-1", "requestor": "alice", "labels": {"team": "x"},
            "tasks": [{"name": "only", "handler": "noop", "params": {"answer": 42}}]}),
        )
        .await;
    let (corr, reply) = client.reply().await;
    assert_eq!(corr, "job-1");
    assert_eq!(reply, json!({"job_id": "job-1", "accepted": true}));

    let status = d.wait_terminal("job-1", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded);
    assert_eq!(status.requestor, "alice");
    assert_eq!(status.labels.get("team").map(String::as_str), Some("x"));
    let task = &status.tasks["only"];
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.attempts, 1);
    assert_eq!(task.result, json!({"answer": 42}));
    assert_eq!(task.worker.as_deref(), Some(worker.as_str()));
    let transitions: Vec<(Option<&str>, &str)> = status
        .history
        .iter()
        .map(|h| (h.task.as_deref(), h.to.as_str()))
        .collect();
    assert_eq!(
        transitions,
        vec![
            (None, "pending"),
            (Some("only"), "running"),
            (None, "running"),
            (Some("only"), "succeeded"),
            (None, "succeeded"),
        ]
    );
    // One version per atomic write: create, claim, complete.
    assert_eq!(status.version, 3);
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_dag_hands_each_task_its_dependencies_results() {
    let mut d = Deployment::new("diamond").await;
    d.start_dispatcher().await;
    d.start_worker(4).await;
    let client = Client::connect(&d.config.prefix).await;
    let echo_deps = |name: &str| {
        json!({"name": name, "handler": "shell", "after": ["a"],
            "params": {"command": "python3", "args": ["-c",
                "import json,sys; d=json.load(sys.stdin); print(json.dumps({'seen': d['deps'], 'me': d['task']}))"]}})
    };
    client
        .submit(&json!({"id": "diamond", "requestor": "bob", "tasks": [
            {"name": "a", "handler": "noop", "params": {"v": 1}},
            echo_deps("b"),
            echo_deps("c"),
            {"name": "d", "handler": "shell", "after": ["b", "c"],
             "params": {"command": "python3", "args": ["-c",
                "import json,sys; d=json.load(sys.stdin); print(json.dumps(sorted(d['deps'])))"]}}
        ]}))
        .await;
    let status = d.wait_terminal("diamond", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(
        status.tasks["b"].result,
        json!({"seen": {"a": {"v": 1}}, "me": "b"})
    );
    assert_eq!(
        status.tasks["c"].result,
        json!({"seen": {"a": {"v": 1}}, "me": "c"})
    );
    assert_eq!(status.tasks["d"].result, json!(["b", "c"]));
    // d became ready only after both b and c succeeded.
    let pos = |task: &str, to: &str| {
        status
            .history
            .iter()
            .position(|h| h.task.as_deref() == Some(task) && h.to == to)
            .unwrap_or_else(|| panic!("no {task} -> {to} in history"))
    };
    assert!(pos("d", "ready") > pos("b", "succeeded"));
    assert!(pos("d", "ready") > pos("c", "succeeded"));
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_taking_submissions_runs_each_new_jobs_root_without_a_task_message() {
    let mut d = Deployment::new("takes-submissions").await;
    // No dispatcher at all: the worker records the jobs itself.
    let worker = d.start_worker_taking_submissions(4).await;
    // A consumer of the task queue far above the worker's own, with room
    // for everything: any task message published goes to it, not to the
    // worker, and is never acked while it holds it.
    let broker = common::connect_broker(&d.config).await;
    let mut interceptor = broker
        .subscribe_with_priority(&d.names.task_queue("default"), 1000, 100)
        .await
        .unwrap();
    let mut client = Client::connect(&d.config.prefix).await;

    client
        .submit(&json!({"id": "one-hop", "requestor": "alice",
            "tasks": [{"name": "only", "handler": "noop", "params": {"answer": 42}}]}))
        .await;
    let (_, reply) = client.reply().await;
    assert_eq!(reply, json!({"job_id": "one-hop", "accepted": true}));
    // It finishes, so its task never went through the task queue.
    let status = d.wait_terminal("one-hop", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["only"].result, json!({"answer": 42}));
    assert_eq!(
        status.tasks["only"].worker.as_deref(),
        Some(worker.as_str())
    );
    assert_eq!(status.version, 3, "create, claim, complete");

    // A diamond: its root skips the queue, and so does one of the two
    // tasks the root makes ready (the worker runs it next, in the same
    // slot); the other is published, and the interceptor gets only that.
    client
        .submit(&json!({"id": "diamond", "requestor": "bob", "tasks": [
            {"name": "a", "handler": "noop", "params": {"v": 1}},
            {"name": "b", "handler": "noop", "after": ["a"]},
            {"name": "c", "handler": "noop", "after": ["a"]},
            {"name": "d", "handler": "noop", "after": ["b", "c"]}
        ]}))
        .await;
    let delivery = tokio::time::timeout(WAIT, interceptor.next())
        .await
        .expect("one task made ready by the root is published")
        .expect("subscription open")
        .unwrap();
    let published = conveyor::model::TaskMessage::decode(&delivery.body)
        .unwrap()
        .task;
    // Held unacked (dropped, it would go back to the queue at once, and
    // to the interceptor again) until the interceptor lets it go.
    let held = delivery;
    let here = match published.as_str() {
        "b" => "c",
        "c" => "b",
        other => panic!("published {other}, not b or c"),
    };
    let status = eventually("the other one ran here", WAIT, || async {
        let status = d.status("diamond").await?;
        (status.tasks[here].state == TaskState::Succeeded).then_some(status)
    })
    .await;
    assert_eq!(status.tasks[here].worker.as_deref(), Some(worker.as_str()));
    // A chain: every step after the root runs here, none is published.
    client
        .submit(&json!({"id": "chain", "requestor": "carol", "tasks": [
            {"name": "one", "handler": "noop", "params": {"step": 1}},
            {"name": "two", "handler": "noop", "after": ["one"]},
            {"name": "three", "handler": "noop", "after": ["two"]}
        ]}))
        .await;
    let chain = d.wait_terminal("chain", WAIT).await;
    assert_eq!(chain.state, JobState::Succeeded, "{chain:#?}");
    for step in ["one", "two", "three"] {
        assert_eq!(chain.tasks[step].worker.as_deref(), Some(worker.as_str()));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), interceptor.next())
            .await
            .is_err(),
        "nothing else was published: not the diamond's join (it waits for {published}), not a chain step"
    );
    let status = d.status("diamond").await.unwrap();
    assert_eq!(status.tasks["a"].state, TaskState::Succeeded);
    // Let them go: the worker takes them back and the job finishes. The
    // interceptor stops taking deliveries first: requeued while it still
    // consumed, the task could come straight back to it (its priority is
    // the highest) and stay held there (a flake seen once).
    interceptor.cancel().await.expect("cancelled");
    held.acker.requeue().await.expect("requeued");
    drop(interceptor);
    let status = d.wait_terminal("diamond", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    client.close().await;
    d.shutdown().await;
}

/// A worker refuses nothing itself: what it would reject by its own
/// registry, or dead-letter, it refers to the dispatchers, whose verdict
/// it is. A worker built with fewer handlers than the dispatchers never
/// rejects a job they accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refers_what_it_would_refuse_to_the_dispatchers() {
    let mut d = Deployment::new("refers").await;
    // A worker that knows only `noop`, and no dispatcher yet.
    let full = std::mem::replace(
        &mut d.registry,
        conveyor_handler::Registry::new().with(conveyor_builtin_handlers::Noop),
    );
    let worker = d.start_worker_taking_submissions(2).await;
    d.registry = full;
    let mut client = Client::connect(&d.config.prefix).await;
    let referred = d.names.referred_queue();
    let tool = lapin::Connection::connect(&d.config.amqp_url, Default::default())
        .await
        .unwrap();

    // A job the worker cannot validate (it lacks `sleep`; the task waits
    // on a queue nobody consumes), one no registry knows, and bytes that
    // are not JSON: all three wait in the referred queue, none refused.
    let needs_sleep = json!({"id": "needs-sleep", "requestor": "alice", "tasks": [
        {"name": "t", "handler": "sleep", "params": {"ms": 1}, "queue": "other"}]});
    let unknown = json!({"id": "unknown", "requestor": "bob", "tasks": [
        {"name": "t", "handler": "no-such-handler", "params": {}}]});
    client
        .publish_raw(needs_sleep.to_string().as_bytes(), "needs-sleep")
        .await;
    client
        .publish_raw(unknown.to_string().as_bytes(), "unknown")
        .await;
    client.publish_raw(b"{not json", "garbage").await;
    eventually("three submissions referred", WAIT, || async {
        (ready_in(&tool, &referred).await? == 3).then_some(())
    })
    .await;
    // An operator sees them waiting, and that no dispatcher reads them.
    let row = conveyor_queues_row(&d, &referred)
        .await
        .expect("`conveyor queues` lists the referred queue");
    assert_eq!(
        (&row["ready"], &row["consumers"]),
        (&json!(3), &json!(0)),
        "{row}"
    );
    for id in ["needs-sleep", "unknown"] {
        assert!(d.status(id).await.is_none(), "{id} recorded by the worker");
    }
    assert!(
        client.take_dead().await.is_none(),
        "dead-lettered by the worker"
    );

    // The dispatcher gives each its verdict: accepted by its registry,
    // rejected naming the handler, dead-lettered as from the submit queue.
    d.start_dispatcher().await;
    let mut replies = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let (corr, reply) = client.reply().await;
        replies.insert(corr, reply);
    }
    let accepted = d.status("needs-sleep").await.expect("recorded");
    assert_eq!(accepted.state, JobState::Pending, "{accepted:#?}");
    assert_eq!(accepted.tasks["t"].state, TaskState::Ready);
    let rejected = d.status("unknown").await.expect("recorded");
    assert_eq!(rejected.state, JobState::Rejected);
    assert!(
        rejected
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no-such-handler"),
        "{rejected:#?}"
    );
    assert_eq!(
        replies["needs-sleep"],
        json!({"job_id": "needs-sleep", "accepted": true})
    );
    assert_eq!(replies["unknown"]["accepted"], json!(false), "{replies:?}");
    assert_eq!(replies["garbage"]["accepted"], json!(false), "{replies:?}");
    let dead = eventually("the garbage is dead-lettered", WAIT, || client.take_dead()).await;
    assert_eq!(dead.0["x-conveyor-reason-kind"], "not_json");
    assert_eq!(
        dead.0["x-conveyor-source-queue"],
        d.names.submit_queue(),
        "where its publisher put it"
    );
    assert_eq!(dead.1, b"{not json");
    assert_eq!(ready_in(&tool, &referred).await, Some(0));

    // A job the worker can run still skips the dispatcher and the task queue.
    client.submit(&common::noop_job("runs-here")).await;
    let status = d.wait_terminal("runs-here", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["t"].worker.as_deref(), Some(worker.as_str()));
    assert_eq!(status.version, 3, "create, claim, complete");
    let _ = tool.close(200, "done".into()).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_busy_with_a_long_task_still_records_new_submissions_at_once() {
    let mut d = Deployment::new("busy-takes-submissions").await;
    // One slot, no dispatcher: the worker is the only one to take jobs.
    d.start_worker_taking_submissions(1).await;
    let client = Client::connect(&d.config.prefix).await;
    d.start_long_task(&client, "long", 10000).await;
    client.submit(&common::noop_job("next")).await;
    // Recorded while the only slot is still taken, not after it frees.
    let next = eventually("the next job is recorded", WAIT, || d.status("next")).await;
    assert_eq!(next.state, JobState::Pending);
    assert_eq!(
        d.status("long").await.unwrap().tasks["t"].state,
        TaskState::Running,
        "the next job was recorded only once the slot was free"
    );
    for id in ["long", "next"] {
        assert_eq!(d.wait_terminal(id, WAIT).await.state, JobState::Succeeded);
    }
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_consumer_gets_every_message_while_it_has_room() {
    let d = Deployment::new("priority").await;
    let broker = common::connect_broker(&d.config).await;
    let queue = d.names.task_queue("default");
    let mut low = broker.subscribe(&queue, 100).await.unwrap();
    let mut high = broker.subscribe_with_priority(&queue, 3, 10).await.unwrap();
    let publish = |bodies: &[&str]| {
        let batch = bodies
            .iter()
            .map(|b| conveyor::broker::Outgoing::durable(queue.clone(), b.as_bytes().to_vec()))
            .collect();
        broker.publish(batch)
    };
    let body = |d: conveyor::broker::Delivery| String::from_utf8(d.body).unwrap();
    publish(&["1", "2", "3"]).await.unwrap();
    let mut to_high = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(WAIT, high.next()).await.unwrap();
        to_high.push(body(d.unwrap().unwrap()));
    }
    assert_eq!(to_high, ["1", "2", "3"]);
    // The high one is full (nothing acked): the rest go to the low one.
    publish(&["4", "5"]).await.unwrap();
    let mut to_low = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(WAIT, low.next()).await.unwrap();
        to_low.push(body(d.unwrap().unwrap()));
    }
    assert_eq!(
        to_low,
        ["4", "5"],
        "the low-priority consumer got only the overflow"
    );
    drop((low, high));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_through_two_dispatchers_and_two_workers_each_apply_every_outcome_once() {
    let mut d = Deployment::new("thousand").await;
    d.start_dispatcher().await;
    d.start_dispatcher().await;
    // One takes submissions too: jobs go both ways (recorded by a
    // dispatcher, or by the worker which runs their first task itself).
    d.start_worker_taking_submissions(16).await;
    d.start_worker(16).await;
    let client = Client::connect(&d.config.prefix).await;
    let n = 1000;
    for i in 0..n {
        client
            .submit(&json!({"id": format!("bulk-{i}"), "requestor": "load",
            "tasks": [
                {"name": "first", "handler": "noop", "params": {"i": i}},
                {"name": "second", "handler": "noop", "after": ["first"]}
            ]}))
            .await;
    }
    for i in 0..n {
        let id = format!("bulk-{i}");
        let status = d.wait_terminal(&id, WAIT).await;
        assert_eq!(status.state, JobState::Succeeded, "{id}");
        for (name, task) in &status.tasks {
            assert_eq!(task.attempts, 1, "{id}/{name}");
            let applied = status
                .history
                .iter()
                .filter(|h| h.task.as_deref() == Some(name) && h.to == "succeeded")
                .count();
            assert_eq!(applied, 1, "{id}/{name} outcome applied {applied} times");
        }
        let finished = status
            .history
            .iter()
            .filter(|h| h.task.is_none() && h.to == "succeeded")
            .count();
        assert_eq!(finished, 1, "{id} finished {finished} times");
    }
    let listed = d
        .store
        .list_jobs(Some(JobState::Succeeded), 2 * n)
        .await
        .unwrap();
    assert_eq!(listed.len(), n);
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_handlers_and_bad_params_are_rejected_in_the_reply_and_in_status() {
    let mut d = Deployment::new("reject").await;
    d.start_dispatcher().await;
    let mut client = Client::connect(&d.config.prefix).await;

    client
        .submit(&json!({"id": "bad-handler", "requestor": "r",
            "tasks": [{"name": "t", "handler": "teleport"}]}))
        .await;
    let (corr, reply) = client.reply().await;
    assert_eq!(corr, "bad-handler");
    assert_eq!(reply["accepted"], json!(false));
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("tasks[0].handler") && error.contains("teleport"),
        "{error}"
    );
    let status = d.status("bad-handler").await.expect("rejection recorded");
    assert_eq!(status.state, JobState::Rejected);
    assert_eq!(status.error.as_deref(), Some(error));

    client
        .submit(&json!({"id": "bad-params", "requestor": "r",
            "tasks": [{"name": "nap", "handler": "sleep", "params": {"ms": -5}}]}))
        .await;
    let (_, reply) = client.reply().await;
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("tasks[0]") && error.contains("params.ms"),
        "{error}"
    );
    assert_eq!(
        d.status("bad-params").await.unwrap().state,
        JobState::Rejected
    );

    client
        .submit(&json!({"id": "cycle", "requestor": "r", "tasks": [
            {"name": "a", "handler": "noop", "after": ["b"]},
            {"name": "b", "handler": "noop", "after": ["a"]}]}))
        .await;
    let (_, reply) = client.reply().await;
    assert!(
        reply["error"].as_str().unwrap().contains("cycle"),
        "{reply}"
    );
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_and_oversized_messages_are_dead_lettered_and_the_dispatcher_keeps_serving() {
    let mut d = Deployment::new("dead").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let mut client = Client::connect(&d.config.prefix).await;

    client.publish_raw(b"{this is not json", "garbage").await;
    let (corr, reply) = client.reply().await;
    assert_eq!(corr, "garbage");
    assert_eq!(reply["accepted"], json!(false));
    let big = format!("{{\"requestor\": \"{}\"}}", "x".repeat(1024 * 1024 + 10));
    client.publish_raw(big.as_bytes(), "big").await;
    let (corr, reply) = client.reply().await;
    assert_eq!(corr, "big");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("max_message_bytes"),
        "{reply}"
    );

    let first = eventually("first dead letter", WAIT, || client.take_dead()).await;
    assert_eq!(first.0["x-conveyor-reason-kind"], "not_json");
    assert_eq!(
        first.0["x-conveyor-source-queue"],
        format!("{}.submit", d.config.prefix)
    );
    assert!(first.0["x-conveyor-reason"].contains("not JSON"));
    assert_eq!(first.1, b"{this is not json");
    let second = eventually("second dead letter", WAIT, || client.take_dead()).await;
    assert_eq!(second.0["x-conveyor-reason-kind"], "too_large");
    assert_eq!(second.1.len(), big.len());

    d.assert_serves(&client, "after-garbage", WAIT).await;
    client.close().await;
    d.shutdown().await;
}

/// An operator reads a dead letter and may publish it again as it was:
/// it keeps every property its publisher set (expiration and user id
/// aside), its headers of every type, and gains Conveyor's reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_the_properties_and_headers_its_publisher_set() {
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    let mut d = Deployment::new("deadprops").await;
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;

    let mut trace = FieldTable::default();
    trace.insert("span".into(), AMQPValue::LongLongInt(42));
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    headers.insert("retry".into(), AMQPValue::Boolean(true));
    headers.insert("weight".into(), AMQPValue::Double(0.25));
    headers.insert("trace".into(), AMQPValue::FieldTable(trace));
    headers.insert(
        "hops".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::LongString(LongString::from("two")),
        ])),
    );
    // A reason left by an earlier dead-lettering is replaced, not doubled.
    headers.insert(
        "x-conveyor-reason".into(),
        AMQPValue::LongString(LongString::from("an old reason")),
    );
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("text/plain".into())
        .with_content_encoding("identity".into())
        .with_correlation_id("corr-9".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("nightly-report".into())
        .with_app_id("billing".into())
        .with_priority(3)
        .with_headers(headers);
    client.publish_with(b"%PDF-1.7", props).await;

    let dead = eventually("the dead letter", WAIT, || client.take_dead_delivery()).await;
    assert_eq!(dead.data, b"%PDF-1.7");
    let p = &dead.properties;
    let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    assert_eq!(text(p.content_type()).as_deref(), Some("text/plain"));
    assert_eq!(text(p.content_encoding()).as_deref(), Some("identity"));
    assert_eq!(text(p.correlation_id()).as_deref(), Some("corr-9"));
    assert_eq!(text(p.message_id()).as_deref(), Some("msg-1"));
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(text(p.kind()).as_deref(), Some("nightly-report"));
    assert_eq!(text(p.app_id()).as_deref(), Some("billing"));
    assert_eq!(*p.priority(), Some(3));
    assert_eq!(*p.delivery_mode(), Some(2), "dead letters are persistent");
    let h = p.headers().clone().expect("headers");
    let h = h.inner();
    let long = |name: &str| match h.get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(long("tenant"), "acme");
    assert_eq!(h.get("retry"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(h.get("weight"), Some(&AMQPValue::Double(0.25)));
    match h.get("trace") {
        Some(AMQPValue::FieldTable(t)) => {
            assert_eq!(t.inner().get("span"), Some(&AMQPValue::LongLongInt(42)))
        }
        other => panic!("trace: {other:?}"),
    }
    match h.get("hops") {
        Some(AMQPValue::FieldArray(items)) => assert_eq!(items.as_slice().len(), 2),
        other => panic!("hops: {other:?}"),
    }
    assert!(long("x-conveyor-reason").contains("not JSON"));
    assert_eq!(long("x-conveyor-reason-kind"), "not_json");
    assert_eq!(long("x-conveyor-original-correlation-id"), "corr-9");
    assert_eq!(
        long("x-conveyor-source-queue"),
        format!("{}.submit", d.config.prefix)
    );
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_an_existing_id_returns_the_existing_job_and_changes_nothing() {
    let mut d = Deployment::new("idem").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let mut client = Client::connect(&d.config.prefix).await;
    let job = json!({"id": "once", "requestor": "r",
        "tasks": [{"name": "t", "handler": "noop", "params": {"v": 1}}]});
    client.submit(&job).await;
    let (_, first) = client.reply().await;
    assert_eq!(first, json!({"job_id": "once", "accepted": true}));
    let before = d.wait_terminal("once", WAIT).await;

    let mut changed = job.clone();
    changed["tasks"][0]["params"]["v"] = json!(2);
    client.submit(&changed).await;
    let (_, second) = client.reply().await;
    assert_eq!(
        second,
        json!({"job_id": "once", "accepted": true, "existing": true})
    );
    let after = d.status("once").await.unwrap();
    assert_eq!(after, before, "a resubmission must change nothing");
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resubmission_of_a_running_job_is_answered_with_that_job() {
    let mut d = Deployment::new("idem-bad").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let mut client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "busy", "requestor": "r",
            "tasks": [{"name": "t", "handler": "sleep", "params": {"ms": 1500}}]}))
        .await;
    let (_, first) = client.reply().await;
    assert_eq!(first, json!({"job_id": "busy", "accepted": true}));

    client
        .submit(&json!({"id": "busy", "requestor": "r",
            "tasks": [{"name": "t", "handler": "no-such-handler"}]}))
        .await;
    let (_, second) = client.reply().await;
    assert_eq!(
        second,
        json!({"job_id": "busy", "accepted": true, "existing": true}),
        "the id names a running job, which the invalid body does not change"
    );
    let done = d.wait_terminal("busy", WAIT).await;
    assert_eq!(done.state, JobState::Succeeded);
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_resubmission_under_a_rejected_id_is_told_the_id_stays_rejected() {
    let mut d = Deployment::new("idem-rej").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let mut client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "oops", "requestor": "r",
            "tasks": [{"name": "t", "handler": "no-such-handler"}]}))
        .await;
    let (_, first) = client.reply().await;
    assert_eq!(first["accepted"], false, "{first}");
    let rejected = d.wait_terminal("oops", WAIT).await;
    assert_eq!(rejected.state, JobState::Rejected);

    client.submit(&common::noop_job("oops")).await;
    let (_, second) = client.reply().await;
    assert_eq!(second["job_id"], "oops", "{second}");
    assert_eq!(second["accepted"], false, "{second}");
    assert_eq!(second["existing"], true, "{second}");
    let error = second["error"].as_str().unwrap_or_default();
    assert!(error.contains("new id"), "{error}");
    assert!(
        error.contains("no-such-handler"),
        "the recorded rejection: {error}"
    );
    assert_eq!(
        d.status("oops").await.unwrap(),
        rejected,
        "a resubmission must change nothing"
    );
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_task_that_times_out_fails_with_the_reason() {
    let mut d = Deployment::new("timeout").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "slow", "requestor": "r", "tasks": [
            {"name": "hang", "handler": "shell", "timeout_s": 0.5, "retry": {"max_attempts": 2, "base_ms": 10, "cap_ms": 20},
             "params": {"command": "sleep", "args": ["30"]}},
            {"name": "after", "handler": "noop", "after": ["hang"]}]}))
        .await;
    let status = d.wait_terminal("slow", WAIT).await;
    assert_eq!(status.state, JobState::Failed);
    let hang = &status.tasks["hang"];
    assert_eq!(hang.state, TaskState::Failed);
    assert_eq!(hang.attempts, 2);
    assert!(
        hang.error.as_deref().unwrap_or("").contains("timed out"),
        "{hang:?}"
    );
    let after = &status.tasks["after"];
    assert_eq!(after.state, TaskState::Failed);
    assert_eq!(after.error.as_deref(), Some("dependency failed: hang"));
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_fan_out_and_fan_in_hands_every_result_to_the_join() {
    let mut d = Deployment::new("fanout").await;
    d.start_dispatcher().await;
    d.start_worker(32).await;
    let client = Client::connect(&d.config.prefix).await;
    let k = 2500;
    let mut tasks = vec![json!({"name": "root", "handler": "noop", "params": {"r": 1}})];
    let children: Vec<String> = (0..k).map(|i| format!("c{i}")).collect();
    for c in &children {
        tasks.push(json!({"name": c, "handler": "noop", "after": ["root"], "params": {"c": c}}));
    }
    tasks.push(
        json!({"name": "join", "handler": "shell", "after": children,
        "params": {"command": "python3", "args": ["-c",
            "import json,sys; d=json.load(sys.stdin); print(json.dumps(len(d['deps'])))"]}}),
    );
    client
        .submit(&json!({"id": "wide", "requestor": "r", "tasks": tasks}))
        .await;
    let status = d.wait_terminal("wide", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded);
    assert_eq!(status.tasks["join"].result, json!(k));
    // Submitted, started and finished; a claim and a success per task; the
    // k children and the join each made ready once.
    assert_eq!(status.history.len(), 3 + 2 * (k + 2) + (k + 1));
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_of_broker_and_redis_nodes_are_tried_in_turn_until_one_answers() {
    let prefix = common::unique_prefix("nodes");
    let mut config = common::test_config(&prefix);
    let dead_redis = format!("redis://:secret@127.0.0.1:{}/", common::free_port());
    let err = conveyor::runtime::redis_store(
        &conveyor::config::Config {
            redis_url: format!("{dead_redis},{dead_redis}"),
            ..config.clone()
        },
        "t",
        1,
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        err.contains("no Redis node answered as the primary (node 1: ")
            && err.contains("; node 2: "),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    let dead = format!("amqp://guest:secret@127.0.0.1:{}/%2f", common::free_port());
    // Every node down: the error names each one, password redacted.
    let err = conveyor::runtime::amqp_broker(&conveyor::config::Config {
        amqp_url: format!("{dead},{dead}"),
        ..config.clone()
    })
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert_eq!(err.matches("guest:***@127.0.0.1").count(), 2, "{err}");
    assert!(!err.contains("secret"), "{err}");
    // A dead node first: dispatcher and worker connect to the live one.
    config.amqp_url = format!("{dead}, {}", config.amqp_url);
    config.redis_url = format!("{dead_redis}, {}", config.redis_url);
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    d.start_worker(4).await;
    let client = Client::connect(&prefix).await;
    d.assert_serves(&client, "via-second-node", WAIT).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_quotes_backslashes_and_non_ascii_text_exactly() {
    let mut d = Deployment::new("histtext").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect(&d.config.prefix).await;
    let requestor = "o\"neil \\ café/日本 \t end";
    client
        .submit(&json!({"id": "odd-text", "requestor": requestor,
            "tasks": [{"name": "t", "handler": "fail",
                "params": {"permanent": true, "message": "bad \"x\"\n naïve \u{1}"}}]}))
        .await;
    let status = d.wait_terminal("odd-text", WAIT).await;
    assert_eq!(status.requestor, requestor);
    assert_eq!(
        status.history[0].reason,
        format!("submitted by {requestor}")
    );
    assert_eq!(status.state, JobState::Failed);
    let error = status.tasks["t"].error.clone().unwrap_or_default();
    assert!(error.contains("bad \"x\"\n naïve \u{1}"), "{error}");
    let failed = status
        .history
        .iter()
        .find(|h| h.task.as_deref() == Some("t") && h.to == "failed")
        .map(|h| h.reason.clone());
    assert_eq!(failed, Some(error));
    client.close().await;
    d.shutdown().await;
}

/// `queue` as a passive declare sees it (on a channel of its own: a
/// missing queue closes it), or `None` if it does not exist.
async fn passively_declared(conn: &lapin::Connection, queue: &str) -> Option<lapin::Queue> {
    let channel = conn.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "done".into()).await;
    declared.ok()
}

/// Messages ready in `queue`, or `None` if it does not exist.
async fn ready_in(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    passively_declared(conn, queue)
        .await
        .map(|q| q.message_count())
}

/// Wait until `queue` exists and has a consumer.
async fn until_consumed(conn: &lapin::Connection, queue: &str, what: &str, within: Duration) {
    eventually(what, within, || async {
        let q = passively_declared(conn, queue).await?;
        (q.consumer_count() > 0).then_some(())
    })
    .await;
}

/// Delete `queue` as an operator would, and check that it is gone (when
/// nothing declares it again at once: see [`delete_consumed_queue`]).
async fn delete_queue(config: &conveyor::config::Config, tool: &lapin::Connection, queue: &str) {
    conveyor::purge::delete_queues(config, &[queue.to_owned()]).await;
    assert_eq!(ready_in(tool, queue).await, None, "{queue} was not deleted");
}

/// Delete `queue`, which processes consume, as an operator would: RabbitMQ
/// must answer the delete. Whether it is gone cannot be looked at after:
/// its consumers, told of the deletion, may have declared it again first.
async fn delete_consumed_queue(tool: &lapin::Connection, queue: &str) {
    let channel = tool.create_channel().await.expect("a channel");
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap_or_else(|e| panic!("deleting {queue}: {e}"));
    let _ = channel.close(200, "deleted".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_queue_deleted_by_an_operator_is_declared_again_when_the_publish_comes_back_returned()
 {
    let mut d = Deployment::new("deleted-queue").await;
    d.start_dispatcher().await;
    let tool = conveyor::broker::amqp::tool_connection(&d.config)
        .await
        .expect("tool connection");
    let (tool, submit) = (&tool, d.names.submit_queue());
    let task_queue = d.names.task_queue("default");
    // The dispatcher has declared its topology once it consumes submissions.
    until_consumed(tool, &submit, "the dispatcher consuming submissions", WAIT).await;
    delete_queue(&d.config, tool, &task_queue).await;

    let client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("after-delete")).await;
    // No worker runs (a consumer's reconnection would declare its queue):
    // only the dispatcher's outbox can bring the queue back.
    let q = task_queue.as_str();
    eventually(
        "the task routed to a task queue declared again (the dispatcher kept publishing to the \
         deleted queue, whose publishes come back returned, without declaring it)",
        Duration::from_secs(20),
        || async move { ready_in(tool, q).await.filter(|&n| n > 0) },
    )
    .await;
    d.start_worker(2).await;
    let status = d.wait_terminal("after-delete", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["t"].attempts, 1);
    // The submission was acked once its task was routed, not dead-lettered
    // after its requeues ran out.
    assert!(client.take_dead().await.is_none(), "a dead letter");
    client.close().await;
    let _ = tool.close(200, "bye".into()).await;
    d.shutdown().await;
}

/// The submission queue deleted by an operator under a running dispatcher
/// (nothing publishes to it through Conveyor, so no returned publish
/// brings it back) is declared again by the dispatcher when it subscribes
/// again, and consumed: a submission after it runs. Until the thirty-first
/// session every new subscription met 404, dropped the consuming
/// connection, and the queue stayed gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_queue_deleted_under_its_dispatcher_is_declared_again_and_consumed() {
    let mut d = Deployment::new("deleted-submit").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let tool = conveyor::broker::amqp::tool_connection(&d.config)
        .await
        .expect("tool connection");
    let (tool, submit) = (&tool, d.names.submit_queue());
    until_consumed(tool, &submit, "the dispatcher consuming submissions", WAIT).await;
    delete_consumed_queue(tool, &submit).await;
    let again = "the submission queue declared again and consumed";
    until_consumed(tool, &submit, again, Duration::from_secs(30)).await;
    let client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("after-delete")).await;
    let status = d.wait_terminal("after-delete", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    client.close().await;
    let _ = tool.close(200, "bye".into()).await;
    d.shutdown().await;
}

/// A job naming a task queue that exists with other arguments than this
/// deployment declares (here a classic queue where the config says quorum,
/// as a change of `queue_type` leaves it; RabbitMQ refuses the declare for
/// good) is accepted and its task published to the queue as it is, not
/// given back to its queue again and again with no reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_a_queue_declared_with_other_arguments_is_published_to_it_as_it_is() {
    let mut d = Deployment::new("other-arguments").await;
    // The dispatcher and the worker are configured with the queue too:
    // declared as RabbitMQ lets them (until the thirty-first session the
    // dispatcher did not start, retrying its declare for ever).
    d.config.worker.queues = vec!["default".to_owned(), "classic".to_owned()];
    let tool = conveyor::broker::amqp::tool_connection(&d.config)
        .await
        .expect("tool connection");
    let classic = d.names.task_queue("classic");
    let channel = tool.create_channel().await.expect("channel");
    channel
        .queue_declare(
            classic.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("a classic queue");
    let _ = channel.close(200, "done".into()).await;
    d.start_dispatcher().await;

    let mut client = Client::connect(&d.config.prefix).await;
    client
        .submit(&serde_json::json!({"id": "on-classic", "requestor": "r",
            "tasks": [{"name": "t", "handler": "noop", "queue": "classic"}]}))
        .await;
    let (_, reply) = client.reply().await;
    assert_eq!(reply["accepted"], true, "{reply}");
    let (tool, q) = (&tool, classic.as_str());
    eventually("the task in the queue as it is", WAIT, || async move {
        ready_in(tool, q).await.filter(|&n| n == 1)
    })
    .await;
    // A worker consuming the queue as it is runs the task.
    d.start_worker(2).await;
    let status = d.wait_terminal("on-classic", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    client.close().await;
    let _ = tool.close(200, "bye".into()).await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_to_a_deleted_queue_is_published_once_the_worker_declares_it_again() {
    let mut config = common::test_config(&common::unique_prefix("deleted-follow-up"));
    // Leases far longer than the test: the dispatcher's sweep cannot
    // publish the follow-up in the worker's stead.
    config.worker.lease_ms = 600_000;
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let tool = conveyor::broker::amqp::tool_connection(&d.config)
        .await
        .expect("tool connection");
    let tool = &tool;
    let client = Client::connect(&d.config.prefix).await;
    // `b` runs on a queue no worker consumes, so nobody else declares it.
    let other = d.names.task_queue("other");
    let job = |id: &str| {
        json!({"id": id, "requestor": "r", "tasks": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "after": ["a"], "queue": "other"}]})
    };
    let q = other.as_str();
    client.submit(&job("first")).await;
    eventually(
        "the first job's b queued (the worker declared other)",
        WAIT,
        || async move { ready_in(tool, q).await.filter(|&n| n > 0) },
    )
    .await;
    delete_queue(&d.config, tool, &other).await;

    client.submit(&job("second")).await;
    eventually(
        "the second job's b routed to `other` declared again (the worker kept publishing to the \
         deleted queue, whose publishes come back returned, without declaring it)",
        Duration::from_secs(20),
        || async move { ready_in(tool, q).await.filter(|&n| n > 0) },
    )
    .await;
    let status = d.status("second").await.expect("second job");
    assert_eq!(status.tasks["a"].state, TaskState::Succeeded);
    assert_eq!(status.tasks["b"].state, TaskState::Ready);
    client.close().await;
    let _ = tool.close(200, "bye".into()).await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amqp_broker_reports_a_mandatory_publish_to_a_missing_queue_as_returned() {
    use conveyor::broker::{Broker, BrokerError, Outgoing};
    let config = common::test_config(&common::unique_prefix("returned"));
    // Connecting declares nothing.
    let broker = common::connect_broker(&config).await;
    let missing = conveyor::names::Names::new(&config.prefix).task_queue("other");
    let err = broker
        .publish(vec![Outgoing::durable(missing.clone(), b"{}".to_vec())])
        .await
        .expect_err("a mandatory publish to a missing queue must not be confirmed as queued");
    assert!(
        matches!(&err, BrokerError::Unroutable { queue, reason }
            if queue == &missing && reason.contains("NO_ROUTE")),
        "{err:?}"
    );
    assert!(err.is_retryable() && !err.is_unavailable(), "{err:?}");
    // Without the mandatory flag the broker drops it without a word.
    let mut quiet = Outgoing::durable(missing.clone(), b"{}".to_vec());
    quiet.mandatory = false;
    broker.publish(vec![quiet]).await.expect("dropped silently");
    // The connection outlived the returned message: once the queue is
    // declared, the same publish is routed.
    broker
        .declare(&["other".to_owned()])
        .await
        .expect("declare");
    broker
        .publish(vec![Outgoing::durable(missing.clone(), b"{}".to_vec())])
        .await
        .expect("routed once declared");
    assert!(broker.is_connected());
    common::cleanup(&config).await;
}

/// A stopping process closes its subscriptions: the acks it made go out
/// before the channel closes (they are sent a moment after `ack` returns,
/// and a process exiting right after would lose them, to have its acked
/// deliveries sent to others again), and what it left unsettled goes
/// back to the queue at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_subscription_sends_its_acks_first_and_returns_the_rest() {
    use conveyor::broker::Outgoing;
    let (config, broker, queue, _) = common::broker_with_one_task_queue("close-sub").await;
    let message = |body: &str| Outgoing::durable(queue.clone(), body.as_bytes().to_vec());
    broker
        .publish(vec![message("acked"), message("left")])
        .await
        .expect("published");
    let mut subscription = broker.subscribe(&queue, 2).await.expect("subscribed");
    let acked = common::next_delivery(&mut subscription, WAIT)
        .await
        .expect("a delivery");
    let left = common::next_delivery(&mut subscription, WAIT)
        .await
        .expect("a delivery");
    assert_eq!(
        (&acked.body[..], &left.body[..]),
        (&b"acked"[..], &b"left"[..])
    );
    acked.acker.ack().await.expect("acked");
    subscription.close().await;
    // The queue learns of the closed channel a moment after the close is
    // answered, and returns the channel's unsettled deliveries as it
    // drops its consumer.
    let stats = eventually("the consumer gone with its channel", WAIT, || async {
        let stats = broker
            .queue_stats(std::slice::from_ref(&queue))
            .await
            .ok()?;
        (stats[0].consumers == 0).then_some(stats)
    })
    .await;
    assert_eq!(
        stats[0].ready, 1,
        "only the unsettled delivery is back: {stats:?}"
    );
    drop(left);
    common::cleanup(&config).await;
}

/// A queue RabbitMQ will not let this process consume (held exclusively
/// by another connection: 405 RESOURCE_LOCKED; no read permission is
/// 403) is refused for good, naming the queue, not taken for a lost
/// connection (`Unavailable`, on which the broker made its consuming
/// connection again at every retry, the old one living on); the broker
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_held_exclusively_elsewhere_is_refused_for_good_not_as_a_lost_connection() {
    use conveyor::broker::{BrokerError, Outgoing};
    let (config, broker, queue, _) = common::broker_with_one_task_queue("locked").await;
    let other = lapin::Connection::connect(&config.amqp_url, Default::default())
        .await
        .expect("a connection of another client");
    let channel = other.create_channel().await.expect("a channel");
    let locked = format!("{}.locked", config.prefix);
    channel
        .queue_declare(
            locked.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("an exclusive queue");

    let refused = broker.subscribe(&locked, 1).await.map(|_| ());

    match &refused {
        Err(BrokerError::Fatal(e)) => assert!(e.contains(&locked), "{e}"),
        other => panic!("expected a refusal for good, got {other:?}"),
    }
    broker
        .publish(vec![Outgoing::durable(queue.clone(), b"still".to_vec())])
        .await
        .expect("published");
    let mut subscription = broker.subscribe(&queue, 1).await.expect("subscribed");
    let delivery = common::next_delivery(&mut subscription, WAIT)
        .await
        .expect("a delivery");
    delivery.acker.ack().await.expect("acked");
    subscription.close().await;
    drop(other);
    common::cleanup(&config).await;
}

/// A delivery dropped unsettled (the task holding it panicked) goes back
/// to its queue at once, while its subscription lives on: left for the
/// channel's close, it would hold a prefetch slot for as long as the
/// subscription lasts (here the only one), and past RabbitMQ's
/// `consumer_timeout` have the channel closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_unsettled_is_requeued_while_its_subscription_lives() {
    use conveyor::broker::Outgoing;
    let (config, broker, queue, _) = common::broker_with_one_task_queue("dropped").await;
    broker
        .publish(vec![Outgoing::durable(queue.clone(), b"dropped".to_vec())])
        .await
        .expect("published");
    let mut subscription = broker.subscribe(&queue, 1).await.expect("subscribed");
    let first = common::next_delivery(&mut subscription, WAIT)
        .await
        .expect("a delivery");

    drop(first);

    let again = common::next_delivery(&mut subscription, WAIT)
        .await
        .expect("the dropped delivery, again, to the same subscription");
    assert_eq!(&again.body[..], b"dropped");
    again.acker.ack().await.expect("acked");
    subscription.close().await;
    common::cleanup(&config).await;
}

/// lapin hands a returned message to whichever confirm of the channel it
/// settles next, which under concurrent publishing is often another
/// message's (one publish in 25 to a missing queue came back "confirmed"
/// when batches shared a channel): a publish to a missing queue is
/// reported returned every time, alone or inside a batch, while other
/// batches publish at the same time, and every message reported confirmed
/// is in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_publish_is_never_reported_confirmed_while_other_batches_publish_beside_it() {
    use conveyor::broker::Outgoing;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (config, broker, queued, missing) = common::broker_with_one_task_queue("returns").await;
    let durable = |q: &String| Outgoing::durable(q.clone(), b"{}".to_vec());
    let stop = Arc::new(AtomicBool::new(false));
    let beside = tokio::spawn({
        let (broker, stop, batch) = (broker.clone(), stop.clone(), vec![durable(&queued); 4]);
        async move {
            let mut confirmed = 0;
            while !stop.load(Ordering::Relaxed) {
                broker
                    .publish(batch.clone())
                    .await
                    .expect("a routable batch");
                confirmed += batch.len();
            }
            confirmed
        }
    });
    let (mut confirmed, mut lost) = (0, Vec::new());
    for round in 0..1_500 {
        let batch = if round % 2 == 0 {
            vec![durable(&missing)]
        } else {
            vec![
                durable(&queued),
                durable(&queued),
                durable(&missing),
                durable(&queued),
            ]
        };
        let said = match broker.publish_each(batch.clone()).await {
            Ok(()) => vec![true; batch.len()],
            Err(partly) => partly.confirmed,
        };
        for (msg, ok) in batch.iter().zip(said) {
            match (ok, msg.queue == missing) {
                (true, true) => lost.push(round),
                (true, false) => confirmed += 1,
                (false, _) => {}
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    confirmed += beside.await.expect("the batches beside");
    assert!(
        lost.is_empty(),
        "{} publishes to a missing queue reported confirmed (rounds {:?}…)",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let stats = broker.queue_stats(&[queued]).await.expect("stats");
    assert_eq!(
        stats[0].ready as usize, confirmed,
        "every confirmed message is queued"
    );
    common::cleanup(&config).await;
}

/// A batch the broker takes only in part says which messages it took, so
/// a caller tries again with the others alone (a worker giving back what
/// it holds to a queue that refuses some of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_amqp_broker_says_which_messages_of_a_batch_it_confirmed() {
    use conveyor::broker::{Broker, BrokerError, Outgoing, PartlyPublished};
    let (config, broker, queued, missing) = common::broker_with_one_task_queue("partly").await;
    let names = conveyor::names::Names::new(&config.prefix);
    let batch = [&queued, &missing, &queued, &missing, &queued]
        .map(|q| Outgoing::durable(q.clone(), b"{}".to_vec()))
        .to_vec();
    let partly = broker
        .publish_each(batch)
        .await
        .expect_err("two messages have no queue");
    assert!(
        matches!(&partly.error, BrokerError::Unroutable { queue, .. } if queue == &missing),
        "{partly:?}"
    );
    let PartlyPublished { confirmed, .. } = partly;
    assert_eq!(confirmed, [true, false, true, false, true]);
    let stats = broker.queue_stats(&[queued]).await.expect("stats");
    assert_eq!(stats[0].ready, 3, "the confirmed ones are queued");
    broker
        .publish_each(vec![Outgoing::durable(
            names.submit_queue(),
            b"{}".to_vec(),
        )])
        .await
        .expect("a batch wholly taken");
    common::cleanup(&config).await;
}

/// The row of `queue` in what `conveyor queues --json` prints, if listed.
async fn conveyor_queues_row(d: &Deployment, queue: &str) -> Option<Value> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["queues", "--json"])
        .env("CONVEYOR_PREFIX", &d.config.prefix)
        .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
        .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
        .output()
        .await
        .expect("run conveyor queues");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    stats
        .as_array()?
        .iter()
        .find(|s| s["queue"] == queue)
        .cloned()
}

/// `conveyor queues` shows every queue a job has named, including one with
/// tasks waiting and no worker reading it (the queue an operator most needs
/// to see), not only the configured queues and those of live workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conveyor_queues_shows_a_queue_with_waiting_tasks_and_no_worker() {
    let mut d = Deployment::new("queues-cli").await;
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "gpu-job", "requestor": "r",
            "tasks": [{"name": "t", "handler": "noop", "queue": "gpu"}]}))
        .await;
    eventually("the job recorded", WAIT, || async {
        d.status("gpu-job").await.map(|_| ())
    })
    .await;
    let gpu = d.names.task_queue("gpu");
    let out = eventually(
        "the gpu task waiting in `conveyor queues`",
        WAIT,
        || async {
            let row = conveyor_queues_row(&d, &gpu).await?;
            (row["ready"] == 1).then_some(row)
        },
    )
    .await;
    assert_eq!(out["consumers"], 0, "{out}");
    assert_eq!(
        d.store.known_queues().await.unwrap(),
        vec!["gpu".to_owned()]
    );
    client.close().await;
    d.shutdown().await;
}

/// The custom-worker example is what a user copies: its binary, run once as
/// a dispatcher and once as a worker, runs its own `greet` handler on real
/// services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_worker_example_runs_its_own_handler() {
    let example = common::example_binary("custom_worker");
    let d = Deployment::new("custom-worker").await;
    let spawn = |role: Option<&str>| {
        let mut cmd = tokio::process::Command::new(&example);
        cmd.args(role)
            .env("CONVEYOR_PREFIX", &d.config.prefix)
            .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
            .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.spawn().expect("start the example")
    };
    let mut dispatcher = spawn(Some("dispatcher"));
    let mut worker = spawn(None);
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "hi", "requestor": "me",
            "tasks": [{"name": "hi", "handler": "greet", "params": {"name": "Ada"}}]}))
        .await;
    let status = d.wait_terminal("hi", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["hi"].result, json!({"greeting": "hello, Ada"}));
    // Its handler's own validation names the field and the limit.
    client
        .submit(
            &json!({"id": "too-long", "requestor": "me", "tasks": [{"name": "hi",
            "handler": "greet", "params": {"name": "Ada", "pause_ms": 3_600_001}}]}),
        )
        .await;
    let status = d.wait_terminal("too-long", WAIT).await;
    assert_eq!(status.state, JobState::Rejected, "{status:#?}");
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains("params.pause_ms") && error.contains("3600000"),
        "{error}"
    );
    for child in [&mut dispatcher, &mut worker] {
        let _ = child.start_kill();
        common::exited(child, "an example process killed", None).await;
    }
    client.close().await;
    d.shutdown().await;
}
