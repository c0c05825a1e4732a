"""The model service behind the app: input validation, no-model state, hot reload, tampered bundles.

Bundles are tiny random-weight ``test_efficientnet`` networks at 64 px registered through the registry API.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from app_helpers import SITES, SIZE, huge_png, register_tiny
from PIL import Image

from melanoma_ml.config import ServingConfig
from melanoma_ml.images.io import UPLOAD_FORMATS_TEXT
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.request_fields import (
    InvalidRequest,
    age_hint,
    parse_age,
    parse_cam_method,
    parse_category,
    parse_target_layer,
)
from melanoma_ml.serving.service import (
    NO_MODEL_MESSAGE,
    ModelService,
    NoModelAvailable,
    PredictionRequest,
)


# ---------------------------------------------------------------------- helpers
def jpeg_bytes(array: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **save_kwargs)
    return buffer.getvalue()


def write_samples(folder: Path) -> dict[str, Path]:
    """Good and bad uploads, by name."""
    import cv2

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    files: dict[str, bytes] = {
        "rgb.jpg": jpeg_bytes(rgb),
        "notes.txt": b"this is a text file, not an image\n",
        "empty.jpg": b"",
        "huge.png": huge_png(),
    }
    files["truncated.jpg"] = files["rgb.jpg"][: len(files["rgb.jpg"]) // 2]
    for name, image in {
        "gray.png": Image.fromarray(rgb[..., 0], mode="L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), mode="RGBA"),
    }.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG")
    files["cmyk.jpg"] = buffer.getvalue()
    ok, encoded = cv2.imencode(".png", rgb.astype(np.uint16) * 257)
    assert ok
    files["rgb16.png"] = encoded.tobytes()
    # 40 wide x 20 tall, left half red, right half blue; EXIF orientation 6 = display rotated 90 deg clockwise.
    landscape = np.zeros((20, 40, 3), np.uint8)
    landscape[:, :20, 0] = 255
    landscape[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif_rotated.jpg"] = jpeg_bytes(landscape, exif=exif.tobytes())
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture()
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture()
def samples(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return write_samples(folder)


# ---------------------------------------------------------------------- pure validation
@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("  ", None), ("unknown", None), (float("nan"), None), ("45", 45.0), (0, None),
     ("0", None), (0.0, None), (120, 85.0), (86, 85.0), (85, 85.0), (37.5, 37.5), (" 61 ", 61.0), (0.5, 0.5)],
)  # fmt: skip
def test_parse_age_accepts_numbers_and_unknown(value, expected) -> None:
    assert parse_age(value, 0, 120) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc", "must be a number"), ("4O", "must be a number"), (True, "must be a number"),
     (-1, "outside 0-120"), (121, "outside 0-120"), ("inf", "outside 0-120"), ([45], "must be a number")],
)  # fmt: skip
def test_parse_age_refuses_bad_values(value, message) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_age(value, 0, 120)


def test_parse_age_follows_the_cleaning_rule() -> None:
    """One rule: an age typed in the app is encoded as cleaning would have encoded it in training."""
    import pandas as pd

    from melanoma_ml.metadata.clean import clean_metadata

    ages = [0, 1, 5, 45, 85, 86, 100, 120]
    raw = pd.DataFrame(
        {"image_name": [f"ISIC_{i}" for i in range(len(ages))], "target": 0, "age_approx": ages}
    )
    result = clean_metadata(raw, image_dir=None, source="test", check_images=False)
    cleaned = result.clean.set_index("image_name")["age_approx"]
    for i, age in enumerate(ages):
        expected = cleaned[f"ISIC_{i}"]
        assert parse_age(age, 0, 120) == (None if pd.isna(expected) else expected), age


def test_age_hint_says_what_counts_as_unknown() -> None:
    assert age_hint(0, 120) == "0-120; empty or 0 if unknown; over 85 counts as 85"
    assert age_hint(18, 100) == "18-100; empty if unknown; over 85 counts as 85"
    with pytest.raises(InvalidRequest, match="outside 18-100"):
        parse_age(0, 18, 100)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("unknown", None), ("UNKNOWN", None), ("torso", "torso"), (" Torso ", "torso"),
     ("head/neck", "head/neck")],
)  # fmt: skip
def test_parse_category(value, expected) -> None:
    assert parse_category(value, SITES, "site") == expected


def test_parse_category_names_the_choices() -> None:
    with pytest.raises(InvalidRequest, match=r"unknown site 'elbow'.*head/neck.*torso"):
        parse_category("elbow", SITES, "site")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "eigencam"), ("", "eigencam"), ("gradcam", "gradcam"), ("Grad-CAM", "gradcam"), ("none", None),
     ("off", None)],
)  # fmt: skip
def test_parse_cam_method(value, expected) -> None:
    assert parse_cam_method(value, default="eigencam") == expected


def test_parse_cam_method_refuses_unknown() -> None:
    with pytest.raises(InvalidRequest, match="unknown explanation method 'lime'"):
        parse_cam_method("lime", default="eigencam")


def test_parse_target_layer() -> None:
    layers = ("backbone.conv_head", "backbone.bn2")
    assert parse_target_layer(None, layers) == "backbone.conv_head"
    assert parse_target_layer("backbone.bn2", layers) == "backbone.bn2"
    with pytest.raises(InvalidRequest, match="unknown CAM target layer 'fc'"):
        parse_target_layer("fc", layers)


@pytest.mark.parametrize("value", [None, "", "  ", "unknown", "N/A", "nan", "-", float("nan")])
def test_every_value_training_reads_as_missing_is_unknown_in_a_request(value) -> None:
    """The service asks ``melanoma_ml.missing``, as cleaning and the encoder do (no rule of its own)."""
    assert parse_age(value, 0, 120) is None
    assert parse_category(value, SITES, "site") is None


# ---------------------------------------------------------------------- no model yet
def test_no_promoted_model_says_how_to_get_one(registry: ModelRegistry, samples) -> None:
    service = ModelService(registry, ServingConfig())
    status = service.status()
    assert status.model is None and status.reload_error is None
    with pytest.raises(NoModelAvailable, match="melanoma-ml demo") as excinfo:
        service.predict(PredictionRequest(image=samples["rgb.jpg"]))
    assert str(excinfo.value) == NO_MODEL_MESSAGE
    assert "`serving_model` asset" in NO_MODEL_MESSAGE


# ---------------------------------------------------------------------- predictions
@pytest.mark.parametrize(("tta", "cam"), [(True, "eigencam"), (False, "gradcam"), (True, "none")])
def test_predict_answers_with_probability_decision_and_overlay(registry, samples, tta, cam) -> None:
    from melanoma_ml.serving.inference import predict

    version = register_tiny(registry, seed=1, threshold=0.3)
    service = ModelService(registry, ServingConfig())
    result = service.predict(
        PredictionRequest(
            image=samples["rgb.jpg"], age="55", sex="male", site="torso", tta=tta, cam_method=cam
        )
    )
    assert 0.0 <= result.probability <= 1.0
    assert result.positive == (result.probability >= 0.3)
    assert result.decision == ("positive" if result.positive else "negative")
    assert (result.model_version, result.backbone, result.tta) == (version, "test_efficientnet", tta)
    assert result.view.shape == (SIZE, SIZE, 3) and result.view.dtype == np.uint8
    if cam == "none":
        assert result.overlay is None and result.cam_method is None and result.target_layer is None
    else:
        assert result.overlay.shape == result.view.shape
        # conv_head is 2x2 at 64 px, below serving.cam_min_map_side: the size-aware default is finer
        assert (result.cam_method, result.target_layer) == (cam, result.model.default_target_layer)
        assert result.target_layer != "backbone.conv_head"
    # Encoded exactly as the library encodes metadata for the same bundle.
    bundle = result.model.bundle
    image = service.decode(samples["rgb.jpg"])
    direct = predict(bundle, [image], [{"age": 55.0, "sex": "male", "site": "torso"}], views=8 if tta else 1)
    assert result.probability == pytest.approx(float(direct[0]), abs=1e-6)
    answer = result.to_json()
    assert {"probability", "threshold", "decision", "model_version", "backbone"} <= set(answer)
    assert answer["metadata"] == {"age": 55.0, "sex": "male", "site": "torso"}


def test_unknown_metadata_is_encoded_as_missing(registry, samples) -> None:
    register_tiny(registry, seed=2)
    service = ModelService(registry, ServingConfig(tta=False))
    blank = service.predict(PredictionRequest(image=samples["rgb.jpg"], age="", sex="unknown", site=None))
    assert blank.metadata == {"age": None, "sex": None, "site": None}


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [({"age": "forty"}, "age must be a number"), ({"age": 150}, "outside 0-120"),
     ({"site": "elbow"}, "unknown anatomic site 'elbow'"), ({"sex": "x"}, "unknown sex 'x'"),
     ({"cam_method": "lime"}, "unknown explanation method"), ({"target_layer": "fc"}, "unknown CAM target layer")],
)  # fmt: skip
def test_bad_metadata_is_refused_with_advice(registry, samples, request_fields, message) -> None:
    register_tiny(registry, seed=3)
    service = ModelService(registry, ServingConfig(tta=False))
    with pytest.raises(InvalidRequest, match=message):
        service.predict(PredictionRequest(image=samples["rgb.jpg"], **request_fields))


# ---------------------------------------------------------------------- uploads
@pytest.mark.parametrize(
    ("name", "message"),
    [("notes.txt", "not a recognised image format"), ("truncated.jpg", "truncated or corrupt"),
     ("empty.jpg", "empty"), ("huge.png", "decompression-bomb guard")],
)  # fmt: skip
def test_bad_uploads_are_refused_with_advice(samples, name, message) -> None:
    service = ModelService(ModelRegistry(samples[name].parent / "none"), ServingConfig())
    with pytest.raises(InvalidRequest, match=message) as excinfo:
        service.decode(samples[name])
    assert name in str(excinfo.value)


@pytest.mark.parametrize("source", [None, "", "  "])
def test_missing_upload_is_refused(source) -> None:
    service = ModelService(ModelRegistry("unused"), ServingConfig())
    with pytest.raises(InvalidRequest, match="no image uploaded") as excinfo:
        service.decode(source)
    assert UPLOAD_FORMATS_TEXT in str(excinfo.value)


def test_the_upload_label_names_the_formats_load_rgb_decodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from melanoma_ml.serving.app import create_app

    demo = create_app(ModelService(ModelRegistry(tmp_path / "registry"), ServingConfig()))
    [upload] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "upload"]
    assert upload.label == f"Dermoscopy image ({UPLOAD_FORMATS_TEXT})"


def test_upload_size_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (1024 * 1024 + 1))
    service = ModelService(ModelRegistry(tmp_path / "registry"), ServingConfig(max_upload_mb=1))
    with pytest.raises(InvalidRequest, match="above the 1 MB upload limit"):
        service.decode(big)


@pytest.mark.parametrize(
    "name", ["rgb.jpg", "gray.png", "rgba.png", "rgb16.png", "cmyk.jpg", "exif_rotated.jpg"]
)
def test_odd_but_valid_uploads_decode_to_rgb(samples, name) -> None:
    service = ModelService(ModelRegistry(samples[name].parent / "none"), ServingConfig(max_image_side=48))
    image = service.decode(samples[name])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert max(image.shape[:2]) <= 48


def test_exif_orientation_is_honoured(samples) -> None:
    service = ModelService(ModelRegistry(samples["rgb.jpg"].parent / "none"), ServingConfig())
    image = service.decode(samples["exif_rotated.jpg"]).astype(int)
    assert image.shape == (40, 20, 3)  # stored landscape, displayed portrait
    top, bottom = image[:16].mean(axis=(0, 1)), image[24:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red half rotated to the top


def test_large_image_is_downscaled_within_the_side_limit(tmp_path: Path, registry) -> None:
    register_tiny(registry, seed=4)
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(np.full((3000, 2000, 3), 120, np.uint8)))
    service = ModelService(registry, ServingConfig(max_image_side=256, tta=False, cam_method="eigencam"))
    assert service.decode(path).shape == (256, 171, 3)
    assert service.predict(PredictionRequest(image=path)).overlay.shape == (SIZE, SIZE, 3)


def test_a_layer_too_coarse_at_the_bundle_size_is_not_offered(registry, samples) -> None:
    register_tiny(registry, seed=18, size=16)  # at 16 px conv_head's feature map is 1x1: too coarse
    service = ModelService(registry, ServingConfig(tta=False))
    request = PredictionRequest(image=samples["rgb.jpg"], target_layer="backbone.conv_head")
    with pytest.raises(InvalidRequest, match="'backbone.conv_head'.*too coarse.*choose one of"):
        service.predict(request)
    assert service.predict(PredictionRequest(image=samples["rgb.jpg"], cam_method="none")).view.shape[0] == 16


@pytest.mark.parametrize("size", [32, 64])
def test_default_grad_cam_works_on_a_small_bundle(registry, samples, size) -> None:
    """The served layers are measured at the bundle's size: none is coarser than cam_min_map_side."""
    register_tiny(registry, seed=19, size=size)
    config = ServingConfig(tta=False, cam_method="gradcam")
    service = ModelService(registry, config)
    result = service.predict(PredictionRequest(image=samples["rgb.jpg"]))
    assert result.cam_method == "gradcam" and result.overlay.shape == (size, size, 3)
    net = result.model.bundle.net
    for name in result.model.target_layers:
        assert map_side(net, name, size) >= config.cam_min_map_side, name
    assert result.target_layer == result.model.target_layers[0]


