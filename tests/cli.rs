//! The `conveyor` commands a user drives a deployment with — `submit`,
//! `status`, `list` and `run` against RabbitMQ and Redis — run as the
//! binary, against a deployment of this test's own prefix, and read back
//! as a user (or a script parsing `--json`) reads them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::Deployment;
use common::scratch::Scratch;
use serde_json::{Value, json};

/// A command that has not finished in this long is stuck.
const WITHIN: Duration = Duration::from_secs(60);

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run `conveyor ARGS` against `d`'s services and prefix.
async fn conveyor(d: &Deployment, args: &[&str]) -> Ran {
    conveyor_with(d, args, &[]).await
}

/// [`conveyor`] with these environment variables set too.
async fn conveyor_with(d: &Deployment, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(args)
        .envs(env.iter().copied())
        .env("CONVEYOR_PREFIX", &d.config.prefix)
        .env("CONVEYOR_AMQP_URL", &d.config.amqp_url)
        .env("CONVEYOR_REDIS_URL", &d.config.redis_url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WITHIN, run)
        .await
        .unwrap_or_else(|_| panic!("conveyor {args:?} did not finish within {WITHIN:?}"))
        .expect("run conveyor");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn job_file(dir: &Path, name: &str, job: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(job).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

/// Whether `s` reads as an offset in seconds like `+0.034s`.
fn is_offset(s: &str) -> bool {
    let Some((secs, ms)) = s
        .strip_prefix('+')
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.split_once('.'))
    else {
        return false;
    };
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && ms.len() == 3
        && ms.bytes().all(|b| b.is_ascii_digit())
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_status_and_list_answer_in_the_documented_shapes() {
    let mut d = Deployment::new("cli").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let dir = Scratch::dir("cli");
    let file = job_file(
        &dir,
        "pair.json",
        &json!({"id": "pair", "requestor": "cli-test", "labels": {"team": "a"}, "tasks": [
            {"name": "first", "handler": "noop", "params": {"n": 1}},
            {"name": "second", "handler": "noop", "after": ["first"], "params": {"n": 2}}]}),
    );

    let submitted = conveyor(&d, &["submit", &file, "--wait", "--json"]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    // The final status as JSON alone on stdout (`jq` reads it); the id,
    // said at once, on stderr.
    assert!(
        submitted.stderr.starts_with("pair\n"),
        "{}",
        submitted.stderr
    );
    let status: Value = serde_json::from_str(&submitted.stdout).expect("status JSON alone");
    assert_eq!(status["state"], "succeeded");
    for key in [
        "history",
        "id",
        "labels",
        "requestor",
        "state",
        "tasks",
        "version",
    ] {
        assert!(keys(&status).contains(&key), "{key} in {status}");
    }
    assert_eq!(status["labels"], json!({"team": "a"}));
    let second = &status["tasks"]["second"];
    for key in ["attempts", "error", "result", "state", "worker"] {
        assert!(keys(second).contains(&key), "{key} in {second}");
    }
    assert_eq!(second["result"], json!({"n": 2}));
    assert_eq!(second["attempts"], 1);
    for h in status["history"].as_array().unwrap() {
        for key in ["at", "from", "reason", "task", "to"] {
            assert!(keys(h).contains(&key), "{key} in {h}");
        }
    }

    let again = conveyor(&d, &["status", "pair", "--json"]).await;
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&again.stdout).unwrap(),
        status
    );
    let table = conveyor(&d, &["status", "pair"]).await;
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(
        table.stdout.contains("job pair  state succeeded"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("second") && l.contains("succeeded")),
        "{}",
        table.stdout
    );
    // Times read as dates and offsets, not Unix milliseconds.
    let created = status["created_ms"].as_u64().unwrap();
    assert!(
        table.stdout.contains("\ncreated 20") && table.stdout.contains(" UTC  updated 20"),
        "{}",
        table.stdout
    );
    assert!(
        !table.stdout.contains(&created.to_string()),
        "{}",
        table.stdout
    );
    let history = table.stdout.split_once("\nhistory").unwrap().1;
    assert!(
        history
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().next().is_some_and(is_offset)),
        "{history}"
    );
    let unknown = conveyor(&d, &["status", "no-such-job"]).await;
    assert_ne!(unknown.code, Some(0));

    // A rejected job: `--wait` ends at once with its error and exit 1.
    let bad = job_file(
        &dir,
        "bad.json",
        &json!({"id": "bad", "requestor": "cli-test",
            "tasks": [{"name": "t", "handler": "no-such-handler"}]}),
    );
    let refused = conveyor(&d, &["submit", &bad, "--wait"]).await;
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stdout.contains("state rejected") && refused.stdout.contains("no-such-handler"),
        "{}",
        refused.stdout
    );

    let listed = conveyor(&d, &["list", "--state", "succeeded", "--json"]).await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let ids: Vec<String> = serde_json::from_str::<Vec<Value>>(&listed.stdout)
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec!["pair"]);
    let rejected = conveyor(&d, &["list", "--state", "rejected"]).await;
    assert!(
        rejected.stdout.lines().any(|l| l.starts_with("bad ")),
        "{}",
        rejected.stdout
    );
    assert!(!rejected.stdout.contains("pair"), "{}", rejected.stdout);
    assert!(rejected.stdout.contains(" UTC"), "{}", rejected.stdout);
    d.shutdown().await;
}

