//! The dispatcher: turns submissions into recorded jobs and queued tasks,
//! and keeps time-driven work moving (due retries, lapsed leases).
//!
//! It holds nothing it cannot rebuild from Redis, so any number can run at
//! once: every step is an idempotent store transition followed by publishes
//! that are safe to repeat, and a submission is acked only after its job is
//! in Redis and its ready tasks are confirmed by the broker.
//!
//! Outcomes do not pass through the dispatcher: a worker applies its own
//! task's outcome with the same store transition and publishes the tasks it
//! made ready (one broker hop fewer per task; see docs/ARCHITECTURE.md).

mod submit;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::broker::{Broker, BrokerError};
use crate::health::Health;
use crate::intake::JobIntake;
use crate::names::Names;
use crate::outbox::Outbox;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatcherOptions {
    /// Identifies this process in history entries.
    pub id: String,
    /// Unacked submissions handled at once.
    pub prefetch: u16,
    /// How often retries and leases are swept.
    pub sweep_interval: Duration,
    /// Task queues to declare up front.
    pub task_queues: Vec<String>,
}

/// One dispatcher over a broker and a store.
#[derive(Clone)]
pub struct Dispatcher {
    store: Arc<dyn Store>,
    outbox: Outbox,
    intake: JobIntake,
    names: Names,
    options: DispatcherOptions,
    health: Health,
}

/// Why a dispatcher stopped.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    /// The broker failed underneath it; reconnect and run again.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Dispatcher {
    /// A dispatcher; nothing runs until [`Dispatcher::run`].
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        intake: JobIntake,
        names: Names,
        options: DispatcherOptions,
    ) -> Dispatcher {
        Dispatcher {
            health: Health::new(store.clone(), broker.clone()),
            store,
            outbox: Outbox::new(broker, names.clone()),
            intake,
            names,
            options,
        }
    }

    /// Whether the dispatcher can take work (store and broker reachable).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Consume submissions and sweep until `shutdown` fires (returns Ok) or
    /// the broker connection fails (returns the error; the caller
    /// reconnects). In-flight submissions finish before it returns.
    pub async fn run(&self, mut shutdown: Shutdown) -> Result<(), DispatcherError> {
        let broker = self.outbox.broker().clone();
        broker.declare(&self.options.task_queues).await?;
        self.outbox.mark_declared(&self.options.task_queues);
        let mut subscription = broker
            .subscribe(&self.names.submit_queue(), self.options.prefetch)
            .await?;
        tracing::info!(queue = %self.names.submit_queue(), "dispatcher consuming");

        let sweeper = {
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { this.sweep_forever(shutdown).await })
        };

        let permits = Arc::new(Semaphore::new(usize::from(self.options.prefetch.max(1))));
        let mut in_flight = JoinSet::new();
        let result = loop {
            tokio::select! {
                _ = shutdown.wait() => break Ok(()),
                _ = self.health.wait_store_up() => {}
            }
            let permit = tokio::select! {
                _ = shutdown.wait() => break Ok(()),
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break Ok(()),
                },
            };
            let delivery = tokio::select! {
                _ = shutdown.wait() => break Ok(()),
                d = subscription.next() => d,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let this = self.clone();
                    in_flight.spawn(async move {
                        this.handle_submission(delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => break Err(DispatcherError::Broker(e)),
                None => {
                    break Err(DispatcherError::Broker(BrokerError::Unavailable(
                        "submit subscription ended".into(),
                    )));
                }
            }
            while in_flight.try_join_next().is_some() {}
        };
        let _ = subscription.cancel().await;
        while in_flight.join_next().await.is_some() {}
        sweeper.abort();
        result
    }
}
