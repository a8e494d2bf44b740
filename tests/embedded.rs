//! The embedded mode: a whole Conveyor in one process, on the in-process
//! broker and store, running the production dispatcher and worker code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;

use common::scratch::Scratch;
use conveyor::config::Config;
use conveyor::embedded::{Embedded, EmbeddedOptions};
use conveyor::model::JobState;
use serde_json::json;

/// An embedded deployment of the built-in handlers, keeping its store in
/// `snapshot`.
async fn start_with_snapshot(config: &Config, snapshot: &std::path::Path) -> Embedded {
    let options = EmbeddedOptions {
        snapshot: Some(snapshot.to_owned()),
        ..EmbeddedOptions::default()
    };
    Embedded::start(config, conveyor_builtin_handlers::registry(), options)
        .await
        .unwrap()
}

async fn wait_terminal(e: &Embedded, id: &str) -> conveyor::store::JobStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = e.store().job(id).await.unwrap()
            && s.state.is_terminal()
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `conveyor run FILE --json` in process, with broker and Redis URLs that
/// lead nowhere (with `password` in them); its final status, once it
/// exited 0.
fn run_in_process(file: &str, password: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["run", file, "--json"])
        .env(
            "CONVEYOR_AMQP_URL",
            format!("amqp://nobody:{password}@127.0.0.1:1/%2f"),
        )
        .env(
            "CONVEYOR_REDIS_URL",
            format!("redis://:{password}@127.0.0.1:1/"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn conveyor_run_runs_the_example_job_with_no_services_and_exits_0() {
    let status = run_in_process("examples/diamond.json", "nothing");
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["tasks"]["double"]["result"], json!({"value": 42}));
}

/// Output into a pipe whose reader has gone (`conveyor run job.json |
/// head -c0`, or `conveyor list --json | head` on a long list) ends the
/// command quietly with 141, as SIGPIPE ends other programs. Until the
/// thirty-seventh session the write panicked: a panic message and exit 101.
#[test]
fn a_command_whose_output_pipe_closed_exits_141_without_a_panic() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["run", "examples/diamond.json"])
        .env("CONVEYOR_AMQP_URL", "amqp://127.0.0.1:1/%2f")
        .env("CONVEYOR_REDIS_URL", "redis://127.0.0.1:1/")
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the job has run (its first line comes at the end).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // What went to stderr before is all there.
    assert!(stderr.contains("succeeded"), "{stderr}");
}

/// A `shell` program sees its run's four `CONVEYOR_*` variables and none
/// of the worker's own settings: the Redis URL's password never reaches
/// what a task prints (its stderr tail goes into the job's status).
#[test]
fn a_shell_program_never_sees_the_workers_conveyor_settings() {
    let dir = Scratch::dir("run");
    let file = dir.join("env.json");
    let script = "env | grep '^CONVEYOR_' | cut -d= -f1 | sort | tr '\\n' ' ' \
        | sed 's/^/\"/; s/ $/\"/'";
    std::fs::write(
        &file,
        json!({"requestor": "t", "tasks": [{"name": "e", "handler": "shell",
            "params": {"command": "sh", "args": ["-c", script]}}]})
        .to_string(),
    )
    .unwrap();
    let status = run_in_process(file.to_str().unwrap(), "hunter2");
    assert_eq!(
        status["tasks"]["e"]["result"],
        json!("CONVEYOR_ATTEMPT CONVEYOR_FENCE CONVEYOR_JOB_ID CONVEYOR_TASK"),
        "{status}"
    );
}

