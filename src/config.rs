//! Configuration: one struct with serde defaults, read from a TOML file and
//! then overridden by `CONVEYOR_*` environment variables. Every field's doc
//! comment is the README's configuration table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

/// Everything a Conveyor process can be told. Its `Debug` form hides the
/// URLs' passwords (see [`redact_url`]); `Serialize` writes them, for the
/// config file `conveyor bench` hands its processes (a private file).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// AMQP URL (`amqp://` or `amqps://`), or several separated by commas
    /// (the nodes of one cluster, tried in turn). Env `CONVEYOR_AMQP_URL`.
    pub amqp_url: String,
    /// Redis URL (`redis://` or `rediss://`), or several separated by
    /// commas (a primary and its replicas: the one that says it is the
    /// primary is used, and a failover followed), or the sentinels that
    /// know the primary (`redis+sentinel://s1,s2/service`, see
    /// `store::sentinel`). Env `CONVEYOR_REDIS_URL`.
    pub redis_url: String,
    /// Replicas that must have a job's record before its submission is
    /// acked (Redis `WAIT`, one round for every creation in flight): with
    /// 1 or more, a failover to such a replica cannot lose an accepted
    /// job. 0 (the default) acks once the primary has it. Env
    /// `CONVEYOR_REDIS_WAIT_REPLICAS`.
    pub redis_wait_replicas: u32,
    /// How long a creation waits for `redis_wait_replicas`, in ms (1 to
    /// 60 000); short of them, the submission goes back to its queue and
    /// is taken again. Env `CONVEYOR_REDIS_WAIT_TIMEOUT_MS`.
    pub redis_wait_timeout_ms: u64,
    /// PEM file of a private CA for `amqps://` and `rediss://`, read when
    /// connecting: Redis then trusts only it, RabbitMQ it and the system's
    /// roots. Without it the system roots are used (webpki's for Redis).
    /// Env `CONVEYOR_TLS_CA_FILE` (empty turns it off).
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every queue and key. Env `CONVEYOR_PREFIX`.
    pub prefix: String,
    /// Largest submit message accepted, in bytes; at least 1024. Env
    /// `CONVEYOR_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: usize,
    /// How long finished jobs are kept, in seconds; 1 to 315 360 000 (10
    /// years). Env `CONVEYOR_RETENTION_S`.
    pub retention_s: u64,
    /// `pretty` or `json` logs. Env `CONVEYOR_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// AMQP queue type for submit and task queues: `quorum` or `classic`.
    /// Env `CONVEYOR_QUEUE_TYPE`.
    pub queue_type: QueueType,
    /// Broker-side delivery limit of the task, submit and referred queues
    /// (quorum queues only): a
    /// message delivered this often is dead-lettered by RabbitMQ itself; with
    /// quorum queues it must be greater than `worker.max_deliveries`. Env
    /// `CONVEYOR_DELIVERY_LIMIT`.
    pub delivery_limit: u32,
    /// Async runtime threads of a `conveyor` process: 1 (the default) runs
    /// everything on one thread, which saves a cross-thread wake-up per
    /// message (about 15-20% more throughput here) but needs handlers that
    /// never block; 0 = one thread per core; n = n threads, at most 1024.
    /// Env `CONVEYOR_RUNTIME_THREADS`.
    pub runtime_threads: usize,
    /// Address of the process's HTTP listener (`/healthz`, `/readyz`), e.g.
    /// `0.0.0.0:8080`; none by default. Env `CONVEYOR_HTTP_ADDR` (empty
    /// turns it off).
    pub http_addr: Option<SocketAddr>,
    /// Dispatcher settings.
    pub dispatcher: DispatcherConfig,
    /// Worker settings.
    pub worker: WorkerConfig,
    /// Default retry policy of tasks that set none and whose handler sets none.
    pub retry: RetryConfig,
    /// Limits on submitted jobs.
    pub limits: Limits,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// AMQP queue type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queues; support `x-delivery-limit`.
    Quorum,
    /// Classic durable queues.
    Classic,
}

/// Dispatcher settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherConfig {
    /// Unacked submissions in flight per dispatcher; at least 1. Env
    /// `CONVEYOR_DISPATCHER_PREFETCH`.
    pub prefetch: u16,
    /// How often retries and lapsed leases are swept, in milliseconds; 10
    /// to 60 000. Env `CONVEYOR_SWEEP_INTERVAL_MS`.
    pub sweep_interval_ms: u64,
}

/// Worker settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Queues consumed (without prefix), each named once. Env
    /// `CONVEYOR_QUEUES` (comma-separated; at least one name).
    pub queues: Vec<String>,
    /// Handlers run at once; at least 1. Env `CONVEYOR_CONCURRENCY`.
    pub concurrency: usize,
    /// Lease of a claim in milliseconds; renewed every third of it while the
    /// handler runs; 300 to 86 400 000 (1 day). Env `CONVEYOR_LEASE_MS`.
    pub lease_ms: u64,
    /// How long SIGTERM waits for running handlers, in seconds. Env `CONVEYOR_GRACE_S`.
    pub grace_s: u64,
    /// Heartbeat of the worker registry, in milliseconds; at least 100.
    pub heartbeat_ms: u64,
    /// Deliveries of one task message without an outcome before it is
    /// treated as poison (dead-lettered, task failed); at least 1, and below
    /// `delivery_limit` (the broker's own backstop) with quorum queues. Env
    /// `CONVEYOR_MAX_DELIVERIES`.
    pub max_deliveries: u32,
    /// Also consume the submit queue (ahead of dispatchers) and run one
    /// root task of each new job here, skipping its task queue: one broker
    /// hop fewer per job. On by default: a submission the worker would
    /// refuse (by its own registry) is referred to the dispatchers, so
    /// refusals are theirs. Env `CONVEYOR_ACCEPT_SUBMISSIONS`
    /// (`true`/`false`).
    pub accept_submissions: bool,
    /// Longest a task delivery waits in this worker for a free slot, in
    /// milliseconds. Past it the worker gives back every task message it
    /// holds (as new messages, so no delivery counts against them: other
    /// workers can take them at once) and consumes again when a slot
    /// frees. Keeps long-running tasks from stranding prefetched ones here
    /// and from running into RabbitMQ's `consumer_timeout`. 100 to
    /// 1,500,000 (25 minutes, under the broker's 30-minute default). Env
    /// `CONVEYOR_HOLD_MS`.
    pub hold_ms: u64,
}

/// Default retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Most attempts including the first, 1 to 100. Env `CONVEYOR_MAX_ATTEMPTS`.
    pub max_attempts: u32,
    /// Backoff base in milliseconds, at most `cap_ms`. Env
    /// `CONVEYOR_BACKOFF_BASE_MS`.
    pub base_ms: u64,
    /// Backoff cap in milliseconds, at most 86 400 000. Env
    /// `CONVEYOR_BACKOFF_CAP_MS`.
    pub cap_ms: u64,
    /// Default run time-out of one attempt in seconds, > 0 and ≤ 604 800.
    /// Env `CONVEYOR_TIMEOUT_S`.
    pub timeout_s: f64,
}

/// Limits on submitted jobs, and on what their handlers return; each
/// error names the field and the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most tasks in one job; at least 1.
    pub max_tasks: usize,
    /// Most distinct queues the tasks of one job name; at least 1. Each
    /// queue a job names is declared on the broker (a quorum queue is a
    /// consensus group of its own), so a job must not make thousands.
    pub max_queues_per_job: usize,
    /// Longest job id, task name, queue, requestor; at least 36 (a
    /// generated job id). A handler name is checked against the registry.
    pub max_name_len: usize,
    /// Most labels on a job.
    pub max_labels: usize,
    /// Largest params of one task, in bytes of JSON; at least 2 (`{}`).
    pub max_params_bytes: usize,
    /// Largest result of one task, in bytes of JSON, enforced by the
    /// worker: a larger one fails the task (permanently) with an error
    /// naming the limit. At least 4 (`null`).
    pub max_result_bytes: usize,
    /// Most bytes of JSON of the dependency results one task is handed (a
    /// join's inputs), enforced at its claim: over it, the task fails
    /// (permanently) with an error naming the limit, and the results are
    /// never read out of the store. At least `max_result_bytes`, so that a
    /// task with one dependency never meets it.
    pub max_inputs_bytes: usize,
}

