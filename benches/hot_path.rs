//! Benchmarks of the pure functions on Conveyor's hot path: task message
//! encode/decode (every hop), intake (every submission), DAG building and
//! the initial ready set (every submission of a DAG), and the job state
//! machine (`machine.rs`, the specification the Lua functions mirror and
//! the in-process store runs): planning each transition of a single-task
//! job, and the DAG readiness a completion computes in a 10,000-wide
//! fan-out.
//!
//! Run with `cargo bench --bench hot_path`. Setup (building and cloning
//! records, undoing a transition) is never inside the timed part.

#![allow(missing_docs)]

use std::cell::RefCell;
use std::hint::black_box;

use conveyor::bench::Shape;
use conveyor::config::Config;
use conveyor::dag::Dag;
use conveyor::intake::{Intake, JobIntake, PlannedJob};
use conveyor::machine::JobRecord;
use conveyor::model::{TaskMessage, TaskState};
use conveyor::store::{Applied, AttemptResult, ClaimOutcome, ClaimRef};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn job_body(shape: Shape) -> Vec<u8> {
    format!(
        r#"{{"id":"b-hot-1","requestor":"bench","labels":{{"bench":"hot"}},"tasks":{}}}"#,
        shape.tasks_json()
    )
    .into_bytes()
}

fn intake() -> JobIntake {
    match JobIntake::new(&Config::default(), conveyor_builtin_handlers::registry()) {
        Ok(i) => i,
        Err(e) => panic!("intake: {e}"),
    }
}

fn planned(intake: &JobIntake, shape: Shape) -> PlannedJob {
    match intake.accept(&job_body(shape)) {
        Intake::Valid(job) => job,
        other => panic!("{shape} is not a valid job: {other:?}"),
    }
}

/// Names and `after` lists of a fan-out/fan-in of `total` tasks: one root,
/// `total - 2` children, one join after all children.
fn fan_out_in(total: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let k = total - 2;
    let mut names = vec!["root".to_owned()];
    let mut after = vec![Vec::new()];
    for i in 0..k {
        names.push(format!("c{i}"));
        after.push(vec!["root".to_owned()]);
    }
    names.push("join".to_owned());
    after.push((0..k).map(|i| format!("c{i}")).collect());
    (names, after)
}

fn task_message(c: &mut Criterion) {
    let msg = TaskMessage {
        job: "0198c2f4-6a1e-7b3c-9d2e-4f5a6b7c8d9e".into(),
        task: "resize-thumbnail".into(),
        idx: 42,
        attempt: 1,
        queue: "default".into(),
    };
    let bytes = msg.encode();
    let mut g = c.benchmark_group("task_message");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| b.iter(|| black_box(&msg).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| TaskMessage::decode(black_box(&bytes)))
    });
    g.finish();
}

fn intake_accept(c: &mut Criterion) {
    let intake = intake();
    let mut g = c.benchmark_group("intake_accept");
    for (name, shape) in [
        ("single", Shape::Single),
        ("fanout_100_tasks", Shape::Fanout(98)),
    ] {
        let body = job_body(shape);
        g.throughput(Throughput::Elements(shape.tasks() as u64));
        g.bench_function(name, |b| b.iter(|| intake.accept(black_box(&body))));
    }
    g.finish();
}

fn dag(c: &mut Criterion) {
    let (names, after) = fan_out_in(10_000);
    let built = match Dag::build(&names, &after) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut g = c.benchmark_group("dag");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("build_fanout_10000_tasks", |b| {
        b.iter(|| Dag::build(black_box(&names), black_box(&after)))
    });
    g.bench_function("roots_fanout_10000_tasks", |b| {
        b.iter(|| black_box(&built).roots())
    });
    g.finish();
}

fn planned_roots(c: &mut Criterion) {
    let intake = intake();
    let mut g = c.benchmark_group("planned_job_roots");
    for (name, shape) in [
        ("single", Shape::Single),
        ("fanout_100_tasks", Shape::Fanout(98)),
        ("fanout_10000_tasks", Shape::Fanout(9_998)),
    ] {
        let job = planned(&intake, shape);
        g.throughput(Throughput::Elements(shape.tasks() as u64));
        g.bench_function(name, |b| {
            b.iter(|| black_box(&job).roots().collect::<Vec<u32>>())
        });
    }
    g.finish();
}

