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
# (examples/diamond.json runs one); curl for the health checks of /readyz.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl python3 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin conveyor
COPY --from=builder /usr/local/bin/conveyor /usr/local/bin/conveyor
USER conveyor
ENV CONVEYOR_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/conveyor"]
CMD ["--help"]
