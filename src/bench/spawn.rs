//! The deployment under test: started here as child processes, or a live
//! one checked for consumers.
//!
//! Spawned processes are the current executable (`conveyor --config <file>
//! dispatcher` / `worker --concurrency C`), with a config file written to a
//! private temporary directory (mode 0600: it holds the URLs) under the
//! fresh prefix, and every `CONVEYOR_*` variable removed from their
//! environment so nothing overrides it. Their stdout and stderr go to log
//! files in the same directory, which is deleted after a clean stop and
//! kept (and named in the report) otherwise; the [`Deployment`] owning the
//! directory exists before anything is written into it, so every early
//! failure (the broker unreachable, a process that cannot start) removes
//! the config with its credentials too. Peak resident memory is the
//! kernel's `VmHWM` from `/proc/<pid>/status`, read just before they are
//! stopped with SIGTERM (SIGKILL after 20 s).
//!
//! With `--hold-workers` the workers are started later
//! ([`Deployment::start_workers`]), once the held jobs are accepted.
//!
//! The children are stopped by [`Deployment::stop`], or killed when the
//! `Deployment` is dropped (`kill_on_drop`), which covers errors, Ctrl-C
//! and SIGTERM. A bench killed with SIGKILL leaves them running: Linux's
//! parent-death signal would need code between `fork` and `exec`, which
//! the crate's `unsafe_code = "forbid"` rules out (see ARCHITECTURE.md on
//! the `shell` watchdog, the same constraint).
//!
//! Passive declares (readiness, the hold's queue depths) are bounded in
//! time like every other wait on RabbitMQ (see `bench`'s module docs).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use serde::Serialize;
use tokio::process::{Child, Command};

use super::{BenchError, SpawnOptions, amqp_connection, bare_queue, broker_within};
use crate::broker::Broker;
use crate::config::Config;
use crate::names::Names;

/// How long the spawned processes get to start consuming.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd process gets before SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// Memory of one spawned process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessMemory {
    /// `dispatcher` or `worker`.
    pub role: &'static str,
    /// Its pid.
    pub pid: u32,
    /// Peak resident set (`VmHWM`), in MB (10^6 bytes).
    pub peak_rss_mb: Option<f64>,
    /// Resident set when read (`VmRSS`), in MB.
    pub rss_mb: Option<f64>,
}

/// How one spawned process ended.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessExit {
    /// `dispatcher` or `worker`.
    pub role: &'static str,
    /// Its pid.
    pub pid: u32,
    /// Exit status as text.
    pub status: String,
    /// Exited by itself with status 0 after SIGTERM.
    pub clean: bool,
}

/// What stopping the deployment left.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// One per process.
    pub exits: Vec<ProcessExit>,
    /// The logs, when kept (a process did not stop cleanly).
    pub logs_dir: Option<String>,
}

struct Proc {
    role: &'static str,
    pid: u32,
    child: Child,
    log: PathBuf,
}

/// Dispatchers and workers started by the bench. Dropped without
/// [`Deployment::stop`] (an error, Ctrl-C), its processes are killed and its
/// directory deleted.
pub struct Deployment {
    dir: PathBuf,
    config_path: PathBuf,
    options: SpawnOptions,
    procs: Vec<Proc>,
    /// Dispatchers started so far.
    dispatchers: usize,
    /// Workers started so far.
    workers: usize,
    keep_logs: bool,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("config.toml"));
        if !self.keep_logs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn process_err(what: impl std::fmt::Display) -> BenchError {
    BenchError::Process(what.to_string())
}