def map_side(net, layer: str, size: int) -> int:
    """Smaller side of ``layer``'s (B, C, H, W) output on a ``size`` px input, measured by a hook."""
    import torch

    shapes = []
    handle = dict(net.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: shapes.append(out.shape)
    )
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size), torch.zeros(1, net.n_meta_features))
    finally:
        handle.remove()
    assert len(shapes[-1]) == 4, (layer, shapes[-1])
    return min(shapes[-1][-2:])


# ---------------------------------------------------------------------- hot reload
def test_promotion_is_picked_up_by_the_next_request(registry, samples) -> None:
    first = register_tiny(registry, seed=5)
    service = ModelService(registry, ServingConfig(tta=False, cam_method="eigencam"))
    request = PredictionRequest(image=samples["rgb.jpg"])
    assert service.predict(request).model_version == first
    second = register_tiny(registry, seed=6)
    assert service.predict(request).model_version == second
    registry.rollback(first)
    assert service.predict(request).model_version == first


def test_pointer_is_checked_at_most_once_per_interval(registry, samples) -> None:
    now = [0.0]
    first = register_tiny(registry, seed=7)
    service = ModelService(registry, ServingConfig(reload_check_interval_s=5.0), clock=lambda: now[0])
    assert service.status().model.version == first
    second = register_tiny(registry, seed=8)
    now[0] = 4.0
    assert service.status().model.version == first
    now[0] = 5.5
    assert service.status().model.version == second


