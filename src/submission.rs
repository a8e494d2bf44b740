//! Handling one submit message: parse, validate, record, publish, reply,
//! ack. Shared by the dispatcher and by workers that accept submissions.
//!
//! A worker that accepts submissions saves a job a broker hop: after
//! recording the job it claims one ready root task itself (one it can run:
//! its queue is one the worker consumes) instead of publishing it and
//! taking it back from the task queue. The order keeps every guarantee the
//! dispatcher's path has:
//!
//! 1. the job is recorded (`create`) and the root claimed under a lease,
//!    like any task message's claim (`Store::create_job_and_claim`: on
//!    Redis one script call that creates, then claims, after the lease
//!    entry in the same round trip). A crash before it leaves the
//!    submission unacked, and its redelivery starts again (a job already
//!    recorded has its ready tasks published, the unclaimed root among
//!    them, unless this claim takes it); from the claim on, a crash leaves
//!    the task to the lease sweep;
//! 2. the other ready tasks are published (confirmed), the reply sent;
//! 3. the submission is acked, and the caller runs the claimed task.
//!
//! A redelivered submission claims the root too if it is still ready at
//! attempt 1 (nobody took its message yet): the message, when it comes,
//! finds the claim and is dropped, as any duplicate is.
//!
//! So the task is never run without a durable claim, and the submission is
//! never acked before everything it started is either claimed or queued.
//!
//! A worker refuses nothing itself. A submission it would dead-letter or
//! reject (by its own registry, which may lack handlers the dispatchers
//! have) is *referred*: published, byte for byte with its properties, to
//! `<prefix>.submit.referred`, which only dispatchers consume, and acked
//! once that publish is confirmed. So every refusal is a dispatcher's
//! verdict, whatever handlers a worker binary was built with, and taking
//! submissions can be on by default. A referral costs the refused
//! message one more hop; valid jobs never take it.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::{BrokerError, Delivery, HeaderValue, Outgoing, Properties};
use crate::consumer::{give_back, try_copy_then_ack};
use crate::health::Health;
use crate::intake::{ASSIGNED_ID_HEADER, Intake, JobIntake, MAX_ERROR_BYTES};
use crate::model::{DeadLetterReason, JobState, SubmitReply};
use crate::outbox::{BROKER_REFUSAL_PAUSE, Outbox};
use crate::shutdown::Shutdown;
use crate::store::{ClaimOutcome, ClaimRef, Claimed, Created, Store, StoreError};
use crate::text::capped;

/// How long a submission whose job id was assigned here is held while the
/// publish of its job's ready tasks is tried again (see
/// [`Submissions::handle`]), before it goes back to its queue anyway.
const HOLD_ASSIGNED_ID: Duration = Duration::from_secs(60);

/// What handles submissions for one process.
#[derive(Clone)]
pub(crate) struct Submissions {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) outbox: Outbox,
    pub(crate) intake: JobIntake,
    pub(crate) health: Health,
    /// Refer what this process would refuse to the dispatchers instead of
    /// refusing it (a worker); a dispatcher refuses for itself.
    pub(crate) refer_refusals: bool,
}

/// A worker taking one root task of each job it records.
#[derive(Clone, Copy)]
pub(crate) struct RunHere<'a> {
    /// The queues (without prefix) it consumes: a root on another queue is
    /// published for the workers that do.
    pub(crate) queues: &'a [String],
    /// Its id, for the claim.
    pub(crate) worker: &'a str,
    /// The claim's lease.
    pub(crate) lease: Duration,
    /// Told of a claim as soon as it is made, before the job's other ready
    /// tasks are published and the reply sent (each may wait on the broker
    /// for longer than a lease): the worker renews it from then on.
    pub(crate) claimed: &'a (dyn Fn(&ClaimRef) + Sync),
}

