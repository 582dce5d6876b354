# syntax=docker/dockerfile:1
# ingestd image: `docker build -t ingestd .`, then `docker run ingestd` (= `ingestd run`),
# `docker run ingestd migrate`, `docker run ingestd check-config`, ...
# Same layout as a host install (/opt/ingestd/venv), so paths in docs and units agree.

# --- build: install the distribution into a virtualenv ---------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ingestd/venv
WORKDIR /src
# Only what the package build needs: the build context also holds .venv, tests, bench, ...
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY agents ./agents
COPY db ./db
COPY edge ./edge
COPY migrations ./migrations
# [fast] adds uvloop; every dependency ships manylinux wheels, so no compiler is needed.
RUN /opt/ingestd/venv/bin/pip install ".[fast]"

# --- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim
# A fixed non-root uid, so volume and secret file permissions can be planned for it.
RUN groupadd --system --gid 10001 ingestd \
 && useradd --system --uid 10001 --gid ingestd --home-dir /var/lib/ingestd \
            --no-create-home --shell /usr/sbin/nologin ingestd \
 && install -d -o ingestd -g ingestd -m 0700 /var/lib/ingestd
COPY --from=build /opt/ingestd/venv /opt/ingestd/venv
ENV PATH=/opt/ingestd/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INGESTD_DAEMON__STATE_DIR=/var/lib/ingestd \
    INGESTD_METRICS__LISTEN=0.0.0.0:9108
# The embedded SQLite database and the spool: keep them on a volume.
VOLUME ["/var/lib/ingestd"]
WORKDIR /var/lib/ingestd
USER ingestd
EXPOSE 9108
# The daemon drains on SIGTERM (docker stop); give it more than its 8 s shutdown timeout,
# e.g. `docker stop -t 20` or compose's stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingestd"]
CMD ["run"]
