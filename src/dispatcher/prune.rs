//! Pruning the index of recent jobs. A finished job's keys expire by
//! themselves after the retention; its entry in `<prefix>:jobs` (what
//! `conveyor list` reads) would not, and the index would grow with every job
//! ever run. Each dispatcher walks the index's old end now and then and
//! drops the entries whose job is gone. Safe with many dispatchers: removing
//! an entry of a vanished job twice is harmless.

use std::time::Duration;

use crate::shutdown::Shutdown;
use crate::store::StoreError;

use super::Dispatcher;

/// How often a dispatcher prunes. Entries only become prunable a whole
/// retention (days) after their job was created, so a minute's delay costs
/// nothing.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Entries looked at per store call.
const PRUNE_BATCH: usize = 1000;
/// Store calls per pass at most: a backlog is worked off over several
/// passes rather than in one long burst.
const PRUNE_CALLS_PER_PASS: usize = 100;

impl Dispatcher {
    pub(super) async fn prune_forever(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(PRUNE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.tick(&mut tick).await {
            match self.prune_once().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned expired jobs from the index"),
                Err(e) => tracing::debug!(error = %e, "pruning the job index failed; next time"),
            }
        }
    }

    /// One pass over the old end of the job index. Returns how many
    /// entries of expired jobs it removed.
    pub async fn prune_once(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for _ in 0..PRUNE_CALLS_PER_PASS {
            let pruned = self.store.prune_expired(PRUNE_BATCH).await?;
            removed += pruned.removed;
            if !pruned.more {
                break;
            }
        }
        Ok(removed)
    }
}
