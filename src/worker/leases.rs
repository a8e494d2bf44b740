//! The claims a worker holds, and the loop that renews their leases while
//! handlers run. One renewal call per period (a third of the lease) covers
//! every live claim.
//!
//! A renewal that fails (the store unreachable) is tried again after
//! [`RENEW_RETRY`], not a whole period later. Once the store is back, a
//! claim whose lease lapsed meanwhile is renewed within about that retry,
//! well inside the second in which dispatchers leave lapsed leases alone
//! after an outage (`dispatcher/sweep.rs`, `RECLAIM_GRACE`), so its run
//! survives the outage; and should a sweep be first all the same (a
//! dispatcher that did not see the outage), the worker learns that its
//! claim is lost and stops the run within about that retry, instead of
//! running beside the new claim for up to a third of a lease.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Journal;
use crate::health::Health;
use crate::store::{ClaimRef, Store};

/// How soon a failed renewal is tried again (at most a period).
pub(super) const RENEW_RETRY: Duration = Duration::from_millis(100);

/// One claim held, and the signal that tells its run it is lost.
struct Held {
    claim: ClaimRef,
    lost: Arc<Notify>,
    /// When the claim, or the last renewal of it the store confirmed, was
    /// asked for: its lease runs for at least a lease from then.
    confirmed: Instant,
}

/// Claims held by this worker, keyed by (job, task index), each with the
/// signal that tells its run the claim is lost.
#[derive(Clone)]
pub(super) struct ActiveClaims {
    inner: Arc<Mutex<BTreeMap<(String, u32), Held>>>,
    journal: Option<Journal>,
}

/// Fires when a renewal finds the claim no longer held (its lease lapsed
/// and the task moved on, or the store lost it): the run should stop,
/// since another claim may be running the task.
///
/// It also ends the claim's renewals if its run's task panics (dropped
/// while unwinding): the run's ends, which take a claim out of the
/// renewals, would never come, and renewed for ever by a live worker, the
/// claim would hold its task `running` with nothing running it. Left to
/// lapse, the task is the sweep's (its next attempt).
pub(super) struct ClaimLost {
    lost: Arc<Notify>,
    active: ActiveClaims,
    claim: ClaimRef,
}

impl ClaimLost {
    pub(super) async fn wait(&self) {
        self.lost.notified().await;
    }
}

impl Drop for ClaimLost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let claim = &self.claim;
            tracing::error!(job = %claim.job, idx = claim.idx, fence = claim.fence,
                "the run of this claim panicked; no longer renewing it (the sweep takes the task over when its lease lapses)");
            self.active.remove(claim);
        }
    }
}

impl ActiveClaims {
    pub(super) fn new(journal: Option<Journal>) -> ActiveClaims {
        ActiveClaims {
            inner: Arc::default(),
            journal,
        }
    }

    /// Renew `claim`, asked for at `asked`, from now on; the returned
    /// signal fires if it is lost.
    ///
    /// A claim this worker still holds for the same task is an older
    /// attempt's that the store has already taken back (it granted this
    /// one): its run is told it is lost. Keeping both under one key, as the
    /// first versions did, left the older run going and let its end remove
    /// the newer claim, which then went unrenewed until its lease lapsed.
    pub(super) fn insert(&self, claim: ClaimRef, asked: Instant) -> ClaimLost {
        let lost = Arc::new(Notify::new());
        let new_fence = claim.fence;
        let signal = ClaimLost {
            lost: lost.clone(),
            active: self.clone(),
            claim: claim.clone(),
        };
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let older = map.insert(
            (claim.job.clone(), claim.idx),
            Held {
                claim,
                lost,
                confirmed: asked,
            },
        );
        if let Some(older) = older {
            let claim = &older.claim;
            tracing::warn!(job = %claim.job, idx = claim.idx, fence = claim.fence, new_fence,
                "claim superseded by this worker's newer claim of the task; stopping its run");
            older.lost.notify_one();
        }
        signal
    }

