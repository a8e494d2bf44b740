//! The Redis store: the production implementation of [`Store`].
//!
//! Each job transition is one Lua function (in `store/lua/`, each headed by
//! what it checks and returns) over the job's hash and history list, which
//! share the job's hash tag. The functions form one library (Redis 7
//! Functions), loaded once and called with `FCALL`: the shared helpers are
//! made once at load instead of on every call, as an `EVAL`ed script would
//! (a fifth of a claim's time). The library's name carries a digest of its
//! source, so deployments of different versions can share a Redis; a
//! "Function not found" answer (Redis restarted without its data, or
//! `FUNCTION FLUSH`) reloads it.
//!
//! Cross-job indexes are plain sorted sets touched by separate commands,
//! ordered so that a crash in between is repaired by a sweep:
//! - `<p>:leases` (`job|idx|attempt` by lease expiry) is added *before* the
//!   claim script runs and removed only after the claim's follow-up
//!   messages are confirmed; the sweep treats it as a hint and asks the
//!   job's own record (see `reclaim.lua`).
//! - `<p>:retries` (`job|idx|attempt` by due time) is added *before* the
//!   result that schedules the retry is applied, and removed after the
//!   promoted task's message is confirmed.
//! - `<p>:jobs` (id by creation time) feeds `list`; entries whose job
//!   expired are pruned when listed.
//!
//! Every index is scored by Redis's clock as this process reads it
//! (`RedisClock`: the local clock plus an offset measured against
//! `TIME`), so hosts whose clocks disagree agree on what is due.
//!
//! `redis_url` may name several nodes (a primary and its replicas): a
//! connection goes to the first, starting from the one that answered last,
//! that says it is the primary (`ROLE`). Or it may name Redis Sentinels
//! (`redis+sentinel://`, see [`super::sentinel`]), which say where the
//! primary is. After a failover the old primary answers writes with
//! `READONLY`, an outage to the caller, and the next call finds the new
//! one.
//!
//! This module holds the store and its calls; beside it: `functions` (the
//! Lua library's source and name), `nodes` (finding the primary),
//! `clock` (Redis's clock as this process reads it) and `replies` (reading
//! what Redis answers, and the packed run spec).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, Cmd, Pipeline, RedisError};
use serde_json::Value;

use super::{
    Applied, AttemptResult, AuditPage, ClaimOutcome, ClaimRef, Claimed, Created,
    DEFAULT_MAX_INPUTS_BYTES, HistoryEntry, JobListing, JobStatus, JobSummary, OversizedInputs,
    PENDING_RETRY_RECHECK, Pruned, Replicas, ScheduleEntry, ScheduleIndex, Store, StoreError,
    SweepAction, TaskStatus, WORKER_ENTRY_KEPT_MS, WorkerInfo, entry, parse_entry,
};
use crate::config::TlsCa;
use crate::intake::{PlannedJob, Rejection};
use crate::model::{JobState, TaskMessage, TaskState};
use crate::names::Names;

mod clock;
mod functions;
mod nodes;
mod replies;

use clock::RedisClock;
pub use clock::unix_ms;
#[cfg(test)]
pub(crate) use functions::COMMON;
pub use functions::SCRIPT_BODIES;
use functions::{Script, is_function_missing, library};
pub use nodes::tool_client;
use nodes::{Nodes, Use, is_primary, no_primary, watch_sentinels};
use replies::{
    Reply, RunSpec, claim_replies, created_from, data_identity, field, join_indexes, num,
    parse_job_state, parse_task_state, ready_set, replicas_in_info,
};

/// The Redis implementation of [`Store`].
#[derive(Clone)]
pub struct RedisStore {
    /// Where the nodes are: listed in `redis_url`, or named by sentinels.
    nodes: Nodes,
    names: Names,
    /// Function name of each [`Script`].
    functions: [String; SCRIPT_BODIES.len()],
    retention_ms: u64,
    by: String,
    epoch: Arc<AtomicU64>,
    shared: Arc<std::sync::Mutex<Option<MultiplexedConnection>>>,
    /// How many shared connections were made so far: one made since the
    /// replica waits' own connection was tells that the primary may have
    /// moved (see [`RedisStore::replica_round`]).
    shared_made: Arc<AtomicU64>,
    /// Held while the shared connection is made again, with the failure
    /// of the last attempt; and how many attempts ended (see
    /// [`RedisStore::conn`]).
    reconnect: Arc<tokio::sync::Mutex<Option<StoreError>>>,
    reconnects: Arc<AtomicU64>,
    forgets: Arc<std::sync::Mutex<Vec<ClaimRef>>>,
    /// Task queues this process has added to `<prefix>:queues` (so each
    /// is added once per process, not once per job).
    noted_queues: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Where the next [`Store::prune_expired`] resumes in the job index
    /// (a score, ms); 0 starts from the oldest entry again.
    prune_from: Arc<AtomicU64>,
    /// Replicas a job's creation waits for ([`RedisStore::with_replica_wait`]).
    replica_wait: Option<ReplicaWait>,
    /// The way to the task that sends claims in rounds (see
    /// [`Store::claim`]); `None` in that task's own copy.
    claim_rounds: Option<tokio::sync::mpsc::UnboundedSender<ClaimRequest>>,
    /// Claim rounds sent so far.
    claim_rounds_sent: Arc<AtomicU64>,
    /// Redis's clock, for the scores of the cross-job indexes.
    clock: Arc<RedisClock>,
    /// Most bytes of dependency results a claim hands out (shared with
    /// the claim rounds' copy).
    max_inputs_bytes: Arc<AtomicU64>,
    /// Made by [`RedisStore::connect_read_only`]: writes nothing of its own.
    read_only: bool,
}

/// A claim waiting for the next round of claims.
struct ClaimRequest {
    task: TaskMessage,
    worker: String,
    lease_ms: u64,
    /// This request's own, recorded with the claim it makes: sent again
    /// (the connection dropped before the reply), the request is answered
    /// with that claim instead of `busy` (see `claim.lua`).
    token: u64,
    answer: tokio::sync::oneshot::Sender<Result<ClaimOutcome, StoreError>>,
}

/// The most claims sent in one round.
const CLAIM_ROUND_MAX: usize = 256;
/// The most claim rounds out at once: enough to keep Redis and the
/// connection busy, few enough that claims arriving together wait for one.
const CLAIM_ROUNDS_OUT: usize = 4;
/// The waits before each time a claim call that failed for a reason a
/// retry can help is sent again (see `RedisStore::run_claims`): 3.75 s in
/// all, through a blip of Redis or of the network; a longer outage gives
/// the message back.
const CLAIM_RESEND_WAITS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// How long a schedule entry the store cannot act on is set aside before
/// the sweep tries it again (see `RedisStore::set_aside`): long enough not
/// to fill the log, short enough that a fixed record is soon acted on.
const BROKEN_ENTRY_RECHECK: Duration = Duration::from_secs(60);

/// The way to the task that runs replica wait rounds: each request is
/// answered by the first round that starts after it arrives.
#[derive(Clone)]
struct ReplicaWait {
    /// How many replicas each round waits for.
    replicas: u32,
    requests:
        tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.names.prefix())
            .finish()
    }
}

fn unavailable(e: RedisError) -> StoreError {
    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) {
        return StoreError::NotAllowed(e.to_string());
    }
    StoreError::Unavailable(e.to_string())
}

/// A server error that says "not now" rather than "never": Redis is
/// loading its data after a restart (`LOADING`), is a replica or was
/// demoted by a failover (`READONLY`), lost its master or cluster
/// (`MASTERDOWN`, `CLUSTERDOWN`, `TRYAGAIN`), is busy running a script
/// (`BUSY`), is out of memory until retention frees some (`OOM`), or
/// an ACL denies a command (`NOPERM`, an operator's to mend). These are
/// outages: the caller keeps its message and waits, as it does when the
/// connection is gone. Other known server errors (a script's `ERR`,
/// `NOSCRIPT`, `CROSSSLOT`) are defects no retry cures;
/// codes redis-rs does not know are taken for outages too (see
/// [`RedisStore::run`]).
fn is_transient_server_error(e: &RedisError) -> bool {
    use redis::ServerErrorKind as K;
    match e.kind() {
        redis::ErrorKind::Server(
            K::BusyLoading
            | K::ReadOnly
            | K::MasterDown
            | K::ClusterDown
            | K::TryAgain
            // An ACL that denies a command is an operator's to mend; taken
            // for a verdict it would dead-letter every message meanwhile.
            | K::NoPerm,
        ) => true,
        redis::ErrorKind::Extension => {
            matches!(server_code(e).as_deref(), Some("BUSY" | "OOM" | "NOREPLICAS"))
        }
        _ => false,
    }
}

/// Whether Redis answered the error on a connection that is as good as
/// ever: the server is busy (`BUSY`), full (`OOM`), short of replicas
/// (`NOREPLICAS`), loading its data (`LOADING`), denies the user the
/// command (`NOPERM`), or its cluster is not ready (`TRYAGAIN`,
/// `CLUSTERDOWN`). A fresh connection would reach the same server in the
/// same state: made again after each such error (before the thirty-sixth
/// session), every failing call cost a reconnect — behind Sentinel,
/// asking the sentinels first. A node that stopped being the primary
/// (`READONLY`, `MASTERDOWN`) is another matter: a fresh connection
/// finds the one that is.
fn keeps_the_connection(e: &RedisError) -> bool {
    use redis::ServerErrorKind as K;
    match e.kind() {
        redis::ErrorKind::Server(K::BusyLoading | K::NoPerm | K::TryAgain | K::ClusterDown) => true,
        redis::ErrorKind::Extension => {
            matches!(
                server_code(e).as_deref(),
                Some("BUSY" | "OOM" | "NOREPLICAS")
            )
        }
        _ => false,
    }
}

/// The code of the error Redis answered (of the first failed command, for
/// a pipeline's error, as [`RedisError::kind`] reads it), also when
/// redis-rs does not know it (`RedisError::code` says `None` for those in
/// a pipeline).
fn server_code(e: &RedisError) -> Option<String> {
    e.code().map(str::to_owned).or_else(|| {
        let errors = e.clone().into_server_errors()?;
        errors.first().map(|(_, error)| error.code().to_owned())
    })
}

/// Whether Redis answered `e` about the command itself, so that sending
/// it again would fail alike: a known server error that is no outage (a
/// script's `ERR`, `NOSCRIPT`, `CROSSSLOT`), or `WRONGTYPE` (a key of
/// this prefix holding another type of value, written by another program:
/// a code redis-rs does not know, which would otherwise be taken for an
/// outage and hold up whatever met it, the sweep's every pass with it).
fn is_permanent_server_error(e: &RedisError) -> bool {
    match e.kind() {
        redis::ErrorKind::Server(_) => !is_transient_server_error(e),
        redis::ErrorKind::Extension => server_code(e).as_deref() == Some("WRONGTYPE"),
        _ => false,
    }
}

/// The longest one `WAIT` of a replica round waits, in ms: under the
/// 10 s every connection gives an answer (`nodes.rs`).
const WAIT_STEP_MS: u64 = 8_000;

/// Whether Redis refused the connection's credentials: a wrong password
/// or user (`WRONGPASS`, which redis-rs reports as a failed
/// authentication), or none given to a server that asks for one
/// (`NOAUTH`).
fn credentials_refused(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || matches!(server_code(e).as_deref(), Some("NOAUTH" | "WRONGPASS"))
}

