//! An optional execution journal: one line per run started, lease renewed
//! and claim ended, appended to a file outside Redis.
//!
//! It exists so that what ran, when, and under which claim can be audited
//! (and checked by the fault-injection tests) independently of the store
//! that decided it. Enabled by `CONVEYOR_JOURNAL=/path/file`. Lines are
//! written with `O_APPEND` in one `write` each, so several worker processes
//! can share one file:
//!
//! ```text
//! S <job> <idx> <attempt> <fence> <unix ns> <worker>     run started
//! R <job> <idx> <attempt> <fence> <unix ns> <worker>     lease renewed
//! E <job> <idx> <attempt> <fence> <unix ns> <worker> <outcome>
//! ```
//!
//! `S` is written as the handler starts, under a claim already taken (and
//! checked not to have lapsed); `E` ends the claim with its outcome
//! (`succeeded`, `retry`, `failed`, or `handed_back` when a stopping
//! worker gives the claim back). A claim handed back before its run began
//! has an `E` without an `S`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::ClaimRef;

/// An append-only journal file.
#[derive(Clone)]
pub struct Journal {
    file: Arc<Mutex<File>>,
    worker: String,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("worker", &self.worker)
            .finish()
    }
}

impl Journal {
    /// Open (create) `path` for appending.
    pub fn open(path: &Path, worker: &str) -> std::io::Result<Journal> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal {
            file: Arc::new(Mutex::new(file)),
            worker: worker.to_owned(),
        })
    }

    /// Record one event about a claim.
    pub fn record(&self, kind: char, claim: &ClaimRef, outcome: Option<&str>) {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut line = format!(
            "{kind} {} {} {} {} {ns} {}",
            claim.job, claim.idx, claim.attempt, claim.fence, self.worker
        );
        if let Some(o) = outcome {
            line.push(' ');
            line.push_str(o);
        }
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "journal write failed");
        }
    }
}
