//! The consume loop the dispatcher and the worker share: subscribe (again
//! after any broker loss, with backoff), take no delivery while the store
//! is down, and hand each delivery on with a permit: once one is free
//! ([`Permits::Wait`]), if one frees within a bound ([`Permits::Within`]),
//! or, for work that only runs with a permit, give deliveries back to the
//! queue when they have waited too long ([`Permits::Hold`]), or keep
//! them, still handing them on as permits free, while the queue refuses
//! them back (at a length limit).
//!
//! Deliveries are received while the loop waits for a permit, each with the
//! moment it arrived, so "how long has this message waited here" is known
//! for every delivery the broker has pushed (up to the prefetch), not only
//! for the one at the head.
//!
//! While the store is down nothing is handed on (a claim or a record
//! would only fail), and once it has been down for a while
//! ([`Consumer::store_down_give_back`]) the consumer gives back what it holds and
//! cancels its subscription until the store answers: subscribed, it would
//! keep a prefetch of messages that a process still reaching the store
//! could run (RabbitMQ pushes them whether or not the loop takes them).
//!
//! Subscribing afresh after a loss is also what restores the prefetch: a
//! new channel gets its `basic.qos` before its `basic.consume`.
//!
//! A [`Permits::Hold`] consumer that had to give back what it held (its
//! permits all taken by long work) subscribes again with a prefetch no
//! wider than the permits free at that moment, and widens it as more free.
//! With its full prefetch, every slot that freed in a saturated worker would
//! pull a whole prefetch of messages out of the queue, run one, keep the
//! rest out of other workers' reach for the patience, and then send them to
//! the back of the queue: work would circulate, and lose its order, instead
//! of waiting its turn. RabbitMQ applies a consumer's prefetch only when it
//! subscribes (quorum queues have no channel-wide prefetch to change), so
//! widening is a new subscription, the old one cancelled.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, Delivery, Outgoing, PartlyPublished, Subscription};
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
    /// permit is free and subscribes again. If the queue refuses them (at a
    /// length limit), it keeps them instead — handed on as permits free,
    /// given back again after each further wait of this long — for up to
    /// [`KEEP_REFUSED_AT_MOST`]. For work whose permits may be
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
    /// The consuming process's id: it seeds the jitter of the waits
    /// between subscribe attempts after an outage, so that the processes a
    /// broker restart cut off come back spread out (and a simulation
    /// replays exactly).
    pub owner: &'a str,
    /// Most unacked deliveries.
    pub prefetch: u16,
    /// Consumer priority; 0 is the default.
    pub priority: i16,
    /// How deliveries get their permit.
    pub permits: Permits<'a>,
    /// How long the store may be down before the consumer gives back what
    /// it holds and unsubscribes until the store answers (see the module
    /// docs): [`STORE_DOWN_GIVE_BACK`], or less.
    pub store_down_give_back: Duration,
}