/// A file whose job could never be followed under its id is published, as
/// any client's would be, and the command says at once what becomes of it
/// instead of waiting for a job that never appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_says_at_once_when_the_files_job_will_not_appear_under_its_id() {
    let mut d = Deployment::new("cli-unfollowable").await;
    d.start_dispatcher().await;
    let dir = Scratch::dir("cli");
    let numeric = job_file(&dir, "numeric.json", &common::noop_job(5));
    let started = std::time::Instant::now();
    let told = conveyor(&d, &["submit", &numeric, "--wait"]).await;
    assert_eq!(told.code, Some(1), "{}", told.stderr);
    assert!(
        told.stdout.contains("id: 5 is not a string"),
        "{}",
        told.stdout
    );
    let big = dir.join("big.json");
    std::fs::write(&big, vec![b' '; 2 * 1024 * 1024]).unwrap();
    let told = conveyor(&d, &["submit", big.to_str().unwrap(), "--wait"]).await;
    assert_eq!(told.code, Some(1), "{}", told.stderr);
    assert!(told.stdout.contains("max_message_bytes"), "{}", told.stdout);
    assert!(started.elapsed() < WITHIN, "told, not waited out");
    d.shutdown().await;
}

/// A client whose config says other queue arguments than the deployment
/// was declared with (here a delivery limit of 7 against its 20) cannot
/// declare the queues, and need not: it publishes to them as they are, as
/// any client does, and the job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_publishes_to_queues_declared_with_other_arguments_than_its_own() {
    let mut d = Deployment::new("cli-otherargs").await;
    d.start_dispatcher().await;
    d.start_worker(2).await;
    let dir = Scratch::dir("cli");
    let file = job_file(&dir, "job.json", &common::noop_job("otherargs"));
    let ran = conveyor_with(
        &d,
        &["submit", &file, "--wait", "--timeout-s", "60"],
        &[("CONVEYOR_DELIVERY_LIMIT", "7")],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}\n{}", ran.stdout, ran.stderr);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_against_a_deployment_follows_the_job_to_its_results() {
    let mut d = Deployment::new("cli-run").await;
    d.start_dispatcher().await;
    d.start_worker(4).await;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diamond.json");
    let amqp = d.config.amqp_url.clone();
    let redis = d.config.redis_url.clone();
    let ran = conveyor(
        &d,
        &[
            "run",
            example,
            "--amqp-url",
            &amqp,
            "--redis-url",
            &redis,
            "--json",
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert!(
        !ran.stderr.contains("in-process"),
        "ran against the deployment: {}",
        ran.stderr
    );
    // Progress as it happens, on stderr.
    assert!(
        ran.stderr.contains("double") && ran.stderr.contains("-> succeeded"),
        "{}",
        ran.stderr
    );
    let status: Value = serde_json::from_str(&ran.stdout).expect("status JSON");
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["tasks"]["double"]["result"], json!({"value": 42}));
    // It ran on this deployment: the job is in its Redis.
    let id = status["id"].as_str().unwrap();
    assert_eq!(
        d.status(id).await.unwrap().state,
        conveyor::model::JobState::Succeeded
    );
    d.shutdown().await;
}