/// Until the thirty-second session the embedded worker of `conveyor run`
/// consumed only `worker.queues` (`default`): a job with a task on another
/// queue waited, without a word, until the time-out.
#[test]
fn conveyor_run_runs_tasks_on_every_queue_the_job_names() {
    let dir = Scratch::dir("run");
    let file = dir.join("queues.json");
    std::fs::write(
        &file,
        json!({"requestor": "t", "tasks": [
            {"name": "render", "handler": "noop", "queue": "gpu"},
            {"name": "again", "handler": "noop", "queue": "gpu", "after": ["render"]},
            {"name": "plain", "handler": "noop"}]})
        .to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["run", file.to_str().unwrap(), "--json", "--timeout-s", "20"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
}

/// A job given up on at `--timeout-s` ends the command then, its running
/// task stopped (a `shell` task's program killed), not after the workers'
/// grace period for it (30 s): until the thirty-third session the command
/// waited that out.
#[test]
fn conveyor_run_stops_what_still_runs_when_it_gives_up() {
    let dir = Scratch::dir("run");
    let file = dir.join("slow.json");
    let pid_file = dir.join("pid");
    let script = format!("echo $$ > {}; exec sleep 120", pid_file.display());
    std::fs::write(
        &file,
        json!({"requestor": "t", "tasks": [{"name": "slow", "handler": "shell",
            "params": {"command": "sh", "args": ["-c", script]}}]})
        .to_string(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["run", file.to_str().unwrap(), "--timeout-s", "5"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "given up on: {said}");
    assert!(
        took < Duration::from_secs(20),
        "the command waited {took:?} past its time-out: {said}"
    );
    let pid = std::fs::read_to_string(&pid_file).expect("the task started");
    // Gone, or a zombie waiting for whoever inherited it to reap it.
    let running = || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|s| !s.trim_start().starts_with('Z'))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !running(),
        "the task's program {} outlived the command",
        pid.trim()
    );
}

#[test]
fn conveyor_run_exits_1_when_the_job_fails() {
    let dir = Scratch::dir("run");
    let file = dir.join("fail.json");
    std::fs::write(
        &file,
        json!({"requestor": "t", "tasks": [{"name": "f", "handler": "fail", "params": {"permanent": true}}]}).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["run", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("f: failed: fail: permanent failure requested")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_keeps_jobs_across_a_restart() {
    let dir = Scratch::dir("snap");
    let snapshot = dir.join("store.json");
    let config = Config::default();

    let first = start_with_snapshot(&config, &snapshot).await;
    first
        .submit(json!({"id": "kept", "requestor": "t", "tasks": [{"name": "a", "handler": "noop", "params": {"x": 1}}]}).to_string().into_bytes())
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(&first, "kept").await.state,
        JobState::Succeeded
    );
    first.shutdown().await.unwrap();
    assert!(snapshot.exists());
    // Each task's plan (name, handler, params, policy) sits at the top of
    // its object, as in snapshots written before the plan became a field
    // of its own: those still load.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snapshot).unwrap()).unwrap();
    let task = &written["jobs"]["kept"]["tasks"][0];
    assert_eq!(
        (task["name"].as_str(), task["handler"].as_str()),
        (Some("a"), Some("noop")),
        "{task}"
    );
    assert!(task.get("plan").is_none(), "{task}");

    let second = start_with_snapshot(&config, &snapshot).await;
    let status = second
        .store()
        .job("kept")
        .await
        .unwrap()
        .expect("job kept across the restart");
    assert_eq!(status.tasks["a"].result, json!({"x": 1}));
    // And the restarted instance still works.
    second
        .submit(
            json!({"id": "after", "requestor": "t", "tasks": [{"name": "a", "handler": "noop"}]})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(&second, "after").await.state,
        JobState::Succeeded
    );
    second.shutdown().await.unwrap();
}

/// A job unfinished when the process stops is finished by the next one:
/// the task its worker handed back (no grace period) is ready in the
/// snapshot, its message gone with the old process's broker. The snapshot
/// names another store, so the new dispatcher audits every unfinished job
/// and offers that task again, exactly as after a Redis restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_unfinished_at_a_restart_is_finished_from_the_snapshot() {
    let dir = Scratch::dir("snaprun");
    let snapshot = dir.join("store.json");
    let mut config = Config::default();
    config.worker.grace_s = 0;
    let first = start_with_snapshot(&config, &snapshot).await;
    first
        .submit(
            json!({"id": "half", "requestor": "t", "tasks": [
                {"name": "a", "handler": "sleep", "params": {"ms": 1500}},
                {"name": "b", "handler": "noop", "after": ["a"]}]})
            .to_string()
            .into_bytes(),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while first
        .store()
        .job("half")
        .await
        .unwrap()
        .is_none_or(|s| s.tasks["a"].state != conveyor::model::TaskState::Running)
    {
        assert!(tokio::time::Instant::now() < deadline, "a never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.shutdown().await.unwrap();

    let second = start_with_snapshot(&config, &snapshot).await;
    let status = wait_terminal(&second, "half").await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(
        status.tasks["b"].state,
        conveyor::model::TaskState::Succeeded
    );
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_rejects_bad_jobs_like_production() {
    let e = Embedded::start(
        &Config::default(),
        conveyor_builtin_handlers::registry(),
        EmbeddedOptions::default(),
    )
    .await
    .unwrap();
    e.submit(
        json!({"id": "bad", "requestor": "t", "tasks": [{"name": "a", "handler": "nope"}]})
            .to_string()
            .into_bytes(),
    )
    .await
    .unwrap();
    let status = wait_terminal(&e, "bad").await;
    assert_eq!(status.state, JobState::Rejected);
    assert!(status.error.unwrap().contains("unknown handler"));
    e.shutdown().await.unwrap();
}

#[tokio::test]
async fn conveyor_dev_starts_with_no_services_and_says_ready_over_http() {
    let port = common::free_port();
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["dev", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("CONVEYOR_AMQP_URL", "amqp://nobody:nothing@127.0.0.1:1/%2f")
        .env("CONVEYOR_REDIS_URL", "redis://127.0.0.1:1/")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let body = common::eventually("conveyor dev ready", Duration::from_secs(20), || async {
        let (ready, body) = common::readiness(port).await?;
        ready.then_some(body)
    })
    .await;
    assert_eq!(body["consuming"]["conveyor.submit"], true, "{body}");
    assert_eq!(
        common::http_get(port, "/healthz").await.map(|(s, _)| s),
        Some(200)
    );
    interrupt(&mut dev, None).await;
}

/// Log lines of a `conveyor dev` run with `CONVEYOR_LOG_FORMAT=json`
/// whose message is `message`, as JSON.
fn dev_log_lines(log: &std::path::Path, message: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == message)
        .collect()
}

fn spawn_dev(
    snapshot: &std::path::Path,
    log: &std::path::Path,
    jobs: &[&str],
) -> tokio::process::Child {
    spawn_dev_with_env(snapshot, log, jobs, &[])
}

/// `conveyor dev` as [`spawn_dev`], with more environment variables.
fn spawn_dev_with_env(
    snapshot: &std::path::Path,
    log: &std::path::Path,
    jobs: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("dev")
        .arg("--snapshot")
        .arg(snapshot)
        .args(jobs)
        .envs(env.iter().copied())
        .env("CONVEYOR_LOG_FORMAT", "json")
        .env("CONVEYOR_AMQP_URL", "amqp://nobody:nothing@127.0.0.1:1/%2f")
        .env("CONVEYOR_REDIS_URL", "redis://127.0.0.1:1/")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Ctrl-C, and `conveyor dev` exits 0.
async fn interrupt(dev: &mut tokio::process::Child, log: Option<&std::path::Path>) {
    let pid = dev.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(common::exited(dev, "conveyor dev", log).await.success());
}

/// `conveyor dev JOB.json --snapshot FILE` runs the job file it is given,
/// logs the job's end, and a second `conveyor dev` on the same snapshot
/// (given no job file) still has the job.
#[tokio::test]
async fn conveyor_dev_runs_job_files_and_keeps_their_jobs_in_its_snapshot_across_a_restart() {
    let dir = Scratch::dir("dev-snapshot");
    let snapshot = dir.join("store.snapshot");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diamond.json");
    let first_log = dir.join("first.log");
    let mut first = spawn_dev(&snapshot, &first_log, &[example]);
    let finished = common::eventually(
        "the example job finished",
        Duration::from_secs(30),
        || async { dev_log_lines(&first_log, "job finished").into_iter().next() },
    )
    .await;
    assert_eq!(finished["fields"]["state"], "succeeded", "{finished}");
    let id = finished["fields"]["job"].as_str().unwrap().to_owned();
    let started = dev_log_lines(
        &first_log,
        "conveyor dev running in-process (no RabbitMQ or Redis; production uses both); Ctrl-C stops",
    );
    assert_eq!(started.len(), 1, "the start is logged once, with its time");
    assert!(
        started[0]["fields"]["elapsed_ms"].is_u64(),
        "{}",
        started[0]
    );
    interrupt(&mut first, Some(&first_log)).await;
    assert!(snapshot.exists(), "a snapshot written at the stop");

    let second_log = dir.join("second.log");
    let mut second = spawn_dev(&snapshot, &second_log, &[]);
    let kept = common::eventually(
        "the job found in the snapshot",
        Duration::from_secs(30),
        || async {
            dev_log_lines(&second_log, "job finished")
                .into_iter()
                .find(|l| l["fields"]["job"] == id.as_str())
        },
    )
    .await;
    assert_eq!(kept["fields"]["state"], "succeeded", "{kept}");
    interrupt(&mut second, Some(&second_log)).await;
}

/// A terminal closed under `conveyor dev` (SIGHUP) stops it as Ctrl-C
/// does: it exits 0 with its last snapshot written, where SIGHUP's default
/// action ended it at once (until the thirty-sixth session).
#[tokio::test]
async fn a_hangup_stops_conveyor_dev_as_ctrl_c_does() {
    let dir = Scratch::dir("dev-hangup");
    let snapshot = dir.join("store.snapshot");
    let log = dir.join("dev.log");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diamond.json");
    let mut dev = spawn_dev(&snapshot, &log, &[example]);
    common::eventually(
        "the example job finished",
        Duration::from_secs(30),
        || async { dev_log_lines(&log, "job finished").into_iter().next() },
    )
    .await;
    let pid = dev.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(
        common::exited(&mut dev, "conveyor dev", Some(&log))
            .await
            .success()
    );
    assert_eq!(
        dev_log_lines(&log, "SIGHUP: shutting down (a second one stops at once)").len(),
        1
    );
    assert!(snapshot.exists(), "a snapshot written at the stop");
}

/// A second Ctrl-C to `conveyor dev` ends its workers' grace period at
/// once, as it does a worker's: the running task is handed back (and so
/// kept, ready, in the snapshot) and `dev` exits 0 without waiting out a
/// grace period of ten minutes.
#[tokio::test]
async fn a_second_ctrl_c_stops_conveyor_dev_without_waiting_out_the_grace_period() {
    let dir = Scratch::dir("dev-hurried");
    let snapshot = dir.join("store.snapshot");
    let job = dir.join("nap.json");
    let nap = json!({"id": "nap", "requestor": "t",
        "tasks": [{"name": "nap", "handler": "sleep", "params": {"ms": 600_000}}]});
    std::fs::write(&job, nap.to_string()).unwrap();
    let log = dir.join("dev.log");
    let mut dev = spawn_dev_with_env(
        &snapshot,
        &log,
        &[job.to_str().unwrap()],
        &[("CONVEYOR_GRACE_S", "600")],
    );
    let task_state = || {
        std::fs::read(&snapshot)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|store| {
                store["jobs"]["nap"]["tasks"][0]["state"]
                    .as_str()
                    .map(str::to_owned)
            })
    };
    common::eventually(
        "the task running, in the snapshot",
        Duration::from_secs(30),
        || async { (task_state().as_deref() == Some("running")).then_some(()) },
    )
    .await;
    let pid = dev.id().expect("running").to_string();
    let ctrl_c = || {
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
    };
    ctrl_c();
    common::eventually("the first Ctrl-C seen", Duration::from_secs(30), || async {
        dev_log_lines(&log, "SIGINT: shutting down (a second one stops at once)")
            .into_iter()
            .next()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        dev.try_wait().unwrap().is_none(),
        "a graceful stop waits for the running task"
    );
    ctrl_c();
    let exited = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .expect("conveyor dev was still waiting for its running task after a second Ctrl-C")
        .unwrap();
    assert!(exited.success(), "{exited}");
    assert_eq!(task_state().as_deref(), Some("ready"), "handed back");
}
