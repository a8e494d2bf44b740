//! Whether this process can do work right now, and the gate that holds new
//! work back while it cannot.
//!
//! When a store call fails because Redis is unreachable, the caller marks
//! the store down; a probe pings it until it answers again. Meanwhile the
//! consumers take no new deliveries (they wait at [`Health::wait_store_up`]),
//! so nothing is acked and nothing is lost: messages stay in the broker or
//! in the prefetch buffer until Redis is back. Readiness (for operators and
//! a later HTTP probe) is the conjunction of store and broker health.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::broker::Broker;
use crate::store::Store;

/// Shared health of one process's store connection.
#[derive(Clone)]
pub struct Health {
    store_up: Arc<watch::Sender<bool>>,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
}

impl Health {
    /// Healthy until told otherwise.
    pub fn new(store: Arc<dyn Store>, broker: Arc<dyn Broker>) -> Health {
        let (tx, _) = watch::channel(true);
        Health {
            store_up: Arc::new(tx),
            store,
            broker,
        }
    }

    /// Whether the store answered last time it was asked.
    pub fn store_up(&self) -> bool {
        *self.store_up.borrow()
    }

    /// Ready to take work: store up and broker connected.
    pub fn is_ready(&self) -> bool {
        self.store_up() && self.broker.is_connected()
    }

    /// A store call failed as unavailable: hold new work back and probe
    /// until the store answers.
    pub fn mark_store_down(&self) {
        let was_up = self.store_up.send_replace(false);
        if !was_up {
            return;
        }
        tracing::warn!("store unreachable: taking no new work until it answers");
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                tokio::time::sleep(delay).await;
                match this.store.ping().await {
                    Ok(()) => {
                        tracing::info!("store reachable again: resuming");
                        this.store_up.send_replace(true);
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "store still unreachable"),
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// Wait until the store is up.
    pub async fn wait_store_up(&self) {
        let mut rx = self.store_up.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }
}