/// A user following a job that nothing will move is told which queue it
/// waits in and what would consume it, instead of waiting out the time-out
/// in silence; once something consumes every queue, nothing is noted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_in_a_queue_nothing_consumes_is_explained_while_it_waits() {
    let mut config = common::test_config(&common::unique_prefix("cli-stalls"));
    config.worker.queues = vec!["default".into(), "gpu".into()];
    let mut d = Deployment::with_config(config).await;
    let prefix = d.config.prefix.clone();
    let dir = Scratch::dir("cli");
    let on_gpu = |id: &str| {
        json!({"id": id, "requestor": "r",
            "tasks": [{"name": "render", "handler": "noop", "queue": "gpu"}]})
    };
    let first = job_file(&dir, "first.json", &on_gpu("first"));

    // Nothing runs: the submission waits in the submit queue.
    let told = conveyor(&d, &["submit", &first]).await;
    assert_eq!(told.code, Some(0), "{}", told.stderr);
    assert!(
        told.stderr
            .starts_with(&format!("note: nothing consumes {prefix}.submit now")),
        "{}",
        told.stderr
    );

    // A dispatcher records it; no worker consumes the task's queue.
    d.start_dispatcher().await;
    let told = conveyor(&d, &["submit", &first, "--wait", "--timeout-s", "3"]).await;
    // Not finished within its time-out: 124, not 1 (a job that failed).
    assert_eq!(told.code, Some(124), "{}", told.stderr);
    let note =
        format!("note: task render is ready in {prefix}.tasks.gpu, which no worker consumes now");
    assert!(told.stderr.contains(&note), "{}", told.stderr);
    assert!(
        told.stderr.contains("--queues gpu"),
        "says what would consume it: {}",
        told.stderr
    );
    assert!(
        !told.stderr.contains("nothing consumes"),
        "the dispatcher consumes the submit queue: {}",
        told.stderr
    );
    assert_eq!(
        told.stderr.matches("note:").count(),
        1,
        "once per queue: {}",
        told.stderr
    );

    // A worker on the queue: both jobs run, and nothing is noted.
    d.start_worker(4).await;
    let second = job_file(&dir, "second.json", &on_gpu("second"));
    let amqp = d.config.amqp_url.clone();
    let redis = d.config.redis_url.clone();
    let ran = conveyor(
        &d,
        &["run", &second, "--amqp-url", &amqp, "--redis-url", &redis],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert!(!ran.stderr.contains("note:"), "{}", ran.stderr);
    assert_eq!(
        d.wait_terminal("first", WITHIN).await.state,
        conveyor::model::JobState::Succeeded
    );
    d.shutdown().await;
}

