//! Configuration: one struct with serde defaults, read from a TOML file and
//! then overridden by `CONVEYOR_*` environment variables. Every field's doc
//! comment is the README's configuration table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

/// Everything a Conveyor process can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// AMQP URL (`amqp://` or `amqps://`), or several separated by commas
    /// (the nodes of one cluster, tried in turn). Env `CONVEYOR_AMQP_URL`.
    pub amqp_url: String,
    /// Redis URL (`redis://` or `rediss://`). Env `CONVEYOR_REDIS_URL`.
    pub redis_url: String,
    /// PEM file of a private CA for `amqps://` and `rediss://`, read when
    /// connecting: Redis then trusts only it, RabbitMQ it and the system's
    /// roots. Without it the system roots are used (webpki's for Redis).
    /// Env `CONVEYOR_TLS_CA_FILE` (empty turns it off).
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every queue and key. Env `CONVEYOR_PREFIX`.
    pub prefix: String,
    /// Largest submit message accepted, in bytes. Env `CONVEYOR_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: usize,
    /// How long finished jobs are kept, in seconds. Env `CONVEYOR_RETENTION_S`.
    pub retention_s: u64,
    /// `pretty` or `json` logs. Env `CONVEYOR_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// AMQP queue type for submit and task queues: `quorum` or `classic`.
    /// Env `CONVEYOR_QUEUE_TYPE`.
    pub queue_type: QueueType,
    /// Broker-side delivery limit of task queues (quorum queues only): a
    /// message delivered this often is dead-lettered by RabbitMQ itself.
    /// Env `CONVEYOR_DELIVERY_LIMIT`.
    pub delivery_limit: u32,
    /// Async runtime threads of a `conveyor` process: 1 (the default) runs
    /// everything on one thread, which saves a cross-thread wake-up per
    /// message (about 15-20% more throughput here) but needs handlers that
    /// never block; 0 = one thread per core; n = n threads. Env
    /// `CONVEYOR_RUNTIME_THREADS`.
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
    /// Unacked submissions in flight per dispatcher. Env `CONVEYOR_DISPATCHER_PREFETCH`.
    pub prefetch: u16,
    /// How often retries and lapsed leases are swept, in milliseconds.
    /// Env `CONVEYOR_SWEEP_INTERVAL_MS`.
    pub sweep_interval_ms: u64,
}

/// Worker settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Queues consumed (without prefix). Env `CONVEYOR_QUEUES` (comma-separated).
    pub queues: Vec<String>,
    /// Handlers run at once. Env `CONVEYOR_CONCURRENCY`.
    pub concurrency: usize,
    /// Lease of a claim in milliseconds; renewed every third of it while the
    /// handler runs. Env `CONVEYOR_LEASE_MS`.
    pub lease_ms: u64,
    /// How long SIGTERM waits for running handlers, in seconds. Env `CONVEYOR_GRACE_S`.
    pub grace_s: u64,
    /// Heartbeat of the worker registry, in milliseconds.
    pub heartbeat_ms: u64,
    /// Deliveries of one task message without an outcome before it is
    /// treated as poison (dead-lettered, task failed). Keep it below
    /// `delivery_limit`, the broker's own backstop. Env `CONVEYOR_MAX_DELIVERIES`.
    pub max_deliveries: u32,
}

/// Default retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Most attempts including the first. Env `CONVEYOR_MAX_ATTEMPTS`.
    pub max_attempts: u32,
    /// Backoff base in milliseconds. Env `CONVEYOR_BACKOFF_BASE_MS`.
    pub base_ms: u64,
    /// Backoff cap in milliseconds. Env `CONVEYOR_BACKOFF_CAP_MS`.
    pub cap_ms: u64,
    /// Default run time-out of one attempt in seconds. Env `CONVEYOR_TIMEOUT_S`.
    pub timeout_s: f64,
}

/// Limits on submitted jobs; each error names the field and the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most tasks in one job.
    pub max_tasks: usize,
    /// Longest job id, task name, queue, handler name, requestor.
    pub max_name_len: usize,
    /// Most labels on a job.
    pub max_labels: usize,
    /// Largest params of one task, in bytes of JSON.
    pub max_params_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
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
            max_name_len: 128,
            max_labels: 64,
            max_params_bytes: 256 * 1024,
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
    /// The file is not valid TOML for this struct.
    #[error("config file {path} is invalid: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: Box<toml::de::Error>,
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
}

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
        Ok(config)
    }

    /// Parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
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
            self.worker.queues = v
                .split(',')
                .map(str::trim)
                .filter(|q| !q.is_empty())
                .map(String::from)
                .collect();
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
        Ok(())
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

/// The URLs of a comma-separated list, trimmed, empty ones dropped.
pub fn split_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// `url` (or a comma-separated list of them) with any password replaced
/// by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return split_urls(url)
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_owned(),
    }
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
        ]
        .into();
        c.apply_env(|k| env.get(k).map(|v| v.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.prefix, "fromenv");
        assert_eq!(c.worker.queues, vec!["a", "b"]);
        assert_eq!(c.worker.concurrency, 7);
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
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqps://user:secret@host:5671/vh"),
            "amqps://user:***@host:5671/vh"
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
    }
}