impl std::fmt::Debug for Config {
    /// Written out, not derived: `amqp_url` and `redis_url` hold passwords,
    /// and a config printed with `{:?}` (a log line, a failed assertion)
    /// must not show them. The fields are taken apart so that a new one
    /// cannot be left out unnoticed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Config {
            amqp_url,
            redis_url,
            redis_wait_replicas,
            redis_wait_timeout_ms,
            tls_ca_file,
            prefix,
            max_message_bytes,
            retention_s,
            log_format,
            queue_type,
            delivery_limit,
            runtime_threads,
            http_addr,
            dispatcher,
            worker,
            retry,
            limits,
        } = self;
        f.debug_struct("Config")
            .field("amqp_url", &redact_url(amqp_url))
            .field("redis_url", &redact_url(redis_url))
            .field("redis_wait_replicas", redis_wait_replicas)
            .field("redis_wait_timeout_ms", redis_wait_timeout_ms)
            .field("tls_ca_file", tls_ca_file)
            .field("prefix", prefix)
            .field("max_message_bytes", max_message_bytes)
            .field("retention_s", retention_s)
            .field("log_format", log_format)
            .field("queue_type", queue_type)
            .field("delivery_limit", delivery_limit)
            .field("runtime_threads", runtime_threads)
            .field("http_addr", http_addr)
            .field("dispatcher", dispatcher)
            .field("worker", worker)
            .field("retry", retry)
            .field("limits", limits)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 1000,
            tls_ca_file: None,
            prefix: "conveyor".into(),
            max_message_bytes: 1024 * 1024,
            retention_s: 7 * 24 * 3600,
            log_format: LogFormat::Pretty,
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
            runtime_threads: 1,
            http_addr: None,
            dispatcher: DispatcherConfig::default(),
            worker: WorkerConfig::default(),
            retry: RetryConfig::default(),
            limits: Limits::default(),
        }
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            prefetch: 256,
            sweep_interval_ms: 500,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec!["default".into()],
            concurrency: 16,
            lease_ms: 10_000,
            grace_s: 30,
            heartbeat_ms: 2_000,
            max_deliveries: 5,
            accept_submissions: true,
            hold_ms: 10_000,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            base_ms: 1_000,
            cap_ms: 60_000,
            timeout_s: 300.0,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tasks: 20_000,
            max_queues_per_job: 16,
            max_name_len: 128,
            max_labels: 64,
            max_params_bytes: 256 * 1024,
            max_result_bytes: 1024 * 1024,
            max_inputs_bytes: crate::store::DEFAULT_MAX_INPUTS_BYTES as usize,
        }
    }
}

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct. Only the parser's
    /// message and the place: its own text would quote the line, which
    /// may hold a URL's password.
    #[error("config file {path} is invalid at line {line}, column {column}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Where, from 1.
        line: usize,
        /// Where in the line, from 1, in characters.
        column: usize,
        /// Why, as the parser says it (without the line's text).
        message: String,
    },
    /// An environment variable has a value of the wrong kind.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// `tls_ca_file` cannot be read or holds no usable certificate.
    #[error("tls_ca_file {path}: {reason}")]
    TlsCa {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Values that parse but cannot work ([`Config::validate`]).
    #[error("invalid configuration: {}", .problems.join("; "))]
    Invalid {
        /// One per field, each like `worker.lease_ms = 2: must be at least
        /// 300 (ms; ...)`: the field, its value and its limit.
        problems: Vec<String>,
    },
}

/// Smallest `max_message_bytes`: below 1 KiB hardly a job fits.
pub const MIN_MESSAGE_BYTES: usize = 1024;
/// Smallest `retention_s`: 0 would delete a job the moment it finished,
/// before anyone could read its result.
pub const MIN_RETENTION_S: u64 = 1;
/// Largest `retention_s` (10 years): a finished job's keys get
/// `PEXPIRE retention`, which must stay a sane number of milliseconds.
pub const MAX_RETENTION_S: u64 = 10 * 365 * 24 * 3600;
/// Largest `redis_wait_timeout_ms` (a minute): a submission waits that
/// long in hand for its replicas; 0 would be `WAIT`'s "for ever".
pub const MAX_REDIS_WAIT_TIMEOUT_MS: u64 = 60_000;
/// Smallest `dispatcher.sweep_interval_ms` (`tokio::time::interval` panics
/// on zero; below 10 ms every dispatcher polls Redis flat out).
pub const MIN_SWEEP_INTERVAL_MS: u64 = 10;
/// Largest `dispatcher.sweep_interval_ms` (a minute): only a sweep takes
/// over the claims of a dead worker, so its tasks wait a lease and up to
/// a sweep interval; a larger setting (a typo of a few zeros) would leave
/// them waiting for good, as far as anyone can tell.
pub const MAX_SWEEP_INTERVAL_MS: u64 = 60_000;
/// Largest `runtime_threads`: tokio starts every worker thread at once and
/// panics when the system refuses one, so an absurd number is a crash at
/// start, not a configuration error, unless it is refused here. No
/// process of Conveyor's uses more than a few dozen usefully.
pub const MAX_RUNTIME_THREADS: usize = 1024;
/// Smallest `worker.lease_ms`: leases are renewed every third of it, and a
/// renewal round trip must fit in that third (100 ms here) with room to
/// spare; the fault tests use 1500 ms, the simulation 600 ms.
pub const MIN_LEASE_MS: u64 = 300;
/// Largest `worker.lease_ms` (1 day): the tasks of a crashed worker wait a
/// whole lease, and a running task keeps its claim by renewal however long
/// it runs, so a longer lease only slows recovery.
pub const MAX_LEASE_MS: u64 = 24 * 3600 * 1000;
/// Smallest `worker.heartbeat_ms` (`tokio::time::interval` panics on zero;
/// the registry is for operators, 10 writes a second per worker is plenty).
pub const MIN_HEARTBEAT_MS: u64 = 100;
/// Largest `worker.heartbeat_ms` (1 hour): the registry entry lives three
/// heartbeats, and a worker silent for longer than an hour is taken for
/// gone by the operators reading it.
pub const MAX_HEARTBEAT_MS: u64 = 3600 * 1000;
/// Largest `worker.concurrency`: a worker's task consumers' prefetch is
/// its concurrency, and AMQP's prefetch count is 16 bits.
pub const MAX_CONCURRENCY: usize = u16::MAX as usize;
/// Largest `worker.grace_s` (1 week, as a task's longest time-out): the
/// grace period's end is a point in time, which a larger value would
/// carry past what the clock can hold.
pub const MAX_GRACE_S: u64 = 7 * 24 * 3600;
/// Smallest `worker.hold_ms`: below it a worker at full concurrency with
/// short tasks would give back deliveries that were about to get a slot.
pub const MIN_HOLD_MS: u64 = 100;
/// Largest `worker.hold_ms` (25 minutes): a delivery held past RabbitMQ's
/// `consumer_timeout` (30 minutes by default) closes its channel.
pub const MAX_HOLD_MS: u64 = 25 * 60 * 1000;
/// Largest `retry.max_attempts`, `retry.base_ms`/`cap_ms` and
/// `retry.timeout_s`: the same bounds a job's own `retry` and `timeout_s`
/// have in `schemas/job.schema.json`.
pub const MAX_ATTEMPTS: u32 = 100;
/// See [`MAX_ATTEMPTS`].
pub const MAX_BACKOFF_MS: u64 = 86_400_000;
/// See [`MAX_ATTEMPTS`].
pub const MAX_TIMEOUT_S: f64 = 604_800.0;
/// Smallest `limits.max_name_len`: a generated job id (a UUID) is 36
/// characters and clients submit it again to be idempotent; the default
/// queue name `default` fits too.
pub const MIN_NAME_LEN: usize = 36;

/// Longest `prefix`, in bytes: a task queue's name is the prefix, `.tasks.`
/// and a queue of up to [`MAX_NAME_LEN`], within AMQP's 255.
pub const MAX_PREFIX_LEN: usize = 64;
/// Largest `limits.max_name_len`: the published job schema
/// (`schemas/job.schema.json`) caps names at 128 characters, and intake
/// validates against it; a larger setting could not take effect.
pub const MAX_NAME_LEN: usize = 128;
/// Smallest `limits.max_params_bytes`: `{}`, the empty params, is 2 bytes.
pub const MIN_PARAMS_BYTES: usize = 2;
/// Smallest `limits.max_result_bytes`: `null`, the empty result, is 4 bytes.
pub const MIN_RESULT_BYTES: usize = 4;

/// The certificates of `tls_ca_file`, read and checked by [`Config::tls_ca`].
#[derive(Debug, Clone)]
pub struct TlsCa {
    path: PathBuf,
    pem: String,
}

