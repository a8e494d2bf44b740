//! A boolean that tasks can wait on, for the process-wide gates (the store
//! is up; shutdown was asked for).
//!
//! Not a tokio `watch` channel: tokio spreads a `watch`'s waiters over
//! several queues picked at random, so the order in which they wake (which
//! consumer takes the next delivery, which gives its deliveries back first)
//! differed from run to run, and a simulation seed did not always replay
//! exactly. A `Notify` wakes its waiters in a fixed order.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A boolean with a wake-up for those waiting for a value.
#[derive(Debug, Default)]
pub struct Flag {
    value: AtomicBool,
    changed: Notify,
}

impl Flag {
    /// A flag holding `value`.
    pub fn new(value: bool) -> Flag {
        Flag {
            value: AtomicBool::new(value),
            changed: Notify::new(),
        }
    }

    /// The value now.
    pub fn get(&self) -> bool {
        self.value.load(Ordering::SeqCst)
    }

    /// Set the value, waking every waiter; returns the value it had.
    pub fn set(&self, value: bool) -> bool {
        let was = self.value.swap(value, Ordering::SeqCst);
        if was != value {
            self.changed.notify_waiters();
        }
        was
    }

    /// Wait until the value is `value`.
    pub async fn wait_for(&self, value: bool) {
        // Already so (the common case, asked once per delivery): no
        // registration with the `Notify`, whose lock every waiter shares.
        if self.get() == value {
            return;
        }
        loop {
            // Registered before the check, so a change between the two is
            // not missed.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.get() == value {
                return;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_value_it_waits_for_is_set() {
        let flag = Arc::new(Flag::new(false));
        let waiter = tokio::spawn({
            let flag = flag.clone();
            async move { flag.wait_for(true).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(!flag.set(true));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap_or_else(|_| panic!("the waiter was not woken"))
            .unwrap_or_else(|e| panic!("{e}"));
        // Already so: no wait at all.
        flag.wait_for(true).await;
    }
}
