"""The served budget, members x views: the view subsets, the one merged ONNX Runtime graph, serving.views."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from melanoma_ml.config import ServingConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.serving.bundle import Scorer, torch_logits
from melanoma_ml.serving.inference import members_view_logits, predict_tensor, view_logits
from melanoma_ml.serving.network_inputs import VIEW_SUBSETS, dihedral_views, encode_metadata
from melanoma_ml.serving.runtimes import (
    MergedOnnxRunner,
    MergedSlot,
    OnnxModelError,
    export_merged_onnx,
    merges,
)
from tests.serving.test_ensemble_bundle import WIDE_RECORDS, _members_with_different_encoders


def test_every_view_subset_is_the_eight_views_it_names_and_closed_under_its_own_transforms() -> None:
    x = torch.randn(2, 3, 6, 6)
    eight = dihedral_views(x).view(8, 2, 3, 6, 6)
    for views, kept in VIEW_SUBSETS.items():
        subset = dihedral_views(x, views).view(views, 2, 3, 6, 6)
        assert torch.equal(subset, eight[list(kept)])
        for view in subset:  # a subgroup: any kept transform of a kept view is a kept view
            moved = dihedral_views(view).view(8, 2, 3, 6, 6)[list(kept)]
            assert all(any(torch.equal(m, s) for s in subset) for m in moved), views
    with pytest.raises(InputValueError, match=r"views must be one of \[1, 2, 4, 8\]"):
        dihedral_views(x, 3)


def test_two_views_average_the_image_and_its_horizontal_flip() -> None:
    members = _members_with_different_encoders()
    net, spec = members[0].net, members[0].spec
    x = torch.randn(3, 3, spec.image_size, spec.image_size)
    meta = encode_metadata([{}] * 3, spec, 3)
    with torch.no_grad():
        expected = (torch.sigmoid(net(x, meta)) + torch.sigmoid(net(torch.flip(x, dims=(3,)), meta))) / 2
    np.testing.assert_allclose(predict_tensor(net, x, meta, views=2), expected, atol=1e-6)
    logits = view_logits(torch_logits(net), x, meta, views=1)
    assert logits.shape == (1, 3)
    with pytest.raises(InputValueError, match="serving.views"):
        view_logits(torch_logits(net), x, meta, views=5)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Two members whose encoders differ in width, exported into one graph, and their eager networks."""
    members = _members_with_different_encoders()
    path = tmp_path_factory.mktemp("merged") / "members.onnx"
    sha256 = export_merged_onnx([m.net for m in members], [m.spec for m in members], path)
    return members, MergedOnnxRunner(path, sha256)


def _inputs(members, n: int = 3):
    images = torch.randn(n, 3, members[0].spec.image_size, members[0].spec.image_size)
    return [(images, encode_metadata((WIDE_RECORDS * n)[:n], m.spec, n)) for m in members]


def test_the_merged_graph_gives_each_member_its_eager_logits_in_one_call(merged) -> None:
    members, runner = merged
    assert runner.n_members == 2 and runner.meta_widths == [8, 9]
    inputs = _inputs(members)
    together = runner.run(inputs)
    for member, (x, meta), got in zip(members, inputs, together, strict=True):
        with torch.no_grad():
            np.testing.assert_allclose(got, member.net(x, meta).numpy(), atol=1e-5)
    alone = runner.member(1)(*inputs[1])  # the other member gets one row of zeros
    np.testing.assert_allclose(alone.numpy(), together[1], atol=1e-6)
    with pytest.raises(OnnxModelError, match="member 1 .* takes metadata"):
        runner.run([inputs[0], inputs[0]])  # member 0's 8 columns fed to member 1, which takes 9


@pytest.mark.parametrize("views", [1, 2, 8])
def test_members_in_one_merged_session_score_like_each_member_alone(merged, views) -> None:
    members, runner = merged
    inputs = _inputs(members)
    alone = [Scorer(m.spec, torch_logits(m.net)) for m in members]
    together = [Scorer(m.spec, runner.member(p), merged=MergedSlot(runner, p)) for p, m in enumerate(members)]
    expected = members_view_logits(alone, inputs, views)
    got = members_view_logits(together, inputs, views)
    assert [g.shape for g in got] == [(views, 3)] * 2
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_only_onnxruntime_fp32_ensembles_are_merged() -> None:
    assert merges("auto", "fp32", 5) and merges("onnxruntime", "fp32", 2)
    assert not merges("auto", "fp32", 1)  # one network keeps its own file
    assert not merges("auto", "bf16", 5) and not merges("onnxruntime", "int8", 5)
    assert not merges("torch", "fp32", 5) and not merges("openvino", "fp32", 5)


def test_serving_tta_is_read_as_views_with_a_deprecation_warning() -> None:
    assert ServingConfig().views == 2 and ServingConfig().max_members is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ServingConfig(tta=False).views == 1
        assert ServingConfig(tta=True).views == 8
    assert all(issubclass(w.category, DeprecationWarning) for w in caught) and len(caught) == 2
    assert "serving.views=1" in str(caught[0].message)
    with pytest.raises(ValueError, match="contradicts serving.views=2"):
        ServingConfig(tta=True, views=2)
    with pytest.raises(ValueError, match="views"):
        ServingConfig(views=3)
    with pytest.raises(ValueError, match="max_members"):
        ServingConfig(max_members=0)


def test_max_members_serves_the_best_fold_then_the_next_folds_described_by_their_own_rows(
    monkeypatch,
) -> None:
    from types import SimpleNamespace

    import pandas as pd

    from melanoma_ml.config import PipelineConfig
    from melanoma_ml.serving import champion

    aurocs = [0.7, 0.9, 0.6, 0.8, 0.75]
    folds = [
        SimpleNamespace(fold=k, best_val_auroc=a, oof=pd.DataFrame({"image_name": [f"i{k}"], "fold": [k]}))
        for k, a in enumerate(aurocs)
    ]
    pooled = pd.concat([f.oof for f in folds], ignore_index=True)
    monkeypatch.setattr(champion, "report_oof", lambda config, backbone: pooled)

    def choice(max_members):
        config = PipelineConfig(serving={"ensemble": "folds", "max_members": max_members})
        return champion.served_choice(config, "b", {"b": folds})

    three = choice(3)
    assert three.kind == "folds" and [m.fold for m in three.members] == [1, 0, 2]
    assert sorted(three.oof["fold"]) == [0, 1, 2] and "mean of 3 fold models" in three.name
    every = choice(None)
    assert [m.fold for m in every.members] == [1, 0, 2, 3, 4] and len(every.oof) == 5
    one = choice(1)
    assert one.kind == "best_fold" and [m.fold for m in one.members] == [1]
