"""The app's "Outcome" tab: a clinician records a case's histopathology result (``/record_outcome``) with the
validation and messages of ``monitoring.outcomes``; behind the app's login like every endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port
from outcome_helpers import log_cases

from melanoma_ml.config import ServingConfig
from melanoma_ml.monitoring.outcomes import outcomes_file, read_outcomes
from melanoma_ml.monitoring.prediction_log import PredictionLog
from melanoma_ml.serving.registry import ModelRegistry
from melanoma_ml.serving.service import ModelService


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    return tmp_path / "artifacts"


def app(root: Path, prediction_log: PredictionLog | None):
    from melanoma_ml.serving.app import create_app

    service = ModelService(ModelRegistry(root / "registry"), ServingConfig())
    return create_app(service, prediction_log)


def endpoints(demo) -> set[str]:
    return {fn.api_name for fn in demo.fns.values() if fn.api_name}


def test_the_form_records_and_says_what_it_recorded(root: Path) -> None:
    from melanoma_ml.serving.app import record_outcome_form

    (case,) = log_cases(root, 1)
    message = record_outcome_form(root, f" {case} ", "melanoma", False, "Breslow 0.3", "Dr A", "")
    assert message.startswith(f"recorded melanoma for case {case}")
    again = record_outcome_form(root, case, "melanoma", False, "", "", "")
    assert again.startswith("already recorded")
    conflict = record_outcome_form(root, case, "benign", False, "", "Dr B", "")
    assert "conflicting outcomes" in conflict and "corrects earlier outcomes" in conflict
    resolved = record_outcome_form(root, case, "benign", True, "re-read", "Dr B", "")
    assert f"case {case} is labelled benign" in resolved
    frame = read_outcomes(root)
    assert list(frame["source"]) == ["app"] * 3 and list(frame["supersedes"]) == [False, False, True]
    assert frame.loc[0, "note"] == "Breslow 0.3" and frame.loc[0, "reported_by"] == "Dr A"


@pytest.mark.parametrize(
    ("case_id", "outcome", "message"),
    [
        ("C-20261207-000000000000", "melanoma", "unknown case id 'C-20261207-000000000000'"),
        ("", "benign", "case id is empty"),
        (None, "melanoma", "case id is empty"),
        ("{case}", None, "outcome is empty"),
        ("{case}", "malignant", "does not say whether it is a melanoma"),
    ],
)
def test_bad_input_is_a_gradio_error_with_the_same_message_and_nothing_is_written(
    root: Path, case_id, outcome, message
) -> None:
    import gradio as gr

    from melanoma_ml.serving.app import record_outcome_form

    (case,) = log_cases(root, 1)
    typed = case_id.format(case=case) if isinstance(case_id, str) else case_id
    with pytest.raises(gr.Error) as err:
        record_outcome_form(root, typed, outcome, False, "", "", "")
    assert message in err.value.message
    assert not outcomes_file(root).exists()


def test_the_tab_and_endpoint_exist_only_with_a_prediction_log(root: Path) -> None:
    import gradio as gr

    with_log = app(root, PredictionLog(root))
    assert "record_outcome" in endpoints(with_log) and "predict" in endpoints(with_log)
    assert any(isinstance(b, gr.Tab) and b.label == "Outcome" for b in with_log.blocks.values())
    without = app(root, None)
    assert "record_outcome" not in endpoints(without)


@pytest.mark.live
@pytest.mark.slow
def test_the_endpoint_is_behind_the_login_and_records_through_gradio_client(root: Path, tmp_path) -> None:
    import urllib.error
    import urllib.request

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from melanoma_ml.serving.app import launch_options

    (case,) = log_cases(root, 1)
    demo = app(root, PredictionLog(root))
    options = launch_options(ServingConfig(), auth=("clinic", "s3cret"))
    port = free_port()  # app_helpers.launch_local launches without a login
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **options)
    url = f"http://127.0.0.1:{port}/"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "config", timeout=10)
        assert refused.value.code == 401
        client = Client(url, auth=("clinic", "s3cret"), verbose=False, download_files=str(tmp_path))
        answer = client.predict(case, "benign", False, "", "Dr A", "", api_name="/record_outcome")
        assert answer.startswith(f"recorded benign for case {case}")
        with pytest.raises(AppError, match="unknown case id"):
            client.predict("C-20261207-000000000000", "benign", False, "", "", "", api_name="/record_outcome")
    finally:
        demo.close()
    assert list(read_outcomes(root)["case_id"]) == [case]
