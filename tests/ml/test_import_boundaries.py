"""Layering rules: melanoma_ml never imports dagster; only the Gradio app module imports gradio; only the CLI
imports the pipeline; the import-linter contracts in pyproject.toml (layers, no cycles) hold."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import shutil
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


PACKAGE_DIR = Path(melanoma_ml.__file__).resolve().parent
PIPELINE = "melanoma_ml.pipeline"
TOP_LAYER = {"melanoma_ml/cli.py", "melanoma_ml/__main__.py"}
"""The only modules that may import the pipeline: it composes every lower module, never the reverse."""


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth: lazy imports inside functions count), as dotted names.

    ``from package import name`` yields both ``package`` and ``package.name`` (``name`` may be a module);
    relative imports are resolved against ``path``'s package.
    """
    package = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _importers_of_the_pipeline() -> list[str]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    relative = {f: f.relative_to(PACKAGE_DIR.parent).as_posix() for f in files}
    return [
        relative[f]
        for f in files
        if relative[f] not in TOP_LAYER | {"melanoma_ml/pipeline.py"} and PIPELINE in _imported_modules(f)
    ]


def test_no_module_below_the_cli_imports_the_pipeline():
    assert _importers_of_the_pipeline() == []


def test_the_import_walk_sees_every_form_of_importing_the_pipeline(tmp_path, monkeypatch):
    """The check above can fail: each spelling of the import is found, in any nesting."""
    package = tmp_path / "melanoma_ml"
    (package / "serving").mkdir(parents=True)
    spellings = {
        "a.py": "import melanoma_ml.pipeline\n",
        "b.py": "from melanoma_ml import pipeline\n",
        "c.py": "def f():\n    from melanoma_ml.pipeline import run_all\n",
        "serving/d.py": "from .. import pipeline\n",
        "serving/e.py": "from ..pipeline import STEPS\n",
        "cli.py": "from melanoma_ml.pipeline import run_all\n",
        "clean.py": "from melanoma_ml import pipeline_helpers\nimport melanoma_ml.config\n",
    }
    for name, text in spellings.items():
        (package / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", package)
    assert _importers_of_the_pipeline() == [
        "melanoma_ml/a.py",
        "melanoma_ml/b.py",
        "melanoma_ml/c.py",
        "melanoma_ml/serving/d.py",
        "melanoma_ml/serving/e.py",
    ]


REPO_ROOT = Path(melanoma_ml.__file__).resolve().parents[1]
LATENCY_BENCHMARK = REPO_ROOT / "benchmarks" / "serving_latency.py"


def _gradio_analytics_after_import(module: str | Path, preset: str | None) -> str | None:
    """GRADIO_ANALYTICS_ENABLED after importing ``module`` (dotted name or script path) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    if preset is not None:
        env["GRADIO_ANALYTICS_ENABLED"] = preset
    if isinstance(module, Path):
        load = (  # as `python script.py` runs it: the script's folder first on sys.path (benchmarks/_common)
            "import importlib.util as u, sys\n"
            f"sys.path.insert(0, {str(module.parent)!r})\n"
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


LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
"""import-linter's command in this environment (the dev extra installs it)."""


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the contracts of ``cwd``'s pyproject.toml (no cache: nothing written outside tmp)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} not found; install the dev extra: pip install -e '.[dev]'"
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_the_import_linter_contracts_hold():
    """Layers, no cycles (imports inside functions count; only `if TYPE_CHECKING:` ones are left out), and
    no dagster in melanoma_ml: see [tool.importlinter] in pyproject.toml."""
    out = _lint_imports(REPO_ROOT)
    assert out.returncode == 0, (
        f"lint-imports found broken contracts:\n{out.stdout[-6000:]}{out.stderr[-2000:]}"
    )
    assert "0 broken" in out.stdout, out.stdout[-3000:]


def test_the_contracts_catch_an_upward_import_hidden_in_a_function(tmp_path):
    """The check above can fail: a copy of the library with evaluation importing serving inside a function
    breaks the layers contract and the no-cycle contract."""
    copy = tmp_path / "project"
    shutil.copytree(PACKAGE_DIR, copy / "melanoma_ml", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO_ROOT / "melanoma_assets", copy / "melanoma_assets", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO_ROOT / "pyproject.toml", copy / "pyproject.toml")
    metrics = copy / "melanoma_ml" / "evaluation" / "metrics.py"
    metrics.write_text(
        metrics.read_text() + "\n\ndef _upward():\n    from melanoma_ml.serving import champion\n\n"
        "    return champion\n"
    )
    out = _lint_imports(copy, pythonpath=copy)
    assert out.returncode != 0, out.stdout[-3000:]
    for broken in (
        "melanoma_ml.evaluation is not allowed to import melanoma_ml.serving",
        "melanoma_ml.evaluation.metrics -> melanoma_ml.serving.champion",
        "No cycles are allowed in melanoma_ml.",
    ):
        assert broken in out.stdout, out.stdout[-3000:]
