# One image for the Dagster webserver, the Dagster daemon and the Gradio app.
# CPU by default; for a GPU build use an NVIDIA CUDA base image and the same install steps.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home \
    DAGSTER_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    MELANOMA_ARTIFACT_ROOT=/data/artifacts

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/melanoma
COPY pyproject.toml README.md ./
COPY melanoma_ml ./melanoma_ml
COPY melanoma_assets ./melanoma_assets
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install .
COPY workspace.yaml ./
COPY deploy/dagster.postgres.yaml /opt/dagster/home/dagster.yaml

EXPOSE 3000 7860
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
