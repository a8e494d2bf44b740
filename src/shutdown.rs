//! Shutdown as a value: every long-running task holds a [`Shutdown`] and
//! stops taking new work when it fires (as mini-redis does). No global flags.
//!
//! Two steps: the first asks for a graceful stop (running work may finish
//! within its grace period); a second, [`ShutdownTrigger::hurry`], asks
//! that the grace period end now (an operator's second Ctrl-C or SIGTERM:
//! a worker hands its unfinished tasks back at once).

use std::sync::Arc;

use crate::flag::Flag;

/// Fires shutdown for every [`Shutdown`] made from it; when its last
/// clone is dropped, that fires it too (a process whose trigger is gone
/// has no one left to stop it otherwise).
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    owner: Arc<TriggerOwner>,
}

/// Shared by a trigger's clones: fires on drop of the last.
#[derive(Debug)]
struct TriggerOwner {
    fired: Arc<Flag>,
    hurried: Arc<Flag>,
}

impl Drop for TriggerOwner {
    fn drop(&mut self) {
        self.fired.set(true);
    }
}

/// A handle that learns when shutdown was asked for. A [`Flag`], not a
/// `watch`: waiters wake in a fixed order (see [`crate::flag`]).
#[derive(Debug, Clone)]
pub struct Shutdown {
    fired: Arc<Flag>,
    hurried: Arc<Flag>,
}

impl ShutdownTrigger {
    /// A trigger that has not fired.
    pub fn new() -> ShutdownTrigger {
        ShutdownTrigger {
            owner: Arc::new(TriggerOwner {
                fired: Arc::new(Flag::new(false)),
                hurried: Arc::new(Flag::new(false)),
            }),
        }
    }

    /// A handle to hand to a task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            fired: self.owner.fired.clone(),
            hurried: self.owner.hurried.clone(),
        }
    }

    /// Ask every holder to stop.
    pub fn trigger(&self) {
        self.owner.fired.set(true);
    }

    /// Ask every holder to stop now: shutdown fires, and so does
    /// [`Shutdown::hurried`], which ends any grace period.
    pub fn hurry(&self) {
        self.owner.fired.set(true);
        self.owner.hurried.set(true);
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
        self.fired.get()
    }

    /// Wait until shutdown is asked for (or every trigger is gone).
    pub async fn wait(&mut self) {
        self.fired.wait_for(true).await;
    }

    /// Wait until a stop now is asked for ([`ShutdownTrigger::hurry`]);
    /// never, if it is not.
    pub async fn hurried(&mut self) {
        self.hurried.wait_for(true).await;
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

    /// Wait until `deadline`: `true` when it came, `false` when shutdown
    /// was asked for first (checked first, as in [`Shutdown::tick`]).
    pub async fn sleep_until(&mut self, deadline: tokio::time::Instant) -> bool {
        tokio::select! {
            biased;
            _ = self.wait() => false,
            _ = tokio::time::sleep_until(deadline) => true,
        }
    }
}

/// Fire `trigger` on SIGTERM or SIGINT, and hurry it on a second one. A
/// hurried stop still hands running tasks back and flushes what it
/// confirmed, which takes up to a few bounded waits on an unwell broker;
/// a third signal ends the process at once, with the status a shell gives
/// a command that signal killed (128 + its number: 143 for SIGTERM, 130
/// for SIGINT): its claims lapse and the sweep offers their tasks again,
/// as for a worker killed. The listeners are made once, before the first
/// signal, so that none sent between two of them is missed (a listener
/// made later does not see it, and the default action, ending the
/// process, is replaced for good once the first exists). With `hangup`,
/// SIGHUP counts as one of them (`conveyor dev` in a terminal closed
/// under it still writes its last snapshot); without, it keeps its
/// default action.
pub fn on_signals(trigger: ShutdownTrigger, hangup: bool) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            let mut hup = if hangup {
                signal(SignalKind::hangup()).ok()
            } else {
                None
            };
            tokio::spawn(async move {
                let mut next = async || -> (&'static str, i32) {
                    let hup_signal = async {
                        match hup.as_mut() {
                            Some(hup) => hup.recv().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = term.recv() => ("SIGTERM", 15),
                        _ = int.recv() => ("SIGINT", 2),
                        _ = hup_signal => ("SIGHUP", 1),
                    }
                };
                let (signal, _) = next().await;
                tracing::info!("{signal}: shutting down (a second one stops at once)");
                trigger.trigger();
                let (signal, _) = next().await;
                tracing::warn!(
                    "second {signal}: stopping now: running tasks are handed back, not waited for (submissions in hand are still settled, each within its bound; a third one exits at once)"
                );
                trigger.hurry();
                let (signal, number) = next().await;
                tracing::error!(
                    "third {signal}: exiting at once; claims held lapse and their tasks are offered again"
                );
                std::process::exit(128 + number);
            });
            return;
        }
    }
    tokio::spawn(async move {
        let signal = stop_signal(hangup).await;
        tracing::info!("{signal}: shutting down (a second one stops at once)");
        trigger.trigger();
        let signal = stop_signal(hangup).await;
        tracing::warn!(
            "second {signal}: stopping now: running tasks are handed back, not waited for (submissions in hand are still settled, each within its bound)"
        );
        trigger.hurry();
    });
}

/// Wait for SIGTERM or SIGINT (Ctrl-C), and SIGHUP too if `hangup` (a
/// command whose terminal or supervisor goes away must still clean up
/// after itself: `conveyor bench --spawn` stops its children); the
/// signal's name.
pub async fn stop_signal(hangup: bool) -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // SIGHUP keeps its default action (the process ends) unless asked
        // for: a handler registered and never read would ignore it.
        let hup = if hangup {
            signal(SignalKind::hangup()).ok()
        } else {
            None
        };
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        if let (Ok(mut term), Ok(mut int)) = (term, int) {
            let hup_signal = async {
                match hup {
                    Some(mut hup) => hup.recv().await,
                    None => std::future::pending().await,
                }
            };
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup_signal => "SIGHUP",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn dropping_every_clone_of_the_trigger_fires_it() {
        let trigger = ShutdownTrigger::new();
        let other = trigger.clone();
        let mut shutdown = trigger.subscribe();
        drop(trigger);
        assert!(!shutdown.is_triggered(), "a clone is left");
        drop(other);
        assert!(shutdown.is_triggered());
        shutdown.wait().await;
    }

    #[tokio::test]
    async fn hurrying_fires_shutdown_too_and_only_hurrying_ends_the_wait_for_it() {
        let trigger = ShutdownTrigger::new();
        let mut shutdown = trigger.subscribe();
        trigger.trigger();
        assert!(shutdown.is_triggered());
        let waiting = tokio::time::timeout(Duration::from_millis(50), shutdown.hurried()).await;
        assert!(waiting.is_err(), "a graceful stop is not a hurried one");
        let other = ShutdownTrigger::new();
        let mut second = other.subscribe();
        other.hurry();
        assert!(second.is_triggered());
        second.hurried().await;
    }

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
    async fn a_sleep_ends_at_its_deadline_or_at_once_on_the_trigger() {
        let trigger = ShutdownTrigger::new();
        let mut shutdown = trigger.subscribe();
        let start = tokio::time::Instant::now();
        let second = std::time::Duration::from_secs(1);
        assert!(shutdown.sleep_until(start + second).await);
        assert_eq!(start.elapsed(), second);
        trigger.trigger();
        assert!(!shutdown.sleep_until(start + 10 * second).await);
        assert_eq!(start.elapsed(), second, "shutdown does not wait");
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
