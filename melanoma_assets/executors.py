"""Where steps run: in this process (default) or one Kubernetes Job per step (``MELANOMA_EXECUTOR=k8s``).

Like the partitions, the choice is read once when the definitions load. Under ``k8s`` every step is a
Kubernetes Job launched by dagster-k8s's ``k8s_job_executor`` (a run launched by ``K8sRunLauncher``, see
``deploy/k8s/``), and the training step asks for ``training.k8s_gpus`` GPUs through the
``dagster-k8s/config`` op tag, which the other executors ignore.
"""

from __future__ import annotations

import json
import os

import dagster as dg

from melanoma_ml.config import PipelineConfig
from melanoma_ml.errors import InputValueError

EXECUTOR_ENV = "MELANOMA_EXECUTOR"
K8S_CONFIG_TAG = "dagster-k8s/config"
"""The op tag dagster-k8s reads for a step's pod: ``{"container_config": {...}, "pod_spec_config": ...}``."""
GPU_RESOURCE = "nvidia.com/gpu"
EXECUTORS = ("in_process", "k8s")


def executor_name_from_env() -> str:
    """``MELANOMA_EXECUTOR`` (``in_process`` or ``k8s``), default ``in_process``.

    Raises:
        InputValueError: another value (the message lists the choices).
    """
    name = (os.environ.get(EXECUTOR_ENV) or "in_process").strip().lower()
    if name not in EXECUTORS:
        raise InputValueError(f"{EXECUTOR_ENV}={name!r} is not an executor; choose one of {list(EXECUTORS)}")
    return name


def build_executor(name: str) -> dg.ExecutorDefinition:
    """The executor called ``name`` (dagster-k8s is imported only when ``k8s`` is chosen)."""
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.in_process_executor


def training_op_tags(config: PipelineConfig) -> dict[str, str]:
    """Op tags of the training step: a ``nvidia.com/gpu`` limit of ``training.k8s_gpus`` for its pod.

    Kubernetes sets the request of an extended resource such as a GPU equal to its limit, so the limit
    alone reserves the GPUs. No tags when ``training.k8s_gpus`` is 0 or training is pinned to the CPU.
    """
    gpus = 0 if config.training.accelerator == "cpu" else config.training.k8s_gpus
    if gpus == 0:
        return {}
    pod = {"container_config": {"resources": {"limits": {GPU_RESOURCE: str(gpus)}}}}
    return {K8S_CONFIG_TAG: json.dumps(pod, sort_keys=True)}
