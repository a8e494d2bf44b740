//! The broker: how messages move between clients, dispatchers and workers.
//!
//! [`Broker`] is the seam between Conveyor's logic and RabbitMQ. It is as
//! small as the logic allows: publish a batch and learn that every message
//! is safely queued (persisted, routed, confirmed), and subscribe to a
//! queue with a prefetch. Everything AMQP-specific — channels, publisher
//! confirms, the mandatory flag, queue arguments — stays in `amqp.rs`.

pub mod amqp;
pub mod memory;

use async_trait::async_trait;

/// Why a broker operation failed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The connection or channel is gone, or the broker is unreachable;
    /// reconnecting and retrying can help.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused a message (nack): e.g. a full queue rejecting
    /// publishes, or a queue without a leader.
    #[error("broker refused message to {queue}: {reason}")]
    Refused {
        /// The target queue.
        queue: String,
        /// What the broker said.
        reason: String,
    },
    /// No queue of that name exists (never declared, or deleted since):
    /// the broker returned a message published to it with the mandatory
    /// flag, or refused to consume from it (404). Declaring the queue
    /// again and trying again helps.
    #[error("no queue {queue} (deleted?): {reason}")]
    Unroutable {
        /// The target queue.
        queue: String,
        /// What the broker said (reply code and text).
        reason: String,
    },
    /// A request the broker will never accept (bad arguments, access).
    #[error("broker rejected request: {0}")]
    Fatal(String),
}

impl BrokerError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            BrokerError::Unavailable(_) => true,
            BrokerError::Refused { .. } => true,
            BrokerError::Unroutable { .. } => true,
            BrokerError::Fatal(_) => false,
        }
    }

    /// Whether the connection itself failed, so that any other call made
    /// now would fail alike; the other errors concern one message or queue.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BrokerError::Unavailable(_))
    }
}

/// A header value, as AMQP field tables carry them. Every type RabbitMQ
/// sends has a variant, so a message passed through Conveyor (given back
/// to its queue, or dead-lettered) keeps its headers; the integer types
/// of every width are one [`HeaderValue::Int`].
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    /// Text.
    Text(String),
    /// Integer.
    Int(i64),
    /// Boolean.
    Bool(bool),
    /// Floating point.
    Float(f64),
    /// A decimal: `value` / 10^`scale`.
    Decimal {
        /// Digits after the point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// A timestamp, Unix seconds.
    Timestamp(u64),
    /// Raw bytes (also text that is not UTF-8).
    Bytes(Vec<u8>),
    /// A list of values.
    List(Vec<HeaderValue>),
    /// A nested table.
    Table(Vec<(String, HeaderValue)>),
    /// No value.
    Void,
}

/// What a message says about itself beside its body: the AMQP basic
/// properties Conveyor reads or carries through. Persistence and the
/// mandatory flag are on [`Outgoing`]; a message's `expiration` and
/// `user_id` are never carried (a dead letter must not expire, and the
/// broker refuses a `user_id` that is not the publishing connection's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    /// MIME type of the body.
    pub content_type: Option<String>,
    /// Encoding of the body.
    pub content_encoding: Option<String>,
    /// AMQP correlation id.
    pub correlation_id: Option<String>,
    /// AMQP reply-to.
    pub reply_to: Option<String>,
    /// The publisher's message id.
    pub message_id: Option<String>,
    /// The publisher's timestamp, Unix seconds.
    pub timestamp: Option<u64>,
    /// The publisher's message type (AMQP `type`).
    pub kind: Option<String>,
    /// The publishing application.
    pub app_id: Option<String>,
    /// Message priority.
    pub priority: Option<u8>,
    /// Headers, in order.
    pub headers: Vec<(String, HeaderValue)>,
}

/// The header in which RabbitMQ's quorum queues count a message's earlier
/// deliveries.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Headers the broker writes on a delivery, which a copy published again
/// must not carry: a copy is a new message.
const BROKER_DELIVERY_HEADERS: &[&str] = &[DELIVERY_COUNT];

