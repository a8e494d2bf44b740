//! Benchmarks of the pure functions on Conveyor's hot path: task message
//! encode/decode (every hop), intake (every submission), DAG building and
//! the initial ready set (every submission of a DAG).
//!
//! Run with `cargo bench --bench hot_path`.

#![allow(missing_docs)]

use std::hint::black_box;

use conveyor::bench::Shape;
use conveyor::config::Config;
use conveyor::dag::Dag;
use conveyor::intake::{Intake, JobIntake, PlannedJob};
use conveyor::model::TaskMessage;
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

criterion_group!(
    benches,
    task_message,
    intake_accept,
    dag,
    planned_roots,
    intake_plan_large
);
criterion_main!(benches);