impl TlsCa {
    /// Read `path`: PEM text with at least one well-formed `CERTIFICATE`.
    pub fn read(path: &Path) -> Result<TlsCa, ConfigError> {
        let fail = |reason: String| ConfigError::TlsCa {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let mut certificates = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            cert.map_err(|e| fail(format!("invalid PEM: {e}")))?;
            certificates += 1;
        }
        if certificates == 0 {
            return Err(fail("no PEM CERTIFICATE in the file".into()));
        }
        Ok(TlsCa {
            path: path.to_owned(),
            pem,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its PEM text.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

impl Config {
    /// Read `path` (if given) and apply the process environment on top.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.apply_env(|var| std::env::var(var).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Check values that parse but cannot work: intervals that would be
    /// zero, limits nothing fits under, a poison threshold the broker's own
    /// delivery limit would pre-empt. The error lists every such field with
    /// its value and its limit. [`Config::load`] calls it; call it again
    /// after changing a loaded config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Self::invalid_if_any(self.find_problems())
    }

    /// [`Config::validate`], and what a worker needs besides: something to
    /// consume. A dispatcher's config may name no task queue; a worker with
    /// none that takes no submissions would stop as soon as it started.
    pub fn validate_worker(&self) -> Result<(), ConfigError> {
        let mut problems = self.find_problems();
        if self.worker.queues.is_empty() && !self.worker.accept_submissions {
            problems.push(
                "worker.queues = []: names no queue and worker.accept_submissions is false: \
                 this worker would have nothing to consume; name a task queue \
                 (CONVEYOR_QUEUES, --queues), or set worker.accept_submissions = true \
                 (CONVEYOR_ACCEPT_SUBMISSIONS=true)"
                    .to_owned(),
            );
        }
        Self::invalid_if_any(problems)
    }

    fn invalid_if_any(problems: Vec<String>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// Every problem [`Config::validate`] reports, in field order.
    fn find_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, field: &str, value: &dyn std::fmt::Display, rule: String| {
            if !ok {
                problems.push(format!("{field} = {value}: {rule}"));
            }
        };
        let at_least =
            |min: &dyn std::fmt::Display, unit: &str| format!("must be at least {min}{unit}");

        // The prefix starts every queue name (at most 255 bytes, with a
        // task queue's own name of up to 128 after it) and every Redis key,
        // where braces would break the hash tag that keeps a job's keys in
        // one slot.
        check(
            !self.prefix.is_empty()
                && self.prefix.len() <= MAX_PREFIX_LEN
                && self
                    .prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
            "prefix",
            &format!("{:?}", self.prefix),
            format!(
                "must be 1 to {MAX_PREFIX_LEN} bytes of letters, digits, '.', '_' and '-' \
                 (it starts every queue name and Redis key)"
            ),
        );
        // Queue names join the prefix and the rest with '.', as a job's
        // queue may: deployment `a`'s task queue `submit` would be
        // deployment `a.tasks`'s submit queue. No prefix with a `tasks`
        // segment rules every such meeting out. `amq.` names are
        // RabbitMQ's own (declaring one is refused).
        check(
            !self.prefix.split('.').any(|segment| segment == "tasks")
                && self.prefix != "amq"
                && !self.prefix.starts_with("amq."),
            "prefix",
            &format!("{:?}", self.prefix),
            "must not have a segment `tasks` (another deployment's task queue would be named \
             as one of its queues) nor be or start with `amq.` (RabbitMQ's own names)"
                .to_owned(),
        );
        check(
            self.max_message_bytes >= MIN_MESSAGE_BYTES,
            "max_message_bytes",
            &self.max_message_bytes,
            at_least(&MIN_MESSAGE_BYTES, " (bytes)"),
        );
        check(
            (MIN_RETENTION_S..=MAX_RETENTION_S).contains(&self.retention_s),
            "retention_s",
            &self.retention_s,
            format!("must be {MIN_RETENTION_S} to {MAX_RETENTION_S} (s)"),
        );
        check(
            (1..=MAX_REDIS_WAIT_TIMEOUT_MS).contains(&self.redis_wait_timeout_ms),
            "redis_wait_timeout_ms",
            &self.redis_wait_timeout_ms,
            format!("must be 1 to {MAX_REDIS_WAIT_TIMEOUT_MS} (ms; 0 would wait for ever)"),
        );
        // Only quorum queues get `x-delivery-limit`; the worker must see a
        // poison message (delivery count = max_deliveries) before the
        // broker dead-letters it on its own.
        if self.queue_type == QueueType::Quorum {
            check(
                self.delivery_limit > self.worker.max_deliveries,
                "delivery_limit",
                &self.delivery_limit,
                format!(
                    "must be greater than worker.max_deliveries ({}), or the broker \
                     dead-letters poison messages before the worker fails their task",
                    self.worker.max_deliveries
                ),
            );
        }
        check(
            self.runtime_threads <= MAX_RUNTIME_THREADS,
            "runtime_threads",
            &self.runtime_threads,
            format!(
                "must be at most {MAX_RUNTIME_THREADS} (0 = one thread per core; the \
                 runtime starts them all at once)"
            ),
        );
        // Zero is "unlimited" to AMQP's basic.qos: unbounded memory.
        check(
            self.dispatcher.prefetch >= 1,
            "dispatcher.prefetch",
            &self.dispatcher.prefetch,
            at_least(&1, " (0 would be unlimited)"),
        );
        check(
            (MIN_SWEEP_INTERVAL_MS..=MAX_SWEEP_INTERVAL_MS)
                .contains(&self.dispatcher.sweep_interval_ms),
            "dispatcher.sweep_interval_ms",
            &self.dispatcher.sweep_interval_ms,
            format!(
                "must be at least {MIN_SWEEP_INTERVAL_MS} (ms) and at most \
                 {MAX_SWEEP_INTERVAL_MS} (a dead worker's tasks wait for a sweep to be \
                 taken over)"
            ),
        );
        check(
            (1..=MAX_CONCURRENCY).contains(&self.worker.concurrency),
            "worker.concurrency",
            &self.worker.concurrency,
            format!(
                "must be at least 1 and at most {MAX_CONCURRENCY} (the task consumers' \
                 prefetch, 16 bits in AMQP)"
            ),
        );
        check(
            (MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.worker.lease_ms),
            "worker.lease_ms",
            &self.worker.lease_ms,
            format!(
                "must be at least {MIN_LEASE_MS} (ms; renewed every third of it) \
                 and at most {MAX_LEASE_MS}"
            ),
        );
        check(
            (MIN_HEARTBEAT_MS..=MAX_HEARTBEAT_MS).contains(&self.worker.heartbeat_ms),
            "worker.heartbeat_ms",
            &self.worker.heartbeat_ms,
            format!("must be at least {MIN_HEARTBEAT_MS} (ms) and at most {MAX_HEARTBEAT_MS}"),
        );
        check(
            self.worker.grace_s <= MAX_GRACE_S,
            "worker.grace_s",
            &self.worker.grace_s,
            format!("must be at most {MAX_GRACE_S} (s, a week)"),
        );
        check(
            (MIN_HOLD_MS..=MAX_HOLD_MS).contains(&self.worker.hold_ms),
            "worker.hold_ms",
            &self.worker.hold_ms,
            format!(
                "must be at least {MIN_HOLD_MS} (ms) and at most {MAX_HOLD_MS} \
                 (under RabbitMQ's 30-minute consumer_timeout)"
            ),
        );
        // A first delivery has count 0, so 0 would fail every task unrun.
        check(
            self.worker.max_deliveries >= 1,
            "worker.max_deliveries",
            &self.worker.max_deliveries,
            at_least(&1, ""),
        );
        check(
            (1..=MAX_ATTEMPTS).contains(&self.retry.max_attempts),
            "retry.max_attempts",
            &self.retry.max_attempts,
            format!("must be 1 to {MAX_ATTEMPTS}"),
        );
        check(
            self.retry.base_ms <= MAX_BACKOFF_MS,
            "retry.base_ms",
            &self.retry.base_ms,
            format!("must be at most {MAX_BACKOFF_MS} (ms)"),
        );
        check(
            self.retry.cap_ms <= MAX_BACKOFF_MS,
            "retry.cap_ms",
            &self.retry.cap_ms,
            format!("must be at most {MAX_BACKOFF_MS} (ms)"),
        );
        check(
            self.retry.base_ms <= self.retry.cap_ms,
            "retry.base_ms",
            &self.retry.base_ms,
            format!("must not exceed retry.cap_ms ({})", self.retry.cap_ms),
        );
        check(
            self.retry.timeout_s > 0.0 && self.retry.timeout_s <= MAX_TIMEOUT_S,
            "retry.timeout_s",
            &self.retry.timeout_s,
            format!("must be greater than 0 and at most {MAX_TIMEOUT_S} (s)"),
        );
        check(
            self.limits.max_tasks >= 1,
            "limits.max_tasks",
            &self.limits.max_tasks,
            at_least(&1, " (a job has at least one task)"),
        );
        check(
            self.limits.max_queues_per_job >= 1,
            "limits.max_queues_per_job",
            &self.limits.max_queues_per_job,
            at_least(&1, " (a job's tasks run on at least one queue)"),
        );
        check(
            (MIN_NAME_LEN..=MAX_NAME_LEN).contains(&self.limits.max_name_len),
            "limits.max_name_len",
            &self.limits.max_name_len,
            format!(
                "must be {MIN_NAME_LEN} to {MAX_NAME_LEN} (a generated job id is 36 characters; \
                 the job schema caps names at 128)"
            ),
        );
        // A worker's queue is a task queue's own name, under the rules a
        // job's `queue` follows (a longer one would pass AMQP's 255-byte
        // limit with the prefix, and one with other characters could never
        // receive a task).
        for queue in &self.worker.queues {
            check(
                self.accepts_queue_name(queue),
                "worker.queues",
                &format!("{queue:?}"),
                format!(
                    "each must be {} (a job's `queue` follows the same rules)",
                    self.queue_name_rule()
                ),
            );
        }
        // A queue named twice would get two consumers in one worker, each
        // with a prefetch of the whole concurrency: twice the deliveries
        // held for the same slots.
        let mut named = std::collections::HashSet::new();
        let mut twice = std::collections::HashSet::new();
        for queue in &self.worker.queues {
            if !named.insert(queue.as_str()) && twice.insert(queue.as_str()) {
                check(
                    false,
                    "worker.queues",
                    &format!("{queue:?}"),
                    "is named more than once; name each queue once".to_owned(),
                );
            }
        }
        check(
            self.limits.max_params_bytes >= MIN_PARAMS_BYTES,
            "limits.max_params_bytes",
            &self.limits.max_params_bytes,
            at_least(&MIN_PARAMS_BYTES, " (bytes; `{}` is 2)"),
        );
        check(
            self.limits.max_result_bytes >= MIN_RESULT_BYTES,
            "limits.max_result_bytes",
            &self.limits.max_result_bytes,
            at_least(&MIN_RESULT_BYTES, " (bytes; `null` is 4)"),
        );
        check(
            self.limits.max_inputs_bytes >= self.limits.max_result_bytes,
            "limits.max_inputs_bytes",
            &self.limits.max_inputs_bytes,
            format!(
                "must be at least limits.max_result_bytes ({})",
                self.limits.max_result_bytes
            ),
        );
        // An empty list (a variable set to nothing) would be retried as an
        // outage for ever instead of refused at start.
        check(
            !split_urls(&self.amqp_url).is_empty(),
            "amqp_url",
            &"\"\"",
            "must name a broker (amqp[s]://user:password@host[:port]/vhost)".to_owned(),
        );
        // lapin reports a frame_max below AMQP's minimum only as a failed
        // connect; the URL itself is not printed (it may hold a password).
        // A URL its parser refuses is named by its node and redacted, as
        // the parser's own words may quote all of it.
        for (node, url) in split_urls(&self.amqp_url).into_iter().enumerate() {
            let mut numbers_ok = true;
            for (key, rule) in AMQP_URL_NUMBERS {
                let Some(value) = url_query_value(url, key) else {
                    continue;
                };
                let ok = value.parse::<u32>().is_ok_and(|n| rule.allows(n));
                numbers_ok &= ok;
                check(
                    ok,
                    &format!("amqp_url (node {}) {key}", node + 1),
                    &value,
                    rule.describe(),
                );
            }
            if numbers_ok && let Some(why) = amqp_url_problem(url) {
                check(
                    false,
                    &format!("amqp_url (node {})", node + 1),
                    &redact_url(url),
                    why.to_owned(),
                );
            }
        }
        // Its own errors name the part that is wrong, never the password.
        match crate::store::sentinel::SentinelUrl::parse(&self.redis_url) {
            Some(Err(e)) => problems.push(e),
            Some(Ok(_)) => {}
            None => {
                let nodes = split_urls(&self.redis_url);
                check(
                    !nodes.is_empty(),
                    "redis_url",
                    &"\"\"",
                    "must name a Redis (redis[s]://[user:password@]host[:port][/db])".to_owned(),
                );
                for (node, url) in nodes.into_iter().enumerate() {
                    // The parser's own words may quote the whole URL.
                    check(
                        redis::IntoConnectionInfo::into_connection_info(url).is_ok(),
                        &format!("redis_url (node {})", node + 1),
                        &redact_url(url),
                        "is not a Redis URL (expected redis[s]://[user:password@]host[:port][/db], \
                         redis+unix:///path or redis+sentinel://...; percent-encode `/`, `?`, \
                         `#`, `@`, `:` and `%` in the user and password)"
                            .to_owned(),
                    );
                }
            }
        }
        problems
    }

    /// Parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e: toml::de::Error| {
            let at = e.span().map_or(0, |span| span.start).min(text.len());
            let before = text.get(..at).unwrap_or_default();
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            ConfigError::Parse {
                path: path.display().to_string(),
                line: before.matches('\n').count() + 1,
                column: before[line_start..].chars().count() + 1,
                message: e.message().to_owned(),
            }
        })
    }

