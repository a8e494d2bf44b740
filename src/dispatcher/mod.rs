//! The dispatcher: turns submissions into recorded jobs and queued tasks,
//! and keeps time-driven work moving (due retries, lapsed leases, the
//! audit after a Redis server change).
//!
//! It holds nothing it cannot rebuild from Redis, so any number can run at
//! once: every step is an idempotent store transition followed by publishes
//! that are safe to repeat, and a submission is acked only after its job is
//! in Redis and its ready tasks are confirmed by the broker.
//!
//! Outcomes do not pass through the dispatcher: a worker applies its own
//! task's outcome with the same store transition and publishes the tasks it
//! made ready (one broker hop fewer per task; see docs/ARCHITECTURE.md).

mod audit;
mod prune;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::broker::{Broker, BrokerError, Subscription};
use crate::consumer::{Consumer, Permits, consume};
use crate::health::Health;
use crate::intake::JobIntake;
use crate::names::Names;
use crate::outbox::Outbox;
use crate::panics::{RESTART_PAUSE, restart_on_panic};
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::submission::Submissions;

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
    submissions: Submissions,
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
        let health = Health::new(store.clone(), broker.clone());
        let outbox = Outbox::new(broker, names.clone());
        Dispatcher {
            submissions: Submissions {
                store: store.clone(),
                outbox: outbox.clone(),
                intake,
                health: health.clone(),
                refer_refusals: false,
            },
            health,
            store,
            outbox,
            names,
            options,
        }
    }

    /// Whether the dispatcher can take work (store and broker reachable).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Consume submissions and sweep until `shutdown` fires. Broker losses
    /// are ridden out: the subscription is made again (with its prefetch)
    /// on a fresh connection. In-flight submissions finish before it
    /// returns. Fails only if the topology cannot be declared at start.
    pub async fn run(&self, shutdown: Shutdown) -> Result<(), DispatcherError> {
        // A task queue that exists with other arguments is used as it is:
        // one refused for good kept the dispatcher from starting, and
        // every sweep with it, retried for ever as if it were an outage.
        self.outbox
            .declare_topology(&self.options.task_queues)
            .await?;

        // Owned by this future: dropping it (a simulated crash) stops the
        // sweep. Each loop is started again if it panics (see `panics.rs`).
        let mut sweeper = JoinSet::new();
        {
            let (this, stop) = (self.clone(), shutdown.clone());
            sweeper.spawn(restart_on_panic("sweep", RESTART_PAUSE, move || {
                let (this, stop) = (this.clone(), stop.clone());
                async move { this.sweep_forever(stop).await }
            }));
            let (this, stop) = (self.clone(), shutdown.clone());
            sweeper.spawn(restart_on_panic("prune", RESTART_PAUSE, move || {
                let (this, stop) = (this.clone(), stop.clone());
                async move { this.prune_forever(stop).await }
            }));
            let (this, stop) = (self.clone(), shutdown.clone());
            sweeper.spawn(restart_on_panic("audit", RESTART_PAUSE, move || {
                let (this, stop) = (this.clone(), stop.clone());
                async move { this.audit_forever(stop).await }
            }));
        }
        let permits = Arc::new(Semaphore::new(usize::from(self.options.prefetch.max(1))));
        // Clients' submissions, and those workers referred here (see
        // `submission.rs`): one pool of permits for both.
        let (submitted, referred) = tokio::join!(
            self.consume_submissions(self.names.submit_queue(), &permits, shutdown.clone()),
            self.consume_submissions(self.names.referred_queue(), &permits, shutdown.clone()),
        );
        crate::broker::close_all(submitted.into_iter().chain(referred).collect()).await;
        sweeper.abort_all();
        Ok(())
    }

    /// Consume one queue of submissions until `shutdown` fires; returns
    /// once the submissions in flight are handled, with the cancelled
    /// subscriptions (kept until then, so nothing is handed back early).
    async fn consume_submissions(
        &self,
        queue: String,
        permits: &Arc<Semaphore>,
        mut shutdown: Shutdown,
    ) -> Vec<Box<dyn Subscription>> {
        let broker = self.outbox.broker().clone();
        let mut in_flight = JoinSet::new();
        let stopping = shutdown.clone();
        let subscription = consume(
            broker.as_ref(),
            Consumer {
                queue: &queue,
                owner: &self.options.id,
                prefetch: self.options.prefetch,
                priority: 0,
                permits: Permits::Wait(permits),
                store_down_give_back: crate::consumer::STORE_DOWN_GIVE_BACK,
            },
            &self.health,
            &mut shutdown,
            |delivery, permit| {
                let (this, stopping) = (self.clone(), stopping.clone());
                in_flight.spawn(async move {
                    this.submissions
                        .handle(delivery, None, Some(&stopping))
                        .await;
                    drop(permit);
                });
                while let Some(done) = in_flight.try_join_next() {
                    crate::consumer::log_if_panicked(done);
                }
                true
            },
        )
        .await;
        while let Some(done) = in_flight.join_next().await {
            crate::consumer::log_if_panicked(done);
        }
        subscription
    }
}
