//! Notes for a user following a job that nothing will move: `submit` and
//! `run` against a deployment publish and then wait, and without a
//! dispatcher (or a worker taking submissions) on the submit queue, a
//! dispatcher for a job a worker referred to the dispatchers, or a
//! worker on a ready task's queue, they would wait out their whole
//! time-out in silence. The broker knows who consumes what, so the
//! command says so, once per queue, on stderr (stdout stays the job's).
//!
//! A queue no one consumes is not an error: the job waits there, durable,
//! until someone does. The notes say that too.

use super::out::note;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use conveyor::broker::Broker;
use conveyor::model::TaskState;
use conveyor::names::Names;
use conveyor::store::{JobStatus, Store, WorkerInfo};
use tokio::time::Instant;

/// How often a waiting command asks the broker who consumes the queues
/// its job waits in.
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// How long a waiting command lets processes that may be starting beside
/// it begin to consume before its first look (see
/// [`Stalls::first_look_after`]).
pub const STARTING_GRACE: Duration = Duration::from_secs(1);

/// The queues a followed job waits in, and which were noted.
pub struct Stalls {
    broker: Arc<dyn Broker>,
    names: Names,
    noted: HashSet<String>,
    next_look: Instant,
}

impl Stalls {
    pub fn new(broker: Arc<dyn Broker>, names: Names) -> Stalls {
        Stalls {
            broker,
            names,
            noted: HashSet::new(),
            next_look: Instant::now(),
        }
    }

    /// Make the first look wait `grace` from now: a command that will keep
    /// waiting gives a dispatcher or worker started just before it (as in a
    /// script that starts all three at once) the moment it takes to
    /// consume, rather than note a queue that is about to be served.
    pub fn first_look_after(&mut self, grace: Duration) {
        self.next_look = self.next_look.max(Instant::now() + grace);
    }

    /// Look now (if it is time) at the queues the job waits in: the submit
    /// queue while it is not recorded (`status` is `None`), else the
    /// queues of its ready tasks; note those no process consumes. With
    /// `store`, a task queue whose workers are registered but all busy (a
    /// worker whose every slot is taken gives back what it holds and stops
    /// consuming until one frees, so RabbitMQ counts no consumer) is noted
    /// as such, not as a queue no worker serves.
    pub async fn look(&mut self, status: Option<&JobStatus>, store: Option<&dyn Store>) {
        for note in self.notes_with(status, store).await {
            note!("{note}");
        }
    }

    /// The notes [`Stalls::look`] prints without a store.
    #[cfg(test)]
    async fn notes(&mut self, status: Option<&JobStatus>) -> Vec<String> {
        self.notes_with(status, None).await
    }

    /// The notes [`Stalls::look`] prints: none unless it is time to look,
    /// and none for a queue noted before.
    async fn notes_with(
        &mut self,
        status: Option<&JobStatus>,
        store: Option<&dyn Store>,
    ) -> Vec<String> {
        let now = Instant::now();
        if now < self.next_look {
            return Vec::new();
        }
        self.next_look = now + LOOK_EVERY;
        let referred = self.names.referred_queue();
        let waiting: Vec<(String, Option<(&str, &str)>)> = match status {
            // The referred queue too: a worker hands the dispatchers a job
            // it cannot take itself (a handler it lacks), and without one
            // the job waits there.
            None => vec![(self.names.submit_queue(), None), (referred.clone(), None)],
            // Each queue once, with the first of its ready tasks to name in
            // the note: the broker is asked once per queue listed, and a
            // fan-out of 10,000 ready tasks on one queue was 10,000 round
            // trips at every look.
            Some(status) => {
                let mut listed = HashSet::new();
                status
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.state == TaskState::Ready && listed.insert(&t.queue))
                    .map(|(name, t)| {
                        (
                            self.names.task_queue(&t.queue),
                            Some((name.as_str(), t.queue.as_str())),
                        )
                    })
                    .collect()
            }
        };
        let queues: Vec<String> = waiting
            .iter()
            .map(|(q, _)| q.clone())
            .filter(|q| !self.noted.contains(q))
            .collect();
        if queues.is_empty() {
            return Vec::new();
        }
        // Cannot tell: say nothing rather than something wrong.
        let Ok(stats) = self.broker.queue_stats(&queues).await else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        // Read once per look, and only if a task queue has no consumer.
        let mut workers: Option<Vec<WorkerInfo>> = None;
        for (queue, task) in waiting {
            let Some(stat) = stats.iter().find(|s| s.queue == queue) else {
                continue;
            };
            // The referred queue only when something waits in it: with
            // workers taking submissions, no dispatcher is needed until one
            // is referred.
            let stalled = stat.consumers == 0 && (queue != referred || stat.ready > 0);
            if !stalled {
                continue;
            }
            if let (Some((name, short)), Some(store)) = (task, store) {
                if workers.is_none() {
                    workers = Some(store.workers().await.unwrap_or_default());
                }
                // Registered (its key lives for three heartbeats) for the
                // queue, with the task's handler.
                let handler = status
                    .and_then(|s| s.tasks.get(name))
                    .map(|t| t.handler.as_str());
                let busy = workers
                    .iter()
                    .flatten()
                    .filter(|w| {
                        w.queues.iter().any(|q| q == short)
                            && handler.is_none_or(|h| w.handlers.iter().any(|x| x == h))
                    })
                    .count();
                if busy > 0 {
                    // Noted apart: should they go, the queue is noted
                    // again as one nobody consumes.
                    if self.noted.insert(format!("busy {queue}")) {
                        notes.push(busy_note(&queue, name, busy));
                    }
                    continue;
                }
            }
            if !self.noted.insert(queue.clone()) {
                continue;
            }
            notes.push(if queue == referred {
                referred_note(&queue, self.names.prefix())
            } else {
                note(&queue, self.names.prefix(), task)
            });
        }
        notes
    }
}

