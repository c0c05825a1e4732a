"""The Gradio app live on 127.0.0.1, called through gradio_client's ``/predict`` endpoint.

One tiny training (synthetic data, ``tiny`` profile, one fold of ``test_efficientnet`` at 32 px) produces
the served bundle. Covered: the JSON answer, hot reload while the app runs (with a concurrent request
stream during the swap), a tampered promotion, and every kind of bad input, each followed by a good
request to show the app still answers.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from app_helpers import huge_png, launch_local
from conftest import free_port
from PIL import Image

pytestmark = [pytest.mark.live, pytest.mark.slow]

REQUESTS_PER_WORKER = 40
"""Upper bound of the concurrent request stream (each worker stops earlier once the swap is seen)."""


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_uploads(folder: Path, lesion: Path) -> dict[str, Path]:
    """Uploads by name: odd-but-valid images derived from a synthetic lesion, and broken files."""
    import cv2

    rgb = np.asarray(Image.open(lesion).convert("RGB"))
    landscape = Image.fromarray(rgb).resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    ok, png16 = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    assert ok
    jpeg = lesion.read_bytes()
    files = {
        "gray.png": encoded(Image.fromarray(rgb).convert("L"), "PNG"),
        "rgba.png": encoded(Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "rgb16.png": png16.tobytes(),
        "cmyk.jpg": encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "exif_rotated.jpg": encoded(landscape, "JPEG", exif=exif.tobytes()),
        "notes.txt": b"not an image at all\n",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "huge.png": huge_png(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training: synthetic data -> clean -> folds -> cache -> one fold -> evaluation -> registry."""
    from melanoma_ml import pipeline
    from melanoma_ml.artifacts import artifact_paths
    from melanoma_ml.config import load_config
    from melanoma_ml.metadata.fingerprint import table_fingerprint
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.training.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("artifacts")
    config = load_config(
        "tiny",
        {
            "artifact_root": str(root),
            "data": {"image_size": 64},
            "training": {"epochs": 1},
            "serving": {"cam_min_map_side": 2},  # offers conv_head/bn2 (2x2 at 64 px) in the layer list
        },
    )
    source = pipeline.prepare_source(config)
    clean = pipeline.clean_source(config, source)
    folds = pipeline.make_folds(config, clean.clean)
    cache = pipeline.build_cache(config, folds)
    result = pipeline.train_one(config, config.backbones[0], 0, folds, cache)
    from melanoma_ml.evaluation import evaluate_predictions

    report = evaluate_predictions(result.oof, config.evaluation, name=result.backbone)
    net, spec, _ = load_checkpoint(result.checkpoint_dir)
    registry = ModelRegistry(artifact_paths(config).registry)

    def register(threshold: float, reason: str) -> str:
        return registry.register_bundle(
            net,
            spec,
            reason=reason,
            threshold=threshold,
            metrics=report.to_dict()["metrics"],
            data_version=table_fingerprint(folds),
            code_version="test",
        )

    first = register(report.threshold.value, "tiny training")
    registry.promote(first, reason="test")
    lesion = Path(folds[folds["fold"] == 0]["image_path"].iloc[0])
    return {"config": config, "registry": registry, "register": register, "first": first, "lesion": lesion}


@pytest.fixture(scope="module")
def app(trained, tmp_path_factory):
    """The app launched on a free 127.0.0.1 port, and a gradio_client on it (all files under tmp)."""
    from gradio_client import Client

    work = tmp_path_factory.mktemp("gradio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(work / "server"))
        from melanoma_ml.serving.app import create_app
        from melanoma_ml.serving.service import ModelService

        config = trained["config"]
        service = ModelService.from_config(config)
        demo = create_app(service)
        url = launch_local(demo, config.serving)

        def client() -> Client:
            return Client(url, verbose=False, download_files=str(work / "client"), analytics_enabled=False)

        try:
            yield {"url": url, "client": client, "service": service, "work": work}
        finally:
            demo.close()


@pytest.fixture(scope="module")
def uploads(trained, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    return write_uploads(folder, trained["lesion"])


def call(client, image, age="55", sex="male", site="torso", tta=True, cam="eigencam", layer=None):
    from gradio_client import handle_file

    source = None if image is None else handle_file(str(image))
    return client.predict(source, age, sex, site, tta, cam, layer, api_name="/predict")


def assert_good_answer(answer: dict, expected_version: str) -> None:
    assert 0.0 <= answer["probability"] <= 1.0
    assert answer["decision"] == ("positive" if answer["probability"] >= answer["threshold"] else "negative")
    assert answer["model_version"] == expected_version
    assert answer["backbone"] == "test_efficientnet"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, None), ({"MELANOMA_APP_USER": "a", "MELANOMA_APP_PASSWORD": "b"}, ("a", "b"))],
)
def test_login_comes_from_both_variables_or_neither(environ, expected) -> None:
    from melanoma_ml.serving.app import auth_from_env

    assert auth_from_env(environ) == expected


def test_login_with_only_one_variable_is_refused() -> None:
    from melanoma_ml.serving.app import auth_from_env

    with pytest.raises(SystemExit, match="set both MELANOMA_APP_USER and MELANOMA_APP_PASSWORD"):
        auth_from_env({"MELANOMA_APP_USER": "a"})


