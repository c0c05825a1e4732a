"""The Kubernetes switch: definitions load with dagster-k8s's executor, the training step requests GPUs
through its ``dagster-k8s/config`` op tag, and the Helm values give every run and step pod the object-store
artifact root (``MELANOMA_ARTIFACT_STORE``, S3 credentials from a Secret, an ``emptyDir`` working folder)
and no ReadWriteMany claim. No cluster and no ``helm``: the values are turned into what the chart hands
Dagster (dagster.yaml's run launcher, the code server's container context) by a transcription of its two
templates (below); from there dagster-k8s's own code validates the configs, builds the launcher and the
executor's step handler, merges each pod's config and renders its Job manifest."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest
import yaml

from melanoma_assets.definitions import build_definitions
from melanoma_assets.executors import EXECUTOR_ENV, K8S_CONFIG_TAG, executor_name_from_env, training_op_tags
from melanoma_assets.object_store import STORE_ENV, ObjectStoreIOManager
from melanoma_ml.config import load_config
from melanoma_ml.errors import InputValueError

dagster_k8s = pytest.importorskip("dagster_k8s")
from dagster._config import process_config  # noqa: E402
from dagster._core.code_pointer import ModuleCodePointer  # noqa: E402
from dagster._core.definitions.job_base import InMemoryJob  # noqa: E402
from dagster._core.executor.init import InitExecutorContext  # noqa: E402
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin  # noqa: E402
from dagster._core.storage.dagster_run import DagsterRun  # noqa: E402
from dagster_k8s.container_context import K8sContainerContext  # noqa: E402
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config  # noqa: E402
from kubernetes.client import ApiClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "k8s" / "values.yaml"
RELEASE, NAMESPACE = "melanoma", "melanoma"
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""
"""A kubeconfig that names an unreachable server: the launcher loads it and never calls it."""


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


# What the chart (dagster/dagster 1.13.27) makes of the values, transcribed for the keys values.yaml sets.
def chart_run_launcher(values: dict) -> dict:
    """``run_launcher.config`` of the chart's dagster.yaml (templates/helpers/instance/_run-launcher.tpl)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    config: dict[str, Any] = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": f"{RELEASE}-dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": f"{RELEASE}-dagster-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
    }
    for key, name in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if launcher.get(key):
            config[name] = [item["name"] for item in launcher[key] if "name" in item]
    for key, name in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes")):
        if launcher.get(key):
            config[name] = launcher[key]
    if launcher.get("runK8sConfig"):
        parts = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                 "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
                 "jobMetadata": "job_metadata"}  # fmt: skip
        config["run_k8s_config"] = {parts[k]: v for k, v in launcher["runK8sConfig"].items()}
    return config


def chart_container_context(deployment: dict) -> dict:
    """``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT`` of the code server with ``includeConfigInLaunchedRuns``
    (charts/dagster-user-deployments/templates/helpers/_helpers.tpl, ``k8sContainerContext``)."""
    k8s: dict[str, Any] = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-dagster-user-deployments-{deployment['name']}-user-env"],
        "namespace": NAMESPACE,
        "service_account_name": f"{RELEASE}-dagster-user-deployments-user-deployments",
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [item["name"] for item in deployment["envSecrets"] if "name" in item]
    for key, name in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("resources", "resources")):
        if deployment.get(key):
            k8s[name] = deployment[key]
    if isinstance(deployment.get("env"), list):
        k8s["env"] = deployment["env"]
    return {"k8s": k8s}


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(KUBECONFIG)
    return str(path)


@pytest.fixture(scope="module")
def instance(helm_values, kubeconfig):
    """A Dagster instance whose run launcher is the chart's (dagster.yaml's ``run_launcher``), checked
    against dagster-k8s's config schema when the instance builds it."""
    config = chart_run_launcher(helm_values)
    result = process_config(dagster_k8s.K8sRunLauncher.config_type(), config)
    assert result.success, result.errors
    outside = {"load_incluster_config": False, "kubeconfig_file": kubeconfig}  # no cluster here
    launcher = {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {**config, **outside}}
    with dg.instance_for_test(overrides={"run_launcher": launcher}) as instance:
        assert isinstance(instance.run_launcher, dagster_k8s.K8sRunLauncher)
        yield instance


@pytest.fixture(scope="module")
def step_handler(instance, kubeconfig):
    """The step handler ``k8s_job_executor`` builds (its config schema filled in, as in a run with no
    ``execution`` config beyond the kubeconfig this machine needs)."""
    executor_def = dagster_k8s.k8s_job_executor
    result = process_config(
        executor_def.config_schema.config_type,
        {"load_incluster_config": False, "kubeconfig_file": kubeconfig},
    )
    assert result.success, result.errors
    job = build_definitions("tiny", executor="k8s").resolve_implicit_global_asset_job_def()
    init = InitExecutorContext(
        job=InMemoryJob(job), executor_def=executor_def, executor_config=result.value, instance=instance
    )
    return executor_def.executor_creation_fn(init)._step_handler