/// The note for `queue`, which no process consumes: the submit queue
/// (`task` is `None`), or the queue of ready task `(name, queue)`.
fn note(queue: &str, prefix: &str, task: Option<(&str, &str)>) -> String {
    match task {
        None => format!(
            "note: nothing consumes {queue} now (no dispatcher, nor a worker taking \
             submissions, runs with prefix {prefix:?} on this RabbitMQ); the job waits \
             there until one starts"
        ),
        Some((name, short)) => format!(
            "note: task {name} is ready in {queue}, which no worker consumes now; it \
             waits there until a worker runs with --queues {short} (and prefix {prefix:?})"
        ),
    }
}

/// The note for a task queue whose `workers` are registered but take
/// nothing now: every slot of theirs is busy.
fn busy_note(queue: &str, name: &str, workers: usize) -> String {
    let them = if workers == 1 {
        "the worker that consumes it is".to_owned()
    } else {
        format!("the {workers} workers that consume it are")
    };
    format!(
        "note: task {name} is ready in {queue}; {them} busy (every slot taken), and it \
         runs when a slot frees (more workers with its queue would take it sooner)"
    )
}

/// The note for the referred queue, where a job waits that no dispatcher
/// takes.
fn referred_note(queue: &str, prefix: &str) -> String {
    format!(
        "note: a submission waits in {queue}, where workers hand the dispatchers the jobs \
         they cannot take themselves (a handler they lack), and no dispatcher runs with \
         prefix {prefix:?} on this RabbitMQ; it waits there until one starts"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use conveyor::broker::memory::MemoryBroker;
    use conveyor::broker::{BrokerError, Outgoing, QueueStats, Subscription};
    use conveyor::store::TaskStatus;

    /// Stalls of prefix `p` on an in-process broker where the submit queue
    /// is declared and nothing consumes it.
    async fn unconsumed_submit_queue() -> Stalls {
        let names = Names::new("p");
        let broker = MemoryBroker::reliable(names.clone());
        broker.declare(&[]).await.unwrap();
        Stalls::new(Arc::new(broker), names)
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_nothing_consumes_is_noted_at_the_first_look_and_only_once() {
        let mut stalls = unconsumed_submit_queue().await;
        let notes = stalls.notes(None).await;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("note: nothing consumes p.submit now"));
        tokio::time::advance(LOOK_EVERY).await;
        assert_eq!(stalls.notes(None).await, Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_command_gives_starting_processes_a_grace_before_its_first_look() {
        let mut stalls = unconsumed_submit_queue().await;
        stalls.first_look_after(STARTING_GRACE);
        assert!(stalls.notes(None).await.is_empty());
        tokio::time::advance(STARTING_GRACE - Duration::from_millis(1)).await;
        assert!(stalls.notes(None).await.is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(stalls.notes(None).await.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_submission_referred_to_no_dispatcher_is_noted_and_an_empty_referred_queue_is_not() {
        let mut stalls = unconsumed_submit_queue().await;
        let notes = stalls.notes(None).await;
        assert_eq!(notes.len(), 1, "only the submit queue: {notes:?}");
        // A worker consumes submissions now, and referred one.
        let names = Names::new("p");
        let broker = MemoryBroker::reliable(names.clone());
        broker.declare(&[]).await.unwrap();
        let _worker = broker.subscribe(&names.submit_queue(), 1).await.unwrap();
        broker
            .publish(vec![conveyor::broker::Outgoing::durable(
                names.referred_queue(),
                b"{}".to_vec(),
            )])
            .await
            .unwrap();
        let mut stalls = Stalls::new(Arc::new(broker), names);
        let notes = stalls.notes(None).await;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("note: a submission waits in p.submit.referred"));
    }

    /// The in-process broker, keeping every list of queues it was asked
    /// the stats of.
    struct Asked {
        inner: MemoryBroker,
        asked: std::sync::Mutex<Vec<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl Broker for Asked {
        async fn declare(&self, task_queues: &[String]) -> Result<(), BrokerError> {
            self.inner.declare(task_queues).await
        }

        async fn publish(&self, batch: Vec<Outgoing>) -> Result<(), BrokerError> {
            self.inner.publish(batch).await
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
            self.asked.lock().unwrap().push(queues.to_vec());
            self.inner.queue_stats(queues).await
        }

        fn is_connected(&self) -> bool {
            self.inner.is_connected()
        }
    }

    /// A job of `ready` ready tasks, each on `gpu` or `cpu` by turns.
    fn fan_out(ready: usize) -> JobStatus {
        let task = |queue: &str| TaskStatus {
            state: TaskState::Ready,
            attempts: 1,
            result: serde_json::Value::Null,
            error: None,
            worker: None,
            handler: "noop".into(),
            queue: queue.into(),
            max_attempts: 1,
            next_attempt_at_ms: None,
        };
        JobStatus {
            id: "fan".into(),
            state: conveyor::model::JobState::Running,
            version: 1,
            requestor: "r".into(),
            labels: Default::default(),
            error: None,
            created_ms: 0,
            updated_ms: 0,
            tasks: (0..ready)
                .map(|i| {
                    let queue = if i % 2 == 0 { "gpu" } else { "cpu" };
                    (format!("t{i:05}"), task(queue))
                })
                .collect(),
            history: Vec::new(),
        }
    }

    /// Until the thirty-second session a look listed a task queue once per
    /// ready task in it, and the AMQP broker asks RabbitMQ once per queue
    /// listed: a fan-out of 10,000 ready tasks cost 10,000 round trips at
    /// every look.
    #[tokio::test(start_paused = true)]
    async fn a_look_asks_the_broker_once_per_queue_and_names_its_first_ready_task() {
        let names = Names::new("p");
        let inner = MemoryBroker::reliable(names.clone());
        inner
            .declare(&["gpu".to_owned(), "cpu".to_owned()])
            .await
            .unwrap();
        let broker = Arc::new(Asked {
            inner,
            asked: Default::default(),
        });
        let mut stalls = Stalls::new(broker.clone(), names);
        let notes = stalls.notes(Some(&fan_out(10_000))).await;
        assert_eq!(
            *broker.asked.lock().unwrap(),
            [["p.tasks.gpu", "p.tasks.cpu"]],
            "one list, each queue once"
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("note: task t00000 is ready in p.tasks.gpu"));
        assert!(notes[1].starts_with("note: task t00001 is ready in p.tasks.cpu"));
    }

    /// A worker whose every slot is busy gives back what it holds and
    /// consumes nothing until one frees, so RabbitMQ counts no consumer on
    /// its queue: the note says its workers are busy, not that none runs.
    #[tokio::test(start_paused = true)]
    async fn a_queue_whose_registered_workers_are_busy_is_noted_as_busy() {
        use conveyor::store::memory::{MemoryStore, SystemClock};
        let names = Names::new("p");
        let broker = MemoryBroker::reliable(names.clone());
        broker
            .declare(&["gpu".to_owned(), "cpu".to_owned()])
            .await
            .unwrap();
        let store = MemoryStore::new(Arc::new(SystemClock), Duration::from_secs(60), 1, "t");
        let worker = WorkerInfo {
            id: "w1".into(),
            host: "h".into(),
            queues: vec!["gpu".into()],
            handlers: vec!["noop".into()],
            concurrency: 1,
            started_ms: 0,
            heartbeat_ms: 0,
        };
        store
            .heartbeat(&worker, Duration::from_secs(60))
            .await
            .unwrap();
        let mut stalls = Stalls::new(Arc::new(broker), names);
        let notes = stalls.notes_with(Some(&fan_out(2)), Some(&store)).await;
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].starts_with(
                "note: task t00000 is ready in p.tasks.gpu; the worker that consumes it is busy"
            ),
            "{notes:?}"
        );
        assert!(
            notes[1].starts_with("note: task t00001 is ready in p.tasks.cpu, which no worker"),
            "{notes:?}"
        );
        // The worker gone: the queue is noted now as one nobody consumes.
        store.unregister("w1").await.unwrap();
        tokio::time::advance(LOOK_EVERY).await;
        let notes = stalls.notes_with(Some(&fan_out(2)), Some(&store)).await;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("note: task t00000 is ready in p.tasks.gpu, which no worker"),
            "{notes:?}"
        );
    }

    #[test]
    fn the_notes_name_the_queue_and_what_would_consume_it() {
        let submit = note("p.submit", "p", None);
        assert!(submit.starts_with("note: nothing consumes p.submit now"));
        assert!(submit.contains("prefix \"p\""));
        let task = note("p.tasks.gpu", "p", Some(("render", "gpu")));
        assert!(task.starts_with("note: task render is ready in p.tasks.gpu"));
        assert!(task.contains("--queues gpu"));
    }
}
