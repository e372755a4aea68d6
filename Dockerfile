# syntax=docker/dockerfile:1
# taskring: one image for the router (the default command) and the executors
# (`taskring-executor`).
#
#   docker build -t taskring .
#   docker run -p 127.0.0.1:50051:50051 -v taskring-data:/data taskring
#
# Two stages: the builder installs taskring and its dependencies into a virtual
# environment; the runtime copies that environment alone onto a fresh slim image, so no
# pip cache, build tree or setuptools build environment ends up in the layers that ship.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The same path as in the runtime stage: a venv's scripts name their interpreter by
# absolute path. Without pip: the base image's pip installs into it (--python), so
# neither pip nor setuptools ships (25 MB).
RUN python -m venv --without-pip /opt/taskring
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when it
# changes, not on every code change. The dependencies ship wheels (no compiler here).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip --python /opt/taskring/bin/python install --requirement /tmp/requirements.txt
# README.md too: pyproject.toml names it as the package's readme, and the build reads it.
COPY README.md ./
COPY server ./server
COPY client ./client
# A regular (not editable) install: the code lands in the venv's site-packages, compiled
# to bytecode, and the source tree stays behind in this stage.
RUN pip --python /opt/taskring/bin/python install --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric id: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# manifests in deploy/k8s run as (and give their volumes to) the same 10001. /data is
# owned by it in the image, so a fresh named volume mounted there starts out owned by it
# too (Docker copies the image directory's ownership into a new volume).
RUN groupadd --system --gid 10001 taskring \
    && useradd --system --uid 10001 --gid taskring --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin taskring \
    && mkdir /data \
    && chown taskring:taskring /data
COPY --from=builder /opt/taskring /opt/taskring
# PYTHONDONTWRITEBYTECODE: the venv was compiled at build time, and a read-only root
# filesystem stays read-only. The listen addresses are every interface (gRPC treats
# 0.0.0.0 as a wildcard for IPv4 and IPv6): the embedded default, 127.0.0.1, would be
# unreachable from outside the container. The store lives on the /data volume.
ENV PATH=/opt/taskring/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TASKRING_LISTEN=0.0.0.0:50051 \
    TASKRING_EXECUTOR_LISTEN=0.0.0.0:50061 \
    TASKRING_METRICS_LISTEN=0.0.0.0:9464 \
    TASKRING_STORE=sqlite:////data/taskring.db
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# gRPC (the router's; an executor's is 50061) and Prometheus metrics.
EXPOSE 50051 50061 9464
# Docker has one health state, and compose's depends_on waits on it: it should mean
# "ready for work", so it asks for the router's readiness name (which follows the store),
# not only liveness. Executors override it (docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "client.healthcheck", "--service", "taskring.v1.TaskService", "127.0.0.1:50051"]
# SIGTERM starts the graceful shutdown: readiness off, running work gets
# TASKRING_SHUTDOWN_GRACE_S (default 10), then open calls get that long again. Docker's
# default of 10 s before SIGKILL is too short: `docker stop --time 30`, or compose's
# stop_grace_period.
STOPSIGNAL SIGTERM
CMD ["taskring-server"]
