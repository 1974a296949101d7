# twinroute's container image:  docker build -t twinroute .
#   openssl rand -hex 32 >ingest-token; openssl rand -hex 32 >admin-token
#   docker run -d --name twinroute --stop-timeout 45 -v twinroute-state:/var/lib/twinroute \
#     -v "$PWD/ingest-token:/run/secrets/twinroute-ingest-token:ro" \
#     -v "$PWD/admin-token:/run/secrets/twinroute-admin-token:ro" \
#     -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 twinroute
# scripts/container performs these steps outside Docker (CI runs it, as there is no Docker engine
# there): the same build command, the runtime stage's files at the same paths, its user, its
# entrypoint, command and health check. It reads them from this file and refuses instructions it
# does not know, so a change here that it cannot follow fails CI instead of rotting.

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# Dependencies in their own layers, rebuilt only when a manifest or Cargo.lock changes: the
# workspace's manifests with placeholder sources (every [[bench]] needs its file for cargo to
# read the manifest), built once.
COPY Cargo.toml Cargo.lock ./
COPY emulator/Cargo.toml emulator/
RUN mkdir -p src emulator/src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > emulator/src/main.rs && touch emulator/src/lib.rs \
 && for bench in $(sed -n '/^\[\[bench\]\]/{n;s/^name *= *"\(.*\)"/\1/p}' Cargo.toml); do echo 'fn main() {}' > "benches/$bench.rs"; done
RUN cargo build --release --locked

# The sources (config/ holds the demo configuration the binary embeds). They can be older than
# the placeholders, so they are touched for cargo to rebuild the workspace's crates.
COPY src src
COPY emulator/src emulator/src
COPY config config
RUN touch src/main.rs src/lib.rs emulator/src/main.rs emulator/src/lib.rs \
 && cargo build --release --locked

# The runtime: Debian slim with what the binary links (libssl3), CA certificates, and curl for
# the HEALTHCHECK (twinroute has no health-check command, and distroless has no curl).
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 twinroute \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/twinroute \
      --shell /usr/sbin/nologin twinroute \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/twinroute
COPY --from=builder /src/target/release/twinroute /usr/local/bin/twinroute
COPY deploy/container/twinroute.toml /etc/twinroute/twinroute.toml
# A numeric user, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/twinroute
# state_dir: the admin API's changes and the durable spool.
VOLUME ["/var/lib/twinroute"]
# 8080: ingest (POST /events). 8081: admin API (/healthz, /readyz, /metrics, /eventroutes,
# /endpoints). Both need their bearer token (the files under /run/secrets, see above), except
# the probes /healthz and /readyz.
EXPOSE 8080 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8081/healthz"]
# SIGTERM: intake closes, queues drain (up to 30 s), exit 0. Give `docker stop` that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["twinroute"]
CMD ["run", "--config", "/etc/twinroute/twinroute.toml"]
