"""Request values echoed in answers and logs are capped: a 1 MB field gives a short error, not a 1 MB one."""

from __future__ import annotations

import logging

import pytest

from melanoma_ml.echo import echo
from melanoma_ml.serving.request_fields import (
    InvalidRequest,
    parse_age,
    parse_cam_method,
    parse_category,
    parse_target_layer,
)

HUGE = "9" * 1_048_576


@pytest.mark.parametrize(
    ("value", "shown"),
    [("abc", "'abc'"), (45, "45"), ("x" * 80, repr("x" * 80)), ("x" * 81, f"'{'x' * 80}...' (81 chars)"),
     ("a\nb" * 40, repr(("a\nb" * 40)[:80])[:-1] + "...' (120 chars)"),
     ([7] * 100, f"'{repr([7] * 100)[:80]}...' (300 chars)")],
)  # fmt: skip
def test_echo_caps_at_80_characters_and_says_the_length(value, shown) -> None:
    assert echo(value) == shown


@pytest.mark.parametrize(
    "parse",
    [lambda v: parse_age(v, 0, 120), lambda v: parse_category(v, ["torso"], "site"),
     lambda v: parse_cam_method(v, default="gradcam"), lambda v: parse_target_layer(v, ["conv_head"])],
)  # fmt: skip
def test_every_refused_request_value_is_echoed_capped(parse) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse(HUGE)
    message = str(excinfo.value)
    assert len(message) < 400 and "(1048576 chars)" in message


def test_the_app_answers_and_logs_a_huge_field_in_a_few_hundred_characters(tmp_path, caplog) -> None:
    import gradio as gr
    from app_helpers import register_tiny
    from PIL import Image

    from melanoma_ml.config import ServingConfig
    from melanoma_ml.serving.app import run_prediction
    from melanoma_ml.serving.registry import ModelRegistry
    from melanoma_ml.serving.service import ModelService

    registry = ModelRegistry(tmp_path / "registry")
    register_tiny(registry, seed=1)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 150, 120)).save(photo)
    service = ModelService(registry, ServingConfig(tta=False))
    with caplog.at_level(logging.INFO), pytest.raises(gr.Error) as excinfo:
        run_prediction(service, str(photo), HUGE, None, None, False, "none", None)
    assert "(1048576 chars)" in excinfo.value.message and len(excinfo.value.message) < 400
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 400
