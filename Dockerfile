# tts-streamer daemon image. Build: docker build -t tts-streamer .   (docs/deploy.md)
#
# The image bundles espeak-ng (GPL-3.0-or-later, through the espeakng-loader wheel) with the daemon:
# distributing it means distributing a GPL-3.0 combination. NOTICE says what is bundled under which
# licence and where its source is; it and the licence texts are in /usr/share/licenses/tts-streamer/.
# README.md "Licence" and docs/deploy.md "Licences" explain.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the same scripts/install.sh that `make` runs, into /opt/venv ----------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY scripts/install.sh scripts/install.sh
COPY src/ src/
# Runtime dependencies only (no --dev), not editable: the venv must not point back into /src.
RUN sh scripts/install.sh /opt/venv /src

# -- runtime: the venv, a non-root user, nothing else ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Where the image's source is (GPL-3.0 section 6): docker build --build-arg SOURCE_URL=... --build-arg REVISION=$(git rev-parse HEAD)
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="tts-streamer" \
      org.opencontainers.image.description="Streams text-to-speech into live Asterisk calls over chan_websocket" \
      org.opencontainers.image.licenses="Apache-2.0 AND GPL-3.0-or-later AND LGPL-2.1-or-later AND MPL-2.0 AND GPL-3.0-or-later WITH GCC-exception-3.1" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}"

# The licence texts and the notice of what is bundled (NOTICE), readable by anyone who pulls the image.
COPY LICENSE NOTICE licenses/GPL-3.0.txt /usr/share/licenses/tts-streamer/

# A fixed numeric uid/gid, so Kubernetes runAsNonRoot can verify it without a passwd lookup.
# /shared-data: the Go tts-manager's speech directory, so a fresh Compose volume mounted there for the
# migration settings (MEDIA_DIR=/shared-data, docs/migrating.md) is writable by the daemon.
RUN groupadd --system --gid 10001 tts \
    && useradd --system --uid 10001 --gid tts --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tts \
    && mkdir -p /shared-data && chown 10001:10001 /shared-data

# Owned by root, so the daemon cannot modify its own code.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_PORT=9090

USER 10001:10001
WORKDIR /tmp

# Self-test of the finished image (offline voice, codecs, pacing) before anything ships: the README's
# demo, a simulated Asterisk on loopback, about 7 s.
RUN tts-streamer demo --wav /tmp/selftest.wav > /dev/null && rm /tmp/selftest.wav

# Health, readiness and Prometheus metrics (HTTP_PORT); batch speech files (MEDIA_HTTP_PORT).
EXPOSE 9090 8080

# Docker/Compose only; Kubernetes ignores HEALTHCHECK and uses the Deployment's probes instead.
# Any non-2xx answer or no answer raises, so the check fails; no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % (os.environ.get('HTTP_PORT') or '9090'), timeout=4)"]

# The daemon is PID 1 (exec form, no shell in between): Trio installs SIGTERM/SIGINT handlers, so the
# kernel's "PID 1 ignores signals it does not handle" rule does not apply, and SIGTERM starts the bounded
# drain (DRAIN_TIMEOUT). No init is needed: the daemon's only children are its espeak-ng workers, which it
# reaps itself and which start nothing, so no zombie is re-parented to PID 1. docs/deploy.md says when to add tini.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tts-streamer"]
CMD ["serve"]
