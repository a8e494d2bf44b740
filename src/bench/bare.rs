//! The bare broker loop: what RabbitMQ alone does on this machine with the
//! same guarantees Conveyor asks of it.
//!
//! - A scratch durable queue, *classic* unless asked otherwise (deleted
//!   first if a previous run left it, and by the caller afterwards).
//!   Conveyor's own queues are quorum queues by default, which cost more
//!   per message; `--bare-queue-type quorum` compares like with like.
//! - A consumer on its own connection, prefetch 200, manual acks: **one
//!   `basic.ack` per message** (`multiple = false`), the plain loop the
//!   issue describes. Conveyor itself coalesces acks (one `multiple` ack
//!   for the deliveries settled together), which the yardstick does not
//!   get: it is the broker doing the simplest safe thing, not a rival.
//! - A publisher on another connection in confirm mode: persistent
//!   messages through the default exchange, pipelined, at most `window`
//!   unconfirmed at once (the oldest confirm is awaited when the window is
//!   full).
//! - The time is taken from the first publish to the last ack; msgs/s =
//!   messages / that time.
//! - Each publish and each confirm is awaited for at most the run's
//!   time-out: a broker in a resource alarm answers neither, and the loop
//!   ends with an error naming the wait instead of hanging.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use serde::Serialize;

use super::report::Percentiles;
use super::{BenchError, amqp_connection, broker_err, broker_within};
use crate::config::Config;
use crate::config::QueueType;

/// Prefetch of the bare consumer.
pub const PREFETCH: u16 = 200;

/// How long the scratch queue outlives its last use (RabbitMQ's
/// `x-expires`: no consumer, no declare) if nothing deletes it.
const SCRATCH_EXPIRES: Duration = Duration::from_secs(600);

/// Longest wait for RabbitMQ to answer one close of the loop's channels
/// and connections.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the bare loop achieved.
#[derive(Debug, Clone, Serialize)]
pub struct BareReport {
    /// The scratch queue.
    pub queue: String,
    /// `classic` or `quorum`.
    pub queue_type: &'static str,
    /// Messages published and consumed.
    pub messages: usize,
    /// Body size in bytes.
    pub message_bytes: usize,
    /// Consumer prefetch.
    pub prefetch: u16,
    /// How acks were sent.
    pub ack_mode: &'static str,
    /// Unconfirmed publishes allowed at once.
    pub confirm_window: usize,
    /// First publish to last confirm, in seconds.
    pub publish_s: f64,
    /// First publish to last ack, in seconds.
    pub seconds: f64,
    /// messages / seconds.
    pub msgs_per_s: f64,
}

/// A bare hop at an offered rate: how long one persistent message takes
/// from `basic.publish` to its delivery at a consumer, through one queue of
/// the deployment's own type. Conveyor's latency from publish to
/// `succeeded` is at least two such hops (submit, task) plus its Redis
/// round trips, so this is the floor its latency is read against.
#[derive(Debug, Clone, Serialize)]
pub struct BareHopReport {
    /// The scratch queue.
    pub queue: String,
    /// `classic` or `quorum`.
    pub queue_type: &'static str,
    /// Messages published and consumed.
    pub messages: usize,
    /// Body size in bytes.
    pub message_bytes: usize,
    /// Messages offered per second (the load's rate).
    pub offered_rate: f64,
    /// Publish -> delivery at the consumer, in ms.
    pub latency_ms: Option<Percentiles>,
}

/// What a run is measured against: the bare loop's throughput, or (at an
/// offered rate) a bare hop's latency.
#[derive(Debug, Clone)]
pub enum Yardstick {
    /// [`run`].
    Throughput(BareReport),
    /// [`hop_latency`].
    Hop(BareHopReport),
}

fn type_name(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    }
}

/// A publisher connection, a consumer on its own connection (prefetch
/// [`PREFETCH`], manual acks) and the scratch queue they share, declared
/// afresh.
struct Loop {
    publisher_conn: lapin::Connection,
    consumer_conn: lapin::Connection,
    publisher: lapin::Channel,
    consumer_channel: lapin::Channel,
}

