"""Batched 8-view TTA inference: geometry, one forward pass, equality with per-view passes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from melanoma_ml.config import ModelConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.images.cache import resize_centre_crop
from melanoma_ml.serving.bundle import Bundle, load_bundle, save_bundle
from melanoma_ml.serving.inference import (
    dihedral_views,
    encode_metadata,
    predict,
    predict_tensor,
    preprocess,
)
from melanoma_ml.serving.manifest import BundleFile, BundleManifest, Ensemble, EnsembleMember
from melanoma_ml.spec import ModelSpec
from melanoma_ml.weights import WEIGHTS_FILE

SIZE = 32
META = [
    {"age": 35, "sex": "female", "site": "torso"},
    {"age": 70, "sex": "male", "site": "head/neck"},
    {"age": None, "sex": None},
    {"age": 55, "sex": "male", "site": "palms/soles"},  # unseen site counts as missing
    {},
]


def tiny_spec(size: int = SIZE) -> ModelSpec:
    encoder = MetadataEncoder(
        age_mean=50.0, age_std=15.0, sexes=("female", "male"), sites=("head/neck", "torso")
    )
    network = ModelConfig(backbone="test_efficientnet", meta_hidden=[8], meta_dropout=0.1, head_dropout=0.1)
    return ModelSpec(network, size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], encoder)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    torch.manual_seed(0)
    spec = tiny_spec()
    net = spec.build_network().eval().requires_grad_(False).to(memory_format=torch.channels_last)
    one = Ensemble(  # one network (no calibration: predict returns the network's output)
        kind="best_fold",
        average="probability",
        members=[EnsembleMember(weights=BundleFile(name=WEIGHTS_FILE, sha256="0" * 64), model_spec=spec)],
    )
    manifest = BundleManifest.model_construct(ensemble=one)
    return Bundle(
        path=Path("in-memory"), net=net, spec=spec, manifest=manifest, threshold=0.5, version="test"
    )


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [(SIZE, SIZE), (48, 40), (40, 64), (20, 20), (SIZE, SIZE)]
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def test_dihedral_views_are_the_eight_symmetries_view_major():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = dihedral_views(x)
    assert views.shape == (16, 3, 4, 4)
    for k in range(4):
        turned = torch.rot90(x, k, dims=(2, 3))
        assert torch.equal(views[k * 2 : k * 2 + 2], turned)
        assert torch.equal(views[(k + 4) * 2 : (k + 4) * 2 + 2], torch.flip(turned, dims=(3,)))
    distinct = {tuple(v.flatten().tolist()) for v in views[0::2]}
    assert len(distinct) == 8


def test_dihedral_views_need_a_square_batch():
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(1, 3, 4, 5))


def test_preprocess_normalizes_with_the_spec_and_gives_square_inputs(images):
    spec = tiny_spec()
    x = preprocess(images, spec)
    assert x.shape == (len(images), 3, SIZE, SIZE)
    assert x.dtype == torch.float32
    # an image already at the size is only normalized: (v / 255 - mean) / std
    expected = (
        torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255 - torch.tensor(spec.mean).view(3, 1, 1)
    ) / (torch.tensor(spec.std).view(3, 1, 1))
    torch.testing.assert_close(x[0], expected)
    # other sizes get the training cache's geometry (short side to size, centre crop)
    cropped = torch.from_numpy(resize_centre_crop(images[1], SIZE).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(
        x[1], (cropped - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    )
    assert preprocess([], spec).shape == (0, 3, SIZE, SIZE)


@pytest.mark.parametrize("color_constancy", ["none", "shades_of_gray"])
def test_serving_input_is_bit_identical_to_the_training_eval_transform(images, color_constancy):
    """Both run ``normalize_pixels`` with the spec's colour constancy: no second path to drift."""
    from dataclasses import replace

    from melanoma_ml.images.transforms import eval_transform

    spec = replace(tiny_spec(), color_constancy=color_constancy)
    views = [resize_centre_crop(image, SIZE) for image in images]
    transform = eval_transform(spec.image_size, spec.mean, spec.std, spec.color_constancy)
    trained = torch.stack([transform(image=view)["image"] for view in views])
    assert torch.equal(preprocess(images, spec), trained)


