//! Notes for a user following a job that nothing will move: `submit` and
//! `run` against a deployment publish and then wait, and without a
//! dispatcher (or a worker taking submissions) on the submit queue, or a
//! worker on a ready task's queue, they would wait out their whole
//! time-out in silence. The broker knows who consumes what, so the
//! command says so, once per queue, on stderr (stdout stays the job's).
//!
//! A queue no one consumes is not an error: the job waits there, durable,
//! until someone does. The notes say that too.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use conveyor::broker::Broker;
use conveyor::model::TaskState;
use conveyor::names::Names;
use conveyor::store::JobStatus;
use tokio::time::Instant;

/// How often a waiting command asks the broker who consumes the queues
/// its job waits in.
const LOOK_EVERY: Duration = Duration::from_secs(2);

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

    /// Look now (if it is time) at the queues the job waits in: the submit
    /// queue while it is not recorded (`status` is `None`), else the
    /// queues of its ready tasks; note those no process consumes.
    pub async fn look(&mut self, status: Option<&JobStatus>) {
        let now = Instant::now();
        if now < self.next_look {
            return;
        }
        self.next_look = now + LOOK_EVERY;
        let waiting: Vec<(String, Option<(&str, &str)>)> = match status {
            None => vec![(self.names.submit_queue(), None)],
            Some(status) => status
                .tasks
                .iter()
                .filter(|(_, t)| t.state == TaskState::Ready)
                .map(|(name, t)| {
                    (
                        self.names.task_queue(&t.queue),
                        Some((name.as_str(), t.queue.as_str())),
                    )
                })
                .collect(),
        };
        let queues: Vec<String> = waiting
            .iter()
            .map(|(q, _)| q.clone())
            .filter(|q| !self.noted.contains(q))
            .collect();
        if queues.is_empty() {
            return;
        }
        // Cannot tell: say nothing rather than something wrong.
        let Ok(stats) = self.broker.queue_stats(&queues).await else {
            return;
        };
        for (queue, task) in waiting {
            let consumed = stats.iter().any(|s| s.queue == queue && s.consumers > 0);
            if consumed || !self.noted.insert(queue.clone()) {
                continue;
            }
            eprintln!("{}", note(&queue, self.names.prefix(), task));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
