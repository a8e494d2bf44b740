#!/usr/bin/env bash
# Run the main job end to end against RabbitMQ and Redis on localhost:
# build (unless CONVEYOR_BIN names a binary), start a dispatcher and a worker in the background under a fresh
# prefix, submit examples/diamond.json with --wait, print the result, stop both.
# Exits with the submit command's code (0 only if the job succeeded).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

missing=0
if ! port_open 5672; then
    echo "RabbitMQ is not accepting connections on 127.0.0.1:5672; start it with:" >&2
    echo "    rabbitmq-server -detached" >&2
    missing=1
fi
if ! port_open 6379; then
    echo "Redis is not accepting connections on 127.0.0.1:6379; start it with:" >&2
    echo "    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no" >&2
    missing=1
fi
if [ "$missing" -ne 0 ]; then
    exit 2
fi

# CONVEYOR_BIN runs a binary built already (CI passes the debug build it
# has just made, rather than spend minutes on a release build).
if [ -n "${CONVEYOR_BIN:-}" ]; then
    bin="$CONVEYOR_BIN"
    if [ ! -x "$bin" ]; then
        echo "CONVEYOR_BIN=$bin is not an executable file" >&2
        exit 2
    fi
else
    echo "building (cargo build --release)..." >&2
    cargo build --release -q
    bin="${CARGO_TARGET_DIR:-target}/release/conveyor"
fi
# A fresh prefix per run, so no state of an earlier run (or of anything else
# on this broker and Redis) is in the way. Set CONVEYOR_PREFIX to choose one.
own_prefix=0
if [ -z "${CONVEYOR_PREFIX:-}" ]; then
    export CONVEYOR_PREFIX="demo-$$"
    own_prefix=1
fi
logs="$(mktemp -d "${TMPDIR:-/tmp}/conveyor-demo.XXXXXX")"
pids=()
keep_logs=1

# After a successful run, remove the run's queues and keys (best effort, if
# rabbitmqctl and redis-cli are at hand); a failed run keeps them for
# `conveyor status`.
forget_prefix() {
    local q
    if command -v rabbitmqctl >/dev/null 2>&1; then
        for q in submit submit.referred dead tasks.default; do
            rabbitmqctl -q delete_queue "$CONVEYOR_PREFIX.$q" >/dev/null 2>&1 || true
        done
    fi
    if command -v redis-cli >/dev/null 2>&1; then
        redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "$CONVEYOR_PREFIX:*" 2>/dev/null |
            xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
    fi
}

cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$keep_logs" -eq 0 ]; then
        rm -rf "$logs"
        if [ "$own_prefix" -eq 1 ]; then
            forget_prefix
        fi
    else
        echo "logs: $logs" >&2
    fi
}
trap cleanup EXIT

"$bin" dispatcher >"$logs/dispatcher.log" 2>&1 &
pids+=("$!")
"$bin" worker >"$logs/worker.log" 2>&1 &
pids+=("$!")

echo "prefix $CONVEYOR_PREFIX: dispatcher pid ${pids[0]}, worker pid ${pids[1]}" >&2
set +e
"$bin" submit examples/diamond.json --wait --timeout-s 120
code=$?
set -e
if [ "$code" -eq 0 ]; then
    keep_logs=0
else
    echo "submit exited with $code; last lines of the logs:" >&2
    tail -n 20 "$logs/dispatcher.log" "$logs/worker.log" >&2 || true
fi
exit "$code"
