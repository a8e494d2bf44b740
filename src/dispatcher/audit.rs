//! The audit after a Redis server change (the `start-up recovery from the
//! store` of nog's observer, for a store that may have lost its latest
//! writes). Lost writes always come with a restart or a failover, so a
//! server the deployment has not audited yet may hold records whose
//! schedule entries went with those writes: a claim lost with its lease
//! entry while its worker died, its message long acked, would wait for
//! ever. The audit walks the job index and has the store put back what
//! every unfinished job's record calls for; the sweep then does the rest.
//!
//! It runs in its own loop beside the sweep, so a large job index (about a
//! second per 100,000 jobs kept) does not hold up retries and lapsed leases.

use crate::shutdown::Shutdown;
use crate::store::StoreError;

use super::Dispatcher;

/// Job index entries per page of an audit (one `ZSCAN`, one pipeline of
/// audit calls, one of `ZADD GT`).
const AUDIT_BATCH: usize = 200;

/// How long the audit waits after the store refused it for good (an
/// answer this code does not understand) before it asks again.
const AUDIT_REFUSED_PAUSE: std::time::Duration = std::time::Duration::from_secs(300);

impl Dispatcher {
    pub(super) async fn audit_forever(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.options.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.tick(&mut tick).await {
            match self.audit_if_due().await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "audit failed; will retry");
                }
                Err(e) => {
                    // Asking again at once would fail alike, twice a
                    // second; never asking again would leave the audit
                    // undone for good once the cause (a store of another
                    // version beside this one) is gone.
                    tracing::error!(error = %e, pause_s = AUDIT_REFUSED_PAUSE.as_secs(),
                        "audit impossible on this store now: after a Redis restart or failover, \
                         tasks whose claims it lost wait until a worker's outcome is refused; \
                         trying again after a pause");
                    let resume = tokio::time::Instant::now() + AUDIT_REFUSED_PAUSE;
                    if !shutdown.sleep_until(resume).await {
                        return;
                    }
                }
            }
        }
    }

    /// If the store's server is not the one the last complete audit was
    /// of (a restart, a failover: it may have lost its latest writes), walk
    /// the job index and put back the schedule entries unfinished jobs call
    /// for, so the sweep that follows offers again what lost writes left
    /// stranded (a claim lost with its lease entry while its worker died).
    /// Every dispatcher that sees the change audits (idempotent); one that
    /// dies midway leaves the audit due for the next pass. Returns whether
    /// an audit ran.
    pub async fn audit_if_due(&self) -> Result<bool, StoreError> {
        let Some(server) = self.store.audit_due().await? else {
            return Ok(false);
        };
        tracing::info!(
            server = %server,
            "store server is new to this deployment (restart or failover): auditing unfinished jobs"
        );
        let (mut jobs, mut wanted, mut added, mut unusable) = (0, 0, 0, 0);
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .store
                .audit_jobs(cursor.as_deref(), AUDIT_BATCH)
                .await?;
            jobs += page.jobs;
            wanted += page.wanted.len();
            added += page.added;
            unusable += page.unusable;
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        self.store.audit_done(&server).await?;
        // Ready tasks have no schedule entry in the normal course: each
        // gets one now, and its message is published once more.
        tracing::info!(jobs, wanted, added, unusable, "audit done");
        Ok(true)
    }
}
