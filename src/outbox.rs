//! Turning follow-up work into broker messages, and publishing it until the
//! broker confirms. Shared by the dispatcher (submissions, sweeps) and the
//! worker (dependents made ready by its own outcome), so both publish the
//! same bytes the same way.
//!
//! Queues are declared once per process (a cache of the task queues
//! declared so far), not before every publish. A queue deleted behind
//! Conveyor's back (by an operator, or a `queue.delete` from a tool) makes
//! the broker return the mandatory publish as
//! [`BrokerError::Unroutable`]; the cache then forgets that queue, so the
//! next attempt declares it again (declaring is idempotent) before
//! publishing. Callers retry as for any failed publish, and ack nothing
//! until a publish is confirmed and routed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Reconnect;
use crate::broker::{Broker, BrokerError, HeaderValue, Outgoing, PartlyPublished, Properties};
use crate::model::{DeadLetterReason, TaskMessage};
use crate::names::Names;
use crate::store::redis::unix_ms;

/// How long a delivery whose publish the broker refused (a submission's
/// tasks or reply, a dead letter) waits before it goes back to its queue
/// as a copy: requeued at once, it would come straight back and loop at
/// the broker's pace.
pub(crate) const BROKER_REFUSAL_PAUSE: Duration = Duration::from_secs(1);

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

    /// The deployment's names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Declare task queues this process has not declared yet (a job may
    /// name a queue no worker has consumed so far; its tasks wait there).
    async fn ensure_queues(&self, tasks: &[TaskMessage]) -> Result<(), BrokerError> {
        self.declare_task_queues(tasks.iter().map(|t| t.queue.as_str()))
            .await
    }

    /// Declare the deployment's base queues (submit, referred, dead)
    /// strictly, and the task queues named (without the prefix) as
    /// RabbitMQ lets it ([`Self::declare_task_queues`]): what a dispatcher
    /// or worker does at start.
    pub async fn declare_topology(&self, task_queues: &[String]) -> Result<(), BrokerError> {
        self.broker.declare(&[]).await?;
        self.declare_task_queues(task_queues.iter().map(String::as_str))
            .await
    }

    /// Declare the task queues named (without the prefix) that this process
    /// has not declared yet, each refused for good (a queue that exists
    /// with other arguments, or one this user may not declare) logged and
    /// used as it is; an outage is an error.
    pub async fn declare_task_queues<'q>(
        &self,
        queues: impl IntoIterator<Item = &'q str>,
    ) -> Result<(), BrokerError> {
        let missing: Vec<String> = {
            let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
            let mut missing: Vec<String> = queues
                .into_iter()
                .filter(|q| !declared.contains(*q))
                .map(str::to_owned)
                .collect();
            missing.sort();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        match self.broker.declare(&missing).await {
            Ok(()) => {}
            Err(BrokerError::Fatal(e)) => {
                // Refused for good: a queue exists with other arguments (made
                // by a process of another config), or this user may not
                // declare it. Publishing to a queue that exists still works,
                // and one that does not returns the message (unroutable, to
                // retry); failing here instead would leave every job naming
                // the queue recorded with its ready tasks published never.
                // Each queue is declared on its own, so that one refusal
                // leaves none of the others undeclared.
                tracing::debug!(error = %e, "a task queue declare was refused; declaring one by one");
                for queue in &missing {
                    match self.broker.declare(std::slice::from_ref(queue)).await {
                        Ok(()) => {}
                        Err(BrokerError::Fatal(e)) => {
                            tracing::warn!(queue = %self.names.task_queue(queue), error = %e, "task queue not declared; publishing to it as it is");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            // An outage: tried again with the publish that needs it.
            Err(e) => return Err(e),
        }
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        declared.extend(missing);
        Ok(())
    }

    /// Mark queues as declared (the worker declares its own at start).
    pub fn mark_declared(&self, queues: &[String]) {
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        declared.extend(queues.iter().cloned());
    }

    /// Forget that the task queues named in `queues` in full (as the
    /// broker knows them) were declared, so the next publish to each
    /// declares it again.
    fn forget_declared(&self, queues: &[String], tasks: &[TaskMessage]) {
        // Most failed batches returned nothing: no queue name built per task.
        if queues.is_empty() {
            return;
        }
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks {
            let queue = self.names.task_queue(&t.queue);
            if queues.contains(&queue) && declared.remove(&t.queue) {
                tracing::warn!(
                    queue,
                    "task queue is missing (deleted?); declaring it again before the next publish"
                );
            }
        }
    }

    /// Publish task messages, all confirmed and routed, or an error. If the
    /// broker returned one as unroutable, its queue is declared again by
    /// the next call (see the module docs).
    pub async fn publish_tasks(&self, tasks: &[TaskMessage]) -> Result<(), BrokerError> {
        self.publish_unconfirmed(tasks).await.map_err(|(_, e)| e)
    }

    /// Publish `tasks`; on failure, the first error with the tasks the
    /// broker did not confirm as queued (the others are, and need no
    /// publish again).
    async fn publish_unconfirmed(
        &self,
        tasks: &[TaskMessage],
    ) -> Result<(), (Vec<TaskMessage>, BrokerError)> {
        if tasks.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.ensure_queues(tasks).await {
            return Err((tasks.to_vec(), e));
        }
        let batch = tasks
            .iter()
            .map(|t| Outgoing::durable(self.names.task_queue(&t.queue), t.encode()))
            .collect();
        let PartlyPublished {
            error,
            confirmed,
            unroutable,
        } = match self.broker.publish_each(batch).await {
            Ok(()) => return Ok(()),
            Err(partly) => partly,
        };
        // Every queue that returned a message, not only the first error's:
        // a batch to a queue at its length limit and to one an operator
        // deleted declares the deleted one again at once (until the
        // thirty-sixth session only once the first stopped refusing).
        self.forget_declared(&unroutable, tasks);
        let unconfirmed = tasks
            .iter()
            .zip(confirmed)
            .filter(|(_, confirmed)| !confirmed)
            .map(|(t, _)| t.clone())
            .collect();
        Err((unconfirmed, error))
    }

    /// Publish task messages, retrying (with backoff) while the failure is
    /// one a retry can help; a returned message's queue is declared again
    /// before the next attempt. Each attempt publishes only what the broker
    /// has not confirmed yet: one queue refusing (at its length limit, or
    /// a quorum queue without a leader) does not queue a copy of the
    /// others' messages every round. Duplicates are harmless (claims
    /// dedupe), but a wide fan-out would make many.
    pub async fn publish_tasks_until_confirmed(
        &self,
        tasks: &[TaskMessage],
    ) -> Result<(), BrokerError> {
        let seed = tasks
            .first()
            .map(|t| format!("{}|{}|{}", t.job, t.idx, t.attempt))
            .unwrap_or_default();
        let mut waits = Reconnect::seeded(Duration::from_millis(50), Duration::from_secs(2), &seed);
        // Borrowed until a failure leaves only some to publish again.
        let mut pending = std::borrow::Cow::Borrowed(tasks);
        loop {
            match self.publish_unconfirmed(&pending).await {
                Ok(()) => return Ok(()),
                Err((rest, e)) if e.is_retryable() => {
                    tracing::warn!(error = %e, unconfirmed = rest.len(), "publishing tasks failed; retrying the unconfirmed");
                    pending = std::borrow::Cow::Owned(rest);
                    tokio::time::sleep(waits.next_delay()).await;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    /// Send a message that cannot be handled to `<prefix>.dead`, byte for
    /// byte and with its properties (content type, correlation id, headers
    /// and the rest: see [`Properties::for_copy`]), adding headers that say
    /// why and where it came from, so that an operator can read it and
    /// publish it again as it was. If the dead queue was deleted, it is
    /// declared again before the error is returned, so the caller's retry
    /// (a requeued delivery) goes through.
    pub async fn dead_letter(
        &self,
        body: Vec<u8>,
        properties: &Properties,
        source_queue: &str,
        kind: DeadLetterReason,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut msg = Outgoing::durable(self.names.dead_queue(), body);
        msg.properties = properties.for_copy();
        let p = &mut msg.properties;
        p.set_header("x-conveyor-reason", HeaderValue::Text(reason.to_owned()));
        p.set_header(
            "x-conveyor-reason-kind",
            HeaderValue::Text(kind.as_str().to_owned()),
        );
        p.set_header(
            "x-conveyor-source-queue",
            HeaderValue::Text(source_queue.to_owned()),
        );
        p.set_header("x-conveyor-dead-at-ms", HeaderValue::Int(unix_ms() as i64));
        match properties.correlation_id.clone() {
            Some(c) => p.set_header("x-conveyor-original-correlation-id", HeaderValue::Text(c)),
            // A message dead-lettered before (and published again) may
            // carry the header of an earlier correlation id.
            None => p
                .headers
                .retain(|(k, _)| k != "x-conveyor-original-correlation-id"),
        }
        let result = self.broker.publish(vec![msg]).await;
        if let Err(BrokerError::Unroutable { queue, .. }) = &result {
            // Declaring with no task queues declares the dead and submit queues.
            tracing::warn!(
                queue,
                "dead-letter queue is missing (deleted?); declaring it again"
            );
            if let Err(e) = self.broker.declare(&[]).await {
                tracing::warn!(error = %e, "cannot declare the dead-letter queue again");
            }
        }
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    fn task(job: &str, queue: &str) -> TaskMessage {
        TaskMessage {
            job: job.into(),
            task: "t".into(),
            idx: 0,
            attempt: 1,
            queue: queue.into(),
        }
    }

    /// An outbox whose cache says `ghost` is declared while the broker has
    /// no such queue: what an operator deleting the queue leaves behind.
    fn outbox_with_a_deleted_queue() -> (MemoryBroker, Outbox) {
        let names = Names::new("t");
        let broker = MemoryBroker::reliable(names.clone());
        let outbox = Outbox::new(Arc::new(broker.clone()), names);
        outbox.mark_declared(&["ghost".to_owned()]);
        (broker, outbox)
    }

    #[tokio::test]
    async fn a_returned_publish_makes_the_next_one_declare_the_queue_again() {
        let (broker, outbox) = outbox_with_a_deleted_queue();
        let err = outbox
            .publish_tasks(&[task("j1", "ghost")])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BrokerError::Unroutable { queue, .. } if queue == "t.tasks.ghost"),
            "{err:?}"
        );
        assert_eq!(broker.ready_len("t.tasks.ghost").await, 0);
        outbox.publish_tasks(&[task("j1", "ghost")]).await.unwrap();
        assert_eq!(broker.ready_len("t.tasks.ghost").await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn publishing_until_confirmed_gets_through_to_a_deleted_queue() {
        let (broker, outbox) = outbox_with_a_deleted_queue();
        let tasks = [task("j1", "ghost"), task("j2", "default")];
        // Virtual time: the back-off sleeps pass at once; retrying without
        // declaring would never finish.
        tokio::time::timeout(
            Duration::from_secs(600),
            outbox.publish_tasks_until_confirmed(&tasks),
        )
        .await
        .expect("the publish to a deleted queue is still retried after 10 minutes: the queue was never declared again")
        .unwrap();
        assert_eq!(broker.ready_len("t.tasks.ghost").await, 1);
        assert_eq!(
            broker.ready_len("t.tasks.default").await,
            1,
            "confirmed the first time, not published again"
        );
    }

    /// Each round publishes only what the broker has not confirmed: two
    /// deleted queues cost the queue that took its message at once no
    /// copies, and each deleted queue gets its message once.
    #[tokio::test(start_paused = true)]
    async fn publishing_until_confirmed_publishes_again_only_what_was_not_confirmed() {
        let (broker, outbox) = outbox_with_a_deleted_queue();
        outbox.mark_declared(&["ghost2".to_owned()]);
        let tasks = [
            task("j1", "ghost"),
            task("j2", "default"),
            task("j3", "ghost2"),
            task("j4", "default"),
        ];
        tokio::time::timeout(
            Duration::from_secs(600),
            outbox.publish_tasks_until_confirmed(&tasks),
        )
        .await
        .expect("still retrying after 10 minutes")
        .unwrap();
        for (queue, copies) in [("ghost", 1), ("ghost2", 1), ("default", 2)] {
            assert_eq!(
                broker.ready_len(&format!("t.tasks.{queue}")).await,
                copies,
                "{queue}"
            );
        }
    }

    /// A batch whose first error is a full queue's refusal still makes
    /// the next publish declare a deleted queue that returned its message:
    /// every returned queue is forgotten, not only the first error's.
    #[tokio::test]
    async fn every_queue_that_returned_a_message_is_declared_again() {
        let (broker, outbox) = outbox_with_a_deleted_queue();
        outbox.declare_topology(&["full".to_owned()]).await.unwrap();
        broker.set_full("t.tasks.full", true);
        let err = outbox
            .publish_tasks(&[task("j1", "full"), task("j2", "ghost")])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BrokerError::Refused { queue, .. } if queue == "t.tasks.full"),
            "{err:?}"
        );
        outbox.publish_tasks(&[task("j2", "ghost")]).await.unwrap();
        assert_eq!(broker.ready_len("t.tasks.ghost").await, 1);
    }

    #[tokio::test]
    async fn a_dead_letter_to_a_deleted_dead_queue_declares_it_again() {
        let names = Names::new("t");
        // Nothing declared: no dead queue.
        let broker = MemoryBroker::reliable(names.clone());
        let outbox = Outbox::new(Arc::new(broker.clone()), names);
        let none = Properties::default();
        let send = || {
            outbox.dead_letter(
                b"x".to_vec(),
                &none,
                "t.submit",
                DeadLetterReason::NotJson,
                "not JSON",
            )
        };
        let err = send().await.unwrap_err();
        assert!(
            matches!(&err, BrokerError::Unroutable { queue, .. } if queue == "t.dead"),
            "{err:?}"
        );
        send().await.unwrap();
        assert_eq!(broker.take_all("t.dead").await, vec![b"x".to_vec()]);
    }

    #[tokio::test]
    async fn a_dead_letter_keeps_what_its_publisher_set_and_says_why_anew() {
        let names = Names::new("t");
        let broker = MemoryBroker::reliable(names.clone());
        broker.declare(&[]).await.unwrap();
        let outbox = Outbox::new(Arc::new(broker.clone()), names);
        let original = Properties {
            content_type: Some("text/plain".into()),
            content_encoding: Some("gzip".into()),
            correlation_id: Some("c-7".into()),
            reply_to: Some("amq.gen-reply".into()),
            message_id: Some("m-1".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("report".into()),
            app_id: Some("billing".into()),
            priority: Some(3),
            headers: vec![
                ("tenant".into(), HeaderValue::Text("acme".into())),
                (
                    "trace".into(),
                    HeaderValue::Table(vec![("span".into(), HeaderValue::Int(9))]),
                ),
                // The broker's count of deliveries, and the reason an
                // earlier dead-lettering gave: neither is this copy's.
                ("x-delivery-count".into(), HeaderValue::Int(4)),
                ("x-conveyor-reason".into(), HeaderValue::Text("old".into())),
            ],
        };
        outbox
            .dead_letter(
                b"%".to_vec(),
                &original,
                "t.submit",
                DeadLetterReason::NotJson,
                "not JSON",
            )
            .await
            .unwrap();
        let dead = broker.take_messages("t.dead").await;
        assert_eq!(dead.len(), 1);
        let got = &dead[0].properties;
        assert_eq!(dead[0].body, b"%".to_vec());
        assert_eq!(
            Properties {
                headers: Vec::new(),
                ..got.clone()
            },
            Properties {
                headers: Vec::new(),
                ..original.clone()
            },
            "every property but the headers is kept as published"
        );
        assert_eq!(got.header("tenant"), original.header("tenant"));
        assert_eq!(got.header("trace"), original.header("trace"));
        assert_eq!(got.header("x-delivery-count"), None);
        assert_eq!(
            got.header("x-conveyor-reason"),
            Some(&HeaderValue::Text("not JSON".into()))
        );
        assert_eq!(
            got.headers
                .iter()
                .filter(|(k, _)| k == "x-conveyor-reason")
                .count(),
            1
        );
        assert_eq!(
            got.header("x-conveyor-original-correlation-id"),
            Some(&HeaderValue::Text("c-7".into()))
        );
    }
}
