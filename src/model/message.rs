//! Messages on the wire besides the job itself.

use serde::{Deserialize, Serialize};

/// A task ready to run, as published to `<prefix>.tasks.<queue>`
/// (`schemas/task.schema.json`). It names the execution, nothing more: the
/// worker's claim loads params and dependency results from the store, so a
/// message can be duplicated or redelivered and the claim decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// The job.
    pub job: String,
    /// The task's name in the job.
    pub task: String,
    /// The task's position in the job (its key in the store).
    pub idx: u32,
    /// Which attempt this message starts (1-based).
    pub attempt: u32,
    /// The queue it was published on, without the prefix.
    pub queue: String,
}

/// The dispatcher's answer to a submission that carried `reply_to`
/// (`schemas/submit-reply.schema.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitReply {
    /// The job's id (also for rejected jobs whose id could be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Whether the job was accepted (or already existed).
    pub accepted: bool,
    /// Why not, when not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// True when the id existed already and nothing changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
}

/// Why a message went to `<prefix>.dead` (the `x-conveyor-reason-kind` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Larger than the configured limit.
    TooLarge,
    /// Not JSON at all (or nested beyond the parser's limit).
    NotJson,
    /// A task message that does not decode.
    BadTaskMessage,
    /// A task whose job record vanished from the store.
    JobMissing,
    /// Redelivered too often without an outcome.
    Poison,
}

impl DeadLetterReason {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::TooLarge => "too_large",
            DeadLetterReason::NotJson => "not_json",
            DeadLetterReason::BadTaskMessage => "bad_task_message",
            DeadLetterReason::JobMissing => "job_missing",
            DeadLetterReason::Poison => "poison",
        }
    }
}

impl TaskMessage {
    /// The JSON bytes published to the task queue.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode a task message, naming what is wrong.
    pub fn decode(body: &[u8]) -> Result<TaskMessage, String> {
        serde_json::from_slice(body).map_err(|e| format!("task message: {e}"))
    }
}