impl Loop {
    async fn open(
        config: &Config,
        queue: &str,
        queue_type: QueueType,
    ) -> Result<(Loop, lapin::Consumer), BenchError> {
        let publisher_conn =
            amqp_connection(config, "cannot connect (bare loop publisher)").await?;
        let consumer_conn = amqp_connection(config, "cannot connect (bare loop consumer)").await?;

        let setup = publisher_conn
            .create_channel()
            .await
            .map_err(broker_err("channel"))?;
        let _ = setup
            .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
            .await;
        // Channels are closed explicitly, each before its connection: a
        // channel dropped open is closed in the background, and a close
        // racing the connection's makes lapin log a connection error.
        let _ = setup.close(200, "deleted".into()).await;
        let setup = publisher_conn
            .create_channel()
            .await
            .map_err(broker_err("channel"))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(type_name(queue_type).into()),
        );
        // Each run has its own: one left by a bench killed mid-run (by
        // `kill -9`, a CI time-out) goes by itself once unused.
        args.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(SCRATCH_EXPIRES.as_millis() as u32),
        );
        setup
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(broker_err("declaring the bare queue"))?;
        let _ = setup.close(200, "declared".into()).await;

        let consumer_channel = consumer_conn
            .create_channel()
            .await
            .map_err(broker_err("channel"))?;
        consumer_channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(broker_err("basic.qos"))?;
        let consumer = consumer_channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from("bench-bare"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_err("basic.consume"))?;
        let publisher = publisher_conn
            .create_channel()
            .await
            .map_err(broker_err("channel"))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_err("confirm.select"))?;
        Ok((
            Loop {
                publisher_conn,
                consumer_conn,
                publisher,
                consumer_channel,
            },
            consumer,
        ))
    }

    /// Publish `body` to `queue`, waiting at most `within` for the channel
    /// to take it.
    async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        within: Duration,
    ) -> Result<PublisherConfirm, BenchError> {
        // Mandatory: a scratch queue deleted under the loop (by hand) fails
        // it as returned rather than confirming messages that went nowhere.
        let publish = self.publisher.basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        );
        broker_within(within, "basic.publish (bare loop)", publish)
            .await?
            .map_err(broker_err("basic.publish"))
    }

    /// Close channels and connections, each given [`CLOSE_WAIT`]: a
    /// broker in a resource alarm may never answer a close.
    async fn close(self) {
        let _ =
            tokio::time::timeout(CLOSE_WAIT, self.publisher.close(200, "bench done".into())).await;
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            self.consumer_channel.close(200, "bench done".into()),
        )
        .await;
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            self.publisher_conn.close(200, "bench done".into()),
        )
        .await;
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            self.consumer_conn.close(200, "bench done".into()),
        )
        .await;
    }
}

/// Consume `messages` deliveries with one ack each, calling `seen` on
/// every body; returns when the last one was acked.
async fn consume(
    mut consumer: lapin::Consumer,
    messages: usize,
    mut seen: impl FnMut(&[u8]) + Send + 'static,
) -> Result<Instant, BenchError> {
    let mut count = 0usize;
    while count < messages {
        match consumer.next().await {
            Some(Ok(delivery)) => {
                seen(&delivery.data);
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(broker_err("basic.ack"))?;
                count += 1;
            }
            Some(Err(e)) => return Err(BenchError::Broker(format!("consuming: {e}"))),
            None => {
                return Err(BenchError::Broker(format!(
                    "the bare consumer stopped after {count} of {messages} messages"
                )));
            }
        }
    }
    Ok(Instant::now())
}

/// Wait for the consumer, generously: the loop normally takes seconds.
async fn join_consumer(
    consuming: tokio::task::JoinHandle<Result<Instant, BenchError>>,
    messages: usize,
    expected: Duration,
) -> Result<Instant, BenchError> {
    let limit = expected + Duration::from_secs(60) + Duration::from_millis(messages as u64);
    match tokio::time::timeout(limit, consuming).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(BenchError::Broker(format!("bare consumer: {join}"))),
        Err(_) => Err(BenchError::Broker(format!(
            "the bare loop did not consume {messages} messages within {limit:?}"
        ))),
    }
}

/// The messages of a bare run and how they are sent.
#[derive(Debug, Clone, Copy)]
pub struct BareLoad {
    /// Type of the scratch queue.
    pub queue_type: QueueType,
    /// Messages published and consumed.
    pub messages: usize,
    /// Body size in bytes (the hop's carry their publish time: at least 16).
    pub message_bytes: usize,
    /// Most unconfirmed publishes outstanding.
    pub confirm_window: usize,
    /// Longest wait for RabbitMQ to take a publish, or to confirm it: the
    /// run's time-out.
    pub timeout: Duration,
}

