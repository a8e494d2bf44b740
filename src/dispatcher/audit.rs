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
//! An audit the store interrupts (an outage, a refused page) resumes where
//! it stopped when it is tried again, as long as the server is the same:
//! the pages walked have their entries back, and a restart or failover
//! meanwhile (another server) starts it over. Until the thirty-second
//! session every error started it over, so an index too large to walk
//! between two of a flaky link's drops was never audited.

use std::future::Future;

use crate::shutdown::Shutdown;
use crate::store::{AuditPage, StoreError};

use super::Dispatcher;

/// Job index entries per page of an audit (one `ZSCAN`, one pipeline of
/// audit calls, one of `ZADD GT`).
const AUDIT_BATCH: usize = 200;

/// How long the audit waits after the store refused it for good (an
/// answer this code does not understand) before it asks again.
const AUDIT_REFUSED_PAUSE: std::time::Duration = std::time::Duration::from_secs(300);

/// How far the audit of one server has come: kept between tries, so one
/// interrupted resumes rather than starts over.
#[derive(Debug, Default, Clone, PartialEq)]
struct AuditProgress {
    /// The server (`run_id`) being audited.
    server: String,
    /// Where the next page starts; `None` at the start.
    next: Option<String>,
    /// The whole job index is walked: only recording the audit is left.
    walked: bool,
    /// Job index entries looked at so far.
    jobs: usize,
    /// Schedule entries the unfinished ones called for.
    wanted: usize,
    /// Of those, how many the indexes lacked and were given.
    added: usize,
    /// Records the store could not act on, skipped.
    unusable: usize,
}

impl AuditProgress {
    fn of(server: String) -> AuditProgress {
        AuditProgress {
            server,
            ..AuditProgress::default()
        }
    }

    /// Walk on through the job index from where it stopped, a page at a
    /// time (`page` fetches and audits the one starting after its
    /// argument), until the end or an error (after which it is where the
    /// failed page starts).
    async fn walk<F, Fut>(&mut self, mut page: F) -> Result<(), StoreError>
    where
        F: FnMut(Option<String>) -> Fut,
        Fut: Future<Output = Result<AuditPage, StoreError>>,
    {
        while !self.walked {
            let done = page(self.next.clone()).await?;
            self.jobs += done.jobs;
            self.wanted += done.wanted.len();
            self.added += done.added;
            self.unusable += done.unusable;
            match done.next {
                Some(next) => self.next = Some(next),
                None => self.walked = true,
            }
        }
        Ok(())
    }
}

impl Dispatcher {
    pub(super) async fn audit_forever(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.options.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut left = None;
        while shutdown.tick(&mut tick).await {
            match self.audit_resuming(&mut left).await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "audit failed; will resume");
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
        self.audit_resuming(&mut None).await
    }

    /// [`Self::audit_if_due`], resuming the audit `left` says was
    /// interrupted if it is of the same server, and leaving in `left`
    /// where this one stopped if it is interrupted in turn.
    async fn audit_resuming(&self, left: &mut Option<AuditProgress>) -> Result<bool, StoreError> {
        let Some(server) = self.store.audit_due().await? else {
            *left = None;
            return Ok(false);
        };
        let mut progress = match left.take() {
            Some(progress) if progress.server == server => {
                tracing::info!(server = %server, jobs = progress.jobs, "resuming the audit of unfinished jobs");
                progress
            }
            _ => {
                tracing::info!(
                    server = %server,
                    "store server is new to this deployment (restart or failover): auditing unfinished jobs"
                );
                AuditProgress::of(server)
            }
        };
        let store = &self.store;
        let mut audited = progress
            .walk(|from| async move { store.audit_jobs(from.as_deref(), AUDIT_BATCH).await })
            .await;
        if audited.is_ok() {
            audited = self.store.audit_done(&progress.server).await;
        }
        if let Err(e) = audited {
            *left = Some(progress);
            return Err(e);
        }
        // Ready tasks have no schedule entry in the normal course: each
        // gets one now, and its message is published once more.
        let AuditProgress {
            jobs,
            wanted,
            added,
            unusable,
            ..
        } = progress;
        tracing::info!(jobs, wanted, added, unusable, "audit done");
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    type Page = std::future::Ready<Result<AuditPage, StoreError>>;

    /// A job index of `pages` pages of two jobs, as a store's audit walks
    /// it (one schedule entry added per page); the call for the page after
    /// `fail_after` fails once. Every call is noted in `asked`.
    fn index<'a>(
        pages: usize,
        fail_after: &'static str,
        asked: &'a RefCell<Vec<Option<String>>>,
    ) -> impl FnMut(Option<String>) -> Page + 'a {
        let mut failed = false;
        move |from: Option<String>| {
            asked.borrow_mut().push(from.clone());
            if from.as_deref() == Some(fail_after) && !std::mem::replace(&mut failed, true) {
                return std::future::ready(Err(StoreError::Unavailable("link dropped".into())));
            }
            let at = from.map_or(0, |f| f.parse::<usize>().unwrap() + 1);
            std::future::ready(Ok(AuditPage {
                jobs: 2,
                added: 1,
                next: (at + 1 < pages).then(|| at.to_string()),
                ..AuditPage::default()
            }))
        }
    }

    #[tokio::test]
    async fn an_interrupted_audit_resumes_at_the_page_it_failed_on() {
        let asked = RefCell::new(Vec::new());
        let mut pages = index(4, "1", &asked);
        let mut progress = AuditProgress::of("server-a".into());
        let first = progress.walk(&mut pages).await;
        assert!(
            matches!(first, Err(StoreError::Unavailable(_))),
            "{first:?}"
        );
        assert!(!progress.walked);
        assert_eq!((progress.jobs, progress.added), (4, 2), "two pages audited");
        progress.walk(&mut pages).await.unwrap();
        assert!(progress.walked);
        assert_eq!((progress.jobs, progress.added), (8, 4), "each page once");
        let from: Vec<Option<String>> = asked.borrow().clone();
        let from: Vec<Option<&str>> = from.iter().map(|f| f.as_deref()).collect();
        assert_eq!(
            from,
            [None, Some("0"), Some("1"), Some("1"), Some("2")],
            "the failed page is asked for again, and none before it"
        );
        // Walked, it asks for nothing more (recording it is what is left).
        progress.walk(&mut pages).await.unwrap();
        assert_eq!(asked.borrow().len(), 5);
    }
}
