//! The consume loop the dispatcher and the worker share: subscribe (again
//! after any broker loss, with backoff), take no delivery while the store
//! is down, and hand each delivery on with a permit: once one is free
//! ([`Permits::Wait`]), if one frees within a bound ([`Permits::Within`]),
//! or, for work that only runs with a permit, give deliveries back to the
//! queue when they have waited too long ([`Permits::Hold`]).
//!
//! Deliveries are received while the loop waits for a permit, each with the
//! moment it arrived, so "how long has this message waited here" is known
//! for every delivery the broker has pushed (up to the prefetch), not only
//! for the one at the head.
//!
//! Subscribing afresh after a loss is also what restores the prefetch: a
//! new channel gets its `basic.qos` before its `basic.consume`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, Delivery, Outgoing, Subscription};
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
    /// Each delivery waits for a permit; when one has waited this long,
    /// the consumer stops (cancels its subscription), gives back every
    /// delivery it holds ([`give_back`]: to the queue, for other
    /// consumers, with no delivery counted against them), waits until a
    /// permit is free and subscribes again. For work whose permits may be
    /// held for hours (a worker's long tasks): prefetched deliveries would
    /// otherwise sit here, out of other workers' reach, until RabbitMQ's
    /// `consumer_timeout` closed the channel and requeued them — counting a
    /// delivery each time, until they were treated as poison.
    Hold(&'a Arc<Semaphore>, Duration),
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
/// with its permit (always one under [`Permits::Wait`] and
/// [`Permits::Hold`]) and returns false
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
    let (semaphore, patience) = match permits {
        Permits::Wait(s) => (s, None),
        Permits::Within(s, patience) | Permits::Hold(s, patience) => (s, Some(patience)),
    };
    let holds = matches!(permits, Permits::Hold(..));
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
        // Received and not yet handed on, oldest first, with when each
        // arrived. The delivery comes first, then a permit: a consumer
        // waiting for a permit before its next delivery would keep one
        // from the process's other consumers (a worker's other queues, its
        // submissions), which may be the only ones with work. What is held
        // here when the subscription closes goes back to the queue.
        let mut held: VecDeque<(Instant, Delivery)> = VecDeque::new();
        loop {
            let over = held
                .front()
                .and_then(|&(arrived, _)| patience.map(|p| arrived + p));
            let (idle, room) = (held.is_empty(), held.len() < usize::from(prefetch.max(1)));
            // Nothing is received into an empty hand, nor handed on, while
            // the store is down: it would only come straight back (a claim
            // the store refuses sends its message back to the queue).
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                p = async {
                    health.wait_store_up().await;
                    semaphore.clone().acquire_owned().await
                }, if !idle => {
                    // A closed semaphore: the process is stopping.
                    let Ok(permit) = p else { break };
                    if let Some((_, d)) = held.pop_front()
                        && !hand(d, Some(permit))
                    {
                        break;
                    }
                }
                _ = sleep_until(over), if holds && over.is_some() => {
                    tracing::info!(%queue, held = held.len(),
                        "no free slot for a held delivery in time; giving back what this consumer holds until a slot frees");
                    stop_and_give_back(broker, &mut subscription, held).await;
                    health.set_consuming(queue, false);
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => break 'subscribe,
                        // Subscribe again once a permit is free.
                        p = semaphore.acquire() => if p.is_err() { break 'subscribe },
                    }
                    continue 'subscribe;
                }
                _ = async {
                    sleep_until(over).await;
                    health.wait_store_up().await;
                }, if !holds && over.is_some() => {
                    // Patience over: on without a permit.
                    if let Some((_, d)) = held.pop_front()
                        && !hand(d, None)
                    {
                        break;
                    }
                }
                d = async {
                    if idle {
                        health.wait_store_up().await;
                    }
                    subscription.next().await
                }, if room => match d {
                    Some(Ok(d)) => held.push_back((Instant::now(), d)),
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
                },
            }
        }
        health.set_consuming(queue, false);
        // Stopping: what was received and never started goes back as new
        // messages, not with the channel (each such requeue would count a
        // delivery against it, and a message caught by a few rolling
        // restarts would turn poison without ever having run).
        tracing::info!(%queue, held = held.len(), "stopping; giving back deliveries not started");
        stop_and_give_back(broker, &mut subscription, held).await;
        return Some(subscription);
    }
    None
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Longest wait for the deliveries a cancelled subscription still had on
/// their way (the broker's cancel-ok ends them).
const DRAIN_AFTER_CANCEL: Duration = Duration::from_secs(5);

