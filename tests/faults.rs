//! Fault injection against real services: workers killed and paused,
//! RabbitMQ connections dropped, Redis restarted with and without its data,
//! and a flood of garbage. Each test keeps a record of truth outside Redis
//! (the workers' execution journal) and asserts the invariants of
//! docs/ARCHITECTURE.md at the end:
//! - every accepted job is terminal, and accepted = succeeded + failed + cancelled;
//! - no outcome was applied twice;
//! - no task ran under two live claims at once.
//!
//! The tests in this file run one at a time: they disturb shared services.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::journal::{self, ended_runs, read_journal};
use common::scratch::Scratch;
use common::{Client, Deployment, eventually, port_of, test_config, unique_prefix};
use conveyor::broker::{Broker, BrokerError, Outgoing};
use conveyor::config::Config;
use conveyor::model::{JobState, TaskState};
use conveyor::store::{Replicas, Store};
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(120);

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// No task ran under two live claims at once, every worker holding
/// `lease`; the journal must have recorded runs.
fn assert_no_overlapping_claims(path: &Path, lease: Duration) {
    assert!(
        !read_journal(path).is_empty(),
        "the journal is empty: the test recorded nothing"
    );
    journal::assert_no_overlapping_claims(path, |_| lease);
}

async fn assert_jobs_settled(d: &Deployment, ids: &[String]) -> BTreeMap<JobState, usize> {
    journal::assert_jobs_settled(d, ids, WAIT).await
}

/// Submit `n` jobs of one `sleep` task of `ms` each, ids `<prefix>-<i>`,
/// one publish at a time; their ids.
async fn submit_sleep_jobs(client: &Client, prefix: &str, n: usize, ms: u64) -> Vec<String> {
    submit_sleep_jobs_in_flight(client, prefix, n, ms, 1).await
}

/// As [`submit_sleep_jobs`], with the publishes in flight together (up
/// to 200 at once): submitting takes a fraction of the run even where
/// every confirm waits for a slow disk, so the run is still in its
/// middle when the submitting ends.
async fn submit_sleep_jobs_at_once(
    client: &Client,
    prefix: &str,
    n: usize,
    ms: u64,
) -> Vec<String> {
    submit_sleep_jobs_in_flight(client, prefix, n, ms, 200).await
}

async fn submit_sleep_jobs_in_flight(
    client: &Client,
    prefix: &str,
    n: usize,
    ms: u64,
    in_flight: usize,
) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let jobs: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({"id": id, "requestor": "faults",
                "tasks": [{"name": "s", "handler": "sleep", "params": {"ms": ms}}]})
        })
        .collect();
    for chunk in jobs.chunks(in_flight) {
        futures::future::join_all(chunk.iter().map(|job| client.submit(job))).await;
    }
    ids
}

/// Stop worker process `child` (SIGSTOP) at a moment it holds a claim:
/// stopped, it cannot add to the journal, which shows a run it started and
/// has not ended. Otherwise it is let go on (SIGCONT) and stopped again
/// shortly, until it is caught holding one. A kill that follows finds it
/// holding that claim: a worker left running between a look at the
/// journal and the kill may finish what it held (and, giving held
/// messages back, start nothing new for a while).
async fn stop_holding_a_claim(child: &tokio::process::Child, journal: &Path) {
    let pid = child.id().expect("the worker runs");
    let marker = format!("-{pid}-");
    eventually(
        &format!("worker {pid} stopped holding a claim"),
        WAIT,
        || async {
            signal(child, "-STOP").await;
            eventually("the worker stopped", Duration::from_secs(5), || async {
                pid_stopped(pid).then_some(())
            })
            .await;
            let holding = read_journal(journal)
                .values()
                .flatten()
                .any(|r| r.end.is_none() && r.worker.contains(&marker));
            if holding {
                return Some(());
            }
            signal(child, "-CONT").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        },
    )
    .await;
}

/// Whether process `pid` is stopped by a signal.
fn pid_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    })
}

async fn wait_ended_runs(journal: &Path, n: usize) {
    eventually(&format!("{n} runs ended"), WAIT, || async {
        (ended_runs(journal) >= n).then_some(())
    })
    .await;
}

fn worker_process(
    d: &Deployment,
    journal: &Path,
    lease_ms: u64,
    log: &Path,
) -> tokio::process::Child {
    worker_command(d, journal, lease_ms, log)
        .spawn()
        .expect("spawn conveyor worker")
}

fn worker_command(
    d: &Deployment,
    journal: &Path,
    lease_ms: u64,
    log: &Path,
) -> tokio::process::Command {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.args(["worker", "--concurrency", "16"])
        .env("CONVEYOR_PREFIX", &d.config.prefix)
        .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
        .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
        .env("CONVEYOR_LEASE_MS", lease_ms.to_string())
        .env(
            "CONVEYOR_MAX_DELIVERIES",
            d.config.worker.max_deliveries.to_string(),
        )
        .env("CONVEYOR_JOURNAL", journal)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    cmd
}

/// A worker process serving `/readyz` on a port of its own, taking
/// submissions as well as tasks.
fn probed_worker_process(
    d: &Deployment,
    journal: &Path,
    log: &Path,
) -> (tokio::process::Child, u16) {
    let port = common::free_port();
    let child = worker_command(d, journal, d.config.worker.lease_ms, log)
        .env("CONVEYOR_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("CONVEYOR_ACCEPT_SUBMISSIONS", "true")
        .spawn()
        .expect("spawn conveyor worker");
    (child, port)
}

/// Wait until the process on `port` says ready (200) or not (503), and
/// return its JSON body.
async fn wait_readiness(port: u16, ready: bool) -> Value {
    let what = if ready { "ready" } else { "not ready" };
    eventually(&format!("/readyz says {what}"), WAIT, || async {
        let (is_ready, body) = common::readiness(port).await?;
        (is_ready == ready).then_some(body)
    })
    .await
}

/// The port a test service URL names (`scheme://[user:pass@]host:port/...`).
async fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = tokio::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .await
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_run_loses_nothing_and_runs_nothing_twice_at_once() {
    let _serial = SERIAL.lock().await;
    let mut d = Deployment::new("kill9").await;
    d.start_dispatcher().await;
    let dir = Scratch::dir("kill9");
    let journal = dir.join("journal");
    let lease_ms = 2000;
    // The victim also takes submissions, so it dies holding submissions
    // and roots it claimed without a task message, as well as tasks.
    let mut victim = worker_command(&d, &journal, lease_ms, &dir.join("victim.log"))
        .env("CONVEYOR_ACCEPT_SUBMISSIONS", "true")
        .spawn()
        .expect("spawn conveyor worker");
    let mut survivor = worker_process(&d, &journal, lease_ms, &dir.join("survivor.log"));
    let client = Client::connect(&d.config.prefix).await;
    let ids = submit_sleep_jobs_at_once(&client, "k", 2000, 100).await;
    wait_ended_runs(&journal, 500).await;
    stop_holding_a_claim(&victim, &journal).await;
    signal(&victim, "-KILL").await;
    common::exited(&mut victim, "the worker killed with kill -9", None).await;
    let counts = assert_jobs_settled(&d, &ids).await;
    assert_eq!(counts.get(&JobState::Succeeded), Some(&2000), "{counts:?}");
    assert_no_overlapping_claims(&journal, Duration::from_millis(lease_ms));
    journal::assert_every_success_was_run(&d, &ids, &journal).await;
    // The victim died holding claims; each of those tasks ran again.
    let journal_runs = read_journal(&journal);
    let cut_short: Vec<_> = journal_runs
        .iter()
        .filter(|(_, runs)| runs.iter().any(|r| r.end.is_none()))
        .collect();
    assert!(
        !cut_short.is_empty(),
        "the victim was killed holding no claim: the test proved nothing"
    );
    for (task, runs) in &cut_short {
        assert!(
            runs.last().is_some_and(|r| r.end.is_some()),
            "{task:?} never ran again: {runs:?}"
        );
    }
    eprintln!(
        "kill -9: {} tasks were cut short and ran again",
        cut_short.len()
    );
    signal(&survivor, "-TERM").await;
    common::exited(
        &mut survivor,
        "the surviving worker",
        Some(&dir.join("survivor.log")),
    )
    .await;
    client.close().await;
    d.shutdown().await;
}

/// Whether process `pid` still runs (exists and is not a zombie waiting to
/// be reaped).
fn pid_runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// A `shell` task's program and its background helper die with a worker
/// killed by `kill -9`, before the lease lapses and the next attempt runs
/// elsewhere: the old attempt never runs beside the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_task_dies_with_its_worker_killed_by_kill_9_and_runs_again_elsewhere() {
    let _serial = SERIAL.lock().await;
    let mut d = Deployment::new("shellkill9").await;
    d.start_dispatcher().await;
    let dir = Scratch::dir("shellkill9");
    let pids = dir.join("pids");
    let lease_ms = 1500;
    let mut victim = worker_process(&d, &dir.join("journal"), lease_ms, &dir.join("victim.log"));
    // The first attempt writes its own pid and its helper's, then waits
    // for the helper (ten minutes); the next attempt succeeds at once.
    let script = format!(
        r#"if [ "$CONVEYOR_ATTEMPT" = 1 ]; then sleep 600 & echo "$$ $!" > {p}.tmp; mv {p}.tmp {p}; wait; fi; echo "{{\"attempt\": $CONVEYOR_ATTEMPT}}""#,
        p = pids.display()
    );
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "orphan", "requestor": "r", "tasks": [
            {"name": "t", "handler": "shell", "timeout_s": 900,
             "params": {"command": "sh", "args": ["-c", script]}}]}))
        .await;
    let (program, helper): (i32, i32) = eventually("the first attempt running", WAIT, || async {
        let text = std::fs::read_to_string(&pids).ok()?;
        let (a, b) = text.trim().split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })
    .await;
    assert!(pid_runs(program) && pid_runs(helper));

    signal(&victim, "-KILL").await;
    common::exited(&mut victim, "the worker killed with kill -9", None).await;

    eventually(
        "the program and its helper gone",
        Duration::from_secs(10),
        || async { (!pid_runs(program) && !pid_runs(helper)).then_some(()) },
    )
    .await;
    d.config.worker.lease_ms = lease_ms;
    d.start_worker(2).await;
    let status = d.wait_terminal("orphan", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["t"].result, json!({"attempt": 2}));
    client.close().await;
    d.shutdown().await;
}