    /// Override fields from environment variables read through `get`.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                value: value.clone(),
                reason: e.to_string(),
            })
        }
        if let Some(v) = get("CONVEYOR_AMQP_URL") {
            self.amqp_url = v;
        }
        if let Some(v) = get("CONVEYOR_REDIS_URL") {
            self.redis_url = v;
        }
        if let Some(v) = get("CONVEYOR_REDIS_WAIT_REPLICAS") {
            self.redis_wait_replicas = parse("CONVEYOR_REDIS_WAIT_REPLICAS", v)?;
        }
        if let Some(v) = get("CONVEYOR_REDIS_WAIT_TIMEOUT_MS") {
            self.redis_wait_timeout_ms = parse("CONVEYOR_REDIS_WAIT_TIMEOUT_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_TLS_CA_FILE") {
            self.tls_ca_file = (!v.is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = get("CONVEYOR_PREFIX") {
            self.prefix = v;
        }
        if let Some(v) = get("CONVEYOR_MAX_MESSAGE_BYTES") {
            self.max_message_bytes = parse("CONVEYOR_MAX_MESSAGE_BYTES", v)?;
        }
        if let Some(v) = get("CONVEYOR_RETENTION_S") {
            self.retention_s = parse("CONVEYOR_RETENTION_S", v)?;
        }
        if let Some(v) = get("CONVEYOR_LOG_FORMAT") {
            self.log_format = match v.as_str() {
                "pretty" => LogFormat::Pretty,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        var: "CONVEYOR_LOG_FORMAT",
                        value: v,
                        reason: "expected pretty or json".into(),
                    });
                }
            };
        }
        if let Some(v) = get("CONVEYOR_QUEUE_TYPE") {
            self.queue_type = match v.as_str() {
                "quorum" => QueueType::Quorum,
                "classic" => QueueType::Classic,
                _ => {
                    return Err(ConfigError::Env {
                        var: "CONVEYOR_QUEUE_TYPE",
                        value: v,
                        reason: "expected quorum or classic".into(),
                    });
                }
            };
        }
        if let Some(v) = get("CONVEYOR_DELIVERY_LIMIT") {
            self.delivery_limit = parse("CONVEYOR_DELIVERY_LIMIT", v)?;
        }
        if let Some(v) = get("CONVEYOR_RUNTIME_THREADS") {
            self.runtime_threads = parse("CONVEYOR_RUNTIME_THREADS", v)?;
        }
        if let Some(v) = get("CONVEYOR_HTTP_ADDR") {
            self.http_addr = if v.is_empty() {
                None
            } else {
                Some(parse("CONVEYOR_HTTP_ADDR", v)?)
            };
        }
        if let Some(v) = get("CONVEYOR_DISPATCHER_PREFETCH") {
            self.dispatcher.prefetch = parse("CONVEYOR_DISPATCHER_PREFETCH", v)?;
        }
        if let Some(v) = get("CONVEYOR_SWEEP_INTERVAL_MS") {
            self.dispatcher.sweep_interval_ms = parse("CONVEYOR_SWEEP_INTERVAL_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_QUEUES") {
            let queues: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|q| !q.is_empty())
                .map(String::from)
                .collect();
            // Set but naming nothing is a mistake (a variable emptied by a
            // script), not a wish for a worker that consumes no task queue.
            if queues.is_empty() {
                return Err(ConfigError::Env {
                    var: "CONVEYOR_QUEUES",
                    value: v,
                    reason: "names no queue; expected queue names separated by commas, \
                             e.g. default,gpu (unset it to keep worker.queues)"
                        .into(),
                });
            }
            self.worker.queues = queues;
        }
        if let Some(v) = get("CONVEYOR_CONCURRENCY") {
            self.worker.concurrency = parse("CONVEYOR_CONCURRENCY", v)?;
        }
        if let Some(v) = get("CONVEYOR_LEASE_MS") {
            self.worker.lease_ms = parse("CONVEYOR_LEASE_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_GRACE_S") {
            self.worker.grace_s = parse("CONVEYOR_GRACE_S", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_DELIVERIES") {
            self.worker.max_deliveries = parse("CONVEYOR_MAX_DELIVERIES", v)?;
        }
        if let Some(v) = get("CONVEYOR_HOLD_MS") {
            self.worker.hold_ms = parse("CONVEYOR_HOLD_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_ACCEPT_SUBMISSIONS") {
            self.worker.accept_submissions = parse("CONVEYOR_ACCEPT_SUBMISSIONS", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_ATTEMPTS") {
            self.retry.max_attempts = parse("CONVEYOR_MAX_ATTEMPTS", v)?;
        }
        if let Some(v) = get("CONVEYOR_BACKOFF_BASE_MS") {
            self.retry.base_ms = parse("CONVEYOR_BACKOFF_BASE_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_BACKOFF_CAP_MS") {
            self.retry.cap_ms = parse("CONVEYOR_BACKOFF_CAP_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_TIMEOUT_S") {
            self.retry.timeout_s = parse("CONVEYOR_TIMEOUT_S", v)?;
        }
        if let Some(v) = get("CONVEYOR_HEARTBEAT_MS") {
            self.worker.heartbeat_ms = parse("CONVEYOR_HEARTBEAT_MS", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_TASKS") {
            self.limits.max_tasks = parse("CONVEYOR_MAX_TASKS", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_QUEUES_PER_JOB") {
            self.limits.max_queues_per_job = parse("CONVEYOR_MAX_QUEUES_PER_JOB", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_NAME_LEN") {
            self.limits.max_name_len = parse("CONVEYOR_MAX_NAME_LEN", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_LABELS") {
            self.limits.max_labels = parse("CONVEYOR_MAX_LABELS", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_PARAMS_BYTES") {
            self.limits.max_params_bytes = parse("CONVEYOR_MAX_PARAMS_BYTES", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_RESULT_BYTES") {
            self.limits.max_result_bytes = parse("CONVEYOR_MAX_RESULT_BYTES", v)?;
        }
        if let Some(v) = get("CONVEYOR_MAX_INPUTS_BYTES") {
            self.limits.max_inputs_bytes = parse("CONVEYOR_MAX_INPUTS_BYTES", v)?;
        }
        Ok(())
    }

    /// Whether a job's task (and so a worker) may name task queue `queue`
    /// under these limits.
    pub fn accepts_queue_name(&self, queue: &str) -> bool {
        crate::intake::check_queue_name(queue, self.limits.max_name_len).is_ok()
    }

    /// What [`Config::accepts_queue_name`] asks of a name, for the errors
    /// that refuse one.
    pub fn queue_name_rule(&self) -> String {
        format!(
            "1 to limits.max_name_len ({}) bytes of letters, digits, '.', '_', ':' and '-', \
             starting with a letter or a digit",
            self.limits.max_name_len
        )
    }

    /// The lease of a claim.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.worker.lease_ms)
    }

    /// The private CA of `tls_ca_file`, read now, if one is set.
    pub fn tls_ca(&self) -> Result<Option<TlsCa>, ConfigError> {
        self.tls_ca_file.as_deref().map(TlsCa::read).transpose()
    }
}

/// What a connection parameter in an AMQP URL's query may be.
#[derive(Debug, Clone, Copy)]
enum UrlNumber {
    /// 0 (no limit, the broker's choice) or at least this many bytes.
    ZeroOrAtLeast(u32),
    /// Whole seconds up to AMQP's 16-bit limit; 0 turns heartbeats off.
    Seconds,
}

impl UrlNumber {
    fn allows(self, n: u32) -> bool {
        match self {
            UrlNumber::ZeroOrAtLeast(min) => n == 0 || n >= min,
            UrlNumber::Seconds => n <= u32::from(u16::MAX),
        }
    }

    fn describe(self) -> String {
        match self {
            UrlNumber::ZeroOrAtLeast(min) => format!(
                "must be 0 (the broker's maximum) or at least {min} (bytes; AMQP's smallest frame)"
            ),
            UrlNumber::Seconds => format!(
                "must be a whole number of seconds up to {} (0 turns them off)",
                u16::MAX
            ),
        }
    }
}

/// AMQP's `frame-min-size`: no peer accepts a smaller `frame_max`.
pub const AMQP_MIN_FRAME_MAX: u32 = 4096;

/// Numeric connection parameters of an AMQP URL checked by
/// [`Config::validate`].
const AMQP_URL_NUMBERS: [(&str, UrlNumber); 2] = [
    ("frame_max", UrlNumber::ZeroOrAtLeast(AMQP_MIN_FRAME_MAX)),
    ("heartbeat", UrlNumber::Seconds),
];

/// Why `url` is not an AMQP URL that lapin's parser (`AMQPUri`, the one
/// every connection goes through) accepts, in words that quote none of
/// it; `None` when it parses. The parser's own message is never passed
/// on: for a URL without `//` (`amqp:guest:secret@mq/`) it is `Invalid
/// URL: '<the whole URL>'`, password included.
pub fn amqp_url_problem(url: &str) -> Option<&'static str> {
    let error = url.parse::<lapin::uri::AMQPUri>().err()?;
    Some(if error.starts_with("Invalid URL") {
        "is not a URL with a host: is the `//` after `amqp:` missing? (expected \
         amqp[s]://user:password@host[:port]/vhost)"
    } else if error.starts_with("Invalid AMQP scheme") {
        "must start with amqp:// or amqps://"
    } else {
        "is not an AMQP URL lapin can read (expected amqp[s]://user:password@host[:port]/vhost\
         [?heartbeat=s&frame_max=bytes]; percent-encode `/`, `?`, `#`, `@`, `:` and `%` in \
         the user and password, and every number must be one)"
    })
}

/// The value of `key` in `url`'s query string, if it names one.
pub(crate) fn url_query_value<'a>(url: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

/// The schemes of Conveyor's URLs: a piece of a list that starts with one
/// starts a URL of its own even without its `//`. Glued to the URL before
/// it, as a piece with no `scheme://` is, an `amqp:user:password@host/`
/// became part of that URL's vhost, which a broker's refusal quotes.
const URL_SCHEMES: [&str; 6] = [
    "amqp:",
    "amqps:",
    "redis:",
    "rediss:",
    "redis+sentinel:",
    "rediss+sentinel:",
];

/// The URLs of a comma-separated list, trimmed, empty ones dropped. A
/// piece with no `scheme://` (nor `amqp:`, `amqps:`, `redis:`, `rediss:` or their
/// `+sentinel` forms at its start)
/// continues the URL before it: the comma was part of it (a password
/// holding one, or a sentinel URL's host list).
pub fn split_urls(list: &str) -> Vec<&str> {
    // Each URL as the range of `list` from its first piece to its last.
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut offset = 0;
    for piece in list.split(',') {
        let (from, to) = (offset, offset + piece.len());
        offset = to + 1;
        if piece.trim().is_empty() {
            continue;
        }
        match ranges.last_mut() {
            Some(last)
                if !piece.contains("://")
                    && !URL_SCHEMES
                        .iter()
                        .any(|s| piece.trim_start().starts_with(s)) =>
            {
                last.1 = to
            }
            _ => ranges.push((from, to)),
        }
    }
    ranges
        .into_iter()
        .map(|(from, to)| list[from..to].trim())
        .collect()
}

/// `url` (or a comma-separated list of them) with any password replaced
/// by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    split_urls(url)
        .into_iter()
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (&url[..scheme.len() + 3], rest),
        None => ("", url),
    };
    // The password runs from the first ':' to the *last* '@': a password
    // holding '/', '?' or '@' unencoded (or a URL missing its "//") must
    // not end it early and print the rest of it. A ':' before the last
    // '@' that is not a password's (a port, with an '@' in the query)
    // hides more than it needs to, never less.
    let (masked, tail) = match (rest.find(':'), rest.rfind('@')) {
        (Some(colon), Some(at)) if colon < at => {
            (format!("{}:***@", &rest[..colon]), &rest[at + 1..])
        }
        // No '@' after it: the hosts alone, or user and password whose '@'
        // is missing (`amqp://app:secret.mq:5672/`, which the parser
        // refuses, quoting it): each node's text after its ':' that is no
        // port is hidden.
        _ => (String::new(), rest),
    };
    let hidden;
    let tail = if masked.is_empty() {
        hidden = hide_what_is_no_port(tail);
        hidden.as_str()
    } else {
        tail
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => format!("{path}?{}", redact_query(query)),
        None => tail.to_owned(),
    };
    format!("{scheme}{masked}{tail}")
}

/// `rest` (a URL past its scheme, with no credentials) with what may be a
/// password hidden: its nodes (split by ',', each up to '/' or '?') are
/// shown while each is a host with at most a port (1 to 5 digits after
/// its ':', past an IPv6 host's brackets); from the first that is not
/// (`app:secret.mq:5672`, a password whose '@' is missing), all the rest is
/// hidden, since such a password may hold ',', '/' or '?' too.
fn hide_what_is_no_port(rest: &str) -> String {
    let mut shown = String::new();
    let mut node = rest;
    loop {
        let host_end = if node.starts_with('[') {
            node.find(']').map_or(0, |i| i + 1)
        } else {
            0
        };
        let end = node[host_end..]
            .find([',', '/', '?'])
            .map_or(node.len(), |i| host_end + i);
        let this = &node[..end];
        if let Some(i) = this[host_end..].find(':') {
            let colon = host_end + i;
            let port = &this[colon + 1..];
            if !(1..=5).contains(&port.len()) || !port.bytes().all(|b| b.is_ascii_digit()) {
                shown.push_str(&this[..colon]);
                shown.push_str(":***");
                return shown;
            }
        }
        shown.push_str(this);
        match node[end..].strip_prefix(',') {
            Some(next) => {
                shown.push(',');
                node = next;
            }
            None => {
                shown.push_str(&node[end..]);
                return shown;
            }
        }
    }
}

/// A URL's query with the value of every parameter whose name ends in
/// `password` (e.g. a Sentinel URL's `sentinel_password`) replaced by `***`.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            // `pass` is redis-rs's, in the query of a `redis+unix://` URL.
            Some((key, _)) if key.ends_with("password") || key == "pass" => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_overrides_file_values() {
        let mut c: Config = toml::from_str("prefix = \"fromfile\"\n[worker]\nconcurrency = 3\n")
            .unwrap_or_default();
        assert_eq!(c.prefix, "fromfile");
        let env: HashMap<&str, &str> = [
            ("CONVEYOR_PREFIX", "fromenv"),
            ("CONVEYOR_QUEUES", "a, b"),
            ("CONVEYOR_CONCURRENCY", "7"),
            ("CONVEYOR_REDIS_WAIT_REPLICAS", "1"),
            ("CONVEYOR_REDIS_WAIT_TIMEOUT_MS", "250"),
            ("CONVEYOR_HEARTBEAT_MS", "500"),
            ("CONVEYOR_MAX_TASKS", "10"),
            ("CONVEYOR_MAX_QUEUES_PER_JOB", "2"),
            ("CONVEYOR_MAX_NAME_LEN", "40"),
            ("CONVEYOR_MAX_LABELS", "3"),
            ("CONVEYOR_MAX_PARAMS_BYTES", "4096"),
            ("CONVEYOR_MAX_RESULT_BYTES", "8192"),
            ("CONVEYOR_MAX_INPUTS_BYTES", "65536"),
        ]
        .into();
        c.apply_env(|k| env.get(k).map(|v| v.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.prefix, "fromenv");
        assert_eq!(c.worker.queues, vec!["a", "b"]);
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!((c.redis_wait_replicas, c.redis_wait_timeout_ms), (1, 250));
        assert_eq!(c.worker.heartbeat_ms, 500);
        assert_eq!(c.limits.max_queues_per_job, 2);
        assert_eq!(
            (
                c.limits.max_tasks,
                c.limits.max_name_len,
                c.limits.max_labels,
                c.limits.max_params_bytes,
                c.limits.max_result_bytes,
                c.limits.max_inputs_bytes
            ),
            (10, 40, 3, 4096, 8192, 65536)
        );
    }

    #[test]
    fn a_prefix_that_would_break_queue_names_or_the_hash_tag_is_refused_naming_the_rule() {
        for bad in ["", "a{b}", "has space", &"p".repeat(MAX_PREFIX_LEN + 1)] {
            let config = Config {
                prefix: bad.to_owned(),
                ..Config::default()
            };
            let error = validation_error(&config);
            assert!(
                error.contains("prefix = ") && error.contains("1 to 64 bytes of letters"),
                "{bad:?}: {error}"
            );
        }
        // Deployment `a`'s task queues `submit` and `tasks.default` would be
        // `a.tasks`'s submit and default task queues.
        for bad in ["a.tasks", "x.tasks.y", "tasks", "amq", "amq.x"] {
            let config = Config {
                prefix: bad.to_owned(),
                ..Config::default()
            };
            let error = validation_error(&config);
            assert!(
                error.contains("prefix = ") && error.contains("segment `tasks`"),
                "{bad:?}: {error}"
            );
        }
        for good in [
            "conveyor",
            "test-core-0a1b2c3d",
            "team_a.prod",
            "my-tasks",
            "amqp",
        ] {
            let config = Config {
                prefix: good.to_owned(),
                ..Config::default()
            };
            assert_eq!(validation_error(&config), "", "{good:?}");
        }
    }

    /// What `validate` says of `config`; empty when it passes.
    fn validation_error(config: &Config) -> String {
        config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn an_amqp_url_frame_max_below_the_protocol_minimum_is_named_without_the_url() {
        let config = Config {
            amqp_url: "amqp://u:secret@a/%2f?heartbeat=10,amqp://u:secret@b/%2f?frame_max=1024&heartbeat=70000"
                .into(),
            ..Config::default()
        };
        let err = validation_error(&config);
        assert!(
            err.contains("amqp_url (node 2) frame_max = 1024: must be 0 (the broker's maximum) or at least 4096"),
            "{err}"
        );
        assert!(
            err.contains(
                "amqp_url (node 2) heartbeat = 70000: must be a whole number of seconds up to 65535"
            ),
            "{err}"
        );
        assert!(!err.contains("node 1"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        for fine in [
            "amqp://h/?frame_max=4096",
            "amqp://h/?frame_max=0&heartbeat=0",
            "amqp://h/",
        ] {
            let config = Config {
                amqp_url: fine.into(),
                ..Config::default()
            };
            assert!(config.validate().is_ok(), "{fine}");
        }
    }

    #[test]
    fn a_sentinel_redis_url_that_does_not_parse_is_named_without_the_url() {
        let config = Config {
            redis_url: "redis+sentinel://app:secret@s1:265o/svc".into(),
            ..Config::default()
        };
        let err = validation_error(&config);
        assert!(
            err.contains("redis_url: sentinel 1 of 1 has a port that is not a number"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        let config = Config {
            redis_url: "redis+sentinel://app:secret@s1:26380,s2/svc/2".into(),
            ..Config::default()
        };
        assert!(config.validate().is_ok());
    }

    /// Until the thirty-second session an AMQP URL without its `//` passed
    /// validation, and every connect failed with lapin's parser's text,
    /// `Invalid URL: '<the whole URL>'`, password included, logged every
    /// few seconds and printed by the commands.
    #[test]
    fn a_url_that_names_no_service_is_refused_at_start_not_retried_for_ever() {
        for (amqp, redis, wanted) in [
            ("", "redis://h/", "amqp_url = \"\": must name a broker"),
            (" , ", "redis://h/", "amqp_url = \"\": must name a broker"),
            ("amqp://h/", "", "redis_url = \"\": must name a Redis"),
            (
                "amqp://h/",
                "redis//u:s3cret@h:6379",
                "redis_url (node 1) = redis//u:***@h:6379: is not a Redis URL",
            ),
            (
                "amqp://h/",
                "redis://h1/,http://u:s3cret@h2/",
                "redis_url (node 2) = http://u:***@h2/: is not a Redis URL",
            ),
        ] {
            let config = Config {
                amqp_url: amqp.into(),
                redis_url: redis.into(),
                ..Config::default()
            };
            let found = problems(&config);
            assert!(
                found.len() == 1 && found[0].starts_with(wanted),
                "{amqp:?} {redis:?}: {found:?}"
            );
            assert!(!found[0].contains("s3cret"), "{found:?}");
        }
        for redis in [
            "rediss://:pw@h:6380/2",
            "redis+unix:///run/redis.sock?db=1",
            "redis://h1:6379/,redis://h2:6379/",
        ] {
            let config = Config {
                redis_url: redis.into(),
                ..Config::default()
            };
            assert_eq!(problems(&config), Vec::<String>::new(), "{redis}");
        }
    }

    #[test]
    fn a_concurrency_or_heartbeat_too_large_to_work_is_refused() {
        let mut config = Config::default();
        config.worker.concurrency = MAX_CONCURRENCY + 1;
        config.worker.heartbeat_ms = MAX_HEARTBEAT_MS + 1;
        let found = problems(&config);
        assert!(
            found[0]
                .starts_with("worker.concurrency = 65536: must be at least 1 and at most 65535"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with(
                "worker.heartbeat_ms = 3600001: must be at least 100 (ms) and at most 3600000"
            ),
            "{found:?}"
        );
        config.worker.concurrency = MAX_CONCURRENCY;
        config.worker.heartbeat_ms = MAX_HEARTBEAT_MS;
        assert_eq!(problems(&config), Vec::<String>::new());
    }

    #[test]
    fn an_amqp_url_its_parser_refuses_is_named_by_node_without_its_password() {
        for (url, node, shown, why) in [
            (
                "amqp://h/%2f,amqp:guest:s3cret@mq/",
                2,
                "amqp:***@mq/",
                "is not a URL with a host: is the `//` after `amqp:` missing?",
            ),
            (
                "amqps://u:s3cret@h:port/v",
                1,
                "amqps://u:***@h:port/v",
                "is not an AMQP URL lapin can read",
            ),
            (
                "amqp://u:s3cret@h/v?channel_max=many",
                1,
                "amqp://u:***@h/v?channel_max=many",
                "is not an AMQP URL lapin can read",
            ),
            (
                "http://u:s3cret@h/",
                1,
                "http://u:***@h/",
                "must start with amqp:// or amqps://",
            ),
        ] {
            let config = Config {
                amqp_url: url.into(),
                ..Config::default()
            };
            let err = validation_error(&config);
            assert!(
                err.contains(&format!("amqp_url (node {node}) = {shown}: {why}")),
                "{url}: {err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }
        // A number the range check names is not named twice.
        let config = Config {
            amqp_url: "amqp://h/?heartbeat=70000".into(),
            ..Config::default()
        };
        assert_eq!(problems(&config).len(), 1, "{:?}", problems(&config));
    }

    /// Until the thirty-second session `Config` derived `Debug`, and a
    /// config printed with `{:?}` showed both URLs' passwords.
    #[test]
    fn the_debug_form_hides_the_urls_passwords() {
        let config = Config {
            amqp_url: "amqp://app:s3cret@mq/%2f".into(),
            redis_url: "redis+sentinel://:s3cret@s1/svc?sentinel_password=s3cret".into(),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://app:***@mq/%2f"), "{shown}");
        assert!(shown.contains("concurrency: 16"), "{shown}");
    }

    /// Until the thirty-second session `CONVEYOR_QUEUES=""` (or `","`) set
    /// an empty list without a word: a dispatcher then declared no task
    /// queue, a worker consumed none.
    #[test]
    fn a_queues_variable_that_names_no_queue_is_an_error_naming_it() {
        for value in ["", ",", " , "] {
            let mut c = Config::default();
            let err = c
                .apply_env(|k| (k == "CONVEYOR_QUEUES").then(|| value.to_string()))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.starts_with(&format!(
                    "environment variable CONVEYOR_QUEUES={value:?} is invalid: names no queue"
                )),
                "{value:?}: {err}"
            );
        }
    }

    /// Until the thirty-second session the runtime refused a worker with
    /// nothing to consume with an error of its own, which exited 1 as a
    /// failure, not 2 as a configuration error.
    #[test]
    fn a_worker_with_no_queue_and_no_submissions_is_a_configuration_error() {
        let mut c = Config::default();
        c.worker.queues.clear();
        assert!(c.validate_worker().is_ok(), "it takes submissions");
        c.worker.accept_submissions = false;
        assert!(
            c.validate().is_ok(),
            "a dispatcher's config may name no queue"
        );
        match c.validate_worker() {
            Err(ConfigError::Invalid { problems }) => assert!(
                problems.len() == 1
                    && problems[0].starts_with("worker.queues = []: names no queue")
                    && problems[0].contains("would have nothing to consume"),
                "{problems:?}"
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_env_value_names_the_variable() {
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "CONVEYOR_CONCURRENCY").then(|| "many".to_string()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("CONVEYOR_CONCURRENCY"), "{err}");
    }

    #[test]
    fn a_tls_ca_file_that_cannot_be_used_is_named_with_its_path() {
        let dir = std::env::temp_dir().join(format!("conveyor-ca-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let error = |path: &Path| {
            let config = Config {
                tls_ca_file: Some(path.to_owned()),
                ..Config::default()
            };
            config
                .tls_ca()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let missing = dir.join("missing.pem");
        let err = error(&missing);
        assert!(
            err.starts_with(&format!("tls_ca_file {}: cannot read", missing.display())),
            "{err}"
        );
        let no_cert = dir.join("key.pem");
        let _ = std::fs::write(
            &no_cert,
            "-----BEGIN PRIVATE KEY-----\nAAEC\n-----END PRIVATE KEY-----\n",
        );
        assert!(
            error(&no_cert).contains("no PEM CERTIFICATE"),
            "{}",
            error(&no_cert)
        );
        let garbled = dir.join("garbled.pem");
        let _ = std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        );
        assert!(
            error(&garbled).contains("invalid PEM"),
            "{}",
            error(&garbled)
        );
        let good = dir.join("ca.pem");
        let pem = "-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n";
        let _ = std::fs::write(&good, pem);
        let config = Config {
            tls_ca_file: Some(good.clone()),
            ..Config::default()
        };
        let ca = config.tls_ca().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ca.as_ref().map(TlsCa::pem), Some(pem));
        assert!(Config::default().tls_ca().is_ok_and(|ca| ca.is_none()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_tls_ca_file_variable_turns_it_off() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "CONVEYOR_TLS_CA_FILE").then(|| "/etc/ca.pem".to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.tls_ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        c.apply_env(|k| (k == "CONVEYOR_TLS_CA_FILE").then(String::new))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.tls_ca_file, None);
    }

    fn problems(config: &Config) -> Vec<String> {
        match config.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid { problems }) => problems,
            Err(other) => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn the_defaults_and_the_test_suites_settings_are_valid() {
        assert_eq!(problems(&Config::default()), Vec::<String>::new());
        // The smallest values tests/ use (common::test_config, the
        // simulation, the fault tests' worker processes).
        let mut c = Config::default();
        c.dispatcher.sweep_interval_ms = 50;
        c.worker.lease_ms = 600;
        c.worker.heartbeat_ms = 500;
        c.worker.grace_s = 0;
        c.worker.max_deliveries = 6;
        c.retry.base_ms = 0;
        c.retry.cap_ms = 0;
        c.retry.max_attempts = 1;
        assert_eq!(problems(&c), Vec::<String>::new());
    }

    #[test]
    fn each_unusable_value_is_named_with_its_value_and_limit() {
        type Change = fn(&mut Config);
        let cases: &[(Change, &str)] = &[
            (
                |c| c.max_message_bytes = 10,
                "max_message_bytes = 10: must be at least 1024 (bytes)",
            ),
            (
                |c| c.retention_s = 0,
                "retention_s = 0: must be 1 to 315360000 (s)",
            ),
            (
                |c| c.retention_s = u64::MAX,
                "retention_s = 18446744073709551615: must be 1 to 315360000 (s)",
            ),
            (
                |c| c.delivery_limit = 5,
                "delivery_limit = 5: must be greater than worker.max_deliveries (5)",
            ),
            (
                |c| c.redis_wait_timeout_ms = 0,
                "redis_wait_timeout_ms = 0: must be 1 to 60000 (ms; 0 would wait for ever)",
            ),
            (
                |c| c.dispatcher.prefetch = 0,
                "dispatcher.prefetch = 0: must be at least 1 (0 would be unlimited)",
            ),
            (
                |c| c.dispatcher.sweep_interval_ms = 0,
                "dispatcher.sweep_interval_ms = 0: must be at least 10 (ms)",
            ),
            (
                |c| c.dispatcher.sweep_interval_ms = 60_001,
                "dispatcher.sweep_interval_ms = 60001: must be at least 10 (ms) and at most 60000",
            ),
            (
                |c| c.runtime_threads = 1_000_000,
                "runtime_threads = 1000000: must be at most 1024",
            ),
            (
                |c| c.worker.concurrency = 0,
                "worker.concurrency = 0: must be at least 1",
            ),
            (
                |c| c.worker.lease_ms = 2,
                "worker.lease_ms = 2: must be at least 300 (ms; renewed every third of it) and at most 86400000",
            ),
            (
                |c| c.worker.lease_ms = u64::MAX,
                "worker.lease_ms = 18446744073709551615: must be at least 300",
            ),
            (
                |c| c.worker.heartbeat_ms = 0,
                "worker.heartbeat_ms = 0: must be at least 100 (ms)",
            ),
            (
                |c| c.worker.max_deliveries = 0,
                "worker.max_deliveries = 0: must be at least 1",
            ),
            (
                |c| c.worker.grace_s = u64::MAX,
                "worker.grace_s = 18446744073709551615: must be at most 604800 (s, a week)",
            ),
            (
                |c| c.worker.hold_ms = 99,
                "worker.hold_ms = 99: must be at least 100 (ms) and at most 1500000",
            ),
            (
                |c| c.worker.hold_ms = 1_800_000,
                "worker.hold_ms = 1800000: must be at least 100 (ms) and at most 1500000",
            ),
            (
                |c| c.retry.max_attempts = 0,
                "retry.max_attempts = 0: must be 1 to 100",
            ),
            (
                |c| c.retry.max_attempts = 101,
                "retry.max_attempts = 101: must be 1 to 100",
            ),
            (
                |c| c.retry.base_ms = 2_000,
                "retry.base_ms = 2000: must not exceed retry.cap_ms (1000)",
            ),
            (
                |c| c.retry.cap_ms = 86_400_001,
                "retry.cap_ms = 86400001: must be at most 86400000 (ms)",
            ),
            (
                |c| c.retry.timeout_s = 0.0,
                "retry.timeout_s = 0: must be greater than 0 and at most 604800 (s)",
            ),
            (
                |c| c.retry.timeout_s = f64::NAN,
                "retry.timeout_s = NaN: must be greater than 0",
            ),
            (
                |c| c.retry.timeout_s = f64::INFINITY,
                "retry.timeout_s = inf: must be greater than 0",
            ),
            (
                |c| c.limits.max_tasks = 0,
                "limits.max_tasks = 0: must be at least 1",
            ),
            (
                |c| c.limits.max_queues_per_job = 0,
                "limits.max_queues_per_job = 0: must be at least 1",
            ),
            (
                |c| c.limits.max_name_len = 8,
                "limits.max_name_len = 8: must be 36 to 128",
            ),
            (
                |c| c.limits.max_name_len = 129,
                "limits.max_name_len = 129: must be 36 to 128",
            ),
            (
                |c| c.worker.queues = vec!["default".into(), "x".repeat(129)],
                "worker.queues = \"xxxx",
            ),
            (
                |c| c.worker.queues = vec!["a b".into()],
                "worker.queues = \"a b\": each must be 1 to limits.max_name_len (128) bytes",
            ),
            (
                |c| {
                    c.worker.queues = ["default", "gpu", "default", "default"]
                        .map(String::from)
                        .to_vec()
                },
                "worker.queues = \"default\": is named more than once",
            ),
            (
                |c| c.limits.max_params_bytes = 1,
                "limits.max_params_bytes = 1: must be at least 2",
            ),
            (
                |c| c.limits.max_result_bytes = 3,
                "limits.max_result_bytes = 3: must be at least 4",
            ),
            (
                |c| c.limits.max_inputs_bytes = 1024,
                "limits.max_inputs_bytes = 1024: must be at least limits.max_result_bytes (1048576)",
            ),
        ];
        for (change, expected) in cases {
            let mut c = Config::default();
            c.retry.cap_ms = 1_000;
            change(&mut c);
            let found = problems(&c);
            assert!(
                found.len() == 1 && found[0].starts_with(expected),
                "expected one problem starting {expected:?}, got {found:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut c = Config::default();
        c.worker.lease_ms = 0;
        c.dispatcher.sweep_interval_ms = 0;
        let err = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("invalid configuration: "), "{err}");
        assert!(
            err.contains("dispatcher.sweep_interval_ms = 0") && err.contains("worker.lease_ms = 0"),
            "{err}"
        );
    }

    #[test]
    fn the_delivery_limit_only_binds_quorum_queues() {
        let mut c = Config::default();
        c.worker.max_deliveries = 30;
        assert_eq!(problems(&c).len(), 1, "{:?}", problems(&c));
        c.queue_type = QueueType::Classic;
        assert_eq!(problems(&c), Vec::<String>::new());
    }

    #[test]
    fn load_rejects_a_file_with_an_unusable_value() {
        let path = std::env::temp_dir().join(format!("conveyor-cfg-{}.toml", std::process::id()));
        let _ = std::fs::write(&path, "[worker]\nlease_ms = 2\n");
        let err = Config::load(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.contains("worker.lease_ms = 2: must be at least 300"),
            "{err}"
        );
    }

    /// A file the parser refuses is named with the place and the reason,
    /// never with the text of its line: a mistyped key beside a URL, or a
    /// list of URLs written as a TOML array, would print the password.
    #[test]
    fn a_file_that_does_not_parse_is_named_by_place_not_by_its_text() {
        let path =
            std::env::temp_dir().join(format!("conveyor-cfg-parse-{}.toml", std::process::id()));
        for (text, line, column, reason) in [
            (
                "prefix = \"p\"\namqp_uri = \"amqp://app:s3cret@mq/%2f\"\n",
                2,
                1,
                "unknown field `amqp_uri`",
            ),
            (
                "redis_url = [\"redis://:s3cret@a/\", \"redis://:s3cret@b/\"]\n",
                1,
                13,
                "invalid type",
            ),
            ("# é\nredis_url = \"redis://:s3cret@a/\n", 2, 32, "string"),
        ] {
            let _ = std::fs::write(&path, text);
            let err = Config::from_file(&path)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(
                err.contains(&format!("line {line}, column {column}: ")),
                "{err}"
            );
            assert!(err.contains(reason), "{err}");
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        assert!(toml::from_str::<Config>("prefx = \"x\"").is_err());
    }

    #[test]
    fn every_environment_variable_is_in_the_readme_table() {
        let readme = include_str!("../README.md");
        let source = include_str!("config.rs");
        let vars: Vec<&str> = source
            .split('"')
            .filter(|s| {
                s.len() > 9
                    && s.starts_with("CONVEYOR_")
                    && s.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect();
        assert!(vars.len() >= 15, "{vars:?}");
        for var in vars {
            assert!(
                readme.contains(&format!("`{var}`")),
                "README's configuration table lacks {var}"
            );
        }
    }

    #[test]
    fn a_list_splits_at_commas_before_a_scheme_only() {
        assert_eq!(
            split_urls("redis://a:6379/, ,redis://b:6379/,"),
            ["redis://a:6379/", "redis://b:6379/"]
        );
        // A password holding a comma, and a sentinel URL's hosts: one URL.
        assert_eq!(
            split_urls("amqp://app:pa,ss@mq/%2f,amqp://app:pa,ss@mq2/%2f"),
            ["amqp://app:pa,ss@mq/%2f", "amqp://app:pa,ss@mq2/%2f"]
        );
        assert_eq!(
            split_urls("redis+sentinel://s1,s2:26380/svc"),
            ["redis+sentinel://s1,s2:26380/svc"]
        );
        assert!(split_urls(" , ").is_empty());
        // A URL missing its "//" is a URL of its own all the same, to be
        // named as unusable, not a piece of the one before.
        assert_eq!(
            split_urls("amqp://h/%2f, amqp:guest:s3cret@mq/"),
            ["amqp://h/%2f", "amqp:guest:s3cret@mq/"]
        );
    }

    /// A URL whose '@' is missing (the parser refuses it and the error
    /// quotes it) shows no password; hosts and ports, IPv6 ones and a
    /// sentinel's list of nodes, show as they are.
    #[test]
    fn a_password_before_a_missing_at_is_hidden() {
        for (url, shown) in [
            ("amqp://app:S3cret.mq.internal:5672/%2f", "amqp://app:***"),
            ("redis://:S3cret10.0.0.5:6379/", "redis://:***"),
            ("amqp://app:S3cret", "amqp://app:***"),
            ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
            ("redis://[::1]/0", "redis://[::1]/0"),
            (
                "redis+sentinel://s1:26379,s2:26380/svc",
                "redis+sentinel://s1:26379,s2:26380/svc",
            ),
            ("amqp://h:5672?heartbeat=15", "amqp://h:5672?heartbeat=15"),
            // The password's end may look like a path, a query or a node.
            ("amqp://app:pa/ss.mq:5672/", "amqp://app:***"),
            ("amqp://app:pa?ss.mq", "amqp://app:***"),
            ("amqp://app:pa,ss.mq", "amqp://app:***"),
            ("amqp://app:123456", "amqp://app:***"),
            ("redis://h:6379,[::1]:x/", "redis://h:6379,[::1]:***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqps://user:secret@host:5671/vh"),
            "amqps://user:***@host:5671/vh"
        );
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=secret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redact_url("rediss://:pw@h/0"), "rediss://:***@h/0");
        assert_eq!(
            redact_url("amqp://u:a@h1/v, amqp://u:b@h2/v"),
            "amqp://u:***@h1/v,amqp://u:***@h2/v"
        );
        assert_eq!(
            redact_url("redis+sentinel://app:pw@s1,s2:26380/svc?sentinel_password=spw"),
            "redis+sentinel://app:***@s1,s2:26380/svc?sentinel_password=***"
        );
        assert_eq!(
            redact_url("redis+sentinel://s1/svc?sentinel_username=w&sentinel_password=x"),
            "redis+sentinel://s1/svc?sentinel_username=w&sentinel_password=***"
        );
        assert_eq!(
            redact_url("amqp://h/v?heartbeat=15"),
            "amqp://h/v?heartbeat=15"
        );
        assert_eq!(
            redact_url("amqp://app:pa,ss@mq/%2f,amqp://app:x,y,z@mq2/%2f"),
            "amqp://app:***@mq/%2f,amqp://app:***@mq2/%2f"
        );
        // A password holding what ends a URL's parts, unencoded, or a URL
        // without its "//": nothing of the password shows.
        for (url, shown) in [
            ("amqp://guest:pa/ss@host/vh", "amqp://guest:***@host/vh"),
            ("amqp://guest:pa?ss@host/vh", "amqp://guest:***@host/vh"),
            ("amqp://guest:p@ss@host/vh", "amqp://guest:***@host/vh"),
            ("amqp:guest:secret@host/", "amqp:***@host/"),
            ("amqp://user@host/vh", "amqp://user@host/vh"),
            (
                "redis+sentinel://s1/svc?sentinel_password=p@ss",
                "redis+sentinel://s1/svc?sentinel_password=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
