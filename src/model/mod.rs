//! The nouns of Conveyor: jobs, tasks, their states, and the messages that
//! carry them. Wire names are explicit strings (`#[serde(rename)]`), never
//! Rust type names, and every message here has a JSON Schema in `schemas/`.

pub mod job;
pub mod message;
pub mod state;

pub use job::{JobSpec, RetryPolicy, TaskSpec};
pub use message::{DeadLetterReason, SubmitReply, TaskMessage};
pub use state::{JobState, TaskState};