/// A worker cut off from Redis (alone: the dispatcher still reaches it)
/// for longer than its lease: the sweep takes the task over as attempt 2,
/// and once the worker reaches Redis again it stops attempt 1's run,
/// instead of finishing it, and runs attempt 2, whose claim it keeps
/// renewing to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_redis_past_its_lease_stops_its_run_and_runs_the_next_attempt() {
    let _serial = SERIAL.lock().await;
    let mut d = Deployment::new("cutoff").await;
    d.start_dispatcher().await;
    let redis_port = port_of(&d.config.redis_url);
    let cutter = common::cutter::Cutter::start(redis_port).await;
    let dir = Scratch::dir("cutoff");
    let journal = dir.join("journal");
    let lease_ms = 1500;
    let mut worker = worker_command(&d, &journal, lease_ms, &dir.join("worker.log"))
        .env("CONVEYOR_REDIS_URL", cutter.redis_url())
        .spawn()
        .expect("spawn conveyor worker");
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "cutoff", "requestor": "r", "tasks": [
            {"name": "t", "handler": "sleep", "params": {"ms": 8000},
             "retry": {"max_attempts": 3}}]}))
        .await;
    // Running by the worker's own journal: a claim whose answer the
    // worker never got (a connection broken as the worker starts) is
    // orphaned, taken over by the sweep, and not the run under test.
    let cut_off = eventually("the task running on the worker", WAIT, || async {
        let runs = journal::runs_of(&journal, "cutoff", 0);
        runs.first().map(|r| r.attempt)
    })
    .await;

    cutter.cut();
    eventually("the sweep taking the task over", WAIT, || async {
        let s = d.status("cutoff").await?;
        (s.tasks["t"].attempts == cut_off + 1).then_some(())
    })
    .await;
    cutter.heal();

    let status = d.wait_terminal("cutoff", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["t"].attempts, cut_off + 1, "{status:#?}");
    let runs = journal::runs_of(&journal, "cutoff", 0);
    let first = runs.iter().find(|r| r.attempt == cut_off).expect("ran");
    let ran_ms = first
        .end
        .expect("the cut-off attempt's run ended")
        .saturating_sub(first.start)
        / 1_000_000;
    assert!(
        ran_ms < 7_000,
        "attempt {cut_off} ran {ran_ms} ms of its 8,000: it was finished, not stopped ({runs:?})"
    );
    assert_no_overlapping_claims(&journal, Duration::from_millis(lease_ms));
    signal(&worker, "-TERM").await;
    assert!(
        common::exited(&mut worker, "the worker", Some(&dir.join("worker.log")))
            .await
            .success()
    );
    client.close().await;
    d.shutdown().await;
}

/// A worker told to stop (SIGTERM) while cut off from Redis, its task
/// still running when its grace period ends: the release of its claim
/// cannot reach Redis, so the worker asks again until Redis answers (here
/// a second later, well inside the lease) and hands the task back then,
/// uncounted, instead of leaving its lease to lapse, which would cost
/// the task an attempt and a lease's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopping_while_cut_off_from_redis_hands_its_task_back_once_redis_answers() {
    let _serial = SERIAL.lock().await;
    let mut d = Deployment::new("stopcut").await;
    d.start_dispatcher().await;
    let cutter = common::cutter::Cutter::start(port_of(&d.config.redis_url)).await;
    let dir = Scratch::dir("stopcut");
    let journal = dir.join("journal");
    let log = dir.join("worker.log");
    // Renewed every 2 s: the lease from the last renewal before the cut
    // outlasts the grace period (1 s) and the cut (2 s) by at least 2 s.
    let lease_ms = 6000;
    let mut worker = worker_command(&d, &journal, lease_ms, &log)
        .env("CONVEYOR_REDIS_URL", cutter.redis_url())
        .env("CONVEYOR_GRACE_S", "1")
        .spawn()
        .expect("spawn conveyor worker");
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "stopcut", "requestor": "r", "tasks": [
            {"name": "t", "handler": "sleep", "params": {"ms": 5000}}]}))
        .await;
    eventually("the task running on the worker", WAIT, || async {
        let runs = journal::runs_of(&journal, "stopcut", 0);
        runs.first().map(|r| r.attempt)
    })
    .await;

    cutter.cut();
    signal(&worker, "-TERM").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cutter.heal();
    assert!(
        common::exited(&mut worker, "the worker", Some(&log))
            .await
            .success()
    );

    let status = d.status("stopcut").await.expect("recorded");
    assert!(
        status
            .history
            .iter()
            .any(|h| h.reason.contains("handed back")),
        "the task was not handed back by the time its worker exited: {status:#?}"
    );
    d.start_worker(4).await;
    let status = d.wait_terminal("stopcut", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(
        status.tasks["t"].attempts, 1,
        "the handed-back attempt does not count: {status:#?}"
    );
    assert!(
        !status
            .history
            .iter()
            .any(|h| h.reason.contains("lease expired")),
        "{status:#?}"
    );
    client.close().await;
    d.shutdown().await;
}

/// `d` with a dispatcher and an in-process worker of `slots` slots that
/// records its runs in a journal in a scratch directory named `name`:
/// the deployment, the directory (kept for the test's length) and the
/// journal's path.
async fn journaled(mut d: Deployment, name: &str, slots: usize) -> (Deployment, Scratch, PathBuf) {
    let dir = Scratch::dir(name);
    let journal = dir.join("journal");
    d.journal_to(&journal);
    d.start_dispatcher().await;
    d.start_worker(slots).await;
    (d, dir, journal)
}

/// 1,000 sleep jobs running on a dispatcher, an in-process worker and a
/// worker process serving `/readyz`, every run in a journal: the stage for
/// an outage in the middle of a run.
struct MidRun {
    d: Deployment,
    /// Holds the journal and the worker's log (kept for the run's length,
    /// removed when the test passes).
    _dir: Scratch,
    journal: PathBuf,
    probed: tokio::process::Child,
    port: u16,
    ids: Vec<String>,
    done_before: usize,
}

impl MidRun {
    /// Start the parts, wait until the worker process is ready, submit the
    /// jobs and return once 200 runs have ended.
    async fn start(d: Deployment, name: &str) -> MidRun {
        let (d, dir, journal) = journaled(d, name, 16).await;
        let (probed, port) = probed_worker_process(&d, &journal, &dir.join("worker.log"));
        let ready = wait_readiness(port, true).await;
        assert_eq!(
            ready["consuming"][d.names.task_queue("default")],
            true,
            "{ready}"
        );
        assert_eq!(ready["consuming"][d.names.submit_queue()], true, "{ready}");
        let client = Client::connect(&d.config.prefix).await;
        let ids = submit_sleep_jobs_at_once(&client, name, 1000, 20).await;
        client.close().await;
        wait_ended_runs(&journal, 200).await;
        let done_before = ended_runs(&journal);
        MidRun {
            d,
            _dir: dir,
            journal,
            probed,
            port,
            ids,
            done_before,
        }
    }

    /// Every job succeeded, the outage (named by `what`) came in the middle
    /// of the run, and no task ran under two live claims at once.
    async fn assert_nothing_lost(&self, what: &str) {
        let counts = assert_jobs_settled(&self.d, &self.ids).await;
        assert_eq!(counts.get(&JobState::Succeeded), Some(&1000), "{counts:?}");
        assert!(
            self.done_before < 1000,
            "{what} after the run, not in the middle of it"
        );
        assert_no_overlapping_claims(&self.journal, self.d.config.lease());
        journal::assert_every_success_was_run(&self.d, &self.ids, &self.journal).await;
    }

    /// Stop the worker process (it must exit 0) and the deployment.
    async fn stop(mut self) {
        signal(&self.probed, "-TERM").await;
        let log = self._dir.join("worker.log");
        let exit = common::exited(&mut self.probed, "the worker process", Some(&log)).await;
        assert!(exit.success(), "the worker process exited with {exit}");
        self.d.shutdown().await;
    }
}

/// A worker process whose link to RabbitMQ goes silent (nothing crosses,
/// nothing is closed: packets dropped on the way) finds it dead by its
/// heartbeats, and its reconnects, accepted and never answered, give up at
/// the handshake bound and try again. Through all of it `/readyz` says the
/// broker is down (a reconnect in progress is not a connection); once the
/// link heals the worker consumes again, and nothing is lost or run twice
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_link_to_rabbitmq_goes_silent_is_not_ready_until_it_heals() {
    let _serial = SERIAL.lock().await;
    let (d, dir, journal) = journaled(Deployment::new("amqpsilent").await, "amqpsilent", 4).await;
    let amqp_port = port_of(&d.config.amqp_url);
    let cutter = common::cutter::Cutter::start(amqp_port).await;
    let port = common::free_port();
    let log = dir.join("worker.log");
    let mut worker = worker_command(&d, &journal, d.config.worker.lease_ms, &log)
        .env(
            "CONVEYOR_AMQP_URL",
            format!(
                "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2",
                cutter.port
            ),
        )
        .env("CONVEYOR_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .expect("spawn conveyor worker");
    wait_readiness(port, true).await;
    let client = Client::connect(&d.config.prefix).await;
    let mut ids = submit_sleep_jobs(&client, "amqpsilent", 400, 50).await;
    wait_ended_runs(&journal, 100).await;

    cutter.silence();
    eventually("/readyz says the broker is down", WAIT, || async {
        let (is_ready, body) = common::readiness(port).await?;
        (!is_ready && body["broker"] == false).then_some(())
    })
    .await;
    // Longer than a handshake may take (10 s): reconnects under way the
    // whole time, and never reported as a connection.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < until {
        let (is_ready, body) = common::readiness(port)
            .await
            .expect("the worker answers /readyz");
        assert!(!is_ready && body["broker"] == false, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cutter.heal();
    let up = wait_readiness(port, true).await;
    assert_eq!(up["consuming"][d.names.task_queue("default")], true, "{up}");
    let healed = now_ns();
    // The worker process takes work again: with the in-process worker's
    // four slots busy, it runs some of these.
    ids.extend(submit_sleep_jobs(&client, "amqpsilent-after", 100, 200).await);
    client.close().await;
    let counts = assert_jobs_settled(&d, &ids).await;
    assert_eq!(counts.get(&JobState::Succeeded), Some(&500), "{counts:?}");
    let by_the_process = read_journal(&journal)
        .values()
        .flatten()
        .filter(|r| r.start > healed && r.worker != "in-process")
        .count();
    assert!(
        by_the_process > 0,
        "the healed worker process ran nothing after the link came back"
    );
    assert_no_overlapping_claims(&journal, d.config.lease());
    journal::assert_every_success_was_run(&d, &ids, &journal).await;
    signal(&worker, "-TERM").await;
    let exit = common::exited(&mut worker, "the worker", Some(&log)).await;
    assert!(exit.success(), "the worker exited with {exit}");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_broker_connections_are_recovered_and_consumers_come_back() {
    let _serial = SERIAL.lock().await;
    let run = MidRun::start(Deployment::new("amqpdrop").await, "amqpdrop").await;
    let (d, port) = (&run.d, run.port);
    let task_queue = d.names.task_queue("default");
    rabbitmqctl(&["close_all_connections", "conveyor fault injection"]).await;
    run.assert_nothing_lost("connections were dropped").await;
    // Consumers are back on every queue (Celery's decade-old bug), and the
    // worker process's readiness says so.
    let after = wait_readiness(port, true).await;
    assert_eq!(after["consuming"][&task_queue], true, "{after}");
    assert_eq!(after["broker"], true, "{after}");
    let broker = common::connect_broker(&d.config).await;
    let names = d.names.clone();
    eventually("consumers back", WAIT, || async {
        let stats = broker
            .queue_stats(&[
                names.submit_queue(),
                names.referred_queue(),
                names.task_queue("default"),
            ])
            .await
            .ok()?;
        // Submissions: the dispatcher and both workers; referred
        // submissions: the dispatcher; tasks: both workers.
        let consumers: Vec<u32> = stats.iter().map(|s| s.consumers).collect();
        (consumers == [3, 1, 2]).then_some(())
    })
    .await;
    // With their prefetch re-applied (lapin's own recovery would not):
    // RabbitMQ reports each consumer's prefetch count.
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_consumers", "-q", "queue_name", "prefetch_count"])
        .output()
        .await
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    let prefetch_of = |queue: &str| -> Vec<String> {
        listing
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(q, _)| *q == queue)
            .map(|(_, p)| p.trim().to_owned())
            .collect()
    };
    assert_eq!(prefetch_of(&task_queue), ["16", "16"], "{listing}");
    let dispatcher_prefetch = d.config.dispatcher.prefetch.to_string();
    let mut submit_prefetches = prefetch_of(&d.names.submit_queue());
    submit_prefetches.sort();
    let mut expected = [
        "16".to_owned(),
        "16".to_owned(),
        dispatcher_prefetch.clone(),
    ];
    expected.sort();
    assert_eq!(submit_prefetches, expected, "{listing}");
    assert_eq!(
        prefetch_of(&d.names.referred_queue()),
        [dispatcher_prefetch],
        "{listing}"
    );
    // And they work: a new job after the reconnect succeeds.
    let client = Client::connect(&d.config.prefix).await;
    d.assert_serves(&client, "after-drop", WAIT).await;
    client.close().await;
    run.stop().await;
}

/// A broker that declared only the base queues (a client that submits,
/// a dispatcher before its first task queue) declares them again when it
/// reconnects: a submission queue deleted while the connection was down
/// is back, and a submission after the reconnect is routed, not returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_declares_the_base_queues_even_with_no_task_queue_declared() {
    let _serial = SERIAL.lock().await;
    let config = test_config(&unique_prefix("redeclare"));
    let names = conveyor::names::Names::new(&config.prefix);
    let broker = common::connect_broker(&config).await;
    broker.declare(&[]).await.expect("the base queues declared");
    conveyor::purge::delete_queues(&config, &[names.submit_queue()]).await;
    rabbitmqctl(&["close_all_connections", "conveyor fault injection"]).await;
    eventually("a submission routed after the reconnect", WAIT, || async {
        let job = Outgoing::durable(names.submit_queue(), b"{}".to_vec());
        match broker.publish(vec![job]).await {
            Ok(()) => Some(()),
            Err(BrokerError::Unroutable { .. }) => {
                panic!("the reconnect did not declare the submission queue again")
            }
            Err(_) => None,
        }
    })
    .await;
    eventually("the submission waits in its queue", WAIT, || async {
        let stats = broker.queue_stats(&[names.submit_queue()]).await.ok()?;
        (stats.first()?.ready == 1).then_some(())
    })
    .await;
    common::cleanup(&config).await;
}

/// A task queue recreated with other arguments (by a process of a newer
/// config, after an operator deleted it as the declare error advises) does
/// not cut an older process off when it reconnects: the queue is left as
/// it is, and the process publishes to it and to every other queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_goes_on_past_a_task_queue_recreated_with_other_arguments() {
    let _serial = SERIAL.lock().await;
    let config = test_config(&unique_prefix("redeclare-other"));
    let names = conveyor::names::Names::new(&config.prefix);
    let broker = common::connect_broker(&config).await;
    let queues = ["gpu".to_owned(), "default".to_owned()];
    broker.declare(&queues).await.expect("the queues declared");
    conveyor::purge::delete_queues(&config, &[names.task_queue("gpu")]).await;
    // Recreated as a classic queue, with no dead-lettering.
    let other = lapin::Connection::connect(&config.amqp_url, Default::default())
        .await
        .expect("connect");
    let channel = other.create_channel().await.expect("channel");
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            names.task_queue("gpu").as_str().into(),
            durable,
            Default::default(),
        )
        .await
        .expect("recreated");
    let _ = other.close(200, "done".into()).await;
    rabbitmqctl(&["close_all_connections", "conveyor fault injection"]).await;
    for q in &queues {
        let queue = names.task_queue(q);
        eventually("a publish after the reconnect", WAIT, || async {
            let msg = Outgoing::durable(queue.clone(), b"{}".to_vec());
            match broker.publish(vec![msg]).await {
                Ok(()) => Some(()),
                Err(BrokerError::Fatal(e)) => panic!("the reconnect failed for good: {e}"),
                Err(_) => None,
            }
        })
        .await;
    }
    // Task queues the store never heard of are the test's to delete.
    conveyor::purge::delete_queues(&config, &[names.task_queue("gpu")]).await;
    common::cleanup(&config).await;
}

