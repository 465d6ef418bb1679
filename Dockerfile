# moat container image: a Rust builder stage and a minimal runtime.
#   docker build -t moat:dev .
# The runtime runs as a numeric non-root user (10001), needs no writable
# path but the store volume (/var/lib/moat) and /tmp, so it runs with a
# read-only root filesystem; config and keys are mounted as files, never
# passed in ENV or ARG (nothing secret is baked into a layer).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p moat \
 && install -D -m 0755 target/release/moat /out/moat

# debian slim rather than distroless: the same glibc as the builder, and a
# shell for the HEALTHCHECK probe below (no curl needed).
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/moat \
 && install -d -m 0755 /etc/moat
COPY --from=build /out/moat /usr/local/bin/moat
COPY deploy/docker/moat.toml /etc/moat/moat.toml
USER 10001:10001
# Not secret: where the store lives (the volume below).
ENV MOAT_HOME=/var/lib/moat
VOLUME ["/var/lib/moat"]
EXPOSE 8080 8082
# Liveness only (/health); readiness is /ready, used by orchestrators.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/moat"]
CMD ["serve", "--config", "/etc/moat/moat.toml"]