impl Submissions {
    /// Handle one submission; with `run_here`, claim one ready root of the
    /// job and return it for the caller to run (already acked). Never
    /// panics and never drops a message: what cannot be handled now goes
    /// back to the queue, what can never be handled is dead-lettered or
    /// recorded as rejected. While the store is out, or the broker refuses
    /// a message the submission causes, it goes back as a new message (its
    /// delivery count from zero), so that a passing condition never
    /// carries it past the submit queue's delivery limit. The pause before
    /// it goes back ends early when `stopping` fires: the process is
    /// stopping, and waits for its submissions in hand.
    pub(crate) async fn handle(
        &self,
        mut delivery: Delivery,
        run_here: Option<RunHere<'_>>,
        stopping: Option<&Shutdown>,
    ) -> Option<Box<Claimed>> {
        let mut claimed = None;
        // A job whose body names no id is recorded under one made here.
        // Given back to its queue (the store or the broker failing after
        // the record was written), the submission carries that id in a
        // header, and taken again, finds its job instead of recording a
        // second one whose ready tasks nobody would publish.
        let given = self.intake.assigned_id(&delivery.properties);
        let (verdict, assigned) = self.intake.accept_as(&delivery.body, given);
        if self.refer_refusals && !matches!(verdict, Intake::Valid(_)) {
            self.refer(delivery, stopping).await;
            return None;
        }
        if let Some(id) = assigned {
            delivery
                .properties
                .set_header(ASSIGNED_ID_HEADER, HeaderValue::Text(id));
        }
        let reply = match verdict {
            Intake::Dead { kind, reason } => {
                tracing::warn!(kind = kind.as_str(), %reason, "submission dead-lettered");
                delivery = self.dead_letter(delivery, kind, &reason, stopping).await?;
                SubmitReply {
                    job_id: None,
                    accepted: false,
                    error: Some(reason),
                    existing: false,
                }
            }
            Intake::Rejected(rejection) => {
                tracing::info!(job = %rejection.id, error = %rejection.error, "job rejected");
                match self.store.record_rejected(&rejection).await {
                    Ok(true) => SubmitReply {
                        job_id: Some(rejection.id),
                        accepted: false,
                        error: Some(rejection.error),
                        existing: false,
                    },
                    // The id is taken: the answer is the job recorded
                    // under it, which this message does not change. If
                    // that cannot be read, there is no answer yet: never
                    // "accepted" for a submission that is not.
                    Ok(false) => match self.taken_reply(&rejection.id).await {
                        Ok(Some(reply)) => reply,
                        // Expired since it was found taken: taken again,
                        // the submission records its rejection.
                        Ok(None) => {
                            give_back(self.outbox.broker().as_ref(), vec![delivery]).await;
                            return None;
                        }
                        Err(e) => {
                            self.store_failed(delivery, e, &rejection.id, stopping)
                                .await;
                            return None;
                        }
                    },
                    Err(e) => {
                        self.store_failed(delivery, e, &rejection.id, stopping)
                            .await;
                        return None;
                    }
                }
            }
            Intake::Valid(job) => {
                // A root this worker can run: its queue is one it consumes.
                let here = run_here.and_then(|here| {
                    job.roots()
                        .find(|&i| here.queues.contains(&job.tasks[i as usize].queue))
                        .map(|root| (here, root))
                });
                let recorded = match here {
                    Some((here, root)) => self
                        .store
                        .create_job_and_claim(&job, root, here.worker, here.lease)
                        .await
                        .map(|(created, outcome)| (created, Some(outcome))),
                    None => self.store.create_job(&job).await.map(|c| (c, None)),
                };
                let (ready, existing_state) = match recorded {
                    Ok((created, outcome)) => {
                        match outcome {
                            Some(ClaimOutcome::Claimed(c)) => {
                                if let Some((here, _)) = here {
                                    (here.claimed)(&c.claim);
                                }
                                claimed = Some(c);
                            }
                            // Claimed by the message of an earlier delivery
                            // of this submission, or already run.
                            Some(other) => {
                                tracing::debug!(job = %job.id, ?other, "root not claimable here");
                            }
                            None => {}
                        }
                        match created {
                            Created::New { ready } => (ready, None),
                            Created::Existing { ready, state } => (ready, Some(state)),
                        }
                    }
                    Err(e) => {
                        // The job may be recorded (and its root claimed):
                        // the redelivery finds it existing and publishes its
                        // ready tasks; a claim made is the sweep's.
                        self.store_failed(delivery, e, &job.id, stopping).await;
                        return None;
                    }
                };
                let published = match self.outbox.publish_tasks(&ready).await {
                    // Given back through a requeue (the broker unreachable
                    // for publishing), the submission would lose the id
                    // assigned here, and be recorded again under another:
                    // it is held while the publish is tried again, for a
                    // while (a memory alarm blocks publishing, not
                    // consuming).
                    // A root claimed here waits too (renewed meanwhile: it
                    // was registered when claimed): given back without the
                    // id, the submission would be recorded again, and its
                    // root claimed and run again, under another.
                    Err(e)
                        if e.is_unavailable()
                            && delivery.properties.header(ASSIGNED_ID_HEADER).is_some() =>
                    {
                        tracing::warn!(job = %job.id, error = %e, "publishing ready tasks failed; holding the submission (its job id was assigned here) and trying again");
                        let again = self.outbox.publish_tasks_until_confirmed(&ready);
                        tokio::time::timeout(HOLD_ASSIGNED_ID, again)
                            .await
                            .unwrap_or(Err(e))
                    }
                    other => other,
                };
                if let Err(e) = published {
                    // The job is recorded; the submission, taken again,
                    // finds it existing and publishes its ready tasks
                    // again. A root claimed here is ours to run, and runs
                    // once this returns: the submission goes back at
                    // once, and taken again, finds the root claimed and
                    // waits as any other.
                    tracing::warn!(job = %job.id, error = %e, "publishing ready tasks failed; the submission will be taken again");
                    let pause = if claimed.is_some() {
                        Duration::ZERO
                    } else {
                        BROKER_REFUSAL_PAUSE
                    };
                    self.retry_later(delivery, &e, pause, stopping).await;
                    return claimed;
                }
                tracing::debug!(job = %job.id, existing = ?existing_state, ready = ready.len(), here = claimed.is_some(), "job accepted");
                match existing_state {
                    None => SubmitReply {
                        job_id: Some(job.id),
                        accepted: true,
                        error: None,
                        existing: false,
                    },
                    Some(state) => self.existing_reply(job.id, state).await,
                }
            }
        };
        self.reply_and_ack(delivery, reply).await;
        claimed
    }