def test_new_model_loads_beside_the_served_one_without_blocking_requests(registry, samples) -> None:
    first = register_tiny(registry, seed=9)
    service = ModelService(registry, ServingConfig(tta=False))
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == first
    loading, release = threading.Event(), threading.Event()
    real_load = service._load_version

    def slow_load(version: str, promoted_at: str | None):
        loading.set()
        assert release.wait(30), "test did not release the loader"
        return real_load(version, promoted_at)

    service._load_version = slow_load
    second = register_tiny(registry, seed=10)
    with ThreadPoolExecutor(1) as pool:
        loader = pool.submit(service.predict, request)  # finds the moved pointer and starts loading
        assert loading.wait(30)
        during = service.predict(request)  # another request while the loader works: old model, no wait
        release.set()
        assert loader.result(timeout=60).model_version == second
    assert during.model_version == first
    assert service.predict(request).model_version == second


def test_concurrent_requests_during_swaps_never_fail(registry, samples) -> None:
    versions = [register_tiny(registry, seed=11)]
    service = ModelService(registry, ServingConfig(tta=True, cam_method="eigencam"))
    request = PredictionRequest(image=samples["rgb.jpg"], age=40, sex="female", site="torso")
    service.predict(request)
    stop = threading.Event()

    def hammer() -> Counter:
        seen: Counter = Counter()
        while not stop.is_set():
            seen[service.predict(request).model_version] += 1
        return seen

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(hammer) for _ in range(3)]
        for seed in (12, 13):
            versions.append(register_tiny(registry, seed=seed))
        stop.set()
        seen = sum((w.result(timeout=120) for w in workers), Counter())  # re-raises any failed request
    assert set(seen) <= set(versions) and sum(seen.values()) > 0
    assert service.predict(request).model_version == versions[-1]