def test_batched_tta_equals_the_mean_of_eight_separate_forward_passes(bundle, images):
    x = preprocess(images, bundle.spec)
    meta = encode_metadata(META, bundle.spec, len(images))
    batched = predict_tensor(bundle.net, x, meta, views=8)
    with torch.inference_mode():
        per_view = [
            torch.sigmoid(bundle.net(v.contiguous(memory_format=torch.channels_last), meta))
            for v in dihedral_views(x).split(len(images))
        ]
    assert len(per_view) == 8
    torch.testing.assert_close(batched, torch.stack(per_view).mean(dim=0), rtol=0, atol=1e-5)


def test_tta_makes_the_prediction_invariant_to_turning_and_mirroring(bundle, images):
    image = images[0]  # square at the network size: no crop, so the symmetry is exact
    variants = [image, np.rot90(image), np.rot90(image, 2), np.fliplr(image), np.flipud(image)]
    p = predict(bundle, [np.ascontiguousarray(v) for v in variants], [META[0]] * 5)
    np.testing.assert_allclose(p, p[0], atol=1e-5)


def test_one_forward_pass_per_batch(bundle, images):
    calls = []
    handle = bundle.net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    try:
        predict(bundle, images, META, views=8, batch_size=64)
        predict(bundle, images, META, views=8, batch_size=2)
    finally:
        handle.remove()
    assert calls == [8 * 5, 8 * 2, 8 * 2, 8 * 1]


def test_predict_returns_probabilities_independent_of_batching(bundle, images):
    p = predict(bundle, images, META)
    assert p.shape == (5,)
    # one dtype whether or not the bundle has a calibrator (calibrated_probabilities)
    assert p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(predict(bundle, images, META, batch_size=2), p, atol=1e-6)
    encoded = np.stack(
        [bundle.spec.encoder.encode_one(m.get("age"), m.get("sex"), m.get("site")) for m in META]
    )
    np.testing.assert_allclose(predict(bundle, images, encoded), p, atol=1e-6)
    assert predict(bundle, [], []).shape == (0,)


def test_an_exported_bundle_predicts_like_the_network_it_came_from(tmp_path, bundle, images):
    path = save_bundle(
        tmp_path / "b", bundle.net, bundle.spec, threshold=0.5, metrics={}, data_version="d", code_version="c"
    )
    np.testing.assert_allclose(
        predict(load_bundle(path), images, META), predict(bundle, images, META), atol=1e-6
    )


def test_without_tta_it_is_the_sigmoid_of_one_pass(bundle, images):
    x = preprocess(images, bundle.spec)
    meta = encode_metadata(META, bundle.spec, len(images))
    with torch.inference_mode():
        expected = torch.sigmoid(bundle.net(x, meta)).numpy()
    np.testing.assert_allclose(predict(bundle, images, META, views=1), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("bad_images", "bad_meta", "error", "message"),
    [
        (
            [np.zeros((8, 8, 3), np.float32)],
            [{}],
            ValueError,
            r"image 0 has shape \(8, 8, 3\) and dtype float32",
        ),
        ([np.zeros((8, 8, 4), np.uint8)], [{}], ValueError, r"image 0 has shape \(8, 8, 4\)"),
        ([np.zeros((8, 8), np.uint8)], [{}], ValueError, "pass \\(H, W, 3\\) uint8 RGB"),
        (["photo.jpg"], [{}], TypeError, "image 0 is a str; .*load_rgb"),
        ([np.zeros((8, 8, 3), np.uint8)] * 2, [{}], ValueError, "got 2 images but 1 metadata records"),
        ([np.zeros((8, 8, 3), np.uint8)], [{"age_approx": 40}], ValueError, r"unknown keys \['age_approx'\]"),
        ([np.zeros((8, 8, 3), np.uint8)], [("a", 1)], TypeError, "metadata record 0 is a tuple"),
        (
            [np.zeros((8, 8, 3), np.uint8)],
            np.zeros((1, 3)),
            ValueError,
            r"encoded metadata has shape \(1, 3\)",
        ),
    ],
)
def test_bad_requests_name_the_item_and_the_fix(bundle, bad_images, bad_meta, error, message):
    with pytest.raises(error, match=message):
        predict(bundle, bad_images, bad_meta)


def test_bad_image_index_counts_across_batches(bundle, images):
    with pytest.raises(ValueError, match="image 3 has shape"):
        predict(bundle, images[:3] + [np.zeros((4, 4), np.uint8)], META[:4], batch_size=2)


def test_a_network_in_training_mode_is_refused(images):
    spec = tiny_spec()
    net = spec.build_network().train()
    with pytest.raises(ValueError, match=r"training mode; call net.eval\(\)"):
        predict_tensor(net, preprocess(images[:1], spec), encode_metadata(META[:1], spec, 1))
