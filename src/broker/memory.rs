//! An in-process broker: the [`Broker`] trait without RabbitMQ.
//!
//! It exists for two uses:
//! - an embedded, single-process dev mode, where starting RabbitMQ is more
//!   ceremony than the run is worth;
//! - deterministic simulation tests, which need a broker whose faults
//!   (duplicates, reordering, lost confirms, dropped connections, outages)
//!   can be injected on purpose and replayed from a seed.
//!
//! It mirrors the RabbitMQ behaviour Conveyor relies on (see `amqp.rs`):
//! named queues created by [`Broker::declare`]; `mandatory` publishes to a
//! missing queue fail as unroutable (returned), others are silently dropped; deliveries pushed
//! round-robin to a queue's consumers, each holding at most `prefetch`
//! unacked ones (0 = unlimited, as in AMQP); a requeued message goes back
//! to the head of its queue; a closed subscription ("channel") returns its
//! unacked deliveries; `delivery_count` counts every return, like quorum
//! queues' `x-delivery-count`. With a delivery limit set
//! ([`MemoryBroker::set_delivery_limit`], as the simulation does), a
//! message of the submit, referred or a task queue returned more times
//! than the limit goes to `<prefix>.dead` instead, as a quorum queue with
//! `x-delivery-limit` dead-letters it. With a cap on the dead-letter
//! queue ([`MemoryBroker::set_dead_letter_cap`], as the embedded mode sets:
//! nothing consumes `<prefix>.dead` in a long `conveyor dev` session), the
//! oldest dead letters are dropped to keep it at the cap, as a RabbitMQ
//! queue with `x-max-length` and the default `drop-head` overflow does.
//!
//! How it differs from RabbitMQ:
//! - nothing is persisted: the queues live and die with the process;
//! - no priorities, TTLs, exchanges other than the default one, or queue
//!   arguments; no delivery limit unless one is set (Conveyor dead-letters
//!   by publishing to `<prefix>.dead` itself);
//! - a [`Delivery`] carries its message's properties and headers as
//!   published, as with the AMQP broker, but no `x-delivery-count` header
//!   of the broker's own (its count is in [`Delivery::delivery_count`]);
//! - faults are injected from a [`FaultPlan`]; every random decision comes
//!   from one seeded [`StdRng`], so a run driven in the same order (e.g. on
//!   a current-thread runtime) is reproducible from its seed.
//!
//! All state sits behind one mutex, never held across an `.await`; waiting
//! consumers are woken through a [`Notify`] per subscription. Calls never
//! wait on anything else, unless a simulation asks them to yield to the
//! runtime after their work ([`MemoryBroker::yield_after_calls`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use super::{
    Acker, Broker, BrokerError, Delivery, HeaderValue, Outgoing, PartlyPublished, Properties,
    QueueStats, Subscription,
};
use crate::names::Names;
use crate::store::memory::YieldPoints;

/// Which faults to inject, as probabilities in `0.0..=1.0` (values outside
/// are clamped; `NaN` counts as 0). The default injects none.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultPlan {
    /// A published message is queued twice (as a publisher retry after a
    /// lost confirm would do).
    pub duplicate: f64,
    /// A published message is inserted at a random position among the
    /// ready messages instead of at the tail.
    pub reorder: f64,
    /// `publish` queues a random prefix of its batch (possibly all of it,
    /// possibly none) and then fails with [`BrokerError::Unavailable`], as
    /// when confirms never arrive.
    pub publish_failure: f64,
    /// A published message is refused (nacked) and not queued, as
    /// RabbitMQ does for a queue at its length limit that rejects
    /// publishes, or a quorum queue without a leader; the rest of its
    /// batch is queued, and `publish` fails with [`BrokerError::Refused`].
    pub refuse: f64,
}

/// A message waiting in a queue (or held by a consumer).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    /// Payload.
    pub body: Vec<u8>,
    /// Properties and headers as published.
    pub properties: Properties,
    /// How many times it was delivered and given back.
    pub delivery_count: u32,
}

impl QueuedMessage {
    fn from_outgoing(msg: &Outgoing) -> QueuedMessage {
        QueuedMessage {
            body: msg.body.clone(),
            properties: msg.properties.clone(),
            delivery_count: 0,
        }
    }
}

/// The in-process broker. Clones are handles to the same broker, so a test
/// can keep one while the code under test holds another.
#[derive(Clone)]
pub struct MemoryBroker {
    names: Names,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("prefix", &self.names.prefix())
            .finish()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Off unless a simulation seeds them: their own generator, so that
    /// the fault decisions do not depend on whether they are on.
    yields: YieldPoints,
}

impl Shared {
    /// The state; a panic elsewhere while holding the lock leaves the state
    /// consistent (every mutation is completed before anything can panic),
    /// so a poisoned lock is taken over.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, unless the broker is down (a simulated outage).
    fn lock_up(&self) -> Result<MutexGuard<'_, State>, BrokerError> {
        let state = self.lock();
        if state.down {
            return Err(outage());
        }
        Ok(state)
    }
}

struct State {
    rng: StdRng,
    faults: FaultPlan,
    down: bool,
    /// Ordered maps, so iteration order (and with it the order in which
    /// random numbers are drawn) never depends on hashing.
    queues: BTreeMap<String, Queue>,
    consumers: BTreeMap<u64, Consumer>,
    /// Source of subscription ids and delivery tags.
    next_id: u64,
    /// Queue -> the queue that also gets every message published to it
    /// (see [`MemoryBroker::tap`]).
    taps: BTreeMap<String, String>,
    /// Messages refused so far (the `refuse` fault, and full queues).
    refused: usize,
    /// Deliveries settled a second time (each closed its channel).
    settled_twice: usize,
    /// Queues refusing every publish (see [`MemoryBroker::set_full`]).
    full: BTreeSet<String>,
    /// Returns after which a message of a work queue is dead-lettered.
    delivery_limit: Option<u32>,
    /// Where such messages go.
    dead_queue: String,
    /// Most dead letters kept ready; the oldest go past it (`None`: no
    /// cap, the default: the simulation reads every dead letter).
    dead_letter_cap: Option<usize>,
    /// Dead letters dropped so far to keep the cap.
    dead_letters_dropped: u64,
}

#[derive(Default)]
struct Queue {
    /// A work queue (submit, referred, tasks): the delivery limit applies.
    limited: bool,
    ready: VecDeque<QueuedMessage>,
    /// How many messages at the head of `ready` were returned (requeued,
    /// or their channel closed): served before the others, in the order
    /// they came back, as a quorum queue serves its returns.
    returned: usize,
    /// Ids of the consumers receiving new deliveries, in round-robin order.
    consumers: Vec<u64>,
    /// Where the next round-robin turn starts in `consumers`.
    cursor: usize,
}

struct Consumer {
    queue: String,
    /// 0 = unlimited.
    prefetch: u16,
    /// Consumers of higher priority with room get every delivery.
    priority: i16,
    /// Cleared by `cancel`: no new deliveries.
    active: bool,
    /// Pushed to this consumer but not yet returned by `next` (what sits in
    /// a client library's buffer); counts against the prefetch.
    inbox: VecDeque<QueuedMessage>,
    /// Returned by `next` and neither acked nor requeued, by delivery tag.
    unacked: BTreeMap<u64, QueuedMessage>,
    wake: Arc<Notify>,
}

