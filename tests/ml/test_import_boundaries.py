"""Layering rules: melanoma_ml never imports dagster; only the Gradio app module imports gradio."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import melanoma_ml

APP_MODULE = "melanoma_ml.serving.app"


def _all_submodules() -> list[str]:
    # ``__main__`` modules run the CLI when imported; they only import melanoma_ml.cli, which is checked.
    names = (info.name for info in pkgutil.walk_packages(melanoma_ml.__path__, prefix="melanoma_ml."))
    return sorted(n for n in names if not n.endswith(".__main__"))


def _top_level_packages_after_importing(modules: list[str]) -> set[str]:
    """Top-level packages in ``sys.modules`` after importing ``modules`` in one fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_there_are_submodules_to_check():
    assert {"melanoma_ml.config", "melanoma_ml.model"} <= set(_all_submodules())


def test_no_module_but_the_app_imports_dagster_or_gradio():
    library = [m for m in _all_submodules() if m != APP_MODULE]
    loaded = _top_level_packages_after_importing(library)
    assert "dagster" not in loaded
    assert "gradio" not in loaded


def test_the_app_module_does_not_import_dagster():
    if APP_MODULE not in _all_submodules():
        raise AssertionError(f"{APP_MODULE} is expected to exist")
    assert "dagster" not in _top_level_packages_after_importing([APP_MODULE])


def test_light_modules_do_not_pull_in_torch():
    light = [
        "melanoma_ml",
        "melanoma_ml.config",
        "melanoma_ml.features",
        "melanoma_ml.schema",
        "melanoma_ml.spec",
    ]
    assert "torch" not in _top_level_packages_after_importing(light)


REPO_ROOT = Path(melanoma_ml.__file__).resolve().parents[1]
LATENCY_BENCHMARK = REPO_ROOT / "benchmarks" / "serving_latency.py"


def _gradio_analytics_after_import(module: str | Path, preset: str | None) -> str | None:
    """GRADIO_ANALYTICS_ENABLED after importing ``module`` (dotted name or script path) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    if preset is not None:
        env["GRADIO_ANALYTICS_ENABLED"] = preset
    if isinstance(module, Path):
        load = (
            "import importlib.util as u\n"
            f"spec = u.spec_from_file_location('script', {str(module)!r})\n"
            "spec.loader.exec_module(u.module_from_spec(spec))\n"
        )
    else:
        load = f"import {module}\n"
    code = f"import json, os\n{load}print(json.dumps(os.environ.get('GRADIO_ANALYTICS_ENABLED')))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_app_and_the_latency_benchmark_keep_the_users_gradio_analytics_choice():
    for module in (APP_MODULE, LATENCY_BENCHMARK):
        assert _gradio_analytics_after_import(module, "True") == "True", module
        assert _gradio_analytics_after_import(module, None) == "False", module  # off by default
