"""docs/architecture.md stays true: the paths it names exist, it names every part of melanoma_ml, its layer
lists are pyproject's import-linter contracts, and its artifact layout has every folder of artifacts.py.

The checks run on the doc and the source tree as text (no import of the pipeline), plus a throwaway
``ArtifactPaths`` for the layout.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from melanoma_ml.artifacts import ArtifactPaths

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
LIBRARY = REPO / "melanoma_ml"
FENCE = re.compile(r"^```(.*?)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The doc without its fenced blocks (layer lists, layouts): what inline code is read from."""
    return FENCE.sub("", text)


def _fenced(text: str) -> list[tuple[str, str]]:
    """``(info string, body)`` of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def named_paths(text: str) -> list[str]:
    """Inline-code tokens that name a file or folder of the code: ``*.py`` or ``*/``."""
    return sorted({t for t in INLINE.findall(_prose(text)) if re.fullmatch(r"[\w./-]+(\.py|/)", t)})


def missing_paths(text: str) -> list[str]:
    """Named paths that are neither under the repository nor under ``melanoma_ml/``."""
    return [t for t in named_paths(text) if not ((REPO / t).exists() or (LIBRARY / t).exists())]


def library_parts() -> list[str]:
    """Every top-level module (``name.py``) and subpackage (``name/``) of melanoma_ml."""
    modules = [p.name for p in LIBRARY.glob("*.py") if p.name != "__init__.py"]
    packages = [f"{p.name}/" for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()]
    return sorted(modules + packages)


def unnamed_parts(text: str) -> list[str]:
    named = set(INLINE.findall(_prose(text)))
    return [part for part in library_parts() if part not in named]


def layer_blocks(text: str) -> dict[str, list[str]]:
    """Contract id -> its layers, from the doc's ```` ```layers <id> ```` blocks."""
    blocks = {}
    for info, body in _fenced(text):
        words = info.split()
        if words[:1] == ["layers"] and len(words) == 2:
            blocks[words[1]] = [line.strip() for line in body.splitlines() if line.strip()]
    return blocks


def layer_contracts() -> dict[str, list[str]]:
    """Contract id -> layers of every ``layers`` contract in pyproject's ``[tool.importlinter]``."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return {
        c["id"]: [" ".join(layer.split()) for layer in c["layers"]]
        for c in contracts
        if c["type"] == "layers"
    }


def stale_attributes(text: str) -> list[str]:
    """``module.name`` tokens naming a top-level melanoma_ml module whose source defines no ``name``."""
    stale = []
    for token in sorted(set(INLINE.findall(_prose(text)))):
        match = re.fullmatch(r"(\w+)\.(\w+)", token)
        if not match or not (LIBRARY / f"{match.group(1)}.py").is_file() or match.group(2) == "py":
            continue
        tree = ast.parse((LIBRARY / f"{match.group(1)}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        defined |= {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
        }
        defined |= {
            n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }
        if match.group(2) not in defined:
            stale.append(token)
    return stale


def layout_block(text: str) -> str:
    blocks = [body for _info, body in _fenced(text) if body.startswith("<artifact_root>/")]
    assert len(blocks) == 1, "docs/architecture.md needs one fenced block starting with '<artifact_root>/'"
    return blocks[0]


def unlisted_artifact_folders(text: str) -> list[str]:
    """First folders of every ``ArtifactPaths`` property that the doc's layout block does not list."""
    paths = ArtifactPaths(Path("/root"))
    firsts = {
        getattr(paths, name).relative_to(paths.root).parts[0]
        for name, attribute in vars(ArtifactPaths).items()
        if isinstance(attribute, property) and getattr(paths, name) != paths.root
    }
    listed = {m.group(1) for m in re.finditer(r"^\s+([\w.-]+)/", layout_block(text), re.MULTILINE)}
    return sorted(firsts - listed)


# ---------------------------------------------------------------------- the doc as it is
def test_every_path_the_doc_names_exists() -> None:
    assert named_paths(_doc()), "the doc names no module: the path pattern is broken"
    missing = missing_paths(_doc())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}; fix or remove them"


def test_the_doc_names_every_subpackage_and_top_level_module_of_melanoma_ml() -> None:
    unnamed = unnamed_parts(_doc())
    assert not unnamed, (
        f"docs/architecture.md does not name {unnamed}: add each (in backticks, as `name.py` or `name/`) to "
        "'What lives where'"
    )


def test_the_doc_s_layer_lists_are_pyproject_s_import_linter_contracts() -> None:
    doc, contracts = layer_blocks(_doc()), layer_contracts()
    assert set(doc) == set(contracts), (
        f"docs/architecture.md has layer blocks {sorted(doc)}, pyproject.toml layers contracts "
        f"{sorted(contracts)}: one ```layers <contract id>``` block per contract"
    )
    for contract, layers in contracts.items():
        assert doc[contract] == layers, (
            f"docs/architecture.md's `{contract}` layers differ from pyproject.toml's [tool.importlinter] "
            f"contract: doc {doc[contract]}, pyproject {layers}; copy pyproject's list into the doc"
        )


def test_module_attributes_the_doc_names_exist() -> None:
    stale = stale_attributes(_doc())
    assert not stale, f"docs/architecture.md names {stale}, which those modules do not define"


def test_the_artifact_layout_lists_every_folder_of_artifacts_py() -> None:
    unlisted = unlisted_artifact_folders(_doc())
    assert not unlisted, (
        f"the artifact layout in docs/architecture.md lacks {unlisted}: add them from artifacts.py"
    )


# ---------------------------------------------------------------------- the checks catch what they should
@pytest.mark.parametrize(
    ("edit", "check", "found"),
    [
        (lambda d: d + "\nSee `serving/no_such_module.py`.\n", missing_paths, ["serving/no_such_module.py"]),
        (lambda d: d + "\nSee `no_such_package/`.\n", missing_paths, ["no_such_package/"]),
        (lambda d: d.replace("`folds.py`", "folds"), unnamed_parts, ["folds.py"]),
        (lambda d: d.replace("`tabular/`", "tabular"), unnamed_parts, ["tabular/"]),
        (lambda d: d + "\nCalls `pipeline.no_such_step`.\n", stale_attributes, ["pipeline.no_such_step"]),
        (
            lambda d: re.sub(r"^  tables/.*\n", "", d, flags=re.MULTILINE),
            unlisted_artifact_folders,
            ["tables"],
        ),
    ],
    ids=["missing-module", "missing-folder", "unnamed-module", "unnamed-package", "stale-name", "layout"],
)
def test_each_check_fails_on_a_doc_that_breaks_it(edit, check, found) -> None:
    assert check(_doc()) == []
    assert check(edit(_doc())) == found


def test_a_changed_layer_list_is_told_apart() -> None:
    edited = _doc().replace("\ncli\npipeline\n", "\npipeline\ncli\n", 1)
    assert layer_blocks(edited)["library-layers"] != layer_contracts()["library-layers"]
    assert layer_blocks(_doc())["library-layers"] == layer_contracts()["library-layers"]