impl Consumer {
    fn has_room(&self) -> bool {
        self.prefetch == 0 || self.inbox.len() + self.unacked.len() < usize::from(self.prefetch)
    }
}

fn unavailable(what: &str) -> BrokerError {
    BrokerError::Unavailable(format!("in-memory broker: {what}"))
}

fn outage() -> BrokerError {
    unavailable("simulated outage")
}

impl State {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn chance(&mut self, p: f64) -> bool {
        if p.is_nan() || p <= 0.0 {
            return false;
        }
        self.rng.random_bool(p.min(1.0))
    }

    /// Queue one copy of `msg` in `queue` (which exists), at the tail or,
    /// under the reorder fault, anywhere among the ready messages.
    fn enqueue(&mut self, queue: &str, msg: QueuedMessage) {
        let reorder = self.faults.reorder;
        let position = if self.chance(reorder) {
            let len = self.queues.get(queue).map_or(0, |q| q.ready.len());
            Some(self.rng.random_range(0..=len))
        } else {
            None
        };
        if let Some(q) = self.queues.get_mut(queue) {
            match position {
                Some(i) => {
                    q.ready.insert(i, msg);
                    // Among the returned ones, it counts as one of them: the
                    // last returned one stays in their group.
                    if i < q.returned {
                        q.returned += 1;
                    }
                }
                None => q.ready.push_back(msg),
            }
        }
    }

    /// Push ready messages of `queue` to its consumers while any has room
    /// under its prefetch: to the highest priority among those with room,
    /// round-robin among equals (as RabbitMQ does with `x-priority`).
    fn dispatch(&mut self, queue: &str) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        while !q.ready.is_empty() && !q.consumers.is_empty() {
            let n = q.consumers.len();
            let with_room = |i: &usize| {
                self.consumers
                    .get(&q.consumers[*i])
                    .filter(|c| c.has_room())
                    .map(|c| c.priority)
            };
            let Some(top) = (0..n).filter_map(|i| with_room(&i)).max() else {
                break;
            };
            let turn = (0..n)
                .map(|i| (q.cursor + i) % n)
                .find(|i| with_room(i) == Some(top));
            let Some(i) = turn else {
                break;
            };
            let Some(consumer) = self.consumers.get_mut(&q.consumers[i]) else {
                break;
            };
            let Some(msg) = q.ready.pop_front() else {
                break;
            };
            q.returned = q.returned.saturating_sub(1);
            consumer.inbox.push_back(msg);
            consumer.wake.notify_one();
            q.cursor = (i + 1) % n;
        }
    }

    /// End a subscription as a closed channel does: it gets no more
    /// deliveries, everything it held goes back to the head of its queue
    /// (in delivery order, each counted once more), and its ackers fail.
    /// Does not dispatch; the caller does, once all closing is done.
    fn close(&mut self, id: u64) {
        let Some(consumer) = self.consumers.remove(&id) else {
            return;
        };
        consumer.wake.notify_one();
        let Some(q) = self.queues.get_mut(&consumer.queue) else {
            return;
        };
        q.consumers.retain(|&c| c != id);
        let held: Vec<QueuedMessage> = consumer
            .unacked
            .into_values()
            .chain(consumer.inbox)
            .collect();
        let queue = consumer.queue;
        for msg in held {
            self.return_to_queue(&queue, msg);
        }
    }

    /// Return `msg` to `queue` (a requeue, or its channel closed), after
    /// the messages returned before it and before all others, counting the
    /// delivery; past the delivery limit, a work
    /// queue's message goes to the dead queue instead. (Not
    /// `consumer::give_back`, which publishes a new message.)
    fn return_to_queue(&mut self, queue: &str, mut msg: QueuedMessage) {
        msg.delivery_count = msg.delivery_count.saturating_add(1);
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let over = self
            .delivery_limit
            .is_some_and(|limit| msg.delivery_count > limit);
        if !(q.limited && over) {
            let at = q.returned.min(q.ready.len());
            q.ready.insert(at, msg);
            q.returned = at + 1;
            return;
        }
        msg.properties.set_header(
            "x-first-death-reason",
            HeaderValue::Text("delivery_limit".into()),
        );
        msg.properties
            .set_header("x-first-death-queue", HeaderValue::Text(queue.to_owned()));
        msg.delivery_count = 0;
        let dead = self.dead_queue.clone();
        if let Some(d) = self.queues.get_mut(&dead) {
            d.ready.push_back(msg);
        }
        self.keep_dead_letters_to_cap();
        self.dispatch(&dead);
    }

    /// Every subscription ends (see [`State::close`]).
    fn drop_connections(&mut self) {
        let ids: Vec<u64> = self.consumers.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }

    fn declare_queue(&mut self, name: &str) {
        self.queues.entry(name.to_owned()).or_default();
    }

    /// Declare a work queue: one the delivery limit applies to.
    fn declare_work_queue(&mut self, name: &str) {
        self.queues.entry(name.to_owned()).or_default().limited = true;
    }

    /// Drop the oldest ready dead letters past the cap, if there is one,
    /// with a warning at the first drop and every
    /// [`DEAD_LETTER_DROPS_PER_WARNING`] after it.
    fn keep_dead_letters_to_cap(&mut self) {
        let Some(cap) = self.dead_letter_cap else {
            return;
        };
        let Some(dead) = self.queues.get_mut(&self.dead_queue) else {
            return;
        };
        while dead.ready.len() > cap {
            dead.ready.pop_front();
            dead.returned = dead.returned.saturating_sub(1);
            if self
                .dead_letters_dropped
                .is_multiple_of(DEAD_LETTER_DROPS_PER_WARNING)
            {
                tracing::warn!(
                    queue = %self.dead_queue,
                    cap,
                    dropped_so_far = self.dead_letters_dropped + 1,
                    "the in-process dead-letter queue is full: its oldest dead letters are dropped \
                     (warned once per {DEAD_LETTER_DROPS_PER_WARNING})"
                );
            }
            self.dead_letters_dropped += 1;
        }
    }
}

/// Dead letters dropped to keep the cap between two warnings: one per
/// letter would flood the log of a deployment that keeps failing.
const DEAD_LETTER_DROPS_PER_WARNING: u64 = 1000;

