//! Shutdown as a value: every long-running task holds a [`Shutdown`] and
//! stops taking new work when it fires (as mini-redis does). No global flags.

use tokio::sync::watch;

/// Fires shutdown for every [`Shutdown`] made from it.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

/// A handle that learns when shutdown was asked for.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl ShutdownTrigger {
    /// A trigger that has not fired.
    pub fn new() -> ShutdownTrigger {
        let (tx, _) = watch::channel(false);
        ShutdownTrigger {
            tx: std::sync::Arc::new(tx),
        }
    }

    /// A handle to hand to a task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }

    /// Ask every holder to stop.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Default for ShutdownTrigger {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Whether shutdown was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Wait until shutdown is asked for (or every trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|fired| *fired).await;
    }

    /// Wait for the next tick of `interval`: `true` when it came, `false`
    /// when shutdown was asked for first (checked first, so a periodic loop
    /// `while shutdown.tick(&mut interval).await { ... }` stops at once).
    pub async fn tick(&mut self, interval: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            biased;
            _ = self.wait() => false,
            _ = interval.tick() => true,
        }
    }
}

/// Fire `trigger` on SIGTERM or SIGINT.
pub fn on_signals(trigger: ShutdownTrigger) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate());
            let int = signal(SignalKind::interrupt());
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        trigger.trigger();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handle_sees_the_trigger() {
        let trigger = ShutdownTrigger::new();
        let mut a = trigger.subscribe();
        let b = trigger.subscribe();
        assert!(!b.is_triggered());
        trigger.trigger();
        a.wait().await;
        assert!(b.is_triggered());
    }

    #[tokio::test(start_paused = true)]
    async fn a_periodic_loop_ticks_until_the_trigger_then_stops_at_once() {
        let trigger = ShutdownTrigger::new();
        let mut shutdown = trigger.subscribe();
        let mut interval = tokio::time::interval(std::time::Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        assert!(
            shutdown.tick(&mut interval).await,
            "the first tick is immediate"
        );
        assert!(shutdown.tick(&mut interval).await);
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(1));
        trigger.trigger();
        assert!(
            !shutdown.tick(&mut interval).await,
            "shutdown ends the loop"
        );
        assert_eq!(
            start.elapsed(),
            std::time::Duration::from_secs(1),
            "no waiting for the next tick"
        );
    }
}
