//! Turning follow-up work into broker messages, and publishing it until the
//! broker confirms. Shared by the dispatcher (submissions, sweeps) and the
//! worker (dependents made ready by its own outcome), so both publish the
//! same bytes the same way.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::broker::{Broker, BrokerError, HeaderValue, Outgoing};
use crate::model::{DeadLetterReason, TaskMessage};
use crate::names::Names;
use crate::store::redis::unix_ms;

/// Publishes task messages and dead letters for one deployment.
#[derive(Clone)]
pub struct Outbox {
    broker: Arc<dyn Broker>,
    names: Names,
    declared: Arc<Mutex<HashSet<String>>>,
}

impl Outbox {
    /// An outbox over `broker`.
    pub fn new(broker: Arc<dyn Broker>, names: Names) -> Outbox {
        Outbox {
            broker,
            names,
            declared: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// The broker underneath.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Declare task queues this process has not declared yet (a job may
    /// name a queue no worker has consumed so far; its tasks wait there).
    async fn ensure_queues(&self, tasks: &[TaskMessage]) -> Result<(), BrokerError> {
        let missing: Vec<String> = {
            let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
            let mut missing: Vec<String> = tasks
                .iter()
                .filter(|t| !declared.contains(&t.queue))
                .map(|t| t.queue.clone())
                .collect();
            missing.sort();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        self.broker.declare(&missing).await?;
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        declared.extend(missing);
        Ok(())
    }

    /// Mark queues as declared (the worker declares its own at start).
    pub fn mark_declared(&self, queues: &[String]) {
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        declared.extend(queues.iter().cloned());
    }

    /// Publish task messages, all confirmed, or an error.
    pub async fn publish_tasks(&self, tasks: &[TaskMessage]) -> Result<(), BrokerError> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.ensure_queues(tasks).await?;
        let batch = tasks
            .iter()
            .map(|t| Outgoing::durable(self.names.task_queue(&t.queue), t.encode()))
            .collect();
        self.broker.publish(batch).await
    }

    /// Publish task messages, retrying (with backoff) while the failure is
    /// one a retry can help. Duplicates are harmless: claims dedupe.
    pub async fn publish_tasks_until_confirmed(
        &self,
        tasks: &[TaskMessage],
    ) -> Result<(), BrokerError> {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.publish_tasks(tasks).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "publishing tasks failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Send a message that cannot be handled to `<prefix>.dead`, byte for
    /// byte, with headers saying why and where it came from.
    pub async fn dead_letter(
        &self,
        body: Vec<u8>,
        source_queue: &str,
        kind: DeadLetterReason,
        reason: &str,
        correlation_id: Option<&str>,
    ) -> Result<(), BrokerError> {
        let mut msg = Outgoing::durable(self.names.dead_queue(), body);
        msg.headers = vec![
            (
                "x-conveyor-reason".into(),
                HeaderValue::Text(reason.to_owned()),
            ),
            (
                "x-conveyor-reason-kind".into(),
                HeaderValue::Text(kind.as_str().to_owned()),
            ),
            (
                "x-conveyor-source-queue".into(),
                HeaderValue::Text(source_queue.to_owned()),
            ),
            (
                "x-conveyor-dead-at-ms".into(),
                HeaderValue::Int(unix_ms() as i64),
            ),
        ];
        if let Some(c) = correlation_id {
            msg.headers.push((
                "x-conveyor-original-correlation-id".into(),
                HeaderValue::Text(c.to_owned()),
            ));
        }
        self.broker.publish(vec![msg]).await
    }
}
