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

use async_trait::async_trait;
use conveyor::config::Config;
use conveyor::shutdown::{ShutdownTrigger, on_signals};
use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext, ValidationError};
use serde_json::{Value, json};

/// `greet`: `{"name": "Ada"}` in, `{"greeting": "hello, Ada"}` out.
struct Greet;

#[async_trait]
impl Handler for Greet {
    fn name(&self) -> &str {
        "greet"
    }

    fn validate(&self, params: &Value) -> Result<(), ValidationError> {
        match params.get("name") {
            Some(Value::String(_)) => Ok(()),
            _ => Err(ValidationError::new("params.name", "required, a string")),
        }
    }

    async fn run(&self, _ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::permanent("params.name: required, a string"))?;
        Ok(Outcome::Done(
            json!({ "greeting": format!("hello, {name}") }),
        ))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(None)?;
    conveyor::telemetry::init(config.log_format, "info");
    let registry = conveyor_builtin_handlers::registry().with(Greet);
    let trigger = ShutdownTrigger::new();
    on_signals(trigger.clone());
    if std::env::args().nth(1).as_deref() == Some("dispatcher") {
        conveyor::runtime::run_dispatcher(&config, registry, trigger.subscribe()).await
    } else {
        conveyor::runtime::run_worker(&config, registry, trigger.subscribe()).await
    }
}