/// Consume as `consumer` says until `shutdown`; `hand` takes each delivery
/// with its permit (always one under [`Permits::Wait`] and
/// [`Permits::Hold`]) and returns false
/// to stop. Returns the last subscription, cancelled, with those cancelled
/// shortly before it, so their unfinished deliveries stay with the caller
/// until it drops them.
pub async fn consume(
    broker: &dyn Broker,
    consumer: Consumer<'_>,
    health: &Health,
    shutdown: &mut Shutdown,
    mut hand: impl FnMut(Delivery, Option<OwnedSemaphorePermit>) -> bool,
) -> Vec<Box<dyn Subscription>> {
    let Consumer {
        queue,
        owner,
        prefetch,
        priority,
        permits,
        store_down_give_back,
    } = consumer;
    let (semaphore, patience) = match permits {
        Permits::Wait(s) => (s, None),
        Permits::Within(s, patience) | Permits::Hold(s, patience) => (s, Some(patience)),
    };
    let holds = matches!(permits, Permits::Hold(..));
    let prefetch = prefetch.max(1);
    health.set_consuming(queue, false);
    let mut waits = crate::backoff::Reconnect::after_outage(&format!("{owner} {queue}"));
    // Set when a Hold consumer gave back what it held: its next
    // subscription's prefetch is the permits free then, widened as more
    // free, until it is `prefetch` again.
    let mut narrow = false;
    let mut retired = Retired::default();
    'subscribe: while !shutdown.is_triggered() {
        // Subscribed, the broker pushes a prefetch of messages here
        // whether or not the loop takes them: while this process cannot
        // reach the store they would wait in it, out of reach of processes
        // that can.
        tokio::select! {
            biased;
            _ = shutdown.wait() => break 'subscribe,
            _ = health.wait_store_up() => {}
        }
        let mut window = if narrow {
            window_for(semaphore.available_permits(), prefetch)
        } else {
            prefetch
        };
        let mut subscription = match broker
            .subscribe_with_priority(queue, window, priority)
            .await
        {
            Ok(s) => {
                tracing::info!(%queue, prefetch = window, priority, "consuming");
                health.set_consuming(queue, true);
                waits.succeeded();
                s
            }
            Err(e) => {
                // Not consuming (also after a pause for want of a slot,
                // which left the readiness as it was).
                health.set_consuming(queue, false);
                tracing::warn!(%queue, error = %e, "cannot subscribe; retrying");
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break 'subscribe,
                    _ = tokio::time::sleep(waits.next_delay()) => {}
                }
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
        // Set when the subscription was cancelled to give back what is
        // held. If the queue refused the copies (at a length limit), the
        // deliveries stay held, handed on as permits free, and the give-back
        // is tried again at this moment. Requeued instead, each would count
        // a delivery, and a task that never ran would turn poison.
        let mut give_back_again: Option<Instant> = None;
        // No wider subscription is tried before this (one failed).
        let mut widen_after = Instant::now();
        // Made once per subscription, not once per delivery.
        let mut store_gone = std::pin::pin!(store_down_for(health, store_down_give_back));
        loop {
            let subscribed = give_back_again.is_none();
            if !subscribed && held.is_empty() {
                // Everything was given back, or every delivery kept has
                // been handed on: consume again once a permit is free.
                retired.keep(subscription);
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break 'subscribe,
                    p = semaphore.acquire() => if p.is_err() { break 'subscribe },
                }
                continue 'subscribe;
            }
            // A narrowed window keeping up, with more permits free than it
            // is wide: subscribe again, as wide as the permits free and at
            // least twice as wide as before (so a consumer whose slots free
            // one by one subscribes a few times, not once per slot), at
            // most `prefetch`. The old subscription is cancelled; what it
            // still delivers is held here.
            if subscribed
                && window < prefetch
                && held.is_empty()
                && semaphore.available_permits() > usize::from(window)
                && Instant::now() >= widen_after
            {
                let free = semaphore.available_permits().max(2 * usize::from(window));
                let wider = window_for(free, prefetch);
                match broker.subscribe_with_priority(queue, wider, priority).await {
                    Ok(new) => {
                        tracing::debug!(%queue, from = window, to = wider, "slots freed; widening the prefetch");
                        let mut old = std::mem::replace(&mut subscription, new);
                        cancel_and_drain(&mut old, &mut held).await;
                        retired.keep(old);
                        window = wider;
                        narrow = window < prefetch;
                    }
                    Err(e) => {
                        tracing::debug!(%queue, error = %e, "cannot subscribe with a wider prefetch; keeping the narrow one a while");
                        widen_after = Instant::now() + WIDEN_RETRY;
                    }
                }
            }
            let over = if subscribed {
                held.front()
                    .and_then(|&(arrived, _)| patience.map(|p| arrived + p))
            } else {
                give_back_again
            };
            let (idle, room) = (held.is_empty(), held.len() < usize::from(prefetch));
            // Nothing is received into an empty hand, nor handed on, while
            // the store is down: it would only come straight back (a claim
            // the store refuses sends its message back to the queue).
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                // Not polled once done: a done consumer is no longer
                // subscribed, and the next subscription makes another.
                _ = &mut store_gone, if subscribed => {
                    // The store stays down for this process (perhaps only
                    // for it: a partition, a broken connection): what it
                    // holds, and what the broker would push into its
                    // prefetch, goes back for processes that can reach it.
                    tracing::warn!(%queue, held = held.len(),
                        "store down; giving back what this consumer holds and consuming again once it answers");
                    health.set_consuming(queue, false);
                    cancel_and_drain(&mut subscription, &mut held).await;
                    if holds {
                        // As after a give-back for want of a slot: what the
                        // queue refuses (at its length limit) is kept and
                        // given back again later, not requeued and counted;
                        // the next subscription is no wider than the slots
                        // free then.
                        narrow = true;
                        give_back_again = Some(give_back_held(broker, &mut held, patience).await);
                        continue;
                    }
                    give_back(broker, held.drain(..).map(|(_, d)| d).collect()).await;
                    retired.keep(subscription);
                    continue 'subscribe;
                }
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
                    if subscribed {
                        tracing::info!(%queue, held = held.len(),
                            "no free slot for a held delivery in time; giving back what this consumer holds until a slot frees");
                        // Still ready: a pause for want of a free slot is
                        // the consumer working as meant, not a fault (a
                        // health check that took it for one would have a
                        // busy worker replaced).
                        cancel_and_drain(&mut subscription, &mut held).await;
                    }
                    narrow = true;
                    // What the queue refused is kept, handed on as permits
                    // free and given back again after the patience; with
                    // nothing kept, the loop consumes again once a permit
                    // is free.
                    give_back_again = Some(give_back_held(broker, &mut held, patience).await);
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
                }, if room && subscribed => match d {
                    Some(Ok(d)) => held.push_back((Instant::now(), d)),
                    Some(Err(e)) => {
                        health.set_consuming(queue, false);
                        tracing::warn!(%queue, error = %e, "subscription failed; subscribing again");
                        requeue_held(&mut held).await;
                        continue 'subscribe;
                    }
                    None => {
                        health.set_consuming(queue, false);
                        tracing::warn!(%queue, "subscription ended; subscribing again");
                        requeue_held(&mut held).await;
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
        if give_back_again.is_none() {
            cancel_and_drain(&mut subscription, &mut held).await;
        }
        give_back(broker, held.into_iter().map(|(_, d)| d).collect()).await;
        retired.keep(subscription);
        break;
    }
    retired.into_vec()
}

/// The prefetch of a narrowed subscription: the permits free, at least one,
/// at most the consumer's prefetch.
fn window_for(free: usize, prefetch: u16) -> u16 {
    u16::try_from(free).unwrap_or(u16::MAX).clamp(1, prefetch)
}

/// How long the store may be down before a consumer gives back what it
/// holds and cancels its subscription until the store answers again: a
/// blip (the outage probe's first pings come within a second) costs no
/// churn; a longer outage, which may be this process's alone, leaves
/// nothing waiting in it that another process could run. A worker gives
/// back after half a lease if that is sooner: its claims lapse after one
/// lease anyway, and what it holds unstarted should not wait longer than
/// what it was running.
pub const STORE_DOWN_GIVE_BACK: Duration = Duration::from_secs(5);

/// Returns once the store has stayed down for `long` without a break:
/// two short outages are not one long one.
async fn store_down_for(health: &Health, long: Duration) {
    loop {
        health.wait_store_down().await;
        tokio::select! {
            _ = health.wait_store_up() => {}
            _ = tokio::time::sleep(long) => return,
        }
    }
}

/// Give back what a [`Permits::Hold`] consumer holds, keeping what its
/// queue refuses to take back ([`give_back_unless_refused`]); returns when
/// to try again with what was kept (after `patience`).
async fn give_back_held(
    broker: &dyn Broker,
    held: &mut VecDeque<(Instant, Delivery)>,
    patience: Option<Duration>,
) -> Instant {
    let next_try = Instant::now() + patience.unwrap_or_default();
    *held = give_back_unless_refused(broker, std::mem::take(held), next_try)
        .await
        .unwrap_or_default();
    next_try
}

/// How long a consumer keeps its narrow prefetch after a wider
/// subscription failed (the broker is likely going away; if not, it tries
/// again after this).
const WIDEN_RETRY: Duration = Duration::from_secs(1);

/// How long a cancelled subscription is kept after it was replaced: its
/// last deliveries, handed on, are claimed and settled well within it.
/// Dropping a subscription may close its channel (the in-process broker
/// closes it at once), which would send back the deliveries it still has
/// unacked: harmless (a claim deduplicates them), but each counts a
/// delivery. (An AMQP channel stays open anyway while a delivery of it is
/// unsettled.)
const KEEP_RETIRED: Duration = Duration::from_secs(5);

/// The most cancelled subscriptions kept at once (each may hold a
/// channel): a consumer whose slots free and fill again many times a
/// second drops the oldest first.
const KEEP_RETIRED_AT_MOST: usize = 16;

/// Cancelled subscriptions, kept for [`KEEP_RETIRED`] (the last of them
/// until the consumer returns), at most [`KEEP_RETIRED_AT_MOST`].
#[derive(Default)]
struct Retired(VecDeque<(Instant, Box<dyn Subscription>)>);

impl Retired {
    fn keep(&mut self, subscription: Box<dyn Subscription>) {
        let now = Instant::now();
        self.0
            .retain(|&(at, _)| now.saturating_duration_since(at) < KEEP_RETIRED);
        if self.0.len() >= KEEP_RETIRED_AT_MOST {
            self.0.pop_front();
        }
        self.0.push_back((now, subscription));
    }

    fn into_vec(self) -> Vec<Box<dyn Subscription>> {
        self.0.into_iter().map(|(_, s)| s).collect()
    }
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

/// Settle what a subscription that ended still held: requeued, so a
/// consumer cancelled by the server (its queue deleted, a failover) on a
/// channel that stays open does not leave them unacked until RabbitMQ's
/// `consumer_timeout` closes the channel. On a channel that is gone the
/// requeue fails, and the broker has requeued them already.
async fn requeue_held(held: &mut VecDeque<(Instant, Delivery)>) {
    for (_, d) in held.drain(..) {
        if let Err(e) = d.acker.requeue().await {
            tracing::debug!(error = %e, "a held delivery returns with its channel instead");
        }
    }
}

/// Cancel the subscription and add to `held` what it still delivers
/// ([`Permits::Hold`] ran out, or the consumer is stopping).
async fn cancel_and_drain(
    subscription: &mut Box<dyn Subscription>,
    held: &mut VecDeque<(Instant, Delivery)>,
) {
    if subscription.cancel().await.is_ok() {
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(DRAIN_AFTER_CANCEL, subscription.next()).await
        {
            held.push_back((Instant::now(), d));
        }
    }
}

/// Longest a delivery is kept while its queue refuses the copies that
/// would give it back: past it, it is requeued (and counted) rather than
/// held into RabbitMQ's `consumer_timeout` (30 minutes by default), which
/// would close the channel and requeue everything on it.
pub const KEEP_REFUSED_AT_MOST: Duration = Duration::from_millis(crate::config::MAX_HOLD_MS);

/// Give `held` back to its queue ([`give_back`]); but when the broker
/// refuses copies (a queue at its length limit), return the deliveries
/// whose copies it did not confirm, unsettled, to keep a while longer —
/// unless the oldest would have been kept past [`KEEP_REFUSED_AT_MOST`] by
/// the next try, at `next_try`. Any other failure requeues them, as
/// [`give_back`] does.
async fn give_back_unless_refused(
    broker: &dyn Broker,
    held: VecDeque<(Instant, Delivery)>,
    next_try: Instant,
) -> Option<VecDeque<(Instant, Delivery)>> {
    let (kept, e) = copy_then_ack_tagged(broker, held.into(), None)
        .await
        .err()?;
    let oldest = kept.iter().map(|&(arrived, _)| arrived).min();
    let keep = matches!(e, BrokerError::Refused { .. })
        && oldest.is_some_and(|oldest| next_try < oldest + KEEP_REFUSED_AT_MOST);
    if keep {
        tracing::warn!(held = kept.len(), error = %e,
            "the queue refuses the copies that would give back what this consumer holds (at its length limit: raise its max-length policy, or add workers); keeping them, handing them on as slots free, and trying again");
        return Some(kept.into());
    }
    requeue_after_failed_copy(kept.into_iter().map(|(_, d)| d).collect(), &e).await;
    None
}

/// Return deliveries to their queues as new messages: published (and
/// confirmed), then acked. A requeue would count a delivery against each
/// message on a quorum queue, and enough of those make it poison; a new
/// message starts at zero and goes to the back of the queue. Those whose
/// copies the broker does not confirm are requeued instead (duplicates
/// are harmless: a task's claim is keyed by its attempt, a job's record by
/// its id).
pub async fn give_back(broker: &dyn Broker, deliveries: Vec<Delivery>) {
    copy_then_ack(broker, deliveries, None).await;
}

/// Publish a copy of every delivery (its publisher's properties kept) to
/// `queue`, or back to its own queue when `None`; once the broker confirms
/// them, ack the originals. If the publish fails, requeue the originals
/// whose copies were not confirmed (ack the others) and return false.
/// Nothing is lost either way: a copy confirmed
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
            requeue_after_failed_copy(deliveries, &e).await;
            false
        }
    }
}

