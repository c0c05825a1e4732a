# One image for the Dagster code server, webserver and daemon, and the Gradio app.
# CPU by default; for a GPU build use an NVIDIA CUDA base image and the same install steps.
#
# BASE_IMAGE: any Debian-based image with python3 (3.11) and its venv module; the official
# python:3.11-slim by default. Where no image registry is reachable, deploy/make-base-image builds one
# from a Debian mirror (melanoma-base:bookworm).
#
# pip settings of the build machine (index URLs, CA bundle) come in as the BuildKit secrets `pip.conf`
# and `pip-cert`, seen only by the pip steps and kept in no layer; without them pip uses PyPI:
#   deploy/pip-build-config DIR    # writes DIR/pip.conf and DIR/pip-cert from `pip config list`
#   DOCKER_BUILDKIT=1 docker build --secret id=pip.conf,src=DIR/pip.conf --secret id=pip-cert,src=DIR/pip-cert .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home \
    DAGSTER_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    MELANOMA_ARTIFACT_ROOT=/data/artifacts \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/*

# A virtual environment: Debian's own python3 refuses `pip install` outside one (PEP 668).
RUN python3 -m venv /opt/venv

# Build-time only (an ARG, not an ENV): pip reads the secret when one was passed, and ignores the
# setting when the file is absent.
ARG PIP_CONFIG_FILE=/run/secrets/pip.conf
WORKDIR /opt/melanoma
# Layers from the slowest-changing down, so a code change rebuilds in seconds:
# 1. torch/torchvision first and on their own, as ./dev does (the pins of pyproject.toml; several GB).
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    pip install torch==2.14.1 torchvision==0.29.1
# 2. every other dependency, read from pyproject.toml alone (README and source are not copied yet), with the
#    `scale-out` extra (dagster-celery, redis, boto3: the Celery workers of `docker compose --profile scale-out`).
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['scale-out'], sep='\n')" \
      >/tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
# 3. the project itself, without dependencies (all installed above).
COPY README.md ./
COPY melanoma_ml ./melanoma_ml
COPY melanoma_assets ./melanoma_assets
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    pip install --no-deps . \
 && rm -rf build ./*.egg-info
COPY workspace.yaml ./
COPY deploy/workspace.docker.yaml ./deploy/
COPY deploy/dagster.postgres.yaml /opt/dagster/home/dagster.yaml

EXPOSE 3000 4000 7860
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
