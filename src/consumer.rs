//! The consume loop the dispatcher and the worker share: subscribe (again
//! after any broker loss, with backoff), take no delivery while the store
//! is down, and hand each delivery on with a permit once one is free.
//!
//! Subscribing afresh after a loss is also what restores the prefetch: a
//! new channel gets its `basic.qos` before its `basic.consume`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::broker::{Broker, Delivery, Subscription};
use crate::health::Health;
use crate::shutdown::Shutdown;

/// Consume `queue` at consumer `priority` (see
/// [`Broker::subscribe_with_priority`]) until `shutdown`; `hand` takes each
/// delivery with the permit it holds and returns false to stop. Returns
/// the last subscription, cancelled, so its unfinished deliveries stay
/// with the caller until it drops it.
#[allow(clippy::too_many_arguments)]
pub async fn consume(
    broker: &dyn Broker,
    queue: &str,
    prefetch: u16,
    priority: i16,
    permits: &Arc<Semaphore>,
    health: &Health,
    shutdown: &mut Shutdown,
    mut hand: impl FnMut(Delivery, OwnedSemaphorePermit) -> bool,
) -> Option<Box<dyn Subscription>> {
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
                    let permit = tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
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
