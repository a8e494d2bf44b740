//! Embedded mode: a whole Conveyor — dispatcher, workers, broker, store — in
//! one process, with nothing to install.
//!
//! The broker and store are the in-process implementations of the same
//! traits RabbitMQ and Redis implement; the dispatcher and workers are the
//! production code paths, unchanged. That is what makes the embedded mode
//! worth trusting for development and what lets the simulation tests speak
//! for production logic.
//!
//! What it does not promise: durability (the optional snapshot is written
//! periodically and on clean shutdown, so a crash loses what happened since
//! the last one), more than one process, or RabbitMQ's and Redis's
//! operational behaviour. Production uses RabbitMQ and Redis.
//!
//! The snapshot is written only when the store changed since the last one
//! (serializing the whole store holds its lock, and an idle `conveyor dev`
//! has nothing new to say every two seconds), on a blocking thread, not on
//! the runtime's. It goes to a temporary file that is synced before it is
//! renamed over the snapshot, and the directory is synced after: a power
//! loss leaves the old snapshot or the new one, never an empty or partial
//! file that the next start would refuse. It keeps the old file's
//! permissions (a new one is the user's alone: job params may hold
//! secrets). The periodic writes go on through the workers' grace period
//! (a task finishing then is saved though the process is killed before
//! its end), and the last one follows the workers' stop.
//!
//! One process at a time uses a snapshot: it holds a lock on
//! `<snapshot>.lock` for its life, and a second `conveyor dev` on the same
//! file is refused at its start (two would overwrite each other's jobs).
//! Creating that file also finds a directory that is missing or not
//! writable at the start, not at the first write.
//!
//! Its workers are the only ones there are, so besides `worker.queues`
//! they consume every task queue a job names, from a moment after the
//! store accepts the job ([`QUEUES_LOOKED_AT_EVERY`]).
//!
//! Nothing consumes `<prefix>.dead` in a long `conveyor dev` session, so
//! the in-process dead-letter queue keeps only the newest
//! [`DEAD_LETTERS_KEPT`].

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_handler::Registry;
use tokio::task::JoinSet;

use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, Outgoing};
use crate::config::Config;
use crate::dispatcher::{Dispatcher, DispatcherOptions};
use crate::health::Health;
use crate::intake::JobIntake;
use crate::names::Names;
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::store::Store;
use crate::store::memory::{MemoryStore, SystemClock};
use crate::worker::{Worker, WorkerOptions};

/// Embedded settings.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Worker count.
    pub workers: usize,
    /// Concurrency of each worker.
    pub concurrency: usize,
    /// Where to keep the store between runs, if anywhere.
    pub snapshot: Option<PathBuf>,
    /// How often to write the snapshot.
    pub snapshot_every: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            workers: 1,
            concurrency: 8,
            snapshot: None,
            snapshot_every: Duration::from_secs(2),
        }
    }
}

/// Dead letters the in-process broker keeps, the newest (see the module
/// docs): enough to read what went wrong lately.
pub const DEAD_LETTERS_KEPT: usize = 10_000;

/// How often the embedded workers look for task queues that jobs name
/// and they do not consume yet ([`Worker::following_new_queues`]).
pub const QUEUES_LOOKED_AT_EVERY: Duration = Duration::from_millis(250);

/// The longest pause between snapshot writes that keep failing.
const SNAPSHOT_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// The pause before the next snapshot write, written every `every`, after
/// `failed` writes failed in a row: each failure doubles it, up to
/// [`SNAPSHOT_BACKOFF_CAP`] (or `every`, if longer). A write that fails (a
/// full disk) serializes the whole store under its lock first: once
/// every period for as long as the disk stayed full, before the
/// thirty-sixth session.
fn snapshot_pause(every: Duration, failed: u32) -> Duration {
    let every_ms = every.as_millis() as u64;
    let cap_ms = every_ms.max(SNAPSHOT_BACKOFF_CAP.as_millis() as u64);
    Duration::from_millis(crate::backoff::ceiling(
        failed.saturating_add(1),
        every_ms,
        cap_ms,
    ))
}

