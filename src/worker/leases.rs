//! The claims a worker holds, and the loop that renews their leases while
//! handlers run. One renewal call per period covers every live claim.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Journal;
use crate::store::{ClaimRef, Store};

/// Claims held by this worker, keyed by (job, task index).
#[derive(Clone)]
pub(super) struct ActiveClaims {
    inner: Arc<Mutex<BTreeMap<(String, u32), ClaimRef>>>,
    journal: Option<Journal>,
}

impl ActiveClaims {
    pub(super) fn new(journal: Option<Journal>) -> ActiveClaims {
        ActiveClaims {
            inner: Arc::default(),
            journal,
        }
    }

    pub(super) fn insert(&self, claim: ClaimRef) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.insert((claim.job.clone(), claim.idx), claim);
    }

    pub(super) fn remove(&self, claim: &ClaimRef) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(claim.job.clone(), claim.idx));
    }

    pub(super) fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn contains(&self, claim: &ClaimRef) -> bool {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(claim.job.clone(), claim.idx)) == Some(claim)
    }

    fn snapshot(&self) -> Vec<ClaimRef> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
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
                        } else if self.contains(claim) {
                            // Stop renewing it: its lease entry is the sweep's now.
                            self.remove(claim);
                            // Still ours by our books, no longer by the store's.
                            tracing::warn!(job = %claim.job, idx = claim.idx, fence = claim.fence,
                                "claim lost (lease lapsed and the task moved on); its outcome will be rejected");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }
}