async fn rabbitmqctl(args: &[&str]) {
    let run = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} did not finish within 120 s"))
        .expect("rabbitmqctl must be installed for this test");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A change a test made to the machine's RabbitMQ with `rabbitmqctl`, and
/// the command that undoes it. If the test fails before undoing it,
/// dropping this does, so the failure does not take every later test (and
/// the machine's broker) down with it.
struct BrokerChange {
    undo: Vec<String>,
    undone: bool,
}

impl BrokerChange {
    /// `rabbitmqctl <change>`, undone by `rabbitmqctl <undo>`.
    async fn make(change: &[&str], undo: &[&str]) -> BrokerChange {
        let made = BrokerChange {
            undo: undo.iter().map(|a| (*a).to_owned()).collect(),
            undone: false,
        };
        rabbitmqctl(change).await;
        made
    }

    /// The RabbitMQ application stopped (`stop_app`; queues and their
    /// messages stay on disk), to be started again.
    async fn stop_app() -> BrokerChange {
        BrokerChange::make(&["stop_app"], &["start_app"]).await
    }

    /// A policy (named after the test's `prefix`) limiting `queue` to one
    /// ready message and refusing publishes past it, as an operator's
    /// `max-length` with `overflow: reject-publish` does.
    async fn length_limit_of_one(prefix: &str, queue: &str) -> BrokerChange {
        let policy = format!("{prefix}-full");
        BrokerChange::make(
            &[
                "set_policy",
                &policy,
                &format!("^{}$", queue.replace('.', "\\.")),
                r#"{"max-length":1,"overflow":"reject-publish"}"#,
                "--apply-to",
                "queues",
            ],
            &["clear_policy", &policy],
        )
        .await
    }

    async fn undo(mut self) {
        let undo: Vec<&str> = self.undo.iter().map(String::as_str).collect();
        rabbitmqctl(&undo).await;
        self.undone = true;
    }
}

impl Drop for BrokerChange {
    fn drop(&mut self) {
        if !self.undone {
            let undone = std::process::Command::new("rabbitmqctl")
                .args(&self.undo)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
            eprintln!(
                "the test stopped before undoing its change to RabbitMQ; rabbitmqctl {:?}: {undone:?}",
                self.undo
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_mid_run_loses_nothing_and_readiness_follows_it() {
    let _serial = SERIAL.lock().await;
    let run = MidRun::start(Deployment::new("amqprestart").await, "amqprestart").await;
    // The broker application stops (queues and their messages stay on
    // disk) and starts again, as in a rolling restart.
    let stopped = BrokerChange::stop_app().await;
    // Readiness goes false as soon as the worker sees its consumers
    // cancelled, which may come before it sees the connection close: wait
    // for the broker itself to be reported down.
    eventually("/readyz says the broker is down", WAIT, || async {
        let (is_ready, body) = common::readiness(run.port).await?;
        (!is_ready && body["broker"] == false).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stopped.undo().await;
    rabbitmqctl(&["await_startup"]).await;
    let up = wait_readiness(run.port, true).await;
    assert_eq!(
        up["consuming"][run.d.names.task_queue("default")],
        true,
        "{up}"
    );
    assert_eq!(up["consuming"][run.d.names.submit_queue()], true, "{up}");
    run.assert_nothing_lost("the broker was restarted").await;
    run.stop().await;
}

/// A task queue at its length limit (a policy with `overflow:
/// reject-publish`, the filler message already in it) refuses every
/// message published to it, for longer than a lease. Nothing is lost and
/// nothing fails for it: a submission whose root goes there is taken
/// again and again (as a new message each time, never past the submit
/// queue's delivery limit, where RabbitMQ would dead-letter it and leave
/// its job recorded with no task message), and a worker whose completion
/// made a task ready there, and claimed another to run next, keeps that
/// claim renewed while it waits (not taken over as a dead worker's). Once
/// the queue has room, both jobs succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_queue_refusing_publishes_past_a_lease_loses_nothing_and_fails_nothing() {
    let _serial = SERIAL.lock().await;
    let mut config = test_config(&unique_prefix("fullqueue"));
    config.worker.lease_ms = 1_000;
    let mut d = Deployment::with_config(config).await;
    let side = d.names.task_queue("side");
    let broker = common::connect_broker(&d.config).await;
    broker.declare(&["side".to_owned()]).await.unwrap();
    broker
        .publish(vec![Outgoing::durable(side.clone(), b"filler".to_vec())])
        .await
        .unwrap();
    let full = BrokerChange::length_limit_of_one(&d.config.prefix, &side).await;
    eventually("the side queue refuses publishes", WAIT, || async {
        let probe = Outgoing::durable(side.clone(), b"probe".to_vec());
        match broker.publish(vec![probe]).await {
            Err(BrokerError::Refused { .. }) => Some(()),
            _ => None,
        }
    })
    .await;

    d.start_dispatcher().await;
    d.start_worker(4).await;
    let client = Client::connect_to(&d.config).await;
    client
        .submit(&json!({"id": "direct", "requestor": "r",
            "tasks": [{"name": "there", "handler": "noop", "queue": "side"}]}))
        .await;
    client
        .submit(&json!({"id": "spread", "requestor": "r", "tasks": [
            {"name": "root", "handler": "noop"},
            {"name": "here", "handler": "noop", "after": ["root"]},
            {"name": "there", "handler": "noop", "queue": "side", "after": ["root"]}]}))
        .await;
    // Three leases of refusals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        client.take_dead().await.is_none(),
        "nothing is dead-lettered while the queue is full"
    );
    let direct = d.status("direct").await.expect("the job is recorded");
    assert_eq!(direct.state, JobState::Pending);
    let spread = d.status("spread").await.expect("the job is recorded");
    assert_eq!(spread.tasks["root"].state, TaskState::Succeeded);
    assert_eq!(
        spread.tasks["here"].state,
        TaskState::Running,
        "{spread:#?}"
    );

    // Room again; the filler (not a task message) is dead-lettered by the
    // worker that takes it.
    full.undo().await;
    d.config.worker.queues = vec!["default".into(), "side".into()];
    d.start_worker(4).await;
    for id in ["direct", "spread"] {
        let status = d.wait_terminal(id, WAIT).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        for (name, task) in &status.tasks {
            assert_eq!(task.attempts, 1, "{id}/{name} ran once: {status:#?}");
        }
        assert!(
            status.history.iter().all(|h| !h.reason.contains("lease")),
            "no lease lapsed: {:#?}",
            status.history
        );
    }
    while let Some((headers, body)) = client.take_dead().await {
        assert!(
            body == b"filler" || body == b"probe",
            "only the test's own messages are dead-lettered: {headers:?} {}",
            String::from_utf8_lossy(&body)
        );
    }
    client.close().await;
    d.shutdown().await;
}

/// A worker whose only slot runs a long task holds the next task message
/// the broker sends it, and past `worker.hold_ms` gives it back as a new
/// message. While the queue is at its length limit and refuses that copy,
/// the worker keeps the delivery — requeued, it would count a delivery,
/// and at `worker.max_deliveries` (1 here) a task that never ran would be
/// failed as poison — and runs it once its slot frees: once, succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_task_its_full_queue_will_not_take_back_waits_for_a_slot_and_runs_once() {
    let _serial = SERIAL.lock().await;
    let mut config = test_config(&unique_prefix("holdfull"));
    config.worker.hold_ms = 2_000;
    config.worker.max_deliveries = 1;
    config.worker.accept_submissions = false;
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    d.start_worker(1).await;
    let client = Client::connect_to(&d.config).await;
    d.start_long_task(&client, "long", 8_000).await;

    let queue = d.names.task_queue("default");
    let full = BrokerChange::length_limit_of_one(&d.config.prefix, &queue).await;
    client
        .submit(&json!({"id": "next", "requestor": "r",
            "tasks": [{"name": "t", "handler": "noop"}]}))
        .await;
    d.wait_until_held("next").await;
    // The queue fills up behind the held message, before the worker's
    // hold runs out.
    let broker = common::connect_broker(&d.config).await;
    let filler = Outgoing::durable(queue.clone(), b"filler".to_vec());
    broker
        .publish(vec![filler])
        .await
        .expect("the filler queued");
    // A quorum queue starts refusing once past its limit: a probe or two
    // may go in first.
    let mut probes_in = 0;
    loop {
        let probe = Outgoing::durable(queue.clone(), b"probe".to_vec());
        match broker.publish(vec![probe]).await {
            Err(BrokerError::Refused { .. }) => break,
            Ok(()) => probes_in += 1,
            Err(e) => panic!("publishing a probe: {e}"),
        }
        assert!(
            probes_in < 5,
            "the task queue does not refuse publishes past its length limit"
        );
    }
    let stats = broker
        .queue_stats(std::slice::from_ref(&queue))
        .await
        .unwrap();
    assert_eq!(
        stats[0].ready,
        1 + probes_in,
        "only the test's messages are ready: the worker still holds its task \
         (if it gave it back before the queue was full, worker.hold_ms is too \
         short for this machine)"
    );

    for id in ["long", "next"] {
        let status = d.wait_terminal(id, WAIT).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
        assert_eq!(status.tasks["t"].attempts, 1, "{status:#?}");
    }
    full.undo().await;
    // The filler and probes, taken by the worker once its slot is free,
    // are not task messages: dead-lettered, and nothing else.
    for _ in 0..=probes_in {
        let (headers, body) = eventually("the test's messages dead-lettered", WAIT, || {
            client.take_dead()
        })
        .await;
        assert!(
            body == b"filler" || body == b"probe",
            "only the test's own messages are dead-lettered: {headers:?} {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(client.take_dead().await.is_none());
    client.close().await;
    d.shutdown().await;
}

/// A memory alarm raised on the machine's RabbitMQ: its high watermark
/// set far below what it uses, to be set back to what it was. RabbitMQ
/// blocks every connection that publishes until the alarm clears.
async fn raise_memory_alarm() -> BrokerChange {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
        .output()
        .await
        .expect("rabbitmqctl must be installed for this test");
    let watermark = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        watermark.parse::<f64>().is_ok(),
        "the broker's memory watermark is not a fraction: {watermark:?}"
    );
    let alarm = BrokerChange::make(
        &["set_vm_memory_high_watermark", "0.00001"],
        &["set_vm_memory_high_watermark", &watermark],
    )
    .await;
    eventually("the memory alarm in force", WAIT, || async {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["eval", "rabbit_alarm:get_alarms()."])
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("memory")
            .then_some(())
    })
    .await;
    alarm
}

/// A store that answers its ping but will not count its replicas (a Redis
/// user not allowed `INFO`, with `redis_wait_replicas` set) makes the
/// process unready, and the body says why; it is no outage, so the
/// consumers keep taking work (a readiness probe shut their gate at every
/// call until the thirty-fifth session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_cannot_be_counted_make_it_unready_without_holding_work_back() {
    // Its broker's publishing connection would be counted by the tests
    // that look for theirs among RabbitMQ's connections.
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(false).await;
    redis
        .cli(&[
            "ACL", "SETUSER", "no-info", "on", ">no-info", "~*", "&*", "+@all", "-info",
        ])
        .await;
    let mut config = redis.config("noinfo");
    config.redis_url = format!("redis://no-info:no-info@127.0.0.1:{}/", redis.port);
    config.redis_wait_replicas = 1;
    let store = common::connect_store(&config, "t").await;
    let broker = common::connect_broker(&config).await;
    let health = conveyor::health::Health::new(store, broker);
    health.set_consuming("q", true);

    let r = health.readiness().await;

    assert!(!r.ready && r.store && r.broker && r.taking_work, "{r:?}");
    let why = r.replicas_error.as_deref().unwrap_or_default();
    assert!(why.to_lowercase().contains("info"), "{r:?}");
    assert!(health.store_up(), "no outage: work is not held back");
}

/// A store that stops answering without closing the connection (here
/// every client paused) makes the probe unready within its 2 s; the ping
/// it gave up on goes on, and when it fails (the connection's 10 s
/// response time-out) the store is marked down, so an idle process stops
/// taking work as a busy one would. Until the thirty-fifth session a probe
/// that timed out marked it down at once; for a moment in that session,
/// never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_that_fails_after_the_probe_gave_up_still_holds_work_back() {
    // Its broker's publishing connection would be counted by the tests
    // that look for theirs among RabbitMQ's connections.
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(false).await;
    let config = redis.config("lateping");
    let store = common::connect_store(&config, "t").await;
    let broker = common::connect_broker(&config).await;
    let health = conveyor::health::Health::new(store, broker);
    health.set_consuming("q", true);
    let before = health.readiness().await;
    assert!(before.ready, "{before:?}");

    redis.cli(&["CLIENT", "PAUSE", "16000", "ALL"]).await;
    let asked = std::time::Instant::now();
    let r = health.readiness().await;

    assert!(asked.elapsed() < Duration::from_secs(5), "the probe waited");
    assert!(!r.ready && !r.store, "{r:?}");
    eventually(
        "the store marked down by the late ping",
        Duration::from_secs(15),
        || async { (!health.store_up()).then_some(()) },
    )
    .await;
}

/// Close the one publishing connection RabbitMQ has (the tests holding
/// `SERIAL` run alone), and wait until `broker` sees it lost.
async fn close_the_publishing_connection(broker: &conveyor::broker::amqp::AmqpBroker) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("rabbitmqctl must be installed for this test");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let publishing: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("conveyor publishing"))
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(publishing.len(), 1, "{listing}");
    rabbitmqctl(&[
        "close_connection",
        publishing[0],
        "conveyor fault injection",
    ])
    .await;
    eventually("the publishing connection seen lost", WAIT, || async {
        (!broker.is_connected()).then_some(())
    })
    .await;
}