/// A running embedded deployment.
pub struct Embedded {
    store: Arc<MemoryStore>,
    broker: Arc<MemoryBroker>,
    names: Names,
    trigger: ShutdownTrigger,
    tasks: JoinSet<()>,
    /// Shared by the periodic writes and the last one at shutdown, which
    /// so never write the file at the same time.
    snapshot: Option<Arc<Mutex<SnapshotFile>>>,
    /// The periodic writes, and what ends them: once the workers stopped.
    snapshots: Option<(ShutdownTrigger, tokio::task::JoinHandle<()>)>,
    health: Health,
}

impl Embedded {
    /// Start a dispatcher and workers on an in-process broker and store,
    /// restoring the snapshot if there is one.
    pub async fn start(
        config: &Config,
        registry: Registry,
        options: EmbeddedOptions,
    ) -> anyhow::Result<Embedded> {
        let names = Names::new(&config.prefix);
        let store = Arc::new(
            MemoryStore::new(
                Arc::new(SystemClock),
                Duration::from_secs(config.retention_s),
                u64::from(rand::random::<u32>() >> 1 | 1),
                "embedded",
            )
            .with_max_inputs_bytes(config.limits.max_inputs_bytes as u64),
        );
        let mut snapshot = options
            .snapshot
            .clone()
            .map(SnapshotFile::open)
            .transpose()?;
        if let Some(file) = &mut snapshot
            && file.path.exists()
        {
            let path = &file.path;
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read snapshot {}: {e}", path.display()))?;
            store
                .restore(&bytes)
                .map_err(|e| anyhow::anyhow!("snapshot {} is unusable: {e}", path.display()))?;
            // The file holds the store as it is now.
            file.written = Some(store.changes());
        }
        let snapshot = snapshot.map(|file| Arc::new(Mutex::new(file)));
        let broker = Arc::new(MemoryBroker::reliable(names.clone()));
        broker.set_dead_letter_cap(Some(DEAD_LETTERS_KEPT));
        // As RabbitMQ's quorum queues: a message returned past the limit is
        // dead-lettered, so dev mode shows what production would.
        if config.queue_type == crate::config::QueueType::Quorum {
            broker.set_delivery_limit(Some(config.delivery_limit));
        }
        broker.declare(&config.worker.queues).await?;
        let trigger = ShutdownTrigger::new();
        let mut tasks = JoinSet::new();
        let intake = JobIntake::new(config, registry.clone())?;
        let dispatcher = Dispatcher::new(
            store.clone(),
            broker.clone(),
            intake.clone(),
            names.clone(),
            DispatcherOptions {
                id: "embedded-dispatcher".into(),
                prefetch: config.dispatcher.prefetch,
                sweep_interval: Duration::from_millis(config.dispatcher.sweep_interval_ms),
                task_queues: config.worker.queues.clone(),
            },
        );
        // Tasks of a restored snapshot may have been queued in the broker
        // that died with the last process: the snapshot names another
        // store, so the dispatcher audits every unfinished job at once
        // (`Store::audit_due`) and its sweep offers their ready and lapsed
        // tasks again, as after a Redis restart.
        let health = dispatcher.health().clone();
        let shutdown = trigger.subscribe();
        tasks.spawn(async move {
            if let Err(e) = dispatcher.run(shutdown).await {
                tracing::error!(error = %e, "embedded dispatcher stopped");
            }
        });
        for n in 0..options.workers.max(1) {
            let worker = Worker::new(
                store.clone(),
                broker.clone(),
                registry.clone(),
                names.clone(),
                WorkerOptions {
                    concurrency: options.concurrency,
                    ..WorkerOptions::from_config(config, format!("embedded-worker-{n}"))
                },
            )
            // Every part shares one registry, so workers can take
            // submissions (one hop fewer) whatever the config says.
            .accepting_submissions(intake.clone())
            // The only workers there are: a job naming a queue besides
            // `worker.queues` runs too.
            .following_new_queues(QUEUES_LOOKED_AT_EVERY);
            let shutdown = trigger.subscribe();
            tasks.spawn(async move {
                if let Err(e) = worker.run(shutdown).await {
                    tracing::error!(error = %e, "embedded worker stopped");
                }
            });
        }
        let snapshots = snapshot.clone().map(|file| {
            let store = store.clone();
            let stop = ShutdownTrigger::new();
            let mut shutdown = stop.subscribe();
            let every = options.snapshot_every;
            let writes = tokio::spawn(async move {
                let mut failed = 0u32;
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(snapshot_pause(every, failed)) => {}
                    }
                    match save_snapshot(&file, &store).await {
                        Ok(_) => failed = 0,
                        Err(e) => {
                            failed = failed.saturating_add(1);
                            tracing::warn!(error = %e, retry_in = ?snapshot_pause(every, failed), "snapshot failed");
                        }
                    }
                }
            });
            (stop, writes)
        });
        let embedded = Embedded {
            store,
            broker,
            names,
            trigger,
            tasks,
            snapshot,
            snapshots,
            health,
        };
        Ok(embedded)
    }

    /// The dispatcher's health: what `/readyz` of `conveyor dev` reports.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The store (for status and listing).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The broker (to publish as a client would).
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// Submit a job body exactly as a client would: to `<prefix>.submit`.
    pub async fn submit(&self, body: Vec<u8>) -> anyhow::Result<()> {
        self.broker
            .publish(vec![Outgoing::durable(self.names.submit_queue(), body)])
            .await?;
        Ok(())
    }

    /// Stop gracefully (running tasks have the workers' grace period to
    /// finish) and write the snapshot.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop(std::future::pending()).await
    }

    /// Stop as [`Embedded::shutdown`] does, and end the grace period at
    /// once if `outer` is hurried, before or during the stop (a second
    /// Ctrl-C to `conveyor dev`): the workers hand their unfinished tasks
    /// back instead of waiting for them.
    pub async fn shutdown_hurried_by(self, mut outer: Shutdown) -> anyhow::Result<()> {
        self.stop(async move { outer.hurried().await }).await
    }

    /// Stop without waiting for running tasks: a stop hurried from the
    /// start (`conveyor run`, done with its job or given up on it: what
    /// still runs is handed back, a `shell` task's processes killed).
    pub async fn shutdown_now(self) -> anyhow::Result<()> {
        self.stop(std::future::ready(())).await
    }

    async fn stop(mut self, hurried: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.trigger.trigger();
        let trigger = self.trigger.clone();
        let mut stopped = std::pin::pin!(async { while self.tasks.join_next().await.is_some() {} });
        tokio::select! {
            biased;
            () = stopped.as_mut() => {}
            () = hurried => {
                trigger.hurry();
                stopped.await;
            }
        }
        if let Some((stop, writes)) = self.snapshots.take() {
            stop.trigger();
            let _ = writes.await;
        }
        if let Some(file) = &self.snapshot {
            save_snapshot(file, &self.store).await?;
        }
        Ok(())
    }
}