/// Whether a reply of a pipeline sent with `ignore_errors` says Redis lost
/// the function library (a restart without persistence, a `FUNCTION
/// FLUSH`).
fn is_lost_library(value: &redis::Value) -> bool {
    match value {
        redis::Value::ServerError(e) => is_function_missing(&e.clone().into()),
        _ => false,
    }
}

/// The schedule entries an audit call's `reply` for job `id` asks for.
fn audit_entries(id: &str, reply: &Reply) -> Result<Vec<ScheduleEntry>, StoreError> {
    (0..reply.len() / 4)
        .map(|k| k * 4)
        .map(|k| {
            let index = match field(reply, k) {
                "l" => ScheduleIndex::Leases,
                "r" => ScheduleIndex::Retries,
                other => return Err(protocol(format!("audit answered {other:?}"))),
            };
            Ok(ScheduleEntry {
                index,
                entry: entry(id, num(reply, k + 1, "idx")?, num(reply, k + 2, "attempt")?),
                at_ms: num(reply, k + 3, "due")?,
            })
        })
        .collect()
}

/// A sorted set's members, each with what came with it: those that are
/// text, and those that are not (not Conveyor's: something else wrote
/// them).
fn text_members<T>(
    read: impl ExactSizeIterator<Item = (Vec<u8>, T)>,
) -> (Vec<(String, T)>, Vec<Vec<u8>>) {
    let mut members = Vec::with_capacity(read.len());
    let mut foreign = Vec::new();
    for (member, score) in read {
        match String::from_utf8(member) {
            Ok(member) => members.push((member, score)),
            Err(e) => foreign.push(e.into_bytes()),
        }
    }
    (members, foreign)
}

/// A failed epoch read as a store error: an answer about the command
/// itself is a protocol error, anything else an outage.
fn epoch_error(e: RedisError) -> StoreError {
    if is_permanent_server_error(&e) {
        protocol(format!("reading the epoch: {e}"))
    } else {
        unavailable(e)
    }
}

fn protocol(what: impl Into<String>) -> StoreError {
    StoreError::Protocol(what.into())
}

impl RedisStore {
    /// Connect to `url` (`redis://` or `rediss://`, trusting only `tls_ca`
    /// if given; or several such URLs separated by commas, the nodes of one
    /// primary and its replicas) with a pool of `size` multiplexed
    /// connections per node, and load the scripts.
    pub async fn connect(
        url: &str,
        tls_ca: Option<&TlsCa>,
        names: Names,
        retention: Duration,
        size: usize,
        by: impl Into<String>,
    ) -> Result<RedisStore, StoreError> {
        Self::connect_for(url, tls_ca, names, retention, size, by.into(), false).await
    }

    /// Connect as [`RedisStore::connect`] does, for reading only (the
    /// one-shot commands `status`, `list`, `queues` and a followed
    /// submission): nothing is written on the store's own account — the
    /// function library is not loaded, the epoch is read but never
    /// started, expired index entries are skipped rather than removed —
    /// so a Redis user allowed only `+@read` can run those commands, and a
    /// mistyped prefix leaves no key behind. Its writing calls are not for
    /// use (they fail, as the library is not loaded or the user may not).
    pub async fn connect_read_only(
        url: &str,
        tls_ca: Option<&TlsCa>,
        names: Names,
        by: impl Into<String>,
    ) -> Result<RedisStore, StoreError> {
        Self::connect_for(url, tls_ca, names, Duration::ZERO, 1, by.into(), true).await
    }

    async fn connect_for(
        url: &str,
        tls_ca: Option<&TlsCa>,
        names: Names,
        retention: Duration,
        size: usize,
        by: String,
        read_only: bool,
    ) -> Result<RedisStore, StoreError> {
        let nodes = Nodes::new(url, tls_ca, size)?;
        let functions = SCRIPT_BODIES.map(|(name, _)| format!("{}_{name}", library().name));
        let mut store = RedisStore {
            nodes,
            names,
            functions,
            retention_ms: retention.as_millis() as u64,
            by,
            epoch: Arc::new(AtomicU64::new(0)),
            shared: Arc::default(),
            shared_made: Arc::default(),
            reconnect: Arc::default(),
            reconnects: Arc::default(),
            forgets: Arc::default(),
            prune_from: Arc::default(),
            noted_queues: Arc::default(),
            replica_wait: None,
            claim_rounds: None,
            claim_rounds_sent: Arc::default(),
            clock: Arc::default(),
            max_inputs_bytes: Arc::new(AtomicU64::new(DEFAULT_MAX_INPUTS_BYTES)),
            read_only,
        };
        store.first_contact().await?;
        if !read_only {
            store.load_library().await?;
        }
        store.check_epoch().await?;
        if let Nodes::Sentinel(nodes) = &store.nodes {
            tokio::spawn(watch_sentinels(
                Arc::downgrade(nodes),
                Arc::downgrade(&store.shared),
            ));
        }
        // The task's own copy sends its rounds directly: no cycle keeps
        // it alive once every other copy of the store is dropped.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(store.clone().claim_rounds(rx));
        store.claim_rounds = Some(tx);
        Ok(store)
    }

    /// Refused credentials, at the first contact, are a mistake in
    /// `redis_url` to report as such (the one-shot commands exit saying so,
    /// a process logs it), not an outage with the hint to start Redis.
    /// Later they are an outage like any: a password changed under a
    /// running process is an operator's to mend, and its calls wait. Any
    /// other failure here is left to the calls that follow to report.
    /// Behind sentinels, the primary they name is asked (since the
    /// thirty-sixth session: a wrong node password was an outage, with the
    /// hint to start Redis, tried again for ever); sentinels that cannot
    /// be asked are left to the calls too.
    async fn first_contact(&self) -> Result<(), StoreError> {
        let nodes: Vec<deadpool_redis::Pool> = match &self.nodes {
            Nodes::Listed(nodes, _) => nodes.to_vec(),
            Nodes::Sentinel(sentinel) => match sentinel.primary_pool().await {
                Ok((_, pool)) => vec![pool],
                Err(_) => return Ok(()),
            },
        };
        let refused = |e: &RedisError| {
            protocol(format!(
                "Redis refused the credentials of redis_url ({e}): check its user and password"
            ))
        };
        for node in nodes.iter() {
            match node.get().await {
                Err(deadpool_redis::PoolError::Backend(e)) if credentials_refused(&e) => {
                    return Err(refused(&e));
                }
                Err(_) => continue,
                Ok(mut conn) => {
                    let pong: Result<String, RedisError> =
                        redis::cmd("PING").query_async(&mut *conn).await;
                    return match pong {
                        Err(e) if credentials_refused(&e) => Err(refused(&e)),
                        _ => Ok(()),
                    };
                }
            }
        }
        Ok(())
    }

    /// Hand out at most `bytes` of dependency results per claimed task
    /// (`limits.max_inputs_bytes`; [`DEFAULT_MAX_INPUTS_BYTES`] unless
    /// told): a task whose dependencies' results are more is claimed with
    /// none of them read and [`Claimed::oversized_inputs`] set.
    pub fn with_max_inputs_bytes(self, bytes: u64) -> RedisStore {
        self.max_inputs_bytes.store(bytes, Ordering::Relaxed);
        self
    }