impl MemoryBroker {
    /// A broker for the deployment `names`, injecting `faults` with
    /// decisions drawn from a generator seeded with `seed`.
    pub fn new(names: Names, seed: u64, faults: FaultPlan) -> MemoryBroker {
        let dead_queue = names.dead_queue();
        MemoryBroker {
            names,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rng: StdRng::seed_from_u64(seed),
                    faults,
                    down: false,
                    queues: BTreeMap::new(),
                    consumers: BTreeMap::new(),
                    next_id: 0,
                    taps: BTreeMap::new(),
                    refused: 0,
                    settled_twice: 0,
                    full: BTreeSet::new(),
                    delivery_limit: None,
                    dead_queue,
                    dead_letter_cap: None,
                    dead_letters_dropped: 0,
                }),
                yields: YieldPoints::default(),
            }),
        }
    }

    /// A broker that injects no faults.
    pub fn reliable(names: Names) -> MemoryBroker {
        MemoryBroker::new(names, 0, FaultPlan::default())
    }

    /// For simulations: from now on every [`Broker`] call, every ack,
    /// requeue and cancel yields to the runtime after its work, and every
    /// subscription's `next` before it looks for a delivery (never after
    /// taking one: it stays cancel-safe), a number of times drawn from a
    /// generator seeded with `seed` (`None`: never, the default), so that a
    /// crash can land between a publish's effect and its caller seeing the
    /// confirm, and so between any two calls of a caller.
    pub fn yield_after_calls(&self, seed: Option<u64>) {
        self.shared.yields.seed(seed);
    }

    /// Replace the fault plan (e.g. to let a simulation drain without
    /// faults); the random sequence carries on.
    pub fn set_faults(&self, faults: FaultPlan) {
        self.shared.lock().faults = faults;
    }

    /// Dead-letter a message of the submit, referred or a task queue once
    /// it has been returned more than `limit` times (`None`, the default:
    /// never), as RabbitMQ's quorum queues do with `x-delivery-limit`.
    pub fn set_delivery_limit(&self, limit: Option<u32>) {
        self.shared.lock().delivery_limit = limit;
    }

    /// Keep at most `cap` ready messages in `<prefix>.dead`, dropping the
    /// oldest past it (`None`, the default: no cap). For a deployment in
    /// which nothing consumes dead letters (`conveyor dev`); a simulation,
    /// which reads them all, leaves it off.
    pub fn set_dead_letter_cap(&self, cap: Option<usize>) {
        let mut state = self.shared.lock();
        state.dead_letter_cap = cap;
        state.keep_dead_letters_to_cap();
    }

    /// How many dead letters were dropped so far to keep the cap.
    pub fn dead_letters_dropped(&self) -> u64 {
        self.shared.lock().dead_letters_dropped
    }

    /// Make `queue` refuse (nack) every message published to it while
    /// `full`, as RabbitMQ does for a queue at its length limit with
    /// `overflow: reject-publish`. Draws nothing from the fault generator.
    pub fn set_full(&self, queue: &str, full: bool) {
        let mut state = self.shared.lock();
        if full {
            state.full.insert(queue.to_owned());
        } else {
            state.full.remove(queue);
        }
    }

    /// How many published messages were refused so far (the `refuse`
    /// fault, and queues made full with [`MemoryBroker::set_full`]).
    pub fn refused(&self) -> usize {
        self.shared.lock().refused
    }

    /// How many deliveries were acked or requeued a second time so far:
    /// each closed its subscription, as RabbitMQ closes the channel. Code
    /// that is right never does it; the simulation checks it stays 0.
    pub fn settled_twice(&self) -> usize {
        self.shared.lock().settled_twice
    }

    /// Create `name` if it does not exist (e.g. a client's reply queue).
    /// Works during an outage too: it stands for an administrator's action.
    pub async fn declare_queue(&self, name: &str) {
        self.shared.lock().declare_queue(name);
    }

    /// Simulate lost connections: every live subscription ends (its `next`
    /// returns `None`, waking it if it waits), its unacked deliveries go
    /// back to their queues counted once more, and its ackers fail. New
    /// subscriptions work at once.
    pub async fn drop_connections(&self) {
        self.shared.lock().drop_connections();
    }

    /// Start (`true`) or end a simulated outage. While it lasts, `declare`,
    /// `publish`, `subscribe` and `queue_stats` fail as unavailable and
    /// `is_connected` is false. Starting one also drops every connection
    /// (see [`MemoryBroker::drop_connections`]), as a broker going away does.
    pub fn set_outage(&self, down: bool) {
        let mut state = self.shared.lock();
        state.down = down;
        if down {
            state.drop_connections();
        }
    }

    /// From now on, every message published to `queue` is also put, once
    /// and unchanged (whatever the faults do to the original), in the
    /// queue `tap`, created if missing: as a second queue bound to the same
    /// routing key gets it on RabbitMQ. A test reads there what was sent
    /// to a queue whose consumers take it away (e.g. the referred queue).
    pub async fn tap(&self, queue: &str, tap: &str) {
        let mut state = self.shared.lock();
        state.declare_queue(tap);
        state.taps.insert(queue.to_owned(), tap.to_owned());
    }

    /// Messages ready in `queue` (0 if it does not exist).
    pub async fn ready_len(&self, queue: &str) -> usize {
        self.shared
            .lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.ready.len())
    }

    /// Messages of `queue` held by its subscriptions, delivered or pushed
    /// to them, and not yet acked.
    pub async fn unacked_len(&self, queue: &str) -> usize {
        self.shared
            .lock()
            .consumers
            .values()
            .filter(|c| c.queue == queue)
            .map(|c| c.inbox.len() + c.unacked.len())
            .sum()
    }

    /// The prefetch of each subscription of `queue` still taking
    /// deliveries (not cancelled), oldest first.
    pub async fn prefetches(&self, queue: &str) -> Vec<u16> {
        let state = self.shared.lock();
        let mut active: Vec<_> = state
            .consumers
            .iter()
            .filter(|(_, c)| c.queue == queue && c.active)
            .map(|(&id, c)| (id, c.prefetch))
            .collect();
        active.sort_unstable();
        active.into_iter().map(|(_, prefetch)| prefetch).collect()
    }

    /// Remove and return the ready messages of `queue`, head first.
    pub async fn take_messages(&self, queue: &str) -> Vec<QueuedMessage> {
        self.shared
            .lock()
            .queues
            .get_mut(queue)
            .map(|q| {
                q.returned = 0;
                q.ready.drain(..).collect()
            })
            .unwrap_or_default()
    }

    /// Remove and return the bodies of the ready messages of `queue`, head
    /// first (e.g. to read the dead queue in a test).
    pub async fn take_all(&self, queue: &str) -> Vec<Vec<u8>> {
        self.take_messages(queue)
            .await
            .into_iter()
            .map(|m| m.body)
            .collect()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn declare(&self, task_queues: &[String]) -> Result<(), BrokerError> {
        self.shared
            .yields
            .after(|| {
                let mut state = self.shared.lock_up()?;
                state.declare_queue(&self.names.dead_queue());
                state.declare_work_queue(&self.names.submit_queue());
                state.declare_work_queue(&self.names.referred_queue());
                for q in task_queues {
                    state.declare_work_queue(&self.names.task_queue(q));
                }
                Ok(())
            })
            .await
    }

    async fn publish(&self, batch: Vec<Outgoing>) -> Result<(), BrokerError> {
        self.publish_each(batch).await.map_err(|p| p.error)
    }

    async fn publish_each(&self, batch: Vec<Outgoing>) -> Result<(), PartlyPublished> {
        self.shared
            .yields
            .after(|| {
                let mut state = self
                    .shared
                    .lock_up()
                    .map_err(|e| PartlyPublished::none_of(batch.len(), e))?;
                let faults = state.faults;
                let lost_confirm_at = if state.chance(faults.publish_failure) {
                    Some(state.rng.random_range(0..=batch.len()))
                } else {
                    None
                };
                let mut touched = BTreeSet::new();
                // Unroutable messages not published as mandatory are
                // confirmed (and dropped), as RabbitMQ does. Every message
                // the loop reaches gets its verdict; a lost confirm stops it
                // and answers for the whole batch (none confirmed), so the
                // verdicts of the messages after it are never read.
                let mut verdicts: Vec<Option<BrokerError>> =
                    std::iter::repeat_with(|| None).take(batch.len()).collect();
                for (i, msg) in batch.iter().enumerate() {
                    if lost_confirm_at == Some(i) {
                        break;
                    }
                    if !state.queues.contains_key(&msg.queue) {
                        verdicts[i] = msg.mandatory.then(|| BrokerError::Unroutable {
                            queue: msg.queue.clone(),
                            reason: "returned: 312 NO_ROUTE".into(),
                        });
                        continue;
                    }
                    if state.full.contains(&msg.queue) || state.chance(faults.refuse) {
                        state.refused += 1;
                        verdicts[i] = Some(BrokerError::Refused {
                            queue: msg.queue.clone(),
                            reason: "simulated nack".into(),
                        });
                        continue;
                    }
                    let copies = if state.chance(faults.duplicate) { 2 } else { 1 };
                    for _ in 0..copies {
                        state.enqueue(&msg.queue, QueuedMessage::from_outgoing(msg));
                    }
                    touched.insert(msg.queue.as_str());
                    if let Some(tap) = state.taps.get(&msg.queue).cloned()
                        && let Some(q) = state.queues.get_mut(&tap)
                    {
                        q.ready.push_back(QueuedMessage::from_outgoing(msg));
                    }
                }
                if touched.contains(state.dead_queue.as_str()) {
                    state.keep_dead_letters_to_cap();
                }
                for queue in touched {
                    state.dispatch(queue);
                }
                if lost_confirm_at.is_some() {
                    return Err(PartlyPublished::none_of(
                        batch.len(),
                        unavailable("simulated lost publisher confirm"),
                    ));
                }
                match PartlyPublished::from_verdicts(verdicts) {
                    Some(partly) => Err(partly),
                    None => Ok(()),
                }
            })
            .await
    }

    async fn subscribe_with_priority(
        &self,
        queue: &str,
        prefetch: u16,
        priority: i16,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        self.shared
            .yields
            .after(|| -> Result<Box<dyn Subscription>, BrokerError> {
                let mut state = self.shared.lock_up()?;
                if !state.queues.contains_key(queue) {
                    return Err(unavailable(&format!(
                        "NOT_FOUND - no queue '{queue}' (like a closed channel)"
                    )));
                }
                let id = state.new_id();
                let wake = Arc::new(Notify::new());
                state.consumers.insert(
                    id,
                    Consumer {
                        queue: queue.to_owned(),
                        prefetch,
                        priority,
                        active: true,
                        inbox: VecDeque::new(),
                        unacked: BTreeMap::new(),
                        wake: wake.clone(),
                    },
                );
                if let Some(q) = state.queues.get_mut(queue) {
                    q.consumers.push(id);
                }
                state.dispatch(queue);
                Ok(Box::new(MemorySubscription {
                    shared: self.shared.clone(),
                    id,
                    wake,
                }))
            })
            .await
    }

    async fn queue_stats(&self, queues: &[String]) -> Result<Vec<QueueStats>, BrokerError> {
        self.shared
            .yields
            .after(|| {
                let state = self.shared.lock_up()?;
                Ok(queues
                    .iter()
                    .filter_map(|name| {
                        state.queues.get(name).map(|q| QueueStats {
                            queue: name.clone(),
                            ready: u32::try_from(q.ready.len()).unwrap_or(u32::MAX),
                            consumers: u32::try_from(q.consumers.len()).unwrap_or(u32::MAX),
                        })
                    })
                    .collect())
            })
            .await
    }

    fn is_connected(&self) -> bool {
        !self.shared.lock().down
    }
}

