//! Building the real parts from a [`Config`]: the Redis store and the AMQP
//! broker, and the service loops that keep a dispatcher or worker running
//! through outages until shutdown.

use std::sync::Arc;
use std::time::Duration;

use conveyor_handler::Registry;

use crate::backoff::Reconnect;
use crate::broker::amqp::{AmqpBroker, Topology};
use crate::broker::{Broker, BrokerError};
use crate::config::{Config, ConfigError, TlsCa, redact_url};
use crate::dispatcher::{Dispatcher, DispatcherError, DispatcherOptions};
use crate::http::ProbeServer;
use crate::intake::JobIntake;
use crate::names::Names;
use crate::shutdown::Shutdown;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::worker::{Worker, WorkerOptions};

/// Longest wait, once the main future has finished, for the runtime's
/// blocking tasks to end before [`block_on`] returns anyway.
pub const RUNTIME_STOP: Duration = Duration::from_secs(5);

/// Run `main` to its end on a runtime of `threads` threads (`runtime_threads`
/// in the config: 0 = one per core; 1 = everything on this thread, fewer
/// cross-thread wake-ups per message at the price of handlers that must not
/// block), then stop the runtime.
///
/// A process's `main` should use this rather than `#[tokio::main]`, whose
/// runtime, when dropped, waits for every blocking task with no bound: a
/// handler's `spawn_blocking` stuck on a file or a lookup would keep a
/// stopped worker from exiting after its tasks were handed back. Here
/// such a task gets [`RUNTIME_STOP`], then is left behind, and the process
/// can exit.
pub fn block_on<F: Future>(threads: usize, main: F) -> std::io::Result<F::Output> {
    let runtime = match threads {
        0 => tokio::runtime::Runtime::new()?,
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    let output = runtime.block_on(main);
    runtime.shutdown_timeout(RUNTIME_STOP);
    Ok(output)
}

/// How to start the services when a connection cannot be made.
pub const START_HINT: &str = "start them with `rabbitmq-server -detached` and \
`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`, \
or point CONVEYOR_AMQP_URL / CONVEYOR_REDIS_URL at running ones";

/// Connect the Redis store (reading `tls_ca_file` if set).
pub async fn redis_store(config: &Config, by: &str, pool: usize) -> Result<RedisStore, StoreError> {
    let tls_ca = config
        .tls_ca()
        .map_err(|e| StoreError::Protocol(e.to_string()))?;
    connect_store(config, tls_ca.as_ref(), by, pool).await
}

/// Connect the Redis store for reading only (see
/// [`RedisStore::connect_read_only`]): what the one-shot commands use.
pub async fn redis_store_read_only(config: &Config, by: &str) -> Result<RedisStore, StoreError> {
    let tls_ca = config
        .tls_ca()
        .map_err(|e| StoreError::Protocol(e.to_string()))?;
    RedisStore::connect_read_only(
        &config.redis_url,
        tls_ca.as_ref(),
        Names::new(&config.prefix),
        by,
    )
    .await
}

async fn connect_store(
    config: &Config,
    tls_ca: Option<&TlsCa>,
    by: &str,
    pool: usize,
) -> Result<RedisStore, StoreError> {
    let store = RedisStore::connect(
        &config.redis_url,
        tls_ca,
        Names::new(&config.prefix),
        Duration::from_secs(config.retention_s),
        pool,
        by,
    )
    .await?;
    Ok(store
        .with_max_inputs_bytes(config.limits.max_inputs_bytes as u64)
        .with_replica_wait(
            config.redis_wait_replicas,
            Duration::from_millis(config.redis_wait_timeout_ms),
        ))
}

/// Connect the AMQP broker (reading `tls_ca_file` if set).
pub async fn amqp_broker(config: &Config) -> Result<AmqpBroker, BrokerError> {
    let tls_ca = config
        .tls_ca()
        .map_err(|e| BrokerError::Fatal(e.to_string()))?;
    connect_broker(config, tls_ca.as_ref()).await
}

async fn connect_broker(
    config: &Config,
    tls_ca: Option<&TlsCa>,
) -> Result<AmqpBroker, BrokerError> {
    AmqpBroker::connect(
        &config.amqp_url,
        tls_ca,
        Topology {
            names: Names::new(&config.prefix),
            queue_type: config.queue_type,
            delivery_limit: config.delivery_limit,
        },
    )
    .await
}

/// Connect both, retrying with backoff until they answer or `shutdown`
/// (`None`). A `tls_ca_file` that cannot be used fails at once: waiting
/// will not mend it.
pub async fn connect_until_up(
    config: &Config,
    by: &str,
    pool: usize,
    shutdown: &Shutdown,
) -> Result<Option<(Arc<dyn Store>, Arc<dyn Broker>)>, ConfigError> {
    let tls_ca = config.tls_ca()?;
    let mut waits = Reconnect::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        // (what failed, whether it looks like an outage)
        let attempt = async {
            let store = connect_store(config, tls_ca.as_ref(), by, pool)
                .await
                .map_err(|e| {
                    let what = format!("Redis at {}: {e}", redact_url(&config.redis_url));
                    // An ACL refusal waits for an operator, not for Redis
                    // to start: no hint to start it.
                    let outage = matches!(e, StoreError::Unavailable(_));
                    (what, outage)
                })?;
            let broker = connect_broker(config, tls_ca.as_ref()).await.map_err(|e| {
                let what = format!("RabbitMQ at {}: {e}", redact_url(&config.amqp_url));
                (what, e.is_retryable())
            })?;
            Ok::<_, (String, bool)>((
                Arc::new(store) as Arc<dyn Store>,
                Arc::new(broker) as Arc<dyn Broker>,
            ))
        };
        // A connect may take long (a node that takes the socket and never
        // answers the handshake: 10 s each); a stop does not wait for it.
        let mut s = shutdown.clone();
        let attempt = tokio::select! {
            biased;
            _ = s.wait() => return Ok(None),
            attempt = attempt => attempt,
        };
        match attempt {
            Ok(parts) => return Ok(Some(parts)),
            // An outage gets the how-to-start hint; anything else (a Redis
            // too old for the function library, refused credentials) is
            // reported as it is, and retried in case it is passing.
            Err((e, true)) => tracing::warn!("not connected yet: {e}; {START_HINT}"),
            Err((e, false)) => tracing::error!("cannot start: {e}; retrying"),
        }
        let mut s = shutdown.clone();
        tokio::select! {
            _ = s.wait() => return Ok(None),
            _ = tokio::time::sleep(waits.next_delay()) => {}
        }
    }
}

