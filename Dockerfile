# syntax=docker/dockerfile:1
# The `conveyor` binary (dispatcher, worker and CLI) on Debian bookworm.
#   docker build -t conveyor .
#   docker run --rm conveyor --help

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p conveyor \
    && install -m 0755 target/release/conveyor /usr/local/bin/conveyor

FROM debian:bookworm-slim
# ca-certificates for amqps:// and rediss://; python3 for `shell` tasks
# (examples/diamond.json runs one); curl for the health checks of /readyz;
# tini as PID 1, to reap what `shell` tasks leave (a helper killed with its
# program's group is re-parented to PID 1, which the worker, tokio reaping
# only its own children, would leave a zombie) and to pass on signals.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl python3 tini \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin conveyor
COPY --from=builder /usr/local/bin/conveyor /usr/local/bin/conveyor
USER conveyor
ENV CONVEYOR_LOG_FORMAT=json
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/conveyor"]
CMD ["--help"]
