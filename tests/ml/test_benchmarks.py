"""The benchmarks share ``benchmarks/_common.py``: they open runs through the artifact layout, print the
machine's load, import no test module, and each answers ``--help``; no test reaches into a benchmark."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO_ROOT / "benchmarks"
COMMON = BENCHMARKS / "_common.py"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p != COMMON)
LAYOUT_NAMES = {
    "checkpoints",
    "reports",
    "tables",
    "registry",
    "registry-cache",
    "clean.parquet",
    "quarantine.parquet",
    "folds.parquet",
    "oof.parquet",
    "result.json",
    "report.json",
    "current.json",
    "history.jsonl",
    "manifest.json",
}
"""Names of the artifact layout (``melanoma_ml/artifacts.py`` and the files the steps write there)."""
TEST_MODULES = {"conftest", "app_helpers", "tests"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _strings(tree: ast.Module) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def layout_spellings(path: Path) -> list[str]:
    """String constants of ``path`` that spell an artifact-layout name."""
    return sorted(_strings(_tree(path)) & LAYOUT_NAMES)


def test_the_layout_check_finds_a_spelled_path(tmp_path):
    script = tmp_path / "b.py"
    script.write_text('from pathlib import Path\nroot = Path("x")\nprint(root / "checkpoints" / "m")\n')
    assert layout_spellings(script) == ["checkpoints"]
    script.write_text(
        '"""Reads checkpoints/ and reports/ (docstrings are prose)."""\nfrom _common import open_run\n'
    )
    assert layout_spellings(script) == []


def test_no_benchmark_spells_the_artifact_layout():
    spelled = {p.name: layout_spellings(p) for p in SCRIPTS}
    assert {name: names for name, names in spelled.items() if names} == {}, (
        "open the run with _common.open_run (melanoma_ml.artifacts.ArtifactPaths) instead"
    )


def test_every_benchmark_that_takes_a_run_opens_it_through_common():
    for path in SCRIPTS:
        tree = _tree(path)
        options = {
            n.args[0].value
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "add_argument"
            and n.args
            and isinstance(n.args[0], ast.Constant)
        }
        if options & {"--artifact-root", "--a"}:  # compare_runs.py takes two runs as --a and --b
            imported = {
                alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "_common"
                for alias in node.names
            }
            assert "open_run" in imported, f"{path.name} takes --artifact-root: open it with _common.open_run"


def test_every_benchmark_prints_the_load_average_and_imports_no_test_module():
    for path in SCRIPTS:
        tree = _tree(path)
        modules = _imported_modules(tree)
        assert "_common" in modules, f"{path.name}: import _common (machine_load at least)"
        called = {
            n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert "machine_load" in called, f"{path.name}: wrap the measurement in _common.machine_load()"
        assert not {m.split(".")[0] for m in modules} & TEST_MODULES, f"{path.name} imports a test module"
        assert "tests" not in _strings(tree), f"{path.name} puts the tests folder on its path"


def test_no_test_reaches_into_a_benchmark_module():
    """Tests run a benchmark's command line; only the import-side-effect check loads one as a module."""
    loaders = []
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        modules = _imported_modules(_tree(path))
        assert not {m for m in modules if m.split(".")[0] in {"benchmarks", "_common"}}, path
        if "benchmarks" in text and "exec_module" in text and path.name != Path(__file__).name:
            loaders.append(path.relative_to(REPO_ROOT).as_posix())
    assert loaders == ["tests/ml/test_import_boundaries.py"]


def test_every_benchmark_answers_help():
    """``--help`` of every script in one interpreter (imports are shared, so this stays fast)."""
    driver = (
        "import contextlib, io, json, runpy, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "failed = {}\n"
        f"for script in {[str(p) for p in SCRIPTS]!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            runpy.run_path(script, run_name='__main__')\n"
        "        failed[script] = 'returned without printing help'\n"
        "    except SystemExit as exit:\n"
        "        if exit.code not in (0, None) or 'usage:' not in out.getvalue():\n"
        "            failed[script] = f'exit {exit.code}: {out.getvalue()[-300:]}'\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.slow
def test_the_serving_budget_dry_run_prints_auc_with_a_paired_ci_and_latency_per_budget(tmp_path):
    """``benchmarks/serving_budget.py --dry-run``: a tiny synthetic run, its rows checked against
    ``inference.score`` and the reference row paired with itself."""
    import pandas as pd

    csv = tmp_path / "budget.csv"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "serving_budget.py"), "--dry-run", "--rows", "1x2", "2x2", "2x1",
         "--requests", "2", "--csv", str(csv)],
        capture_output=True, text=True, timeout=900, cwd=BENCHMARKS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "load average before:" in done.stdout and "load average after:" in done.stdout
    frame = pd.read_csv(csv)
    assert frame["budget"].tolist() == ["1x2", "2x2", "2x1"]
    assert (frame["check_vs_score"] < 1e-5).all()  # each row is what inference.score serves for it
    reference = frame.set_index("budget").loc["2x2"]  # most members, most views
    assert reference["diff_vs_2x2"] == reference["diff_lo"] == reference["diff_hi"] == 0
    assert frame["auc"].between(0, 1).all() and (frame["diff_lo"] <= frame["diff_hi"]).all()
    assert (frame["p50_ms"] > 0).all() and (frame["p95_ms"] >= frame["p50_ms"]).all()
    assert frame.set_index("budget").loc["1x2", "p50_vs_1x8"] == 1.0  # no 1x8 row: the first row is the base
