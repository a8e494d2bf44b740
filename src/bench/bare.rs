//! The bare broker loop: what RabbitMQ alone does on this machine with the
//! same guarantees Conveyor asks of it.
//!
//! - A scratch durable queue, *classic* unless asked otherwise (deleted
//!   first if a previous run left it, and by the caller afterwards).
//!   Conveyor's own queues are quorum queues by default, which cost more
//!   per message; `--bare-queue-type quorum` compares like with like.
//! - A consumer on its own connection, prefetch 200, manual acks: **one
//!   `basic.ack` per message** (`multiple = false`), as Conveyor's workers
//!   and dispatcher ack each delivery.
//! - A publisher on another connection in confirm mode: persistent
//!   messages through the default exchange, pipelined, at most `window`
//!   unconfirmed at once (the oldest confirm is awaited when the window is
//!   full).
//! - The time is taken from the first publish to the last ack; msgs/s =
//!   messages / that time.

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

use super::{BenchError, amqp_connection, broker_err};
use crate::config::Config;
use crate::config::QueueType;

/// Prefetch of the bare consumer.
pub const PREFETCH: u16 = 200;

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

/// Run the loop on `queue` (which is deleted first if it exists; the
/// caller deletes it afterwards).
pub async fn run(
    config: &Config,
    queue: &str,
    messages: usize,
    message_bytes: usize,
    window: usize,
    queue_type: QueueType,
) -> Result<BareReport, BenchError> {
    let type_name = match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    let publisher_conn = amqp_connection(config, "cannot connect (bare loop publisher)").await?;
    let consumer_conn = amqp_connection(config, "cannot connect (bare loop consumer)").await?;

    let setup = publisher_conn
        .create_channel()
        .await
        .map_err(broker_err("channel"))?;
    let _ = setup
        .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
        .await;
    let setup = publisher_conn
        .create_channel()
        .await
        .map_err(broker_err("channel"))?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(type_name.into()),
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
    let mut consumer = consumer_channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from("bench-bare"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker_err("basic.consume"))?;
    let consuming = tokio::spawn(async move {
        let mut seen = 0usize;
        while seen < messages {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(broker_err("basic.ack"))?;
                    seen += 1;
                }
                Some(Err(e)) => return Err(BenchError::Broker(format!("consuming: {e}"))),
                None => {
                    return Err(BenchError::Broker(format!(
                        "the bare consumer stopped after {seen} of {messages} messages"
                    )));
                }
            }
        }
        Ok::<Instant, BenchError>(Instant::now())
    });

    let publisher = publisher_conn
        .create_channel()
        .await
        .map_err(broker_err("channel"))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(broker_err("confirm.select"))?;
    let body = vec![b'x'; message_bytes];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window);
    let start = Instant::now();
    for _ in 0..messages {
        if pending.len() >= window
            && let Some(confirm) = pending.pop_front()
        {
            check(confirm.await)?;
        }
        let confirm = publisher
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await
            .map_err(broker_err("basic.publish"))?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        check(confirm.await)?;
    }
    let published = start.elapsed();

    // Generous: the loop normally takes a few seconds.
    let limit = Duration::from_secs(60) + Duration::from_millis(messages as u64);
    let last_ack = match tokio::time::timeout(limit, consuming).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => return Err(BenchError::Broker(format!("bare consumer: {join}"))),
        Err(_) => {
            return Err(BenchError::Broker(format!(
                "the bare loop did not consume {messages} messages within {limit:?}"
            )));
        }
    };
    let seconds = last_ack.duration_since(start).as_secs_f64();
    let _ = publisher_conn.close(200, "bench done".into()).await;
    let _ = consumer_conn.close(200, "bench done".into()).await;
    Ok(BareReport {
        queue: queue.to_owned(),
        queue_type: type_name,
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