impl Deployment {
    /// Write the config and start the dispatchers and (if `with_workers`)
    /// the workers, not waiting for them.
    pub async fn start(
        config: &Config,
        options: &SpawnOptions,
        run_id: &str,
        with_workers: bool,
    ) -> Result<Deployment, BenchError> {
        if options.dispatchers == 0 || options.workers == 0 || options.concurrency == 0 {
            return Err(BenchError::Options(
                "--dispatchers, --workers and --concurrency must be at least 1".into(),
            ));
        }
        let dir = std::env::temp_dir().join(format!("conveyor-bench-{run_id}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| process_err(format!("cannot create {}: {e}", dir.display())))?;
        // From here on, whatever fails, dropping `deployment` removes the
        // directory and the config (with its URLs) in it.
        let mut deployment = Deployment {
            config_path: dir.join("config.toml"),
            dir,
            options: options.clone(),
            procs: Vec::new(),
            dispatchers: 0,
            workers: 0,
            keep_logs: false,
        };
        let text = toml::to_string(config)
            .map_err(|e| process_err(format!("cannot write the config: {e}")))?;
        write_private(&deployment.config_path, &text).map_err(|e| {
            process_err(format!(
                "cannot write {}: {e}",
                deployment.config_path.display()
            ))
        })?;

        // Declare the queues first (as the dispatcher would, same arguments),
        // so that checking their consumers never meets a missing queue.
        let broker = crate::runtime::amqp_broker(config)
            .await
            .map_err(|e| BenchError::Broker(e.to_string()))?;
        broker
            .declare(&config.worker.queues)
            .await
            .map_err(|e| BenchError::Broker(format!("declaring the queues: {e}")))?;
        drop(broker);

        for i in 0..options.dispatchers {
            deployment.spawn("dispatcher", i, &["dispatcher".into()])?;
            deployment.dispatchers += 1;
        }
        if with_workers {
            deployment.start_workers()?;
        }
        Ok(deployment)
    }

    /// Start the workers (once; not waiting for them).
    pub fn start_workers(&mut self) -> Result<(), BenchError> {
        let args = [
            "worker".to_owned(),
            "--concurrency".to_owned(),
            self.options.concurrency.to_string(),
        ];
        while self.workers < self.options.workers {
            self.spawn("worker", self.workers, &args)?;
            self.workers += 1;
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        role: &'static str,
        index: usize,
        args: &[String],
    ) -> Result<(), BenchError> {
        let exe: &Path = &self.options.exe;
        let log = self.dir.join(format!("{role}-{index}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| process_err(format!("cannot create {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| process_err(format!("cannot open {}: {e}", log.display())))?;
        let mut command = Command::new(exe);
        command
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("CONVEYOR_") {
                command.env_remove(var);
            }
        }
        let child = command
            .spawn()
            .map_err(|e| process_err(format!("cannot start {} {role}: {e}", exe.display())))?;
        let pid = child.id().unwrap_or(0);
        self.procs.push(Proc {
            role,
            pid,
            child,
            log,
        });
        Ok(())
    }

    /// Wait until every dispatcher started consumes the submit queue and
    /// every worker started the task queue; fail if a process exits first.
    pub async fn wait_ready(&mut self, config: &Config) -> Result<(), BenchError> {
        let names = Names::new(&config.prefix);
        let conn = amqp_connection(config, "cannot connect").await?;
        let deadline = Instant::now() + READY_WITHIN;
        let result = loop {
            for p in &mut self.procs {
                if let Ok(Some(status)) = p.child.try_wait() {
                    break_err(p, status)?;
                }
            }
            // Only dispatchers consume the referred queue (workers consume
            // the submit queue too).
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            let dispatchers = consumers(&conn, &names.referred_queue(), left).await?;
            let tasks = consumers(&conn, &names.task_queue("default"), left).await?;
            if dispatchers.unwrap_or(0) as usize >= self.dispatchers
                && tasks.unwrap_or(0) as usize >= self.workers
            {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(process_err(format!(
                    "not consuming within {READY_WITHIN:?} ({} of {} dispatchers, {} of {} workers); logs in {}",
                    dispatchers.unwrap_or(0),
                    self.dispatchers,
                    tasks.unwrap_or(0),
                    self.workers,
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = conn.close(200, "ready".into()).await;
        result
    }

    /// Peak and current resident memory of every process, now.
    pub fn memory(&self) -> Vec<ProcessMemory> {
        self.procs
            .iter()
            .map(|p| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap_or_default();
                ProcessMemory {
                    role: p.role,
                    pid: p.pid,
                    peak_rss_mb: status_kib(&status, "VmHWM:").map(kib_to_mb),
                    rss_mb: status_kib(&status, "VmRSS:").map(kib_to_mb),
                }
            })
            .collect()
    }

    /// SIGTERM every process, wait (SIGKILL those still running 20 s on);
    /// delete the logs unless `keep_logs` (the run failed: an error names
    /// them) or a process did not stop cleanly.
    pub async fn stop(mut self, keep_logs: bool) -> Stopped {
        for p in &self.procs {
            // Only a child not reaped yet: once reaped (it exited during
            // start-up) its pid may be another process's.
            if let Some(pid) = p.child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_WITHIN;
        let mut exits = Vec::new();
        for p in &mut self.procs {
            let (status, clean) = match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(Ok(s)) => (s.to_string(), s.success()),
                Ok(Err(e)) => (format!("wait failed: {e}"), false),
                Err(_) => {
                    let _ = p.child.kill().await;
                    (
                        format!("killed: no exit within {STOP_WITHIN:?} of SIGTERM"),
                        false,
                    )
                }
            };
            exits.push(ProcessExit {
                role: p.role,
                pid: p.pid,
                status,
                clean,
            });
        }
        // Drop deletes the directory unless a process did not stop cleanly.
        self.keep_logs = keep_logs || !exits.iter().all(|e| e.clean);
        let logs_dir = self.keep_logs.then(|| self.dir.display().to_string());
        Stopped { exits, logs_dir }
    }
}

fn break_err(p: &Proc, status: std::process::ExitStatus) -> Result<(), BenchError> {
    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(process_err(format!(
        "{} {} exited during start-up ({status}); {}:\n{}",
        p.role,
        p.pid,
        p.log.display(),
        tail.join("\n")
    )))
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

fn kib_to_mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// `VmHWM:   12345 kB` -> 12345 (the kernel's kB are KiB).
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Consumers of `queue`, or `None` if it does not exist; an error if
/// RabbitMQ does not answer `within`.
async fn consumers(
    conn: &Connection,
    queue: &str,
    within: Duration,
) -> Result<Option<u32>, BenchError> {
    Ok(queue_depth(conn, queue, within)
        .await?
        .map(|(_, consumers)| consumers))
}

/// Ready messages (not counting unacked deliveries) and consumers of
/// `queue`, or `None` if it does not exist (a passive declare on a
/// throwaway channel, as a missing queue closes the channel); an error if
/// RabbitMQ does not answer `within`.
pub async fn queue_depth(
    conn: &Connection,
    queue: &str,
    within: Duration,
) -> Result<Option<(u32, u32)>, BenchError> {
    let declare = async {
        let channel = conn.create_channel().await.ok()?;
        let info = channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = channel.close(200, "checked".into()).await;
        Some((info.message_count(), info.consumer_count()))
    };
    broker_within(within, &format!("passive declare of {queue}"), declare).await
}

/// A live deployment must have its submit queue and `default` task queue
/// consumed, or the jobs would only pile up.
/// RabbitMQ's answers are awaited for at most `within` each.
pub async fn check_live(
    config: &Config,
    names: &Names,
    queues: &[String],
    within: Duration,
) -> Result<(), BenchError> {
    let conn = amqp_connection(config, "cannot connect").await?;
    // Only dispatchers consume the referred queue.
    let dispatchers = consumers(&conn, &names.referred_queue(), within).await?;
    let tasks = consumers(&conn, &names.task_queue("default"), within).await?;
    let _ = conn.close(200, "checked".into()).await;
    let missing = |q: String, n: Option<u32>, who: &str| match n {
        None => Err(BenchError::Options(format!(
            "queue {q} does not exist: is a deployment running under prefix {:?}? (or use --spawn)",
            names.prefix()
        ))),
        Some(0) => Err(BenchError::Options(format!(
            "no {who} consumes {q}: start one (or use --spawn)"
        ))),
        Some(_) => Ok(()),
    };
    missing(names.referred_queue(), dispatchers, "dispatcher")?;
    if !queues.iter().any(|q| q == "default") {
        tracing::warn!("the config's worker queues do not include `default`, where bench tasks go");
    }
    missing(names.task_queue("default"), tasks, "worker")
}

/// Delete the queues of run `run_id`'s bench deployment and (if `keys`,
/// and only for a `bench-` prefix) every Redis key under its prefix.
pub async fn cleanup(config: &Config, run_id: &str, keys: bool) {
    let names = Names::new(&config.prefix);
    let mut queues = vec![
        names.submit_queue(),
        names.referred_queue(),
        names.dead_queue(),
        bare_queue(&config.prefix, run_id),
    ];
    queues.extend(config.worker.queues.iter().map(|q| names.task_queue(q)));
    if !config.worker.queues.iter().any(|q| q == "default") {
        queues.push(names.task_queue("default"));
    }
    crate::purge::delete_queues(config, &queues).await;
    if keys && config.prefix.starts_with("bench-") {
        crate::purge::delete_keys(config).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_fields_are_read_in_kib() {
        let status = "Name:\tconveyor\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[tokio::test]
    async fn a_start_that_fails_after_writing_the_config_removes_it_and_its_directory() {
        // The CA file is checked when connecting to RabbitMQ, after the
        // config (with the URLs' passwords) was written.
        let config = Config {
            tls_ca_file: Some("/nonexistent/conveyor-bench-test-ca.pem".into()),
            ..Config::default()
        };
        let options = SpawnOptions {
            exe: "conveyor".into(),
            dispatchers: 1,
            workers: 1,
            concurrency: 1,
        };
        let run_id = format!("test-{}", super::super::new_run_id());
        let dir = std::env::temp_dir().join(format!("conveyor-bench-{run_id}"));
        let started = Deployment::start(&config, &options, &run_id, true).await;
        assert!(started.is_err(), "the CA file does not exist");
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
