"""ONNX export and the hash-checked ONNX Runtime runner: parity with eager fp32, dynamic batch, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from melanoma_ml.config import ModelConfig
from melanoma_ml.errors import InputFileNotFoundError, MelanomaInputError
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.serving.inference import dihedral_views
from melanoma_ml.serving.runtimes import (
    OnnxDigestMismatch,
    OnnxModelError,
    OnnxRunner,
    export_onnx,
    max_probability_gap,
)
from melanoma_ml.spec import ModelSpec

pytest.importorskip("onnxruntime")

SIZE = 32
TOLERANCE = 1e-4


def tiny_spec() -> ModelSpec:
    encoder = MetadataEncoder(
        age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("head/neck", "torso")
    )
    network = ModelConfig(backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
    return ModelSpec(network, SIZE, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], encoder)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return tiny_spec()


@pytest.fixture(scope="module")
def net(spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    model = spec.build_network().eval().requires_grad_(False)
    # Random init puts every probability near 0.5, where any runtime looks exact; spread the logits out.
    model.head[1].weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def exported(net: torch.nn.Module, spec: ModelSpec, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_onnx(net, spec, path)


def inputs(spec: ModelSpec, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator)
    metadata = torch.from_numpy(
        np.stack([spec.encoder.encode_one(30 + 5 * i, ("female", "male")[i % 2], "torso") for i in range(n)])
    )
    return images, metadata


def test_export_writes_one_self_contained_file_and_returns_its_digest(exported):
    path, digest = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no external .data file
    assert len(digest) == 64 and digest == OnnxRunner(path, digest).sha256


@pytest.mark.parametrize("batch", [1, 8])
def test_runner_matches_eager_fp32_for_dynamic_batch_sizes(net, spec, exported, batch):
    runner = OnnxRunner(*exported, threads=1)
    images, metadata = inputs(spec, batch)
    logits = runner(images, metadata)
    assert logits.shape == (batch,) and logits.dtype == np.float32
    assert max_probability_gap(net, runner, images, metadata) < TOLERANCE


def test_runner_matches_eager_on_the_eight_tta_views(net, spec, exported):
    images, metadata = inputs(spec, 3, seed=1)
    views, view_meta = dihedral_views(images), metadata.repeat(8, 1)
    assert max_probability_gap(net, OnnxRunner(*exported), views, view_meta, batch_size=8) < TOLERANCE


def test_parity_detects_a_different_network(net, spec, exported):
    images, metadata = inputs(spec, 8)
    probabilities = torch.sigmoid(net(images, metadata))
    assert float(probabilities.max() - probabilities.min()) > 0.05  # not all at 0.5, where any runtime agrees
    other = copy.deepcopy(net)
    other.head[1].bias.add_(1.0)
    assert max_probability_gap(other, OnnxRunner(*exported), images, metadata) > 1e-2


def test_wrong_digest_is_refused(exported):
    path, digest = exported
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(OnnxDigestMismatch, match="re-export") as caught:
        OnnxRunner(path, wrong)
    assert isinstance(caught.value, MelanomaInputError)


def test_tampered_file_is_refused(exported, tmp_path):
    path, digest = exported
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(OnnxDigestMismatch):
        OnnxRunner(tampered, digest)


@pytest.mark.parametrize("digest", ["", "abc", "z" * 64])
def test_a_digest_that_is_not_sha256_hex_is_refused(exported, digest):
    with pytest.raises(OnnxModelError, match="64 hex"):
        OnnxRunner(exported[0], digest)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputFileNotFoundError, match="export_onnx"):
        OnnxRunner(tmp_path / "absent.onnx", "0" * 64)


def test_wrong_input_shapes_name_the_expected_ones(spec, exported):
    runner = OnnxRunner(*exported)
    images, metadata = inputs(spec, 2)
    with pytest.raises(OnnxModelError, match="images have shape"):
        runner(images[:, :, :16, :16], metadata)
    with pytest.raises(OnnxModelError, match="metadata has shape"):
        runner(images, metadata[:1])


def test_export_refuses_a_network_in_training_mode(spec, tmp_path):
    model = spec.build_network().train()
    with pytest.raises(ValueError, match="eval"):
        export_onnx(model, spec, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
