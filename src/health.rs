//! Whether this process can do work right now, and the gate that holds new
//! work back while it cannot.
//!
//! When a store call fails because Redis is unreachable, the caller marks
//! the store down; a probe pings it until it answers again. Meanwhile the
//! consumers take no new deliveries (they wait at [`Health::wait_store_up`]),
//! so nothing is acked and nothing is lost: messages stay in the broker
//! (after a few seconds the consumers give back what they hold and
//! unsubscribe: see [`crate::consumer`]) until Redis is back.
//!
//! Readiness, served at `/readyz` (see [`crate::http`]), is the conjunction
//! of a live store ping, a connected broker, and a consumer on every queue
//! this process should consume: after a broker reconnect a process is ready
//! again only once its consumers are back, which is the failure operators
//! of other job systems cannot see (workers connected but consuming
//! nothing). With `redis_wait_replicas` set, it also needs that many
//! replicas online (connected and in sync) with the primary: with fewer, every submission waits
//! in the broker, unanswered, and the process looks healthy while doing
//! nothing useful.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::broker::Broker;
use crate::flag::Flag;
use crate::store::{Replicas, Store, StoreError};

/// Shared health of one process's store connection.
#[derive(Clone)]
pub struct Health {
    /// Whether the store is up (see [`Flag`] for why not a `watch`).
    store_up: Arc<Flag>,
    consuming: Arc<Mutex<BTreeMap<String, bool>>>,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// All of the below.
    pub ready: bool,
    /// The store answered a ping just now.
    pub store: bool,
    /// The consumers take new work: false while they are held back after a
    /// store outage, until the outage probe's ping is answered (up to 2 s
    /// after the store answers again).
    pub taking_work: bool,
    /// The broker connection is up.
    pub broker: bool,
    /// Each queue this process consumes, and whether it has a consumer on
    /// it now. Empty until the first subscription.
    pub consuming: BTreeMap<String, bool>,
    /// The replicas job creations wait for and how many are online;
    /// absent when creations wait for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Replicas>,
    /// Why the replicas could not be counted (the store answered its ping,
    /// but not `INFO`: a Redis user not allowed it, say); absent when they
    /// were, or need not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas_error: Option<String>,
}

impl Readiness {
    /// Not ready: the process is still connecting to the broker and store.
    pub fn connecting() -> Readiness {
        Readiness {
            ready: false,
            store: false,
            taking_work: false,
            broker: false,
            consuming: BTreeMap::new(),
            replicas: None,
            replicas_error: None,
        }
    }
}

/// How long a readiness probe waits for the store's ping.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What `task` answered, if it did within [`PING_TIMEOUT`] (and did not
/// panic); else `None`, and the task goes on to its end without anyone
/// waiting for it.
async fn within_probe_time<T>(mut task: tokio::task::JoinHandle<T>) -> Option<T> {
    tokio::time::timeout(PING_TIMEOUT, &mut task)
        .await
        .ok()?
        .ok()
}

impl Health {
    /// Healthy until told otherwise.
    pub fn new(store: Arc<dyn Store>, broker: Arc<dyn Broker>) -> Health {
        Health {
            store_up: Arc::new(Flag::new(true)),
            consuming: Arc::default(),
            store,
            broker,
        }
    }

    /// Whether the store answered last time it was asked.
    pub fn store_up(&self) -> bool {
        self.store_up.get()
    }

    /// Record whether `queue` has a live consumer of this process.
    pub fn set_consuming(&self, queue: &str, live: bool) {
        if let Ok(mut map) = self.consuming.lock() {
            map.insert(queue.to_owned(), live);
        }
    }

