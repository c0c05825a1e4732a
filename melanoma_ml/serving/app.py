"""The Gradio app on the promoted model (the only module in the project that imports gradio).

``melanoma-app`` (``main``) serves the model the registry's ``current`` pointer names and follows it:
promote a new version while the app runs and the next request uses it (see ``service.ModelService``).

The UI is a thin layer over ``ModelService``: it validates nothing itself, it turns the service's
``InvalidRequest`` / ``NoModelAvailable`` into ``gr.Error`` messages, so the page shows them and API
clients receive them, and the app keeps serving. Uploads arrive through ``gr.File`` (not ``gr.Image``,
which opens files with PIL before our code sees them) and are decoded by ``images.io.load_rgb`` with the
serving size limits (EXIF orientation, 16-bit, CMYK, decompression bombs).

API: ``/predict`` (``gradio_client.Client(url).predict(handle_file(path), age, sex, site, tta,
cam_method, target_layer, api_name="/predict")``) returns ``(answer_json, view_png, overlay_png,
summary_markdown)``; ``answer_json`` holds probability, threshold, decision, model_version, backbone,
the ``case_id`` under which the prediction log recorded the answer (null when ``serving.prediction_log``
is off or the record could not be written; the page shows it to quote when the outcome comes back),
and, when the served bundle ships an out-of-distribution detector, ``ood_score``, ``ood_flag`` and
``ood_threshold`` (the page then warns next to the probability when the image is flagged).

With a prediction log, the "Outcome" tab records a case's histopathology result
(``monitoring.outcomes``); API ``/record_outcome`` (``Client(url).predict(case_id, "melanoma" or "benign",
corrects_earlier, note, reported_by, patient_id, api_name="/record_outcome")``) returns what was recorded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from melanoma_ml.runtime import quiet_network_chatter

# Analytics off by default before gradio is imported (it reads the variable at import time); a
# GRADIO_ANALYTICS_ENABLED the user set is kept.
quiet_network_chatter()

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from melanoma_ml.config import ServingConfig, load_config  # noqa: E402
from melanoma_ml.images.io import UPLOAD_FORMATS_TEXT  # noqa: E402
from melanoma_ml.monitoring.outcomes import OUTCOMES, OutcomeError, record_outcome  # noqa: E402
from melanoma_ml.monitoring.prediction_log import PredictionLog, predict_and_log  # noqa: E402
from melanoma_ml.serving.model_card import known_metric, model_card_markdown, readable_time  # noqa: E402
from melanoma_ml.serving.request_fields import NO_CAM, UNKNOWN, InvalidRequest, age_hint  # noqa: E402
from melanoma_ml.serving.service import (  # noqa: E402
    DISCLAIMER,
    NO_MODEL_MESSAGE,
    ModelService,
    NoModelAvailable,
    Prediction,
    PredictionRequest,
    ServedModel,
    ServiceStatus,
)

log = logging.getLogger(__name__)

API_NAME = "predict"
OUTCOME_API_NAME = "record_outcome"
USER_ENV = "MELANOMA_APP_USER"
PASSWORD_ENV = "MELANOMA_APP_PASSWORD"
CAM_CHOICES = [("EigenCAM", "eigencam"), ("Grad-CAM", "gradcam"), ("Off", NO_CAM)]

CSS = """
#disclaimer { background: #fff7ed; border: 1px solid #fdba74; border-radius: 8px; padding: 6px 14px; }
#disclaimer p { color: #7c2d12; margin: 4px 0; }
#model-status { border-radius: 8px; padding: 2px 14px; border: 1px solid var(--border-color-primary); }
#result h2 { margin-top: 0; }
#model-view img, #cam-overlay img { width: 100%; height: 100%; object-fit: contain; }
.positive { color: #b91c1c; font-weight: 700; }
.negative { color: #15803d; font-weight: 700; }
.ood-warning { color: #92400e; font-weight: 700; }
"""


# ---------------------------------------------------------------------- text shown on the page
def status_markdown(status: ServiceStatus) -> str:
    """The line above the form: what is served, or why nothing is."""
    lines = []
    if status.model is None:  # a refused version is named, not reported as "nothing promoted"
        lines.append(f"**No model available.** {status.reload_error or NO_MODEL_MESSAGE}")
    else:
        model = status.model
        lines.append(
            f"Serving model **{model.version}** ({model.backbone}, {model.image_size} px), "
            f"promoted {readable_time(model.promoted_at)}; new promotions are picked up automatically."
        )
    if status.reload_error and status.model is not None:
        lines.append(f"**Warning:** {status.reload_error}")
    return "\n\n".join(lines)


def ood_warning(prediction: Prediction) -> str:
    """The out-of-distribution warning for a flagged image; "" when not flagged or the bundle has no detector."""
    if not prediction.ood_flag:
        return ""
    return (
        '<span class="ood-warning">This does not look like a dermoscopy image the model was trained on '
        f"(out-of-distribution score {prediction.ood_score:.1f} above threshold {prediction.ood_threshold:.1f}): "
        "the probability is not reliable for it.</span>"
    )


def result_markdown(prediction: Prediction, case_id: str | None = None) -> str:
    """Probability, decision, what the threshold meant in evaluation, the OOD warning when flagged, and the
    prediction log's case id when the answer was recorded."""
    model_metrics = prediction.model.manifest.metrics
    verdict = (
        '<span class="positive">At or above the decision threshold: suspicious for melanoma.</span>'
        if prediction.positive
        else '<span class="negative">Below the decision threshold.</span>'
    )
    sens = known_metric(model_metrics, "sensitivity")
    spec = known_metric(model_metrics, "specificity")
    operating = []
    if sens is not None:
        operating.append(f"sensitivity {sens.text()}")
    if spec is not None:
        operating.append(f"specificity {spec.text()}")
    operating_text = f"In evaluation this threshold had {' and '.join(operating)}." if operating else ""
    cam = f"{prediction.cam_method} on `{prediction.target_layer}`" if prediction.cam_method else "no CAM"
    tta = f"{prediction.views}-view TTA" if prediction.views > 1 else "single view"
    warning = ood_warning(prediction)
    ood = (
        ""
        if prediction.ood_score is None
        else f" · OOD score {prediction.ood_score:.1f} (threshold {prediction.ood_threshold:.1f})"
    )
    case = (
        f"Case id **{case_id}**: quote it when the histopathology result comes back.\n\n" if case_id else ""
    )
    return (
        f"## Melanoma probability: {prediction.probability:.1%}\n\n"
        + (f"{warning}\n\n" if warning else "")
        + f"{verdict} Threshold {prediction.threshold:.1%}. {operating_text}\n\n"
        + case
        + f"<small>Model {prediction.model_version} · {prediction.backbone} · {tta} · {cam}{ood} · "
        f"{prediction.seconds:.2f} s</small>"
    )


# ---------------------------------------------------------------------- event handlers
def _choices(values: Sequence[str]) -> list[str]:
    return [UNKNOWN, *values]


def tabular_hint(model: ServedModel | None) -> str:
    """The tabular textbox's placeholder: the served model's tabular columns, or that it has none."""
    if model is None or not model.tabular_features:
        return "this model uses no tabular features: leave this empty"
    example = ", ".join(f'"{c}": ...' for c in model.tabular_features[:2])
    return (
        f"optional JSON object, e.g. {{{example}}}; columns left out count as missing. "
        f"This model reads: {', '.join(model.tabular_features)}"
    )


def page_state(
    service: ModelService, sex: str | None = None, site: str | None = None, layer: str | None = None
) -> tuple[Any, ...]:
    """Status, model card and the served model's choices; the user's picks stay if the model still has them.

    Runs on page load and after every prediction, so a hot-reloaded model's vocabulary and CAM layers
    reach pages that are already open.
    """
    status = service.status()
    model = status.model
    vocabulary = model.vocabulary if model else {"sex": [], "site": []}
    layers = list(model.target_layers) if model else []
    sexes, sites = _choices(vocabulary["sex"]), _choices(vocabulary["site"])
    return (
        status_markdown(status),
        model_card_markdown(model, service.config.deployment_prevalence),
        gr.update(choices=sexes, value=sex if sex in sexes else UNKNOWN),
        gr.update(choices=sites, value=site if site in sites else UNKNOWN),
        gr.update(choices=layers, value=layer if layer in layers else (layers[0] if layers else None)),
        gr.update(placeholder=tabular_hint(model)),
    )


def run_prediction(
    service: ModelService,
    image: str | None,
    age: str | float | None,
    sex: str | None,
    site: str | None,
    tta: bool,
    cam_method: str,
    target_layer: str | None,
    tabular: str | None = None,
    prediction_log: PredictionLog | None = None,
) -> tuple[dict[str, Any], Any, Any, str]:
    """The ``/predict`` endpoint: (answer JSON, un-augmented view, CAM overlay or None, summary).

    ``tabular`` is optional JSON text ``{column: number}`` for models trained with tabular features.
    Each answer is recorded in ``prediction_log`` (when given); its case id is in the answer and summary.
    """
    request = PredictionRequest(
        image=image,
        age=age,
        sex=sex,
        site=site,
        tta=tta,
        cam_method=cam_method,
        target_layer=target_layer,
        tabular=tabular,
    )
    try:
        prediction, case_id = predict_and_log(service, request, prediction_log)
    except (InvalidRequest, NoModelAvailable) as exc:
        log.warning("request refused: %s", exc)
        raise gr.Error(str(exc), title="Cannot analyse this request", print_exception=False) from exc
    tag = uuid.uuid4().hex
    return (
        prediction.to_json() | {"case_id": case_id},
        unique_png(prediction.view, tag),
        unique_png(prediction.overlay, tag),
        result_markdown(prediction, case_id),
    )


def unique_png(array: np.ndarray | None, tag: str) -> Image.Image | None:
    """``array`` as a PIL image carrying a per-request PNG text chunk (pixels unchanged).

    Gradio stores an output image under a hash of its PNG bytes and rewrites that file in place, so two
    requests with identical images race: a client still downloading the first sees the file truncated by
    the second ("Response content shorter than Content-Length"). Unique bytes give each result its own file.
    """
    if array is None:
        return None
    image = Image.fromarray(array)
    image.info["melanoma-request"] = tag
    return image


def preview_upload(service: ModelService, image: str | None) -> Any:
    """Show the upload as it will be read (orientation fixed), or warn at once if it cannot be read."""
    if image is None:
        return None
    try:
        return unique_png(service.decode(image), uuid.uuid4().hex)
    except InvalidRequest as exc:
        gr.Warning(str(exc))
        return None


def record_outcome_form(
    root: str | Path,
    case_id: str | None,
    outcome: str | None,
    corrects: bool,
    note: str | None,
    reported_by: str | None,
    patient_id: str | None,
) -> str:
    """The ``/record_outcome`` endpoint: record a case's histopathology outcome; says what was recorded.

    Validation and messages are ``monitoring.outcomes.record_outcome``'s; a refusal is a ``gr.Error``.
    """
    try:
        result = record_outcome(
            root,
            case_id,
            outcome,
            source="app",
            reported_by=reported_by,
            note=note,
            patient_id=patient_id,
            supersedes=bool(corrects),
        )
    except OutcomeError as exc:
        log.warning("outcome refused: %s", exc)
        raise gr.Error(str(exc), title="Cannot record this outcome", print_exception=False) from exc
    return result.message


def outcome_tab(root: Path) -> None:
    """The "Outcome" tab, built inside the open Blocks (so behind the app's login, like every endpoint)."""
    with gr.Tab("Outcome", id="outcome"):
        gr.Markdown(
            "Record the histopathology result of a case scored here, by the case id shown with its result. "
            "*benign* means any diagnosis other than melanoma. A second, different result for a case is kept "
            "and flagged as a conflict; tick the box below to correct earlier results instead."
        )
        with gr.Row():
            case = gr.Textbox(label="Case id", placeholder="C-20261207-3f9a1c2b0d4e", max_lines=1)
            outcome = gr.Radio(label="Histopathology", choices=list(OUTCOMES), value=None)
        corrects = gr.Checkbox(label="Corrects earlier outcomes of this case (resolves a conflict)")
        with gr.Row():
            reported_by = gr.Textbox(label="Reported by (optional)", max_lines=1)
            patient = gr.Textbox(
                label="Pseudonymous patient id (optional, groups cases; never a name or record number)",
                max_lines=1,
            )
        note = gr.Textbox(label="Note (optional; no names or record numbers)", lines=2)
        button = gr.Button("Record outcome", elem_id="record-outcome")
        answer = gr.Textbox(label="Recorded", interactive=False, elem_id="outcome-result")

        def on_record(*args: Any) -> str:
            return record_outcome_form(root, *args)

        button.click(
            on_record,
            inputs=[case, outcome, corrects, note, reported_by, patient],
            outputs=answer,
            api_name=OUTCOME_API_NAME,
        )


# ---------------------------------------------------------------------- the app
def create_app(service: ModelService, prediction_log: PredictionLog | None = None) -> gr.Blocks:
    """Build the Blocks app on ``service`` with its request queue (nothing is launched).

    Reads the registry once to fill the choices; call it under ``main`` or a test, never at import.
    Every answer is recorded in ``prediction_log`` when given (``main`` passes the config's).
    """
    config = service.config
    status = service.status()
    model = status.model
    vocabulary = model.vocabulary if model else {"sex": [], "site": []}
    layers = list(model.target_layers) if model else []

    max_age = config.file_max_age_s
    with gr.Blocks(
        title="Melanoma risk from dermoscopy (research tool)", delete_cache=(max_age, max_age)
    ) as demo:
        gr.Markdown("# Melanoma risk from a dermoscopy image")
        gr.Markdown(f"**{DISCLAIMER}**", elem_id="disclaimer")
        status_md = gr.Markdown(status_markdown(status), elem_id="model-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                upload = gr.File(
                    label=f"Dermoscopy image ({UPLOAD_FORMATS_TEXT})",
                    type="filepath",
                    height=110,
                    elem_id="upload",
                )
                preview = gr.Image(
                    label="Upload as read (orientation corrected)",
                    interactive=False,
                    height=220,
                    format="png",
                )
                with gr.Row():
                    age = gr.Textbox(
                        label="Age (years)",
                        placeholder=age_hint(config.min_age, config.max_age),
                        max_lines=1,
                        elem_id="age",
                    )
                    sex = gr.Dropdown(
                        label="Sex",
                        choices=_choices(vocabulary["sex"]),
                        value=UNKNOWN,
                        allow_custom_value=True,
                        elem_id="sex",
                    )
                site = gr.Dropdown(
                    label="Anatomic site",
                    choices=_choices(vocabulary["site"]),
                    value=UNKNOWN,
                    allow_custom_value=True,
                    elem_id="site",
                )
                with gr.Accordion("Tabular features (optional)", open=False):
                    tabular = gr.Textbox(
                        label="Lesion measurements as JSON (e.g. ISIC 2024 tbp_lv_* values)",
                        placeholder=tabular_hint(model),
                        value="",  # a default, so API callers that send the first seven inputs still work
                        lines=2,
                        elem_id="tabular",
                    )
                with gr.Accordion("Options", open=True):
                    tta = gr.Checkbox(  # on: the views the served bundle records, in one batched pass
                        label="Test-time augmentation (the served model's flips/rotations, one batched pass)",
                        value=True,
                    )
                    cam = gr.Radio(label="Explanation", choices=CAM_CHOICES, value=config.cam_method)
                    layer = gr.Dropdown(
                        label="CAM target layer",
                        choices=layers,
                        value=layers[0] if layers else None,
                        allow_custom_value=True,
                        elem_id="cam-layer",
                    )
                button = gr.Button("Analyse", variant="primary", elem_id="analyse")
            with gr.Column(scale=3):
                summary = gr.Markdown("Upload an image and press **Analyse**.", elem_id="result")
                with gr.Row():
                    view = gr.Image(
                        label="Model input", interactive=False, format="png", height=300, elem_id="model-view"
                    )
                    overlay = gr.Image(
                        label="Class activation map",
                        interactive=False,
                        format="png",
                        height=300,
                        elem_id="cam-overlay",
                    )
                with gr.Accordion("API answer (JSON)", open=False):
                    answer = gr.JSON(label="answer")
        with gr.Accordion("Model card", open=True):
            card = gr.Markdown(model_card_markdown(model, service.config.deployment_prevalence))
        if prediction_log is not None:  # outcomes are recorded for the cases this log holds
            outcome_tab(prediction_log.paths.root)
        gr.Markdown(
            "<small>API: `gradio_client.Client(url).predict(handle_file(path), age, sex, site, tta, "
            'cam_method, target_layer, tabular, api_name="/predict")`; `tabular` is optional JSON text '
            "of the model's tabular features (may be left out or empty).</small>"
        )

        def on_load(
            sex_value: str | None, site_value: str | None, layer_value: str | None
        ) -> tuple[Any, ...]:
            return page_state(service, sex_value, site_value, layer_value)

        def on_predict(*args: Any) -> tuple[dict[str, Any], Any, Any, str]:
            return run_prediction(service, *args, prediction_log=prediction_log)

        def on_upload(image: str | None) -> Any:
            return preview_upload(service, image)

        state_outputs = [status_md, card, sex, site, layer, tabular]
        picks = [sex, site, layer]
        demo.load(on_load, inputs=picks, outputs=state_outputs, api_visibility="private")
        upload.change(on_upload, inputs=upload, outputs=preview, api_visibility="private")
        button.click(
            on_predict,
            inputs=[upload, age, sex, site, tta, cam, layer, tabular],
            outputs=[answer, view, overlay, summary],
            api_name=API_NAME,
        ).then(on_load, inputs=picks, outputs=state_outputs, api_visibility="private")
    demo.queue(max_size=config.queue_max_size, default_concurrency_limit=config.concurrency_limit)
    return demo


def launch_options(config: ServingConfig, auth: tuple[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``demo.launch`` besides host/port (theme, css, upload limit, auth)."""
    return {
        "theme": gr.themes.Soft(primary_hue="teal"),
        "css": CSS,
        "max_file_size": f"{config.max_upload_mb}mb",
        "auth": auth,
        "show_error": True,
    }


def auth_from_env(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """``(user, password)`` from MELANOMA_APP_USER / MELANOMA_APP_PASSWORD, or None when both are unset.

    Raises:
        SystemExit: only one of the two is set.
    """
    environ = dict(os.environ if environ is None else environ)
    user, password = environ.get(USER_ENV, ""), environ.get(PASSWORD_ENV, "")
    if bool(user) != bool(password):
        raise SystemExit(f"set both {USER_ENV} and {PASSWORD_ENV} to enable login, or neither to disable it")
    return (user, password) if user else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="melanoma-app",
        description="Serve the promoted melanoma model in a web page and a /predict API. "
        "Defaults come from the config (env MELANOMA_ARTIFACT_ROOT, MELANOMA_SERVING__HOST, "
        "MELANOMA_SERVING__PORT, ...); login from MELANOMA_APP_USER / MELANOMA_APP_PASSWORD.",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--artifact-root", help="artifact root holding registry/ (default: config)")
    parser.add_argument("--profile", default=None, help="config profile (demo, tiny, full); default none")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``melanoma-app``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.artifact_root:
        overrides["artifact_root"] = args.artifact_root
    serving: dict[str, Any] = {}
    if args.host:
        serving["host"] = args.host
    if args.port is not None:
        serving["port"] = args.port
    if serving:
        overrides["serving"] = serving
    try:
        config = load_config(args.profile, overrides)
    except ValueError as exc:
        raise SystemExit(f"melanoma-app: bad configuration: {exc}") from exc
    auth = auth_from_env()
    if config.serving.host not in {"127.0.0.1", "localhost", "::1"} and auth is None:
        log.warning(
            "binding %s without a login: anyone who can reach this machine can use the app; "
            "set %s and %s to require one",
            config.serving.host,
            USER_ENV,
            PASSWORD_ENV,
        )
    service = ModelService.from_config(config)
    log.info("following registry %s", service.registry.root)
    prediction_log = PredictionLog.from_config(config)
    if prediction_log.enabled:
        log.info("recording predictions in %s (serving.prediction_log)", prediction_log.folder)
    demo = create_app(service, prediction_log)
    demo.launch(
        server_name=config.serving.host,
        server_port=config.serving.port,
        **launch_options(config.serving, auth),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
