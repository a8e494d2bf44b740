//! Embedded mode: a whole Conveyor — dispatcher, workers, broker, store — in
//! one process, with nothing to install.
//!
//! The broker and store are the in-process implementations of the same
//! traits RabbitMQ and Redis implement; the dispatcher and workers are the
//! production code paths, unchanged. That is what makes the embedded mode
//! worth trusting for development and what lets the simulation tests speak
//! for production logic.
//!
//! What it does not promise: durability (the optional snapshot is written
//! periodically and on clean shutdown, so a crash loses what happened since
//! the last one), more than one process, or RabbitMQ's and Redis's
//! operational behaviour. Production uses RabbitMQ and Redis.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use conveyor_handler::Registry;
use tokio::task::JoinSet;

use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, Outgoing};
use crate::config::Config;
use crate::dispatcher::{Dispatcher, DispatcherOptions};
use crate::health::Health;
use crate::intake::JobIntake;
use crate::names::Names;
use crate::shutdown::ShutdownTrigger;
use crate::store::Store;
use crate::store::memory::{MemoryStore, SystemClock};
use crate::worker::{Worker, WorkerOptions};

/// Embedded settings.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Worker count.
    pub workers: usize,
    /// Concurrency of each worker.
    pub concurrency: usize,
    /// Where to keep the store between runs, if anywhere.
    pub snapshot: Option<PathBuf>,
    /// How often to write the snapshot.
    pub snapshot_every: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            workers: 1,
            concurrency: 8,
            snapshot: None,
            snapshot_every: Duration::from_secs(2),
        }
    }
}

/// A running embedded deployment.
pub struct Embedded {
    store: Arc<MemoryStore>,
    broker: Arc<MemoryBroker>,
    names: Names,
    trigger: ShutdownTrigger,
    tasks: JoinSet<()>,
    snapshot: Option<PathBuf>,
    health: Health,
}

impl Embedded {
    /// Start a dispatcher and workers on an in-process broker and store,
    /// restoring the snapshot if there is one.
    pub async fn start(
        config: &Config,
        registry: Registry,
        options: EmbeddedOptions,
    ) -> anyhow::Result<Embedded> {
        let names = Names::new(&config.prefix);
        let store = Arc::new(
            MemoryStore::new(
                Arc::new(SystemClock),
                Duration::from_secs(config.retention_s),
                u64::from(rand::random::<u32>() >> 1 | 1),
                "embedded",
            )
            .with_max_inputs_bytes(config.limits.max_inputs_bytes as u64),
        );
        if let Some(path) = &options.snapshot
            && path.exists()
        {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read snapshot {}: {e}", path.display()))?;
            store
                .restore(&bytes)
                .map_err(|e| anyhow::anyhow!("snapshot {} is unusable: {e}", path.display()))?;
        }
        let broker = Arc::new(MemoryBroker::reliable(names.clone()));
        // As RabbitMQ's quorum queues: a message returned past the limit is
        // dead-lettered, so dev mode shows what production would.
        if config.queue_type == crate::config::QueueType::Quorum {
            broker.set_delivery_limit(Some(config.delivery_limit));
        }
        broker.declare(&config.worker.queues).await?;
        let trigger = ShutdownTrigger::new();
        let mut tasks = JoinSet::new();
        let intake = JobIntake::new(config, registry.clone())?;
        let dispatcher = Dispatcher::new(
            store.clone(),
            broker.clone(),
            intake.clone(),
            names.clone(),
            DispatcherOptions {
                id: "embedded-dispatcher".into(),
                prefetch: config.dispatcher.prefetch,
                sweep_interval: Duration::from_millis(config.dispatcher.sweep_interval_ms),
                task_queues: config.worker.queues.clone(),
            },
        );
        // Tasks of a restored snapshot may have been queued in the broker
        // that died with the last process: the snapshot names another
        // store, so the dispatcher audits every unfinished job at once
        // (`Store::audit_due`) and its sweep offers their ready and lapsed
        // tasks again, as after a Redis restart.
        let health = dispatcher.health().clone();
        let shutdown = trigger.subscribe();
        tasks.spawn(async move {
            if let Err(e) = dispatcher.run(shutdown).await {
                tracing::error!(error = %e, "embedded dispatcher stopped");
            }
        });
        for n in 0..options.workers.max(1) {
            let worker = Worker::new(
                store.clone(),
                broker.clone(),
                registry.clone(),
                names.clone(),
                WorkerOptions {
                    concurrency: options.concurrency,
                    ..WorkerOptions::from_config(config, format!("embedded-worker-{n}"))
                },
            )
            // Every part shares one registry, so workers can take
            // submissions (one hop fewer) whatever the config says.
            .accepting_submissions(intake.clone());
            let shutdown = trigger.subscribe();
            tasks.spawn(async move {
                if let Err(e) = worker.run(shutdown).await {
                    tracing::error!(error = %e, "embedded worker stopped");
                }
            });
        }
        if let Some(path) = options.snapshot.clone() {
            let store = store.clone();
            let mut shutdown = trigger.subscribe();
            let every = options.snapshot_every;
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    if let Err(e) = write_snapshot(&store, &path) {
                        tracing::warn!(error = %e, "snapshot failed");
                    }
                }
            });
        }
        let embedded = Embedded {
            store,
            broker,
            names,
            trigger,
            tasks,
            snapshot: options.snapshot,
            health,
        };
        Ok(embedded)
    }

    /// The dispatcher's health: what `/readyz` of `conveyor dev` reports.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The store (for status and listing).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The broker (to publish as a client would).
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// Submit a job body exactly as a client would: to `<prefix>.submit`.
    pub async fn submit(&self, body: Vec<u8>) -> anyhow::Result<()> {
        self.broker
            .publish(vec![Outgoing::durable(self.names.submit_queue(), body)])
            .await?;
        Ok(())
    }

    /// Stop gracefully and write the snapshot.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.trigger.trigger();
        while self.tasks.join_next().await.is_some() {}
        if let Some(path) = &self.snapshot {
            write_snapshot(&self.store, path)?;
        }
        Ok(())
    }
}

fn write_snapshot(store: &MemoryStore, path: &std::path::Path) -> anyhow::Result<()> {
    let bytes = store.snapshot()?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write snapshot {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot replace snapshot {}: {e}", path.display()))?;
    Ok(())
}
