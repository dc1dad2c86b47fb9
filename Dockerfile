# anteroom in a container: build with the Rust toolchain, run on a slim Debian as a non-root user.
#
#   docker build --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD) -t anteroom .
#   docker run --init -p 8000:8000 anteroom                      # the built-in demo app
#
# The image holds anteroom only. A real app adds its runtime and code on top, for example:
#
#   FROM anteroom
#   USER root
#   RUN apt-get update && apt-get install -y --no-install-recommends php-cgi && rm -rf /var/lib/apt/lists/*
#   COPY app/ /srv/app/
#   USER anteroom
#   ENV ANTEROOM_PARAM="SCRIPT_FILENAME=/srv/app/index.php" ANTEROOM_ENV="PHP_FCGI_MAX_REQUESTS=0"
#   CMD ["--", "php-cgi"]
#
# Every option is an ANTEROOM_* variable (`docker run -e ANTEROOM_WORKERS=8`); repeatable ones take one value
# per line. See README.md, "In a container".

FROM rust:1-bookworm AS build
WORKDIR /src
# .git is not sent (see .dockerignore), so build.rs cannot ask git; the revision comes from the build argument.
ARG GIT_REVISION=""
ENV ANTEROOM_GIT_REVISION=${GIT_REVISION}
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin anteroom \
    && cp target/release/anteroom /usr/local/bin/anteroom

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/anteroom /usr/local/bin/anteroom
# A fixed uid, so that volumes and unix sockets shared with an nginx container can be given to it.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin anteroom
USER anteroom
# Reachable from outside the container. The admin listener (metrics, status page, health) has no
# authentication: publish 8001 only where monitoring reaches it. Temp files of large bodies go to /tmp.
ENV ANTEROOM_LISTEN=0.0.0.0:8000 \
    ANTEROOM_ADMIN=0.0.0.0:8001 \
    ANTEROOM_LOG_FORMAT=json
EXPOSE 8000 8001
# The slim image has no curl or wget, and installing one only for this would grow it; bash's /dev/tcp is
# enough to ask the admin listener's /health/live and check the status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8001 && printf 'GET /health/live HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# anteroom handles SIGTERM itself (a graceful stop); run with --init so that a worker's own orphaned children
# are reaped too.
STOPSIGNAL SIGTERM
ENTRYPOINT ["anteroom"]