/// Run the loop on `queue` (which is deleted first if it exists; the
/// caller deletes it afterwards).
pub async fn run(config: &Config, queue: &str, load: BareLoad) -> Result<BareReport, BenchError> {
    let BareLoad {
        queue_type,
        messages,
        message_bytes,
        confirm_window: window,
        timeout,
    } = load;
    let (bare, consumer) = Loop::open(config, queue, queue_type).await?;
    let consuming = tokio::spawn(consume(consumer, messages, |_| {}));
    let stop_consuming = consuming.abort_handle();

    let looped = async {
        let body = vec![b'x'; message_bytes];
        let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window.min(messages));
        let start = Instant::now();
        for _ in 0..messages {
            if pending.len() >= window
                && let Some(confirm) = pending.pop_front()
            {
                check(confirmed(confirm, timeout).await?)?;
            }
            pending.push_back(bare.publish(queue, &body, timeout).await?);
        }
        for confirm in pending {
            check(confirmed(confirm, timeout).await?)?;
        }
        let published = start.elapsed();
        let last_ack = join_consumer(consuming, messages, Duration::ZERO).await?;
        Ok::<_, BenchError>((published, last_ack.duration_since(start).as_secs_f64()))
    }
    .await;
    // Also after a failure: the consumer and both connections go.
    stop_consuming.abort();
    bare.close().await;
    let (published, seconds) = looped?;
    Ok(BareReport {
        queue: queue.to_owned(),
        queue_type: type_name(queue_type),
        messages,
        message_bytes,
        prefetch: PREFETCH,
        ack_mode: "one basic.ack per message (multiple=false)",
        confirm_window: window,
        publish_s: published.as_secs_f64(),
        seconds,
        msgs_per_s: messages as f64 / seconds.max(1e-9),
    })
}

/// Publish `messages` at `rate` per second to `queue` (deleted first if it
/// exists; the caller deletes it afterwards), each carrying the time it was
/// published, and take each one's publish -> delivery latency. Paced like
/// the load (message `i` is due at `start + i / rate`), with the same
/// window of unconfirmed publishes.
pub async fn hop_latency(
    config: &Config,
    queue: &str,
    load: BareLoad,
    rate: f64,
) -> Result<BareHopReport, BenchError> {
    let BareLoad {
        queue_type,
        messages,
        message_bytes,
        confirm_window: window,
        timeout,
    } = load;
    let (bare, consumer) = Loop::open(config, queue, queue_type).await?;
    let start = Instant::now();
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(messages)));
    let sink = std::sync::Arc::clone(&samples);
    let consuming = tokio::spawn(consume(consumer, messages, move |body| {
        let now = start.elapsed().as_nanos();
        if let Some(sent) = body
            .get(..16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(u128::from_le_bytes)
        {
            let ms = now.saturating_sub(sent) as f64 / 1e6;
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
        }
    }));

    let stop_consuming = consuming.abort_handle();
    let looped = async {
        let mut body = vec![b'x'; message_bytes.max(16)];
        let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window.min(messages));
        for i in 0..messages {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if Instant::now() < due {
                tokio::time::sleep_until(due.into()).await;
            }
            while pending.len() >= window {
                if let Some(confirm) = pending.pop_front() {
                    check(confirmed(confirm, timeout).await?)?;
                }
            }
            body[..16].copy_from_slice(&start.elapsed().as_nanos().to_le_bytes());
            pending.push_back(bare.publish(queue, &body, timeout).await?);
        }
        for confirm in pending {
            check(confirmed(confirm, timeout).await?)?;
        }
        let expected = Duration::from_secs_f64(messages as f64 / rate);
        join_consumer(consuming, messages, expected).await?;
        Ok::<_, BenchError>(())
    }
    .await;
    // Also after a failure: the consumer and both connections go.
    stop_consuming.abort();
    bare.close().await;
    looped?;
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(BareHopReport {
        queue: queue.to_owned(),
        queue_type: type_name(queue_type),
        messages,
        message_bytes: message_bytes.max(16),
        offered_rate: rate,
        latency_ms: Percentiles::of(samples),
    })
}

/// A bare-loop message's confirm, awaited for at most `within`.
async fn confirmed(
    confirm: PublisherConfirm,
    within: Duration,
) -> Result<Result<Confirmation, lapin::Error>, BenchError> {
    broker_within(within, "a publisher confirm (bare loop)", confirm).await
}

fn check(confirm: Result<Confirmation, lapin::Error>) -> Result<(), BenchError> {
    match confirm {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(BenchError::Broker(
            "a bare-loop message was returned unroutable".into(),
        )),
        Ok(Confirmation::Nack(_)) => {
            Err(BenchError::Broker("a bare-loop message was nacked".into()))
        }
        Ok(Confirmation::NotRequested) => Err(BenchError::Broker(
            "publisher confirms are not enabled".into(),
        )),
        Err(e) => Err(BenchError::Broker(format!("confirm: {e}"))),
    }
}
