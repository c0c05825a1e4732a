"""Where steps run: in this process (default), one Kubernetes Job per step (``MELANOMA_EXECUTOR=k8s``), or
on Celery workers (``MELANOMA_EXECUTOR=celery``).

Like the partitions, the choice is read once when the definitions load. Under ``k8s`` every step is a
Kubernetes Job launched by dagster-k8s's ``k8s_job_executor`` (a run launched by ``K8sRunLauncher``, see
``deploy/k8s/``), and the training step asks for ``training.k8s_gpus`` GPUs through the
``dagster-k8s/config`` op tag, which the other executors ignore. Under ``celery`` every step is a task
of dagster-celery's ``celery_executor`` on the broker ``MELANOMA_CELERY_BROKER`` (e.g. Redis), the
training step on the ``training`` queue (``dagster-celery/queue`` op tag) so a GPU box can run a worker
that takes only trainings, one worker per device (docs/scale-out.md). Celery workers and k8s step pods
share no filesystem: set ``MELANOMA_ARTIFACT_STORE`` (``melanoma_assets.object_store``; ``deploy/k8s/values.yaml``
sets it for every run and step pod).
"""

from __future__ import annotations

import json
import os
from typing import Any

import dagster as dg

from melanoma_ml.config import PipelineConfig
from melanoma_ml.errors import InputValueError

EXECUTOR_ENV = "MELANOMA_EXECUTOR"
K8S_CONFIG_TAG = "dagster-k8s/config"
"""The op tag dagster-k8s reads for a step's pod: ``{"container_config": {...}, "pod_spec_config": ...}``."""
GPU_RESOURCE = "nvidia.com/gpu"
CELERY_QUEUE_TAG = "dagster-celery/queue"
"""The op tag dagster-celery reads for a step's queue (default queue: ``dagster``)."""
TRAINING_QUEUE = "training"
BROKER_ENV = "MELANOMA_CELERY_BROKER"
BACKEND_ENV = "MELANOMA_CELERY_BACKEND"
VISIBILITY_ENV = "MELANOMA_CELERY_VISIBILITY_TIMEOUT"
DEFAULT_VISIBILITY_TIMEOUT_S = 6 * 3600
EXECUTORS = ("in_process", "k8s", "celery")


def executor_name_from_env() -> str:
    """``MELANOMA_EXECUTOR`` (``in_process``, ``k8s`` or ``celery``), default ``in_process``.

    Raises:
        InputValueError: another value (the message lists the choices).
    """
    name = (os.environ.get(EXECUTOR_ENV) or "in_process").strip().lower()
    if name not in EXECUTORS:
        raise InputValueError(f"{EXECUTOR_ENV}={name!r} is not an executor; choose one of {list(EXECUTORS)}")
    return name


def build_executor(name: str) -> dg.ExecutorDefinition:
    """The executor called ``name`` (dagster-k8s / dagster-celery are imported only when chosen).

    Raises:
        InputValueError: ``celery`` without ``MELANOMA_CELERY_BROKER``.
    """
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if name == "celery":
        return celery_executor_from_env()
    return dg.in_process_executor


def celery_config_from_env() -> dict[str, Any]:
    """The Celery settings the executor and every worker share (``melanoma_assets.celery_app``).

    The broker is ``MELANOMA_CELERY_BROKER``, results go to ``MELANOMA_CELERY_BACKEND`` (default: the
    broker). A task is acknowledged when it ends and requeued if its worker process dies, so a worker
    killed mid-step leaves the step on the broker for another worker: at once when only the process
    running it died, after ``MELANOMA_CELERY_VISIBILITY_TIMEOUT`` seconds (default 21600) when the whole
    worker vanished. That timeout must exceed the longest step, or Redis hands a step still running to a
    second worker. Each worker takes one task at a time (one worker per device).

    Raises:
        InputValueError: no broker set, or a timeout that is not a positive number of seconds.
    """
    broker = (os.environ.get(BROKER_ENV) or "").strip()
    if not broker:
        raise InputValueError(
            f"MELANOMA_EXECUTOR=celery needs {BROKER_ENV}, the Celery broker the workers listen to, e.g. "
            f"{BROKER_ENV}=redis://redis-host:6379/0 (docs/scale-out.md)"
        )
    timeout_text = (os.environ.get(VISIBILITY_ENV) or str(DEFAULT_VISIBILITY_TIMEOUT_S)).strip()
    try:
        timeout = int(timeout_text)
    except ValueError:
        timeout = 0
    if timeout <= 0:
        raise InputValueError(
            f"{VISIBILITY_ENV}={timeout_text!r} is not a positive whole number of seconds; give one longer "
            f"than the longest step, e.g. {VISIBILITY_ENV}={DEFAULT_VISIBILITY_TIMEOUT_S}"
        )
    return {
        "broker": broker,
        "backend": (os.environ.get(BACKEND_ENV) or "").strip() or broker,
        "config_source": {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            # Redis looks for steps of vanished workers every tenth of the timeout (at most every minute).
            "broker_transport_options": {
                "visibility_timeout": timeout,
                "unacked_restore_interval": min(60, max(1, timeout // 10)),
                "unacked_restore_throttle": 1,
            },
        },
    }


def celery_executor_from_env() -> dg.ExecutorDefinition:
    """dagster-celery's executor with ``celery_config_from_env``'s settings.

    Raises:
        InputValueError: no broker set (see ``celery_config_from_env``).
    """
    from dagster_celery import celery_executor

    return celery_executor.configured(celery_config_from_env(), name="celery")


def training_op_tags(config: PipelineConfig) -> dict[str, str]:
    """Op tags of the training step: its Celery queue (``training``), and a ``nvidia.com/gpu`` limit of
    ``training.k8s_gpus`` for its pod.

    Kubernetes sets the request of an extended resource such as a GPU equal to its limit, so the limit
    alone reserves the GPUs. No GPU tag when ``training.k8s_gpus`` is 0 or training is pinned to the CPU.
    Each executor reads only its own tag.
    """
    tags = {CELERY_QUEUE_TAG: TRAINING_QUEUE}
    gpus = 0 if config.training.accelerator == "cpu" else config.training.k8s_gpus
    if gpus == 0:
        return tags
    pod = {"container_config": {"resources": {"limits": {GPU_RESOURCE: str(gpus)}}}}
    return {**tags, K8S_CONFIG_TAG: json.dumps(pod, sort_keys=True)}
