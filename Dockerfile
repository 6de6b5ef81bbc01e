# syntax=docker/dockerfile:1
# Multi-stage build: a full Rust toolchain builds the binary; a slim Debian runs it as a
# non-root user. Migrations are embedded in the binary; the configuration file is copied.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# Every target Cargo.toml names needs a stub, or cargo refuses the manifest.
RUN mkdir -p src/bin && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && echo 'fn main() {}' > src/bin/rapport-bench.rs \
    && cargo build --release --locked --bin rapport \
    && rm -rf src target/release/deps/rapport* target/release/rapport*
COPY build.rs ./
# The checked queries' offline data: the build needs no database.
COPY .sqlx ./.sqlx
ENV SQLX_OFFLINE=true
COPY src ./src
COPY migrations ./migrations
# The /docs UI (Scalar), embedded in the binary.
COPY docs/scalar ./docs/scalar
# COPY keeps the files' modification times, which may be older than the stub build.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin rapport \
    && strip target/release/rapport

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin rapport
WORKDIR /app
COPY --from=build /src/target/release/rapport /usr/local/bin/rapport
COPY config ./config
RUN mkdir -p var && chown rapport:rapport var
USER rapport
ENV RAPPORT_LISTEN=0.0.0.0:8080 \
    RAPPORT_LOG_FORMAT=json
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["rapport"]
CMD ["serve"]
