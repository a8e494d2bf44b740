//! The workers' execution journal (`conveyor::worker::Journal`, one line
//! per claim start, renewal and end) read back as the record of truth that
//! the fault and failure tests check the invariants against: it lives
//! outside Redis, so a bug in the store cannot hide itself.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use conveyor::model::JobState;

use super::Deployment;

/// One claim's run, as the journal tells it (times in unix ns).
#[derive(Debug, Clone)]
pub struct Run {
    pub attempt: u32,
    pub fence: u64,
    pub worker: String,
    pub start: u128,
    pub last_alive: u128,
    pub end: Option<u128>,
    pub outcome: Option<String>,
}

/// Parse the journal into runs per (job, task index), by start.
pub fn read_journal(path: &Path) -> BTreeMap<(String, u32), Vec<Run>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut runs: HashMap<(String, u32, u64), Run> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert!(f.len() >= 7, "short journal line {line:?}");
        let (kind, job, idx, fence, ns) = (
            f[0],
            f[1].to_owned(),
            f[2].parse::<u32>().unwrap(),
            f[4].parse::<u64>().unwrap(),
            f[5].parse::<u128>().unwrap(),
        );
        let run = runs.entry((job, idx, fence)).or_insert_with(|| Run {
            attempt: f[3].parse().unwrap(),
            fence,
            worker: f[6].to_owned(),
            start: ns,
            last_alive: ns,
            end: None,
            outcome: None,
        });
        match kind {
            "S" => {
                run.start = ns;
                run.last_alive = run.last_alive.max(ns);
            }
            "R" => run.last_alive = run.last_alive.max(ns),
            "E" => {
                run.end = Some(ns);
                run.outcome = f.get(7).map(|o| (*o).to_owned());
            }
            other => panic!("unknown journal kind {other}"),
        }
    }
    let mut out: BTreeMap<(String, u32), Vec<Run>> = BTreeMap::new();
    for ((job, idx, _), run) in runs {
        out.entry((job, idx)).or_default().push(run);
    }
    for runs in out.values_mut() {
        runs.sort_by_key(|r| (r.start, r.fence));
    }
    out
}

/// How many runs the journal says have ended: a cheap progress signal.
pub fn ended_runs(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|j| j.lines().filter(|l| l.starts_with("E ")).count())
        .unwrap_or(0)
}

/// The runs of one task, by start.
pub fn runs_of(path: &Path, job: &str, idx: u32) -> Vec<Run> {
    read_journal(path)
        .remove(&(job.to_owned(), idx))
        .unwrap_or_default()
}

/// No task ran under two live claims at once. A claim is live from its
/// start until its end or until its lease (`lease_of` its worker) lapsed
/// after the last renewal the worker recorded, whichever is first.
pub fn assert_no_overlapping_claims(path: &Path, lease_of: impl Fn(&str) -> Duration) {
    for ((job, idx), runs) in &read_journal(path) {
        for pair in runs.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let lease_ns = lease_of(&a.worker).as_nanos();
            let a_live_end = a.end.unwrap_or(u128::MAX).min(a.last_alive + lease_ns);
            assert!(
                b.start >= a_live_end,
                "{job}/{idx}: claim {} ({}) started {} ms before claim {} ({}) stopped being live",
                b.fence,
                b.worker,
                (a_live_end - b.start) / 1_000_000,
                a.fence,
                a.worker
            );
        }
    }
}

/// Every accepted job is terminal; each task's outcome and each job's end
/// were applied once; accepted = succeeded + failed + cancelled. Returns
/// the count of jobs per state.
pub async fn assert_jobs_settled(
    d: &Deployment,
    ids: &[impl AsRef<str>],
    within: Duration,
) -> BTreeMap<JobState, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        let id = id.as_ref();
        let status = d.wait_terminal(id, within).await;
        *counts.entry(status.state).or_insert(0) += 1;
        let mut terminal_per_task: HashMap<&str, usize> = HashMap::new();
        for h in &status.history {
            match h.task.as_deref() {
                Some(t) if matches!(h.to.as_str(), "succeeded" | "failed" | "cancelled") => {
                    *terminal_per_task.entry(t).or_insert(0) += 1;
                }
                _ => {}
            }
        }
        for (task, n) in terminal_per_task {
            assert_eq!(n, 1, "{id}/{task}: outcome applied {n} times");
        }
        let ends = status
            .history
            .iter()
            .filter(|h| {
                h.task.is_none()
                    && JobState::ALL
                        .iter()
                        .any(|s| s.is_terminal() && s.as_str() == h.to)
            })
            .count();
        assert_eq!(ends, 1, "{id}: job finished {ends} times");
    }
    let settled: usize = [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        .iter()
        .map(|s| counts.get(s).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        settled,
        ids.len(),
        "accepted = succeeded + failed + cancelled: {counts:?}"
    );
    counts
}

/// Every task Redis records as succeeded got its result from a run the
/// journal saw end `succeeded` at the attempt Redis counts last: the store
/// applied no outcome that no handler produced (the journal is written
/// before each outcome goes to the store, outside it). The journal knows
/// tasks by index and the status by name, so per job and attempt: no more
/// tasks succeeded in Redis than tasks with a successful run in the journal.
pub async fn assert_every_success_was_run(d: &Deployment, ids: &[impl AsRef<str>], path: &Path) {
    let journal = read_journal(path);
    for id in ids {
        let id = id.as_ref();
        let status = d
            .status(id)
            .await
            .unwrap_or_else(|| panic!("{id}: no record"));
        let mut recorded: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for (name, task) in &status.tasks {
            if task.state == conveyor::model::TaskState::Succeeded {
                recorded.entry(task.attempts).or_default().push(name);
            }
        }
        for (attempt, names) in recorded {
            let run = journal
                .iter()
                .filter(|((job, _), runs)| {
                    job == id
                        && runs.iter().any(|r| {
                            r.attempt == attempt && r.outcome.as_deref() == Some("succeeded")
                        })
                })
                .count();
            assert!(
                names.len() <= run,
                "{id}: {names:?} succeeded at attempt {attempt} in Redis, but the journal has \
                 only {run} task(s) of the job with a successful run at that attempt"
            );
        }
    }
}
