//! What Conveyor does about a panic (a bug, in Conveyor or in a handler)
//! so that it costs one piece of work and not the service.
//!
//! A handler's panic fails its attempt (`worker/execute.rs`), a panic in
//! `validate` rejects its job (`intake.rs`), a delivery's task that panics
//! leaves its delivery to come back (`consumer.rs`). The long-lived
//! background loops — the dispatcher's sweep, pruning and audit, a
//! worker's lease renewals and heartbeat — are different: each runs in a
//! task of its own beside the consumers, and one that panicked would end
//! silently while the process went on looking healthy. Without the sweep,
//! due retries are never promoted and lapsed leases never reclaimed;
//! without renewals every claim lapses and its task is run again beside
//! the one still running. [`restart_on_panic`] logs such a panic and starts
//! the loop again after a pause ([`RESTART_PAUSE`]; a worker's renewals
//! sooner, well within the shortest lease), for as long as the process
//! runs.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

/// How long a background loop that panicked waits before it starts
/// again: a panic that recurs at once is logged once a second, not in a
/// busy loop.
pub const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// The message of a caught panic, if it carried one.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Run the background loop `start` makes until it returns (its shutdown),
/// starting it again, after `pause`, each time it panics. `name` says
/// which loop in the error logged.
pub async fn restart_on_panic<F, Fut>(name: &'static str, pause: Duration, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        match AssertUnwindSafe(start()).catch_unwind().await {
            Ok(()) => return,
            Err(payload) => {
                tracing::error!(
                    background_loop = name,
                    panic = panic_message(payload.as_ref()),
                    restart_in_s = pause.as_secs_f64(),
                    "a background loop panicked (a bug: please report it); starting it again"
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_is_started_again_after_a_pause_until_it_returns() {
        let starts = Arc::new(AtomicUsize::new(0));
        let begun = tokio::time::Instant::now();
        let counted = starts.clone();
        restart_on_panic("test", RESTART_PAUSE, move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n < 3 {
                    panic!("loop bug number {n}");
                }
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert_eq!(begun.elapsed(), 2 * RESTART_PAUSE);
    }

    #[test]
    fn a_panic_message_is_read_from_either_kind_of_payload() {
        let literal: Box<dyn Any + Send> = Box::new("literal");
        let formatted: Box<dyn Any + Send> = Box::new(format!("formatted {}", 1));
        let other: Box<dyn Any + Send> = Box::new(7_u8);
        assert_eq!(panic_message(literal.as_ref()), "literal");
        assert_eq!(panic_message(formatted.as_ref()), "formatted 1");
        assert_eq!(panic_message(other.as_ref()), "(no message)");
    }
}