/// A base queue RabbitMQ will not declare again on a reconnect (here the
/// dead-letter queue, made again by hand as a classic queue: a quorum
/// declare of it is refused for good) is used as it is, and the new
/// session publishes and consumes. Until the thirty-seventh session any
/// failure of a base queue's declare failed every reconnect, and the
/// process published and consumed nothing. (A quorum queue without a
/// leader, which answers only at the time-out, did the same; that path,
/// declared again in the background, needs a cluster that lost a quorum
/// and has no test here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_queue_refused_on_reconnecting_does_not_cut_the_process_off() {
    let _serial = SERIAL.lock().await;
    let (config, broker, queue, _) = common::broker_with_one_task_queue("basequeue").await;
    let dead = conveyor::names::Names::new(&config.prefix).dead_queue();
    let tool = lapin::Connection::connect(&config.amqp_url, Default::default())
        .await
        .expect("a connection of the test's own");
    let channel = tool.create_channel().await.expect("a channel");
    channel
        .queue_delete(dead.as_str().into(), Default::default())
        .await
        .expect("the dead-letter queue deleted");
    channel
        .queue_declare(
            dead.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the dead-letter queue made again, classic");
    close_the_publishing_connection(broker.as_ref()).await;

    broker
        .publish(vec![Outgoing::durable(queue.clone(), b"after".to_vec())])
        .await
        .expect("published on a new session");
    let mut subscription = broker.subscribe(&queue, 1).await.expect("subscribed");
    let delivery = common::next_delivery(&mut subscription, WAIT)
        .await
        .expect("the message published after the reconnect");
    assert_eq!(delivery.body, b"after");
    delivery.acker.ack().await.expect("acked");
    let _ = tool.close(200, "done".into()).await;
    common::cleanup(&config).await;
}

/// A process whose publishing connection is lost while it is idle (its
/// consumers, on their own connection, live on) makes it again when its
/// readiness is asked: it is ready, not reported cut off from the broker
/// until it next publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_makes_a_publishing_connection_lost_while_idle_again() {
    let _serial = SERIAL.lock().await;
    let (config, broker, queue, _) = common::broker_with_one_task_queue("pubconn").await;
    let store = common::connect_store(&config, "t").await;
    let health = conveyor::health::Health::new(store, broker.clone());
    let _subscription = broker.subscribe(&queue, 1).await.expect("subscribed");
    health.set_consuming(&queue, true);
    let before = health.readiness().await;
    assert!(before.ready, "{before:?}");
    close_the_publishing_connection(broker.as_ref()).await;
    // A reconnect slower than the probe's 2 s (a loaded machine) goes on
    // to its end, and a later probe finds it made.
    let health = &health;
    let after = eventually(
        "ready again, the probes having reconnected",
        WAIT,
        || async {
            let r = health.readiness().await;
            (r.ready && r.broker).then_some(r)
        },
    )
    .await;
    assert!(after.store, "{after:?}");
    common::cleanup(&config).await;
}

/// Under a memory alarm RabbitMQ stops reading from every connection that
/// publishes, acks and all: on a shared connection, queues could not drain
/// and free the memory the alarm waits for. A broker's subscriptions have
/// a connection of their own, which never publishes: a delivery acked
/// while the publishing connection is blocked is settled at once, and the
/// next one comes (with a prefetch of one, only then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_go_through_while_a_memory_alarm_blocks_the_publishing_connection() {
    let _serial = SERIAL.lock().await;
    let (config, broker, queue, _) = common::broker_with_one_task_queue("alarm-acks").await;
    let message = |body: &str| Outgoing::durable(queue.clone(), body.as_bytes().to_vec());
    broker
        .publish(vec![message("first"), message("second")])
        .await
        .expect("published");
    let mut subscription = broker.subscribe(&queue, 1).await.expect("subscribed");
    let within = Duration::from_secs(10);
    let first = common::next_delivery(&mut subscription, within)
        .await
        .expect("the first delivery");
    let alarm = raise_memory_alarm().await;
    let blocked = {
        let broker = broker.clone();
        let third = message("third");
        tokio::spawn(async move { broker.publish(vec![third]).await })
    };
    eventually("the publishing connection blocked", WAIT, || async {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["list_connections", "state"])
            .stdin(Stdio::null())
            .output()
            .await
            .ok()?;
        let states = String::from_utf8_lossy(&out.stdout).into_owned();
        states.lines().any(|l| l.trim() == "blocked").then_some(())
    })
    .await;
    first.acker.ack().await.expect("acked");
    let second = common::next_delivery(&mut subscription, within).await;
    alarm.undo().await;
    let second = second.expect("the next delivery while the alarm is in force: the ack waited");
    assert_eq!(second.body, b"second");
    second.acker.ack().await.expect("acked");
    blocked
        .await
        .expect("joined")
        .expect("published once the alarm cleared");
    common::cleanup(&config).await;
}