def test_predict_endpoint_answers_with_json_and_overlay(app, trained) -> None:
    client = app["client"]()
    answer, view, overlay, summary = call(client, trained["lesion"], layer="backbone.bn2")
    assert_good_answer(answer, trained["first"])
    assert answer["tta"] is True and answer["target_layer"] == "backbone.bn2"
    size = trained["config"].data.image_size
    view_shape = np.asarray(Image.open(view)).shape
    assert view_shape == (size, size, 3)
    assert np.asarray(Image.open(overlay).convert("RGB")).shape == view_shape
    assert "Melanoma probability" in summary and trained["first"] in summary
    no_cam, _, overlay_off, _ = call(client, trained["lesion"], tta=False, cam="none", sex="unknown", age="")
    assert overlay_off is None and no_cam["tta"] is False and no_cam["metadata"]["sex"] is None


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "rgb16.png", "cmyk.jpg", "exif_rotated.jpg"])
def test_odd_but_valid_images_are_answered(app, trained, uploads, name) -> None:
    answer, *_ = call(app["client"](), uploads[name], cam="none", tta=False)
    assert 0.0 <= answer["probability"] <= 1.0


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [("notes.txt", {}, "not a recognised image format"), ("truncated.jpg", {}, "truncated or corrupt"),
     ("empty.jpg", {}, "empty"), ("huge.png", {}, "decompression-bomb guard"), (None, {}, "no image uploaded"),
     ("lesion", {"age": "forty"}, "age must be a number"), ("lesion", {"age": "300"}, "outside 0-120"),
     ("lesion", {"site": "elbow"}, "unknown anatomic site 'elbow'"),
     ("lesion", {"layer": "fc"}, "unknown CAM target layer")],
)  # fmt: skip
def test_bad_input_gives_a_clear_error_and_the_app_keeps_serving(
    app, trained, uploads, name, fields, message
):
    from gradio_client.exceptions import AppError

    client = app["client"]()
    image = trained["lesion"] if name == "lesion" else None if name is None else uploads[name]
    with pytest.raises(AppError, match=message):
        call(client, image, **fields)
    answer, *_ = call(client, trained["lesion"], cam="none", tta=False)
    assert 0.0 <= answer["probability"] <= 1.0


def test_hot_reload_under_a_concurrent_request_stream(app, trained) -> None:
    registry, register = trained["registry"], trained["register"]
    before = app["service"].status().model.version
    second = register(0.25, "hot reload test")
    swapped = threading.Event()

    def stream() -> Counter:
        client, seen = app["client"](), Counter()
        for _ in range(REQUESTS_PER_WORKER):
            answer, *_ = call(client, trained["lesion"], cam="none", tta=False)  # raises on any failure
            seen[answer["model_version"]] += 1
            if answer["model_version"] == second:
                swapped.set()
                break
        return seen

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(stream) for _ in range(3)]
        registry.promote(second, reason="hot reload test")
        seen = sum((worker.result(timeout=120) for worker in workers), Counter())
    assert swapped.is_set(), f"no request saw {second} after the promotion: {seen}"
    assert set(seen) <= {before, second}
    answer, *_ = call(app["client"](), trained["lesion"])
    assert_good_answer(answer, second)
    assert answer["threshold"] == pytest.approx(0.25)


def test_tampered_promotion_is_refused_while_the_previous_model_serves(app, trained) -> None:
    registry, register = trained["registry"], trained["register"]
    serving = app["service"].status().model.version
    bad = register(0.5, "tamper test")
    registry.promote(bad, reason="tamper test")
    weights = registry.version_path(bad) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    answer, *_ = call(app["client"](), trained["lesion"], cam="none")
    assert answer["model_version"] == serving
    assert bad in app["service"].status().reload_error


def test_without_a_promoted_model_the_page_and_api_say_how_to_get_one(tmp_path: Path, monkeypatch) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from melanoma_ml.config import load_config

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "server"))
    from melanoma_ml.serving.app import create_app
    from melanoma_ml.serving.service import ModelService

    config = load_config("tiny", {"artifact_root": str(tmp_path / "empty")})
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (48, 48), (200, 150, 120)).save(photo)
    demo = create_app(ModelService.from_config(config))
    status = next(
        block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-status"
    )
    assert "No model available" in status.value and "melanoma-ml demo" in status.value
    url = launch_local(demo, config.serving)
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
        with pytest.raises(AppError, match="No model has been promoted yet.*serving_model"):
            call(client, photo)
    finally:
        demo.close()


def test_console_command_serves_with_flags_and_login_from_env(tmp_path: Path) -> None:
    """``main()`` as a process: flags pick root and port, env turns on login, no model -> clear message."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    port = free_port()
    env = {
        **os.environ,
        "GRADIO_TEMP_DIR": str(tmp_path / "server"),
        "MELANOMA_APP_USER": "clinic",
        "MELANOMA_APP_PASSWORD": "s3cret",
    }
    command = [sys.executable, "-m", "melanoma_ml.serving.app", "--artifact-root", str(tmp_path / "root")]
    log = (tmp_path / "app.log").open("wb")  # a file, not a pipe nobody reads: a full pipe blocks the app
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "app.log").read_text(errors="replace")
            try:
                urllib.request.urlopen(url + "config", timeout=2)
                pytest.fail("the app answered /config without a login")
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the app did not start within 90 s"
                time.sleep(0.5)
        client = Client(
            url,
            auth=("clinic", "s3cret"),
            verbose=False,
            download_files=str(tmp_path),
            analytics_enabled=False,
        )
        photo = tmp_path / "photo.jpg"
        Image.new("RGB", (48, 48), (200, 150, 120)).save(photo)
        with pytest.raises(AppError, match="No model has been promoted yet"):
            call(client, photo)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # SIGTERM blocked (inherited signal mask): make sure it ends
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()