/// `conveyor queues` for a prefix nothing has declared queues under says so
/// in one line, without the broker's channel errors (a passive declare of a
/// missing queue closes its channel); once a dispatcher has started, its
/// queues are listed, and a queue asked for that does not exist is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_of_a_prefix_not_yet_deployed_are_explained_not_logged_as_errors() {
    let config = common::test_config(&common::unique_prefix("cli-queues"));
    let queues = |more: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .arg("queues")
            .args(more)
            .env("CONVEYOR_PREFIX", &config.prefix)
            .env("CONVEYOR_AMQP_URL", &config.amqp_url)
            .env("CONVEYOR_REDIS_URL", &config.redis_url)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
    };
    let out = tokio::time::timeout(WITHIN, queues(&[]))
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "the header only: {stdout}");
    let submit = format!("{}.submit", config.prefix);
    assert!(
        stderr.starts_with("note: RabbitMQ has none of these queues")
            && stderr.contains(&submit)
            && stderr.lines().count() == 1,
        "{stderr}"
    );

    let mut d = Deployment::with_config(config.clone()).await;
    d.start_dispatcher().await;
    let out = tokio::time::timeout(WITHIN, queues(&[]))
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().any(|l| l.starts_with(&submit)), "{stdout}");

    // A queue asked for that does not exist (a typo) is named, not
    // silently missing from the table.
    let out = tokio::time::timeout(WITHIN, queues(&["--queue", "gpux"]))
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "note: RabbitMQ has no queue {}.tasks.gpux;",
            config.prefix
        )),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&submit))
    );
    d.shutdown().await;
}

/// A worker given nothing to consume (no task queue, and submissions left
/// to the dispatchers) refuses to start, saying why, instead of stopping
/// at once with exit 0 as if told to; an unusable queue name is named.
/// Until the thirty-second session the first exited 1, not 2 as every
/// other configuration error does, and `CONVEYOR_QUEUES=","` was such a
/// worker's empty list, without a word.
#[test]
fn a_worker_with_nothing_to_consume_or_an_unusable_queue_name_does_not_start() {
    let worker = |config: Option<&Path>, queues: Option<&str>, accept: &str| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"));
        command
            .arg("worker")
            .env("CONVEYOR_ACCEPT_SUBMISSIONS", accept)
            .env("CONVEYOR_PREFIX", "test-cli-nothing");
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        if let Some(queues) = queues {
            command.env("CONVEYOR_QUEUES", queues);
        }
        command.output().expect("run conveyor worker")
    };
    let dir = Scratch::dir("cli");
    let no_queues = dir.join("no-queues.toml");
    std::fs::write(&no_queues, "[worker]\nqueues = []\n").unwrap();
    let idle = worker(Some(&no_queues), None, "false");
    let said = String::from_utf8_lossy(&idle.stderr);
    assert_eq!(idle.status.code(), Some(2), "a configuration error: {said}");
    assert!(said.contains("would have nothing to consume"), "{said}");
    let emptied = worker(None, Some(","), "true");
    let said = String::from_utf8_lossy(&emptied.stderr);
    assert_eq!(emptied.status.code(), Some(2), "{said}");
    assert!(
        said.contains("CONVEYOR_QUEUES=\",\" is invalid: names no queue"),
        "{said}"
    );
    let long = worker(None, Some(&"q".repeat(200)), "true");
    let said = String::from_utf8_lossy(&long.stderr);
    assert_eq!(long.status.code(), Some(2), "a configuration error: {said}");
    assert!(said.contains("worker.queues = \"qqq"), "{said}");
    assert!(said.contains("limits.max_name_len (128)"), "{said}");
}

/// A setting made invalid by a flag is a configuration error, named and
/// with exit 2, as the same setting from the environment is.
#[test]
fn an_invalid_setting_exits_2_from_a_flag_as_from_the_environment() {
    for (args, env) in [
        (&["worker", "--concurrency", "0"][..], None),
        (&["worker"][..], Some(("CONVEYOR_CONCURRENCY", "0"))),
    ] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"));
        command
            .args(args)
            .env("CONVEYOR_PREFIX", "test-cli-invalid");
        if let Some((var, value)) = env {
            command.env(var, value);
        }
        let ran = command.output().expect("run conveyor worker");
        let said = String::from_utf8_lossy(&ran.stderr);
        assert_eq!(ran.status.code(), Some(2), "{args:?} {env:?}: {said}");
        assert!(
            said.contains("worker.concurrency = 0: must be at least 1"),
            "{said}"
        );
    }
}