/// RabbitMQ blocking publishers for a memory alarm longer than a publish
/// may wait (30 s): the blocked publishes fail as an outage and are
/// retried on a new connection, which the broker blocks too, until the
/// alarm clears; then every job finishes, with nothing lost and nothing
/// run twice at once. Each job is a fan-out whose root is still running
/// when the alarm is in force: its end publishes the children (a worker
/// keeps one and publishes the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocking_publishers_past_the_publish_bound_is_waited_out() {
    let _serial = SERIAL.lock().await;
    let (d, _dir, journal) = journaled(Deployment::new("memalarm").await, "memalarm", 16).await;
    let client = Client::connect(&d.config.prefix).await;
    let (jobs, children) = (16, 8);
    let mut ids = Vec::new();
    for i in 0..jobs {
        let id = format!("memalarm-{i}");
        let mut tasks = vec![json!({"name": "root", "handler": "sleep", "params": {"ms": 6000}})];
        tasks.extend((0..children).map(|c| {
            json!({"name": format!("c{c}"), "handler": "sleep", "params": {"ms": 50}, "after": ["root"]})
        }));
        let all: Vec<String> = (0..children).map(|c| format!("c{c}")).collect();
        tasks.push(json!({"name": "join", "handler": "noop", "after": all}));
        client
            .submit(&json!({"id": id, "requestor": "faults", "tasks": tasks}))
            .await;
        ids.push(id);
    }
    client.close().await;
    eventually("every root running", WAIT, || async {
        (read_journal(&journal).len() == jobs).then_some(())
    })
    .await;
    let alarm = raise_memory_alarm().await;
    assert_eq!(
        ended_runs(&journal),
        0,
        "a root ended before the alarm was in force"
    );
    // The roots end about 6 s after they started, and their publishes
    // wait until they are given up on 30 s later, then again, on the same
    // connection: a blocked one is sound. (Each process used to open a
    // new one, which was blocked in turn, the old one lingering: RabbitMQ
    // reads no Close from a blocked connection.)
    tokio::time::sleep(Duration::from_secs(20)).await;
    let blocked_before = blocked_connections().await;
    tokio::time::sleep(Duration::from_secs(22)).await;
    let blocked_after = blocked_connections().await;
    alarm.undo().await;
    assert!(
        blocked_before > 0 && blocked_after <= blocked_before,
        "blocked connections: {blocked_before} before the publishes were given up on, \
         {blocked_after} after"
    );
    let cleared = now_ns();
    let counts = assert_jobs_settled(&d, &ids).await;
    assert_eq!(counts.get(&JobState::Succeeded), Some(&jobs), "{counts:?}");
    // The published children waited for the alarm to clear.
    let started_after = read_journal(&journal)
        .values()
        .flatten()
        .filter(|r| r.start > cleared)
        .count();
    assert!(
        started_after >= jobs * (children - 1),
        "only {started_after} runs started after the alarm cleared"
    );
    assert_no_overlapping_claims(&journal, d.config.lease());
    journal::assert_every_success_was_run(&d, &ids, &journal).await;
    d.shutdown().await;
}

/// How many connections RabbitMQ blocks now (a memory alarm: those that
/// published since it was raised).
async fn blocked_connections() -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "state"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("rabbitmqctl list_connections within 120 s")
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == "blocked")
        .count()
}

/// A port in 20000..32000 that nothing listens on now.
fn listen_port() -> u16 {
    for _ in 0..100 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// `redis-cli -p <port> <args>` (a Redis server or a sentinel): its
/// output.
async fn redis_cli(port: u16, args: &[&str]) -> String {
    let run = tokio::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("redis-cli -p {port} {args:?} did not finish within 30 s"))
        .expect("redis-cli must be installed for this test");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Shut the Redis server or sentinel on `port` down, without saving,
/// whether or not it runs (for `Drop`).
fn shut_down_redis(port: u16) {
    let _ = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A Redis server of the test's own, on its own port and directory.
struct PrivateRedis {
    port: u16,
    /// Removed after the server is shut down (fields drop after `drop`).
    dir: Scratch,
    aof: bool,
}

impl PrivateRedis {
    async fn start(aof: bool) -> PrivateRedis {
        // Below the kernel's ephemeral range (32768 and up here), so no
        // outgoing connection takes the port, now or when the server is
        // started again on it; another listener could still, and then
        // another port is tried (a random one in the old 20000-40000
        // range was taken now and then: "bind: Address already in use").
        for _ in 0..5 {
            let r = PrivateRedis {
                port: listen_port(),
                dir: Scratch::dir("redis"),
                aof,
            };
            if r.try_launch().await {
                return r;
            }
        }
        panic!("no private redis-server came up on any of 5 free ports");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The test config of `test` (a unique prefix) on this server.
    fn config(&self, test: &str) -> Config {
        let mut config = test_config(&unique_prefix(test));
        config.redis_url = self.url();
        config
    }

    /// Start it again (same port, same directory); it must come up.
    async fn launch(&self) {
        assert!(
            self.try_launch().await,
            "private redis-server on port {} did not come back up; its log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// Start the server; whether it answers within 20 s.
    async fn try_launch(&self) -> bool {
        let status = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                if self.aof { "yes" } else { "no" },
                "--appendfsync",
                "always",
                "--dir",
                self.dir.to_str().unwrap(),
                "--pidfile",
                self.dir.join("pid").to_str().unwrap(),
                "--logfile",
                self.dir.join("log").to_str().unwrap(),
            ])
            .status()
            .await
            .expect("redis-server must be installed for this test");
        if !status.success() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let url = self.url();
        while tokio::time::Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(url.as_str())
                && let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// A section of its `INFO`.
    async fn info(&self, section: &str) -> String {
        redis_cli(self.port, &["INFO", section]).await
    }

    /// Run one `redis-cli` command against it; it must answer OK.
    async fn cli(&self, args: &[&str]) {
        let answer = redis_cli(self.port, args).await;
        assert!(answer.trim() == "OK", "redis-cli {args:?}: {answer}");
    }

    async fn stop(&self) {
        let save = if self.aof { "save" } else { "nosave" };
        redis_cli(self.port, &["shutdown", save]).await;
        let url = self.url();
        eventually("private redis down", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                client
                    .get_multiplexed_async_connection()
                    .await
                    .err()
                    .map(|_| ())
            }
        })
        .await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        shut_down_redis(self.port);
    }
}

/// Calls that find the shared Redis connection broken make it again
/// between them, once: each making its own, as before the thirty-third
/// session, fifty calls in flight opened fifty connections (behind
/// Sentinel each asked every sentinel first) at every failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_find_the_shared_redis_connection_broken_make_one_between_them() {
    let redis = PrivateRedis::start(false).await;
    let config = redis.config("oneconn");
    let store = common::connect_store(&config, "t").await;
    store.ping().await.unwrap();
    let connections = || async {
        let stats = redis.info("stats").await;
        stats
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("INFO stats names total_connections_received")
    };
    for round in 0..3 {
        // Every connection but redis-cli's own: the store's shared one.
        redis_cli(
            redis.port,
            &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
        )
        .await;
        let before = connections().await;
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.job("nobody").await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        // The INFO's own redis-cli connection is counted too.
        let made = connections().await - before - 1;
        assert!(
            made <= 2,
            "round {round}: {made} connections made for 50 calls"
        );
    }
}

/// What `conveyor status some-job` says on stderr with `prefix` and
/// Redis `url`; it must fail.
async fn status_refused(prefix: &str, url: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["status", "some-job"])
        .env("CONVEYOR_PREFIX", prefix)
        .env("CONVEYOR_REDIS_URL", url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{url}: {stderr}");
    stderr
}

/// Redis refusing the credentials of `redis_url` (a wrong password, or
/// none to a server that asks for one) is named as such by a command, with
/// no password quoted, not taken for a Redis that is not running (whose
/// hint says how to start one): named directly, and behind a sentinel
/// (until the thirty-sixth session an outage there, tried for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_redis_credentials_are_named_not_taken_for_an_outage() {
    let redis = PrivateRedis::start(false).await;
    // Started while the node takes no password: it knows the node, and
    // names it whatever the node answers it later.
    let sentinel = PrivateSentinel::start(&redis).await;
    redis
        .cli(&["CONFIG", "SET", "requirepass", "right-one"])
        .await;
    // Open again (dropped before the server, which is then shut down
    // without a password), whether the test passes or not.
    struct OpenAgain(u16);
    impl Drop for OpenAgain {
        fn drop(&mut self) {
            let _ = std::process::Command::new("redis-cli")
                .args(["-p", &self.0.to_string(), "-a", "right-one"])
                .args(["--no-auth-warning", "CONFIG", "SET", "requirepass", ""])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    let _open_again = OpenAgain(redis.port);
    let config = redis.config("credentials");
    let wrong = format!("redis://:wrong-one@127.0.0.1:{}/", redis.port);
    let behind = format!("redis+sentinel://127.0.0.1:{}/svc", sentinel.port);
    let wrong_behind = format!(
        "redis+sentinel://:wrong-one@127.0.0.1:{}/svc",
        sentinel.port
    );
    for url in [wrong.as_str(), &redis.url(), &behind, &wrong_behind] {
        let stderr = status_refused(&config.prefix, url).await;
        assert!(
            stderr.contains("refused the credentials of redis_url"),
            "{url}: {stderr}"
        );
        assert!(!stderr.contains("redis-server"), "no start hint: {stderr}");
        assert!(!stderr.contains("wrong-one"), "a password quoted: {stderr}");
    }
}

/// The reading commands — `status`, `list`, `queues` — write nothing to
/// Redis: a Redis user allowed only `+@read` runs them, and one pointed at
/// a mistyped prefix leaves no key. Until the thirty-fourth session they
/// loaded the function library and started `<prefix>:epoch`, refused to
/// such a user (`NOPERM`), and `list` removed expired index entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reading_commands_run_as_a_redis_user_allowed_only_to_read() {
    let redis = PrivateRedis::start(false).await;
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "reader",
            "on",
            ">read-only",
            "~*",
            "-@all",
            "+@read",
            "+@connection",
        ])
        .await;
    let config = redis.config("reader");
    let mut d = Deployment::with_config(config.clone()).await;
    d.start_dispatcher().await;
    d.start_worker(1).await;
    let client = Client::connect_to(&config).await;
    client.submit(&common::noop_job("read-me")).await;
    d.wait_terminal("read-me", WAIT).await;

    // An index entry of a job that expired, which `list` with every
    // right removes as it meets it: read-only, it is skipped.
    let names = conveyor::names::Names::new(&config.prefix);
    let mut conn = common::redis_connection(&config).await;
    redis::cmd("ZADD")
        .arg(names.jobs_index())
        .arg(1)
        .arg("expired-long-ago")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let reader = format!("redis://reader:read-only@127.0.0.1:{}/", redis.port);
    let conveyor = |args: &'static [&'static str], prefix: String, url: String| {
        let amqp = config.amqp_url.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
                .args(args)
                .env("CONVEYOR_PREFIX", prefix)
                .env("CONVEYOR_AMQP_URL", amqp)
                .env("CONVEYOR_REDIS_URL", url)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "conveyor {args:?}: {stderr}");
            (stdout, stderr)
        }
    };
    let prefix = config.prefix.clone();
    let (status, _) = conveyor(
        &["status", "read-me", "--json"],
        prefix.clone(),
        reader.clone(),
    )
    .await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    let (listed, _) = conveyor(&["list", "--json"], prefix.clone(), reader.clone()).await;
    let listed: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], "read-me");
    let (queues, warnings) = conveyor(&["queues"], prefix.clone(), reader.clone()).await;
    assert!(
        !warnings.contains("Redis") && queues.contains(&format!("{prefix}.tasks.default")),
        "{queues}\n{warnings}"
    );

    // A user who may not even read is told so, not how to start Redis.
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "nobody",
            "on",
            ">no-rights",
            "~*",
            "-@all",
        ])
        .await;
    let nobody = format!("redis://nobody:no-rights@127.0.0.1:{}/", redis.port);
    let stderr = status_refused(&prefix, &nobody).await;
    assert!(
        stderr.contains("refused a command to this user") && !stderr.contains("redis-server"),
        "{stderr}"
    );

    // A prefix nothing was deployed under, read with every right: no key
    // appears under it.
    let typo = format!("{prefix}x");
    conveyor(&["list"], typo.clone(), redis.url()).await;
    conveyor(&["queues"], typo.clone(), redis.url()).await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{typo}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    client.close().await;
    d.shutdown().await;
}

