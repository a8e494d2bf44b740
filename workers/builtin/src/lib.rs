//! Conveyor's built-in handlers.
//!
//! These four handlers ship with every worker so that a fresh deployment can
//! run real jobs before anyone writes a handler of their own, and so that the
//! worker's own machinery (retries, time-outs, panics, dependency results) can
//! be exercised end to end:
//!
//! - [`Noop`] (`"noop"`) echoes its params: the smallest possible task, for
//!   wiring checks and benchmarks of the queue itself.
//! - [`Sleep`] (`"sleep"`) waits a given number of milliseconds: a task that
//!   takes time, for time-outs, cancellation and load tests.
//! - [`Fail`] (`"fail"`) fails on purpose — transiently, permanently, or by
//!   panicking — to test retry policies and the worker's panic isolation.
//! - [`Shell`] (`"shell"`) runs an outside program with JSON in and JSON out:
//!   the escape hatch that lets any language be a Conveyor handler.
//!
//! [`registry`] returns a [`Registry`] holding all four under their wire names.

use conveyor_handler::Registry;

pub mod fail;
mod group_watch;
pub mod noop;
pub mod shell;
pub mod sleep;

pub use fail::Fail;
pub use noop::Noop;
pub use shell::Shell;
pub use sleep::Sleep;

/// A registry holding every built-in handler: `noop`, `sleep`, `fail`,
/// `shell`.
pub fn registry() -> Registry {
    Registry::new()
        .with(Noop)
        .with(Sleep)
        .with(Fail)
        .with(Shell)
}

/// Refuse a params field outside `known`, naming it (`params.<key>`): a
/// misspelt field is an error at submission, not quietly ignored.
pub(crate) fn reject_unknown_fields(
    obj: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
) -> Result<(), conveyor_handler::ValidationError> {
    let Some(key) = obj.keys().find(|k| !known.contains(&k.as_str())) else {
        return Ok(());
    };
    let expected = match known {
        [only] => format!("expected only {only}"),
        _ => format!("expected one of {}", known.join(", ")),
    };
    Err(conveyor_handler::ValidationError::new(
        format!("params.{key}"),
        format!("unknown field; {expected}"),
    ))
}

/// A task context for unit tests.
#[cfg(test)]
pub(crate) fn test_ctx(attempt: u32) -> conveyor_handler::TaskContext {
    conveyor_handler::TaskContext {
        job_id: "job-test".to_owned(),
        task: "task-test".to_owned(),
        attempt,
        max_attempts: 5,
        fence: 1,
        deps: std::collections::BTreeMap::new(),
        timeout: std::time::Duration::from_secs(30),
        max_result_bytes: 1024 * 1024,
    }
}

/// Whether process `pid` no longer runs: gone, or a zombie waiting for
/// whatever reaps orphans here.
#[cfg(test)]
pub(crate) fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_holds_all_four_by_wire_name() {
        let reg = registry();
        assert_eq!(reg.names(), vec!["fail", "noop", "shell", "sleep"]);
        for name in reg.names() {
            assert!(reg.get(&name).is_some_and(|h| h.name() == name));
        }
    }
}