def launch(values: dict) -> DagsterRun:
    """A run of the asset job as the code server of ``values`` launches it: its origin carries the
    deployment's container context, checked against dagster-k8s's schema."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    context = chart_container_context(deployment)
    K8sContainerContext.create_from_config(context)  # raises DagsterInvalidConfigError on a bad key or shape
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    repository = RepositoryPythonOrigin(
        executable_path=sys.executable,
        code_pointer=ModuleCodePointer("melanoma_assets.definitions", "defs", working_directory=None),
        container_image=image,
        container_context=context,
    )
    return DagsterRun(job_name="__ASSET_JOB", job_code_origin=JobPythonOrigin("__ASSET_JOB", repository))


def image_of(run: DagsterRun) -> str:
    return run.job_code_origin.repository_origin.container_image


def pod_manifest(context: K8sContainerContext, run_launcher, image: str, component: str) -> dict:
    """The Job dagster-k8s would create for ``context`` (as ``K8sStepHandler.launch_step`` builds it), as
    the Kubernetes API would receive it (camelCase)."""
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(image, run_launcher),
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-{component}",
        component=component,
        user_defined_k8s_config=context.run_k8s_config,
    )
    return ApiClient().sanitize_for_serialization(job)["spec"]["template"]["spec"]


def step_context(step_handler, instance, run: DagsterRun, step: str, op_tags: dict) -> K8sContainerContext:
    """The step pod's container context from ``K8sStepHandler._get_container_context`` itself, given what
    it reads of a step: the run, the instance's launcher, the step's key, op name and op tags."""
    context = SimpleNamespace(
        execute_step_args=SimpleNamespace(step_keys_to_execute=[step]),
        dagster_run=run,
        instance=instance,
        step_tags={step: op_tags},
        get_step_context=lambda key: SimpleNamespace(step=SimpleNamespace(op_name=step)),
    )
    return step_handler._get_container_context(context)


def assert_on_the_object_store(pod: dict, values: dict) -> None:
    """The store's URI, the Secret's credentials, the artifact root on an emptyDir, no writable claim."""
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    wanted = {item["name"]: item["value"] for item in deployment["env"]}
    assert env.get(STORE_ENV) == wanted.get(STORE_ENV) and str(env.get(STORE_ENV)).startswith("s3://")
    assert {"secretRef": {"name": "melanoma-s3"}} in container.get("envFrom", [])
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    root = Path(str(env.get("MELANOMA_ARTIFACT_ROOT")))
    mounts = container.get("volumeMounts", [])
    holding = [m for m in mounts if root.is_relative_to(m["mountPath"])]
    assert len(holding) == 1 and "emptyDir" in volumes[holding[0]["name"]] and not holding[0].get("readOnly")
    claims = {name: v["persistentVolumeClaim"] for name, v in volumes.items() if "persistentVolumeClaim" in v}
    assert all(claim.get("readOnly") for claim in claims.values())  # the dataset only; nothing writes there
    assert all(m.get("readOnly") for m in mounts if m["name"] in claims)


def test_step_pods_get_the_object_store_and_no_shared_volume(helm_values, instance, step_handler) -> None:
    run = launch(helm_values)
    defs = build_definitions("tiny", executor="k8s")
    pods = {
        step: pod_manifest(
            step_context(step_handler, instance, run, step, defs.resolve_assets_def(step).op.tags),
            instance.run_launcher,
            image_of(run),
            "step_worker",
        )
        for step in ("fold_model", "leaderboard")
    }
    for pod in pods.values():
        assert_on_the_object_store(pod, helm_values)
    (training,) = pods["fold_model"]["containers"]
    assert training["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the op tag still reaches its pod
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pods["fold_model"][
        "tolerations"
    ]


def test_the_run_worker_pod_gets_the_object_store_too(helm_values, instance) -> None:
    run = launch(helm_values)
    context = K8sContainerContext.create_for_run(run, instance.run_launcher, include_run_tags=True)
    pod = pod_manifest(context, instance.run_launcher, image_of(run), "run_worker")
    assert_on_the_object_store(pod, helm_values)


def test_the_values_env_loads_the_definitions_on_the_object_store(helm_values, monkeypatch) -> None:
    (deployment,) = helm_values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MELANOMA_PROFILE", "tiny")  # loads without the dataset; the store is the same
    defs = build_definitions()
    assert defs.executor is dagster_k8s.k8s_job_executor
    io_manager = defs.resources["io_manager"]
    assert isinstance(io_manager, ObjectStoreIOManager) and io_manager.uri == env[STORE_ENV]
    dg.Definitions.validate_loadable(defs)


def test_a_writable_shared_claim_fails_the_object_store_check(helm_values, instance) -> None:
    """The check can fail: the working folder on a ReadWriteMany claim (the README's variant) is refused."""
    values = yaml.safe_load(yaml.safe_dump(helm_values))
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    (work,) = [v for v in deployment["volumes"] if "emptyDir" in v]
    work.pop("emptyDir")
    work["persistentVolumeClaim"] = {"claimName": "melanoma-artifacts"}
    run = launch(values)
    pod = pod_manifest(
        K8sContainerContext.create_for_run(run, instance.run_launcher, include_run_tags=True),
        instance.run_launcher,
        image_of(run),
        "run_worker",
    )
    with pytest.raises(AssertionError):
        assert_on_the_object_store(pod, values)


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