async fn requeue_after_failed_copy(deliveries: Vec<Delivery>, e: &BrokerError) {
    tracing::warn!(error = %e, "publishing copies of deliveries failed; requeueing the originals");
    for d in deliveries {
        if let Err(e) = d.acker.requeue().await {
            tracing::debug!(error = %e, "a delivery returns with its channel instead");
        }
    }
}

/// [`copy_then_ack`], but if the publish fails the originals whose copies
/// the broker did not confirm come back, unsettled, to the caller with the
/// error, to settle as it sees fit (those it confirmed are acked).
pub async fn try_copy_then_ack(
    broker: &dyn Broker,
    deliveries: Vec<Delivery>,
    queue: Option<&str>,
) -> Result<(), (Vec<Delivery>, BrokerError)> {
    let tagged = deliveries.into_iter().map(|d| ((), d)).collect();
    copy_then_ack_tagged(broker, tagged, queue)
        .await
        .map_err(|(rest, e)| (rest.into_iter().map(|((), d)| d).collect(), e))
}

/// [`try_copy_then_ack`] for deliveries that carry something of the
/// caller's with them (when each arrived).
async fn copy_then_ack_tagged<T>(
    broker: &dyn Broker,
    deliveries: Vec<(T, Delivery)>,
    queue: Option<&str>,
) -> Result<(), (Vec<(T, Delivery)>, BrokerError)> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let copies = deliveries
        .iter()
        .map(|(_, d)| Outgoing {
            properties: d.properties.for_copy(),
            ..Outgoing::durable(queue.unwrap_or(&d.queue).to_owned(), d.body.clone())
        })
        .collect();
    let (settled, unsettled) = match broker.publish_each(copies).await {
        Ok(()) => (deliveries, None),
        Err(PartlyPublished {
            error, confirmed, ..
        }) => {
            let (settled, rest): (Vec<_>, Vec<_>) = deliveries
                .into_iter()
                .zip(confirmed)
                .partition(|(_, confirmed)| *confirmed);
            let settled = settled.into_iter().map(|(d, _)| d).collect();
            (
                settled,
                Some((rest.into_iter().map(|(d, _)| d).collect(), error)),
            )
        }
    };
    for (_, d) in settled {
        if let Err(e) = d.acker.ack().await {
            tracing::debug!(error = %e, "a delivery returns with its channel instead");
        }
    }
    unsettled.map_or(Ok(()), Err)
}