def test_tampered_bundle_is_refused_and_the_previous_model_keeps_serving(registry, samples) -> None:
    first = register_tiny(registry, seed=14)
    service = ModelService(registry, ServingConfig(tta=False))
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == first
    second = register_tiny(registry, seed=15)  # promoted (verified) ...
    weights = registry.version_path(second) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # ... then modified on disk before the app reloads
    weights.write_bytes(bytes(data))
    assert service.predict(request).model_version == first
    status = service.status()
    assert status.model.version == first
    assert second in status.reload_error and "sha256 mismatch" in status.reload_error
    assert f"still serving {first}" in status.reload_error.lower()
    third = register_tiny(registry, seed=16)
    assert service.predict(request).model_version == third
    assert service.status().reload_error is None


def test_tampered_first_bundle_leaves_no_model_and_says_why(registry, samples) -> None:
    version = register_tiny(registry, seed=17)
    weights = registry.version_path(version) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    service = ModelService(registry, ServingConfig())
    status = service.status()
    assert status.model is None and "sha256 mismatch" in status.reload_error
    with pytest.raises(NoModelAvailable):
        service.predict(PredictionRequest(image=samples["rgb.jpg"]))


def test_corrupt_pointer_keeps_the_served_model_and_says_why(registry, samples) -> None:
    first = register_tiny(registry, seed=19)
    service = ModelService(registry, ServingConfig(tta=False))
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == first
    registry.current_file.write_text("{not json")
    assert service.predict(request).model_version == first
    assert "current.json is not valid JSON" in service.status().reload_error