impl Properties {
    /// The properties of a JSON message Conveyor writes.
    pub fn json() -> Properties {
        Properties {
            content_type: Some("application/json".into()),
            ..Properties::default()
        }
    }

    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Set header `name` to `value`, replacing any value it had.
    pub fn set_header(&mut self, name: &str, value: HeaderValue) {
        match self.headers.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.headers.push((name.to_owned(), value)),
        }
    }

    /// How many times the broker says it delivered the message before
    /// (`x-delivery-count`, which quorum queues set on redeliveries); 0
    /// without the header.
    pub fn delivery_count(&self) -> u32 {
        match self.header(DELIVERY_COUNT) {
            Some(HeaderValue::Int(n)) => u32::try_from((*n).max(0)).unwrap_or(u32::MAX),
            _ => 0,
        }
    }

    /// These properties for a copy of a delivered message published again
    /// (given back, or dead-lettered): the broker's per-delivery headers
    /// dropped, everything the publisher set kept.
    pub fn for_copy(&self) -> Properties {
        let mut copy = self.clone();
        copy.headers
            .retain(|(k, _)| !BROKER_DELIVERY_HEADERS.contains(&k.as_str()));
        copy
    }
}

/// A message to publish through the default exchange to `queue`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Target queue name (the routing key on the default exchange).
    pub queue: String,
    /// Payload.
    pub body: Vec<u8>,
    /// Persist to disk (delivery mode 2).
    pub persistent: bool,
    /// Treat "no queue to route to" as a failure.
    pub mandatory: bool,
    /// Content type, correlation id, reply-to, headers and the rest.
    pub properties: Properties,
}

impl Outgoing {
    /// A persistent, mandatory JSON message: how Conveyor publishes work.
    pub fn durable(queue: impl Into<String>, body: Vec<u8>) -> Outgoing {
        Outgoing {
            queue: queue.into(),
            body,
            persistent: true,
            mandatory: true,
            properties: Properties::json(),
        }
    }
}

/// Acknowledges one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is handled; drop it.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// The message was not handled; give it back to the queue.
    async fn requeue(&self) -> Result<(), BrokerError>;
}

/// One message received from a queue.
pub struct Delivery {
    /// The queue it came from.
    pub queue: String,
    /// Payload.
    pub body: Vec<u8>,
    /// Content type, correlation id, reply-to, headers and the rest, as
    /// published (the broker's own `x-delivery-count` header included).
    pub properties: Properties,
    /// How many times the broker delivered it before (quorum queues count;
    /// classic queues only say "at least once" through `redelivered`).
    pub delivery_count: u32,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// Acknowledges it.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("bytes", &self.body.len())
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

/// A live consumer of one queue.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` when the subscription ended (cancelled or
    /// the connection closed — the caller reconnects).
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>>;
    /// Stop receiving new deliveries; unacked ones stay with the caller.
    async fn cancel(&mut self) -> Result<(), BrokerError>;
    /// End the subscription once its owner settled every delivery it
    /// means to (a stopping process): acks not sent yet go out first, so a
    /// process that exits next does not get its acked deliveries sent
    /// again to others; whatever is still unsettled goes back to the
    /// queue. Dropping a subscription instead leaves that to its
    /// connection.
    async fn close(self: Box<Self>) {}
}

/// Close `subscriptions` together ([`Subscription::close`]), waiting at
/// most [`CLOSE_BOUND`] for them all: a stopping process, not one whose
/// broker has gone silent.
pub async fn close_all(subscriptions: Vec<Box<dyn Subscription>>) {
    let closing = futures::future::join_all(subscriptions.into_iter().map(|s| s.close()));
    if tokio::time::timeout(CLOSE_BOUND, closing).await.is_err() {
        tracing::warn!(
            "subscriptions not closed within {CLOSE_BOUND:?}; their connection returns what they held"
        );
    }
}

/// How long [`close_all`] waits.
pub const CLOSE_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

/// The depth and consumers of a queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Messages ready for delivery (not counting unacked ones).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// A batch not wholly confirmed ([`Broker::publish_each`]).
#[derive(Debug)]
pub struct PartlyPublished {
    /// The first failure.
    pub error: BrokerError,
    /// One entry per message of the batch, in order: whether the broker
    /// confirmed it as queued. The others may be queued or not.
    pub confirmed: Vec<bool>,
    /// Every queue the broker returned a message of the batch for, as
    /// [`BrokerError::Unroutable`] (the queue is gone), once each: the
    /// first error names only one.
    pub unroutable: Vec<String>,
}

impl PartlyPublished {
    /// Nothing of a batch of `sent` messages known to be queued.
    pub fn none_of(sent: usize, error: BrokerError) -> PartlyPublished {
        let unroutable = match &error {
            BrokerError::Unroutable { queue, .. } => vec![queue.clone()],
            _ => Vec::new(),
        };
        PartlyPublished {
            error,
            confirmed: vec![false; sent],
            unroutable,
        }
    }

