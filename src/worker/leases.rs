//! The claims a worker holds, and the loop that renews their leases while
//! handlers run. One renewal call per period covers every live claim.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::Journal;
use crate::store::{ClaimRef, Store};

/// One claim held, and the signal that tells its run it is lost.
struct Held {
    claim: ClaimRef,
    lost: Arc<Notify>,
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
pub(super) struct ClaimLost(Arc<Notify>);

impl ClaimLost {
    pub(super) async fn wait(&self) {
        self.0.notified().await;
    }
}

impl ActiveClaims {
    pub(super) fn new(journal: Option<Journal>) -> ActiveClaims {
        ActiveClaims {
            inner: Arc::default(),
            journal,
        }
    }

    /// Renew `claim` from now on; the returned signal fires if it is lost.
    pub(super) fn insert(&self, claim: ClaimRef) -> ClaimLost {
        let lost = Arc::new(Notify::new());
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            (claim.job.clone(), claim.idx),
            Held {
                claim,
                lost: lost.clone(),
            },
        );
        ClaimLost(lost)
    }

    pub(super) fn remove(&self, claim: &ClaimRef) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(claim.job.clone(), claim.idx));
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

    pub(super) async fn renew_forever(&self, store: Arc<dyn Store>, lease: Duration) {
        // Renews through shutdown too: handlers may still be running in the
        // grace period. The worker aborts this task when it exits.
        let mut tick = tokio::time::interval(lease / 3);
        loop {
            tick.tick().await;
            let claims = self.snapshot();
            if claims.is_empty() {
                continue;
            }
            match store.renew(&claims, lease).await {
                Ok(held) => {
                    for (claim, held) in claims.iter().zip(held) {
                        if held {
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
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }
}