    /// Renew `claim` again, confirmed at `confirmed`, after [`Self::remove`]
    /// took it out (a release the store did not answer), unless another
    /// claim of its task is held by now.
    pub(super) fn put_back(&self, claim: &ClaimRef, confirmed: Instant) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Entry::Vacant(vacant) = map.entry((claim.job.clone(), claim.idx)) {
            vacant.insert(Held {
                claim: claim.clone(),
                lost: Arc::new(Notify::new()),
                confirmed,
            });
        }
    }

    /// Stop renewing `claim` (its run ended), if it is still the one held
    /// for its task.
    pub(super) fn remove(&self, claim: &ClaimRef) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Entry::Occupied(held) = map.entry((claim.job.clone(), claim.idx))
            && held.get().claim == *claim
        {
            held.remove();
        }
    }

    /// When `claim` (if held) or its last renewal the store confirmed was
    /// asked for.
    pub(super) fn confirmed(&self, claim: &ClaimRef) -> Option<Instant> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(claim.job.clone(), claim.idx))
            .filter(|held| held.claim == *claim)
            .map(|held| held.confirmed)
    }

    /// Note that the store confirmed `claim`'s renewal asked for at `asked`.
    pub(super) fn confirm(&self, claim: &ClaimRef, asked: Instant) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(&(claim.job.clone(), claim.idx))
            && held.claim == *claim
        {
            held.confirmed = held.confirmed.max(asked);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Take `claim` out if it is still the one held for its task, and tell
    /// its run it is lost. Returns whether it was there.
    fn lose(&self, claim: &ClaimRef) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (claim.job.clone(), claim.idx);
        if map.get(&key).is_none_or(|held| held.claim != *claim) {
            return false;
        }
        if let Some(held) = map.remove(&key) {
            // Stored if the run is not waiting yet: it sees it when it does.
            held.lost.notify_one();
        }
        true
    }

    fn snapshot(&self) -> Vec<ClaimRef> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(|held| held.claim.clone()).collect()
    }

    /// Renew every claim held, every third of `lease`; a renewal the store
    /// could not answer marks it down in `health` (if given), so that the
    /// worker's consumers give back what they hold: a worker whose slots
    /// are all busy claims nothing, and a renewal is then the only call
    /// that can tell it the store is gone.
    pub(super) async fn renew_forever(
        &self,
        store: Arc<dyn Store>,
        lease: Duration,
        health: Option<Health>,
    ) {
        // Renews through shutdown too: handlers may still be running in the
        // grace period. The worker aborts this task when it exits.
        let period = lease / 3;
        let retry = RENEW_RETRY.min(period);
        let mut failing = false;
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::time::sleep_until(next).await;
            next += period;
            let claims = self.snapshot();
            if claims.is_empty() {
                continue;
            }
            let asked = Instant::now();
            match store.renew(&claims, lease).await {
                Ok(held) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("lease renewal works again");
                    }
                    for (claim, held) in claims.iter().zip(held) {
                        if held {
                            self.confirm(claim, asked);
                            if let Some(j) = &self.journal {
                                j.record('R', claim, None);
                            }
                        } else if self.lose(claim) {
                            // Still ours by our books, no longer by the
                            // store's: renewed no more (its lease entry is
                            // the sweep's now), and its run is stopped.
                            tracing::warn!(job = %claim.job, idx = claim.idx, fence = claim.fence,
                                "claim lost (lease lapsed and the task moved on, or the store lost it); stopping its run");
                        }
                    }
                }
                Err(e) => {
                    if let Some(health) = health.as_ref().filter(|_| e.is_retryable()) {
                        health.mark_store_down();
                    }
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64,
                            "lease renewal failed; trying again until the store answers");
                    } else {
                        tracing::debug!(error = %e, "lease renewal failed again");
                    }
                    next = tokio::time::Instant::now() + retry;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::intake::{Intake, JobIntake};
    use crate::store::memory::{MemoryStore, TokioClock};
    use crate::store::{ClaimOutcome, Created};

    const LEASE: Duration = Duration::from_millis(3_000);
    const BASE_MS: u64 = 1_000_000;

    /// A store on tokio's paused clock holding one running task, and its
    /// claim.
    async fn store_with_a_claim() -> (Arc<MemoryStore>, ClaimRef) {
        let store = Arc::new(MemoryStore::new(
            Arc::new(TokioClock::new(BASE_MS)),
            Duration::from_secs(3600),
            1,
            "test",
        ));
        let intake =
            JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry()).unwrap();
        let body = r#"{"id": "j", "requestor": "r", "tasks": [{"name": "t", "handler": "noop"}]}"#;
        let Intake::Valid(planned) = intake.accept(body.as_bytes()) else {
            panic!("the job is not valid");
        };
        let Created::New { ready } = store.create_job(&planned).await.unwrap() else {
            panic!("the job exists");
        };
        let ClaimOutcome::Claimed(claimed) = store.claim(&ready[0], "w", LEASE).await.unwrap()
        else {
            panic!("the claim failed");
        };
        (store, claimed.claim)
    }

    /// The claim's lease expiry, in ms after the clock's base.
    fn expiry(store: &MemoryStore) -> u64 {
        let expiry = store.inspect_records(|records| {
            let mut found = None;
            for record in records {
                found = found.or(record.tasks[0].lease_expiry);
            }
            found
        });
        expiry.expect("a running task") - BASE_MS
    }

    fn claim_of(attempt: u32, fence: u64) -> ClaimRef {
        ClaimRef {
            job: "j".into(),
            idx: 0,
            attempt,
            fence,
        }
    }

    #[tokio::test]
    async fn a_newer_claim_of_the_same_task_stops_the_older_run_and_outlives_its_end() {
        let active = ActiveClaims::new(None);
        let (older, newer) = (claim_of(1, 10), claim_of(2, 11));
        let older_lost = active.insert(older.clone(), Instant::now());
        let newer_lost = active.insert(newer.clone(), Instant::now());
        tokio::time::timeout(Duration::from_secs(1), older_lost.wait())
            .await
            .expect("the older run is told its claim is lost");
        // The older run ends: the newer claim is still renewed.
        active.remove(&older);
        assert_eq!(active.snapshot(), vec![newer.clone()]);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), newer_lost.wait())
                .await
                .is_err(),
            "the newer claim is not lost"
        );
        active.remove(&newer);
        assert!(active.snapshot().is_empty());
    }

    #[test]
    fn a_run_that_panics_stops_its_claims_renewals_and_one_that_ends_does_not_by_itself() {
        let active = ActiveClaims::new(None);
        let (panicking, ending) = (claim_of(1, 10), claim_of(1, 11));
        let ending = ClaimRef { idx: 1, ..ending };
        let lost = active.insert(panicking.clone(), Instant::now());
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _lost = lost;
            panic!("a bug in the run");
        }));
        assert!(run.is_err());
        assert!(active.snapshot().is_empty(), "{:?}", active.snapshot());
        // A run's signal dropped without a panic leaves its claim to the
        // run's end (`remove`), as before.
        drop(active.insert(ending.clone(), Instant::now()));
        assert_eq!(active.snapshot(), vec![ending]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_tried_again_soon_not_a_period_later() {
        let (store, claim) = store_with_a_claim().await;
        let active = ActiveClaims::new(None);
        let lost = active.insert(claim, Instant::now());
        let renewing = {
            let (active, store) = (active.clone(), store.clone());
            tokio::spawn(async move { active.renew_forever(store, LEASE, None).await })
        };
        // Renewed at once, then every second (a third of the lease).
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(expiry(&store), 3_000);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(expiry(&store), 4_000);
        // The store goes away past the lease, and comes back at 5,050 ms.
        store.set_outage(true);
        tokio::time::sleep(Duration::from_millis(4_040)).await;
        store.set_outage(false);
        // Renewed at the next retry (5,100 ms), not at the next period.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(expiry(&store), 5_100 + 3_000);
        // And every period again from there.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(expiry(&store), 6_100 + 3_000);
        assert!(
            tokio::time::timeout(Duration::ZERO, lost.wait())
                .await
                .is_err(),
            "the claim was renewed, not lost"
        );
        renewing.abort();
    }
}
