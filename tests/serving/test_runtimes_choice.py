"""Serving runtimes per bundle: each offered runtime/precision exports, loads and matches eager fp32;
tampered files are refused; ``auto`` falls back to torch fp32 with a note; an explicit runtime never does."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from test_runtimes import inputs, tiny_spec

from melanoma_ml.config import RUNTIME_PRECISIONS, ServingConfig
from melanoma_ml.errors import MelanomaInputError
from melanoma_ml.serving import runtimes
from melanoma_ml.serving.inference import dihedral_views
from melanoma_ml.serving.runtimes import (
    PRECISIONS,
    REFERENCE,
    RUNTIMES,
    OnnxDigestMismatch,
    RuntimeChoice,
    RuntimeParityError,
    RuntimeSelection,
    ServingRuntimeError,
    choose_runtime,
    export_runtime,
    load_logits_fn,
    max_probability_gap,
)
from melanoma_ml.spec import ModelSpec

STEM = "model"
# Largest |probability difference| from eager fp32 each pair may show on the spread-out tiny model's 32 probe
# views: fp32 runtimes differ only in summation order (measured ~2e-8); bf16 keeps 8 mantissa bits (~5e-4);
# int8 rounds weights per channel and activations per tensor to 256 levels (~6e-3). About 10x headroom.
TOLERANCES = {
    ("torch", "fp32"): 1e-6,
    ("torch", "bf16"): 5e-3,
    ("onnxruntime", "fp32"): 1e-6,
    ("onnxruntime", "int8"): 5e-2,
    ("openvino", "fp32"): 1e-6,
    ("openvino", "int8"): 5e-2,
}
OFFERED = [(runtime, precision) for runtime, offered in RUNTIME_PRECISIONS.items() for precision in offered]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return tiny_spec()


@pytest.fixture(scope="module")
def net(spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    model = spec.build_network().eval().requires_grad_(False)
    model.head[1].weight.mul_(20.0)  # spread the logits: near 0.5 every runtime looks exact
    return model


@pytest.fixture(scope="module")
def probe(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    images, metadata = inputs(spec, 4, seed=1)
    return dihedral_views(images), metadata.repeat(8, 1)


@pytest.fixture(scope="module")
def calibration(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    images, metadata = inputs(spec, 8, seed=2)  # disjoint from the probe, like training vs validation images
    return dihedral_views(images), metadata.repeat(8, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A bundle folder shared by the module: an ONNX export takes seconds, so each kind is made once."""
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="module")
def auto_fp32(net, spec, probe, folder) -> RuntimeSelection:
    return choose_runtime(net, spec, folder, STEM, "auto", "fp32", probe, 1e-4)


@pytest.fixture(scope="module")
def files(net, spec, calibration, folder, auto_fp32) -> dict[str, tuple[str, str]]:
    """The exported files by precision (openvino runs the same files as onnxruntime)."""
    int8 = export_runtime(
        net, spec, folder, STEM, RuntimeChoice("onnxruntime", "int8"), calibration=calibration
    )
    return {"fp32": auto_fp32.file, "int8": int8}


@pytest.fixture
def copy_export(folder, files, monkeypatch) -> None:
    """``export_onnx`` replaced by a copy of the module's real export (for tests about what follows it)."""

    def copy(net, spec, path, **kwargs):
        data = (folder / files["fp32"][0]).read_bytes()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return runtimes.hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(runtimes, "export_onnx", copy)


def requires(runtime: str) -> None:
    """openvino is optional for users but in the dev extra: skipped only outside CI, where it must run."""
    if runtime != "openvino":
        return
    if os.environ.get("CI"):
        import openvino  # noqa: F401  (an ImportError here: the dev extra was not installed)
    else:
        pytest.importorskip("openvino", reason="openvino is an optional runtime (pip install -e '.[dev]')")


def test_the_offered_pairs_cover_every_runtime_and_precision():
    assert set(TOLERANCES) == set(OFFERED)
    assert {r for r, _ in OFFERED} == set(RUNTIMES) and {p for _, p in OFFERED} == set(PRECISIONS)


@pytest.mark.parametrize(("runtime", "precision"), OFFERED)
def test_each_offered_runtime_exports_loads_and_matches_eager_fp32(
    net, spec, probe, folder, files, tmp_path, runtime, precision
):
    requires(runtime)
    choice = RuntimeChoice(runtime, precision)
    if runtime == "torch":
        file = export_runtime(net, spec, tmp_path, STEM, choice)
        assert file is None and list(tmp_path.iterdir()) == []
    else:
        file = files[precision]
        name, digest = file
        assert name == choice.file_name(STEM) == ("model.int8.onnx" if precision == "int8" else "model.onnx")
        assert sorted(p.name for p in folder.iterdir()) == ["model.int8.onnx", "model.onnx"]  # no temp left
        assert runtimes.hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    logits_fn = load_logits_fn(folder, choice, file, net, threads=1)
    x, meta = probe
    logits = logits_fn(x, meta)
    assert logits.shape == (x.shape[0],) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    probabilities = torch.sigmoid(net(x, meta))
    assert float(probabilities.max() - probabilities.min()) > 0.05  # a probe where runtimes can differ
    gap = max_probability_gap(net, logits_fn, x, meta)
    assert gap <= TOLERANCES[runtime, precision]
    if (runtime, precision) != ("torch", "fp32"):
        assert gap > 0  # the comparison sees the other arithmetic: it would catch a wrong network