# ---------------------------------------------------------------------- a corrupt served version
def corrupt(registry: ModelRegistry, version: str, *, keep_stat: bool = False) -> None:
    """Flip the last byte of ``version``'s weights; ``keep_stat`` restores the mtime (same inode and size)."""
    import os

    weights = registry.version_path(version) / "weights.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    with open(weights, "r+b") as fh:  # in place: same inode
        fh.write(bytes(data))
    if keep_stat:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_corrupt_current_version_at_startup_is_named_to_clients(registry, samples) -> None:
    register_tiny(registry, seed=20)
    second = register_tiny(registry, seed=21)
    corrupt(registry, second)
    assert ServingConfig().fallback_to_last_valid is False
    service = ModelService(registry, ServingConfig())
    with pytest.raises(NoModelAvailable) as excinfo:
        service.predict(PredictionRequest(image=samples["rgb.jpg"]))
    message = str(excinfo.value)
    assert f"{second} was refused" in message and "sha256 mismatch" in message
    assert "No model has been promoted yet" not in message
    assert "serving.fallback_to_last_valid" in message and "rollback" in message


def test_with_fallback_the_last_valid_version_serves_and_says_why(registry, samples) -> None:
    first = register_tiny(registry, seed=22)
    second = register_tiny(registry, seed=23)
    corrupt(registry, second)
    service = ModelService(registry, ServingConfig(tta=False, fallback_to_last_valid=True))
    result = service.predict(PredictionRequest(image=samples["rgb.jpg"], cam_method="none"))
    assert result.model_version == first
    notice = result.to_json()["fallback"]
    assert f"{second} was refused" in notice and f"serving {first}" in notice
    assert notice in service.status().reload_error
    register_tiny(registry, seed=24)  # a good promotion ends the fallback
    answer = service.predict(PredictionRequest(image=samples["rgb.jpg"], cam_method="none")).to_json()
    assert answer["fallback"] is None and service.status().reload_error is None