/// Cancel the subscription, collect what it still delivers, and give
/// everything held back to the queue ([`Permits::Hold`] ran out, or the
/// consumer is stopping).
async fn stop_and_give_back(
    broker: &dyn Broker,
    subscription: &mut Box<dyn Subscription>,
    held: VecDeque<(Instant, Delivery)>,
) {
    let mut deliveries: Vec<Delivery> = held.into_iter().map(|(_, d)| d).collect();
    if subscription.cancel().await.is_ok() {
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(DRAIN_AFTER_CANCEL, subscription.next()).await
        {
            deliveries.push(d);
        }
    }
    give_back(broker, deliveries).await;
}

/// Return deliveries to their queues as new messages: published (and
/// confirmed), then acked. A requeue would count a delivery against each
/// message on a quorum queue, and enough of those make it poison; a new
/// message starts at zero and goes to the back of the queue. If the
/// publish fails, each is requeued instead (duplicates are harmless: a
/// task's claim is keyed by its attempt, a job's record by its id).
pub async fn give_back(broker: &dyn Broker, deliveries: Vec<Delivery>) {
    copy_then_ack(broker, deliveries, None).await;
}

/// Publish a copy of every delivery (its publisher's properties kept) to
/// `queue`, or back to its own queue when `None`; once the broker confirms
/// them, ack the originals. If the publish fails, requeue the originals
/// instead and return false. Nothing is lost either way: a copy confirmed
/// whose original's ack is lost is a duplicate, which every consumer
/// deduplicates.
pub async fn copy_then_ack(
    broker: &dyn Broker,
    deliveries: Vec<Delivery>,
    queue: Option<&str>,
) -> bool {
    match try_copy_then_ack(broker, deliveries, queue).await {
        Ok(()) => true,
        Err((deliveries, e)) => {
            tracing::warn!(error = %e, "publishing copies of deliveries failed; requeueing the originals");
            for d in deliveries {
                if let Err(e) = d.acker.requeue().await {
                    tracing::debug!(error = %e, "a delivery returns with its channel instead");
                }
            }
            false
        }
    }
}

/// [`copy_then_ack`], but if the publish fails the originals, unsettled,
/// come back to the caller with the error, to settle as it sees fit.
pub async fn try_copy_then_ack(
    broker: &dyn Broker,
    deliveries: Vec<Delivery>,
    queue: Option<&str>,
) -> Result<(), (Vec<Delivery>, BrokerError)> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let copies = deliveries
        .iter()
        .map(|d| Outgoing {
            properties: d.properties.for_copy(),
            ..Outgoing::durable(queue.unwrap_or(&d.queue).to_owned(), d.body.clone())
        })
        .collect();
    if let Err(e) = broker.publish(copies).await {
        return Err((deliveries, e));
    }
    for d in deliveries {
        if let Err(e) = d.acker.ack().await {
            tracing::debug!(error = %e, "a delivery returns with its channel instead");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{HeaderValue, Properties};
    use crate::names::Names;

    /// A delivery given back is a new message: its publisher's properties
    /// go with it, the broker's count of its deliveries does not (a copy
    /// that kept `x-delivery-count` would read as redelivered, and on a
    /// quorum queue count toward poison, from its first delivery).
    #[tokio::test]
    async fn a_given_back_delivery_keeps_its_properties_but_not_its_delivery_count() {
        let names = Names::new("t");
        let broker = MemoryBroker::reliable(names.clone());
        broker.declare(&[]).await.unwrap();
        let submit = names.submit_queue();
        let mut msg = Outgoing::durable(submit.clone(), b"{}".to_vec());
        msg.properties = Properties {
            correlation_id: Some("c".into()),
            reply_to: Some("replies".into()),
            message_id: Some("m".into()),
            headers: vec![
                ("tenant".into(), HeaderValue::Text("acme".into())),
                ("x-delivery-count".into(), HeaderValue::Int(2)),
            ],
            ..Properties::json()
        };
        broker.publish(vec![msg.clone()]).await.unwrap();
        let mut sub = broker.subscribe(&submit, 1).await.unwrap();
        let delivery = sub.next().await.unwrap().unwrap();
        sub.cancel().await.unwrap();

        give_back(&broker, vec![delivery]).await;

        let back = broker.take_messages(&submit).await;
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].delivery_count, 0, "a new message");
        let mut expected = msg.properties.clone();
        expected.headers.retain(|(k, _)| k != "x-delivery-count");
        assert_eq!(back[0].properties, expected);
    }
}