/// Run a dispatcher until shutdown, riding out broker and store outages.
pub async fn run_dispatcher(
    config: &Config,
    registry: Registry,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Again here: command-line flags and code may have changed the config
    // since it was loaded.
    config.validate()?;
    let id = format!("dispatcher-{}", crate::worker::new_worker_id());
    let probes = ProbeServer::start_if(config.http_addr).await?;
    let Some((store, broker)) = connect_until_up(config, &id, 8, &shutdown).await? else {
        return Ok(());
    };
    let intake = JobIntake::new(config, registry)?;
    let dispatcher = Dispatcher::new(
        store,
        broker,
        intake,
        Names::new(&config.prefix),
        DispatcherOptions {
            id,
            prefetch: config.dispatcher.prefetch,
            sweep_interval: Duration::from_millis(config.dispatcher.sweep_interval_ms),
            task_queues: config.worker.queues.clone(),
        },
    );
    if let Some(p) = &probes {
        p.attach(dispatcher.health().clone());
    }
    let mut waits = Reconnect::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let e = match dispatcher.run(shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match &e {
            // Refused for good (a base queue that exists with other
            // arguments, a user without the right): tried again, as an
            // operator may mend it, but said plainly.
            DispatcherError::Broker(b) if !b.is_retryable() => {
                tracing::error!(error = %e, "dispatcher cannot start; trying again");
            }
            _ => tracing::warn!(error = %e, "dispatcher interrupted; resuming"),
        }
        let mut s = shutdown.clone();
        tokio::select! {
            _ = s.wait() => return Ok(()),
            _ = tokio::time::sleep(waits.next_delay()) => {}
        }
    }
}

