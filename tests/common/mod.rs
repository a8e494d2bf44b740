//! The test harness: a real deployment (RabbitMQ + Redis on localhost)
//! under a unique prefix, with in-process dispatchers and workers built on
//! the production code, and a plain lapin client that talks to Conveyor
//! exactly as a client in any language would.
//!
//! If RabbitMQ or Redis is not running, tests fail (never skip) with a
//! message saying how to start them.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cutter;
pub mod journal;
pub mod rabbit;
pub mod scratch;

use std::sync::Arc;
use std::time::Duration;

use conveyor::broker::Broker;
use conveyor::broker::amqp::AmqpBroker;
use conveyor::config::{Config, QueueType};
use conveyor::dispatcher::{Dispatcher, DispatcherOptions};
use conveyor::handler::Registry;
use conveyor::intake::JobIntake;
use conveyor::model::JobState;
use conveyor::names::Names;
use conveyor::shutdown::ShutdownTrigger;
use conveyor::store::redis::RedisStore;
use conveyor::store::{JobStatus, Store};
use conveyor::worker::{Worker, WorkerOptions};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::task::JoinHandle;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";

pub const HOW_TO_START: &str = "integration tests need RabbitMQ on 127.0.0.1:5672 and Redis on \
127.0.0.1:6379: start them with `rabbitmq-server -detached` and `redis-server --daemonize yes \
--bind 127.0.0.1 --port 6379 --save \"\" --appendonly no` (or run .ci/run)";

/// A connection of its own to the Redis of `config`, for a test to read or
/// write keys behind Conveyor's back.
pub async fn redis_connection(config: &Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis_url.as_str())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
}

/// The port a `redis://` or `amqp://` URL names.
pub fn port_of(url: &str) -> u16 {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    (host_port.split(['/', '?']).next())
        .and_then(|hp| hp.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{url} names no port"))
}

/// Job `id`: one `noop` task `t` (requestor `r`).
pub fn noop_job(id: impl serde::Serialize) -> serde_json::Value {
    serde_json::json!({"id": id, "requestor": "r", "tasks": [{"name": "t", "handler": "noop"}]})
}

/// A prefix no other test run uses.
pub fn unique_prefix(test: &str) -> String {
    let short: String = format!("{:08x}", rand::random::<u32>());
    format!("test-{test}-{short}")
}

/// Config for a test deployment: fast sweeps, short leases, quick backoff.
pub fn test_config(prefix: &str) -> Config {
    let mut c = Config {
        prefix: prefix.to_owned(),
        amqp_url: std::env::var("CONVEYOR_AMQP_URL").unwrap_or_else(|_| AMQP_URL.into()),
        redis_url: std::env::var("CONVEYOR_REDIS_URL").unwrap_or_else(|_| REDIS_URL.into()),
        queue_type: QueueType::Quorum,
        ..Config::default()
    };
    c.dispatcher.sweep_interval_ms = 100;
    c.worker.lease_ms = 3_000;
    c.worker.grace_s = 5;
    c.worker.heartbeat_ms = 500;
    c.retry.base_ms = 50;
    c.retry.cap_ms = 500;
    c
}

pub async fn connect_store(config: &Config, by: &str) -> Arc<RedisStore> {
    match conveyor::runtime::redis_store(config, by, 4).await {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("cannot reach Redis: {e}. {HOW_TO_START}"),
    }
}

pub async fn connect_broker(config: &Config) -> Arc<AmqpBroker> {
    match conveyor::runtime::amqp_broker(config).await {
        Ok(b) => Arc::new(b),
        Err(e) => panic!("cannot reach RabbitMQ: {e}. {HOW_TO_START}"),
    }
}

/// An AMQP broker under a fresh prefix of `test`'s with the task queue
/// `default` declared: its config, the broker, and the names of `default`
/// and of a task queue never declared.
pub async fn broker_with_one_task_queue(test: &str) -> (Config, Arc<AmqpBroker>, String, String) {
    let config = test_config(&unique_prefix(test));
    let broker = connect_broker(&config).await;
    broker
        .declare(&["default".to_owned()])
        .await
        .expect("declare");
    let names = conveyor::names::Names::new(&config.prefix);
    let (queued, missing) = (names.task_queue("default"), names.task_queue("other"));
    (config, broker, queued, missing)
}

/// The next delivery of `subscription` within `within`, or `None` if none
/// came (or the subscription ended or failed).
pub async fn next_delivery(
    subscription: &mut Box<dyn conveyor::broker::Subscription>,
    within: Duration,
) -> Option<conveyor::broker::Delivery> {
    match tokio::time::timeout(within, subscription.next()).await {
        Ok(Some(Ok(delivery))) => Some(delivery),
        _ => None,
    }
}

struct Running {
    /// "worker" or "dispatcher", for a part that does not stop.
    what: &'static str,
    trigger: ShutdownTrigger,
    handle: JoinHandle<()>,
}

/// How long a dispatcher, worker or process told to stop may take: the
/// test config's grace period (5 s), the hard stop after it (at most 30 s)
/// and room for a slow machine. A part that takes longer hangs, and the
/// test says so instead of waiting for ever.
pub const STOP_WITHIN: Duration = Duration::from_secs(90);

/// Wait for `child` (named by `what`), which was told to stop, to exit;
/// panic if it has not within [`STOP_WITHIN`], with the tail of its log if
/// it writes one.
pub async fn exited(
    child: &mut tokio::process::Child,
    what: &str,
    log: Option<&std::path::Path>,
) -> std::process::ExitStatus {
    match tokio::time::timeout(STOP_WITHIN, child.wait()).await {
        Ok(status) => status.expect("wait for a child process"),
        Err(_) => {
            let tail = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .map(|text| {
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                })
                .unwrap_or_default();
            panic!(
                "{what} did not exit within {STOP_WITHIN:?} of being told to stop; its log ends:\n{tail}"
            )
        }
    }
}

/// The built example `name` (`cargo test` builds the examples next to the
/// test binaries).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("examples").join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("target/<profile>/examples/{name}: run the tests with `cargo test`")
        })
}