@pytest.mark.parametrize("fallback", [False, True])
def test_served_files_changed_on_disk_stop_that_version(registry, samples, fallback) -> None:
    first = register_tiny(registry, seed=25)
    second = register_tiny(registry, seed=26)
    service = ModelService(registry, ServingConfig(tta=False, fallback_to_last_valid=fallback))
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == second
    corrupt(registry, second)
    if fallback:
        assert service.predict(request).model_version == first
    else:
        with pytest.raises(NoModelAvailable) as excinfo:
            service.predict(request)
        message = str(excinfo.value)
        assert f"{second} stopped serving" in message and "weights.safetensors" in message
        assert "sha256 mismatch" in message
    served = service.status().model
    assert (served is None) if not fallback else (served.version == first)
    registry.repair()  # the operator repairs the registry: the app follows the rewritten pointer
    assert service.predict(request).model_version == first


def test_a_corruption_that_keeps_the_file_stat_is_found_by_the_periodic_rehash(registry, samples) -> None:
    now = [0.0]
    version = register_tiny(registry, seed=27)
    config = ServingConfig(tta=False, reverify_seconds=60.0)
    service = ModelService(registry, config, clock=lambda: now[0])
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == version
    corrupt(registry, version, keep_stat=True)  # bit rot: same inode, size and mtime
    now[0] = 30.0
    assert service.predict(request).model_version == version  # the per-request stat cannot see it
    now[0] = 61.0
    with pytest.raises(NoModelAvailable, match=f"{version} stopped serving.*sha256 mismatch"):
        service.predict(request)


# ---------------------------------------------------------------------- every byte of the bundle, the manifest too
def flip_byte(registry: ModelRegistry, version: str, name: str) -> None:
    """Flip one bit in the middle of ``name`` of ``version`` (in place: same inode)."""
    file = registry.version_path(version) / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(file, "r+b") as fh:
        fh.write(bytes(data))


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sha256", "weights.safetensors"])
def test_a_flipped_byte_in_any_file_of_a_new_promotion_keeps_the_previous_model(
    registry, samples, name
) -> None:
    first = register_tiny(registry, seed=30)
    service = ModelService(registry, ServingConfig(tta=False))
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == first
    second = register_tiny(registry, seed=31)  # promoted (verified), then changed before the app reloads
    flip_byte(registry, second, name)
    assert service.predict(request).model_version == first
    error = service.status().reload_error
    assert f"{second} was refused" in error and f"still serving {first}" in error.lower()
    assert "mismatch" in error or "must hold exactly" in error


def test_an_edited_threshold_in_the_served_manifest_stops_that_version(registry, samples) -> None:
    import json

    first = register_tiny(registry, seed=32)
    second = register_tiny(registry, seed=33, threshold=0.5)
    service = ModelService(registry, ServingConfig(tta=False, fallback_to_last_valid=True))
    request = PredictionRequest(image=samples["rgb.jpg"], cam_method="none")
    assert service.predict(request).model_version == second
    manifest_path = registry.version_path(second) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["threshold"] = 0.01  # still a valid manifest: only its sha256 tells
    manifest_path.write_text(json.dumps(manifest))
    answer = service.predict(request)
    assert answer.model_version == first  # the fallback rule: the last valid version serves
    assert f"{second} stopped serving" in answer.to_json()["fallback"]
    assert "manifest.json" in answer.to_json()["fallback"]
