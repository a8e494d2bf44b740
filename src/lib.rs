//! Conveyor: a message-queue-driven worker pool.
//!
//! Clients publish jobs (single tasks or DAGs of tasks) to RabbitMQ. The
//! [`dispatcher`] validates them ([`intake`]), records them in Redis
//! ([`store`]) and puts ready tasks on AMQP queues ([`broker`]). Workers
//! ([`worker`]) claim tasks under a lease, run a pluggable handler
//! (`conveyor_handler::Handler`), apply the outcome and publish the tasks it
//! made ready. Failures are retried with backoff ([`backoff`]); lapsed
//! leases and due retries are swept by dispatchers. Workers may take
//! submissions too, and run a new job's root task without publishing it
//! (`submission.rs`, shared with the dispatcher).
//!
//! The broker and the store are traits; the logic above them never touches
//! lapin or redis types. Start with `docs/ARCHITECTURE.md`.

#![warn(missing_docs)]

pub mod backoff;
pub mod bench;
pub mod broker;
pub mod config;
pub mod consumer;
pub mod dag;
pub mod dispatcher;
pub mod embedded;
pub mod flag;
pub mod health;
pub mod http;
pub mod intake;
pub mod machine;
pub mod model;
pub mod names;
pub mod outbox;
pub mod panics;
pub mod purge;
pub mod runtime;
pub mod shutdown;
pub mod store;
pub(crate) mod submission;
pub mod telemetry;
pub mod text;
pub mod worker;

pub use conveyor_handler as handler;