/// A deployment under one prefix: its dispatchers and workers run as tasks
/// in this process, on the production code paths.
pub struct Deployment {
    pub config: Config,
    pub names: Names,
    pub store: Arc<RedisStore>,
    pub registry: Registry,
    /// Journal for workers started from now on.
    pub journal: Option<conveyor::worker::Journal>,
    dispatchers: Vec<Running>,
    workers: Vec<Running>,
}

impl Deployment {
    pub async fn new(test: &str) -> Deployment {
        Self::with_config(test_config(&unique_prefix(test))).await
    }

    /// In-process workers started from now on record their runs in the
    /// journal at `path` (as `in-process`).
    pub fn journal_to(&mut self, path: &std::path::Path) {
        self.journal = Some(
            conveyor::worker::Journal::open(path, "in-process").expect("open the test's journal"),
        );
    }

    pub async fn with_config(config: Config) -> Deployment {
        let store = connect_store(&config, "test").await;
        let broker = connect_broker(&config).await;
        broker
            .declare(&config.worker.queues)
            .await
            .expect("declare topology");
        Deployment {
            names: Names::new(&config.prefix),
            config,
            store,
            registry: conveyor_builtin_handlers::registry(),
            journal: None,
            dispatchers: Vec::new(),
            workers: Vec::new(),
        }
    }

    pub async fn start_dispatcher(&mut self) {
        let config = self.config.clone();
        let store = connect_store(&config, "dispatcher").await as Arc<dyn Store>;
        let broker = connect_broker(&config).await as Arc<dyn Broker>;
        let intake = JobIntake::new(&config, self.registry.clone()).expect("intake");
        let dispatcher = Dispatcher::new(
            store,
            broker,
            intake,
            self.names.clone(),
            DispatcherOptions {
                id: format!("dispatcher-{}", self.dispatchers.len()),
                prefetch: config.dispatcher.prefetch,
                sweep_interval: Duration::from_millis(config.dispatcher.sweep_interval_ms),
                task_queues: config.worker.queues.clone(),
            },
        );
        let trigger = ShutdownTrigger::new();
        let shutdown = trigger.subscribe();
        let handle = tokio::spawn(async move {
            if let Err(e) = dispatcher.run(shutdown).await {
                panic!("dispatcher failed: {e}");
            }
        });
        self.dispatchers.push(Running {
            what: "dispatcher",
            trigger,
            handle,
        });
    }

    /// A worker as the config makes it: taking submissions unless
    /// `worker.accept_submissions` is off (it is on by default).
    pub async fn start_worker(&mut self, concurrency: usize) -> String {
        let submissions = self.config.worker.accept_submissions;
        self.start_worker_with(concurrency, submissions).await
    }

    /// A worker that leaves every submission to the dispatchers.
    pub async fn start_worker_without_submissions(&mut self, concurrency: usize) -> String {
        self.start_worker_with(concurrency, false).await
    }

    /// A worker that also takes submissions (see
    /// `Worker::accepting_submissions`).
    pub async fn start_worker_taking_submissions(&mut self, concurrency: usize) -> String {
        self.start_worker_with(concurrency, true).await
    }