/// A Redis that answers "not now" on a sound connection — out of memory
/// here — keeps the store's shared connection: a fresh one would reach
/// the same server in the same state. Until the thirty-sixth session
/// every failing call made the connection again (behind Sentinel, asking
/// the sentinels first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_out_of_memory_is_waited_out_on_the_same_connection() {
    let redis = PrivateRedis::start(false).await;
    let config = redis.config("oom");
    let store = common::connect_store(&config, "oom-test").await;
    let worker = |heartbeat_ms: u64| conveyor::store::WorkerInfo {
        id: "oom-worker".into(),
        host: "h".into(),
        queues: vec!["default".into()],
        handlers: vec!["noop".into()],
        concurrency: 1,
        started_ms: 1,
        heartbeat_ms,
    };
    let ttl = Duration::from_secs(60);
    store.heartbeat(&worker(1), ttl).await.unwrap();
    let connections = || async {
        let info = redis_cli(redis.port, &["INFO", "stats"]).await;
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no total_connections_received in {info}"))
    };

    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let before = connections().await;
    for n in 2..22 {
        match store.heartbeat(&worker(n), ttl).await {
            Err(conveyor::store::StoreError::Unavailable(e)) => {
                assert!(e.contains("OOM"), "{e}");
            }
            other => panic!("a write to a full Redis: {other:?}"),
        }
        // The epoch check writes too (`SET NX`): its refusal is the same
        // outage on the same sound connection (the count of connections
        // below is what tells: until the thirty-seventh session each
        // check dropped the connection, and the next call made another).
        match store.check_epoch().await {
            Err(conveyor::store::StoreError::Unavailable(e)) => {
                assert!(e.contains("OOM"), "{e}");
            }
            other => panic!("an epoch check on a full Redis: {other:?}"),
        }
    }
    // The one more is the redis-cli asking.
    assert_eq!(connections().await, before + 1, "reconnected after OOM");

    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).await;
    store.heartbeat(&worker(22), ttl).await.unwrap();
    // Two more redis-cli: the one that freed memory, the one asking.
    assert_eq!(
        connections().await,
        before + 3,
        "reconnected once memory was freed"
    );
    let workers = store.workers().await.unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].heartbeat_ms, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_with_its_data_mid_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(true).await;
    let config = redis.config("redisaof");
    let run = MidRun::start(Deployment::with_config(config).await, "redisaof").await;
    redis.stop().await;
    // Readiness follows the store: down while Redis is, up when it is back.
    let down = wait_readiness(run.port, false).await;
    assert_eq!(down["store"], false, "{down}");
    assert_eq!(down["broker"], true, "{down}");
    redis.launch().await;
    wait_readiness(run.port, true).await;
    run.assert_nothing_lost("Redis was stopped").await;
    run.stop().await;
}

/// A Redis that answers but will not write — a primary demoted to a replica
/// by a failover says `READONLY`, one still loading its data after a restart
/// says `LOADING` — is an outage, not a verdict on the work: dispatcher and
/// workers keep their messages and wait, readiness says the store is down,
/// and nothing is failed, lost or run twice. (Answered as a permanent error,
/// each claim was requeued at once until the task counted as poison.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_writes_mid_run_is_waited_out_not_failed() {
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(false).await;
    let mut config = redis.config("redisro");
    // A task message whose claim the outage refused goes back uncounted:
    // with a limit of one delivery, a requeue would make it poison.
    config.worker.max_deliveries = 1;
    let run = MidRun::start(Deployment::with_config(config).await, "redisro").await;
    // A replica of a primary that does not exist keeps its data, serves
    // reads and refuses every write.
    let nowhere = common::free_port().to_string();
    redis.cli(&["REPLICAOF", "127.0.0.1", &nowhere]).await;
    let down = wait_readiness(run.port, false).await;
    assert_eq!(down["store"], false, "{down}");
    assert_eq!(down["broker"], true, "{down}");
    // Submissions during the outage wait in the broker (a consumer with
    // one in hand when the store went down gives it back) and are
    // recorded once Redis writes again.
    let client = Client::connect(&run.d.config.prefix).await;
    let late = submit_sleep_jobs(&client, "redisro-late", 20, 1).await;
    client.close().await;
    // Long enough for every task message in hand to be redelivered many
    // times over, were a refusal taken for a failure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.cli(&["REPLICAOF", "NO", "ONE"]).await;
    wait_readiness(run.port, true).await;
    run.assert_nothing_lost("Redis refused writes").await;
    for id in &late {
        let status = run.d.wait_terminal(id, WAIT).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    }
    run.stop().await;
}

/// A Redis user not allowed `ROLE` (as `+@all -@dangerous` makes one)
/// with a list of nodes in `redis_url` is refused, saying so: taken for a
/// primary, a replica listed first answered every write `READONLY`, and
/// the next connection started at it again, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_nodes_needs_a_user_allowed_role_and_says_so() {
    let (first, second) = (
        PrivateRedis::start(false).await,
        PrivateRedis::start(false).await,
    );
    for node in [&first, &second] {
        node.cli(&[
            "ACL", "SETUSER", "norole", "on", ">norole", "~*", "&*", "+@all", "-role",
        ])
        .await;
    }
    let mut config = first.config("norole");
    let url = |node: &PrivateRedis| format!("redis://norole:norole@127.0.0.1:{}/", node.port);
    config.redis_url = format!("{},{}", url(&first), url(&second));

    let refused = conveyor::runtime::redis_store(&config, "t", 1).await;

    match refused {
        Err(conveyor::store::StoreError::NotAllowed(e)) => {
            assert!(
                e.contains("may not run ROLE") && e.contains("node 1"),
                "{e}"
            );
        }
        other => panic!(
            "expected a refusal naming ROLE, got {:?}",
            other.map(|_| ())
        ),
    }
}

/// `redis_url` naming a primary and its replica (the replica first): the
/// store works on whichever node says it is the primary, and follows a
/// failover mid-run without a restart. The failover is Redis's own
/// coordinated `FAILOVER` (writes paused until the replica has caught up,
/// then the roles swap), so no write is lost; the old primary then answers
/// writes with `READONLY`, which sends every process to the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_failover_between_the_nodes_of_redis_url_is_followed_mid_run() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = primary_and_replica().await;
    let mut config = test_config(&unique_prefix("failover"));
    config.redis_url = format!("{},{}", replica.url(), primary.url());
    let run = MidRun::start(Deployment::with_config(config).await, "failover").await;
    primary.cli(&["FAILOVER"]).await;
    eventually("roles swapped", WAIT, || async {
        (replica.info("replication").await)
            .contains("role:master")
            .then_some(())
    })
    .await;
    run.assert_nothing_lost("the failover").await;
    // The jobs are on the node that is the primary now.
    let recorded = redis_cli(replica.port, &["ZCARD", &run.d.names.jobs_index()]).await;
    assert_eq!(recorded.trim(), "1000");
    run.stop().await;
}

/// A Redis Sentinel of the test's own, monitoring `primary` as `svc`
/// (quorum 1: it alone decides that the primary is down and promotes a
/// replica).
struct PrivateSentinel {
    port: u16,
    /// Its config (which it rewrites), log and pid file; removed after the
    /// sentinel is shut down.
    _dir: Scratch,
}

impl PrivateSentinel {
    async fn start(primary: &PrivateRedis) -> PrivateSentinel {
        PrivateSentinel::start_at_epoch(primary, 0).await
    }

    /// A sentinel whose view of `svc` is of configuration epoch `epoch`
    /// (as if it had seen that many failovers).
    async fn start_at_epoch(primary: &PrivateRedis, epoch: u64) -> PrivateSentinel {
        let dir = Scratch::dir("sentinel");
        let port = listen_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize yes\ndir {dir}\n\
                 pidfile {dir}/pid\nlogfile {dir}/log\n\
                 sentinel monitor svc 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds svc 1000\n\
                 sentinel failover-timeout svc 10000\n\
                 sentinel config-epoch svc {epoch}\n",
                dir = dir.display(),
                primary = primary.port,
            ),
        )
        .unwrap();
        let status = tokio::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .status()
            .await
            .expect("redis-server must be installed for this test");
        assert!(status.success(), "redis-server --sentinel did not start");
        let sentinel = PrivateSentinel { port, _dir: dir };
        eventually("the sentinel answering", WAIT, || async {
            let out = sentinel.cli(&["PING"]).await;
            (out.trim() == "PONG").then_some(())
        })
        .await;
        sentinel
    }

    /// `redis-cli` against the sentinel; its output.
    async fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).await
    }

    /// Name `node` the primary of `svc` from now on, telling `node`
    /// nothing (an administrator's doing, or a failover `node`'s old
    /// primary did not hear of).
    async fn serve(&self, node: &PrivateRedis) {
        assert_eq!(self.cli(&["SENTINEL", "REMOVE", "svc"]).await.trim(), "OK");
        let port = node.port.to_string();
        let monitor = ["SENTINEL", "MONITOR", "svc", "127.0.0.1", &port, "1"];
        assert_eq!(self.cli(&monitor).await.trim(), "OK");
    }

    /// The port of the node it names the primary of `svc`.
    async fn primary_port(&self) -> Option<u16> {
        let out = self
            .cli(&["SENTINEL", "get-master-addr-by-name", "svc"])
            .await;
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for PrivateSentinel {
    fn drop(&mut self) {
        shut_down_redis(self.port);
    }
}

/// `redis_url` naming a Sentinel instead of the nodes: the store works on
/// the primary the sentinel names, and when that primary goes down
/// mid-run (shut down, so it first lets its replica catch up) the sentinel
/// promotes the replica and every process follows it without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_lost_behind_sentinel_mid_run_is_replaced_by_the_replica_it_promotes() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = primary_and_replica().await;
    let sentinel = PrivateSentinel::start(&primary).await;
    eventually("the sentinel knowing the replica", WAIT, || async {
        let out = sentinel.cli(&["SENTINEL", "replicas", "svc"]).await;
        out.contains(&replica.port.to_string()).then_some(())
    })
    .await;
    let mut config = test_config(&unique_prefix("sentinel"));
    // A service the sentinel does not monitor is refused, saying so.
    config.redis_url = format!("redis+sentinel://127.0.0.1:{}/nosuch", sentinel.port);
    let refused = conveyor::runtime::redis_store(&config, "test", 1)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains("does not monitor `nosuch` (check the service name"),
        "{refused}"
    );
    config.redis_url = format!("redis+sentinel://127.0.0.1:{}/svc", sentinel.port);
    let run = MidRun::start(Deployment::with_config(config).await, "sentinel").await;
    primary.stop().await;
    eventually("the replica promoted", WAIT, || async {
        (sentinel.primary_port().await? == replica.port).then_some(())
    })
    .await;
    run.assert_nothing_lost("the primary was lost").await;
    // Tools (bench, cleanup) find the new primary through the sentinel too.
    let tool = conveyor::store::redis::tool_client(&run.d.config)
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut tool.get_multiplexed_async_connection().await.unwrap())
        .await
        .unwrap();
    assert!(
        info.contains(&format!("tcp_port:{}", replica.port)),
        "{info}"
    );
    let recorded = redis_cli(replica.port, &["ZCARD", &run.d.names.jobs_index()]).await;
    assert_eq!(recorded.trim(), "1000");
    run.stop().await;
}

