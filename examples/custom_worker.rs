//! Your own handler in your own worker binary.
//!
//! The dispatcher validates every task's params with its handler when a job
//! is submitted, so it must know `greet` too: this binary runs either role
//! with the same registry (same `CONVEYOR_*` environment for both):
//!
//! ```text
//! cargo run --example custom_worker -- dispatcher &
//! cargo run --example custom_worker &
//! conveyor submit greet.json --wait
//! ```
//!
//! with `greet.json` holding
//! `{"requestor": "me", "tasks": [{"name": "hi", "handler": "greet", "params": {"name": "Ada"}}]}`.

use std::time::Duration;

use async_trait::async_trait;
use conveyor::config::Config;
use conveyor::shutdown::{ShutdownTrigger, on_signals};
use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext, ValidationError};
use serde_json::{Value, json};

/// Longest `pause_ms` a job may ask for: one hour.
const MAX_PAUSE_MS: u64 = 3_600_000;

/// `greet`: `{"name": "Ada"}` in, `{"greeting": "hello, Ada"}` out. An
/// optional `pause_ms` stands for blocking work (a C library, a slow
/// disk): it runs on tokio's blocking threads, never on the runtime's.
struct Greet;

/// The params, checked.
fn parse(params: &Value) -> Result<(&str, u64), ValidationError> {
    let Some(Value::String(name)) = params.get("name") else {
        return Err(ValidationError::new("params.name", "required, a string"));
    };
    let pause_ms = match params.get("pause_ms") {
        None => 0,
        Some(v) => v.as_u64().filter(|ms| *ms <= MAX_PAUSE_MS).ok_or_else(|| {
            ValidationError::new(
                "params.pause_ms",
                format!("an integer from 0 to {MAX_PAUSE_MS}"),
            )
        })?,
    };
    Ok((name, pause_ms))
}

#[async_trait]
impl Handler for Greet {
    fn name(&self) -> &str {
        "greet"
    }

    fn validate(&self, params: &Value) -> Result<(), ValidationError> {
        parse(params).map(|_| ())
    }

    async fn run(&self, _ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        let (name, pause_ms) =
            parse(&params).map_err(|e| HandlerError::permanent(e.to_string()))?;
        let greeting = format!("hello, {name}");
        let greeting = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(pause_ms));
            greeting
        })
        .await
        .map_err(|e| HandlerError::transient(format!("the blocking work failed: {e}")))?;
        Ok(Outcome::Done(json!({ "greeting": greeting })))
    }
}

/// Not `#[tokio::main]`: `conveyor::runtime::block_on` builds the runtime
/// the config asks for and, once the worker has stopped, does not wait
/// forever for blocking work still running (its task was handed back).
fn main() -> anyhow::Result<()> {
    let config = Config::load(None)?;
    conveyor::telemetry::init(config.log_format, "info");
    let registry = conveyor_builtin_handlers::registry().with(Greet);
    conveyor::runtime::block_on(config.runtime_threads, async move {
        let trigger = ShutdownTrigger::new();
        on_signals(trigger.clone(), false);
        if std::env::args().nth(1).as_deref() == Some("dispatcher") {
            conveyor::runtime::run_dispatcher(&config, registry, trigger.subscribe()).await
        } else {
            conveyor::runtime::run_worker(&config, registry, trigger.subscribe()).await
        }
    })?
}