def test_a_tampered_runtime_file_is_refused_naming_it(net, spec, tmp_path, copy_export):
    choice = RuntimeChoice("onnxruntime", "fp32")
    name, digest = export_runtime(net, spec, tmp_path, "members/fold1", choice)
    assert name == "members/fold1.onnx"
    load_logits_fn(tmp_path, choice, (name, digest), None)  # untouched, it loads
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(OnnxDigestMismatch, match="fold1.onnx.*re-export") as caught:
        load_logits_fn(tmp_path, choice, (name, digest), None)
    assert isinstance(caught.value, MelanomaInputError)


def test_a_runtime_without_its_file_or_with_a_file_outside_the_bundle_is_refused(tmp_path):
    choice = RuntimeChoice("onnxruntime", "fp32")
    with pytest.raises(ServingRuntimeError, match="promote the model again"):
        load_logits_fn(tmp_path, choice, None, None)
    with pytest.raises(ServingRuntimeError, match="outside the bundle folder"):
        load_logits_fn(tmp_path, choice, ("../model.onnx", "0" * 64), None)


@pytest.mark.parametrize(
    ("runtime", "precision"), [("onnxruntime", "bf16"), ("torch", "int8"), ("tvm", "fp32")]
)
def test_pairs_that_are_not_offered_are_refused(runtime, precision):
    with pytest.raises(ServingRuntimeError, match="serving"):
        RuntimeChoice(runtime, precision)


def test_config_refuses_a_runtime_precision_pair_it_does_not_offer():
    with pytest.raises(ValueError, match="does not offer serving.precision=bf16.*use serving.runtime torch"):
        ServingConfig(runtime="onnxruntime", precision="bf16")
    assert ServingConfig(runtime="auto", precision="int8").precision == "int8"


def test_int8_without_calibration_images_says_what_to_pass(net, spec, tmp_path):
    with pytest.raises(ServingRuntimeError, match="calibration"):
        export_runtime(net, spec, tmp_path, STEM, RuntimeChoice("onnxruntime", "int8"))


def test_openvino_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without it gives: ImportError
    with pytest.raises(ServingRuntimeError, match="pip install openvino"):
        load_logits_fn(tmp_path, RuntimeChoice("openvino", "fp32"), ("model.onnx", "0" * 64), None)


def test_auto_serves_onnxruntime_fp32_when_it_matches(auto_fp32, probe, folder):
    selection = auto_fp32
    assert selection.choice == RuntimeChoice("onnxruntime", "fp32") and selection.note == ""
    name, digest = selection.file
    assert runtimes.hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert selection.parity["max_abs_prob_diff"] <= 1e-4
    assert selection.parity["n_inputs"] == probe[0].shape[0] and selection.parity["tolerance"] == 1e-4


def test_auto_falls_back_to_torch_fp32_when_the_export_fails(net, spec, probe, tmp_path, monkeypatch, caplog):
    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::fancy")

    monkeypatch.setattr(runtimes, "export_onnx", broken_export)
    with caplog.at_level(logging.WARNING, logger=runtimes.__name__):
        selection = choose_runtime(net, spec, tmp_path, STEM, "auto", "fp32", probe, 1e-4)
    assert selection.choice == REFERENCE and selection.file is None
    assert "fell back to torch fp32" in selection.note and "aten::fancy" in selection.note
    assert selection.note in caplog.text
    assert selection.parity["max_abs_prob_diff"] <= 1e-5
    assert list(tmp_path.iterdir()) == []


def test_auto_falls_back_when_the_candidate_misses_the_tolerance_and_removes_its_file(
    net, spec, probe, tmp_path, copy_export
):
    selection = choose_runtime(net, spec, tmp_path, STEM, "auto", "fp32", probe, 1e-12)
    assert selection.choice == REFERENCE and selection.file is None
    assert "onnxruntime fp32 moved probabilities" in selection.note and "1e-12" in selection.note
    assert list(tmp_path.iterdir()) == []


def test_an_explicit_runtime_that_misses_the_tolerance_is_refused(net, spec, probe, tmp_path):
    with pytest.raises(RuntimeParityError, match="runtime_parity_tolerance=1e-12") as caught:
        choose_runtime(net, spec, tmp_path, STEM, "torch", "bf16", probe, 1e-12)
    assert "serving.runtime=torch with serving.precision=bf16" in str(caught.value)
    assert "32 probe views" in str(caught.value)
    assert isinstance(caught.value, MelanomaInputError)


def test_an_explicit_runtime_within_the_tolerance_is_served(net, spec, probe, tmp_path):
    selection = choose_runtime(net, spec, tmp_path, STEM, "torch", "bf16", probe, 5e-3)
    assert selection.choice == RuntimeChoice("torch", "bf16") and selection.file is None
    assert 0 < selection.parity["max_abs_prob_diff"] <= 5e-3
