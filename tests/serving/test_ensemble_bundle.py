"""Ensemble bundles: k fold networks in one bundle, every file hashed, averaged in a stated space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melanoma_ml.serving.bundle import (
    BundleError,
    BundleIntegrityError,
    EnsembleToSave,
    MemberNet,
    load_bundle,
    save_bundle,
    verify_bundle,
)
from melanoma_ml.serving.inference import average_members, predict, score, score_out_of_fold
from melanoma_ml.serving.registry import ModelRegistry
from tests.serving.test_bundle import METRICS, tiny_spec

RECORDS = [{"age": 40.0, "sex": "male", "site": "torso"}, {"age": None, "sex": None, "site": None}] * 3


def _members(n: int = 3) -> list[MemberNet]:
    spec = tiny_spec()
    members = []
    for fold in range(n):
        torch.manual_seed(fold)
        net = spec.build_network().eval()
        with torch.no_grad():  # spread the logits so the members disagree visibly
            net.head[-1].weight.mul_(20.0)
        members.append(MemberNet(net, spec, fold, f"{fold:064x}"))
    return members


def _images(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(n)]


def _save(out, members, average: str = "probability"):
    oof = {
        "image_name": [f"ISIC_{i}" for i in range(4)],
        "group_id": ["p0", "p1", "p2", "p3"],
        "fold": [0, 1, 2, 0],
        "target": [0, 1, 0, 1],
        "prob": [0.2, 0.7, 0.4, 0.6],
    }
    return save_bundle(
        out,
        members[0].net,
        members[0].spec,
        threshold=0.4,
        metrics=METRICS,
        data_version="folds-abc",
        code_version="test",
        oof=oof,
        ensemble=EnsembleToSave("folds", average, members),
    )


@pytest.fixture(scope="module")
def members() -> list[MemberNet]:
    return _members()


def _one(member: MemberNet, tmp_path, name: str):
    return load_bundle(
        save_bundle(tmp_path / name, member.net, member.spec, threshold=0.4, metrics=METRICS,
                    data_version="d", code_version="c")
    )  # fmt: skip


@pytest.mark.parametrize("average", ["probability", "logit"])
def test_an_ensemble_bundle_averages_its_members_in_the_stated_space(tmp_path, members, average) -> None:
    bundle = load_bundle(_save(tmp_path / "ensemble", members, average))
    manifest = bundle.manifest
    assert len(manifest.ensemble.members) == len(bundle.scorers) == 3
    assert [m.fold for m in manifest.ensemble.members] == [0, 1, 2]
    assert manifest.ensemble.members[0].weights.name == "weights.safetensors"
    assert "mean of 3 fold models" in manifest.describe_model()

    images = _images()
    singles = np.stack(
        [
            predict(_one(m, tmp_path, f"m{i}"), images, RECORDS, calibrated=False)
            for i, m in enumerate(members)
        ]
    )
    got = predict(bundle, images, RECORDS, calibrated=False)
    if average == "probability":
        expected = singles.mean(axis=0)
    else:
        clipped = np.clip(singles, 1e-7, 1 - 1e-7)
        expected = 1 / (1 + np.exp(-np.log(clipped / (1 - clipped)).mean(axis=0)))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(singles, axis=0).max() > 1e-3  # the members really differ: the average is a real test


def test_average_members_rejects_an_unknown_space() -> None:
    logits = [torch.zeros(8, 2), torch.ones(8, 2)]
    with pytest.raises(ValueError, match="unknown ensemble average"):
        average_members(logits, "median")


def test_out_of_fold_scores_use_only_the_member_that_did_not_train_on_the_image(tmp_path, members) -> None:
    bundle = load_bundle(_save(tmp_path / "ensemble", members))
    images = _images(3)
    folds = [2, 0, 1]
    got = score_out_of_fold(bundle, images, RECORDS[:3], folds)
    for i, fold in enumerate(folds):
        alone = predict(_one(members[fold], tmp_path, f"fold{fold}-{i}"), images[i : i + 1], RECORDS[i : i + 1],
                        views=1, calibrated=False)  # fmt: skip
        assert got[i] == pytest.approx(float(alone[0]), abs=1e-6)
    with pytest.raises(ValueError, match="no member of the ensemble was trained without fold 7"):
        score_out_of_fold(bundle, images[:1], RECORDS[:1], [7])


def test_a_corrupted_member_refuses_the_whole_ensemble(tmp_path, members) -> None:
    out = _save(tmp_path / "ensemble", members)
    member_file = out / "members" / "member2.safetensors"
    data = bytearray(member_file.read_bytes())
    data[-1] ^= 0xFF
    member_file.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"members/member2\.safetensors"):
        verify_bundle(out)
    member_file.unlink()
    with pytest.raises(BundleError, match=r"members/member2\.safetensors missing"):
        load_bundle(out)


def test_the_previous_model_keeps_serving_when_an_ensemble_member_is_corrupted(tmp_path, members) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    first = members[0]
    v1 = registry.register_bundle(first.net, first.spec, threshold=0.4, metrics=METRICS, data_version="d",
                                  code_version="c")  # fmt: skip
    registry.promote(v1)
    v2 = registry.register(_save(tmp_path / "ensemble", members))
    member_file = registry.version_path(v2) / "members" / "member1.safetensors"
    member_file.write_bytes(member_file.read_bytes()[:-4])
    with pytest.raises(BundleIntegrityError):
        registry.promote(v2)
    assert registry.current() == v1
    served = registry.load_current()
    assert served.version == v1 and score(served, _images(2), RECORDS[:2]).prob.shape == (2,)


def test_registering_copies_every_member(tmp_path, members) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(_save(tmp_path / "ensemble", members))
    copied = registry.version_path(version)
    assert sorted(p.name for p in (copied / "members").iterdir()) == [
        "member1.safetensors",
        "member2.safetensors",
    ]
    verify_bundle(copied)


def test_member_zero_must_be_the_bundle_network(tmp_path, members) -> None:
    with pytest.raises(BundleError, match="member 0 must be the bundle's own network"):
        save_bundle(tmp_path / "bad", members[1].net, members[1].spec, threshold=0.4, metrics=METRICS,
                    data_version="d", code_version="c", ensemble=EnsembleToSave("folds", "logit", members))  # fmt: skip
    assert not (tmp_path / "bad").exists()


def _probe(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    from melanoma_ml.serving.inference import N_VIEWS, dihedral_views, encode_metadata, preprocess

    spec = tiny_spec()
    x = dihedral_views(preprocess(_images(n), spec))
    return x, encode_metadata(RECORDS[:n], spec, n).repeat(N_VIEWS, 1)


def test_an_ensemble_exported_for_onnxruntime_serves_the_same_probabilities(tmp_path, members) -> None:
    from melanoma_ml.serving.bundle import RuntimeRequest

    two = members[:2]
    out = save_bundle(
        tmp_path / "onnx", two[0].net, two[0].spec, threshold=0.4, metrics=METRICS, data_version="d",
        code_version="c", ensemble=EnsembleToSave("folds", "probability", two),
        runtime=RuntimeRequest("onnxruntime", "fp32", 1e-4, _probe()),
    )  # fmt: skip
    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert manifest.runtime is not None and (manifest.runtime.runtime, manifest.runtime.precision) == (
        "onnxruntime",
        "fp32",
    )
    assert manifest.runtime.parity["max_abs_prob_diff"] <= 1e-4
    files = [m.runtime_file.name for m in manifest.ensemble.members]
    assert files == ["members.onnx", "members.onnx"]  # one merged graph, one session for both members
    assert bundle.scorers[0].merged.runner is bundle.scorers[1].merged.runner
    torch_bundle = load_bundle(_save(tmp_path / "torch", two))
    images = _images()
    np.testing.assert_allclose(
        predict(bundle, images, RECORDS, calibrated=False),
        predict(torch_bundle, images, RECORDS, calibrated=False),
        atol=1e-5,
    )
    exported = out / "members.onnx"
    exported.write_bytes(exported.read_bytes() + b"\0")
    with pytest.raises(BundleIntegrityError, match=r"members\.onnx"):
        load_bundle(out)


def test_auto_falls_back_to_torch_and_says_why(tmp_path, members, monkeypatch) -> None:
    from melanoma_ml.serving import runtimes
    from melanoma_ml.serving.bundle import RuntimeRequest

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtimes, "export_onnx", broken_export)
    out = save_bundle(
        tmp_path / "auto", members[0].net, members[0].spec, threshold=0.4, metrics=METRICS, data_version="d",
        code_version="c", runtime=RuntimeRequest("auto", "fp32", 1e-4, _probe()),
    )  # fmt: skip
    manifest = load_bundle(out).manifest
    assert manifest.runtime.runtime == "torch" and "exporter exploded" in manifest.runtime.note
    assert manifest.ensemble.members[0].runtime_file is None and not list(out.glob("*.onnx"))


def _members_with_different_encoders() -> list[MemberNet]:
    """Two fold networks whose metadata encoders differ in width, as folds that saw different sites do:
    member 0 knows 2 sites (8 columns), member 1 a third one too (9 columns)."""
    import dataclasses

    from melanoma_ml.features import MetadataEncoder

    narrow = tiny_spec()
    wide = dataclasses.replace(
        narrow,
        encoder=MetadataEncoder(
            age_mean=45.0, age_std=12.0, sexes=("female", "male"), sites=("head/neck", "palms/soles", "torso")
        ),
    )
    assert wide.encoder.n_features == narrow.encoder.n_features + 1
    members = []
    for fold, spec in enumerate((narrow, wide)):
        torch.manual_seed(fold)
        members.append(MemberNet(spec.build_network().eval(), spec, fold, f"{fold:064x}"))
    return members


WIDE_RECORDS = [
    {"age": 40.0, "sex": "male", "site": "palms/soles"},
    {"age": 70.0, "sex": "female", "site": "torso"},
]


def _save_with_runtime(out, members, request):
    from melanoma_ml.serving.bundle import EnsembleToSave

    return save_bundle(
        out, members[0].net, members[0].spec, threshold=0.4, metrics=METRICS, data_version="d", code_version="c",
        ensemble=EnsembleToSave("folds", "probability", members), runtime=request,
    )  # fmt: skip


@pytest.mark.parametrize("runtime", ["onnxruntime", "auto"])
def test_members_with_different_encoder_widths_are_each_exported_and_probed_with_their_own(
    tmp_path, runtime
) -> None:
    from melanoma_ml.serving.bundle import ProbeImages, RuntimeRequest

    members = _members_with_different_encoders()
    probe = ProbeImages(_images(4), (WIDE_RECORDS * 2)[:4])
    out = _save_with_runtime(tmp_path / "onnx", members, RuntimeRequest(runtime, "fp32", 1e-4, probe))
    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert (manifest.runtime.runtime, manifest.runtime.note) == ("onnxruntime", "")
    for member in manifest.ensemble.members:
        assert (member.runtime.runtime, member.runtime.precision) == ("onnxruntime", "fp32")
        assert member.runtime.parity["max_abs_prob_diff"] <= 1e-4
        assert member.runtime.parity["n_inputs"] == 4 * 8  # every view of every probe image
    # the one merged graph takes each member's own metadata width
    import onnx

    assert {m.runtime_file.name for m in manifest.ensemble.members} == {"members.onnx"}
    graph = onnx.load(str(out / "members.onnx")).graph
    widths = [
        i.type.tensor_type.shape.dim[1].dim_value for i in graph.input if i.name.startswith("metadata_")
    ]
    assert widths == [8, 9]
    torch_bundle = load_bundle(_save(tmp_path / "torch", members))
    images = _images(2)
    np.testing.assert_allclose(
        predict(bundle, images, WIDE_RECORDS, calibrated=False),
        predict(torch_bundle, images, WIDE_RECORDS, calibrated=False),
        atol=1e-5,
    )


def test_an_encoded_probe_that_does_not_fit_a_member_is_refused_naming_it(tmp_path) -> None:
    from melanoma_ml.serving.bundle import RuntimeRequest

    members = _members_with_different_encoders()
    encoded = _probe()  # encoded with member 0's 8 columns
    with pytest.raises(BundleError, match=r"ensemble member 1 takes 9 .*site=palms/soles.*ProbeImages"):
        _save_with_runtime(tmp_path / "bad", members, RuntimeRequest("onnxruntime", "fp32", 1e-4, encoded))
    assert not (tmp_path / "bad").exists()


def _member_misses_parity(monkeypatch, net) -> None:
    """The exported runtime's logits of ``net`` (alone or in the merged graph) read shifted by 3 in the
    parity check: a parity miss of that member only."""
    from melanoma_ml.serving import runtimes

    real = runtimes.max_probability_gap

    def shifted(reference, candidate, *args, **kwargs):
        if reference is net:
            return real(reference, lambda x, meta: torch.as_tensor(candidate(x, meta)) + 3.0, *args, **kwargs)
        return real(reference, candidate, *args, **kwargs)

    monkeypatch.setattr(runtimes, "max_probability_gap", shifted)


def test_auto_falls_back_to_torch_for_the_member_that_misses_parity_only(
    tmp_path, members, monkeypatch
) -> None:
    from melanoma_ml.serving.bundle import ProbeImages, RuntimeRequest

    _member_misses_parity(monkeypatch, members[1].net)
    three = members[:3]
    probe = ProbeImages(_images(4), RECORDS[:4])
    out = _save_with_runtime(tmp_path / "auto", three, RuntimeRequest("auto", "fp32", 1e-4, probe))
    bundle = load_bundle(out)
    manifest = bundle.manifest
    chosen = [(m.runtime.runtime, m.runtime.precision) for m in manifest.ensemble.members]
    assert chosen == [("onnxruntime", "fp32"), ("torch", "fp32"), ("onnxruntime", "fp32")]
    missed = manifest.ensemble.members[1]
    assert missed.runtime_file is None and not (out / "members" / "member1.onnx").exists()
    merged = [m.runtime_file.name for m in manifest.ensemble.members[::2]]
    assert merged == ["members.onnx", "members.onnx"]  # the graph was exported again without member 1
    assert bundle.scorers[0].merged.runner.n_members == 2 and bundle.scorers[1].merged is None
    assert (
        "fell back to torch fp32" in missed.runtime.note and "runtime_parity_tolerance" in missed.runtime.note
    )
    assert [m.runtime.note for m in manifest.ensemble.members[::2]] == ["", ""]
    assert manifest.runtime.runtime == "onnxruntime"
    assert manifest.runtime.note.startswith("members 1 of 3 serve torch fp32; member 1: serving.runtime=auto")
    # served: members 0 and 2 by ONNX Runtime, member 1 by its torch weights; together the torch ensemble's numbers
    torch_bundle = load_bundle(_save(tmp_path / "torch", three))
    images = _images()
    np.testing.assert_allclose(
        predict(bundle, images, RECORDS, calibrated=False),
        predict(torch_bundle, images, RECORDS, calibrated=False),
        atol=1e-5,
    )


def test_a_runtime_asked_for_by_name_is_refused_when_any_member_misses_parity(
    tmp_path, members, monkeypatch
) -> None:
    from melanoma_ml.serving.bundle import ProbeImages, RuntimeRequest
    from melanoma_ml.serving.runtimes import RuntimeParityError

    _member_misses_parity(monkeypatch, members[1].net)
    request = RuntimeRequest("onnxruntime", "fp32", 1e-4, ProbeImages(_images(4), RECORDS[:4]))
    with pytest.raises(RuntimeParityError, match="serving.runtime=onnxruntime"):
        _save_with_runtime(tmp_path / "named", members[:2], request)
    assert not (tmp_path / "named").exists()