/// The snapshot file and the store's change count it holds.
#[derive(Debug)]
struct SnapshotFile {
    path: PathBuf,
    /// [`MemoryStore::changes`] at the last write or read (`None`: neither
    /// yet).
    written: Option<u64>,
    /// `<path>.lock`, locked for as long as this is held.
    _lock: std::fs::File,
}

impl SnapshotFile {
    /// The snapshot at `path`, for this process alone: refused if another
    /// holds it, or if its directory cannot be written.
    fn open(path: PathBuf) -> anyhow::Result<SnapshotFile> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot use snapshot {}: cannot create its lock file {}: {e} \
                     (its directory must exist and be writable)",
                    path.display(),
                    lock_path.display()
                )
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "snapshot {} is in use by another process (it holds {}): give each \
                 `conveyor dev` a snapshot of its own",
                path.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => anyhow::bail!(
                "cannot lock snapshot {} ({}): {e}",
                path.display(),
                lock_path.display()
            ),
        }
        Ok(SnapshotFile {
            path,
            written: None,
            _lock: lock,
        })
    }

    /// Write the store's state unless the file holds it already; whether
    /// it wrote. Blocks: file I/O, and the store's lock while it is
    /// serialized.
    fn save(&mut self, store: &MemoryStore) -> anyhow::Result<bool> {
        let Some(snapshot) = store.snapshot_if_changed(self.written)? else {
            return Ok(false);
        };
        replace_durably(&self.path, &snapshot.bytes)?;
        self.written = Some(snapshot.changes);
        Ok(true)
    }
}

