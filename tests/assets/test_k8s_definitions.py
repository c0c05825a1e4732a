"""The Kubernetes switch: definitions load with dagster-k8s's executor, the training step requests GPUs
through its ``dagster-k8s/config`` op tag, and the Helm values name the K8s run launcher (no cluster)."""

from __future__ import annotations

import importlib
from pathlib import Path

import dagster as dg
import pytest
import yaml

from melanoma_assets.definitions import build_definitions
from melanoma_assets.executors import EXECUTOR_ENV, K8S_CONFIG_TAG, executor_name_from_env, training_op_tags
from melanoma_ml.config import load_config
from melanoma_ml.errors import InputValueError

dagster_k8s = pytest.importorskip("dagster_k8s")
from dagster_k8s.job import get_user_defined_k8s_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "k8s" / "values.yaml"


def gpu_limit(assets_def: dg.AssetsDefinition) -> str | None:
    """The nvidia.com/gpu limit dagster-k8s reads from the step's op tags (its own parser)."""
    config = get_user_defined_k8s_config(assets_def.op.tags)
    return config.container_config.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


def test_k8s_executor_selected_by_env_loads_the_definitions(monkeypatch) -> None:
    monkeypatch.setenv(EXECUTOR_ENV, "k8s")
    defs = build_definitions("tiny")
    assert defs.executor is dagster_k8s.k8s_job_executor
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def is dagster_k8s.k8s_job_executor
    dg.Definitions.validate_loadable(defs)


def test_default_executor_is_unchanged(monkeypatch) -> None:
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    assert build_definitions("tiny").executor is dg.in_process_executor


def test_unknown_executor_names_the_choices(monkeypatch) -> None:
    monkeypatch.setenv(EXECUTOR_ENV, "dask")
    with pytest.raises(InputValueError, match=r"MELANOMA_EXECUTOR='dask'.*\['in_process', 'k8s', 'celery'\]"):
        executor_name_from_env()


def test_training_asset_requests_the_configured_gpus(monkeypatch) -> None:
    monkeypatch.setenv("MELANOMA_TRAINING__K8S_GPUS", "2")
    defs = build_definitions("tiny", executor="k8s")
    assert gpu_limit(defs.resolve_assets_def("fold_model")) == "2"
    assert K8S_CONFIG_TAG not in defs.resolve_assets_def("leaderboard").op.tags  # only training asks


def test_training_asset_requests_one_gpu_by_default() -> None:
    defs = build_definitions("tiny", executor="k8s")
    assert gpu_limit(defs.resolve_assets_def("fold_model")) == "1"


@pytest.mark.parametrize("training", [{"k8s_gpus": 0}, {"accelerator": "cpu"}])
def test_no_gpu_request_without_gpus_or_on_cpu(training) -> None:
    config = load_config("tiny", {"training": training})
    assert K8S_CONFIG_TAG not in training_op_tags(config)


def test_helm_values_parse_and_name_the_k8s_run_launcher() -> None:
    values = yaml.safe_load(VALUES.read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert "k8sRunLauncher" in values["runLauncher"]["config"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["MELANOMA_EXECUTOR"] == "k8s"
    assert env["MELANOMA_SERVING__REGISTRY_URI"].startswith("s3://")
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("-m") + 1]
    assert isinstance(importlib.import_module(module).defs, dg.Definitions)
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]  # from a Secret, never a tracked file