    /// Ready to take work: the store answers a ping now (and has the
    /// replicas creations wait for, if any) and the consumers take work
    /// again after an outage (their gate reopens at the outage probe's next
    /// answer, up to 2 s after the store's), the broker is connected, and
    /// every queue has its consumer. A ping failed for want of the store
    /// (not an ACL refusal), also one that fails after the probe gave up
    /// on it, marks the store down, so an idle process stops taking work
    /// too, as a busy one would.
    pub async fn readiness(&self) -> Readiness {
        // Each in a task of its own, which goes on to its end past the
        // probe's time: a ping that takes longer (Redis cut off without a
        // reset: the connect waits 5 s, an answer 10 s) still marks the
        // store down when it fails, so an idle process stops taking work
        // as a busy one would (an ACL refusal is no outage of the store);
        // and a publishing connection lost while the process was idle (its
        // consumers, on their own connection, may be live) is made again,
        // not dropped part-way and begun afresh by the next probe (a node
        // that swallows packets, many queues to declare again).
        let (store, health) = (self.store.clone(), self.clone());
        let probing = tokio::spawn(async move {
            if let Err(e) = store.ping().await {
                if matches!(e, StoreError::Unavailable(_)) {
                    health.mark_store_down();
                }
                return Err(e);
            }
            Ok::<_, StoreError>(store.replicas().await)
        });
        let broker = self.broker.clone();
        let reconnecting = tokio::spawn(async move { broker.ensure_connected().await });
        let (probed, reconnected) =
            tokio::join!(within_probe_time(probing), within_probe_time(reconnecting));
        let (store, replicas, replicas_error) = match probed {
            Some(Ok(Ok(replicas))) => (true, replicas, None),
            Some(Ok(Err(e))) => (true, None, Some(e.to_string())),
            Some(Err(_)) | None => (false, None, None),
        };
        let broker = matches!(reconnected, Some(Ok(()))) && self.broker.is_connected();
        let consuming = self.consuming.lock().map(|m| m.clone()).unwrap_or_default();
        let taking_work = self.store_up();
        let ready = store
            && taking_work
            && replicas.is_none_or(|r| r.enough())
            && replicas_error.is_none()
            && broker
            && !consuming.is_empty()
            && consuming.values().all(|c| *c);
        Readiness {
            ready,
            store,
            taking_work,
            broker,
            consuming,
            replicas,
            replicas_error,
        }
    }

    /// A store call failed as unavailable: hold new work back and probe
    /// until the store answers.
    pub fn mark_store_down(&self) {
        let was_up = self.store_up.set(false);
        if !was_up {
            return;
        }
        tracing::warn!("store unreachable: taking no new work until it answers");
        let this = self.clone();
        tokio::spawn(async move {
            // Seeded alike in every process (a simulation replays
            // exactly): the pings after an outage are not spread.
            let mut waits = crate::backoff::Reconnect::seeded(
                Duration::from_millis(100),
                Duration::from_secs(2),
                "store ping",
            );
            loop {
                tokio::time::sleep(waits.next_delay()).await;
                match this.store.ping().await {
                    Ok(()) => {
                        tracing::info!("store reachable again: resuming");
                        this.store_up.set(true);
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "store still unreachable"),
                }
            }
        });
    }

    /// Wait until the store is up.
    pub async fn wait_store_up(&self) {
        self.store_up.wait_for(true).await;
    }

    /// Wait until the store is marked down.
    pub async fn wait_store_down(&self) {
        self.store_up.wait_for(false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::names::Names;
    use crate::store::memory::{MemoryStore, SystemClock};

    fn parts() -> (Arc<MemoryStore>, Arc<MemoryBroker>, Health) {
        let store = Arc::new(MemoryStore::new(
            Arc::new(SystemClock),
            Duration::from_secs(60),
            1,
            "test",
        ));
        let broker = Arc::new(MemoryBroker::reliable(Names::new("t")));
        let health = Health::new(store.clone(), broker.clone());
        (store, broker, health)
    }

    #[tokio::test]
    async fn not_ready_until_every_queue_has_its_consumer() {
        let (_, _, health) = parts();
        assert!(!health.readiness().await.ready, "no consumer yet");
        health.set_consuming("t.submit", false);
        health.set_consuming("t.tasks.default", true);
        let r = health.readiness().await;
        assert!(!r.ready && r.store && r.broker, "{r:?}");
        health.set_consuming("t.submit", true);
        assert!(health.readiness().await.ready);
    }

    // Paused: the outage probe's first ping (50 ms or more after the
    // outage is seen) waits until the test itself waits.
    #[tokio::test(start_paused = true)]
    async fn a_store_outage_makes_it_unready_and_holds_new_work_back() {
        let (store, _, health) = parts();
        health.set_consuming("t.submit", true);
        store.set_outage(true);
        let r = health.readiness().await;
        assert!(!r.ready && !r.store && r.broker, "{r:?}");
        assert!(!health.store_up(), "a failed probe gates consumption too");
        store.set_outage(false);
        // The store answers, but the consumers' gate is still shut until
        // the outage probe reopens it: not ready yet.
        let r = health.readiness().await;
        assert!(r.store && !r.taking_work && !health.store_up(), "{r:?}");
        assert!(!r.ready, "ready while consumption is held back: {r:?}");
        tokio::time::timeout(Duration::from_secs(5), health.wait_store_up())
            .await
            .unwrap_or_else(|_| panic!("store never came back up"));
        assert!(health.readiness().await.ready);
    }

    #[tokio::test]
    async fn a_broker_outage_makes_it_unready() {
        let (_, broker, health) = parts();
        health.set_consuming("t.submit", true);
        broker.set_outage(true);
        let r = health.readiness().await;
        assert!(!r.ready && r.store && !r.broker, "{r:?}");
    }
}
