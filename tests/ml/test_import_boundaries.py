"""Layering rules: melanoma_ml never imports dagster; only the Gradio app module imports gradio."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

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
    light = ["melanoma_ml", "melanoma_ml.config", "melanoma_ml.features", "melanoma_ml.schema", "melanoma_ml.spec"]
    assert "torch" not in _top_level_packages_after_importing(light)
