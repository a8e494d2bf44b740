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
#[derive(Debug, thiserror::Error)]
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
    /// The broker could not route a message published with the mandatory
    /// flag and returned it: no queue of that name exists (never declared,
    /// or deleted since). Declaring the queue again and publishing again
    /// helps.
    #[error("broker returned message to {queue} as unroutable: {reason}")]
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

/// A header value on an outgoing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// Text.
    Text(String),
    /// Integer.
    Int(i64),
}

/// A message to publish through the default exchange to `queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Target queue name (the routing key on the default exchange).
    pub queue: String,
    /// Payload.
    pub body: Vec<u8>,
    /// Persist to disk (delivery mode 2).
    pub persistent: bool,
    /// Treat "no queue to route to" as a failure.
    pub mandatory: bool,
    /// AMQP correlation id.
    pub correlation_id: Option<String>,
    /// AMQP reply-to.
    pub reply_to: Option<String>,
    /// Extra headers.
    pub headers: Vec<(String, HeaderValue)>,
}

impl Outgoing {
    /// A persistent, mandatory JSON message: how Conveyor publishes work.
    pub fn durable(queue: impl Into<String>, body: Vec<u8>) -> Outgoing {
        Outgoing {
            queue: queue.into(),
            body,
            persistent: true,
            mandatory: true,
            correlation_id: None,
            reply_to: None,
            headers: Vec::new(),
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
    /// AMQP reply-to.
    pub reply_to: Option<String>,
    /// AMQP correlation id.
    pub correlation_id: Option<String>,
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
}

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

/// Moves messages. The AMQP implementation talks to RabbitMQ; an
/// in-process one serves the embedded mode and simulations.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Declare Conveyor's queues: submit, dead, and the task queues named.
    async fn declare(&self, task_queues: &[String]) -> Result<(), BrokerError>;

    /// Publish every message and wait until the broker has confirmed all of
    /// them as queued. An error means some may not be: publish again
    /// (duplicates are harmless by design). A mandatory message with no
    /// queue to go to fails the call as [`BrokerError::Unroutable`]; the
    /// broker does not declare queues on its own.
    async fn publish(&self, batch: Vec<Outgoing>) -> Result<(), BrokerError>;

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
}