/// A split brain behind Sentinel: the replica is made a primary and the
/// sentinel told to serve it, while the old primary goes on as a primary,
/// reachable and taking writes (as when it is cut off from the sentinels
/// but not from Conveyor). Nothing makes the old one refuse a write, yet
/// every process moves to the primary the sentinel names within a few
/// seconds, because it asks the sentinels every two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_a_new_primary_is_followed_even_while_the_old_one_takes_writes() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = primary_and_replica().await;
    let sentinel = PrivateSentinel::start(&primary).await;
    let mut config = test_config(&unique_prefix("splitbrain"));
    config.redis_url = format!("redis+sentinel://127.0.0.1:{}/svc", sentinel.port);
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    d.start_worker(4).await;
    let client = Client::connect_to(&d.config).await;
    let job = |id: &str| common::noop_job(id);
    client.submit(&job("before")).await;
    assert_eq!(
        d.wait_terminal("before", WAIT).await.state,
        JobState::Succeeded
    );

    replica.cli(&["REPLICAOF", "NO", "ONE"]).await;
    sentinel.serve(&replica).await;
    assert!(primary.info("replication").await.contains("role:master"));

    // Every process leaves the old primary (its connections close), though
    // nothing there refused a write; what they wrote to it meanwhile is
    // what a split brain loses.
    eventually("every process off the old primary", WAIT, || async {
        let clients = redis_cli(primary.port, &["CLIENT", "LIST"]).await;
        // This redis-cli is the one client left.
        (clients.lines().count() <= 1).then_some(clients)
    })
    .await;
    client.submit(&job("after")).await;
    assert_succeeded_on(&d, "after", &replica, &primary).await;
    client.close().await;
    d.shutdown().await;
}

/// Job `id` succeeds, recorded on `on` and not on `not_on`.
async fn assert_succeeded_on(d: &Deployment, id: &str, on: &PrivateRedis, not_on: &PrivateRedis) {
    let status = d.wait_terminal(id, WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    let key = d.names.job_key(id);
    assert_eq!(redis_cli(on.port, &["EXISTS", &key]).await.trim(), "1");
    assert_eq!(redis_cli(not_on.port, &["EXISTS", &key]).await.trim(), "0");
}

/// Sentinels that disagree: the first one listed, cut off with the old
/// primary (here: monitoring a primary of its own), cannot take part in a
/// failover and goes on naming the old primary under the epoch before it;
/// the others promoted another node under a newer epoch. Every process
/// works on the newer one, though the stale sentinel answers first and
/// its primary takes writes: those would be lost when the cut heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinels_that_disagree_the_primary_of_the_newest_epoch_is_used() {
    let _serial = SERIAL.lock().await;
    let old = PrivateRedis::start(false).await;
    let new = PrivateRedis::start(false).await;
    let stale = PrivateSentinel::start_at_epoch(&old, 3).await;
    let promoted = PrivateSentinel::start_at_epoch(&new, 4).await;
    let mut config = test_config(&unique_prefix("epochs"));
    config.redis_url = format!(
        "redis+sentinel://127.0.0.1:{},127.0.0.1:{}/svc",
        stale.port, promoted.port
    );
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let client = Client::connect_to(&d.config).await;
    client.submit(&common::noop_job("newest")).await;
    assert_succeeded_on(&d, "newest", &new, &old).await;
    client.close().await;
    d.shutdown().await;
}

/// With `redis_wait_replicas`, the wait follows the primary too. The
/// sentinels name a new primary the old one does not know of (a split
/// brain); the old one keeps its replica, so a `WAIT` there still
/// succeeds, but the jobs are created on the new one now, which has none:
/// a submission waits, unanswered, until the new primary has a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_the_replica_wait_follows_the_new_primary() {
    let _serial = SERIAL.lock().await;
    let (primary, _replica) = primary_and_replica().await;
    let fresh = PrivateRedis::start(false).await;
    let sentinel = PrivateSentinel::start(&primary).await;
    let mut config = test_config(&unique_prefix("waitmoves"));
    config.redis_url = format!("redis+sentinel://127.0.0.1:{}/svc", sentinel.port);
    config.redis_wait_replicas = 1;
    config.redis_wait_timeout_ms = 200;
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let mut client = Client::connect(&d.config.prefix).await;
    client.submit(&common::noop_job("before")).await;
    let (_, reply) = client.reply().await;
    assert_eq!(reply["accepted"], json!(true), "{reply}");

    sentinel.serve(&fresh).await;
    // Every process moves on its own check of the sentinels (no failover
    // is announced). Left on the old primary: its replica, this
    // redis-cli, and the replica waits' own connections, which move at
    // their next round.
    eventually(
        "every process's calls off the old primary",
        WAIT,
        || async {
            let clients = redis_cli(primary.port, &["CLIENT", "LIST"]).await;
            let calls = clients.lines().filter(|c| {
                let replica = c
                    .split(' ')
                    .any(|f| f.starts_with("flags=") && f.contains('S'));
                let asking = c.contains(" cmd=client|list ");
                let waiting = c.contains(" cmd=wait ") || c.contains(" cmd=incr ");
                !(replica || asking || waiting)
            });
            (calls.count() == 0).then_some(())
        },
    )
    .await;
    client.submit(&common::noop_job("after")).await;
    let early = tokio::time::timeout(Duration::from_secs(3), client.reply()).await;
    assert!(
        early.is_err(),
        "a submission was answered with no replica of the new primary to have it: {early:?}"
    );
    let follower = PrivateRedis::start(false).await;
    follow(&follower, &fresh).await;
    let (corr, reply) = client.reply().await;
    assert_eq!(
        (corr.as_str(), &reply["accepted"]),
        ("after", &json!(true)),
        "{reply}"
    );
    let status = d.wait_terminal("after", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    let key = d.names.job_key("after");
    assert_eq!(
        redis_cli(follower.port, &["EXISTS", &key]).await.trim(),
        "1"
    );
    client.close().await;
    d.shutdown().await;
}

/// A Redis outage longer than a lease does not doom the runs it spans: the
/// worker retries its failed renewals every 100 ms and renews its claim as
/// soon as Redis answers again, while the dispatcher, which saw the outage
/// too, leaves lapsed leases alone for a moment before reclaiming them; the
/// run finishes as the task's first and only attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_renewed_after_a_redis_outage_longer_than_its_lease_is_kept() {
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(true).await;
    let mut config = redis.config("outlived");
    config.worker.lease_ms = 1500;
    let (mut d, _dir, journal) =
        journaled(Deployment::with_config(config).await, "outlived", 2).await;
    let client = Client::connect_to(&d.config).await;
    client
        .submit(&json!({"id": "outlived", "requestor": "r", "tasks": [
            {"name": "t", "handler": "sleep", "params": {"ms": 6000}}]}))
        .await;
    eventually("the task running", WAIT, || async {
        let s = d.status("outlived").await?;
        (s.tasks["t"].state == conveyor::model::TaskState::Running).then_some(())
    })
    .await;

    redis.stop().await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    redis.launch().await;
    let back = now_ns();
    let run = eventually("the claim renewed after the outage", WAIT, || async {
        let runs = journal::runs_of(&journal, "outlived", 0);
        runs.into_iter().find(|r| r.last_alive > back)
    })
    .await;
    assert!(
        run.end.is_none(),
        "the run ended before its renewal: {run:?}"
    );

    d.start_dispatcher().await;
    let status = d.wait_terminal("outlived", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["t"].attempts, 1, "{status:#?}");
    assert!(
        !status.history.iter().any(|h| h.reason.contains("lease")),
        "{:#?}",
        status.history
    );
    assert_no_overlapping_claims(&journal, Duration::from_millis(1500));
    client.close().await;
    d.shutdown().await;
}

/// Redis may come back from a crash (`appendfsync everysec`) or a failover
/// to a replica that lagged without its latest writes. Here those are a
/// claim and its lease entry, and the worker that held the claim was killed
/// too, its task message long acked: nothing would ever offer the task
/// again. The loss comes with a restart, so the server is new to the
/// deployment; the dispatcher audits the unfinished jobs, the sweep offers
/// the task again, and it runs to the end under a higher fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_redis_lost_with_its_worker_is_run_again_after_the_restart() {
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(true).await;
    let config = redis.config("redislost");
    let mut d = Deployment::with_config(config).await;
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "lost", "requestor": "r", "tasks": [
            {"name": "t", "handler": "sleep", "params": {"ms": 1000}}]}))
        .await;
    eventually("the job recorded", WAIT, || d.status("lost")).await;
    // The job's keys as they were before the claim.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = [d.names.job_key("lost"), d.names.history_key("lost")];
    let mut before = Vec::new();
    for key in &keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        before.push(dump);
    }
    let dir = Scratch::dir("redislost");
    let journal = dir.join("journal");
    let mut victim = worker_process(&d, &journal, 2000, &dir.join("victim.log"));
    eventually("the task running", WAIT, || async {
        let status = d.status("lost").await?;
        (status.tasks["t"].state == conveyor::model::TaskState::Running).then_some(())
    })
    .await;
    signal(&victim, "-KILL").await;
    common::exited(&mut victim, "the worker killed with kill -9", None).await;
    // Redis loses the claim's writes: the job's keys as before, the lease
    // entry gone. Then it restarts (from its append-only file).
    let mut pipe = redis::pipe();
    for (key, dump) in keys.iter().zip(&before) {
        pipe.cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump)
            .arg("REPLACE")
            .ignore();
    }
    pipe.cmd("DEL").arg(d.names.leases()).ignore();
    pipe.query_async::<()>(&mut conn).await.unwrap();
    drop(conn);
    redis.stop().await;
    redis.launch().await;
    d.journal_to(&journal);
    d.start_worker(2).await;
    let status = d.wait_terminal("lost", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    let runs = journal::runs_of(&journal, "lost", 0);
    assert_eq!(runs.len(), 2, "the victim's run and the new one: {runs:?}");
    assert_eq!(runs[0].end, None, "the victim was killed mid-run: {runs:?}");
    assert!(runs[1].end.is_some(), "{runs:?}");
    assert!(
        runs[1].fence > runs[0].fence,
        "the new claim's fence must exceed the lost one's: {runs:?}"
    );
    client.close().await;
    d.shutdown().await;
}

/// A primary of the test's own with one replica in sync.
async fn primary_and_replica() -> (PrivateRedis, PrivateRedis) {
    let primary = PrivateRedis::start(false).await;
    let replica = PrivateRedis::start(false).await;
    follow(&replica, &primary).await;
    (primary, replica)
}

/// Make `replica` a replica of `primary` and wait until it is in sync.
async fn follow(replica: &PrivateRedis, primary: &PrivateRedis) {
    replica
        .cli(&["REPLICAOF", "127.0.0.1", &primary.port.to_string()])
        .await;
    eventually("replica in sync", WAIT, || async {
        (replica.info("replication").await)
            .contains("master_link_status:up")
            .then_some(())
    })
    .await;
}