/// Until the thirty-second session `run`'s `--amqp-url`/`--redis-url`
/// were put in the configuration after it was checked, and never checked:
/// an AMQP URL without its `//` failed the connect with the parser's text,
/// the whole URL and its password, exit 1; `--concurrency 0` ran nothing
/// until the time-out; and `worker --queues default,default` started two
/// consumers on one queue. Each is a configuration error now, named, with
/// exit 2, before anything is connected to.
#[test]
fn flags_are_checked_as_the_configuration_is_and_quote_no_password() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diamond.json");
    for (args, says) in [
        (
            &[
                "run",
                example,
                "--amqp-url",
                "amqp:guest:s3cret@127.0.0.1:1/",
                "--redis-url",
                "redis://127.0.0.1:1/",
            ][..],
            "amqp_url (node 1) = amqp:***@127.0.0.1:1/: is not a URL with a host",
        ),
        (
            &[
                "run",
                example,
                "--amqp-url",
                "amqp://127.0.0.1:1/",
                "--redis-url",
                "redis+sentinel://app:s3cret/x@127.0.0.1:1/svc",
            ][..],
            "redis_url: the nodes' user or password holds `/`",
        ),
        (
            &["run", example, "--concurrency", "0", "--timeout-s", "5"][..],
            "worker.concurrency = 0: must be at least 1",
        ),
        (
            &["worker", "--queues", "default,gpu,default"][..],
            "worker.queues = \"default\": is named more than once",
        ),
        // Thirty-fourth session: each of these was accepted, to be ignored,
        // to panic, or to be retried as an outage for ever.
        (
            &["dev", "--concurrency", "0"][..],
            "worker.concurrency = 0: must be at least 1",
        ),
        (&["dev", "--workers", "0"][..], "--workers"),
        (
            &["run", example, "--concurrency", "70000"][..],
            "worker.concurrency = 70000: must be at least 1 and at most 65535",
        ),
        (
            &[
                "run",
                example,
                "--amqp-url",
                "amqp://127.0.0.1:1/",
                "--redis-url",
                "redis://127.0.0.1:1/",
                "--concurrency",
                "4",
            ][..],
            "--concurrency",
        ),
        (&["submit", example, "--json"][..], "--wait"),
        (&["submit", example, "--timeout-s", "5"][..], "--wait"),
        (&["bench", "--prefix", "a{b}"][..], "prefix = \"a{b}\""),
        (
            &[
                "run",
                example,
                "--amqp-url",
                "amqp://127.0.0.1:1/",
                "--redis-url",
                "redis//app:s3cret@127.0.0.1:1",
            ][..],
            "redis_url (node 1) = redis//app:***@127.0.0.1:1: is not a Redis URL",
        ),
        // Thirty-fifth session: exit 1 (or a malformed frame, or a panic
        // at the stop, or the password shown) before.
        (
            &["run", example, "--amqp-url", "amqp://127.0.0.1:1/"][..],
            "--redis-url",
        ),
        (
            &["queues", "--queue", &"q".repeat(200)][..],
            "--queue \"qqq",
        ),
        (
            &[
                "run",
                example,
                "--amqp-url",
                "amqp://app:s3cret.mq.internal:5672/%2f",
                "--redis-url",
                "redis://127.0.0.1:1/",
            ][..],
            "amqp_url (node 1) = amqp://app:***:",
        ),
    ] {
        let ran = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(args)
            .env("CONVEYOR_PREFIX", "test-cli-flags")
            .output()
            .expect("run conveyor");
        let said = String::from_utf8_lossy(&ran.stderr);
        assert_eq!(ran.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains(says), "{args:?}: {said}");
        assert!(!said.contains("s3cret"), "{args:?}: {said}");
    }
}