    /// Send `reply` to the submission's `reply_to`, if it names one, and
    /// ack the submission.
    async fn reply_and_ack(&self, delivery: Delivery, reply: SubmitReply) {
        let reply_to = delivery.properties.reply_to.as_deref();
        if let Some(reply_to) = reply_to.filter(|r| !r.is_empty()) {
            let msg = Outgoing {
                queue: reply_to.to_owned(),
                body: serde_json::to_vec(&reply).unwrap_or_default(),
                persistent: false,
                mandatory: false,
                properties: Properties {
                    correlation_id: delivery.properties.correlation_id.clone(),
                    ..Properties::json()
                },
            };
            if let Err(e) = self.outbox.broker().publish(vec![msg]).await {
                tracing::warn!(error = %e, reply_to, "could not send submit reply");
            }
        }
        if let Err(e) = delivery.acker.ack().await {
            tracing::warn!(error = %e, "ack of submission failed; it will be redelivered and deduplicated");
        }
    }

    /// The answer to a submission whose id is taken: the job recorded
    /// under it, unchanged. A job is accepted (`existing`); a refusal
    /// recorded under the id stays a refusal, with its error, so a client
    /// that resubmits a corrected job under the same id learns that it
    /// needs a new one instead of waiting for a job that never runs.
    async fn existing_reply(&self, id: String, state: JobState) -> SubmitReply {
        if state != JobState::Rejected {
            return SubmitReply {
                job_id: Some(id),
                accepted: true,
                error: None,
                existing: true,
            };
        }
        let recorded_error = match self.store.job_state(&id).await {
            Ok(status) => status.and_then(|(_, error)| error),
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot read the refusal under a taken id");
                None
            }
        };
        Self::taken_by_refusal(id, recorded_error)
    }

    /// The answer to an invalid submission whose id is taken: the job
    /// recorded under it ([`Self::existing_reply`]); `None` if it is gone
    /// (expired since the id was found taken). Either way, and when it
    /// cannot be read, the submission is taken again later.
    ///
    /// An unfinished job under the id is audited first
    /// ([`Store::audit_job`]): this may be the message that recorded it, on
    /// a process that judged its body valid (another registry or config, as
    /// in a rolling upgrade, or a worker with a handler the dispatchers
    /// lack) and then could not publish its ready tasks and gave it back,
    /// for this one to judge. Acked here with nothing published, those
    /// tasks would wait for ever; audited, the sweep offers them again (a
    /// duplicate of a message still queued is harmless: claims dedupe).
    async fn taken_reply(&self, id: &str) -> Result<Option<SubmitReply>, StoreError> {
        Ok(match self.store.job_state(id).await? {
            Some((JobState::Rejected, error)) => Some(Self::taken_by_refusal(id.to_owned(), error)),
            Some((state, _)) => {
                if !state.is_terminal() {
                    let audit = self.store.audit_job(id).await?;
                    tracing::info!(job = %id, offered_again = audit.added, "an invalid submission of a recorded job; its schedule audited");
                }
                Some(self.existing_reply(id.to_owned(), state).await)
            }
            None => None,
        })
    }

    /// The answer to a submission whose id a refusal holds.
    fn taken_by_refusal(id: String, recorded_error: Option<String>) -> SubmitReply {
        let why = recorded_error.unwrap_or_else(|| "see its status".to_owned());
        SubmitReply {
            error: Some(capped(
                format!(
                    "id {id:?} is taken by a submission that was rejected, and stays \
                     so: submit the job under a new id (the rejection: {why})"
                ),
                MAX_ERROR_BYTES,
            )),
            job_id: Some(id),
            accepted: false,
            existing: true,
        }
    }

    /// Hand a submission this process would refuse to the dispatchers: a
    /// copy (its publisher's properties kept, so the reply still reaches
    /// `reply_to`) published to the referred queue, then the original
    /// acked; if the publish fails, the original is tried again later.
    async fn refer(&self, delivery: Delivery, stopping: Option<&Shutdown>) {
        let referred = self.outbox.names().referred_queue();
        let broker = self.outbox.broker().as_ref();
        match try_copy_then_ack(broker, vec![delivery], Some(&referred)).await {
            Ok(()) => tracing::debug!("submission referred to the dispatchers"),
            Err((deliveries, e)) => {
                tracing::warn!(error = %e, "cannot refer the submission now; trying again later");
                for delivery in deliveries {
                    self.retry_later(delivery, &e, BROKER_REFUSAL_PAUSE, stopping)
                        .await;
                }
            }
        }
    }

    /// Put back a submission that cannot be finished now because the
    /// broker would not take a message it causes (a queue at its length
    /// limit refuses publishes; a deleted queue returns them). Requeued,
    /// it would come straight back, again and again, each time counted as
    /// a delivery, and past the submit queue's delivery limit RabbitMQ
    /// would dead-letter it: a job recorded whose ready tasks no one
    /// publishes. Instead it waits `pause` ([`BROKER_REFUSAL_PAUSE`],
    /// unless a claimed root must not wait) and goes to the back of its
    /// queue as a new message. When the connection is lost, the broker
    /// takes it back anyway. A process stopping (`stopping` fired) gives
    /// it back at once: its consumer is cancelled, so nothing loops here,
    /// and a pause grown to 30 s held the stop as long (until the
    /// thirty-sixth session).
    async fn retry_later(
        &self,
        delivery: Delivery,
        e: &BrokerError,
        pause: Duration,
        stopping: Option<&Shutdown>,
    ) {
        // Requeued, the broker hands back the message as its publisher sent
        // it: an id assigned here would be lost, and the job recorded under
        // it recorded again under another. A publish that timed out (a
        // memory alarm blocks publishing, not consuming) is not always a
        // lost connection, so the copy is tried first (it falls back to a
        // requeue).
        let assigned = delivery.properties.header(ASSIGNED_ID_HEADER).is_some();
        // The pause first either way: a failure that came at once (a
        // channel that cannot be opened, the broker refusing a publish on
        // the channel) requeued at once came straight back, each round a
        // delivery counted, and the submit queue's delivery limit was used
        // up in seconds (RabbitMQ then dead-letters it, its job recorded
        // with its ready tasks unpublished). It grows with the deliveries
        // counted against the message, so that the limit is reached only
        // after minutes of a broker in that state.
        let pause = tokio::time::sleep(grown_pause(pause, delivery.delivery_count));
        match stopping {
            Some(stopping) => {
                let mut stopping = stopping.clone();
                tokio::select! {
                    () = pause => {}
                    () = stopping.wait() => {}
                }
            }
            None => pause.await,
        }
        if e.is_unavailable() && !assigned {
            requeue(delivery).await;
            return;
        }
        give_back(self.outbox.broker().as_ref(), vec![delivery]).await;
    }

    /// Settle a submission the store could not record (`id` the job's).
    /// An outage gives it back, to take again once Redis answers. A
    /// refusal for good (a script error on the record under its id:
    /// corrupt, or written by another version) dead-letters it as
    /// `unusable_record` with the error, and the reply says so: requeued,
    /// it would come straight back, for ever on a classic queue, and on a
    /// quorum queue until RabbitMQ dead-lettered it without a reason.
    async fn store_failed(
        &self,
        delivery: Delivery,
        e: StoreError,
        id: &str,
        stopping: Option<&Shutdown>,
    ) {
        if e.is_retryable() {
            // Take no new submissions until Redis answers again. The
            // message goes back as a new one: an outage is not a failed
            // delivery, and the submit queue's delivery limit would count
            // a requeue.
            tracing::warn!(error = %e, "store unavailable; giving the submission back");
            self.health.mark_store_down();
            give_back(self.outbox.broker().as_ref(), vec![delivery]).await;
            return;
        }
        let reason = capped(
            format!("the store cannot record job {id}: {e}"),
            MAX_ERROR_BYTES,
        );
        tracing::error!(job = %id, error = %e, "store refused the submission for good; dead-lettering it");
        let Some(delivery) = self
            .dead_letter(
                delivery,
                DeadLetterReason::UnusableRecord,
                &reason,
                stopping,
            )
            .await
        else {
            return;
        };
        let reply = SubmitReply {
            job_id: Some(id.to_owned()),
            accepted: false,
            error: Some(reason),
            existing: false,
        };
        self.reply_and_ack(delivery, reply).await;
    }
}

