//! The sweep (the `poke` of LUCI CV): promotes due retries and recovers
//! tasks whose claim's lease lapsed. Safe with many dispatchers at once:
//! every action is a checked store transition, and schedule entries are
//! forgotten only after their messages are confirmed.

use crate::shutdown::Shutdown;
use crate::store::{StoreError, SweepAction};

use super::Dispatcher;

const SWEEP_BATCH: usize = 500;

impl Dispatcher {
    pub(super) async fn sweep_forever(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.options.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            // Also notices a Redis that lost its data (see RedisStore::check_epoch).
            if let Err(e) = self.store.ping().await {
                tracing::warn!(error = %e, "store unreachable; sweep skipped");
                continue;
            }
            match self.sweep_once().await {
                Ok(n) if n > 0 => tracing::debug!(actions = n, "sweep"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweep failed; will retry"),
            }
        }
    }

    /// One pass: due retries, then lapsed leases. Returns how many schedule
    /// entries were acted on.
    pub async fn sweep_once(&self) -> Result<usize, SweepError> {
        let mut total = 0;
        loop {
            let actions = self.store.due_retries(SWEEP_BATCH).await?;
            let n = actions.len();
            let done = self.publish_actions(&actions).await?;
            self.store.forget_retries(&done).await?;
            total += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
        loop {
            let actions = self
                .store
                .expired_leases(SWEEP_BATCH, &self.options.id)
                .await?;
            let n = actions.len();
            let done = self.publish_actions(&actions).await?;
            self.store.forget_leases(&done).await?;
            total += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
        Ok(total)
    }

    async fn publish_actions(&self, actions: &[SweepAction]) -> Result<Vec<String>, SweepError> {
        let tasks: Vec<_> = actions
            .iter()
            .flat_map(|a| a.publish.iter().cloned())
            .collect();
        self.outbox.publish_tasks(&tasks).await?;
        Ok(actions.iter().map(|a| a.entry.clone()).collect())
    }
}

/// Why a sweep pass stopped early (the next pass repeats it).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
}