/// [`SnapshotFile::save`] on a blocking thread.
async fn save_snapshot(
    file: &Arc<Mutex<SnapshotFile>>,
    store: &Arc<MemoryStore>,
) -> anyhow::Result<bool> {
    let (file, store) = (file.clone(), store.clone());
    tokio::task::spawn_blocking(move || {
        file.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .save(&store)
    })
    .await
    .map_err(|e| anyhow::anyhow!("snapshot writer failed: {e}"))?
}

/// Make `bytes` the contents of `path` so that a crash or power loss at any
/// moment leaves either the old file or the new one: written to a
/// temporary file beside it and synced, renamed over it, and the directory
/// synced so the rename itself is on disk (best effort: not every
/// platform or file system can sync a directory).
fn replace_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above applies only to a file created now (a temporary
        // file left by a crash keeps its own); the old snapshot's
        // permissions, if there is one, are kept.
        let permissions = match std::fs::metadata(path) {
            Ok(old) => old.permissions(),
            Err(_) => std::os::unix::fs::PermissionsExt::from_mode(0o600),
        };
        file.set_permissions(permissions)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|e| anyhow::anyhow!("cannot write snapshot {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot replace snapshot {}: {e}", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync the snapshot's directory");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn failing_snapshot_writes_back_off_to_a_minute_and_a_success_resets() {
        let every = Duration::from_secs(2);
        let pauses: Vec<u64> = (0..8)
            .map(|failed| snapshot_pause(every, failed).as_secs())
            .collect();
        assert_eq!(pauses, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(snapshot_pause(every, u32::MAX), SNAPSHOT_BACKOFF_CAP);
        // A period longer than the cap is kept as it is.
        let hourly = Duration::from_secs(3600);
        assert_eq!(snapshot_pause(hourly, 3), hourly);
    }
    use crate::model::{JobState, TaskState};

    /// A directory of this test's own, emptied first.
    fn scratch(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("conveyor-embedded-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn start(config: &Config, options: EmbeddedOptions) -> Embedded {
        Embedded::start(config, conveyor_builtin_handlers::registry(), options)
            .await
            .unwrap()
    }

    /// Wait (up to 30 s) until `check` is true of job `id`'s status.
    async fn wait_for_job(
        embedded: &Embedded,
        id: &str,
        what: &str,
        check: impl Fn(&crate::store::JobStatus) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = embedded.store.job(id).await.unwrap()
                && check(&status)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: {what}, never"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The default configuration with a grace period of ten minutes.
    fn with_long_grace() -> Config {
        Config {
            worker: crate::config::WorkerConfig {
                grace_s: 600,
                ..Config::default().worker
            },
            ..Config::default()
        }
    }

    /// End the grace period of a stop under way (`outer` hurried, as by a
    /// second Ctrl-C) and wait for the stop to end, within 20 s.
    async fn hurry_and_wait(
        outer: &ShutdownTrigger,
        stopping: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        outer.hurry();
        tokio::time::timeout(Duration::from_secs(20), stopping)
            .await
            .expect("the stop was not hurried")
            .unwrap()
            .unwrap();
    }

    fn one_task_job(id: &str, handler: &str, params: serde_json::Value) -> Vec<u8> {
        serde_json::json!({"id": id, "requestor": "t",
            "tasks": [{"name": "t", "handler": handler, "params": params}]})
        .to_string()
        .into_bytes()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hurried_outer_shutdown_ends_the_workers_grace_period_at_once() {
        let config = with_long_grace();
        let embedded = start(&config, EmbeddedOptions::default()).await;
        embedded
            .submit(one_task_job(
                "nap",
                "sleep",
                serde_json::json!({"ms": 600_000}),
            ))
            .await
            .unwrap();
        wait_for_job(&embedded, "nap", "running", |s| {
            s.tasks["t"].state == TaskState::Running
        })
        .await;
        let store = embedded.store.clone();
        let outer = ShutdownTrigger::new();
        let stopping = tokio::spawn(embedded.shutdown_hurried_by(outer.subscribe()));
        // The first Ctrl-C: a graceful stop waits for the running task.
        outer.trigger();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !stopping.is_finished(),
            "a graceful stop waits for its grace period"
        );
        // The second: the grace period ends now.
        hurry_and_wait(&outer, stopping).await;
        let status = store.job("nap").await.unwrap().unwrap();
        assert_eq!(status.tasks["t"].state, TaskState::Ready, "handed back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_deployment_does_not_write_its_snapshot_again() {
        let dir = scratch("idle");
        let path = dir.join("store.json");
        let options = EmbeddedOptions {
            snapshot: Some(path.clone()),
            snapshot_every: Duration::from_millis(20),
            ..EmbeddedOptions::default()
        };
        let embedded = start(&Config::default(), options).await;
        embedded
            .submit(one_task_job("a", "noop", serde_json::json!({})))
            .await
            .unwrap();
        wait_for_job(&embedded, "a", "finished", |s| s.state.is_terminal()).await;
        // Once everything the job and the start-up audit changed is written…
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let written = embedded.snapshot.as_ref().unwrap().lock().unwrap().written;
            if written == Some(embedded.store.changes()) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // …an idle deployment has nothing new to write, period after period.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !path.exists(),
            "the snapshot was written again with nothing new in it"
        );
        // Something new is written at the next period.
        embedded
            .submit(one_task_job("b", "noop", serde_json::json!({})))
            .await
            .unwrap();
        wait_for_job(&embedded, "b", "finished", |s| {
            s.state == JobState::Succeeded
        })
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new job was never written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        embedded.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A task that finishes in the workers' grace period is saved by the
    /// periodic writes, which go on until the workers stop: a process
    /// killed before the end of its grace period (a supervisor's
    /// `SIGKILL`) keeps it, instead of running it again from a snapshot
    /// taken at the first Ctrl-C.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_snapshot_is_written_through_the_grace_period() {
        let dir = scratch("grace");
        let path = dir.join("store.json");
        let config = with_long_grace();
        let options = EmbeddedOptions {
            snapshot: Some(path.clone()),
            snapshot_every: Duration::from_millis(20),
            ..EmbeddedOptions::default()
        };
        let embedded = start(&config, options).await;
        let nap = |id: &str, ms: u64| one_task_job(id, "sleep", serde_json::json!({"ms": ms}));
        embedded.submit(nap("long", 600_000)).await.unwrap();
        embedded.submit(nap("short", 500)).await.unwrap();
        for id in ["long", "short"] {
            wait_for_job(&embedded, id, "running", |s| {
                s.tasks["t"].state == TaskState::Running
            })
            .await;
        }
        let outer = ShutdownTrigger::new();
        let stopping = tokio::spawn(embedded.shutdown_hurried_by(outer.subscribe()));
        outer.trigger();
        // The short task ends in the grace period, the long one runs on:
        // the file says the short one succeeded before the stop ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let saved = MemoryStore::new(Arc::new(SystemClock), Duration::from_secs(60), 1, "t");
            if let Ok(bytes) = std::fs::read(&path)
                && saved.restore(&bytes).is_ok()
                && saved
                    .job("short")
                    .await
                    .unwrap()
                    .is_some_and(|s| s.state == JobState::Succeeded)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the task finished in the grace period was never saved"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!stopping.is_finished(), "still in its grace period");
        hurry_and_wait(&outer, stopping).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One process at a time on a snapshot: a second is refused at its
    /// start, naming the file, and so is a snapshot whose directory is
    /// missing; once the first has stopped, the file is free again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_in_use_or_in_a_missing_directory_is_refused_at_the_start() {
        let dir = scratch("in-use");
        let path = dir.join("store.json");
        let options = || EmbeddedOptions {
            snapshot: Some(path.clone()),
            ..EmbeddedOptions::default()
        };
        let registry = conveyor_builtin_handlers::registry;
        let first = start(&Config::default(), options()).await;

        let second = Embedded::start(&Config::default(), registry(), options()).await;

        let e = second.err().expect("a second process on the snapshot");
        assert!(e.to_string().contains("in use by another process"), "{e}");
        assert!(e.to_string().contains("store.json"), "{e}");
        first.shutdown().await.unwrap();
        let again = start(&Config::default(), options()).await;
        again.shutdown().await.unwrap();

        let nowhere = EmbeddedOptions {
            snapshot: Some(dir.join("missing").join("store.json")),
            ..EmbeddedOptions::default()
        };
        let e = Embedded::start(&Config::default(), registry(), nowhere)
            .await
            .err()
            .expect("a snapshot in a missing directory");
        assert!(e.to_string().contains("must exist and be writable"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new snapshot is readable by its user alone (job params may hold
    /// secrets); a snapshot replaced keeps the permissions it was given.
    #[test]
    fn a_snapshot_is_private_when_new_and_keeps_its_permissions_when_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let path = dir.join("store.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        replace_durably(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace_durably(&path, b"newer").unwrap();
        assert_eq!(mode(&path), 0o640);
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_replaces_its_file_whole_and_leaves_no_file_but_its_own() {
        let dir = scratch("replace");
        let path = dir.join("store.json");
        std::fs::write(&path, b"old").unwrap();
        let neighbour = dir.join("store.tmp");
        std::fs::write(&neighbour, b"not the snapshot's").unwrap();
        replace_durably(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(
            std::fs::read(&neighbour).unwrap(),
            b"not the snapshot's",
            "the temporary file is named after the whole file name"
        );
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["store.json", "store.tmp"], "no temporary file left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_naming_a_queue_besides_the_configured_ones_runs_too() {
        let embedded = start(&Config::default(), EmbeddedOptions::default()).await;
        let body = serde_json::json!({"id": "elsewhere", "requestor": "t", "tasks": [
            {"name": "a", "handler": "noop", "params": {"n": 1}, "queue": "gpu"},
            {"name": "b", "handler": "noop", "params": {}, "after": ["a"], "queue": "batch"}]});
        embedded
            .submit(body.to_string().into_bytes())
            .await
            .unwrap();
        wait_for_job(&embedded, "elsewhere", "succeeded", |s| {
            s.state == JobState::Succeeded
        })
        .await;
        let status = embedded.store.job("elsewhere").await.unwrap().unwrap();
        assert_eq!(status.tasks["a"].queue, "gpu");
        assert_eq!(status.tasks["a"].result, serde_json::json!({"n": 1}));
        assert_eq!(status.tasks["b"].queue, "batch");
        embedded.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_in_process_dead_letter_queue_keeps_only_the_newest_dead_letters() {
        let embedded = start(&Config::default(), EmbeddedOptions::default()).await;
        let dead = embedded.names.dead_queue();
        let letters: Vec<Outgoing> = (0..DEAD_LETTERS_KEPT + 5)
            .map(|n| Outgoing::durable(dead.clone(), n.to_string().into_bytes()))
            .collect();
        embedded.broker.publish(letters).await.unwrap();
        let kept = embedded.broker.take_all(&dead).await;
        assert_eq!(kept.len(), DEAD_LETTERS_KEPT);
        assert_eq!(kept.first().unwrap(), b"5", "the oldest five were dropped");
        embedded.shutdown().await.unwrap();
    }
}