impl Submissions {
    /// Send a copy of the submission to `<prefix>.dead` with `reason`, as
    /// from the submit queue (where its publisher put it, also when a
    /// worker referred it), and hand the delivery back to settle; if the
    /// broker does not take the copy, the submission goes back to be taken
    /// again later, and `None`.
    async fn dead_letter(
        &self,
        delivery: Delivery,
        kind: DeadLetterReason,
        reason: &str,
        stopping: Option<&Shutdown>,
    ) -> Option<Delivery> {
        let source = self.outbox.names().submit_queue();
        let sent = self
            .outbox
            .dead_letter(
                delivery.body.clone(),
                &delivery.properties,
                &source,
                kind,
                reason,
            )
            .await;
        match sent {
            Ok(()) => Some(delivery),
            Err(e) => {
                tracing::error!(error = %e, "cannot dead-letter the submission now; trying again later");
                self.retry_later(delivery, &e, BROKER_REFUSAL_PAUSE, stopping)
                    .await;
                None
            }
        }
    }
}

/// The longest pause before a submission goes back ([`grown_pause`]).
const MAX_REFUSAL_PAUSE: Duration = Duration::from_secs(30);

/// `pause` doubled for every delivery the broker has counted against the
/// message (`delivery_count`, on a quorum queue; a copy given back starts
/// at zero), up to [`MAX_REFUSAL_PAUSE`]: with the default delivery limit
/// of 20, a submission requeued each round reaches it after about eight
/// minutes of a broker refusing what it causes (1, 2, 4, 8, 16, then 30 s
/// a round), where a fixed second took twenty. No pause stays none.
fn grown_pause(pause: Duration, delivery_count: u32) -> Duration {
    let (base_ms, cap_ms) = (
        pause.as_millis() as u64,
        MAX_REFUSAL_PAUSE.as_millis() as u64,
    );
    let attempt = delivery_count.saturating_add(1);
    Duration::from_millis(crate::backoff::ceiling(
        attempt,
        base_ms,
        cap_ms.max(base_ms),
    ))
}

