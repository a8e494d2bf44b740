//! Job and task states. The Lua scripts spell the same strings; the
//! `all_states_round_trip` test keeps the two sides from drifting.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The state of a job as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted; no task has been claimed yet.
    Pending,
    /// At least one task has been claimed and not every task is terminal.
    Running,
    /// Every task succeeded.
    Succeeded,
    /// Every task is terminal and at least one failed.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
    /// Never accepted: the submission was invalid (the error says why).
    Rejected,
}

impl JobState {
    /// Every state, for exhaustive tests and filters.
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Rejected,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Rejected => "rejected",
        }
    }

    /// Whether the job can change no more.
    pub fn is_terminal(self) -> bool {
        match self {
            JobState::Pending | JobState::Running => false,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Rejected => {
                true
            }
        }
    }
}

/// The state of one task (see the state machine in docs/ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Some dependency has not succeeded yet.
    Waiting,
    /// Published to its queue, waiting for a worker's claim.
    Ready,
    /// Claimed by a worker under a lease.
    Running,
    /// A transient error; the next attempt is scheduled.
    Retrying,
    /// The handler started outside work and waits for a notification.
    Awaiting,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl TaskState {
    /// Every state, for exhaustive tests.
    pub const ALL: [TaskState; 8] = [
        TaskState::Waiting,
        TaskState::Ready,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Awaiting,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "waiting",
            TaskState::Ready => "ready",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Awaiting => "awaiting",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether the task can change no more.
    pub fn is_terminal(self) -> bool {
        match self {
            TaskState::Waiting
            | TaskState::Ready
            | TaskState::Running
            | TaskState::Retrying
            | TaskState::Awaiting => false,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => true,
        }
    }
}

/// A state string that is not one of ours (a drifted script or a corrupt record).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl FromStr for TaskState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_states_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>(), Ok(st));
            assert_eq!(serde_json::to_value(st).ok(), Some(st.as_str().into()));
        }
        for st in TaskState::ALL {
            assert_eq!(st.as_str().parse::<TaskState>(), Ok(st));
            assert_eq!(serde_json::to_value(st).ok(), Some(st.as_str().into()));
        }
    }

    #[test]
    fn lua_scripts_spell_only_known_task_states() {
        let scripts = crate::store::redis::SCRIPT_BODIES;
        let common = ("common", crate::store::redis::COMMON);
        for (name, src) in scripts.into_iter().chain([common]) {
            // Comments may hold apostrophes; code is what spells states.
            let code: String = src
                .lines()
                .map(|l| l.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            for quoted in code.split('\'').skip(1).step_by(2) {
                let looks_like_state = quoted.chars().all(|c| c.is_ascii_lowercase())
                    && ["ing", "ed", "ready"].iter().any(|s| quoted.ends_with(s));
                // Script replies (not states) are listed here on purpose.
                const REPLIES: [&str; 10] = [
                    "missing", "created", "exists", "claimed", "applied", "requeued", "released",
                    "failed", "not_held", "ignored",
                ];
                // Lua's own words (`type(x) == 'string'`).
                const LUA_WORDS: [&str; 1] = ["string"];
                if looks_like_state && !REPLIES.contains(&quoted) && !LUA_WORDS.contains(&quoted) {
                    assert!(
                        quoted.parse::<TaskState>().is_ok() || quoted.parse::<JobState>().is_ok(),
                        "{name} spells unknown state '{quoted}'"
                    );
                }
            }
        }
    }
}