/// A consumer of one queue. Dropping it closes it (see [`State::close`]).
struct MemorySubscription {
    shared: Arc<Shared>,
    id: u64,
    wake: Arc<Notify>,
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let queue = state.consumers.get(&self.id).map(|c| c.queue.clone());
        state.close(self.id);
        if let Some(queue) = queue {
            state.dispatch(&queue);
        }
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    /// Cancel-safe: a message leaves the consumer's buffer only in the
    /// same critical section that returns it, with no `.await` after.
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        self.shared.yields.point().await;
        loop {
            {
                let mut state = self.shared.lock();
                let tag = state.new_id();
                let consumer = state.consumers.get_mut(&self.id)?;
                if let Some(msg) = consumer.inbox.pop_front() {
                    let delivery = Delivery {
                        queue: consumer.queue.clone(),
                        body: msg.body.clone(),
                        properties: msg.properties.clone(),
                        delivery_count: msg.delivery_count,
                        redelivered: msg.delivery_count > 0,
                        acker: Box::new(MemoryAcker {
                            shared: self.shared.clone(),
                            consumer: self.id,
                            tag,
                        }),
                    };
                    consumer.unacked.insert(tag, msg);
                    return Some(Ok(delivery));
                }
                if !consumer.active {
                    return None;
                }
            }
            // `notify_one` leaves a permit when nobody waits, so a push
            // between the check above and this wait is not missed.
            self.wake.notified().await;
        }
    }

    async fn cancel(&mut self) -> Result<(), BrokerError> {
        self.shared
            .yields
            .after(|| {
                let mut state = self.shared.lock();
                let Some(consumer) = state.consumers.get_mut(&self.id) else {
                    return Err(unavailable("subscription closed"));
                };
                consumer.active = false;
                consumer.wake.notify_one();
                let queue = consumer.queue.clone();
                if let Some(q) = state.queues.get_mut(&queue) {
                    q.consumers.retain(|&c| c != self.id);
                }
                Ok(())
            })
            .await
    }
}

/// Acknowledges one delivery of one subscription.
struct MemoryAcker {
    shared: Arc<Shared>,
    consumer: u64,
    tag: u64,
}

impl MemoryAcker {
    /// Take the delivery back from its consumer; fails if the consumer is
    /// closed or the delivery was already settled. A second settle closes
    /// the subscription, returning everything it held, as RabbitMQ answers
    /// an unknown delivery tag: a channel error (406) that closes the
    /// channel, so that code settling twice shows in the simulation as
    /// redeliveries and a subscription ended, not as one failed call.
    fn settle(&self, state: &mut State) -> Result<(String, QueuedMessage), BrokerError> {
        let consumer = state
            .consumers
            .get_mut(&self.consumer)
            .ok_or_else(|| unavailable("subscription closed; the delivery was returned"))?;
        if let Some(msg) = consumer.unacked.remove(&self.tag) {
            return Ok((consumer.queue.clone(), msg));
        }
        let queue = consumer.queue.clone();
        state.settled_twice += 1;
        state.close(self.consumer);
        state.dispatch(&queue);
        Err(unavailable(
            "unknown delivery tag (already acked or requeued): the channel is closed",
        ))
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.shared
            .yields
            .after(|| {
                let mut state = self.shared.lock();
                let (queue, _) = self.settle(&mut state)?;
                state.dispatch(&queue);
                Ok(())
            })
            .await
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.shared
            .yields
            .after(|| {
                let mut state = self.shared.lock();
                let (queue, msg) = self.settle(&mut state)?;
                state.return_to_queue(&queue, msg);
                state.dispatch(&queue);
                Ok(())
            })
            .await
    }
}