async fn requeue(delivery: Delivery) {
    if let Err(e) = delivery.acker.requeue().await {
        tracing::warn!(error = %e, "requeue failed; the broker will redeliver on reconnect");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::broker::memory::{MemoryBroker, PublishHook, WithPublish};
    use crate::config::Config;
    use crate::model::TaskMessage;
    use crate::names::Names;
    use crate::store::memory::{MemoryStore, SystemClock};

    struct Setup {
        names: Names,
        store: Arc<MemoryStore>,
        broker: Arc<MemoryBroker>,
        /// As a worker has them: refusals referred.
        submissions: Submissions,
    }

    fn memory_store() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(
            Arc::new(SystemClock),
            Duration::from_secs(60),
            1,
            "test",
        ))
    }

    async fn setup() -> Setup {
        let names = Names::new("t");
        let store = memory_store();
        let broker = Arc::new(MemoryBroker::reliable(names.clone()));
        broker.declare(&["default".to_owned()]).await.unwrap();
        let registry = conveyor_handler::Registry::new();
        let submissions = Submissions {
            store: store.clone(),
            outbox: Outbox::new(broker.clone(), names.clone()),
            intake: JobIntake::new(&Config::default(), registry).unwrap(),
            health: Health::new(store.clone(), broker.clone()),
            refer_refusals: true,
        };
        Setup {
            names,
            store,
            broker,
            submissions,
        }
    }

    /// Publish `body` to the submit queue as a client would (asking for a
    /// reply) and take its delivery.
    async fn delivered(
        s: &Setup,
        body: &[u8],
    ) -> (Delivery, Properties, Box<dyn crate::broker::Subscription>) {
        let submit = s.names.submit_queue();
        let properties = Properties {
            reply_to: Some("replies".into()),
            correlation_id: Some("c-1".into()),
            ..Properties::json()
        };
        let msg = Outgoing {
            properties: properties.clone(),
            ..Outgoing::durable(submit.clone(), body.to_vec())
        };
        s.broker.publish(vec![msg]).await.unwrap();
        let mut sub = s.broker.subscribe(&submit, 1).await.unwrap();
        let delivery = sub.next().await.unwrap().unwrap();
        (delivery, properties, sub)
    }

    #[tokio::test]
    async fn a_worker_refers_what_it_would_refuse_to_the_dispatchers_and_records_nothing() {
        let s = setup().await;
        // Not JSON, and a job naming a handler this registry lacks.
        let unknown =
            br#"{"id": "j", "requestor": "r", "tasks": [{"name": "t", "handler": "sleep"}]}"#;
        for body in [&b"{not json"[..], &unknown[..]] {
            let (delivery, properties, _sub) = delivered(&s, body).await;

            assert!(s.submissions.handle(delivery, None, None).await.is_none());

            let referred = s.broker.take_messages(&s.names.referred_queue()).await;
            assert_eq!(referred.len(), 1);
            assert_eq!(referred[0].body, body, "byte for byte");
            assert_eq!(
                referred[0].properties, properties,
                "its reply still reaches the client"
            );
            let submit = s.names.submit_queue();
            assert_eq!(s.broker.ready_len(&submit).await, 0);
            assert_eq!(
                s.broker.unacked_len(&submit).await,
                0,
                "acked: {}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(
            s.store.job("j").await.unwrap().is_none(),
            "not rejected here"
        );
        assert!(s.broker.take_all(&s.names.dead_queue()).await.is_empty());
        assert!(
            s.broker.take_all("replies").await.is_empty(),
            "no verdict, so no reply"
        );
    }

    #[tokio::test]
    async fn a_referral_the_broker_does_not_take_leaves_the_submission_queued() {
        let s = setup().await;
        let (delivery, _, _sub) = delivered(&s, b"{not json").await;
        s.broker.set_outage(true);

        assert!(s.submissions.handle(delivery, None, None).await.is_none());

        s.broker.set_outage(false);
        assert_eq!(
            s.broker.ready_len(&s.names.submit_queue()).await,
            1,
            "not lost"
        );
        assert_eq!(s.broker.ready_len(&s.names.referred_queue()).await, 0);
    }

    /// A submission the broker will not take a message for now goes back
    /// after a pause, not at once: requeued at once, it came straight back
    /// and each round counted a delivery against the submit queue's limit.
    #[tokio::test(start_paused = true)]
    async fn a_submission_the_broker_cannot_serve_now_goes_back_after_a_pause() {
        let s = setup().await;
        let (delivery, _, _sub) = delivered(&s, b"{not json").await;
        s.broker.set_outage(true);
        let started = tokio::time::Instant::now();

        assert!(s.submissions.handle(delivery, None, None).await.is_none());

        assert!(
            started.elapsed() >= BROKER_REFUSAL_PAUSE,
            "{:?}",
            started.elapsed()
        );
        s.broker.set_outage(false);
        assert_eq!(s.broker.ready_len(&s.names.submit_queue()).await, 1);
    }

    /// A process stopping gives such a submission back without its pause:
    /// its consumer is cancelled, nothing loops, and the stop waits for the
    /// submissions in hand.
    #[tokio::test(start_paused = true)]
    async fn a_stopping_process_gives_such_a_submission_back_without_its_pause() {
        let s = setup().await;
        let (delivery, _, _sub) = delivered(&s, b"{not json").await;
        s.broker.set_outage(true);
        let stop = crate::shutdown::ShutdownTrigger::new();
        let stopping = stop.subscribe();
        let started = tokio::time::Instant::now();
        let handled = s.submissions.handle(delivery, None, Some(&stopping));
        let stop_soon = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.trigger();
        };
        let (handled, ()) = tokio::join!(handled, stop_soon);
        assert!(handled.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        s.broker.set_outage(false);
        assert_eq!(s.broker.ready_len(&s.names.submit_queue()).await, 1);
    }

    /// The pause before a submission goes back doubles with each delivery
    /// counted against it, up to a cap, so that a broker refusing what it
    /// causes for a while does not carry it past the delivery limit.
    #[test]
    fn the_pause_before_a_submission_goes_back_grows_with_its_deliveries() {
        let pauses: Vec<u64> = (0..8)
            .map(|count| grown_pause(BROKER_REFUSAL_PAUSE, count).as_secs())
            .collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(
            grown_pause(BROKER_REFUSAL_PAUSE, u32::MAX),
            MAX_REFUSAL_PAUSE
        );
        assert_eq!(grown_pause(Duration::ZERO, 7), Duration::ZERO);
        let rounds: u64 = (0..20)
            .map(|count| grown_pause(BROKER_REFUSAL_PAUSE, count).as_secs())
            .sum();
        assert!(rounds >= 8 * 60, "twenty rounds take {rounds} s");
    }

    /// A submission requeued once (its delivery counted) waits twice the
    /// pause the second time round.
    #[tokio::test(start_paused = true)]
    async fn a_submission_sent_back_again_waits_longer() {
        let s = setup().await;
        let submit = s.names.submit_queue();
        let (delivery, _, mut sub) = delivered(&s, b"{not json").await;
        // Refused once at once: back by a requeue, its delivery counted.
        delivery.acker.requeue().await.unwrap();
        let again = sub.next().await.unwrap().unwrap();
        assert_eq!(again.delivery_count, 1);
        s.broker.set_outage(true);
        let started = tokio::time::Instant::now();

        assert!(s.submissions.handle(again, None, None).await.is_none());

        assert!(
            started.elapsed() >= 2 * BROKER_REFUSAL_PAUSE,
            "{:?}",
            started.elapsed()
        );
        s.broker.set_outage(false);
        assert_eq!(s.broker.ready_len(&submit).await, 1);
    }

    /// Fails the first publish to `queue` with `error`, and with `blocked`
    /// every publish to that queue too (as a memory alarm blocks every
    /// publisher); every other publish goes through.
    struct FailsFirstPublishTo {
        queue: String,
        error: fn(&str) -> BrokerError,
        failed: std::sync::atomic::AtomicBool,
        blocked: Option<String>,
    }

    #[async_trait::async_trait]
    impl PublishHook for FailsFirstPublishTo {
        async fn publish(
            &self,
            inner: &MemoryBroker,
            batch: Vec<Outgoing>,
        ) -> Result<(), BrokerError> {
            let ours = batch.iter().any(|m| m.queue == self.queue);
            if ours && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Err((self.error)(&self.queue));
            }
            if let Some(blocked) = &self.blocked
                && batch.iter().any(|m| &m.queue == blocked)
            {
                return Err((self.error)(blocked));
            }
            inner.publish(batch).await
        }
    }

    /// A queue at its length limit refusing a publish.
    fn refused(queue: &str) -> BrokerError {
        BrokerError::Refused {
            queue: queue.to_owned(),
            reason: "at its length limit".into(),
        }
    }

    /// A publish that timed out (a memory alarm blocking publishers).
    fn timed_out(_queue: &str) -> BrokerError {
        BrokerError::Unavailable("publish timed out".into())
    }

    /// A job whose body names no id, recorded but its ready task refused by
    /// the broker, or its publish timed out: the submission goes back to
    /// its queue carrying the id its job was recorded under, or is held
    /// while the publish is tried again, and either way its job's task is
    /// published, instead of a second job (whose task nobody would
    /// publish) being recorded under a fresh id.
    #[tokio::test]
    async fn an_id_less_submission_whose_tasks_the_broker_did_not_take_keeps_its_job() {
        // Refused: the submission goes back with its id. Timed out while
        // every publish is blocked (a copy given back too): held until its
        // job's task is published, also when a worker taking it claimed a
        // root to run (given back without its id, it was recorded, and
        // that root run, again).
        for run_here in [false, true] {
            id_less_submission_keeps_its_job(refused, false, run_here).await;
            id_less_submission_keeps_its_job(timed_out, true, run_here).await;
        }
    }

    async fn id_less_submission_keeps_its_job(
        error: fn(&str) -> BrokerError,
        copies_blocked: bool,
        run_here: bool,
    ) {
        let names = Names::new("t");
        let store = memory_store();
        let inner = Arc::new(MemoryBroker::reliable(names.clone()));
        let tasks = names.task_queue("default");
        let broker = Arc::new(WithPublish {
            inner: inner.clone(),
            hook: FailsFirstPublishTo {
                queue: tasks.clone(),
                error,
                failed: false.into(),
                blocked: copies_blocked.then(|| names.submit_queue()),
            },
        });
        let submissions = Submissions {
            store: store.clone(),
            outbox: Outbox::new(broker.clone(), names.clone()),
            intake: JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry())
                .unwrap(),
            health: Health::new(store.clone(), broker.clone()),
            refer_refusals: false,
        };
        broker.declare(&["default".to_owned()]).await.unwrap();
        let submit = names.submit_queue();
        // Two roots: a worker taking the submission claims one to run and
        // publishes the other.
        let body = br#"{"requestor": "r", "tasks": [{"name": "t", "handler": "noop"},
            {"name": "u", "handler": "noop"}]}"#;
        inner
            .publish(vec![Outgoing::durable(submit.clone(), body.to_vec())])
            .await
            .unwrap();
        let mut sub = inner.subscribe(&submit, 1).await.unwrap();
        let queues = ["default".to_owned()];
        let register = |_: &ClaimRef| {};

        // Taken until the submission queue is empty (a refusal gives the
        // submission back once).
        let mut carried = Vec::new();
        let mut ran_here = Vec::new();
        while inner.ready_len(&submit).await > 0 || inner.unacked_len(&submit).await > 0 {
            let delivery = sub.next().await.unwrap().unwrap();
            carried.push(delivery.properties.header(ASSIGNED_ID_HEADER).cloned());
            let here = run_here.then(|| RunHere {
                queues: &queues,
                worker: "w",
                lease: Duration::from_secs(30),
                claimed: &register,
            });
            ran_here.extend(submissions.handle(delivery, here, None).await);
        }

        let jobs = store.list_jobs(None, 10).await.unwrap();
        assert_eq!(jobs.len(), 1, "one job, not one per delivery: {jobs:?}");
        if carried.len() > 1 {
            assert_eq!(carried[1], Some(HeaderValue::Text(jobs[0].id.clone())));
        }
        assert_eq!(ran_here.len(), usize::from(run_here), "one root run here");
        let queued = inner.take_all(&tasks).await;
        assert_eq!(
            queued.len(),
            2 - ran_here.len(),
            "every other root published"
        );
        for message in queued {
            let task: crate::model::TaskMessage = serde_json::from_slice(&message).unwrap();
            assert_eq!(task.job, jobs[0].id);
        }
    }

    #[tokio::test]
    async fn a_dispatcher_dead_letters_a_referred_message_as_from_the_submit_queue() {
        let mut s = setup().await;
        s.submissions.refer_refusals = false;
        let referred = s.names.referred_queue();
        s.broker
            .publish(vec![Outgoing::durable(
                referred.clone(),
                b"{not json".to_vec(),
            )])
            .await
            .unwrap();
        let mut sub = s.broker.subscribe(&referred, 1).await.unwrap();
        let delivery = sub.next().await.unwrap().unwrap();

        s.submissions.handle(delivery, None, None).await;

        let dead = s.broker.take_messages(&s.names.dead_queue()).await;
        assert_eq!(dead.len(), 1);
        let source = dead[0]
            .properties
            .headers
            .iter()
            .find(|(k, _)| k == "x-conveyor-source-queue")
            .map(|(_, v)| v.clone());
        assert_eq!(
            source,
            Some(crate::broker::HeaderValue::Text(s.names.submit_queue()))
        );
    }

    /// A job recorded by a process that judged its body valid, its ready
    /// task never published (that process failed to publish and gave the
    /// submission back), and the submission then taken by a process whose
    /// registry lacks the job's handler: answered as the recorded job, and
    /// the task offered again, not left waiting for a message nobody sends.
    #[tokio::test]
    async fn an_invalid_verdict_on_a_recorded_jobs_own_submission_has_its_ready_tasks_offered_again()
     {
        let mut s = setup().await;
        s.submissions.refer_refusals = false;
        let body = br#"{"id": "x", "requestor": "r", "tasks": [{"name": "t", "handler": "noop"}]}"#;
        let elsewhere =
            JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry()).unwrap();
        let Intake::Valid(job) = elsewhere.accept_as(body, None).0 else {
            panic!("valid where it was recorded");
        };
        s.store.create_job(&job).await.unwrap();
        s.broker.declare_queue("replies").await;
        let (delivery, _, _sub) = delivered(&s, body).await;

        s.submissions.handle(delivery, None, None).await;

        let replies = s.broker.take_all("replies").await;
        let reply: SubmitReply = serde_json::from_slice(&replies[0]).unwrap();
        assert!(reply.accepted && reply.existing, "{reply:?}");
        assert_eq!(s.broker.ready_len(&s.names.submit_queue()).await, 0);
        // The audit's entry is due a millisecond after it was made.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let offered: Vec<TaskMessage> = s
            .store
            .expired_leases(10, "d")
            .await
            .unwrap()
            .into_iter()
            .flat_map(|action| action.publish)
            .collect();
        assert_eq!(offered.len(), 1, "{offered:?}");
        assert_eq!((offered[0].job.as_str(), offered[0].attempt), ("x", 1));
    }
}