    async fn start_worker_with(&mut self, concurrency: usize, submissions: bool) -> String {
        let config = self.config.clone();
        let id = format!(
            "worker-{}-{}",
            self.workers.len(),
            conveyor::worker::new_worker_id()
        );
        let store = connect_store(&config, &id).await as Arc<dyn Store>;
        let broker = connect_broker(&config).await as Arc<dyn Broker>;
        let worker = Worker::new(
            store,
            broker,
            self.registry.clone(),
            self.names.clone(),
            WorkerOptions {
                concurrency,
                journal: self.journal.clone(),
                ..WorkerOptions::from_config(&config, id.clone())
            },
        );
        let worker = if submissions {
            worker.accepting_submissions(
                JobIntake::new(&config, self.registry.clone()).expect("intake"),
            )
        } else {
            worker
        };
        let trigger = ShutdownTrigger::new();
        let shutdown = trigger.subscribe();
        let handle = tokio::spawn(async move {
            if let Err(e) = worker.run(shutdown).await {
                panic!("worker failed: {e}");
            }
        });
        self.workers.push(Running {
            what: "worker",
            trigger,
            handle,
        });
        id
    }

    /// Stop every dispatcher and worker gracefully, then delete the
    /// deployment's queues and keys.
    pub async fn shutdown(mut self) {
        for r in self.workers.drain(..).chain(self.dispatchers.drain(..)) {
            r.trigger.trigger();
            match tokio::time::timeout(STOP_WITHIN, r.handle).await {
                Ok(stopped) => stopped.expect("clean stop"),
                Err(_) => panic!(
                    "an in-process {} did not stop within {STOP_WITHIN:?} of its shutdown",
                    r.what
                ),
            }
        }
        cleanup(&self.config).await;
    }

    pub async fn status(&self, id: &str) -> Option<JobStatus> {
        self.store.job(id).await.expect("status")
    }

    /// Submit job `id`, one `sleep` task `t` of `ms`, and wait until it runs.
    pub async fn start_long_task(&self, client: &Client, id: &str, ms: u64) {
        client
            .submit(&serde_json::json!({"id": id, "requestor": "r",
                "tasks": [{"name": "t", "handler": "sleep", "params": {"ms": ms}}]}))
            .await;
        eventually("the long task runs", Duration::from_secs(60), || async {
            let status = self.status(id).await?;
            (status.tasks["t"].state == conveyor::model::TaskState::Running).then_some(())
        })
        .await;
    }

    /// Wait until task `t` of job `id` is ready and its message is in no
    /// queue: a worker holds it, received and not started.
    pub async fn wait_until_held(&self, id: &str) {
        let broker = connect_broker(&self.config).await;
        let queue = self.names.task_queue("default");
        eventually(
            "a worker holds the task",
            Duration::from_secs(30),
            || async {
                let status = self.status(id).await?;
                let stats = broker
                    .queue_stats(std::slice::from_ref(&queue))
                    .await
                    .ok()?;
                (status.tasks["t"].state == conveyor::model::TaskState::Ready
                    && stats.first()?.ready == 0)
                    .then_some(())
            },
        )
        .await;
    }

    /// Wait until the job is terminal; panic with its status if it is not
    /// within `within`.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> JobStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let status = self.status(id).await;
            if let Some(s) = &status
                && s.state.is_terminal()
            {
                return s.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("job {id} not terminal within {within:?}: {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The deployment still serves: a one-`noop`-task job `id` that
    /// `client` submits now succeeds within `within`.
    pub async fn assert_serves(&self, client: &Client, id: &str, within: Duration) {
        client.submit(&noop_job(id)).await;
        let status = self.wait_terminal(id, within).await;
        assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    }
}

/// Delete a deployment's queues and Redis keys.
pub async fn cleanup(config: &Config) {
    let names = Names::new(&config.prefix);
    let mut queues = vec![
        names.submit_queue(),
        names.referred_queue(),
        names.dead_queue(),
    ];
    queues.extend(config.worker.queues.iter().map(|q| names.task_queue(q)));
    queues.push(names.task_queue("other"));
    // And every task queue a job of the test named.
    if let Ok(client) = redis::Client::open(config.redis_url.as_str())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let known: Vec<String> = redis::cmd("SMEMBERS")
            .arg(names.queues_key())
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        queues.extend(known.iter().map(|q| names.task_queue(q)));
    }
    queues.sort();
    queues.dedup();
    conveyor::purge::delete_queues(config, &queues).await;
    conveyor::purge::delete_keys(config).await;
}

/// A client that knows nothing of Conveyor's code: plain AMQP and JSON.
pub struct Client {
    conn: Connection,
    channel: lapin::Channel,
    reply_queue: String,
    replies: lapin::Consumer,
    submit_queue: String,
    dead_queue: String,
}

/// `call` (named by `what`), or a panic saying RabbitMQ did not answer
/// within 30 s: the test client's calls have no bound of their own.
async fn answered<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| panic!("RabbitMQ did not answer the test client's {what} within 30 s"))
}