    /// Have every job creation (and rejection record) wait until
    /// `replicas` replicas have it, at most `timeout`, before it returns:
    /// the caller acks the submission only then, so a failover to such a
    /// replica cannot lose an accepted job. Short of them the call fails
    /// as `Unavailable` (the job stays recorded on the primary; the
    /// submission goes back and finds it existing). Creations in flight
    /// share rounds: one task increments `<p>:replicated` on a connection
    /// of its own and sends `WAIT`, which covers every write Redis ran
    /// before that increment, for all who asked before the round began.
    /// 0 replicas: no waiting. Must be called in a tokio runtime.
    pub fn with_replica_wait(mut self, replicas: u32, timeout: Duration) -> RedisStore {
        if replicas == 0 {
            self.replica_wait = None;
            return self;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // The task's own copy has no replica wait: no cycle keeps it alive
        // once every other copy of the store is dropped.
        let rounds = RedisStore {
            replica_wait: None,
            claim_rounds: None,
            ..self.clone()
        };
        tokio::spawn(rounds.replica_rounds(replicas, timeout, rx));
        self.replica_wait = Some(ReplicaWait {
            replicas,
            requests: tx,
        });
        self
    }

    async fn replica_rounds(
        self,
        replicas: u32,
        timeout: Duration,
        mut requests: tokio::sync::mpsc::UnboundedReceiver<
            tokio::sync::oneshot::Sender<Result<(), StoreError>>,
        >,
    ) {
        match self.connected_replicas().await {
            Ok(connected) if connected < replicas => tracing::warn!(
                connected,
                redis_wait_replicas = replicas,
                "the Redis primary has fewer replicas than redis_wait_replicas asks for: \
                 submissions will wait in the broker, unanswered, until enough replicas \
                 connect (see INFO replication), or lower redis_wait_replicas"
            ),
            Ok(_) => {}
            // The first submission's wait will say what is wrong.
            Err(e) => tracing::debug!(error = %e, "cannot count the Redis replicas"),
        }
        let mut conn: Option<(MultiplexedConnection, u64)> = None;
        while let Some(first) = requests.recv().await {
            let mut waiting = vec![first];
            while let Ok(more) = requests.try_recv() {
                waiting.push(more);
            }
            let result = self.replica_round(&mut conn, replicas, timeout).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, waiting = waiting.len(), "replica wait failed");
            }
            for w in waiting {
                let _ = w.send(result.clone());
            }
        }
    }

    /// How many replicas the primary has online, in sync (`INFO
    /// replication`); `redis_wait_replicas` above it makes every
    /// submission wait.
    pub async fn connected_replicas(&self) -> Result<u32, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("INFO").arg("replication");
        let (info,): (String,) = self.run(&pipe).await?;
        replicas_in_info(&info)
            .ok_or_else(|| protocol("INFO replication has no connected_slaves line"))
    }

    /// One round: a write of its own, then `WAIT` on the same connection,
    /// a connection of its own (a `WAIT` holds up every call behind it)
    /// kept with the count of shared connections made before it. The
    /// round's connection must be to the primary the job creations went
    /// to: a shared connection made since (after an error, or the
    /// sentinels naming another primary) may be to another node, so the
    /// round connects again. (Not after too few replicas answered, which
    /// a long replica outage makes every round, each reconnect asking
    /// the sentinels: a primary that changed makes a new shared
    /// connection, which the next round sees.)
    async fn replica_round(
        &self,
        conn: &mut Option<(MultiplexedConnection, u64)>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let made = self.shared_made.load(Ordering::Relaxed);
        if conn.as_ref().is_some_and(|(_, at)| *at != made) {
            *conn = None;
        }
        let c = match conn {
            Some((c, _)) => c,
            None => &mut conn.insert((self.connect_primary(Use::Own).await?, made)).0,
        };
        let timeout_ms = timeout.as_millis().max(1) as u64;
        let deadline = tokio::time::Instant::now() + timeout;
        // In waits of at most `WAIT_STEP_MS`: the connection gives up on an
        // answer after 10 s, and a longer `WAIT` (redis_wait_timeout_ms
        // goes to a minute) was cut off there as a lost connection. A
        // `WAIT` again waits for the same write (the connection's last).
        let mut pipe = redis::pipe();
        pipe.cmd("INCR").arg(self.names.replicated_key()).ignore();
        pipe.cmd("WAIT")
            .arg(replicas)
            .arg(timeout_ms.min(WAIT_STEP_MS));
        loop {
            let acked: Result<(u32,), RedisError> = pipe.query_async(&mut *c).await;
            let acked = match acked {
                Ok((acked,)) if acked >= replicas => return Ok(()),
                Ok((acked,)) => acked,
                Err(e) => {
                    *conn = None;
                    return Err(unavailable(e));
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "{acked} of the {replicas} replicas redis_wait_replicas asks for \
                     acknowledged the write within {timeout_ms} ms (submissions wait until \
                     enough replicas are connected and in sync; see INFO replication)"
                )));
            }
            pipe = redis::pipe();
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg((left.as_millis().max(1) as u64).min(WAIT_STEP_MS));
        }
    }

    /// Wait for the replicas of [`Self::with_replica_wait`], if any.
    async fn replicated(&self) -> Result<(), StoreError> {
        let Some(wait) = &self.replica_wait else {
            return Ok(());
        };
        let stopped = || StoreError::Unavailable("the replica wait task stopped".into());
        let (tx, rx) = tokio::sync::oneshot::channel();
        wait.requests.send(tx).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// The epoch of the Redis data this store works on: a random number
    /// written once (`SET NX`) into `<prefix>:epoch`. A Redis restarted
    /// without persistence comes back without it; the next check notices,
    /// says so loudly, and starts a new epoch. Every job's fence counter
    /// starts at its epoch's base (`epoch << 20`), so fencing numbers handed
    /// out after a data loss never repeat one a worker may still hold.
    pub async fn check_epoch(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        // An answer that leaves the connection sound (`LOADING`, `BUSY`)
        // keeps it, as for every other command (see [`Self::classify`]).
        self.read_epoch(&mut conn)
            .await
            .map_err(|e| self.classify(e))
    }

    /// Read (and, on empty data, start) the epoch on `conn`, and remember
    /// it. Says so loudly when it changed.
    async fn read_epoch(&self, conn: &mut MultiplexedConnection) -> Result<u64, RedisError> {
        if self.read_only {
            // Neither started nor timed: a reader stamps no index entries,
            // and needs only to see a change of data (0: none yet).
            let current: Option<u64> = redis::cmd("GET")
                .arg(self.names.epoch_key())
                .query_async(conn)
                .await?;
            let current = current.unwrap_or(0);
            let known = self.epoch.swap(current, Ordering::SeqCst);
            if known != 0 && known != current {
                tracing::error!(
                    previous = known,
                    current,
                    "Redis lost its data (epoch changed): jobs recorded before are gone"
                );
            }
            return Ok(current);
        }
        let fresh: u64 = rand::random::<u32>() as u64 >> 1 | 1;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.names.epoch_key())
            .arg(fresh)
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(self.names.epoch_key());
        pipe.cmd("TIME");
        let sent = self.clock.local_ms();
        let (current, (secs, micros)): (u64, (u64, u64)) = pipe.query_async(conn).await?;
        self.clock
            .observe(sent, self.clock.local_ms(), secs, micros);
        let known = self.epoch.swap(current, Ordering::SeqCst);
        if known != 0 && known != current {
            // The new data has none of what this process noted.
            self.noted_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            tracing::error!(
                previous = known,
                current,
                "Redis lost its data (epoch changed): jobs recorded before are gone; \
                 task messages naming them will be dead-lettered (job_missing), and \
                 outcomes of claims made before will be rejected"
            );
        }
        Ok(current)
    }

    /// Now by Redis's clock (see [`RedisClock`]), for index scores. An
    /// offset older than [`clock::CLOCK_REFRESH_MS`] is measured again in the
    /// background (an epoch read); until then the last one stands.
    fn now_ms(&self) -> u64 {
        let local = self.clock.local_ms();
        if self.clock.claim_refresh(local) {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.check_epoch().await {
                    tracing::debug!(error = %e, "could not read Redis's clock; trying again later");
                }
                this.clock.refreshing.store(false, Ordering::Release);
            });
        }
        self.clock.at(local)
    }

    /// Pretend this host's clock runs `skew_ms` ahead of the system's
    /// (behind, if negative), and measure Redis's clock against it: how a
    /// test gives a process a wrong clock.
    pub async fn with_clock_skew(self, skew_ms: i64) -> Result<RedisStore, StoreError> {
        self.clock.skew_ms.store(skew_ms, Ordering::Relaxed);
        self.check_epoch().await?;
        Ok(self)
    }

    /// The call in hand was built for the data of epoch `built_for`; after
    /// a fresh connection found other data, it must not be sent.
    fn still_epoch(&self, built_for: Option<u64>) -> Result<(), StoreError> {
        match built_for {
            Some(built) if built != self.epoch.load(Ordering::SeqCst) => {
                Err(StoreError::Unavailable(format!(
                    "Redis lost its data (epoch {built} -> {}) while a call prepared \
                     for the old data was in hand; it was not sent",
                    self.epoch.load(Ordering::SeqCst)
                )))
            }
            _ => Ok(()),
        }
    }

    /// The names this store uses.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// A multiplexed connection shared by every call of this store.
    ///
    /// Checking a connection out of the pool for each call costs a round
    /// trip (deadpool-redis recycles with `UNWATCH` + `PING`), which doubled
    /// the hot path's Redis calls. A multiplexed connection pipelines
    /// concurrent callers by itself, so one is kept and cloned; it is
    /// dropped on the first transport error and the next call takes a fresh
    /// one from the pool.
    ///
    /// One call at a time makes it again; the calls that found it gone
    /// meanwhile wait, and take the connection it made or its failure:
    /// each making its own, as before the thirty-third session, a
    /// dispatcher with hundreds of calls in flight opened as many (behind
    /// Sentinel, each asking every sentinel first) at every failover. A
    /// call that comes after a failed attempt tries again itself.
    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(c) = self.shared_conn() {
            return Ok(c);
        }
        let before = self.reconnects.load(Ordering::Acquire);
        let mut last_failure = self.reconnect.lock().await;
        if let Some(c) = self.shared_conn() {
            return Ok(c);
        }
        if self.reconnects.load(Ordering::Acquire) != before
            && let Some(e) = last_failure.as_ref()
        {
            return Err(e.clone());
        }
        let made = async {
            let mut conn = self.connect_primary(Use::Shared).await?;
            // A fresh connection may lead to a Redis that restarted without
            // its data since the last call: note its epoch now, so a command
            // built for the old one (a new job's fence base) is not sent.
            self.read_epoch(&mut conn).await.map_err(epoch_error)?;
            Ok::<_, StoreError>(conn)
        };
        let made = made.await;
        // Counted once it is over, under the lock: a call that read the
        // count before this attempt ended waited for it.
        self.reconnects.fetch_add(1, Ordering::AcqRel);
        match made {
            Ok(conn) => {
                *last_failure = None;
                *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
                self.shared_made.fetch_add(1, Ordering::Relaxed);
                Ok(conn)
            }
            Err(e) => {
                *last_failure = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The shared connection, if there is one now.
    fn shared_conn(&self) -> Option<MultiplexedConnection> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new connection to the primary, for `for_use`: with one node, that
    /// node; with several, the first that says it is the primary, starting
    /// from the one that did last; with sentinels, the node they name.
    async fn connect_primary(&self, for_use: Use) -> Result<MultiplexedConnection, StoreError> {
        let (nodes, primary) = match &self.nodes {
            Nodes::Listed(nodes, primary) => (nodes, primary),
            Nodes::Sentinel(sentinel) => return sentinel.connect_primary(for_use).await,
        };
        let n = nodes.len();
        let start = primary.load(Ordering::Relaxed) % n.max(1);
        let mut refused = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let mut conn = match nodes[i].get().await {
                Ok(pooled) => deadpool_redis::Connection::take(pooled),
                Err(e) if n == 1 => {
                    return Err(StoreError::Unavailable(format!("no redis connection: {e}")));
                }
                Err(e) => {
                    refused.push(format!("node {}: {e}", i + 1));
                    continue;
                }
            };
            if n > 1 {
                match is_primary(&mut conn).await {
                    Ok(true) => {}
                    Ok(false) => {
                        refused.push(format!("node {}: a replica", i + 1));
                        continue;
                    }
                    // A reading command takes the first node that answers:
                    // a replica reads as well.
                    Err(StoreError::NotAllowed(_)) if self.read_only => {}
                    Err(StoreError::NotAllowed(e)) => {
                        return Err(StoreError::NotAllowed(format!("node {}: {e}", i + 1)));
                    }
                    Err(e) => {
                        refused.push(format!("node {}: {}", i + 1, e.detail()));
                        continue;
                    }
                }
                if primary.swap(i, Ordering::Relaxed) != i {
                    tracing::info!(node = i + 1, "Redis primary is node {} of redis_url", i + 1);
                }
            }
            return Ok(conn);
        }
        Err(no_primary(&refused))
    }

    /// Up to `limit` entries of a schedule index (`<p>:retries`,
    /// `<p>:leases`) whose time has come, earliest first. An entry that is
    /// not even UTF-8 (another program's) is removed here and not returned:
    /// read as a string, it failed the read as a conversion error, taken
    /// for an outage, at every pass (thirty-fourth session).
    async fn due_entries(
        &self,
        index: String,
        now: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(&index)
            .arg("-inf")
            .arg(now)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        // Read again once after removing some: a batch of them alone would
        // read as a schedule with nothing due, ending the pass early.
        for _ in 0..2 {
            let (entries,): (Vec<Vec<u8>>,) = self.run(&pipe).await?;
            let (due, foreign) = text_members(entries.into_iter().map(|e| (e, ())));
            let due: Vec<String> = due.into_iter().map(|(e, ())| e).collect();
            let only_foreign = due.is_empty() && !foreign.is_empty();
            self.forget_foreign(&index, foreign).await?;
            if !only_foreign {
                return Ok(due);
            }
        }
        Ok(Vec::new())
    }

    /// Remove index entries that are not UTF-8 (not Conveyor's), if any
    /// (and if this store writes at all).
    async fn forget_foreign(
        &self,
        index: impl AsRef<str>,
        foreign: Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        if foreign.is_empty() || self.read_only {
            return Ok(());
        }
        let index = index.as_ref();
        tracing::warn!(index = %index, entries = foreign.len(),
            "index entries that are not UTF-8 (not Conveyor's); removed");
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(index).arg(foreign).ignore();
        self.run::<()>(&pipe).await
    }

    /// Move `entry` of a schedule index to `at` (ms), if it is still there
    /// (`XX`: a forgotten entry is not brought back).
    async fn rescore(&self, index: String, at: u64, entry: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(index)
            .arg("XX")
            .arg(at)
            .arg(entry)
            .ignore();
        self.run::<()>(&pipe).await
    }

    /// After a sweep's call on one schedule entry failed: if the store is
    /// unreachable, the error (the pass ends, the entry stays due). If the
    /// store answered something this code cannot act on (a job record
    /// another version wrote, a corrupt hash, a script error), the entry
    /// alone is moved [`BROKEN_ENTRY_RECHECK`] on, logged, and the pass goes
    /// on: as the earliest due it would otherwise end every pass before
    /// any lapsed lease behind it was reclaimed.
    async fn set_aside(
        &self,
        index: String,
        entry: &str,
        err: StoreError,
    ) -> Result<(), StoreError> {
        if err.is_retryable() {
            return Err(err);
        }
        tracing::error!(%entry, error = %err, recheck_in = ?BROKEN_ENTRY_RECHECK,
            "schedule entry the store cannot act on; set aside");
        let at = self.now_ms() + BROKEN_ENTRY_RECHECK.as_millis() as u64;
        self.rescore(index, at, entry).await
    }

    /// Drop `entries` from a schedule index, each only if its score is
    /// still at most `read_at` (when the sweep read them as due, by the
    /// clock the index is scored with).
    async fn forget_due(
        &self,
        index: String,
        entries: &[String],
        read_at: u64,
    ) -> Result<(), StoreError> {
        self.call_due(Script::ForgetDue, index, read_at, None, entries)
            .await
    }

    /// Move `entries` of a schedule index `pause` on from now, each only
    /// if its score is still at most `read_at` (`defer_due.lua`).
    async fn defer_due(
        &self,
        index: String,
        entries: &[String],
        read_at: u64,
        pause: Duration,
    ) -> Result<(), StoreError> {
        let to = self.now_ms() + pause.as_millis() as u64;
        self.call_due(Script::DeferDue, index, read_at, Some(to), entries)
            .await
    }

    /// One call of a script over entries of schedule index `index` still
    /// due as read at `read_at` (`forget_due.lua`, `defer_due.lua`), with
    /// the script's own argument `arg` before the entries, if any.
    async fn call_due(
        &self,
        script: Script,
        index: String,
        read_at: u64,
        arg: Option<u64>,
        entries: &[String],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let call = pipe
            .cmd("FCALL")
            .arg(&self.functions[script as usize])
            .arg(1)
            .arg(index)
            .arg(read_at);
        if let Some(arg) = arg {
            call.arg(arg);
        }
        call.arg(entries).ignore();
        self.run::<()>(&pipe).await
    }

    /// The key of schedule index `index`.
    fn index_key(&self, index: ScheduleIndex) -> String {
        match index {
            ScheduleIndex::Leases => self.names.leases(),
            ScheduleIndex::Retries => self.names.retries(),
        }
    }

    fn drop_shared(&self) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Load the function library (`REPLACE`: loading the same library
    /// again is a no-op). Needs Redis 7.0 or later.
    async fn load_library(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let lib = library();
        let name: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&lib.source)
            .query_async(&mut conn)
            .await
            .map_err(|e| match e.kind() {
                _ if is_transient_server_error(&e) => unavailable(e),
                redis::ErrorKind::Server(_) => protocol(format!(
                    "loading the function library {}: {e} (Conveyor needs Redis 7.0 or later)",
                    lib.name
                )),
                _ => unavailable(e),
            })?;
        if name != lib.name {
            return Err(protocol(format!(
                "function library: Redis names it {name}, this build {}",
                lib.name
            )));
        }
        Ok(())
    }

    /// `FCALL` of `script` on `job`'s hash and history; the caller adds
    /// the arguments.
    fn fcall(&self, script: Script, job: &str) -> Cmd {
        self.fcall_sized(script, job, 0, 0)
    }

    /// [`Self::fcall`] with room for `args` more arguments of `data` bytes.
    fn fcall_sized(&self, script: Script, job: &str, args: usize, data: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(5 + args, 160 + data);
        cmd.arg("FCALL")
            .arg(&self.functions[script as usize])
            .arg(2)
            .arg(self.names.job_key(job))
            .arg(self.names.history_key(job));
        cmd
    }

    /// A pipeline of `cmd` (which records job `id`) and the job's entry in
    /// the index of recent jobs ([`Self::add_index_entry`]). One reply:
    /// `cmd`'s.
    fn indexed(&self, cmd: redis::Cmd, id: &str) -> Pipeline {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        self.add_index_entry(&mut pipe, id);
        pipe
    }

    /// Job `id`'s entry in the index of recent jobs: another slot than the
    /// job's, so its own command, sent in the same round trip; NX, so an
    /// existing job keeps its place. No reply.
    fn add_index_entry(&self, pipe: &mut Pipeline, id: &str) {
        pipe.cmd("ZADD")
            .arg(self.names.jobs_index())
            .arg("NX")
            .arg(self.now_ms())
            .arg(id)
            .ignore();
    }

    /// The creation of `job` for `epoch`'s fence base
    /// ([`Self::index_creation`] of a create call). One reply: the
    /// create's.
    fn create_pipeline<'j>(&self, job: &'j PlannedJob, epoch: u64) -> (Pipeline, Vec<&'j str>) {
        let mut pipe = redis::pipe();
        let create = self.create_command(Script::Create, job, epoch);
        let new_queues = self.index_creation(&mut pipe, create, job);
        (pipe, new_queues)
    }

    /// `create` (a call that records `job`) added to `pipe` after the job's
    /// index entry ([`Self::add_index_entry`]) and the queues this process
    /// has not noted yet (returned, to note once the pipeline ran). One
    /// reply: `create`'s.
    ///
    /// The index entry first: a stream of writes cut between the two (a
    /// failover to a replica, a crash under `appendfsync everysec`) then
    /// leaves an entry without its job, which `list` skips and the audit
    /// reads as nothing to do, never a job without its entry, which the
    /// audit (it walks the index) could not find, its ready tasks left
    /// without a message for good. And again after (`NX`: it changes
    /// nothing if still there): a `list` or a prune that met the entry
    /// while a large create was still arriving (Redis serves other
    /// clients between the reads of one command) removed it as an
    /// expired job's.
    fn index_creation<'j>(
        &self,
        pipe: &mut Pipeline,
        create: Cmd,
        job: &'j PlannedJob,
    ) -> Vec<&'j str> {
        self.add_index_entry(pipe, &job.id);
        let new_queues: Vec<&str> = {
            // A job names few distinct queues (most only `default`).
            let mut named: Vec<&str> = Vec::new();
            for t in &job.tasks {
                if !named.contains(&t.queue.as_str()) {
                    named.push(&t.queue);
                }
            }
            let noted = self.noted_queues.lock().unwrap_or_else(|p| p.into_inner());
            named.retain(|q| !noted.contains(*q));
            named
        };
        if !new_queues.is_empty() {
            pipe.cmd("SADD")
                .arg(self.names.queues_key())
                .arg(&new_queues)
                .ignore();
        }
        pipe.add_command(create);
        self.add_index_entry(pipe, &job.id);
        new_queues
    }

    fn note_queues(&self, queues: &[&str]) {
        if !queues.is_empty() {
            let mut noted = self.noted_queues.lock().unwrap_or_else(|p| p.into_inner());
            noted.extend(queues.iter().map(|q| (*q).to_owned()));
        }
    }

    /// Send claims as they come, in rounds: with [`CLAIM_ROUNDS_OUT`]
    /// rounds out, the next takes every claim that arrived meanwhile (up to
    /// [`CLAIM_ROUND_MAX`]), so a lone claim goes at once and a burst (a
    /// fan-out's children, delivered together) shares round trips and
    /// script calls. Ends when every other copy of the store is dropped.
    async fn claim_rounds(self, mut requests: tokio::sync::mpsc::UnboundedReceiver<ClaimRequest>) {
        let out = Arc::new(tokio::sync::Semaphore::new(CLAIM_ROUNDS_OUT));
        while let Some(first) = requests.recv().await {
            let Ok(permit) = out.clone().acquire_owned().await else {
                return;
            };
            let mut round = vec![first];
            while round.len() < CLAIM_ROUND_MAX {
                match requests.try_recv() {
                    Ok(more) => round.push(more),
                    Err(_) => break,
                }
            }
            let this = self.clone();
            tokio::spawn(async move {
                this.claim_round(round).await;
                drop(permit);
            });
        }
    }

    /// One round: every claim's lease entry, then one claim call per job
    /// (and worker and lease) for all of its claims in the round, in one
    /// pipeline. Lease entries first: a crash between leaves an index
    /// entry the sweep drops, never a claim the sweep cannot find. `GT`:
    /// an existing entry (a sweep's unfinished re-queue of this attempt, a
    /// handed-back claim's) is kept, and moved to this claim's expiry if
    /// that is later, so a sweep that read it as due and is about to
    /// forget it finds it no longer due and leaves it (see
    /// [`Store::forget_leases`]).
    async fn claim_round(&self, round: Vec<ClaimRequest>) {
        self.claim_rounds_sent.fetch_add(1, Ordering::Relaxed);
        let mut pipe = redis::pipe();
        // Each call's error its own (see `claim_replies`): a round fails
        // whole only when Redis cannot be reached.
        pipe.ignore_errors();
        // The requests of each call (places in the round), in round order.
        let mut calls: Vec<Vec<usize>> = Vec::new();
        let mut call_of: std::collections::HashMap<(&str, &str, u64), usize> =
            std::collections::HashMap::with_capacity(round.len());
        // The score each claim's lease entry is given.
        let mut expiries = Vec::with_capacity(round.len());
        for (k, r) in round.iter().enumerate() {
            let expiry = self.now_ms() + r.lease_ms;
            expiries.push(expiry);
            self.add_lease_entry(&mut pipe, &r.task, expiry);
            let key = (r.task.job.as_str(), r.worker.as_str(), r.lease_ms);
            match call_of.get(&key) {
                Some(&c) => calls[c].push(k),
                None => {
                    call_of.insert(key, calls.len());
                    calls.push(vec![k]);
                }
            }
        }
        for call in &calls {
            let first = &round[call[0]];
            let mut cmd = self.fcall_sized(Script::Claim, &first.task.job, 3 + 3 * call.len(), 0);
            cmd.arg(&first.worker)
                .arg(first.lease_ms)
                .arg(self.max_inputs_bytes.load(Ordering::Relaxed));
            for &k in call {
                let r = &round[k];
                cmd.arg(r.task.idx).arg(r.task.attempt).arg(r.token);
            }
            pipe.add_command(cmd);
        }
        let mut values = self.run_claims::<Vec<redis::Value>>(&pipe, None).await;
        // Sent with `ignore_errors`, a pipeline comes back whole even when
        // Redis lost the function library: load it and send the round
        // again (no claim ran). The lease entries' answers are the first
        // sending's, which added them (the second finds them there).
        if let Ok(first) = &mut values
            && first.iter().any(is_lost_library)
        {
            let entries: Vec<redis::Value> = first.drain(..round.len().min(first.len())).collect();
            values = match self.load_library().await {
                Ok(()) => self.run::<Vec<redis::Value>>(&pipe).await,
                Err(e) => Err(e),
            };
            if let Ok(second) = &mut values {
                for (slot, entry) in second.iter_mut().zip(entries) {
                    *slot = entry;
                }
            }
        }
        let replies = values
            .and_then(|values| claim_replies(values, round.len(), &calls, |e| self.classify(e)));
        match replies {
            Ok(replies) => {
                for ((r, (added, reply)), expiry) in round.into_iter().zip(replies).zip(expiries) {
                    let outcome = match reply {
                        Ok(reply) => self.claim_outcome(&r.task, added, expiry, &reply).await,
                        Err(e) => {
                            // No claim was made: the entry it added goes,
                            // as a refused claim's does.
                            if added == 1 {
                                let entry = entry(&r.task.job, r.task.idx, r.task.attempt);
                                let _ = self.forget_leases(&[entry], expiry).await;
                            }
                            Err(e)
                        }
                    };
                    let _ = r.answer.send(outcome);
                }
            }
            Err(e) => {
                for r in round {
                    let _ = r.answer.send(Err(e.clone()));
                }
            }
        }
    }

    /// How many claim rounds this store (and its copies) sent: against
    /// the claims made, how well claims that arrive together are batched.
    pub fn claim_rounds_sent(&self) -> u64 {
        self.claim_rounds_sent.load(Ordering::Relaxed)
    }

    /// Drop the lease entries of `claims` whose attempts the job records
    /// show over, whatever their scores: no later claim can take such an
    /// attempt, so none owns its entry (a live claim's entry is scored at
    /// its expiry, later than now, so comparing with now kept every one of
    /// them, for the sweep to reclaim a lease later one by one). A claim
    /// whose task is still `running` or `ready` at its attempt had its
    /// outcome applied on a server that lost it since (a failover): its
    /// entry, which the audit of the new server put back or kept, is the
    /// sweep's only way to the task, and stays.
    async fn forget_finished_claims(&self, claims: &[ClaimRef]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for c in claims {
            pipe.cmd("HMGET")
                .arg(self.names.job_key(&c.job))
                .arg(format!("s:{}", c.idx))
                .arg(format!("a:{}", c.idx));
        }
        let records: Vec<(Option<String>, Option<u32>)> = self.run(&pipe).await?;
        let over: Vec<String> = claims
            .iter()
            .zip(records)
            .filter(|(c, (state, attempt))| {
                let open = matches!(state.as_deref(), Some("running" | "ready"));
                !(open && *attempt == Some(c.attempt))
            })
            .map(|(c, _)| entry(&c.job, c.idx, c.attempt))
            .collect();
        if over.len() < claims.len() {
            tracing::warn!(
                kept = claims.len() - over.len(),
                "finished attempts the store shows unfinished (it lost writes): their lease entries stay for the sweep"
            );
        }
        self.forget_leases(&over, u64::MAX).await
    }

    /// The lease entry of a claim of `task` (one reply: whether it was
    /// added); see [`Self::claim_round`].
    fn add_lease_entry(&self, pipe: &mut Pipeline, task: &TaskMessage, expiry: u64) {
        pipe.cmd("ZADD")
            .arg(self.names.leases())
            .arg("GT")
            .arg(expiry)
            .arg(entry(&task.job, task.idx, task.attempt));
    }

    /// What a claim round's replies say of one claim. A claim that is not
    /// ours drops the lease entry if it added it; one that was there
    /// before belongs to someone else (a live claim, or a sweep still
    /// re-queueing this attempt) and stays.
    async fn claim_outcome(
        &self,
        task: &TaskMessage,
        added: i64,
        expiry: u64,
        reply: &Reply,
    ) -> Result<ClaimOutcome, StoreError> {
        let outcome = match field(reply, 0) {
            "claimed" => {
                let spec = RunSpec::decode(field(reply, 2))?;
                let mut deps = BTreeMap::new();
                let oversized_inputs = match field(reply, 6) {
                    "" => None,
                    _ => Some(OversizedInputs {
                        deps: num(reply, 7, "dependencies")?,
                        bytes: num(reply, 6, "inputs bytes")?,
                        limit: self.max_inputs_bytes.load(Ordering::Relaxed),
                    }),
                };
                let mut k = 7;
                while k + 1 < reply.len() {
                    let value: Value =
                        serde_json::from_str(field(reply, k + 1)).unwrap_or(Value::Null);
                    deps.insert(field(reply, k).to_owned(), value);
                    k += 2;
                }
                return Ok(ClaimOutcome::Claimed(Box::new(Claimed {
                    claim: ClaimRef {
                        job: task.job.clone(),
                        idx: task.idx,
                        attempt: task.attempt,
                        fence: num(reply, 1, "fence")?,
                    },
                    handler: spec.handler.to_owned(),
                    params_json: spec.params_json.to_owned(),
                    max_attempts: num(reply, 3, "max attempts")?,
                    timeout: Duration::from_millis(spec.timeout_ms),
                    task: field(reply, 4).to_owned(),
                    backoff: (spec.backoff_base_ms, spec.backoff_cap_ms),
                    deps,
                    oversized_inputs,
                })));
            }
            "busy" => ClaimOutcome::Busy,
            "stale" => ClaimOutcome::Stale,
            "missing" => ClaimOutcome::Missing,
            // Not made (see `claim.lua`): refused for good, as a script
            // error on a corrupt record is.
            "unusable" => {
                let why = protocol(field(reply, 1).to_owned());
                if added == 1 {
                    self.forget_leases(&[entry(&task.job, task.idx, task.attempt)], expiry)
                        .await?;
                }
                return Err(why);
            }
            other => return Err(protocol(format!("claim answered {other:?}"))),
        };
        if added == 1 && !matches!(outcome, ClaimOutcome::Busy) {
            // Only as this claim left it: a claim of the same attempt taken
            // since (the task offered again in between, after the store lost
            // a promotion) raised it to its own expiry and owns it now.
            self.forget_leases(&[entry(&task.job, task.idx, task.attempt)], expiry)
                .await?;
        }
        Ok(outcome)
    }

    /// [`Self::run_for_epoch`] of a pipeline that claims, sent again while
    /// it fails for a reason a retry can help, for a few seconds
    /// ([`CLAIM_RESEND_WAITS`]): the claim may have run with only its
    /// answer lost (a reply past the response time-out, a connection lost
    /// after the request went out and none to be had at once), and sent
    /// again with its token it is answered with the claim it made
    /// (`claim.lua`). Given up, its caller gives the message back, and a
    /// claim made then runs nowhere until its lease lapses: an attempt
    /// spent.
    async fn run_claims<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
        built_for: Option<u64>,
    ) -> Result<T, StoreError> {
        let mut result = self.run_for_epoch(pipe, built_for).await;
        for wait in CLAIM_RESEND_WAITS {
            match &result {
                Err(e) if e.is_retryable() && self.still_epoch(built_for).is_ok() => {
                    tracing::debug!(error = %e, ?wait, "a claim call failed; sending it again");
                    tokio::time::sleep(wait).await;
                    result = self.run_for_epoch(pipe, built_for).await;
                }
                _ => break,
            }
        }
        result
    }

    /// Run a pipeline; if Redis no longer has the library (restarted
    /// without its data), load it and run the pipeline once more.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        self.run_for_epoch(pipe, None).await
    }

    /// [`Self::run`] of a pipeline built for the data of one epoch (it
    /// carries fence numbers based on it): not sent if, by the time a
    /// connection is in hand, Redis turned out to hold other data.
    ///
    /// The answer is received whole first and converted after: a reply
    /// Conveyor cannot read as `T` (a record something else wrote, with
    /// bytes that are not UTF-8) is a protocol error on a sound connection,
    /// which a retry would only meet again. Converted while received,
    /// redis-rs reported it as it reports a garbled stream (`Parse`), an
    /// outage: the connection was made again, and a sweep meeting such a
    /// record first ended every pass there.
    async fn run_for_epoch<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
        built_for: Option<u64>,
    ) -> Result<T, StoreError> {
        let answer = self.answer_for_epoch(pipe, built_for).await?;
        redis::from_redis_value(answer)
            .map_err(|e| protocol(format!("Redis answered what Conveyor cannot read: {e}")))
    }

    /// [`Self::run_for_epoch`]'s answer, not yet converted.
    async fn answer_for_epoch(
        &self,
        pipe: &Pipeline,
        built_for: Option<u64>,
    ) -> Result<redis::Value, StoreError> {
        let mut conn = self.conn().await?;
        self.still_epoch(built_for)?;
        match pipe.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) if is_function_missing(&e) => {
                drop(conn);
                self.load_library().await?;
                let mut conn = self.conn().await?;
                self.still_epoch(built_for)?;
                pipe.query_async(&mut conn)
                    .await
                    .map_err(|e| self.classify(e))
            }
            Err(e) if e.is_connection_dropped() => {
                // The shared connection died (Redis restarted, or the network
                // dropped it): once more on a fresh one. Every transition is
                // safe to repeat — a repeated claim is answered with the
                // claim its token made (`claim.lua`), a repeated completion answers
                // `duplicate` with the same follow-ups, a repeated release
                // leaves its re-offer to the sweep.
                self.drop_shared();
                let mut conn = self.conn().await?;
                self.still_epoch(built_for)?;
                pipe.query_async(&mut conn)
                    .await
                    .map_err(|e| self.classify(e))
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    /// What an error Redis answered means: a server error known to be
    /// permanent (a script's `ERR`, `NOSCRIPT`, `WRONGTYPE`, ...; see
    /// [`is_permanent_server_error`]) is a defect no retry cures; anything else is an outage (see
    /// [`is_transient_server_error`]), after which the shared connection is
    /// dropped (after a failover the primary is another node, or behind
    /// one address another server: the next call connects afresh) unless
    /// the server's answer shows the connection is sound
    /// ([`keeps_the_connection`]).
    fn classify(&self, e: RedisError) -> StoreError {
        if is_permanent_server_error(&e) {
            return protocol(e.to_string());
        }
        if !keeps_the_connection(&e) {
            self.drop_shared();
        }
        unavailable(e)
    }

    async fn call(&self, cmd: Cmd) -> Result<Reply, StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let (reply,): (Reply,) = self.run(&pipe).await?;
        Ok(reply)
    }

    /// The create script's call: requestor, writer, then every field of
    /// the job hash as field/value pairs, written straight into the command.
    /// A 10,000-task job has 130,000 fields; building them as owned strings
    /// first cost more than parsing the job (allocation dominated `perf`).
    fn create_command(&self, script: Script, job: &PlannedJob, epoch: u64) -> Cmd {
        let data: usize = job
            .tasks
            .iter()
            .map(|t| {
                160 + t.name.len()
                    + t.handler.len()
                    + t.queue.len()
                    + t.params_json.len()
                    + 8 * (t.deps.len() + t.dependents.len())
            })
            .sum();
        let mut cmd = self.fcall_sized(
            script,
            &job.id,
            36 + 28 * job.tasks.len(),
            512 + job.labels_json.len() + data,
        );
        cmd.arg(&job.requestor).arg(&self.by);
        let n = job.tasks.len();
        cmd.arg("id").arg(&job.id);
        cmd.arg("st").arg(JobState::Pending.as_str());
        cmd.arg("req").arg(&job.requestor);
        cmd.arg("lab").arg(&job.labels_json);
        cmd.arg("n").arg(n).arg("open").arg(n);
        cmd.arg("ret").arg(self.retention_ms);
        cmd.arg("fence").arg(epoch << 20);
        // One buffer for every field name and index list.
        let mut buf = String::with_capacity(64);
        fn name(buf: &mut String, prefix: &str, i: usize) {
            buf.clear();
            let _ = write!(buf, "{prefix}:{i}");
        }
        for (i, t) in job.tasks.iter().enumerate() {
            let ready = t.deps.is_empty();
            name(&mut buf, "nm", i);
            cmd.arg(buf.as_str()).arg(&t.name);
            name(&mut buf, "q", i);
            cmd.arg(buf.as_str()).arg(&t.queue);
            name(&mut buf, "x", i);
            cmd.arg(buf.as_str()).arg(RunSpec::encode(t));
            if !t.deps.is_empty() {
                name(&mut buf, "af", i);
                cmd.arg(buf.as_str()).arg(join_indexes(&mut buf, &t.deps));
                name(&mut buf, "dl", i);
                cmd.arg(buf.as_str()).arg(t.deps.len());
            }
            if !t.dependents.is_empty() {
                name(&mut buf, "dp", i);
                cmd.arg(buf.as_str())
                    .arg(join_indexes(&mut buf, &t.dependents));
            }
            let state = if ready {
                TaskState::Ready
            } else {
                TaskState::Waiting
            };
            name(&mut buf, "s", i);
            cmd.arg(buf.as_str()).arg(state.as_str());
            name(&mut buf, "a", i);
            cmd.arg(buf.as_str()).arg(if ready { "1" } else { "0" });
            name(&mut buf, "ma", i);
            cmd.arg(buf.as_str()).arg(t.max_attempts);
        }
        cmd
    }

    /// [`Self::run`] of a pipeline whose calls answer each for itself
    /// (`ignore_errors`): its `expected` replies (commands not ignored), a
    /// server error in the place of a call that failed. Sent again once the
    /// function library is loaded if Redis lost it. `what` names the call.
    async fn run_each(
        &self,
        pipe: &Pipeline,
        expected: usize,
        what: &str,
    ) -> Result<Vec<redis::Value>, StoreError> {
        let mut values: Vec<redis::Value> = self.run(pipe).await?;
        if values.iter().any(is_lost_library) {
            self.load_library().await?;
            values = self.run(pipe).await?;
        }
        if values.len() != expected {
            return Err(protocol(format!(
                "{what} of {expected} had {} replies",
                values.len()
            )));
        }
        Ok(values)
    }

    /// Remove from the job index the entries `(id, score)` found with no
    /// job key, and say how many stay removed. A job created under such an
    /// id between that look and the `ZREM` (an expired id used again)
    /// found the entry there (its `ZADD NX` did nothing) and would lose it
    /// to the `ZREM`: out of `list`, and out of the audit after a
    /// failover. So each is looked at again after, and put back as it was
    /// if its job key is there now. A read-only store removes none.
    async fn forget_index_entries(&self, gone: &[(&str, u64)]) -> Result<usize, StoreError> {
        if gone.is_empty() || self.read_only {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM")
            .arg(self.names.jobs_index())
            .arg(gone.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .ignore();
        for (id, _) in gone {
            pipe.cmd("EXISTS").arg(self.names.job_key(id));
        }
        let created_since: Vec<bool> = self.run(&pipe).await?;
        let mut back = redis::pipe();
        let mut removed = gone.len();
        for ((id, score), created) in gone.iter().zip(created_since) {
            if created {
                back.cmd("ZADD")
                    .arg(self.names.jobs_index())
                    .arg("NX")
                    .arg(score)
                    .arg(id)
                    .ignore();
                removed -= 1;
            }
        }
        if removed < gone.len() {
            self.run::<()>(&back).await?;
        }
        Ok(removed)
    }

    /// The audit of the jobs `ids` (see [`Store::audit_jobs`]).
    async fn audit_ids(&self, ids: &[&str]) -> Result<AuditPage, StoreError> {
        let mut page = AuditPage {
            jobs: ids.len(),
            ..AuditPage::default()
        };
        if ids.is_empty() {
            return Ok(page);
        }
        // Each call's error its own: one record the script fails on (or
        // whose answer does not parse) is skipped and counted, and the
        // audit goes on with the others; failing the page on it would end
        // every audit of the deployment at that job.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in ids {
            pipe.add_command(self.fcall(Script::Audit, id));
        }
        let values = self.run_each(&pipe, ids.len(), "an audit").await?;
        for (id, value) in ids.iter().zip(values) {
            let wanted = match value {
                redis::Value::ServerError(e) => Err(self.classify(e.into())),
                value => redis::from_redis_value::<Reply>(value)
                    .map_err(|e| protocol(format!("audit answered {e}")))
                    .and_then(|reply| audit_entries(id, &reply)),
            };
            match wanted {
                Ok(wanted) => page.wanted.extend(wanted),
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "the audit cannot act on this job's record (corrupt, or written by another version); skipping it");
                    page.unusable += 1;
                }
            }
        }
        if page.wanted.is_empty() {
            return Ok(page);
        }
        let mut pipe = redis::pipe();
        for e in &page.wanted {
            let index = self.index_key(e.index);
            // Added, or raised to the wanted time: see `Store::audit_jobs`.
            pipe.cmd("ZADD")
                .arg(index)
                .arg("GT")
                .arg(e.at_ms)
                .arg(&e.entry);
        }
        let added: Vec<usize> = self.run(&pipe).await?;
        page.added = added.iter().sum();
        Ok(page)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_job(&self, job: &PlannedJob) -> Result<Created, StoreError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let (pipe, new_queues) = self.create_pipeline(job, epoch);
        let (reply,): (Reply,) = self.run_for_epoch(&pipe, Some(epoch)).await?;
        self.note_queues(&new_queues);
        self.replicated().await?;
        created_from(job, &reply)
    }

    async fn create_job_and_claim(
        &self,
        job: &PlannedJob,
        root: u32,
        worker: &str,
        lease: Duration,
    ) -> Result<(Created, ClaimOutcome), StoreError> {
        // One round trip: the lease entry (first, as for any claim) and the
        // creation's index entry, then one call that creates and claims.
        let epoch = self.epoch.load(Ordering::SeqCst);
        let task = job.task_message(root);
        let lease_ms = lease.as_millis() as u64;
        let mut pipe = redis::pipe();
        let expiry = self.now_ms() + lease_ms;
        self.add_lease_entry(&mut pipe, &task, expiry);
        let mut create = self.create_command(Script::CreateClaim, job, epoch);
        create
            .arg(task.idx)
            .arg(task.attempt)
            .arg(rand::random::<u64>())
            .arg(worker)
            .arg(lease_ms)
            .arg(self.max_inputs_bytes.load(Ordering::Relaxed))
            .arg(&task.queue);
        let new_queues = self.index_creation(&mut pipe, create, job);
        let (added, (created, claimed)): (i64, (Reply, Reply)) =
            self.run_claims(&pipe, Some(epoch)).await?;
        self.note_queues(&new_queues);
        let created = created_from(job, &created)?;
        let outcome = match self.claim_outcome(&task, added, expiry, &claimed).await {
            Ok(outcome) => outcome,
            // A recorded root the store could not claim (its record
            // unusable): not run here, but published with the job's other
            // ready tasks, whose worker meets the same refusal and
            // dead-letters the message with the reason. An error here
            // would leave the job recorded and its ready tasks unpublished.
            Err(e) if field(&claimed, 0) == "unusable" => {
                tracing::error!(job = %job.id, error = %e, "root task's record unusable; not claimed");
                ClaimOutcome::Stale
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = self.replicated().await {
            // Short of replicas the submission goes back; the root claimed
            // is handed back too, ready for the redelivery to claim again
            // (else it would wait for its lease to lapse).
            if let ClaimOutcome::Claimed(c) = &outcome
                && let Err(release) = self.release(&c.claim, worker).await
            {
                tracing::debug!(error = %release, "root claim left to lapse");
            }
            return Err(e);
        }
        Ok((created.without_claimed(root, &outcome), outcome))
    }

    async fn record_rejected(&self, rejection: &Rejection) -> Result<bool, StoreError> {
        let mut cmd = self.fcall(Script::Reject, &rejection.id);
        cmd.arg(&rejection.id)
            .arg(&rejection.requestor)
            .arg(&rejection.error)
            .arg(self.retention_ms)
            .arg(&self.by);
        let pipe = self.indexed(cmd, &rejection.id);
        let (recorded,): (i64,) = self.run(&pipe).await?;
        self.replicated().await?;
        Ok(recorded == 1)
    }

    /// Claims are sent in rounds (see `RedisStore::claim_rounds`): the
    /// answer comes when the round that took this claim has run. A copy of
    /// the store without the round task (the task's own) runs a round of
    /// one itself.
    async fn claim(
        &self,
        task: &TaskMessage,
        worker: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let request = ClaimRequest {
            task: task.clone(),
            worker: worker.to_owned(),
            lease_ms: lease.as_millis() as u64,
            token: rand::random(),
            answer,
        };
        match &self.claim_rounds {
            Some(rounds) => {
                if let Err(unsent) = rounds.send(request) {
                    self.claim_round(vec![unsent.0]).await;
                }
            }
            None => self.claim_round(vec![request]).await,
        }
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the claim round ended without an answer".to_owned(),
            ))
        })
    }

    async fn renew(&self, claims: &[ClaimRef], lease: Duration) -> Result<Vec<bool>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let lease_ms = lease.as_millis() as u64;
        // Each claim's error its own: a record the script cannot act on (a
        // job key of another type) failing the whole call would leave every
        // other claim of the worker unrenewed, to lapse under its run.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in claims {
            let mut cmd = self.fcall(Script::Renew, &c.job);
            cmd.arg(c.idx).arg(c.fence).arg(lease_ms);
            pipe.add_command(cmd);
            pipe.cmd("ZADD")
                .arg(self.names.leases())
                .arg("XX")
                .arg(self.now_ms() + lease_ms)
                .arg(entry(&c.job, c.idx, c.attempt))
                .ignore();
        }
        let values = self.run_each(&pipe, claims.len(), "a renewal").await?;
        let mut held = Vec::with_capacity(claims.len());
        for (c, value) in claims.iter().zip(values) {
            held.push(match value {
                redis::Value::ServerError(e) => {
                    let e = self.classify(e.into());
                    if e.is_retryable() {
                        return Err(e);
                    }
                    // Never renewable: counted lost, so its run stops (its
                    // outcome could not be applied either).
                    tracing::error!(job = %c.job, idx = c.idx, fence = c.fence, error = %e,
                        "cannot renew this claim: the store refuses its record for good; counting it lost");
                    false
                }
                value => {
                    redis::from_redis_value::<i64>(value)
                        .map_err(|e| protocol(format!("renew answered {e}")))?
                        > 0
                }
            });
        }
        Ok(held)
    }

    async fn complete(
        &self,
        claim: &ClaimRef,
        worker: &str,
        result: &AttemptResult,
    ) -> Result<Applied, StoreError> {
        let mut pipe = redis::pipe();
        let mut cmd = self.fcall(Script::Complete, &claim.job);
        cmd.arg(claim.idx).arg(claim.attempt).arg(claim.fence);
        match result {
            AttemptResult::Succeeded(json) => {
                cmd.arg("ok").arg(json).arg(0);
            }
            AttemptResult::Retry { error, delay } => {
                let delay_ms = delay.as_millis() as u64;
                // Schedule first, apply second: a crash between leaves a
                // schedule entry that `promote` finds stale, never a retry
                // recorded in the job with nothing to wake it.
                // `LT`: the same outcome sent again (its reply lost) does
                // not move the retry later than the record says it is due.
                pipe.cmd("ZADD")
                    .arg(self.names.retries())
                    .arg("LT")
                    .arg(self.now_ms() + delay_ms)
                    .arg(entry(&claim.job, claim.idx, claim.attempt + 1))
                    .ignore();
                cmd.arg("retry").arg(error).arg(delay_ms);
            }
            AttemptResult::Failed(error) => {
                cmd.arg("fail").arg(error).arg(0);
            }
        }
        cmd.arg(worker);
        pipe.add_command(cmd);
        let (reply,): (Reply,) = self.run(&pipe).await?;
        match field(&reply, 0) {
            kind @ ("applied" | "duplicate") => Ok(Applied::Done {
                duplicate: kind == "duplicate",
                task_state: parse_task_state(field(&reply, 1))?,
                job_state: parse_job_state(field(&reply, 2))?,
                ready: ready_set(&claim.job, &reply, 3)?,
            }),
            "stale" => Ok(Applied::Stale),
            "missing" => Ok(Applied::Missing),
            other => Err(protocol(format!("complete answered {other:?}"))),
        }
    }

    async fn release(
        &self,
        claim: &ClaimRef,
        worker: &str,
    ) -> Result<Option<TaskMessage>, StoreError> {
        let mut cmd = self.fcall(Script::Release, &claim.job);
        cmd.arg(claim.idx).arg(claim.fence).arg(worker);
        let reply = self.call(cmd).await?;
        match field(&reply, 0) {
            "released" => Ok(Some(TaskMessage {
                job: claim.job.clone(),
                idx: claim.idx,
                task: field(&reply, 1).to_owned(),
                queue: field(&reply, 2).to_owned(),
                attempt: num(&reply, 3, "attempt")?,
            })),
            "not_held" => Ok(None),
            other => Err(protocol(format!("release answered {other:?}"))),
        }
    }

    async fn forget_claim(&self, claim: &ClaimRef) -> Result<(), StoreError> {
        // Batched: the first entry of a batch schedules one read and one
        // ZREM for every entry that arrives within the next 2 ms. Dropping
        // a lease entry is not on any job's critical path, and an entry a
        // crash leaves behind is dropped by the sweep.
        let first = {
            let mut pending = self.forgets.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(claim.clone());
            pending.len() == 1
        };
        if first {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let batch =
                    std::mem::take(&mut *this.forgets.lock().unwrap_or_else(|p| p.into_inner()));
                if let Err(e) = this.forget_finished_claims(&batch).await {
                    tracing::debug!(error = %e, entries = batch.len(), "lease entries left for the sweep");
                }
            });
        }
        Ok(())
    }

    async fn recheck(&self, claim: &ClaimRef) -> Result<(), StoreError> {
        // A plain read first (the lease index is in another slot than the
        // job): only a task ready at this very attempt needs the sweep.
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.names.job_key(&claim.job))
            .arg(format!("s:{}", claim.idx))
            .arg(format!("a:{}", claim.idx));
        let ((state, attempt),): ((Option<String>, Option<u32>),) = self.run(&pipe).await?;
        if state.as_deref() != Some("ready") || attempt != Some(claim.attempt) {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.names.leases())
            .arg("NX")
            .arg(self.now_ms())
            .arg(entry(&claim.job, claim.idx, claim.attempt))
            .ignore();
        self.run::<()>(&pipe).await
    }

    async fn due_retries(&self, limit: usize) -> Result<Vec<SweepAction>, StoreError> {
        let read_at = self.now_ms();
        let entries = self
            .due_entries(self.names.retries(), read_at, limit)
            .await?;
        let mut actions = Vec::with_capacity(entries.len());
        let mut pending = Vec::new();
        for e in entries {
            let Some((job, idx, attempt)) = parse_entry(&e) else {
                actions.push(SweepAction::forget(e, read_at));
                continue;
            };
            let mut cmd = self.fcall(Script::Promote, job);
            cmd.arg(idx).arg(attempt).arg(&self.by);
            let reply = match self.call(cmd).await {
                Ok(reply) => reply,
                Err(err) => {
                    self.set_aside(self.names.retries(), &e, err).await?;
                    continue;
                }
            };
            match field(&reply, 0) {
                "ready" => actions.push(SweepAction {
                    publish: vec![TaskMessage {
                        job: job.to_owned(),
                        idx,
                        attempt,
                        task: field(&reply, 1).to_owned(),
                        queue: field(&reply, 2).to_owned(),
                    }],
                    entry: e,
                    read_at,
                }),
                // Scheduled by a clock ahead of Redis's: re-score it. A due
                // time that is no number (a corrupt record) sets the entry
                // aside, as a script error does, rather than failing the
                // pass (and every pass after it) before any lease is swept.
                "later" => match num::<u64>(&reply, 1, "due") {
                    Ok(due) => self.rescore(self.names.retries(), due, &e).await?,
                    Err(err) => self.set_aside(self.names.retries(), &e, err).await?,
                },
                "pending" => pending.push(e),
                "gone" => actions.push(SweepAction::forget(e, read_at)),
                other => {
                    let err = protocol(format!("promote answered {other:?}"));
                    self.set_aside(self.names.retries(), &e, err).await?;
                }
            }
        }
        // Only those still due as read: one an outcome moved meanwhile
        // keeps its new due time.
        self.defer_due(
            self.names.retries(),
            &pending,
            read_at,
            PENDING_RETRY_RECHECK,
        )
        .await?;
        Ok(actions)
    }

    async fn forget_retries(&self, entries: &[String], read_at: u64) -> Result<(), StoreError> {
        self.forget_due(self.names.retries(), entries, read_at)
            .await
    }

    async fn next_retry_in(&self, skip: usize) -> Result<Option<Duration>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(self.names.retries())
            .arg(skip)
            .arg(skip)
            .arg("WITHSCORES");
        // Read as bytes and a float: an entry another program wrote (not
        // UTF-8, a fractional or infinite score) fails no conversion, taken
        // for an outage at every look (which would start the reclaim grace
        // again and again); the pass that finds it due removes or sets it
        // aside.
        let (first,): (Vec<(Vec<u8>, f64)>,) = self.run(&pipe).await?;
        Ok(first.first().map(|(_, due)| {
            // `as` saturates (NaN is 0): due at once, or far ahead.
            Duration::from_millis((*due as u64).saturating_sub(self.now_ms()))
        }))
    }

    async fn expired_leases(&self, limit: usize, by: &str) -> Result<Vec<SweepAction>, StoreError> {
        let read_at = self.now_ms();
        let entries = self
            .due_entries(self.names.leases(), read_at, limit)
            .await?;
        let mut actions = Vec::with_capacity(entries.len());
        for e in entries {
            let Some((job, idx, attempt)) = parse_entry(&e) else {
                actions.push(SweepAction::forget(e, read_at));
                continue;
            };
            let mut cmd = self.fcall(Script::Reclaim, job);
            cmd.arg(idx).arg(attempt).arg(by);
            let reply = match self.call(cmd).await {
                Ok(reply) => reply,
                Err(err) => {
                    self.set_aside(self.names.leases(), &e, err).await?;
                    continue;
                }
            };
            match field(&reply, 0) {
                // A reply the store cannot read (a corrupt record's) sets
                // its entry aside, as a script error does, rather than
                // failing the pass and every pass after it.
                "alive" => match num::<u64>(&reply, 1, "lease") {
                    Ok(le) => self.rescore(self.names.leases(), le, &e).await?,
                    Err(err) => self.set_aside(self.names.leases(), &e, err).await?,
                },
                "requeued" => match num(&reply, 3, "attempt") {
                    Ok(attempt) => {
                        tracing::warn!(
                            job,
                            task = field(&reply, 1),
                            "lease expired; task re-queued"
                        );
                        actions.push(SweepAction {
                            publish: vec![TaskMessage {
                                job: job.to_owned(),
                                idx,
                                task: field(&reply, 1).to_owned(),
                                queue: field(&reply, 2).to_owned(),
                                attempt,
                            }],
                            entry: e,
                            read_at,
                        });
                    }
                    Err(err) => self.set_aside(self.names.leases(), &e, err).await?,
                },
                "done" => match ready_set(job, &reply, 1) {
                    Ok(publish) => actions.push(SweepAction {
                        publish,
                        entry: e,
                        read_at,
                    }),
                    Err(err) => self.set_aside(self.names.leases(), &e, err).await?,
                },
                "failed" | "gone" => actions.push(SweepAction::forget(e, read_at)),
                other => {
                    let err = protocol(format!("reclaim answered {other:?}"));
                    self.set_aside(self.names.leases(), &e, err).await?;
                }
            }
        }
        Ok(actions)
    }

    async fn forget_leases(&self, entries: &[String], read_at: u64) -> Result<(), StoreError> {
        self.forget_due(self.names.leases(), entries, read_at).await
    }

    async fn defer(
        &self,
        index: ScheduleIndex,
        entries: &[String],
        read_at: u64,
        pause: Duration,
    ) -> Result<(), StoreError> {
        self.defer_due(self.index_key(index), entries, read_at, pause)
            .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobStatus>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.names.job_key(id));
        pipe.cmd("LRANGE")
            .arg(self.names.history_key(id))
            .arg(0)
            .arg(-1);
        let (fields, history): (BTreeMap<String, String>, Vec<String>) = self.run(&pipe).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
        let n: u32 = get("n").parse().unwrap_or(0);
        let mut tasks = BTreeMap::new();
        for i in 0..n {
            let g = |k: &str| fields.get(&format!("{k}:{i}")).map(String::as_str);
            let state = parse_task_state(g("s").unwrap_or(""))?;
            tasks.insert(
                g("nm").unwrap_or("").to_owned(),
                TaskStatus {
                    state,
                    attempts: g("a").and_then(|a| a.parse().ok()).unwrap_or(0),
                    result: g("r")
                        .and_then(|r| serde_json::from_str(r).ok())
                        .unwrap_or(Value::Null),
                    error: g("e").map(String::from),
                    worker: g("w").map(String::from),
                    handler: g("x")
                        .and_then(|x| RunSpec::decode(x).ok())
                        .map(|spec| spec.handler)
                        .or_else(|| g("h"))
                        .unwrap_or("")
                        .to_owned(),
                    queue: g("q").unwrap_or("").to_owned(),
                    max_attempts: g("ma").and_then(|a| a.parse().ok()).unwrap_or(0),
                    next_attempt_at_ms: if state == TaskState::Retrying {
                        g("due").and_then(|d| d.parse().ok())
                    } else {
                        None
                    },
                },
            );
        }
        let history = history
            .iter()
            .map(|h| serde_json::from_str::<HistoryEntry>(h))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| protocol(format!("history entry: {e}")))?;
        Ok(Some(JobStatus {
            id: get("id").to_owned(),
            state: parse_job_state(get("st"))?,
            version: get("v").parse().unwrap_or(0),
            requestor: get("req").to_owned(),
            labels: serde_json::from_str(get("lab")).unwrap_or_default(),
            error: fields.get("err").cloned(),
            created_ms: get("cr").parse().unwrap_or(0),
            updated_ms: get("up").parse().unwrap_or(0),
            tasks,
            history,
        }))
    }

    async fn job_state(&self, id: &str) -> Result<Option<(JobState, Option<String>)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.names.job_key(id))
            .arg(&["st", "err"]);
        pipe.cmd("EXISTS").arg(self.names.job_key(id));
        let (row, exists): (Reply, bool) = self.run(&pipe).await?;
        if row.first().is_none_or(Option::is_none) {
            // A record without its state is no job this code can answer
            // for (as `job` refuses it), not a job that is gone.
            if exists {
                return Err(protocol(format!("job {id:?} has a record without a state")));
            }
            return Ok(None);
        }
        let error = row.get(1).cloned().flatten();
        Ok(Some((parse_job_state(field(&row, 0))?, error)))
    }

    async fn list_jobs(
        &self,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobSummary>, StoreError> {
        Ok(self.list_jobs_within(state, limit, usize::MAX).await?.jobs)
    }

    async fn list_jobs_within(
        &self,
        state: Option<JobState>,
        limit: usize,
        look_at: usize,
    ) -> Result<JobListing, StoreError> {
        let mut out = Vec::new();
        let mut start = 0usize;
        let page = 200usize;
        let mut looked = 0usize;
        // Pages go by rank, and jobs created meanwhile push the ranks on:
        // an id met again is not listed twice.
        let mut listed = std::collections::HashSet::new();
        while out.len() < limit {
            if looked >= look_at {
                // Cut short only if there is an older job left.
                let mut pipe = redis::pipe();
                pipe.cmd("ZREVRANGE")
                    .arg(self.names.jobs_index())
                    .arg(start)
                    .arg(start);
                let (older,): (Vec<String>,) = self.run(&pipe).await?;
                return Ok(JobListing {
                    jobs: out,
                    cut_short: !older.is_empty(),
                });
            }
            let mut pipe = redis::pipe();
            pipe.cmd("ZREVRANGE")
                .arg(self.names.jobs_index())
                .arg(start)
                .arg(start + page - 1)
                .arg("WITHSCORES");
            let (entries,): (Vec<(String, u64)>,) = self.run(&pipe).await?;
            if entries.is_empty() {
                break;
            }
            looked += entries.len();
            let ids: Vec<&String> = entries.iter().map(|(id, _)| id).collect();
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.names.job_key(id))
                    .arg(&["st", "req", "n", "cr", "up"]);
            }
            let rows: Vec<Reply> = self.run(&pipe).await?;
            let mut expired = Vec::new();
            for ((id, score), row) in entries.iter().zip(rows) {
                if row.first().is_none_or(Option::is_none) {
                    expired.push((id.as_str(), *score));
                    continue;
                }
                // One record another program wrote does not end the list.
                let st = match parse_job_state(field(&row, 0)) {
                    Ok(st) => st,
                    Err(e) => {
                        tracing::warn!(job = %id, error = %e, "a job record that cannot be listed; left out");
                        continue;
                    }
                };
                if state.is_some_and(|s| s != st) || !listed.insert(id.clone()) {
                    continue;
                }
                out.push(JobSummary {
                    id: id.clone(),
                    state: st,
                    requestor: field(&row, 1).to_owned(),
                    tasks: field(&row, 2).parse().unwrap_or(0),
                    created_ms: field(&row, 3).parse().unwrap_or(0),
                    updated_ms: field(&row, 4).parse().unwrap_or(0),
                });
                if out.len() >= limit {
                    break;
                }
            }
            let forgotten = self.forget_index_entries(&expired).await?;
            start += ids.len() - forgotten;
        }
        Ok(JobListing {
            jobs: out,
            cut_short: false,
        })
    }

    async fn prune_expired(&self, limit: usize) -> Result<Pruned, StoreError> {
        // No job can have expired before `retention` after its creation
        // (the index's score): only older entries are looked at. Entries
        // of jobs still alive are stepped over by the cursor, so a few
        // long-running jobs do not stall the pruning behind them.
        let cutoff = self.now_ms().saturating_sub(self.retention_ms);
        let from = self.prune_from.load(Ordering::Relaxed);
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(self.names.jobs_index())
            .arg(from)
            .arg(cutoff)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        // Read as bytes and any number: a member or score something else
        // wrote (not UTF-8, not an integer) failed every read, and the
        // cursor, never moved past it, left every later entry for ever.
        let (read,): (Vec<(Vec<u8>, f64)>,) = self.run(&pipe).await?;
        let more = read.len() >= limit;
        let read: Vec<(Vec<u8>, u64)> = read
            .into_iter()
            .map(|(member, score)| (member, score.max(0.0) as u64))
            .collect();
        let next = match read.last() {
            // Several entries may share the last score: start at it again.
            Some(&(_, score)) if more && score > from => score,
            Some(&(_, score)) if more => score + 1,
            _ => 0,
        };
        self.prune_from.store(next, Ordering::Relaxed);
        let (entries, foreign) = text_members(read.into_iter());
        self.forget_foreign(self.names.jobs_index(), foreign)
            .await?;
        if entries.is_empty() {
            return Ok(Pruned::default());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &entries {
            pipe.cmd("EXISTS").arg(self.names.job_key(id));
        }
        let exists: Vec<bool> = self.run(&pipe).await?;
        let gone: Vec<(&str, u64)> = entries
            .iter()
            .zip(exists)
            .filter(|(_, e)| !e)
            .map(|((id, score), _)| (id.as_str(), *score))
            .collect();
        let removed = self.forget_index_entries(&gone).await?;
        Ok(Pruned { removed, more })
    }

    async fn known_queues(&self) -> Result<Vec<String>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(self.names.queues_key());
        let (mut queues,): (Vec<String>,) = self.run(&pipe).await?;
        queues.sort_unstable();
        Ok(queues)
    }

    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), StoreError> {
        let info = serde_json::to_string(worker).map_err(|e| protocol(e.to_string()))?;
        let key = self.names.worker_key(&worker.id);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(info)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.names.workers_index())
            .arg(worker.heartbeat_ms)
            .arg(&worker.id)
            .ignore();
        // Processes that died without unregistering (killed, crashed)
        // leave their entry: dropped here once long silent, or the index
        // would grow with every restart.
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(self.names.workers_index())
            .arg("-inf")
            .arg(format!(
                "({}",
                worker.heartbeat_ms.saturating_sub(WORKER_ENTRY_KEPT_MS)
            ))
            .ignore();
        self.run::<()>(&pipe).await
    }

    async fn unregister(&self, worker_id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(self.names.worker_key(worker_id))
            .ignore();
        pipe.cmd("ZREM")
            .arg(self.names.workers_index())
            .arg(worker_id)
            .ignore();
        self.run::<()>(&pipe).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(self.names.workers_index())
            .arg(0)
            .arg(-1);
        let (ids,): (Vec<String>,) = self.run(&pipe).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("GET").arg(self.names.worker_key(id));
        }
        let infos: Vec<Option<String>> = self.run(&pipe).await?;
        let mut live = Vec::new();
        let mut dead = Vec::new();
        for (id, info) in ids.into_iter().zip(infos) {
            match info.and_then(|i| serde_json::from_str::<WorkerInfo>(&i).ok()) {
                Some(w) => live.push(w),
                None => dead.push(id),
            }
        }
        if !dead.is_empty() && !self.read_only {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM")
                .arg(self.names.workers_index())
                .arg(&dead)
                .ignore();
            self.run::<()>(&pipe).await?;
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check_epoch().await.map(|_| ())
    }

    async fn replicas(&self) -> Result<Option<Replicas>, StoreError> {
        let Some(wait) = &self.replica_wait else {
            return Ok(None);
        };
        Ok(Some(Replicas {
            wanted: wait.replicas,
            connected: self.connected_replicas().await?,
        }))
    }

    async fn audit_due(&self) -> Result<Option<String>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("INFO").arg("server").arg("replication");
        pipe.cmd("GET").arg(self.names.audited_key());
        let (info, audited): (String, Option<String>) = self.run(&pipe).await?;
        let server = data_identity(&info).ok_or_else(|| {
            protocol(
                "INFO server has no run_id line (Conveyor needs Redis 7.0 or later, \
                     which names each server process there)",
            )
        })?;
        Ok((audited.as_deref() != Some(server.as_str())).then_some(server))
    }

    async fn audit_jobs(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<AuditPage, StoreError> {
        // ZSCAN returns every entry present for the whole walk at least
        // once, whatever is added or pruned meanwhile.
        let mut pipe = redis::pipe();
        pipe.cmd("ZSCAN")
            .arg(self.names.jobs_index())
            .arg(cursor.unwrap_or("0"))
            .arg("COUNT")
            .arg(limit.max(1));
        // Members read as bytes: one something else wrote that is not
        // UTF-8 failed every page read at it, and the audit never got past.
        let ((next, flat),): ((String, Vec<(Vec<u8>, f64)>),) = self.run(&pipe).await?;
        let (members, foreign) = text_members(flat.into_iter());
        self.forget_foreign(self.names.jobs_index(), foreign)
            .await?;
        let ids: Vec<&str> = members.iter().map(|(id, _)| id.as_str()).collect();
        let mut page = self.audit_ids(&ids).await?;
        page.next = (next != "0").then_some(next);
        Ok(page)
    }

    async fn audit_job(&self, id: &str) -> Result<AuditPage, StoreError> {
        self.audit_ids(&[id]).await
    }

    async fn audit_done(&self, server: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.names.audited_key())
            .arg(server)
            .ignore();
        self.run::<()>(&pipe).await
    }

    async fn fail_poisoned(&self, task: &TaskMessage, reason: &str) -> Result<bool, StoreError> {
        let mut cmd = self.fcall(Script::Poison, &task.job);
        cmd.arg(task.idx)
            .arg(task.attempt)
            .arg(reason)
            .arg(&self.by);
        let reply = self.call(cmd).await?;
        Ok(field(&reply, 0) == "failed")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn schedule_entries_round_trip_even_with_pipes_in_ids() {
        assert_eq!(parse_entry(&entry("a-b", 3, 2)), Some(("a-b", 3, 2)));
        assert_eq!(parse_entry("x|y"), None);
    }

    #[test]
    fn a_redis_that_cannot_write_now_is_an_outage_and_a_broken_call_is_not() {
        use redis::{ErrorKind, ServerErrorKind as K};
        let server = |kind| RedisError::from((ErrorKind::Server(kind), "from the server"));
        let extension =
            |code: &str| redis::make_extension_error(code.to_owned(), Some("detail".into()));
        for kind in [
            K::BusyLoading,
            K::ReadOnly,
            K::MasterDown,
            K::ClusterDown,
            K::TryAgain,
            K::NoPerm,
        ] {
            assert!(is_transient_server_error(&server(kind)), "{kind:?}");
        }
        for code in ["BUSY", "OOM", "NOREPLICAS"] {
            assert!(is_transient_server_error(&extension(code)), "{code}");
        }
        for kind in [K::ResponseError, K::NoScript, K::CrossSlot] {
            assert!(!is_transient_server_error(&server(kind)), "{kind:?}");
            assert!(is_permanent_server_error(&server(kind)), "{kind:?}");
        }
        assert!(is_permanent_server_error(&extension("WRONGTYPE")));
        // Codes it does not know are taken for outages.
        assert!(!is_permanent_server_error(&extension("SOMETHINGNEW")));
        assert!(!is_permanent_server_error(&extension("BUSY")));
        assert!(!is_permanent_server_error(&server(K::ReadOnly)));
    }

    #[test]
    fn only_an_answer_that_says_nothing_of_the_connection_keeps_it() {
        use redis::{ErrorKind, ServerErrorKind as K};
        let server = |kind| RedisError::from((ErrorKind::Server(kind), "from the server"));
        let extension =
            |code: &str| redis::make_extension_error(code.to_owned(), Some("detail".into()));
        for kind in [K::BusyLoading, K::NoPerm, K::TryAgain, K::ClusterDown] {
            assert!(keeps_the_connection(&server(kind)), "{kind:?}");
        }
        for code in ["BUSY", "OOM", "NOREPLICAS"] {
            assert!(keeps_the_connection(&extension(code)), "{code}");
        }
        // A demoted primary, an unknown answer, a broken connection: the
        // next call connects afresh.
        for kind in [K::ReadOnly, K::MasterDown] {
            assert!(!keeps_the_connection(&server(kind)), "{kind:?}");
        }
        assert!(!keeps_the_connection(&extension("SOMETHINGNEW")));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!keeps_the_connection(&io));
    }
}