/// What a test's [`WithPublish`] broker does with a publish instead of
/// the in-process broker: hold a batch up, or refuse part of it.
#[cfg(test)]
#[async_trait]
pub(crate) trait PublishHook: Send + Sync + 'static {
    /// Publish `batch` through `inner`, or not.
    async fn publish(&self, inner: &MemoryBroker, batch: Vec<Outgoing>) -> Result<(), BrokerError>;
}

/// The in-process broker with its publishes through `hook`, for tests of
/// how callers meet a slow or refusing broker; every other call is the
/// in-process broker's.
#[cfg(test)]
pub(crate) struct WithPublish<H> {
    pub(crate) inner: Arc<MemoryBroker>,
    pub(crate) hook: H,
}

#[cfg(test)]
#[async_trait]
impl<H: PublishHook> Broker for WithPublish<H> {
    async fn declare(&self, task_queues: &[String]) -> Result<(), BrokerError> {
        self.inner.declare(task_queues).await
    }

    async fn publish(&self, batch: Vec<Outgoing>) -> Result<(), BrokerError> {
        self.hook.publish(&self.inner, batch).await
    }

    async fn subscribe_with_priority(
        &self,
        queue: &str,
        prefetch: u16,
        priority: i16,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        self.inner
            .subscribe_with_priority(queue, prefetch, priority)
            .await
    }

    async fn queue_stats(&self, queues: &[String]) -> Result<Vec<QueueStats>, BrokerError> {
        self.inner.queue_stats(queues).await
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;
    use crate::broker::HeaderValue;

    fn names() -> Names {
        Names::new("t")
    }

    fn q() -> String {
        names().task_queue("default")
    }

    async fn broker() -> MemoryBroker {
        let b = MemoryBroker::reliable(names());
        b.declare(&["default".to_owned()]).await.unwrap();
        b
    }

    /// A broker with the default task queue, injecting `faults` drawn
    /// from `seed`.
    async fn faulty(seed: u64, faults: FaultPlan) -> MemoryBroker {
        let b = MemoryBroker::new(names(), seed, faults);
        b.declare(&["default".to_owned()]).await.unwrap();
        b
    }

    fn msg(body: &str) -> Outgoing {
        Outgoing::durable(q(), body.as_bytes().to_vec())
    }

    async fn publish(b: &MemoryBroker, bodies: &[&str]) {
        b.publish(bodies.iter().map(|s| msg(s)).collect())
            .await
            .unwrap();
    }

    async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a delivery in time")
            .expect("subscription live")
            .expect("no error")
    }

    /// Whether `next` would wait now.
    fn waits(sub: &mut Box<dyn Subscription>) -> bool {
        sub.next().now_or_never().is_none()
    }