/// Log the end of a delivery's task if it panicked, since nothing else
/// would say why its work stopped: a delivery not settled yet goes back
/// when its channel closes (the broker then delivers it again); a task
/// claimed already (its delivery acked) is the sweep's once its lease
/// lapses (the worker stops renewing it: see `worker/leases.rs`).
pub(crate) fn log_if_panicked(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        tracing::error!(error = %e, "a delivery's task panicked; an unsettled delivery goes back when its channel closes, a claimed task to the sweep when its lease lapses");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{HeaderValue, Properties};
    use crate::names::Names;
    use crate::shutdown::ShutdownTrigger;
    use crate::store::memory::{MemoryStore, TokioClock};
    use tokio::sync::mpsc;

    /// A consumer whose only permit stays taken gives back what it holds
    /// after its patience. While the queue refuses the copies (at a length
    /// limit), it keeps the deliveries instead of requeueing them — a
    /// requeue counts a delivery, and enough of those fail a task that
    /// never ran — hands them on as permits free, and gives the rest back,
    /// as new messages, once the queue has room.
    /// Copies the broker confirms settle their originals even when others
    /// of the batch are refused: only the refused come back, so trying
    /// again queues no duplicates of the others.
    #[tokio::test]
    async fn only_the_deliveries_whose_copies_were_refused_come_back_unsettled() {
        let names = Names::new("t");
        let broker = MemoryBroker::reliable(names.clone());
        broker
            .declare(&["full".to_owned(), "open".to_owned()])
            .await
            .unwrap();
        let (full, open) = (names.task_queue("full"), names.task_queue("open"));
        let (mut deliveries, mut subscriptions) = (Vec::new(), Vec::new());
        for queue in [&full, &open] {
            let msg = Outgoing::durable(queue.clone(), queue.as_bytes().to_vec());
            broker.publish(vec![msg]).await.unwrap();
            let mut sub = broker.subscribe(queue, 1).await.unwrap();
            deliveries.push(sub.next().await.unwrap().unwrap());
            sub.cancel().await.unwrap();
            subscriptions.push(sub); // its deliveries stay unacked, not returned
        }
        broker.set_full(&full, true);

        let (back, e) = try_copy_then_ack(&broker, deliveries, None)
            .await
            .expect_err("one copy refused");
        assert!(matches!(e, BrokerError::Refused { .. }), "{e:?}");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].queue, full);
        assert_eq!(broker.unacked_len(&full).await, 1, "not settled");
        assert_eq!(broker.unacked_len(&open).await, 0, "acked");
        assert_eq!(broker.take_messages(&open).await.len(), 1, "its copy");
    }

    struct HoldingConsumer {
        broker: Arc<MemoryBroker>,
        queue: String,
        /// The consumer's permits, all taken by the test.
        busy: Vec<OwnedSemaphorePermit>,
        handed: mpsc::UnboundedReceiver<(Delivery, Option<OwnedSemaphorePermit>)>,
        trigger: ShutdownTrigger,
        consuming: tokio::task::JoinHandle<Vec<Box<dyn Subscription>>>,
        store: Arc<MemoryStore>,
        health: Health,
    }

    const PATIENCE: Duration = Duration::from_millis(100);

    /// A [`Permits::Hold`] consumer of a task queue holding `bodies`, with
    /// `slots` permits, all taken by the test.
    async fn holding_consumer(bodies: &[&str], slots: usize, prefetch: u16) -> HoldingConsumer {
        consumer_with(bodies, slots, prefetch, Some(PATIENCE)).await
    }

    /// [`holding_consumer`] with this patience, or (`None`) a
    /// [`Permits::Wait`] consumer.
    async fn consumer_with(
        bodies: &[&str],
        slots: usize,
        prefetch: u16,
        patience: Option<Duration>,
    ) -> HoldingConsumer {
        let names = Names::new("t");
        let broker = Arc::new(MemoryBroker::reliable(names.clone()));
        let queue = names.task_queue("default");
        broker.declare(&["default".to_owned()]).await.unwrap();
        for body in bodies {
            let msg = Outgoing::durable(queue.clone(), body.as_bytes().to_vec());
            broker.publish(vec![msg]).await.unwrap();
        }
        let clock = Arc::new(TokioClock::new(1_800_000_000_000));
        let store = Arc::new(MemoryStore::new(clock, Duration::from_secs(3600), 1, "t"));
        let health = Health::new(store.clone(), broker.clone());
        let semaphore = Arc::new(Semaphore::new(slots));
        let mut busy = Vec::new();
        for _ in 0..slots {
            busy.push(semaphore.clone().acquire_owned().await.unwrap());
        }
        let trigger = ShutdownTrigger::new();
        let mut shutdown = trigger.subscribe();
        let (handed, handed_rx) = mpsc::unbounded_channel();
        let consuming = tokio::spawn({
            let (broker, queue, semaphore, health) = (
                broker.clone(),
                queue.clone(),
                semaphore.clone(),
                health.clone(),
            );
            async move {
                let consumer = Consumer {
                    queue: &queue,
                    owner: "test",
                    prefetch,
                    priority: 0,
                    permits: match patience {
                        Some(patience) => Permits::Hold(&semaphore, patience),
                        None => Permits::Wait(&semaphore),
                    },
                    store_down_give_back: STORE_DOWN_GIVE_BACK,
                };
                consume(broker.as_ref(), consumer, &health, &mut shutdown, |d, p| {
                    handed.send((d, p)).is_ok()
                })
                .await
            }
        });
        HoldingConsumer {
            broker,
            queue,
            busy,
            handed: handed_rx,
            trigger,
            consuming,
            store,
            health,
        }
    }

    /// A consumer of a task queue holding messages "1", "2" and "3", its
    /// permit taken, the queue full: all three are prefetched and wait.
    async fn holding_three_while_the_queue_is_full() -> HoldingConsumer {
        let h = holding_consumer(&["1", "2", "3"], 1, 10).await;
        h.broker.set_full(&h.queue, true);
        tokio::time::sleep(PATIENCE / 2).await;
        assert_eq!(
            h.broker.unacked_len(&h.queue).await,
            3,
            "all three prefetched"
        );
        h
    }

    #[tokio::test(start_paused = true)]
    async fn held_deliveries_the_queue_refuses_to_take_back_are_kept_not_requeued() {
        let HoldingConsumer {
            broker,
            queue,
            busy,
            handed: mut handed_rx,
            trigger,
            consuming,
            ..
        } = holding_three_while_the_queue_is_full().await;
        let patience = PATIENCE;

        // Many tries at giving them back, each refused.
        tokio::time::sleep(patience * 20).await;
        assert!(
            broker.refused() >= 3 * 10,
            "tried again and again: {}",
            broker.refused()
        );
        assert_eq!(broker.ready_len(&queue).await, 0, "none requeued");
        assert_eq!(broker.unacked_len(&queue).await, 3, "all three kept");

        // A permit frees: the oldest is handed on, never counted as
        // redelivered.
        drop(busy);
        let (first, permit) = handed_rx.recv().await.unwrap();
        assert!(permit.is_some());
        assert_eq!(first.body, b"1");
        assert_eq!((first.delivery_count, first.redelivered), (0, false));
        first.acker.ack().await.unwrap();

        // Room in the queue: the other two go back as new messages at the
        // next try, while the permit stays taken.
        broker.set_full(&queue, false);
        tokio::time::sleep(patience * 2).await;
        let back = broker.take_messages(&queue).await;
        let bodies: Vec<&[u8]> = back.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(bodies, [b"2".as_slice(), b"3".as_slice()]);
        assert!(back.iter().all(|m| m.delivery_count == 0));
        assert_eq!(broker.unacked_len(&queue).await, 0);
        assert!(handed_rx.try_recv().is_err(), "nothing else handed on");

        trigger.trigger();
        drop(permit);
        consuming.await.unwrap();
    }

    /// Kept past [`KEEP_REFUSED_AT_MOST`], a delivery would run into
    /// RabbitMQ's `consumer_timeout`, which closes the channel and
    /// requeues everything on it: before that, what the queue still
    /// refuses is requeued (each counted once) and the consumer waits for
    /// a permit.
    #[tokio::test(start_paused = true)]
    async fn held_deliveries_the_queue_refuses_for_too_long_are_requeued() {
        let h = holding_three_while_the_queue_is_full().await;
        tokio::time::sleep(KEEP_REFUSED_AT_MOST - PATIENCE * 3).await;
        assert_eq!(h.broker.ready_len(&h.queue).await, 0, "still kept");
        tokio::time::sleep(PATIENCE * 3).await;
        let back = h.broker.take_messages(&h.queue).await;
        let mut bodies: Vec<&[u8]> = back.iter().map(|m| m.body.as_slice()).collect();
        bodies.sort();
        assert_eq!(bodies, [b"1".as_slice(), b"2".as_slice(), b"3".as_slice()]);
        assert!(
            back.iter().all(|m| m.delivery_count == 1),
            "requeued, counted"
        );
        assert_eq!(h.broker.unacked_len(&h.queue).await, 0);

        h.trigger.trigger();
        drop(h.busy);
        h.consuming.await.unwrap();
    }

    /// A worker whose slots all stay busy gives back what it holds and,
    /// when a slot frees, subscribes again with a prefetch of the slots
    /// free (one), not its full prefetch: a freed slot takes one message
    /// out of the queue, not a prefetch's worth to keep from other workers
    /// and then send to the back of the queue. As more slots free, it
    /// subscribes wider, up to its full prefetch.
    #[tokio::test(start_paused = true)]
    async fn after_giving_back_a_consumer_takes_no_more_than_its_free_permits_and_widens_as_they_free()
     {
        let bodies: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let HoldingConsumer {
            broker,
            queue,
            mut busy,
            handed: mut handed_rx,
            trigger,
            consuming,
            ..
        } = holding_consumer(&bodies, 8, 8).await;
        tokio::time::sleep(PATIENCE / 2).await;
        assert_eq!(broker.prefetches(&queue).await, [8]);
        assert_eq!(broker.unacked_len(&queue).await, 8, "a full prefetch waits");

        // Every slot still busy: what it holds goes back.
        tokio::time::sleep(PATIENCE).await;
        assert_eq!(broker.unacked_len(&queue).await, 0, "given back");
        assert_eq!(broker.ready_len(&queue).await, 40);
        assert_eq!(broker.prefetches(&queue).await, Vec::<u16>::new());

        // One slot frees: one message runs (acked, as a claim acks it),
        // and one more waits for the next slot — not seven.
        busy.pop();
        let (first, permit) = handed_rx.recv().await.unwrap();
        first.acker.ack().await.unwrap();
        busy.push(permit.unwrap());
        tokio::time::sleep(PATIENCE / 2).await;
        assert_eq!(broker.prefetches(&queue).await, [1]);
        assert_eq!(broker.unacked_len(&queue).await, 1, "one waits for a slot");
        assert_eq!(broker.ready_len(&queue).await, 38);

        // Six slots free: the waiting message runs; with five still free
        // (twice its window or more) it subscribes five wide, five more
        // run, and five wait for the next slots.
        busy.truncate(2);
        for _ in 0..6 {
            let (d, permit) = handed_rx.recv().await.unwrap();
            d.acker.ack().await.unwrap();
            busy.push(permit.unwrap());
        }
        tokio::time::sleep(PATIENCE / 2).await;
        assert_eq!(broker.prefetches(&queue).await, [5]);
        assert!(handed_rx.try_recv().is_err(), "no slot free");
        assert_eq!(broker.unacked_len(&queue).await, 5);
        assert_eq!(broker.ready_len(&queue).await, 40 - 1 - 6 - 5);

        // All free: back to its full prefetch, and everything runs.
        busy.clear();
        let mut ran = 7;
        while ran < 40 {
            let (d, _permit) = handed_rx.recv().await.unwrap();
            d.acker.ack().await.unwrap();
            ran += 1;
        }
        assert_eq!(broker.prefetches(&queue).await, [8]);
        assert_eq!(broker.ready_len(&queue).await, 0);

        trigger.trigger();
        let subscriptions = consuming.await.unwrap();
        assert!(!subscriptions.is_empty(), "the last one returned");
    }

    /// A process that cannot reach the store for longer than
    /// [`STORE_DOWN_GIVE_BACK`] keeps nothing: what it holds goes back to
    /// the queue as new messages (no delivery counted), and it
    /// unsubscribes, so the broker pushes no prefetch into it that a
    /// process reaching the store could run. Once the store answers, it
    /// subscribes again and hands everything on, oldest first.
    #[tokio::test(start_paused = true)]
    async fn a_consumer_cut_off_from_the_store_gives_back_what_it_holds_until_it_answers() {
        let HoldingConsumer {
            broker,
            queue,
            busy,
            handed: mut handed_rx,
            trigger,
            consuming,
            store,
            health,
        } = consumer_with(&["1", "2", "3"], 1, 10, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            broker.unacked_len(&queue).await,
            3,
            "held, waiting for a slot"
        );

        // A short outage, and soon another: two short ones are not one
        // long one, and cost no churn.
        store.set_outage(true);
        health.mark_store_down();
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.set_outage(false);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(health.store_up(), "the probe saw the store back");
        store.set_outage(true);
        health.mark_store_down();
        tokio::time::sleep(STORE_DOWN_GIVE_BACK / 2).await;
        assert_eq!(
            broker.unacked_len(&queue).await,
            3,
            "short outages cost no churn"
        );
        tokio::time::sleep(STORE_DOWN_GIVE_BACK).await;
        assert_eq!(broker.unacked_len(&queue).await, 0, "given back");
        assert_eq!(broker.ready_len(&queue).await, 3);
        assert_eq!(
            broker.prefetches(&queue).await,
            Vec::<u16>::new(),
            "unsubscribed"
        );

        // New work waits in the queue, not in this process, and nothing is
        // handed on while the store is down, even with a slot free.
        let four = Outgoing::durable(queue.clone(), b"4".to_vec());
        broker.publish(vec![four]).await.unwrap();
        drop(busy);
        tokio::time::sleep(STORE_DOWN_GIVE_BACK * 4).await;
        assert_eq!(broker.ready_len(&queue).await, 4);
        assert_eq!(broker.prefetches(&queue).await, Vec::<u16>::new());
        assert!(handed_rx.try_recv().is_err(), "nothing handed on");

        store.set_outage(false);
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let (d, permit) = handed_rx.recv().await.unwrap();
            assert!(permit.is_some());
            assert_eq!((d.delivery_count, d.redelivered), (0, false), "not counted");
            bodies.push(String::from_utf8(d.body.clone()).unwrap());
            d.acker.ack().await.unwrap();
        }
        assert_eq!(bodies, ["1", "2", "3", "4"]);
        assert_eq!(broker.prefetches(&queue).await, [10]);

        trigger.trigger();
        consuming.await.unwrap();
    }

    /// Cut off from the store, a worker's task consumer gives back what
    /// it holds as when a hold runs out: what its full queue refuses to
    /// take back is kept (handed on once the store answers and a slot
    /// frees), not requeued — a requeue counts a delivery, and enough
    /// outages would make tasks that never ran poison.
    #[tokio::test(start_paused = true)]
    async fn a_holding_consumer_cut_off_from_the_store_keeps_what_its_full_queue_refuses() {
        let h = consumer_with(&["1", "2", "3"], 1, 10, Some(Duration::from_secs(600))).await;
        tokio::time::sleep(PATIENCE).await;
        assert_eq!(h.broker.unacked_len(&h.queue).await, 3, "held");
        h.broker.set_full(&h.queue, true);
        h.store.set_outage(true);
        h.health.mark_store_down();
        tokio::time::sleep(STORE_DOWN_GIVE_BACK * 2).await;
        assert!(h.broker.refused() >= 3, "tried: {}", h.broker.refused());
        assert_eq!(h.broker.unacked_len(&h.queue).await, 3, "kept");
        assert_eq!(h.broker.ready_len(&h.queue).await, 0, "none requeued");

        // The store answers and a slot frees: the oldest runs, never
        // counted as redelivered.
        h.store.set_outage(false);
        let HoldingConsumer {
            busy,
            handed: mut handed_rx,
            trigger,
            consuming,
            ..
        } = h;
        drop(busy);
        let (first, permit) = handed_rx.recv().await.unwrap();
        assert!(permit.is_some());
        assert_eq!(first.body, b"1");
        assert_eq!((first.delivery_count, first.redelivered), (0, false));
        first.acker.ack().await.unwrap();
        trigger.trigger();
        drop(permit);
        consuming.await.unwrap();
    }

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
