# syntax=docker/dockerfile:1
# Cortexx Stream: one image for every process (ingest, worker, api, migrate, tenants, users, dlq).
# Multi-stage: the build stage compiles wheels; the runtime stage holds only the venv, no compiler,
# and runs as an unprivileged user. Build: docker build -t cortexx-stream .

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/cortexx
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY infra infra
COPY ingest ingest
COPY processors processors
COPY api api
COPY cli cli
# harness/ (embedded services, the WUZAPI simulator) and bench/ stay out: development only.
# Not editable: the runtime stage copies the venv alone, with the packages installed into it.
RUN /opt/cortexx/bin/pip install .

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/cortexx/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CORTEXX_ENV=production \
    CORTEXX_DATA_DIR=/var/lib/cortexx \
    CORTEXX_INGEST_HOST=0.0.0.0 \
    CORTEXX_API_HOST=0.0.0.0
RUN groupadd --system --gid 10001 cortexx \
 && useradd --system --uid 10001 --gid cortexx --home-dir /var/lib/cortexx --shell /usr/sbin/nologin cortexx \
 && mkdir -p /var/lib/cortexx && chown cortexx:cortexx /var/lib/cortexx
COPY --from=build /opt/cortexx /opt/cortexx
USER 10001:10001
WORKDIR /var/lib/cortexx
EXPOSE 8000 8001
# Each process exits 0 on SIGTERM after draining within CORTEXX_SHUTDOWN_GRACE_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cortexx"]
CMD ["--help"]