fn intake_plan_large(c: &mut Criterion) {
    // The 10,000-task fan-out through the whole intake (parse, schema,
    // limits, handlers, DAG), as the dispatcher does it once per such job.
    let intake = intake();
    let body = job_body(Shape::Fanout(9_998));
    let mut g = c.benchmark_group("intake_accept_large");
    g.sample_size(20);
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("fanout_10000_tasks", |b| {
        b.iter_batched(
            || body.clone(),
            |body| intake.accept(&body),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// A fixed clock: the machine takes the time as an argument.
const NOW: u64 = 1_780_000_000_000;
const LEASE_MS: u64 = 10_000;
const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
const FENCE_BASE: u64 = 1 << 20;

fn claim(record: &mut JobRecord, idx: u32) -> ClaimRef {
    let attempt = record.tasks[idx as usize].attempt;
    match record.claim(idx, attempt, "w-bench", LEASE_MS, u64::MAX, NOW) {
        ClaimOutcome::Claimed(c) => c.claim,
        other => panic!("claim of task {idx}: {other:?}"),
    }
}

fn succeeded() -> AttemptResult {
    AttemptResult::Succeeded("{}".into())
}

fn complete(record: &mut JobRecord, claim: &ClaimRef, result: &AttemptResult) -> Applied {
    record.complete(claim, result, "w-bench", NOW)
}

fn ready_count(applied: &Applied) -> usize {
    match applied {
        Applied::Done {
            duplicate: false,
            ready,
            ..
        } => ready.len(),
        other => panic!("completion not applied: {other:?}"),
    }
}

/// The transitions of a single-task job: create (`create.lua`), claim
/// (`claim.lua`), complete with success (`complete.lua`, which also
/// finishes the job).
fn machine_single(c: &mut Criterion) {
    let intake = intake();
    let job = planned(&intake, Shape::Single);
    let created = JobRecord::create(&job, NOW, RETENTION_MS, FENCE_BASE, "d-bench");
    let mut claimed = created.clone();
    let claim_ref = claim(&mut claimed, 0);
    let result = succeeded();

    let mut g = c.benchmark_group("machine_single_task");
    g.throughput(Throughput::Elements(1));
    g.bench_function("create", |b| {
        b.iter_with_large_drop(|| {
            JobRecord::create(black_box(&job), NOW, RETENTION_MS, FENCE_BASE, "d-bench")
        })
    });
    g.bench_function("claim", |b| {
        b.iter_batched_ref(
            || created.clone(),
            |r| r.claim(0, 1, "w-bench", LEASE_MS, u64::MAX, NOW),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("complete_success", |b| {
        b.iter_batched_ref(
            || claimed.clone(),
            |r| complete(r, black_box(&claim_ref), &result),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// DAG readiness on completion in a fan-out/fan-in with 10,000 children
/// (10,002 tasks): the root's success releases all 10,000 children (state,
/// history entry and task message each); the last child's success releases
/// the join.
fn machine_fanout(c: &mut Criterion) {
    const WIDTH: usize = 10_000;
    let intake = intake();
    let job = planned(&intake, Shape::Fanout(WIDTH));
    let join = (WIDTH + 1) as u32;
    let ok = succeeded();

    // The root claimed: its completion is the benchmark.
    let mut root_claimed = JobRecord::create(&job, NOW, RETENTION_MS, FENCE_BASE, "d-bench");
    let root_claim = claim(&mut root_claimed, 0);

    // Every child but the last succeeded, the last one claimed.
    let mut last_claimed = root_claimed.clone();
    assert_eq!(
        ready_count(&complete(&mut last_claimed, &root_claim, &ok)),
        WIDTH
    );
    for idx in 1..WIDTH as u32 {
        let c = claim(&mut last_claimed, idx);
        assert_eq!(ready_count(&complete(&mut last_claimed, &c, &ok)), 0);
    }
    let last = WIDTH as u32;
    let last_claim = claim(&mut last_claimed, last);

    // Cloning 10,002 tasks per iteration would take far longer than
    // completing one child: for that benchmark the record is restored in
    // place instead (untimed), field by field, from the values before.
    let undo = Undo::of(&last_claimed, last, join);
    let record = RefCell::new(last_claimed.clone());
    {
        let mut r = record.borrow_mut();
        assert_eq!(ready_count(&complete(&mut r, &last_claim, &ok)), 1);
        assert_eq!(r.tasks[join as usize].state, TaskState::Ready);
        undo.restore(&mut r);
        assert!(*r == last_claimed, "the undo restores the record exactly");
    }

    let mut g = c.benchmark_group("machine_fanout_10000");
    g.sample_size(20);
    g.throughput(Throughput::Elements(WIDTH as u64));
    g.bench_function("complete_root_releases_10000", |b| {
        b.iter_batched_ref(
            || root_claimed.clone(),
            |r| complete(r, black_box(&root_claim), &ok),
            BatchSize::LargeInput,
        )
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("complete_last_child_releases_join", |b| {
        b.iter_batched_ref(
            || undo.restore(&mut record.borrow_mut()),
            |_| complete(&mut record.borrow_mut(), black_box(&last_claim), &ok),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// What completing task `child` (and releasing `join`) changes in a record.
struct Undo {
    child: usize,
    join: usize,
    child_task: (
        TaskState,
        Option<String>,
        Option<String>,
        Option<u64>,
        Option<u64>,
    ),
    join_task: (TaskState, u32, u32),
    open: u32,
    version: u64,
    updated_ms: u64,
    history: usize,
}

impl Undo {
    fn of(r: &JobRecord, child: u32, join: u32) -> Undo {
        let (child, join) = (child as usize, join as usize);
        let c = &r.tasks[child];
        let j = &r.tasks[join];
        Undo {
            child,
            join,
            child_task: (
                c.state,
                c.result.clone(),
                c.error.clone(),
                c.last_fence,
                c.lease_expiry,
            ),
            join_task: (j.state, j.deps_left, j.attempt),
            open: r.open,
            version: r.version,
            updated_ms: r.updated_ms,
            history: r.history.len(),
        }
    }

    fn restore(&self, r: &mut JobRecord) {
        let c = &mut r.tasks[self.child];
        (c.state, c.result, c.error, c.last_fence, c.lease_expiry) = self.child_task.clone();
        let j = &mut r.tasks[self.join];
        (j.state, j.deps_left, j.attempt) = self.join_task;
        r.open = self.open;
        r.version = self.version;
        r.updated_ms = self.updated_ms;
        r.history.truncate(self.history);
    }
}

criterion_group!(
    benches,
    task_message,
    intake_accept,
    dag,
    planned_roots,
    intake_plan_large,
    machine_single,
    machine_fanout
);
criterion_main!(benches);