    /// What a batch's per-message verdicts (`None` for a message
    /// confirmed as queued) come to: nothing if all are confirmed.
    pub fn from_verdicts(verdicts: Vec<Option<BrokerError>>) -> Option<PartlyPublished> {
        let confirmed = verdicts.iter().map(Option::is_none).collect();
        let mut unroutable: Vec<String> = Vec::new();
        let mut first = None;
        for error in verdicts.into_iter().flatten() {
            if let BrokerError::Unroutable { queue, .. } = &error
                && !unroutable.contains(queue)
            {
                unroutable.push(queue.clone());
            }
            first.get_or_insert(error);
        }
        Some(PartlyPublished {
            error: first?,
            confirmed,
            unroutable,
        })
    }
}

/// Moves messages. The AMQP implementation talks to RabbitMQ; an
/// in-process one serves the embedded mode and simulations.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Declare Conveyor's queues: submit, referred, dead, and the task
    /// queues named.
    async fn declare(&self, task_queues: &[String]) -> Result<(), BrokerError>;

    /// Publish every message and wait until the broker has confirmed all of
    /// them as queued. An error means some may not be: publish again
    /// (duplicates are harmless by design). A mandatory message with no
    /// queue to go to fails the call as [`BrokerError::Unroutable`]; the
    /// broker does not declare queues on its own.
    async fn publish(&self, batch: Vec<Outgoing>) -> Result<(), BrokerError>;

    /// [`Broker::publish`], saying on failure which messages the broker
    /// did confirm as queued, so that a caller can settle those and try
    /// again only with the others (not every message of the batch, which
    /// would queue duplicates of the confirmed ones each time). By default
    /// none is known to be confirmed.
    async fn publish_each(&self, batch: Vec<Outgoing>) -> Result<(), PartlyPublished> {
        let sent = batch.len();
        self.publish(batch)
            .await
            .map_err(|error| PartlyPublished::none_of(sent, error))
    }

    /// Consume `queue`, at most `prefetch` unacked deliveries at a time.
    async fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        self.subscribe_with_priority(queue, prefetch, 0).await
    }

    /// Consume `queue` as [`Broker::subscribe`] does, at a consumer
    /// priority: while a consumer of higher priority has room under its
    /// prefetch, the queue's messages go to it; lower ones get messages
    /// only when every higher one is full (RabbitMQ's `x-priority`).
    async fn subscribe_with_priority(
        &self,
        queue: &str,
        prefetch: u16,
        priority: i16,
    ) -> Result<Box<dyn Subscription>, BrokerError>;

    /// Depth and consumers of each named queue (missing queues are skipped).
    async fn queue_stats(&self, queues: &[String]) -> Result<Vec<QueueStats>, BrokerError>;

    /// Whether the connection is up.
    fn is_connected(&self) -> bool;

    /// Make the connection again if it was lost while nothing needed it
    /// (a broker that holds more than one connection may notice the loss
    /// of one only at its next use); readiness asks this before
    /// [`Broker::is_connected`].
    async fn ensure_connected(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_batchs_verdicts_name_the_first_error_and_every_returned_queue() {
        let returned = |q: &str| {
            Some(BrokerError::Unroutable {
                queue: q.into(),
                reason: "312 NO_ROUTE".into(),
            })
        };
        let refused = Some(BrokerError::Refused {
            queue: "full".into(),
            reason: "nack".into(),
        });
        assert!(PartlyPublished::from_verdicts(vec![None, None]).is_none());
        let partly = PartlyPublished::from_verdicts(vec![
            refused,
            None,
            returned("gone"),
            returned("gone"),
            returned("other"),
        ])
        .unwrap();
        assert!(matches!(partly.error, BrokerError::Refused { .. }));
        assert_eq!(partly.confirmed, [false, true, false, false, false]);
        assert_eq!(partly.unroutable, ["gone", "other"]);
    }

    #[test]
    fn the_delivery_count_is_read_from_the_brokers_header() {
        let with = |v: HeaderValue| Properties {
            headers: vec![(DELIVERY_COUNT.into(), v)],
            ..Properties::json()
        };
        assert_eq!(Properties::json().delivery_count(), 0, "never redelivered");
        assert_eq!(with(HeaderValue::Int(3)).delivery_count(), 3);
        assert_eq!(with(HeaderValue::Int(-1)).delivery_count(), 0);
        assert_eq!(with(HeaderValue::Text("3".into())).delivery_count(), 0);
        assert_eq!(
            with(HeaderValue::Int(3)).for_copy().delivery_count(),
            0,
            "a copy is new"
        );
    }
}
