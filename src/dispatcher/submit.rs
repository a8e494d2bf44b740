//! Handling one submit message: parse, validate, record, publish, reply, ack.

use std::time::Duration;

use crate::broker::{Delivery, Outgoing};
use crate::intake::Intake;
use crate::model::SubmitReply;
use crate::store::{Created, StoreError};

use super::Dispatcher;

impl Dispatcher {
    /// Handle one submission. Never panics and never drops a message: what
    /// cannot be handled now is requeued, what can never be handled is
    /// dead-lettered or recorded as rejected.
    pub(crate) async fn handle_submission(&self, delivery: Delivery) {
        let reply = match self.intake.accept(&delivery.body) {
            Intake::Dead { kind, reason } => {
                tracing::warn!(kind = kind.as_str(), %reason, "submission dead-lettered");
                if let Err(e) = self
                    .outbox
                    .dead_letter(
                        delivery.body.clone(),
                        &delivery.queue,
                        kind,
                        &reason,
                        delivery.correlation_id.as_deref(),
                    )
                    .await
                {
                    tracing::error!(error = %e, "cannot dead-letter; requeueing");
                    return requeue(delivery).await;
                }
                SubmitReply {
                    job_id: None,
                    accepted: false,
                    error: Some(reason),
                    existing: false,
                }
            }
            Intake::Rejected(rejection) => {
                tracing::info!(job = %rejection.id, error = %rejection.error, "job rejected");
                if let Err(e) = self.store.record_rejected(&rejection).await {
                    return self.store_failed(delivery, e).await;
                }
                SubmitReply {
                    job_id: Some(rejection.id),
                    accepted: false,
                    error: Some(rejection.error),
                    existing: false,
                }
            }
            Intake::Valid(job) => {
                let (ready, existing) = match self.store.create_job(&job).await {
                    Ok(Created::New { ready }) => (ready, false),
                    Ok(Created::Existing { ready, .. }) => (ready, true),
                    Err(e) => return self.store_failed(delivery, e).await,
                };
                if let Err(e) = self.outbox.publish_tasks(&ready).await {
                    // The job is recorded; the redelivery finds it existing
                    // and publishes its ready tasks again.
                    tracing::warn!(job = %job.id, error = %e, "publishing ready tasks failed; requeueing submission");
                    return requeue(delivery).await;
                }
                tracing::debug!(job = %job.id, existing, ready = ready.len(), "job accepted");
                SubmitReply {
                    job_id: Some(job.id),
                    accepted: true,
                    error: None,
                    existing,
                }
            }
        };
        if let Some(reply_to) = delivery.reply_to.as_deref().filter(|r| !r.is_empty()) {
            let msg = Outgoing {
                queue: reply_to.to_owned(),
                body: serde_json::to_vec(&reply).unwrap_or_default(),
                persistent: false,
                mandatory: false,
                correlation_id: delivery.correlation_id.clone(),
                reply_to: None,
                headers: Vec::new(),
            };
            if let Err(e) = self.outbox.broker().publish(vec![msg]).await {
                tracing::warn!(error = %e, reply_to, "could not send submit reply");
            }
        }
        if let Err(e) = delivery.acker.ack().await {
            tracing::warn!(error = %e, "ack of submission failed; it will be redelivered and deduplicated");
        }
    }

    async fn store_failed(&self, delivery: Delivery, e: StoreError) {
        tracing::warn!(error = %e, "store failed; requeueing submission");
        if e.is_retryable() {
            // Take no new submissions until Redis answers again.
            self.health.mark_store_down();
        } else {
            // Not a passing outage: do not spin on it.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        requeue(delivery).await;
    }
}

async fn requeue(delivery: Delivery) {
    if let Err(e) = delivery.acker.requeue().await {
        tracing::warn!(error = %e, "requeue failed; the broker will redeliver on reconnect");
    }
}