/// Run a worker until shutdown, riding out broker and store outages.
pub async fn run_worker(
    config: &Config,
    registry: Registry,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Again here: command-line flags and code may have changed the config
    // since it was loaded. A worker with nothing to consume is refused
    // there too, as a configuration error (exit 2, as from the file).
    config.validate_worker()?;
    if config.queue_type == crate::config::QueueType::Classic {
        tracing::warn!(
            "queue_type = classic: RabbitMQ counts no redeliveries on classic queues, so \
             poison messages (ones that kill a worker before its claim) are not detected"
        );
    }
    let id = crate::worker::new_worker_id();
    let journal = match std::env::var_os("CONVEYOR_JOURNAL") {
        Some(path) => Some(crate::worker::Journal::open(
            std::path::Path::new(&path),
            &id,
        )?),
        None => None,
    };
    let probes = ProbeServer::start_if(config.http_addr).await?;
    let Some((store, broker)) = connect_until_up(config, &id, 4, &shutdown).await? else {
        return Ok(());
    };
    let intake = if config.worker.accept_submissions {
        Some(JobIntake::new(config, registry.clone())?)
    } else {
        None
    };
    let mut worker = Worker::new(
        store,
        broker,
        registry,
        Names::new(&config.prefix),
        WorkerOptions {
            journal,
            ..WorkerOptions::from_config(config, id)
        },
    );
    if let Some(intake) = intake {
        worker = worker.accepting_submissions(intake);
    }
    if let Some(p) = &probes {
        p.attach(worker.health().clone());
    }
    let mut waits = Reconnect::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match worker.run(shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "worker could not start; retrying");
                let mut s = shutdown.clone();
                tokio::select! {
                    _ = s.wait() => return Ok(()),
                    _ = tokio::time::sleep(waits.next_delay()) => {}
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::shutdown::ShutdownTrigger;

    /// Until the thirty-second session a node URL lapin's parser refuses
    /// (here one without its `//`, in a config that skipped validation)
    /// failed every connect with the parser's own text, `Invalid URL:
    /// '<the whole URL>'`, password included, logged at every retry.
    #[tokio::test]
    async fn a_connect_to_a_url_the_parser_refuses_names_it_redacted() {
        let config = Config {
            amqp_url: "amqp:guest:s3cret@mq/".into(),
            ..Config::default()
        };
        let err = amqp_broker(&config).await.err();
        // Not an outage: waiting would not mend it.
        assert!(matches!(err, Some(BrokerError::Fatal(_))), "{err:?}");
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(
            err.contains("amqp_url amqp:***@mq/")
                && err.contains("is the `//` after `amqp:` missing?"),
            "{err}"
        );
    }

    /// A stop does not wait for a connect under way: here to a RabbitMQ
    /// node that takes the socket and never answers the handshake (given
    /// up on after 10 s), with Redis up.
    #[tokio::test]
    async fn a_stop_ends_the_wait_for_a_connect_under_way() {
        let (amqp_url, silent) = crate::broker::amqp::silent_node().await;
        let config = Config {
            amqp_url,
            prefix: format!("test-runtime-{}", std::process::id()),
            ..Config::default()
        };
        // Redis must answer, or the connect would fail at once and the
        // stop end only the pause before the next.
        let redis = redis::Client::open(config.redis_url.as_str()).unwrap();
        if let Err(e) = redis.get_multiplexed_async_connection().await {
            panic!(
                "cannot reach Redis at {}: {e}; {START_HINT}",
                config.redis_url
            );
        }
        let trigger = ShutdownTrigger::new();
        let shutdown = trigger.subscribe();
        let stop = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            trigger.trigger();
        });
        let started = std::time::Instant::now();
        let connected = connect_until_up(&config, "test", 1, &shutdown).await;
        let waited = started.elapsed();
        silent.abort();
        stop.await.unwrap();
        assert!(
            matches!(connected, Ok(None)),
            "connected to a listener that never spoke AMQP"
        );
        assert!(
            waited < Duration::from_secs(5),
            "the stop waited {waited:?} for the connect"
        );
        let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("DEL")
            .arg(Names::new(&config.prefix).epoch_key())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