/// With `redis_wait_replicas = 1` a submission is acked (and answered)
/// only once a replica has its job: an unplanned failover right after the
/// reply cannot lose it. While the replica is away, submissions wait in
/// the broker, unanswered, and readiness says why; when it is back they
/// are accepted and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_wait_replicas_a_submission_is_acked_only_once_a_replica_has_its_job() {
    let _serial = SERIAL.lock().await;
    let (primary, replica) = primary_and_replica().await;
    let mut config = primary.config("waitrepl");
    config.redis_wait_replicas = 1;
    config.redis_wait_timeout_ms = 200;
    let mut d = Deployment::with_config(config).await;
    assert_eq!(d.store.connected_replicas().await.unwrap(), 1);
    // Readiness as a process of this deployment computes it, on its store.
    let health =
        conveyor::health::Health::new(d.store.clone(), common::connect_broker(&d.config).await);
    health.set_consuming("waitrepl.submit", true);
    let ready = health.readiness().await;
    assert!(ready.ready, "{ready:?}");
    assert_eq!(
        ready.replicas,
        Some(Replicas {
            wanted: 1,
            connected: 1
        })
    );
    d.start_dispatcher().await;
    // Takes the submissions ahead of the dispatcher, claiming each root.
    d.start_worker_taking_submissions(4).await;
    let mut client = Client::connect(&d.config.prefix).await;
    let job = |id: &str| common::noop_job(id);
    client.submit(&job("before")).await;
    let (corr, reply) = client.reply().await;
    assert_eq!(
        (corr.as_str(), &reply["accepted"]),
        ("before", &json!(true)),
        "{reply}"
    );
    assert_eq!(
        d.wait_terminal("before", WAIT).await.state,
        JobState::Succeeded
    );

    replica.stop().await;
    eventually("the primary counting no replica", WAIT, || async {
        (d.store.connected_replicas().await.ok()? == 0).then_some(())
    })
    .await;
    client.submit(&job("during")).await;
    let early = tokio::time::timeout(Duration::from_secs(3), client.reply()).await;
    assert!(
        early.is_err(),
        "a submission was answered with no replica to have it: {early:?}"
    );
    let short = health.readiness().await;
    assert!(!short.ready && short.store && short.broker, "{short:?}");
    assert_eq!(
        short.replicas,
        Some(Replicas {
            wanted: 1,
            connected: 0
        })
    );
    // Recorded on the primary, but neither acked nor run: its root is
    // run (or published) only after the creation returns, and a root the
    // worker claimed meanwhile is handed back each time.
    let status = d.status("during").await.expect("recorded on the primary");
    assert!(
        matches!(
            status.tasks["t"].state,
            conveyor::model::TaskState::Ready | conveyor::model::TaskState::Running
        ),
        "{status:#?}"
    );

    replica.launch().await;
    follow(&replica, &primary).await;
    let (corr, reply) = client.reply().await;
    assert_eq!(
        (corr.as_str(), &reply["accepted"]),
        ("during", &json!(true)),
        "{reply}"
    );
    let status = d.wait_terminal("during", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded);
    let back = health.readiness().await;
    assert!(back.ready, "{back:?}");
    // The roots claimed while the replica was away were handed back, not
    // left to lapse.
    assert_eq!(status.tasks["t"].attempts, 1, "{status:#?}");
    assert!(
        !status
            .history
            .iter()
            .any(|h| h.reason.contains("lease expired")),
        "{:#?}",
        status.history
    );
    let on_replica = redis_cli(replica.port, &["EXISTS", &d.names.job_key("during")]).await;
    assert_eq!(on_replica.trim(), "1");
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_without_its_data_is_noticed_and_vanished_tasks_are_dead_lettered_not_run()
{
    let _serial = SERIAL.lock().await;
    let redis = PrivateRedis::start(false).await;
    let config = redis.config("redisnone");
    let mut d = Deployment::with_config(config).await;
    let dir = Scratch::dir("redisnone");
    let journal = dir.join("journal");
    d.journal_to(&journal);
    d.start_dispatcher().await;
    let client = Client::connect(&d.config.prefix).await;
    // Chains of two slow tasks, so work is queued when the data goes.
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = format!("gone-{i}");
        client
            .submit(&json!({"id": id, "requestor": "r", "tasks": [
                {"name": "a", "handler": "sleep", "params": {"ms": 200}},
                {"name": "b", "handler": "sleep", "params": {"ms": 200}, "after": ["a"]}]}))
            .await;
        ids.push(id);
    }
    eventually("every job recorded", WAIT, || async {
        for id in &ids {
            d.status(id).await?;
        }
        Some(())
    })
    .await;
    let epoch_before = d.store.check_epoch().await.unwrap();
    d.start_worker(4).await;
    eventually("some work running", WAIT, || async {
        std::fs::read_to_string(&journal)
            .ok()
            .filter(|j| j.lines().count() >= 4)
            .map(|_| ())
    })
    .await;
    redis.stop().await;
    let restarted_at = now_ns();
    redis.launch().await;
    // A new job after the loss runs normally.
    d.assert_serves(&client, "fresh", WAIT).await;
    // The loss was noticed: a new epoch, so new fences never repeat old ones.
    let epoch_after = eventually("a new epoch", WAIT, || async {
        let e = d.store.check_epoch().await.ok()?;
        (e != epoch_before).then_some(e)
    })
    .await;
    assert_ne!(epoch_after, epoch_before);
    // Queued tasks of vanished jobs went to the dead-letter queue with the
    // reason, instead of running blind or disappearing.
    let mut missing = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && missing == 0 {
        while let Some((headers, _)) = client.take_dead().await {
            assert_eq!(
                headers["x-conveyor-reason-kind"], "job_missing",
                "{headers:?}"
            );
            assert!(
                headers["x-conveyor-reason"].contains("has no record"),
                "{headers:?}"
            );
            missing += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        missing > 0,
        "queued tasks of vanished jobs must be dead-lettered"
    );
    assert_no_overlapping_claims(&journal, d.config.lease());
    journal::assert_every_success_was_run(&d, &["fresh"], &journal).await;
    // No run of a vanished job started after the data was lost.
    for ((job, idx), runs) in read_journal(&journal) {
        if job == "fresh" {
            continue;
        }
        for r in runs {
            assert!(
                r.start < restarted_at,
                "{job}/{idx} started after its record vanished: {r:?}"
            );
        }
    }
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_has_its_late_outcome_rejected() {
    let _serial = SERIAL.lock().await;
    let mut d = Deployment::new("sigstop").await;
    let dir = Scratch::dir("sigstop");
    let journal = dir.join("journal");
    d.start_dispatcher().await;
    let lease_ms = 1500;
    let log = dir.join("paused.log");
    let mut paused = worker_process(&d, &journal, lease_ms, &log);
    let client = Client::connect(&d.config.prefix).await;
    client
        .submit(&json!({"id": "stopped", "requestor": "r",
            "tasks": [{"name": "s", "handler": "sleep", "params": {"ms": 2500}}]}))
        .await;
    // Stopped once its journal shows the run started: a stop between the
    // claim and the run is another case (the resumed worker renews the
    // stalled claim first, finds it taken over and runs nothing: see
    // `worker/mod.rs::a_claim_that_lapsed_before_its_run_started_is_not_run`).
    let first = eventually(
        "the task's run started on the paused worker",
        WAIT,
        || async {
            let run = journal::runs_of(&journal, "stopped", 0)
                .into_iter()
                .next()?;
            let s = d.status("stopped").await?;
            let t = &s.tasks["s"];
            (t.state == conveyor::model::TaskState::Running
                && t.worker.as_deref() == Some(&run.worker))
            .then_some(run.worker)
        },
    )
    .await;
    signal(&paused, "-STOP").await;
    d.journal_to(&journal);
    d.config.worker.lease_ms = lease_ms;
    let second = d.start_worker(4).await;
    eventually("the task re-claimed by another worker", WAIT, || async {
        let s = d.status("stopped").await?;
        (s.tasks["s"].worker.as_deref() == Some(second.as_str())).then_some(())
    })
    .await;
    signal(&paused, "-CONT").await;
    let status = d.wait_terminal("stopped", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded);
    let s = &status.tasks["s"];
    assert_eq!(
        s.worker.as_deref(),
        Some(second.as_str()),
        "the result comes from the new attempt"
    );
    assert_eq!(s.attempts, 2);
    assert!(
        status.history.iter().any(|h| h
            .reason
            .starts_with(&format!("lease expired (worker {first})"))),
        "{:#?}",
        status.history
    );
    let log_text = eventually("the late outcome rejected", WAIT, || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("late outcome rejected").then_some(text)
    })
    .await;
    assert!(log_text.contains("late outcome rejected"));
    assert_jobs_settled(&d, &["stopped".to_owned()]).await;
    assert_no_overlapping_claims(&journal, Duration::from_millis(lease_ms));
    journal::assert_every_success_was_run(&d, &["stopped"], &journal).await;
    signal(&paused, "-TERM").await;
    common::exited(&mut paused, "the resumed worker", Some(&log)).await;
    client.close().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_garbage_messages_are_all_recorded_and_the_dispatcher_keeps_serving() {
    let _serial = SERIAL.lock().await;
    let d = Deployment::new("garbage").await;
    let dir = Scratch::dir("garbage");
    let mut dispatcher = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["dispatcher"])
        .env("CONVEYOR_PREFIX", &d.config.prefix)
        .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
        .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("dispatcher.log")).unwrap(),
        ))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = Client::connect(&d.config.prefix).await;
    let n = 10_000;
    let mut expected_dead = 0;
    for i in 0..n {
        let body: Vec<u8> = match i % 8 {
            0 => (0..64).map(|k| ((i * 31 + k * 7) % 256) as u8).collect(),
            1 => br#"{"requestor": "r", "tasks": [{"name": "t", "hand"#.to_vec(),
            2 => json!({"requestor": 42, "tasks": "many"}).to_string().into_bytes(),
            3 => json!({"requestor": "x".repeat(5000), "tasks": [{"name": "t", "handler": "noop"}]}).to_string().into_bytes(),
            4 => format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            5 => {
                let mut v = json!("leaf");
                for _ in 0..100 {
                    v = json!({"deeper": v});
                }
                json!({"requestor": "r", "tasks": [{"name": "t", "handler": "nope", "params": v}]}).to_string().into_bytes()
            }
            6 if i % 400 == 6 => {
                // Over the 1 MiB limit.
                format!("{{\"requestor\": \"{}\"}}", "y".repeat(1_100_000)).into_bytes()
            }
            6 if i % 400 == 206 => {
                // Under the limit, and 300,000 schema errors: the
                // dispatcher must stop at the first.
                let after = vec![1; 300_000];
                json!({"requestor": "r", "tasks": [{"name": "a", "handler": "noop", "after": after}]}).to_string().into_bytes()
            }
            6 => json!({"requestor": "r", "tasks": [{"name": "a", "handler": "noop", "after": ["a"]}]}).to_string().into_bytes(),
            _ => json!({"requestor": "r", "tasks": [{"name": "s", "handler": "sleep", "params": {"ms": "later"}}], "extra": true}).to_string().into_bytes(),
        };
        if serde_json::from_slice::<serde_json::Value>(&body).is_err()
            || body.len() > d.config.max_message_bytes
        {
            expected_dead += 1;
        }
        client.publish_no_reply(&body).await;
    }
    let valid = common::noop_job("valid-after-garbage");
    client.submit(&valid).await;
    let mut d = d;
    d.start_worker(2).await;
    assert_eq!(
        d.wait_terminal("valid-after-garbage", WAIT).await.state,
        JobState::Succeeded
    );
    let broker = common::connect_broker(&d.config).await;
    let dead = eventually("every garbage message handled", WAIT, || async {
        let stats = broker
            .queue_stats(&[d.names.submit_queue(), d.names.dead_queue()])
            .await
            .ok()?;
        (stats[0].ready == 0 && stats[1].ready as usize == expected_dead)
            .then_some(stats[1].ready as usize)
    })
    .await;
    let rejected = d
        .store
        .list_jobs(Some(JobState::Rejected), 2 * n)
        .await
        .unwrap()
        .len();
    assert_eq!(
        dead + rejected,
        n,
        "dead {dead} + rejected {rejected} must account for every message"
    );
    let pid = dispatcher.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (peak_mb, now_mb) = (kb("VmHWM:") / 1024, kb("VmRSS:") / 1024);
    eprintln!(
        "garbage flood: dispatcher peak RSS {peak_mb} MB, now {now_mb} MB; {dead} dead-lettered, {rejected} rejected"
    );
    assert!(peak_mb < 256, "dispatcher peak RSS {peak_mb} MB");
    assert!(now_mb < 128, "dispatcher RSS after the flood {now_mb} MB");
    signal(&dispatcher, "-TERM").await;
    let exit = common::exited(&mut dispatcher, "the dispatcher", None).await;
    assert!(exit.success(), "{exit:?}");
    client.close().await;
    d.shutdown().await;
}
