//! Every AMQP name and Redis key Conveyor uses, derived from one prefix so
//! several deployments (and test runs) can share a broker and a Redis.
//!
//! All keys of one job share the hash tag `{<job id>}`, so one Lua script may
//! touch them all on Redis Cluster. Cross-job structures (the job index, the
//! lease and retry schedules, the worker registry) are separate keys touched
//! by separate commands, never inside a job's script: that is what lets them
//! be sharded into buckets later without a CROSSSLOT error.

/// The names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (e.g. `conveyor`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Names {
            prefix: prefix.into(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The durable queue clients publish jobs to.
    pub fn submit_queue(&self) -> String {
        format!("{}.submit", self.prefix)
    }

    /// The durable queue of submissions workers refer to the dispatchers:
    /// every one a worker would refuse (not JSON, too large, or not a
    /// valid job by the worker's own registry). Only dispatchers consume
    /// it, so a refusal is always a dispatcher's verdict, and a worker
    /// built with fewer handlers than the dispatchers never rejects a job
    /// they accept.
    pub fn referred_queue(&self) -> String {
        format!("{}.submit.referred", self.prefix)
    }

    /// The durable queue of messages that could not be handled.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The queue tasks of `queue` are published to.
    pub fn task_queue(&self, queue: &str) -> String {
        format!("{}.tasks.{}", self.prefix, queue)
    }

    /// The name a job gives the task queue `full` ([`Self::task_queue`]
    /// read backwards), if `full` is one of this deployment's.
    pub fn task_queue_of<'a>(&self, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(self.prefix.as_str())?
            .strip_prefix(".tasks.")
            .filter(|q| !q.is_empty())
    }

    /// The hash holding a job and all its tasks.
    pub fn job_key(&self, job: &str) -> String {
        format!("{}:{{{}}}:job", self.prefix, job)
    }

    /// The list holding a job's history.
    pub fn history_key(&self, job: &str) -> String {
        format!("{}:{{{}}}:hist", self.prefix, job)
    }

    /// Sorted set of jobs by creation time (for `list`).
    pub fn jobs_index(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    /// Sorted set of live claims by lease expiry (for the orphan sweep).
    pub fn leases(&self) -> String {
        format!("{}:leases", self.prefix)
    }

    /// Sorted set of scheduled retries by due time.
    pub fn retries(&self) -> String {
        format!("{}:retries", self.prefix)
    }

    /// Sorted set of workers by last heartbeat.
    pub fn workers_index(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// Hash describing one worker.
    pub fn worker_key(&self, worker: &str) -> String {
        format!("{}:worker:{{{}}}", self.prefix, worker)
    }

    /// The key whose value identifies this Redis's state lifetime (see
    /// `store::redis` on epochs).
    pub fn epoch_key(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// A counter each replica wait round increments: a write of its own,
    /// so the `WAIT` after it covers every write Redis ran before it (see
    /// `redis_wait_replicas`).
    pub fn replicated_key(&self) -> String {
        format!("{}:replicated", self.prefix)
    }

    /// The key naming the Redis server (`run_id`) the last complete audit
    /// of the job index was of (see `Store::audit_due`).
    pub fn audited_key(&self) -> String {
        format!("{}:audited", self.prefix)
    }

    /// Set of every task queue a job accepted here has named (what
    /// `conveyor queues` shows, besides the configured ones).
    pub fn queues_key(&self) -> String {
        format!("{}:queues", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_job_share_a_hash_tag() {
        let n = Names::new("p");
        assert_eq!(n.job_key("j1"), "p:{j1}:job");
        assert_eq!(n.history_key("j1"), "p:{j1}:hist");
    }

    #[test]
    fn amqp_names_follow_the_wire_contract() {
        let n = Names::new("conveyor");
        assert_eq!(n.submit_queue(), "conveyor.submit");
        assert_eq!(n.dead_queue(), "conveyor.dead");
        assert_eq!(n.task_queue("default"), "conveyor.tasks.default");
    }
}