impl Client {
    pub async fn connect(prefix: &str) -> Client {
        let conn = answered(
            "connection",
            Connection::connect(AMQP_URL, ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}. {HOW_TO_START}"));
        answered("set-up", Self::on(conn, prefix)).await
    }

    /// A client of `config`'s broker, trusting its `tls_ca_file` if set.
    pub async fn connect_to(config: &Config) -> Client {
        let conn = conveyor::broker::amqp::tool_connection(config)
            .await
            .unwrap_or_else(|e| panic!("{e}. {HOW_TO_START}"));
        answered("set-up", Self::on(conn, &config.prefix)).await
    }

    async fn on(conn: Connection, prefix: &str) -> Client {
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("reply queue");
        let reply_queue = q.name().to_string();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume replies");
        Client {
            conn,
            channel,
            reply_queue,
            replies,
            submit_queue: format!("{prefix}.submit"),
            dead_queue: format!("{prefix}.dead"),
        }
    }

    /// Publish raw bytes to the submit queue, persistent, with reply_to.
    pub async fn publish_raw(&self, body: &[u8], correlation_id: &str) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id(correlation_id.into());
        self.publish_with(body, props).await;
    }

    /// Publish raw bytes to the submit queue, persistent, asking no reply.
    pub async fn publish_no_reply(&self, body: &[u8]) {
        let props = BasicProperties::default().with_delivery_mode(2);
        self.publish_with(body, props).await;
    }

    /// Publish raw bytes to the submit queue with the properties given.
    pub async fn publish_with(&self, body: &[u8], props: BasicProperties) {
        let publish = async {
            self.channel
                .basic_publish(
                    "".into(),
                    self.submit_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm")
        };
        answered("publish", publish).await;
    }

    pub async fn submit(&self, job: &Value) {
        let corr = job
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("no-id")
            .to_owned();
        self.publish_raw(job.to_string().as_bytes(), &corr).await;
    }

    /// The next reply: (correlation id, body).
    pub async fn reply(&mut self) -> (String, Value) {
        let d = tokio::time::timeout(Duration::from_secs(20), self.replies.next())
            .await
            .expect("a reply within 20 s")
            .expect("reply stream open")
            .expect("reply delivery");
        let corr = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        (
            corr,
            serde_json::from_slice(&d.data).expect("reply is JSON"),
        )
    }

    /// Take one message from the dead-letter queue, as the broker gives it.
    pub async fn take_dead_delivery(&self) -> Option<lapin::message::Delivery> {
        self.channel
            .basic_get(
                self.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
            .map(|m| m.delivery)
    }

    /// Take one message from the dead-letter queue: (headers, body).
    pub async fn take_dead(&self) -> Option<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
        let msg = self
            .channel
            .basic_get(
                self.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")?;
        let mut headers = std::collections::BTreeMap::new();
        if let Some(h) = msg.delivery.properties.headers() {
            for (k, v) in h.inner() {
                let text = match v {
                    lapin::types::AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                };
                headers.insert(k.to_string(), text);
            }
        }
        Some((headers, msg.delivery.data.clone()))
    }

    pub async fn close(self) {
        // Closing is best effort: a broker that does not answer leaves the
        // connection to be dropped.
        let _ =
            tokio::time::timeout(Duration::from_secs(10), self.conn.close(200, "bye".into())).await;
    }
}

/// Poll `f` until it returns Some, or panic after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // A check that hangs (a call nothing answers) fails the wait too.
        let checked = tokio::time::timeout_at(deadline + Duration::from_secs(10), f()).await;
        let Ok(checked) = checked else {
            panic!("timed out after {within:?} waiting for {what} (the last check did not return)");
        };
        if let Some(v) = checked {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on 127.0.0.1:`port` with plain HTTP/1.1: the status code and
/// the body, or None if nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .ok()?
    .ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The `/readyz` answer of the process serving on `port`: whether it said
/// 200, and its JSON body.
pub async fn readiness(port: u16) -> Option<(bool, Value)> {
    let (status, body) = http_get(port, "/readyz").await?;
    Some((status == 200, serde_json::from_str(&body).ok()?))
}
