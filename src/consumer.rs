//! The consume loop the dispatcher and the worker share: subscribe (again
//! after any broker loss, with backoff), take no delivery while the store
//! is down, and hand each delivery on with a permit: once one is free
//! ([`Permits::Wait`]), or if one frees within a bound ([`Permits::Within`]).
//!
//! Subscribing afresh after a loss is also what restores the prefetch: a
//! new channel gets its `basic.qos` before its `basic.consume`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::broker::{Broker, Delivery, Subscription};
use crate::health::Health;
use crate::shutdown::Shutdown;

/// How a consumer pairs its deliveries with the process's permits.
#[derive(Clone, Copy)]
pub enum Permits<'a> {
    /// Each delivery waits for a permit (work that must hold one).
    Wait(&'a Arc<Semaphore>),
    /// Each delivery waits for a permit at most this long, and goes on
    /// without one after that (work that can be done another way then: a
    /// worker's submission is then handled as a dispatcher would).
    Within(&'a Arc<Semaphore>, Duration),
}

/// One consumer: its queue, prefetch, consumer priority (see
/// [`Broker::subscribe_with_priority`]) and permits.
#[derive(Clone, Copy)]
pub struct Consumer<'a> {
    /// The queue (full name).
    pub queue: &'a str,
    /// Most unacked deliveries.
    pub prefetch: u16,
    /// Consumer priority; 0 is the default.
    pub priority: i16,
    /// How deliveries get their permit.
    pub permits: Permits<'a>,
}

/// Consume as `consumer` says until `shutdown`; `hand` takes each delivery
/// with its permit (always one under [`Permits::Wait`]) and returns false
/// to stop. Returns the last subscription, cancelled, so its unfinished
/// deliveries stay with the caller until it drops it.
pub async fn consume(
    broker: &dyn Broker,
    consumer: Consumer<'_>,
    health: &Health,
    shutdown: &mut Shutdown,
    mut hand: impl FnMut(Delivery, Option<OwnedSemaphorePermit>) -> bool,
) -> Option<Box<dyn Subscription>> {
    let Consumer {
        queue,
        prefetch,
        priority,
        permits,
    } = consumer;
    health.set_consuming(queue, false);
    let mut retry_delay = Duration::from_millis(100);
    'subscribe: while !shutdown.is_triggered() {
        let mut subscription = match broker
            .subscribe_with_priority(queue, prefetch, priority)
            .await
        {
            Ok(s) => {
                tracing::info!(%queue, prefetch, priority, "consuming");
                health.set_consuming(queue, true);
                retry_delay = Duration::from_millis(100);
                s
            }
            Err(e) => {
                tracing::warn!(%queue, error = %e, "cannot subscribe; retrying");
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break 'subscribe,
                    _ = tokio::time::sleep(retry_delay) => {}
                }
                retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = health.wait_store_up() => {}
            }
            let delivery = tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                d = subscription.next() => d,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    // The delivery first, then a permit: a consumer waiting
                    // for a permit before its next delivery would keep one
                    // from the process's other consumers (a worker's other
                    // queues, its submissions), which may be the only ones
                    // with work. A delivery given up here stays unacked and
                    // goes back when the subscription closes.
                    let (semaphore, patience) = match permits {
                        Permits::Wait(s) => (s, None),
                        Permits::Within(s, patience) => (s, Some(patience)),
                    };
                    let acquire = semaphore.clone().acquire_owned();
                    let permit = tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        p = async {
                            match patience {
                                Some(patience) => tokio::time::timeout(patience, acquire).await.ok(),
                                None => Some(acquire.await),
                            }
                        } => match p {
                            Some(Ok(p)) => Some(p),
                            // The semaphore closed: the process is stopping.
                            Some(Err(_)) => break,
                            // Patience over: on without a permit.
                            None => None,
                        },
                    };
                    if !hand(delivery, permit) {
                        break;
                    }
                }
                Some(Err(e)) => {
                    health.set_consuming(queue, false);
                    tracing::warn!(%queue, error = %e, "subscription failed; subscribing again");
                    continue 'subscribe;
                }
                None => {
                    health.set_consuming(queue, false);
                    tracing::warn!(%queue, "subscription ended; subscribing again");
                    continue 'subscribe;
                }
            }
        }
        health.set_consuming(queue, false);
        let _ = subscription.cancel().await;
        return Some(subscription);
    }
    None
}