    #[tokio::test]
    async fn a_published_message_is_delivered_with_its_properties() {
        let b = broker().await;
        let mut out = msg("hello");
        out.properties.reply_to = Some("replies".into());
        out.properties.correlation_id = Some("c1".into());
        b.publish(vec![out.clone()]).await.unwrap();
        let mut sub = b.subscribe(&q(), 10).await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!(d.body, b"hello");
        assert_eq!(d.queue, q());
        assert_eq!(d.properties, out.properties);
        assert_eq!((d.delivery_count, d.redelivered), (0, false));
        assert_eq!(b.unacked_len(&q()).await, 1);
        d.acker.ack().await.unwrap();
        assert_eq!(b.unacked_len(&q()).await, 0);
        assert_eq!(b.ready_len(&q()).await, 0);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_by_a_publish() {
        let b = broker().await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        let waiter = tokio::spawn(async move { next(&mut sub).await.body });
        tokio::task::yield_now().await;
        publish(&b, &["late"]).await;
        assert_eq!(waiter.await.unwrap(), b"late");
    }

    #[tokio::test]
    async fn a_message_returned_more_often_than_the_delivery_limit_is_dead_lettered() {
        let b = broker().await;
        b.set_delivery_limit(Some(2));
        publish(&b, &["a"]).await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        // Two returns are within the limit; the third is past it.
        next(&mut sub).await.acker.requeue().await.unwrap();
        drop(sub);
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"a"[..], 2));
        d.acker.requeue().await.unwrap();
        assert_eq!(b.ready_len(&q()).await, 0);
        let dead = b.take_messages(&names().dead_queue()).await;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].body, b"a");
        let reason = dead[0]
            .properties
            .headers
            .iter()
            .find(|(k, _)| k == "x-first-death-reason");
        assert_eq!(
            reason.map(|(_, v)| v),
            Some(&HeaderValue::Text("delivery_limit".into()))
        );

        // A queue Conveyor does not declare as a work queue (a client's
        // reply queue) has no limit.
        b.declare_queue("replies").await;
        b.publish(vec![Outgoing::durable("replies".to_owned(), b"r".to_vec())])
            .await
            .unwrap();
        let mut sub = b.subscribe("replies", 1).await.unwrap();
        for _ in 0..3 {
            next(&mut sub).await.acker.requeue().await.unwrap();
        }
        assert_eq!(next(&mut sub).await.delivery_count, 3);
    }

    #[tokio::test]
    async fn a_capped_dead_letter_queue_keeps_its_newest_dead_letters() {
        let b = broker().await;
        b.set_dead_letter_cap(Some(2));
        let dead = names().dead_queue();
        for body in ["1", "2", "3"] {
            b.publish(vec![Outgoing::durable(dead.clone(), body.into())])
                .await
                .unwrap();
        }
        // One dead-lettered by the broker at its delivery limit counts too.
        b.set_delivery_limit(Some(0));
        publish(&b, &["returned"]).await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        next(&mut sub).await.acker.requeue().await.unwrap();
        assert_eq!(
            b.take_all(&dead).await,
            [b"3".to_vec(), b"returned".to_vec()]
        );
        assert_eq!(b.dead_letters_dropped(), 2);
    }

    #[tokio::test]
    async fn only_the_dead_letter_queue_is_capped_and_only_when_asked() {
        let b = broker().await;
        let dead = names().dead_queue();
        for body in ["1", "2", "3"] {
            b.publish(vec![Outgoing::durable(dead.clone(), body.into())])
                .await
                .unwrap();
        }
        assert_eq!(b.ready_len(&dead).await, 3, "no cap unless one is set");
        b.set_dead_letter_cap(Some(1));
        assert_eq!(
            b.take_all(&dead).await,
            [b"3".to_vec()],
            "setting one applies it"
        );
        publish(&b, &["a", "b", "c"]).await;
        assert_eq!(b.ready_len(&q()).await, 3, "a task queue keeps everything");
    }

    #[tokio::test]
    async fn a_requeued_message_comes_back_first_with_its_count() {
        let b = broker().await;
        publish(&b, &["a", "b"]).await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!(d.body, b"a");
        d.acker.requeue().await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!(d.body, b"a");
        assert_eq!((d.delivery_count, d.redelivered), (1, true));
        d.acker.requeue().await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"a"[..], 2));
        d.acker.ack().await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"b"[..], 0));
    }

    /// Messages requeued one after another while no consumer has room for
    /// them (here its subscription cancelled) come back in the order they
    /// were requeued, before the messages never delivered, as a quorum
    /// queue serves its returns. Until the thirty-fifth session each went
    /// to the head: `b, a, c`.
    #[tokio::test]
    async fn requeued_messages_come_back_in_the_order_they_were_returned() {
        let b = broker().await;
        publish(&b, &["a", "b", "c"]).await;
        let mut sub = b.subscribe(&q(), 2).await.unwrap();
        let (a, bee) = (next(&mut sub).await, next(&mut sub).await);
        sub.cancel().await.unwrap();
        a.acker.requeue().await.unwrap();
        bee.acker.requeue().await.unwrap();
        drop(sub);

        let mut sub = b.subscribe(&q(), 3).await.unwrap();
        let mut order = Vec::new();
        for _ in 0..3 {
            let d = next(&mut sub).await;
            order.push(String::from_utf8(d.body.clone()).unwrap());
            d.acker.ack().await.unwrap();
        }
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn settling_a_delivery_twice_closes_its_subscription_as_rabbitmq_closes_the_channel() {
        let b = broker().await;
        publish(&b, &["a", "b", "c"]).await;
        let mut sub = b.subscribe(&q(), 2).await.unwrap();
        let a = next(&mut sub).await;
        let held = next(&mut sub).await;
        a.acker.ack().await.unwrap();
        assert_eq!(b.settled_twice(), 0);
        assert!(matches!(
            a.acker.ack().await,
            Err(BrokerError::Unavailable(_))
        ));
        assert_eq!(b.settled_twice(), 1);
        // The subscription is over, and what it held is back in the queue,
        // counted as delivered once more.
        assert!(sub.next().await.is_none());
        assert!(matches!(
            held.acker.ack().await,
            Err(BrokerError::Unavailable(_))
        ));
        let mut again = b.subscribe(&q(), 0).await.unwrap();
        let d = next(&mut again).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"b"[..], 1));
        d.acker.requeue().await.unwrap();
        assert!(matches!(
            d.acker.requeue().await,
            Err(BrokerError::Unavailable(_))
        ));
        assert_eq!(b.settled_twice(), 2);
    }

    #[tokio::test]
    async fn prefetch_limits_unacked_deliveries() {
        let b = broker().await;
        publish(&b, &["1", "2", "3", "4", "5"]).await;
        let mut sub = b.subscribe(&q(), 2).await.unwrap();
        assert_eq!(b.unacked_len(&q()).await, 2);
        assert_eq!(b.ready_len(&q()).await, 3);
        let d1 = next(&mut sub).await;
        let d2 = next(&mut sub).await;
        assert!(waits(&mut sub), "a third delivery exceeds the prefetch");
        d1.acker.ack().await.unwrap();
        let d3 = next(&mut sub).await;
        assert_eq!(d3.body, b"3");
        assert!(waits(&mut sub));
        d2.acker.ack().await.unwrap();
        d3.acker.ack().await.unwrap();
        assert_eq!(next(&mut sub).await.body, b"4");
        assert_eq!(next(&mut sub).await.body, b"5");
    }

    #[tokio::test]
    async fn a_prefetch_of_zero_is_unlimited() {
        let b = broker().await;
        publish(&b, &["1", "2", "3"]).await;
        let _sub = b.subscribe(&q(), 0).await.unwrap();
        assert_eq!(b.unacked_len(&q()).await, 3);
    }

    #[tokio::test]
    async fn deliveries_go_round_robin_among_consumers() {
        let b = broker().await;
        let mut s1 = b.subscribe(&q(), 10).await.unwrap();
        let mut s2 = b.subscribe(&q(), 10).await.unwrap();
        publish(&b, &["1", "2", "3", "4"]).await;
        assert_eq!(next(&mut s1).await.body, b"1");
        assert_eq!(next(&mut s2).await.body, b"2");
        assert_eq!(next(&mut s1).await.body, b"3");
        assert_eq!(next(&mut s2).await.body, b"4");
    }

    #[tokio::test]
    async fn a_full_consumer_is_skipped() {
        let b = broker().await;
        let mut s1 = b.subscribe(&q(), 1).await.unwrap();
        let mut s2 = b.subscribe(&q(), 10).await.unwrap();
        publish(&b, &["1", "2", "3"]).await;
        assert_eq!(next(&mut s1).await.body, b"1");
        assert_eq!(next(&mut s2).await.body, b"2");
        assert_eq!(next(&mut s2).await.body, b"3");
    }

    #[tokio::test]
    async fn a_higher_priority_consumer_gets_everything_while_it_has_room() {
        let b = broker().await;
        let mut low = b.subscribe(&q(), 10).await.unwrap();
        let mut high = b.subscribe_with_priority(&q(), 2, 10).await.unwrap();
        publish(&b, &["1", "2", "3"]).await;
        assert_eq!(next(&mut high).await.body, b"1");
        assert_eq!(next(&mut high).await.body, b"2");
        assert_eq!(
            next(&mut low).await.body,
            b"3",
            "the full one is passed over"
        );
        assert_eq!(b.unacked_len(&q()).await, 3);
    }

    #[tokio::test]
    async fn dropping_connections_returns_unacked_deliveries() {
        let b = broker().await;
        publish(&b, &["a", "b", "c"]).await;
        let mut held = b.subscribe(&q(), 2).await.unwrap();
        let d = next(&mut held).await;
        assert_eq!(d.body, b"a");
        let mut idle = b.subscribe(&q(), 1).await.unwrap();
        let _c = next(&mut idle).await;
        let mut waiting = b.subscribe(&q(), 1).await.unwrap();
        let waiter = tokio::spawn(async move { waiting.next().await.is_none() });
        tokio::task::yield_now().await;

        b.drop_connections().await;

        assert!(waiter.await.unwrap(), "a waiting next() ends");
        assert!(held.next().await.is_none());
        assert!(matches!(
            d.acker.ack().await,
            Err(BrokerError::Unavailable(_))
        ));
        assert!(held.cancel().await.is_err());
        assert_eq!(b.unacked_len(&q()).await, 0);
        assert_eq!(b.ready_len(&q()).await, 3);

        let mut again = b.subscribe(&q(), 10).await.unwrap();
        let mut got: Vec<(Vec<u8>, u32)> = [
            next(&mut again).await,
            next(&mut again).await,
            next(&mut again).await,
        ]
        .into_iter()
        .map(|d| (d.body, d.delivery_count))
        .collect();
        // "a" was delivered, "b" was pushed to the same consumer, "c" to
        // another: all were out, all come back counted once more (each
        // subscription's at the head, in the order it received them).
        got.sort();
        assert_eq!(
            got,
            vec![(b"a".to_vec(), 1), (b"b".to_vec(), 1), (b"c".to_vec(), 1)]
        );
    }

    #[tokio::test]
    async fn dropping_a_subscription_returns_its_unacked_deliveries() {
        let b = broker().await;
        publish(&b, &["a", "b"]).await;
        let mut first = b.subscribe(&q(), 1).await.unwrap();
        let d = next(&mut first).await;
        let mut second = b.subscribe(&q(), 1).await.unwrap();
        let b_delivery = next(&mut second).await;
        assert_eq!(b_delivery.body, b"b");
        drop(first);
        assert!(d.acker.ack().await.is_err());
        // Back in the queue; the consumer left is full until it acks.
        assert_eq!(b.ready_len(&q()).await, 1);
        assert_eq!(b.unacked_len(&q()).await, 1);
        b_delivery.acker.ack().await.unwrap();
        let d = next(&mut second).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"a"[..], 1));
    }

    #[tokio::test]
    async fn cancel_stops_new_deliveries_but_keeps_unacked_ones() {
        let b = broker().await;
        publish(&b, &["a", "b"]).await;
        let mut sub = b.subscribe(&q(), 2).await.unwrap();
        let d = next(&mut sub).await;
        sub.cancel().await.unwrap();
        // Already pushed to it before the cancel: still its own.
        assert_eq!(next(&mut sub).await.body, b"b");
        assert!(sub.next().await.is_none());
        publish(&b, &["c"]).await;
        assert_eq!(b.ready_len(&q()).await, 1);
        let stats = b.queue_stats(&[q()]).await.unwrap();
        assert_eq!(stats[0].consumers, 0);
        d.acker.ack().await.unwrap();
        assert_eq!(b.unacked_len(&q()).await, 1);
        drop(sub);
        assert_eq!(b.unacked_len(&q()).await, 0);
        assert_eq!(b.ready_len(&q()).await, 2);
    }

    #[tokio::test]
    async fn publish_to_a_missing_queue_is_returned_when_mandatory() {
        let b = broker().await;
        let err = b
            .publish(vec![Outgoing::durable("nowhere", b"x".to_vec()), msg("ok")])
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Unroutable { queue, .. } if queue == "nowhere"));
        assert_eq!(
            b.ready_len(&q()).await,
            1,
            "the rest of the batch is queued"
        );
    }

    #[tokio::test]
    async fn publish_to_a_missing_queue_is_dropped_unless_mandatory() {
        let b = broker().await;
        let mut reply = Outgoing::durable("reply-1", b"r".to_vec());
        reply.mandatory = false;
        b.publish(vec![reply.clone()]).await.unwrap();
        assert_eq!(b.ready_len("reply-1").await, 0);
        b.declare_queue("reply-1").await;
        b.publish(vec![reply]).await.unwrap();
        assert_eq!(b.take_all("reply-1").await, vec![b"r".to_vec()]);
    }

    #[tokio::test]
    async fn declare_creates_submit_referred_dead_and_task_queues() {
        let b = broker().await;
        let all = vec![
            names().submit_queue(),
            names().referred_queue(),
            names().dead_queue(),
            q(),
            names().task_queue("other"),
        ];
        let stats = b.queue_stats(&all).await.unwrap();
        let listed: Vec<&str> = stats.iter().map(|s| s.queue.as_str()).collect();
        assert_eq!(
            listed,
            vec!["t.submit", "t.submit.referred", "t.dead", "t.tasks.default"]
        );
        assert!(b.subscribe("t.tasks.other", 1).await.is_err());
    }

    #[tokio::test]
    async fn queue_stats_count_ready_messages_and_consumers() {
        let b = broker().await;
        publish(&b, &["1", "2", "3"]).await;
        let _sub = b.subscribe(&q(), 1).await.unwrap();
        let stats = b.queue_stats(&[q()]).await.unwrap();
        assert_eq!(
            stats,
            vec![QueueStats {
                queue: q(),
                ready: 2,
                consumers: 1
            }]
        );
    }

    #[tokio::test]
    async fn take_messages_keeps_headers() {
        let b = broker().await;
        let mut dead = Outgoing::durable(names().dead_queue(), b"x".to_vec());
        dead.properties.headers =
            vec![("x-conveyor-reason".into(), HeaderValue::Text("bad".into()))];
        b.publish(vec![dead.clone()]).await.unwrap();
        let taken = b.take_messages(&names().dead_queue()).await;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].properties, dead.properties);
        assert_eq!(b.ready_len(&names().dead_queue()).await, 0);
    }

    #[tokio::test]
    async fn an_outage_fails_calls_and_ends_subscriptions() {
        let b = broker().await;
        publish(&b, &["a"]).await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        let d = next(&mut sub).await;
        assert!(b.is_connected());
        b.set_outage(true);
        assert!(!b.is_connected());
        assert!(sub.next().await.is_none());
        assert!(d.acker.ack().await.is_err());
        assert!(matches!(
            b.publish(vec![msg("b")]).await,
            Err(BrokerError::Unavailable(_))
        ));
        assert!(b.subscribe(&q(), 1).await.is_err());
        assert!(b.declare(&[]).await.is_err());
        assert!(b.queue_stats(&[q()]).await.is_err());
        b.set_outage(false);
        assert!(b.is_connected());
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        let d = next(&mut sub).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"a"[..], 1));
    }

    #[tokio::test]
    async fn next_is_cancel_safe() {
        let b = broker().await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        {
            // A `next` that starts waiting, then loses a `select!` to
            // something else after the message was pushed to it.
            let mut pending = sub.next();
            assert!(futures::poll!(&mut pending).is_pending());
            publish(&b, &["a"]).await;
        }
        tokio::select! {
            biased;
            _ = std::future::ready(()) => {}
            _ = sub.next() => panic!("the ready branch wins"),
        }
        assert_eq!(b.unacked_len(&q()).await, 1);
        let d = next(&mut sub).await;
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"a"[..], 0));
    }

    #[tokio::test]
    async fn calls_yield_only_when_a_simulation_asks() {
        let b = broker().await;
        // The embedded mode's calls complete at their first poll.
        for i in 0..20 {
            assert!(futures::poll!(b.publish(vec![msg(&i.to_string())])).is_ready());
        }
        b.yield_after_calls(Some(7));
        let mut yielded = 0;
        for i in 20..40 {
            let mut call = b.publish(vec![msg(&i.to_string())]);
            if futures::poll!(&mut call).is_pending() {
                // The effect is done before the yield: the message is queued
                // although its caller has not seen the confirm.
                assert_eq!(b.ready_len(&q()).await, i + 1);
                yielded += 1;
                call.await.unwrap();
            }
        }
        assert!(yielded > 0, "some calls yielded");
        b.yield_after_calls(None);
        assert!(futures::poll!(b.publish(vec![msg("last")])).is_ready());
    }

    #[tokio::test]
    async fn next_dropped_at_its_yield_keeps_the_message() {
        let b = broker().await;
        b.yield_after_calls(Some(3));
        publish(&b, &["a"]).await;
        let mut sub = b.subscribe(&q(), 1).await.unwrap();
        let mut dropped = 0;
        let d = loop {
            let mut n = sub.next();
            match futures::poll!(&mut n) {
                std::task::Poll::Ready(d) => break d.unwrap().unwrap(),
                // Cancelled while it yields, before it looked.
                std::task::Poll::Pending => dropped += 1,
            }
        };
        assert!(dropped > 0, "some nexts yielded");
        assert_eq!((d.body.as_slice(), d.delivery_count), (&b"a"[..], 0));
    }

    async fn run_with_faults(seed: u64) -> (Vec<bool>, Vec<Vec<u8>>) {
        let faults = FaultPlan {
            duplicate: 0.2,
            reorder: 0.2,
            publish_failure: 0.2,
            refuse: 0.0,
        };
        let b = faulty(seed, faults).await;
        let mut confirmed = Vec::new();
        for batch in 0..50 {
            let msgs = (0..4).map(|i| msg(&format!("{batch}.{i}"))).collect();
            confirmed.push(b.publish(msgs).await.is_ok());
        }
        (confirmed, b.take_all(&q()).await)
    }

    #[tokio::test]
    async fn the_same_seed_gives_the_same_faults() {
        let first = run_with_faults(7).await;
        assert_eq!(first, run_with_faults(7).await);
        assert_ne!(first, run_with_faults(8).await);
        let (confirmed, queued) = &first;
        assert!(confirmed.iter().any(|ok| !ok), "some confirms were lost");
        let mut sorted = queued.clone();
        sorted.sort();
        sorted.dedup();
        assert!(sorted.len() < queued.len(), "some messages were duplicated");
        assert_ne!(&sorted, queued, "some messages were reordered");
    }

    #[tokio::test]
    async fn a_lost_confirm_queues_a_prefix_of_the_batch() {
        let faults = FaultPlan {
            publish_failure: 1.0,
            ..FaultPlan::default()
        };
        let b = faulty(3, faults).await;
        for _ in 0..20 {
            let batch: Vec<Outgoing> = (0..5).map(|i| msg(&i.to_string())).collect();
            assert!(matches!(
                b.publish(batch).await,
                Err(BrokerError::Unavailable(_))
            ));
            let queued = b.take_all(&q()).await;
            let expected: Vec<Vec<u8>> = (0..queued.len())
                .map(|i| i.to_string().into_bytes())
                .collect();
            assert_eq!(queued, expected);
        }
        b.set_faults(FaultPlan::default());
        publish(&b, &["fine"]).await;
    }

    /// ... and says which messages of a batch it took.
    #[tokio::test]
    async fn a_full_queue_refuses_every_message_to_it_until_it_has_room() {
        let b = broker().await;
        b.declare_queue("other").await;
        b.set_full(&q(), true);
        let to_other = Outgoing::durable("other".to_owned(), b"o".to_vec());
        let result = b.publish_each(vec![msg("a"), to_other, msg("b")]).await;
        assert!(
            matches!(&result, Err(PartlyPublished {
                error: BrokerError::Refused { queue, .. },
                confirmed,
                ..
            }) if *queue == q() && confirmed == &[false, true, false]),
            "{result:?}"
        );
        assert_eq!(b.ready_len(&q()).await, 0);
        assert_eq!(b.take_all("other").await, vec![b"o".to_vec()]);
        assert_eq!(b.refused(), 2);
        b.set_full(&q(), false);
        publish(&b, &["c"]).await;
        assert_eq!(b.take_all(&q()).await, vec![b"c".to_vec()]);
    }

    #[tokio::test]
    async fn a_refused_message_is_not_queued_and_the_rest_of_its_batch_is() {
        let faults = FaultPlan {
            refuse: 0.1,
            ..FaultPlan::default()
        };
        let b = faulty(5, faults).await;
        let mut refused = 0;
        let mut queued_total = 0;
        for batch in 0..20 {
            let msgs: Vec<Outgoing> = (0..4).map(|i| msg(&format!("{batch}.{i}"))).collect();
            let result = b.publish(msgs).await;
            let queued = b.take_all(&q()).await.len();
            queued_total += queued;
            match result {
                Ok(()) => assert_eq!(queued, 4),
                Err(BrokerError::Refused { queue, .. }) => {
                    assert_eq!(queue, q());
                    assert!(queued < 4);
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            refused > 0 && refused < 20,
            "{refused} of 20 batches refused"
        );
        assert_eq!(
            b.refused() + queued_total,
            80,
            "each message queued or refused"
        );
        assert!(queued_total > 0, "some messages were queued");
    }

    #[tokio::test]
    async fn reordering_keeps_every_message() {
        let faults = FaultPlan {
            reorder: 1.0,
            ..FaultPlan::default()
        };
        let b = faulty(11, faults).await;
        let bodies: Vec<String> = (0..100).map(|i| format!("{i:03}")).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        publish(&b, &refs).await;
        let queued = b.take_all(&q()).await;
        let mut sorted = queued.clone();
        sorted.sort();
        assert_ne!(queued, sorted);
        let expected: Vec<Vec<u8>> = bodies.into_iter().map(String::into_bytes).collect();
        assert_eq!(sorted, expected);
    }

    #[tokio::test]
    async fn duplicates_are_queued_twice() {
        let faults = FaultPlan {
            duplicate: 1.0,
            ..FaultPlan::default()
        };
        let b = faulty(1, faults).await;
        publish(&b, &["a", "b"]).await;
        assert_eq!(
            b.take_all(&q()).await,
            vec![b"a".to_vec(), b"a".to_vec(), b"b".to_vec(), b"b".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_tap_gets_one_unchanged_copy_of_each_message_published_after_it() {
        let faults = FaultPlan {
            duplicate: 1.0,
            ..FaultPlan::default()
        };
        let b = faulty(1, faults).await;
        publish(&b, &["before"]).await;
        b.tap(&q(), "tap").await;
        let mut sub = b.subscribe(&q(), 0).await.unwrap();
        let mut out = msg("after");
        out.properties.correlation_id = Some("c1".into());
        b.publish(vec![out.clone()]).await.unwrap();
        // The consumer takes the originals (duplicated by the fault) away;
        // the tap keeps its one copy.
        for _ in 0..4 {
            next(&mut sub).await.acker.ack().await.unwrap();
        }
        let tapped = b.take_messages("tap").await;
        assert_eq!(tapped.len(), 1);
        assert_eq!(tapped[0].body, b"after");
        assert_eq!(tapped[0].properties, out.properties);
    }

    #[test]
    fn out_of_range_probabilities_do_not_panic() {
        let faults = FaultPlan {
            duplicate: f64::NAN,
            reorder: 2.0,
            publish_failure: -1.0,
            refuse: f64::NEG_INFINITY,
        };
        let b = MemoryBroker::new(names(), 0, faults);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            b.declare(&["default".to_owned()]).await.unwrap();
            publish(&b, &["a", "b"]).await;
            assert_eq!(b.ready_len(&q()).await, 2);
        });
    }
}
